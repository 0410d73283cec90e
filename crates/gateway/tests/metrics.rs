//! `GET /metrics` (SPEC §4.5) on a real socket, read back with a Prometheus text parser.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meta_chat::bootstrap;
use meta_chat::metrics::{Metrics, RequestObservation};
use meta_chat_llm::ProviderKind;
use prometheus_parse::{Sample, Scrape, Value};

const OPENMETRICS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";

/// A gateway over a fresh SQLite file whose metrics the test can also record into.
async fn gateway_with_metrics() -> (String, Arc<Metrics>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config([
        (
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("t.db").display()),
        ),
        ("ADMIN_API_KEY", common::ADMIN_KEY.to_owned()),
    ]);
    let (state, _) = bootstrap::app_state(config).await.unwrap();
    let metrics = Arc::clone(&state.metrics);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        meta_chat::server::serve(
            listener,
            meta_chat::api::router(state),
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    (format!("http://{addr}"), metrics, dir)
}

async fn get_metrics(base: &str, accept: Option<&str>) -> (String, String) {
    let mut request = reqwest::Client::new().get(format!("{base}/metrics"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (content_type, response.text().await.unwrap())
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).unwrap()
}

/// The kind of each family (`counter`, `gauge`, `histogram`, `untyped`) in the parsed
/// samples; `_sum` and `_count` of histograms are left out (the parser does not type them).
fn kinds(scrape: &Scrape) -> BTreeMap<String, &'static str> {
    scrape
        .samples
        .iter()
        .filter(|s| !s.metric.ends_with("_sum") && !s.metric.ends_with("_count"))
        .map(|s| {
            let kind = match s.value {
                Value::Counter(_) => "counter",
                Value::Gauge(_) => "gauge",
                Value::Histogram(_) => "histogram",
                Value::Summary(_) => "summary",
                Value::Untyped(_) => "untyped",
            };
            (s.metric.clone(), kind)
        })
        .collect()
}

fn sample<'s>(scrape: &'s Scrape, metric: &str, labels: &[(&str, &str)]) -> &'s Sample {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {metric} {labels:?} in {:#?}", scrape.samples))
}

fn scalar(sample: &Sample) -> f64 {
    match sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
        ref other => panic!("{} is not a scalar: {other:?}", sample.metric),
    }
}

#[tokio::test]
async fn a_fresh_gateway_serves_its_unlabelled_families_without_a_key() {
    let gateway = common::Gateway::start().await;
    let (content_type, text) = get_metrics(&gateway.base, None).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let scrape = parse(&text);
    let kinds = kinds(&scrape);
    assert_eq!(kinds["meta_chat_usage_queue_depth"], "gauge");
    assert_eq!(kinds["meta_chat_usage_dropped_total"], "counter");
    assert_eq!(kinds["meta_chat_usage_written_total"], "counter");
    assert!(scrape.docs.contains_key("meta_chat_usage_queue_depth"));

    // Prometheus asks for OpenMetrics and gets it.
    let (content_type, text) = get_metrics(&gateway.base, Some(OPENMETRICS_ACCEPT)).await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(text.contains("# TYPE meta_chat_usage_written counter\n"));
    assert!(text.ends_with("# EOF\n"), "{text}");

    let post = gateway
        .send(reqwest::Method::POST, "/metrics", None, None)
        .await;
    assert_eq!(post.status, 405);
}

