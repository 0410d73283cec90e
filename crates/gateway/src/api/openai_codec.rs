//! The OpenAI ingress dialect: Chat Completions, Embeddings and Models requests and responses,
//! mapped to and from the unified types of `meta_chat_llm`.
//!
//! This codec is deliberately separate from the OpenAI *provider* adapter in the library:
//! ingress dialects and providers meet only in the unified types, so any client dialect can
//! reach any provider. Every function here is pure (no I/O): parsing takes the request bytes,
//! encoding returns JSON values the handlers write out.
//!
//! Request fields the unified request has no place for (`seed`, `logit_bias`, `user`,
//! `response_format`, `n`, …) are kept verbatim in [`CompletionRequest::extra`], tagged with
//! [`Dialect::OpenAi`], so an OpenAI backend receives them unchanged and other backends ignore
//! them.

use base64::Engine as _;
use bytes::Bytes;
use meta_chat_llm::types::{
    CompletionRequest, CompletionResponse, Dialect, EmbeddingRequest, EmbeddingResponse, Extra,
    FinishReason, Message, StreamChunk, Tool, ToolCall, ToolChoice, Usage, parse_arguments,
};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::codec_util::{
    DEFAULT_MODEL, FieldReader, Parsed, bad_request, invalid_value, kind, parse_body, present,
    write_json,
};
use super::error::ApiError;

mod fast;
#[cfg(test)]
mod tests;

/// The terminating event of an OpenAI SSE stream.
pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

// ---------------------------------------------------------------------------------------
// Errors and small typed readers. `None` and JSON `null` both mean "absent", as in the OpenAI
// API.

/// OpenAI wording: the message names the parameter.
struct Field;

impl FieldReader for Field {
    fn invalid_type(param: &str, expected: &str, got: &Value) -> ApiError {
        bad_request(
            "invalid_type",
            param,
            format!(
                "invalid type for `{param}`: expected {expected}, got {}",
                kind(got)
            ),
        )
    }

    fn missing(param: &str) -> ApiError {
        bad_request(
            "missing_required_parameter",
            param,
            format!("missing required parameter: `{param}`"),
        )
    }

    fn must(param: &str, rule: String) -> String {
        format!("`{param}` {rule}")
    }
}

/// `"default"` (or nothing) means "the tenant's configured model".
fn model_name(value: Option<&Value>) -> Parsed<Option<String>> {
    Ok(Field::opt_str(value, "model")?
        .filter(|m| !m.is_empty() && *m != DEFAULT_MODEL)
        .map(str::to_owned))
}

// ---------------------------------------------------------------------------------------
// Chat Completions request.

/// A parsed `POST /v1/chat/completions` request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatCompletionsRequest {
    /// The requested model exactly as the client wrote it (for example `gpt-4o-mini` or
    /// `anthropic/claude-3-haiku-20240307`); `None` when absent or `"default"`. Routing
    /// resolves it; [`CompletionRequest::model`] is left `None` for the router to fill.
    pub model: Option<String>,
    /// Whether the client asked for an SSE stream.
    pub stream: bool,
    /// `stream_options.include_usage`: send a final chunk with the usage (only meaningful
    /// when `stream` is set).
    pub include_usage: bool,
    /// The request in the unified shape, with unknown OpenAI fields in `extra`.
    pub request: CompletionRequest,
    /// `metadata.conversation_id`, when given (the `X-Conversation-Id` header is read by the
    /// handler).
    pub conversation_id: Option<String>,
}

/// Parses an OpenAI Chat Completions request body.
///
/// Accepts the roles `system`/`developer` (both become [`Message::System`]), `user`,
/// `assistant` (with `tool_calls` whose JSON-string `arguments` are parsed, or a legacy
/// `function_call`) and `tool`; text content as a string or an array of `text` parts (joined
/// without separator). Tools come from `tools` (type `function`) and the legacy `functions`;
/// the tool choice from `tool_choice` or the legacy `function_call`. `max_tokens` and
/// `max_completion_tokens` are synonyms (the latter wins when both are set). `stop`,
/// `stream`, `stream_options.include_usage` and `metadata.conversation_id` are read; other
/// `metadata` keys and every other top-level field are kept in `request.extra`.
///
/// # Errors
///
/// A 400 [`ApiError`]: `invalid_json` when the body is not JSON; `invalid_type` (with the
/// field path as `param`, such as `messages[2].content`) for a wrongly typed field;
/// `missing_required_parameter` / `empty_array` for absent or empty `messages`;
/// `invalid_value` for out-of-range `temperature` (0–2), `top_p` (0–1), a zero
/// `max_tokens`, an unknown role or tool choice; `unsupported_content` for image, audio or
/// file parts; `unsupported_role` for the legacy `function` role.
pub fn parse_chat_request(body: &[u8]) -> Result<ChatCompletionsRequest, ApiError> {
    match fast::parse(body) {
        Some(request) => Ok(request),
        None => parse_chat_request_tree(body),
    }
}

