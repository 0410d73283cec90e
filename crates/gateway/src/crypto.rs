//! Secrets: AES-256-GCM for tenant provider keys, hashed tenant and admin API keys.
//!
//! * Tenant provider keys are encrypted with [`Cipher`] into the text format
//!   `v1.<key id>.<base64url nonce>.<base64url ciphertext+tag>`. The tenant id and field name
//!   are bound as associated data, so a value copied to another tenant or field fails to
//!   decrypt. The key id names the key that encrypted a value, so `rotate-encryption-key` can
//!   tell old values from new ones and the gateway can still read values written under
//!   `ENCRYPTION_KEY_PREVIOUS` while a rotation is in progress.
//! * `ENCRYPTION_KEY` (or the generated key file beside a SQLite database) is turned into a
//!   256-bit [`SecretKey`] with HKDF-SHA256.
//! * Tenant and admin API keys are random (`mc_` + base62 of 32 random bytes), stored only as
//!   SHA-256 hashes and compared in constant time.
//!
//! Nothing in this module logs, and no [`CryptoError`] message contains secret material.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Minimum length of `ENCRYPTION_KEY`, in characters.
pub const MIN_PASSPHRASE_CHARS: usize = 32;

/// Prefix of every tenant and admin API key.
pub const API_KEY_PREFIX: &str = "mc_";

/// Version tag of the encrypted-value format written by [`Cipher::encrypt`].
const FORMAT_VERSION: &str = "v1";
/// HKDF salt: a fixed domain string, so the same passphrase used by another program (or a
/// later format version) yields an unrelated key.
const HKDF_SALT: &[u8] = b"meta-chat/secrets/v1";
/// HKDF info: names the purpose of the derived key, leaving room for other keys from the same
/// passphrase later without any of them being related.
const HKDF_INFO: &[u8] = b"meta-chat/tenant-secrets/aes-256-gcm";
/// Domain prefix of the associated data.
const AAD_DOMAIN: &[u8] = b"meta-chat/v1";
/// Key length of AES-256.
const KEY_LEN: usize = 32;
/// AES-GCM's standard 96-bit nonce.
const NONCE_LEN: usize = 12;
/// AES-GCM authentication tag length.
const TAG_LEN: usize = 16;
/// Hex characters of the key id.
const KEY_ID_LEN: usize = 8;
/// Random bytes in a generated API key or key file.
const RANDOM_KEY_BYTES: usize = 32;
/// Base62 digits needed for 32 bytes: 62^43 > 2^256 > 62^42.
const API_KEY_BASE62_LEN: usize = 43;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// What can go wrong with secrets. No message contains a key, passphrase or plaintext.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// `ENCRYPTION_KEY` (or `ENCRYPTION_KEY_PREVIOUS`) is too short to be a strong key.
    #[error("encryption key must be at least {min} characters (got {actual})")]
    PassphraseTooShort {
        /// Required minimum, [`MIN_PASSPHRASE_CHARS`].
        min: usize,
        /// Characters given.
        actual: usize,
    },
    /// A stored value is not in the `v1.<key id>.<nonce>.<ciphertext>` format.
    #[error("stored secret is not a valid encrypted value")]
    Malformed,
    /// A stored value carries a format version this build does not know.
    #[error("stored secret uses an unsupported format version")]
    UnsupportedVersion,
    /// A stored value was encrypted with a key that is neither the current nor the previous one.
    #[error(
        "stored secret was encrypted with key id {key_id}, which is neither ENCRYPTION_KEY nor \
         ENCRYPTION_KEY_PREVIOUS"
    )]
    UnknownKey {
        /// Key id found in the stored value (a public fingerprint, not key material).
        key_id: String,
    },
    /// Authentication failed: wrong key, wrong tenant or field, or a tampered value.
    #[error(
        "stored secret failed to decrypt (wrong key, tenant or field, or the value was altered)"
    )]
    DecryptionFailed,
    /// Encryption failed (only for absurdly large inputs).
    #[error("encryption failed")]
    EncryptionFailed,
    /// The operating system's random number generator failed.
    #[error("random number generator failed: {0}")]
    Random(String),
    /// The key file could not be read or written.
    #[error("key file {}: {source}", path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The key file exists but holds no key.
    #[error("key file {} is empty", path.display())]
    KeyFileEmpty {
        /// The key file.
        path: PathBuf,
    },
}