#[tokio::test]
async fn recorded_observations_are_scraped_with_their_types_and_labels() {
    let (base, metrics, _dir) = gateway_with_metrics().await;
    let chat = RequestObservation {
        endpoint: "/v1/chat/completions",
        tenant: Some("tenant-1"),
        provider: Some(ProviderKind::Anthropic),
        model: "claude-3-haiku-20240307",
        status: 200,
        upstream_latency: Some(Duration::from_millis(700)),
        time_to_first_token: Some(Duration::from_millis(90)),
        overhead: Some(Duration::from_micros(300)),
        input_tokens: 1000,
        output_tokens: 1000,
        cost_nano_usd: 1_500_000,
        fallback_from: Some(ProviderKind::OpenAi),
        ..RequestObservation::default()
    };
    metrics.record_request(&chat);
    metrics.record_request(&RequestObservation {
        endpoint: "/v1/embeddings",
        provider: Some(ProviderKind::OpenAi),
        model: "some-private-embedder",
        status: 429,
        error_kind: Some("rate_limited"),
        embedding_tokens: 12,
        fallback_from: None,
        ..chat.clone()
    });
    metrics.record_rejection("/v1/chat/completions", "invalid_api_key");
    metrics.record_cache_hit("tenant-1");
    metrics.record_rate_limited("tenant-1", "rate_limit_exceeded");
    metrics.record_cost_alert("tenant-1");
    // The queue depth is re-read from the usage writer at every scrape (empty here); the
    // counters only ever rise to the writer's totals.
    metrics.add_usage_dropped(1);
    metrics.add_usage_written(9);

    let (_, text) = get_metrics(&base, None).await;
    let scrape = parse(&text);
    let kinds = kinds(&scrape);
    for (family, kind) in [
        ("meta_chat_requests_total", "counter"),
        ("meta_chat_request_duration_seconds", "histogram"),
        ("meta_chat_time_to_first_token_seconds", "histogram"),
        ("meta_chat_overhead_seconds", "histogram"),
        ("meta_chat_tokens_total", "counter"),
        ("meta_chat_cost_usd_total", "counter"),
        ("meta_chat_cache_hits_total", "counter"),
        ("meta_chat_rate_limited_total", "counter"),
        ("meta_chat_fallbacks_total", "counter"),
        ("meta_chat_cost_alerts_total", "counter"),
        ("meta_chat_rejected_requests_total", "counter"),
        ("meta_chat_usage_queue_depth", "gauge"),
        ("meta_chat_usage_dropped_total", "counter"),
        ("meta_chat_usage_written_total", "counter"),
    ] {
        assert_eq!(
            kinds.get(family).copied(),
            Some(kind),
            "{family} in\n{text}"
        );
    }

    let ok = sample(
        &scrape,
        "meta_chat_requests_total",
        &[
            ("endpoint", "/v1/chat/completions"),
            ("provider", "anthropic"),
            ("model", "claude-3-haiku-20240307"),
            ("status", "200"),
            ("error_kind", ""),
        ],
    );
    assert_eq!(scalar(ok), 1.0);
    // A model the price table does not name is counted as `other`.
    let limited = sample(
        &scrape,
        "meta_chat_requests_total",
        &[
            ("endpoint", "/v1/embeddings"),
            ("provider", "openai"),
            ("model", "other"),
            ("status", "429"),
            ("error_kind", "rate_limited"),
        ],
    );
    assert_eq!(scalar(limited), 1.0);
    assert!(!text.contains("some-private-embedder"));

    let latency = sample(
        &scrape,
        "meta_chat_request_duration_seconds",
        &[
            ("provider", "anthropic"),
            ("model", "claude-3-haiku-20240307"),
        ],
    );
    let Value::Histogram(buckets) = &latency.value else {
        panic!("{latency:?}")
    };
    let count_at = |le: f64| buckets.iter().find(|b| b.less_than == le).unwrap().count;
    assert_eq!(count_at(0.5), 0.0);
    assert_eq!(count_at(1.0), 1.0);
    assert_eq!(count_at(f64::INFINITY), 1.0);

    let overhead = sample(
        &scrape,
        "meta_chat_overhead_seconds",
        &[("endpoint", "/v1/chat/completions")],
    );
    let Value::Histogram(buckets) = &overhead.value else {
        panic!("{overhead:?}")
    };
    assert!(buckets.iter().any(|b| b.less_than == 0.000_05));
    assert!(buckets.iter().any(|b| b.less_than == 0.05));

    let tokens = |model, kind| {
        scalar(sample(
            &scrape,
            "meta_chat_tokens_total",
            &[("tenant", "tenant-1"), ("model", model), ("kind", kind)],
        ))
    };
    assert_eq!(tokens("claude-3-haiku-20240307", "input"), 1000.0);
    assert_eq!(tokens("claude-3-haiku-20240307", "output"), 1000.0);
    assert_eq!(tokens("other", "embedding"), 12.0);
    let cost = sample(
        &scrape,
        "meta_chat_cost_usd_total",
        &[("tenant", "tenant-1"), ("provider", "anthropic")],
    );
    assert_eq!(scalar(cost), 0.0015);

    for (metric, labels, expected) in [
        (
            "meta_chat_fallbacks_total",
            &[("from", "openai"), ("to", "anthropic")][..],
            1.0,
        ),
        (
            "meta_chat_rejected_requests_total",
            &[
                ("endpoint", "/v1/chat/completions"),
                ("reason", "invalid_api_key"),
            ],
            1.0,
        ),
        ("meta_chat_cache_hits_total", &[("tenant", "tenant-1")], 1.0),
        (
            "meta_chat_rate_limited_total",
            &[("tenant", "tenant-1"), ("reason", "rate_limit_exceeded")],
            1.0,
        ),
        (
            "meta_chat_cost_alerts_total",
            &[("tenant", "tenant-1")],
            1.0,
        ),
        ("meta_chat_usage_queue_depth", &[], 0.0),
        ("meta_chat_usage_dropped_total", &[], 1.0),
        ("meta_chat_usage_written_total", &[], 9.0),
    ] {
        assert_eq!(
            scalar(sample(&scrape, metric, labels)),
            expected,
            "{metric}"
        );
    }
}

