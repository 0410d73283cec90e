//! The fake Ollama native API: `POST /api/chat`, `POST /api/embed`, `GET /api/tags`.
//!
//! Faithful to what a real Ollama server does: it streams NDJSON unless the request says
//! `"stream": false`, tool calls carry no ids and arrive whole in one line, errors are
//! `{"error": "…"}`, and a model that is not pulled is a 404.

use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::{
    Exchange, Rendered, Reply, ReplyKind, Shared, echo, estimate_tokens, fake_embedding,
    ndjson_frame, respond, split_text,
};

const NDJSON: &str = "application/x-ndjson";

/// `POST /api/chat`.
pub(crate) async fn chat(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let exchange = Exchange::take(&shared, method, &uri, headers, body.clone());
    if let Err(rejected) = validate(&shared, &body, &exchange.request) {
        return respond(&Reply::echo(), rejected).await;
    }
    let rendered = render_chat(&exchange.request, &exchange.reply);
    respond(&exchange.reply, rendered).await
}

/// `POST /api/embed`.
pub(crate) async fn embed(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let exchange = Exchange::take(&shared, method, &uri, headers, body.clone());
    if let Err(rejected) = validate(&shared, &body, &exchange.request) {
        return respond(&Reply::echo(), rejected).await;
    }
    let rendered = render_embed(&exchange.request, &exchange.reply);
    respond(&exchange.reply, rendered).await
}

/// `GET /api/tags`: the models set with `FakeServer::set_ollama_models`.
pub(crate) async fn tags(
    State(shared): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    Exchange::record_only(&shared, method, &uri, &headers);
    let models: Vec<Value> = shared
        .lock()
        .ollama_models
        .iter()
        .map(|name| {
            json!({
                "name": name,
                "model": name,
                "modified_at": "2024-07-22T20:33:28.123648-07:00",
                "size": 4_661_224_676u64,
                "digest": "42182419e9508c30c4b1fe55015f06b65f4ca4b9e28a744be55008d21998a093",
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "llama",
                    "families": ["llama"],
                    "parameter_size": "8.0B",
                    "quantization_level": "Q4_0"
                }
            })
        })
        .collect();
    respond(
        &Reply::echo(),
        Rendered::Json {
            status: 200,
            body: json!({ "models": models }),
        },
    )
    .await
}

fn error(status: u16, message: impl Into<String>) -> Rendered {
    Rendered::Json {
        status,
        body: json!({ "error": message.into() }),
    }
}

/// The checks Ollama makes before it looks at the model's answer.
fn validate(shared: &Shared, body: &[u8], request: &Value) -> Result<(), Rendered> {
    if body.is_empty() {
        return Err(error(400, "missing request body"));
    }
    if let Err(e) = serde_json::from_slice::<Value>(body) {
        return Err(error(
            400,
            format!("invalid character in request body: {e}"),
        ));
    }
    if !request.is_object() {
        return Err(error(
            400,
            "json: cannot unmarshal into Go value of type api.Request",
        ));
    }
    let model = request.get("model").and_then(Value::as_str).unwrap_or("");
    if model.is_empty() {
        return Err(error(400, "model is required"));
    }
    let with_tag = |name: &str| {
        if name.contains(':') {
            name.to_owned()
        } else {
            format!("{name}:latest")
        }
    };
    let pulled = shared
        .lock()
        .ollama_models
        .iter()
        .any(|known| with_tag(known) == with_tag(model));
    if !pulled {
        return Err(error(
            404,
            format!("model \"{model}\" not found, try pulling it first"),
        ));
    }
    Ok(())
}

fn last_user_text(request: &Value) -> &str {
    request
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|messages| {
            messages
                .iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        })
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// An RFC 3339 UTC timestamp of now, like Ollama's `created_at`.
fn now_rfc3339() -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// Ollama's `done_reason` for a unified finish reason (tool calls end with `stop`).
fn done_reason(reply: &Reply) -> &'static str {
    match reply.finish_reason() {
        "length" => "length",
        _ => "stop",
    }
}

fn line(model: &str, message: Value) -> Value {
    json!({
        "model": model,
        "created_at": now_rfc3339(),
        "message": message,
        "done": false,
    })
}

/// The final object: `done: true` with the reason, and the counts unless `usage` is `None`.
fn final_object(model: &str, message: Value, reply: &Reply, usage: Option<(u64, u64)>) -> Value {
    let mut object = Map::new();
    object.insert("model".into(), json!(model));
    object.insert("created_at".into(), json!(now_rfc3339()));
    object.insert("message".into(), message);
    object.insert("done".into(), json!(true));
    object.insert("done_reason".into(), json!(done_reason(reply)));
    object.insert("total_duration".into(), json!(4_883_583_458u64));
    object.insert("load_duration".into(), json!(1_334_875u64));
    if let Some((input, output)) = usage {
        object.insert("prompt_eval_count".into(), json!(input));
        object.insert("prompt_eval_duration".into(), json!(342_546_000u64));
        object.insert("eval_count".into(), json!(output));
        object.insert("eval_duration".into(), json!(4_535_599_000u64));
    }
    Value::Object(object)
}

