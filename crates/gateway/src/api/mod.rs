//! The HTTP API: the router, shared state and the operational endpoints.

pub mod admission;
pub mod anthropic;
pub mod anthropic_codec;
pub mod auth;
pub mod chat;
mod codec_util;
pub mod error;
pub mod json;
pub mod metering;
pub mod openai;
pub mod openai_codec;
pub mod ops;
pub mod tenants;
pub mod test_llm;
pub mod usage;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::tenant_cache::TenantCache;
use crate::tenants::Tenants;
use crate::usage::UsageRecorder;
use error::ApiError;

/// What every handler can reach: one shared [`AppParts`]. Handlers and middleware clone it
/// for every request, so a clone is one reference count, not one per part.
#[derive(Debug, Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    /// Shares `parts` with every handler.
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The parts of [`AppState`].
#[derive(Debug)]
pub struct AppParts {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Tenants, settings and (later) usage.
    pub store: Arc<dyn Store>,
    /// Tenant operations (settings validation, secrets).
    pub tenants: Tenants,
    /// Tenants by API key hash, for authenticating requests without a database query.
    pub tenant_cache: Arc<TenantCache>,
    /// Hands usage records to the batch writer (disabled by `ENABLE_COST_TRACKING=false`).
    pub usage: UsageRecorder,
    /// Prometheus metrics, served at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Rate limits and budgets.
    pub limits: crate::limits::Limits,
    /// The response cache.
    pub cache: crate::cache::ResponseCache,
    /// SHA-256 hex of the admin API key (see [`crate::bootstrap::ensure_admin_key`]).
    pub admin_key_hash: Arc<String>,
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(ops::routes())
        .merge(tenants::routes())
        .merge(usage::routes())
        .merge(
            openai::routes()
                .merge(anthropic::routes())
                .route_layer(openai::ObserveLayer(state.clone())),
        )
        .merge(test_llm::routes())
        .merge(crate::dashboard::routes(state.clone()))
        .fallback(not_found)
        // After every route: it applies to the method routers registered so far.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    state.store.ping().await.map_err(|error| {
        tracing::warn!(%error, "readiness check failed");
        ApiError::unavailable("the database is not reachable")
    })?;
    Ok(axum::Json(
        serde_json::json!({"status": "ready", "database": state.store.backend()}),
    ))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}
