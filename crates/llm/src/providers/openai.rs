//! OpenAI Chat Completions (and any OpenAI-compatible server): chat, SSE streaming, tool
//! calls with JSON-string arguments, embeddings and the model list.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{LlmError, Result, UpstreamFailure, retry_after_from_headers};
use crate::factory::ProviderConfig;
use crate::http::{self, HeaderMap, HeaderName};
use crate::provider::{ChunkStream, LlmProvider};
use crate::types::{
    AssistantMessage, Capabilities, CompletionRequest, CompletionResponse, Dialect,
    EmbeddingRequest, EmbeddingResponse, Extra, FinishReason, Message, ProviderInfo, ProviderKind,
    Tool, ToolCall, ToolChoice, Usage, parse_arguments,
};

pub(crate) mod stream;

use self::stream::decode_stream;

const PROVIDER: ProviderKind = ProviderKind::OpenAi;

/// The OpenAI adapter: `POST {base}/v1/chat/completions`, `POST {base}/v1/embeddings` and
/// `GET {base}/v1/models`, authenticated with `Authorization: Bearer`.
#[derive(Debug)]
pub struct OpenAiProvider {
    config: ProviderConfig,
    base_url: String,
}

impl OpenAiProvider {
    /// An adapter for this configuration. A missing API key is reported when a request is
    /// made, so a provider can be listed before it is configured.
    pub fn new(config: ProviderConfig) -> Result<Self> {
        http::ready(PROVIDER)?;
        let base_url = config.resolved_base_url();
        Ok(Self { config, base_url })
    }

    fn request(&self, method: http::Method, path: &str) -> Result<http::Outgoing> {
        let key = self.config.required_api_key(PROVIDER, "OPENAI_API_KEY")?;
        let mut builder =
            http::Outgoing::new(method, [self.base_url.as_str(), path].concat()).bearer_auth(key);
        if let Some(org) = self
            .config
            .organization
            .as_deref()
            .filter(|o| !o.is_empty())
        {
            builder = builder.header(HeaderName::from_static("openai-organization"), org);
        }
        Ok(builder)
    }

    /// Sends a chat request. The request is written at once and the future returned holds
    /// only the sending (an `async fn` would keep its arguments and what it built from them
    /// while the upstream works).
    fn post_chat(
        &self,
        request: &CompletionRequest,
        stream: bool,
    ) -> impl Future<Output = Result<http::Answer>> + Send + use<> {
        let built = (|| {
            let body = chat_body(&self.config, request, stream)?;
            tracing::debug!(provider = %PROVIDER, stream, bytes = body.len(), "chat completion request");
            Ok(self
                .request(http::Method::POST, "/v1/chat/completions")?
                .json(body)
                .events_if(stream))
        })();
        http::send_built(PROVIDER, built, parse_error)
    }
}

