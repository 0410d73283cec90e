//! The OpenAI adapter over HTTP against the fake OpenAI server.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures::StreamExt;
use meta_chat_llm::providers::OpenAiProvider;
use meta_chat_llm::{
    CompletionRequest, CompletionResponse, Dialect, EmbeddingRequest, Extra, FinishReason,
    LlmError, LlmProvider, Message, ProviderConfig, ProviderKind, RetryPolicy, StreamAccumulator,
    Tool, ToolCall, ToolChoice, Usage, create_provider,
};
use meta_chat_testkit::{FakeServer, FakeToolCall, Reply};
use serde_json::{Map, Value, json};

const CHAT: &str = "/v1/chat/completions";

fn config(fake: &FakeServer) -> ProviderConfig {
    ProviderConfig::new(ProviderKind::OpenAi, "gpt-4o-mini")
        .with_api_key("sk-test")
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
    let mut config = config(&fake);
    config.organization = Some("org-42".into());
    let provider = create_provider(config).unwrap();
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
    assert_eq!(response.model, "gpt-4o-mini");
    assert_eq!(response.provider, ProviderKind::OpenAi);
    assert!(response.id.starts_with("chatcmpl-"), "{}", response.id);

    let sent = fake.requests_to(CHAT);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].method, "POST");
    assert_eq!(sent[0].header("authorization"), Some("Bearer sk-test"));
    assert_eq!(sent[0].header("openai-organization"), Some("org-42"));
    assert_eq!(sent[0].header("content-type"), Some("application/json"));
    assert_eq!(
        sent[0].body,
        json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "What is 2+2?"}],
            "temperature": 0.25,
            "top_p": 0.5,
            "max_tokens": 64,
            "stop": ["END"],
        })
    );
}

#[tokio::test]
async fn defaults_fill_unset_sampling_and_no_organization_header_is_sent() {
    let fake = FakeServer::start().await.unwrap();
    let provider = provider(&fake);
    let response = provider.complete(&hello()).await.unwrap();
    assert_eq!(response.message.content, "You said: Hello");
    let sent = &fake.requests_to(CHAT)[0];
    assert_eq!(sent.header("openai-organization"), None);
    assert_eq!(
        sent.body,
        json!({
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "Hello"}],
            "temperature": 0.7,
            "max_tokens": 1000,
        })
    );
}

#[tokio::test]
async fn the_system_prompt_is_a_system_message() {
    let fake = FakeServer::start().await.unwrap();
    let provider = provider(&fake);
    let request =
        CompletionRequest::new(vec![Message::system("You are terse."), Message::user("Hi")])
            .with_model("gpt-4o");
    let response = provider.complete(&request).await.unwrap();
    assert_eq!(response.model, "gpt-4o");
    assert_eq!(
        fake.requests_to(CHAT)[0].body["messages"],
        json!([
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
        ])
    );
    assert_eq!(fake.requests_to(CHAT)[0].body["model"], "gpt-4o");
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
    assert!(acc.chunk_count() >= 7 + 2, "{}", acc.chunk_count());
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
        ProviderKind::OpenAi,
    );
    assert_eq!(streamed, complete);

    let sent = &fake.requests_to(CHAT)[1];
    assert_eq!(sent.body["stream"], true);
    assert_eq!(sent.body["stream_options"], json!({"include_usage": true}));
    assert_eq!(sent.header("accept"), Some("text/event-stream"));
}

