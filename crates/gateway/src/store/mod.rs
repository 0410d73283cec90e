//! Storage behind one `Store` interface, on SQLite and PostgreSQL.
//!
//! Both backends hold the same data with each dialect's natural types: settings are TEXT JSON in
//! SQLite and JSONB in PostgreSQL; timestamps are RFC 3339 UTC TEXT with six fractional digits in
//! SQLite and TIMESTAMPTZ in PostgreSQL, always with microsecond precision so a value read back
//! equals the value written. Migrations are embedded in the binary and run by [`Store::migrate`].

mod postgres;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

pub use postgres::PostgresStore;
pub use sqlite::{SqliteStore, sqlite_file_path};

/// The database used when `DATABASE_URL` is unset (SPEC §3).
pub const DEFAULT_DATABASE_URL: &str = "sqlite://meta-chat.db";

/// Everything that can go wrong in the store. Messages never carry secrets or connection URLs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The tenant (or other row) addressed does not exist.
    #[error("not found")]
    NotFound,
    /// A unique constraint was violated (duplicate tenant id or API key hash); the message names
    /// the constraint, never the value.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database URL is malformed or names an unsupported backend.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// Any other database failure (connection, query, migration, decoding).
    #[error("database error: {0}")]
    Database(String),
}

impl StoreError {
    fn database(err: impl std::fmt::Display) -> Self {
        Self::Database(err.to_string())
    }
}

/// Maps a driver error to a [`StoreError`]: unique violations become `Conflict`, a missing row
/// `NotFound`, everything else `Database`.
fn db_err(err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::RowNotFound => StoreError::NotFound,
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            // PostgreSQL names the constraint; SQLite puts "table.column" in the message. Neither
            // includes the offending value.
            let what = db
                .constraint()
                .map_or_else(|| db.message().to_string(), str::to_string);
            StoreError::Conflict(what)
        }
        _ => StoreError::database(err),
    }
}

/// A tenant as stored. `settings` holds the tenant's settings JSON exactly as written, with
/// provider keys already encrypted by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    /// Stable identifier chosen by the caller (for example a UUID).
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Hash of the tenant's API key; the key itself is never stored.
    pub api_key_hash: String,
    /// Settings JSON (SPEC §4.2), secrets encrypted.
    pub settings: serde_json::Value,
    /// When the tenant was created.
    pub created_at: DateTime<Utc>,
    /// When the settings or key last changed; strictly increases on every change.
    pub updated_at: DateTime<Utc>,
}

/// What [`Store::create_tenant`] needs; timestamps are set by the store.
#[derive(Debug, Clone)]
pub struct NewTenant {
    /// Identifier; must be unique.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// Hash of the tenant's API key; must be unique.
    pub api_key_hash: String,
    /// Settings JSON, secrets already encrypted.
    pub settings: serde_json::Value,
}

/// One request that reached a provider (SPEC §4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// The tenant billed.
    pub tenant_id: String,
    /// `X-Conversation-Id` or `metadata.conversation_id`, when given.
    pub conversation_id: Option<String>,
    /// The gateway's request id (`x-request-id`).
    pub request_id: String,
    /// `chat`, `embeddings` or `test`.
    pub endpoint: String,
    /// The provider that served (or, for a failure, the last one tried).
    pub provider: String,
    /// Its model.
    pub model: String,
    /// Prompt tokens.
    pub input_tokens: i64,
    /// Generated tokens.
    pub output_tokens: i64,
    /// Embedded tokens.
    pub embedding_tokens: i64,
    /// Cost in nano-dollars (1e-9 USD).
    pub cost_nano_usd: i64,
    /// From arrival to the end of the answer, in milliseconds.
    pub latency_ms: i64,
    /// For streams: from arrival to the first chunk, in milliseconds.
    pub ttft_ms: Option<i64>,
    /// `ok`, `error`, or `cancelled` (the client went away mid-stream).
    pub status: String,
    /// The error code when the request failed (`rate_limited`, `upstream_error`, …).
    pub error_kind: Option<String>,
    /// Answered from the response cache.
    pub cache_hit: bool,
    /// The provider that failed before a fallback served.
    pub fallback_from: Option<String>,
    /// Token counts are an estimate (the provider reported none).
    pub tokens_estimated: bool,
    /// When the request arrived.
    pub created_at: DateTime<Utc>,
}

/// Rows per multi-row `INSERT` of usage records: 19 values each stays far below both
/// databases' limit on bound parameters.
pub const USAGE_INSERT_CHUNK: usize = 500;