/// A 256-bit key for tenant secrets, derived from `ENCRYPTION_KEY`.
///
/// The bytes are wiped from memory on drop; `Debug` shows only the key id.
pub struct SecretKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: String,
}

impl SecretKey {
    /// Derives the key from an `ENCRYPTION_KEY` string with HKDF-SHA256.
    ///
    /// HKDF does no key stretching, which is why at least [`MIN_PASSPHRASE_CHARS`] characters
    /// are required: the value is meant to be a random string (like the generated key file),
    /// not a memorable password.
    ///
    /// # Errors
    /// [`CryptoError::PassphraseTooShort`] for fewer than [`MIN_PASSPHRASE_CHARS`] characters.
    pub fn from_passphrase(passphrase: &str) -> Result<Self, CryptoError> {
        let actual = passphrase.chars().count();
        if actual < MIN_PASSPHRASE_CHARS {
            return Err(CryptoError::PassphraseTooShort {
                min: MIN_PASSPHRASE_CHARS,
                actual,
            });
        }
        let hkdf = Hkdf::<Sha256>::new(Some(HKDF_SALT), passphrase.as_bytes());
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        // 32 bytes is far below HKDF-SHA256's 8160-byte limit, so this cannot fail; mapping
        // the error keeps the function panic-free anyway.
        hkdf.expand(HKDF_INFO, bytes.as_mut_slice())
            .map_err(|_| CryptoError::EncryptionFailed)?;
        let id = key_id(&bytes);
        Ok(Self { bytes, id })
    }

    /// The key id: the first 8 hex characters of SHA-256 over the derived key. Public; it is
    /// written into every encrypted value to say which key encrypted it.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    fn aead(&self) -> Result<Aes256Gcm, CryptoError> {
        Aes256Gcm::new_from_slice(self.bytes.as_slice()).map_err(|_| CryptoError::EncryptionFailed)
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn key_id(bytes: &[u8; KEY_LEN]) -> String {
    let digest = Sha256::digest(bytes);
    let mut id = hex(&digest);
    id.truncate(KEY_ID_LEN);
    id
}

/// Encrypts and decrypts tenant secrets with the current key, and decrypts with the previous
/// key too while `ENCRYPTION_KEY_PREVIOUS` is set (for rotation).
pub struct Cipher {
    current: SecretKey,
    previous: Option<SecretKey>,
}

impl Cipher {
    /// A cipher over the current key and, during a rotation, the previous one.
    #[must_use]
    pub fn new(current: SecretKey, previous: Option<SecretKey>) -> Self {
        Self { current, previous }
    }

    /// A cipher from `ENCRYPTION_KEY` and, if set, `ENCRYPTION_KEY_PREVIOUS`.
    ///
    /// # Errors
    /// [`CryptoError::PassphraseTooShort`] if either is too short.
    pub fn from_passphrases(current: &str, previous: Option<&str>) -> Result<Self, CryptoError> {
        let current = SecretKey::from_passphrase(current)?;
        let previous = previous.map(SecretKey::from_passphrase).transpose()?;
        Ok(Self::new(current, previous))
    }

    /// Id of the key new values are encrypted with.
    #[must_use]
    pub fn current_key_id(&self) -> &str {
        self.current.id()
    }

    /// Id of the previous key, if one is configured.
    #[must_use]
    pub fn previous_key_id(&self) -> Option<&str> {
        self.previous.as_ref().map(SecretKey::id)
    }

    /// Encrypts `plaintext` for `field` of tenant `tenant_id` under the current key, as
    /// `v1.<key id>.<base64url nonce>.<base64url ciphertext+tag>` with a fresh random nonce.
    ///
    /// # Errors
    /// [`CryptoError::Random`] if the OS random number generator fails. This is returned rather
    /// than panicking, and there is deliberately no fallback nonce: reusing a nonce under
    /// AES-GCM would leak the authentication key.
    pub fn encrypt(
        &self,
        tenant_id: &str,
        field: &str,
        plaintext: &str,
    ) -> Result<String, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        // Reserve room for the tag up front so the buffer never reallocates and leaves a stray
        // copy of the plaintext on the heap; it holds only ciphertext once encryption is done.
        let mut buffer = Zeroizing::new(Vec::with_capacity(plaintext.len() + TAG_LEN));
        buffer.extend_from_slice(plaintext.as_bytes());
        self.current
            .aead()?
            .encrypt_in_place(
                &Nonce::from(nonce),
                &associated_data(tenant_id, field),
                &mut *buffer,
            )
            .map_err(|_| CryptoError::EncryptionFailed)?;
        Ok(format!(
            "{FORMAT_VERSION}.{}.{}.{}",
            self.current.id(),
            URL_SAFE_NO_PAD.encode(nonce),
            URL_SAFE_NO_PAD.encode(buffer.as_slice())
        ))
    }

