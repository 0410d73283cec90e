//! PostgreSQL backend, for several gateway replicas sharing one database.

use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use sqlx::Row;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};

use super::{
    ADMIN_KEY_HASH, EmbeddedMigration, NewTenant, Store, StoreError, TOMBSTONE_LIFETIME, Tenant,
    USAGE_INSERT_CHUNK, UsageRecord, db_err, migrator, now,
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
];

static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| migrator(MIGRATIONS));

/// A [`Store`] on a PostgreSQL database. Tables live in the first schema of the connection's
/// `search_path` (set it with `?options=-csearch_path%3Dname` in the URL to use another schema).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
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
        for chunk in records.chunks(USAGE_INSERT_CHUNK) {
            let mut insert = sqlx::QueryBuilder::<sqlx::Postgres>::new(
                "INSERT INTO usage_records (tenant_id, conversation_id, request_id, endpoint, provider, model, input_tokens, output_tokens, embedding_tokens, cost_nano_usd, latency_ms, ttft_ms, status, error_kind, cache_hit, fallback_from, tokens_estimated, created_at) ",
            );
            insert.push_values(chunk, |mut row, record| {
                row.push_bind(record.tenant_id.clone())
                    .push_bind(record.conversation_id.clone())
                    .push_bind(record.request_id.clone())
                    .push_bind(record.endpoint.clone())
                    .push_bind(record.provider.clone())
                    .push_bind(record.model.clone())
                    .push_bind(record.input_tokens)
                    .push_bind(record.output_tokens)
                    .push_bind(record.embedding_tokens)
                    .push_bind(record.cost_nano_usd)
                    .push_bind(record.latency_ms)
                    .push_bind(record.ttft_ms)
                    .push_bind(record.status.clone())
                    .push_bind(record.error_kind.clone())
                    .push_bind(record.cache_hit)
                    .push_bind(record.fallback_from.clone())
                    .push_bind(record.tokens_estimated)
                    .push_bind(record.created_at);
            });
            insert.build().execute(&mut *tx).await.map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)
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