#[tokio::test]
async fn real_requests_move_the_counters() {
    let gw = common::Gateway::start().await;
    let (tenant, key) = gw
        .tenant(serde_json::json!({"llm": {"provider": "openai", "model": "gpt-4o-mini"}}))
        .await;
    gw.fake
        .push(meta_chat_testkit::Reply::text("Four.").with_usage(10, 2));
    let body = serde_json::json!({"messages": [{"role": "user", "content": "2+2?"}]});
    assert_eq!(gw.chat(&key, &body).await.status, 200);
    assert_eq!(gw.chat("mc_wrong", &body).await.status, 401);
    let bad = serde_json::json!({"messages": [], "temperature": 3});
    assert_eq!(gw.chat(&key, &bad).await.status, 400);

    let (_, text) = get_metrics(&gw.base, None).await;
    let scrape = parse(&text);
    let requests = sample(
        &scrape,
        "meta_chat_requests_total",
        &[
            ("endpoint", "chat"),
            ("provider", "openai"),
            ("model", "gpt-4o-mini"),
            ("status", "200"),
        ],
    );
    assert_eq!(scalar(requests), 1.0);
    let input = sample(
        &scrape,
        "meta_chat_tokens_total",
        &[("tenant", &tenant), ("kind", "input")],
    );
    assert_eq!(scalar(input), 10.0);
    let unauthenticated = sample(
        &scrape,
        "meta_chat_rejected_requests_total",
        &[("endpoint", "chat"), ("reason", "unauthenticated")],
    );
    assert_eq!(scalar(unauthenticated), 1.0);
    let invalid = sample(
        &scrape,
        "meta_chat_rejected_requests_total",
        &[("endpoint", "chat"), ("reason", "invalid_request")],
    );
    assert_eq!(scalar(invalid), 1.0);
    // Every answer has an overhead, refusals included.
    assert!(
        text.contains("meta_chat_overhead_seconds_count{endpoint=\"chat\"} 3"),
        "{text}"
    );
}
