//! The Anthropic ingress dialect: Messages (`POST /v1/messages`) and token counting
//! (`POST /v1/messages/count_tokens`) requests, Messages responses, the Messages SSE event
//! sequence and Anthropic's error envelope, mapped to and from the unified types of
//! `meta_chat_llm`.
//!
//! Like the OpenAI codec, this is separate from the Anthropic *provider* adapter in the
//! library: an Anthropic client may reach any provider, and every function here is pure (no
//! I/O). Parsing takes the request bytes; encoding returns JSON values or SSE bytes.
//!
//! Top-level request fields the unified request has no place for (`top_k`, `thinking`,
//! `service_tier`, `metadata.user_id`, `container`, `mcp_servers`, …) are kept verbatim in
//! [`CompletionRequest::extra`], tagged with [`Dialect::Anthropic`]: the Anthropic provider
//! writes them back into its request body, other providers ignore them.
//!
//! What does not survive the unified types (see [`parse_messages_request`]): `cache_control`
//! and `citations` on content blocks, system blocks and tools; `is_error` on tool results;
//! `disable_parallel_tool_use` in `tool_choice`; `thinking` / `redacted_thinking` blocks of
//! earlier assistant turns. Image, document and other non-text content and server tools are
//! refused with a 400 naming the field.

use std::borrow::Cow;

use bytes::Bytes;
use meta_chat_llm::types::{
    CompletionRequest, CompletionResponse, Dialect, Extra, FinishReason, Message, StreamChunk,
    Tool, ToolCall, ToolChoice, Usage,
};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::codec_util::{
    DEFAULT_MODEL, FieldReader, Parsed, bad_request, invalid_value, kind, parse_body, present,
    write_json,
};
use super::error::ApiError;

#[cfg(test)]
mod tests;

// ---------------------------------------------------------------------------------------
// Errors.

/// Anthropic's error `type` for an HTTP status, so the official SDKs raise the matching
/// exception class: 400 `invalid_request_error` (also every other 4xx not listed), 401
/// `authentication_error`, 403 `permission_error`, 404 `not_found_error`, 413
/// `request_too_large`, 429 `rate_limit_error`, 529 `overloaded_error`, other 5xx
/// `api_error`.
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// The error's message as an Anthropic client sees it. Anthropic's envelope has no `param`,
/// so the field at fault leads the message (`messages.1.content.0.type: …`), as in
/// Anthropic's own messages.
fn error_message(error: &ApiError) -> String {
    match &error.param {
        Some(param) if !error.message.starts_with(param.as_str()) => {
            format!("{param}: {}", error.message)
        }
        _ => error.message.clone(),
    }
}

/// Anthropic's error envelope: `{"type": "error", "error": {"type", "message"}}`, the type
/// from the status ([`error_type`]).
pub fn error_json(error: &ApiError) -> Value {
    json!({
        "type": "error",
        "error": {
            "type": error_type(error.status.as_u16()),
            "message": error_message(error),
        }
    })
}

/// Anthropic wording: the parameter leads the message when the error is encoded
/// ([`error_message`]), so the message itself does not name it.
struct Field;

impl FieldReader for Field {
    fn invalid_type(param: &str, expected: &str, got: &Value) -> ApiError {
        bad_request(
            "invalid_type",
            param,
            format!("invalid type: expected {expected}, got {}", kind(got)),
        )
    }

    fn missing(param: &str) -> ApiError {
        bad_request(
            "missing_required_parameter",
            param,
            "Field required".to_owned(),
        )
    }

    fn must(_param: &str, rule: String) -> String {
        rule
    }
}

fn unsupported_block(param: &str, block: &str) -> ApiError {
    bad_request(
        "unsupported_content",
        param,
        format!(
            "content blocks of type `{block}` are not supported by this gateway: send `text`, \
             `tool_use` and `tool_result` blocks"
        ),
    )
}

/// The `type` of a content block at `path`, which must be an object.
fn block_type<'a>(path: &str, block: &'a Value) -> Parsed<(&'a Map<String, Value>, &'a str)> {
    let map = match block {
        Value::Object(map) => map,
        other => return Err(Field::invalid_type(path, "an object", other)),
    };
    let kind = Field::req_str(map.get("type"), &format!("{path}.type"))?;
    Ok((map, kind))
}

