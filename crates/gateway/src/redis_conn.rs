//! The Redis connection shared by the rate limiter, the budgets and the response cache when
//! `REDIS_URL` is set.
//!
//! One multiplexed connection ([`redis::aio::ConnectionManager`]), opened lazily and reopened
//! by the manager when it breaks. Every operation has a deadline (`REDIS_TIMEOUT_MS`): a slow
//! or unreachable Redis costs a request at most that long, is counted in
//! `meta_chat_redis_errors_total{operation}` and logged (one warning per 10 s at most), and
//! the caller decides how to go on without it (the cache misses, limits fail open unless
//! configured otherwise). Keys are all under `REDIS_KEY_PREFIX`.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::metrics::Metrics;

/// Redis did not answer in time, or answered with an error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("redis {operation}: {message}")]
pub struct RedisUnavailable {
    /// What was being done.
    pub operation: &'static str,
    /// Why it failed (never holds the URL).
    pub message: String,
}

/// A handle on the shared Redis. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    manager: ConnectionManager,
    prefix: Arc<str>,
    timeout: Duration,
    metrics: Arc<Metrics>,
    last_warning: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// A handle on the Redis at `url`; connects on first use, so a Redis that is down at start
    /// does not stop the gateway. Fails only on a malformed URL.
    pub fn open(
        url: &str,
        prefix: &str,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("invalid REDIS_URL: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("cannot set up the Redis connection: {e}"))?;
        Ok(Self {
            manager,
            prefix: Arc::from(prefix),
            timeout,
            metrics,
            last_warning: Arc::default(),
        })
    }

    /// `name` under the key prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Runs `operation` on the connection within the deadline; a failure is counted and
    /// logged, then returned.
    pub async fn run<T, F, Fut>(&self, operation: &'static str, f: F) -> Result<T, RedisUnavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let result = tokio::time::timeout(self.timeout, f(self.manager.clone())).await;
        let message = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {} ms", self.timeout.as_millis()),
        };
        self.metrics.record_redis_error(operation);
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(operation, error = %message, "Redis is unavailable; going on without it");
        }
        Err(RedisUnavailable { operation, message })
    }
}
