//! Store behaviour, one test body per behaviour, run against SQLite (always) and PostgreSQL
//! (when `TEST_DATABASE_URL` is set; required when `REQUIRE_SERVICES=1`). Each PostgreSQL run
//! gets its own schema, so tests run in parallel without seeing each other's rows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::future::Future;
use std::sync::Arc;

use chrono::{TimeDelta, Utc};
use common::{PgSchema, test_database_url};
use meta_chat::store::{
    NewTenant, PostgresStore, SqliteStore, Store, StoreError, Tenant, connect_store,
    sqlite_file_path,
};
use meta_chat::tenant_cache::TenantCache;
use serde_json::json;

/// One backend under test. Fields drop in order: the store's pool closes before the schema goes.
struct Backend {
    name: &'static str,
    store: Arc<dyn Store>,
    /// Keeps the SQLite temp dir alive until the test ends.
    _dir: Option<tempfile::TempDir>,
    _schema: Option<PgSchema>,
}

async fn sqlite_backend() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("store.db").display());
    let store = SqliteStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    Backend {
        name: "sqlite",
        store: Arc::new(store),
        _dir: Some(dir),
        _schema: None,
    }
}

async fn postgres_backend(base_url: &str) -> Backend {
    let schema = PgSchema::create(base_url, "mc_test").await;
    let store = PostgresStore::connect(&schema.url()).await.unwrap();
    store.migrate().await.unwrap();
    Backend {
        name: "postgres",
        store: Arc::new(store),
        _dir: None,
        _schema: Some(schema),
    }
}

/// A fresh SQLite store, plus a fresh PostgreSQL store when `TEST_DATABASE_URL` is set.
async fn backends() -> Vec<Backend> {
    let mut backends = vec![sqlite_backend().await];
    if let Some(url) = test_database_url() {
        backends.push(postgres_backend(&url).await);
    }
    backends
}

/// Runs `body` against every backend, naming the backend if it fails.
async fn each_backend<F, Fut>(body: F)
where
    F: Fn(&'static str, Arc<dyn Store>) -> Fut,
    Fut: Future<Output = ()>,
{
    for backend in backends().await {
        eprintln!("backend: {}", backend.name);
        body(backend.name, Arc::clone(&backend.store)).await;
    }
}

fn new_tenant(id: &str, key_hash: &str) -> NewTenant {
    NewTenant {
        id: id.to_string(),
        name: format!("Tenant {id}"),
        api_key_hash: key_hash.to_string(),
        settings: json!({
            "llm": {"provider": "anthropic", "model": "claude-3-5-sonnet-20241022",
                    "apiKey": "enc:v1:abcdef", "temperature": 0.7},
            "rateLimit": {"requestsPerMinute": 10}
        }),
    }
}

#[tokio::test]
async fn create_get_and_list_tenants() {
    each_backend(|backend, store| async move {
        assert!(store.list_tenants().await.unwrap().is_empty(), "{backend}");
        let created = store
            .create_tenant(new_tenant("t1", "hash-1"))
            .await
            .unwrap();
        assert_eq!(created.id, "t1", "{backend}");
        assert_eq!(created.created_at, created.updated_at, "{backend}");
        store
            .create_tenant(new_tenant("t2", "hash-2"))
            .await
            .unwrap();

        let fetched = store.get_tenant("t1").await.unwrap();
        assert_eq!(
            fetched, created,
            "{backend}: read back equals what was written"
        );
        assert_eq!(fetched.name, "Tenant t1", "{backend}");
        assert_eq!(
            fetched.settings["llm"]["apiKey"], "enc:v1:abcdef",
            "{backend}"
        );

        let ids: Vec<String> = store
            .list_tenants()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, ["t1", "t2"], "{backend}: oldest first");
        assert!(
            matches!(store.get_tenant("nope").await, Err(StoreError::NotFound)),
            "{backend}"
        );
    })
    .await;
}