// ---------------------------------------------------------------------------------------
// Messages request.

/// A parsed `POST /v1/messages` (or `/v1/messages/count_tokens`) request.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagesRequest {
    /// The request in the unified shape, with unmodelled Anthropic fields in `extra`.
    /// [`CompletionRequest::model`] is left `None` for the router to fill from
    /// [`MessagesRequest::model`].
    pub request: CompletionRequest,
    /// Whether the client asked for an SSE stream (`stream: true`).
    pub stream: bool,
    /// The requested model exactly as the client wrote it (for example
    /// `claude-3-5-haiku-latest` or `openai/gpt-4o-mini`); `None` when absent, empty or
    /// `"default"`.
    pub model: Option<String>,
    /// `metadata.conversation_id`, when given (the `X-Conversation-Id` header is read by the
    /// handler). It is removed from the `metadata` passed on, which Anthropic would reject.
    pub conversation_id: Option<String>,
}

/// Which endpoint a body was sent to: token counting does not require `max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Messages,
    CountTokens,
}

/// Parses an Anthropic Messages request body.
///
/// - `model`: optional here (routing fills it; `"default"` means the tenant's model).
/// - `max_tokens`: required, as Anthropic requires it: a positive integer.
/// - `system`: a string or an array of `text` blocks; each non-empty block becomes one
///   [`Message::System`] before the conversation.
/// - `messages`: roles `user` and `assistant`, `content` a string or an array of blocks.
///   In a user message each `text` block becomes one [`Message::User`] and each
///   `tool_result` one [`Message::Tool`], in their order (the Anthropic provider merges them
///   back into one turn). `tool_result.content` is a string or `text` blocks (joined with a
///   blank line). An assistant message becomes one [`Message::Assistant`]: its `text` blocks
///   joined, its `tool_use` blocks as tool calls in order; `thinking` and
///   `redacted_thinking` blocks are dropped.
/// - `tools`: custom tools `{name, description?, input_schema}` (`type` absent or
///   `custom`); `tool_choice`: `{type: auto | any | none | tool, name}`.
/// - `stop_sequences`, `temperature` (0–1, Anthropic's range), `top_p` (0–1), `stream`.
/// - `top_k` (a non-negative integer), `metadata` (minus `conversation_id`) and every other
///   top-level field go to `request.extra` for an Anthropic upstream.
///
/// Dropped because the unified types cannot carry them: `cache_control` and `citations` on
/// blocks and tools, `is_error` on tool results (the result text is kept),
/// `disable_parallel_tool_use`, thinking blocks of earlier turns.
///
/// # Errors
///
/// A 400 [`ApiError`] whose `param` is the field path in Anthropic's dotted form (such as
/// `messages.1.content.0.type`): `invalid_json`; `invalid_type` for a wrongly typed field;
/// `missing_required_parameter` for an absent `max_tokens`, `messages`, role, content, tool
/// name, `input_schema`…; `empty_array` for empty `messages`; `invalid_value` for an unknown
/// role, block or tool-choice type, a block in the wrong role, out-of-range sampling values
/// or a zero `max_tokens`; `unsupported_content` for `image`, `document` and other
/// non-text blocks; `unsupported_tool` for server tools (`web_search_…`, `bash_…`, …).
pub fn parse_messages_request(body: &[u8]) -> Result<MessagesRequest, ApiError> {
    parse_request(body, Endpoint::Messages)
}

/// Parses a `POST /v1/messages/count_tokens` body: the same fields as
/// [`parse_messages_request`] (same errors) except that `max_tokens` is not required. The
/// handler answers `{"input_tokens": N}` from the unified request.
pub fn count_tokens_request(body: &[u8]) -> Result<MessagesRequest, ApiError> {
    parse_request(body, Endpoint::CountTokens)
}

/// The top-level fields the codec maps itself; everything else goes to `extra`.
fn is_messages_field(key: &str) -> bool {
    matches!(
        key,
        "model"
            | "messages"
            | "system"
            | "max_tokens"
            | "tools"
            | "tool_choice"
            | "stop_sequences"
            | "temperature"
            | "top_p"
            | "stream"
            | "metadata"
    )
}

