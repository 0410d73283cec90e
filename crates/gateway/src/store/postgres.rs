//! PostgreSQL backend, for several gateway replicas sharing one database.

use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, SubsecRound, Utc};
use sqlx::Row;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};

use super::{
    ADMIN_KEY_HASH, ConversationPage, ConversationUsage, DashboardSession, EmbeddedMigration,
    NewTenant, ProviderLatency, RangePart, Store, StoreError, TOMBSTONE_LIFETIME, Tenant,
    UsageDimension, UsageGroup, UsageRecord, UsageScope, UsageTotals, conversation_batch, db_err,
    latency_batch, merge_groups, migrator, now, plan_range, providers_from_buckets, rollup_batch,
};

const MIGRATIONS: &[EmbeddedMigration] = &[
    (
        1,
        "init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "tenant deletions",
        include_str!("../../migrations/postgres/0002_tenant_deletions.sql"),
    ),
    (
        3,
        "usage rollups",
        include_str!("../../migrations/postgres/0003_usage_rollups.sql"),
    ),
    (
        4,
        "dashboard sessions",
        include_str!("../../migrations/postgres/0004_dashboard_sessions.sql"),
    ),
    (
        5,
        "conversation and latency rollups",
        include_str!("../../migrations/postgres/0005_conversation_and_latency_rollups.sql"),
    ),
];

static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| migrator(MIGRATIONS));

/// A [`Store`] on a PostgreSQL database. Tables live in the first schema of the connection's
/// `search_path` (set it with `?options=-csearch_path%3Dname` in the URL to use another schema).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// [`Store::provider_latency`] across tenants: requests and errors from the day rollups,
    /// percentiles from the latency buckets of whole days and the bucketed latencies of the
    /// records of partial days.
    async fn latency_across_tenants(
        &self,
        scope: &UsageScope<'_>,
    ) -> Result<Vec<ProviderLatency>, StoreError> {
        let totals = self.usage_grouped(scope, UsageDimension::Provider).await?;
        let mut buckets = Vec::new();
        for part in plan_range(scope.from, scope.to) {
            let rows = match part {
                RangePart::Days(first, end) => sqlx::query(
                    "SELECT provider, bucket_ms AS latency, SUM(requests)::BIGINT AS n \
                     FROM usage_latency_daily WHERE day >= $1 AND day < $2 \
                     GROUP BY provider, bucket_ms",
                )
                .bind(first)
                .bind(end)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?,
                RangePart::Records(from, to) => sqlx::query(
                    "SELECT provider, latency_ms AS latency, COUNT(*) AS n FROM usage_records \
                     WHERE created_at >= $1 AND created_at < $2 AND NOT cache_hit \
                     GROUP BY provider, latency_ms",
                )
                .bind(from)
                .bind(to)
                .fetch_all(&self.pool)
                .await
                .map_err(db_err)?,
            };
            for row in &rows {
                buckets.push((
                    row.try_get("provider").map_err(db_err)?,
                    row.try_get("latency").map_err(db_err)?,
                    row.try_get("n").map_err(db_err)?,
                ));
            }
        }
        Ok(providers_from_buckets(totals, buckets))
    }

    /// Connects to the database at `url` (`postgres://…` or `postgresql://…`). Does not run
    /// migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(db_err)?;
        Ok(Self { pool })
    }

    /// The underlying connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the embedded PostgreSQL migrations that have not run yet. Concurrent callers
    /// (replicas starting together) are serialised by the migrator's advisory lock.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(StoreError::database)
    }
}

fn tenant_from_row(row: &PgRow) -> Result<Tenant, StoreError> {
    Ok(Tenant {
        id: row.try_get("id").map_err(db_err)?,
        name: row.try_get("name").map_err(db_err)?,
        api_key_hash: row.try_get("api_key_hash").map_err(db_err)?,
        settings: row.try_get("settings").map_err(db_err)?,
        created_at: row.try_get("created_at").map_err(db_err)?,
        updated_at: row.try_get("updated_at").map_err(db_err)?,
    })
}

