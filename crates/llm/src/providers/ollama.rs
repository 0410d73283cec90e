//! Ollama's native API: `POST /api/chat` (NDJSON streaming), `POST /api/embed` and
//! `GET /api/tags`.
//!
//! Ollama differs from the other providers in ways the unified interface hides:
//! - tool calls carry no id, so each gets a generated `call_…` id; tool results are matched
//!   to their call by `tool_name`, which is looked up from the earlier assistant tool call
//!   with the result's `tool_call_id`;
//! - there is no `tool_choice`: `none` withholds the tools, `auto` is what Ollama does anyway,
//!   and `required` or a named tool cannot be enforced, so they are sent as plain `tools`;
//! - sampling parameters live in `options` (`max_tokens` is `num_predict`);
//! - streaming is NDJSON whose last line (`done: true`) carries the token counts.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{LlmError, Result, UpstreamFailure, retry_after_from_headers};
use crate::factory::ProviderConfig;
use crate::http::{self, HeaderMap};
use crate::provider::{ChunkStream, LlmProvider};
use crate::types::{
    AssistantMessage, Capabilities, CompletionRequest, CompletionResponse, Dialect,
    EmbeddingRequest, EmbeddingResponse, FinishReason, Message, ProviderInfo, ProviderKind,
    StreamChunk, Tool, ToolCall, ToolChoice, Usage,
};

const PROVIDER: ProviderKind = ProviderKind::Ollama;

/// The Ollama adapter. No API key is needed; one that is configured is sent as a bearer
/// token, for Ollama servers behind an authenticating proxy.
#[derive(Debug)]
pub struct OllamaProvider {
    config: ProviderConfig,
    base_url: String,
}

impl OllamaProvider {
    /// An adapter for this configuration.
    pub fn new(config: ProviderConfig) -> Result<Self> {
        http::ready(PROVIDER)?;
        let base_url = config.resolved_base_url();
        Ok(Self { config, base_url })
    }

    fn request(&self, method: http::Method, path: &str) -> http::Outgoing {
        let builder = http::Outgoing::new(method, [self.base_url.as_str(), path].concat());
        match &self.config.api_key {
            Some(key) => builder.bearer_auth(key.expose_secret()),
            None => builder,
        }
    }

    /// Sends a request. A refused connection gets advice about `ollama serve`: unlike the
    /// hosted providers, a local server that is not running is the usual cause.
    async fn send(&self, builder: http::Outgoing) -> Result<http::Answer> {
        let answer = http::dispatch(PROVIDER, builder).await.map_err(|error| {
            let described = LlmError::connection(PROVIDER, &error);
            match described {
                LlmError::Connection { provider, message } if error.is_connect() => {
                    LlmError::Connection {
                        provider,
                        message: format!(
                            "could not connect to Ollama at {} — is `ollama serve` running? ({message})",
                            self.base_url
                        ),
                    }
                }
                other => other,
            }
        })?;
        answer.checked(PROVIDER, parse_error).await
    }

    async fn post_chat(&self, request: &CompletionRequest, stream: bool) -> Result<http::Answer> {
        let body = chat_body(request, &self.config, stream)?;
        tracing::debug!(model = %self.model_for(request), stream, "ollama chat request");
        self.send(self.request(http::Method::POST, "/api/chat").json(body))
            .await
    }

    fn model_for<'a>(&'a self, request: &'a CompletionRequest) -> &'a str {
        request.model.as_deref().unwrap_or(&self.config.model)
    }
}