#[async_trait]
impl LlmProvider for OpenAiProvider {
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
        let body: ChatResponse = http::read_json(PROVIDER, response).await?;
        from_chat_response(body, self.model_for(request))
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
                message: "no embedding model configured: set OPENAI_EMBEDDING_MODEL".into(),
            })?;
        let body = embed_body(model, request)?;
        let builder = self
            .request(http::Method::POST, "/v1/embeddings")?
            .json(body);
        let response = http::send(PROVIDER, builder, parse_error).await?;
        let body: EmbedResponse = http::read_json(PROVIDER, response).await?;
        from_embed_response(body, model, request.input.len())
    }

    async fn list_models(&self) -> Result<Vec<String>> {
        let builder = self.request(http::Method::GET, "/v1/models")?;
        let response = http::send(PROVIDER, builder, parse_error).await?;
        let body: ModelList = http::read_json(PROVIDER, response).await?;
        let mut ids: Vec<String> = body.data.into_iter().map(|m| m.id).collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

impl OpenAiProvider {
    fn model_for<'a>(&'a self, request: &'a CompletionRequest) -> &'a str {
        request.model.as_deref().unwrap_or(&self.config.model)
    }
}

// ---------------------------------------------------------------------------------------
// Request wire types.

#[derive(Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop: Vec<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

impl ChatBody<'_> {
    /// Whether the adapter itself sets `key`; extra fields never override those.
    fn sets(&self, key: &str) -> bool {
        match key {
            "model" | "messages" | "stream" | "stream_options" => true,
            "tools" => !self.tools.is_empty(),
            "tool_choice" => self.tool_choice.is_some(),
            "temperature" => self.temperature.is_some(),
            "top_p" => self.top_p.is_some(),
            // The API rejects a request carrying both limits.
            "max_tokens" | "max_completion_tokens" => {
                self.max_tokens.is_some() || self.max_completion_tokens.is_some()
            }
            "stop" => !self.stop.is_empty(),
            _ => false,
        }
    }
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
#[serde(tag = "role", rename_all = "lowercase")]
enum WireMessage<'a> {
    System {
        content: &'a str,
    },
    User {
        content: &'a str,
    },
    Assistant {
        content: Option<&'a str>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<WireToolCall<'a>>,
    },
    Tool {
        tool_call_id: &'a str,
        content: &'a str,
    },
}

#[derive(Serialize)]
struct WireToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunctionCall<'a>,
}

#[derive(Serialize)]
struct WireFunctionCall<'a> {
    name: &'a str,
    arguments: String,
}

#[derive(Serialize)]
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
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
#[serde(untagged)]
enum WireToolChoice<'a> {
    Mode(&'static str),
    Function {
        #[serde(rename = "type")]
        kind: &'static str,
        function: WireName<'a>,
    },
}

#[derive(Serialize)]
struct WireName<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct EmbedBody<'a> {
    model: &'a str,
    input: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
    encoding_format: &'static str,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Reasoning models take `max_completion_tokens` and reject `max_tokens`.
fn is_reasoning_model(model: &str) -> bool {
    let model = model.rsplit('/').next().unwrap_or(model).as_bytes();
    ["o1", "o3", "o4", "gpt-5"].iter().any(|family| {
        let family = family.as_bytes();
        model.len() >= family.len()
            && model[..family.len()].eq_ignore_ascii_case(family)
            && matches!(model.get(family.len()), None | Some(b'-'))
    })
}

fn wire_message(message: &Message) -> WireMessage<'_> {
    match message {
        Message::System { content } => WireMessage::System { content },
        Message::User { content } => WireMessage::User { content },
        Message::Assistant {
            content,
            tool_calls,
        } => WireMessage::Assistant {
            // The API wants `null`, not "", beside tool calls.
            content: (!content.is_empty() || tool_calls.is_empty()).then_some(content.as_str()),
            tool_calls: tool_calls.iter().map(wire_tool_call).collect(),
        },
        Message::Tool {
            tool_call_id,
            content,
        } => WireMessage::Tool {
            tool_call_id,
            content,
        },
    }
}

fn wire_tool_call(call: &ToolCall) -> WireToolCall<'_> {
    WireToolCall {
        id: &call.id,
        kind: "function",
        function: WireFunctionCall {
            name: &call.name,
            arguments: match &call.arguments {
                // Arguments that were not JSON are kept as their text; send that text back.
                Value::String(text) => text.clone(),
                other => other.to_string(),
            },
        },
    }
}

fn wire_tool(tool: &Tool) -> WireTool<'_> {
    WireTool {
        kind: "function",
        function: WireFunction {
            name: &tool.name,
            description: tool.description.as_deref(),
            parameters: &tool.parameters,
        },
    }
}

fn wire_tool_choice(choice: &ToolChoice) -> WireToolChoice<'_> {
    match choice {
        ToolChoice::Auto => WireToolChoice::Mode("auto"),
        ToolChoice::None => WireToolChoice::Mode("none"),
        ToolChoice::Required => WireToolChoice::Mode("required"),
        ToolChoice::Tool(name) => WireToolChoice::Function {
            kind: "function",
            function: WireName { name },
        },
    }
}

