//! The Anthropic adapter over HTTP against the fake Anthropic server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures::StreamExt;
use meta_chat_llm::providers::AnthropicProvider;
use meta_chat_llm::{
    CompletionRequest, Dialect, EmbeddingRequest, Extra, FinishReason, LlmError, LlmProvider,
    Message, ProviderConfig, ProviderKind, RetryPolicy, StreamAccumulator, Tool, ToolCall,
    ToolChoice, Usage, create_provider,
};
use meta_chat_testkit::{FakeServer, FakeToolCall, Reply};
use serde_json::{Map, Value, json};

const MESSAGES: &str = "/v1/messages";
const MODEL: &str = "claude-3-5-sonnet-20241022";

fn config(fake: &FakeServer) -> ProviderConfig {
    ProviderConfig::new(ProviderKind::Anthropic, MODEL)
        .with_api_key("sk-ant-test")
        .with_base_url(fake.url())
        .with_retry(RetryPolicy::none(Duration::from_secs(5)))
}

fn provider(fake: &FakeServer) -> Box<dyn LlmProvider> {
    create_provider(config(fake)).unwrap()
}

fn hello() -> CompletionRequest {
    CompletionRequest::new(vec![Message::user("Hello")])
}

async fn collect(
    provider: &dyn LlmProvider,
    request: &CompletionRequest,
) -> (StreamAccumulator, Option<LlmError>) {
    let mut stream = provider.stream(request).await.unwrap();
    let mut acc = StreamAccumulator::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => acc.push(&chunk),
            Err(error) => return (acc, Some(error)),
        }
    }
    (acc, None)
}

fn weather_tool() -> Tool {
    Tool::new(
        "get_weather",
        "Current weather for a city",
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    )
}

#[tokio::test]
async fn text_completion_sends_the_exact_wire_request() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::text("4").with_usage(10, 2));
    let provider = AnthropicProvider::new(config(&fake)).unwrap();
    let request = CompletionRequest {
        top_p: Some(0.5),
        stop: vec!["END".into()],
        ..CompletionRequest::new(vec![Message::user("What is 2+2?")])
            .with_temperature(0.25)
            .with_max_tokens(64)
    };
    let response = provider.complete(&request).await.unwrap();
    assert_eq!(response.message.content, "4");
    assert!(response.message.tool_calls.is_empty());
    assert_eq!(response.finish_reason, FinishReason::Stop);
    assert_eq!(
        response.usage,
        Usage {
            input_tokens: 10,
            output_tokens: 2
        }
    );
    assert_eq!(response.model, MODEL);
    assert_eq!(response.provider, ProviderKind::Anthropic);
    assert!(response.id.starts_with("msg_"), "{}", response.id);

    let sent = fake.requests_to(MESSAGES);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].method, "POST");
    assert_eq!(sent[0].header("x-api-key"), Some("sk-ant-test"));
    assert_eq!(sent[0].header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(sent[0].header("content-type"), Some("application/json"));
    assert_eq!(sent[0].header("authorization"), None);
    assert_eq!(
        sent[0].body,
        json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is 2+2?"}],
            "max_tokens": 64,
            "temperature": 0.25,
            "top_p": 0.5,
            "stop_sequences": ["END"],
        })
    );
}

#[tokio::test]
async fn the_system_prompt_goes_to_the_top_level_system_field() {
    let fake = FakeServer::start().await.unwrap();
    let provider = provider(&fake);
    let request =
        CompletionRequest::new(vec![Message::system("You are terse."), Message::user("Hi")]);
    let response = provider.complete(&request).await.unwrap();
    assert_eq!(response.message.content, "You said: Hi");
    let body = &fake.requests_to(MESSAGES)[0].body;
    assert_eq!(body["system"], "You are terse.");
    assert_eq!(body["messages"], json!([{"role": "user", "content": "Hi"}]));

    let two = CompletionRequest::new(vec![
        Message::system("You are terse."),
        Message::user("Hi"),
        Message::system("Answer in French."),
    ]);
    provider.complete(&two).await.unwrap();
    let body = &fake.requests_to(MESSAGES)[1].body;
    assert_eq!(body["system"], "You are terse.\n\nAnswer in French.");
    assert_eq!(body["messages"], json!([{"role": "user", "content": "Hi"}]));

    provider.complete(&hello()).await.unwrap();
    assert!(fake.requests_to(MESSAGES)[2].body.get("system").is_none());
}

