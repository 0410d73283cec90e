//! The OpenAI-compatible endpoints for tenant keys (SPEC §4.3): `POST /v1/chat/completions`,
//! streamed or not, routed to the tenant's provider (with its fallback chain);
//! `POST /v1/embeddings`, routed by the tenant's `embeddings` settings; `GET /v1/models`.
//!
//! Upstream failures are answered with OpenAI's statuses. A bad *upstream* key is a 502
//! (`upstream_authentication_error`), never a 401, which would tell the client SDK that its
//! gateway key is wrong. No message ever contains a provider key.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::RETRY_AFTER;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::future::Either;
use meta_chat_llm::{
    CompletionResponse, FallbackChain, FallbackEntry, FallbackExhausted, LlmError, LlmProvider,
    ProviderConfig, ProviderKind, StreamChunk, Usage, create_provider, pricing::format_usd,
};
use std::pin::Pin;
use std::task::{Poll, ready};

use super::AppState;
use super::admission;
use super::auth::Caller;
use super::chat::{self, ChatCall, Dialect, StreamEncoder};
use super::error::ApiError;
use super::json::RawBody;
use super::metering::{self, Meter, Outcome};
use super::openai_codec::{
    ChunkEncoder, SSE_DONE, completion_bytes, embeddings_json, models_json, parse_chat_request,
    parse_embeddings_request, sse_data,
};
use crate::routing;
use crate::settings::TenantSettings;
use crate::store::Tenant;

/// The provider that served, `openai` / `anthropic` / `ollama`.
pub const PROVIDER_HEADER: &str = "x-meta-chat-provider";
/// The model that served.
pub const MODEL_HEADER: &str = "x-meta-chat-model";
/// `hit` or `miss`.
pub const CACHE_HEADER: &str = "x-meta-chat-cache";
/// The request's cost as a decimal USD string.
pub const COST_HEADER: &str = "x-meta-chat-cost-usd";
/// The gateway's id for the request (a UUID v7).
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Milliseconds the request spent in the gateway, waits on upstreams excluded (for a stream:
/// until the response headers were sent).
pub const OVERHEAD_HEADER: &str = "x-meta-chat-overhead-ms";

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
}

/// When the request reached the gateway, before authentication and body parsing.
#[derive(Debug, Clone, Copy)]
pub struct Arrival(
    pub Instant,
    pub chrono::DateTime<chrono::Utc>,
    /// The request's id (a UUID v7), answered as `x-request-id` and kept in its usage record.
    pub uuid::Uuid,
);

impl Arrival {
    /// Now, with a fresh request id.
    pub fn now() -> Self {
        let wall = chrono::Utc::now();
        Self(Instant::now(), wall, request_id(wall))
    }
}

/// A UUID v7 for a request: its millisecond and 74 random bits from the thread's fast
/// generator. An id needs to be unique, not unpredictable; `Uuid::now_v7` asks the kernel for
/// random bytes (a system call per request).
fn request_id(at: chrono::DateTime<chrono::Utc>) -> uuid::Uuid {
    let millis = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// The gateway's own time for a request, as answered in [`OVERHEAD_HEADER`].
#[derive(Debug, Clone, Copy)]
struct Overhead(Duration);

/// Marks a response to a request that reached a provider (its usage and metrics were
/// recorded by the handler); any other error response was a rejection.
#[derive(Debug, Clone, Copy)]
pub struct ProviderReached;

/// Stamps each request with its [`Arrival`]; afterwards counts the gateway's overhead and the
/// requests rejected before any provider was called.
///
/// A layer of its own rather than `axum::middleware::from_fn`: that boxes a future holding
/// the request and the rest of the stack (1.1 kB), which a stream would keep until its
/// first chunk; this one adds 64 bytes to the route's future.
#[derive(Clone)]
pub(crate) struct ObserveLayer(pub(crate) AppState);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            state: self.0.clone(),
        }
    }
}

/// See [`ObserveLayer`].
#[derive(Clone)]
pub(crate) struct Observe<S> {
    inner: S,
    state: AppState,
}