/// [`parse_chat_request`] through a JSON tree: every request shape, and the errors.
fn parse_chat_request_tree(body: &[u8]) -> Result<ChatCompletionsRequest, ApiError> {
    let body = parse_body(body)?;

    let messages = match present(body.get("messages")) {
        None => return Err(Field::missing("messages")),
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(bad_request(
                "empty_array",
                "messages",
                "`messages` must contain at least one message",
            ));
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, m)| parse_message(i, m))
            .collect::<Parsed<Vec<_>>>()?,
        Some(other) => return Err(Field::invalid_type("messages", "an array", other)),
    };

    let mut tools = Vec::new();
    if let Some(items) = Field::opt_array(body.get("tools"), "tools")? {
        for (i, item) in items.iter().enumerate() {
            tools.push(parse_tool(&format!("tools[{i}]"), item)?);
        }
    }
    if let Some(items) = Field::opt_array(body.get("functions"), "functions")? {
        for (i, item) in items.iter().enumerate() {
            let path = format!("functions[{i}]");
            let function =
                Field::opt_object(Some(item), &path)?.ok_or_else(|| Field::missing(&path))?;
            tools.push(parse_function(&path, function)?);
        }
    }

    let tool_choice = match parse_tool_choice(body.get("tool_choice"))? {
        Some(choice) => Some(choice),
        None => parse_legacy_function_call(body.get("function_call"))?,
    };

    let max_tokens = match Field::opt_positive_u32(
        body.get("max_completion_tokens"),
        "max_completion_tokens",
    )? {
        Some(n) => {
            Field::opt_positive_u32(body.get("max_tokens"), "max_tokens")?;
            Some(n)
        }
        None => Field::opt_positive_u32(body.get("max_tokens"), "max_tokens")?,
    };

    let stop = match present(body.get("stop")) {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, s)| Field::req_str(Some(s), &format!("stop[{i}]")).map(str::to_owned))
            .collect::<Parsed<Vec<_>>>()?,
        Some(other) => {
            return Err(Field::invalid_type(
                "stop",
                "a string or an array of strings",
                other,
            ));
        }
    };

    let stream = Field::opt_bool(body.get("stream"), "stream")?.unwrap_or(false);
    let include_usage = match Field::opt_object(body.get("stream_options"), "stream_options")? {
        Some(options) => {
            Field::opt_bool(options.get("include_usage"), "stream_options.include_usage")?
                .unwrap_or(false)
        }
        None => false,
    };

    let mut extra = Map::new();
    let conversation_id = Field::metadata(body.get("metadata"), &mut extra)?;

    for (key, value) in &body {
        if !is_chat_field(key) {
            extra.insert(key.clone(), value.clone());
        }
    }

    let request = CompletionRequest {
        model: None,
        messages,
        tools,
        tool_choice,
        temperature: Field::opt_ranged(body.get("temperature"), "temperature", 0.0, 2.0)?,
        max_tokens,
        top_p: Field::opt_ranged(body.get("top_p"), "top_p", 0.0, 1.0)?,
        stop,
        extra: if extra.is_empty() {
            Extra::default()
        } else {
            Extra::new(Dialect::OpenAi, extra)
        },
    };

    Ok(ChatCompletionsRequest {
        model: model_name(body.get("model"))?,
        stream,
        include_usage,
        request,
        conversation_id,
    })
}

/// The top-level fields the codec maps itself; everything else goes to `extra`.
fn is_chat_field(key: &str) -> bool {
    matches!(
        key,
        "model"
            | "messages"
            | "tools"
            | "functions"
            | "tool_choice"
            | "function_call"
            | "temperature"
            | "top_p"
            | "max_tokens"
            | "max_completion_tokens"
            | "stop"
            | "stream"
            | "stream_options"
            | "metadata"
    )
}

