//! The dashboard (SPEC §5), served by the gateway at `/dashboard`: server-rendered HTML
//! (maud), one stylesheet, no script needed.
//!
//! - **Sign-in** with the admin key or a tenant key creates a session stored in the database
//!   (`dashboard_sessions`: the SHA-256 of a random token, its tenant, its CSRF token, an
//!   expiry). The cookie `mc_session` is `HttpOnly`, `SameSite=Strict`, `Path=/dashboard`,
//!   and `Secure` when the request came over TLS (`X-Forwarded-Proto: https`) or
//!   `COOKIE_SECURE=true`. Sign-out revokes the session.
//! - **CSRF**: every form carries the session's token in a hidden `csrf` field; a POST
//!   without the right one gets 403.
//! - **Access**: a tenant session sees only its own tenant; the admin sees every tenant.
//! - **Headers** on every page: a `Content-Security-Policy` allowing only this origin's
//!   stylesheet (no scripts, no inline anything), `X-Frame-Options: DENY`,
//!   `Referrer-Policy: no-referrer`, `X-Content-Type-Options: nosniff`, `Cache-Control:
//!   no-store`.

pub mod analytics;
pub mod tenants;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{TimeDelta, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use subtle::ConstantTimeEq;

use crate::api::AppState;
use crate::api::auth::{Caller, authenticate};
use crate::crypto;
use crate::store::{DashboardSession, Tenant};

/// The session cookie's name.
pub const COOKIE_NAME: &str = "mc_session";

/// How long a session lasts.
pub const SESSION_LIFETIME: TimeDelta = TimeDelta::hours(12);

/// The dashboard's routes.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(home))
        .route("/dashboard/", get(home))
        .route("/dashboard/login", get(login_page).post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/style.css", get(stylesheet))
        .merge(tenants::routes())
        .merge(analytics::routes())
        .layer(axum::middleware::from_fn_with_state(
            state,
            security_headers,
        ))
}

/// Who is signed in, from the session cookie.
#[derive(Debug, Clone)]
pub struct Session {
    /// The stored session.
    pub stored: DashboardSession,
    /// The signed-in tenant, or `None` for the admin.
    pub tenant: Option<Arc<Tenant>>,
}

impl Session {
    /// Whether the admin is signed in.
    pub fn is_admin(&self) -> bool {
        self.tenant.is_none()
    }

    /// 403 unless this session may see tenant `id`.
    pub fn require_tenant(&self, id: &str) -> Result<(), PageError> {
        match &self.tenant {
            None => Ok(()),
            Some(tenant) if tenant.id == id => Ok(()),
            Some(_) => Err(PageError::Forbidden),
        }
    }

    /// 403 unless the admin is signed in.
    pub fn require_admin(&self) -> Result<(), PageError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(PageError::Forbidden)
        }
    }

    /// 403 unless `presented` is this session's CSRF token.
    pub fn check_csrf(&self, presented: Option<&str>) -> Result<(), PageError> {
        let expected = self.stored.csrf_token.as_bytes();
        match presented {
            Some(token) if bool::from(token.as_bytes().ct_eq(expected)) => Ok(()),
            _ => Err(PageError::Csrf),
        }
    }

    /// The hidden form field carrying the CSRF token.
    pub fn csrf_field(&self) -> Markup {
        html! { input type="hidden" name="csrf" value=(self.stored.csrf_token); }
    }
}

/// Why a page cannot be shown.
#[derive(Debug)]
pub enum PageError {
    /// Not signed in (or the session ended): go to the sign-in page.
    SignIn,
    /// Signed in, but not allowed here.
    Forbidden,
    /// A POST without the session's CSRF token.
    Csrf,
    /// No such tenant (or page).
    NotFound,
    /// A bad query or form value, with its message.
    BadRequest(String),
    /// The database could not be reached.
    Unavailable,
}

/// An error page's text, kept on its response so that [`session_layout`] can lay it out again
/// with the navigation of the session the request signed in with.
#[derive(Debug, Clone)]
struct ErrorPage {
    title: &'static str,
    message: String,
}

/// Where the [`Session`] extractor leaves the signed-in session for [`session_layout`].
#[derive(Debug, Clone, Default)]
struct SessionSlot(Arc<std::sync::OnceLock<Session>>);

