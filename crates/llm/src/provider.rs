//! The provider interface every backend implements.

use std::fmt::Debug;
use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

use crate::error::Result;
use crate::types::{
    CompletionRequest, CompletionResponse, EmbeddingRequest, EmbeddingResponse, ProviderInfo,
    StreamChunk,
};

/// A stream of completion chunks. It ends after a [`StreamChunk::Finish`] (and, when the
/// upstream reports it, a [`StreamChunk::Usage`]), or with an error.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<StreamChunk>> + Send>>;

/// One interface over every provider: chat, streaming, embeddings and provider info.
#[async_trait]
pub trait LlmProvider: Send + Sync + Debug {
    /// Who this provider is, which model it uses, what it can do and what it costs.
    fn info(&self) -> ProviderInfo;

    /// A complete chat completion.
    async fn complete(&self, request: &CompletionRequest) -> Result<CompletionResponse>;

    /// A streamed chat completion. Concatenating the deltas gives exactly what
    /// [`LlmProvider::complete`] returns for the same answer.
    async fn stream(&self, request: &CompletionRequest) -> Result<ChunkStream>;

    /// Embedding vectors for each input text.
    async fn embed(&self, request: &EmbeddingRequest) -> Result<EmbeddingResponse>;

    /// The models this provider can serve. Providers that can ask their server (Ollama's
    /// `/api/tags`) do; others answer with the configured model.
    async fn list_models(&self) -> Result<Vec<String>> {
        Ok(vec![self.info().model])
    }
}

#[async_trait]
impl<P: LlmProvider + ?Sized> LlmProvider for Box<P> {
    fn info(&self) -> ProviderInfo {
        (**self).info()
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<CompletionResponse> {
        (**self).complete(request).await
    }

    async fn stream(&self, request: &CompletionRequest) -> Result<ChunkStream> {
        (**self).stream(request).await
    }

    async fn embed(&self, request: &EmbeddingRequest) -> Result<EmbeddingResponse> {
        (**self).embed(request).await
    }

    async fn list_models(&self) -> Result<Vec<String>> {
        (**self).list_models().await
    }
}

#[async_trait]
impl<P: LlmProvider + ?Sized> LlmProvider for std::sync::Arc<P> {
    fn info(&self) -> ProviderInfo {
        (**self).info()
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<CompletionResponse> {
        (**self).complete(request).await
    }

    async fn stream(&self, request: &CompletionRequest) -> Result<ChunkStream> {
        (**self).stream(request).await
    }

    async fn embed(&self, request: &EmbeddingRequest) -> Result<EmbeddingResponse> {
        (**self).embed(request).await
    }

    async fn list_models(&self) -> Result<Vec<String>> {
        (**self).list_models().await
    }
}
