//! Daily cost alerts (SPEC §4.4): when a tenant's spend for a UTC day reaches its threshold
//! (`costAlertThreshold` in its settings, else `COST_ALERT_THRESHOLD`), one alert per tenant
//! per day — a metric increment and one webhook event to `COST_ALERT_WEBHOOK_URL` — on SQLite
//! and (when `TEST_DATABASE_URL` is set) PostgreSQL:
//!
//! 1. end to end through the gateway: fires when the threshold is crossed, not before, not
//!    again the same day; not for a tenant under its threshold; `COST_ALERT_THRESHOLD` for a
//!    tenant without its own;
//! 2. against a real store through the usage writer: once on one day, once again the next;
//! 3. two replicas (writers over the same database) crossing at once raise one alert, and a
//!    restarted one does not raise it again;
//! 4. a webhook that fails is retried `attempts` times; one that never answers holds up
//!    neither the usage writer nor requests (shown by order of events, not by timing).
//!
//! The webhook receiver is a small axum server in the test that records every POST.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use common::usage::{
    Db, chat_record, mini_cost, mini_settings, on_sqlite_and_postgres, wait_for_records,
};
use common::{Gateway, hello};
use meta_chat::alerts::{CostAlerts, WebhookConfig};
use meta_chat::metrics::Metrics;
use meta_chat::store::{Store, UsageRecord};
use meta_chat::usage::{UsageRecorder, UsageWriterConfig};
use meta_chat_llm::pricing::PriceTable;
use meta_chat_testkit::Reply;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// Generous upper bound for anything the tests wait for; reaching it is a failure, never a
/// measurement.
const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The webhook receiver.

/// How the test webhook answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HookMode {
    /// 200 at once.
    Ok,
    /// 500 at once.
    Fail,
    /// Nothing until [`Hook::release`], then 200.
    Hold,
}

/// One POST the webhook received.
#[derive(Debug, Clone)]
struct Delivery {
    event_header: Option<String>,
    content_type: Option<String>,
    body: Value,
}

impl Delivery {
    fn id(&self) -> &str {
        self.body["id"].as_str().unwrap_or_default()
    }
}

#[derive(Debug)]
struct HookState {
    mode: HookMode,
    /// Closed by [`Hook::release`]; held requests wait on it.
    gate: Semaphore,
    received: Mutex<Vec<Delivery>>,
    /// Event ids of the requests answered 200.
    answered: Mutex<Vec<String>>,
}

/// A webhook receiver on a loopback port.
#[derive(Debug)]
struct Hook {
    url: String,
    state: Arc<HookState>,
}