fn parse_request(body: &[u8], endpoint: Endpoint) -> Parsed<MessagesRequest> {
    let body = parse_body(body)?;

    let max_tokens = Field::opt_positive_u32(body.get("max_tokens"), "max_tokens")?;
    if max_tokens.is_none() && endpoint == Endpoint::Messages {
        return Err(Field::missing("max_tokens"));
    }

    let mut messages = parse_system(body.get("system"))?;
    match present(body.get("messages")) {
        None => return Err(Field::missing("messages")),
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(bad_request(
                "empty_array",
                "messages",
                "at least one message is required",
            ));
        }
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                parse_message(i, item, &mut messages)?;
            }
        }
        Some(other) => return Err(Field::invalid_type("messages", "an array", other)),
    }

    let mut tools = Vec::new();
    if let Some(items) = Field::opt_array(body.get("tools"), "tools")? {
        for (i, item) in items.iter().enumerate() {
            tools.push(parse_tool(&format!("tools.{i}"), item)?);
        }
    }

    let stop = match Field::opt_array(body.get("stop_sequences"), "stop_sequences")? {
        None => Vec::new(),
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Field::req_str(Some(s), &format!("stop_sequences.{i}")).map(str::to_owned)
            })
            .collect::<Parsed<Vec<_>>>()?,
    };

    let stream = Field::opt_bool(body.get("stream"), "stream")?.unwrap_or(false);

    if let Some(top_k) = present(body.get("top_k"))
        && !top_k.is_u64()
    {
        return Err(if top_k.is_number() {
            invalid_value(
                "top_k",
                format!("must be a non-negative integer, got {top_k}"),
            )
        } else {
            Field::invalid_type("top_k", "an integer", top_k)
        });
    }

    let mut extra = Map::new();
    let conversation_id = Field::metadata(body.get("metadata"), &mut extra)?;
    for (key, value) in &body {
        if !is_messages_field(key) {
            extra.insert(key.clone(), value.clone());
        }
    }

    let request = CompletionRequest {
        model: None,
        messages,
        tools,
        tool_choice: parse_tool_choice(body.get("tool_choice"))?,
        temperature: Field::opt_ranged(body.get("temperature"), "temperature", 0.0, 1.0)?,
        max_tokens,
        top_p: Field::opt_ranged(body.get("top_p"), "top_p", 0.0, 1.0)?,
        stop,
        extra: if extra.is_empty() {
            Extra::default()
        } else {
            Extra::new(Dialect::Anthropic, extra)
        },
    };

    let model = Field::opt_str(body.get("model"), "model")?
        .filter(|m| !m.is_empty() && *m != DEFAULT_MODEL)
        .map(str::to_owned);

    Ok(MessagesRequest {
        request,
        stream,
        model,
        conversation_id,
    })
}

/// `system`: a string, or an array of `text` blocks. Empty text adds nothing.
fn parse_system(value: Option<&Value>) -> Parsed<Vec<Message>> {
    const PARAM: &str = "system";
    match present(value) {
        None => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(if text.is_empty() {
            Vec::new()
        } else {
            vec![Message::system(text.clone())]
        }),
        Some(Value::Array(blocks)) => {
            let mut messages = Vec::with_capacity(blocks.len());
            for (j, block) in blocks.iter().enumerate() {
                let path = format!("{PARAM}.{j}");
                let (map, kind) = block_type(&path, block)?;
                if kind != "text" {
                    return Err(invalid_value(
                        &format!("{path}.type"),
                        format!("system blocks must be of type `text`, got `{kind}`"),
                    ));
                }
                let text = Field::req_str(map.get("text"), &format!("{path}.text"))?;
                if !text.is_empty() {
                    messages.push(Message::system(text));
                }
            }
            Ok(messages)
        }
        Some(other) => Err(Field::invalid_type(
            PARAM,
            "a string or an array of text blocks",
            other,
        )),
    }
}