fn parse_message(i: usize, value: &Value) -> Parsed<Message> {
    // Field paths are written out only for errors: most messages have none.
    let message = match value {
        Value::Object(map) => map,
        other => {
            return Err(Field::invalid_type(
                &format!("messages[{i}]"),
                "an object",
                other,
            ));
        }
    };
    let role_path = || format!("messages[{i}].role");
    let role = match message.get("role") {
        Some(Value::String(role)) => role.as_str(),
        other => Field::req_str(other, &role_path())?,
    };
    let content_path = || format!("messages[{i}].content");
    let content = message.get("content");
    match role {
        "system" | "developer" => Ok(Message::System {
            content: text_content(content, content_path, false)?
                .ok_or_else(|| Field::missing(&content_path()))?,
        }),
        "user" => Ok(Message::User {
            content: text_content(content, content_path, false)?
                .ok_or_else(|| Field::missing(&content_path()))?,
        }),
        "assistant" => {
            let path = format!("messages[{i}]");
            let content = text_content(content, content_path, true)?.unwrap_or_default();
            let mut tool_calls = Vec::new();
            let calls_path = format!("{path}.tool_calls");
            if let Some(calls) = Field::opt_array(message.get("tool_calls"), &calls_path)? {
                for (j, call) in calls.iter().enumerate() {
                    tool_calls.push(parse_tool_call(&format!("{calls_path}[{j}]"), call)?);
                }
            }
            let legacy_path = format!("{path}.function_call");
            if let Some(call) = Field::opt_object(message.get("function_call"), &legacy_path)? {
                let name = Field::req_str(call.get("name"), &format!("{legacy_path}.name"))?;
                let arguments =
                    arguments(call.get("arguments"), &format!("{legacy_path}.arguments"))?;
                tool_calls.push(ToolCall {
                    // The legacy shape has no id; the matching `function` result is refused,
                    // so the id only has to be stable.
                    id: format!("call_legacy_{i}"),
                    name: name.to_owned(),
                    arguments,
                });
            }
            Ok(Message::Assistant {
                content,
                tool_calls,
            })
        }
        "tool" => {
            let tool_call_id = Field::req_str(
                message.get("tool_call_id"),
                &format!("messages[{i}].tool_call_id"),
            )?;
            Ok(Message::Tool {
                tool_call_id: tool_call_id.to_owned(),
                content: text_content(content, content_path, false)?
                    .ok_or_else(|| Field::missing(&content_path()))?,
            })
        }
        "function" => Err(bad_request(
            "unsupported_role",
            role_path(),
            "the legacy `function` role is not supported: answer tool calls with `tool` \
             messages carrying `tool_call_id`",
        )),
        other => Err(invalid_value(
            &role_path(),
            format!(
                "unknown role `{other}`: expected one of system, developer, user, assistant, tool"
            ),
        )),
    }
}

/// Message content: a string, or an array of text parts joined together. `Ok(None)` when
/// absent or null. `refusals` accepts assistant `refusal` parts as text. `path` writes the
/// field's path, for errors.
fn text_content(
    value: Option<&Value>,
    path: impl Fn() -> String,
    refusals: bool,
) -> Parsed<Option<String>> {
    let parts = match present(value) {
        None => return Ok(None),
        Some(Value::String(s)) => return Ok(Some(s.clone())),
        Some(Value::Array(parts)) => parts,
        Some(other) => {
            return Err(Field::invalid_type(
                &path(),
                "a string or an array of content parts",
                other,
            ));
        }
    };
    let path = path();
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let part_path = format!("{path}[{j}]");
        let part = match part {
            Value::Object(map) => map,
            other => return Err(Field::invalid_type(&part_path, "an object", other)),
        };
        let type_path = format!("{part_path}.type");
        match Field::req_str(part.get("type"), &type_path)? {
            "text" => text.push_str(Field::req_str(
                part.get("text"),
                &format!("{part_path}.text"),
            )?),
            "refusal" if refusals => {
                text.push_str(Field::req_str(
                    part.get("refusal"),
                    &format!("{part_path}.refusal"),
                )?);
            }
            kind @ ("image_url" | "input_image" | "image" | "input_audio" | "audio" | "file"
            | "input_file") => {
                return Err(bad_request(
                    "unsupported_content",
                    path.as_str(),
                    format!("content parts of type `{kind}` are not supported: send text only"),
                ));
            }
            other => {
                return Err(invalid_value(
                    &type_path,
                    format!("unknown content part type `{other}`"),
                ));
            }
        }
    }
    Ok(Some(text))
}

