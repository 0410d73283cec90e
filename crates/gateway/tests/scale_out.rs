//! Scale-out (ARCHITECTURE "Scale-out", README "Running several replicas" and "In-process or
//! Redis"): two gateway replicas in this process — separate ports, separate state — over one
//! database and one Redis key prefix. Limits and budgets are exact across them, a settings
//! change on one is used by the other within a second, a cached answer written by one is a hit
//! on the other, and usage from both adds up. And without a reachable Redis, requests still
//! go through, the failures counted in `meta_chat_redis_errors_total`.
//!
//! The replica tests need Redis (`TEST_REDIS_URL`) and use PostgreSQL (`TEST_DATABASE_URL`, a
//! private schema); without PostgreSQL they share a SQLite file, without Redis they are
//! skipped with a printed reason. `REQUIRE_SERVICES=1` makes either missing a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::usage::{mini_cost, wait_for_records};
use common::{Answer, PgSchema, hello};
use futures::future::join_all;
use meta_chat::api::AppState;
use meta_chat::api::openai_codec::parse_chat_request;
use meta_chat::cache::ResponseCache;
use meta_chat::settings::TenantSettings;
use meta_chat_testkit::{FakeServer, Reply};
use reqwest::Method;
use serde_json::{Value, json};

const ADMIN_KEY: &str = "admin-key-for-scale-out-tests-0123456789";
const ENCRYPTION_KEY: &str = "scale-out-tests-encryption-key-0123456789abcdef";

/// How long background work (cache fills, usage writes, budget settlements) may take before a
/// test fails. It takes milliseconds; this only bounds a broken implementation.
const PATIENCE: Duration = Duration::from_secs(10);

/// Settings sending chats to OpenAI's gpt-4o-mini.
fn mini() -> Value {
    json!({"llm": {"provider": "openai", "model": "gpt-4o-mini"}})
}

/// `mini()` with `section` added.
fn mini_with(section: &str, value: Value) -> Value {
    let mut settings = mini();
    settings[section] = value;
    settings
}

// ---------------------------------------------------------------------------------------------
// Two replicas.

/// One replica: its address and its state.
struct Replica {
    base: String,
    state: AppState,
}

/// Where the replicas keep their rows; removed when dropped.
enum Database {
    Postgres(#[allow(dead_code)] PgSchema),
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
}

/// Two replicas in front of one fake provider, over one database and one Redis prefix.
struct Cluster {
    a: Replica,
    b: Replica,
    fake: FakeServer,
    client: reqwest::Client,
    _database: Database,
}

impl Cluster {
    /// Two replicas; `None` (skipped, saying so) without `TEST_REDIS_URL`, unless
    /// `REQUIRE_SERVICES=1`.
    async fn start(test: &str) -> Option<Self> {
        let redis_url = common::test_redis_url()?;
        let prefix = common::redis_prefix(test);
        meta_chat_llm::install_crypto_provider();
        let (database_url, database) = match common::test_database_url() {
            Some(base) => {
                let schema = PgSchema::create(&base, "mc_scale_out").await;
                (schema.url(), Database::Postgres(schema))
            }
            None => {
                eprintln!("{test}: the replicas share a SQLite file instead");
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("shared.db").display());
                (url, Database::Sqlite(dir))
            }
        };
        let fake = FakeServer::start().await.unwrap();
        let mut vars = vec![
            ("DATABASE_URL", database_url),
            ("ADMIN_API_KEY", ADMIN_KEY.to_owned()),
            ("ENCRYPTION_KEY", ENCRYPTION_KEY.to_owned()),
            ("REDIS_URL", redis_url),
            ("REDIS_KEY_PREFIX", prefix),
        ];
        vars.extend(common::upstream_vars(&fake));
        vars.extend([
            ("OPENAI_API_KEY", "sk-system-openai-scale-out".to_owned()),
            (
                "ANTHROPIC_API_KEY",
                "sk-system-anthropic-scale-out".to_owned(),
            ),
            ("LLM_MAX_RETRIES", "0".to_owned()),
        ]);
        let replica = || async {
            let (base, state, _) = common::serve_state(common::config(vars.clone())).await;
            assert!(
                matches!(state.cache, ResponseCache::Redis(_)),
                "{:?}",
                state.cache
            );
            Replica { base, state }
        };
        let a = replica().await;
        let b = replica().await;
        assert_ne!(a.base, b.base);
        Some(Self {
            a,
            b,
            fake,
            client: reqwest::Client::new(),
            _database: database,
        })
    }