#[tokio::test]
async fn lookup_by_key_hash() {
    each_backend(|backend, store| async move {
        store
            .create_tenant(new_tenant("t1", "hash-1"))
            .await
            .unwrap();
        store
            .create_tenant(new_tenant("t2", "hash-2"))
            .await
            .unwrap();
        let found = store.tenant_by_key_hash("hash-2").await.unwrap();
        assert_eq!(found.map(|t| t.id).as_deref(), Some("t2"), "{backend}");
        assert!(
            store.tenant_by_key_hash("hash-3").await.unwrap().is_none(),
            "{backend}"
        );
    })
    .await;
}

#[tokio::test]
async fn duplicate_id_or_key_hash_is_conflict() {
    each_backend(|backend, store| async move {
        store
            .create_tenant(new_tenant("t1", "hash-1"))
            .await
            .unwrap();
        let err = store
            .create_tenant(new_tenant("t1", "hash-other"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{backend}: {err:?}");
        let err = store
            .create_tenant(new_tenant("t2", "hash-1"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{backend}: {err:?}");
        assert!(
            !err.to_string().contains("hash-1"),
            "{backend}: {err} echoes the value"
        );
        assert_eq!(store.list_tenants().await.unwrap().len(), 1, "{backend}");
    })
    .await;
}

#[tokio::test]
async fn update_settings_persists_and_bumps_updated_at() {
    each_backend(|backend, store| async move {
        let created = store
            .create_tenant(new_tenant("t1", "hash-1"))
            .await
            .unwrap();
        let settings = json!({"cache": {"enabled": true, "ttlSeconds": 60}});
        let updated = store.update_settings("t1", settings.clone()).await.unwrap();
        assert_eq!(updated.settings, settings, "{backend}");
        assert_eq!(updated.created_at, created.created_at, "{backend}");
        assert!(updated.updated_at > created.updated_at, "{backend}");

        // Immediately again: updated_at still strictly increases.
        let again = store.update_settings("t1", json!({})).await.unwrap();
        assert!(again.updated_at > updated.updated_at, "{backend}");

        let fetched = store.get_tenant("t1").await.unwrap();
        assert_eq!(fetched, again, "{backend}: persisted");
        assert_eq!(
            store.all_tenant_settings().await.unwrap(),
            vec![("t1".to_string(), json!({}))],
            "{backend}"
        );
        assert!(
            matches!(
                store.update_settings("nope", json!({})).await,
                Err(StoreError::NotFound)
            ),
            "{backend}"
        );
    })
    .await;
}

#[tokio::test]
async fn rotate_key_replaces_the_hash() {
    each_backend(|backend, store| async move {
        let created = store
            .create_tenant(new_tenant("t1", "old-hash"))
            .await
            .unwrap();
        store
            .create_tenant(new_tenant("t2", "other-hash"))
            .await
            .unwrap();
        let rotated = store.rotate_key("t1", "new-hash").await.unwrap();
        assert_eq!(rotated.api_key_hash, "new-hash", "{backend}");
        assert!(rotated.updated_at > created.updated_at, "{backend}");
        assert!(
            store
                .tenant_by_key_hash("old-hash")
                .await
                .unwrap()
                .is_none(),
            "{backend}"
        );
        let found = store.tenant_by_key_hash("new-hash").await.unwrap().unwrap();
        assert_eq!(found.id, "t1", "{backend}");

        let err = store.rotate_key("t1", "other-hash").await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{backend}: {err:?}");
        let err = store.rotate_key("nope", "x").await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound), "{backend}: {err:?}");
    })
    .await;
}

#[tokio::test]
async fn delete_tenant_then_not_found() {
    each_backend(|backend, store| async move {
        store
            .create_tenant(new_tenant("t1", "hash-1"))
            .await
            .unwrap();
        store
            .create_tenant(new_tenant("t2", "hash-2"))
            .await
            .unwrap();
        store.delete_tenant("t1").await.unwrap();
        assert!(
            matches!(store.get_tenant("t1").await, Err(StoreError::NotFound)),
            "{backend}"
        );
        assert!(
            store.tenant_by_key_hash("hash-1").await.unwrap().is_none(),
            "{backend}"
        );
        assert!(
            matches!(store.delete_tenant("t1").await, Err(StoreError::NotFound)),
            "{backend}"
        );
        let left: Vec<String> = store
            .list_tenants()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(left, ["t2"], "{backend}");
    })
    .await;
}

#[tokio::test]
async fn deletions_are_reported_since_a_mark() {
    each_backend(|backend, store| async move {
        store
            .create_tenant(new_tenant("t1", "hash-1"))
            .await
            .unwrap();
        store
            .create_tenant(new_tenant("t2", "hash-2"))
            .await
            .unwrap();
        let before = Utc::now() - TimeDelta::seconds(1);
        assert!(
            store
                .tenant_deletions_since(before)
                .await
                .unwrap()
                .is_empty(),
            "{backend}"
        );
        store.delete_tenant("t1").await.unwrap();
        assert_eq!(
            store.tenant_deletions_since(before).await.unwrap(),
            ["t1"],
            "{backend}"
        );
        let later = Utc::now() + TimeDelta::seconds(1);
        assert!(
            store
                .tenant_deletions_since(later)
                .await
                .unwrap()
                .is_empty(),
            "{backend}"
        );
        // A failed deletion leaves no tombstone.
        assert!(matches!(
            store.delete_tenant("nope").await,
            Err(StoreError::NotFound)
        ));
        assert_eq!(
            store.tenant_deletions_since(before).await.unwrap(),
            ["t1"],
            "{backend}"
        );
    })
    .await;
}

#[tokio::test]
async fn tenants_updated_since_returns_recent_changes() {
    each_backend(|backend, store| async move {
        store
            .create_tenant(new_tenant("t1", "hash-1"))
            .await
            .unwrap();
        let t2 = store
            .create_tenant(new_tenant("t2", "hash-2"))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let mark = Utc::now();
        assert!(
            store.tenants_updated_since(mark).await.unwrap().is_empty(),
            "{backend}"
        );

        let updated = store.update_settings("t1", json!({"x": 1})).await.unwrap();
        let changed = store.tenants_updated_since(mark).await.unwrap();
        assert_eq!(changed, vec![updated.clone()], "{backend}");

        // Inclusive at the boundary: a poll from the newest seen timestamp sees that row again.
        let changed = store
            .tenants_updated_since(updated.updated_at)
            .await
            .unwrap();
        assert_eq!(changed.len(), 1, "{backend}");

        let everything = store
            .tenants_updated_since(t2.created_at - TimeDelta::hours(1))
            .await
            .unwrap();
        let ids: Vec<&str> = everything.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["t2", "t1"], "{backend}: oldest change first");
    })
    .await;
}

#[tokio::test]
async fn admin_key_hash_set_get_overwrite() {
    each_backend(|backend, store| async move {
        assert_eq!(store.admin_key_hash().await.unwrap(), None, "{backend}");
        store.set_admin_key_hash("admin-1").await.unwrap();
        assert_eq!(
            store.admin_key_hash().await.unwrap().as_deref(),
            Some("admin-1"),
            "{backend}"
        );
        store.set_admin_key_hash("admin-2").await.unwrap();
        assert_eq!(
            store.admin_key_hash().await.unwrap().as_deref(),
            Some("admin-2"),
            "{backend}"
        );
    })
    .await;
}

#[tokio::test]
async fn migrate_twice_keeps_data_and_ping_works() {
    each_backend(|backend, store| async move {
        store
            .create_tenant(new_tenant("t1", "hash-1"))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store.migrate().await.unwrap();
        store.ping().await.unwrap();
        assert_eq!(store.list_tenants().await.unwrap().len(), 1, "{backend}");
    })
    .await;
}

#[tokio::test]
async fn sqlite_file_is_created_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub-less.db");
    assert!(!path.exists());
    let url = format!("sqlite://{}", path.display());
    assert_eq!(sqlite_file_path(&url).as_deref(), Some(path.as_path()));

    let store = SqliteStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    assert!(path.exists(), "database file created");

    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let foreign_keys: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(foreign_keys, 1);

    // The same file through the generic entry point, already migrated.
    let store = connect_store(&url).await.unwrap();
    assert_eq!(store.backend(), "sqlite");
    store.migrate().await.unwrap();
    store.ping().await.unwrap();
}

