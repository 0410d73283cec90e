//! The fake Anthropic Messages API: `POST /v1/messages` (JSON or the full SSE event
//! sequence), with Anthropic's `x-api-key` authentication, required `anthropic-version`
//! header, request validation and error envelope.

use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::{
    Exchange, FakeToolCall, Rendered, Reply, ReplyKind, Shared, echo, new_id, respond, split_text,
    sse_frame,
};

/// `POST /v1/messages`.
pub(crate) async fn messages(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&headers) {
        Exchange::record_only(&shared, method, &uri, &headers);
        return respond(
            &Reply::echo(),
            error_json(401, "invalid x-api-key", Some("authentication_error")),
        )
        .await;
    }
    let exchange = Exchange::take(&shared, method, &uri, headers, body);
    let request = &exchange.request;
    let reply = &exchange.reply;
    if let Some(message) = invalid(&exchange.headers, request) {
        return respond(reply, error_json(400, &message, None)).await;
    }
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let rendered = match &reply.kind {
        ReplyKind::Error {
            status,
            message,
            code,
        } => error_json(*status, message, code.as_deref()),
        ReplyKind::StreamError { after, message } if stream => {
            let answer = Answer::new(reply, request);
            let text = echo(&last_user_text(request));
            let mut frames = answer.head();
            frames.extend(
                split_text(&text, reply.chunks.max(*after))
                    .iter()
                    .take(*after)
                    .map(|piece| text_delta(0, piece)),
            );
            frames.push(event(
                "error",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": message}}),
            ));
            Rendered::Stream {
                content_type: "text/event-stream",
                frames,
            }
        }
        ReplyKind::StreamError { message, .. } => error_json(500, message, None),
        ReplyKind::Malformed if stream => {
            let mut frames = Answer::new(reply, request).head();
            frames.push(Bytes::from_static(
                b"event: content_block_delta\ndata: {not json\n\n",
            ));
            Rendered::Stream {
                content_type: "text/event-stream",
                frames,
            }
        }
        ReplyKind::Malformed => Rendered::Raw {
            status: 200,
            content_type: "application/json".into(),
            body: Bytes::from_static(b"{\"id\":\"msg_01\",\"type\":\"mess"),
        },
        ReplyKind::Raw {
            status,
            content_type,
            body,
        } => Rendered::raw(*status, content_type, body),
        ReplyKind::Hang | ReplyKind::Echo | ReplyKind::Text(_) | ReplyKind::ToolCalls { .. } => {
            let (text, calls) = reply.answer(|| last_user_text(request));
            let answer = Answer::new(reply, request);
            if stream {
                answer.stream(&text, &calls)
            } else {
                answer.complete(&text, &calls)
            }
        }
    };
    respond(reply, rendered).await
}

/// `x-api-key`, or `Authorization: Bearer` as the API also accepts, must be non-empty.
fn authorized(headers: &HeaderMap) -> bool {
    let api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|key| !key.trim().is_empty());
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|key| !key.trim().is_empty());
    api_key || bearer
}

/// What the real API rejects with a 400 before generating anything.
fn invalid(headers: &HeaderMap, request: &Value) -> Option<String> {
    if headers.get("anthropic-version").is_none() {
        return Some("anthropic-version: header is required".into());
    }
    if !request.is_object() {
        return Some("Request body is not valid JSON".into());
    }
    for (field, ok) in [
        ("model", request.get("model").is_some_and(Value::is_string)),
        (
            "messages",
            request.get("messages").is_some_and(Value::is_array),
        ),
        (
            "max_tokens",
            request.get("max_tokens").is_some_and(Value::is_u64),
        ),
    ] {
        if !ok {
            return Some(format!("{field}: Field required"));
        }
    }
    let messages = request.get("messages").and_then(Value::as_array)?;
    for (index, message) in messages.iter().enumerate() {
        match message.get("role").and_then(Value::as_str) {
            Some("user" | "assistant") => {}
            Some("system") => {
                return Some(
                    "messages: Unexpected role \"system\". The Messages API accepts a \
                     top-level `system` parameter, not \"system\" as an input message role."
                        .into(),
                );
            }
            _ => {
                return Some(format!(
                    "messages.{index}.role: Input should be 'user' or 'assistant'"
                ));
            }
        }
    }
    None
}

