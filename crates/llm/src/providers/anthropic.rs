//! Anthropic Messages: chat, SSE streaming with typed events, and tool use through
//! `tool_use` / `tool_result` content blocks. Anthropic has no embeddings endpoint.

use std::borrow::Cow;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{LlmError, Result, UpstreamFailure, retry_after_from_headers};
use crate::factory::ProviderConfig;
use crate::http::{self, HeaderMap, HeaderName};
use crate::provider::{ChunkStream, LlmProvider};
use crate::types::{
    AssistantMessage, Capabilities, CompletionRequest, CompletionResponse, Dialect,
    EmbeddingRequest, EmbeddingResponse, FinishReason, Message, ProviderInfo, ProviderKind, Tool,
    ToolCall, ToolChoice, Usage,
};

pub(crate) mod stream;

use self::stream::decode_stream;

const PROVIDER: ProviderKind = ProviderKind::Anthropic;

/// The API version this adapter speaks; the wire format below is the one it defines.
const API_VERSION: &str = "2023-06-01";

/// The Anthropic adapter: `POST {base}/v1/messages`, authenticated with `x-api-key`.
///
/// Anthropic's temperature range is 0–1 while the unified range is 0–2: values above 1 are
/// clamped to 1.0 rather than rejected, so a request written for OpenAI still runs.
#[derive(Debug)]
pub struct AnthropicProvider {
    config: ProviderConfig,
    base_url: String,
}

impl AnthropicProvider {
    /// An adapter for this configuration. A missing API key is reported when a request is
    /// made, so a provider can be listed before it is configured.
    pub fn new(config: ProviderConfig) -> Result<Self> {
        http::ready(PROVIDER)?;
        let base_url = config.resolved_base_url();
        Ok(Self { config, base_url })
    }

    /// Sends a messages request. The request is written at once and the future returned
    /// holds only the sending (an `async fn` would keep its arguments and what it built from
    /// them while the upstream works).
    fn post_messages(
        &self,
        request: &CompletionRequest,
        stream: bool,
    ) -> impl Future<Output = Result<http::Answer>> + Send + use<> {
        let built = (|| {
            let key = self
                .config
                .required_api_key(PROVIDER, "ANTHROPIC_API_KEY")?;
            let body = messages_body(&self.config, request, stream)?;
            tracing::debug!(provider = %PROVIDER, stream, bytes = body.len(), "messages request");
            let url = [self.base_url.as_str(), "/v1/messages"].concat();
            Ok(http::Outgoing::new(http::Method::POST, url)
                .header(HeaderName::from_static("x-api-key"), key)
                .header(HeaderName::from_static("anthropic-version"), API_VERSION)
                .json(body)
                .events_if(stream))
        })();
        http::send_built(PROVIDER, built, parse_error)
    }
}