/// Tool-call arguments: the JSON text OpenAI sends (parsed; text that is not JSON is kept
/// as a string), or — leniently — an already-parsed object.
fn arguments(value: Option<&Value>, path: &str) -> Parsed<Value> {
    match present(value) {
        None => Ok(Value::Object(Map::new())),
        Some(Value::String(text)) => Ok(parse_arguments(text)),
        Some(object @ Value::Object(_)) => Ok(object.clone()),
        Some(other) => Err(Field::invalid_type(path, "a JSON string", other)),
    }
}

fn parse_tool_call(path: &str, value: &Value) -> Parsed<ToolCall> {
    let call = Field::opt_object(Some(value), path)?.ok_or_else(|| Field::missing(path))?;
    let id = Field::req_str(call.get("id"), &format!("{path}.id"))?;
    let type_path = format!("{path}.type");
    if let Some(kind) = Field::opt_str(call.get("type"), &type_path)?
        && kind != "function"
    {
        return Err(invalid_value(
            &type_path,
            format!("unsupported tool call type `{kind}`: expected `function`"),
        ));
    }
    let function_path = format!("{path}.function");
    let function = Field::opt_object(call.get("function"), &function_path)?
        .ok_or_else(|| Field::missing(&function_path))?;
    Ok(ToolCall {
        id: id.to_owned(),
        name: Field::req_str(function.get("name"), &format!("{function_path}.name"))?.to_owned(),
        arguments: arguments(
            function.get("arguments"),
            &format!("{function_path}.arguments"),
        )?,
    })
}

fn parse_tool(path: &str, value: &Value) -> Parsed<Tool> {
    let tool = Field::opt_object(Some(value), path)?.ok_or_else(|| Field::missing(path))?;
    let type_path = format!("{path}.type");
    let kind = Field::req_str(tool.get("type"), &type_path)?;
    if kind != "function" {
        return Err(invalid_value(
            &type_path,
            format!("unsupported tool type `{kind}`: expected `function`"),
        ));
    }
    let function_path = format!("{path}.function");
    let function = Field::opt_object(tool.get("function"), &function_path)?
        .ok_or_else(|| Field::missing(&function_path))?;
    parse_function(&function_path, function)
}

/// A function definition: `{name, description?, parameters?}` (`strict` is not carried).
fn parse_function(path: &str, function: &Map<String, Value>) -> Parsed<Tool> {
    let name = Field::req_str(function.get("name"), &format!("{path}.name"))?;
    let description = Field::opt_str(function.get("description"), &format!("{path}.description"))?;
    let parameters =
        match Field::opt_object(function.get("parameters"), &format!("{path}.parameters"))? {
            Some(schema) => Value::Object(schema.clone()),
            None => json!({"type": "object", "properties": {}}),
        };
    Ok(Tool {
        name: name.to_owned(),
        description: description.map(str::to_owned),
        parameters,
    })
}

fn parse_tool_choice(value: Option<&Value>) -> Parsed<Option<ToolChoice>> {
    const PARAM: &str = "tool_choice";
    match present(value) {
        None => Ok(None),
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => Ok(Some(ToolChoice::Auto)),
            "none" => Ok(Some(ToolChoice::None)),
            "required" => Ok(Some(ToolChoice::Required)),
            other => Err(invalid_value(
                PARAM,
                format!(
                    "unknown tool_choice `{other}`: expected auto, none, required or a function"
                ),
            )),
        },
        Some(Value::Object(choice)) => {
            let kind = Field::req_str(choice.get("type"), "tool_choice.type")?;
            if kind != "function" {
                return Err(invalid_value(
                    "tool_choice.type",
                    format!("unsupported tool_choice type `{kind}`: expected `function`"),
                ));
            }
            let function = Field::opt_object(choice.get("function"), "tool_choice.function")?
                .ok_or_else(|| Field::missing("tool_choice.function"))?;
            let name = Field::req_str(function.get("name"), "tool_choice.function.name")?;
            Ok(Some(ToolChoice::Tool(name.to_owned())))
        }
        Some(other) => Err(Field::invalid_type(PARAM, "a string or an object", other)),
    }
}