fn parse_message(i: usize, value: &Value, out: &mut Vec<Message>) -> Parsed<()> {
    let path = format!("messages.{i}");
    let message = match value {
        Value::Object(map) => map,
        other => return Err(Field::invalid_type(&path, "an object", other)),
    };
    let role_path = format!("{path}.role");
    let role = Field::req_str(message.get("role"), &role_path)?;
    let content_path = format!("{path}.content");
    let content = present(message.get("content")).ok_or_else(|| Field::missing(&content_path))?;
    match role {
        "user" => parse_user_content(&content_path, content, out),
        "assistant" => {
            out.push(parse_assistant_content(&content_path, content)?);
            Ok(())
        }
        "system" => Err(invalid_value(
            &role_path,
            "unexpected role `system`: messages take the roles `user` and `assistant`; put \
             instructions in the top-level `system` field",
        )),
        other => Err(invalid_value(
            &role_path,
            format!("unknown role `{other}`: expected `user` or `assistant`"),
        )),
    }
}

fn content_blocks<'a>(path: &str, content: &'a Value) -> Parsed<&'a [Value]> {
    match content {
        Value::Array(blocks) => Ok(blocks),
        other => Err(Field::invalid_type(
            path,
            "a string or an array of content blocks",
            other,
        )),
    }
}

/// A user turn: its text blocks and tool results, in order.
fn parse_user_content(path: &str, content: &Value, out: &mut Vec<Message>) -> Parsed<()> {
    if let Value::String(text) = content {
        out.push(Message::user(text.clone()));
        return Ok(());
    }
    let blocks = content_blocks(path, content)?;
    if blocks.is_empty() {
        out.push(Message::user(String::new()));
    }
    for (j, block) in blocks.iter().enumerate() {
        let block_path = format!("{path}.{j}");
        let (map, kind) = block_type(&block_path, block)?;
        match kind {
            "text" => {
                let text = Field::req_str(map.get("text"), &format!("{block_path}.text"))?;
                out.push(Message::user(text));
            }
            "tool_result" => out.push(parse_tool_result(&block_path, map)?),
            "tool_use" | "thinking" | "redacted_thinking" => {
                return Err(invalid_value(
                    &format!("{block_path}.type"),
                    format!("`{kind}` blocks are only allowed in assistant messages"),
                ));
            }
            other => return Err(unsupported_block(&format!("{block_path}.type"), other)),
        }
    }
    Ok(())
}

/// A `tool_result` block: `{tool_use_id, content?: string | text blocks, is_error?}`.
fn parse_tool_result(path: &str, block: &Map<String, Value>) -> Parsed<Message> {
    let tool_use_id = Field::req_str(block.get("tool_use_id"), &format!("{path}.tool_use_id"))?;
    // Validated, then dropped: the unified tool message has no error flag; the result text
    // (which says what went wrong) reaches the model either way.
    Field::opt_bool(block.get("is_error"), &format!("{path}.is_error"))?;
    let content_path = format!("{path}.content");
    let content = match present(block.get("content")) {
        None => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => {
            let parts = content_blocks(&content_path, other)?;
            let mut texts = Vec::with_capacity(parts.len());
            for (k, part) in parts.iter().enumerate() {
                let part_path = format!("{content_path}.{k}");
                let (map, kind) = block_type(&part_path, part)?;
                if kind != "text" {
                    return Err(unsupported_block(&format!("{part_path}.type"), kind));
                }
                texts.push(Field::req_str(
                    map.get("text"),
                    &format!("{part_path}.text"),
                )?);
            }
            texts.join("\n\n")
        }
    };
    Ok(Message::tool_result(tool_use_id, content))
}

/// An assistant turn: its text (blocks joined) and its tool calls.
fn parse_assistant_content(path: &str, content: &Value) -> Parsed<Message> {
    if let Value::String(text) = content {
        return Ok(Message::assistant(text.clone()));
    }
    let blocks = content_blocks(path, content)?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let block_path = format!("{path}.{j}");
        let (map, kind) = block_type(&block_path, block)?;
        match kind {
            "text" => text.push_str(Field::req_str(
                map.get("text"),
                &format!("{block_path}.text"),
            )?),
            "tool_use" => {
                let id = Field::req_str(map.get("id"), &format!("{block_path}.id"))?;
                let name = Field::req_str(map.get("name"), &format!("{block_path}.name"))?;
                let input_path = format!("{block_path}.input");
                let arguments = match Field::opt_object(map.get("input"), &input_path)? {
                    Some(input) => Value::Object(input.clone()),
                    None => Value::Object(Map::new()),
                };
                tool_calls.push(ToolCall {
                    id: id.to_owned(),
                    name: name.to_owned(),
                    arguments,
                });
            }
            // Reasoning of an earlier turn: no unified provider takes it back.
            "thinking" | "redacted_thinking" => {}
            "tool_result" => {
                return Err(invalid_value(
                    &format!("{block_path}.type"),
                    "`tool_result` blocks are only allowed in user messages",
                ));
            }
            other => return Err(unsupported_block(&format!("{block_path}.type"), other)),
        }
    }
    Ok(Message::assistant_tool_calls(text, tool_calls))
}