#[tokio::test]
async fn consecutive_messages_of_one_role_are_merged() {
    let fake = FakeServer::start().await.unwrap();
    let provider = provider(&fake);
    let request = CompletionRequest::new(vec![
        Message::user("First."),
        Message::user("Second."),
        Message::assistant("Noted."),
        Message::assistant("Anything else?"),
        Message::user("Third."),
    ]);
    let response = provider.complete(&request).await.unwrap();
    assert_eq!(response.message.content, "You said: Third.");
    assert_eq!(
        fake.requests_to(MESSAGES)[0].body["messages"],
        json!([
            {"role": "user", "content": [
                {"type": "text", "text": "First."},
                {"type": "text", "text": "Second."},
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Noted."},
                {"type": "text", "text": "Anything else?"},
            ]},
            {"role": "user", "content": "Third."},
        ])
    );
}

#[tokio::test]
async fn max_tokens_and_sampling_default_from_the_config() {
    let fake = FakeServer::start().await.unwrap();
    let mut config = config(&fake);
    config.defaults.max_tokens = 321;
    config.defaults.temperature = Some(1.8);
    config.defaults.top_p = Some(0.9);
    let provider = create_provider(config).unwrap();
    provider.complete(&hello()).await.unwrap();
    assert_eq!(
        fake.requests_to(MESSAGES)[0].body,
        json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 321,
            // Anthropic's range ends at 1.
            "temperature": 1.0,
            "top_p": 0.9,
        })
    );
}

#[tokio::test]
async fn a_stream_concatenates_to_the_complete_answer() {
    let fake = FakeServer::start().await.unwrap();
    let reply = Reply::text("The quick brown fox jumps over the lazy dog.")
        .with_usage(12, 9)
        .in_chunks(7);
    fake.push_all([reply.clone(), reply]);
    let provider = provider(&fake);
    let complete = provider.complete(&hello()).await.unwrap();
    let (acc, error) = collect(provider.as_ref(), &hello()).await;
    assert!(error.is_none(), "{error:?}");
    // Seven text deltas, the finish and the usage; the ping gives nothing.
    assert_eq!(acc.chunk_count(), 7 + 2);
    assert_eq!(
        acc.usage(),
        Some(Usage {
            input_tokens: 12,
            output_tokens: 9
        })
    );
    assert_eq!(acc.finish_reason(), Some(FinishReason::Stop));
    let streamed = acc.into_response(
        complete.id.clone(),
        complete.model.clone(),
        ProviderKind::Anthropic,
    );
    assert_eq!(streamed, complete);

    let sent = &fake.requests_to(MESSAGES)[1];
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.header("accept"), Some("text/event-stream"));
    assert!(fake.requests_to(MESSAGES)[0].body.get("stream").is_none());
}

#[tokio::test]
async fn finish_reasons_map_to_the_unified_ones() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all([
        Reply::text("cut").with_finish("length"),
        Reply::text("").with_finish("content_filter"),
        Reply::text("cut").with_finish("length"),
    ]);
    let provider = provider(&fake);
    assert_eq!(
        provider.complete(&hello()).await.unwrap().finish_reason,
        FinishReason::Length
    );
    assert_eq!(
        provider.complete(&hello()).await.unwrap().finish_reason,
        FinishReason::ContentFilter
    );
    let (acc, _) = collect(provider.as_ref(), &hello()).await;
    assert_eq!(acc.finish_reason(), Some(FinishReason::Length));
}