#[async_trait]
impl LlmProvider for OllamaProvider {
    fn info(&self) -> ProviderInfo {
        super::info_for(
            &self.config,
            Capabilities {
                chat: true,
                streaming: true,
                tools: true,
                embeddings: true,
            },
        )
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<CompletionResponse> {
        let response = self.post_chat(request, false).await?;
        let wire: WireChatResponse = http::read_json(PROVIDER, response).await?;
        if let Some(message) = wire.error {
            return Err(stream_error(message));
        }
        let model = if wire.model.is_empty() {
            self.model_for(request).to_owned()
        } else {
            wire.model
        };
        let message = wire.message.unwrap_or_default();
        let tool_calls: Vec<ToolCall> = message
            .tool_calls
            .into_iter()
            .map(|call| ToolCall {
                id: super::generated_id("call_"),
                name: call.function.name,
                arguments: call.function.arguments.into_object(),
            })
            .collect();
        let finish_reason = finish_reason(wire.done_reason.as_deref(), !tool_calls.is_empty());
        Ok(CompletionResponse {
            id: super::generated_id("ollama-"),
            message: AssistantMessage {
                content: message.content,
                tool_calls,
            },
            finish_reason,
            usage: Usage {
                input_tokens: wire.prompt_eval_count.unwrap_or(0),
                output_tokens: wire.eval_count.unwrap_or(0),
            },
            model,
            provider: PROVIDER,
        })
    }

    async fn stream(&self, request: &CompletionRequest) -> Result<ChunkStream> {
        let response = self.post_chat(request, true).await?;
        Ok(decode_stream(http::byte_stream(PROVIDER, response)))
    }

    async fn embed(&self, request: &EmbeddingRequest) -> Result<EmbeddingResponse> {
        let model = request
            .model
            .as_deref()
            .or(self.config.embedding_model.as_deref())
            .ok_or_else(|| LlmError::Configuration {
                provider: PROVIDER,
                message: "no embedding model configured".into(),
            })?;
        let body = serde_json::to_vec(&WireEmbedRequest {
            model,
            input: &request.input,
            dimensions: request.dimensions,
            extra: extra_fields(&request.extra, &["model", "input", "dimensions"]),
        })
        .map_err(|e| invalid(format!("could not serialise the request: {e}")))?;
        let response = self
            .send(self.request(http::Method::POST, "/api/embed").json(body))
            .await?;
        let wire: WireEmbedResponse = http::read_json(PROVIDER, response).await?;
        if wire.embeddings.len() != request.input.len() {
            return Err(LlmError::malformed(
                PROVIDER,
                format!(
                    "{} embeddings for {} inputs",
                    wire.embeddings.len(),
                    request.input.len()
                ),
            ));
        }
        Ok(EmbeddingResponse {
            embeddings: wire.embeddings,
            model: wire.model.unwrap_or_else(|| model.to_owned()),
            provider: PROVIDER,
            embedding_tokens: wire.prompt_eval_count.unwrap_or(0),
        })
    }

    async fn list_models(&self) -> Result<Vec<String>> {
        let response = self
            .send(self.request(http::Method::GET, "/api/tags"))
            .await?;
        let wire: WireTags = http::read_json(PROVIDER, response).await?;
        Ok(wire.models.into_iter().map(|m| m.name).collect())
    }
}

// ---------------------------------------------------------------------------------------
// Request mapping

#[derive(Serialize)]
struct WireChatRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    stream: bool,
    options: WireOptions<'a>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireToolCallOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_name: Option<&'a str>,
}

#[derive(Serialize)]
struct WireToolCallOut<'a> {
    function: WireFunctionCallOut<'a>,
}

#[derive(Serialize)]
struct WireFunctionCallOut<'a> {
    name: &'a str,
    arguments: Cow<'a, Value>,
}

#[derive(Serialize)]
struct WireTool<'a> {
    r#type: &'static str,
    function: WireFunction<'a>,
}

#[derive(Serialize)]
struct WireFunction<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    parameters: &'a Value,
}

#[derive(Serialize)]
struct WireOptions<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    num_predict: u32,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    /// Ollama-only options from the request's extra `options` (`num_ctx`, `seed`, …).
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Top-level keys the adapter sets itself; extra fields never override them.
const CHAT_KEYS: [&str; 5] = ["model", "messages", "tools", "stream", "options"];
const OPTION_KEYS: [&str; 4] = ["temperature", "top_p", "num_predict", "stop"];

