//! Rate limits and hard budgets (SPEC §4.5), in-process or shared through Redis.
//!
//! - **Requests per minute**: GCRA (the generic cell rate algorithm): a tenant with a limit of
//!   `n` per minute may send a burst of `n`, then one every `60/n` seconds; there is no
//!   window boundary at which twice the limit gets through. `Retry-After` is exactly when the
//!   next request would be admitted.
//! - **Tokens per day**: input plus output tokens of the current UTC day, as recorded: the
//!   counter starts from the day's usage in the database (the day rollups) and is charged
//!   with each request's actual tokens when it ends. A request is admitted while the day's
//!   total is under the limit.
//! - **Budgets**: before a request is sent, its worst-case cost (prompt tokens bounded from
//!   above by its size in bytes, `max_tokens` of output, at the most expensive model of its
//!   fallback chain) is reserved against the tenant's daily and monthly budget; the request
//!   is refused if the reservation would pass either. When it ends — completed, failed, cut
//!   or abandoned — the reservation is settled to its actual cost; if it never reached a
//!   provider, released. Reservations and settlements are atomic, so concurrent requests can
//!   never spend more than the budget.
//!
//! Counters live in memory ([`Counters::Memory`]) or in Redis ([`Counters::Redis`], Lua
//! scripts, so every check-and-update is one atomic step across replicas, and every key has
//! a TTL). When Redis cannot be reached, requests are admitted (`LIMITS_FAIL_OPEN=true`, the
//! default) or refused with 503 (`false`).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, Utc};
use redis::Script;

use crate::redis_conn::{Redis, RedisUnavailable};
use crate::store::{Store, UsageDimension, UsageScope, midnight};

/// Where "now" comes from; tests inject a [`ManualClock`].
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    /// A clock showing `now`.
    pub fn new(now: DateTime<Utc>) -> Arc<Self> {
        Arc::new(Self(Mutex::new(now)))
    }

    /// Sets the time.
    pub fn set(&self, now: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = now;
    }

    /// Moves the time forward.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *now += chrono::TimeDelta::from_std(by).unwrap_or(chrono::TimeDelta::MAX);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The limits that apply to one tenant: its settings, else the system-wide defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantLimits {
    /// `rateLimit.requestsPerMinute`.
    pub requests_per_minute: Option<u64>,
    /// `rateLimit.tokensPerDay`.
    pub tokens_per_day: Option<u64>,
    /// `budget.dailyUsd`, in nano-dollars.
    pub daily_budget_nano: Option<i64>,
    /// `budget.monthlyUsd`, in nano-dollars.
    pub monthly_budget_nano: Option<i64>,
}

impl TenantLimits {
    /// Whether any limit applies.
    pub fn any(&self) -> bool {
        self.requests_per_minute.is_some()
            || self.tokens_per_day.is_some()
            || self.daily_budget_nano.is_some()
            || self.monthly_budget_nano.is_some()
    }

    /// Whether a budget applies.
    pub fn has_budget(&self) -> bool {
        self.daily_budget_nano.is_some() || self.monthly_budget_nano.is_some()
    }
}

