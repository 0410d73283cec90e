//! What the usage tests (`usage`, `usage_api`, `cost_alerts`, `usage_cli`) share: the
//! database behind a test (a fresh SQLite file or a private PostgreSQL schema) and the macro
//! that runs a test body on both, prices worked out by hand, the known calls they make through
//! the gateway, and usage records with chosen fields.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, Utc};
use futures::StreamExt;
use meta_chat::store::{Store, UsageRecord, connect_store};
use meta_chat_testkit::{FakeToolCall, Reply};
use serde_json::{Map, Value, json};

use super::{Answer, Gateway, PgSchema, events, hello};

/// PostgreSQL needs one; SQLite keeps its generated key file beside the database.
const ENCRYPTION_KEY: &str = "usage-tests-encryption-key-0123456789abcdef";

// ---------------------------------------------------------------------------------------------
// Prices (`crates/llm/pricing.json`), in nano-dollars.

/// gpt-4o-mini: $0.15 / $0.60 per million input / output tokens, 150 and 600 nano-dollars a
/// token.
pub const fn mini_cost(input: i64, output: i64) -> i64 {
    input * 150 + output * 600
}

/// claude-3-haiku-20240307: $0.25 / $1.25 per million tokens.
pub const fn haiku_cost(input: i64, output: i64) -> i64 {
    input * 250 + output * 1_250
}

/// text-embedding-3-small: $0.02 per million tokens, 20 nano-dollars a token.
pub const fn embedding_small_cost(tokens: i64) -> i64 {
    tokens * 20
}

/// Nano-dollars as the gateway writes them (`x-meta-chat-cost-usd`, `usage.cost_usd`, reports):
/// a decimal USD string with nine fractional digits.
pub fn usd(nanos: i64) -> String {
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
}

/// Sums over usage records, computed here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sum {
    pub requests: i64,
    pub errors: i64,
    pub cache_hits: i64,
    pub input: i64,
    pub output: i64,
    pub embedding: i64,
    pub cost: i64,
}

impl Sum {
    pub fn add(&mut self, r: &UsageRecord) {
        self.requests += 1;
        self.errors += i64::from(r.status == "error");
        self.cache_hits += i64::from(r.cache_hit);
        self.input += r.input_tokens;
        self.output += r.output_tokens;
        self.embedding += r.embedding_tokens;
        self.cost += r.cost_nano_usd;
    }

    pub fn of<'a>(records: impl IntoIterator<Item = &'a UsageRecord>) -> Self {
        let mut sum = Self::default();
        for r in records {
            sum.add(r);
        }
        sum
    }

    /// The sums as the usage API writes them.
    pub fn json(&self) -> Map<String, Value> {
        let Value::Object(map) = json!({
            "requests": self.requests,
            "errors": self.errors,
            "cacheHits": self.cache_hits,
            "inputTokens": self.input,
            "outputTokens": self.output,
            "embeddingTokens": self.embedding,
            "totalTokens": self.input + self.output + self.embedding,
            "costUsd": usd(self.cost),
            "costNanoUsd": self.cost,
        }) else {
            unreachable!()
        };
        map
    }
}

// ---------------------------------------------------------------------------------------------
// Times.

/// An RFC 3339 instant.
pub fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .with_timezone(&Utc)
}