#[tokio::test]
async fn a_stream_without_usage_still_finishes() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::text("short").without_stream_usage());
    let (acc, error) = collect(provider(&fake).as_ref(), &hello()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(acc.text(), "short");
    assert_eq!(acc.usage(), None);
    assert_eq!(acc.finish_reason(), Some(FinishReason::Stop));
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
        Reply::tool_calls(vec![FakeToolCall::new(
            "call_w1",
            "get_weather",
            json!({"city": "Paris"}),
        )])
        .with_usage(40, 12),
        Reply::text("It is sunny in Paris.").with_usage(60, 7),
    ]);
    let provider = provider(&fake);
    let mut request = CompletionRequest {
        tool_choice: Some(ToolChoice::Auto),
        ..CompletionRequest::new(vec![Message::user("Weather in Paris?")])
            .with_tools(vec![weather_tool()])
    };
    let first = provider.complete(&request).await.unwrap();
    assert_eq!(first.finish_reason, FinishReason::ToolCalls);
    assert_eq!(first.message.content, "");
    let call = ToolCall {
        id: "call_w1".into(),
        name: "get_weather".into(),
        arguments: json!({"city": "Paris"}),
    };
    assert_eq!(first.message.tool_calls, vec![call.clone()]);

    let sent = fake.requests_to(CHAT);
    assert_eq!(
        sent[0].body["tools"],
        json!([{
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }])
    );
    assert_eq!(sent[0].body["tool_choice"], "auto");

    request.messages.push(first.message.into());
    request
        .messages
        .push(Message::tool_result("call_w1", "{\"sky\":\"sunny\"}"));
    let second = provider.complete(&request).await.unwrap();
    assert_eq!(second.message.content, "It is sunny in Paris.");
    assert_eq!(second.finish_reason, FinishReason::Stop);

    let sent = fake.requests_to(CHAT);
    assert_eq!(
        sent[1].body["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "id": "call_w1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                }],
            },
            {"role": "tool", "tool_call_id": "call_w1", "content": "{\"sky\":\"sunny\"}"},
        ])
    );
    assert!(sent[1].body["messages"][1]["tool_calls"][0]["function"]["arguments"].is_string());
}

#[tokio::test]
async fn a_streamed_tool_call_reassembles_to_the_same_call() {
    let fake = FakeServer::start().await.unwrap();
    let reply = Reply::text_and_tool_calls(
        "Checking.",
        vec![
            FakeToolCall::new(
                "call_a",
                "get_weather",
                json!({"city": "Paris", "unit": "celsius"}),
            ),
            FakeToolCall::new("call_b", "get_weather", json!({"city": "Oslo"})),
        ],
    )
    .with_usage(30, 20)
    .in_chunks(5);
    fake.push_all([reply.clone(), reply]);
    let provider = provider(&fake);
    let request = CompletionRequest {
        tool_choice: Some(ToolChoice::Tool("get_weather".into())),
        ..CompletionRequest::new(vec![Message::user("Weather?")]).with_tools(vec![weather_tool()])
    };
    let complete = provider.complete(&request).await.unwrap();
    assert_eq!(complete.message.tool_calls.len(), 2);
    let (acc, error) = collect(provider.as_ref(), &request).await;
    assert!(error.is_none(), "{error:?}");
    let streamed: CompletionResponse = acc.into_response(
        complete.id.clone(),
        complete.model.clone(),
        ProviderKind::OpenAi,
    );
    assert_eq!(streamed, complete);
    assert_eq!(
        fake.requests_to(CHAT)[1].body["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
}

#[tokio::test]
async fn embeddings_come_back_in_input_order() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::text("").with_usage(9, 0));
    let provider = provider(&fake);
    let request = EmbeddingRequest {
        dimensions: Some(4),
        ..EmbeddingRequest::new(vec!["alpha".into(), "beta".into(), "gamma".into()])
    };
    let response = provider.embed(&request).await.unwrap();
    assert_eq!(response.embeddings.len(), 3);
    assert_eq!(
        response.embeddings[0],
        meta_chat_testkit::fake_embedding("alpha", 4)
    );
    assert_eq!(
        response.embeddings[2],
        meta_chat_testkit::fake_embedding("gamma", 4)
    );
    assert_eq!(response.embedding_tokens, 9);
    assert_eq!(response.model, "text-embedding-3-small");
    assert_eq!(response.provider, ProviderKind::OpenAi);
    let sent = &fake.requests_to("/v1/embeddings")[0];
    assert_eq!(sent.header("authorization"), Some("Bearer sk-test"));
    assert_eq!(
        sent.body,
        json!({
            "model": "text-embedding-3-small",
            "input": ["alpha", "beta", "gamma"],
            "dimensions": 4,
            "encoding_format": "float",
        })
    );
}