/// A custom tool: `{name, description?, input_schema}`.
fn parse_tool(path: &str, value: &Value) -> Parsed<Tool> {
    let tool = match value {
        Value::Object(map) => map,
        other => return Err(Field::invalid_type(path, "an object", other)),
    };
    let type_path = format!("{path}.type");
    if let Some(kind) = Field::opt_str(tool.get("type"), &type_path)?
        && kind != "custom"
    {
        return Err(bad_request(
            "unsupported_tool",
            type_path,
            format!(
                "tools of type `{kind}` (Anthropic server and client tools) are not supported \
                 by this gateway: define custom tools with `name` and `input_schema`"
            ),
        ));
    }
    let name = Field::req_str(tool.get("name"), &format!("{path}.name"))?;
    let description = Field::opt_str(tool.get("description"), &format!("{path}.description"))?;
    let schema = Field::req_object(tool.get("input_schema"), &format!("{path}.input_schema"))?;
    Ok(Tool {
        name: name.to_owned(),
        description: description.map(str::to_owned),
        parameters: Value::Object(schema.clone()),
    })
}

/// `tool_choice`: `{type: auto | any | none}` or `{type: tool, name}`.
fn parse_tool_choice(value: Option<&Value>) -> Parsed<Option<ToolChoice>> {
    let Some(choice) = Field::opt_object(value, "tool_choice")? else {
        return Ok(None);
    };
    // Validated, then dropped: the unified request has no parallel-calls switch.
    Field::opt_bool(
        choice.get("disable_parallel_tool_use"),
        "tool_choice.disable_parallel_tool_use",
    )?;
    match Field::req_str(choice.get("type"), "tool_choice.type")? {
        "auto" => Ok(Some(ToolChoice::Auto)),
        "any" => Ok(Some(ToolChoice::Required)),
        "none" => Ok(Some(ToolChoice::None)),
        "tool" => {
            let name = Field::req_str(choice.get("name"), "tool_choice.name")?;
            Ok(Some(ToolChoice::Tool(name.to_owned())))
        }
        other => Err(invalid_value(
            "tool_choice.type",
            format!("unknown tool_choice type `{other}`: expected auto, any, tool or none"),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Messages response.

/// Anthropic's `stop_reason` for a unified finish reason: `stop` → `end_turn`, `length` →
/// `max_tokens`, `tool_calls` → `tool_use`, `content_filter` → `refusal` (the reason
/// Anthropic gives when it declines, and the one the Anthropic provider maps to
/// `content_filter`). Anthropic has no error reason: a reply cut short by an upstream error
/// ends with `end_turn`, as the OpenAI dialect reports `stop`. Which stop sequence matched
/// is not in the unified response, so `stop_sequence` is never reported.
pub fn stop_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::Error => "end_turn",
        FinishReason::Length => "max_tokens",
        FinishReason::ToolCalls => "tool_use",
        FinishReason::ContentFilter => "refusal",
    }
}

/// `usage` with the token counts and, when known, `cost_usd` (a decimal USD string, as on
/// the OpenAI-compatible endpoint).
fn usage_json(usage: Usage, cost_usd: Option<&str>) -> Value {
    let mut map = Map::new();
    map.insert("input_tokens".into(), usage.input_tokens.into());
    map.insert("output_tokens".into(), usage.output_tokens.into());
    if let Some(cost) = cost_usd {
        map.insert("cost_usd".into(), cost.into());
    }
    Value::Object(map)
}

/// The Anthropic `message` object for a finished completion:
/// `{id, type: "message", role: "assistant", model, content, stop_reason, stop_sequence:
/// null, usage: {input_tokens, output_tokens, cost_usd?}}`.
///
/// `content` holds a `text` block when the reply has text, then one `tool_use` block
/// `{id, name, input}` per tool call; an empty reply has `content: []`, as Anthropic sends
/// it. `stop_reason` is [`stop_reason`]. `usage.cost_usd` is added when `cost_usd` is given.
pub fn message_json(
    response: &CompletionResponse,
    id: &str,
    model: &str,
    cost_usd: Option<&str>,
) -> Value {
    serde_json::to_value(message_body(response, id, model, cost_usd)).unwrap_or(Value::Null)
}

/// [`message_json`] written straight to bytes, without building a JSON tree: the answer the
/// handler sends.
pub fn message_bytes(
    response: &CompletionResponse,
    id: &str,
    model: &str,
    cost_usd: Option<&str>,
) -> Vec<u8> {
    serde_json::to_vec(&message_body(response, id, model, cost_usd)).unwrap_or_default()
}

fn message_body<'a>(
    response: &'a CompletionResponse,
    id: &'a str,
    model: &'a str,
    cost_usd: Option<&'a str>,
) -> MessageBody<'a> {
    let reply = &response.message;
    let mut content = Vec::with_capacity(reply.tool_calls.len() + 1);
    if !reply.content.is_empty() {
        content.push(ContentBlock::Text {
            text: &reply.content,
        });
    }
    content.extend(reply.tool_calls.iter().map(|call| ContentBlock::ToolUse {
        id: &call.id,
        name: &call.name,
        input: call.arguments_object(),
    }));
    MessageBody {
        id,
        kind: "message",
        role: "assistant",
        model,
        content,
        stop_reason: stop_reason(response.finish_reason),
        stop_sequence: None,
        usage: UsageBody {
            input_tokens: response.usage.input_tokens,
            output_tokens: response.usage.output_tokens,
            cost_usd,
        },
    }
}

