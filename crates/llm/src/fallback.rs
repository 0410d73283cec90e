//! An ordered chain of providers: the next one is tried when another could fix the failure.

use async_trait::async_trait;
use futures::StreamExt;

use crate::error::{LlmError, Result};
use crate::provider::{ChunkStream, LlmProvider};
use crate::types::{
    CompletionRequest, CompletionResponse, EmbeddingRequest, EmbeddingResponse, ProviderInfo,
    ProviderKind,
};

/// One provider of a chain and its priority (lower goes first).
#[derive(Debug)]
pub struct FallbackEntry {
    /// Lower priorities are tried first; equal priorities keep their given order.
    pub priority: u32,
    /// The provider.
    pub provider: Box<dyn LlmProvider>,
}

/// A provider that failed before another one served the request.
#[derive(Debug, Clone)]
pub struct FailedAttempt {
    /// The provider.
    pub provider: ProviderKind,
    /// Its configured model.
    pub model: String,
    /// What went wrong.
    pub error: LlmError,
}

/// A result and how the chain got it.
#[derive(Debug)]
pub struct Served<T> {
    /// What the serving provider returned.
    pub value: T,
    /// The provider that served.
    pub provider: ProviderKind,
    /// Its configured model.
    pub model: String,
    /// Providers tried before it, in order.
    pub failed: Vec<FailedAttempt>,
}

/// Every provider of a chain failed (or one failed in a way no other could fix).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", describe(.attempts))]
pub struct FallbackExhausted {
    /// Each attempt, in order; the last one's error is the one to report.
    pub attempts: Vec<FailedAttempt>,
}

fn describe(attempts: &[FailedAttempt]) -> String {
    attempts
        .iter()
        .map(|a| format!("{}/{}: {}", a.provider, a.model, a.error))
        .collect::<Vec<_>>()
        .join("; then ")
}

impl FallbackExhausted {
    /// The error of the last provider tried.
    pub fn last_error(&self) -> Option<&LlmError> {
        self.attempts.last().map(|a| &a.error)
    }

    /// The error to report: the last provider's.
    pub fn into_last_error(self) -> Option<LlmError> {
        self.attempts.into_iter().last().map(|a| a.error)
    }
}

/// Providers ordered by priority. A request goes to the first; on an error for which
/// [`LlmError::should_fallback`] holds, the next is tried, and so on. An invalid request is
/// never sent on. A stream falls back only before its first chunk.
#[derive(Debug)]
pub struct FallbackChain {
    entries: Vec<FallbackEntry>,
}

impl FallbackChain {
    /// A chain of `entries`, sorted by priority (stable for equal priorities).
    pub fn new(mut entries: Vec<FallbackEntry>) -> Self {
        entries.sort_by_key(|e| e.priority);
        Self { entries }
    }

    /// The providers in the order they are tried.
    pub fn entries(&self) -> &[FallbackEntry] {
        &self.entries
    }

    /// A copy of the request for entry `index`, when it needs one: the caller's model
    /// choice applies to the first entry only; the others use their own configured models.
    /// Boxed: a call's future holds it while the provider works (a `Cow` would take the
    /// whole request's size there even when borrowing).
    fn own_request(index: usize, request: &CompletionRequest) -> Option<Box<CompletionRequest>> {
        if index == 0 || request.model.is_none() {
            None
        } else {
            let mut own = Box::new(request.clone());
            own.model = None;
            Some(own)
        }
    }

    async fn run<'a, T, F>(&'a self, mut call: F) -> Result<Served<T>, FallbackExhausted>
    where
        F: FnMut(usize, &'a dyn LlmProvider) -> futures::future::BoxFuture<'a, Result<T>>,
    {
        let mut failed = Vec::new();
        for (index, entry) in self.entries.iter().enumerate() {
            let info = entry.provider.info();
            match call(index, entry.provider.as_ref()).await {
                Ok(value) => {
                    return Ok(Served {
                        value,
                        provider: info.provider,
                        model: info.model,
                        failed,
                    });
                }
                Err(error) => {
                    let go_on = error.should_fallback() && index + 1 < self.entries.len();
                    if go_on {
                        tracing::warn!(
                            provider = %info.provider,
                            model = %info.model,
                            error.code = error.code(),
                            error.message = %error,
                            "provider failed, falling back to the next"
                        );
                    }
                    failed.push(FailedAttempt {
                        provider: info.provider,
                        model: info.model,
                        error,
                    });
                    if !go_on {
                        break;
                    }
                }
            }
        }
        Err(FallbackExhausted { attempts: failed })
    }

    /// A completion, with which provider served and which failed before.
    pub async fn complete_served(
        &self,
        request: &CompletionRequest,
    ) -> Result<Served<CompletionResponse>, FallbackExhausted> {
        self.run(|index, provider| {
            Box::pin(async move {
                let own = Self::own_request(index, request);
                let request = own.as_deref().unwrap_or(request);
                provider.complete(request).await
            })
        })
        .await
    }

    /// A stream, falling back only until a provider yields its first chunk.
    pub async fn stream_served(
        &self,
        request: &CompletionRequest,
    ) -> Result<Served<ChunkStream>, FallbackExhausted> {
        self.run(|index, provider| {
            Box::pin(async move {
                let own = Self::own_request(index, request);
                let request = own.as_deref().unwrap_or(request);
                let mut stream = provider.stream(request).await?;
                let first = match stream.next().await {
                    Some(Ok(chunk)) => Some(chunk),
                    Some(Err(error)) => return Err(error),
                    None => None,
                };
                let head = futures::stream::iter(first.map(Ok));
                Ok(Box::pin(head.chain(stream)) as ChunkStream)
            })
        })
        .await
    }

    /// Embeddings, with which provider served and which failed before.
    pub async fn embed_served(
        &self,
        request: &EmbeddingRequest,
    ) -> Result<Served<EmbeddingResponse>, FallbackExhausted> {
        self.run(|index, provider| {
            Box::pin(async move {
                if index == 0 || request.model.is_none() {
                    provider.embed(request).await
                } else {
                    let mut own = request.clone();
                    own.model = None;
                    provider.embed(&own).await
                }
            })
        })
        .await
    }
}

fn last_error(exhausted: FallbackExhausted) -> LlmError {
    exhausted
        .into_last_error()
        .unwrap_or(LlmError::Configuration {
            provider: ProviderKind::OpenAi,
            message: "the fallback chain has no providers".into(),
        })
}

#[async_trait]
impl LlmProvider for FallbackChain {
    /// The first provider's info.
    fn info(&self) -> ProviderInfo {
        match self.entries.first() {
            Some(entry) => entry.provider.info(),
            None => ProviderInfo {
                provider: ProviderKind::OpenAi,
                model: String::new(),
                embedding_model: None,
                context_window: None,
                capabilities: crate::types::Capabilities {
                    chat: false,
                    streaming: false,
                    tools: false,
                    embeddings: false,
                },
                price: None,
            },
        }
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<CompletionResponse> {
        self.complete_served(request)
            .await
            .map(|s| s.value)
            .map_err(last_error)
    }

    async fn stream(&self, request: &CompletionRequest) -> Result<ChunkStream> {
        self.stream_served(request)
            .await
            .map(|s| s.value)
            .map_err(last_error)
    }

    async fn embed(&self, request: &EmbeddingRequest) -> Result<EmbeddingResponse> {
        self.embed_served(request)
            .await
            .map(|s| s.value)
            .map_err(last_error)
    }
}
