//! The three provider adapters. Each owns its private wire types and the mapping to and
//! from the unified types; none knows about the others.

mod anthropic;
mod ollama;
mod openai;

pub use anthropic::AnthropicProvider;
pub use ollama::OllamaProvider;
pub use openai::OpenAiProvider;

use crate::factory::ProviderConfig;
use crate::types::{Capabilities, ProviderInfo};

/// The adapters' wire translations as plain functions over bytes, without HTTP: what the
/// providers do between the unified types and each upstream's JSON and SSE, for tools and
/// benchmarks that measure or replay them.
pub mod wire {
    use bytes::Bytes;
    use futures::Stream;

    use crate::error::Result;
    use crate::factory::ProviderConfig;
    use crate::http::parse_json;
    use crate::provider::ChunkStream;
    use crate::types::{CompletionRequest, CompletionResponse, ProviderKind};

    /// The exact body of an OpenAI `/v1/chat/completions` request.
    pub fn openai_request_body(
        config: &ProviderConfig,
        request: &CompletionRequest,
        stream: bool,
    ) -> Result<Vec<u8>> {
        super::openai::chat_body(config, request, stream)
    }

    /// The exact body of an Anthropic `/v1/messages` request.
    pub fn anthropic_request_body(
        config: &ProviderConfig,
        request: &CompletionRequest,
        stream: bool,
    ) -> Result<Vec<u8>> {
        super::anthropic::messages_body(config, request, stream)
    }

    /// An OpenAI `chat.completion` body as a unified response.
    pub fn openai_response(body: &[u8], requested_model: &str) -> Result<CompletionResponse> {
        super::openai::from_chat_response(parse_json(ProviderKind::OpenAi, body)?, requested_model)
    }

    /// An Anthropic Messages response body as a unified response.
    pub fn anthropic_response(body: &[u8], requested_model: &str) -> Result<CompletionResponse> {
        Ok(super::anthropic::from_message_response(
            parse_json(ProviderKind::Anthropic, body)?,
            requested_model,
        ))
    }

    /// An OpenAI SSE byte stream (`chat.completion.chunk` frames up to `[DONE]`) as unified
    /// chunks.
    pub fn openai_stream<S>(bytes: S) -> ChunkStream
    where
        S: Stream<Item = Result<Bytes>> + Send + 'static,
    {
        super::openai::stream::decode_stream(bytes)
    }

    /// An Anthropic SSE byte stream (up to `message_stop`) as unified chunks.
    pub fn anthropic_stream<S>(bytes: S) -> ChunkStream
    where
        S: Stream<Item = Result<Bytes>> + Send + 'static,
    {
        super::anthropic::stream::decode_stream(bytes)
    }
}

/// The provider info of a configuration, with its price from the configured table.
pub(crate) fn info_for(config: &ProviderConfig, capabilities: Capabilities) -> ProviderInfo {
    let price = config.prices.price(config.provider, &config.model);
    ProviderInfo {
        provider: config.provider,
        model: config.model.clone(),
        embedding_model: config.embedding_model.clone(),
        context_window: price.and_then(|p| p.context_window),
        capabilities,
        price,
    }
}

/// A response id for upstreams that give none.
pub(crate) fn generated_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 24);
    id.push_str(prefix);
    id.extend(std::iter::repeat_with(fastrand::alphanumeric).take(24));
    id
}
