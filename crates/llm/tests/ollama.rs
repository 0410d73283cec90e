//! The Ollama adapter over HTTP against the fake Ollama server: exact wire requests, the
//! unified responses, streaming, tools, embeddings, model listing and every error class.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use futures::StreamExt;
use meta_chat_llm::providers::OllamaProvider;
use meta_chat_llm::{
    CompletionRequest, Dialect, EmbeddingRequest, Extra, FinishReason, LlmError, LlmProvider,
    Message, ProviderConfig, ProviderKind, RetryPolicy, StreamAccumulator, Tool, create_provider,
};
use meta_chat_testkit::{FakeServer, FakeToolCall, Reply, fake_embedding};
use serde_json::{Value, json};

fn config(fake: &FakeServer) -> ProviderConfig {
    ProviderConfig::new(ProviderKind::Ollama, "llama3.1:8b")
        .with_base_url(fake.url())
        .with_retry(RetryPolicy::none(Duration::from_secs(5)))
}

fn provider(fake: &FakeServer) -> Box<dyn LlmProvider> {
    create_provider(config(fake)).unwrap()
}

fn ask(text: &str) -> CompletionRequest {
    CompletionRequest::new(vec![Message::user(text)])
}

/// Folds a stream; an error ends it and is returned alongside what came before.
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

fn last_body(fake: &FakeServer, path: &str) -> Value {
    fake.requests_to(path).last().unwrap().body.clone()
}

#[tokio::test]
async fn text_completion_sends_the_exact_wire_body() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::text("4").with_usage(10, 2));
    let mut request = CompletionRequest::new(vec![
        Message::system("You are a calculator."),
        Message::user("What is 2+2?"),
    ])
    .with_temperature(0.25)
    .with_max_tokens(50);
    request.top_p = Some(0.5);
    request.stop = vec!["\n\n".into()];

    let response = provider(&fake).complete(&request).await.unwrap();

    assert_eq!(response.message.content, "4");
    assert!(response.message.tool_calls.is_empty());
    assert_eq!(response.finish_reason, FinishReason::Stop);
    assert_eq!(
        (response.usage.input_tokens, response.usage.output_tokens),
        (10, 2)
    );
    assert_eq!(response.model, "llama3.1:8b");
    assert_eq!(response.provider, ProviderKind::Ollama);
    assert!(!response.id.is_empty());
    let sent = fake.requests_to("/api/chat");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].method, "POST");
    assert_eq!(sent[0].header("content-type"), Some("application/json"));
    assert_eq!(sent[0].header("authorization"), None);
    assert_eq!(
        sent[0].body,
        json!({
            "model": "llama3.1:8b",
            "messages": [
                {"role": "system", "content": "You are a calculator."},
                {"role": "user", "content": "What is 2+2?"},
            ],
            "stream": false,
            "options": {"temperature": 0.25, "top_p": 0.5, "num_predict": 50, "stop": ["\n\n"]},
        })
    );
}

#[tokio::test]
async fn system_prompt_stays_a_system_message_and_defaults_fill_the_options() {
    let fake = FakeServer::start().await.unwrap();
    let request = CompletionRequest::new(vec![
        Message::system("Be terse."),
        Message::user("Hi"),
        Message::assistant("Hello."),
        Message::user("Again"),
    ])
    .with_model("mistral:7b");
    let response = provider(&fake).complete(&request).await.unwrap();
    assert_eq!(response.message.content, "You said: Again");
    assert_eq!(response.model, "mistral:7b");
    assert_eq!(
        last_body(&fake, "/api/chat"),
        json!({
            "model": "mistral:7b",
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Again"},
            ],
            "stream": false,
            "options": {"temperature": 0.7, "num_predict": 1000},
        })
    );
}