/// USD to nano-dollars (rounded; settings validation keeps amounts positive and finite).
pub fn usd_to_nano(usd: f64) -> Option<i64> {
    let nano = (usd * 1e9).round();
    // The float-to-int cast saturates.
    #[allow(clippy::cast_possible_truncation)]
    (nano.is_finite() && nano >= 0.0).then_some(nano as i64)
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `rate_limit_exceeded`, `budget_exceeded` or `limits_unavailable`.
    pub code: &'static str,
    /// For people.
    pub message: String,
    /// When to try again.
    pub retry_after: Duration,
    /// The `x-ratelimit-*` headers.
    pub headers: Vec<(&'static str, String)>,
}

/// An admitted request: its `x-ratelimit-*` headers and what must happen when it ends.
#[derive(Debug, Default)]
pub struct Admission {
    /// The `x-ratelimit-*` headers.
    pub headers: Vec<(&'static str, String)>,
    /// Settles the request's budget reservation and charges its tokens when it ends.
    pub settlement: Option<Arc<Settlement>>,
}

/// The bookkeeping a request owes when it ends: its budget reservation is settled to its
/// actual cost and its tokens are charged to the day's counter. Done once, by whoever
/// records the request's outcome first; if the request ends without reaching that point
/// (it never got to a provider), dropping the last handle releases the reservation.
#[derive(Debug)]
pub struct Settlement {
    counters: Counters,
    reservation: Mutex<Option<(Vec<String>, i64)>>,
    tokens_key: Option<String>,
    done: AtomicBool,
}

impl Settlement {
    /// Settles the reservation to `cost_nano` and charges `tokens`. Only the first call
    /// counts. Never waits: the counters are updated by a task.
    pub fn settle(&self, cost_nano: i64, tokens: i64) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let reservation = self
            .reservation
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let counters = self.counters.clone();
        let tokens_key = self.tokens_key.clone();
        spawn(async move {
            if let Some((keys, reserved)) = reservation {
                counters.add(&keys, cost_nano - reserved, "budget").await;
            }
            if let Some(key) = tokens_key
                && tokens > 0
            {
                counters.add(&[key], tokens, "tokens").await;
            }
        });
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        if self.done.load(Ordering::Acquire) {
            return;
        }
        let reservation = self
            .reservation
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((keys, reserved)) = reservation {
            let counters = self.counters.clone();
            spawn(async move { counters.add(&keys, -reserved, "budget").await });
        }
    }
}

/// Runs `future` on the current runtime, if there is one (there always is in the server).
fn spawn(future: impl Future<Output = ()> + Send + 'static) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(future);
    }
}

/// The limiter: one per process, shared by every request.
#[derive(Debug, Clone)]
pub struct Limits {
    counters: Counters,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    fail_open: bool,
}

impl Limits {
    /// A limiter over `counters`, seeding day and month counters from `store`.
    pub fn new(
        counters: Counters,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        fail_open: bool,
    ) -> Self {
        Self {
            counters,
            store,
            clock,
            fail_open,
        }
    }

    /// The clock the limiter reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The counters behind the limiter (for tests and diagnostics).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Checks all of `tenant`'s limits for one request whose worst-case cost is
    /// `worst_case_nano`, and reserves that cost against its budgets:
    /// [`Self::check_rate`] then [`Self::reserve`].
    pub async fn admit(
        &self,
        tenant: &str,
        limits: &TenantLimits,
        worst_case_nano: i64,
    ) -> Result<Admission, Refusal> {
        let headers = self.check_rate(tenant, limits).await?;
        self.reserve(tenant, limits, worst_case_nano, headers).await
    }

    /// Counts one request against `tenant`'s requests per minute. Returns the
    /// `x-ratelimit-*-requests` headers.
    pub async fn check_rate(
        &self,
        tenant: &str,
        limits: &TenantLimits,
    ) -> Result<Vec<(&'static str, String)>, Refusal> {
        let mut admission = Admission::default();
        let now = self.clock.now();
        if let Some(per_minute) = limits.requests_per_minute {
            let key = format!("rl:{tenant}");
            match self.counters.gcra(&key, now, per_minute).await {
                Ok(gcra) => {
                    admission
                        .headers
                        .push(("x-ratelimit-limit-requests", per_minute.to_string()));
                    admission
                        .headers
                        .push(("x-ratelimit-remaining-requests", gcra.remaining.to_string()));
                    admission
                        .headers
                        .push(("x-ratelimit-reset-requests", duration_text(gcra.reset)));
                    if !gcra.allowed {
                        return Err(Refusal {
                            code: "rate_limit_exceeded",
                            message: format!(
                                "Rate limit reached: {per_minute} requests per minute. Try again \
                                 in {:.1} s.",
                                gcra.retry_after.as_secs_f64()
                            ),
                            retry_after: gcra.retry_after,
                            headers: admission.headers,
                        });
                    }
                }
                Err(error) => self.unavailable(error, &admission)?,
            }
        }
        Ok(admission.headers)
    }