#[tokio::test]
async fn embeddings_sort_by_index_when_the_upstream_shuffles() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::raw(
        200,
        "application/json",
        json!({
            "object": "list",
            "data": [
                {"object": "embedding", "index": 1, "embedding": [0.0, 1.0]},
                {"object": "embedding", "index": 0, "embedding": [1.0, 0.0]},
            ],
            "model": "text-embedding-3-large",
            "usage": {"prompt_tokens": 4, "total_tokens": 4},
        })
        .to_string(),
    ));
    let request = EmbeddingRequest {
        model: Some("text-embedding-3-large".into()),
        ..EmbeddingRequest::new(vec!["a".into(), "b".into()])
    };
    let response = provider(&fake).embed(&request).await.unwrap();
    assert_eq!(response.embeddings, vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
    assert_eq!(response.embedding_tokens, 4);
    assert_eq!(
        fake.requests_to("/v1/embeddings")[0].body["model"],
        "text-embedding-3-large"
    );
}

#[tokio::test]
async fn list_models_asks_the_server() {
    let fake = FakeServer::start().await.unwrap();
    let models = provider(&fake).list_models().await.unwrap();
    assert_eq!(models, ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]);
    let sent = &fake.requests_to("/v1/models")[0];
    assert_eq!(sent.method, "GET");
    assert_eq!(sent.header("authorization"), Some("Bearer sk-test"));
}

#[tokio::test]
async fn extra_fields_pass_through_only_from_openai_clients() {
    let fake = FakeServer::start().await.unwrap();
    let provider = provider(&fake);
    let mut fields = Map::new();
    fields.insert("seed".into(), json!(42));
    fields.insert("logprobs".into(), json!(true));
    fields.insert("model".into(), json!("must-not-win"));
    fields.insert("temperature".into(), json!(2));
    let request = CompletionRequest {
        extra: Extra::new(Dialect::OpenAi, fields.clone()),
        ..hello()
    };
    provider.complete(&request).await.unwrap();
    let request = CompletionRequest {
        extra: Extra::new(Dialect::Anthropic, fields),
        ..hello()
    };
    provider.complete(&request).await.unwrap();

    let sent = fake.requests_to(CHAT);
    assert_eq!(sent[0].body["seed"], 42);
    assert_eq!(sent[0].body["logprobs"], true);
    assert_eq!(sent[0].body["model"], "gpt-4o-mini");
    assert_eq!(sent[0].body["temperature"], 0.7);
    assert!(sent[1].body.get("seed").is_none());
    assert!(sent[1].body.get("logprobs").is_none());
}

#[tokio::test]
async fn a_base_url_with_v1_works() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::text("ok"));
    let provider =
        create_provider(config(&fake).with_base_url(format!("{}/v1/", fake.url()))).unwrap();
    assert_eq!(
        provider.complete(&hello()).await.unwrap().message.content,
        "ok"
    );
    assert_eq!(fake.requests_to(CHAT).len(), 1);
}

