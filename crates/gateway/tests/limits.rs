//! Rate limits and hard budgets (SPEC §4.5, README "Rate limits and budgets", "In-process or
//! Redis") through the HTTP API: requests per minute (GCRA), tokens per UTC day counted from
//! the recorded usage, system-wide defaults, what the official OpenAI SDK makes of a refusal,
//! daily and monthly budgets reserved atomically and settled to the actual cost (also for cut
//! and abandoned streams), and a Redis that cannot be reached (fail open or closed).
//!
//! Every limiter and budget test runs twice from one body: with the counters in the process
//! (`_in_process`) and in Redis (`_redis`, `TEST_REDIS_URL`, a key prefix of its own; skipped
//! with a message when it is not set, a failure under `REQUIRE_SERVICES=1`). Time is a
//! [`ManualClock`] far from the real date: the limiter's windows are those of the manual clock,
//! while the gateway stamps usage records with the real time, so the only usage a window
//! starts from is what a test inserts into it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::{ApiErrorResponse, OpenAIError};
use async_openai::types::chat::{ChatCompletionRequestUserMessage, CreateChatCompletionRequest};
use common::usage::{
    SLOW_TEXT, at, chat_record, mini_cost, mini_settings, stream_with_usage, wait_for_records,
};
use common::{Answer, Gateway, PgSchema, hello, redis_prefix, test_database_url, test_redis_url};
use futures::StreamExt;
use futures::future::join_all;
use meta_chat::limits::ManualClock;
use meta_chat::store::UsageRecord;
use meta_chat_testkit::Reply;
use serde_json::{Value, json};

/// The manual clock's start: noon UTC, 12 hours before midnight.
const NOON: &str = "2031-03-14T12:00:00Z";
/// Its UTC day.
const NOON_DAY: &str = "2031-03-14";
/// Seconds from [`NOON`] to the next midnight UTC.
const HALF_A_DAY: u64 = 12 * 3_600;

/// PostgreSQL needs one.
const ENCRYPTION_KEY: &str = "limits-tests-encryption-key-0123456789abcdef";

/// The longest a test waits for something the gateway does in the background (settling a
/// request's counters, writing its usage record). Not a timing assertion: a deadline for a
/// condition that must become true.
const PATIENCE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// The two limiter backends.

/// Where the gateway keeps its counters.
enum Limiter {
    /// In the process (no `REDIS_URL`).
    InProcess,
    /// In Redis, under a key prefix of the test's own.
    Redis { url: String, prefix: String },
}

impl Limiter {
    /// The Redis of `TEST_REDIS_URL`, or `None` (skipped, unless `REQUIRE_SERVICES=1`).
    fn redis(test: &str) -> Option<Self> {
        test_redis_url().map(|url| Self::Redis {
            url,
            prefix: redis_prefix(test),
        })
    }

    /// Deletes the keys the test left in Redis (they would expire anyway).
    fn forget(&self) -> impl Future<Output = ()> + use<> {
        let redis = match self {
            Self::InProcess => None,
            Self::Redis { url, prefix } => Some((url.clone(), prefix.clone())),
        };
        async move {
            let Some((url, prefix)) = redis else {
                return;
            };
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query_async(&mut connection)
                .await
                .unwrap();
            if !keys.is_empty() {
                redis::cmd("DEL")
                    .arg(&keys)
                    .query_async::<i64>(&mut connection)
                    .await
                    .unwrap();
            }
        }
    }

    fn vars(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::InProcess => Vec::new(),
            Self::Redis { url, prefix } => vec![
                ("REDIS_URL", url.clone()),
                ("REDIS_KEY_PREFIX", prefix.clone()),
                // Generous, so a busy machine does not turn into a failing-open Redis.
                ("REDIS_TIMEOUT_MS", "5000".to_owned()),
            ],
        }
    }
}

/// Two tests of `$body` (an `async fn(Limiter)`): `$in_process` with the counters in the
/// process, `$redis` with them in Redis (passing when Redis is skipped). Multi-threaded, so
/// concurrent requests really run in parallel.
macro_rules! on_both_limiters {
    ($body:ident: $in_process:ident, $redis:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $in_process() {
            $body(Limiter::InProcess).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $redis() {
            if let Some(limiter) = Limiter::redis(stringify!($redis)) {
                let forget = limiter.forget();
                $body(limiter).await;
                forget.await;
            }
        }
    };
}

/// A manual clock showing `text` (RFC 3339).
fn clock_at(text: &str) -> Arc<ManualClock> {
    ManualClock::new(at(text))
}

/// A gateway (over a fresh SQLite file unless `extra` names a `DATABASE_URL`) with its
/// counters where `limiter` says and its limiter reading `clock`; `extra` last.
async fn gateway(limiter: &Limiter, clock: &Arc<ManualClock>, extra: &[(&str, &str)]) -> Gateway {
    let mut vars = limiter.vars();
    vars.extend(
        extra
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned())),
    );
    let vars: Vec<(&str, &str)> = vars.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let gateway = Gateway::start_with_clock(&vars, clock.clone()).await;
    let expected = match limiter {
        Limiter::InProcess => "Memory",
        Limiter::Redis { .. } => "Redis",
    };
    let counters = format!("{:?}", gateway.state.limits.counters());
    assert!(counters.starts_with(expected), "{counters}");
    gateway
}