#[async_trait]
impl LlmProvider for AnthropicProvider {
    fn info(&self) -> ProviderInfo {
        super::info_for(
            &self.config,
            Capabilities {
                chat: true,
                streaming: true,
                tools: true,
                embeddings: false,
            },
        )
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<CompletionResponse> {
        let response = self.post_messages(request, false).await?;
        let body: MessageResponse = http::read_json(PROVIDER, response).await?;
        Ok(from_message_response(
            body,
            request.model.as_deref().unwrap_or(&self.config.model),
        ))
    }

    async fn stream(&self, request: &CompletionRequest) -> Result<ChunkStream> {
        let response = self.post_messages(request, true).await?;
        Ok(decode_stream(http::byte_stream(PROVIDER, response)))
    }

    async fn embed(&self, _request: &EmbeddingRequest) -> Result<EmbeddingResponse> {
        Err(LlmError::Unsupported {
            provider: PROVIDER,
            feature: "embeddings",
        })
    }
}

// ---------------------------------------------------------------------------------------
// Request wire types.

#[derive(Serialize)]
struct MessagesBody<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<WireMessage<'a>>,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

impl MessagesBody<'_> {
    /// Whether the adapter itself sets `key`; extra fields never override those.
    fn sets(&self, key: &str) -> bool {
        match key {
            // `stream` decides how the answer is parsed, so a client may never flip it.
            "model" | "messages" | "max_tokens" | "stream" => true,
            "system" => self.system.is_some(),
            "temperature" => self.temperature.is_some(),
            "top_p" => self.top_p.is_some(),
            "stop_sequences" => !self.stop_sequences.is_empty(),
            "tools" => !self.tools.is_empty(),
            "tool_choice" => self.tool_choice.is_some(),
            _ => false,
        }
    }
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: WireContent<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum WireContent<'a> {
    Text(&'a str),
    Blocks(Vec<Block<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Cow<'a, Value>,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: &'a str,
    },
}

#[derive(Serialize)]
struct WireTool<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: &'a Value,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireToolChoice<'a> {
    Auto,
    Any,
    None,
    Tool { name: &'a str },
}

/// The blocks one unified message contributes, and the Anthropic role they belong to.
fn blocks_of(message: &Message) -> Option<(&'static str, Vec<Block<'_>>)> {
    match message {
        // Lifted into the top-level `system` field.
        Message::System { .. } => None,
        Message::User { content } => Some(("user", vec![Block::Text { text: content }])),
        Message::Assistant {
            content,
            tool_calls,
        } => {
            let mut blocks = Vec::with_capacity(tool_calls.len() + 1);
            // The API rejects empty text blocks; with no calls we keep it and let the
            // upstream judge the conversation rather than invent content.
            if !content.is_empty() || tool_calls.is_empty() {
                blocks.push(Block::Text { text: content });
            }
            blocks.extend(tool_calls.iter().map(|call| Block::ToolUse {
                id: &call.id,
                name: &call.name,
                input: call.arguments_object(),
            }));
            Some(("assistant", blocks))
        }
        Message::Tool {
            tool_call_id,
            content,
        } => Some((
            "user",
            vec![Block::ToolResult {
                tool_use_id: tool_call_id,
                content,
            }],
        )),
    }
}

/// Maps the conversation, merging consecutive messages of the same role because the API
/// requires user and assistant turns to alternate (tool results are user turns).
fn wire_messages(messages: &[Message]) -> Vec<WireMessage<'_>> {
    let mut merged: Vec<(&'static str, Vec<Block<'_>>)> = Vec::new();
    for (role, blocks) in messages.iter().filter_map(blocks_of) {
        match merged.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => merged.push((role, blocks)),
        }
    }
    merged
        .into_iter()
        .map(|(role, blocks)| {
            let content = if let [Block::Text { text }] = blocks.as_slice() {
                WireContent::Text(text)
            } else {
                WireContent::Blocks(blocks)
            };
            WireMessage { role, content }
        })
        .collect()
}

fn system_prompt(messages: &[Message]) -> Option<String> {
    let parts: Vec<&str> = messages
        .iter()
        .filter_map(|m| match m {
            Message::System { content } => Some(content.as_str()),
            _ => None,
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("\n\n"))
}

fn wire_tool(tool: &Tool) -> WireTool<'_> {
    WireTool {
        name: &tool.name,
        description: tool.description.as_deref(),
        input_schema: &tool.parameters,
    }
}

fn wire_tool_choice(choice: &ToolChoice) -> WireToolChoice<'_> {
    match choice {
        ToolChoice::Auto => WireToolChoice::Auto,
        ToolChoice::None => WireToolChoice::None,
        ToolChoice::Required => WireToolChoice::Any,
        ToolChoice::Tool(name) => WireToolChoice::Tool { name },
    }
}

/// The exact bytes of a Messages request.
pub(crate) fn messages_body(
    config: &ProviderConfig,
    request: &CompletionRequest,
    stream: bool,
) -> Result<Vec<u8>> {
    let temperature = request
        .temperature
        .or(config.defaults.temperature)
        .map(|t| t.min(1.0));
    let mut body = MessagesBody {
        model: request.model.as_deref().unwrap_or(&config.model),
        system: system_prompt(&request.messages),
        messages: wire_messages(&request.messages),
        max_tokens: request.max_tokens.unwrap_or(config.defaults.max_tokens),
        temperature,
        top_p: request.top_p.or(config.defaults.top_p),
        stop_sequences: request.stop.iter().map(String::as_str).collect(),
        tools: request.tools.iter().map(wire_tool).collect(),
        tool_choice: request.tool_choice.as_ref().map(wire_tool_choice),
        stream,
        extra: Map::new(),
    };
    body.extra = request
        .extra
        .for_dialect(Dialect::Anthropic)
        .filter(|(key, _)| !body.sets(key))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    serde_json::to_vec(&body).map_err(|e| LlmError::InvalidRequest {
        provider: PROVIDER,
        status: None,
        code: None,
        message: format!("could not serialise the request: {e}"),
    })
}

