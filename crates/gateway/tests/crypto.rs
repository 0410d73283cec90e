//! Tenant secret encryption, key files, API keys and masking (`meta_chat::crypto`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meta_chat::crypto::{
    API_KEY_PREFIX, Cipher, CryptoError, SecretKey, generate_api_key, hash_api_key,
    key_file_path_for_sqlite, load_or_create_key_file, mask_secret, verify_api_key,
};
use secrecy::ExposeSecret;

const KEY_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-key-A";
const KEY_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-key-B";
const TENANT: &str = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
const FIELD: &str = "llm.apiKey";
const SECRET: &str = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789";

fn cipher(current: &str, previous: Option<&str>) -> Cipher {
    Cipher::from_passphrases(current, previous).unwrap()
}

#[test]
fn round_trip() {
    let c = cipher(KEY_A, None);
    let stored = c.encrypt(TENANT, FIELD, SECRET).unwrap();
    assert!(stored.starts_with(&format!("v1.{}.", c.current_key_id())));
    assert!(!stored.contains(SECRET));
    let plain = c.decrypt(TENANT, FIELD, &stored).unwrap();
    assert_eq!(plain.expose_secret(), SECRET);
}

#[test]
fn round_trip_unicode_and_long_values() {
    let c = cipher(KEY_A, None);
    let long = "ключ-🔑-".repeat(500);
    for value in ["é", long.as_str(), "with.dots.inside"] {
        let stored = c.encrypt(TENANT, FIELD, value).unwrap();
        assert_eq!(
            c.decrypt(TENANT, FIELD, &stored).unwrap().expose_secret(),
            value
        );
    }
}

#[test]
fn same_plaintext_encrypts_differently_each_time() {
    let c = cipher(KEY_A, None);
    let values: HashSet<String> = (0..50)
        .map(|_| c.encrypt(TENANT, FIELD, SECRET).unwrap())
        .collect();
    assert_eq!(values.len(), 50);
    let nonces: HashSet<String> = values
        .iter()
        .map(|v| v.split('.').nth(2).unwrap().to_owned())
        .collect();
    assert_eq!(nonces.len(), 50, "nonces must be fresh");
}

#[test]
fn copied_to_another_tenant_fails() {
    let c = cipher(KEY_A, None);
    let stored = c.encrypt(TENANT, FIELD, SECRET).unwrap();
    let err = c.decrypt("another-tenant", FIELD, &stored).unwrap_err();
    assert!(matches!(err, CryptoError::DecryptionFailed), "{err:?}");
}

#[test]
fn copied_to_another_field_fails() {
    let c = cipher(KEY_A, None);
    let stored = c.encrypt(TENANT, FIELD, SECRET).unwrap();
    let err = c.decrypt(TENANT, "embeddings.apiKey", &stored).unwrap_err();
    assert!(matches!(err, CryptoError::DecryptionFailed), "{err:?}");
}

#[test]
fn tenant_and_field_boundary_is_unambiguous() {
    let c = cipher(KEY_A, None);
    let stored = c.encrypt("ab", "c", SECRET).unwrap();
    assert!(c.decrypt("a", "bc", &stored).is_err());
    assert!(c.decrypt("ab", "c", &stored).is_ok());
}

#[test]
fn tampered_byte_fails() {
    let c = cipher(KEY_A, None);
    let stored = c.encrypt(TENANT, FIELD, SECRET).unwrap();
    let parts: Vec<&str> = stored.split('.').collect();
    // Flip one bit in every position of the nonce and the ciphertext+tag in turn.
    for part in [2, 3] {
        let bytes = URL_SAFE_NO_PAD.decode(parts[part]).unwrap();
        for i in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[i] ^= 0x01;
            let mut new_parts = parts.clone();
            let encoded = URL_SAFE_NO_PAD.encode(&tampered);
            new_parts[part] = &encoded;
            let err = c.decrypt(TENANT, FIELD, &new_parts.join(".")).unwrap_err();
            assert!(matches!(err, CryptoError::DecryptionFailed), "{err:?}");
        }
    }
    // Truncated ciphertext fails too.
    let truncated = &stored[..stored.len() - 4];
    assert!(c.decrypt(TENANT, FIELD, truncated).is_err());
}

#[test]
fn wrong_key_fails() {
    let a = cipher(KEY_A, None);
    let b = cipher(KEY_B, None);
    let stored = a.encrypt(TENANT, FIELD, SECRET).unwrap();
    let err = b.decrypt(TENANT, FIELD, &stored).unwrap_err();
    assert!(
        matches!(&err, CryptoError::UnknownKey { key_id } if key_id == a.current_key_id()),
        "{err:?}"
    );
    // Forging the key id to B's does not help: authentication fails.
    let forged = stored.replacen(a.current_key_id(), b.current_key_id(), 1);
    let err = b.decrypt(TENANT, FIELD, &forged).unwrap_err();
    assert!(matches!(err, CryptoError::DecryptionFailed), "{err:?}");
}

