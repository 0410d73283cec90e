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
use chrono::{DateTime, NaiveDate, NaiveTime, SubsecRound, Utc};
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

/// Sums over a set of usage records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotals {
    /// Requests that reached a provider.
    pub requests: i64,
    /// Of those, the ones that failed (`status = 'error'`).
    pub errors: i64,
    /// Of those, the ones answered from the response cache.
    pub cache_hits: i64,
    /// Prompt tokens.
    pub input_tokens: i64,
    /// Generated tokens.
    pub output_tokens: i64,
    /// Embedded tokens.
    pub embedding_tokens: i64,
    /// Cost in nano-dollars.
    pub cost_nano_usd: i64,
}

impl std::ops::AddAssign for UsageTotals {
    fn add_assign(&mut self, other: Self) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.cache_hits += other.cache_hits;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.embedding_tokens += other.embedding_tokens;
        self.cost_nano_usd += other.cost_nano_usd;
    }
}

impl UsageTotals {
    /// The totals of one record.
    pub fn of(record: &UsageRecord) -> Self {
        Self {
            requests: 1,
            errors: i64::from(record.status == "error"),
            cache_hits: i64::from(record.cache_hit),
            input_tokens: record.input_tokens,
            output_tokens: record.output_tokens,
            embedding_tokens: record.embedding_tokens,
            cost_nano_usd: record.cost_nano_usd,
        }
    }
}

/// Which records a usage query covers: one tenant's or everyone's, created in `[from, to)`.
#[derive(Debug, Clone, Copy)]
pub struct UsageScope<'a> {
    /// Only this tenant's records, or every tenant's.
    pub tenant_id: Option<&'a str>,
    /// First instant covered.
    pub from: DateTime<Utc>,
    /// First instant no longer covered.
    pub to: DateTime<Utc>,
}

/// What [`Store::usage_grouped`] groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageDimension {
    /// The UTC day of `created_at`; the key is `YYYY-MM-DD`.
    Day,
    /// Provider and model; the key is `(provider, model)`.
    Model,
    /// Provider; the key is `(provider, "")`.
    Provider,
    /// Tenant; the key is `(tenant_id, "")`.
    Tenant,
}

/// One group of [`Store::usage_grouped`]: its two key parts (the second empty when the
/// dimension has one) and its totals.
pub type UsageGroup = (String, String, UsageTotals);

/// One conversation's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationUsage {
    /// The tenant the conversation belongs to.
    pub tenant_id: String,
    /// The conversation id; `None` groups the requests that named no conversation.
    pub conversation_id: Option<String>,
    /// Its totals in the range.
    pub totals: UsageTotals,
    /// Its first request in the range.
    pub first_at: DateTime<Utc>,
    /// Its last request in the range.
    pub last_at: DateTime<Utc>,
}

/// A page of conversations, most expensive first, with how many there are in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationPage {
    /// The conversations of the page.
    pub conversations: Vec<ConversationUsage>,
    /// How many conversations the range holds.
    pub total: u64,
}

/// Latency and errors of one provider over a usage scope ([`Store::provider_latency`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderLatency {
    /// The provider (`openai`, `anthropic`, `ollama`).
    pub provider: String,
    /// Its requests in the scope, cache hits included.
    pub requests: i64,
    /// Of those, the failed ones (`status = 'error'`).
    pub errors: i64,
    /// The median latency in milliseconds of its requests that were not cache hits, by the
    /// nearest-rank definition (the value at rank ⌈0.5·n⌉ in ascending order); `None` when every
    /// request was a cache hit.
    pub p50_ms: Option<i64>,
    /// The 95th percentile, the value at rank ⌈0.95·n⌉.
    pub p95_ms: Option<i64>,
}

/// One part of a usage range: whole UTC days read from the day rollups, or an edge read from
/// the records themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangePart {
    /// Days `[first, end)` from `usage_daily`.
    Days(NaiveDate, NaiveDate),
    /// Records created in `[from, to)`.
    Records(DateTime<Utc>, DateTime<Utc>),
}

/// The start of `day` in UTC.
pub fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::MIN).and_utc()
}

