//! Prometheus metrics (SPEC §4.5): one registry, its names, and typed recording methods for
//! the request path, the rate limiter, the cache and the usage recorder.
//!
//! Every family is named `meta_chat_*`:
//!
//! | family | type | labels |
//! |---|---|---|
//! | `meta_chat_requests_total` | counter | `endpoint`, `provider`, `model`, `status`, `error_kind` |
//! | `meta_chat_request_duration_seconds` | histogram | `provider`, `model` (upstream latency) |
//! | `meta_chat_time_to_first_token_seconds` | histogram | `provider`, `model` |
//! | `meta_chat_overhead_seconds` | histogram | `endpoint` (gateway time, upstream excluded) |
//! | `meta_chat_tokens_total` | counter | `tenant`, `provider`, `model`, `kind` (`input`, `output`, `embedding`) |
//! | `meta_chat_cost_usd_total` | counter | `tenant`, `provider`, `model` |
//! | `meta_chat_cache_hits_total` | counter | `tenant` |
//! | `meta_chat_rate_limited_total` | counter | `tenant`, `reason` |
//! | `meta_chat_fallbacks_total` | counter | `from`, `to` (providers) |
//! | `meta_chat_cost_alerts_total` | counter | `tenant` |
//! | `meta_chat_rejected_requests_total` | counter | `endpoint`, `reason` (before any provider) |
//! | `meta_chat_usage_queue_depth` | gauge | |
//! | `meta_chat_usage_dropped_total` | counter | |
//! | `meta_chat_usage_written_total` | counter | |
//! | `meta_chat_redis_errors_total` | counter | `operation` (`rate_limit`, `budget`, `tokens`, `cache_get`, `cache_put`) |
//!
//! Label values are bounded, so the number of series is too: endpoints, error kinds and
//! reasons are `&'static str` codes; statuses are HTTP codes; providers are the known
//! [`ProviderKind`]s; a model is kept only when the price table has an entry for it
//! ([`PriceTable::known_model`]) and is `other` otherwise; tenants are ids from the tenant
//! table, and must be those of authenticated tenants, never ids taken from a request. An
//! empty value means "none": no provider was reached, no error, no tenant (the admin key).
//!
//! A family appears in the exposition once it has a series: labelled families stay absent
//! until their first observation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use meta_chat_llm::{PriceTable, ProviderKind};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of [`Metrics::encode`]: the Prometheus text format, version 0.0.4.
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The `Content-Type` of [`Metrics::encode_openmetrics`]: OpenMetrics text, version 1.0.0.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The model label of a model the price table does not know.
pub const OTHER_MODEL: &str = "other";

/// Upstream latency: 25 ms to 160 s.
const REQUEST_DURATION_BUCKETS: [f64; 14] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 160.0,
];

/// Time to first token: 10 ms to 20 s, finest around a second.
const TIME_TO_FIRST_TOKEN_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 20.0,
];

/// Gateway overhead: 25 µs to 1 ms finely (where a healthy gateway sits: 50–300 µs), then
/// coarser to 500 ms to see outliers.
const OVERHEAD_BUCKETS: [f64; 20] = [
    0.000_025, 0.000_05, 0.000_075, 0.000_1, 0.000_15, 0.000_2, 0.000_25, 0.000_3, 0.000_4,
    0.000_5, 0.000_75, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
];

/// What one request that got past authentication and validation did, for
/// [`Metrics::record_request`]. Fields left at their default are not observed.
#[derive(Debug, Clone, Default)]
pub struct RequestObservation<'a> {
    /// The API route, such as `/v1/chat/completions`.
    pub endpoint: &'static str,
    /// The authenticated tenant's id; `None` for the admin key.
    pub tenant: Option<&'a str>,
    /// The provider that served (or last failed) the request; `None` if none was reached.
    pub provider: Option<ProviderKind>,
    /// The model as requested or routed; reduced to the price table's name or `other`.
    pub model: &'a str,
    /// The HTTP status answered.
    pub status: u16,
    /// The error code when the request failed (`rate_limited`, `upstream_error`, `timeout`,
    /// …); `None` on success.
    pub error_kind: Option<&'static str>,
    /// Time spent waiting on the upstream, retries included.
    pub upstream_latency: Option<Duration>,
    /// Time from the request to the first streamed token.
    pub time_to_first_token: Option<Duration>,
    /// The gateway's own time: the whole request minus [`Self::upstream_latency`].
    pub overhead: Option<Duration>,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Embedded tokens.
    pub embedding_tokens: u64,
    /// Cost in nano-dollars (1e-9 USD).
    pub cost_nano_usd: u64,
    /// The provider that failed before [`Self::provider`] took over, if any.
    pub fallback_from: Option<ProviderKind>,
}

