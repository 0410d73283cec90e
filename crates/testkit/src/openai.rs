//! The fake OpenAI API: `POST /v1/chat/completions` (JSON or SSE `chat.completion.chunk`
//! frames ending in `[DONE]`), `POST /v1/embeddings` and `GET /v1/models`, with OpenAI's
//! error envelope and Bearer authentication.

use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::{
    Exchange, FakeToolCall, Rendered, Reply, ReplyKind, Shared, echo, estimate_tokens,
    fake_embedding, new_id, respond, split_text, sse_frame,
};

const FINGERPRINT: &str = "fp_fake0001";

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&headers) {
        Exchange::record_only(&shared, method, &uri, &headers);
        return unauthorized().await;
    }
    let exchange = Exchange::take(&shared, method, &uri, headers, body);
    let request = &exchange.request;
    let reply = &exchange.reply;
    let valid = request.get("model").and_then(Value::as_str).is_some()
        && request.get("messages").and_then(Value::as_array).is_some();
    if !valid {
        let message = if request.is_object() {
            "you must provide a model parameter and a messages array"
        } else {
            "We could not parse the JSON body of your request."
        };
        return respond(reply, error_json(400, message, None)).await;
    }
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let rendered = match &reply.kind {
        ReplyKind::Error {
            status,
            message,
            code,
        } => error_json(*status, message, code.as_deref()),
        ReplyKind::StreamError { after, message } if stream => {
            let chat = Chat::new(reply, request);
            let text = echo(&last_user_text(request));
            let pieces = split_text(&text, reply.chunks.max(*after));
            let mut frames = vec![chat.frame(json!({"role": "assistant", "content": ""}), None)];
            frames.extend(
                pieces
                    .iter()
                    .take(*after)
                    .map(|piece| chat.frame(json!({"content": piece}), None)),
            );
            frames.push(sse_frame(
                None,
                &json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}}),
            ));
            Rendered::Stream {
                content_type: "text/event-stream",
                frames,
            }
        }
        ReplyKind::StreamError { message, .. } => error_json(500, message, None),
        ReplyKind::Malformed if stream => Rendered::Stream {
            content_type: "text/event-stream",
            frames: vec![Bytes::from_static(b"data: {not json\n\n"), done()],
        },
        ReplyKind::Malformed => Rendered::Raw {
            status: 200,
            content_type: "application/json".into(),
            body: Bytes::from_static(b"{\"id\": \"chatcmpl-"),
        },
        ReplyKind::Raw {
            status,
            content_type,
            body,
        } => Rendered::raw(*status, content_type, body),
        ReplyKind::Hang | ReplyKind::Echo | ReplyKind::Text(_) | ReplyKind::ToolCalls { .. } => {
            let (text, calls) = reply.answer(|| last_user_text(request));
            let chat = Chat::new(reply, request);
            if stream {
                chat.stream(&text, &calls, include_usage && reply.stream_usage)
            } else {
                chat.complete(&text, &calls)
            }
        }
    };
    respond(reply, rendered).await
}

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&headers) {
        Exchange::record_only(&shared, method, &uri, &headers);
        return unauthorized().await;
    }
    let exchange = Exchange::take(&shared, method, &uri, headers, body);
    let request = &exchange.request;
    let reply = &exchange.reply;
    let inputs: Option<Vec<String>> = match request.get("input") {
        Some(Value::String(text)) => Some(vec![text.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    };
    let model = request.get("model").and_then(Value::as_str);
    let (Some(inputs), Some(model)) = (inputs, model) else {
        return respond(
            reply,
            error_json(400, "you must provide a model parameter and an input", None),
        )
        .await;
    };
    let rendered = match &reply.kind {
        ReplyKind::Error {
            status,
            message,
            code,
        } => error_json(*status, message, code.as_deref()),
        ReplyKind::StreamError { message, .. } => error_json(500, message, None),
        ReplyKind::Malformed => Rendered::Raw {
            status: 200,
            content_type: "application/json".into(),
            body: Bytes::from_static(b"{\"object\": \"list\", \"data\": [{\"embe"),
        },
        ReplyKind::Raw {
            status,
            content_type,
            body,
        } => Rendered::raw(*status, content_type, body),
        ReplyKind::Hang | ReplyKind::Echo | ReplyKind::Text(_) | ReplyKind::ToolCalls { .. } => {
            let dimensions = request
                .get("dimensions")
                .and_then(Value::as_u64)
                .map_or(8, |d| d as usize);
            let data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(index, text)| {
                    json!({
                        "object": "embedding",
                        "index": index,
                        "embedding": fake_embedding(text, dimensions),
                    })
                })
                .collect();
            let tokens = reply.usage.map_or_else(
                || inputs.iter().map(|t| estimate_tokens(t)).sum(),
                |(i, _)| i,
            );
            Rendered::Json {
                status: 200,
                body: json!({
                    "object": "list",
                    "data": data,
                    "model": reply.model.as_deref().unwrap_or(model),
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                }),
            }
        }
    };
    respond(reply, rendered).await
}

