//! Who is calling (SPEC §4.1): the admin key or a tenant key, presented as
//! `Authorization: Bearer <key>` or Anthropic's `x-api-key: <key>`.
//!
//! The admin key is compared with the stored hash in constant time. A tenant key is hashed and
//! looked up by its hash, so the database never sees a key and a lookup reveals nothing about
//! near misses. No error message contains the presented key.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};

use super::AppState;
use super::error::ApiError;
use crate::crypto;
use crate::store::Tenant;

/// Anthropic's key header, accepted wherever `Authorization` is.
const X_API_KEY: &str = "x-api-key";

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The admin key: may do everything.
    Admin,
    /// A tenant key: may touch only this tenant (as stored: settings still encrypted).
    Tenant(Arc<Tenant>),
}

impl Caller {
    /// 403 `admin_required` unless the caller is the admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Self::Admin => Ok(()),
            Self::Tenant(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_required",
                "this operation needs the admin API key",
            )),
        }
    }

    /// 403 `forbidden` unless the caller is the admin or tenant `id` itself. A tenant key gets
    /// 403 for every other id, existing or not, so it cannot probe for tenants.
    pub fn require_tenant_access(&self, id: &str) -> Result<(), ApiError> {
        match self {
            Self::Admin => Ok(()),
            Self::Tenant(tenant) if tenant.id == id => Ok(()),
            Self::Tenant(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a tenant API key can only access its own tenant",
            )),
        }
    }

    /// The calling tenant, if a tenant key was used.
    pub fn tenant(&self) -> Option<&Tenant> {
        match self {
            Self::Admin => None,
            Self::Tenant(tenant) => Some(tenant),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = presented_key(&parts.headers)?;
        authenticate(state, key).await
    }
}

/// An extractor that lets only the admin through (401 without a valid key, 403 with a tenant
/// key), before the body is read.
#[derive(Debug, Clone, Copy)]
pub struct AdminOnly;

impl FromRequestParts<AppState> for AdminOnly {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Caller::from_request_parts(parts, state)
            .await?
            .require_admin()
            .map(|()| Self)
    }
}

/// The key from `Authorization: Bearer <key>`, else from `x-api-key`.
///
/// 401 `missing_api_key` when neither header carries one (an `Authorization` of another
/// scheme, such as `Basic`, counts as none); 401 `invalid_api_key` when the header is not
/// visible ASCII, which no key is.
pub fn presented_key(headers: &HeaderMap) -> Result<&str, ApiError> {
    let bearer = match headers.get(AUTHORIZATION) {
        Some(value) => {
            let value = value.to_str().map_err(|_| invalid_api_key())?;
            value
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, key)| key.trim())
                .filter(|key| !key.is_empty())
        }
        None => None,
    };
    if let Some(key) = bearer {
        return Ok(key);
    }
    match headers.get(X_API_KEY) {
        Some(value) => {
            let key = value.to_str().map_err(|_| invalid_api_key())?.trim();
            if key.is_empty() {
                Err(missing_api_key())
            } else {
                Ok(key)
            }
        }
        None => Err(missing_api_key()),
    }
}

/// Who `key` belongs to: the admin, a tenant, or nobody (401 `invalid_api_key`); 503 when the
/// store cannot answer.
///
/// Tenants come from the [`crate::tenant_cache::TenantCache`]: a map lookup for a key seen
/// before, a database query for a new one.
pub async fn authenticate(state: &AppState, key: &str) -> Result<Caller, ApiError> {
    // One hash serves both checks.
    let hash = crypto::hash_api_key(key);
    if crypto::hashes_match(&hash, &state.admin_key_hash) {
        return Ok(Caller::Admin);
    }
    match state.tenant_cache.get(&hash).await {
        Ok(Some(tenant)) => Ok(Caller::Tenant(tenant)),
        Ok(None) => Err(invalid_api_key()),
        Err(error) => {
            tracing::warn!(%error, "cannot look up an API key");
            Err(ApiError::unavailable(
                "cannot check the API key right now; try again",
            ))
        }
    }
}

fn missing_api_key() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing_api_key",
        "no API key: send `Authorization: Bearer <key>`",
    )
}

fn invalid_api_key() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_api_key",
        "the API key is not valid",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn keys_come_from_bearer_then_x_api_key() {
        assert_eq!(
            presented_key(&headers(&[("authorization", "Bearer mc_a")])).unwrap(),
            "mc_a"
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", "bearer  mc_a ")])).unwrap(),
            "mc_a"
        );
        assert_eq!(
            presented_key(&headers(&[("x-api-key", "mc_b")])).unwrap(),
            "mc_b"
        );
        assert_eq!(
            presented_key(&headers(&[
                ("authorization", "Basic xyz"),
                ("x-api-key", "mc_b")
            ]))
            .unwrap(),
            "mc_b"
        );
        assert_eq!(
            presented_key(&headers(&[
                ("authorization", "Bearer mc_a"),
                ("x-api-key", "mc_b")
            ]))
            .unwrap(),
            "mc_a"
        );
    }

    #[test]
    fn missing_keys_are_401() {
        for pairs in [
            &[][..],
            &[("authorization", "Bearer ")][..],
            &[("authorization", "Basic xyz")][..],
            &[("authorization", "mc_a")][..],
            &[("x-api-key", "")][..],
        ] {
            let error = presented_key(&headers(pairs)).unwrap_err();
            assert_eq!(error.status, StatusCode::UNAUTHORIZED);
            assert_eq!(error.code, "missing_api_key");
        }
    }

    #[test]
    fn tenant_access_is_limited_to_itself() {
        let tenant = Tenant {
            id: "a".into(),
            name: "A".into(),
            api_key_hash: String::new(),
            settings: serde_json::json!({}),
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        };
        let caller = Caller::Tenant(Arc::new(tenant));
        assert!(caller.require_tenant_access("a").is_ok());
        assert_eq!(
            caller.require_tenant_access("b").unwrap_err().code,
            "forbidden"
        );
        assert_eq!(caller.require_admin().unwrap_err().code, "admin_required");
        assert!(Caller::Admin.require_tenant_access("b").is_ok());
        assert!(Caller::Admin.require_admin().is_ok());
    }
}
