//! Opening what every command needs: the configuration, the store (migrated) and the cipher
//! for tenant secrets.

use std::sync::Arc;

use secrecy::ExposeSecret;

use crate::config::{Config, DatabaseKind};
use crate::crypto::{self, Cipher, CryptoError};
use crate::store::{self, Store, StoreError};
use crate::tenants::Tenants;

/// Why start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A variable has a bad value.
    #[error("{0}")]
    Config(#[from] meta_chat_llm::EnvError),
    /// The database could not be opened or migrated.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The encryption key could not be loaded or created.
    #[error("ENCRYPTION_KEY: {0}")]
    Crypto(#[from] CryptoError),
}

/// Opens the store named by `DATABASE_URL` and applies pending migrations.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartupError> {
    let store = store::connect_store(&config.database_url).await?;
    store.migrate().await?;
    Ok(store)
}

/// The cipher for tenant secrets: `ENCRYPTION_KEY` (and `ENCRYPTION_KEY_PREVIOUS`), or, with
/// SQLite and no key set, the key file beside the database, created on first start.
pub fn open_cipher(config: &Config) -> Result<Cipher, StartupError> {
    let previous = config
        .encryption_key_previous
        .as_ref()
        .map(|k| k.expose_secret().to_owned());
    if let Some(key) = &config.encryption_key {
        return Ok(Cipher::from_passphrases(
            key.expose_secret(),
            previous.as_deref(),
        )?);
    }
    // Config already refuses PostgreSQL without a key; SQLite gets a key file.
    debug_assert_eq!(config.database, DatabaseKind::Sqlite);
    let passphrase = match crypto::key_file_path_for_sqlite(&config.database_url) {
        Some(path) => {
            let existed = path.exists();
            let key = crypto::load_or_create_key_file(&path)?;
            if !existed {
                tracing::warn!(path = %path.display(), "generated ENCRYPTION_KEY into a key file; back it up with the database");
            }
            key
        }
        // An in-memory database lives only as long as the process; so may its key.
        None => crypto::generate_api_key()?,
    };
    Ok(Cipher::from_passphrases(&passphrase, previous.as_deref())?)
}

/// Configuration, store and tenant operations, ready for a command.
pub async fn open_tenants(config: &Config) -> Result<Tenants, StartupError> {
    let cipher = open_cipher(config)?;
    let store = open_store(config).await?;
    Ok(Tenants::new(store, Arc::new(cipher)))
}