/// A `YYYY-MM-DD` date.
pub fn day(text: &str) -> NaiveDate {
    NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// The first day of the report bucket holding `day`: weeks start on Monday, months on the 1st.
pub fn bucket_of(granularity: &str, day: NaiveDate) -> NaiveDate {
    match granularity {
        "day" => day,
        "week" => day - Days::new(u64::from(day.weekday().num_days_from_monday())),
        "month" => NaiveDate::from_ymd_opt(day.year(), day.month(), 1).unwrap(),
        other => panic!("granularity {other}"),
    }
}

/// The first day of the bucket after the one starting on `start`.
pub fn next_bucket(granularity: &str, start: NaiveDate) -> NaiveDate {
    match granularity {
        "day" => start + Days::new(1),
        "week" => start + Days::new(7),
        "month" => start + Months::new(1),
        other => panic!("granularity {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The database behind a test.

/// A fresh SQLite file or a private PostgreSQL schema.
pub struct Db {
    url: String,
    _dir: Option<tempfile::TempDir>,
    schema: Option<PgSchema>,
}

/// Runs `$body` with `$pool` a new connection pool on `$db`, closed afterwards.
macro_rules! with_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        if $db.schema.is_some() {
            let $pool = sqlx::PgPool::connect(&$db.url).await.unwrap();
            let out = $body;
            $pool.close().await;
            out
        } else {
            let $pool = sqlx::SqlitePool::connect(&$db.url).await.unwrap();
            let out = $body;
            $pool.close().await;
            out
        }
    };
}

impl Db {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            url: format!("sqlite://{}", dir.path().join("usage.db").display()),
            _dir: Some(dir),
            schema: None,
        }
    }

    /// `None` (skipped, unless `REQUIRE_SERVICES=1`) without `TEST_DATABASE_URL`. The schema is
    /// named after the test binary.
    pub async fn postgres() -> Option<Self> {
        let base = super::test_database_url()?;
        let schema = PgSchema::create(&base, concat!("mc_", env!("CARGO_CRATE_NAME"))).await;
        Some(Self {
            url: schema.url(),
            _dir: None,
            schema: Some(schema),
        })
    }

    pub fn backend(&self) -> &'static str {
        if self.schema.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    }

    /// A gateway over this database (see [`Gateway::start_with`]), `extra` last.
    pub async fn gateway(&self, extra: &[(&str, &str)]) -> Gateway {
        let mut vars = vec![("DATABASE_URL", self.url.as_str())];
        if self.schema.is_some() {
            vars.push(("ENCRYPTION_KEY", ENCRYPTION_KEY));
        }
        vars.extend_from_slice(extra);
        let gateway = Gateway::start_with(&vars).await;
        assert_eq!(gateway.state.store.backend(), self.backend());
        gateway
    }

    /// A store of its own (a new connection pool, as a replica has) over this database,
    /// migrated.
    pub async fn store(&self) -> Arc<dyn Store> {
        let store = connect_store(&self.url).await.unwrap();
        store.migrate().await.unwrap();
        assert_eq!(store.backend(), self.backend());
        store
    }

    /// Runs one SQL statement on the database directly.
    pub async fn execute(&self, sql: String) {
        with_pool!(self, |pool| {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap();
        });
    }

    /// The rows `sql` selects, read from the database directly.
    pub async fn rows<T>(&self, sql: &'static str) -> Vec<T>
    where
        T: Send
            + Unpin
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        with_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_all(&pool)
            .await
            .unwrap())
    }
}