/// The exact `/api/chat` body for a request: deterministic, so the same request always
/// gives the same bytes.
pub(crate) fn chat_body(
    request: &CompletionRequest,
    config: &ProviderConfig,
    stream: bool,
) -> Result<Vec<u8>> {
    let tools = match request.tool_choice {
        Some(ToolChoice::None) => Vec::new(),
        _ => request.tools.iter().map(wire_tool).collect(),
    };
    if matches!(
        request.tool_choice,
        Some(ToolChoice::Required | ToolChoice::Tool(_))
    ) {
        tracing::debug!("Ollama has no tool_choice; sending the tools without forcing a call");
    }
    let extra_options = request
        .extra
        .for_dialect(Dialect::Ollama)
        .find(|(key, _)| key.as_str() == "options")
        .and_then(|(_, value)| value.as_object())
        .map(|options| {
            options
                .iter()
                .filter(|(key, _)| !OPTION_KEYS.contains(&key.as_str()))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    let wire = WireChatRequest {
        model: request.model.as_deref().unwrap_or(&config.model),
        messages: wire_messages(&request.messages),
        tools,
        stream,
        options: WireOptions {
            temperature: request.temperature.or(config.defaults.temperature),
            top_p: request.top_p.or(config.defaults.top_p),
            num_predict: request.max_tokens.unwrap_or(config.defaults.max_tokens),
            stop: &request.stop,
            extra: extra_options,
        },
        extra: extra_fields(&request.extra, &CHAT_KEYS),
    };
    serde_json::to_vec(&wire).map_err(|e| invalid(format!("could not serialise the request: {e}")))
}

fn extra_fields(extra: &crate::types::Extra, reserved: &[&str]) -> Map<String, Value> {
    extra
        .for_dialect(Dialect::Ollama)
        .filter(|(key, _)| !reserved.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

fn wire_tool(tool: &Tool) -> WireTool<'_> {
    WireTool {
        r#type: "function",
        function: WireFunction {
            name: &tool.name,
            description: tool.description.as_deref(),
            parameters: &tool.parameters,
        },
    }
}

fn wire_messages(messages: &[Message]) -> Vec<WireMessage<'_>> {
    // Ollama matches tool results to calls by tool name, not id.
    let mut names: BTreeMap<&str, &str> = BTreeMap::new();
    messages
        .iter()
        .map(|message| match message {
            Message::System { content } => text_message("system", content),
            Message::User { content } => text_message("user", content),
            Message::Assistant {
                content,
                tool_calls,
            } => {
                for call in tool_calls {
                    names.insert(&call.id, &call.name);
                }
                WireMessage {
                    role: "assistant",
                    content,
                    tool_calls: tool_calls
                        .iter()
                        .map(|call| WireToolCallOut {
                            function: WireFunctionCallOut {
                                name: &call.name,
                                arguments: arguments_object(&call.arguments),
                            },
                        })
                        .collect(),
                    tool_name: None,
                }
            }
            Message::Tool {
                tool_call_id,
                content,
            } => {
                let tool_name = names.get(tool_call_id.as_str()).copied();
                if tool_name.is_none() {
                    tracing::debug!(%tool_call_id, "tool result answers no earlier tool call");
                }
                WireMessage {
                    role: "tool",
                    content,
                    tool_calls: Vec::new(),
                    tool_name,
                }
            }
        })
        .collect()
}

fn text_message<'a>(role: &'static str, content: &'a str) -> WireMessage<'a> {
    WireMessage {
        role,
        content,
        tool_calls: Vec::new(),
        tool_name: None,
    }
}

/// Ollama rejects arguments that are not an object, so arguments that arrive as JSON text
/// (as OpenAI clients send them) are parsed back into one.
fn arguments_object(arguments: &Value) -> Cow<'_, Value> {
    match arguments {
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(parsed @ Value::Object(_)) => Cow::Owned(parsed),
            _ => Cow::Borrowed(arguments),
        },
        Value::Null => Cow::Owned(Value::Object(Map::new())),
        _ => Cow::Borrowed(arguments),
    }
}

#[derive(Serialize)]
struct WireEmbedRequest<'a> {
    model: &'a str,
    input: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

// ---------------------------------------------------------------------------------------
// Response mapping

#[derive(Deserialize, Default)]
struct WireChatResponse {
    #[serde(default)]
    model: String,
    #[serde(default)]
    message: Option<WireMessageIn>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    prompt_eval_count: Option<u64>,
    #[serde(default)]
    eval_count: Option<u64>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize, Default)]
struct WireMessageIn {
    #[serde(default)]
    content: String,
    #[serde(default)]
    tool_calls: Vec<WireToolCallIn>,
}

#[derive(Deserialize)]
struct WireToolCallIn {
    function: WireFunctionIn,
}

#[derive(Deserialize)]
struct WireFunctionIn {
    name: String,
    #[serde(default)]
    arguments: WireArguments,
}

#[derive(Deserialize, Default)]
#[serde(transparent)]
struct WireArguments(Value);

impl WireArguments {
    fn into_object(self) -> Value {
        match self.0 {
            Value::Null => Value::Object(Map::new()),
            other => other,
        }
    }
}

#[derive(Deserialize)]
struct WireEmbedResponse {
    #[serde(default)]
    model: Option<String>,
    embeddings: Vec<Vec<f32>>,
    #[serde(default)]
    prompt_eval_count: Option<u64>,
}