impl<S> tower::Service<Request> for Observe<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let endpoint = match request.uri().path() {
            "/v1/chat/completions" => "chat",
            "/v1/embeddings" => "embeddings",
            "/v1/models" => "models",
            "/v1/messages" => "messages",
            "/v1/messages/count_tokens" => "count_tokens",
            _ => "other",
        };
        let arrival = Arrival::now();
        request.extensions_mut().insert(arrival);
        Observed {
            inner: self.inner.call(request),
            state: self.state.clone(),
            endpoint,
            arrival,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of an [`Observe`]d request.
    pub(crate) struct Observed<F> {
        #[pin]
        inner: F,
        state: AppState,
        endpoint: &'static str,
        arrival: Arrival,
    }
}

impl<F> Future for Observed<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        observed(this.state, this.endpoint, *this.arrival, &mut response);
        Poll::Ready(Ok(response))
    }
}

/// What [`Observe`] does with an answer.
fn observed(state: &AppState, endpoint: &'static str, arrival: Arrival, response: &mut Response) {
    // Every answer names its request, errors included.
    if !response.headers().contains_key(REQUEST_ID_HEADER)
        && let Ok(value) = HeaderValue::from_str(&arrival.2.to_string())
    {
        response
            .headers_mut()
            .insert(const { HeaderName::from_static(REQUEST_ID_HEADER) }, value);
    }
    // Answers that never waited on a provider (refusals, errors, models) spent all their time
    // in the gateway: that is their overhead, with the same header as the others.
    let overhead = match response.extensions().get::<Overhead>() {
        Some(Overhead(overhead)) => *overhead,
        None => {
            let overhead = arrival.0.elapsed();
            if let Ok(value) = HeaderValue::from_str(&overhead_ms(overhead)) {
                response
                    .headers_mut()
                    .insert(const { HeaderName::from_static(OVERHEAD_HEADER) }, value);
            }
            overhead
        }
    };
    state.metrics.record_overhead(endpoint, overhead);
    let status = response.status();
    if status.as_u16() >= 400 && response.extensions().get::<ProviderReached>().is_none() {
        let reason = match status.as_u16() {
            401 => "unauthenticated",
            403 => "forbidden",
            404 => "not_found",
            405 => "method_not_allowed",
            413 => "too_large",
            429 => "rate_limited",
            400..=499 => "invalid_request",
            _ => "internal",
        };
        state.metrics.record_rejection(endpoint, reason);
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Arrival {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(parts
            .extensions
            .get::<Self>()
            .copied()
            .unwrap_or_else(Self::now))
    }
}

impl Arrival {
    /// Time since arrival minus `upstream`, the time spent waiting on providers.
    pub fn overhead(self, upstream: Duration) -> Duration {
        self.0.elapsed().saturating_sub(upstream)
    }
}

/// Runs `future` and adds how long it took to `upstream`. A future of its own rather than an
/// `async fn`, which would hold `future` twice (as its argument and as what it awaits).
pub(super) fn timed<F: Future>(upstream: &mut Duration, future: F) -> Timed<'_, F> {
    Timed {
        future,
        upstream,
        started: None,
    }
}

pin_project_lite::pin_project! {
    /// See [`timed`].
    pub(super) struct Timed<'a, F> {
        #[pin]
        future: F,
        upstream: &'a mut Duration,
        started: Option<Instant>,
    }
}

impl<F: Future> Future for Timed<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let started = *this.started.get_or_insert_with(Instant::now);
        let value = ready!(this.future.poll(cx));
        **this.upstream += started.elapsed();
        Poll::Ready(value)
    }
}

/// An error answer, with the `Retry-After` the upstream asked for.
#[derive(Debug)]
pub struct Failure {
    error: ApiError,
    retry_after: Option<Duration>,
    reached_provider: bool,
    headers: Vec<(&'static str, String)>,
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            retry_after: None,
            reached_provider: false,
            headers: Vec::new(),
        }
    }
}

impl Failure {
    /// The error answered.
    pub fn error(&self) -> &ApiError {
        &self.error
    }