/// Splits `[from, to)` into the whole UTC days it covers (served by the rollups) and the
/// partial days at either edge (served by the records).
fn plan_range(from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<RangePart> {
    if from >= to {
        return Vec::new();
    }
    let first_whole = if midnight(from.date_naive()) == from {
        from.date_naive()
    } else {
        from.date_naive() + chrono::Days::new(1)
    };
    let end_whole = to.date_naive();
    if first_whole >= end_whole {
        return vec![RangePart::Records(from, to)];
    }
    let mut parts = Vec::with_capacity(3);
    if from < midnight(first_whole) {
        parts.push(RangePart::Records(from, midnight(first_whole)));
    }
    parts.push(RangePart::Days(first_whole, end_whole));
    if midnight(end_whole) < to {
        parts.push(RangePart::Records(midnight(end_whole), to));
    }
    parts
}

/// Adds up groups that several range parts returned for the same key, sorted by key.
fn merge_groups(parts: Vec<UsageGroup>) -> Vec<UsageGroup> {
    let mut merged: std::collections::BTreeMap<(String, String), UsageTotals> =
        std::collections::BTreeMap::new();
    for (a, b, totals) in parts {
        *merged.entry((a, b)).or_default() += totals;
    }
    merged.into_iter().map(|((a, b), t)| (a, b, t)).collect()
}

/// A day rollup row's key: tenant, UTC day, provider, model (borrowed from the records).
type RollupKey<'a> = (&'a str, NaiveDate, &'a str, &'a str);

/// Sums a batch of records by tenant, UTC day, provider and model, for the day rollups; sorted
/// so concurrent writers lock rollup rows in the same order.
fn rollup_batch(records: &[UsageRecord]) -> Vec<(RollupKey<'_>, UsageTotals)> {
    let mut rollup: std::collections::BTreeMap<RollupKey<'_>, UsageTotals> =
        std::collections::BTreeMap::new();
    for record in records {
        let key = (
            record.tenant_id.as_str(),
            record.created_at.date_naive(),
            record.provider.as_str(),
            record.model.as_str(),
        );
        *rollup.entry(key).or_default() += UsageTotals::of(record);
    }
    rollup.into_iter().collect()
}

/// One conversation's sums over a batch or a day, with its first and last request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConversationSums {
    totals: UsageTotals,
    first_at: DateTime<Utc>,
    last_at: DateTime<Utc>,
}

/// A conversation rollup row's key: tenant, UTC day, conversation id (`""` for none).
type ConversationKey<'a> = (&'a str, NaiveDate, &'a str);

/// Sums a batch of records by tenant, UTC day and conversation, for `usage_conversation_daily`;
/// sorted so concurrent writers lock rollup rows in the same order.
fn conversation_batch(records: &[UsageRecord]) -> Vec<(ConversationKey<'_>, ConversationSums)> {
    let mut rollup: std::collections::BTreeMap<ConversationKey<'_>, ConversationSums> =
        std::collections::BTreeMap::new();
    for record in records {
        let key = (
            record.tenant_id.as_str(),
            record.created_at.date_naive(),
            record.conversation_id.as_deref().unwrap_or_default(),
        );
        let sums = rollup.entry(key).or_insert_with(|| ConversationSums {
            totals: UsageTotals::default(),
            first_at: record.created_at,
            last_at: record.created_at,
        });
        sums.totals += UsageTotals::of(record);
        sums.first_at = sums.first_at.min(record.created_at);
        sums.last_at = sums.last_at.max(record.created_at);
    }
    rollup.into_iter().collect()
}

/// The histogram bucket of a latency, as the bucket's largest value: latencies under 64 ms
/// have a bucket each; above, every power of two is split into 32 buckets, so the value a
/// bucket reports is at most 3.2 % above the smallest latency in it. The migration that
/// created `usage_latency_daily` computes the same buckets in SQL.
pub fn latency_bucket(latency_ms: i64) -> i64 {
    if latency_ms < 64 {
        return latency_ms.max(0);
    }
    let octave = 63 - i64::from(latency_ms.leading_zeros());
    let shift = octave - 5;
    ((latency_ms >> shift) << shift) + (1 << shift) - 1
}

/// A latency rollup row's key: UTC day, provider, bucket.
type LatencyKey<'a> = (NaiveDate, &'a str, i64);

/// Counts a batch's requests that were not cache hits by UTC day, provider and latency bucket,
/// for `usage_latency_daily`; sorted like the other rollups.
fn latency_batch(records: &[UsageRecord]) -> Vec<(LatencyKey<'_>, i64)> {
    let mut rollup: std::collections::BTreeMap<LatencyKey<'_>, i64> =
        std::collections::BTreeMap::new();
    for record in records.iter().filter(|r| !r.cache_hit) {
        let key = (
            record.created_at.date_naive(),
            record.provider.as_str(),
            latency_bucket(record.latency_ms),
        );
        *rollup.entry(key).or_default() += 1;
    }
    rollup.into_iter().collect()
}