#[tokio::test]
async fn capabilities_are_all_true() {
    let fake = FakeServer::start().await.unwrap();
    let info = OpenAiProvider::new(config(&fake)).unwrap().info();
    assert!(info.capabilities.chat && info.capabilities.streaming);
    assert!(info.capabilities.tools && info.capabilities.embeddings);
    assert_eq!(info.provider, ProviderKind::OpenAi);
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
    let mut config = config(&fake);
    config.api_key = None;
    let provider = create_provider(config).unwrap();
    let error = provider.complete(&hello()).await.unwrap_err();
    assert!(matches!(error, LlmError::Configuration { .. }), "{error:?}");
    let error = provider
        .embed(&EmbeddingRequest::new(vec!["x".into()]))
        .await
        .unwrap_err();
    assert!(matches!(error, LlmError::Configuration { .. }), "{error:?}");
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn a_401_is_an_authentication_error() {
    let error = error_for(Reply::error(401, "Incorrect API key provided")).await;
    assert!(
        matches!(error, LlmError::Authentication { status: 401, .. }),
        "{error:?}"
    );
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn a_400_is_an_invalid_request_without_retry_or_fallback() {
    let error = error_for(Reply::error_code(
        400,
        "invalid_value",
        "temperature: too high",
    ))
    .await;
    match &error {
        LlmError::InvalidRequest {
            status,
            code,
            message,
            ..
        } => {
            assert_eq!(*status, Some(400));
            assert_eq!(code.as_deref(), Some("invalid_value"));
            assert_eq!(message, "temperature: too high");
        }
        other => panic!("{other:?}"),
    }
    assert!(!error.is_retryable());
    assert!(!error.should_fallback());
}

#[tokio::test]
async fn context_length_exceeded_is_recognised() {
    let error = error_for(Reply::error_code(
        400,
        "context_length_exceeded",
        "This model's maximum context length is 128000 tokens.",
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
    let error = error_for(Reply::error(404, "The model `gpt-9` does not exist")).await;
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
    let error = error_for(Reply::error(503, "The engine is currently overloaded")).await;
    match &error {
        LlmError::Upstream {
            status,
            code,
            message,
            ..
        } => {
            assert_eq!(*status, 503);
            assert_eq!(code.as_deref(), Some("server_error"));
            assert_eq!(message, "The engine is currently overloaded");
        }
        other => panic!("{other:?}"),
    }
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
async fn a_redirect_is_reported_with_its_target_and_not_followed() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(
        Reply::raw(301, "text/plain", "moved")
            .header("location", "https://api.example.com/v1/chat/completions"),
    );
    fake.push(Reply::text("must not be reached"));
    let error = provider(&fake).complete(&hello()).await.unwrap_err();
    match &error {
        LlmError::MalformedResponse { message, .. } => {
            assert!(message.contains("HTTP 301"), "{message}");
            assert!(
                message.contains("https://api.example.com/v1/chat/completions"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(!error.is_retryable());
    assert_eq!(fake.requests().len(), 1, "the redirect was not followed");
}

#[tokio::test]
async fn a_refused_connection_is_a_connection_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let provider = create_provider(
        ProviderConfig::new(ProviderKind::OpenAi, "gpt-4o")
            .with_api_key("sk-test")
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
    fake.push(
        Reply::text("one two three four five six")
            .in_chunks(6)
            .drop_after(3),
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
    fake.push(Reply::stream_error(
        2,
        "The server had an error processing your request.",
    ));
    let (acc, error) = collect(provider(&fake).as_ref(), &hello()).await;
    match error {
        Some(LlmError::Upstream {
            status,
            code,
            message,
            ..
        }) => {
            assert_eq!(status, 500);
            assert_eq!(code.as_deref(), Some("server_error"));
            assert_eq!(message, "The server had an error processing your request.");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(acc.chunk_count(), 2);
}

#[tokio::test]
async fn a_malformed_stream_frame_is_a_malformed_response() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::malformed());
    let provider = provider(&fake);
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
    fake.push(Reply::error(401, "bad key"));
    let error = match provider(&fake).stream(&hello()).await {
        Ok(_) => panic!("an error status must not produce a stream"),
        Err(error) => error,
    };
    assert!(
        matches!(error, LlmError::Authentication { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn embedding_errors_are_classified_too() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all([Reply::error(429, "slow down"), Reply::malformed()]);
    let provider = provider(&fake);
    let request = EmbeddingRequest::new(vec!["x".into()]);
    let error = provider.embed(&request).await.unwrap_err();
    assert!(matches!(error, LlmError::RateLimited { .. }), "{error:?}");
    let error = provider.embed(&request).await.unwrap_err();
    assert!(
        matches!(error, LlmError::MalformedResponse { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_blank_key_fails_before_sending_and_the_fake_enforces_bearer_auth() {
    let fake = FakeServer::start().await.unwrap();
    let mut config = config(&fake);
    config.api_key = Some(secrecy::SecretString::from(" "));
    let provider = create_provider(config).unwrap();
    assert!(matches!(
        provider.complete(&hello()).await.unwrap_err(),
        LlmError::Configuration { .. }
    ));
    assert!(fake.requests().is_empty());

    meta_chat_llm::install_crypto_provider();
    let answer = reqwest::Client::new()
        .post(format!("{}{CHAT}", fake.url()))
        .json(&json!({"model": "gpt-4o", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}