fn error_page(title: &str, message: &str, session: Option<&Session>) -> Markup {
    page(
        title,
        session,
        html! { h1 { (title) } p.error { (message) } p { a href="/dashboard" { "Back" } } },
    )
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, title, message) = match self {
            Self::SignIn => {
                return (
                    StatusCode::SEE_OTHER,
                    [(LOCATION, HeaderValue::from_static("/dashboard/login"))],
                )
                    .into_response();
            }
            Self::Forbidden => (
                StatusCode::FORBIDDEN,
                "Forbidden",
                "This session may not see that page.".to_owned(),
            ),
            Self::Csrf => (
                StatusCode::FORBIDDEN,
                "Forbidden",
                "The form was not sent from this dashboard session (missing or wrong CSRF \
                 token). Reload the page and try again."
                    .to_owned(),
            ),
            Self::NotFound => (
                StatusCode::NOT_FOUND,
                "Not found",
                "There is no such page or tenant.".to_owned(),
            ),
            Self::BadRequest(message) => (StatusCode::BAD_REQUEST, "Bad request", message),
            Self::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "The database cannot be reached; try again.".to_owned(),
            ),
        };
        let mut response = (status, error_page(title, &message, None)).into_response();
        response
            .extensions_mut()
            .insert(ErrorPage { title, message });
        response
    }
}

fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value)
}

impl FromRequestParts<AppState> for Session {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, PageError> {
        let token = cookie_token(&parts.headers).ok_or(PageError::SignIn)?;
        let stored = state
            .store
            .session(&crypto::hash_api_key(token))
            .await
            .map_err(|error| {
                tracing::warn!(%error, "cannot read a dashboard session");
                PageError::Unavailable
            })?
            .ok_or(PageError::SignIn)?;
        if stored.revoked_at.is_some() || stored.expires_at <= Utc::now() {
            return Err(PageError::SignIn);
        }
        let tenant = match &stored.tenant_id {
            None => None,
            Some(id) => match state.store.get_tenant(id).await {
                Ok(tenant) => Some(Arc::new(tenant)),
                // The tenant was deleted: its sessions end with it.
                Err(crate::store::StoreError::NotFound) => return Err(PageError::SignIn),
                Err(error) => {
                    tracing::warn!(%error, "cannot read a dashboard session's tenant");
                    return Err(PageError::Unavailable);
                }
            },
        };
        let session = Self { stored, tenant };
        if let Some(SessionSlot(slot)) = parts.extensions.get::<SessionSlot>() {
            let _ = slot.set(session.clone());
        }
        Ok(session)
    }
}