/// The p50 and p95 by the nearest-rank definition (the value at rank ⌈p·n⌉ in ascending
/// order) of a histogram given as `(value, count)` pairs in ascending value order.
fn nearest_rank_percentiles(histogram: &[(i64, i64)]) -> (Option<i64>, Option<i64>) {
    let n: i64 = histogram.iter().map(|(_, c)| c).sum();
    if n <= 0 {
        return (None, None);
    }
    let at_rank = |percent: i64| {
        let rank = (n * percent + 99) / 100;
        let mut seen = 0;
        histogram.iter().find_map(|&(value, count)| {
            seen += count;
            (seen >= rank).then_some(value)
        })
    };
    (at_rank(50), at_rank(95))
}

/// Latency and errors per provider across tenants: requests and errors from the provider
/// totals, percentiles from the latency buckets (`(provider, latency or bucket, count)` rows,
/// in any order and possibly repeated; every latency is put in its bucket).
fn providers_from_buckets(
    totals: Vec<UsageGroup>,
    buckets: Vec<(String, i64, i64)>,
) -> Vec<ProviderLatency> {
    let mut histograms: std::collections::BTreeMap<String, std::collections::BTreeMap<i64, i64>> =
        std::collections::BTreeMap::new();
    for (provider, latency, count) in buckets {
        *histograms
            .entry(provider)
            .or_default()
            .entry(latency_bucket(latency))
            .or_default() += count;
    }
    let mut latencies: Vec<ProviderLatency> = totals
        .into_iter()
        .map(|(provider, _, totals)| {
            let histogram: Vec<(i64, i64)> = histograms
                .get(&provider)
                .map(|h| h.iter().map(|(v, c)| (*v, *c)).collect())
                .unwrap_or_default();
            let (p50_ms, p95_ms) = nearest_rank_percentiles(&histogram);
            ProviderLatency {
                provider,
                requests: totals.requests,
                errors: totals.errors,
                p50_ms,
                p95_ms,
            }
        })
        .collect();
    latencies.sort_by(|a, b| a.provider.cmp(&b.provider));
    latencies
}

/// A dashboard session (SPEC §5): who signed in, until when, and the CSRF token its forms carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardSession {
    /// SHA-256 hex of the cookie's token.
    pub id_hash: String,
    /// The tenant signed in, or `None` for the admin.
    pub tenant_id: Option<String>,
    /// The token every form of this session must send back.
    pub csrf_token: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it stops being valid.
    pub expires_at: DateTime<Utc>,
    /// When it was revoked (signed out), if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Most rows per multi-row `INSERT` of usage records: 19 values each stays far below both
/// databases' limit on bound parameters.
pub const USAGE_INSERT_CHUNK: usize = 256;