/// The registry and every family in it. Share it in an [`Arc`]; recording takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    prices: Arc<PriceTable>,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<ProviderModelLabels>,
    time_to_first_token: HistogramFamily<ProviderModelLabels>,
    overhead: HistogramFamily<EndpointLabels>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<TenantProviderModelLabels, UsdCounter>,
    cache_hits: Family<TenantLabels, Counter>,
    rate_limited: Family<TenantReasonLabels, Counter>,
    fallbacks: Family<FallbackLabels, Counter>,
    cost_alerts: Family<TenantLabels, Counter>,
    rejected: Family<EndpointReasonLabels, Counter>,
    usage_queue_depth: Gauge<i64, AtomicI64>,
    usage_dropped: Counter,
    usage_written: Counter,
    redis_errors: Family<OperationLabels, Counter>,
    /// Handles of the series a tenant's requests to a provider and model record into.
    series: SeriesMemo,
}

/// A tenant's requests to one provider and model (as the request named it) record into the
/// same series every time: their handles are resolved on the first request and kept here, so
/// later requests cost a map lookup and atomic adds instead of a price-table lookup and a
/// labelled look-up (with owned label strings) per family. Each handle is created on first
/// use, so a series still appears only once it has an observation.
#[derive(Debug, Default)]
struct SeriesMemo {
    entries: std::sync::RwLock<MemoEntries>,
}

#[derive(Debug, Default)]
struct MemoEntries {
    /// By tenant id, then by provider, then by model name.
    by_tenant: HashMap<String, [HashMap<String, Arc<Series>>; 3]>,
    /// How many series `by_tenant` holds.
    len: usize,
}

/// Models remembered across tenants and providers; past it the memo starts over (the families
/// keep every series; only the shortcuts to them are dropped).
const MAX_MEMOIZED_SERIES: usize = 10_000;

#[derive(Debug)]
struct Series {
    /// The `model` label ([`Metrics::model_label`]).
    model: String,
    duration: OnceLock<Histogram>,
    time_to_first_token: OnceLock<Histogram>,
    /// Input, output and embedding tokens.
    tokens: [OnceLock<Counter>; 3],
    cost: OnceLock<UsdCounter>,
}