#[tokio::test]
async fn streaming_equals_the_non_streamed_answer() {
    let fake = FakeServer::start().await.unwrap();
    let reply = || {
        Reply::text("The answer is 4, of course.")
            .with_usage(12, 7)
            .in_chunks(5)
    };
    fake.push_all([reply(), reply()]);
    let provider = provider(&fake);
    let request = ask("What is 2+2?");

    let whole = provider.complete(&request).await.unwrap();
    let (acc, error) = collect(&*provider, &request).await;

    assert!(error.is_none(), "{error:?}");
    assert!(acc.chunk_count() >= 7, "text pieces, usage and finish");
    assert_eq!(
        acc.usage().map(|u| (u.input_tokens, u.output_tokens)),
        Some((12, 7))
    );
    assert_eq!(acc.finish_reason(), Some(FinishReason::Stop));
    let streamed = acc.into_response(&whole.id, &whole.model, ProviderKind::Ollama);
    assert_eq!(streamed, whole);
    assert_eq!(last_body(&fake, "/api/chat")["stream"], json!(true));
}

#[tokio::test]
async fn a_stream_without_counts_reports_zero_usage() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::text("ok").without_stream_usage());
    let (acc, error) = collect(&*provider(&fake), &ask("hi")).await;
    assert!(error.is_none());
    assert_eq!(acc.usage().map(|u| u.total()), Some(0));
    assert_eq!(acc.text(), "ok");
}

fn weather_tool() -> Tool {
    Tool::new(
        "get_weather",
        "Current weather in a city",
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    )
}

#[tokio::test]
async fn tool_call_round_trip_sends_the_result_back_by_tool_name() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all([
        Reply::tool_calls(vec![FakeToolCall::new(
            "unused",
            "get_weather",
            json!({"city": "Paris"}),
        )])
        .with_usage(40, 12),
        Reply::text("It is sunny in Paris."),
    ]);
    let provider = provider(&fake);
    let mut messages = vec![Message::user("Weather in Paris?")];
    let request = CompletionRequest::new(messages.clone()).with_tools(vec![weather_tool()]);

    let first = provider.complete(&request).await.unwrap();
    assert_eq!(first.finish_reason, FinishReason::ToolCalls);
    let call = &first.message.tool_calls[0];
    assert!(
        call.id.starts_with("call_") && call.id.len() > 10,
        "{}",
        call.id
    );
    assert_eq!(call.name, "get_weather");
    assert_eq!(call.arguments, json!({"city": "Paris"}));
    let call_id = call.id.clone();

    messages.push(first.message.clone().into());
    messages.push(Message::tool_result(&call_id, "sunny, 24°C"));
    let second = provider
        .complete(&CompletionRequest::new(messages).with_tools(vec![weather_tool()]))
        .await
        .unwrap();

    assert_eq!(second.message.content, "It is sunny in Paris.");
    assert_eq!(second.finish_reason, FinishReason::Stop);
    let sent = fake.requests_to("/api/chat");
    assert_eq!(sent.len(), 2);
    assert_eq!(
        sent[1].body,
        json!({
            "model": "llama3.1:8b",
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ]},
                {"role": "tool", "content": "sunny, 24°C", "tool_name": "get_weather"},
            ],
            "tools": [{"type": "function", "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            }}],
            "stream": false,
            "options": {"temperature": 0.7, "num_predict": 1000},
        })
    );
}

#[tokio::test]
async fn streamed_tool_calls_get_ids_and_whole_arguments() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::text_and_tool_calls(
        "Let me check.",
        vec![
            FakeToolCall::new("a", "get_weather", json!({"city": "Paris"})),
            FakeToolCall::new("b", "get_weather", json!({"city": "Oslo"})),
        ],
    ));
    let request = ask("Weather in Paris and Oslo?").with_tools(vec![weather_tool()]);
    let (acc, error) = collect(&*provider(&fake), &request).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(acc.finish_reason(), Some(FinishReason::ToolCalls));
    let message = acc.message();
    assert_eq!(message.content, "Let me check.");
    let calls: Vec<(&str, &Value)> = message
        .tool_calls
        .iter()
        .map(|c| (c.name.as_str(), &c.arguments))
        .collect();
    assert_eq!(
        calls,
        vec![
            ("get_weather", &json!({"city": "Paris"})),
            ("get_weather", &json!({"city": "Oslo"}))
        ]
    );
    assert!(message.tool_calls.iter().all(|c| c.id.starts_with("call_")));
    assert_ne!(message.tool_calls[0].id, message.tool_calls[1].id);
}