#[test]
fn previous_key_decrypts_and_reencrypt_moves_to_current() {
    let old = cipher(KEY_A, None);
    let stored = old.encrypt(TENANT, FIELD, SECRET).unwrap();

    let rotating = cipher(KEY_B, Some(KEY_A));
    assert_eq!(rotating.previous_key_id(), Some(old.current_key_id()));
    assert_ne!(rotating.current_key_id(), old.current_key_id());
    assert!(rotating.needs_rotation(&stored));
    assert_eq!(
        rotating
            .decrypt(TENANT, FIELD, &stored)
            .unwrap()
            .expose_secret(),
        SECRET
    );

    let moved = rotating.reencrypt(TENANT, FIELD, &stored).unwrap();
    assert_eq!(
        moved.split('.').nth(1).unwrap(),
        rotating.current_key_id(),
        "re-encrypted under the current key"
    );
    assert!(!rotating.needs_rotation(&moved));

    // After rotation the previous key is no longer needed.
    let after = cipher(KEY_B, None);
    assert_eq!(
        after
            .decrypt(TENANT, FIELD, &moved)
            .unwrap()
            .expose_secret(),
        SECRET
    );
    // …and the old value is unreadable without it.
    assert!(matches!(
        after.decrypt(TENANT, FIELD, &stored),
        Err(CryptoError::UnknownKey { .. })
    ));
}

#[test]
fn reencrypt_keeps_tenant_and_field_binding() {
    let rotating = cipher(KEY_B, Some(KEY_A));
    let stored = cipher(KEY_A, None).encrypt(TENANT, FIELD, SECRET).unwrap();
    assert!(rotating.reencrypt("other", FIELD, &stored).is_err());
    let moved = rotating.reencrypt(TENANT, FIELD, &stored).unwrap();
    assert!(rotating.decrypt("other", FIELD, &moved).is_err());
}

#[test]
fn needs_rotation_cases() {
    let c = cipher(KEY_A, None);
    let current = c.encrypt(TENANT, FIELD, SECRET).unwrap();
    assert!(!c.needs_rotation(&current));
    let other = cipher(KEY_B, None).encrypt(TENANT, FIELD, SECRET).unwrap();
    assert!(c.needs_rotation(&other));
    assert!(c.needs_rotation("sk-plaintext-not-encrypted"));
}

#[test]
fn short_passphrase_rejected() {
    let err = SecretKey::from_passphrase("too-short-but-secret").unwrap_err();
    let message = err.to_string();
    assert!(message.contains("at least 32 characters"), "{message}");
    assert!(!message.contains("too-short-but-secret"));
    assert!(matches!(
        err,
        CryptoError::PassphraseTooShort {
            min: 32,
            actual: 20
        }
    ));
    assert!(SecretKey::from_passphrase(&"x".repeat(31)).is_err());
    assert!(SecretKey::from_passphrase(&"x".repeat(32)).is_ok());
    // A short previous key is rejected too.
    assert!(Cipher::from_passphrases(KEY_A, Some("short")).is_err());
}

#[test]
fn errors_never_contain_secrets() {
    let c = cipher(KEY_A, None);
    let stored = c.encrypt(TENANT, FIELD, SECRET).unwrap();
    let errors = [
        c.decrypt("x", FIELD, &stored).unwrap_err(),
        c.decrypt(TENANT, FIELD, SECRET).unwrap_err(),
        c.decrypt(TENANT, FIELD, "v1.zzzz.sk-proj-abc.def")
            .unwrap_err(),
        cipher(KEY_B, None)
            .decrypt(TENANT, FIELD, &stored)
            .unwrap_err(),
    ];
    for err in errors {
        let text = format!("{err} {err:?}");
        assert!(!text.contains(SECRET), "{text}");
        assert!(!text.contains("sk-proj"), "{text}");
        assert!(!text.contains(KEY_A) && !text.contains(KEY_B), "{text}");
    }
}

#[test]
fn debug_output_contains_no_key_material() {
    let key = SecretKey::from_passphrase(KEY_A).unwrap();
    let c = cipher(KEY_B, Some(KEY_A));
    let debug = format!("{key:?} {c:?} {key:#?} {c:#?}");
    assert!(debug.contains(key.id()), "{debug}");
    assert!(!debug.contains("aaaaaaaa") && !debug.contains("bbbbbbbb"));
    assert!(!debug.contains("bytes"), "{debug}");
    // No byte array dump (`[12, 34, …]`) of a key anywhere.
    assert!(!debug.contains('['), "{debug}");
}

#[test]
fn key_file_created_0600_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta-chat.db.key");
    let first = load_or_create_key_file(&path).unwrap();
    assert!(first.len() >= 43, "{}", first.len());
    assert!(SecretKey::from_passphrase(&first).is_ok());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    }
    let on_disk = std::fs::read_to_string(&path).unwrap();
    let second = load_or_create_key_file(&path).unwrap();
    assert_eq!(first, second);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        on_disk,
        "not rewritten"
    );
}