#[tokio::test]
async fn a_tool_call_round_trip() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all([
        Reply::text_and_tool_calls(
            "Let me look.",
            vec![FakeToolCall::new(
                "toolu_w1",
                "get_weather",
                json!({"city": "Paris"}),
            )],
        )
        .with_usage(40, 12),
        Reply::text("It is sunny in Paris.").with_usage(60, 7),
    ]);
    let provider = provider(&fake);
    let mut request = CompletionRequest {
        tool_choice: Some(ToolChoice::Required),
        ..CompletionRequest::new(vec![Message::user("Weather in Paris?")])
            .with_tools(vec![weather_tool()])
    };
    let first = provider.complete(&request).await.unwrap();
    assert_eq!(first.finish_reason, FinishReason::ToolCalls);
    assert_eq!(first.message.content, "Let me look.");
    let call = ToolCall {
        id: "toolu_w1".into(),
        name: "get_weather".into(),
        arguments: json!({"city": "Paris"}),
    };
    assert_eq!(first.message.tool_calls, vec![call]);

    let sent = fake.requests_to(MESSAGES);
    assert_eq!(
        sent[0].body["tools"],
        json!([{
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }])
    );
    assert_eq!(sent[0].body["tool_choice"], json!({"type": "any"}));

    request.messages.push(first.message.into());
    request
        .messages
        .push(Message::tool_result("toolu_w1", "{\"sky\":\"sunny\"}"));
    request.messages.push(Message::user("And tomorrow?"));
    let second = provider.complete(&request).await.unwrap();
    assert_eq!(second.message.content, "It is sunny in Paris.");
    assert_eq!(second.finish_reason, FinishReason::Stop);

    let sent = fake.requests_to(MESSAGES);
    assert_eq!(
        sent[1].body["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_w1", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_w1", "content": "{\"sky\":\"sunny\"}"},
                {"type": "text", "text": "And tomorrow?"},
            ]},
        ])
    );
}

#[tokio::test]
async fn a_streamed_tool_call_reassembles_to_the_same_call() {
    let fake = FakeServer::start().await.unwrap();
    let calls = vec![
        FakeToolCall::new(
            "toolu_a",
            "get_weather",
            json!({"city": "Paris", "unit": "celsius"}),
        ),
        FakeToolCall::new("toolu_b", "get_weather", json!({"city": "Oslo"})),
    ];
    let with_text = Reply::text_and_tool_calls("Checking.", calls.clone())
        .with_usage(30, 20)
        .in_chunks(5);
    let without_text = Reply::tool_calls(calls).with_usage(30, 20);
    fake.push_all([
        with_text.clone(),
        with_text,
        without_text.clone(),
        without_text,
    ]);
    let provider = provider(&fake);
    let request = CompletionRequest {
        tool_choice: Some(ToolChoice::Tool("get_weather".into())),
        ..CompletionRequest::new(vec![Message::user("Weather?")]).with_tools(vec![weather_tool()])
    };
    for _ in 0..2 {
        let complete = provider.complete(&request).await.unwrap();
        assert_eq!(complete.message.tool_calls.len(), 2);
        let (acc, error) = collect(provider.as_ref(), &request).await;
        assert!(error.is_none(), "{error:?}");
        let streamed = acc.into_response(
            complete.id.clone(),
            complete.model.clone(),
            ProviderKind::Anthropic,
        );
        assert_eq!(streamed, complete);
        assert_eq!(streamed.finish_reason, FinishReason::ToolCalls);
    }
    assert_eq!(
        fake.requests_to(MESSAGES)[1].body["tool_choice"],
        json!({"type": "tool", "name": "get_weather"})
    );
}