    /// A refusal by a limit: `error` with `Retry-After` and the `x-ratelimit-*` headers.
    pub fn limited(
        error: ApiError,
        retry_after: Duration,
        headers: Vec<(&'static str, String)>,
    ) -> Self {
        Self {
            error,
            retry_after: Some(retry_after),
            reached_provider: false,
            headers,
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let response = self.error.clone().into_response();
        self.finish(response)
    }
}

impl Failure {
    /// The failure with its body written by `body` (another dialect's envelope), keeping its
    /// status, `Retry-After` and headers.
    pub fn into_response_with(self, body: impl Fn(&ApiError) -> serde_json::Value) -> Response {
        let response = (self.error.status, axum::Json(body(&self.error))).into_response();
        self.finish(response)
    }

    fn finish(self, mut response: Response) -> Response {
        if self.reached_provider {
            response.extensions_mut().insert(ProviderReached);
        }
        if let Some(after) = self.retry_after {
            response.headers_mut().insert(
                RETRY_AFTER,
                HeaderValue::from(crate::limits::retry_after_seconds(after)),
            );
        }
        put_headers(&mut response, &self.headers);
        response
    }
}

/// The calling tenant; 403 `tenant_key_required` for the admin key.
pub(super) fn require_tenant(caller: Caller) -> Result<Arc<Tenant>, ApiError> {
    match caller {
        Caller::Tenant(tenant) => Ok(tenant),
        Caller::Admin => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "tenant_key_required",
            "this endpoint needs a tenant API key; the admin key has no provider settings",
        )),
    }
}

/// The routed provider chain. Each provider redacts its own key from its errors
/// ([`meta_chat_llm::Redacted`]), so no copy of a key is kept here.
pub(super) fn build_chain(
    primary: ProviderConfig,
    fallback: Vec<(u32, ProviderConfig)>,
) -> FallbackChain {
    let mut entries = Vec::with_capacity(1 + fallback.len());
    // The primary goes first: the chain sorts stably and it has the lowest priority.
    for (priority, config) in std::iter::once((0, primary)).chain(fallback) {
        let provider = config.provider;
        match create_provider(config) {
            Ok(provider) => entries.push(FallbackEntry { priority, provider }),
            Err(error) => {
                tracing::warn!(%provider, error.code = error.code(), "cannot build a provider");
            }
        }
    }
    FallbackChain::new(entries)
}

/// The tenant's settings with keys decrypted; 500 (logged) when they cannot be read.
pub(super) fn open_settings(
    state: &AppState,
    tenant: &Tenant,
) -> Result<Arc<TenantSettings>, ApiError> {
    state.tenants.open_shared(tenant).map_err(|error| {
        tracing::error!(tenant = %tenant.id, %error, "cannot open the tenant's settings");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "cannot read the tenant's settings",
        )
    })
}

async fn embeddings(
    State(state): State<AppState>,
    arrival: Arrival,
    caller: Caller,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, Failure> {
    let tenant = require_tenant(caller)?;
    let parsed = parse_embeddings_request(&body)?;
    let request_id = arrival.2;
    let mut meter = Meter::new(
        &state,
        &tenant.id,
        metering::conversation_id(&headers, None)?,
        "embeddings",
        arrival,
    );
    let settings = open_settings(&state, &tenant)?;
    meter.alert_threshold_nano = metering::alert_threshold_nano(&state, &settings);
    let limits = admission::tenant_limits(&state, &settings);
    let config = routing::embeddings_config(&state.config.llm, &settings, parsed.model.as_deref())?;
    drop(settings);
    // Embedding tokens are not chat tokens: requests per minute and budgets apply, tokens per
    // day does not.
    let limits = crate::limits::TenantLimits {
        tokens_per_day: None,
        ..limits
    };
    let worst_case = admission::worst_case_embedding_cost(&state, &config, &parsed.request.input);
    let admitted = state
        .limits
        .admit(&tenant.id, &limits, worst_case)
        .await
        .map_err(|refusal| admission::refused(&state, &tenant.id, refusal))?;
    meter.settlement = admitted.settlement;
    let provider_kind = config.provider;
    let model = config.embedding_model.clone().unwrap_or_default();
    let provider = create_provider(config).map_err(|e| llm_error(&e))?;
    let mut upstream = Duration::ZERO;
    let pending = meter.pending(provider_kind, &model, 0);
    let result = timed(&mut upstream, provider.embed(&parsed.request)).await;
    pending.done();
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            meter.record(&Outcome::failed(provider_kind, &model, &error));
            return Err(llm_error(&error));
        }
    };
    let mut outcome = Outcome::ok(provider_kind, &model, Usage::default());
    outcome.embedding_tokens = response.embedding_tokens;
    let cost = format_usd(meter.record(&outcome));
    let shown_model = if response.model.is_empty() {
        model.as_str()
    } else {
        response.model.as_str()
    };
    let json = embeddings_json(&response, shown_model, Some(&cost), parsed.base64);
    let mut answer = axum::Json(json).into_response();
    set_headers(
        &mut answer,
        provider_kind,
        &model,
        Some(&cost),
        request_id,
        arrival.overhead(upstream),
        CacheStatus::Miss,
        &admitted.headers,
    );
    Ok(answer)
}