#[derive(Serialize)]
struct MessageBody<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<ContentBlock<'a>>,
    stop_reason: &'static str,
    stop_sequence: Option<&'static str>,
    usage: UsageBody<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentBlock<'a> {
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Cow<'a, Value>,
    },
}

#[derive(Serialize)]
struct UsageBody<'a> {
    input_tokens: u64,
    output_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_usd: Option<&'a str>,
}

// ---------------------------------------------------------------------------------------
// Messages stream.

/// One SSE event: `event: NAME\ndata: JSON\n\n`. (Serialised JSON never contains a raw
/// newline, so one `data:` line suffices.)
pub fn sse_event<T: Serialize + ?Sized>(name: &str, data: &T) -> Bytes {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    write_json(&mut out, data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The content block currently open in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenBlock {
    /// A text block at this Anthropic index.
    Text { index: u32 },
    /// The tool call at this position of [`EventEncoder::tools`].
    Tool { slot: usize },
}

/// A tool call seen in the stream.
#[derive(Debug, Clone)]
struct ToolSlot {
    /// Its unified index.
    unified: u32,
    id: Option<String>,
    name: String,
    /// Its Anthropic block index, once `content_block_start` was sent. The start waits for
    /// the first argument fragment (or the block's end), so an id or name given in pieces is
    /// complete when it is sent.
    block: Option<u32>,
}

/// Turns unified [`StreamChunk`]s into Anthropic's Messages SSE event sequence:
///
/// 1. `message_start` with the message shell (`content: []`, `usage.input_tokens` the
///    estimate given to [`EventEncoder::new`], `output_tokens: 0`);
/// 2. per content block `content_block_start`, `content_block_delta`s (`text_delta` for
///    text, `input_json_delta` for tool arguments; a `tool_use` block starts with its `id`,
///    `name` and `input: {}`), `content_block_stop`. A block opens when its kind (text, or a
///    tool call with another unified index) changes; blocks never overlap;
/// 3. [`EventEncoder::finish`]: `message_delta` with `stop_reason` (from the unified
///    [`StreamChunk::Finish`]) and the final usage, then `message_stop`.
///
/// Usage chunks from the provider are remembered ([`EventEncoder::usage`]), not sent: the
/// handler settles the usage and cost once the stream ended and passes them to
/// [`EventEncoder::finish`]. A failure mid-stream is sent as [`EventEncoder::error_event`]
/// instead, which ends the stream.
///
/// Argument fragments of a tool call whose block was already closed (a provider
/// interleaving parallel calls, which none of the supported ones does) are sent as
/// `input_json_delta` of that call's block index, so no argument is lost; Anthropic clients
/// accumulate deltas by index.
#[derive(Debug, Clone)]
pub struct EventEncoder {
    id: String,
    model: String,
    input_tokens_estimate: u64,
    started: bool,
    finished: bool,
    next_block: u32,
    open: Option<OpenBlock>,
    tools: Vec<ToolSlot>,
    finish_reason: Option<FinishReason>,
    usage: Option<Usage>,
}

impl EventEncoder {
    /// An encoder for one stream, with the message id and model the client is shown and the
    /// input tokens `message_start` reports (an estimate: the real count comes with
    /// `message_delta`).
    pub fn new(
        id: impl Into<String>,
        model: impl Into<String>,
        input_tokens_estimate: u64,
    ) -> Self {
        Self {
            id: id.into(),
            model: model.into(),
            input_tokens_estimate,
            started: false,
            finished: false,
            next_block: 0,
            open: None,
            tools: Vec::new(),
            finish_reason: None,
            usage: None,
        }
    }

    /// The usage the provider reported in the stream, if it has.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The unified finish reason the stream reported, if it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish_reason
    }

    /// Whether `message_stop` has been produced.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The `message_start` event. Send it first, once (for example before the first chunk
    /// arrives, so the client sees the stream open); [`EventEncoder::encode`] and
    /// [`EventEncoder::finish`] send it themselves when it was not.
    pub fn start(&mut self) -> Bytes {
        self.started = true;
        sse_event(
            "message_start",
            &json!({
                "type": "message_start",
                "message": {
                    "id": self.id,
                    "type": "message",
                    "role": "assistant",
                    "model": self.model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": {"input_tokens": self.input_tokens_estimate, "output_tokens": 0},
                },
            }),
        )
    }

    /// A `ping` event, for keeping an idle connection open.
    pub fn ping() -> Bytes {
        sse_event("ping", &json!({"type": "ping"}))
    }

    fn ensure_started(&mut self, out: &mut Vec<Bytes>) {
        if !self.started {
            let start = self.start();
            out.push(start);
        }
    }

    fn next_index(&mut self) -> u32 {
        let index = self.next_block;
        self.next_block += 1;
        index
    }

    fn block_start(index: u32, block: Value) -> Bytes {
        sse_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        )
    }

    fn block_delta(index: u32, delta: Value) -> Bytes {
        sse_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        )
    }

    /// A `text_delta` event, written around the escaped text (the event a stream is made of:
    /// no JSON tree is built for it).
    fn text_delta(index: u32, text: &str) -> Bytes {
        const HEAD: &[u8] =
            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":";
        let mut out = Vec::with_capacity(HEAD.len() + text.len() + 64);
        out.extend_from_slice(HEAD);
        write_json(&mut out, &index);
        out.extend_from_slice(b",\"delta\":{\"type\":\"text_delta\",\"text\":");
        write_json(&mut out, text);
        out.extend_from_slice(b"}}\n\n");
        Bytes::from(out)
    }

    /// Starts the tool call's block if it has not started; its Anthropic index.
    fn start_tool(&mut self, slot: usize, out: &mut Vec<Bytes>) -> u32 {
        if let Some(index) = self.tools[slot].block {
            return index;
        }
        let index = self.next_index();
        let tool = &mut self.tools[slot];
        tool.block = Some(index);
        // Anthropic clients need an id at the block's start.
        let id = tool
            .id
            .clone()
            .unwrap_or_else(|| format!("toolu_{slot}_{}", self.id));
        out.push(Self::block_start(
            index,
            json!({"type": "tool_use", "id": id, "name": tool.name, "input": {}}),
        ));
        index
    }

    /// Closes the open block, if any.
    fn close(&mut self, out: &mut Vec<Bytes>) {
        let index = match self.open.take() {
            None => return,
            Some(OpenBlock::Text { index }) => index,
            Some(OpenBlock::Tool { slot }) => self.start_tool(slot, out),
        };
        out.push(sse_event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
    }

    /// The events for one unified chunk (none for usage, empty deltas or anything after
    /// [`EventEncoder::finish`]); `message_start` first when it was not sent yet.
    pub fn encode(&mut self, chunk: &StreamChunk) -> Vec<Bytes> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        match chunk {
            StreamChunk::TextDelta { text } => {
                if text.is_empty() {
                    return out;
                }
                self.ensure_started(&mut out);
                let index = match self.open {
                    Some(OpenBlock::Text { index }) => index,
                    _ => {
                        self.close(&mut out);
                        let index = self.next_index();
                        out.push(Self::block_start(
                            index,
                            json!({"type": "text", "text": ""}),
                        ));
                        self.open = Some(OpenBlock::Text { index });
                        index
                    }
                };
                out.push(Self::text_delta(index, text));
            }
            StreamChunk::ToolCallDelta {
                index,
                id,
                name,
                arguments,
            } => {
                self.ensure_started(&mut out);
                let slot = match self.tools.iter().position(|t| t.unified == *index) {
                    Some(slot) if self.open == Some(OpenBlock::Tool { slot }) => {
                        let tool = &mut self.tools[slot];
                        if tool.block.is_none() {
                            if let Some(id) = id {
                                tool.id = Some(id.clone());
                            }
                            if let Some(name) = name {
                                tool.name.push_str(name);
                            }
                        }
                        slot
                    }
                    Some(slot) => {
                        // A late fragment of a closed call: keep it, on its own index.
                        if let Some(block) = self.tools[slot].block
                            && !arguments.is_empty()
                        {
                            out.push(Self::block_delta(
                                block,
                                json!({"type": "input_json_delta", "partial_json": arguments}),
                            ));
                        }
                        return out;
                    }
                    None => {
                        self.close(&mut out);
                        self.tools.push(ToolSlot {
                            unified: *index,
                            id: id.clone(),
                            name: name.clone().unwrap_or_default(),
                            block: None,
                        });
                        let slot = self.tools.len() - 1;
                        self.open = Some(OpenBlock::Tool { slot });
                        slot
                    }
                };
                if !arguments.is_empty() {
                    let block = self.start_tool(slot, &mut out);
                    out.push(Self::block_delta(
                        block,
                        json!({"type": "input_json_delta", "partial_json": arguments}),
                    ));
                }
            }
            StreamChunk::Usage { usage } => self.usage = Some(*usage),
            StreamChunk::Finish { reason } => {
                self.finish_reason.get_or_insert(*reason);
                self.close(&mut out);
            }
        }
        out
    }

    /// The end of the stream: `content_block_stop` for a block still open, `message_delta`
    /// with `delta: {stop_reason, stop_sequence: null}` and `usage: {input_tokens,
    /// output_tokens, cost_usd?}` (the settled usage, which replaces the estimate of
    /// `message_start`), then `message_stop`. The stop reason is that of the unified
    /// [`StreamChunk::Finish`], or — when the stream gave none — `tool_use` if tools were
    /// called, else `end_turn`. Nothing after the first call.
    pub fn finish(&mut self, usage: Usage, cost_usd: Option<&str>) -> Vec<Bytes> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        self.ensure_started(&mut out);
        self.close(&mut out);
        self.finished = true;
        let reason = self.finish_reason.unwrap_or(if self.tools.is_empty() {
            FinishReason::Stop
        } else {
            FinishReason::ToolCalls
        });
        out.push(sse_event(
            "message_delta",
            &json!({
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason(reason), "stop_sequence": null},
                "usage": usage_json(usage, cost_usd),
            }),
        ));
        out.push(sse_event("message_stop", &json!({"type": "message_stop"})));
        out
    }

    /// An `error` event (`{"type": "error", "error": {"type", "message"}}`, as
    /// [`error_json`]) for a stream that fails after it started. It ends the stream: send
    /// nothing after it.
    pub fn error_event(error: &ApiError) -> Bytes {
        sse_event("error", &error_json(error))
    }
}