/// Tenant settings on OpenAI's gpt-4o-mini with these extra fields.
fn mini_with(extra: Value) -> Value {
    let mut settings = mini_settings();
    if let (Value::Object(map), Value::Object(more)) = (&mut settings, extra) {
        map.extend(more);
    }
    settings
}

// ---------------------------------------------------------------------------------------------
// Answers and counters.

/// A 200, saying why not.
fn assert_admitted(answer: &Answer) {
    assert_eq!(answer.status, 200, "{}", answer.text);
}

/// A 429 in OpenAI's terms with this `code` and `Retry-After` (seconds).
fn assert_refused(answer: &Answer, code: &str, retry_after: u64) {
    assert_eq!(answer.status, 429, "{}", answer.text);
    let body = answer.json();
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(answer.header("retry-after"), retry_after.to_string());
}

/// The value of a limiter counter (`tpd:…`, `budget:…`), wherever the gateway keeps them.
async fn counter(gw: &Gateway, key: &str) -> Option<i64> {
    gw.state.limits.counters().value(key).await.unwrap()
}

/// Waits until the counter `key` holds `expected` (requests settle their counters in the
/// background once they end).
async fn wait_for_counter(gw: &Gateway, key: &str, expected: i64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let value = counter(gw, key).await;
        if value == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "counter {key} is {value:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The day budget counter of `tenant` on `day`.
fn day_budget_key(tenant: &str, day: &str) -> String {
    format!("budget:{tenant}:d:{day}")
}

/// The month budget counter of `tenant` for `month` (`YYYY-MM`).
fn month_budget_key(tenant: &str, month: &str) -> String {
    format!("budget:{tenant}:m:{month}")
}

/// The tokens-per-day counter of `tenant` on `day`.
fn tokens_key(tenant: &str, day: &str) -> String {
    format!("tpd:{tenant}:{day}")
}

/// The usage records the store holds for `tenant`.
async fn records(gw: &Gateway, tenant: &str) -> Vec<UsageRecord> {
    gw.state.store.recent_usage(tenant, 1_000).await.unwrap()
}

/// What `tenant`'s usage records cost in all.
async fn recorded_cost(gw: &Gateway, tenant: &str) -> i64 {
    records(gw, tenant)
        .await
        .iter()
        .map(|r| r.cost_nano_usd)
        .sum()
}

/// Chat requests the fake upstream received.
fn upstream_calls(gw: &Gateway) -> usize {
    gw.fake.requests_to("/v1/chat/completions").len()
}

/// The scraped value of the series `name` whose labels contain every one of `labels`
/// (such as `reason="budget_exceeded"`), if there is one.
async fn metric(gw: &Gateway, name: &str, labels: &[&str]) -> Option<f64> {
    let answer = gw.send(reqwest::Method::GET, "/metrics", None, None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let prefix = format!("{name}{{");
    answer
        .text
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Worst cases, worked out by hand.

/// The prompt bound of [`hello`] ("hello there", 11 bytes): 8 tokens of framing for the
/// message and 8 for the request, plus a token per byte.
const HELLO_MAX_INPUT: i64 = 8 + 11 + 8;

/// The output tokens the budget tests ask for.
const MAX_TOKENS: i64 = 100;

/// The worst case reserved for [`hello`] with `max_tokens` [`MAX_TOKENS`] on gpt-4o-mini.
const WORST_CASE: i64 = mini_cost(HELLO_MAX_INPUT, MAX_TOKENS);

/// [`hello`] asking for at most [`MAX_TOKENS`] tokens, with `extra` fields.
fn bounded_hello(extra: Value) -> Value {
    let mut body = hello(extra);
    body["max_tokens"] = json!(MAX_TOKENS);
    body
}

/// A reply that uses exactly the worst case of [`bounded_hello`], so the spend a test expects
/// does not depend on which requests settled before which others were admitted.
fn worst_case_reply() -> Reply {
    let (input, output) = (HELLO_MAX_INPUT, MAX_TOKENS);
    Reply::text("a full answer").with_usage(input.try_into().unwrap(), output.try_into().unwrap())
}

/// `cost` nano-dollars as the `budget` settings write USD.
fn usd(cost: i64) -> f64 {
    // Exact for the small amounts of these tests.
    #[allow(clippy::cast_precision_loss)]
    let usd = cost as f64 / 1e9;
    usd
}

// ---------------------------------------------------------------------------------------------
// 1. Requests per minute.

async fn a_burst_then_one_request_per_interval(limiter: Limiter) {
    let clock = clock_at(NOON);
    let gw = gateway(&limiter, &clock, &[]).await;
    let (tenant, key) = gw
        .tenant(mini_with(json!({"rateLimit": {"requestsPerMinute": 10}})))
        .await;
    let body = hello(json!({}));

    // The clock stands still: a burst of 10 gets through, then every request waits for the
    // next slot, 60/10 = 6 s away.
    for i in 0..15 {
        let answer = gw.chat(&key, &body).await;
        assert_eq!(answer.header("x-ratelimit-limit-requests"), "10");
        if i < 10 {
            assert_admitted(&answer);
            assert_eq!(
                answer.header("x-ratelimit-remaining-requests"),
                (9 - i).to_string(),
                "request {i}"
            );
        } else {
            assert_refused(&answer, "rate_limit_exceeded", 6);
            assert_eq!(answer.header("x-ratelimit-remaining-requests"), "0");
            assert!(
                answer.text.contains("10 requests per minute"),
                "{}",
                answer.text
            );
        }
        if i == 0 {
            assert_eq!(answer.header("x-ratelimit-reset-requests"), "6s");
        }
    }
    assert_eq!(
        upstream_calls(&gw),
        10,
        "refused requests never reach a provider"
    );

    // 6 s later one slot is free, and only one.
    clock.advance(Duration::from_secs(6));
    let answer = gw.chat(&key, &body).await;
    assert_admitted(&answer);
    assert_eq!(answer.header("x-ratelimit-remaining-requests"), "0");
    assert_refused(&gw.chat(&key, &body).await, "rate_limit_exceeded", 6);

    // A minute later the whole burst is back.
    clock.advance(Duration::from_secs(60));
    for i in 0..10 {
        let answer = gw.chat(&key, &body).await;
        assert_admitted(&answer);
        assert_eq!(
            answer.header("x-ratelimit-remaining-requests"),
            (9 - i).to_string()
        );
    }
    assert_refused(&gw.chat(&key, &body).await, "rate_limit_exceeded", 6);
    assert_eq!(upstream_calls(&gw), 21);
    assert_eq!(
        metric(
            &gw,
            "meta_chat_rate_limited_total",
            &[
                &format!("tenant=\"{tenant}\""),
                "reason=\"rate_limit_exceeded\""
            ],
        )
        .await,
        Some(7.0)
    );

    // Fired all at once, exactly 10 of 15 get through.
    let (_, other) = gw
        .tenant_named(
            "concurrent",
            mini_with(json!({"rateLimit": {"requestsPerMinute": 10}})),
        )
        .await;
    let answers = join_all((0..15).map(|_| gw.chat(&other, &body))).await;
    let admitted = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(admitted, 10);
    for answer in answers.iter().filter(|a| a.status != 200) {
        assert_refused(answer, "rate_limit_exceeded", 6);
    }
    assert_eq!(upstream_calls(&gw), 31);
}

on_both_limiters!(
    a_burst_then_one_request_per_interval:
        requests_per_minute_admit_a_burst_then_one_per_interval_in_process,
        requests_per_minute_admit_a_burst_then_one_per_interval_redis
);

// ---------------------------------------------------------------------------------------------
// 2. Tokens per day.

async fn tokens_per_day_reset_at_midnight(limiter: Limiter) {
    let clock = clock_at(NOON);
    let gw = gateway(&limiter, &clock, &[]).await;
    let (tenant, key) = gw
        .tenant(mini_with(json!({"rateLimit": {"tokensPerDay": 30}})))
        .await;
    let body = hello(json!({}));
    let today = tokens_key(&tenant, NOON_DAY);

    // 12 tokens a call: admitted at 0, 12 and 24 (under 30; the third passes it, to 36).
    for n in 0..3 {
        gw.fake.push(Reply::text("ok").with_usage(8, 4));
        let answer = gw.chat(&key, &body).await;
        assert_admitted(&answer);
        assert_eq!(answer.header("x-ratelimit-limit-tokens"), "30");
        assert_eq!(
            answer.header("x-ratelimit-remaining-tokens"),
            (30 - 12 * n).to_string()
        );
        wait_for_counter(&gw, &today, 12 * (n + 1)).await;
    }

    // Over: refused until midnight UTC, 12 h away.
    let answer = gw.chat(&key, &body).await;
    assert_refused(&answer, "rate_limit_exceeded", HALF_A_DAY);
    assert_eq!(answer.header("x-ratelimit-limit-tokens"), "30");
    assert_eq!(answer.header("x-ratelimit-remaining-tokens"), "0");
    assert!(answer.text.contains("tokens per day"), "{}", answer.text);
    assert_eq!(upstream_calls(&gw), 3);

    // A second before midnight: still refused, for one more second.
    clock.set(at("2031-03-14T23:59:59Z"));
    assert_refused(&gw.chat(&key, &body).await, "rate_limit_exceeded", 1);

    // A new UTC day: a new count.
    clock.set(at("2031-03-15T00:00:00Z"));
    gw.fake.push(Reply::text("ok").with_usage(8, 4));
    let answer = gw.chat(&key, &body).await;
    assert_admitted(&answer);
    assert_eq!(answer.header("x-ratelimit-remaining-tokens"), "30");
    wait_for_counter(&gw, &tokens_key(&tenant, "2031-03-15"), 12).await;
    assert_eq!(upstream_calls(&gw), 4);
}

on_both_limiters!(
    tokens_per_day_reset_at_midnight:
        tokens_per_day_refuse_until_midnight_utc_in_process,
        tokens_per_day_refuse_until_midnight_utc_redis
);

/// A record of `tenant` at `created_at` with these tokens (cost as on gpt-4o-mini).
fn tokens_record(tenant: &str, created_at: &str, input: i64, output: i64) -> UsageRecord {
    UsageRecord {
        input_tokens: input,
        output_tokens: output,
        cost_nano_usd: mini_cost(input, output),
        ..chat_record(tenant, at(created_at))
    }
}

/// The count of a fresh gateway starts from the usage the database holds for the day (and
/// only that day).
async fn tokens_per_day_count_recorded_usage(limiter: Limiter, postgres: Option<PgSchema>) {
    let clock = clock_at(NOON);
    let url = postgres.as_ref().map(PgSchema::url);
    let mut extra = Vec::new();
    if let Some(url) = &url {
        extra.extend([
            ("DATABASE_URL", url.as_str()),
            ("ENCRYPTION_KEY", ENCRYPTION_KEY),
        ]);
    }
    let gw = gateway(&limiter, &clock, &extra).await;
    let expected_backend = if postgres.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(gw.state.store.backend(), expected_backend);
    let settings = mini_with(json!({"rateLimit": {"tokensPerDay": 30}}));
    let (over, over_key) = gw.tenant_named("over", settings.clone()).await;
    let (full, full_key) = gw.tenant_named("full", settings.clone()).await;
    let (under, under_key) = gw.tenant_named("under", settings).await;
    gw.state
        .store
        .insert_usage(&[
            // Already over today: 35 tokens.
            tokens_record(&over, "2031-03-14T00:00:00Z", 20, 5),
            tokens_record(&over, "2031-03-14T11:59:59Z", 6, 4),
            // Exactly at the limit: no longer under it.
            tokens_record(&full, "2031-03-14T06:00:00Z", 10, 20),
            // 20 tokens today; yesterday's and tomorrow's do not count.
            tokens_record(&under, "2031-03-13T23:59:59Z", 900, 100),
            tokens_record(&under, "2031-03-14T09:30:00Z", 15, 5),
            tokens_record(&under, "2031-03-15T00:00:00Z", 900, 100),
        ])
        .await
        .unwrap();

    let body = hello(json!({}));
    let answer = gw.chat(&over_key, &body).await;
    assert_refused(&answer, "rate_limit_exceeded", HALF_A_DAY);
    assert_eq!(answer.header("x-ratelimit-remaining-tokens"), "0");
    assert_eq!(counter(&gw, &tokens_key(&over, NOON_DAY)).await, Some(35));
    let answer = gw.chat(&full_key, &body).await;
    assert_refused(&answer, "rate_limit_exceeded", HALF_A_DAY);
    assert_eq!(counter(&gw, &tokens_key(&full, NOON_DAY)).await, Some(30));
    assert_eq!(upstream_calls(&gw), 0);

    gw.fake.push(Reply::text("ok").with_usage(8, 4));
    let answer = gw.chat(&under_key, &body).await;
    assert_admitted(&answer);
    assert_eq!(answer.header("x-ratelimit-remaining-tokens"), "10");
    wait_for_counter(&gw, &tokens_key(&under, NOON_DAY), 32).await;
    assert_refused(
        &gw.chat(&under_key, &body).await,
        "rate_limit_exceeded",
        HALF_A_DAY,
    );
    assert_eq!(upstream_calls(&gw), 1);
}

/// A private PostgreSQL schema, or `None` (skipped, unless `REQUIRE_SERVICES=1`).
async fn postgres_schema() -> Option<PgSchema> {
    let url = test_database_url()?;
    Some(PgSchema::create(&url, "mc_limits").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_per_day_count_usage_recorded_in_sqlite_in_process() {
    tokens_per_day_count_recorded_usage(Limiter::InProcess, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_per_day_count_usage_recorded_in_sqlite_redis() {
    if let Some(limiter) = Limiter::redis("tpd_sqlite") {
        let forget = limiter.forget();
        tokens_per_day_count_recorded_usage(limiter, None).await;
        forget.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_per_day_count_usage_recorded_in_postgres_in_process() {
    if let Some(schema) = postgres_schema().await {
        tokens_per_day_count_recorded_usage(Limiter::InProcess, Some(schema)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_per_day_count_usage_recorded_in_postgres_redis() {
    let Some(limiter) = Limiter::redis("tpd_postgres") else {
        return;
    };
    if let Some(schema) = postgres_schema().await {
        let forget = limiter.forget();
        tokens_per_day_count_recorded_usage(limiter, Some(schema)).await;
        forget.await;
    }
}

// ---------------------------------------------------------------------------------------------
// 3. System-wide defaults.

async fn defaults_apply_to_tenants_without_their_own(limiter: Limiter) {
    let clock = clock_at(NOON);
    let gw = gateway(
        &limiter,
        &clock,
        &[
            ("DEFAULT_REQUESTS_PER_MINUTE", "2"),
            ("DEFAULT_TOKENS_PER_DAY", "1000"),
        ],
    )
    .await;
    let (_, plain) = gw.tenant_named("plain", mini_settings()).await;
    let (_, own) = gw
        .tenant_named(
            "own",
            mini_with(json!({"rateLimit": {"requestsPerMinute": 5, "tokensPerDay": 100_000}})),
        )
        .await;
    let body = hello(json!({}));

    for _ in 0..2 {
        let answer = gw.chat(&plain, &body).await;
        assert_admitted(&answer);
        assert_eq!(answer.header("x-ratelimit-limit-requests"), "2");
        assert_eq!(answer.header("x-ratelimit-limit-tokens"), "1000");
    }
    let answer = gw.chat(&plain, &body).await;
    assert_refused(&answer, "rate_limit_exceeded", 30);
    assert_eq!(answer.header("x-ratelimit-limit-requests"), "2");

    for _ in 0..5 {
        let answer = gw.chat(&own, &body).await;
        assert_admitted(&answer);
        assert_eq!(answer.header("x-ratelimit-limit-requests"), "5");
        assert_eq!(answer.header("x-ratelimit-limit-tokens"), "100000");
    }
    let answer = gw.chat(&own, &body).await;
    assert_refused(&answer, "rate_limit_exceeded", 12);
    assert_eq!(answer.header("x-ratelimit-limit-requests"), "5");
    assert_eq!(upstream_calls(&gw), 7);
}

on_both_limiters!(
    defaults_apply_to_tenants_without_their_own:
        default_limits_apply_to_tenants_without_their_own_in_process,
        default_limits_apply_to_tenants_without_their_own_redis
);

// ---------------------------------------------------------------------------------------------
// 4. The official client.

/// How many requests one `async-openai` call makes when every answer is a 429: the first and
/// three retries, each after `Retry-After` seconds (see `tests/openai_sdk.rs`).
const SDK_ATTEMPTS: f64 = 4.0;

fn sdk(gw: &Gateway, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", gw.base))
            .with_api_key(key),
    )
}

async fn say_hi(client: &Client<OpenAIConfig>) -> Result<(), OpenAIError> {
    let request = CreateChatCompletionRequest {
        model: "default".to_owned(),
        messages: vec![ChatCompletionRequestUserMessage::from("Hi").into()],
        ..Default::default()
    };
    client.chat().create(request).await.map(drop)
}

fn api_error(result: Result<(), OpenAIError>) -> ApiErrorResponse {
    match result {
        Err(OpenAIError::ApiError(error)) => error,
        Err(other) => panic!("expected OpenAIError::ApiError, got {other:?}"),
        Ok(()) => panic!("expected OpenAIError::ApiError, got a success"),
    }
}

async fn the_sdk_raises_rate_limit_errors(limiter: Limiter) {
    // The SDK cannot be told not to retry (without its `middleware` feature): it tries four
    // times, sleeping `Retry-After` seconds in between. Both refusals are timed for 1 s: the
    // next request slot and midnight are half a second away when it calls.
    let clock = clock_at("2031-03-14T23:59:30Z");
    let gw = gateway(&limiter, &clock, &[]).await;
    let (limited, limited_key) = gw
        .tenant_named(
            "limited",
            mini_with(json!({"rateLimit": {"requestsPerMinute": 2}})),
        )
        .await;
    let (broke, broke_key) = gw
        .tenant_named(
            "broke",
            mini_with(json!({"budget": {"dailyUsd": 0.000_001}})),
        )
        .await;
    let (limited_client, broke_client) = (sdk(&gw, &limited_key), sdk(&gw, &broke_key));
    say_hi(&limited_client).await.unwrap();
    say_hi(&limited_client).await.unwrap();
    clock.advance(Duration::from_millis(29_500));

    let (from_limited, from_broke) = tokio::join!(say_hi(&limited_client), say_hi(&broke_client));
    for (who, result, code) in [
        ("limited", from_limited, "rate_limit_exceeded"),
        ("broke", from_broke, "budget_exceeded"),
    ] {
        let error = api_error(result);
        assert_eq!(error.status_code.as_u16(), 429, "{who}: {error}");
        assert_eq!(
            error.api_error.r#type.as_deref(),
            Some("rate_limit_error"),
            "{who}"
        );
        assert_eq!(error.api_error.code.as_deref(), Some(code), "{who}");
    }
    assert_eq!(upstream_calls(&gw), 2);
    for (tenant, reason) in [
        (&limited, "rate_limit_exceeded"),
        (&broke, "budget_exceeded"),
    ] {
        assert_eq!(
            metric(
                &gw,
                "meta_chat_rate_limited_total",
                &[
                    &format!("tenant=\"{tenant}\""),
                    &format!("reason=\"{reason}\"")
                ],
            )
            .await,
            Some(SDK_ATTEMPTS),
            "{reason}"
        );
    }
}

on_both_limiters!(
    the_sdk_raises_rate_limit_errors:
        the_official_client_gets_rate_limit_errors_in_process,
        the_official_client_gets_rate_limit_errors_redis
);

// ---------------------------------------------------------------------------------------------
// 5. Budgets.

async fn concurrent_requests_never_overspend(limiter: Limiter) {
    let clock = clock_at(NOON);
    let gw = gateway(&limiter, &clock, &[]).await;
    // $0.001 a day, of which $0.0007 is already spent: room for 4 worst cases (4 × 64 050
    // nano-dollars), not 5.
    const BUDGET: i64 = 1_000_000;
    const SPENT: i64 = 700_000;
    assert_eq!(WORST_CASE, 64_050);
    let (tenant, key) = gw
        .tenant(mini_with(json!({"budget": {"dailyUsd": usd(BUDGET)}})))
        .await;
    gw.state
        .store
        .insert_usage(&[UsageRecord {
            cost_nano_usd: SPENT,
            ..chat_record(&tenant, at("2031-03-14T08:00:00Z"))
        }])
        .await
        .unwrap();
    // One reply for each request that can be admitted (any other would get the default
    // echo, and be seen below).
    gw.fake
        .push_all(std::iter::repeat_with(worst_case_reply).take(4));

    let body = bounded_hello(json!({}));
    let answers = join_all((0..50).map(|_| gw.chat(&key, &body))).await;
    let admitted: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    assert_eq!(admitted.len(), 4, "admitted: {}", admitted.len());
    for answer in &admitted {
        assert_eq!(answer.header("x-meta-chat-cost-usd"), "0.000064050");
    }
    for answer in answers.iter().filter(|a| a.status != 200) {
        assert_refused(answer, "budget_exceeded", HALF_A_DAY);
        assert!(answer.text.contains("daily budget"), "{}", answer.text);
    }
    assert_eq!(upstream_calls(&gw), 4);

    // What was recorded never passes the budget, and the counter is exactly that.
    wait_for_records(gw.state.store.as_ref(), Some(&tenant), 5, PATIENCE).await;
    let spent = recorded_cost(&gw, &tenant).await;
    assert_eq!(spent, SPENT + 4 * WORST_CASE);
    assert!(spent <= BUDGET);
    wait_for_counter(&gw, &day_budget_key(&tenant, NOON_DAY), spent).await;

    // A smaller request still fits in what is left: 43 800 nano-dollars.
    gw.fake.push(Reply::text("ok").with_usage(27, 60));
    let answer = gw.chat(&key, &hello(json!({"max_tokens": 60}))).await;
    assert_admitted(&answer);
}

on_both_limiters!(
    concurrent_requests_never_overspend:
        concurrent_requests_never_overspend_the_daily_budget_in_process,
        concurrent_requests_never_overspend_the_daily_budget_redis
);

/// A stream request ([`bounded_hello`], asking for the usage) on a client of its own: the live
/// response, its body unread (drop it to leave mid-stream).
async fn open_stream(gw: &Gateway, key: &str) -> reqwest::Response {
    let response = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&bounded_hello(stream_with_usage()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response
}

async fn streams_settle_to_their_recorded_cost(limiter: Limiter) {
    let clock = clock_at(NOON);
    let gw = gateway(&limiter, &clock, &[]).await;
    // Room for one worst case at a time, not two.
    const BUDGET: i64 = 100_000;
    let (tenant, key) = gw
        .tenant(mini_with(json!({"budget": {"dailyUsd": usd(BUDGET)}})))
        .await;
    let budget_key = day_budget_key(&tenant, NOON_DAY);

    // The upstream cuts the stream: what was used is recorded as an error, and the
    // reservation settles to that.
    gw.fake.push(
        Reply::text(SLOW_TEXT)
            .with_usage(100, 100)
            .in_chunks(10)
            .drop_after(3),
    );
    let cut = gw.chat(&key, &bounded_hello(stream_with_usage())).await;
    assert_admitted(&cut);
    assert!(cut.text.contains("\"error\""), "{}", cut.text);
    wait_for_records(gw.state.store.as_ref(), Some(&tenant), 1, PATIENCE).await;
    let first = records(&gw, &tenant).await;
    assert_eq!(first[0].status, "error", "{:?}", first[0]);
    let spent = recorded_cost(&gw, &tenant).await;
    assert!(spent > 0 && spent + WORST_CASE <= BUDGET, "{spent}");
    wait_for_counter(&gw, &budget_key, spent).await;

    // The client leaves mid-stream. While the stream runs its worst case is held: a second
    // request does not fit beside it.
    gw.fake.push(
        Reply::text(SLOW_TEXT)
            .with_usage(100, 100)
            .in_chunks(20)
            .with_chunk_delay(Duration::from_millis(500)),
    );
    let response = open_stream(&gw, &key).await;
    let mut stream = response.bytes_stream();
    let chunk = tokio::time::timeout(PATIENCE, stream.next())
        .await
        .expect("no first chunk")
        .expect("the stream ended before its first chunk")
        .unwrap();
    assert!(common::contains(&chunk, "data: "), "{chunk:?}");
    assert_eq!(counter(&gw, &budget_key).await, Some(spent + WORST_CASE));
    let beside = gw.chat(&key, &bounded_hello(json!({}))).await;
    assert_refused(&beside, "budget_exceeded", HALF_A_DAY);
    drop(stream);

    // It settles to what it recorded (cancelled, with what was used up to then) ...
    wait_for_records(gw.state.store.as_ref(), Some(&tenant), 2, PATIENCE).await;
    let cancelled = records(&gw, &tenant)
        .await
        .into_iter()
        .find(|r| r.status == "cancelled")
        .expect("a cancelled record");
    assert!(cancelled.cost_nano_usd > 0, "{cancelled:?}");
    let spent = recorded_cost(&gw, &tenant).await;
    assert!(spent + WORST_CASE <= BUDGET, "{spent}");
    wait_for_counter(&gw, &budget_key, spent).await;

    // ... so a request that fits is admitted again. The upstream fails it: nothing was
    // used, and its reservation is given back whole.
    gw.fake.push(Reply::error(500, "the model fell over"));
    let failed = gw.chat(&key, &bounded_hello(json!({}))).await;
    assert_eq!(failed.status, 502, "{}", failed.text);
    wait_for_records(gw.state.store.as_ref(), Some(&tenant), 3, PATIENCE).await;
    assert_eq!(recorded_cost(&gw, &tenant).await, spent);
    wait_for_counter(&gw, &budget_key, spent).await;

    // And one that completes settles to its cost.
    gw.fake.push(worst_case_reply());
    assert_admitted(&gw.chat(&key, &bounded_hello(json!({}))).await);
    wait_for_records(gw.state.store.as_ref(), Some(&tenant), 4, PATIENCE).await;
    let spent = recorded_cost(&gw, &tenant).await;
    wait_for_counter(&gw, &budget_key, spent).await;
    assert!(spent <= BUDGET);
    assert_eq!(upstream_calls(&gw), 4);
}

on_both_limiters!(
    streams_settle_to_their_recorded_cost:
        cut_and_abandoned_streams_settle_to_their_recorded_cost_in_process,
        cut_and_abandoned_streams_settle_to_their_recorded_cost_redis
);

async fn daily_and_monthly_windows(limiter: Limiter) {
    // Room for two worst cases a day and three more this month (after $0.0001 spent on the
    // 2nd).
    const SPENT: i64 = 100_000;
    let daily = 2 * WORST_CASE + 10_000;
    let monthly = SPENT + 3 * WORST_CASE + 10_000;
    let clock = clock_at("2031-03-20T12:00:00Z");
    let gw = gateway(&limiter, &clock, &[]).await;
    let (tenant, key) = gw
        .tenant(mini_with(
            json!({"budget": {"dailyUsd": usd(daily), "monthlyUsd": usd(monthly)}}),
        ))
        .await;
    gw.state
        .store
        .insert_usage(&[
            UsageRecord {
                cost_nano_usd: SPENT,
                ..chat_record(&tenant, at("2031-03-02T10:00:00Z"))
            },
            // Last month's spend does not count.
            UsageRecord {
                cost_nano_usd: 10 * monthly,
                ..chat_record(&tenant, at("2031-02-28T23:59:59Z"))
            },
        ])
        .await
        .unwrap();
    let body = bounded_hello(json!({}));
    let chat = || {
        gw.fake.push(worst_case_reply());
        gw.chat(&key, &body)
    };

    // The 20th: two requests, then the day is full until midnight.
    assert_admitted(&chat().await);
    assert_admitted(&chat().await);
    let refused = chat().await;
    assert_refused(&refused, "budget_exceeded", HALF_A_DAY);
    assert!(refused.text.contains("daily budget"), "{}", refused.text);
    assert_eq!(
        counter(&gw, &month_budget_key(&tenant, "2031-03")).await,
        Some(SPENT + 2 * WORST_CASE)
    );

    // The 21st: a new day, but the month still counts: one more fits, then the month is
    // full until April (10.5 days away).
    clock.set(at("2031-03-21T12:00:00Z"));
    assert_admitted(&chat().await);
    let refused = chat().await;
    assert_refused(&refused, "budget_exceeded", 10 * 86_400 + HALF_A_DAY);
    assert!(refused.text.contains("monthly budget"), "{}", refused.text);
    assert_eq!(
        counter(&gw, &day_budget_key(&tenant, "2031-03-21")).await,
        Some(WORST_CASE)
    );

    // April: a new month and a new day.
    clock.set(at("2031-04-01T08:00:00Z"));
    assert_admitted(&chat().await);
    assert_eq!(
        counter(&gw, &month_budget_key(&tenant, "2031-04")).await,
        Some(WORST_CASE)
    );
    assert_eq!(upstream_calls(&gw), 4);
    // The requests that were refused left nothing reserved.
    assert_eq!(
        counter(&gw, &month_budget_key(&tenant, "2031-03")).await,
        Some(SPENT + 3 * WORST_CASE)
    );
}

on_both_limiters!(
    daily_and_monthly_windows:
        monthly_budgets_refuse_until_next_month_while_days_reset_in_process,
        monthly_budgets_refuse_until_next_month_while_days_reset_redis
);

// ---------------------------------------------------------------------------------------------
// 6. A Redis that cannot be reached.

/// Nothing listens on port 1.
const CLOSED_REDIS: &str = "redis://127.0.0.1:1";

/// Settings with every kind of limit, all tight.
fn tight_limits() -> Value {
    mini_with(json!({
        "rateLimit": {"requestsPerMinute": 1, "tokensPerDay": 1},
        "budget": {"dailyUsd": 0.000_001, "monthlyUsd": 0.000_001},
    }))
}

#[tokio::test]
async fn an_unreachable_redis_fails_open_by_default() {
    let gw = Gateway::start_with(&[("REDIS_URL", CLOSED_REDIS)]).await;
    let (_, key) = gw.tenant(tight_limits()).await;
    for _ in 0..3 {
        assert_admitted(&gw.chat(&key, &hello(json!({}))).await);
    }
    assert_eq!(upstream_calls(&gw), 3);
    let errors = metric(
        &gw,
        "meta_chat_redis_errors_total",
        &["operation=\"rate_limit\""],
    )
    .await;
    assert!(errors.is_some_and(|n| n >= 3.0), "{errors:?}");
    let errors = metric(
        &gw,
        "meta_chat_redis_errors_total",
        &["operation=\"budget\""],
    )
    .await;
    assert!(errors.is_some_and(|n| n >= 3.0), "{errors:?}");
}

#[tokio::test]
async fn an_unreachable_redis_fails_closed_when_configured() {
    let gw =
        Gateway::start_with(&[("REDIS_URL", CLOSED_REDIS), ("LIMITS_FAIL_OPEN", "false")]).await;
    let (_, limited) = gw.tenant_named("limited", tight_limits()).await;
    let (_, budget_only) = gw
        .tenant_named("budget", mini_with(json!({"budget": {"dailyUsd": 1}})))
        .await;
    let (_, free) = gw.tenant_named("free", mini_settings()).await;
    for key in [&limited, &budget_only] {
        let answer = gw.chat(key, &hello(json!({}))).await;
        assert_eq!(answer.status, 503, "{}", answer.text);
        let body = answer.json();
        assert_eq!(body["error"]["code"], "limits_unavailable", "{body}");
        assert_eq!(body["error"]["type"], "service_unavailable_error", "{body}");
        assert_eq!(answer.header("retry-after"), "1");
    }
    assert_eq!(upstream_calls(&gw), 0);
    // A tenant without limits never needs the limiter.
    assert_admitted(&gw.chat(&free, &hello(json!({}))).await);
    assert_eq!(upstream_calls(&gw), 1);
}
