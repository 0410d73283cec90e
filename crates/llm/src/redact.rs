//! Keeps a provider's API key out of its errors.
//!
//! Upstreams sometimes echo the key they were sent in an error message ("Incorrect API key
//! provided: sk-…"), and error messages end up in logs, metrics and responses. [`Redacted`]
//! replaces the key with `[redacted]` in every error its provider returns, streamed ones
//! included, before anyone else sees the error. [`crate::create_provider`] wraps every provider
//! it builds in it.

use async_trait::async_trait;
use futures::StreamExt;
use secrecy::{ExposeSecret, SecretString};

use crate::error::{LlmError, Result};
use crate::provider::{ChunkStream, LlmProvider};
use crate::types::{
    CompletionRequest, CompletionResponse, EmbeddingRequest, EmbeddingResponse, ProviderInfo,
};

/// What a redacted key is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Keys shorter than this are not redacted: replacing every `a` of a message would only garble
/// it, and no real key is that short.
const MIN_SECRET_LEN: usize = 8;

impl LlmError {
    /// This error with every occurrence of `secret` in its message replaced by `[redacted]`.
    pub fn redact(mut self, secret: &str) -> Self {
        if secret.len() < MIN_SECRET_LEN {
            return self;
        }
        let message = match &mut self {
            Self::Authentication { message, .. }
            | Self::InvalidRequest { message, .. }
            | Self::ContextLengthExceeded { message, .. }
            | Self::ModelNotFound { message, .. }
            | Self::RateLimited { message, .. }
            | Self::Connection { message, .. }
            | Self::Upstream { message, .. }
            | Self::MalformedResponse { message, .. }
            | Self::Configuration { message, .. } => message,
            Self::Timeout { .. } | Self::Unsupported { .. } => return self,
        };
        if message.contains(secret) {
            *message = message.replace(secret, REDACTED);
        }
        self
    }
}

/// A provider whose errors never contain its API key.
#[derive(Debug)]
pub struct Redacted<P> {
    inner: P,
    secret: Option<SecretString>,
}

impl<P: LlmProvider> Redacted<P> {
    /// Wraps `inner`, which authenticates with `secret` (none: errors pass unchanged).
    pub fn new(inner: P, secret: Option<SecretString>) -> Self {
        let secret = secret.filter(|s| s.expose_secret().len() >= MIN_SECRET_LEN);
        Self { inner, secret }
    }

    fn clean(&self, error: LlmError) -> LlmError {
        match &self.secret {
            Some(secret) => error.redact(secret.expose_secret()),
            None => error,
        }
    }
}

#[async_trait]
impl<P: LlmProvider> LlmProvider for Redacted<P> {
    fn info(&self) -> ProviderInfo {
        self.inner.info()
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<CompletionResponse> {
        self.inner
            .complete(request)
            .await
            .map_err(|e| self.clean(e))
    }

    async fn stream(&self, request: &CompletionRequest) -> Result<ChunkStream> {
        let stream = self
            .inner
            .stream(request)
            .await
            .map_err(|e| self.clean(e))?;
        let Some(secret) = self.secret.clone() else {
            return Ok(stream);
        };
        Ok(Box::pin(stream.map(move |item| {
            item.map_err(|e| e.redact(secret.expose_secret()))
        })))
    }

    async fn embed(&self, request: &EmbeddingRequest) -> Result<EmbeddingResponse> {
        self.inner.embed(request).await.map_err(|e| self.clean(e))
    }

    async fn list_models(&self) -> Result<Vec<String>> {
        self.inner.list_models().await.map_err(|e| self.clean(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ProviderKind;

    #[test]
    fn the_key_is_replaced_everywhere_in_the_message() {
        let error = LlmError::Authentication {
            provider: ProviderKind::OpenAi,
            status: 401,
            message: "bad key sk-secret-123456, really sk-secret-123456".into(),
        }
        .redact("sk-secret-123456");
        assert_eq!(
            error.to_string(),
            "openai: authentication failed (401): bad key [redacted], really [redacted]"
        );
    }

    #[test]
    fn short_secrets_are_left_alone() {
        let error = LlmError::Upstream {
            provider: ProviderKind::OpenAi,
            status: 500,
            code: None,
            message: "abc".into(),
            retry_after: None,
        }
        .redact("a");
        assert!(error.to_string().contains("abc"));
    }
}