#[tokio::test]
async fn in_memory_sqlite_keeps_its_data() {
    let store = connect_store("sqlite::memory:").await.unwrap();
    store.migrate().await.unwrap();
    store
        .create_tenant(new_tenant("t1", "hash-1"))
        .await
        .unwrap();
    assert_eq!(store.get_tenant("t1").await.unwrap().id, "t1");
    assert_eq!(sqlite_file_path("sqlite::memory:"), None);
}

#[tokio::test]
async fn connect_store_picks_postgres_by_scheme() {
    let Some(url) = test_database_url() else {
        return;
    };
    let store = connect_store(&url).await.unwrap();
    assert_eq!(store.backend(), "postgres");
    store.ping().await.unwrap();
    if let Some(rest) = url.strip_prefix("postgres://") {
        let store = connect_store(&format!("postgresql://{rest}"))
            .await
            .unwrap();
        assert_eq!(store.backend(), "postgres");
    }
}

#[tokio::test]
async fn unknown_url_scheme_is_a_clear_error() {
    let err = connect_store("mysql://root:s3cret@localhost/db")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidUrl(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("mysql"), "{message}");
    assert!(
        message.contains("sqlite:") && message.contains("postgres:"),
        "{message}"
    );
    assert!(!message.contains("s3cret"), "{message} echoes the password");

    let err = connect_store("meta-chat.db").await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidUrl(_)), "{err:?}");
}