    /// Checks `tenant`'s tokens per day and reserves `worst_case_nano` against its budgets,
    /// adding the `x-ratelimit-*-tokens` headers to `headers`.
    pub async fn reserve(
        &self,
        tenant: &str,
        limits: &TenantLimits,
        worst_case_nano: i64,
        headers: Vec<(&'static str, String)>,
    ) -> Result<Admission, Refusal> {
        let mut admission = Admission {
            headers,
            settlement: None,
        };
        let now = self.clock.now();
        let today = now.date_naive();
        let mut tokens_key = None;
        if let Some(per_day) = limits.tokens_per_day {
            let key = format!("tpd:{tenant}:{today}");
            let limit = i64::try_from(per_day).unwrap_or(i64::MAX);
            // Admitted while the day's total is under the limit: reserve nothing against
            // `limit - 1`.
            match self
                .reserve_windows(tenant, &[(key.clone(), limit - 1, Window::Day(today))], 0)
                .await
            {
                Ok(Ok(values)) => {
                    let used = values.first().copied().unwrap_or(0);
                    admission
                        .headers
                        .push(("x-ratelimit-limit-tokens", per_day.to_string()));
                    admission.headers.push((
                        "x-ratelimit-remaining-tokens",
                        (limit - used).max(0).to_string(),
                    ));
                    tokens_key = Some(key);
                }
                Ok(Err(_)) => {
                    admission
                        .headers
                        .push(("x-ratelimit-limit-tokens", per_day.to_string()));
                    admission
                        .headers
                        .push(("x-ratelimit-remaining-tokens", "0".to_owned()));
                    let retry_after = until(now, next_midnight(today));
                    return Err(Refusal {
                        code: "rate_limit_exceeded",
                        message: format!(
                            "Rate limit reached: {per_day} tokens per day (UTC). The limit resets \
                             at midnight UTC."
                        ),
                        retry_after,
                        headers: admission.headers,
                    });
                }
                Err(error) => self.unavailable(error, &admission)?,
            }
        }

        let mut reservation = None;
        if limits.has_budget() {
            let month = first_of_month(today);
            let mut windows = Vec::with_capacity(2);
            if let Some(limit) = limits.daily_budget_nano {
                windows.push((
                    format!("budget:{tenant}:d:{today}"),
                    limit,
                    Window::Day(today),
                ));
            }
            if let Some(limit) = limits.monthly_budget_nano {
                windows.push((
                    format!("budget:{tenant}:m:{}", month.format("%Y-%m")),
                    limit,
                    Window::Month(month),
                ));
            }
            let amount = worst_case_nano.max(0);
            match self.reserve_windows(tenant, &windows, amount).await {
                Ok(Ok(_)) => {
                    reservation = Some((windows.into_iter().map(|w| w.0).collect(), amount));
                }
                Ok(Err(index)) => {
                    let (what, reset) = match windows.get(index).map(|w| w.2) {
                        Some(Window::Month(month)) => ("monthly", midnight(next_month(month))),
                        _ => ("daily", next_midnight(today)),
                    };
                    return Err(Refusal {
                        code: "budget_exceeded",
                        message: format!(
                            "The tenant's {what} budget does not cover this request (worst case \
                             {} USD). Lower max_tokens or wait for the budget to reset.",
                            meta_chat_llm::pricing::format_usd(u64::try_from(amount).unwrap_or(0))
                        ),
                        retry_after: until(now, reset),
                        headers: admission.headers,
                    });
                }
                Err(error) => self.unavailable(error, &admission)?,
            }
        }

        if tokens_key.is_some() || reservation.is_some() {
            admission.settlement = Some(Arc::new(Settlement {
                counters: self.counters.clone(),
                reservation: Mutex::new(reservation),
                tokens_key,
                done: AtomicBool::new(false),
            }));
        }
        Ok(admission)
    }

    fn unavailable(&self, error: RedisUnavailable, admission: &Admission) -> Result<(), Refusal> {
        if self.fail_open {
            return Ok(());
        }
        Err(Refusal {
            code: "limits_unavailable",
            message: format!(
                "the rate limiter cannot be reached ({}); try again",
                error.operation
            ),
            retry_after: Duration::from_secs(1),
            headers: admission.headers.clone(),
        })
    }

    /// Reserves `amount` against every window, seeding windows the counters do not hold yet
    /// from the recorded usage.
    async fn reserve_windows(
        &self,
        tenant: &str,
        windows: &[(String, i64, Window)],
        amount: i64,
    ) -> Result<Result<Vec<i64>, usize>, RedisUnavailable> {
        let keys: Vec<String> = windows.iter().map(|w| w.0.clone()).collect();
        let limits: Vec<i64> = windows.iter().map(|w| w.1).collect();
        for _ in 0..3 {
            match self.counters.reserve(&keys, &limits, amount).await? {
                Reserved::Missing(index) => {
                    let Some((key, _, window)) = windows.get(index) else {
                        break;
                    };
                    let seed = self.recorded(tenant, key, *window).await;
                    self.counters.seed(key, seed, window.ttl()).await?;
                }
                Reserved::Admitted(values) => return Ok(Ok(values)),
                Reserved::Over { index, .. } => return Ok(Err(index)),
            }
        }
        Err(RedisUnavailable {
            operation: "seed",
            message: "a counter could not be seeded".into(),
        })
    }

    /// What the database holds for a window: tokens (input + output) for a `tpd:` key, cost
    /// for a `budget:` key.
    async fn recorded(&self, tenant: &str, key: &str, window: Window) -> i64 {
        let (first, end) = match window {
            Window::Day(day) => (day, day + Days::new(1)),
            Window::Month(month) => (month, next_month(month)),
        };
        let scope = UsageScope {
            tenant_id: Some(tenant),
            from: midnight(first),
            to: midnight(end),
        };
        match self
            .store
            .usage_grouped(&scope, UsageDimension::Tenant)
            .await
        {
            Ok(groups) => groups
                .first()
                .map(|(_, _, totals)| {
                    if key.starts_with("tpd:") {
                        totals.input_tokens + totals.output_tokens
                    } else {
                        totals.cost_nano_usd
                    }
                })
                .unwrap_or(0),
            Err(error) => {
                tracing::warn!(%error, tenant, "cannot read recorded usage; counting from zero");
                0
            }
        }
    }
}

/// A day or month window of a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    Day(NaiveDate),
    Month(NaiveDate),
}