fn extra_fields(extra: &Extra, collides: impl Fn(&str) -> bool) -> Map<String, Value> {
    extra
        .for_dialect(Dialect::OpenAi)
        .filter(|(key, _)| !collides(key))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// The exact bytes of a chat completion request.
pub(crate) fn chat_body(
    config: &ProviderConfig,
    request: &CompletionRequest,
    stream: bool,
) -> Result<Vec<u8>> {
    let model = request.model.as_deref().unwrap_or(&config.model);
    let max_tokens = request.max_tokens.unwrap_or(config.defaults.max_tokens);
    let reasoning = is_reasoning_model(model);
    let mut body = ChatBody {
        model,
        messages: request.messages.iter().map(wire_message).collect(),
        tools: request.tools.iter().map(wire_tool).collect(),
        tool_choice: request.tool_choice.as_ref().map(wire_tool_choice),
        // Reasoning models reject sampling parameters other than their defaults, so the
        // configured defaults are not applied to them; an explicit request value still is.
        temperature: request
            .temperature
            .or(config.defaults.temperature.filter(|_| !reasoning)),
        top_p: request
            .top_p
            .or(config.defaults.top_p.filter(|_| !reasoning)),
        max_tokens: (!reasoning).then_some(max_tokens),
        max_completion_tokens: reasoning.then_some(max_tokens),
        stop: request.stop.iter().map(String::as_str).collect(),
        stream,
        stream_options: stream.then_some(StreamOptions {
            include_usage: true,
        }),
        extra: Map::new(),
    };
    body.extra = extra_fields(&request.extra, |key| body.sets(key));
    serde_json::to_vec(&body).map_err(|e| LlmError::InvalidRequest {
        provider: PROVIDER,
        status: None,
        code: None,
        message: format!("could not serialise the request: {e}"),
    })
}

/// The exact bytes of an embeddings request.
fn embed_body(model: &str, request: &EmbeddingRequest) -> Result<Vec<u8>> {
    let body = EmbedBody {
        model,
        input: &request.input,
        dimensions: request.dimensions,
        encoding_format: "float",
        extra: extra_fields(&request.extra, |key| {
            matches!(key, "model" | "input" | "encoding_format")
                || (key == "dimensions" && request.dimensions.is_some())
        }),
    };
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
pub(crate) struct ChatResponse {
    id: Option<String>,
    model: Option<String>,
    #[serde(default)]
    choices: Option<Vec<ResponseChoice>>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct ResponseChoice {
    message: Option<ResponseMessage>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ResponseMessage {
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Option<Vec<ResponseToolCall>>,
}

#[derive(Deserialize)]
struct ResponseToolCall {
    id: Option<String>,
    function: ResponseFunction,
}

#[derive(Deserialize)]
struct ResponseFunction {
    name: String,
    arguments: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

impl WireUsage {
    fn unified(self) -> Usage {
        Usage {
            input_tokens: self.prompt_tokens.unwrap_or(0),
            output_tokens: self.completion_tokens.unwrap_or(0),
        }
    }
}

#[derive(Deserialize)]
struct WireError {
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<Value>,
}

impl WireError {
    fn code(&self) -> Option<String> {
        match &self.code {
            Some(Value::String(code)) => Some(code.clone()),
            Some(Value::Number(code)) => Some(code.to_string()),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: Option<Value>,
}

#[derive(Deserialize)]
struct EmbedResponse {
    data: Vec<EmbedItem>,
    model: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct EmbedItem {
    index: Option<usize>,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelItem>,
}

#[derive(Deserialize)]
struct ModelItem {
    id: String,
}

fn finish_reason(reason: Option<&str>, has_tool_calls: bool) -> FinishReason {
    match reason {
        Some("stop") => FinishReason::Stop,
        Some("length") => FinishReason::Length,
        Some("tool_calls" | "function_call") => FinishReason::ToolCalls,
        Some("content_filter") => FinishReason::ContentFilter,
        other => {
            if let Some(other) = other {
                tracing::debug!(provider = %PROVIDER, reason = other, "unknown finish reason");
            }
            if has_tool_calls {
                FinishReason::ToolCalls
            } else {
                FinishReason::Stop
            }
        }
    }
}

pub(crate) fn from_chat_response(
    body: ChatResponse,
    requested_model: &str,
) -> Result<CompletionResponse> {
    let choice = body
        .choices
        .and_then(|choices| choices.into_iter().next())
        .ok_or_else(|| LlmError::malformed(PROVIDER, "the answer has no choices"))?;
    let (content, tool_calls) = match choice.message {
        Some(message) => (
            // A refusal replaces the content; keep it so the caller sees why.
            message.content.or(message.refusal).unwrap_or_default(),
            message.tool_calls.unwrap_or_default(),
        ),
        None => (String::new(), Vec::new()),
    };
    let tool_calls: Vec<ToolCall> = tool_calls
        .into_iter()
        .map(|call| ToolCall {
            id: call
                .id
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| super::generated_id("call_")),
            name: call.function.name,
            arguments: parse_arguments(call.function.arguments.as_deref().unwrap_or("")),
        })
        .collect();
    Ok(CompletionResponse {
        id: body.id.unwrap_or_else(|| super::generated_id("chatcmpl-")),
        finish_reason: finish_reason(choice.finish_reason.as_deref(), !tool_calls.is_empty()),
        message: AssistantMessage {
            content,
            tool_calls,
        },
        usage: body.usage.unwrap_or_default().unified(),
        model: body.model.unwrap_or_else(|| requested_model.to_owned()),
        provider: PROVIDER,
    })
}

fn from_embed_response(
    body: EmbedResponse,
    requested_model: &str,
    inputs: usize,
) -> Result<EmbeddingResponse> {
    let mut items: Vec<(usize, Vec<f32>)> = body
        .data
        .into_iter()
        .enumerate()
        .map(|(position, item)| (item.index.unwrap_or(position), item.embedding))
        .collect();
    items.sort_by_key(|(index, _)| *index);
    if items.len() != inputs || items.iter().enumerate().any(|(i, (index, _))| i != *index) {
        return Err(LlmError::malformed(
            PROVIDER,
            format!(
                "expected {inputs} embeddings indexed 0..{inputs}, got {}",
                items.len()
            ),
        ));
    }
    let usage = body.usage.unwrap_or_default();
    Ok(EmbeddingResponse {
        embeddings: items.into_iter().map(|(_, vector)| vector).collect(),
        model: body.model.unwrap_or_else(|| requested_model.to_owned()),
        provider: PROVIDER,
        embedding_tokens: usage.prompt_tokens.or(usage.total_tokens).unwrap_or(0),
    })
}

/// Classifies an error answer from its `{"error": {"message", "type", "param", "code"}}`.
fn parse_error(status: u16, headers: &HeaderMap, body: &[u8]) -> LlmError {
    let error = serde_json::from_slice::<ErrorEnvelope>(body)
        .ok()
        .and_then(|envelope| envelope.error);
    let (message, kind, code) = match error {
        Some(Value::String(message)) => (message, None, None),
        Some(value) => match serde_json::from_value::<WireError>(value) {
            Ok(error) => {
                let code = error.code();
                (error.message.unwrap_or_default(), error.kind, code)
            }
            Err(_) => (String::new(), None, None),
        },
        None => (
            String::from_utf8_lossy(&body[..body.len().min(300)])
                .trim()
                .to_owned(),
            None,
            None,
        ),
    };
    if code.as_deref() == Some("model_not_found") {
        return LlmError::ModelNotFound {
            provider: PROVIDER,
            message,
        };
    }
    UpstreamFailure {
        status,
        code,
        kind,
        message,
        retry_after: retry_after_from_headers(headers),
    }
    .into_error(PROVIDER)
}

#[cfg(test)]
mod tests;