#[tokio::test]
async fn tool_choice_none_sends_no_tools() {
    let fake = FakeServer::start().await.unwrap();
    let mut request = ask("hi").with_tools(vec![weather_tool()]);
    request.tool_choice = Some(meta_chat_llm::ToolChoice::None);
    provider(&fake).complete(&request).await.unwrap();
    assert!(last_body(&fake, "/api/chat").get("tools").is_none());
}

#[tokio::test]
async fn embeddings_keep_input_order_and_count_tokens() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::text("").with_usage(9, 0));
    let inputs = vec!["first".to_owned(), "second".to_owned(), "third".to_owned()];
    let response = provider(&fake)
        .embed(&EmbeddingRequest::new(inputs.clone()))
        .await
        .unwrap();
    assert_eq!(
        response.embeddings,
        inputs
            .iter()
            .map(|t| fake_embedding(t, 8))
            .collect::<Vec<_>>()
    );
    assert_eq!(response.embedding_tokens, 9);
    assert_eq!(response.model, "nomic-embed-text");
    assert_eq!(response.provider, ProviderKind::Ollama);
    assert_eq!(
        last_body(&fake, "/api/embed"),
        json!({"model": "nomic-embed-text", "input": ["first", "second", "third"]})
    );

    let mut request = EmbeddingRequest::new(vec!["x".into()]);
    request.model = Some("nomic-embed-text:latest".into());
    request.dimensions = Some(4);
    let response = provider(&fake).embed(&request).await.unwrap();
    assert_eq!(response.embeddings, vec![fake_embedding("x", 4)]);
    assert_eq!(
        last_body(&fake, "/api/embed"),
        json!({"model": "nomic-embed-text:latest", "input": ["x"], "dimensions": 4})
    );
}

#[tokio::test]
async fn list_models_asks_api_tags() {
    let fake = FakeServer::start().await.unwrap();
    fake.set_ollama_models(vec!["qwen2.5:7b".into(), "llama3.1:8b".into()]);
    let models = provider(&fake).list_models().await.unwrap();
    assert_eq!(models, vec!["qwen2.5:7b", "llama3.1:8b"]);
    let sent = fake.requests_to("/api/tags");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].method, "GET");
}

#[tokio::test]
async fn a_configured_key_is_sent_as_a_bearer_token() {
    let fake = FakeServer::start().await.unwrap();
    let provider = create_provider(config(&fake).with_api_key("proxy-key")).unwrap();
    provider.complete(&ask("hi")).await.unwrap();
    provider.list_models().await.unwrap();
    for recorded in fake.requests() {
        assert_eq!(recorded.header("authorization"), Some("Bearer proxy-key"));
    }
}

#[tokio::test]
async fn extra_fields_reach_only_their_dialect() {
    let fake = FakeServer::start().await.unwrap();
    let provider = provider(&fake);
    let mut fields = serde_json::Map::new();
    fields.insert("keep_alive".into(), json!("10m"));
    fields.insert("format".into(), json!("json"));
    fields.insert("stream".into(), json!(true));
    fields.insert(
        "options".into(),
        json!({"num_ctx": 4096, "temperature": 2.0}),
    );
    let mut request = ask("hi");
    request.extra = Extra::new(Dialect::Ollama, fields.clone());
    provider.complete(&request).await.unwrap();
    let body = last_body(&fake, "/api/chat");
    assert_eq!(body["keep_alive"], json!("10m"));
    assert_eq!(body["format"], json!("json"));
    assert_eq!(
        body["stream"],
        json!(false),
        "extra never overrides the adapter"
    );
    assert_eq!(
        body["options"],
        json!({"temperature": 0.7, "num_predict": 1000, "num_ctx": 4096})
    );

    request.extra = Extra::new(Dialect::OpenAi, fields);
    provider.complete(&request).await.unwrap();
    let body = last_body(&fake, "/api/chat");
    assert!(body.get("keep_alive").is_none() && body.get("format").is_none());
    assert_eq!(
        body["options"],
        json!({"temperature": 0.7, "num_predict": 1000})
    );
}

