//! Unified request, response, stream and embedding types shared by every provider.
//!
//! Ingress dialects and provider adapters only ever meet here: each adapter maps its own wire
//! format to and from these types, so N providers and M dialects need N + M mappings.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The providers the library speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI's Chat Completions API, or any OpenAI-compatible server.
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
    /// A local Ollama server.
    Ollama,
}

impl ProviderKind {
    /// Every known provider, in the order they are documented.
    pub const ALL: [ProviderKind; 3] = [Self::OpenAi, Self::Anthropic, Self::Ollama];

    /// The stable lowercase name used in configuration, headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::Ollama => "ollama",
        }
    }

    /// The wire dialect this provider speaks.
    pub fn dialect(self) -> Dialect {
        match self {
            Self::OpenAi => Dialect::OpenAi,
            Self::Anthropic => Dialect::Anthropic,
            Self::Ollama => Dialect::Ollama,
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error returned when a provider name is not one of `openai`, `anthropic`, `ollama`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown provider `{0}`: expected one of openai, anthropic, ollama")]
pub struct UnknownProvider(pub String);

impl FromStr for ProviderKind {
    type Err = UnknownProvider;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "openai" => Ok(Self::OpenAi),
            "anthropic" => Ok(Self::Anthropic),
            "ollama" => Ok(Self::Ollama),
            _ => Err(UnknownProvider(s.to_owned())),
        }
    }
}

/// A wire dialect. Provider-specific request fields in [`Extra`] are forwarded only to a
/// provider that speaks the same dialect they were written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// OpenAI Chat Completions.
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
    /// Ollama's native API.
    Ollama,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Message {
    /// Instructions for the model. Anthropic receives these as the top-level `system`.
    System {
        /// The instruction text.
        content: String,
    },
    /// What the user said.
    User {
        /// The user's text.
        content: String,
    },
    /// What the model said: text, tool calls, or both.
    Assistant {
        /// The text part; empty when the model only called tools.
        #[serde(default)]
        content: String,
        /// Tools the model asked to call.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ToolCall>,
    },
    /// The result of a tool call, sent back to the model.
    Tool {
        /// The id of the [`ToolCall`] this answers.
        tool_call_id: String,
        /// The tool's output.
        content: String,
    },
}

impl Message {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::System {
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::User {
            content: content.into(),
        }
    }

    /// An assistant message with text only.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::Assistant {
            content: content.into(),
            tool_calls: Vec::new(),
        }
    }

    /// An assistant message that called tools.
    pub fn assistant_tool_calls(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Self::Assistant {
            content: content.into(),
            tool_calls,
        }
    }

    /// A tool result answering the call with `tool_call_id`.
    pub fn tool_result(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self::Tool {
            tool_call_id: tool_call_id.into(),
            content: content.into(),
        }
    }
}

/// A tool call made by the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id; generated when the provider gives none (Ollama).
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments as a JSON value (usually an object).
    pub arguments: Value,
}

impl ToolCall {
    /// The arguments where an object is required (Anthropic's `tool_use.input`): arguments
    /// kept as JSON text are parsed back when they hold an object (an empty text is an empty
    /// object), absent arguments are an empty object, and anything else is given as it is,
    /// so the upstream's own validation message reaches the caller.
    #[must_use]
    pub fn arguments_object(&self) -> Cow<'_, Value> {
        match &self.arguments {
            Value::Null => Cow::Owned(Value::Object(Map::new())),
            Value::String(text) => match parse_arguments(text) {
                object @ Value::Object(_) => Cow::Owned(object),
                _ => Cow::Borrowed(&self.arguments),
            },
            other => Cow::Borrowed(other),
        }
    }
}

/// A tool (function) the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// The function name.
    pub name: String,
    /// What the tool does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema describing the arguments object.
    pub parameters: Value,
}

impl Tool {
    /// A tool with a name, a description and a JSON Schema for its arguments.
    pub fn new(name: impl Into<String>, description: impl Into<String>, parameters: Value) -> Self {
        Self {
            name: name.into(),
            description: Some(description.into()),
            parameters,
        }
    }
}

/// How the model may use the tools it was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "name")]
pub enum ToolChoice {
    /// The model decides.
    Auto,
    /// The model must not call tools.
    None,
    /// The model must call at least one tool.
    Required,
    /// The model must call this tool.
    Tool(String),
}

/// Provider-specific request fields carried through unchanged to a provider of the same
/// dialect (for example OpenAI's `logit_bias` or `seed` when an OpenAI client talks to
/// OpenAI). A provider of another dialect ignores them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Extra {
    /// The dialect the fields were written in; `None` means no fields.
    pub dialect: Option<Dialect>,
    /// The fields, in key order (so serialisation is deterministic).
    pub fields: Map<String, Value>,
}

impl Extra {
    /// Fields written in `dialect`.
    pub fn new(dialect: Dialect, fields: Map<String, Value>) -> Self {
        Self {
            dialect: Some(dialect),
            fields,
        }
    }

