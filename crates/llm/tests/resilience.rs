//! Retries, timeouts and fallback, over HTTP against the fake upstreams.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use meta_chat_llm::{
    CompletionRequest, FallbackChain, FallbackEntry, LlmError, LlmProvider, Message,
    ProviderConfig, ProviderKind, RetryPolicy, StreamAccumulator, create_provider,
};
use meta_chat_testkit::{FakeServer, Reply};

fn policy(max_retries: u32, timeout: Duration) -> RetryPolicy {
    RetryPolicy {
        max_retries,
        timeout,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        max_retry_after: Duration::from_secs(5),
    }
}

fn openai(fake: &FakeServer, retry: RetryPolicy) -> Box<dyn LlmProvider> {
    create_provider(
        ProviderConfig::new(ProviderKind::OpenAi, "gpt-4o-mini")
            .with_api_key("sk-test")
            .with_base_url(fake.url())
            .with_retry(retry),
    )
    .unwrap()
}

fn ollama(fake: &FakeServer, retry: RetryPolicy) -> Box<dyn LlmProvider> {
    create_provider(
        ProviderConfig::new(ProviderKind::Ollama, "llama3.1:8b")
            .with_base_url(fake.url())
            .with_retry(retry),
    )
    .unwrap()
}

fn hello() -> CompletionRequest {
    CompletionRequest::new(vec![Message::user("Hello")])
}

async fn collect(provider: &dyn LlmProvider) -> (StreamAccumulator, Option<LlmError>) {
    let mut stream = provider.stream(&hello()).await.unwrap();
    let mut acc = StreamAccumulator::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => acc.push(&chunk),
            Err(error) => return (acc, Some(error)),
        }
    }
    (acc, None)
}

#[tokio::test]
async fn succeeds_after_two_503s() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all([
        Reply::error(503, "overloaded"),
        Reply::error(503, "overloaded"),
        Reply::text("third time lucky"),
    ]);
    let provider = openai(&fake, policy(3, Duration::from_secs(5)));
    let response = provider.complete(&hello()).await.unwrap();
    assert_eq!(response.message.content, "third time lucky");
    assert_eq!(fake.requests_to("/v1/chat/completions").len(), 3);
}

#[tokio::test]
async fn stops_after_max_retries() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all((0..5).map(|_| Reply::error(500, "down")));
    let provider = openai(&fake, policy(2, Duration::from_secs(5)));
    let error = provider.complete(&hello()).await.unwrap_err();
    assert_eq!(error.code(), "upstream_error");
    assert_eq!(error.status(), Some(500));
    assert_eq!(fake.requests_to("/v1/chat/completions").len(), 3);
}

#[tokio::test]
async fn waits_at_least_retry_after() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all([Reply::rate_limited(1), Reply::text("ok")]);
    let provider = openai(&fake, policy(3, Duration::from_secs(5)));
    let started = Instant::now();
    let response = provider.complete(&hello()).await.unwrap();
    assert_eq!(response.message.content, "ok");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fake.requests_to("/v1/chat/completions").len(), 2);
}

#[tokio::test]
async fn retry_after_beyond_the_cap_is_not_waited_for() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all([Reply::rate_limited(3600), Reply::text("too late")]);
    let provider = openai(&fake, policy(3, Duration::from_secs(5)));
    let error = provider.complete(&hello()).await.unwrap_err();
    assert_eq!(error.code(), "rate_limited");
    assert_eq!(error.retry_after(), Some(Duration::from_secs(3600)));
    assert_eq!(fake.requests_to("/v1/chat/completions").len(), 1);
}

#[tokio::test]
async fn never_retries_a_400() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all([Reply::error(400, "bad temperature"), Reply::text("no")]);
    let provider = openai(&fake, policy(3, Duration::from_secs(5)));
    let error = provider.complete(&hello()).await.unwrap_err();
    assert_eq!(error.code(), "invalid_request");
    assert!(!error.is_retryable());
    assert_eq!(fake.requests_to("/v1/chat/completions").len(), 1);
}

#[tokio::test]
async fn timeout_fires_on_a_hung_upstream_and_is_retried() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all([Reply::hang(), Reply::hang()]);
    let provider = openai(&fake, policy(1, Duration::from_millis(300)));
    let error = provider.complete(&hello()).await.unwrap_err();
    assert!(matches!(error, LlmError::Timeout { .. }), "{error:?}");
    assert!(error.is_retryable());
    assert_eq!(fake.requests_to("/v1/chat/completions").len(), 2);
}

#[tokio::test]
async fn a_stream_is_retried_before_its_first_chunk() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all([
        Reply::error(503, "busy"),
        Reply::text("streamed fine").in_chunks(4),
    ]);
    let provider = openai(&fake, policy(2, Duration::from_secs(5)));
    let (acc, error) = collect(provider.as_ref()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(acc.text(), "streamed fine");
    assert_eq!(fake.requests_to("/v1/chat/completions").len(), 2);
}