impl Window {
    /// How long a counter of this window is kept: past its end, with a margin.
    fn ttl(self) -> Duration {
        match self {
            Self::Day(_) => Duration::from_secs(2 * 86_400),
            Self::Month(_) => Duration::from_secs(33 * 86_400),
        }
    }
}

fn next_midnight(day: NaiveDate) -> DateTime<Utc> {
    midnight(day + Days::new(1))
}

fn first_of_month(day: NaiveDate) -> NaiveDate {
    day.with_day(1).unwrap_or(day)
}

fn next_month(month: NaiveDate) -> NaiveDate {
    month
        .checked_add_months(Months::new(1))
        .unwrap_or(NaiveDate::MAX)
}

fn until(now: DateTime<Utc>, then: DateTime<Utc>) -> Duration {
    (then - now).to_std().unwrap_or(Duration::ZERO)
}

/// A duration as OpenAI writes it in `x-ratelimit-reset-*`: `6s`, `1m30s`, `250ms`.
fn duration_text(d: Duration) -> String {
    let millis = d.as_millis();
    if millis < 1_000 {
        return format!("{millis}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        return format!("{}s", (secs * 10.0).ceil() / 10.0);
    }
    let whole = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    format!("{}m{}s", whole / 60, whole % 60)
}

/// The `Retry-After` value: whole seconds, rounded up, at least 1.
pub fn retry_after_seconds(d: Duration) -> u64 {
    d.as_millis()
        .div_ceil(1_000)
        .max(1)
        .try_into()
        .unwrap_or(u64::MAX)
}

/// One GCRA decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Whether the request is admitted.
    pub allowed: bool,
    /// Requests that could still be admitted right now.
    pub remaining: u64,
    /// When a refused request would be admitted.
    pub retry_after: Duration,
    /// When the full burst is available again.
    pub reset: Duration,
}