fn tenants_from_rows(rows: &[PgRow]) -> Result<Vec<Tenant>, StoreError> {
    rows.iter().map(tenant_from_row).collect()
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        PostgresStore::migrate(self).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(drop)
            .map_err(db_err)
    }

    async fn create_tenant(&self, tenant: NewTenant) -> Result<Tenant, StoreError> {
        let created_at = now();
        sqlx::query(
            "INSERT INTO tenants (id, name, api_key_hash, settings, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $5)",
        )
        .bind(&tenant.id)
        .bind(&tenant.name)
        .bind(&tenant.api_key_hash)
        .bind(&tenant.settings)
        .bind(created_at)
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(Tenant {
            id: tenant.id,
            name: tenant.name,
            api_key_hash: tenant.api_key_hash,
            settings: tenant.settings,
            created_at,
            updated_at: created_at,
        })
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, api_key_hash, settings, created_at, updated_at \
             FROM tenants ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        tenants_from_rows(&rows)
    }

    async fn get_tenant(&self, id: &str) -> Result<Tenant, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, api_key_hash, settings, created_at, updated_at \
             FROM tenants WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?
        .ok_or(StoreError::NotFound)?;
        tenant_from_row(&row)
    }

    async fn tenant_by_key_hash(&self, api_key_hash: &str) -> Result<Option<Tenant>, StoreError> {
        sqlx::query(
            "SELECT id, name, api_key_hash, settings, created_at, updated_at \
             FROM tenants WHERE api_key_hash = $1",
        )
        .bind(api_key_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?
        .as_ref()
        .map(tenant_from_row)
        .transpose()
    }

    async fn update_settings(
        &self,
        id: &str,
        settings: serde_json::Value,
    ) -> Result<Tenant, StoreError> {
        // GREATEST keeps updated_at strictly increasing even if this host's clock lags the one
        // that wrote the previous value.
        let row = sqlx::query(
            "UPDATE tenants SET settings = $2, \
             updated_at = GREATEST($3, updated_at + interval '1 microsecond') WHERE id = $1 \
             RETURNING id, name, api_key_hash, settings, created_at, updated_at",
        )
        .bind(id)
        .bind(&settings)
        .bind(now())
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?
        .ok_or(StoreError::NotFound)?;
        tenant_from_row(&row)
    }

    async fn rotate_key(&self, id: &str, new_api_key_hash: &str) -> Result<Tenant, StoreError> {
        let row = sqlx::query(
            "UPDATE tenants SET api_key_hash = $2, \
             updated_at = GREATEST($3, updated_at + interval '1 microsecond') WHERE id = $1 \
             RETURNING id, name, api_key_hash, settings, created_at, updated_at",
        )
        .bind(id)
        .bind(new_api_key_hash)
        .bind(now())
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?
        .ok_or(StoreError::NotFound)?;
        tenant_from_row(&row)
    }

    async fn delete_tenant(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        let result = sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        if result.rows_affected() == 0 {
            // Ended here, not left to the pool: an open transaction would hold its locks
            // until the connection is next used.
            tx.rollback().await.map_err(db_err)?;
            return Err(StoreError::NotFound);
        }
        let deleted_at = now();
        sqlx::query(
            "INSERT INTO tenant_deletions (tenant_id, deleted_at) VALUES ($1, $2) \
             ON CONFLICT (tenant_id) DO UPDATE SET deleted_at = excluded.deleted_at",
        )
        .bind(id)
        .bind(deleted_at)
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        sqlx::query("DELETE FROM tenant_deletions WHERE deleted_at < $1")
            .bind(deleted_at - TOMBSTONE_LIFETIME)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    async fn tenant_deletions_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant_id FROM tenant_deletions WHERE deleted_at >= $1 ORDER BY deleted_at",
        )
        .bind(since.trunc_subsecs(6))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter()
            .map(|row| row.try_get("tenant_id").map_err(db_err))
            .collect()
    }

    async fn tenants_updated_since(&self, since: DateTime<Utc>) -> Result<Vec<Tenant>, StoreError> {
        // Rows hold microseconds; rounding `since` down keeps the comparison inclusive.
        let rows = sqlx::query(
            "SELECT id, name, api_key_hash, settings, created_at, updated_at \
             FROM tenants WHERE updated_at >= $1 ORDER BY updated_at, id",
        )
        .bind(since.trunc_subsecs(6))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        tenants_from_rows(&rows)
    }

    async fn all_tenant_settings(&self) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        let rows = sqlx::query("SELECT id, settings FROM tenants ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("id").map_err(db_err)?,
                    row.try_get("settings").map_err(db_err)?,
                ))
            })
            .collect()
    }

    async fn insert_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(db_err)?;
        // One statement per chunk with one array parameter per column: PostgreSQL parses and
        // plans 18 parameters instead of 18 per row, several times faster than VALUES lists.
        for chunk in records.chunks(USAGE_UNNEST_CHUNK) {
            let column = |f: fn(&UsageRecord) -> &str| chunk.iter().map(f).collect::<Vec<_>>();
            let optional =
                |f: fn(&UsageRecord) -> Option<&str>| chunk.iter().map(f).collect::<Vec<_>>();
            let number = |f: fn(&UsageRecord) -> i64| chunk.iter().map(f).collect::<Vec<_>>();
            let flag = |f: fn(&UsageRecord) -> bool| chunk.iter().map(f).collect::<Vec<_>>();
            sqlx::query(
                "INSERT INTO usage_records (tenant_id, conversation_id, request_id, endpoint, provider, model, input_tokens, output_tokens, embedding_tokens, cost_nano_usd, latency_ms, ttft_ms, status, error_kind, cache_hit, fallback_from, tokens_estimated, created_at) \
                 SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::BIGINT[], $8::BIGINT[], $9::BIGINT[], $10::BIGINT[], $11::BIGINT[], $12::BIGINT[], $13::TEXT[], $14::TEXT[], $15::BOOLEAN[], $16::TEXT[], $17::BOOLEAN[], $18::TIMESTAMPTZ[])",
            )
            .bind(column(|r| &r.tenant_id))
            .bind(optional(|r| r.conversation_id.as_deref()))
            .bind(column(|r| &r.request_id))
            .bind(column(|r| &r.endpoint))
            .bind(column(|r| &r.provider))
            .bind(column(|r| &r.model))
            .bind(number(|r| r.input_tokens))
            .bind(number(|r| r.output_tokens))
            .bind(number(|r| r.embedding_tokens))
            .bind(number(|r| r.cost_nano_usd))
            .bind(number(|r| r.latency_ms))
            .bind(chunk.iter().map(|r| r.ttft_ms).collect::<Vec<_>>())
            .bind(column(|r| &r.status))
            .bind(optional(|r| r.error_kind.as_deref()))
            .bind(flag(|r| r.cache_hit))
            .bind(optional(|r| r.fallback_from.as_deref()))
            .bind(flag(|r| r.tokens_estimated))
            .bind(chunk.iter().map(|r| r.created_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        // Rollup rows are upserted in key order, so two replicas writing batches for the same
        // tenants lock them in the same order and cannot deadlock.
        let rollup = rollup_batch(records);
        if !rollup.is_empty() {
            let number = |f: fn(&RollupRow<'_>) -> i64| rollup.iter().map(f).collect::<Vec<_>>();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO usage_daily (tenant_id, day, provider, model, requests, errors, cache_hits, input_tokens, output_tokens, embedding_tokens, cost_nano_usd) \
                 SELECT * FROM UNNEST($1::TEXT[], $2::DATE[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::BIGINT[], $9::BIGINT[], $10::BIGINT[], $11::BIGINT[]){ROLLUP_CONFLICT}"
            )))
            .bind(rollup.iter().map(|((tenant, ..), _)| *tenant).collect::<Vec<_>>())
            .bind(rollup.iter().map(|((_, day, ..), _)| *day).collect::<Vec<_>>())
            .bind(rollup.iter().map(|((_, _, provider, _), _)| *provider).collect::<Vec<_>>())
            .bind(rollup.iter().map(|((.., model), _)| *model).collect::<Vec<_>>())
            .bind(number(|(_, t)| t.requests))
            .bind(number(|(_, t)| t.errors))
            .bind(number(|(_, t)| t.cache_hits))
            .bind(number(|(_, t)| t.input_tokens))
            .bind(number(|(_, t)| t.output_tokens))
            .bind(number(|(_, t)| t.embedding_tokens))
            .bind(number(|(_, t)| t.cost_nano_usd))
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        let conversations = conversation_batch(records);
        if !conversations.is_empty() {
            let number = |f: fn(&UsageTotals) -> i64| {
                conversations
                    .iter()
                    .map(|(_, sums)| f(&sums.totals))
                    .collect::<Vec<_>>()
            };
            sqlx::query(
                "INSERT INTO usage_conversation_daily (tenant_id, day, conversation_id, requests, errors, cache_hits, input_tokens, output_tokens, embedding_tokens, cost_nano_usd, first_at, last_at) \
                 SELECT * FROM UNNEST($1::TEXT[], $2::DATE[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::BIGINT[], $9::BIGINT[], $10::BIGINT[], $11::TIMESTAMPTZ[], $12::TIMESTAMPTZ[]) \
                 ON CONFLICT (tenant_id, day, conversation_id) DO UPDATE SET \
                 requests = usage_conversation_daily.requests + excluded.requests, \
                 errors = usage_conversation_daily.errors + excluded.errors, \
                 cache_hits = usage_conversation_daily.cache_hits + excluded.cache_hits, \
                 input_tokens = usage_conversation_daily.input_tokens + excluded.input_tokens, \
                 output_tokens = usage_conversation_daily.output_tokens + excluded.output_tokens, \
                 embedding_tokens = usage_conversation_daily.embedding_tokens + excluded.embedding_tokens, \
                 cost_nano_usd = usage_conversation_daily.cost_nano_usd + excluded.cost_nano_usd, \
                 first_at = LEAST(usage_conversation_daily.first_at, excluded.first_at), \
                 last_at = GREATEST(usage_conversation_daily.last_at, excluded.last_at)",
            )
            .bind(conversations.iter().map(|((tenant, ..), _)| *tenant).collect::<Vec<_>>())
            .bind(conversations.iter().map(|((_, day, _), _)| *day).collect::<Vec<_>>())
            .bind(conversations.iter().map(|((.., id), _)| *id).collect::<Vec<_>>())
            .bind(number(|t| t.requests))
            .bind(number(|t| t.errors))
            .bind(number(|t| t.cache_hits))
            .bind(number(|t| t.input_tokens))
            .bind(number(|t| t.output_tokens))
            .bind(number(|t| t.embedding_tokens))
            .bind(number(|t| t.cost_nano_usd))
            .bind(conversations.iter().map(|(_, s)| s.first_at).collect::<Vec<_>>())
            .bind(conversations.iter().map(|(_, s)| s.last_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        let latencies = latency_batch(records);
        if !latencies.is_empty() {
            sqlx::query(
                "INSERT INTO usage_latency_daily (day, provider, bucket_ms, requests) \
                 SELECT * FROM UNNEST($1::DATE[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[]) \
                 ON CONFLICT (day, provider, bucket_ms) DO UPDATE SET \
                 requests = usage_latency_daily.requests + excluded.requests",
            )
            .bind(
                latencies
                    .iter()
                    .map(|((day, ..), _)| *day)
                    .collect::<Vec<_>>(),
            )
            .bind(
                latencies
                    .iter()
                    .map(|((_, provider, _), _)| *provider)
                    .collect::<Vec<_>>(),
            )
            .bind(
                latencies
                    .iter()
                    .map(|((.., bucket), _)| *bucket)
                    .collect::<Vec<_>>(),
            )
            .bind(latencies.iter().map(|(_, n)| *n).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
    }

    async fn usage_grouped(
        &self,
        scope: &UsageScope<'_>,
        dimension: UsageDimension,
    ) -> Result<Vec<UsageGroup>, StoreError> {
        const RECORD_DAY: &str = "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')";
        let (rollup_keys, rollup_group, record_keys, record_group) = match dimension {
            UsageDimension::Day => (
                "to_char(day, 'YYYY-MM-DD') AS k1, '' AS k2".to_owned(),
                "day".to_owned(),
                format!("{RECORD_DAY} AS k1, '' AS k2"),
                RECORD_DAY.to_owned(),
            ),
            UsageDimension::Model => (
                "provider AS k1, model AS k2".to_owned(),
                "provider, model".to_owned(),
                "provider AS k1, model AS k2".to_owned(),
                "provider, model".to_owned(),
            ),
            UsageDimension::Provider => (
                "provider AS k1, '' AS k2".to_owned(),
                "provider".to_owned(),
                "provider AS k1, '' AS k2".to_owned(),
                "provider".to_owned(),
            ),
            UsageDimension::Tenant => (
                "tenant_id AS k1, '' AS k2".to_owned(),
                "tenant_id".to_owned(),
                "tenant_id AS k1, '' AS k2".to_owned(),
                "tenant_id".to_owned(),
            ),
        };
        let tenant_filter = if scope.tenant_id.is_some() {
            " AND tenant_id = $3"
        } else {
            ""
        };
        let mut groups = Vec::new();
        for part in plan_range(scope.from, scope.to) {
            let rows = match part {
                RangePart::Days(first, end) => {
                    let sql = format!(
                        "SELECT {rollup_keys}, {ROLLUP_SUMS} FROM usage_daily \
                         WHERE day >= $1 AND day < $2{tenant_filter} GROUP BY {rollup_group}"
                    );
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(first).bind(end);
                    if let Some(tenant) = scope.tenant_id {
                        query = query.bind(tenant);
                    }
                    query.fetch_all(&self.pool).await
                }
                RangePart::Records(from, to) => {
                    let sql = format!(
                        "SELECT {record_keys}, {RECORD_SUMS} FROM usage_records \
                         WHERE created_at >= $1 AND created_at < $2{tenant_filter} \
                         GROUP BY {record_group}"
                    );
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(from).bind(to);
                    if let Some(tenant) = scope.tenant_id {
                        query = query.bind(tenant);
                    }
                    query.fetch_all(&self.pool).await
                }
            }
            .map_err(db_err)?;
            for row in &rows {
                groups.push((
                    row.try_get("k1").map_err(db_err)?,
                    row.try_get("k2").map_err(db_err)?,
                    totals_from_row(row)?,
                ));
            }
        }
        Ok(merge_groups(groups))
    }

    async fn usage_by_conversation(
        &self,
        scope: &UsageScope<'_>,
        limit: u32,
        offset: u64,
    ) -> Result<ConversationPage, StoreError> {
        let Some(mut query) = conversation_parts(scope) else {
            return Ok(ConversationPage {
                conversations: Vec::new(),
                total: 0,
            });
        };
        let mut count = conversation_parts(scope);
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        query.push(
            " SELECT tenant_id, NULLIF(conversation_id, '') AS conversation_id, \
             SUM(requests)::BIGINT AS requests, SUM(errors)::BIGINT AS errors, \
             SUM(cache_hits)::BIGINT AS cache_hits, SUM(input_tokens)::BIGINT AS input_tokens, \
             SUM(output_tokens)::BIGINT AS output_tokens, \
             SUM(embedding_tokens)::BIGINT AS embedding_tokens, \
             SUM(cost_nano_usd)::BIGINT AS cost_nano_usd, \
             MIN(first_at) AS first_at, MAX(last_at) AS last_at, \
             COUNT(*) OVER () AS conversations FROM parts GROUP BY tenant_id, conversation_id \
             ORDER BY SUM(cost_nano_usd) DESC, SUM(requests) DESC, tenant_id COLLATE \"C\", \
             conversation_id COLLATE \"C\" LIMIT ",
        );
        query.push_bind(i64::from(limit));
        query.push(" OFFSET ");
        query.push_bind(offset);
        let rows = query.build().fetch_all(&self.pool).await.map_err(db_err)?;
        let conversations = rows
            .iter()
            .map(|row| {
                Ok(ConversationUsage {
                    tenant_id: row.try_get("tenant_id").map_err(db_err)?,
                    conversation_id: row.try_get("conversation_id").map_err(db_err)?,
                    totals: totals_from_row(row)?,
                    first_at: row.try_get("first_at").map_err(db_err)?,
                    last_at: row.try_get("last_at").map_err(db_err)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // Every row carries how many conversations there are (a window over the groups, so
        // they are grouped once); only a page past the end, without rows, counts them apart.
        let total: i64 = match (rows.first(), count.as_mut()) {
            (Some(row), _) => row.try_get("conversations").map_err(db_err)?,
            (None, _) if offset == 0 => 0,
            (None, None) => 0,
            (None, Some(count)) => {
                count.push(
                    " SELECT COUNT(*) AS n FROM \
                     (SELECT 1 FROM parts GROUP BY tenant_id, conversation_id) AS groups",
                );
                let row = count.build().fetch_one(&self.pool).await.map_err(db_err)?;
                row.try_get("n").map_err(db_err)?
            }
        };
        Ok(ConversationPage {
            conversations,
            total: u64::try_from(total).unwrap_or(0),
        })
    }

    async fn provider_latency(
        &self,
        scope: &UsageScope<'_>,
    ) -> Result<Vec<ProviderLatency>, StoreError> {
        // `percentile_disc(p)` is the value at rank ⌈p·n⌉: the nearest-rank definition the
        // SQLite store computes by hand.
        let Some(tenant) = scope.tenant_id else {
            return self.latency_across_tenants(scope).await;
        };
        let sql = "SELECT provider, COUNT(*) AS requests, \
             COUNT(*) FILTER (WHERE status = 'error') AS errors, \
             percentile_disc(0.5) WITHIN GROUP (ORDER BY latency_ms) \
             FILTER (WHERE NOT cache_hit) AS p50_ms, \
             percentile_disc(0.95) WITHIN GROUP (ORDER BY latency_ms) \
             FILTER (WHERE NOT cache_hit) AS p95_ms \
             FROM usage_records WHERE created_at >= $1 AND created_at < $2 AND tenant_id = $3 \
             GROUP BY provider";
        let rows = sqlx::query(sql)
            .bind(scope.from)
            .bind(scope.to)
            .bind(tenant)
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        let mut latencies = rows
            .iter()
            .map(|row| {
                Ok(ProviderLatency {
                    provider: row.try_get("provider").map_err(db_err)?,
                    requests: row.try_get("requests").map_err(db_err)?,
                    errors: row.try_get("errors").map_err(db_err)?,
                    p50_ms: row.try_get("p50_ms").map_err(db_err)?,
                    p95_ms: row.try_get("p95_ms").map_err(db_err)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        latencies.sort_by(|a, b| a.provider.cmp(&b.provider));
        Ok(latencies)
    }

    async fn day_cost(&self, tenant_id: &str, day: NaiveDate) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(cost_nano_usd), 0)::BIGINT AS n FROM usage_daily \
             WHERE tenant_id = $1 AND day = $2",
        )
        .bind(tenant_id)
        .bind(day)
        .fetch_one(&self.pool)
        .await
        .map_err(db_err)?;
        row.try_get("n").map_err(db_err)
    }

    async fn claim_cost_alert(
        &self,
        tenant_id: &str,
        day: NaiveDate,
        threshold_nano: i64,
        spent_nano: i64,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "INSERT INTO cost_alerts (tenant_id, day, threshold_nano, spent_nano, fired_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, day) DO NOTHING",
        )
        .bind(tenant_id)
        .bind(day)
        .bind(threshold_nano)
        .bind(spent_nano)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db_err)?;
        Ok(result.rows_affected() == 1)
    }

    async fn recent_usage(
        &self,
        tenant_id: &str,
        limit: u32,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant_id, conversation_id, request_id, endpoint, provider, model, input_tokens, output_tokens, embedding_tokens, cost_nano_usd, latency_ms, ttft_ms, status, error_kind, cache_hit, fallback_from, tokens_estimated, created_at FROM usage_records \
             WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(tenant_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_err)?;
        rows.iter().map(usage_from_row).collect()
    }

    async fn count_usage(&self, tenant_id: Option<&str>) -> Result<u64, StoreError> {
        let row = match tenant_id {
            Some(id) => {
                sqlx::query("SELECT COUNT(*) AS n FROM usage_records WHERE tenant_id = $1")
                    .bind(id)
                    .fetch_one(&self.pool)
                    .await
            }
            None => {
                sqlx::query("SELECT COUNT(*) AS n FROM usage_records")
                    .fetch_one(&self.pool)
                    .await
            }
        }
        .map_err(db_err)?;
        let n: i64 = row.try_get("n").map_err(db_err)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn create_session(&self, session: &DashboardSession) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at < $1")
            .bind(now() - chrono::TimeDelta::days(1))
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        sqlx::query(
            "INSERT INTO dashboard_sessions (id_hash, tenant_id, csrf_token, created_at, expires_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, NULL)",
        )
        .bind(&session.id_hash)
        .bind(&session.tenant_id)
        .bind(&session.csrf_token)
        .bind(session.created_at)
        .bind(session.expires_at)
        .execute(&self.pool)
        .await
        .map(drop)
        .map_err(db_err)
    }

    async fn session(&self, id_hash: &str) -> Result<Option<DashboardSession>, StoreError> {
        let row = sqlx::query(
            "SELECT id_hash, tenant_id, csrf_token, created_at, expires_at, revoked_at \
             FROM dashboard_sessions WHERE id_hash = $1",
        )
        .bind(id_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_err)?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(DashboardSession {
            id_hash: row.try_get("id_hash").map_err(db_err)?,
            tenant_id: row.try_get("tenant_id").map_err(db_err)?,
            csrf_token: row.try_get("csrf_token").map_err(db_err)?,
            created_at: row.try_get("created_at").map_err(db_err)?,
            expires_at: row.try_get("expires_at").map_err(db_err)?,
            revoked_at: row.try_get("revoked_at").map_err(db_err)?,
        }))
    }

    async fn revoke_session(&self, id_hash: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE dashboard_sessions SET revoked_at = $1 WHERE id_hash = $2 AND revoked_at IS NULL",
        )
        .bind(now())
        .bind(id_hash)
        .execute(&self.pool)
        .await
        .map(drop)
        .map_err(db_err)
    }

    async fn admin_key_hash(&self) -> Result<Option<String>, StoreError> {
        sqlx::query("SELECT value FROM system WHERE key = $1")
            .bind(ADMIN_KEY_HASH)
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?
            .map(|row| row.try_get("value").map_err(db_err))
            .transpose()
    }

    async fn set_admin_key_hash(&self, hash: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO system (key, value, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
             updated_at = excluded.updated_at",
        )
        .bind(ADMIN_KEY_HASH)
        .bind(hash)
        .bind(now())
        .execute(&self.pool)
        .await
        .map(drop)
        .map_err(db_err)
    }
}

/// A row of the day rollups: tenant, day, provider, model and totals.
type RollupRow<'a> = ((&'a str, NaiveDate, &'a str, &'a str), UsageTotals);

/// `WITH parts AS (…)`: one row per conversation and whole day of the scope from
/// `usage_conversation_daily`, one per record of its partial days (conversation `''` for none);
/// `None` when the scope is empty.
fn conversation_parts(scope: &UsageScope<'_>) -> Option<sqlx::QueryBuilder<sqlx::Postgres>> {
    let parts = plan_range(scope.from, scope.to);
    if parts.is_empty() {
        return None;
    }
    let mut query = sqlx::QueryBuilder::new("WITH parts AS (");
    for (i, part) in parts.into_iter().enumerate() {
        if i > 0 {
            query.push(" UNION ALL ");
        }
        match part {
            RangePart::Days(first, end) => {
                query.push(
                    "SELECT tenant_id, conversation_id, requests, errors, cache_hits, \
                     input_tokens, output_tokens, embedding_tokens, cost_nano_usd, first_at, \
                     last_at FROM usage_conversation_daily WHERE day >= ",
                );
                query.push_bind(first);
                query.push(" AND day < ");
                query.push_bind(end);
            }
            RangePart::Records(from, to) => {
                query.push(
                    "SELECT tenant_id, COALESCE(conversation_id, '') AS conversation_id, \
                     1::BIGINT AS requests, \
                     CASE WHEN status = 'error' THEN 1 ELSE 0 END::BIGINT AS errors, \
                     CASE WHEN cache_hit THEN 1 ELSE 0 END::BIGINT AS cache_hits, input_tokens, \
                     output_tokens, embedding_tokens, cost_nano_usd, created_at AS first_at, \
                     created_at AS last_at FROM usage_records WHERE created_at >= ",
                );
                query.push_bind(from);
                query.push(" AND created_at < ");
                query.push_bind(to);
            }
        }
        if let Some(tenant) = scope.tenant_id {
            query.push(" AND tenant_id = ");
            query.push_bind(tenant.to_owned());
        }
    }
    query.push(")");
    Some(query)
}

/// Rows per `INSERT … SELECT FROM UNNEST` of usage records.
const USAGE_UNNEST_CHUNK: usize = 5_000;

/// Adds a batch's rollup rows to the stored ones.
const ROLLUP_CONFLICT: &str = " ON CONFLICT (tenant_id, day, provider, model) DO UPDATE SET \
    requests = usage_daily.requests + excluded.requests, \
    errors = usage_daily.errors + excluded.errors, \
    cache_hits = usage_daily.cache_hits + excluded.cache_hits, \
    input_tokens = usage_daily.input_tokens + excluded.input_tokens, \
    output_tokens = usage_daily.output_tokens + excluded.output_tokens, \
    embedding_tokens = usage_daily.embedding_tokens + excluded.embedding_tokens, \
    cost_nano_usd = usage_daily.cost_nano_usd + excluded.cost_nano_usd";

/// The totals of a group of rollup rows (`SUM` of BIGINT is NUMERIC in PostgreSQL; cast back).
const ROLLUP_SUMS: &str = "SUM(requests)::BIGINT AS requests, SUM(errors)::BIGINT AS errors, \
    SUM(cache_hits)::BIGINT AS cache_hits, SUM(input_tokens)::BIGINT AS input_tokens, \
    SUM(output_tokens)::BIGINT AS output_tokens, \
    SUM(embedding_tokens)::BIGINT AS embedding_tokens, \
    SUM(cost_nano_usd)::BIGINT AS cost_nano_usd";

/// The totals of a group of usage records.
const RECORD_SUMS: &str = "COUNT(*) AS requests, \
    COUNT(*) FILTER (WHERE status = 'error') AS errors, \
    COUNT(*) FILTER (WHERE cache_hit) AS cache_hits, \
    SUM(input_tokens)::BIGINT AS input_tokens, SUM(output_tokens)::BIGINT AS output_tokens, \
    SUM(embedding_tokens)::BIGINT AS embedding_tokens, \
    SUM(cost_nano_usd)::BIGINT AS cost_nano_usd";

fn totals_from_row(row: &PgRow) -> Result<UsageTotals, StoreError> {
    Ok(UsageTotals {
        requests: row.try_get("requests").map_err(db_err)?,
        errors: row.try_get("errors").map_err(db_err)?,
        cache_hits: row.try_get("cache_hits").map_err(db_err)?,
        input_tokens: row.try_get("input_tokens").map_err(db_err)?,
        output_tokens: row.try_get("output_tokens").map_err(db_err)?,
        embedding_tokens: row.try_get("embedding_tokens").map_err(db_err)?,
        cost_nano_usd: row.try_get("cost_nano_usd").map_err(db_err)?,
    })
}

fn usage_from_row(row: &PgRow) -> Result<UsageRecord, StoreError> {
    let created_at: DateTime<Utc> = row.try_get("created_at").map_err(db_err)?;
    Ok(UsageRecord {
        tenant_id: row.try_get("tenant_id").map_err(db_err)?,
        conversation_id: row.try_get("conversation_id").map_err(db_err)?,
        request_id: row.try_get("request_id").map_err(db_err)?,
        endpoint: row.try_get("endpoint").map_err(db_err)?,
        provider: row.try_get("provider").map_err(db_err)?,
        model: row.try_get("model").map_err(db_err)?,
        input_tokens: row.try_get("input_tokens").map_err(db_err)?,
        output_tokens: row.try_get("output_tokens").map_err(db_err)?,
        embedding_tokens: row.try_get("embedding_tokens").map_err(db_err)?,
        cost_nano_usd: row.try_get("cost_nano_usd").map_err(db_err)?,
        latency_ms: row.try_get("latency_ms").map_err(db_err)?,
        ttft_ms: row.try_get("ttft_ms").map_err(db_err)?,
        status: row.try_get("status").map_err(db_err)?,
        error_kind: row.try_get("error_kind").map_err(db_err)?,
        cache_hit: row.try_get("cache_hit").map_err(db_err)?,
        fallback_from: row.try_get("fallback_from").map_err(db_err)?,
        tokens_estimated: row.try_get("tokens_estimated").map_err(db_err)?,
        created_at,
    })
}