    /// The fields if they were written in `dialect`, else nothing.
    pub fn for_dialect(&self, dialect: Dialect) -> impl Iterator<Item = (&String, &Value)> {
        let matches = self.dialect == Some(dialect);
        self.fields.iter().filter(move |_| matches)
    }
}

/// A chat completion request in the unified shape.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// The model; `None` uses the provider's configured model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    /// How the model may use the tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Sampling temperature, 0–2; `None` uses the provider default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Maximum output tokens; `None` uses the provider default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Nucleus sampling, 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Provider-specific fields passed through to a provider of the same dialect.
    #[serde(default, skip_serializing_if = "is_default_extra")]
    pub extra: Extra,
}

fn is_default_extra(extra: &Extra) -> bool {
    extra.fields.is_empty()
}

impl CompletionRequest {
    /// A request with these messages and every other field defaulted.
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
            ..Self::default()
        }
    }

    /// Offers these tools to the model.
    pub fn with_tools(mut self, tools: Vec<Tool>) -> Self {
        self.tools = tools;
        self
    }

    /// Sets the sampling temperature.
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Sets the maximum number of output tokens.
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    /// Uses this model instead of the provider's configured one.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }
}

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A natural end or a stop sequence.
    Stop,
    /// The output token limit was reached.
    Length,
    /// The model called tools and waits for their results.
    ToolCalls,
    /// Output was withheld by a content filter.
    ContentFilter,
    /// The provider reported an error while generating.
    Error,
}

impl FinishReason {
    /// The OpenAI-style name (`stop`, `length`, `tool_calls`, `content_filter`, `error`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
            Self::ContentFilter => "content_filter",
            Self::Error => "error",
        }
    }
}

/// Tokens used by a chat completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
}

impl Usage {
    /// Input plus output tokens.
    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

/// The assistant's reply.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// The text; empty when the model only called tools.
    pub content: String,
    /// Tools the model asked to call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

impl From<AssistantMessage> for Message {
    fn from(message: AssistantMessage) -> Self {
        Message::Assistant {
            content: message.content,
            tool_calls: message.tool_calls,
        }
    }
}

/// A finished chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    /// The upstream's response id (generated when the upstream gives none).
    pub id: String,
    /// The reply.
    pub message: AssistantMessage,
    /// Why the model stopped.
    pub finish_reason: FinishReason,
    /// Tokens used.
    pub usage: Usage,
    /// The model that answered, as the upstream named it.
    pub model: String,
    /// The provider that answered.
    pub provider: ProviderKind,
}

/// One piece of a streamed completion. Folding the chunks of a stream with
/// [`StreamAccumulator`] gives exactly the non-streamed [`CompletionResponse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamChunk {
    /// A piece of the assistant's text.
    TextDelta {
        /// The text to append.
        text: String,
    },
    /// A piece of a tool call. The first delta of a call carries its `id` and `name`; later
    /// ones append to `arguments` (a fragment of the JSON text).
    ToolCallDelta {
        /// Which call, counting from 0 in the order the model made them.
        index: u32,
        /// The call's id, on its first delta.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// The tool's name, on its first delta.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// A fragment of the arguments' JSON text.
        arguments: String,
    },
    /// Token usage, once the upstream reports it.
    Usage {
        /// The counts.
        usage: Usage,
    },
    /// The end of the reply.
    Finish {
        /// Why the model stopped.
        reason: FinishReason,
    },
}

/// Folds stream chunks into the response they describe.
#[derive(Debug, Clone, Default)]
pub struct StreamAccumulator {
    text: String,
    tool_calls: Vec<PartialToolCall>,
    usage: Option<Usage>,
    finish_reason: Option<FinishReason>,
    chunks: usize,
}

#[derive(Debug, Clone, Default)]
struct PartialToolCall {
    index: u32,
    id: String,
    name: String,
    arguments: String,
}

impl StreamAccumulator {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one chunk.
    pub fn push(&mut self, chunk: &StreamChunk) {
        self.chunks += 1;
        match chunk {
            StreamChunk::TextDelta { text } => self.text.push_str(text),
            StreamChunk::ToolCallDelta {
                index,
                id,
                name,
                arguments,
            } => {
                let position = match self.tool_calls.iter().position(|c| c.index == *index) {
                    Some(position) => position,
                    None => {
                        self.tool_calls.push(PartialToolCall {
                            index: *index,
                            ..PartialToolCall::default()
                        });
                        self.tool_calls.len() - 1
                    }
                };
                let call = &mut self.tool_calls[position];
                if let Some(id) = id {
                    call.id.clone_from(id);
                }
                if let Some(name) = name {
                    call.name.push_str(name);
                }
                call.arguments.push_str(arguments);
            }
            StreamChunk::Usage { usage } => self.usage = Some(*usage),
            StreamChunk::Finish { reason } => self.finish_reason = Some(*reason),
        }
    }

