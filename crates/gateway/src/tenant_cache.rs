//! The tenants of this replica's recent requests, in memory, keyed by the hash of their API
//! key, so authenticating a request costs a hash and a map lookup instead of a database query.
//!
//! Freshness:
//! - The replica that makes a change (`PUT`, key rotation, deletion) applies it to its own cache
//!   at once ([`TenantCache::apply`], [`TenantCache::remove`]).
//! - Every replica polls the store every [`REFRESH_INTERVAL`] for tenants changed or deleted
//!   since its previous poll, so another replica's change is in use within one second. Each
//!   poll reaches [`OVERLAP`] further back than the previous one started, which covers
//!   transactions that commit late and clocks of replicas that disagree by less than that.
//! - Applying a tenant keeps whichever version has the newer `updated_at`, so a lookup that read
//!   the database just before a change cannot put the old version back; a deleted tenant is not
//!   re-added for [`OVERLAP`] after its deletion was seen.
//!
//! While the database is unreachable the cache keeps answering for the tenants it holds; keys it
//! has not seen get 503 from the caller. Entries hold settings as stored, provider keys still
//! encrypted: they are decrypted per request, for as long as the request needs them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::store::{Store, StoreError, Tenant};

/// How often every replica asks the store what changed.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(500);

/// How far each poll reaches back before the previous one started.
pub const OVERLAP: Duration = Duration::from_secs(5);

/// Tenants by API key hash, kept fresh from the store.
#[derive(Debug)]
pub struct TenantCache {
    store: Arc<dyn Store>,
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Tenant by the hash of its current API key.
    by_hash: HashMap<String, Arc<Tenant>>,
    /// The key hash each cached tenant is filed under.
    hash_of: HashMap<String, String>,
    /// Tenants deleted recently, with when the deletion was seen: not re-added from a lookup
    /// that raced with the deletion.
    deleted: HashMap<String, Instant>,
}

impl Inner {
    /// Files `tenant` under its key hash unless a newer version is cached or it was deleted;
    /// returns the version now cached (if any).
    fn apply(&mut self, tenant: Tenant) -> Option<Arc<Tenant>> {
        if self.deleted.contains_key(&tenant.id) {
            return None;
        }
        if let Some(hash) = self.hash_of.get(&tenant.id) {
            if let Some(cached) = self.by_hash.get(hash)
                && cached.updated_at >= tenant.updated_at
            {
                return Some(Arc::clone(cached));
            }
            let hash = hash.clone();
            self.by_hash.remove(&hash);
        }
        let tenant = Arc::new(tenant);
        self.hash_of
            .insert(tenant.id.clone(), tenant.api_key_hash.clone());
        self.by_hash
            .insert(tenant.api_key_hash.clone(), Arc::clone(&tenant));
        Some(tenant)
    }

    fn remove(&mut self, id: &str) {
        if let Some(hash) = self.hash_of.remove(id) {
            self.by_hash.remove(&hash);
        }
        self.deleted.insert(id.to_owned(), Instant::now());
    }
}

