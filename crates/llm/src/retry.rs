//! Retries with exponential backoff and full jitter, `Retry-After`, and a per-attempt timeout.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use crate::error::{LlmError, Result};
use crate::provider::{ChunkStream, LlmProvider};
use crate::types::{
    CompletionRequest, CompletionResponse, EmbeddingRequest, EmbeddingResponse, ProviderInfo,
    ProviderKind,
};

/// How often and how patiently a provider is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (`LLM_MAX_RETRIES`).
    pub max_retries: u32,
    /// The limit of each attempt (`LLM_TIMEOUT`). For a stream it covers everything up to
    /// the first chunk, and then each wait between chunks.
    pub timeout: Duration,
    /// The backoff before the first retry; it doubles with every retry.
    pub base_delay: Duration,
    /// The longest backoff between two attempts.
    pub max_delay: Duration,
    /// The longest `Retry-After` honoured. An upstream asking for longer is not retried, so
    /// a fallback provider can answer instead of the client waiting.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            timeout: Duration::from_secs(30),
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// No retries, with this per-attempt timeout.
    pub fn none(timeout: Duration) -> Self {
        Self {
            max_retries: 0,
            timeout,
            ..Self::default()
        }
    }

    /// How long to wait before retry number `retry` (0-based) after `error`, or `None` when
    /// the error must not be retried.
    pub fn delay_before_retry(&self, retry: u32, error: &LlmError) -> Option<Duration> {
        if retry >= self.max_retries || !error.is_retryable() {
            return None;
        }
        let ceiling = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(retry))
            .min(self.max_delay);
        let jittered = ceiling.mul_f64(fastrand::f64());
        match error.retry_after() {
            Some(wait) if wait > self.max_retry_after => None,
            Some(wait) => Some(wait.max(jittered)),
            None => Some(jittered),
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries are used up. Each
    /// attempt is limited by [`RetryPolicy::timeout`].
    pub async fn run<T, F, Fut>(&self, provider: ProviderKind, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut retry = 0;
        loop {
            let outcome = match tokio::time::timeout(self.timeout, attempt()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(LlmError::Timeout {
                    provider,
                    after: self.timeout,
                }),
            };
            let error = match outcome {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            let Some(delay) = self.delay_before_retry(retry, &error) else {
                return Err(error);
            };
            retry += 1;
            tracing::warn!(
                %provider,
                error.code = error.code(),
                error.message = %error,
                retry,
                delay_ms = delay.as_millis() as u64,
                "upstream attempt failed, retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

/// A provider wrapped in a [`RetryPolicy`].
#[derive(Debug)]
pub struct Retrying<P> {
    inner: P,
    policy: RetryPolicy,
}

impl<P: LlmProvider> Retrying<P> {
    /// Wraps `inner`.
    pub fn new(inner: P, policy: RetryPolicy) -> Self {
        Self { inner, policy }
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &P {
        &self.inner
    }
}

#[async_trait]
impl<P: LlmProvider> LlmProvider for Retrying<P> {
    fn info(&self) -> ProviderInfo {
        self.inner.info()
    }

    async fn complete(&self, request: &CompletionRequest) -> Result<CompletionResponse> {
        let provider = self.inner.info().provider;
        self.policy
            .run(provider, || self.inner.complete(request))
            .await
    }

    /// Retries only until the first chunk arrives: once a chunk has been yielded, a retry
    /// would repeat text the caller has already seen.
    async fn stream(&self, request: &CompletionRequest) -> Result<ChunkStream> {
        let provider = self.inner.info().provider;
        let started = self
            .policy
            .run(provider, || async {
                let mut stream = self.inner.stream(request).await?;
                match stream.next().await {
                    Some(Ok(first)) => Ok((Some(first), stream)),
                    Some(Err(error)) => Err(error),
                    None => Ok((None, stream)),
                }
            })
            .await?;
        let (first, rest) = started;
        let head = futures::stream::iter(first.map(Ok));
        Ok(with_idle_timeout(
            Box::pin(head.chain(rest)),
            provider,
            self.policy.timeout,
        ))
    }

    async fn embed(&self, request: &EmbeddingRequest) -> Result<EmbeddingResponse> {
        let provider = self.inner.info().provider;
        self.policy
            .run(provider, || self.inner.embed(request))
            .await
    }

    async fn list_models(&self) -> Result<Vec<String>> {
        let provider = self.inner.info().provider;
        self.policy.run(provider, || self.inner.list_models()).await
    }
}

/// Ends `stream` with [`LlmError::Timeout`] when no chunk arrives for `idle`.
pub fn with_idle_timeout(
    stream: ChunkStream,
    provider: ProviderKind,
    idle: Duration,
) -> ChunkStream {
    Box::pin(futures::stream::unfold(
        Some(stream),
        move |state| async move {
            let mut stream = state?;
            match tokio::time::timeout(idle, stream.next()).await {
                Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(stream))),
                Ok(Some(Err(error))) => Some((Err(error), None)),
                Ok(None) => None,
                Err(_) => Some((
                    Err(LlmError::Timeout {
                        provider,
                        after: idle,
                    }),
                    None,
                )),
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(status: u16, retry_after: Option<Duration>) -> LlmError {
        LlmError::Upstream {
            provider: ProviderKind::OpenAi,
            status,
            code: None,
            message: "down".into(),
            retry_after,
        }
    }

    #[test]
    fn backoff_is_bounded_by_the_exponential_ceiling() {
        let policy = RetryPolicy {
            max_retries: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        for retry in 0..6 {
            let ceiling = Duration::from_millis(100 * 2u64.pow(retry)).min(Duration::from_secs(1));
            for _ in 0..50 {
                let delay = policy
                    .delay_before_retry(retry, &upstream(503, None))
                    .unwrap();
                assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            }
        }
    }

    #[test]
    fn retry_after_is_a_floor_up_to_the_cap() {
        let policy = RetryPolicy::default();
        let wait = Duration::from_secs(2);
        let delay = policy
            .delay_before_retry(0, &upstream(503, Some(wait)))
            .unwrap();
        assert!(delay >= wait);
        let too_long = policy.max_retry_after + Duration::from_secs(1);
        assert_eq!(
            policy.delay_before_retry(0, &upstream(503, Some(too_long))),
            None
        );
    }

    #[test]
    fn no_retry_past_the_limit_or_for_invalid_requests() {
        let policy = RetryPolicy {
            max_retries: 2,
            ..RetryPolicy::default()
        };
        assert!(policy.delay_before_retry(1, &upstream(500, None)).is_some());
        assert!(policy.delay_before_retry(2, &upstream(500, None)).is_none());
        let invalid = LlmError::InvalidRequest {
            provider: ProviderKind::OpenAi,
            status: Some(400),
            code: None,
            message: "bad".into(),
        };
        assert!(policy.delay_before_retry(0, &invalid).is_none());
    }
}