    /// The text received so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The usage, if the stream reported it.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The finish reason, if the stream reached its end.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish_reason
    }

    /// How many chunks were pushed.
    pub fn chunk_count(&self) -> usize {
        self.chunks
    }

    /// The assistant message so far. Tool-call arguments that are not (yet) valid JSON are
    /// kept as a JSON string.
    pub fn message(&self) -> AssistantMessage {
        let mut calls = self.tool_calls.clone();
        calls.sort_by_key(|c| c.index);
        AssistantMessage {
            content: self.text.clone(),
            tool_calls: calls
                .into_iter()
                .map(|c| ToolCall {
                    id: c.id,
                    name: c.name,
                    arguments: parse_arguments(&c.arguments),
                })
                .collect(),
        }
    }

    /// The complete response, given the id, model and provider the caller knows.
    pub fn into_response(
        self,
        id: impl Into<String>,
        model: impl Into<String>,
        provider: ProviderKind,
    ) -> CompletionResponse {
        let message = self.message();
        let finish_reason = self
            .finish_reason
            .unwrap_or(if message.tool_calls.is_empty() {
                FinishReason::Stop
            } else {
                FinishReason::ToolCalls
            });
        CompletionResponse {
            id: id.into(),
            message,
            finish_reason,
            usage: self.usage.unwrap_or_default(),
            model: model.into(),
            provider,
        }
    }
}

/// Parses tool-call arguments from their JSON text; an empty text is an empty object, and
/// text that is not JSON is kept as a string so nothing the model produced is lost.
pub fn parse_arguments(text: &str) -> Value {
    if text.trim().is_empty() {
        return Value::Object(Map::new());
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// An embeddings request.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EmbeddingRequest {
    /// The model; `None` uses the provider's configured embedding model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The texts to embed.
    pub input: Vec<String>,
    /// Requested vector size, for models that support shortening.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    /// Provider-specific fields passed through to a provider of the same dialect.
    #[serde(default, skip_serializing_if = "is_default_extra")]
    pub extra: Extra,
}

impl EmbeddingRequest {
    /// Embeds these texts with the provider's configured model.
    pub fn new(input: Vec<String>) -> Self {
        Self {
            input,
            ..Self::default()
        }
    }
}

/// Embedding vectors, one per input text, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    /// The vectors.
    pub embeddings: Vec<Vec<f32>>,
    /// The model that produced them.
    pub model: String,
    /// The provider that produced them.
    pub provider: ProviderKind,
    /// Tokens of input embedded.
    pub embedding_tokens: u64,
}

/// What a provider can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Chat completions.
    pub chat: bool,
    /// Streamed chat completions.
    pub streaming: bool,
    /// Tool (function) calling.
    pub tools: bool,
    /// Embeddings.
    pub embeddings: bool,
}

/// A configured provider: who it is, which model, and what it costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderInfo {
    /// The provider.
    pub provider: ProviderKind,
    /// The configured chat model.
    pub model: String,
    /// The configured embedding model, if any.
    pub embedding_model: Option<String>,
    /// The model's context window in tokens, when known.
    pub context_window: Option<u32>,
    /// What the provider can do.
    pub capabilities: Capabilities,
    /// The model's price, when the price table knows it.
    pub price: Option<crate::pricing::ModelPrice>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulator_joins_text_and_tool_calls() {
        let mut acc = StreamAccumulator::new();
        for chunk in [
            StreamChunk::TextDelta { text: "Hel".into() },
            StreamChunk::TextDelta { text: "lo".into() },
            StreamChunk::ToolCallDelta {
                index: 0,
                id: Some("call_1".into()),
                name: Some("search".into()),
                arguments: "{\"q\":".into(),
            },
            StreamChunk::ToolCallDelta {
                index: 0,
                id: None,
                name: None,
                arguments: "\"rust\"}".into(),
            },
            StreamChunk::Usage {
                usage: Usage {
                    input_tokens: 3,
                    output_tokens: 4,
                },
            },
            StreamChunk::Finish {
                reason: FinishReason::ToolCalls,
            },
        ] {
            acc.push(&chunk);
        }
        let response = acc.into_response("id", "m", ProviderKind::OpenAi);
        assert_eq!(response.message.content, "Hello");
        assert_eq!(response.message.tool_calls[0].name, "search");
        assert_eq!(
            response.message.tool_calls[0].arguments,
            serde_json::json!({"q": "rust"})
        );
        assert_eq!(response.usage.total(), 7);
        assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    }

    #[test]
    fn provider_names_round_trip() {
        for kind in ProviderKind::ALL {
            assert_eq!(kind.as_str().parse::<ProviderKind>(), Ok(kind));
        }
        assert!("gemini".parse::<ProviderKind>().is_err());
    }

    #[test]
    fn extra_fields_only_reach_their_dialect() {
        let mut fields = Map::new();
        fields.insert("seed".into(), Value::from(7));
        let extra = Extra::new(Dialect::OpenAi, fields);
        assert_eq!(extra.for_dialect(Dialect::OpenAi).count(), 1);
        assert_eq!(extra.for_dialect(Dialect::Anthropic).count(), 0);
    }
}