impl TenantCache {
    /// An empty cache over `store`. Call [`TenantCache::spawn_refresh`] to keep it fresh.
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            store,
            inner: RwLock::new(Inner::default()),
        })
    }

    /// The tenant whose API key hashes to `api_key_hash`: from memory, else from the store
    /// (and then remembered). `None` when no tenant has that key.
    pub async fn get(&self, api_key_hash: &str) -> Result<Option<Arc<Tenant>>, StoreError> {
        if let Some(tenant) = self.read().by_hash.get(api_key_hash) {
            return Ok(Some(Arc::clone(tenant)));
        }
        let Some(tenant) = self.store.tenant_by_key_hash(api_key_hash).await? else {
            return Ok(None);
        };
        // A newer version cached meanwhile may have another key (rotated): only a version
        // filed under the presented key's hash authenticates.
        Ok(self
            .write()
            .apply(tenant)
            .filter(|cached| cached.api_key_hash == api_key_hash))
    }

    /// Uses `tenant` (as just written to the store) from now on, unless a newer version is
    /// cached.
    pub fn apply(&self, tenant: Tenant) {
        self.write().apply(tenant);
    }

    /// Forgets a deleted tenant: its key stops working on this replica at once.
    pub fn remove(&self, id: &str) {
        self.write().remove(id);
    }

    /// How many tenants are cached.
    pub fn len(&self) -> usize {
        self.read().by_hash.len()
    }

    /// Whether no tenant is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies the changes and deletions the store reports since `since`. Returns how many
    /// tenants changed.
    pub async fn refresh(&self, since: DateTime<Utc>) -> Result<usize, StoreError> {
        let changed = self.store.tenants_updated_since(since).await?;
        let deleted = self.store.tenant_deletions_since(since).await?;
        let count = changed.len() + deleted.len();
        let mut inner = self.write();
        let forget_before = Instant::now().checked_sub(OVERLAP * 2);
        inner
            .deleted
            .retain(|_, seen| forget_before.is_none_or(|before| *seen >= before));
        for id in &deleted {
            inner.remove(id);
        }
        for tenant in changed {
            inner.apply(tenant);
        }
        Ok(count)
    }

    /// Polls the store every [`REFRESH_INTERVAL`] for as long as the cache is alive. A failed
    /// poll is logged and retried from the same point at the next tick.
    pub fn spawn_refresh(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let cache: Weak<Self> = Arc::downgrade(self);
        let overlap = chrono::TimeDelta::from_std(OVERLAP).unwrap_or(chrono::TimeDelta::zero());
        tokio::spawn(async move {
            let mut since = Utc::now() - overlap;
            let mut ticks = tokio::time::interval(REFRESH_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                ticks.tick().await;
                let Some(cache) = cache.upgrade() else {
                    return;
                };
                let started = Utc::now();
                match cache.refresh(since).await {
                    Ok(changed) => {
                        if failing {
                            tracing::info!("tenant cache refresh works again");
                            failing = false;
                        }
                        if changed > 0 {
                            tracing::debug!(changed, "tenant cache refreshed");
                        }
                        since = started - overlap;
                    }
                    Err(error) => {
                        if !failing {
                            tracing::warn!(%error, "cannot refresh the tenant cache; serving what it holds");
                            failing = true;
                        }
                    }
                }
            }
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent (each update is a
        // few inserts), so a poisoned lock is still usable.
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn tenant(id: &str, hash: &str, at: i64) -> Tenant {
        let base = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        Tenant {
            id: id.into(),
            name: id.into(),
            api_key_hash: hash.into(),
            settings: serde_json::json!({}),
            created_at: base,
            updated_at: base + TimeDelta::seconds(at),
        }
    }

    #[test]
    fn the_newer_version_wins_whatever_the_order() {
        let mut inner = Inner::default();
        inner.apply(tenant("a", "h2", 2));
        let kept = inner.apply(tenant("a", "h1", 1));
        assert_eq!(kept.map(|t| t.api_key_hash.clone()).as_deref(), Some("h2"));
        assert!(!inner.by_hash.contains_key("h1"));
        assert!(inner.by_hash.contains_key("h2"));
    }

    #[test]
    fn a_rotated_key_replaces_the_old_one() {
        let mut inner = Inner::default();
        inner.apply(tenant("a", "h1", 1));
        inner.apply(tenant("a", "h2", 2));
        assert!(!inner.by_hash.contains_key("h1"));
        assert_eq!(inner.by_hash.len(), 1);
        assert_eq!(inner.hash_of.get("a").map(String::as_str), Some("h2"));
    }

    #[test]
    fn a_deleted_tenant_is_not_re_added() {
        let mut inner = Inner::default();
        inner.apply(tenant("a", "h1", 1));
        inner.remove("a");
        assert!(inner.by_hash.is_empty());
        assert!(inner.apply(tenant("a", "h1", 1)).is_none());
        assert!(inner.by_hash.is_empty());
    }
}