// ---------------------------------------------------------------------------------------
// Response wire types.

#[derive(Deserialize)]
pub(crate) struct MessageResponse {
    id: Option<String>,
    model: Option<String>,
    #[serde(default)]
    content: Vec<ResponseBlock>,
    stop_reason: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseBlock {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    /// Thinking, citations, server tools: nothing the unified message carries.
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// All prompt tokens, cached or not: cache reads and writes are still input.
    fn input(self) -> Option<u64> {
        let parts = [
            self.input_tokens,
            self.cache_creation_input_tokens,
            self.cache_read_input_tokens,
        ];
        parts
            .iter()
            .any(Option::is_some)
            .then(|| parts.iter().flatten().sum())
    }

    fn unified(self) -> Usage {
        Usage {
            input_tokens: self.input().unwrap_or(0),
            output_tokens: self.output_tokens.unwrap_or(0),
        }
    }
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(rename = "type")]
    kind: Option<String>,
    message: Option<String>,
}

fn finish_reason(reason: Option<&str>, has_tool_calls: bool) -> FinishReason {
    match reason {
        Some("end_turn" | "stop_sequence") => FinishReason::Stop,
        Some("max_tokens" | "model_context_window_exceeded") => FinishReason::Length,
        Some("tool_use") => FinishReason::ToolCalls,
        Some("refusal") => FinishReason::ContentFilter,
        other => {
            if let Some(other) = other {
                tracing::debug!(provider = %PROVIDER, reason = other, "unknown stop reason");
            }
            if has_tool_calls {
                FinishReason::ToolCalls
            } else {
                FinishReason::Stop
            }
        }
    }
}

pub(crate) fn from_message_response(
    body: MessageResponse,
    requested_model: &str,
) -> CompletionResponse {
    let mut content = String::new();
    let mut tool_calls = Vec::new();
    for block in body.content {
        match block {
            ResponseBlock::Text { text } => content.push_str(&text),
            ResponseBlock::ToolUse { id, name, input } => tool_calls.push(ToolCall {
                id: if id.is_empty() {
                    super::generated_id("toolu_")
                } else {
                    id
                },
                name,
                arguments: if input.is_null() {
                    Value::Object(Map::new())
                } else {
                    input
                },
            }),
            ResponseBlock::Other => {}
        }
    }
    CompletionResponse {
        id: body.id.unwrap_or_else(|| super::generated_id("msg_")),
        finish_reason: finish_reason(body.stop_reason.as_deref(), !tool_calls.is_empty()),
        message: AssistantMessage {
            content,
            tool_calls,
        },
        usage: body.usage.unwrap_or_default().unified(),
        model: body.model.unwrap_or_else(|| requested_model.to_owned()),
        provider: PROVIDER,
    }
}

/// Classifies an error answer from its `{"type": "error", "error": {"type", "message"}}`.
fn parse_error(status: u16, headers: &HeaderMap, body: &[u8]) -> LlmError {
    let (kind, message) = match serde_json::from_slice::<ErrorEnvelope>(body)
        .ok()
        .and_then(|envelope| envelope.error)
    {
        Some(error) => (error.kind, error.message.unwrap_or_default()),
        None => (
            None,
            String::from_utf8_lossy(&body[..body.len().min(300)])
                .trim()
                .to_owned(),
        ),
    };
    let retry_after = retry_after_from_headers(headers);
    classify(status, kind, message, retry_after)
}

/// The error for an error type, whether it came as an HTTP answer or a stream event. The
/// type wins over the status because proxies sometimes rewrite the status.
fn classify(
    status: u16,
    kind: Option<String>,
    message: String,
    retry_after: Option<std::time::Duration>,
) -> LlmError {
    match kind.as_deref() {
        Some("not_found_error") => LlmError::ModelNotFound {
            provider: PROVIDER,
            message,
        },
        Some("rate_limit_error") => LlmError::RateLimited {
            provider: PROVIDER,
            retry_after,
            message,
        },
        Some("overloaded_error") => LlmError::Upstream {
            provider: PROVIDER,
            status: if status < 500 { 529 } else { status },
            code: kind,
            message,
            retry_after,
        },
        _ => UpstreamFailure {
            status,
            code: kind,
            kind: None,
            message,
            retry_after,
        }
        .into_error(PROVIDER),
    }
}

#[cfg(test)]
mod tests;
