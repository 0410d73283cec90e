//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), so the
//! official Anthropic SDKs reach any provider behind the gateway.
//!
//! Requests take the same path as `/v1/chat/completions` ([`super::chat::serve`]: limits,
//! cache, budgets, routing, fallback, usage); only the codec differs
//! ([`super::anthropic_codec`]). Every error, authentication included, is answered in
//! Anthropic's envelope `{"type": "error", "error": {"type", "message"}}`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::FutureExt;
use futures::future::Either;
use meta_chat_llm::{CompletionResponse, StreamChunk, Usage};

use super::AppState;
use super::anthropic_codec::{
    EventEncoder, count_tokens_request, error_json, message_bytes, parse_messages_request,
};
use super::auth::Caller;
use super::chat::{self, ChatCall, Dialect, StreamEncoder};
use super::error::ApiError;
use super::json::RawBody;
use super::metering::{self, estimate_input_tokens};
use super::openai::{Arrival, Failure, require_tenant};

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
}

fn messages(
    State(state): State<AppState>,
    arrival: Arrival,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    body: Result<RawBody, ApiError>,
) -> impl Future<Output = Response> + Send {
    // The body and headers are slices of the connection's read buffer, released before the
    // upstream is awaited (as for chat completions): the body when the closure ends, the
    // headers below.
    let prepared = (|| {
        let tenant = require_tenant(caller?)?;
        let RawBody(body) = body?;
        let parsed = parse_messages_request(&body)?;
        Ok::<_, Failure>(ChatCall {
            conversation_id: metering::conversation_id(&headers, parsed.conversation_id)?,
            tenant,
            endpoint: "messages",
            model: parsed.model,
            request: parsed.request,
            stream: parsed.stream,
        })
    })();
    drop(headers);
    // The handler's future is the chat future itself, as for chat completions.
    match prepared {
        Ok(call) => Either::Left(
            chat::serve(state, arrival, call, AnthropicDialect)
                .map(|result| result.unwrap_or_else(anthropic_failure)),
        ),
        Err(failure) => Either::Right(std::future::ready(anthropic_failure(failure))),
    }
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": n}`, an estimate (about four
/// characters per token of the messages, system prompt and tools), as no provider is asked.
async fn count_tokens(
    caller: Result<Caller, ApiError>,
    body: Result<RawBody, ApiError>,
) -> Response {
    let result = (|| {
        require_tenant(caller?)?;
        let RawBody(body) = body?;
        let parsed = count_tokens_request(&body)?;
        Ok::<_, ApiError>(
            Json(serde_json::json!({
                "input_tokens": estimate_input_tokens(&parsed.request),
            }))
            .into_response(),
        )
    })();
    result.unwrap_or_else(|error| anthropic_failure(error.into()))
}

/// A failure in Anthropic's envelope, keeping its status, `Retry-After` and other headers.
fn anthropic_failure(failure: Failure) -> Response {
    failure.into_response_with(error_json)
}

/// Anthropic's Messages shapes: `message` JSON and its event stream.
struct AnthropicDialect;

impl Dialect for AnthropicDialect {
    type Stream = AnthropicStream;

    fn response_id(&self, request_id: uuid::Uuid) -> String {
        format!("msg_{}", request_id.simple())
    }

    fn answer_body(
        &self,
        response: &CompletionResponse,
        id: &str,
        _created: i64,
        model: &str,
        cost_usd: &str,
    ) -> Vec<u8> {
        message_bytes(response, id, model, Some(cost_usd))
    }

    fn stream_encoder(
        &self,
        id: String,
        _created: i64,
        model: String,
        input_estimate: u64,
    ) -> AnthropicStream {
        AnthropicStream(EventEncoder::new(id, model, input_estimate))
    }
}

/// `message_start`, content blocks, `message_delta`, `message_stop`; `error` on failure.
struct AnthropicStream(EventEncoder);

impl StreamEncoder for AnthropicStream {
    fn start(&mut self) -> Vec<axum::body::Bytes> {
        vec![self.0.start()]
    }

    fn encode(&mut self, chunk: &StreamChunk) -> Vec<axum::body::Bytes> {
        self.0.encode(chunk)
    }

    fn finish(&mut self, usage: Usage, cost_usd: &str) -> Vec<axum::body::Bytes> {
        self.0.finish(usage, Some(cost_usd))
    }

    fn fail(&mut self, error: &ApiError) -> Vec<axum::body::Bytes> {
        vec![EventEncoder::error_event(error)]
    }

    fn usage(&self) -> Option<Usage> {
        self.0.usage()
    }
}