/// Two tests of `$body` (an `async fn(Db)`): `$sqlite` on [`Db::sqlite`], `$postgres` on
/// [`Db::postgres`] (passing when it is skipped), both with the attributes `$attr` (the
/// `#[tokio::test]`).
///
/// Test binaries without such tests leave it unused, which `dead_code` does not cover for a
/// macro and its re-export: hence the two `allow`s.
#[allow(unused_macros)]
macro_rules! on_sqlite_and_postgres {
    ($(#[$attr:meta])* $body:ident: $sqlite:ident, $postgres:ident) => {
        $(#[$attr])*
        async fn $sqlite() {
            $body($crate::common::usage::Db::sqlite()).await;
        }

        $(#[$attr])*
        async fn $postgres() {
            if let Some(db) = $crate::common::usage::Db::postgres().await {
                $body(db).await;
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_sqlite_and_postgres;

// ---------------------------------------------------------------------------------------------
// Calls through the gateway.

/// A POST with `key` as a bearer token, JSON `body` and extra `headers`, read whole.
pub async fn post(
    gw: &Gateway,
    path: &str,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = gw
        .client
        .post(gw.url(path))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    Answer::read(request.send().await.unwrap()).await
}

/// Tenant settings sending every chat to OpenAI's gpt-4o-mini.
pub fn mini_settings() -> Value {
    json!({"llm": {"provider": "openai", "model": "gpt-4o-mini"}})
}

/// The header naming the conversation of a request.
pub fn conversation(id: &str) -> [(&'static str, &str); 1] {
    [("X-Conversation-Id", id)]
}

/// The fields of a stream request that asks for the usage at its end.
pub fn stream_with_usage() -> Value {
    json!({"stream": true, "stream_options": {"include_usage": true}})
}

/// The SSE events of a stream answer, parsed (without `[DONE]`, which must end it).
pub fn stream_events(answer: &Answer) -> Vec<Value> {
    let events = events(&answer.text);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        answer.text
    );
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// The text the chunks of a stream carried.
pub fn streamed_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// A reply calling the tool of [`weather_request`], with 20 input and 8 output tokens.
pub fn weather_reply() -> Reply {
    Reply::tool_calls(vec![FakeToolCall::new(
        "call_weather_1",
        "get_weather",
        json!({"city": "Paris"}),
    )])
    .with_usage(20, 8)
}

/// A chat request ("hello there") offering a `get_weather` tool.
pub fn weather_request() -> Value {
    let mut body = hello(json!({}));
    body["tools"] = json!([{"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }}]);
    body
}

/// Two embedding inputs, which the fake counts as 3 + 3 tokens (~4 characters a token).
pub fn embeddings_request() -> Value {
    json!({"input": ["hello world", "abcdefghij"], "model": "text-embedding-3-small"})
}

/// The text of the slow stream of [`leave_after_first_chunk`].
pub const SLOW_TEXT: &str =
    "one two three four five six seven eight nine ten eleven twelve thirteen";

/// A stream request (asking for the usage, with extra `headers`) whose client leaves after the
/// first chunk of a slow stream ([`SLOW_TEXT`] in 24 frames, 200 ms apart); returns its
/// request id.
pub async fn leave_after_first_chunk(gw: &Gateway, key: &str, headers: &[(&str, &str)]) -> String {
    gw.fake.push(
        Reply::text(SLOW_TEXT)
            .with_usage(100, 100)
            .in_chunks(20)
            .with_chunk_delay(Duration::from_millis(200)),
    );
    let leaving_client = reqwest::Client::new();
    let mut request = leaving_client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .json(&hello(stream_with_usage()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut body = response.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .expect("no first chunk within 10 s")
        .expect("the stream ended before its first chunk")
        .unwrap();
    assert!(super::contains(&first, "data: "), "{first:?}");
    request_id
}

/// Waits (up to `within`) until `store` holds exactly `expected` usage records for `tenant`
/// (or everyone); fails at once if it ever holds more.
pub async fn wait_for_records(
    store: &dyn Store,
    tenant: Option<&str>,
    expected: u64,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let n = store.count_usage(tenant).await.unwrap();
        assert!(n <= expected, "{n} usage records, expected {expected}");
        if n == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {expected} usage records after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Records with chosen fields.

/// A successful gpt-4o-mini chat record of `tenant` at `created_at` that used nothing, with a
/// new request id and a latency of 10 ms: what a test does not set of the records it makes.
pub fn chat_record(tenant: &str, created_at: DateTime<Utc>) -> UsageRecord {
    UsageRecord {
        tenant_id: tenant.to_owned(),
        conversation_id: None,
        request_id: uuid::Uuid::new_v4().to_string(),
        endpoint: "chat".to_owned(),
        provider: "openai".to_owned(),
        model: "gpt-4o-mini".to_owned(),
        input_tokens: 0,
        output_tokens: 0,
        embedding_tokens: 0,
        cost_nano_usd: 0,
        latency_ms: 10,
        ttft_ms: None,
        status: "ok".to_owned(),
        error_kind: None,
        cache_hit: false,
        fallback_from: None,
        tokens_estimated: false,
        created_at,
    }
}

/// The `error_kind` of a record with `status`: an upstream error for an error, else none.
pub fn error_kind_of(status: &str) -> Option<String> {
    (status == "error").then(|| "upstream_error".to_owned())
}