impl Hook {
    async fn start(mode: HookMode) -> Self {
        let state = Arc::new(HookState {
            mode,
            gate: Semaphore::new(0),
            received: Mutex::default(),
            answered: Mutex::default(),
        });
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url: format!("http://{addr}/hook"),
            state,
        }
    }

    fn received(&self) -> Vec<Delivery> {
        self.state.received.lock().unwrap().clone()
    }

    fn answered(&self) -> Vec<String> {
        self.state.answered.lock().unwrap().clone()
    }

    /// The distinct event ids received.
    fn ids(&self) -> BTreeSet<String> {
        self.received().iter().map(|d| d.id().to_owned()).collect()
    }

    /// Lets every held request (and every later one) be answered.
    fn release(&self) {
        self.state.gate.close();
    }

    /// Waits until `done` holds for the deliveries received so far.
    async fn wait_until(&self, what: &str, done: impl Fn(&[Delivery]) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let received = self.received();
            if done(&received) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "webhook: {what} did not happen; received {received:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn receive(
    State(state): State<Arc<HookState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let delivery = Delivery {
        event_header: header("x-meta-chat-event"),
        content_type: header("content-type"),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let id = delivery.id().to_owned();
    state.received.lock().unwrap().push(delivery);
    match state.mode {
        HookMode::Fail => StatusCode::INTERNAL_SERVER_ERROR,
        HookMode::Ok => {
            state.answered.lock().unwrap().push(id);
            StatusCode::OK
        }
        HookMode::Hold => {
            // Fails (with no permit to hold) once the gate is closed.
            let released = state.gate.acquire().await;
            assert!(released.is_err(), "the gate never hands out permits");
            state.answered.lock().unwrap().push(id);
            StatusCode::OK
        }
    }
}

/// Checks one webhook event: shape, header, tenant, day and amounts.
fn assert_event(delivery: &Delivery, tenant: &str, day: NaiveDate, threshold: &str, spent: &str) {
    assert_eq!(
        delivery.event_header.as_deref(),
        Some("cost_alert"),
        "{delivery:?}"
    );
    assert!(
        delivery
            .content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("application/json")),
        "{delivery:?}"
    );
    let body = &delivery.body;
    let fired_at = body["firedAt"]
        .as_str()
        .unwrap_or_else(|| panic!("no firedAt: {body}"));
    assert!(
        DateTime::parse_from_rfc3339(fired_at).is_ok(),
        "firedAt is not RFC 3339: {body}"
    );
    let mut expected = json!({
        "type": "cost_alert",
        "id": format!("{tenant}:{day}"),
        "tenantId": tenant,
        "day": day.to_string(),
        "thresholdUsd": threshold,
        "spentUsd": spent,
    });
    expected["firedAt"] = json!(fired_at);
    assert_eq!(body, &expected);
}

// ---------------------------------------------------------------------------------------------
// Databases, replicas, records.

/// The `cost_alerts` rows: (tenant, day, threshold, spent), by tenant and day.
async fn alert_rows(db: &Db) -> Vec<(String, String, i64, i64)> {
    db.rows(
        "SELECT tenant_id, CAST(day AS TEXT) AS day, threshold_nano, spent_nano \
         FROM cost_alerts ORDER BY tenant_id, day",
    )
    .await
}

/// One record per batch, so each record is followed by its own alert check and the spend an
/// alert reports is known exactly.
const ONE_AT_A_TIME: UsageWriterConfig = UsageWriterConfig {
    capacity: 4096,
    batch_size: 1,
    flush_interval: Duration::from_millis(10),
};

/// What one gateway replica has for alerts: its own connection pool, metrics, alerts and
/// usage writer.
#[derive(Debug)]
struct Replica {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    alerts: Arc<CostAlerts>,
    usage: UsageRecorder,
}

impl Replica {
    async fn start(db: &Db, webhook: Option<WebhookConfig>, writer: UsageWriterConfig) -> Self {
        meta_chat_llm::install_crypto_provider();
        let store = db.store().await;
        let metrics = Arc::new(Metrics::new(PriceTable::builtin()));
        let alerts = CostAlerts::new(Arc::clone(&store), Arc::clone(&metrics), webhook);
        let usage = UsageRecorder::spawn(Arc::clone(&store), writer, Some(Arc::clone(&alerts)));
        Self {
            store,
            metrics,
            alerts,
            usage,
        }
    }

    /// `meta_chat_cost_alerts_total{tenant}` on this replica.
    fn alerts_counted(&self, tenant: &str) -> f64 {
        cost_alerts_counted(&self.metrics.encode(), tenant)
    }
}

/// `meta_chat_cost_alerts_total{tenant=...}` in a Prometheus text exposition; 0 if absent.
fn cost_alerts_counted(text: &str, tenant: &str) -> f64 {
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).unwrap();
    scrape
        .samples
        .iter()
        .filter(|s| {
            s.metric == "meta_chat_cost_alerts_total" && s.labels.get("tenant") == Some(tenant)
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("meta_chat_cost_alerts_total is not a counter: {other:?}"),
        })
        .sum()
}