/// Anthropic's error envelope, with the type the status implies unless `code` names one.
fn error_json(status: u16, message: &str, code: Option<&str>) -> Rendered {
    let kind = code.unwrap_or(match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    });
    Rendered::Json {
        status,
        body: json!({
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": new_id("req_"),
        }),
    }
}

/// The text of the last user message: its string content or its text blocks.
fn last_user_text(request: &Value) -> String {
    let Some(message) = request
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|messages| {
            messages
                .iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
    else {
        return String::new();
    };
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// The unified finish reason in Anthropic's words.
fn stop_reason(unified: &str) -> &str {
    match unified {
        "stop" => "end_turn",
        "length" => "max_tokens",
        "tool_calls" => "tool_use",
        "content_filter" => "refusal",
        other => other,
    }
}

fn event(name: &str, data: Value) -> Bytes {
    sse_frame(Some(name), &data)
}

fn text_delta(index: usize, text: &str) -> Bytes {
    event(
        "content_block_delta",
        json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}),
    )
}

/// One answer being rendered.
struct Answer<'a> {
    id: String,
    model: String,
    reply: &'a Reply,
    request: &'a Value,
}

impl<'a> Answer<'a> {
    fn new(reply: &'a Reply, request: &'a Value) -> Self {
        Self {
            id: new_id("msg_"),
            model: reply.model_for(request),
            reply,
            request,
        }
    }

    fn usage(&self, text: &str, calls: &[FakeToolCall]) -> (u64, u64) {
        let mut answer = text.to_owned();
        for call in calls {
            answer.push_str(&call.name);
            answer.push_str(&call.arguments.to_string());
        }
        self.reply.usage_for(self.request, &answer)
    }

    fn complete(&self, text: &str, calls: &[FakeToolCall]) -> Rendered {
        let mut content = Vec::new();
        if !text.is_empty() || calls.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
        content.extend(calls.iter().map(|call| {
            json!({"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments})
        }));
        let (input, output) = self.usage(text, calls);
        Rendered::Json {
            status: 200,
            body: json!({
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": content,
                "stop_reason": stop_reason(self.reply.finish_reason()),
                "stop_sequence": null,
                "usage": {"input_tokens": input, "output_tokens": output},
            }),
        }
    }

    /// `message_start`, the first text block's start and a `ping`, as the API opens every
    /// stream.
    fn head(&self) -> Vec<Bytes> {
        let (input, _) = self.reply.usage_for(self.request, "");
        vec![
            event(
                "message_start",
                json!({"type": "message_start", "message": {
                    "id": self.id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": {"input_tokens": input, "output_tokens": 1},
                }}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            event("ping", json!({"type": "ping"})),
        ]
    }

    fn stream(&self, text: &str, calls: &[FakeToolCall]) -> Rendered {
        let with_text = !text.is_empty() || calls.is_empty();
        let mut frames = Vec::new();
        let mut index = 0;
        if with_text {
            frames.extend(self.head());
            frames.extend(
                split_text(text, self.reply.chunks)
                    .iter()
                    .map(|piece| text_delta(0, piece)),
            );
            frames.push(block_stop(0));
            index = 1;
        } else {
            // Without text the first block is the tool call; message_start and ping stay.
            let mut head = self.head();
            head.remove(1);
            frames.extend(head);
        }
        for call in calls {
            frames.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": {
                    "type": "tool_use", "id": call.id, "name": call.name, "input": {},
                }}),
            ));
            let arguments = call.arguments.to_string();
            // The API opens every tool input with an empty fragment.
            let pieces = std::iter::once(String::new()).chain(split_text(&arguments, 3));
            for piece in pieces {
                frames.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index, "delta": {
                        "type": "input_json_delta", "partial_json": piece,
                    }}),
                ));
            }
            frames.push(block_stop(index));
            index += 1;
        }
        let (_, output) = self.usage(text, calls);
        frames.push(event(
            "message_delta",
            json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason(self.reply.finish_reason()), "stop_sequence": null},
                "usage": {"output_tokens": output}}),
        ));
        frames.push(event("message_stop", json!({"type": "message_stop"})));
        Rendered::Stream {
            content_type: "text/event-stream",
            frames,
        }
    }
}

fn block_stop(index: usize) -> Bytes {
    event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": index}),
    )
}