fn provider_index(provider: ProviderKind) -> usize {
    match provider {
        ProviderKind::OpenAi => 0,
        ProviderKind::Anthropic => 1,
        ProviderKind::Ollama => 2,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    provider: &'static str,
    model: String,
    status: u16,
    error_kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProviderModelLabels {
    provider: &'static str,
    model: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenLabels {
    tenant: String,
    provider: &'static str,
    model: String,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TenantProviderModelLabels {
    tenant: String,
    provider: &'static str,
    model: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TenantReasonLabels {
    tenant: String,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FallbackLabels {
    from: &'static str,
    to: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointReasonLabels {
    endpoint: &'static str,
    reason: &'static str,
}

/// A counter of USD that adds integer nano-dollars and shows dollars only when encoded, so
/// no float is ever summed.
#[derive(Debug, Clone, Default)]
struct UsdCounter {
    nano_usd: Arc<AtomicU64>,
}

impl UsdCounter {
    fn add_nanos(&self, nano_usd: u64) {
        // Saturating: a counter must never wrap to a smaller value.
        let _ = self
            .nano_usd
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
                Some(total.saturating_add(nano_usd))
            });
    }

    fn usd(&self) -> f64 {
        // Exact up to 2^53 nano-dollars (about 9 million USD), then within a nano-dollar's
        // relative precision of it.
        self.nano_usd.load(Ordering::Relaxed) as f64 / 1e9
    }
}

impl TypedMetric for UsdCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for UsdCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.usd(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn request_duration_histogram() -> Histogram {
    Histogram::new(REQUEST_DURATION_BUCKETS)
}

fn time_to_first_token_histogram() -> Histogram {
    Histogram::new(TIME_TO_FIRST_TOKEN_BUCKETS)
}

fn overhead_histogram() -> Histogram {
    Histogram::new(OVERHEAD_BUCKETS)
}

fn provider_label(provider: Option<ProviderKind>) -> &'static str {
    provider.map_or("", ProviderKind::as_str)
}

impl Metrics {
    /// An empty registry with every family registered. `prices` decides which model names
    /// are kept as labels (see [`Metrics::model_label`]).
    pub fn new(prices: Arc<PriceTable>) -> Self {
        let mut registry = Registry::with_prefix("meta_chat");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests past authentication and validation, by endpoint, provider, model, HTTP status and error kind",
            requests.clone(),
        );
        let request_duration: HistogramFamily<ProviderModelLabels> =
            Family::new_with_constructor(request_duration_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time spent waiting on the upstream provider, retries included",
            Unit::Seconds,
            request_duration.clone(),
        );
        let time_to_first_token: HistogramFamily<ProviderModelLabels> =
            Family::new_with_constructor(time_to_first_token_histogram);
        registry.register_with_unit(
            "time_to_first_token",
            "Time from the request to the first streamed token",
            Unit::Seconds,
            time_to_first_token.clone(),
        );
        let overhead: HistogramFamily<EndpointLabels> =
            Family::new_with_constructor(overhead_histogram);
        registry.register_with_unit(
            "overhead",
            "Time the gateway itself spent on a request, upstream time excluded",
            Unit::Seconds,
            overhead.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens used, by tenant, provider, model and kind (input, output, embedding)",
            tokens.clone(),
        );
        let cost = Family::<TenantProviderModelLabels, UsdCounter>::default();
        registry.register_with_unit(
            "cost",
            "Cost of requests in USD, by tenant, provider and model",
            Unit::Other("usd".to_owned()),
            cost.clone(),
        );
        let cache_hits = Family::<TenantLabels, Counter>::default();
        registry.register(
            "cache_hits",
            "Requests answered from the response cache",
            cache_hits.clone(),
        );
        let rate_limited = Family::<TenantReasonLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit or budget, by tenant and reason",
            rate_limited.clone(),
        );
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        registry.register(
            "fallbacks",
            "Requests passed from a failing provider to the next one",
            fallbacks.clone(),
        );
        let cost_alerts = Family::<TenantLabels, Counter>::default();
        registry.register(
            "cost_alerts",
            "Daily cost alerts raised, by tenant",
            cost_alerts.clone(),
        );
        let rejected = Family::<EndpointReasonLabels, Counter>::default();
        registry.register(
            "rejected_requests",
            "Requests rejected before reaching a provider (authentication, validation), by endpoint and reason",
            rejected.clone(),
        );
        let usage_queue_depth = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "usage_queue_depth",
            "Usage records waiting to be written",
            usage_queue_depth.clone(),
        );
        let usage_dropped = Counter::default();
        registry.register(
            "usage_dropped",
            "Usage records dropped because the queue was full or the write failed",
            usage_dropped.clone(),
        );
        let usage_written = Counter::default();
        registry.register(
            "usage_written",
            "Usage records written to the database",
            usage_written.clone(),
        );
        let redis_errors = Family::<OperationLabels, Counter>::default();
        registry.register(
            "redis_errors",
            "Redis operations that failed or timed out (the request went on without them), by operation",
            redis_errors.clone(),
        );
        Self {
            registry,
            prices,
            requests,
            request_duration,
            time_to_first_token,
            overhead,
            tokens,
            cost,
            cache_hits,
            rate_limited,
            fallbacks,
            cost_alerts,
            rejected,
            usage_queue_depth,
            usage_dropped,
            usage_written,
            redis_errors,
            series: SeriesMemo::default(),
        }
    }

    /// Counts a Redis operation that failed or timed out.
    pub fn record_redis_error(&self, operation: &'static str) {
        self.redis_errors
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    /// The `model` label for `model` at `provider`: the price table's name for it, or
    /// [`OTHER_MODEL`] for a model the table does not name (so clients cannot grow the
    /// number of series); empty when there is neither provider nor model.
    pub fn model_label(&self, provider: Option<ProviderKind>, model: &str) -> String {
        match provider {
            Some(provider) => self
                .prices
                .known_model(provider, model)
                .unwrap_or_else(|| OTHER_MODEL.to_owned()),
            None if model.trim().is_empty() => String::new(),
            None => OTHER_MODEL.to_owned(),
        }
    }

    /// The memoized series of `tenant`'s requests to `model` at `provider`.
    fn series(&self, tenant: &str, provider: ProviderKind, model: &str) -> Arc<Series> {
        let at = provider_index(provider);
        let memo = &self.series.entries;
        let known = memo.read().ok().and_then(|entries| {
            entries
                .by_tenant
                .get(tenant)
                .and_then(|by_provider| by_provider[at].get(model).cloned())
        });
        if let Some(series) = known {
            return series;
        }
        let series = Arc::new(Series {
            model: self.model_label(Some(provider), model),
            duration: OnceLock::new(),
            time_to_first_token: OnceLock::new(),
            tokens: Default::default(),
            cost: OnceLock::new(),
        });
        if let Ok(mut entries) = memo.write() {
            if entries.len >= MAX_MEMOIZED_SERIES {
                *entries = MemoEntries::default();
            }
            // Another request may have put it there since the read: keep the first.
            let by_model = &mut entries.by_tenant.entry(tenant.to_owned()).or_default()[at];
            if let Some(first) = by_model.get(model) {
                return first.clone();
            }
            by_model.insert(model.to_owned(), series.clone());
            entries.len += 1;
        }
        series
    }

    /// Records one request: its count, latencies, tokens, cost and fallback.
    ///
    /// Latencies and the fallback need a provider; token and cost series are created only
    /// for non-zero amounts.
    pub fn record_request(&self, r: &RequestObservation<'_>) {
        let provider = provider_label(r.provider);
        let tenant = r.tenant.unwrap_or_default();
        let series = r.provider.map(|to| self.series(tenant, to, r.model));
        let model = match &series {
            Some(series) => series.model.clone(),
            None => self.model_label(None, r.model),
        };
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: r.endpoint,
                provider,
                model,
                status: r.status,
                error_kind: r.error_kind.unwrap_or_default(),
            })
            .inc();
        if let Some(overhead) = r.overhead {
            self.overhead
                .get_or_create(&EndpointLabels {
                    endpoint: r.endpoint,
                })
                .observe(overhead.as_secs_f64());
        }
        let (Some(to), Some(series)) = (r.provider, series) else {
            return;
        };
        let provider_model = || ProviderModelLabels {
            provider,
            model: series.model.clone(),
        };
        if let Some(latency) = r.upstream_latency {
            series
                .duration
                .get_or_init(|| {
                    self.request_duration
                        .get_or_create(&provider_model())
                        .clone()
                })
                .observe(latency.as_secs_f64());
        }
        if let Some(ttft) = r.time_to_first_token {
            series
                .time_to_first_token
                .get_or_init(|| {
                    self.time_to_first_token
                        .get_or_create(&provider_model())
                        .clone()
                })
                .observe(ttft.as_secs_f64());
        }
        for ((kind, amount), handle) in [
            ("input", r.input_tokens),
            ("output", r.output_tokens),
            ("embedding", r.embedding_tokens),
        ]
        .into_iter()
        .zip(&series.tokens)
        {
            if amount > 0 {
                handle
                    .get_or_init(|| {
                        self.tokens
                            .get_or_create(&TokenLabels {
                                tenant: tenant.to_owned(),
                                provider,
                                model: series.model.clone(),
                                kind,
                            })
                            .clone()
                    })
                    .inc_by(amount);
            }
        }
        if r.cost_nano_usd > 0 {
            series
                .cost
                .get_or_init(|| {
                    self.cost
                        .get_or_create(&TenantProviderModelLabels {
                            tenant: tenant.to_owned(),
                            provider,
                            model: series.model.clone(),
                        })
                        .clone()
                })
                .add_nanos(r.cost_nano_usd);
        }
        if let Some(from) = r.fallback_from {
            self.fallbacks
                .get_or_create(&FallbackLabels {
                    from: from.as_str(),
                    to: to.as_str(),
                })
                .inc();
        }
    }

    /// Brings the usage writer's figures up to date: the queue depth, and the written and
    /// dropped counters raised to the writer's running totals (they never go down).
    pub fn sync_usage(&self, queue_depth: usize, written: u64, dropped: u64) {
        self.set_usage_queue_depth(queue_depth);
        let written_now = self.usage_written.get();
        if written > written_now {
            self.usage_written.inc_by(written - written_now);
        }
        let dropped_now = self.usage_dropped.get();
        if dropped > dropped_now {
            self.usage_dropped.inc_by(dropped - dropped_now);
        }
    }

    /// Observes the gateway's overhead for one request (upstream time excluded).
    pub fn record_overhead(&self, endpoint: &'static str, overhead: Duration) {
        self.overhead
            .get_or_create(&EndpointLabels { endpoint })
            .observe(overhead.as_secs_f64());
    }

    /// Counts a request rejected before it reached a provider, such as a bad key
    /// (`reason` `invalid_api_key`) or an invalid body (`invalid_request`).
    pub fn record_rejection(&self, endpoint: &'static str, reason: &'static str) {
        self.rejected
            .get_or_create(&EndpointReasonLabels { endpoint, reason })
            .inc();
    }

    /// Counts a request answered from the response cache.
    pub fn record_cache_hit(&self, tenant: &str) {
        self.cache_hits
            .get_or_create(&TenantLabels {
                tenant: tenant.to_owned(),
            })
            .inc();
    }

    /// Counts a request refused by a limit; `reason` is the error code, such as
    /// `rate_limit_exceeded` or `budget_exceeded`.
    pub fn record_rate_limited(&self, tenant: &str, reason: &'static str) {
        self.rate_limited
            .get_or_create(&TenantReasonLabels {
                tenant: tenant.to_owned(),
                reason,
            })
            .inc();
    }

    /// Counts a daily cost alert raised for `tenant`.
    pub fn record_cost_alert(&self, tenant: &str) {
        self.cost_alerts
            .get_or_create(&TenantLabels {
                tenant: tenant.to_owned(),
            })
            .inc();
    }

    /// Sets the number of usage records waiting to be written.
    pub fn set_usage_queue_depth(&self, depth: usize) {
        self.usage_queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// Counts usage records that were dropped.
    pub fn add_usage_dropped(&self, records: u64) {
        self.usage_dropped.inc_by(records);
    }

    /// Counts usage records that were written.
    pub fn add_usage_written(&self, records: u64) {
        self.usage_written.inc_by(records);
    }

    /// The registry in the Prometheus text format, version 0.0.4
    /// ([`PROMETHEUS_CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) =
            prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
        {
            tracing::warn!(%error, "cannot encode metrics");
        }
        text
    }

    /// The registry in the OpenMetrics text format, version 1.0.0
    /// ([`OPENMETRICS_CONTENT_TYPE`]), ending with `# EOF`.
    pub fn encode_openmetrics(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(PriceTable::builtin())
    }

    /// The sample lines of `text` whose name and labels start with `prefix`.
    fn samples<'t>(text: &'t str, prefix: &str) -> Vec<&'t str> {
        text.lines()
            .filter(|line| !line.starts_with('#') && line.starts_with(prefix))
            .collect()
    }

    /// The value of the one sample `series` (name and labels exactly as encoded).
    fn value(text: &str, series: &str) -> f64 {
        let found: Vec<f64> = text
            .lines()
            .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(found.len(), 1, "{series} in\n{text}");
        found[0]
    }

    fn chat() -> RequestObservation<'static> {
        RequestObservation {
            endpoint: "/v1/chat/completions",
            tenant: Some("t1"),
            provider: Some(ProviderKind::OpenAi),
            model: "gpt-4o-mini-2024-07-18",
            status: 200,
            upstream_latency: Some(Duration::from_millis(300)),
            time_to_first_token: Some(Duration::from_millis(120)),
            overhead: Some(Duration::from_micros(400)),
            input_tokens: 1000,
            output_tokens: 500,
            cost_nano_usd: 450_000,
            ..RequestObservation::default()
        }
    }

    #[test]
    fn memoized_series_keep_counting_and_appear_only_once_observed() {
        let m = metrics();
        // A non-streamed request: no time to first token, no embedding tokens.
        let plain = RequestObservation {
            time_to_first_token: None,
            ..chat()
        };
        m.record_request(&plain);
        let text = m.encode();
        assert!(samples(&text, "meta_chat_time_to_first_token_seconds").is_empty());
        let embedding = r#"meta_chat_tokens_total{tenant="t1",provider="openai",model="gpt-4o-mini",kind="embedding"}"#;
        assert!(samples(&text, embedding).is_empty());
        // The same tenant and model again, streamed, and another tenant: the handles are
        // the memoized ones, the families the same.
        m.record_request(&chat());
        m.record_request(&RequestObservation {
            tenant: Some("t2"),
            ..chat()
        });
        // A model the table does not know is labelled `other`, memoized or not.
        for _ in 0..2 {
            m.record_request(&RequestObservation {
                model: "my-finetune",
                ..chat()
            });
        }
        let text = m.encode();
        let pm = r#"{provider="openai",model="gpt-4o-mini"}"#;
        assert_eq!(
            value(
                &text,
                &format!("meta_chat_request_duration_seconds_count{pm}")
            ),
            3.0
        );
        assert_eq!(
            value(
                &text,
                &format!("meta_chat_time_to_first_token_seconds_count{pm}")
            ),
            2.0
        );
        for (tenant, input) in [("t1", 2000.0), ("t2", 1000.0)] {
            assert_eq!(
                value(
                    &text,
                    &format!(
                        r#"meta_chat_tokens_total{{tenant="{tenant}",provider="openai",model="gpt-4o-mini",kind="input"}}"#
                    )
                ),
                input
            );
        }
        assert_eq!(
            value(
                &text,
                r#"meta_chat_tokens_total{tenant="t1",provider="openai",model="other",kind="input"}"#
            ),
            2000.0
        );
    }

    #[test]
    fn recording_a_request_moves_every_family_it_touches() {
        let m = metrics();
        m.record_request(&chat());
        m.record_request(&chat());
        let text = m.encode();
        assert_eq!(
            value(
                &text,
                r#"meta_chat_requests_total{endpoint="/v1/chat/completions",provider="openai",model="gpt-4o-mini",status="200",error_kind=""}"#
            ),
            2.0
        );
        let pm = r#"{provider="openai",model="gpt-4o-mini"}"#;
        assert_eq!(
            value(
                &text,
                &format!("meta_chat_request_duration_seconds_count{pm}")
            ),
            2.0
        );
        assert!(
            (value(
                &text,
                &format!("meta_chat_request_duration_seconds_sum{pm}")
            ) - 0.6)
                .abs()
                < 1e-9
        );
        assert_eq!(
            value(
                &text,
                r#"meta_chat_request_duration_seconds_bucket{provider="openai",model="gpt-4o-mini",le="0.25"}"#
            ),
            0.0
        );
        assert_eq!(
            value(
                &text,
                r#"meta_chat_request_duration_seconds_bucket{provider="openai",model="gpt-4o-mini",le="0.5"}"#
            ),
            2.0
        );
        assert_eq!(
            value(
                &text,
                &format!("meta_chat_time_to_first_token_seconds_count{pm}")
            ),
            2.0
        );
        assert_eq!(
            value(
                &text,
                r#"meta_chat_overhead_seconds_bucket{endpoint="/v1/chat/completions",le="0.0005"}"#
            ),
            2.0
        );
        assert_eq!(
            value(
                &text,
                r#"meta_chat_overhead_seconds_bucket{endpoint="/v1/chat/completions",le="0.00025"}"#
            ),
            0.0
        );
        let tpm = r#"tenant="t1",provider="openai",model="gpt-4o-mini""#;
        assert_eq!(
            value(
                &text,
                &format!(r#"meta_chat_tokens_total{{{tpm},kind="input"}}"#)
            ),
            2000.0
        );
        assert_eq!(
            value(
                &text,
                &format!(r#"meta_chat_tokens_total{{{tpm},kind="output"}}"#)
            ),
            1000.0
        );
        // No embedding tokens: no series for them.
        assert!(samples(&text, r#"meta_chat_tokens_total{tenant="t1""#).len() == 2);
        // 2 × 450 000 nano-dollars, summed as integers and shown in USD.
        assert_eq!(
            value(&text, &format!("meta_chat_cost_usd_total{{{tpm}}}")),
            0.0009
        );
        // No fallback happened.
        assert!(!text.contains("meta_chat_fallbacks_total"));
    }

    #[test]
    fn errors_and_fallbacks_are_labelled() {
        let m = metrics();
        m.record_request(&RequestObservation {
            endpoint: "/v1/chat/completions",
            tenant: Some("t1"),
            provider: Some(ProviderKind::Anthropic),
            model: "claude-3-haiku-20240307",
            status: 502,
            error_kind: Some("upstream_error"),
            fallback_from: Some(ProviderKind::OpenAi),
            ..RequestObservation::default()
        });
        let text = m.encode();
        assert_eq!(
            value(
                &text,
                r#"meta_chat_requests_total{endpoint="/v1/chat/completions",provider="anthropic",model="claude-3-haiku-20240307",status="502",error_kind="upstream_error"}"#
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                r#"meta_chat_fallbacks_total{from="openai",to="anthropic"}"#
            ),
            1.0
        );
        // Nothing measured, nothing used: no latency, token or cost series.
        for family in [
            "meta_chat_request_duration_seconds",
            "meta_chat_time_to_first_token_seconds",
            "meta_chat_overhead_seconds",
            "meta_chat_tokens_total",
            "meta_chat_cost_usd_total",
        ] {
            assert!(samples(&text, family).is_empty(), "{family}");
        }
    }

    #[test]
    fn unknown_models_are_other() {
        let m = metrics();
        assert_eq!(
            m.model_label(Some(ProviderKind::OpenAi), "gpt-4o"),
            "gpt-4o"
        );
        assert_eq!(
            m.model_label(Some(ProviderKind::OpenAi), "openai/gpt-4o-2024-08-06"),
            "gpt-4o"
        );
        assert_eq!(
            m.model_label(Some(ProviderKind::OpenAi), "my-finetune"),
            "other"
        );
        assert_eq!(
            m.model_label(Some(ProviderKind::Anthropic), "gpt-4o"),
            "other"
        );
        // Ollama models are priced (free) by a provider default, not named by the table.
        assert_eq!(
            m.model_label(Some(ProviderKind::Ollama), "llama3.1:8b"),
            "other"
        );
        assert_eq!(m.model_label(None, "anything"), "other");
        assert_eq!(m.model_label(None, ""), "");

        for i in 0..50 {
            m.record_request(&RequestObservation {
                endpoint: "/v1/chat/completions",
                tenant: Some("t1"),
                provider: Some(ProviderKind::OpenAi),
                model: &format!("ft:gpt-4o-mini:acme:{i}"),
                status: 200,
                input_tokens: 1,
                ..RequestObservation::default()
            });
        }
        let text = m.encode();
        let requests = samples(&text, "meta_chat_requests_total");
        assert_eq!(requests.len(), 1, "{text}");
        assert!(requests[0].contains(r#"model="other""#));
        assert!(requests[0].ends_with(" 50"));
        assert_eq!(samples(&text, "meta_chat_tokens_total").len(), 1);
    }

    #[test]
    fn requests_without_a_provider_count_but_observe_nothing_else() {
        let m = metrics();
        m.record_request(&RequestObservation {
            endpoint: "/v1/embeddings",
            tenant: None,
            status: 503,
            error_kind: Some("no_provider"),
            overhead: Some(Duration::from_micros(80)),
            input_tokens: 5,
            cost_nano_usd: 5,
            ..RequestObservation::default()
        });
        let text = m.encode();
        assert_eq!(
            value(
                &text,
                r#"meta_chat_requests_total{endpoint="/v1/embeddings",provider="",model="",status="503",error_kind="no_provider"}"#
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                r#"meta_chat_overhead_seconds_count{endpoint="/v1/embeddings"}"#
            ),
            1.0
        );
        assert!(samples(&text, "meta_chat_tokens_total").is_empty());
        assert!(samples(&text, "meta_chat_cost_usd_total").is_empty());
    }

    #[test]
    fn side_events_move_their_counters() {
        let m = metrics();
        m.record_rejection("/v1/chat/completions", "invalid_api_key");
        m.record_rejection("/v1/chat/completions", "invalid_api_key");
        m.record_cache_hit("t1");
        m.record_rate_limited("t1", "rate_limit_exceeded");
        m.record_rate_limited("t1", "budget_exceeded");
        m.record_cost_alert("t2");
        m.set_usage_queue_depth(7);
        m.set_usage_queue_depth(3);
        m.add_usage_dropped(2);
        m.add_usage_written(40);
        m.add_usage_written(2);
        let text = m.encode();
        for (series, expected) in [
            (
                r#"meta_chat_rejected_requests_total{endpoint="/v1/chat/completions",reason="invalid_api_key"}"#,
                2.0,
            ),
            (r#"meta_chat_cache_hits_total{tenant="t1"}"#, 1.0),
            (
                r#"meta_chat_rate_limited_total{tenant="t1",reason="rate_limit_exceeded"}"#,
                1.0,
            ),
            (
                r#"meta_chat_rate_limited_total{tenant="t1",reason="budget_exceeded"}"#,
                1.0,
            ),
            (r#"meta_chat_cost_alerts_total{tenant="t2"}"#, 1.0),
            ("meta_chat_usage_queue_depth", 3.0),
            ("meta_chat_usage_dropped_total", 2.0),
            ("meta_chat_usage_written_total", 42.0),
        ] {
            assert_eq!(value(&text, series), expected, "{series}");
        }
    }

    #[test]
    fn cost_is_summed_in_nano_dollars() {
        let m = metrics();
        // 0.1 + 0.2 in floats is 0.30000000000000004; in nano-dollars it is exact.
        for nanos in [100_000_000, 200_000_000] {
            m.record_request(&RequestObservation {
                cost_nano_usd: nanos,
                ..chat()
            });
        }
        let text = m.encode();
        assert_eq!(
            value(
                &text,
                r#"meta_chat_cost_usd_total{tenant="t1",provider="openai",model="gpt-4o-mini"}"#
            ),
            0.3
        );
        let counter = UsdCounter::default();
        counter.add_nanos(u64::MAX);
        counter.add_nanos(1);
        assert_eq!(counter.nano_usd.load(Ordering::Relaxed), u64::MAX);
    }

    #[test]
    fn both_formats_declare_every_family_with_its_type() {
        let m = metrics();
        m.record_request(&RequestObservation {
            fallback_from: Some(ProviderKind::Anthropic),
            embedding_tokens: 3,
            ..chat()
        });
        m.record_rejection("/v1/chat/completions", "invalid_request");
        m.record_cache_hit("t1");
        m.record_rate_limited("t1", "rate_limit_exceeded");
        m.record_cost_alert("t1");
        let families = [
            ("meta_chat_requests", "counter"),
            ("meta_chat_request_duration_seconds", "histogram"),
            ("meta_chat_time_to_first_token_seconds", "histogram"),
            ("meta_chat_overhead_seconds", "histogram"),
            ("meta_chat_tokens", "counter"),
            ("meta_chat_cost_usd", "counter"),
            ("meta_chat_cache_hits", "counter"),
            ("meta_chat_rate_limited", "counter"),
            ("meta_chat_fallbacks", "counter"),
            ("meta_chat_cost_alerts", "counter"),
            ("meta_chat_rejected_requests", "counter"),
            ("meta_chat_usage_queue_depth", "gauge"),
            ("meta_chat_usage_dropped", "counter"),
            ("meta_chat_usage_written", "counter"),
        ];
        // Prometheus 0.0.4 names a counter family by its `_total` samples…
        let text = m.encode();
        for (name, kind) in families {
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            assert!(
                text.contains(&format!("\n# TYPE {name} {kind}\n")),
                "{name} {kind} in\n{text}"
            );
        }
        assert!(!text.contains("# EOF"));
        // …OpenMetrics without the suffix, and the text ends with `# EOF`.
        let open = m.encode_openmetrics();
        for (name, kind) in families {
            assert!(
                open.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind} in\n{open}"
            );
        }
        assert!(open.contains("# UNIT meta_chat_cost_usd usd\n"));
        assert!(open.ends_with("# EOF\n"));
    }

    #[test]
    fn an_empty_registry_shows_only_unlabelled_families() {
        let text = metrics().encode();
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            types,
            [
                "meta_chat_usage_queue_depth gauge",
                "meta_chat_usage_dropped_total counter",
                "meta_chat_usage_written_total counter",
            ]
        );
    }
}