/// A usage record of `tenant` at `at` costing `cost` nano-dollars.
fn record(tenant: &str, at: DateTime<Utc>, cost: i64) -> UsageRecord {
    UsageRecord {
        input_tokens: 10,
        output_tokens: 2,
        cost_nano_usd: cost,
        latency_ms: 5,
        ..chat_record(tenant, at)
    }
}

// ---------------------------------------------------------------------------------------------
// 1. End to end through the gateway.

/// gpt-4o-mini, 10 input and 2 output tokens: 10 × 150 + 2 × 600 nano-dollars.
const CHAT_NANOS: i64 = mini_cost(10, 2);
const CHAT_USD: &str = "0.000002700";

/// One chat of `key`'s tenant costing [`CHAT_NANOS`]; must be answered 200.
async fn chat(gw: &Gateway, key: &str) {
    gw.fake.push(Reply::text("Four.").with_usage(10, 2));
    let answer = gw.chat(key, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-cost-usd"), CHAT_USD);
}

/// The UTC day of a tenant's latest usage record.
async fn day_of_latest(gw: &Gateway, tenant: &str) -> NaiveDate {
    let records = gw.state.store.recent_usage(tenant, 1).await.unwrap();
    records[0].created_at.date_naive()
}

async fn metrics_text(gw: &Gateway) -> String {
    let response = gw.client.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// gpt-4o-mini settings with `threshold` as `costAlertThreshold`, if any.
fn settings(threshold: Option<f64>) -> Value {
    let mut settings = mini_settings();
    if let Some(threshold) = threshold {
        settings["costAlertThreshold"] = json!(threshold);
    }
    settings
}

async fn fires_once_when_the_threshold_is_crossed(db: Db) {
    let hook = Hook::start(HookMode::Ok).await;
    // The default threshold: $0.000001 (1,000 nano-dollars), below one chat.
    let gw = db
        .gateway(&[
            ("COST_ALERT_WEBHOOK_URL", &hook.url),
            ("COST_ALERT_THRESHOLD", "0.000001"),
        ])
        .await;
    let store = gw.state.store.as_ref();
    // Its own threshold, $0.000004: crossed by the second chat (5,400 nano-dollars).
    let (own, own_key) = gw.tenant_named("own", settings(Some(0.000_004))).await;
    // Its own threshold, far above what it spends (and above the default).
    let (under, under_key) = gw.tenant_named("under", settings(Some(1000.0))).await;
    // No threshold of its own: `COST_ALERT_THRESHOLD` applies.
    let (default, default_key) = gw.tenant_named("default", settings(None)).await;

    // One chat: 2,700 of 4,000. Its record is written (and checked) alone.
    chat(&gw, &own_key).await;
    wait_for_records(store, None, 1, PATIENCE).await;
    // The second crosses the threshold: one event, reporting both chats.
    chat(&gw, &own_key).await;
    hook.wait_until("the alert of `own`", |d| !d.is_empty())
        .await;
    let day = day_of_latest(&gw, &own).await;
    assert_event(&hook.received()[0], &own, day, "0.000004000", "0.000005400");
    // More spending the same day raises nothing more.
    for _ in 0..3 {
        chat(&gw, &own_key).await;
    }
    // A tenant under its threshold, and one over the default threshold.
    for _ in 0..3 {
        chat(&gw, &under_key).await;
    }
    // Its first chat is written (and checked) alone: it alone crosses the default.
    chat(&gw, &default_key).await;
    wait_for_records(store, None, 9, PATIENCE).await;
    chat(&gw, &default_key).await;

    // Drains the writer (every record written and checked) and waits for the webhooks.
    gw.state.usage.shutdown().await;
    assert_eq!(store.count_usage(None).await.unwrap(), 10);
    assert_eq!(
        store.day_cost(&own, day).await.unwrap(),
        5 * CHAT_NANOS,
        "spend after the alert is still counted"
    );
    let received = hook.received();
    assert_eq!(received.len(), 2, "{received:#?}");
    let default_day = day_of_latest(&gw, &default).await;
    let default_event = received
        .iter()
        .find(|d| d.body["tenantId"] == default.as_str())
        .unwrap_or_else(|| panic!("no alert for the default threshold: {received:#?}"));
    // The first of its chats already crossed $0.000001.
    assert_event(
        default_event,
        &default,
        default_day,
        "0.000001000",
        CHAT_USD,
    );
    assert!(
        !received
            .iter()
            .any(|d| d.body["tenantId"] == under.as_str()),
        "{received:#?}"
    );

    let metrics = metrics_text(&gw).await;
    assert_eq!(cost_alerts_counted(&metrics, &own), 1.0, "{metrics}");
    assert_eq!(cost_alerts_counted(&metrics, &default), 1.0, "{metrics}");
    assert_eq!(cost_alerts_counted(&metrics, &under), 0.0, "{metrics}");

    let mut expected = vec![
        (own.clone(), day.to_string(), 4_000, 2 * CHAT_NANOS),
        (default.clone(), default_day.to_string(), 1_000, CHAT_NANOS),
    ];
    expected.sort();
    assert_eq!(alert_rows(&db).await, expected);
}

on_sqlite_and_postgres! {
    #[tokio::test]
    fires_once_when_the_threshold_is_crossed:
        fires_once_when_the_threshold_is_crossed_on_sqlite,
        fires_once_when_the_threshold_is_crossed_on_postgres
}

/// Without `COST_ALERT_THRESHOLD` and without a threshold of its own, a tenant is never
/// alerted, however much it spends; a webhook URL alone changes nothing.
#[tokio::test]
async fn no_threshold_no_alert() {
    let hook = Hook::start(HookMode::Ok).await;
    // Bound: the database's directory lives as long as the test.
    let db = Db::sqlite();
    let gw = db.gateway(&[("COST_ALERT_WEBHOOK_URL", &hook.url)]).await;
    let (tenant, key) = gw.tenant(settings(None)).await;
    for _ in 0..3 {
        chat(&gw, &key).await;
    }
    gw.state.usage.shutdown().await;
    assert_eq!(gw.state.store.count_usage(None).await.unwrap(), 3);
    assert!(hook.received().is_empty(), "{:#?}", hook.received());
    assert_eq!(cost_alerts_counted(&metrics_text(&gw).await, &tenant), 0.0);
}

// ---------------------------------------------------------------------------------------------
// 2. Once a day, again the next day.

async fn once_a_day_and_again_the_next(db: Db) {
    let hook = Hook::start(HookMode::Ok).await;
    let replica = Replica::start(&db, Some(WebhookConfig::new(&hook.url)), ONE_AT_A_TIME).await;
    let today = Utc::now();
    let tomorrow = today + TimeDelta::days(1);
    let (day1, day2) = (today.date_naive(), tomorrow.date_naive());
    let tenant = "daily";
    // 600 nano-dollars a request against 1,000: the second of each day crosses.
    for at in [today, today, today, tomorrow, tomorrow, tomorrow] {
        replica.usage.record(record(tenant, at, 600), Some(1_000));
        // Under its threshold all day.
        replica
            .usage
            .record(record("thrifty", at, 600), Some(10_000));
        // No threshold: never alerted.
        replica
            .usage
            .record(record("unwatched", at, 1_000_000_000), None);
    }
    replica.usage.shutdown().await;
    assert_eq!(replica.store.count_usage(None).await.unwrap(), 18);

    let mut received = hook.received();
    assert_eq!(received.len(), 2, "{received:#?}");
    received.sort_by_key(|d| d.body["day"].as_str().unwrap_or_default().to_owned());
    assert_event(&received[0], tenant, day1, "0.000001000", "0.000001200");
    assert_event(&received[1], tenant, day2, "0.000001000", "0.000001200");
    assert_eq!(replica.alerts_counted(tenant), 2.0);
    assert_eq!(replica.alerts_counted("thrifty"), 0.0);
    assert_eq!(replica.alerts_counted("unwatched"), 0.0);
    assert_eq!(
        alert_rows(&db).await,
        vec![
            (tenant.to_owned(), day1.to_string(), 1_000, 1_200),
            (tenant.to_owned(), day2.to_string(), 1_000, 1_200),
        ]
    );
}

on_sqlite_and_postgres! {
    #[tokio::test]
    once_a_day_and_again_the_next:
        once_a_day_and_again_the_next_on_sqlite,
        once_a_day_and_again_the_next_on_postgres
}

// ---------------------------------------------------------------------------------------------
// 3. Once across replicas and restarts.

const RACED_TENANTS: usize = 12;

async fn once_across_replicas_and_restarts(db: Db) {
    let hook = Hook::start(HookMode::Ok).await;
    let webhook = WebhookConfig::new(&hook.url);
    let a = Replica::start(&db, Some(webhook.clone()), ONE_AT_A_TIME).await;
    let b = Replica::start(&db, Some(webhook.clone()), ONE_AT_A_TIME).await;
    let now = Utc::now();
    let day = now.date_naive();

    // Both writers carry the same tenants' traffic at the same time; each of them alone sees
    // the threshold crossed (600 + 600 ≥ 1,000).
    let tenants: Vec<String> = (0..RACED_TENANTS).map(|i| format!("busy-{i}")).collect();
    for _ in 0..4 {
        for tenant in &tenants {
            a.usage.record(record(tenant, now, 600), Some(1_000));
            b.usage.record(record(tenant, now, 600), Some(1_000));
        }
    }
    tokio::join!(a.usage.shutdown(), b.usage.shutdown());
    assert_eq!(
        a.store.count_usage(None).await.unwrap(),
        8 * RACED_TENANTS as u64
    );

    // The tightest race: both replicas check the same, already crossed, tenant days at once.
    let raced: Vec<String> = (0..RACED_TENANTS).map(|i| format!("raced-{i}")).collect();
    let records: Vec<UsageRecord> = raced.iter().map(|t| record(t, now, 5_000)).collect();
    let thresholds = vec![Some(1_000); records.len()];
    a.store.insert_usage(&records).await.unwrap();
    tokio::join!(
        a.alerts.check(&records, &thresholds),
        b.alerts.check(&records, &thresholds)
    );
    tokio::join!(a.alerts.finish(PATIENCE), b.alerts.finish(PATIENCE));

    let all: Vec<&String> = tenants.iter().chain(&raced).collect();
    let received = hook.received();
    assert_eq!(received.len(), all.len(), "{received:#?}");
    let expected_ids: BTreeSet<String> = all.iter().map(|t| format!("{t}:{day}")).collect();
    assert_eq!(hook.ids(), expected_ids);
    for tenant in &all {
        assert_eq!(
            a.alerts_counted(tenant) + b.alerts_counted(tenant),
            1.0,
            "{tenant}"
        );
    }
    let rows = alert_rows(&db).await;
    assert_eq!(rows.len(), all.len(), "{rows:#?}");
    for (tenant, row_day, threshold, spent) in &rows {
        assert_eq!(
            (row_day.as_str(), *threshold),
            (day.to_string().as_str(), 1_000)
        );
        assert!(*spent >= 1_000, "{tenant}: {spent}");
    }
    drop((a, b));

    // A restart: a new replica, with nothing in memory, sees the same tenants spend more
    // the same day and raises nothing; a tenant new to it still gets its alert.
    let c = Replica::start(&db, Some(webhook), ONE_AT_A_TIME).await;
    for tenant in &all {
        c.usage.record(record(tenant, now, 600), Some(1_000));
        c.usage.record(record(tenant, now, 600), Some(1_000));
    }
    c.usage.record(record("newcomer", now, 2_000), Some(1_000));
    c.usage.shutdown().await;
    for tenant in &all {
        assert_eq!(c.alerts_counted(tenant), 0.0, "{tenant}");
    }
    assert_eq!(c.alerts_counted("newcomer"), 1.0);
    let received = hook.received();
    assert_eq!(received.len(), all.len() + 1, "{received:#?}");
    assert_eq!(received.last().unwrap().id(), format!("newcomer:{day}"));
    let mut after = alert_rows(&db).await;
    after.retain(|(tenant, ..)| tenant != "newcomer");
    assert_eq!(after, rows, "a restart rewrote the alerts already raised");
}

on_sqlite_and_postgres! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    once_across_replicas_and_restarts:
        once_across_replicas_and_restarts_on_sqlite,
        once_across_replicas_and_restarts_on_postgres
}

// ---------------------------------------------------------------------------------------------
// 4. Failing and stuck webhooks.

/// A webhook answering 500 gets the event `attempts` times, the same event each time; the
/// alert still counts as raised (metric, row) and is not sent again afterwards.
#[tokio::test]
async fn a_failing_webhook_is_retried_then_given_up() {
    meta_chat_llm::install_crypto_provider();
    let hook = Hook::start(HookMode::Fail).await;
    let db = Db::sqlite();
    let store = db.store().await;
    let metrics = Arc::new(Metrics::new(PriceTable::builtin()));
    let webhook = WebhookConfig {
        url: hook.url.clone(),
        attempts: 3,
        timeout: Duration::from_secs(10),
        backoff: Duration::from_millis(10),
    };
    let alerts = CostAlerts::new(Arc::clone(&store), Arc::clone(&metrics), Some(webhook));
    let now = Utc::now();
    let records = [record("failing", now, 2_000)];
    store.insert_usage(&records).await.unwrap();
    alerts.check(&records, &[Some(1_000)]).await;
    alerts.finish(PATIENCE).await;

    let received = hook.received();
    assert_eq!(received.len(), 3, "{received:#?}");
    assert_event(
        &received[0],
        "failing",
        now.date_naive(),
        "0.000001000",
        "0.000002000",
    );
    for attempt in &received[1..] {
        assert_eq!(
            attempt.body, received[0].body,
            "every attempt sends the same event"
        );
        assert_eq!(attempt.event_header.as_deref(), Some("cost_alert"));
    }
    assert!(hook.answered().is_empty());
    assert_eq!(cost_alerts_counted(&metrics.encode(), "failing"), 1.0);
    assert_eq!(alert_rows(&db).await.len(), 1);

    // More spending the same day: the alert was raised, nothing is sent again.
    let more = [record("failing", now, 2_000)];
    store.insert_usage(&more).await.unwrap();
    alerts.check(&more, &[Some(1_000)]).await;
    alerts.finish(PATIENCE).await;
    assert_eq!(hook.received().len(), 3);
    assert_eq!(cost_alerts_counted(&metrics.encode(), "failing"), 1.0);
}

/// A webhook that does not answer holds up neither the alert check nor the usage writer:
/// while the first delivery is stuck, the writer stores every later record and starts a
/// second tenant's delivery. Only then is the webhook released, and both are delivered.
#[tokio::test]
async fn a_stuck_webhook_holds_up_neither_checks_nor_the_writer() {
    let hook = Hook::start(HookMode::Hold).await;
    let db = Db::sqlite();
    let webhook = WebhookConfig {
        url: hook.url.clone(),
        attempts: 1,
        // Longer than the test: the attempt is only ever ended by the release.
        timeout: Duration::from_secs(600),
        backoff: Duration::from_millis(10),
    };
    let replica = Replica::start(&db, Some(webhook), ONE_AT_A_TIME).await;
    let now = Utc::now();
    let day = now.date_naive();

    // A direct check returns although its webhook delivery cannot finish before the release.
    let first = [record("stuck", now, 5_000)];
    replica.store.insert_usage(&first).await.unwrap();
    tokio::time::timeout(PATIENCE, replica.alerts.check(&first, &[Some(1_000)]))
        .await
        .expect("the alert check waits for its webhook");
    hook.wait_until("the first delivery", |d| d.len() == 1)
        .await;

    // The writer goes on: records, checks, another tenant's alert.
    for _ in 0..50 {
        replica.usage.record(record("stuck", now, 100), Some(1_000));
    }
    replica
        .usage
        .record(record("second", now, 5_000), Some(1_000));
    wait_for_records(replica.store.as_ref(), None, 52, PATIENCE).await;
    hook.wait_until("the second tenant's delivery", |d| {
        d.iter().any(|d| d.id() == format!("second:{day}"))
    })
    .await;
    assert!(
        hook.answered().is_empty(),
        "nothing can be answered before the release"
    );
    assert_eq!(hook.received().len(), 2, "{:#?}", hook.received());

    hook.release();
    replica.usage.shutdown().await;
    let answered: BTreeSet<String> = hook.answered().into_iter().collect();
    assert_eq!(
        answered,
        BTreeSet::from([format!("stuck:{day}"), format!("second:{day}")])
    );
    assert_eq!(hook.received().len(), 2);
    assert_eq!(replica.alerts_counted("stuck"), 1.0);
    assert_eq!(replica.alerts_counted("second"), 1.0);
}

/// Through the gateway (default webhook settings: 4 attempts, 5 s each): while the alert's
/// webhook holds its request, chat requests go on being answered and recorded, and another
/// tenant's alert still goes out. The webhook is released only after all of that happened.
#[tokio::test]
async fn a_stuck_webhook_does_not_hold_up_requests() {
    const REQUESTS: usize = 20;
    let hook = Hook::start(HookMode::Hold).await;
    // Bound: the database's directory lives as long as the test.
    let db = Db::sqlite();
    let gw = db.gateway(&[("COST_ALERT_WEBHOOK_URL", &hook.url)]).await;
    let store = gw.state.store.as_ref();
    let (first, first_key) = gw.tenant_named("first", settings(Some(0.000_001))).await;
    let (second, second_key) = gw.tenant_named("second", settings(Some(0.000_001))).await;

    chat(&gw, &first_key).await;
    hook.wait_until("the first tenant's delivery", |d| !d.is_empty())
        .await;
    // The delivery is stuck in the webhook until the release below.
    for _ in 0..REQUESTS {
        chat(&gw, &first_key).await;
        assert!(hook.answered().is_empty());
    }
    chat(&gw, &second_key).await;
    wait_for_records(store, None, REQUESTS as u64 + 2, PATIENCE).await;
    let day = day_of_latest(&gw, &second).await;
    hook.wait_until("the second tenant's delivery", |d| {
        d.iter().any(|d| d.id() == format!("{second}:{day}"))
    })
    .await;
    assert!(hook.answered().is_empty(), "released too early");

    hook.release();
    let first_day = day_of_latest(&gw, &first).await;
    let expected = BTreeSet::from([format!("{first}:{first_day}"), format!("{second}:{day}")]);
    let deadline = Instant::now() + PATIENCE;
    while hook.answered().into_iter().collect::<BTreeSet<_>>() != expected {
        assert!(
            Instant::now() < deadline,
            "not delivered after the release: {:#?}",
            hook.received()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Retries (if an attempt timed out while held) carry the same event ids.
    assert_eq!(hook.ids(), expected);
    let metrics = metrics_text(&gw).await;
    assert_eq!(cost_alerts_counted(&metrics, &first), 1.0, "{metrics}");
    assert_eq!(cost_alerts_counted(&metrics, &second), 1.0, "{metrics}");
    gw.state.usage.shutdown().await;
}
