//! Tenant management shared by the HTTP API and the command line: settings validated and
//! merged, provider keys encrypted at rest and masked when shown, API keys hashed.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::Value;

use crate::crypto::{self, Cipher, CryptoError};
use crate::settings::{SettingsError, TenantSettings};
use crate::store::{NewTenant, Store, StoreError, Tenant};
use crate::tenant_cache::TenantCache;

/// What can go wrong managing tenants.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// The settings are not valid; nothing was stored.
    #[error("invalid settings: {0}")]
    InvalidSettings(#[from] SettingsError),
    /// The name is empty or too long.
    #[error("name: must be 1 to 200 characters")]
    InvalidName,
    /// No tenant has this id.
    #[error("tenant not found")]
    NotFound,
    /// The database failed.
    #[error(transparent)]
    Store(StoreError),
    /// A stored secret could not be encrypted or decrypted (wrong `ENCRYPTION_KEY`?).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl From<StoreError> for TenantError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => Self::NotFound,
            other => Self::Store(other),
        }
    }
}

/// A tenant as shown to users: secrets masked.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantView {
    /// The tenant's id.
    pub id: String,
    /// The tenant's name.
    pub name: String,
    /// Settings with every provider key masked (`sk-p…abcd`).
    pub settings: Value,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Last changed at.
    pub updated_at: DateTime<Utc>,
}

/// A tenant and its API key, which is shown only this once.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantWithKey {
    /// The tenant.
    #[serde(flatten)]
    pub tenant: TenantView,
    /// The new API key (`mc_…`); only its hash is stored.
    pub api_key: String,
}

/// Tenant operations over a [`Store`] and a [`Cipher`].
#[derive(Debug, Clone)]
pub struct Tenants {
    store: Arc<dyn Store>,
    cipher: Arc<Cipher>,
    cache: Option<Arc<TenantCache>>,
    /// Settings already opened, by tenant id, with the `updated_at` they were opened at.
    opened: Arc<RwLock<HashMap<String, Opened>>>,
}

/// A tenant's opened settings and the version of the tenant they were opened from.
type Opened = (DateTime<Utc>, Arc<TenantSettings>);

/// Tenants whose opened settings are kept; past it the memo starts over.
const MAX_OPENED: usize = 10_000;

impl Tenants {
    /// Tenant operations on this store, with this cipher for provider keys.
    pub fn new(store: Arc<dyn Store>, cipher: Arc<Cipher>) -> Self {
        Self {
            store,
            cipher,
            cache: None,
            opened: Arc::default(),
        }
    }