/// The legacy top-level `function_call`: `"auto"`, `"none"` or `{"name": …}`.
fn parse_legacy_function_call(value: Option<&Value>) -> Parsed<Option<ToolChoice>> {
    const PARAM: &str = "function_call";
    match present(value) {
        None => Ok(None),
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => Ok(Some(ToolChoice::Auto)),
            "none" => Ok(Some(ToolChoice::None)),
            other => Err(invalid_value(
                PARAM,
                format!("unknown function_call `{other}`: expected auto, none or a function"),
            )),
        },
        Some(Value::Object(choice)) => {
            let name = Field::req_str(choice.get("name"), "function_call.name")?;
            Ok(Some(ToolChoice::Tool(name.to_owned())))
        }
        Some(other) => Err(Field::invalid_type(PARAM, "a string or an object", other)),
    }
}

// ---------------------------------------------------------------------------------------
// Chat Completions response.

/// The OpenAI name of a finish reason. OpenAI has no `error`; a reply cut short by an
/// upstream error is reported as `stop`.
fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::Error => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
    }
}

/// Tool-call arguments as the JSON text OpenAI sends. Arguments the model produced that were
/// not JSON are kept as a string; they go back as that text.
fn arguments_text(arguments: &Value) -> String {
    match arguments {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// `usage` with the token counts and, when known, `cost_usd` (a decimal USD string, SPEC
/// §4.4).
fn usage_json(usage: Usage, cost_usd: Option<&str>) -> Value {
    let mut map = Map::new();
    map.insert("prompt_tokens".into(), usage.input_tokens.into());
    map.insert("completion_tokens".into(), usage.output_tokens.into());
    map.insert("total_tokens".into(), usage.total().into());
    if let Some(cost) = cost_usd {
        map.insert("cost_usd".into(), cost.into());
    }
    Value::Object(map)
}

/// The OpenAI `chat.completion` object for a finished completion.
///
/// `id`, `created` (Unix seconds) and `model` are what the client is shown (the gateway's
/// id and the model that answered). The message `content` is `null` when the model only
/// called tools; `tool_calls` carry their arguments as JSON text and are omitted when there
/// are none. `usage.cost_usd` is added when `cost_usd` is given.
pub fn completion_json(
    response: &CompletionResponse,
    id: &str,
    created: i64,
    model: &str,
    cost_usd: Option<&str>,
) -> Value {
    serde_json::to_value(completion_body(response, id, created, model, cost_usd))
        .unwrap_or(Value::Null)
}

/// [`completion_json`] written straight to bytes, without building a JSON tree: the answer
/// the handler sends.
pub fn completion_bytes(
    response: &CompletionResponse,
    id: &str,
    created: i64,
    model: &str,
    cost_usd: Option<&str>,
) -> Vec<u8> {
    serde_json::to_vec(&completion_body(response, id, created, model, cost_usd)).unwrap_or_default()
}

fn completion_body<'a>(
    response: &'a CompletionResponse,
    id: &'a str,
    created: i64,
    model: &'a str,
    cost_usd: Option<&'a str>,
) -> CompletionBody<'a> {
    let reply = &response.message;
    CompletionBody {
        id,
        object: "chat.completion",
        created,
        model,
        choices: [ChoiceBody {
            index: 0,
            message: MessageBody {
                role: "assistant",
                content: (!reply.content.is_empty() || reply.tool_calls.is_empty())
                    .then_some(reply.content.as_str()),
                tool_calls: reply
                    .tool_calls
                    .iter()
                    .map(|call| ToolCallBody {
                        id: &call.id,
                        kind: "function",
                        function: FunctionCallBody {
                            name: &call.name,
                            arguments: arguments_text(&call.arguments),
                        },
                    })
                    .collect(),
                refusal: None,
            },
            logprobs: None,
            finish_reason: finish_reason(response.finish_reason),
        }],
        usage: UsageBody {
            prompt_tokens: response.usage.input_tokens,
            completion_tokens: response.usage.output_tokens,
            total_tokens: response.usage.total(),
            cost_usd,
        },
        system_fingerprint: None,
    }
}

#[derive(Serialize)]
struct CompletionBody<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: [ChoiceBody<'a>; 1],
    usage: UsageBody<'a>,
    system_fingerprint: Option<&'static str>,
}

#[derive(Serialize)]
struct ChoiceBody<'a> {
    index: u32,
    message: MessageBody<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct MessageBody<'a> {
    role: &'static str,
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallBody<'a>>,
    refusal: Option<&'static str>,
}

