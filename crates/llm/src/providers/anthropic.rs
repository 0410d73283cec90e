//! Placeholder adapter; replaced by the full implementation.

use async_trait::async_trait;

use crate::error::{LlmError, Result};
use crate::factory::ProviderConfig;
use crate::provider::{ChunkStream, LlmProvider};
use crate::types::{
    Capabilities, CompletionRequest, CompletionResponse, EmbeddingRequest, EmbeddingResponse,
    ProviderInfo,
};

/// The anthropic adapter.
#[derive(Debug)]
pub struct AnthropicProvider {
    config: ProviderConfig,
}

impl AnthropicProvider {
    /// An adapter for this configuration.
    pub fn new(config: ProviderConfig) -> Result<Self> {
        Ok(Self { config })
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

    async fn complete(&self, _request: &CompletionRequest) -> Result<CompletionResponse> {
        Err(LlmError::Unsupported {
            provider: self.config.provider,
            feature: "chat",
        })
    }

    async fn stream(&self, _request: &CompletionRequest) -> Result<ChunkStream> {
        Err(LlmError::Unsupported {
            provider: self.config.provider,
            feature: "streaming",
        })
    }

    async fn embed(&self, _request: &EmbeddingRequest) -> Result<EmbeddingResponse> {
        Err(LlmError::Unsupported {
            provider: self.config.provider,
            feature: "embeddings",
        })
    }
}