/// A full page: the layout around `body`, with the navigation for `session`.
pub fn page(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · meta-chat" }
                link rel="stylesheet" href="/dashboard/style.css";
            }
            body {
                header.top {
                    a.brand href="/dashboard" { "meta-chat" }
                    @if let Some(session) = session {
                        nav {
                            @match &session.tenant {
                                None => {
                                    a href="/dashboard/tenants" { "Tenants" }
                                    a href="/dashboard/analytics" { "Analytics" }
                                }
                                Some(tenant) => {
                                    a href={ "/dashboard/tenants/" (tenant.id) "/settings" } { "LLM configuration" }
                                    a href={ "/dashboard/tenants/" (tenant.id) "/analytics" } { "Analytics" }
                                }
                            }
                            span.who {
                                @match &session.tenant {
                                    None => "admin",
                                    Some(tenant) => (tenant.name),
                                }
                            }
                            form.inline method="post" action="/dashboard/logout" {
                                (session.csrf_field())
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

async fn home(session: Session) -> Response {
    let target = match &session.tenant {
        None => "/dashboard/tenants".to_owned(),
        Some(tenant) => format!("/dashboard/tenants/{}/settings", tenant.id),
    };
    redirect(&target)
}

/// A 303 to `target` (after a form, or to the right home page).
pub fn redirect(target: &str) -> Response {
    match HeaderValue::from_str(target) {
        Ok(location) => (StatusCode::SEE_OTHER, [(LOCATION, location)]).into_response(),
        Err(_) => PageError::NotFound.into_response(),
    }
}

fn login_form(error: Option<&str>) -> Markup {
    page(
        "Sign in",
        None,
        html! {
            h1 { "Sign in" }
            @if let Some(error) = error { p.error role="alert" { (error) } }
            form.card method="post" action="/dashboard/login" {
                label for="key" { "API key (admin or tenant)" }
                input #key type="password" name="key" autocomplete="current-password" required;
                button type="submit" { "Sign in" }
            }
        },
    )
}

async fn login_page() -> Markup {
    login_form(None)
}

#[derive(Debug, serde::Deserialize)]
struct LoginForm {
    #[serde(default)]
    key: String,
}

async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<axum::Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let key = form.map(|f| f.0.key).unwrap_or_default();
    let caller = match authenticate(&state, key.trim()).await {
        Ok(caller) => caller,
        Err(error) if error.status == StatusCode::UNAUTHORIZED => {
            return (
                StatusCode::UNAUTHORIZED,
                login_form(Some("That key is not valid.")),
            )
                .into_response();
        }
        Err(_) => return PageError::Unavailable.into_response(),
    };
    let (Ok(token), Ok(csrf)) = (crypto::generate_api_key(), crypto::generate_api_key()) else {
        return PageError::Unavailable.into_response();
    };
    let now = Utc::now();
    let session = DashboardSession {
        id_hash: crypto::hash_api_key(&token),
        tenant_id: match &caller {
            Caller::Admin => None,
            Caller::Tenant(tenant) => Some(tenant.id.clone()),
        },
        csrf_token: csrf,
        created_at: now,
        expires_at: now + SESSION_LIFETIME,
        revoked_at: None,
    };
    if let Err(error) = state.store.create_session(&session).await {
        tracing::warn!(%error, "cannot store a dashboard session");
        return PageError::Unavailable.into_response();
    }
    tracing::info!(
        tenant = session.tenant_id.as_deref().unwrap_or("admin"),
        "dashboard sign-in"
    );
    let secure = state.config.cookie_secure
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{COOKIE_NAME}={token}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_LIFETIME.num_seconds(),
        if secure { "; Secure" } else { "" }
    );
    let mut response = redirect("/dashboard");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(SET_COOKIE, value);
    }
    response
}

#[derive(Debug, serde::Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: Option<String>,
}

async fn logout(
    State(state): State<AppState>,
    session: Session,
    form: Result<axum::Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, PageError> {
    let presented = form.ok().and_then(|f| f.0.csrf);
    session.check_csrf(presented.as_deref())?;
    state
        .store
        .revoke_session(&session.stored.id_hash)
        .await
        .map_err(|_| PageError::Unavailable)?;
    let mut response = redirect("/dashboard/login");
    response.headers_mut().insert(
        SET_COOKIE,
        HeaderValue::from_static(
            "mc_session=; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    Ok(response)
}

/// The stylesheet, embedded in the binary.
const STYLE: &str = include_str!("style.css");

async fn stylesheet() -> Response {
    (
        [
            (
                CONTENT_TYPE,
                HeaderValue::from_static("text/css; charset=utf-8"),
            ),
            (
                CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            ),
        ],
        STYLE,
    )
        .into_response()
}

/// The security headers of every dashboard response.
async fn security_headers(State(_): State<AppState>, mut request: Request, next: Next) -> Response {
    let slot = SessionSlot::default();
    request.extensions_mut().insert(slot.clone());
    let mut response = session_layout(next.run(request).await, &slot);
    let headers = response.headers_mut();
    let mut put = |name: &'static str, value: &'static str| {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    };
    put(
        "content-security-policy",
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'",
    );
    put("x-frame-options", "DENY");
    put("referrer-policy", "no-referrer");
    put("x-content-type-options", "nosniff");
    if !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// An error page of a request that signed in (refused, not found, bad input) keeps that
/// session's navigation and sign-out button, whichever handler refused it.
fn session_layout(response: Response, slot: &SessionSlot) -> Response {
    let (Some(error), Some(session)) = (response.extensions().get::<ErrorPage>(), slot.0.get())
    else {
        return response;
    };
    let body = error_page(error.title, &error.message, Some(session));
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body.into_string()))
}

/// Escaped text is maud's default; this marks markup that is already safe (an SVG chart).
pub fn trusted(markup: String) -> Markup {
    PreEscaped(markup)
}