    /// Applies every change made through these operations to `cache` at once, so this replica
    /// uses new settings, keys and deletions from its very next request.
    pub fn with_cache(mut self, cache: Arc<TenantCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    fn cached(&self, tenant: &Tenant) {
        if let Some(cache) = &self.cache {
            cache.apply(tenant.clone());
        }
    }

    /// Creates a tenant with a fresh API key.
    pub async fn create(
        &self,
        name: &str,
        settings: Option<&Value>,
    ) -> Result<TenantWithKey, TenantError> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(TenantError::InvalidName);
        }
        let settings = match settings {
            Some(value) => TenantSettings::parse(value)?,
            None => TenantSettings::default(),
        };
        let id = uuid::Uuid::now_v7().to_string();
        let api_key = crypto::generate_api_key()?;
        let stored = self.seal(&id, settings)?;
        let tenant = self
            .store
            .create_tenant(NewTenant {
                id,
                name: name.to_owned(),
                api_key_hash: crypto::hash_api_key(&api_key),
                settings: stored,
            })
            .await?;
        Ok(TenantWithKey {
            tenant: self.view(&tenant)?,
            api_key,
        })
    }

    /// Every tenant, masked.
    pub async fn list(&self) -> Result<Vec<TenantView>, TenantError> {
        let tenants = self.store.list_tenants().await?;
        tenants.iter().map(|t| self.view(t)).collect()
    }

    /// One tenant, masked.
    pub async fn show(&self, id: &str) -> Result<TenantView, TenantError> {
        let tenant = self.store.get_tenant(id).await?;
        self.view(&tenant)
    }

    /// Replaces the sections given in `update` (SPEC §4.2 `PUT`) and removes those given as
    /// `null`, after validating them; an invalid update stores nothing.
    pub async fn update_settings(
        &self,
        id: &str,
        update_json: &Value,
    ) -> Result<TenantView, TenantError> {
        let update = TenantSettings::parse(update_json)?;
        let tenant = self.store.get_tenant(id).await?;
        let mut settings = self.open(&tenant)?;
        settings.merge(update);
        settings.clear_nulls(update_json);
        settings.validate()?;
        let stored = self.seal(id, settings)?;
        let tenant = self.store.update_settings(id, stored).await?;
        self.cached(&tenant);
        self.view(&tenant)
    }

    /// Gives the tenant a new API key; the old one stops working.
    pub async fn rotate_key(&self, id: &str) -> Result<TenantWithKey, TenantError> {
        let api_key = crypto::generate_api_key()?;
        let tenant = self
            .store
            .rotate_key(id, &crypto::hash_api_key(&api_key))
            .await?;
        self.cached(&tenant);
        Ok(TenantWithKey {
            tenant: self.view(&tenant)?,
            api_key,
        })
    }

    /// Deletes a tenant; its key stops working.
    pub async fn delete(&self, id: &str) -> Result<(), TenantError> {
        self.store.delete_tenant(id).await?;
        if let Some(cache) = &self.cache {
            cache.remove(id);
        }
        if let Ok(mut opened) = self.opened.write() {
            opened.remove(id);
        }
        Ok(())
    }

    /// The tenant's settings with provider keys decrypted, for calling its providers. Keep
    /// the result only as long as the call needs it.
    pub fn open(&self, tenant: &Tenant) -> Result<TenantSettings, TenantError> {
        let mut settings = TenantSettings::parse(&tenant.settings)?;
        for (field, value) in settings.secrets_mut() {
            let plain = self.cipher.decrypt(&tenant.id, &field, value)?;
            *value = plain.expose_secret().to_owned();
        }
        Ok(settings)
    }

    /// [`Tenants::open`] for the request path: the settings are parsed and their keys
    /// decrypted once per version of the tenant (`updated_at` changes with every change of
    /// its settings, keys included) and shared by its requests, as the tenant itself is.
    pub fn open_shared(&self, tenant: &Tenant) -> Result<Arc<TenantSettings>, TenantError> {
        let known = self.opened.read().ok().and_then(|opened| {
            opened
                .get(&tenant.id)
                .filter(|(version, _)| *version == tenant.updated_at)
                .map(|(_, settings)| settings.clone())
        });
        if let Some(settings) = known {
            return Ok(settings);
        }
        let settings = Arc::new(self.open(tenant)?);
        if let Ok(mut opened) = self.opened.write() {
            if opened.len() >= MAX_OPENED && !opened.contains_key(&tenant.id) {
                opened.clear();
            }
            let newer = opened
                .get(&tenant.id)
                .is_some_and(|(version, _)| *version > tenant.updated_at);
            if !newer {
                opened.insert(tenant.id.clone(), (tenant.updated_at, settings.clone()));
            }
        }
        Ok(settings)
    }

    /// Re-encrypts every stored provider key that is not under the current key (after
    /// `ENCRYPTION_KEY_PREVIOUS` → `ENCRYPTION_KEY`). Returns how many keys moved.
    pub async fn reencrypt_all(&self) -> Result<usize, TenantError> {
        let mut moved = 0;
        for (id, value) in self.store.all_tenant_settings().await? {
            let mut settings = TenantSettings::parse(&value)?;
            let mut changed = false;
            for (field, secret) in settings.secrets_mut() {
                if self.cipher.needs_rotation(secret) {
                    *secret = self.cipher.reencrypt(&id, &field, secret)?;
                    changed = true;
                    moved += 1;
                }
            }
            if changed {
                self.store
                    .update_settings(&id, serde_json::to_value(&settings).unwrap_or(value))
                    .await?;
            }
        }
        Ok(moved)
    }

    /// Encrypts every provider key of `settings` for tenant `id`.
    fn seal(&self, id: &str, mut settings: TenantSettings) -> Result<Value, TenantError> {
        for (field, value) in settings.secrets_mut() {
            *value = self.cipher.encrypt(id, &field, value)?;
        }
        serde_json::to_value(&settings).map_err(|e| {
            TenantError::InvalidSettings(SettingsError {
                field: "settings".into(),
                message: e.to_string(),
            })
        })
    }

    /// The tenant with its provider keys masked.
    fn view(&self, tenant: &Tenant) -> Result<TenantView, TenantError> {
        let mut settings = self.open(tenant)?;
        for (_, value) in settings.secrets_mut() {
            *value = crypto::mask_secret(value);
        }
        Ok(TenantView {
            id: tenant.id.clone(),
            name: tenant.name.clone(),
            settings: serde_json::to_value(&settings).unwrap_or(Value::Null),
            created_at: tenant.created_at,
            updated_at: tenant.updated_at,
        })
    }
}