#[derive(Deserialize)]
struct WireTags {
    #[serde(default)]
    models: Vec<WireTag>,
}

#[derive(Deserialize)]
struct WireTag {
    name: String,
}

#[derive(Deserialize)]
struct WireError {
    error: Value,
}

fn finish_reason(done_reason: Option<&str>, called_tools: bool) -> FinishReason {
    match done_reason {
        Some("length") => FinishReason::Length,
        // Ollama says `stop` when the model called tools.
        _ if called_tools => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    }
}

/// An error Ollama reported inside a 200 answer or a stream.
fn stream_error(message: String) -> LlmError {
    UpstreamFailure {
        status: 500,
        message,
        ..UpstreamFailure::default()
    }
    .into_error(PROVIDER)
}

fn invalid(message: String) -> LlmError {
    LlmError::InvalidRequest {
        provider: PROVIDER,
        status: None,
        code: None,
        message,
    }
}

/// Classifies an error answer: Ollama's body is `{"error": "…"}` (a proxy in front of it may
/// send anything, which is kept as the message).
fn parse_error(status: u16, headers: &HeaderMap, body: &[u8]) -> LlmError {
    let message = match serde_json::from_slice::<WireError>(body) {
        Ok(WireError {
            error: Value::String(message),
        }) => message,
        Ok(WireError { error }) => error
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| error.to_string(), str::to_owned),
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(500)])
            .trim()
            .to_owned(),
    };
    UpstreamFailure {
        status,
        message,
        retry_after: retry_after_from_headers(headers),
        ..UpstreamFailure::default()
    }
    .into_error(PROVIDER)
}

// ---------------------------------------------------------------------------------------
// Streaming

/// Decodes Ollama's NDJSON stream into chunks. The byte stream may be split anywhere.
pub(crate) fn decode_stream<S>(bytes: S) -> ChunkStream
where
    S: Stream<Item = Result<Bytes>> + Send + 'static,
{
    let decoder = Decoder {
        lines: Box::pin(http::ndjson_lines(PROVIDER, bytes)),
        pending: VecDeque::new(),
        next_index: 0,
        finished: false,
    };
    Box::pin(futures::stream::unfold(decoder, |mut decoder| async move {
        loop {
            if let Some(chunk) = decoder.pending.pop_front() {
                return Some((Ok(chunk), decoder));
            }
            if decoder.finished {
                return None;
            }
            let outcome = match decoder.lines.next().await {
                Some(Ok(line)) => decoder.decode_line(&line),
                Some(Err(error)) => Err(error),
                None => Err(LlmError::Connection {
                    provider: PROVIDER,
                    message: "the stream ended before Ollama said it was done".into(),
                }),
            };
            if let Err(error) = outcome {
                decoder.finished = true;
                return Some((Err(error), decoder));
            }
        }
    }))
}

struct Decoder {
    lines: std::pin::Pin<Box<dyn Stream<Item = Result<String>> + Send>>,
    pending: VecDeque<StreamChunk>,
    /// Tool calls seen so far: Ollama sends whole calls, possibly over several lines.
    next_index: u32,
    finished: bool,
}

impl Decoder {
    fn decode_line(&mut self, line: &str) -> Result<()> {
        let wire: WireChatResponse = http::parse_json_str(PROVIDER, line)?;
        if let Some(message) = wire.error {
            return Err(stream_error(message));
        }
        if let Some(message) = wire.message {
            if !message.content.is_empty() {
                self.pending.push_back(StreamChunk::TextDelta {
                    text: message.content,
                });
            }
            for call in message.tool_calls {
                let arguments = call.function.arguments.into_object().to_string();
                self.pending.push_back(StreamChunk::ToolCallDelta {
                    index: self.next_index,
                    id: Some(super::generated_id("call_")),
                    name: Some(call.function.name),
                    arguments,
                });
                self.next_index += 1;
            }
        }
        if wire.done {
            self.pending.push_back(StreamChunk::Usage {
                usage: Usage {
                    input_tokens: wire.prompt_eval_count.unwrap_or(0),
                    output_tokens: wire.eval_count.unwrap_or(0),
                },
            });
            self.pending.push_back(StreamChunk::Finish {
                reason: finish_reason(wire.done_reason.as_deref(), self.next_index > 0),
            });
            self.finished = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