    /// Sends a request to `path` on `replica`.
    async fn send(
        &self,
        replica: &Replica,
        method: Method,
        path: &str,
        key: &str,
        body: Option<&Value>,
    ) -> Answer {
        common::request(
            &self.client,
            method,
            format!("{}{path}", replica.base),
            Some(key),
            body.map(Value::to_string),
        )
        .await
    }

    async fn chat(&self, replica: &Replica, key: &str, body: &Value) -> Answer {
        self.send(
            replica,
            Method::POST,
            "/v1/chat/completions",
            key,
            Some(body),
        )
        .await
    }

    /// Creates a tenant through replica A: (id, key).
    async fn tenant(&self, name: &str, settings: Value) -> (String, String) {
        self.send(
            &self.a,
            Method::POST,
            "/api/tenants",
            ADMIN_KEY,
            Some(&common::tenant_body(name, settings)),
        )
        .await
        .created_tenant()
    }

    /// The chat requests the fake providers received.
    fn upstream_chats(&self) -> usize {
        self.fake.requests_to("/v1/chat/completions").len()
            + self.fake.requests_to("/v1/messages").len()
    }
}

/// The Redis handle of a replica.
fn redis_of(replica: &Replica) -> &meta_chat::redis_conn::Redis {
    match &replica.state.cache {
        ResponseCache::Redis(redis) => redis,
        other => panic!("{other:?}"),
    }
}

