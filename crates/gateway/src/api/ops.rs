//! `GET /metrics` (SPEC §4.5): the Prometheus exposition of [`crate::metrics::Metrics`].
//!
//! Like `/healthz` it needs no key, so that any Prometheus can scrape it: it shows tenant ids,
//! model names and volumes but no secret. Keep it off the public internet: firewall the
//! route at the load balancer, or let only the internal network reach it.

use axum::Router;
use axum::extract::State;
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::IntoResponse;
use axum::routing::get;

use super::AppState;
use crate::metrics::{OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};

/// The operational routes beside `/healthz` and `/readyz`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// OpenMetrics text for scrapers that ask for it (Prometheus does), the Prometheus text
/// format 0.0.4 for everyone else.
async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    state.metrics.sync_usage(
        state.usage.queue_depth(),
        state.usage.written(),
        state.usage.dropped(),
    );
    if wants_openmetrics(&headers) {
        (
            [(
                CONTENT_TYPE,
                HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
            )],
            state.metrics.encode_openmetrics(),
        )
    } else {
        (
            [(
                CONTENT_TYPE,
                HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
            )],
            state.metrics.encode(),
        )
    }
}

/// Whether `Accept` names OpenMetrics text with a non-zero weight. Prometheus lists it first
/// among the formats it accepts; `curl` and most other clients do not list it at all.
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media_type = parts.next().unwrap_or_default();
            media_type.eq_ignore_ascii_case("application/openmetrics-text")
                && !parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        // What Prometheus 2.x and 3.x send by default.
        assert!(wants_openmetrics(&accept(
            "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
        )));
        assert!(wants_openmetrics(&accept(
            "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.6, Application/OpenMetrics-Text; version=1.0.0; q=0.5"
        )));
        assert!(!wants_openmetrics(&HeaderMap::new()));
        assert!(!wants_openmetrics(&accept("*/*")));
        assert!(!wants_openmetrics(&accept("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(&accept(
            "application/openmetrics-text;q=0, text/plain"
        )));
    }
}