/// The outcome of a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// Reserved; the counters' values after it.
    Admitted(Vec<i64>),
    /// Refused: the counter at `index` would pass its limit.
    Over {
        /// Which counter.
        index: usize,
        /// Its value.
        value: i64,
    },
    /// The counter at this index does not exist yet: seed it, then try again.
    Missing(usize),
}

/// The counters behind the limiter: in this process, or in Redis for every replica.
#[derive(Debug, Clone)]
pub enum Counters {
    /// In this process's memory.
    Memory(Arc<MemoryCounters>),
    /// In Redis, shared by every replica.
    Redis(Redis),
}

impl Counters {
    /// Counters in memory.
    pub fn memory() -> Self {
        Self::Memory(Arc::default())
    }

    /// One GCRA step for `key` at `per_minute` requests a minute.
    pub async fn gcra(
        &self,
        key: &str,
        now: DateTime<Utc>,
        per_minute: u64,
    ) -> Result<Gcra, RedisUnavailable> {
        let now_us = now.timestamp_micros();
        let interval = 60_000_000 / i64::try_from(per_minute.max(1)).unwrap_or(i64::MAX);
        let interval = interval.max(1);
        let tolerance = interval * (i64::try_from(per_minute).unwrap_or(i64::MAX) - 1).max(0);
        let (allowed, wait, reset) = match self {
            Self::Memory(memory) => memory.gcra(key, now_us, interval, tolerance),
            Self::Redis(redis) => {
                let key = redis.key(key);
                let (allowed, wait, reset): (i64, i64, i64) = redis
                    .run("rate_limit", |mut c| async move {
                        GCRA_SCRIPT
                            .key(key)
                            .arg(now_us)
                            .arg(interval)
                            .arg(tolerance)
                            .invoke_async(&mut c)
                            .await
                    })
                    .await?;
                (allowed == 1, wait, reset)
            }
        };
        let micros = |us: i64| Duration::from_micros(u64::try_from(us.max(0)).unwrap_or(0));
        // Requests that fit now: those whose admission time (TAT - tolerance) has passed.
        let remaining = if allowed {
            u64::try_from((tolerance + interval - reset).max(0) / interval).unwrap_or(0)
        } else {
            0
        };
        Ok(Gcra {
            allowed,
            remaining,
            retry_after: micros(wait),
            reset: micros(reset),
        })
    }

    /// Adds `amount` to every counter if none would pass its limit (`value + amount ≤
    /// limit`), atomically.
    pub async fn reserve(
        &self,
        keys: &[String],
        limits: &[i64],
        amount: i64,
    ) -> Result<Reserved, RedisUnavailable> {
        match self {
            Self::Memory(memory) => Ok(memory.reserve(keys, limits, amount)),
            Self::Redis(redis) => {
                let keys: Vec<String> = keys.iter().map(|k| redis.key(k)).collect();
                let limits = limits.to_vec();
                let reply: Vec<i64> = redis
                    .run("budget", |mut c| async move {
                        let mut invocation = RESERVE_SCRIPT.prepare_invoke();
                        for key in &keys {
                            invocation.key(key);
                        }
                        invocation.arg(amount);
                        for limit in &limits {
                            invocation.arg(*limit);
                        }
                        invocation.invoke_async(&mut c).await
                    })
                    .await?;
                let index =
                    |i: Option<&i64>| usize::try_from(i.copied().unwrap_or(1) - 1).unwrap_or(0);
                Ok(match reply.first() {
                    Some(1) => Reserved::Admitted(reply[1..].to_vec()),
                    Some(0) => Reserved::Over {
                        index: index(reply.get(1)),
                        value: reply.get(2).copied().unwrap_or(0),
                    },
                    _ => Reserved::Missing(index(reply.get(1))),
                })
            }
        }
    }