/// Persistent state of the gateway: tenants, instance-wide settings and (later) usage records.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The backend's name, `"sqlite"` or `"postgres"`, for logs.
    fn backend(&self) -> &'static str;

    /// Applies the embedded migrations that have not run yet. Idempotent.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Checks that the database answers (readiness probe).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Inserts a tenant. A duplicate id or API key hash is a [`StoreError::Conflict`].
    async fn create_tenant(&self, tenant: NewTenant) -> Result<Tenant, StoreError>;

    /// All tenants, oldest first.
    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError>;

    /// One tenant by id, or [`StoreError::NotFound`].
    async fn get_tenant(&self, id: &str) -> Result<Tenant, StoreError>;

    /// The tenant whose API key hashes to `api_key_hash`, if any (authentication).
    async fn tenant_by_key_hash(&self, api_key_hash: &str) -> Result<Option<Tenant>, StoreError>;

    /// Replaces a tenant's settings and advances `updated_at`. [`StoreError::NotFound`] if the
    /// tenant does not exist.
    async fn update_settings(
        &self,
        id: &str,
        settings: serde_json::Value,
    ) -> Result<Tenant, StoreError>;

    /// Replaces a tenant's API key hash (the old key stops working) and advances `updated_at`,
    /// so replicas caching tenants by key notice. [`StoreError::NotFound`] if the tenant does not
    /// exist, [`StoreError::Conflict`] if another tenant has that hash.
    async fn rotate_key(&self, id: &str, new_api_key_hash: &str) -> Result<Tenant, StoreError>;

    /// Deletes a tenant; its usage records are kept. [`StoreError::NotFound`] if it does not
    /// exist.
    async fn delete_tenant(&self, id: &str) -> Result<(), StoreError>;

    /// Tenants whose `updated_at` is at or after `since`, oldest change first, for refreshing a
    /// replica's settings cache. Inclusive, so a change made in the same microsecond as the
    /// previous poll's newest one is not missed.
    async fn tenants_updated_since(&self, since: DateTime<Utc>) -> Result<Vec<Tenant>, StoreError>;

    /// Ids of tenants deleted at or after `since` (kept for [`TOMBSTONE_LIFETIME`]), so a
    /// replica's tenant cache drops them.
    async fn tenant_deletions_since(&self, since: DateTime<Utc>)
    -> Result<Vec<String>, StoreError>;

    /// Every tenant's id and settings, for re-encrypting secrets under a new key (write back with
    /// [`Store::update_settings`]).
    async fn all_tenant_settings(&self) -> Result<Vec<(String, serde_json::Value)>, StoreError>;

    /// Appends usage records, in multi-row inserts of up to [`USAGE_INSERT_CHUNK`] rows, all in
    /// one transaction: either every record is stored or none is.
    async fn insert_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError>;

    /// A tenant's most recent usage records, newest first, at most `limit`.
    async fn recent_usage(
        &self,
        tenant_id: &str,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, StoreError>;

    /// How many usage records are stored for `tenant_id`, or for everyone.
    async fn count_usage(&self, tenant_id: Option<&str>) -> Result<u64, StoreError>;

    /// The stored hash of the admin API key, if one was set.
    async fn admin_key_hash(&self) -> Result<Option<String>, StoreError>;

    /// Sets (or replaces) the stored hash of the admin API key.
    async fn set_admin_key_hash(&self, hash: &str) -> Result<(), StoreError>;
}

/// Opens the store named by `database_url`: `sqlite:` (file created if missing) or
/// `postgres:`/`postgresql:`. Does not run migrations; call [`Store::migrate`].
pub async fn connect_store(database_url: &str) -> Result<Arc<dyn Store>, StoreError> {
    let scheme = database_url
        .split_once(':')
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("sqlite") => Ok(Arc::new(SqliteStore::connect(database_url).await?)),
        Some("postgres" | "postgresql") => {
            Ok(Arc::new(PostgresStore::connect(database_url).await?))
        }
        // Only the scheme is echoed: the rest of the URL may hold a password.
        Some(other) if is_scheme(other) => Err(StoreError::InvalidUrl(format!(
            "unsupported scheme `{other}:`; expected `sqlite:` or `postgres:`"
        ))),
        _ => Err(StoreError::InvalidUrl(
            "expected a URL starting with `sqlite:` or `postgres:`".to_string(),
        )),
    }
}

fn is_scheme(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The current time at the precision both backends store (microseconds).
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// The `updated_at` for a change made now to a row last changed at `previous`: now, or one
/// microsecond later than `previous` if the clock has not moved past it.
fn next_updated_at(previous: DateTime<Utc>) -> DateTime<Utc> {
    now().max(previous + chrono::TimeDelta::microseconds(1))
}

/// How long the record of a deleted tenant is kept for replicas to notice the deletion.
pub const TOMBSTONE_LIFETIME: chrono::TimeDelta = chrono::TimeDelta::days(1);

/// Key of the admin API key hash in the `system` table.
const ADMIN_KEY_HASH: &str = "admin_key_hash";

/// One embedded migration: version, description, SQL.
type EmbeddedMigration = (i64, &'static str, &'static str);

/// Builds a runtime [`Migrator`] from embedded SQL (no `migrate!` macro, see ARCHITECTURE.md).
fn migrator(migrations: &[EmbeddedMigration]) -> Migrator {
    Migrator::with_migrations(
        migrations
            .iter()
            .map(|&(version, description, sql)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}