    /// Decrypts a value written by [`Cipher::encrypt`] for the same tenant and field, with the
    /// current or previous key as its key id says.
    ///
    /// # Errors
    /// [`CryptoError::Malformed`] or [`CryptoError::UnsupportedVersion`] for values not in the
    /// format, [`CryptoError::UnknownKey`] if neither key matches the key id, and
    /// [`CryptoError::DecryptionFailed`] for the wrong tenant, field or key, or an altered value.
    pub fn decrypt(
        &self,
        tenant_id: &str,
        field: &str,
        stored: &str,
    ) -> Result<SecretString, CryptoError> {
        let parsed = Parsed::parse(stored)?;
        let aad = associated_data(tenant_id, field);
        let nonce = Nonce::from(parsed.nonce);
        // Both keys are tried if both match the id: two different keys share an 8-hex-digit id
        // with probability 2^-32, and trying both then is cheap and still authenticated.
        let candidates = [Some(&self.current), self.previous.as_ref()];
        let mut matched = false;
        for key in candidates.into_iter().flatten() {
            if key.id() != parsed.key_id {
                continue;
            }
            matched = true;
            let mut buffer = Zeroizing::new(parsed.ciphertext.clone());
            if key
                .aead()?
                .decrypt_in_place(&nonce, &aad, &mut *buffer)
                .is_ok()
            {
                let text =
                    std::str::from_utf8(buffer.as_slice()).map_err(|_| CryptoError::Malformed)?;
                // Copy into an exactly sized allocation owned by the SecretString; `buffer`
                // (with its spare capacity) is wiped when it drops here.
                return Ok(SecretString::from(text));
            }
        }
        if matched {
            Err(CryptoError::DecryptionFailed)
        } else {
            Err(CryptoError::UnknownKey {
                key_id: parsed.key_id.to_owned(),
            })
        }
    }

    /// True unless `stored` is a value in the current format under the current key, i.e. it
    /// is what `rotate-encryption-key` should rewrite (malformed values included, so the
    /// rotation reports them rather than skipping them silently).
    #[must_use]
    pub fn needs_rotation(&self, stored: &str) -> bool {
        Parsed::parse(stored).map_or(true, |parsed| parsed.key_id != self.current.id())
    }

    /// Decrypts `stored` (under the current or previous key) and encrypts it again under the
    /// current key with a fresh nonce.
    ///
    /// # Errors
    /// As [`Cipher::decrypt`] and [`Cipher::encrypt`].
    pub fn reencrypt(
        &self,
        tenant_id: &str,
        field: &str,
        stored: &str,
    ) -> Result<String, CryptoError> {
        use secrecy::ExposeSecret;
        let plaintext = self.decrypt(tenant_id, field, stored)?;
        self.encrypt(tenant_id, field, plaintext.expose_secret())
    }
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cipher")
            .field("current_key_id", &self.current_key_id())
            .field("previous_key_id", &self.previous_key_id())
            .finish()
    }
}

/// A stored value split into its parts (all checked for shape, none authenticated yet).
struct Parsed<'a> {
    key_id: &'a str,
    nonce: [u8; NONCE_LEN],
    ciphertext: Vec<u8>,
}

impl<'a> Parsed<'a> {
    fn parse(stored: &'a str) -> Result<Self, CryptoError> {
        let mut parts = stored.trim().split('.');
        let (Some(version), Some(key_id), Some(nonce), Some(ciphertext), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(CryptoError::Malformed);
        };
        if version != FORMAT_VERSION {
            // Only a `v<digits>` tag is another version; anything else is not our format.
            return Err(
                if version.len() > 1
                    && version.starts_with('v')
                    && version[1..].bytes().all(|b| b.is_ascii_digit())
                {
                    CryptoError::UnsupportedVersion
                } else {
                    CryptoError::Malformed
                },
            );
        }
        if key_id.len() != KEY_ID_LEN
            || !key_id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(CryptoError::Malformed);
        }
        let nonce: [u8; NONCE_LEN] = URL_SAFE_NO_PAD
            .decode(nonce)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(CryptoError::Malformed)?;
        let ciphertext = URL_SAFE_NO_PAD
            .decode(ciphertext)
            .map_err(|_| CryptoError::Malformed)?;
        if ciphertext.len() < TAG_LEN {
            return Err(CryptoError::Malformed);
        }
        Ok(Self {
            key_id,
            nonce,
            ciphertext,
        })
    }
}