#[tokio::test]
async fn an_unknown_model_is_model_not_found() {
    let fake = FakeServer::start().await.unwrap();
    let error = provider(&fake)
        .complete(&ask("hi").with_model("llama9:70b"))
        .await
        .unwrap_err();
    assert!(matches!(error, LlmError::ModelNotFound { .. }), "{error:?}");
    assert!(error.to_string().contains("llama9:70b"), "{error}");
    assert!(error.should_fallback());
}

#[tokio::test]
async fn connection_refused_suggests_ollama_serve() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let provider = create_provider(
        ProviderConfig::new(ProviderKind::Ollama, "llama3.1:8b")
            .with_base_url(&url)
            .with_retry(RetryPolicy::none(Duration::from_secs(5))),
    )
    .unwrap();
    let error = provider.complete(&ask("hi")).await.unwrap_err();
    let LlmError::Connection { message, .. } = &error else {
        panic!("expected a connection error, got {error:?}");
    };
    assert!(
        message.starts_with(&format!("could not connect to Ollama at {url}")),
        "{message}"
    );
    assert!(message.contains("is `ollama serve` running?"), "{message}");
    assert!(error.is_retryable());
    let error = provider.list_models().await.unwrap_err();
    assert!(error.to_string().contains("ollama serve"), "{error}");
}

async fn complete_error(reply: Reply) -> LlmError {
    let fake = FakeServer::start().await.unwrap();
    fake.push(reply);
    provider(&fake).complete(&ask("hi")).await.unwrap_err()
}