#[tokio::test]
async fn a_stream_is_not_retried_after_its_first_chunk() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all([
        Reply::text("this answer is cut short")
            .in_chunks(6)
            .with_chunk_delay(Duration::from_millis(20))
            .drop_after(3),
        Reply::text("must not be requested"),
    ]);
    let provider = openai(&fake, policy(3, Duration::from_secs(5)));
    let (acc, error) = collect(provider.as_ref()).await;
    assert!(error.is_some(), "the dropped stream must end with an error");
    assert!(acc.chunk_count() >= 1);
    assert!("this answer is cut short".starts_with(acc.text()));
    assert_eq!(fake.requests_to("/v1/chat/completions").len(), 1);
}

#[tokio::test]
async fn a_hung_stream_times_out() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::hang());
    let provider = openai(&fake, policy(0, Duration::from_millis(300)));
    let error = match provider.stream(&hello()).await {
        Ok(_) => panic!("a hung upstream must not produce a stream"),
        Err(error) => error,
    };
    assert!(matches!(error, LlmError::Timeout { .. }), "{error:?}");
}

#[tokio::test]
async fn fallback_serves_from_the_secondary_when_the_primary_fails() {
    let primary = FakeServer::start().await.unwrap();
    let secondary = FakeServer::start().await.unwrap();
    primary.push(Reply::error(500, "primary down"));
    secondary.push(Reply::text("from ollama"));
    let chain = FallbackChain::new(vec![
        FallbackEntry {
            priority: 2,
            provider: ollama(&secondary, policy(0, Duration::from_secs(5))),
        },
        FallbackEntry {
            priority: 1,
            provider: openai(&primary, policy(0, Duration::from_secs(5))),
        },
    ]);
    let served = chain
        .complete_served(&hello().with_model("gpt-4o"))
        .await
        .unwrap();
    assert_eq!(served.value.message.content, "from ollama");
    assert_eq!(served.provider, ProviderKind::Ollama);
    assert_eq!(served.value.provider, ProviderKind::Ollama);
    assert_eq!(served.failed.len(), 1);
    assert_eq!(served.failed[0].provider, ProviderKind::OpenAi);
    assert_eq!(served.failed[0].error.code(), "upstream_error");
    // The caller's model applies to the primary only; the secondary uses its own.
    assert_eq!(primary.requests()[0].body["model"], "gpt-4o");
    assert_eq!(
        secondary.requests_to("/api/chat")[0].body["model"],
        "llama3.1:8b"
    );
}

#[tokio::test]
async fn fallback_never_forwards_an_invalid_request() {
    let primary = FakeServer::start().await.unwrap();
    let secondary = FakeServer::start().await.unwrap();
    primary.push(Reply::error(400, "messages: invalid"));
    let chain = FallbackChain::new(vec![
        FallbackEntry {
            priority: 1,
            provider: openai(&primary, policy(0, Duration::from_secs(5))),
        },
        FallbackEntry {
            priority: 2,
            provider: ollama(&secondary, policy(0, Duration::from_secs(5))),
        },
    ]);
    let exhausted = chain.complete_served(&hello()).await.unwrap_err();
    assert_eq!(exhausted.attempts.len(), 1);
    assert_eq!(exhausted.last_error().unwrap().code(), "invalid_request");
    assert!(secondary.requests().is_empty());
}

#[tokio::test]
async fn fallback_reports_every_failure_when_all_fail() {
    let primary = FakeServer::start().await.unwrap();
    let secondary = FakeServer::start().await.unwrap();
    primary.push(Reply::error(503, "down"));
    secondary.push(Reply::error(500, "also down"));
    let chain = FallbackChain::new(vec![
        FallbackEntry {
            priority: 1,
            provider: openai(&primary, policy(0, Duration::from_secs(5))),
        },
        FallbackEntry {
            priority: 2,
            provider: ollama(&secondary, policy(0, Duration::from_secs(5))),
        },
    ]);
    let exhausted = chain.complete_served(&hello()).await.unwrap_err();
    let providers: Vec<_> = exhausted.attempts.iter().map(|a| a.provider).collect();
    assert_eq!(providers, [ProviderKind::OpenAi, ProviderKind::Ollama]);
    primary.push(Reply::error(503, "down"));
    secondary.push(Reply::error(500, "also down"));
    let error = chain.complete(&hello()).await.unwrap_err();
    assert_eq!(error.provider(), ProviderKind::Ollama);
}

#[tokio::test]
async fn a_stream_falls_back_before_its_first_chunk() {
    let primary = FakeServer::start().await.unwrap();
    let secondary = FakeServer::start().await.unwrap();
    primary.push(Reply::error(503, "down"));
    secondary.push(Reply::text("streamed by the secondary").in_chunks(3));
    let chain = FallbackChain::new(vec![
        FallbackEntry {
            priority: 1,
            provider: openai(&primary, policy(0, Duration::from_secs(5))),
        },
        FallbackEntry {
            priority: 2,
            provider: ollama(&secondary, policy(0, Duration::from_secs(5))),
        },
    ]);
    let served = chain.stream_served(&hello()).await.unwrap();
    assert_eq!(served.provider, ProviderKind::Ollama);
    let mut acc = StreamAccumulator::new();
    let mut stream = served.value;
    while let Some(chunk) = stream.next().await {
        acc.push(&chunk.unwrap());
    }
    assert_eq!(acc.text(), "streamed by the secondary");
}