#[tokio::test]
async fn tenant_cache_follows_changes_made_by_another_replica() {
    each_backend(|backend, store| async move {
        // Two replicas' caches over one database; changes are made behind their backs.
        let cache = TenantCache::new(Arc::clone(&store));
        store
            .create_tenant(new_tenant("t1", "hash-1"))
            .await
            .unwrap();
        let first = cache.get("hash-1").await.unwrap().unwrap();
        assert_eq!(first.id, "t1", "{backend}");
        assert!(cache.get("hash-unknown").await.unwrap().is_none());

        let mark = Utc::now() - TimeDelta::seconds(1);
        let updated = store
            .update_settings("t1", json!({"llm": {"provider": "anthropic"}}))
            .await
            .unwrap();
        // Served from memory until a refresh brings the change.
        assert_eq!(
            cache.get("hash-1").await.unwrap().unwrap().settings,
            first.settings
        );
        assert_eq!(cache.refresh(mark).await.unwrap(), 1, "{backend}");
        assert_eq!(
            cache.get("hash-1").await.unwrap().unwrap().settings,
            updated.settings,
            "{backend}"
        );

        // An older version arriving late (a lookup that raced the change) does not win.
        cache.apply(Tenant::clone(&first));
        assert_eq!(
            cache.get("hash-1").await.unwrap().unwrap().updated_at,
            updated.updated_at,
            "{backend}"
        );

        store.rotate_key("t1", "hash-2").await.unwrap();
        cache.refresh(mark).await.unwrap();
        assert!(cache.get("hash-1").await.unwrap().is_none(), "{backend}");
        assert_eq!(
            cache.get("hash-2").await.unwrap().unwrap().id,
            "t1",
            "{backend}"
        );

        store.delete_tenant("t1").await.unwrap();
        cache.refresh(mark).await.unwrap();
        assert!(cache.get("hash-2").await.unwrap().is_none(), "{backend}");
        assert!(cache.is_empty(), "{backend}");
    })
    .await;
}