fn wire_tool_calls(calls: &[crate::FakeToolCall]) -> Value {
    calls
        .iter()
        .map(|call| json!({"function": {"name": call.name, "arguments": call.arguments}}))
        .collect()
}

fn render_chat(request: &Value, reply: &Reply) -> Rendered {
    // Ollama streams unless told not to.
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let model = reply.model_for(request);
    let (text, calls) = match &reply.kind {
        ReplyKind::Echo | ReplyKind::Hang | ReplyKind::Text(_) | ReplyKind::ToolCalls { .. } => {
            reply.answer(|| last_user_text(request).to_owned())
        }
        ReplyKind::Error {
            status, message, ..
        } => return error(*status, message.clone()),
        ReplyKind::StreamError { after, message } => {
            if !stream {
                return error(500, message.clone());
            }
            let text = echo(last_user_text(request));
            let mut frames: Vec<Bytes> = split_text(&text, reply.chunks.max(*after))
                .into_iter()
                .take(*after)
                .map(|piece| {
                    ndjson_frame(&line(
                        &model,
                        json!({"role": "assistant", "content": piece}),
                    ))
                })
                .collect();
            frames.push(ndjson_frame(&json!({ "error": message })));
            return Rendered::Stream {
                content_type: NDJSON,
                frames,
            };
        }
        ReplyKind::Malformed => {
            if !stream {
                return Rendered::Raw {
                    status: 200,
                    content_type: "application/json; charset=utf-8".into(),
                    body: Bytes::from_static(b"{\"model\": \"oops"),
                };
            }
            let first = line(&model, json!({"role": "assistant", "content": "Hel"}));
            return Rendered::Stream {
                content_type: NDJSON,
                frames: vec![ndjson_frame(&first), Bytes::from_static(b"{not json\n")],
            };
        }
        ReplyKind::Raw {
            status,
            content_type,
            body,
        } => {
            return Rendered::raw(*status, content_type, body);
        }
    };
    let usage = reply.usage_for(request, &text);
    if !stream {
        let mut message = json!({"role": "assistant", "content": text});
        if !calls.is_empty() {
            message["tool_calls"] = wire_tool_calls(&calls);
        }
        return Rendered::Json {
            status: 200,
            body: final_object(&model, message, reply, Some(usage)),
        };
    }
    let mut frames: Vec<Bytes> = split_text(&text, reply.chunks)
        .into_iter()
        .map(|piece| {
            ndjson_frame(&line(
                &model,
                json!({"role": "assistant", "content": piece}),
            ))
        })
        .collect();
    if !calls.is_empty() {
        frames.push(ndjson_frame(&line(
            &model,
            json!({"role": "assistant", "content": "", "tool_calls": wire_tool_calls(&calls)}),
        )));
    }
    frames.push(ndjson_frame(&final_object(
        &model,
        json!({"role": "assistant", "content": ""}),
        reply,
        reply.stream_usage.then_some(usage),
    )));
    Rendered::Stream {
        content_type: NDJSON,
        frames,
    }
}

fn render_embed(request: &Value, reply: &Reply) -> Rendered {
    match &reply.kind {
        ReplyKind::Error {
            status, message, ..
        } => return error(*status, message.clone()),
        ReplyKind::StreamError { message, .. } => return error(500, message.clone()),
        ReplyKind::Malformed => {
            return Rendered::Raw {
                status: 200,
                content_type: "application/json; charset=utf-8".into(),
                body: Bytes::from_static(b"{\"embeddings\": [[0.1,"),
            };
        }
        ReplyKind::Raw {
            status,
            content_type,
            body,
        } => {
            return Rendered::raw(*status, content_type, body);
        }
        ReplyKind::Echo | ReplyKind::Hang | ReplyKind::Text(_) | ReplyKind::ToolCalls { .. } => {}
    }
    // `input` is a string or a list of strings.
    let inputs: Vec<&str> = match request.get("input") {
        Some(Value::String(text)) => vec![text.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let dimensions = request
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(8, |d| d as usize);
    let embeddings: Vec<Vec<f32>> = inputs
        .iter()
        .map(|text| fake_embedding(text, dimensions))
        .collect();
    let tokens = reply.usage.map_or_else(
        || inputs.iter().map(|t| estimate_tokens(t)).sum(),
        |(input, _)| input,
    );
    Rendered::Json {
        status: 200,
        body: json!({
            "model": reply.model_for(request),
            "embeddings": embeddings,
            "total_duration": 14_143_917u64,
            "load_duration": 1_019_500u64,
            "prompt_eval_count": tokens,
        }),
    }
}