/// `items` in slices whose lengths are powers of two up to [`USAGE_INSERT_CHUNK`], largest
/// first. A multi-row `INSERT` has one statement text per row count, and the connection keeps
/// each text it has prepared: with these few lengths every batch reuses prepared statements,
/// where one of an arbitrary length had SQLite parse a statement of thousands of
/// placeholders for each batch (more instructions than the inserts themselves).
pub fn insert_chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let len = rest.len().min(USAGE_INSERT_CHUNK);
        // The largest power of two not above `len` (`len` ≥ 1).
        let take = 1usize << (usize::BITS - 1 - len.leading_zeros());
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        Some(chunk)
    })
}

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

    /// Appends usage records, in multi-row inserts of up to [`USAGE_INSERT_CHUNK`] rows, and adds
    /// them to the day rollups, all in one transaction: either every record is stored and
    /// counted or none is.
    async fn insert_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError>;

    /// A tenant's most recent usage records, newest first, at most `limit`.
    async fn recent_usage(
        &self,
        tenant_id: &str,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, StoreError>;

    /// How many usage records are stored for `tenant_id`, or for everyone.
    async fn count_usage(&self, tenant_id: Option<&str>) -> Result<u64, StoreError>;

    /// Usage in `scope` summed by `dimension`, computed in SQL: whole UTC days from the day
    /// rollups, partial days at the edges from the records. Sorted by key.
    async fn usage_grouped(
        &self,
        scope: &UsageScope<'_>,
        dimension: UsageDimension,
    ) -> Result<Vec<UsageGroup>, StoreError>;

    /// Usage in `scope` by conversation (tenant and conversation id), most expensive first
    /// (then most requests, then by id), `limit` from `offset`, with how many there are.
    async fn usage_by_conversation(
        &self,
        scope: &UsageScope<'_>,
        limit: u32,
        offset: u64,
    ) -> Result<ConversationPage, StoreError>;

    /// Requests, errors and latency percentiles (p50, p95: nearest rank, cache hits left out of
    /// the latencies) per provider of the records in `scope`, sorted by provider. Reads the
    /// records themselves (the rollups keep no latencies).
    async fn provider_latency(
        &self,
        scope: &UsageScope<'_>,
    ) -> Result<Vec<ProviderLatency>, StoreError>;

    /// A tenant's cost on one UTC day so far, in nano-dollars, from the day rollups.
    async fn day_cost(&self, tenant_id: &str, day: NaiveDate) -> Result<i64, StoreError>;

    /// Records that the cost alert of `tenant_id` for `day` fired. Returns `true` for the
    /// first caller only (on any replica); later calls for the same tenant and day return
    /// `false`.
    async fn claim_cost_alert(
        &self,
        tenant_id: &str,
        day: NaiveDate,
        threshold_nano: i64,
        spent_nano: i64,
    ) -> Result<bool, StoreError>;

    /// Stores a new dashboard session (and deletes sessions that expired a day ago or more).
    async fn create_session(&self, session: &DashboardSession) -> Result<(), StoreError>;

    /// The dashboard session whose token hashes to `id_hash`, revoked or not.
    async fn session(&self, id_hash: &str) -> Result<Option<DashboardSession>, StoreError>;

    /// Revokes a dashboard session (sign-out). Revoking twice is not an error.
    async fn revoke_session(&self, id_hash: &str) -> Result<(), StoreError>;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn day(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn insert_chunks_cover_every_item_in_order_with_few_lengths() {
        assert_eq!(insert_chunks::<u32>(&[]).count(), 0);
        for n in [1usize, 2, 3, 255, 256, 257, 700, 1000, 1023] {
            let items: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = insert_chunks(&items).collect();
            assert_eq!(chunks.concat(), items, "{n} items");
            for chunk in &chunks {
                assert!(chunk.len().is_power_of_two() && chunk.len() <= USAGE_INSERT_CHUNK);
            }
            assert!(chunks.windows(2).all(|w| w[0].len() >= w[1].len()));
        }
        let lengths: Vec<usize> = insert_chunks(&[0u8; 700]).map(<[u8]>::len).collect();
        assert_eq!(lengths, [256, 256, 128, 32, 16, 8, 4]);
    }

    #[test]
    fn whole_days_come_from_rollups_and_edges_from_records() {
        assert_eq!(
            plan_range(at("2026-11-01T00:00:00Z"), at("2026-12-01T00:00:00Z")),
            vec![RangePart::Days(day("2026-11-01"), day("2026-12-01"))]
        );
        assert_eq!(
            plan_range(at("2026-11-01T10:00:00Z"), at("2026-11-04T05:00:00Z")),
            vec![
                RangePart::Records(at("2026-11-01T10:00:00Z"), at("2026-11-02T00:00:00Z")),
                RangePart::Days(day("2026-11-02"), day("2026-11-04")),
                RangePart::Records(at("2026-11-04T00:00:00Z"), at("2026-11-04T05:00:00Z")),
            ]
        );
        assert_eq!(
            plan_range(at("2026-11-01T10:00:00Z"), at("2026-11-02T05:00:00Z")),
            vec![RangePart::Records(
                at("2026-11-01T10:00:00Z"),
                at("2026-11-02T05:00:00Z")
            )]
        );
        assert_eq!(
            plan_range(at("2026-11-01T00:00:00Z"), at("2026-11-01T05:00:00Z")),
            vec![RangePart::Records(
                at("2026-11-01T00:00:00Z"),
                at("2026-11-01T05:00:00Z")
            )]
        );
        assert!(plan_range(at("2026-11-02T00:00:00Z"), at("2026-11-01T00:00:00Z")).is_empty());
    }

    #[test]
    fn merged_groups_add_up() {
        let t = |requests| UsageTotals {
            requests,
            cost_nano_usd: requests * 10,
            ..UsageTotals::default()
        };
        let merged = merge_groups(vec![
            ("b".into(), String::new(), t(1)),
            ("a".into(), String::new(), t(2)),
            ("b".into(), String::new(), t(3)),
        ]);
        assert_eq!(
            merged,
            vec![
                ("a".into(), String::new(), t(2)),
                ("b".into(), String::new(), t(4))
            ]
        );
    }
}