    /// Creates `key` with `value` unless it exists.
    pub async fn seed(&self, key: &str, value: i64, ttl: Duration) -> Result<(), RedisUnavailable> {
        match self {
            Self::Memory(memory) => {
                memory.seed(key, value);
                Ok(())
            }
            Self::Redis(redis) => {
                let key = redis.key(key);
                let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
                redis
                    .run("seed", |mut c| async move {
                        redis::cmd("SET")
                            .arg(key)
                            .arg(value)
                            .arg("NX")
                            .arg("PX")
                            .arg(ttl_ms)
                            .query_async::<Option<String>>(&mut c)
                            .await
                    })
                    .await
                    .map(drop)
            }
        }
    }

    /// Adds `amount` (possibly negative) to the counters that exist. Failures are counted
    /// and logged by the Redis handle.
    pub async fn add(&self, keys: &[String], amount: i64, operation: &'static str) {
        if amount == 0 {
            return;
        }
        match self {
            Self::Memory(memory) => memory.add(keys, amount),
            Self::Redis(redis) => {
                let keys: Vec<String> = keys.iter().map(|k| redis.key(k)).collect();
                let _ = redis
                    .run(operation, |mut c| async move {
                        let mut invocation = ADD_SCRIPT.prepare_invoke();
                        for key in &keys {
                            invocation.key(key);
                        }
                        invocation.arg(amount);
                        invocation.invoke_async::<i64>(&mut c).await
                    })
                    .await;
            }
        }
    }

    /// A counter's value, if it exists (for tests and diagnostics).
    pub async fn value(&self, key: &str) -> Result<Option<i64>, RedisUnavailable> {
        match self {
            Self::Memory(memory) => Ok(memory.value(key)),
            Self::Redis(redis) => {
                let key = redis.key(key);
                redis
                    .run("get", |mut c| async move {
                        redis::cmd("GET")
                            .arg(key)
                            .query_async::<Option<i64>>(&mut c)
                            .await
                    })
                    .await
            }
        }
    }
}

/// GCRA in Redis. KEYS[1] holds the theoretical arrival time (µs); ARGV: now, emission
/// interval, burst tolerance (µs). Returns {allowed, wait µs, TAT - now µs}.
static GCRA_SCRIPT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - tolerance
if now < allow_at then
  return {0, allow_at - now, tat - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0, new_tat - now}
",
    )
});

/// Reservation in Redis. KEYS: counters; ARGV[1]: amount, ARGV[2..]: one limit per key.
/// Returns {1, values after…}, {0, index, value} when a limit would be passed, or {-1, index}
/// when a counter does not exist yet.
static RESERVE_SCRIPT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
local amount = tonumber(ARGV[1])
local values = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if not value then return {-1, i} end
  value = tonumber(value)
  if value + amount > tonumber(ARGV[i + 1]) then return {0, i, value} end
  values[i] = value
end
local reply = {1}
for i, key in ipairs(KEYS) do
  if amount ~= 0 then redis.call('INCRBY', key, amount) end
  reply[i + 1] = values[i] + amount
end
return reply
",
    )
});

/// Settlement in Redis: adds ARGV[1] to each of KEYS that exists (a counter that expired or
/// was never seeded is left alone).
static ADD_SCRIPT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, ARGV[1]) end
end
return 0
",
    )
});

/// Counters in this process. Day and month counters are few (one per tenant and window);
/// GCRA states whose time has passed are pruned as the map grows.
#[derive(Debug, Default)]
pub struct MemoryCounters {
    gcra: Mutex<HashMap<String, i64>>,
    counters: Mutex<HashMap<String, i64>>,
}

