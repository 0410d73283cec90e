//! `/api/tenants` (SPEC §4.2): create, list, show, update settings, rotate the key, delete.
//!
//! Handlers only do protocol work: who may call, parsing the body, status codes. Validation,
//! encryption and masking live in [`crate::tenants::Tenants`], shared with the command line.
//! Access is checked before the body is parsed, so a tenant key aimed at another tenant gets
//! 403 whatever it sends.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::{AdminOnly, Caller};
use super::error::ApiError;
use super::json::{JsonBody, RawBody, scrub};
use crate::store::StoreError;
use crate::tenants::TenantError;

/// The tenant routes, merged into [`super::router`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/tenants", post(create).get(list))
        .route(
            "/api/tenants/{id}",
            get(show).put(update_settings).delete(delete),
        )
        .route("/api/tenants/{id}/rotate-key", post(rotate_key))
}

/// `POST /api/tenants` body.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateTenant {
    name: String,
    #[serde(default)]
    settings: Option<Value>,
}

/// `PUT /api/tenants/{id}` body: the sections to replace.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UpdateTenant {
    settings: Value,
}

/// The `{id}` path segment; a segment that does not decode is no tenant's id.
struct TenantId(String);

impl FromRequestParts<AppState> for TenantId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| Self(id))
            .map_err(|_| not_found())
    }
}

async fn create(
    _: AdminOnly,
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateTenant>,
) -> Result<impl IntoResponse, ApiError> {
    let created = state
        .tenants
        .create(&body.name, body.settings.as_ref())
        .await
        .map_err(tenant_error)?;
    tracing::info!(tenant = %created.tenant.id, "tenant created");
    Ok((StatusCode::CREATED, Json(created)))
}

async fn list(_: AdminOnly, State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let tenants = state.tenants.list().await.map_err(tenant_error)?;
    Ok(Json(json!({"object": "list", "data": tenants})))
}

async fn show(
    caller: Caller,
    TenantId(id): TenantId,
    State(state): State<AppState>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require_tenant_access(&id)?;
    let tenant = state.tenants.show(&id).await.map_err(tenant_error)?;
    Ok(Json(tenant))
}

async fn update_settings(
    caller: Caller,
    TenantId(id): TenantId,
    State(state): State<AppState>,
    body: RawBody,
) -> Result<impl IntoResponse, ApiError> {
    caller.require_tenant_access(&id)?;
    let body: UpdateTenant = body.parse()?;
    let tenant = state
        .tenants
        .update_settings(&id, &body.settings)
        .await
        .map_err(tenant_error)?;
    tracing::info!(tenant = %id, "tenant settings updated");
    Ok(Json(tenant))
}

async fn rotate_key(
    caller: Caller,
    TenantId(id): TenantId,
    State(state): State<AppState>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require_tenant_access(&id)?;
    let rotated = state.tenants.rotate_key(&id).await.map_err(tenant_error)?;
    tracing::info!(tenant = %id, "tenant API key rotated");
    Ok(Json(rotated))
}

async fn delete(
    _: AdminOnly,
    TenantId(id): TenantId,
    State(state): State<AppState>,
) -> Result<StatusCode, ApiError> {
    state.tenants.delete(&id).await.map_err(tenant_error)?;
    tracing::info!(tenant = %id, "tenant deleted");
    Ok(StatusCode::NO_CONTENT)
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "tenant_not_found", "no such tenant")
}

/// Renders a [`TenantError`]. Server-side failures are logged here, once, and answered
/// without detail.
fn tenant_error(error: TenantError) -> ApiError {
    match error {
        // `param` is the path inside `settings` (`llm.temperature`), as SPEC §4.2 names it.
        TenantError::InvalidSettings(error) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_settings",
            format!("{}: {}", error.field, scrub(&error.message)),
        )
        .with_param(error.field),
        TenantError::InvalidName => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_name",
            "name: must be 1 to 200 characters",
        )
        .with_param("name"),
        TenantError::NotFound => not_found(),
        TenantError::Crypto(error) => {
            tracing::error!(%error, "a stored tenant secret cannot be read; is ENCRYPTION_KEY right?");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "secret_unreadable",
                "a stored secret of this tenant cannot be decrypted; the operator must check \
                 the encryption key",
            )
        }
        TenantError::Store(StoreError::Database(error)) => {
            tracing::warn!(%error, "tenant operation failed in the database");
            ApiError::unavailable("the database is not reachable; try again")
        }
        TenantError::Store(error) => {
            tracing::error!(%error, "tenant operation failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the tenant operation failed",
            )
        }
    }
}