/// Retries `check` until it holds; fails after [`PATIENCE`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The error code of a refused request.
fn code(answer: &Answer) -> String {
    answer.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Limits.

#[tokio::test]
async fn a_rate_limit_is_shared_by_the_replicas() {
    let Some(cluster) = Cluster::start("rate_limit_shared").await else {
        return;
    };
    let (_, key) = cluster
        .tenant(
            "limited",
            mini_with("rateLimit", json!({"requestsPerMinute": 10})),
        )
        .await;
    let body = hello(json!({}));

    // 24 requests at once, half on each replica: exactly 10 get through.
    let answers = join_all((0..24).map(|i| {
        let replica = if i % 2 == 0 { &cluster.a } else { &cluster.b };
        cluster.chat(replica, &key, &body)
    }))
    .await;
    let admitted = answers.iter().filter(|a| a.status == 200).count();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!(
        admitted,
        10,
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    assert_eq!(refused.len(), 14);
    for answer in refused {
        assert_eq!(code(answer), "rate_limit_exceeded", "{}", answer.text);
        assert!(answer.headers.contains_key("retry-after"));
        assert_eq!(answer.header("x-ratelimit-limit-requests"), "10");
        assert_eq!(answer.header("x-ratelimit-remaining-requests"), "0");
    }
    assert_eq!(cluster.upstream_chats(), 10);

    // And the next one is refused on either replica.
    for replica in [&cluster.a, &cluster.b] {
        let answer = cluster.chat(replica, &key, &body).await;
        assert_eq!(answer.status, 429, "{}", answer.text);
        assert_eq!(code(&answer), "rate_limit_exceeded");
    }
    assert_eq!(cluster.upstream_chats(), 10);
}

#[tokio::test]
async fn usage_adds_up_and_budgets_are_shared() {
    let Some(cluster) = Cluster::start("usage_and_budgets").await else {
        return;
    };

    // Usage from both replicas lands in the same tables.
    let (id, key) = cluster.tenant("busy", mini()).await;
    cluster
        .fake
        .push_all((0..7).map(|_| Reply::text("counted").with_usage(10, 5)));
    for i in 0..7 {
        let replica = if i < 3 { &cluster.a } else { &cluster.b };
        let answer = cluster.chat(replica, &key, &hello(json!({}))).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    for replica in [&cluster.a, &cluster.b] {
        wait_for_records(replica.state.store.as_ref(), Some(&id), 7, PATIENCE).await;
    }
    let records = cluster.a.state.store.recent_usage(&id, 100).await.unwrap();
    assert_eq!(records.len(), 7);
    assert_eq!(
        records.iter().map(|r| r.cost_nano_usd).sum::<i64>(),
        7 * mini_cost(10, 5)
    );
    let mut request_ids: Vec<&str> = records.iter().map(|r| r.request_id.as_str()).collect();
    request_ids.sort_unstable();
    request_ids.dedup();
    assert_eq!(request_ids.len(), 7);

    // A daily budget of 20 000 nano-dollars. The request's worst case (27 prompt tokens at
    // most, 10 of output) fits; what it actually costs (100 + 100 tokens, 75 000) spends the
    // budget.
    let (id, key) = cluster
        .tenant("frugal", mini_with("budget", json!({"dailyUsd": 0.00002})))
        .await;
    let body = hello(json!({"max_tokens": 10}));
    cluster
        .fake
        .push(Reply::text("expensive").with_usage(100, 100));
    let spent = cluster.chat(&cluster.a, &key, &body).await;
    assert_eq!(spent.status, 200, "{}", spent.text);
    assert_eq!(spent.header("x-meta-chat-cost-usd"), "0.000075000");

    // Once A has settled the request in Redis, B refuses the tenant's next request.
    let counter = redis_of(&cluster.a).key(&format!(
        "budget:{id}:d:{}",
        chrono::Utc::now().date_naive()
    ));
    eventually("A's spend settled in Redis", || async {
        let counter = counter.clone();
        let value: Option<i64> = redis_of(&cluster.a)
            .run("test", |mut c| async move {
                redis::cmd("GET").arg(counter).query_async(&mut c).await
            })
            .await
            .unwrap();
        value == Some(mini_cost(100, 100))
    })
    .await;
    let before = cluster.upstream_chats();
    for replica in [&cluster.b, &cluster.a] {
        let refused = cluster.chat(replica, &key, &body).await;
        assert_eq!(refused.status, 429, "{}", refused.text);
        assert_eq!(code(&refused), "budget_exceeded", "{}", refused.text);
        assert!(refused.headers.contains_key("retry-after"));
    }
    assert_eq!(cluster.upstream_chats(), before);
    wait_for_records(cluster.b.state.store.as_ref(), Some(&id), 1, PATIENCE).await;
}

// ---------------------------------------------------------------------------------------------
// Settings.

#[tokio::test]
async fn a_settings_change_on_one_replica_is_used_by_the_other_within_a_second() {
    let Some(cluster) = Cluster::start("settings_change").await else {
        return;
    };
    let (id, key) = cluster.tenant("switching", mini()).await;
    let body = hello(json!({}));
    // B has served the tenant, so it holds the tenant in its cache.
    let answer = cluster.chat(&cluster.b, &key, &body).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "openai");

    let change =
        json!({"settings": {"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307"}}});
    let answer = cluster
        .send(
            &cluster.a,
            Method::PUT,
            &format!("/api/tenants/{id}"),
            ADMIN_KEY,
            Some(&change),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let changed = Instant::now();

    // A uses it at once.
    let answer = cluster.chat(&cluster.a, &key, &body).await;
    assert_eq!(answer.header("x-meta-chat-provider"), "anthropic");

    // B within a second (it polls for changes every 500 ms).
    let mut seen_after = None;
    while changed.elapsed() < PATIENCE {
        let answer = cluster.chat(&cluster.b, &key, &body).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        if answer.header("x-meta-chat-provider") == "anthropic" {
            assert_eq!(
                answer.header("x-meta-chat-model"),
                "claude-3-haiku-20240307"
            );
            seen_after = Some(changed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen_after = seen_after.expect("replica B never used the new settings");
    eprintln!("replica B used the new settings {seen_after:?} after the PUT");
    assert!(
        seen_after < Duration::from_secs(1),
        "replica B used the new settings only after {seen_after:?}"
    );
    assert!(!cluster.fake.requests_to("/v1/messages").is_empty());
}

// ---------------------------------------------------------------------------------------------
// The cache.

#[tokio::test]
async fn an_answer_cached_by_one_replica_is_a_hit_on_the_other() {
    let Some(cluster) = Cluster::start("shared_cache").await else {
        return;
    };
    let settings = mini_with("cache", json!({"enabled": true, "ttlSeconds": 300}));
    let (id, key) = cluster.tenant("cached", settings.clone()).await;
    let key_of = |body: &Value| {
        let parsed = parse_chat_request(body.to_string().as_bytes()).unwrap();
        let (primary, _) = meta_chat::routing::provider_config(
            &cluster.a.state.config.llm,
            &TenantSettings::parse(&settings).unwrap(),
            parsed.model.as_deref(),
        )
        .unwrap();
        ResponseCache::key(&id, &primary, &parsed.request)
    };
    // Waits until the entry for `body` can be read (through replica B's connection).
    let wait_cached = |body: Value| {
        let key = key_of(&body);
        let cache = cluster.b.state.cache.clone();
        async move {
            eventually("the cache entry", || async {
                cache.get(&key).await.is_some()
            })
            .await;
        }
    };

    // Written by A, a hit on B.
    let body = hello(json!({}));
    cluster
        .fake
        .push(Reply::text("cached once, served by both").with_usage(8, 6));
    let first = cluster.chat(&cluster.a, &key, &body).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.header("x-meta-chat-cache"), "miss");
    wait_cached(body.clone()).await;
    let hit = cluster.chat(&cluster.b, &key, &body).await;
    assert_eq!(hit.status, 200, "{}", hit.text);
    assert_eq!(hit.header("x-meta-chat-cache"), "hit");
    assert_eq!(hit.header("x-meta-chat-cost-usd"), "0.000000000");
    assert_eq!(
        hit.json()["choices"][0]["message"]["content"],
        "cached once, served by both"
    );
    assert_eq!(cluster.upstream_chats(), 1);

    // A stream completed on B, replayed as a stream by A.
    let mut stream = json!({"messages": [{"role": "user", "content": "streamed on B"}]});
    stream["stream"] = json!(true);
    cluster.fake.push(Reply::text("streamed once").in_chunks(3));
    let first = cluster.chat(&cluster.b, &key, &stream).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.header("x-meta-chat-cache"), "miss");
    wait_cached(stream.clone()).await;
    let replay = cluster.chat(&cluster.a, &key, &stream).await;
    assert_eq!(replay.header("x-meta-chat-cache"), "hit");
    let events = common::usage::stream_events(&replay);
    assert_eq!(common::usage::streamed_text(&events), "streamed once");
    assert_eq!(cluster.upstream_chats(), 2);

    // Both hits are recorded, in the one database.
    wait_for_records(cluster.a.state.store.as_ref(), Some(&id), 4, PATIENCE).await;
    let records = cluster.a.state.store.recent_usage(&id, 10).await.unwrap();
    assert_eq!(records.iter().filter(|r| r.cache_hit).count(), 2);
    assert!(
        records
            .iter()
            .filter(|r| r.cache_hit)
            .all(|r| r.cost_nano_usd == 0)
    );
}

// ---------------------------------------------------------------------------------------------
// Redis unreachable.

/// The value of `meta_chat_redis_errors_total{operation="…"}` on `gw`'s `/metrics`, 0 when
/// absent.
async fn redis_errors(gw: &common::Gateway, operation: &str) -> f64 {
    let answer = gw.send(Method::GET, "/metrics", None, None).await;
    assert_eq!(answer.status, 200);
    let series = format!("meta_chat_redis_errors_total{{operation=\"{operation}\"}} ");
    answer
        .text
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

#[tokio::test]
async fn without_redis_requests_go_on_and_the_failures_are_counted() {
    // Nothing listens on port 1: every Redis operation fails at once.
    let redis = [
        ("REDIS_URL", "redis://127.0.0.1:1"),
        ("REDIS_TIMEOUT_MS", "200"),
    ];
    let gw = common::Gateway::start_with(&redis).await;
    let mut settings = mini_with("cache", json!({"enabled": true, "ttlSeconds": 300}));
    settings["rateLimit"] = json!({"requestsPerMinute": 100, "tokensPerDay": 100_000});
    settings["budget"] = json!({"dailyUsd": 10, "monthlyUsd": 100});
    let (_, key) = gw.tenant(settings.clone()).await;

    // The same request three times: each is answered by the provider (the cache misses),
    // limits and budgets admit it.
    let body = hello(json!({}));
    for _ in 0..3 {
        let answer = gw.chat(&key, &body).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.header("x-meta-chat-cache"), "miss");
    }
    assert_eq!(gw.fake.requests_to("/v1/chat/completions").len(), 3);

    // One failed cache read and one failed rate-limit step per request; the budget
    // reservations failed too.
    assert_eq!(redis_errors(&gw, "cache_get").await, 3.0);
    assert_eq!(redis_errors(&gw, "rate_limit").await, 3.0);
    assert!(redis_errors(&gw, "budget").await >= 3.0);

    // With LIMITS_FAIL_OPEN=false the limiter refuses instead: 503, nothing sent upstream.
    let gw =
        common::Gateway::start_with(&[redis[0], redis[1], ("LIMITS_FAIL_OPEN", "false")]).await;
    let (_, key) = gw.tenant(settings).await;
    let answer = gw.chat(&key, &body).await;
    assert_eq!(answer.status, 503, "{}", answer.text);
    assert_eq!(code(&answer), "limits_unavailable");
    assert!(gw.fake.requests_to("/v1/chat/completions").is_empty());
    assert_eq!(redis_errors(&gw, "rate_limit").await, 1.0);
}