/// `GET /v1/models`.
pub(crate) async fn models(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    Exchange::record_only(&shared, method, &uri, &headers);
    if !authorized(&headers) {
        return unauthorized().await;
    }
    let data: Vec<Value> = [
        ("gpt-4o-mini", "system"),
        ("gpt-4o", "system"),
        ("text-embedding-3-small", "system"),
    ]
    .into_iter()
    .map(|(id, owner)| json!({"id": id, "object": "model", "created": 1_715_367_049, "owned_by": owner}))
    .collect();
    respond(
        &Reply::echo(),
        Rendered::Json {
            status: 200,
            body: json!({"object": "list", "data": data}),
        },
    )
    .await
}

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|key| !key.trim().is_empty())
}

async fn unauthorized() -> Response {
    respond(
        &Reply::echo(),
        Rendered::Json {
            status: 401,
            body: json!({"error": {
                "message": "Incorrect API key provided: ********. You can find your API key at https://platform.openai.com/account/api-keys.",
                "type": "invalid_request_error",
                "param": null,
                "code": "invalid_api_key",
            }}),
        },
    )
    .await
}

/// OpenAI's error envelope, with the type (and default code) the status implies.
fn error_json(status: u16, message: &str, code: Option<&str>) -> Rendered {
    let (kind, default_code) = match status {
        401 => ("invalid_request_error", Some("invalid_api_key")),
        403 => ("permission_error", None),
        404 => ("invalid_request_error", Some("model_not_found")),
        429 => ("requests", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("invalid_request_error", None),
    };
    Rendered::Json {
        status,
        body: json!({"error": {
            "message": message,
            "type": kind,
            "param": null,
            "code": code.or(default_code),
        }}),
    }
}

fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

/// The text of the last user message (string content or text parts).
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
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// One answer being rendered: what every frame shares.
struct Chat<'a> {
    id: String,
    created: u64,
    model: String,
    reply: &'a Reply,
    request: &'a Value,
}

impl<'a> Chat<'a> {
    fn new(reply: &'a Reply, request: &'a Value) -> Self {
        Self {
            id: new_id("chatcmpl-"),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: reply.model_for(request),
            reply,
            request,
        }
    }

    fn usage(&self, text: &str, calls: &[FakeToolCall]) -> Value {
        let mut answer = text.to_owned();
        for call in calls {
            answer.push_str(&call.name);
            answer.push_str(&call.arguments.to_string());
        }
        let (input, output) = self.reply.usage_for(self.request, &answer);
        json!({
            "prompt_tokens": input,
            "completion_tokens": output,
            "total_tokens": input + output,
        })
    }

    fn complete(&self, text: &str, calls: &[FakeToolCall]) -> Rendered {
        let mut message = json!({
            "role": "assistant",
            "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::from(text) },
            "refusal": null,
        });
        if !calls.is_empty() {
            message["tool_calls"] = calls
                .iter()
                .map(|call| {
                    json!({
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments.to_string()},
                    })
                })
                .collect();
        }
        Rendered::Json {
            status: 200,
            body: json!({
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": message,
                    "logprobs": null,
                    "finish_reason": self.reply.finish_reason(),
                }],
                "usage": self.usage(text, calls),
                "system_fingerprint": FINGERPRINT,
            }),
        }
    }

    /// One `chat.completion.chunk` frame. The real API adds `usage: null` to every frame
    /// when the request asked for usage.
    fn frame(&self, delta: Value, finish_reason: Option<&str>) -> Bytes {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        });
        if self.asked_for_usage() {
            chunk["usage"] = Value::Null;
        }
        sse_frame(None, &chunk)
    }

    fn asked_for_usage(&self) -> bool {
        self.request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true)
    }

    fn stream(&self, text: &str, calls: &[FakeToolCall], with_usage: bool) -> Rendered {
        let mut frames = vec![self.frame(json!({"role": "assistant", "content": ""}), None)];
        for piece in split_text(text, self.reply.chunks) {
            frames.push(self.frame(json!({"content": piece}), None));
        }
        for (index, call) in calls.iter().enumerate() {
            frames.push(self.frame(
                json!({"tool_calls": [{
                    "index": index,
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }]}),
                None,
            ));
            for piece in split_text(&call.arguments.to_string(), self.reply.chunks) {
                frames.push(self.frame(
                    json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}),
                    None,
                ));
            }
        }
        frames.push(self.frame(json!({}), Some(self.reply.finish_reason())));
        if with_usage {
            frames.push(sse_frame(
                None,
                &json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": FINGERPRINT,
                    "choices": [],
                    "usage": self.usage(text, calls),
                }),
            ));
        }
        frames.push(done());
        Rendered::Stream {
            content_type: "text/event-stream",
            frames,
        }
    }
}