#[test]
fn key_file_existing_content_is_read_trimmed_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.key");
    let existing = "my-own-key-of-more-than-32-characters-long";
    std::fs::write(&path, format!("  {existing}\n\n")).unwrap();
    assert_eq!(load_or_create_key_file(&path).unwrap(), existing);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("  {existing}\n\n")
    );
}

#[test]
fn key_file_empty_or_unwritable_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.key");
    std::fs::write(&empty, "\n").unwrap();
    assert!(matches!(
        load_or_create_key_file(&empty),
        Err(CryptoError::KeyFileEmpty { .. })
    ));
    let missing_dir = dir.path().join("no-such-dir").join("db.key");
    let err = load_or_create_key_file(&missing_dir).unwrap_err();
    assert!(matches!(err, CryptoError::KeyFile { .. }), "{err:?}");
    assert!(err.to_string().contains("db.key"), "{err}");
}

#[test]
fn different_key_files_give_different_keys() {
    let dir = tempfile::tempdir().unwrap();
    let a = load_or_create_key_file(&dir.path().join("a.key")).unwrap();
    let b = load_or_create_key_file(&dir.path().join("b.key")).unwrap();
    assert_ne!(a, b);
}

#[test]
fn key_file_path_beside_sqlite_database() {
    assert_eq!(
        key_file_path_for_sqlite("sqlite://meta-chat.db"),
        Some("meta-chat.db.key".into())
    );
    assert_eq!(
        key_file_path_for_sqlite("sqlite://meta-chat.db?mode=rwc"),
        Some("meta-chat.db.key".into())
    );
    assert_eq!(key_file_path_for_sqlite("sqlite::memory:"), None);
    assert_eq!(key_file_path_for_sqlite("sqlite://:memory:"), None);
    assert_eq!(key_file_path_for_sqlite("postgres://u@h/db"), None);
}

#[test]
fn api_key_format() {
    let key = generate_api_key().unwrap();
    assert!(key.starts_with(API_KEY_PREFIX));
    assert!(key.starts_with("mc_"));
    assert_eq!(key.len(), 3 + 43);
    assert!(key[3..].chars().all(|c| c.is_ascii_alphanumeric()), "{key}");
}

#[test]
fn api_keys_are_unique() {
    let keys: HashSet<String> = (0..1000).map(|_| generate_api_key().unwrap()).collect();
    assert_eq!(keys.len(), 1000);
    // Leading digits are not stuck at zero: the encoding spreads over the whole alphabet.
    let first_chars: HashSet<char> = keys.iter().filter_map(|k| k[3..].chars().nth(1)).collect();
    assert!(first_chars.len() > 30, "{}", first_chars.len());
}

#[test]
fn api_key_hash_verifies() {
    let key = generate_api_key().unwrap();
    let hash = hash_api_key(&key);
    assert_eq!(hash.len(), 64);
    assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(!hash.contains(&key[3..]));
    assert_eq!(hash, hash_api_key(&key), "deterministic");
    assert!(verify_api_key(&key, &hash));

    let other = generate_api_key().unwrap();
    assert!(!verify_api_key(&other, &hash));
    assert!(!verify_api_key("", &hash));
    assert!(!verify_api_key(&key, ""));
    assert!(!verify_api_key(&key, &hash[..63]));
    assert!(
        !verify_api_key(&hash, &hash),
        "the hash itself is not a key"
    );
}

#[test]
fn known_sha256_hash() {
    assert_eq!(
        hash_api_key("abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn mask_examples() {
    assert_eq!(mask_secret("sk-proj-1234567890abcdefabcd"), "sk-p…abcd");
    assert_eq!(mask_secret(SECRET), "sk-p…6789");
    assert_eq!(mask_secret("sk-ant-api03-xyz-abcd"), "…abcd"); // 21 chars
    assert_eq!(mask_secret("abcdefghijkl"), "…ijkl"); // 12 chars
    assert_eq!(mask_secret("abcdefghijk"), "…jk"); // 11 chars
    assert_eq!(mask_secret("abcdef"), "…ef");
    assert_eq!(mask_secret("abcde"), "****");
    assert_eq!(mask_secret(""), "****");
    // Characters, not bytes.
    assert_eq!(mask_secret(&"é".repeat(30)), "éééé…éééé");
}

#[test]
fn mask_never_reveals_more_than_a_third() {
    for n in 0..80 {
        let secret: String = (0..n)
            .map(|i| char::from(b'a' + u8::try_from(i % 26).unwrap()))
            .collect();
        let masked = mask_secret(&secret);
        let revealed = masked.chars().filter(|&c| c != '…' && c != '*').count();
        assert!(revealed * 3 <= n, "{n}: {masked}");
    }
}
