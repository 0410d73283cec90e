//! The usage analytics API (SPEC §4.4): `GET /api/tenants/{id}/usage` and `GET /api/usage`,
//! over real sockets, on SQLite and (when `TEST_DATABASE_URL` is set) PostgreSQL.
//!
//! - Known calls to the fake providers (plain, streamed, estimated, tool call, embeddings,
//!   another provider, an upstream failure, a stream broken by the upstream, a client that
//!   leaves mid-stream) are reported with exactly the tokens the fakes returned and the costs
//!   priced by hand, by model, provider and conversation.
//! - Records inserted with chosen times are bucketed by UTC day, ISO week and month across
//!   month, week and year boundaries, empty buckets included; periods with partial days count
//!   exactly the records inside, whole days (rollups) and edges (records) alike, checked
//!   against a brute-force sum of the inserted records.
//! - Bad parameters are 400s naming the parameter; tenants see only their own usage; the
//!   admin sees every tenant, most expensive first, page by page.
//! - SQLite and PostgreSQL give the same report for the same records.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Days, NaiveDate, SecondsFormat, TimeDelta, Utc};
use common::usage::{
    Db, SLOW_TEXT, Sum, at, bucket_of, chat_record, conversation, day, embedding_small_cost,
    embeddings_request, error_kind_of, haiku_cost, leave_after_first_chunk, mini_cost,
    mini_settings, next_bucket, on_sqlite_and_postgres, post, stream_events, stream_with_usage,
    streamed_text, usd, wait_for_records, weather_reply, weather_request,
};
use common::{ADMIN_KEY, Answer, Gateway, hello};
use meta_chat::analytics::{self, ReportParams};
use meta_chat::store::{Store, UsageRecord};
use meta_chat_testkit::Reply;
use serde_json::{Map, Value, json};

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).unwrap().and_utc()
}

// ---------------------------------------------------------------------------------------------
// Day rollups.

/// The day rollups as stored, sorted by (tenant, day, provider, model).
async fn rollups(db: &Db) -> Vec<RollupRow> {
    let mut rows: Vec<RollupRow> = db
        .rows(
            "SELECT tenant_id, CAST(day AS TEXT) AS day, provider, model, requests, errors, \
             cache_hits, input_tokens, output_tokens, embedding_tokens, cost_nano_usd \
             FROM usage_daily",
        )
        .await;
    rows.sort();
    rows
}

/// (tenant, day, provider, model, requests, errors, cache hits, input, output, embedding, cost)
type RollupRow = (
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
);