/// `"meta-chat/v1"`, then tenant id and field name, each prefixed with its length as a
/// big-endian u64 so that no two different (tenant, field) pairs give the same bytes
/// (("ab", "c") and ("a", "bc") differ).
fn associated_data(tenant_id: &str, field: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + 16 + tenant_id.len() + field.len());
    aad.extend_from_slice(AAD_DOMAIN);
    for part in [tenant_id, field] {
        aad.extend_from_slice(&(part.len() as u64).to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    aad
}

fn fill_random(dest: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(dest).map_err(|e| CryptoError::Random(e.to_string()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// Reads the generated encryption key from `path`, or creates the file with a new random key
/// (32 random bytes, base64url, 43 characters) and mode 0600 if it does not exist.
///
/// Used with SQLite when `ENCRYPTION_KEY` is unset (see [`key_file_path_for_sqlite`]). An
/// existing file is never overwritten: losing the key would make every stored secret
/// unreadable. If two processes start at once, one creates the file and the other reads it.
///
/// # Errors
/// [`CryptoError::KeyFile`] if the file cannot be read or created, [`CryptoError::KeyFileEmpty`]
/// if it holds only whitespace, [`CryptoError::Random`] if no random key can be made.
pub fn load_or_create_key_file(path: &Path) -> Result<String, CryptoError> {
    let key_file_error = |source| CryptoError::KeyFile {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    // `create_new` fails instead of truncating if the file appeared since, so a key is never
    // replaced, even by a concurrent start.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(mut file) => {
            let mut raw = Zeroizing::new([0u8; RANDOM_KEY_BYTES]);
            fill_random(raw.as_mut_slice())?;
            let key = URL_SAFE_NO_PAD.encode(raw.as_slice());
            let written = file
                .write_all(key.as_bytes())
                .and_then(|()| file.write_all(b"\n"))
                .and_then(|()| file.sync_all());
            if let Err(source) = written {
                // A half-written file would be read back as a wrong key on the next start,
                // silently orphaning secrets; better to leave no file and fail now.
                drop(file);
                let _ = std::fs::remove_file(path);
                return Err(key_file_error(source));
            }
            Ok(key)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let mut contents = Zeroizing::new(String::new());
            std::fs::File::open(path)
                .and_then(|mut file| file.read_to_string(&mut contents))
                .map_err(key_file_error)?;
            let key = contents.trim();
            if key.is_empty() {
                return Err(CryptoError::KeyFileEmpty {
                    path: path.to_owned(),
                });
            }
            Ok(key.to_owned())
        }
        Err(e) => Err(key_file_error(e)),
    }
}

/// Where the generated key file lives for a SQLite `DATABASE_URL`: `<database file>.key`
/// beside the database (`sqlite://meta-chat.db` → `meta-chat.db.key`).
///
/// `None` for in-memory databases (`sqlite::memory:`, `sqlite://:memory:`, `mode=memory`),
/// whose secrets cannot outlive the process anyway, and for non-SQLite URLs. Query strings
/// such as `?mode=rwc` are ignored.
#[must_use]
pub fn key_file_path_for_sqlite(database_url: &str) -> Option<PathBuf> {
    let rest = database_url.trim().strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory_mode = query
        .split('&')
        .any(|pair| pair.eq_ignore_ascii_case("mode=memory"));
    if path.is_empty() || path == ":memory:" || in_memory_mode {
        return None;
    }
    Some(PathBuf::from(format!("{path}.key")))
}

/// A new tenant or admin API key: `mc_` followed by 32 random bytes in base62, zero-padded to
/// 43 characters (46 in all).
///
/// # Errors
/// [`CryptoError::Random`] if the OS random number generator fails.
pub fn generate_api_key() -> Result<String, CryptoError> {
    let mut raw = Zeroizing::new([0u8; RANDOM_KEY_BYTES]);
    fill_random(raw.as_mut_slice())?;
    let mut digits = Zeroizing::new([0u8; API_KEY_BASE62_LEN]);
    // Long division of the 256-bit big-endian number by 62, least significant digit first.
    for digit in digits.iter_mut().rev() {
        let mut remainder = 0u32;
        for byte in raw.iter_mut() {
            let value = (remainder << 8) | u32::from(*byte);
            // value < 62 * 256, so the quotient fits a byte.
            *byte = u8::try_from(value / 62).unwrap_or(0);
            remainder = value % 62;
        }
        *digit = BASE62[usize::try_from(remainder).unwrap_or(0)];
    }
    let mut key = String::with_capacity(API_KEY_PREFIX.len() + API_KEY_BASE62_LEN);
    key.push_str(API_KEY_PREFIX);
    key.extend(digits.iter().map(|&d| char::from(d)));
    Ok(key)
}

/// Hex SHA-256 of an API key, the only form in which API keys are stored.
///
/// A fast unsalted hash is appropriate here, unlike for passwords: keys carry 256 bits of
/// randomness, so neither brute force nor precomputed tables are feasible, and a fast hash
/// keeps every authenticated request cheap.
#[must_use]
pub fn hash_api_key(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// Whether `presented` hashes to `stored_hash`, compared in constant time so response timing
/// reveals nothing about how much of a hash matched.
#[must_use]
pub fn verify_api_key(presented: &str, stored_hash: &str) -> bool {
    hashes_match(&hash_api_key(presented), stored_hash)
}

/// Whether two key hashes are equal, compared in constant time.
#[must_use]
pub fn hashes_match(computed: &str, stored_hash: &str) -> bool {
    // `ct_eq` on slices of different lengths is false without comparing contents; the length
    // of a hash is not secret.
    computed.as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

/// A secret shown masked, as in tenant settings (`"sk-p…abcd"`). Never reveals more than a
/// third of the secret:
///
/// * 24 characters or more: first 4, `…`, last 4;
/// * 12 to 23: `…` and the last 4;
/// * 6 to 11: `…` and the last 2;
/// * shorter: `****`.
#[must_use]
pub fn mask_secret(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    let n = chars.len();
    let tail = |k: usize| chars[n - k..].iter().collect::<String>();
    if n >= 24 {
        let head: String = chars[..4].iter().collect();
        format!("{head}…{}", tail(4))
    } else if n >= 12 {
        format!("…{}", tail(4))
    } else if n >= 6 {
        format!("…{}", tail(2))
    } else {
        "****".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const PASS: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn key_derivation_is_deterministic_and_passphrase_specific() {
        let a = SecretKey::from_passphrase(PASS).unwrap();
        let b = SecretKey::from_passphrase(PASS).unwrap();
        let c = SecretKey::from_passphrase("another passphrase of 32+ chars!!").unwrap();
        assert_eq!(*a.bytes, *b.bytes);
        assert_ne!(*a.bytes, *c.bytes);
        assert_eq!(a.id(), b.id());
        assert_ne!(a.id(), c.id());
        assert_eq!(a.id().len(), KEY_ID_LEN);
        // HKDF output, not the passphrase bytes themselves.
        assert_ne!(&a.bytes[..], &PASS.as_bytes()[..KEY_LEN]);
        assert_eq!(a.id(), &hex(&Sha256::digest(&a.bytes[..]))[..KEY_ID_LEN]);
    }

    #[test]
    fn passphrase_length_counts_characters() {
        // 32 two-byte characters are 64 bytes but only 32 characters: accepted.
        assert!(SecretKey::from_passphrase(&"é".repeat(32)).is_ok());
        // 31 of them are 62 bytes but 31 characters: rejected.
        assert!(matches!(
            SecretKey::from_passphrase(&"é".repeat(31)),
            Err(CryptoError::PassphraseTooShort {
                min: 32,
                actual: 31
            })
        ));
    }

    #[test]
    fn associated_data_is_unambiguous() {
        assert_ne!(associated_data("ab", "c"), associated_data("a", "bc"));
        assert_ne!(associated_data("", "abc"), associated_data("abc", ""));
        assert!(associated_data("t", "f").starts_with(AAD_DOMAIN));
    }

    #[test]
    fn format_has_four_parts_with_sizes() {
        let cipher = Cipher::from_passphrases(PASS, None).unwrap();
        let stored = cipher.encrypt("t", "llm.apiKey", "sk-secret").unwrap();
        let parts: Vec<&str> = stored.split('.').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "v1");
        assert_eq!(parts[1], cipher.current_key_id());
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), NONCE_LEN);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(parts[3]).unwrap().len(),
            "sk-secret".len() + TAG_LEN
        );
        assert!(!stored.contains("sk-secret"));
    }

    #[test]
    fn empty_plaintext_round_trips() {
        let cipher = Cipher::from_passphrases(PASS, None).unwrap();
        let stored = cipher.encrypt("t", "f", "").unwrap();
        assert_eq!(
            cipher.decrypt("t", "f", &stored).unwrap().expose_secret(),
            ""
        );
    }

    #[test]
    fn parse_rejects_bad_shapes() {
        let cipher = Cipher::from_passphrases(PASS, None).unwrap();
        let good = cipher.encrypt("t", "f", "x").unwrap();
        let parts: Vec<&str> = good.split('.').collect();
        let id = parts[1];
        let nonce = parts[2];
        let ct = parts[3];
        for bad in [
            String::new(),
            "sk-plaintext-key".to_owned(),
            format!("v1.{id}.{nonce}"),
            format!("v1.{id}.{nonce}.{ct}.extra"),
            format!("v1.{}.{nonce}.{ct}", id.to_uppercase()),
            format!("v1.1234567.{nonce}.{ct}"),
            format!("v1.{id}.{nonce}=.{ct}"),
            format!("v1.{id}.AAAA.{ct}"),
            format!("v1.{id}.{nonce}.AAAA"),
            format!("v1.{id}.{nonce}.!!!!"),
            format!("x1.{id}.{nonce}.{ct}"),
        ] {
            assert!(
                matches!(
                    cipher.decrypt("t", "f", &bad),
                    Err(CryptoError::Malformed | CryptoError::UnknownKey { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            cipher.decrypt("t", "f", &format!("v2.{id}.{nonce}.{ct}")),
            Err(CryptoError::UnsupportedVersion)
        ));
    }

    #[test]
    fn base62_encoding_is_exact_for_known_values() {
        // Check the long division against a simple reference: the digits, read back as a
        // base-62 number, must give the original bytes.
        let key = generate_api_key().unwrap();
        let digits = &key[API_KEY_PREFIX.len()..];
        let mut bytes = [0u8; RANDOM_KEY_BYTES];
        for d in digits.bytes() {
            let mut carry = u32::try_from(BASE62.iter().position(|&c| c == d).unwrap()).unwrap();
            for byte in bytes.iter_mut().rev() {
                let value = u32::from(*byte) * 62 + carry;
                *byte = (value & 0xff) as u8;
                carry = value >> 8;
            }
            assert_eq!(carry, 0, "value exceeds 256 bits");
        }
        // Re-encoding the recovered bytes must give the same digits.
        let mut raw = bytes;
        let mut again = [0u8; API_KEY_BASE62_LEN];
        for digit in again.iter_mut().rev() {
            let mut remainder = 0u32;
            for byte in raw.iter_mut() {
                let value = (remainder << 8) | u32::from(*byte);
                *byte = (value / 62) as u8;
                remainder = value % 62;
            }
            *digit = BASE62[remainder as usize];
        }
        assert_eq!(&again[..], digits.as_bytes());
    }

    #[test]
    fn sqlite_key_paths() {
        let p = |url: &str| key_file_path_for_sqlite(url);
        assert_eq!(
            p("sqlite://meta-chat.db"),
            Some(PathBuf::from("meta-chat.db.key"))
        );
        assert_eq!(
            p("sqlite:meta-chat.db"),
            Some(PathBuf::from("meta-chat.db.key"))
        );
        assert_eq!(
            p("sqlite://data/x.sqlite?mode=rwc"),
            Some(PathBuf::from("data/x.sqlite.key"))
        );
        assert_eq!(
            p("sqlite:///var/lib/mc/db.sqlite"),
            Some(PathBuf::from("/var/lib/mc/db.sqlite.key"))
        );
        assert_eq!(p("sqlite::memory:"), None);
        assert_eq!(p("sqlite://:memory:"), None);
        assert_eq!(p("sqlite://shared?mode=memory&cache=shared"), None);
        assert_eq!(p("sqlite://"), None);
        assert_eq!(p("postgres://localhost/x"), None);
    }
}