impl MemoryCounters {
    fn gcra(&self, key: &str, now: i64, interval: i64, tolerance: i64) -> (bool, i64, i64) {
        let mut states = self.gcra.lock().unwrap_or_else(PoisonError::into_inner);
        let tat = states.get(key).copied().unwrap_or(now).max(now);
        let allow_at = tat - tolerance;
        if now < allow_at {
            return (false, allow_at - now, tat - now);
        }
        let new_tat = tat + interval;
        if states.len() >= 10_000 && !states.contains_key(key) {
            states.retain(|_, tat| *tat > now);
        }
        states.insert(key.to_owned(), new_tat);
        (true, 0, new_tat - now)
    }

    fn reserve(&self, keys: &[String], limits: &[i64], amount: i64) -> Reserved {
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let mut values = Vec::with_capacity(keys.len());
        for (index, (key, limit)) in keys.iter().zip(limits).enumerate() {
            let Some(value) = counters.get(key).copied() else {
                return Reserved::Missing(index);
            };
            if value + amount > *limit {
                return Reserved::Over { index, value };
            }
            values.push(value + amount);
        }
        for key in keys {
            if let Some(value) = counters.get_mut(key) {
                *value += amount;
            }
        }
        Reserved::Admitted(values)
    }

    fn seed(&self, key: &str, value: i64) {
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        if counters.len() >= 100_000 {
            // Day and month keys of past windows; the rest is seeded again from the database.
            counters.clear();
        }
        counters.entry(key.to_owned()).or_insert(value);
    }

    fn add(&self, keys: &[String], amount: i64) {
        let mut counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        for key in keys {
            if let Some(value) = counters.get_mut(key) {
                *value += amount;
            }
        }
    }

    fn value(&self, key: &str) -> Option<i64> {
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[tokio::test]
    async fn gcra_admits_a_burst_then_one_per_interval() {
        let counters = Counters::memory();
        let now = at("2026-11-26T10:00:00Z");
        let mut admitted = 0;
        let mut last = None;
        for _ in 0..15 {
            let gcra = counters.gcra("k", now, 10).await.unwrap();
            if gcra.allowed {
                admitted += 1;
                assert_eq!(gcra.remaining, 10 - admitted);
            } else {
                last = Some(gcra);
            }
        }
        assert_eq!(admitted, 10);
        let refused = last.unwrap();
        assert_eq!(refused.retry_after, Duration::from_secs(6));
        assert_eq!(refused.remaining, 0);
        let early = now + chrono::TimeDelta::milliseconds(5_999);
        assert!(!counters.gcra("k", early, 10).await.unwrap().allowed);
        let later = now + chrono::TimeDelta::seconds(6);
        assert!(counters.gcra("k", later, 10).await.unwrap().allowed);
        assert!(!counters.gcra("k", later, 10).await.unwrap().allowed);
    }

    #[test]
    fn reservations_never_pass_the_limit() {
        let memory = MemoryCounters::default();
        let keys = vec!["d".to_owned(), "m".to_owned()];
        assert_eq!(memory.reserve(&keys, &[10, 100], 3), Reserved::Missing(0));
        memory.seed("d", 0);
        memory.seed("m", 95);
        memory.seed("m", 0); // Seeding does not overwrite.
        assert_eq!(
            memory.reserve(&keys, &[10, 100], 3),
            Reserved::Admitted(vec![3, 98])
        );
        assert_eq!(
            memory.reserve(&keys, &[10, 100], 3),
            Reserved::Over {
                index: 1,
                value: 98
            }
        );
        memory.add(&keys, -1);
        assert_eq!(memory.value("d"), Some(2));
        assert_eq!(memory.value("m"), Some(97));
    }

    #[test]
    fn durations_read_like_openai() {
        assert_eq!(duration_text(Duration::from_millis(250)), "250ms");
        assert_eq!(duration_text(Duration::from_secs(6)), "6s");
        assert_eq!(duration_text(Duration::from_secs(90)), "1m30s");
        assert_eq!(retry_after_seconds(Duration::from_millis(5_001)), 6);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
    }
}