#[derive(Serialize)]
struct ToolCallBody<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionCallBody<'a>,
}

#[derive(Serialize)]
struct FunctionCallBody<'a> {
    name: &'a str,
    arguments: String,
}

#[derive(Serialize)]
struct UsageBody<'a> {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_usd: Option<&'a str>,
}

// ---------------------------------------------------------------------------------------
// Chat Completions stream.

/// Turns unified [`StreamChunk`]s into OpenAI `chat.completion.chunk` SSE events, exactly as
/// OpenAI streams them: a first chunk with `delta: {role: "assistant", content: ""}`, then
/// content and tool-call deltas, a chunk with an empty delta and the `finish_reason`, and —
/// only when the client asked with `stream_options.include_usage` — a last chunk with
/// `choices: []` and the usage (every other chunk then carries `usage: null`).
///
/// The fields every chunk repeats (id, object, created, model, system fingerprint) are
/// serialized once per stream; each event is that text, the choice written straight into the
/// event's buffer, and the closing text, with no JSON tree built per chunk.
///
/// Usage chunks from the provider are remembered, not sent: the handler computes the cost and
/// calls [`ChunkEncoder::finish_usage`] once the stream has ended, then writes
/// [`SSE_DONE`].
#[derive(Debug, Clone)]
pub struct ChunkEncoder {
    id: String,
    /// `data: {"id":…,"object":"chat.completion.chunk","created":…,"model":…,
    /// "system_fingerprint":null,"choices":`
    head: Vec<u8>,
    include_usage: bool,
    started: bool,
    finished: bool,
    usage_sent: bool,
    /// The unified index of each tool call, at the position of its OpenAI index.
    tool_calls: Vec<u32>,
    usage: Option<Usage>,
}

/// Room in an event's buffer for the choice's fixed text around the delta.
const CHOICE_TEXT: usize = 96;

impl ChunkEncoder {
    /// An encoder for one stream, with the id, creation time (Unix seconds) and model every
    /// chunk repeats.
    pub fn new(
        id: impl Into<String>,
        created: i64,
        model: impl AsRef<str>,
        include_usage: bool,
    ) -> Self {
        let id = id.into();
        let model = model.as_ref();
        let mut head = Vec::with_capacity(128 + id.len() + model.len());
        head.extend_from_slice(b"data: {\"id\":");
        write_json(&mut head, id.as_str());
        head.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        write_json(&mut head, &created);
        head.extend_from_slice(b",\"model\":");
        write_json(&mut head, model);
        head.extend_from_slice(b",\"system_fingerprint\":null,\"choices\":");
        Self {
            id,
            head,
            include_usage,
            started: false,
            finished: false,
            usage_sent: false,
            tool_calls: Vec::new(),
            usage: None,
        }
    }

