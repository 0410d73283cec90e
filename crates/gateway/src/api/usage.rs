//! Usage analytics (SPEC §4.4): `GET /api/tenants/{id}/usage` (the admin, or that tenant) and
//! `GET /api/usage` (the admin, across tenants). The report itself is
//! [`crate::analytics::report`], shared with `meta-chat usage` and the dashboard.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use super::AppState;
use super::auth::{AdminOnly, Caller};
use super::error::ApiError;
use crate::analytics::{self, QueryError, ReportParams, ReportQuery};
use crate::store::StoreError;

/// The usage routes, merged into [`super::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/tenants/{id}/usage", get(tenant_usage))
        .route("/api/usage", get(all_usage))
}

type Pairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

async fn tenant_usage(
    caller: Caller,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    State(state): State<AppState>,
    query: Pairs,
) -> Result<impl IntoResponse, ApiError> {
    let Ok(Path(id)) = id else {
        return Err(tenant_not_found());
    };
    caller.require_tenant_access(&id)?;
    let query = parse(query, Some(id.clone()))?;
    if matches!(caller, Caller::Admin) {
        // The admin may ask about any tenant, but an unknown id is more likely a typo than a
        // request for an empty report.
        state
            .store
            .get_tenant(&id)
            .await
            .map_err(|error| match error {
                StoreError::NotFound => tenant_not_found(),
                error => store_error(error),
            })?;
    }
    run(&state, &query).await
}

async fn all_usage(
    _: AdminOnly,
    State(state): State<AppState>,
    query: Pairs,
) -> Result<impl IntoResponse, ApiError> {
    let query = parse(query, None)?;
    run(&state, &query).await
}

fn parse(query: Pairs, tenant_id: Option<String>) -> Result<ReportQuery, ApiError> {
    let Query(pairs) = query.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("the query string cannot be read: {}", rejection.body_text()),
        )
    })?;
    ReportParams::from_pairs(&pairs)
        .and_then(|params| params.validate(tenant_id, chrono::Utc::now()))
        .map_err(query_error)
}

async fn run(state: &AppState, query: &ReportQuery) -> Result<Json<analytics::Report>, ApiError> {
    analytics::report(state.store.as_ref(), query)
        .await
        .map(Json)
        .map_err(store_error)
}

fn query_error(error: QueryError) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_parameter",
        error.to_string(),
    )
    .with_param(error.param)
}

fn tenant_not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "tenant_not_found", "no such tenant")
}

fn store_error(error: StoreError) -> ApiError {
    tracing::warn!(%error, "usage report failed in the database");
    ApiError::unavailable("the usage report cannot be read from the database; try again")
}