/// The rollups the records should have produced, computed here.
fn expected_rollups(records: &[UsageRecord]) -> Vec<RollupRow> {
    let mut sums: BTreeMap<(String, String, String, String), Sum> = BTreeMap::new();
    for r in records {
        let key = (
            r.tenant_id.clone(),
            r.created_at.date_naive().format("%Y-%m-%d").to_string(),
            r.provider.clone(),
            r.model.clone(),
        );
        sums.entry(key).or_default().add(r);
    }
    sums.into_iter()
        .map(|((tenant, day, provider, model), s)| {
            (
                tenant,
                day,
                provider,
                model,
                s.requests,
                s.errors,
                s.cache_hits,
                s.input,
                s.output,
                s.embedding,
                s.cost,
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// Percent-encodes a query-string component.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                char::from(byte).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

/// `GET path?params` with `key` as a bearer token.
async fn get(gw: &Gateway, path: &str, key: Option<&str>, params: &[(&str, &str)]) -> Answer {
    let query: Vec<String> = params
        .iter()
        .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
        .collect();
    let url = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", query.join("&"))
    };
    gw.send(reqwest::Method::GET, &url, key, None).await
}

/// A report that must be a 200.
async fn report(gw: &Gateway, path: &str, key: &str, params: &[(&str, &str)]) -> Value {
    let answer = get(gw, path, Some(key), params).await;
    assert_eq!(answer.status, 200, "{path} {params:?}: {}", answer.text);
    answer.json()
}

fn tenant_path(tenant: &str) -> String {
    format!("/api/tenants/{tenant}/usage")
}

// ---------------------------------------------------------------------------------------------
// The report, computed by brute force from the records.

/// One report query, as the test understands it.
#[derive(Debug, Clone)]
struct Query {
    tenant: Option<String>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    granularity: &'static str,
    group_by: &'static str,
    limit: usize,
    offset: usize,
}

impl Query {
    /// `from` and `to` as the API reads them: a date is its midnight, and as `to` the next
    /// midnight; anything else is RFC 3339.
    fn new(tenant: Option<&str>, from: &str, to: &str) -> Self {
        let instant = |text: &str, end: bool| {
            if text.len() == 10 {
                let d = day(text);
                midnight(if end { d + Days::new(1) } else { d })
            } else {
                at(text)
            }
        };
        Self {
            tenant: tenant.map(str::to_owned),
            from: instant(from, false),
            to: instant(to, true),
            granularity: "day",
            group_by: "model",
            limit: 100,
            offset: 0,
        }
    }

    fn by(mut self, granularity: &'static str, group_by: &'static str) -> Self {
        self.granularity = granularity;
        self.group_by = group_by;
        self
    }

    fn page(mut self, limit: usize, offset: usize) -> Self {
        self.limit = limit;
        self.offset = offset;
        self
    }

    /// The query string parameters, `from`/`to` as RFC 3339 instants.
    fn params(&self) -> Vec<(String, String)> {
        vec![
            ("from".into(), rfc3339(self.from)),
            ("to".into(), rfc3339(self.to)),
            ("granularity".into(), self.granularity.into()),
            ("groupBy".into(), self.group_by.into()),
            ("limit".into(), self.limit.to_string()),
            ("offset".into(), self.offset.to_string()),
        ]
    }

    fn path(&self) -> String {
        self.tenant
            .as_deref()
            .map_or_else(|| "/api/usage".to_owned(), tenant_path)
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// The report `query` should give for `records`, computed by brute force.
fn expected_report(records: &[UsageRecord], query: &Query) -> Value {
    let inside: Vec<&UsageRecord> = records
        .iter()
        .filter(|r| query.tenant.as_deref().is_none_or(|t| r.tenant_id == t))
        .filter(|r| query.from <= r.created_at && r.created_at < query.to)
        .collect();

    let last_day = (query.to - TimeDelta::microseconds(1)).date_naive();
    let mut series = Vec::new();
    let mut start = bucket_of(query.granularity, query.from.date_naive());
    while start <= last_day {
        let sum = Sum::of(
            inside
                .iter()
                .copied()
                .filter(|r| bucket_of(query.granularity, r.created_at.date_naive()) == start),
        );
        let mut point = Map::new();
        point.insert("start".into(), json!(start.format("%Y-%m-%d").to_string()));
        point.extend(sum.json());
        series.push(Value::Object(point));
        start = next_bucket(query.granularity, start);
    }

    // Groups by their sort key (the SQL's tie-break order), with their records.
    let mut groups: BTreeMap<(String, String), Vec<&UsageRecord>> = BTreeMap::new();
    for r in &inside {
        let key = match query.group_by {
            "model" => (r.provider.clone(), r.model.clone()),
            "provider" => (r.provider.clone(), String::new()),
            "tenant" => (r.tenant_id.clone(), String::new()),
            "conversation" => (
                r.tenant_id.clone(),
                r.conversation_id.clone().unwrap_or_default(),
            ),
            other => panic!("groupBy {other}"),
        };
        groups.entry(key).or_default().push(r);
    }
    let mut rows: Vec<(Sum, (String, String), Value)> = groups
        .into_iter()
        .map(|(key, members)| {
            let sum = Sum::of(members.iter().copied());
            let mut row = Map::new();
            match query.group_by {
                "model" => {
                    row.insert("provider".into(), json!(key.0));
                    row.insert("model".into(), json!(key.1));
                }
                "provider" => {
                    row.insert("provider".into(), json!(key.0));
                }
                "tenant" => {
                    row.insert("tenantId".into(), json!(key.0));
                }
                _ => {
                    if query.tenant.is_none() {
                        row.insert("tenantId".into(), json!(key.0));
                    }
                    row.insert("conversationId".into(), json!(members[0].conversation_id));
                    let first = members.iter().map(|r| r.created_at).min().unwrap();
                    let last = members.iter().map(|r| r.created_at).max().unwrap();
                    row.insert("firstAt".into(), json!(rfc3339(first)));
                    row.insert("lastAt".into(), json!(rfc3339(last)));
                }
            }
            row.extend(sum.json());
            (sum, key, Value::Object(row))
        })
        .collect();
    rows.sort_by(|a, b| {
        (b.0.cost, b.0.requests)
            .cmp(&(a.0.cost, a.0.requests))
            .then_with(|| a.1.cmp(&b.1))
    });
    let total = rows.len();
    let breakdown: Vec<Value> = rows
        .into_iter()
        .skip(query.offset)
        .take(query.limit)
        .map(|(_, _, row)| row)
        .collect();

    json!({
        "tenantId": query.tenant,
        "from": rfc3339(query.from),
        "to": rfc3339(query.to),
        "granularity": query.granularity,
        "groupBy": query.group_by,
        "totals": Sum::of(inside.iter().copied()).json(),
        "breakdown": breakdown,
        "breakdownTotal": total,
        "series": series,
    })
}

/// Asks the gateway (as the admin) for `query` and compares the answer with the brute force.
async fn check(gw: &Gateway, records: &[UsageRecord], query: &Query) -> Value {
    let params = query.params();
    let params: Vec<(&str, &str)> = params
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let got = report(gw, &query.path(), ADMIN_KEY, &params).await;
    let expected = expected_report(records, query);
    assert_json_eq(&got, &expected, &format!("{query:?}"));
    got
}

/// Asks the gateway (as `key`) for the days `from` to `to` grouped by `group_by`, naming no other
/// parameter, and compares the answer with the brute force.
async fn check_days(
    gw: &Gateway,
    key: &str,
    records: &[UsageRecord],
    tenant: Option<&str>,
    (from, to): (&str, &str),
    group_by: &'static str,
) -> Value {
    let query = Query::new(tenant, from, to).by("day", group_by);
    let params = [("from", from), ("to", to), ("groupBy", group_by)];
    let got = report(gw, &query.path(), key, &params).await;
    let expected = expected_report(records, &query);
    assert_json_eq(&got, &expected, &format!("by {group_by}"));
    got
}

/// Equal JSON, or a failure showing both and where they first differ.
fn assert_json_eq(got: &Value, expected: &Value, context: &str) {
    if got != expected {
        panic!(
            "{context}\nfirst difference: {}\ngot:      {got:#}\nexpected: {expected:#}",
            first_difference(got, expected, String::new())
        );
    }
}

fn first_difference(a: &Value, b: &Value, path: String) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for key in keys {
                match (x.get(key), y.get(key)) {
                    (Some(p), Some(q)) if p == q => {}
                    (Some(p), Some(q)) => return first_difference(p, q, format!("{path}.{key}")),
                    (p, q) => return format!("{path}.{key}: {p:?} vs {q:?}"),
                }
            }
            String::new()
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find(|(_, (p, q))| p != q)
            .map(|(i, (p, q))| first_difference(p, q, format!("{path}[{i}]")))
            .unwrap_or_default(),
        _ => format!("{path}: {a} vs {b}"),
    }
}

/// One field of every series point.
fn series_field(report: &Value, field: &str) -> Vec<(String, i64)> {
    report["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["start"].as_str().unwrap().to_owned(),
                p[field].as_i64().unwrap(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Records with chosen times.

/// A successful chat record.
fn record(tenant: &str, created_at: &str, input: i64, cost: i64) -> UsageRecord {
    UsageRecord {
        input_tokens: input,
        cost_nano_usd: cost,
        ..chat_record(tenant, at(created_at))
    }
}

/// Records on both sides of midnights that end a year, a month and a week, each with its own
/// power of two as input tokens, so a sum tells which records it holds.
fn boundary_records(tenant: &str) -> Vec<UsageRecord> {
    [
        "2025-12-31T23:59:59.999999Z", // 1: Wednesday, last instant of 2025
        "2026-01-01T00:00:00Z",        // 2: Thursday, first instant of 2026
        "2026-02-28T23:59:59.999999Z", // 4: Saturday, last instant of February
        "2026-03-01T00:00:00Z",        // 8: Sunday, first instant of March
        "2026-03-01T23:59:59.999999Z", // 16: Sunday, last instant of the week
        "2026-03-02T00:00:00Z",        // 32: Monday, first instant of the next week
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| record(tenant, t, 1 << i, 1_000 << i))
    .collect()
}

const DAY_MICROS: i64 = 86_400_000_000;

/// `n` varied records of `tenants` between 2025-12-20 and 2026-03-11 (many on or next to a
/// midnight), from a seeded generator.
fn random_records(seed: u64, tenants: &[&str], n: usize) -> Vec<UsageRecord> {
    const MODELS: [(&str, &str); 5] = [
        ("openai", "gpt-4o-mini"),
        ("openai", "gpt-4o"),
        ("anthropic", "claude-3-haiku-20240307"),
        ("ollama", "llama3.1:8b"),
        ("openai", "text-embedding-3-small"),
    ];
    const CONVERSATIONS: [Option<&str>; 5] = [
        None,
        Some("conv-1"),
        Some("conv-2"),
        Some("Conv-3"),
        Some("conv-a"),
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    let start = at("2025-12-20T00:00:00Z");
    (0..n)
        .map(|_| {
            let micros = match rng.u8(0..4) {
                0 => 0,
                1 => DAY_MICROS - 1,
                2 => DAY_MICROS / 2,
                _ => rng.i64(0..DAY_MICROS),
            };
            let created_at =
                start + TimeDelta::days(rng.i64(0..82)) + TimeDelta::microseconds(micros);
            let (provider, model) = MODELS[rng.usize(..MODELS.len())];
            let tenant = tenants[rng.usize(..tenants.len())];
            let embedding = model.starts_with("text-embedding");
            let status = match rng.u8(0..10) {
                0 | 1 => "error",
                2 => "cancelled",
                _ => "ok",
            };
            let cost = match (provider, rng.u8(0..20)) {
                ("ollama", _) => 0,
                (_, 0) => 1_234_567_890 + rng.i64(0..1_000),
                _ => rng.i64(0..5_000_000),
            };
            // Fields are evaluated as written: these draw from `rng` in the seeded order.
            UsageRecord {
                conversation_id: CONVERSATIONS[rng.usize(..CONVERSATIONS.len())].map(str::to_owned),
                endpoint: if embedding { "embeddings" } else { "chat" }.to_owned(),
                provider: provider.to_owned(),
                model: model.to_owned(),
                input_tokens: if embedding { 0 } else { rng.i64(0..5_000) },
                output_tokens: if embedding { 0 } else { rng.i64(0..2_000) },
                embedding_tokens: if embedding { rng.i64(1..3_000) } else { 0 },
                cost_nano_usd: cost,
                latency_ms: rng.i64(1..5_000),
                status: status.to_owned(),
                error_kind: error_kind_of(status),
                cache_hit: status == "ok" && rng.u8(0..8) == 0,
                ..chat_record(tenant, created_at)
            }
        })
        .collect()
}

/// Inserts `records` in batches of varied sizes, so rollup rows are added to many times.
async fn insert_in_batches(store: &dyn Store, records: &[UsageRecord]) {
    let sizes = [1, 7, 50, 3, 120, 2];
    let mut rest = records;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].min(rest.len());
        store.insert_usage(&rest[..n]).await.unwrap();
        rest = &rest[n..];
        i += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Known calls through the gateway, reported exactly.

/// A call's record as priced by hand; its time is taken from the stored record.
struct Call {
    request_id: Option<String>,
    conversation: Option<&'static str>,
    provider: &'static str,
    model: &'static str,
    tokens: (i64, i64, i64),
    cost: i64,
    status: &'static str,
}

impl Call {
    fn chat(answer: &Answer, conversation: Option<&'static str>, tokens: (i64, i64)) -> Self {
        Self {
            request_id: answer
                .headers
                .get("x-request-id")
                .map(|v| v.to_str().unwrap().to_owned()),
            conversation,
            provider: "openai",
            model: "gpt-4o-mini",
            tokens: (tokens.0, tokens.1, 0),
            cost: mini_cost(tokens.0, tokens.1),
            status: "ok",
        }
    }

    fn failed(mut self) -> Self {
        self.status = "error";
        self
    }

    /// The record this call should have left, at the time the stored one has.
    fn record(&self, tenant: &str, stored: &UsageRecord) -> UsageRecord {
        UsageRecord {
            tenant_id: tenant.to_owned(),
            conversation_id: self.conversation.map(str::to_owned),
            provider: self.provider.to_owned(),
            model: self.model.to_owned(),
            input_tokens: self.tokens.0,
            output_tokens: self.tokens.1,
            embedding_tokens: self.tokens.2,
            cost_nano_usd: self.cost,
            status: self.status.to_owned(),
            cache_hit: false,
            fallback_from: None,
            ..stored.clone()
        }
    }
}

/// Whether a report row is about `conversation`.
fn row_of<'a>(report: &'a Value, field: &str, value: &Value) -> &'a Value {
    report["breakdown"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| &row[field] == value)
        .unwrap_or_else(|| panic!("no row with {field} = {value}: {report:#}"))
}

async fn known_calls_are_reported_exactly(db: Db) {
    let gw = db.gateway(&[]).await;
    let (tenant, key) = gw.tenant(mini_settings()).await;
    let (other, other_key) = gw.tenant_named("other", mini_settings()).await;
    let chat = "/v1/chat/completions";
    let with_usage = stream_with_usage();
    let mut calls = Vec::new();

    // A plain completion in conversation A.
    gw.fake.push(Reply::text("Four.").with_usage(10, 2));
    let plain = post(&gw, chat, &key, &hello(json!({})), &conversation("conv-a")).await;
    assert_eq!(plain.status, 200, "{}", plain.text);
    assert_eq!(plain.header("x-meta-chat-cost-usd"), usd(mini_cost(10, 2)));
    calls.push(Call::chat(&plain, Some("conv-a"), (10, 2)));

    // A stream with the provider's usage, conversation A.
    gw.fake
        .push(Reply::text("Streamed answer.").with_usage(7, 5));
    let streamed = post(
        &gw,
        chat,
        &key,
        &hello(with_usage.clone()),
        &conversation("conv-a"),
    )
    .await;
    assert_eq!(streamed.status, 200, "{}", streamed.text);
    let usage = stream_events(&streamed).last().unwrap()["usage"].clone();
    assert_eq!(usage["cost_usd"], usd(mini_cost(7, 5)), "{usage}");
    calls.push(Call::chat(&streamed, Some("conv-a"), (7, 5)));

    // A stream without the provider's usage, no conversation: estimated at ~4 characters a
    // token from the prompt ("hello there", 3) and the text (25 characters, 7).
    gw.fake
        .push(Reply::text("The quick brown fox jumps").without_stream_usage());
    let estimated = post(&gw, chat, &key, &hello(with_usage.clone()), &[]).await;
    assert_eq!(estimated.status, 200, "{}", estimated.text);
    calls.push(Call::chat(&estimated, None, (3, 7)));

    // A tool call, conversation B.
    gw.fake.push(weather_reply());
    let tool = post(&gw, chat, &key, &weather_request(), &conversation("conv-b")).await;
    assert_eq!(tool.status, 200, "{}", tool.text);
    calls.push(Call::chat(&tool, Some("conv-b"), (20, 8)));

    // Embeddings, conversation B: the fake counts ~4 characters a token per input, 3 + 3.
    let embedded = post(
        &gw,
        "/v1/embeddings",
        &key,
        &embeddings_request(),
        &conversation("conv-b"),
    )
    .await;
    assert_eq!(embedded.status, 200, "{}", embedded.text);
    assert_eq!(embedded.json()["usage"]["prompt_tokens"], 6);
    calls.push(Call {
        model: "text-embedding-3-small",
        tokens: (0, 0, 6),
        cost: embedding_small_cost(6),
        ..Call::chat(&embedded, Some("conv-b"), (0, 0))
    });

    // Another provider, conversation B.
    gw.fake.push(Reply::text("Bonjour.").with_usage(40, 12));
    let anthropic = post(
        &gw,
        chat,
        &key,
        &hello(json!({"model": "anthropic/claude-3-haiku-20240307"})),
        &conversation("conv-b"),
    )
    .await;
    assert_eq!(anthropic.status, 200, "{}", anthropic.text);
    assert_eq!(anthropic.header("x-meta-chat-provider"), "anthropic");
    assert_eq!(
        anthropic.header("x-meta-chat-cost-usd"),
        usd(haiku_cost(40, 12))
    );
    calls.push(Call {
        provider: "anthropic",
        model: "claude-3-haiku-20240307",
        cost: haiku_cost(40, 12),
        ..Call::chat(&anthropic, Some("conv-b"), (40, 12))
    });

    // An upstream failure (no retries), conversation A: an error that used nothing.
    gw.fake.push(Reply::error(500, "the upstream exploded"));
    let failed = post(&gw, chat, &key, &hello(json!({})), &conversation("conv-a")).await;
    assert_eq!(failed.status, 502, "{}", failed.text);
    calls.push(Call::chat(&failed, Some("conv-a"), (0, 0)).failed());

    // A stream the upstream breaks off after two pieces of text: an error, estimated from the
    // prompt and the text sent.
    gw.fake
        .push(Reply::stream_error(2, "the upstream broke down").in_chunks(4));
    let broken = post(&gw, chat, &key, &hello(with_usage.clone()), &[]).await;
    assert_eq!(broken.status, 200, "{}", broken.text);
    let broken_text = streamed_text(&stream_events(&broken));
    assert!(!broken_text.is_empty(), "{}", broken.text);
    let sent = i64::try_from(meta_chat::usage::estimate_tokens(&broken_text)).unwrap();
    calls.push(Call::chat(&broken, None, (3, sent)).failed());

    // A client that leaves after the first chunk of a slow stream, conversation C: how much
    // text went out before the gateway noticed is up to timing, so the output tokens are
    // read from the record (and bounded).
    let cancelled_id = leave_after_first_chunk(&gw, &key, &conversation("conv-c")).await;

    // The other tenant, in a conversation of the same name.
    gw.fake.push(Reply::text("Other.").with_usage(1_000, 1_000));
    let elsewhere = post(
        &gw,
        chat,
        &other_key,
        &hello(json!({})),
        &conversation("conv-a"),
    )
    .await;
    assert_eq!(elsewhere.status, 200, "{}", elsewhere.text);

    let store = gw.state.store.as_ref();
    wait_for_records(store, None, 10, Duration::from_secs(10)).await;
    let stored = store.recent_usage(&tenant, 100).await.unwrap();
    assert_eq!(stored.len(), 9, "{stored:#?}");
    let stored_by_id = |id: &str| {
        stored
            .iter()
            .find(|r| r.request_id == id)
            .unwrap_or_else(|| panic!("no record of request {id}: {stored:#?}"))
    };

    let cancelled = stored_by_id(&cancelled_id);
    assert_eq!(cancelled.status, "cancelled", "{cancelled:?}");
    assert_eq!(cancelled.input_tokens, 3, "{cancelled:?}");
    let output = cancelled.output_tokens;
    assert!(
        output < i64::try_from(meta_chat::usage::estimate_tokens(SLOW_TEXT)).unwrap(),
        "{cancelled:?}"
    );
    calls.push(Call {
        request_id: Some(cancelled_id.clone()),
        ..Call::chat(&plain, Some("conv-c"), (3, output))
    });
    calls.last_mut().unwrap().status = "cancelled";

    // What each call should have cost, with the time its record has.
    let mut expected: Vec<UsageRecord> = calls
        .iter()
        .map(|call| {
            let record = match &call.request_id {
                Some(id) => stored_by_id(id),
                // The 502 may come without a request id: the error record that is no stream.
                None => stored
                    .iter()
                    .find(|r| r.status == "error" && r.ttft_ms.is_none())
                    .unwrap(),
            };
            let want = call.record(&tenant, record);
            assert_eq!(
                (
                    &record.conversation_id,
                    &record.provider,
                    &record.model,
                    record.input_tokens,
                    record.output_tokens,
                    record.embedding_tokens,
                    record.cost_nano_usd,
                    &record.status,
                ),
                (
                    &want.conversation_id,
                    &want.provider,
                    &want.model,
                    want.input_tokens,
                    want.output_tokens,
                    want.embedding_tokens,
                    want.cost_nano_usd,
                    &want.status,
                ),
                "{record:?}"
            );
            want
        })
        .collect();
    let mut seen: Vec<&str> = expected.iter().map(|r| r.request_id.as_str()).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 9, "{expected:#?}");
    let other_stored = store.recent_usage(&other, 10).await.unwrap();
    assert_eq!(other_stored.len(), 1);
    expected.push(UsageRecord {
        tenant_id: other.clone(),
        conversation_id: Some("conv-a".to_owned()),
        cost_nano_usd: mini_cost(1_000, 1_000),
        input_tokens: 1_000,
        output_tokens: 1_000,
        ..other_stored[0].clone()
    });
    assert_eq!(other_stored[0], expected[9]);

    // The day of the calls, with the day before and after: three buckets, two empty.
    let today = stored[0].created_at.date_naive();
    let days: BTreeSet<NaiveDate> = stored.iter().map(|r| r.created_at.date_naive()).collect();
    let (yesterday, tomorrow) = (today - Days::new(1), today + Days::new(1));
    let (from, to) = (
        yesterday.format("%Y-%m-%d").to_string(),
        tomorrow.format("%Y-%m-%d").to_string(),
    );
    let by = |group_by| check_days(&gw, &key, &expected, Some(&tenant), (&from, &to), group_by);
    let by_model = by("model").await;

    // The same numbers, spelled out.
    let totals = &by_model["totals"];
    let broken_cost = mini_cost(3, sent);
    let cancelled_cost = mini_cost(3, output);
    let cost = mini_cost(10, 2)
        + mini_cost(7, 5)
        + mini_cost(3, 7)
        + mini_cost(20, 8)
        + embedding_small_cost(6)
        + haiku_cost(40, 12)
        + broken_cost
        + cancelled_cost;
    let input = 10 + 7 + 3 + 20 + 40 + 3 + 3;
    let output_total = 2 + 5 + 7 + 8 + 12 + sent + output;
    assert_eq!(totals["requests"], 9, "{totals}");
    assert_eq!(totals["errors"], 2, "{totals}");
    assert_eq!(totals["cacheHits"], 0, "{totals}");
    assert_eq!(totals["inputTokens"], input, "{totals}");
    assert_eq!(totals["outputTokens"], output_total, "{totals}");
    assert_eq!(totals["embeddingTokens"], 6, "{totals}");
    assert_eq!(totals["totalTokens"], input + output_total + 6, "{totals}");
    assert_eq!(totals["costNanoUsd"], cost, "{totals}");
    assert_eq!(totals["costUsd"], usd(cost), "{totals}");
    let rows = by_model["breakdown"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{by_model:#}");
    assert_eq!(by_model["breakdownTotal"], 3);
    let mini = row_of(&by_model, "model", &json!("gpt-4o-mini"));
    assert_eq!(mini["provider"], "openai");
    assert_eq!(mini["requests"], 7);
    assert_eq!(mini["errors"], 2);
    assert_eq!(
        mini["costNanoUsd"],
        cost - embedding_small_cost(6) - haiku_cost(40, 12)
    );
    let haiku = row_of(&by_model, "model", &json!("claude-3-haiku-20240307"));
    assert_eq!(haiku["provider"], "anthropic");
    assert_eq!(
        (&haiku["inputTokens"], &haiku["outputTokens"]),
        (&json!(40), &json!(12))
    );
    assert_eq!(haiku["costUsd"], usd(haiku_cost(40, 12)));
    let small = row_of(&by_model, "model", &json!("text-embedding-3-small"));
    assert_eq!(small["embeddingTokens"], 6);
    assert_eq!(small["costUsd"], "0.000000120");
    // Totals are the sum of the breakdown; most expensive first.
    for field in [
        "requests",
        "errors",
        "inputTokens",
        "outputTokens",
        "costNanoUsd",
    ] {
        let sum: i64 = rows.iter().map(|r| r[field].as_i64().unwrap()).sum();
        assert_eq!(totals[field], sum, "{field}");
    }
    let costs: Vec<i64> = rows
        .iter()
        .map(|r| r["costNanoUsd"].as_i64().unwrap())
        .collect();
    assert!(costs.is_sorted_by(|a, b| a >= b), "{costs:?}");
    // Every call on today's bucket (unless the calls straddled a midnight).
    let series = series_field(&by_model, "requests");
    let day_text = |d: NaiveDate| d.format("%Y-%m-%d").to_string();
    if days.len() == 1 {
        assert_eq!(
            series,
            vec![
                (day_text(yesterday), 0),
                (day_text(today), 9),
                (day_text(tomorrow), 0)
            ]
        );
        assert_eq!(by_model["series"][1]["costUsd"], usd(cost));
        assert_eq!(by_model["series"][0]["costUsd"], "0.000000000");
    }

    let by_provider = by("provider").await;
    let openai = row_of(&by_provider, "provider", &json!("openai"));
    assert_eq!(openai["requests"], 8);
    assert_eq!(openai["costNanoUsd"], cost - haiku_cost(40, 12));
    assert_eq!(
        row_of(&by_provider, "provider", &json!("anthropic"))["requests"],
        1
    );
    assert_eq!(by_provider["breakdownTotal"], 2);

    let by_conversation = by("conversation").await;
    assert_eq!(by_conversation["breakdownTotal"], 4);
    let conv_a = row_of(&by_conversation, "conversationId", &json!("conv-a"));
    assert_eq!(conv_a["requests"], 3);
    assert_eq!(conv_a["errors"], 1);
    assert_eq!(conv_a["costNanoUsd"], mini_cost(10, 2) + mini_cost(7, 5));
    assert!(conv_a.get("tenantId").is_none(), "{conv_a}");
    let first_at = at(conv_a["firstAt"].as_str().unwrap());
    let last_at = at(conv_a["lastAt"].as_str().unwrap());
    assert!(first_at < last_at, "{conv_a}");
    let conv_b = row_of(&by_conversation, "conversationId", &json!("conv-b"));
    assert_eq!(conv_b["requests"], 3);
    assert_eq!(conv_b["embeddingTokens"], 6);
    assert_eq!(
        conv_b["costNanoUsd"],
        mini_cost(20, 8) + embedding_small_cost(6) + haiku_cost(40, 12)
    );
    let conv_c = row_of(&by_conversation, "conversationId", &json!("conv-c"));
    assert_eq!(conv_c["requests"], 1);
    assert_eq!(conv_c["firstAt"], conv_c["lastAt"]);
    let unnamed = row_of(&by_conversation, "conversationId", &Value::Null);
    assert_eq!(unnamed["requests"], 2);
    assert_eq!(unnamed["errors"], 1);
    assert_eq!(unnamed["costNanoUsd"], mini_cost(3, 7) + broken_cost);

    // An RFC 3339 period around the calls reads the records themselves, not the day rollups:
    // the same totals.
    let first = expected.iter().map(|r| r.created_at).min().unwrap() - TimeDelta::seconds(1);
    let last = expected.iter().map(|r| r.created_at).max().unwrap() + TimeDelta::seconds(1);
    let (first, last) = (rfc3339(first), rfc3339(last));
    for group_by in ["model", "provider", "conversation"] {
        let query = Query::new(Some(&tenant), &first, &last).by("day", group_by);
        let got = check(&gw, &expected, &query).await;
        assert_eq!(got["totals"], by_model["totals"]);
    }

    // Without parameters: the last 30 UTC days, by day and model, up to now.
    let default = report(&gw, &tenant_path(&tenant), &key, &[]).await;
    let now = Utc::now().date_naive();
    assert_eq!(default["granularity"], "day");
    assert_eq!(default["groupBy"], "model");
    assert_eq!(default["series"].as_array().unwrap().len(), 30);
    assert_eq!(
        default["series"][29]["start"],
        now.format("%Y-%m-%d").to_string()
    );
    assert_eq!(
        default["from"],
        format!("{}T00:00:00Z", (now - Days::new(29)).format("%Y-%m-%d"))
    );
    assert_eq!(default["totals"], by_model["totals"]);
    assert_eq!(default["breakdown"], by_model["breakdown"]);

    // The admin sees both tenants, the other one (more expensive) first.
    let all = check_days(&gw, ADMIN_KEY, &expected, None, (&from, &to), "tenant").await;
    assert_eq!(all["tenantId"], Value::Null);
    assert_eq!(all["breakdown"][0]["tenantId"], other.as_str());
    assert_eq!(all["breakdown"][1]["tenantId"], tenant.as_str());
    assert_eq!(all["breakdown"][1]["costNanoUsd"], cost);
    let all_conversations = Query::new(None, &from, &to).by("day", "conversation");
    let got = check(&gw, &expected, &all_conversations).await;
    assert_eq!(got["breakdownTotal"], 5, "two conv-a, one per tenant");
}

on_sqlite_and_postgres! {
    #[tokio::test]
    known_calls_are_reported_exactly:
        known_calls_are_reported_exactly_on_sqlite,
        known_calls_are_reported_exactly_on_postgres
}

// ---------------------------------------------------------------------------------------------
// 2. Buckets across UTC boundaries; whole days and partial days.

async fn buckets_and_partial_days_are_exact(db: Db) {
    let gw = db.gateway(&[]).await;
    let (edges, _) = gw.tenant_named("edges", json!({})).await;
    let (a, _) = gw.tenant_named("a", json!({})).await;
    let (b, _) = gw.tenant_named("b", json!({})).await;
    // A tenant deleted since (or never created): its usage still counts across tenants.
    let ghost = "ghost-tenant";
    let mut records = boundary_records(&edges);
    records.extend(random_records(7, &[&a, &b, ghost], 400));
    let store = gw.state.store.as_ref();
    insert_in_batches(store, &records).await;
    assert_eq!(store.count_usage(None).await.unwrap(), records.len() as u64);

    // The day rollups hold exactly the sums of the records, however they were batched.
    assert_eq!(rollups(&db).await, expected_rollups(&records));

    // The reports of `edges`, read as the admin.
    let path = tenant_path(&edges);
    let edges_report = async |params: &[(&str, &str)]| report(&gw, &path, ADMIN_KEY, params).await;
    // Days across the year boundary: the last microsecond of 2025 and the first of 2026.
    let days = edges_report(&[("from", "2025-12-30"), ("to", "2026-01-02")]).await;
    assert_eq!(days["from"], "2025-12-30T00:00:00Z");
    assert_eq!(days["to"], "2026-01-03T00:00:00Z");
    assert_eq!(
        series_field(&days, "inputTokens"),
        vec![
            ("2025-12-30".into(), 0),
            ("2025-12-31".into(), 1),
            ("2026-01-01".into(), 2),
            ("2026-01-02".into(), 0),
        ]
    );
    assert_eq!(days["series"][0]["costUsd"], "0.000000000");
    assert_eq!(days["series"][0]["requests"], 0);
    // Days across the end of February and a Sunday/Monday pair.
    let days = edges_report(&[("from", "2026-02-27"), ("to", "2026-03-03")]).await;
    assert_eq!(
        series_field(&days, "inputTokens"),
        vec![
            ("2026-02-27".into(), 0),
            ("2026-02-28".into(), 4),
            ("2026-03-01".into(), 8 + 16),
            ("2026-03-02".into(), 32),
            ("2026-03-03".into(), 0),
        ]
    );
    // ISO weeks (Monday to Sunday): 2025-12-29 holds both sides of the new year; Sunday
    // 2026-03-01 ends the week of 2026-02-23, Monday 2026-03-02 starts the next.
    let weeks = edges_report(&[
        ("from", "2025-12-22"),
        ("to", "2026-03-08"),
        ("granularity", "week"),
    ])
    .await;
    let mut expected_weeks: Vec<(String, i64)> = [
        "2025-12-22",
        "2025-12-29",
        "2026-01-05",
        "2026-01-12",
        "2026-01-19",
        "2026-01-26",
        "2026-02-02",
        "2026-02-09",
        "2026-02-16",
        "2026-02-23",
        "2026-03-02",
    ]
    .iter()
    .map(|d| ((*d).to_owned(), 0))
    .collect();
    expected_weeks[1].1 = 1 + 2;
    expected_weeks[9].1 = 4 + 8 + 16;
    expected_weeks[10].1 = 32;
    assert_eq!(series_field(&weeks, "inputTokens"), expected_weeks);
    assert_eq!(weeks["series"][2]["requests"], 0);
    // Months: the first bucket starts before the period (which counts only what lies inside
    // it), the last one is empty.
    let months = edges_report(&[
        ("from", "2025-11-15T00:00:00Z"),
        ("to", "2026-04-30"),
        ("granularity", "month"),
    ])
    .await;
    assert_eq!(
        series_field(&months, "inputTokens"),
        vec![
            ("2025-11-01".into(), 0),
            ("2025-12-01".into(), 1),
            ("2026-01-01".into(), 2),
            ("2026-02-01".into(), 4),
            ("2026-03-01".into(), 8 + 16 + 32),
            ("2026-04-01".into(), 0),
        ]
    );
    assert_eq!(months["totals"]["inputTokens"], 63);
    assert_eq!(months["totals"]["costNanoUsd"], 63_000);
    assert_eq!(months["totals"]["costUsd"], "0.000063000");

    // Periods with partial days: edges read from the records, whole days from the rollups.
    let partial = [
        // The last microsecond of February (records), March 1st whole (rollups).
        (
            "2026-02-28T23:59:59.999999Z",
            "2026-03-02T00:00:00Z",
            4 + 8 + 16,
        ),
        (
            "2026-02-28T23:59:59.999999Z",
            "2026-03-02T00:00:00.000001Z",
            60,
        ),
        (
            "2026-03-01T00:00:00.000001Z",
            "2026-03-02T00:00:00.000001Z",
            16 + 32,
        ),
        // Partial, whole, partial.
        ("2026-02-28T12:00:00Z", "2026-03-02T12:00:00Z", 60),
        (
            "2025-12-31T12:00:00Z",
            "2026-03-01T12:00:00Z",
            1 + 2 + 4 + 8,
        ),
        // Within one day, `to` excluded.
        ("2026-03-01T00:00:00Z", "2026-03-01T23:59:59.999999Z", 8),
        (
            "2025-12-31T23:59:59.999999Z",
            "2026-01-01T00:00:00.000001Z",
            1 + 2,
        ),
        ("2025-12-31T23:59:59.999999Z", "2026-01-01T00:00:00Z", 1),
        // Offsets other than Z: 2026-01-01T00:00:00Z to the end of that day.
        ("2025-12-31T12:00:00-12:00", "2026-01-01", 2),
        // 2025-12-31T23:00:00Z to 2026-01-01T00:00:00Z.
        ("2026-01-01T01:00:00+02:00", "2026-01-01T00:00:00Z", 1),
    ];
    for (from, to, input) in partial {
        let answer = edges_report(&[("from", from), ("to", to)]).await;
        assert_eq!(
            answer["totals"]["inputTokens"], input,
            "{from} to {to}: {answer:#}"
        );
        let series_sum: i64 = series_field(&answer, "inputTokens")
            .iter()
            .map(|(_, n)| n)
            .sum();
        assert_eq!(series_sum, input, "{from} to {to}: {answer:#}");
    }
    let offset = edges_report(&[("from", "2025-12-31T12:00:00-12:00"), ("to", "2026-01-01")]).await;
    assert_eq!(offset["from"], "2026-01-01T00:00:00Z");
    assert_eq!(offset["to"], "2026-01-02T00:00:00Z");

    // Every report, for every granularity and grouping, for one tenant and for all, equals the
    // brute-force sum of the inserted records.
    let ranges: Vec<(&str, &str)> = partial
        .iter()
        .map(|(from, to, _)| (*from, *to))
        .chain([
            ("2025-12-20", "2026-03-11"),
            ("2025-12-01", "2026-03-31"),
            ("2026-01-15T06:30:00Z", "2026-02-20T18:00:00.5Z"),
            ("2026-02-01", "2026-02-01"),
        ])
        .collect();
    let scopes = [
        Some(a.as_str()),
        Some(b.as_str()),
        Some(edges.as_str()),
        None,
    ];
    for (from, to) in &ranges {
        for tenant in scopes {
            for granularity in ["day", "week", "month"] {
                for group_by in ["model", "provider", "conversation", "tenant"] {
                    if group_by == "tenant" && tenant.is_some() {
                        continue;
                    }
                    let query = Query::new(tenant, from, to).by(granularity, group_by);
                    check(&gw, &records, &query).await;
                }
            }
        }
    }
    // Paging, for each grouping.
    for group_by in ["model", "provider", "conversation", "tenant"] {
        for (limit, offset) in [(1, 0), (2, 1), (3, 2), (1000, 0), (5, 100)] {
            let query = Query::new(None, "2025-12-20T12:00:00Z", "2026-03-10T12:00:00Z")
                .by("week", group_by)
                .page(limit, offset);
            check(&gw, &records, &query).await;
        }
    }

    // Whole days really are read from the rollups and partial days from the records: a rollup
    // row without records shows in the first and not in the second.
    db.execute(format!(
        "INSERT INTO usage_daily (tenant_id, day, provider, model, requests, errors, \
         cache_hits, input_tokens, output_tokens, embedding_tokens, cost_nano_usd) \
         VALUES ('{edges}', '2026-03-01', 'rollup-only', 'm', 1, 0, 0, 1000, 0, 0, 5)"
    ))
    .await;
    let whole = edges_report(&[
        ("from", "2026-03-01"),
        ("to", "2026-03-01"),
        ("groupBy", "provider"),
    ])
    .await;
    assert_eq!(whole["totals"]["inputTokens"], 8 + 16 + 1000, "{whole:#}");
    row_of(&whole, "provider", &json!("rollup-only"));
    let three_parts = edges_report(&[
        ("from", "2026-02-28T12:00:00Z"),
        ("to", "2026-03-02T12:00:00Z"),
    ])
    .await;
    assert_eq!(three_parts["totals"]["inputTokens"], 60 + 1000);
    let within_the_day = edges_report(&[
        ("from", "2026-03-01T00:00:00Z"),
        ("to", "2026-03-01T23:59:59.999999Z"),
    ])
    .await;
    assert_eq!(within_the_day["totals"]["inputTokens"], 8);

    // Likewise for conversations: whole days from their day rollup.
    db.execute(format!(
        "INSERT INTO usage_conversation_daily (tenant_id, day, conversation_id, requests, \
         errors, cache_hits, input_tokens, output_tokens, embedding_tokens, cost_nano_usd, \
         first_at, last_at) VALUES ('{edges}', '2026-03-01', 'rollup-only', 1, 0, 0, 1000, 0, \
         0, 5, '2026-03-01T10:00:00.000000Z', '2026-03-01T11:00:00.000000Z')"
    ))
    .await;
    let whole = edges_report(&[
        ("from", "2026-03-01"),
        ("to", "2026-03-01"),
        ("groupBy", "conversation"),
    ])
    .await;
    let row = row_of(&whole, "conversationId", &json!("rollup-only"));
    assert_eq!(row["inputTokens"], 1000, "{whole:#}");
    assert_eq!(row["firstAt"], "2026-03-01T10:00:00Z", "{whole:#}");
    assert_eq!(row["lastAt"], "2026-03-01T11:00:00Z", "{whole:#}");
    let within_the_day = edges_report(&[
        ("from", "2026-03-01T00:00:00Z"),
        ("to", "2026-03-01T23:59:59Z"),
        ("groupBy", "conversation"),
    ])
    .await;
    assert!(
        !within_the_day.to_string().contains("rollup-only"),
        "{within_the_day:#}"
    );
}

on_sqlite_and_postgres! {
    #[tokio::test]
    buckets_and_partial_days_are_exact:
        buckets_and_partial_days_are_exact_on_sqlite,
        buckets_and_partial_days_are_exact_on_postgres
}

// ---------------------------------------------------------------------------------------------
// 3. Bad parameters.

/// A 400 naming `param`, in the OpenAI error envelope.
fn assert_bad_parameter(answer: &Answer, param: &str, context: &str) {
    assert_eq!(answer.status, 400, "{context}: {}", answer.text);
    let error = &answer.json()["error"];
    assert_eq!(error["type"], "invalid_request_error", "{context}: {error}");
    assert_eq!(error["code"], "invalid_parameter", "{context}: {error}");
    assert_eq!(error["param"], param, "{context}: {error}");
    assert!(
        !error["message"].as_str().unwrap().is_empty(),
        "{context}: {error}"
    );
}

async fn bad_parameters_are_named(db: Db) {
    let gw = db.gateway(&[]).await;
    let (tenant, key) = gw.tenant(json!({})).await;
    let path = tenant_path(&tenant);
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("from", "yesterday")], "from"),
        (&[("from", "2026-02-30")], "from"),
        (&[("from", "2026-03-01T25:00:00Z")], "from"),
        (&[("from", "")], "from"),
        (&[("to", "2026-13-01")], "to"),
        (&[("to", "03/01/2026")], "to"),
        (&[("from", "2026-03-02"), ("to", "2026-03-01")], "from"),
        (
            &[
                ("from", "2026-03-01T00:00:00Z"),
                ("to", "2026-03-01T00:00:00Z"),
            ],
            "from",
        ),
        (
            &[
                ("from", "2026-03-01T12:00:00Z"),
                ("to", "2026-03-01T11:59:59Z"),
            ],
            "from",
        ),
        (&[("granularity", "hour")], "granularity"),
        (&[("granularity", "Day")], "granularity"),
        (&[("granularity", "")], "granularity"),
        (
            &[
                ("from", "2020-01-01"),
                ("to", "2026-01-01"),
                ("granularity", "day"),
            ],
            "granularity",
        ),
        (&[("groupBy", "colour")], "groupBy"),
        (&[("groupBy", "tenant")], "groupBy"),
        (&[("group_by", "model")], "group_by"),
        (&[("tenant", "x")], "tenant"),
        (&[("limit", "0")], "limit"),
        (&[("limit", "1001")], "limit"),
        (&[("limit", "-1")], "limit"),
        (&[("limit", "ten")], "limit"),
        (&[("offset", "-1")], "offset"),
        (&[("offset", "1.5")], "offset"),
        (&[("from", "2026-03-01"), ("from", "2026-03-02")], "from"),
        (&[("limit", "5"), ("limit", "5")], "limit"),
    ];
    for (params, param) in cases {
        let context = format!("{params:?}");
        let answer = get(&gw, &path, Some(ADMIN_KEY), params).await;
        assert_bad_parameter(&answer, param, &context);
        // The same for the tenant itself.
        let answer = get(&gw, &path, Some(&key), params).await;
        assert_bad_parameter(&answer, param, &context);
        // And across tenants, where `groupBy=tenant` is allowed.
        let answer = get(&gw, "/api/usage", Some(ADMIN_KEY), params).await;
        if *params == [("groupBy", "tenant")] {
            assert_eq!(answer.status, 200, "{}", answer.text);
        } else {
            assert_bad_parameter(&answer, param, &context);
        }
    }

    // The limits themselves are fine.
    for params in [
        &[("limit", "1"), ("offset", "0")][..],
        &[("limit", "1000"), ("offset", "1000000")],
        &[
            ("from", "2020-01-01"),
            ("to", "2026-01-01"),
            ("granularity", "week"),
        ],
        &[("from", "2026-03-01"), ("to", "2026-03-01")],
        &[
            ("from", "2026-03-01T00:00:00Z"),
            ("to", "2026-03-01T00:00:00.000001Z"),
        ],
        &[("from", "2026-03-01T12:00:00+05:30"), ("to", "2026-03-02")],
    ] {
        report(&gw, &path, &key, params).await;
    }
}

on_sqlite_and_postgres! {
    #[tokio::test]
    bad_parameters_are_named:
        bad_parameters_are_named_on_sqlite,
        bad_parameters_are_named_on_postgres
}

// ---------------------------------------------------------------------------------------------
// 4. Who may read what; tenants ranked; pages.

fn assert_error(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.text);
    assert_eq!(answer.json()["error"]["code"], code, "{}", answer.text);
}

async fn access_ranking_and_pages(db: Db) {
    let gw = db.gateway(&[]).await;
    let (t1, key1) = gw.tenant_named("one", json!({})).await;
    let (t2, key2) = gw.tenant_named("two", json!({})).await;
    let (t3, _) = gw.tenant_named("three", json!({})).await;
    let ghost = "ghost-tenant";
    let when = "2026-03-10T12:00:00Z";
    let conversation = |mut r: UsageRecord, id: &str| {
        r.conversation_id = Some(id.to_owned());
        r
    };
    // t2 spends the most; t3 and t1 tie on cost, t3 with more requests; the ghost least.
    let records = vec![
        record(&t1, when, 1, 300),
        record(&t2, when, 1, 200),
        record(&t2, when, 1, 300),
        conversation(record(&t3, when, 1, 100), "cheap"),
        conversation(record(&t3, when, 1, 150), "dear"),
        conversation(record(&t3, when, 1, 50), "middle"),
        conversation(record(&t3, when, 1, 0), "middle"),
        record(ghost, when, 1, 10),
    ];
    gw.state.store.insert_usage(&records).await.unwrap();
    let period = [("from", "2026-03-10"), ("to", "2026-03-10")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut params = period.to_vec();
        params.extend_from_slice(extra);
        params
    };

    // Tenants read their own usage only.
    report(&gw, &tenant_path(&t1), &key1, &period).await;
    assert_error(
        &get(&gw, &tenant_path(&t2), Some(&key1), &period).await,
        403,
        "forbidden",
    );
    assert_error(
        &get(&gw, &tenant_path(&t1), Some(&key2), &period).await,
        403,
        "forbidden",
    );
    // Even a tenant that does not exist: no probing for ids.
    assert_error(
        &get(&gw, &tenant_path("no-such-tenant"), Some(&key1), &period).await,
        403,
        "forbidden",
    );
    let answer = get(&gw, "/api/usage", Some(&key1), &period).await;
    assert_eq!(answer.status, 403, "{}", answer.text);
    assert_eq!(answer.json()["error"]["type"], "permission_error");
    // No key, or a wrong one.
    for path in [tenant_path(&t1), "/api/usage".to_owned()] {
        assert_error(
            &get(&gw, &path, None, &period).await,
            401,
            "missing_api_key",
        );
        assert_error(
            &get(&gw, &path, Some("mc-not-a-key-0123456789"), &period).await,
            401,
            "invalid_api_key",
        );
    }
    // The admin gets 404 for a tenant that does not exist.
    assert_error(
        &get(
            &gw,
            &tenant_path("no-such-tenant"),
            Some(ADMIN_KEY),
            &period,
        )
        .await,
        404,
        "tenant_not_found",
    );

    // Across tenants, most expensive first (then most requests), the deleted one included.
    let ranked = report(
        &gw,
        "/api/usage",
        ADMIN_KEY,
        &with(&[("groupBy", "tenant")]),
    )
    .await;
    let ids = |report: &Value| -> Vec<String> {
        report["breakdown"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["tenantId"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&ranked), [&t2, &t3, &t1, ghost]);
    assert_eq!(ranked["breakdownTotal"], 4);
    assert_eq!(ranked["breakdown"][0]["costUsd"], "0.000000500");
    assert_eq!(ranked["breakdown"][1]["requests"], 4);
    assert_eq!(ranked["totals"]["costNanoUsd"], 1_110);
    assert_eq!(ranked["totals"]["requests"], 8);
    let query = Query::new(None, "2026-03-10", "2026-03-10").by("day", "tenant");
    check(&gw, &records, &query).await;
    // Page by page.
    let page = report(
        &gw,
        "/api/usage",
        ADMIN_KEY,
        &with(&[("groupBy", "tenant"), ("limit", "2"), ("offset", "1")]),
    )
    .await;
    assert_eq!(ids(&page), [t3.as_str(), t1.as_str()]);
    assert_eq!(page["breakdownTotal"], 4);
    // Totals and series cover the whole period, not the page.
    assert_eq!(page["totals"], ranked["totals"]);
    assert_eq!(page["series"], ranked["series"]);
    let past_the_end = report(
        &gw,
        "/api/usage",
        ADMIN_KEY,
        &with(&[("groupBy", "tenant"), ("offset", "4")]),
    )
    .await;
    assert_eq!(past_the_end["breakdown"], json!([]));
    assert_eq!(past_the_end["breakdownTotal"], 4);

    // A tenant's conversations, page by page: dear (150), cheap (100), middle (50, 2 requests).
    let path = tenant_path(&t3);
    let mut seen = Vec::new();
    for offset in ["0", "1", "2"] {
        let page = report(
            &gw,
            &path,
            ADMIN_KEY,
            &with(&[
                ("groupBy", "conversation"),
                ("limit", "1"),
                ("offset", offset),
            ]),
        )
        .await;
        assert_eq!(page["breakdownTotal"], 3, "{page:#}");
        let rows = page["breakdown"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{page:#}");
        seen.push((
            rows[0]["conversationId"].as_str().unwrap().to_owned(),
            rows[0]["requests"].as_i64().unwrap(),
        ));
    }
    assert_eq!(
        seen,
        [
            ("dear".to_owned(), 1),
            ("cheap".to_owned(), 1),
            ("middle".to_owned(), 2)
        ]
    );
    for (limit, offset) in [(2, 0), (2, 2), (1, 3)] {
        let query = Query::new(Some(&t3), "2026-03-10", "2026-03-10")
            .by("day", "conversation")
            .page(limit, offset);
        check(&gw, &records, &query).await;
    }
    // Across tenants, conversation rows name their tenant.
    let all = report(
        &gw,
        "/api/usage",
        ADMIN_KEY,
        &with(&[("groupBy", "conversation")]),
    )
    .await;
    assert_eq!(all["breakdown"][0]["tenantId"], t2.as_str());
    assert_eq!(all["breakdown"][0]["conversationId"], Value::Null);
    assert_eq!(all["breakdownTotal"], 6);
}

on_sqlite_and_postgres! {
    #[tokio::test]
    access_ranking_and_pages:
        access_ranking_and_pages_on_sqlite,
        access_ranking_and_pages_on_postgres
}

// ---------------------------------------------------------------------------------------------
// 5. SQLite and PostgreSQL agree.

#[tokio::test]
async fn sqlite_and_postgres_give_the_same_reports() {
    let Some(pg) = Db::postgres().await else {
        return;
    };
    let sqlite = Db::sqlite();
    let (sqlite_store, pg_store) = (sqlite.store().await, pg.store().await);
    let tenants = ["tenant-a", "tenant-B", "tenant-c"];
    let mut records = boundary_records("tenant-edges");
    records.extend(random_records(11, &tenants, 600));
    // Ties on cost and requests, told apart by key only: case decides ("Z" before "a").
    for (tenant, conversation) in [
        ("tenant-a", "Zed"),
        ("tenant-a", "alpha"),
        ("tenant-B", "x"),
    ] {
        let mut r = record(tenant, "2026-02-10T10:00:00Z", 5, 777);
        r.conversation_id = Some(conversation.to_owned());
        records.push(r);
    }
    for store in [&sqlite_store, &pg_store] {
        insert_in_batches(store.as_ref(), &records).await;
    }
    assert_eq!(rollups(&sqlite).await, rollups(&pg).await);

    let now = at("2026-03-05T15:30:00.123456Z");
    let ranges = [
        (None, None),
        (Some("2025-12-20"), Some("2026-03-11")),
        (
            Some("2025-12-31T23:59:59.999999Z"),
            Some("2026-03-01T00:00:00Z"),
        ),
        (
            Some("2026-01-10T08:00:00+01:00"),
            Some("2026-02-10T10:00:00.000001Z"),
        ),
        (Some("2026-02-10T00:00:00Z"), Some("2026-02-10T23:00:00Z")),
        (Some("2026-03-01"), Some("2026-03-01")),
    ];
    let mut compared = 0;
    for (from, to) in ranges {
        for tenant in [
            None,
            Some("tenant-a"),
            Some("tenant-B"),
            Some("tenant-edges"),
        ] {
            for granularity in ["day", "week", "month"] {
                for group_by in ["model", "provider", "conversation", "tenant"] {
                    if group_by == "tenant" && tenant.is_some() {
                        continue;
                    }
                    for (limit, offset) in [("100", "0"), ("2", "1")] {
                        let mut pairs = vec![
                            ("granularity", granularity),
                            ("groupBy", group_by),
                            ("limit", limit),
                            ("offset", offset),
                        ];
                        pairs.extend(from.map(|f| ("from", f)));
                        pairs.extend(to.map(|t| ("to", t)));
                        let pairs: Vec<(String, String)> = pairs
                            .iter()
                            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                            .collect();
                        let query = ReportParams::from_pairs(&pairs)
                            .unwrap()
                            .validate(tenant.map(str::to_owned), now)
                            .unwrap();
                        let on_sqlite = analytics::report(sqlite_store.as_ref(), &query)
                            .await
                            .unwrap();
                        let on_postgres =
                            analytics::report(pg_store.as_ref(), &query).await.unwrap();
                        let on_sqlite = serde_json::to_value(&on_sqlite).unwrap();
                        let on_postgres = serde_json::to_value(&on_postgres).unwrap();
                        let context = format!("{pairs:?} for {tenant:?}");
                        assert_json_eq(&on_postgres, &on_sqlite, &context);
                        let expected = expected_report(
                            &records,
                            &Query {
                                tenant: tenant.map(str::to_owned),
                                from: query.from,
                                to: query.to,
                                granularity,
                                group_by,
                                limit: limit.parse().unwrap(),
                                offset: offset.parse().unwrap(),
                            },
                        );
                        assert_json_eq(&on_sqlite, &expected, &context);
                        compared += 1;
                    }
                }
            }
        }
    }
    assert_eq!(compared, 6 * (3 * 3 * 3 + 3 * 4) * 2);
}