    /// The usage the provider reported, if it has.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether the finish chunk has been sent.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// One event: the repeated fields, `choices` as `write_choices` writes it, then — when
    /// the client asked for usage — `usage`: `null` on every chunk but the last.
    fn event(
        &self,
        extra: usize,
        write_choices: impl FnOnce(&mut Vec<u8>),
        usage: Option<&Value>,
    ) -> Bytes {
        let mut out = Vec::with_capacity(self.head.len() + CHOICE_TEXT + extra);
        out.extend_from_slice(&self.head);
        write_choices(&mut out);
        if self.include_usage {
            out.extend_from_slice(b",\"usage\":");
            match usage {
                Some(usage) => write_json(&mut out, usage),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.extend_from_slice(b"}\n\n");
        Bytes::from(out)
    }

    /// An event with the one choice: `delta` as `write_delta` writes it and `finish_reason`.
    fn delta(
        &self,
        extra: usize,
        write_delta: impl FnOnce(&mut Vec<u8>),
        finish: Option<&str>,
    ) -> Bytes {
        self.event(
            extra,
            |out| {
                out.extend_from_slice(b"[{\"index\":0,\"delta\":");
                write_delta(out);
                out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":");
                match finish {
                    Some(reason) => write_json(out, reason),
                    None => out.extend_from_slice(b"null"),
                }
                out.extend_from_slice(b"}]");
            },
            None,
        )
    }

    /// The opening chunk (`role: assistant`), once, before anything else.
    fn open(&mut self, out: &mut Vec<Bytes>) {
        if !self.started {
            self.started = true;
            out.push(self.delta(
                0,
                |out| out.extend_from_slice(br#"{"role":"assistant","content":"","refusal":null}"#),
                None,
            ));
        }
    }

    /// The OpenAI events for one unified chunk: zero (usage, empty deltas, a repeated
    /// finish), one, or two (the opening chunk before the first content).
    pub fn encode(&mut self, chunk: &StreamChunk) -> Vec<Bytes> {
        let mut out = Vec::new();
        match chunk {
            StreamChunk::TextDelta { text } => {
                self.open(&mut out);
                if !text.is_empty() {
                    out.push(self.delta(
                        text.len() + 16,
                        |out| {
                            out.extend_from_slice(b"{\"content\":");
                            write_json(out, text.as_str());
                            out.push(b'}');
                        },
                        None,
                    ));
                }
            }
            StreamChunk::ToolCallDelta {
                index,
                id,
                name,
                arguments,
            } => {
                self.open(&mut out);
                let known = self.tool_calls.iter().position(|i| i == index);
                let call = match known {
                    Some(position) => {
                        if id.is_none() && name.is_none() && arguments.is_empty() {
                            return out;
                        }
                        let mut call = Map::new();
                        call.insert("index".into(), position.into());
                        if let Some(id) = id {
                            call.insert("id".into(), id.clone().into());
                        }
                        let mut function = Map::new();
                        if let Some(name) = name {
                            function.insert("name".into(), name.clone().into());
                        }
                        function.insert("arguments".into(), arguments.clone().into());
                        call.insert("function".into(), Value::Object(function));
                        Value::Object(call)
                    }
                    None => {
                        let position = self.tool_calls.len();
                        self.tool_calls.push(*index);
                        // OpenAI clients need an id on a call's first delta.
                        let id = id
                            .clone()
                            .unwrap_or_else(|| format!("call_{position}_{}", self.id));
                        json!({
                            "index": position,
                            "id": id,
                            "type": "function",
                            "function": {
                                "name": name.clone().unwrap_or_default(),
                                "arguments": arguments,
                            },
                        })
                    }
                };
                let delta = json!({"tool_calls": [call]});
                out.push(self.delta(arguments.len() + 64, |out| write_json(out, &delta), None));
            }
            StreamChunk::Usage { usage } => self.usage = Some(*usage),
            StreamChunk::Finish { reason } => {
                if !self.finished {
                    self.open(&mut out);
                    self.finished = true;
                    out.push(self.delta(
                        0,
                        |out| out.extend_from_slice(b"{}"),
                        Some(finish_reason(*reason)),
                    ));
                }
            }
        }
        out
    }

    /// The last event, `choices: []` with the usage (and `cost_usd` when given), when the
    /// client asked for usage; `None` otherwise or when it was already sent.
    pub fn finish_usage(&mut self, usage: Usage, cost_usd: Option<&str>) -> Option<Bytes> {
        if !self.include_usage || self.usage_sent {
            return None;
        }
        self.usage_sent = true;
        let usage = usage_json(usage, cost_usd);
        Some(self.event(64, |out| out.extend_from_slice(b"[]"), Some(&usage)))
    }

    /// An error event for a stream that fails after it started, in OpenAI's envelope
    /// (`{"error": {message, type, code, param}}`); send it, then [`SSE_DONE`].
    pub fn error_event(message: &str, code: &str) -> Value {
        json!({
            "error": {
                "message": message,
                "type": "api_error",
                "code": code,
                "param": null,
            }
        })
    }

    /// [`ChunkEncoder::error_event`] for an [`ApiError`], keeping its OpenAI error type.
    pub fn api_error_event(error: &ApiError) -> Value {
        json!({
            "error": {
                "message": error.message,
                "type": error.error_type(),
                "code": error.code,
                "param": error.param,
            }
        })
    }
}

/// One SSE event carrying `value`: `data: {json}\n\n`. (Serialised JSON never contains a raw
/// newline, so one `data:` line suffices.)
pub fn sse_data(value: &Value) -> Bytes {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(b"data: ");
    write_json(&mut out, value);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

// ---------------------------------------------------------------------------------------
// Embeddings.

/// A parsed `POST /v1/embeddings` request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsRequest {
    /// The requested model as the client wrote it; `None` when absent or `"default"`.
    /// [`EmbeddingRequest::model`] is left `None` for the router to fill.
    pub model: Option<String>,
    /// `encoding_format: "base64"`: answer with base64 little-endian `f32` bytes.
    pub base64: bool,
    /// The request in the unified shape; unknown OpenAI fields are in `extra`.
    pub request: EmbeddingRequest,
}

/// Parses an OpenAI Embeddings request body: `input` as a string or an array of strings,
/// `dimensions`, `encoding_format` (`float` or `base64`). `user` is ignored; other fields
/// are kept in `request.extra`.
///
/// # Errors
///
/// A 400 [`ApiError`]: `invalid_json`; `invalid_type` with the field path; missing or empty
/// `input`, or an empty string in it; `unsupported_input` for token-id arrays;
/// `invalid_value` for `dimensions` 0 or an unknown `encoding_format`.
pub fn parse_embeddings_request(body: &[u8]) -> Result<EmbeddingsRequest, ApiError> {
    let body = parse_body(body)?;
    let input = match present(body.get("input")) {
        None => return Err(Field::missing("input")),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(bad_request(
                "empty_array",
                "input",
                "`input` must contain at least one text",
            ));
        }
        Some(Value::Array(items)) => {
            let mut texts = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) => texts.push(s.clone()),
                    Value::Number(_) | Value::Array(_) => {
                        return Err(bad_request(
                            "unsupported_input",
                            "input",
                            "token-id input is not supported: send text",
                        ));
                    }
                    other => {
                        return Err(Field::invalid_type(
                            &format!("input[{i}]"),
                            "a string",
                            other,
                        ));
                    }
                }
            }
            texts
        }
        Some(other) => {
            return Err(Field::invalid_type(
                "input",
                "a string or an array of strings",
                other,
            ));
        }
    };
    if let Some(i) = input.iter().position(String::is_empty) {
        let param = if matches!(body.get("input"), Some(Value::Array(_))) {
            format!("input[{i}]")
        } else {
            "input".to_owned()
        };
        return Err(invalid_value(
            &param,
            "`input` must not contain empty strings",
        ));
    }

    let base64 = match Field::opt_str(body.get("encoding_format"), "encoding_format")? {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(invalid_value(
                "encoding_format",
                format!("unknown encoding_format `{other}`: expected float or base64"),
            ));
        }
    };

    let extra: Map<String, Value> = body
        .iter()
        .filter(|(key, _)| {
            !matches!(
                key.as_str(),
                "model" | "input" | "dimensions" | "encoding_format" | "user"
            )
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();

    Ok(EmbeddingsRequest {
        model: model_name(body.get("model"))?,
        base64,
        request: EmbeddingRequest {
            model: None,
            input,
            dimensions: Field::opt_positive_u32(body.get("dimensions"), "dimensions")?,
            extra: if extra.is_empty() {
                Extra::default()
            } else {
                Extra::new(Dialect::OpenAi, extra)
            },
        },
    })
}

/// An `f32` as the JSON number of its shortest decimal form (`0.1`, not
/// `0.10000000149011612`); a non-finite value becomes `null`.
fn float_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

/// A vector as OpenAI's base64 encoding: the little-endian `f32` bytes, standard base64.
fn base64_vector(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The OpenAI embeddings `list` object: one `embedding` per input, in order, as floats or
/// (with `base64`) as base64 strings; `usage` with `prompt_tokens`, `total_tokens` and
/// `cost_usd` when given.
pub fn embeddings_json(
    response: &EmbeddingResponse,
    model: &str,
    cost_usd: Option<&str>,
    base64: bool,
) -> Value {
    let data: Vec<Value> = response
        .embeddings
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                Value::String(base64_vector(vector))
            } else {
                Value::Array(vector.iter().copied().map(float_json).collect())
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let mut usage = Map::new();
    usage.insert("prompt_tokens".into(), response.embedding_tokens.into());
    usage.insert("total_tokens".into(), response.embedding_tokens.into());
    if let Some(cost) = cost_usd {
        usage.insert("cost_usd".into(), cost.into());
    }
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": usage,
    })
}

// ---------------------------------------------------------------------------------------
// Models.

/// The OpenAI model `list`: `data[{id, object: "model", created: 0, owned_by}]`, in the
/// order given.
pub fn models_json(models: &[(String, String)]) -> Value {
    let data: Vec<Value> = models
        .iter()
        .map(|(id, owned_by)| {
            json!({"id": id, "object": "model", "created": 0, "owned_by": owned_by})
        })
        .collect();
    json!({"object": "list", "data": data})
}