#[tokio::test]
async fn embeddings_are_unsupported() {
    let fake = FakeServer::start().await.unwrap();
    let provider = provider(&fake);
    let error = provider
        .embed(&EmbeddingRequest::new(vec!["x".into()]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            LlmError::Unsupported {
                feature: "embeddings",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(fake.requests().is_empty());
    let info = provider.info();
    assert!(!info.capabilities.embeddings);
    assert!(info.capabilities.chat && info.capabilities.streaming && info.capabilities.tools);
}

#[tokio::test]
async fn extra_fields_pass_through_only_from_anthropic_clients() {
    let fake = FakeServer::start().await.unwrap();
    let provider = provider(&fake);
    let mut fields = Map::new();
    fields.insert("top_k".into(), json!(5));
    fields.insert("model".into(), json!("other"));
    let mut request = CompletionRequest {
        extra: Extra::new(Dialect::Anthropic, fields.clone()),
        ..hello()
    };
    provider.complete(&request).await.unwrap();
    request.extra = Extra::new(Dialect::OpenAi, fields);
    provider.complete(&request).await.unwrap();
    let sent = fake.requests_to(MESSAGES);
    assert_eq!(sent[0].body["top_k"], 5);
    assert_eq!(sent[0].body["model"], MODEL);
    assert!(sent[1].body.get("top_k").is_none());
}

#[tokio::test]
async fn the_fake_enforces_the_real_api_rules() {
    let fake = FakeServer::start().await.unwrap();
    meta_chat_llm::install_crypto_provider();
    let client = reqwest::Client::new();
    let url = format!("{}{MESSAGES}", fake.url());
    let ok =
        json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
    let cases = [
        (
            None,
            Some("2023-06-01"),
            ok.clone(),
            401,
            "authentication_error",
        ),
        (Some("k"), None, ok.clone(), 400, "invalid_request_error"),
        (
            Some("k"),
            Some("2023-06-01"),
            json!({"model": MODEL, "messages": []}),
            400,
            "invalid_request_error",
        ),
        (
            Some("k"),
            Some("2023-06-01"),
            json!({"model": MODEL, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
            400,
            "invalid_request_error",
        ),
        (Some("k"), Some("2023-06-01"), ok, 200, ""),
    ];
    for (key, version, body, status, kind) in cases {
        let mut builder = client.post(&url).json(&body);
        if let Some(key) = key {
            builder = builder.header("x-api-key", key);
        }
        if let Some(version) = version {
            builder = builder.header("anthropic-version", version);
        }
        let answer = builder.send().await.unwrap();
        assert_eq!(answer.status(), status, "{body}");
        let answer: Value = answer.json().await.unwrap();
        if status == 200 {
            assert_eq!(answer["type"], "message");
        } else {
            assert_eq!(answer["type"], "error");
            assert_eq!(answer["error"]["type"], kind);
        }
    }
}

// ----- errors -----------------------------------------------------------------------------

async fn error_for(reply: Reply) -> LlmError {
    let fake = FakeServer::start().await.unwrap();
    fake.push(reply);
    provider(&fake).complete(&hello()).await.unwrap_err()
}

#[tokio::test]
async fn a_missing_api_key_fails_before_sending() {
    let fake = FakeServer::start().await.unwrap();
    for key in [None, Some(" ")] {
        let mut config = config(&fake);
        config.api_key = key.map(secrecy::SecretString::from);
        let provider = create_provider(config).unwrap();
        let error = provider.complete(&hello()).await.unwrap_err();
        assert!(matches!(error, LlmError::Configuration { .. }), "{error:?}");
        assert!(provider.stream(&hello()).await.is_err());
    }
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn a_401_is_an_authentication_error() {
    let error = error_for(Reply::error(401, "invalid x-api-key")).await;
    assert!(
        matches!(error, LlmError::Authentication { status: 401, .. }),
        "{error:?}"
    );
    assert!(!error.is_retryable());
    let error = error_for(Reply::error(403, "not allowed")).await;
    assert!(
        matches!(error, LlmError::Authentication { status: 403, .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_400_is_an_invalid_request_without_retry_or_fallback() {
    let error = error_for(Reply::error(400, "temperature: must be at most 1")).await;
    match &error {
        LlmError::InvalidRequest {
            status,
            code,
            message,
            ..
        } => {
            assert_eq!(*status, Some(400));
            assert_eq!(code.as_deref(), Some("invalid_request_error"));
            assert_eq!(message, "temperature: must be at most 1");
        }
        other => panic!("{other:?}"),
    }
    assert!(!error.is_retryable());
    assert!(!error.should_fallback());
}

#[tokio::test]
async fn a_prompt_too_long_is_context_length_exceeded() {
    let error = error_for(Reply::error(
        400,
        "prompt is too long: 213456 tokens > 200000 maximum",
    ))
    .await;
    assert!(
        matches!(error, LlmError::ContextLengthExceeded { .. }),
        "{error:?}"
    );
    assert!(error.should_fallback());
}

#[tokio::test]
async fn an_unknown_model_is_model_not_found() {
    let error = error_for(Reply::error(404, "model: claude-9")).await;
    assert!(matches!(error, LlmError::ModelNotFound { .. }), "{error:?}");
}

#[tokio::test]
async fn a_429_is_rate_limited_with_retry_after() {
    let error = error_for(Reply::rate_limited(7)).await;
    assert!(matches!(error, LlmError::RateLimited { .. }), "{error:?}");
    assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
    assert!(error.is_retryable());
}

#[tokio::test]
async fn a_5xx_is_an_upstream_error() {
    let error = error_for(Reply::error(500, "Internal server error")).await;
    match &error {
        LlmError::Upstream { status, code, .. } => {
            assert_eq!(*status, 500);
            assert_eq!(code.as_deref(), Some("api_error"));
        }
        other => panic!("{other:?}"),
    }
    assert!(error.is_retryable());
}

#[tokio::test]
async fn overloaded_529_is_a_retryable_upstream_error() {
    let error = error_for(Reply::error(529, "Overloaded")).await;
    match &error {
        LlmError::Upstream {
            status,
            code,
            message,
            ..
        } => {
            assert_eq!(*status, 529);
            assert_eq!(code.as_deref(), Some("overloaded_error"));
            assert_eq!(message, "Overloaded");
        }
        other => panic!("{other:?}"),
    }
    assert!(error.is_retryable());
    assert!(error.should_fallback());
}

#[tokio::test]
async fn a_malformed_200_is_a_malformed_response() {
    let error = error_for(Reply::malformed()).await;
    assert!(
        matches!(error, LlmError::MalformedResponse { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_refused_connection_is_a_connection_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let provider = create_provider(
        ProviderConfig::new(ProviderKind::Anthropic, MODEL)
            .with_api_key("sk-ant-test")
            .with_base_url(format!("http://127.0.0.1:{port}"))
            .with_retry(RetryPolicy::none(Duration::from_secs(5))),
    )
    .unwrap();
    let error = provider.complete(&hello()).await.unwrap_err();
    assert!(matches!(error, LlmError::Connection { .. }), "{error:?}");
}

#[tokio::test]
async fn a_hung_upstream_times_out() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::hang());
    let provider =
        create_provider(config(&fake).with_retry(RetryPolicy::none(Duration::from_millis(300))))
            .unwrap();
    let error = provider.complete(&hello()).await.unwrap_err();
    assert!(matches!(error, LlmError::Timeout { .. }), "{error:?}");
}

#[tokio::test]
async fn a_dropped_stream_ends_with_a_connection_error() {
    let fake = FakeServer::start().await.unwrap();
    // message_start, block start, ping, then two of six text deltas.
    fake.push(
        Reply::text("one two three four five six")
            .in_chunks(6)
            .drop_after(5),
    );
    let (acc, error) = collect(provider(&fake).as_ref(), &hello()).await;
    assert!(
        matches!(error, Some(LlmError::Connection { .. })),
        "{error:?}"
    );
    assert!(acc.chunk_count() >= 1);
    assert!("one two three four five six".starts_with(acc.text()));
    assert_eq!(acc.finish_reason(), None);
}

#[tokio::test]
async fn an_error_event_in_the_stream_is_an_error() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::stream_error(2, "Overloaded"));
    let (acc, error) = collect(provider(&fake).as_ref(), &hello()).await;
    match error {
        Some(LlmError::Upstream {
            status,
            code,
            message,
            ..
        }) => {
            assert_eq!(status, 529);
            assert_eq!(code.as_deref(), Some("overloaded_error"));
            assert_eq!(message, "Overloaded");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(acc.chunk_count(), 2);
}

#[tokio::test]
async fn a_malformed_stream_event_is_a_malformed_response() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::malformed());
    let provider = provider(&fake);
    // The frames before the bad one carry no chunk, so the error may surface as soon as
    // the retry layer looks at the first item.
    let error = match provider.stream(&hello()).await {
        Ok(mut stream) => stream.next().await.unwrap().unwrap_err(),
        Err(error) => error,
    };
    assert!(
        matches!(error, LlmError::MalformedResponse { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_stream_error_status_fails_before_the_stream() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::error(529, "Overloaded"));
    let error = match provider(&fake).stream(&hello()).await {
        Ok(_) => panic!("an error status must not produce a stream"),
        Err(error) => error,
    };
    assert!(
        matches!(error, LlmError::Upstream { status: 529, .. }),
        "{error:?}"
    );
}