/// The models this tenant can use: its default first, then the priced chat models of every
/// provider it has a key for (its own or the system's; Ollama needs none), as
/// `provider/model`.
async fn models(State(state): State<AppState>, caller: Caller) -> Result<Response, Failure> {
    let tenant = require_tenant(caller)?;
    let settings = open_settings(&state, &tenant)?;
    let env = &state.config.llm;
    let (primary, _) = routing::provider_config(env, &settings, None)?;
    let tenant_has_key = |provider: ProviderKind| {
        let llm = settings.llm.as_ref().is_some_and(|l| {
            l.provider.unwrap_or(env.default_provider) == provider && l.api_key.is_some()
        });
        let fallback = settings
            .fallback
            .iter()
            .flatten()
            .any(|f| f.provider == provider && f.api_key.is_some());
        llm || fallback
    };
    let mut list: Vec<(String, String)> = vec![(
        format!("{}/{}", primary.provider, primary.model),
        primary.provider.as_str().to_owned(),
    )];
    for provider in ProviderKind::ALL {
        if !(env.is_configured(provider) || tenant_has_key(provider)) {
            continue;
        }
        for model in env.prices.models(provider, false) {
            let id = format!("{provider}/{model}");
            if !list.iter().any(|(known, _)| *known == id) {
                list.push((id, provider.as_str().to_owned()));
            }
        }
    }
    Ok(axum::Json(models_json(&list)).into_response())
}