#[tokio::test]
async fn http_errors_map_to_their_classes() {
    let error = complete_error(Reply::error(401, "unauthorized")).await;
    assert!(
        matches!(error, LlmError::Authentication { status: 401, .. }),
        "{error:?}"
    );

    let error = complete_error(Reply::error(400, "invalid options: num_predict")).await;
    assert!(
        matches!(
            error,
            LlmError::InvalidRequest {
                status: Some(400),
                ..
            }
        ),
        "{error:?}"
    );
    assert!(!error.is_retryable() && !error.should_fallback());
    assert!(error.to_string().contains("invalid options"), "{error}");

    let error = complete_error(Reply::error(
        400,
        "the input length exceeds the context length",
    ))
    .await;
    assert!(
        matches!(error, LlmError::ContextLengthExceeded { .. }),
        "{error:?}"
    );

    let error = complete_error(Reply::rate_limited(7)).await;
    assert!(matches!(error, LlmError::RateLimited { .. }), "{error:?}");
    assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));

    let error = complete_error(Reply::error(500, "llama runner process has terminated")).await;
    assert!(
        matches!(error, LlmError::Upstream { status: 500, .. }),
        "{error:?}"
    );
    assert!(error.is_retryable());

    let error = complete_error(Reply::raw(502, "text/html", "<html>Bad Gateway</html>")).await;
    assert!(
        matches!(error, LlmError::Upstream { status: 502, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("Bad Gateway"), "{error}");
}

#[tokio::test]
async fn a_malformed_answer_is_malformed_response() {
    let error = complete_error(Reply::malformed()).await;
    assert!(
        matches!(error, LlmError::MalformedResponse { .. }),
        "{error:?}"
    );

    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::malformed());
    let (acc, error) = collect(&*provider(&fake), &ask("hi")).await;
    assert_eq!(acc.text(), "Hel");
    assert!(
        matches!(error, Some(LlmError::MalformedResponse { .. })),
        "{error:?}"
    );

    fake.push(Reply::malformed());
    let error = provider(&fake)
        .embed(&EmbeddingRequest::new(vec!["x".into()]))
        .await
        .unwrap_err();
    assert!(
        matches!(error, LlmError::MalformedResponse { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_hanging_server_times_out() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::hang());
    let provider =
        create_provider(config(&fake).with_retry(RetryPolicy::none(Duration::from_millis(300))))
            .unwrap();
    let error = provider.complete(&ask("hi")).await.unwrap_err();
    assert!(matches!(error, LlmError::Timeout { .. }), "{error:?}");
}

#[tokio::test]
async fn a_dropped_stream_ends_with_a_connection_error() {
    let fake = FakeServer::start().await.unwrap();
    // The delay lets the headers out before the cut, as with a server that dies mid-answer.
    fake.push(
        Reply::text("one two three four five")
            .in_chunks(5)
            .with_chunk_delay(Duration::from_millis(20))
            .drop_after(2),
    );
    let (acc, error) = collect(&*provider(&fake), &ask("hi")).await;
    assert!(!acc.text().is_empty());
    assert_eq!(acc.finish_reason(), None);
    assert!(
        matches!(error, Some(LlmError::Connection { .. })),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_error_line_in_the_stream_is_an_upstream_error() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::stream_error(2, "model runner crashed"));
    let (acc, error) = collect(&*provider(&fake), &ask("tell me a story")).await;
    assert_eq!(acc.chunk_count(), 2);
    let Some(LlmError::Upstream { message, .. }) = &error else {
        panic!("expected an upstream error, got {error:?}");
    };
    assert_eq!(message, "model runner crashed");

    fake.push(Reply::stream_error(2, "model runner crashed"));
    let error = provider(&fake).complete(&ask("hi")).await.unwrap_err();
    assert!(
        matches!(error, LlmError::Upstream { status: 500, .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn embedding_errors_are_classified_too() {
    let fake = FakeServer::start().await.unwrap();
    let provider = provider(&fake);
    let mut request = EmbeddingRequest::new(vec!["x".into()]);
    request.model = Some("all-minilm".into());
    let error = provider.embed(&request).await.unwrap_err();
    assert!(matches!(error, LlmError::ModelNotFound { .. }), "{error:?}");
    fake.push(Reply::error(500, "embedding failed"));
    let error = provider
        .embed(&EmbeddingRequest::new(vec!["x".into()]))
        .await
        .unwrap_err();
    assert!(matches!(error, LlmError::Upstream { .. }), "{error:?}");
}

#[tokio::test]
async fn the_adapter_reports_its_capabilities() {
    let fake = FakeServer::start().await.unwrap();
    let info = OllamaProvider::new(config(&fake)).unwrap().info();
    assert_eq!(info.provider, ProviderKind::Ollama);
    assert_eq!(info.model, "llama3.1:8b");
    assert_eq!(info.embedding_model.as_deref(), Some("nomic-embed-text"));
    let caps = info.capabilities;
    assert!(caps.chat && caps.streaming && caps.tools && caps.embeddings);
}

/// The fake itself behaves like Ollama where the adapter never goes: default streaming,
/// validation errors.
#[tokio::test]
async fn the_fake_streams_by_default_and_validates_like_ollama() {
    meta_chat_llm::install_crypto_provider();
    let fake = FakeServer::start().await.unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/api/chat", fake.url());
    let post = |body: &'static str| client.post(&url).body(body).send();

    let response = post(r#"{"model":"llama3.1:8b","messages":[{"role":"user","content":"yo"}]}"#)
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let text = response.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["done"], json!(true));
    assert_eq!(last["done_reason"], json!("stop"));
    assert!(last["prompt_eval_count"].is_u64() && last["eval_count"].is_u64());
    let said: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    assert_eq!(said, "You said: yo");

    for (body, status, message) in [
        ("{not json", 400, None),
        (r#"{"messages":[]}"#, 400, Some("model is required")),
        (r#"{"model":"mistral","messages":[]}"#, 404, None),
        (
            r#"{"model":"nope","messages":[]}"#,
            404,
            Some(r#"model "nope" not found, try pulling it first"#),
        ),
    ] {
        let response = post(body).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        let text = error["error"].as_str().unwrap();
        if let Some(message) = message {
            assert_eq!(text, message);
        }
    }
}