fn chat_completions(
    State(state): State<AppState>,
    arrival: Arrival,
    caller: Caller,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> impl Future<Output = Result<Response, Failure>> + Send {
    let prepared = (|| {
        let tenant = require_tenant(caller)?;
        let parsed = parse_chat_request(&body)?;
        let call = ChatCall {
            conversation_id: metering::conversation_id(&headers, parsed.conversation_id.clone())?,
            tenant,
            endpoint: "chat",
            model: parsed.model,
            request: parsed.request,
            stream: parsed.stream,
        };
        let dialect = OpenAiDialect {
            include_usage: parsed.include_usage,
        };
        Ok::<_, Failure>((call, dialect))
    })();
    // The header values and the body are slices of the connection's read buffer: released
    // before the upstream is awaited, the buffer can be reused to read the connection's next
    // bytes instead of a second one being allocated for every request in flight.
    drop((headers, body));
    // The handler's future is the chat future itself (an `async fn` here would hold the
    // parsed request beside it while it runs).
    match prepared {
        Ok((call, dialect)) => Either::Left(chat::serve(state, arrival, call, dialect)),
        Err(failure) => Either::Right(std::future::ready(Err(failure))),
    }
}

/// OpenAI's Chat Completions shapes: `chat.completion` JSON and `chat.completion.chunk` SSE.
struct OpenAiDialect {
    include_usage: bool,
}

impl Dialect for OpenAiDialect {
    type Stream = OpenAiStream;

    fn response_id(&self, request_id: uuid::Uuid) -> String {
        format!("chatcmpl-{}", request_id.simple())
    }

    fn answer_body(
        &self,
        response: &CompletionResponse,
        id: &str,
        created: i64,
        model: &str,
        cost_usd: &str,
    ) -> Vec<u8> {
        completion_bytes(response, id, created, model, Some(cost_usd))
    }

    fn stream_encoder(
        &self,
        id: String,
        created: i64,
        model: String,
        _input_estimate: u64,
    ) -> OpenAiStream {
        OpenAiStream(ChunkEncoder::new(id, created, model, self.include_usage))
    }
}

/// OpenAI SSE: `data: {chunk}` events, the usage chunk when asked for, `data: [DONE]`.
struct OpenAiStream(ChunkEncoder);

impl StreamEncoder for OpenAiStream {
    fn start(&mut self) -> Vec<Bytes> {
        Vec::new()
    }

    fn encode(&mut self, chunk: &StreamChunk) -> Vec<Bytes> {
        self.0.encode(chunk)
    }

    fn finish(&mut self, usage: Usage, cost_usd: &str) -> Vec<Bytes> {
        let mut events: Vec<Bytes> = self
            .0
            .finish_usage(usage, Some(cost_usd))
            .into_iter()
            .collect();
        events.push(Bytes::from_static(SSE_DONE));
        events
    }

    fn fail(&mut self, error: &ApiError) -> Vec<Bytes> {
        vec![
            sse_data(&ChunkEncoder::api_error_event(error)),
            Bytes::from_static(SSE_DONE),
        ]
    }

    fn usage(&self) -> Option<Usage> {
        self.0.usage()
    }
}

/// Adds `headers` (static names, such as the `x-ratelimit-*` ones) to `response`.
pub(super) fn put_headers(response: &mut Response, headers: &[(&'static str, String)]) {
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
}

/// Whether the answer came from the response cache (`x-meta-chat-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CacheStatus {
    /// Answered from the cache.
    Hit,
    /// Not from the cache.
    Miss,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn set_headers(
    response: &mut Response,
    provider: ProviderKind,
    model: &str,
    cost: Option<&str>,
    request_id: uuid::Uuid,
    overhead: Duration,
    cache: CacheStatus,
    limit_headers: &[(&'static str, String)],
) {
    put_headers(response, limit_headers);
    response.extensions_mut().insert(Overhead(overhead));
    let headers = response.headers_mut();
    // Names built at compile time; values that are constants not copied (`from_static`).
    let mut put = |name: HeaderName, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    };
    put(const { HeaderName::from_static(MODEL_HEADER) }, model);
    if let Some(cost) = cost {
        put(const { HeaderName::from_static(COST_HEADER) }, cost);
    }
    put(
        const { HeaderName::from_static(REQUEST_ID_HEADER) },
        request_id
            .hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    );
    put(
        const { HeaderName::from_static(OVERHEAD_HEADER) },
        &overhead_ms(overhead),
    );
    headers.insert(
        const { HeaderName::from_static(PROVIDER_HEADER) },
        HeaderValue::from_static(provider.as_str()),
    );
    headers.insert(
        const { HeaderName::from_static(CACHE_HEADER) },
        HeaderValue::from_static(match cache {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
        }),
    );
}

/// The value of [`OVERHEAD_HEADER`]: milliseconds, to the microsecond.
fn overhead_ms(overhead: Duration) -> String {
    meta_chat_llm::pricing::decimal(u64::try_from(overhead.as_micros()).unwrap_or(u64::MAX), 3)
}

/// Records the failed request (when a provider was reached) and answers with the last error.
pub(super) fn exhausted(error: FallbackExhausted, meter: &Meter) -> Failure {
    if let Some(outcome) = Outcome::exhausted(&error) {
        meter.record(&outcome);
    }
    match error.last_error() {
        Some(last) => llm_error(last),
        None => ApiError::new(
            StatusCode::BAD_REQUEST,
            "provider_not_configured",
            "no provider could be built for this tenant",
        )
        .into(),
    }
}

/// Removes anything that looks like an OpenAI or Anthropic key (`sk-…`) from an upstream
/// message: a last defence for keys other than the caller's own, which each provider has
/// already redacted.
fn scrub(message: &str) -> String {
    message
        .split(' ')
        .map(|word| {
            if word.contains("sk-") {
                "[redacted]"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Upstream error codes passed through as they are (OpenAI's own).
fn upstream_code(code: Option<&str>) -> &'static str {
    match code {
        Some("invalid_value") => "invalid_value",
        Some("invalid_type") => "invalid_type",
        Some("missing_required_parameter") => "missing_required_parameter",
        Some("unsupported_parameter") => "unsupported_parameter",
        Some("unsupported_value") => "unsupported_value",
        Some("model_not_found") => "model_not_found",
        Some("content_policy_violation") => "content_policy_violation",
        _ => "invalid_request",
    }
}

/// An [`LlmError`] in OpenAI's terms.
pub fn llm_error(error: &LlmError) -> Failure {
    let message = scrub(&error.to_string());
    let (status, code) = match error {
        LlmError::InvalidRequest { code, .. } => {
            (StatusCode::BAD_REQUEST, upstream_code(code.as_deref()))
        }
        LlmError::ContextLengthExceeded { .. } => {
            (StatusCode::BAD_REQUEST, "context_length_exceeded")
        }
        LlmError::ModelNotFound { .. } => (StatusCode::NOT_FOUND, "model_not_found"),
        LlmError::Authentication { provider, .. } => {
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_authentication_error",
                format!("{provider} rejected the provider API key configured for this tenant"),
            )
            .into();
        }
        LlmError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"),
        LlmError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
        LlmError::Connection { .. } => (StatusCode::BAD_GATEWAY, "upstream_connection_error"),
        LlmError::Upstream { .. } => (StatusCode::BAD_GATEWAY, "upstream_error"),
        LlmError::MalformedResponse { .. } => {
            (StatusCode::BAD_GATEWAY, "upstream_malformed_response")
        }
        LlmError::Unsupported { .. } => (StatusCode::BAD_REQUEST, "unsupported"),
        LlmError::Configuration { .. } => (StatusCode::BAD_REQUEST, "provider_not_configured"),
        _ => (StatusCode::BAD_GATEWAY, "upstream_error"),
    };
    Failure {
        error: ApiError::new(status, code, message),
        retry_after: match error {
            LlmError::RateLimited { .. } => {
                Some(error.retry_after().unwrap_or(Duration::from_secs(1)))
            }
            _ => None,
        },
        reached_provider: !matches!(error, LlmError::Configuration { .. }),
        headers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_is_written_in_milliseconds_to_the_microsecond() {
        for (overhead, text) in [
            (Duration::ZERO, "0.000"),
            (Duration::from_nanos(999), "0.000"),
            (Duration::from_micros(62), "0.062"),
            (Duration::from_micros(1_500), "1.500"),
            (Duration::from_millis(12_345), "12345.000"),
        ] {
            assert_eq!(overhead_ms(overhead), text);
        }
    }

    #[test]
    fn errors_map_to_openai_statuses() {
        let p = ProviderKind::OpenAi;
        let cases = [
            (
                LlmError::InvalidRequest {
                    provider: p,
                    status: Some(400),
                    code: Some("invalid_value".into()),
                    message: "bad".into(),
                },
                400,
                "invalid_value",
            ),
            (
                LlmError::InvalidRequest {
                    provider: p,
                    status: Some(400),
                    code: None,
                    message: "bad".into(),
                },
                400,
                "invalid_request",
            ),
            (
                LlmError::ContextLengthExceeded {
                    provider: p,
                    message: "long".into(),
                },
                400,
                "context_length_exceeded",
            ),
            (
                LlmError::Authentication {
                    provider: p,
                    status: 401,
                    message: "Incorrect API key provided: sk-proj-abc".into(),
                },
                502,
                "upstream_authentication_error",
            ),
            (
                LlmError::Timeout {
                    provider: p,
                    after: Duration::from_secs(1),
                },
                504,
                "upstream_timeout",
            ),
            (
                LlmError::Configuration {
                    provider: p,
                    message: "no key".into(),
                },
                400,
                "provider_not_configured",
            ),
        ];
        for (error, status, code) in cases {
            let failure = llm_error(&error);
            assert_eq!(failure.error.status.as_u16(), status, "{error}");
            assert_eq!(failure.error.code, code);
            assert!(!failure.error.message.contains("sk-"));
        }
        let limited = llm_error(&LlmError::RateLimited {
            provider: p,
            retry_after: Some(Duration::from_secs(7)),
            message: "slow down".into(),
        });
        assert_eq!(limited.error.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(limited.error.code, "rate_limit_exceeded");
        let response = limited.into_response();
        assert_eq!(response.headers()[RETRY_AFTER], "7");
    }

    #[test]
    fn messages_lose_their_keys() {
        let scrubbed = scrub("key [redacted] and sk-proj-xyz failed");
        assert_eq!(scrubbed, "key [redacted] and [redacted] failed");
    }

    #[test]
    fn request_ids_are_distinct_v7_ids_of_their_millisecond() {
        let at = chrono::Utc::now();
        let ids: std::collections::HashSet<uuid::Uuid> =
            (0..10_000).map(|_| request_id(at)).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            assert_eq!(id.get_version(), Some(uuid::Version::SortRand));
            let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
            let millis = i64::try_from(secs).unwrap() * 1000 + i64::from(nanos / 1_000_000);
            assert_eq!(millis, at.timestamp_millis());
        }
    }
}
