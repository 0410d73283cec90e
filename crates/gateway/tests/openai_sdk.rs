//! The gateway's OpenAI-compatible API (SPEC §4.3) driven by a real OpenAI client library,
//! `async-openai`, rather than hand-written JSON: every response, stream chunk and error the
//! gateway sends must parse into the SDK's own types, for tenants on OpenAI, Anthropic and
//! Ollama behind the fake upstream server.
//!
//! Two facts about the SDK shape the error tests. It raises `OpenAIError::ApiError` for any
//! non-2xx answer, but only parses the `{"error": …}` envelope of 4xx answers (a 5xx keeps
//! the raw body as the message). And it retries 429 and 5xx answers itself, three times,
//! waiting `Retry-After` seconds (the gateway says at least 1) or 100/200/400 ms; without its
//! `middleware` feature this cannot be configured, so those tests script one upstream error
//! per SDK attempt and run their providers concurrently to keep the waits short.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::{ApiErrorResponse, OpenAIError};
use async_openai::types::chat::{
    ChatCompletionMessageToolCall, ChatCompletionMessageToolCalls,
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestToolMessage,
    ChatCompletionRequestUserMessage, ChatCompletionStreamOptions, ChatCompletionTool,
    ChatCompletionTools, CreateChatCompletionRequest, CreateChatCompletionResponse,
    CreateChatCompletionStreamResponse, FinishReason, FunctionObject, Role,
};
use async_openai::types::embeddings::{CreateEmbeddingRequest, EmbeddingInput, EncodingFormat};
use common::{ADMIN_KEY, Gateway, TENANT_ANTHROPIC_KEY, TENANT_OPENAI_KEY};
use futures::StreamExt;
use meta_chat_testkit::{FakeToolCall, Reply, fake_embedding};
use serde_json::{Value, json};

/// How many requests one SDK call makes when every answer is a 429 or a 5xx: the first and
/// `OpenAIRetryLayer::default()`'s three retries (async-openai `src/middleware/retry`).
const SDK_ATTEMPTS: usize = 4;

impl Gateway {
    /// Creates a tenant with these settings; returns its key.
    async fn tenant_key(&self, settings: Value) -> String {
        self.tenant_named("sdk", settings).await.1
    }

    /// An SDK client pointed at the gateway, as a user would configure it.
    fn sdk(&self, key: &str) -> Client<OpenAIConfig> {
        Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("{}/v1", self.base))
                .with_api_key(key),
        )
    }
}

/// One provider behind a tenant.
struct Case {
    provider: &'static str,
    settings: Value,
    /// The model the tenant's settings name.
    model: &'static str,
    /// The upstream chat path.
    path: &'static str,
}

fn cases() -> [Case; 3] {
    [
        Case {
            provider: "openai",
            settings: json!({"llm": {"provider": "openai", "model": "gpt-4o-mini",
                                     "apiKey": TENANT_OPENAI_KEY}}),
            model: "gpt-4o-mini",
            path: "/v1/chat/completions",
        },
        Case {
            provider: "anthropic",
            settings: json!({"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307",
                                     "apiKey": TENANT_ANTHROPIC_KEY}}),
            model: "claude-3-haiku-20240307",
            path: "/v1/messages",
        },
        Case {
            provider: "ollama",
            settings: json!({"llm": {"provider": "ollama", "model": "llama3.1:8b"}}),
            model: "llama3.1:8b",
            path: "/api/chat",
        },
    ]
}

fn user(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessage::from(text).into()
}

/// A request for the tenant's configured model (`"default"`, SPEC §4.3).
fn chat_request(messages: Vec<ChatCompletionRequestMessage>) -> CreateChatCompletionRequest {
    CreateChatCompletionRequest {
        model: "default".to_owned(),
        messages,
        ..Default::default()
    }
}

fn weather_tool() -> ChatCompletionTools {
    ChatCompletionTools::Function(ChatCompletionTool {
        function: FunctionObject {
            name: "get_weather".to_owned(),
            description: Some("The current weather in a city".to_owned()),
            parameters: Some(json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
                },
                "required": ["city"]
            })),
            strict: None,
        },
    })
}

fn weather_arguments() -> Value {
    json!({"city": "Paris", "unit": "celsius"})
}

/// The single function call of a response.
fn only_function_call(response: &CreateChatCompletionResponse) -> &ChatCompletionMessageToolCall {
    let calls = response.choices[0]
        .message
        .tool_calls
        .as_ref()
        .expect("the response has tool_calls");
    assert_eq!(calls.len(), 1, "{calls:?}");
    match &calls[0] {
        ChatCompletionMessageToolCalls::Function(call) => call,
        other => panic!("not a function call: {other:?}"),
    }
}

/// Every chunk of a stream, each of which must parse.
async fn collect_stream(
    client: &Client<OpenAIConfig>,
    request: CreateChatCompletionRequest,
) -> Vec<CreateChatCompletionStreamResponse> {
    let mut stream = client.chat().create_stream(request).await.unwrap();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.unwrap_or_else(|e| panic!("chunk {} does not parse: {e}", chunks.len())));
    }
    chunks
}

fn streamed_text(chunks: &[CreateChatCompletionStreamResponse]) -> String {
    chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|choice| choice.delta.content.as_deref())
        .collect()
}

fn finish_reasons(chunks: &[CreateChatCompletionStreamResponse]) -> Vec<FinishReason> {
    chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|choice| choice.finish_reason)
        .collect()
}

/// A one-line chat with the tenant's default model.
async fn say_hi(
    client: &Client<OpenAIConfig>,
) -> Result<CreateChatCompletionResponse, OpenAIError> {
    client.chat().create(chat_request(vec![user("Hi")])).await
}

/// The API error of a failed SDK call.
fn api_error<T>(result: Result<T, OpenAIError>) -> ApiErrorResponse {
    match result {
        Err(OpenAIError::ApiError(error)) => error,
        Err(other) => panic!("expected OpenAIError::ApiError, got {other:?}"),
        Ok(_) => panic!("expected OpenAIError::ApiError, got a success"),
    }
}

#[tokio::test]
async fn chat_completions_parse_for_every_provider() {
    let gw = Gateway::start().await;
    for case in cases() {
        let key = gw.tenant_key(case.settings.clone()).await;
        let client = gw.sdk(&key);
        gw.fake.push(Reply::text("Four.").with_usage(10, 2));
        let mut request = chat_request(vec![
            ChatCompletionRequestSystemMessage::from("Answer briefly.").into(),
            user("What is 2+2?"),
        ]);
        request.temperature = Some(0.25);
        request.max_completion_tokens = Some(50);
        let response = client
            .chat()
            .create(request)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.provider));

        let who = case.provider;
        assert!(
            response.id.starts_with("chatcmpl-"),
            "{who}: {}",
            response.id
        );
        assert_eq!(response.object, "chat.completion", "{who}");
        assert_eq!(response.model, case.model, "{who}");
        assert!(response.created > 1_600_000_000, "{who}");
        assert_eq!(response.choices.len(), 1, "{who}");
        let choice = &response.choices[0];
        assert_eq!(choice.index, 0);
        assert_eq!(choice.message.role, Role::Assistant, "{who}");
        assert_eq!(choice.message.content.as_deref(), Some("Four."), "{who}");
        assert_eq!(choice.message.tool_calls, None, "{who}");
        assert_eq!(choice.message.refusal, None, "{who}");
        assert_eq!(choice.finish_reason, Some(FinishReason::Stop), "{who}");
        let usage = response.usage.as_ref().expect("usage");
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens
            ),
            (10, 2, 12),
            "{who}"
        );

        // What the SDK sent reached the provider in its own terms.
        let sent = gw.fake.requests_to(case.path);
        let sent = &sent.last().unwrap().body;
        assert_eq!(sent["model"], case.model, "{who}");
        let temperature = match who {
            "ollama" => &sent["options"]["temperature"],
            _ => &sent["temperature"],
        };
        assert!(
            (temperature.as_f64().unwrap() - 0.25).abs() < 1e-6,
            "{who}: {sent}"
        );
        let max_tokens = match who {
            "openai" => sent
                .get("max_completion_tokens")
                .or_else(|| sent.get("max_tokens")),
            "anthropic" => sent.get("max_tokens"),
            _ => sent.pointer("/options/num_predict"),
        };
        assert_eq!(max_tokens, Some(&json!(50)), "{who}: {sent}");
        if who == "anthropic" {
            assert_eq!(sent["system"], "Answer briefly.", "{sent}");
        }
    }
}

#[tokio::test]
async fn the_upstream_model_name_is_what_the_sdk_sees() {
    let gw = Gateway::start().await;
    let key = gw.tenant_key(cases()[0].settings.clone()).await;
    gw.fake
        .push(Reply::text("Hi.").with_model("gpt-4o-mini-2024-07-18"));
    let response = gw
        .sdk(&key)
        .chat()
        .create(chat_request(vec![user("Hello")]))
        .await
        .unwrap();
    assert_eq!(response.model, "gpt-4o-mini-2024-07-18");

    // A provider-prefixed model routes there and parses the same way.
    let mut request = chat_request(vec![user("Hello")]);
    request.model = "ollama/llama3.1:8b".to_owned();
    let response = gw.sdk(&key).chat().create(request).await.unwrap();
    assert_eq!(response.model, "llama3.1:8b");
    assert_eq!(
        response.choices[0].message.content.as_deref(),
        Some("You said: Hello")
    );
}

#[tokio::test]
async fn streams_parse_and_reassemble_for_every_provider() {
    let gw = Gateway::start().await;
    let text = "The answer is four, as always.";
    for case in cases() {
        let who = case.provider;
        let key = gw.tenant_key(case.settings.clone()).await;
        let client = gw.sdk(&key);

        gw.fake
            .push(Reply::text(text).with_usage(7, 5).in_chunks(4));
        let mut request = chat_request(vec![user("What is 2+2?")]);
        request.stream_options = Some(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        });
        let chunks = collect_stream(&client, request).await;

        assert!(chunks.len() >= 4, "{who}: {chunks:#?}");
        let id = &chunks[0].id;
        assert!(id.starts_with("chatcmpl-"), "{who}: {id}");
        for chunk in &chunks {
            assert_eq!(&chunk.id, id, "{who}: one id for the whole stream");
            assert_eq!(chunk.object, "chat.completion.chunk", "{who}");
            assert_eq!(chunk.model, case.model, "{who}");
            assert_eq!(chunk.created, chunks[0].created, "{who}");
        }
        assert_eq!(
            chunks[0].choices[0].delta.role,
            Some(Role::Assistant),
            "{who}"
        );
        assert_eq!(streamed_text(&chunks), text, "{who}");
        let pieces = chunks
            .iter()
            .flat_map(|c| &c.choices)
            .filter(|choice| {
                choice
                    .delta
                    .content
                    .as_deref()
                    .is_some_and(|t| !t.is_empty())
            })
            .count();
        assert!(pieces >= 2, "{who}: the text arrived in {pieces} piece(s)");
        assert_eq!(finish_reasons(&chunks), vec![FinishReason::Stop], "{who}");

        // The usage chunk comes last, with no choices; every other chunk has none.
        let (last, rest) = chunks.split_last().unwrap();
        assert!(last.choices.is_empty(), "{who}: {last:?}");
        let usage = last.usage.as_ref().expect("the last chunk has the usage");
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens
            ),
            (7, 5, 12),
            "{who}"
        );
        assert!(rest.iter().all(|c| c.usage.is_none()), "{who}");
        assert!(rest.iter().all(|c| c.choices.len() == 1), "{who}");

        // Without include_usage: no usage chunk.
        gw.fake.push(Reply::text("Hi there.").with_usage(3, 2));
        let chunks = collect_stream(&client, chat_request(vec![user("Hello")])).await;
        assert_eq!(streamed_text(&chunks), "Hi there.", "{who}");
        assert!(chunks.iter().all(|c| c.usage.is_none()), "{who}");
        assert!(chunks.iter().all(|c| !c.choices.is_empty()), "{who}");
        assert_eq!(finish_reasons(&chunks), vec![FinishReason::Stop], "{who}");
    }
}

/// Checks that the second request carried the assistant's call and the tool's result in the
/// provider's own format.
fn assert_tool_result_sent(who: &str, sent: &Value, call_id: &str, result: &str) {
    let messages = sent["messages"].as_array().unwrap();
    match who {
        "openai" => {
            assert_eq!(messages.len(), 3, "{sent}");
            let call = &messages[1]["tool_calls"][0];
            assert_eq!(messages[1]["role"], "assistant", "{sent}");
            assert_eq!(call["id"], call_id, "{sent}");
            assert_eq!(call["type"], "function", "{sent}");
            assert_eq!(call["function"]["name"], "get_weather", "{sent}");
            let arguments: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(arguments, weather_arguments());
            assert_eq!(
                messages[2],
                json!({"role": "tool", "tool_call_id": call_id, "content": result}),
                "{sent}"
            );
        }
        "anthropic" => {
            assert_eq!(messages.len(), 3, "{sent}");
            assert_eq!(messages[1]["role"], "assistant", "{sent}");
            let tool_use = &messages[1]["content"][0];
            assert_eq!(tool_use["type"], "tool_use", "{sent}");
            assert_eq!(tool_use["id"], call_id, "{sent}");
            assert_eq!(tool_use["name"], "get_weather", "{sent}");
            assert_eq!(tool_use["input"], weather_arguments(), "{sent}");
            assert_eq!(messages[2]["role"], "user", "{sent}");
            let tool_result = &messages[2]["content"][0];
            assert_eq!(tool_result["type"], "tool_result", "{sent}");
            assert_eq!(tool_result["tool_use_id"], call_id, "{sent}");
            assert_eq!(tool_result["content"], result, "{sent}");
        }
        "ollama" => {
            assert_eq!(messages.len(), 3, "{sent}");
            assert_eq!(messages[1]["role"], "assistant", "{sent}");
            let call = &messages[1]["tool_calls"][0]["function"];
            assert_eq!(call["name"], "get_weather", "{sent}");
            assert_eq!(call["arguments"], weather_arguments(), "{sent}");
            assert_eq!(messages[2]["role"], "tool", "{sent}");
            assert_eq!(messages[2]["content"], result, "{sent}");
            assert_eq!(messages[2]["tool_name"], "get_weather", "{sent}");
        }
        other => panic!("unknown provider {other}"),
    }
}

/// Checks that the first request offered the tool in the provider's own format.
fn assert_tool_offered(who: &str, sent: &Value) {
    let tool = &sent["tools"][0];
    match who {
        "anthropic" => {
            assert_eq!(tool["name"], "get_weather", "{sent}");
            assert_eq!(tool["input_schema"]["required"], json!(["city"]), "{sent}");
        }
        _ => {
            assert_eq!(tool["type"], "function", "{sent}");
            assert_eq!(tool["function"]["name"], "get_weather", "{sent}");
            assert_eq!(
                tool["function"]["parameters"]["required"],
                json!(["city"]),
                "{sent}"
            );
        }
    }
}

#[tokio::test]
async fn tool_calls_round_trip_for_every_provider() {
    let gw = Gateway::start().await;
    let result = "18°C and sunny";
    for case in cases() {
        let who = case.provider;
        let key = gw.tenant_key(case.settings.clone()).await;
        let client = gw.sdk(&key);
        // Each provider's id style; Ollama sends none and the gateway makes one up.
        let scripted_id = match who {
            "anthropic" => "toolu_01A09q90qw90lq917835lq9",
            _ => "call_abc123",
        };
        gw.fake.push(Reply::tool_calls(vec![FakeToolCall::new(
            scripted_id,
            "get_weather",
            weather_arguments(),
        )]));
        let question = user("What's the weather in Paris?");
        let mut request = chat_request(vec![question.clone()]);
        request.tools = Some(vec![weather_tool()]);
        let response = client
            .chat()
            .create(request.clone())
            .await
            .unwrap_or_else(|e| panic!("{who}: {e}"));

        assert_eq!(
            response.choices[0].finish_reason,
            Some(FinishReason::ToolCalls),
            "{who}"
        );
        let message = &response.choices[0].message;
        assert!(
            message.content.as_deref().unwrap_or("").is_empty(),
            "{who}: {message:?}"
        );
        let call = only_function_call(&response).clone();
        if who == "ollama" {
            assert!(
                !call.id.is_empty(),
                "ollama: the gateway gives the call an id"
            );
        } else {
            assert_eq!(call.id, scripted_id, "{who}");
        }
        assert_eq!(call.function.name, "get_weather", "{who}");
        let arguments: Value = serde_json::from_str(&call.function.arguments)
            .unwrap_or_else(|e| panic!("{who}: arguments are not JSON text ({e})"));
        assert_eq!(arguments, weather_arguments(), "{who}");
        assert_tool_offered(who, &gw.fake.requests_to(case.path).last().unwrap().body);

        // Answer the call as an SDK user does: the assistant message as received, then the
        // tool's result.
        gw.fake.push(Reply::text("It is 18°C and sunny in Paris."));
        let mut follow_up = request;
        follow_up.messages = vec![
            question,
            ChatCompletionRequestAssistantMessage {
                tool_calls: message.tool_calls.clone(),
                ..Default::default()
            }
            .into(),
            ChatCompletionRequestToolMessage {
                content: result.into(),
                tool_call_id: call.id.clone(),
            }
            .into(),
        ];
        let response = client
            .chat()
            .create(follow_up)
            .await
            .unwrap_or_else(|e| panic!("{who}: {e}"));
        assert_eq!(
            response.choices[0].message.content.as_deref(),
            Some("It is 18°C and sunny in Paris."),
            "{who}"
        );
        assert_eq!(
            response.choices[0].finish_reason,
            Some(FinishReason::Stop),
            "{who}"
        );
        let sent = gw.fake.requests_to(case.path);
        assert_tool_result_sent(who, &sent.last().unwrap().body, &call.id, result);
    }
}

#[tokio::test]
async fn streamed_tool_calls_reassemble_for_every_provider() {
    let gw = Gateway::start().await;
    for case in cases() {
        let who = case.provider;
        let key = gw.tenant_key(case.settings.clone()).await;
        gw.fake.push(
            Reply::text_and_tool_calls(
                "Let me check.",
                vec![
                    FakeToolCall::new("call_1", "get_weather", weather_arguments()),
                    FakeToolCall::new("call_2", "get_weather", json!({"city": "Oslo"})),
                ],
            )
            .in_chunks(3),
        );
        let mut request = chat_request(vec![user("Weather in Paris and Oslo?")]);
        request.tools = Some(vec![weather_tool()]);
        let chunks = collect_stream(&gw.sdk(&key), request).await;

        assert_eq!(streamed_text(&chunks), "Let me check.", "{who}");
        assert_eq!(
            finish_reasons(&chunks),
            vec![FinishReason::ToolCalls],
            "{who}"
        );
        // Accumulate the deltas the way OpenAI clients do: by index; the id and name come
        // once, the arguments in fragments.
        let mut calls: BTreeMap<u32, (Vec<String>, String, String)> = BTreeMap::new();
        for delta in chunks
            .iter()
            .flat_map(|c| &c.choices)
            .filter_map(|choice| choice.delta.tool_calls.as_ref())
            .flatten()
        {
            let entry = calls.entry(delta.index).or_default();
            entry.0.extend(delta.id.clone());
            if let Some(function) = &delta.function {
                entry.1.push_str(function.name.as_deref().unwrap_or(""));
                entry
                    .2
                    .push_str(function.arguments.as_deref().unwrap_or(""));
            }
        }
        assert_eq!(
            calls.keys().copied().collect::<Vec<_>>(),
            vec![0, 1],
            "{who}"
        );
        let expected = [weather_arguments(), json!({"city": "Oslo"})];
        for ((ids, name, arguments), expected) in calls.values().zip(expected) {
            assert_eq!(
                ids.len(),
                1,
                "{who}: one id per call, on its first delta: {ids:?}"
            );
            if who != "ollama" {
                assert!(ids[0] == "call_1" || ids[0] == "call_2", "{who}: {ids:?}");
            }
            assert_eq!(name, "get_weather", "{who}");
            let arguments: Value = serde_json::from_str(arguments)
                .unwrap_or_else(|e| panic!("{who}: {arguments:?} is not JSON ({e})"));
            assert_eq!(arguments, expected, "{who}");
        }
        let ids: Vec<&String> = calls.values().map(|c| &c.0[0]).collect();
        assert_ne!(ids[0], ids[1], "{who}: distinct ids");
    }
}

#[tokio::test]
async fn embeddings_parse_as_floats_and_base64() {
    let gw = Gateway::start().await;
    // The system embeddings backend (OpenAI).
    let key = gw.tenant_key(json!({})).await;
    let client = gw.sdk(&key);
    let inputs = ["one", "two", "three"];
    let response = client
        .embeddings()
        .create(CreateEmbeddingRequest {
            model: "text-embedding-3-small".to_owned(),
            input: EmbeddingInput::StringArray(inputs.map(str::to_owned).to_vec()),
            dimensions: Some(16),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(response.object, "list");
    assert_eq!(response.model, "text-embedding-3-small");
    assert_eq!(response.data.len(), 3);
    for (i, (embedding, input)) in response.data.iter().zip(inputs).enumerate() {
        assert_eq!(embedding.index as usize, i);
        assert_eq!(embedding.object, "embedding");
        assert_eq!(embedding.embedding, fake_embedding(input, 16), "{input}");
    }
    assert!(response.usage.prompt_tokens > 0);
    assert_eq!(response.usage.total_tokens, response.usage.prompt_tokens);
    let sent = gw.fake.requests_to("/v1/embeddings");
    assert_eq!(sent.last().unwrap().body["dimensions"], 16);

    // base64: the SDK decodes little-endian f32s back to the same vector.
    let response = client
        .embeddings()
        .create_base64(CreateEmbeddingRequest {
            model: "text-embedding-3-small".to_owned(),
            input: EmbeddingInput::String("one".to_owned()),
            encoding_format: Some(EncodingFormat::Base64),
            dimensions: Some(16),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(response.data.len(), 1);
    let vector: Vec<f32> = response.data[0].embedding.clone().into();
    assert_eq!(vector, fake_embedding("one", 16));

    // A tenant whose embeddings go to Ollama.
    let key = gw
        .tenant_key(json!({"embeddings": {"provider": "ollama", "model": "nomic-embed-text"}}))
        .await;
    let response = gw
        .sdk(&key)
        .embeddings()
        .create(CreateEmbeddingRequest {
            model: "default".to_owned(),
            input: EmbeddingInput::String("hello".to_owned()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(response.data.len(), 1);
    assert_eq!(response.data[0].embedding, fake_embedding("hello", 8));
    assert!(!response.model.is_empty());
    assert_eq!(gw.fake.requests_to("/api/embed").len(), 1);
}

#[tokio::test]
async fn models_list_parses() {
    let gw = Gateway::start().await;
    let key = gw
        .tenant_key(json!({"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307"}}))
        .await;
    let list = gw.sdk(&key).models().list().await.unwrap();
    assert_eq!(list.object, "list");
    assert!(list.data.len() > 1, "{list:?}");
    assert_eq!(list.data[0].id, "anthropic/claude-3-haiku-20240307");
    assert_eq!(list.data[0].owned_by, "anthropic");
    for model in &list.data {
        assert_eq!(model.object, "model", "{model:?}");
        let (provider, name) = model.id.split_once('/').expect("provider/model");
        assert_eq!(provider, model.owned_by, "{model:?}");
        assert!(!name.is_empty(), "{model:?}");
    }
    assert!(
        list.data.iter().any(|m| m.id == "openai/gpt-4o-mini"),
        "{list:?}"
    );
}

#[tokio::test]
async fn bad_keys_are_api_errors_the_sdk_understands() {
    let gw = Gateway::start().await;
    let wrong = gw.sdk("mc_this-key-does-not-exist-0123456789");

    let error = api_error(wrong.chat().create(chat_request(vec![user("Hi")])).await);
    assert_eq!(error.status_code.as_u16(), 401);
    assert_eq!(
        error.api_error.r#type.as_deref(),
        Some("authentication_error")
    );
    assert_eq!(error.api_error.code.as_deref(), Some("invalid_api_key"));
    assert!(!error.api_error.message.is_empty());
    assert!(!error.api_error.message.contains("mc_this-key"));

    let error = api_error(
        wrong
            .chat()
            .create_stream(chat_request(vec![user("Hi")]))
            .await,
    );
    assert_eq!(error.status_code.as_u16(), 401);
    assert_eq!(error.api_error.code.as_deref(), Some("invalid_api_key"));

    let error = api_error(wrong.models().list().await);
    assert_eq!(error.api_error.code.as_deref(), Some("invalid_api_key"));

    let error = api_error(
        wrong
            .embeddings()
            .create(CreateEmbeddingRequest {
                model: "text-embedding-3-small".to_owned(),
                input: EmbeddingInput::String("x".to_owned()),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(error.api_error.code.as_deref(), Some("invalid_api_key"));

    // The admin key is a valid key, but not one with provider settings.
    let admin = gw.sdk(ADMIN_KEY);
    let error = api_error(admin.chat().create(chat_request(vec![user("Hi")])).await);
    assert_eq!(error.status_code.as_u16(), 403);
    assert_eq!(error.api_error.r#type.as_deref(), Some("permission_error"));
    assert_eq!(error.api_error.code.as_deref(), Some("tenant_key_required"));

    assert!(gw.fake.requests().is_empty());
}

#[tokio::test]
async fn invalid_requests_name_the_field() {
    let gw = Gateway::start().await;
    let key = gw.tenant_key(json!({"llm": {"provider": "openai"}})).await;
    let client = gw.sdk(&key);

    let mut request = chat_request(vec![user("Hi")]);
    request.temperature = Some(3.0);
    let error = api_error(client.chat().create(request.clone()).await);
    assert_eq!(error.status_code.as_u16(), 400);
    assert_eq!(
        error.api_error.r#type.as_deref(),
        Some("invalid_request_error")
    );
    assert_eq!(error.api_error.code.as_deref(), Some("invalid_value"));
    assert_eq!(error.api_error.param.as_deref(), Some("temperature"));
    assert!(
        error.api_error.message.contains("temperature"),
        "{}",
        error.api_error
    );

    // The same refusal before a stream starts.
    let error = api_error(client.chat().create_stream(request).await);
    assert_eq!(error.status_code.as_u16(), 400);
    assert_eq!(error.api_error.param.as_deref(), Some("temperature"));

    let mut request = chat_request(vec![user("Hi")]);
    request.top_p = Some(1.5);
    let error = api_error(client.chat().create(request).await);
    assert_eq!(error.api_error.param.as_deref(), Some("top_p"));

    let error = api_error(client.chat().create(chat_request(Vec::new())).await);
    assert_eq!(error.status_code.as_u16(), 400);
    assert_eq!(error.api_error.param.as_deref(), Some("messages"));

    let error = api_error(
        client
            .embeddings()
            .create(CreateEmbeddingRequest {
                model: "text-embedding-3-small".to_owned(),
                input: EmbeddingInput::StringArray(Vec::new()),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(error.status_code.as_u16(), 400);
    assert_eq!(error.api_error.param.as_deref(), Some("input"));

    assert!(
        gw.fake.requests().is_empty(),
        "invalid requests never reach the provider"
    );
}

#[tokio::test]
async fn upstream_rate_limits_are_rate_limit_errors() {
    let gw = Gateway::start().await;
    let [openai, anthropic, _] = cases();
    let openai_key = gw.tenant_key(openai.settings).await;
    let anthropic_key = gw.tenant_key(anthropic.settings).await;
    // One upstream 429 for every attempt the SDK makes (the gateway itself does not retry:
    // LLM_MAX_RETRIES=0). Its 429s say `Retry-After: 1`, so this takes about 3 s.
    gw.fake.push_all(
        std::iter::repeat_with(|| Reply::error(429, "Rate limit reached, please retry later"))
            .take(2 * SDK_ATTEMPTS),
    );
    let (openai_client, anthropic_client) = (gw.sdk(&openai_key), gw.sdk(&anthropic_key));
    let (from_openai, from_anthropic) =
        tokio::join!(say_hi(&openai_client), say_hi(&anthropic_client));
    for (who, result) in [("openai", from_openai), ("anthropic", from_anthropic)] {
        let error = api_error(result);
        assert_eq!(error.status_code.as_u16(), 429, "{who}: {error}");
        assert_eq!(
            error.api_error.r#type.as_deref(),
            Some("rate_limit_error"),
            "{who}"
        );
        assert_eq!(
            error.api_error.code.as_deref(),
            Some("rate_limit_exceeded"),
            "{who}"
        );
        assert!(!error.api_error.message.contains("sk-"), "{who}: {error}");
    }
    assert_eq!(
        gw.fake.requests_to("/v1/chat/completions").len(),
        SDK_ATTEMPTS
    );
    assert_eq!(gw.fake.requests_to("/v1/messages").len(), SDK_ATTEMPTS);
}

#[tokio::test]
async fn upstream_server_errors_are_api_errors() {
    let gw = Gateway::start().await;
    let cases = cases();
    let mut keys = Vec::new();
    for case in &cases {
        keys.push(gw.tenant_key(case.settings.clone()).await);
    }
    gw.fake.push_all(
        std::iter::repeat_with(|| Reply::error(500, "internal failure")).take(3 * SDK_ATTEMPTS),
    );
    let clients: Vec<Client<OpenAIConfig>> = keys.iter().map(|key| gw.sdk(key)).collect();
    let (a, b, c) = tokio::join!(
        say_hi(&clients[0]),
        say_hi(&clients[1]),
        say_hi(&clients[2])
    );
    for (case, result) in cases.iter().zip([a, b, c]) {
        let who = case.provider;
        let error = api_error(result);
        assert_eq!(error.status_code.as_u16(), 502, "{who}: {error}");
        // The SDK keeps a 5xx body as the message; it is the gateway's error envelope.
        let body: Value = serde_json::from_str(&error.api_error.message)
            .unwrap_or_else(|e| panic!("{who}: {e}: {}", error.api_error.message));
        assert_eq!(body["error"]["code"], "upstream_error", "{who}: {body}");
        assert_eq!(body["error"]["type"], "api_error", "{who}: {body}");
        assert!(!error.api_error.message.contains("sk-"), "{who}: {body}");
        assert_eq!(gw.fake.requests_to(case.path).len(), SDK_ATTEMPTS, "{who}");
    }
}

#[tokio::test]
async fn a_mid_stream_failure_reaches_the_sdk_as_an_error_item() {
    let gw = Gateway::start().await;
    let key = gw.tenant_key(cases()[1].settings.clone()).await;
    gw.fake.push(Reply::stream_error(2, "Overloaded"));
    let mut stream = gw
        .sdk(&key)
        .chat()
        .create_stream(chat_request(vec![user("Tell me a story")]))
        .await
        .unwrap();
    let mut text = String::new();
    let mut failure = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                assert!(failure.is_none(), "a chunk after the error: {chunk:?}");
                text.extend(chunk.choices.iter().filter_map(|c| c.delta.content.clone()));
            }
            Err(error) => failure = Some(error),
        }
    }
    assert!(!text.is_empty(), "the text before the failure arrived");
    // Like OpenAI itself, the gateway sends `data: {"error": …}`; async-openai has no chunk
    // type for it and hands over the event as a deserialisation error with the raw JSON.
    match failure.expect("the stream reported the failure") {
        OpenAIError::JSONDeserialize(_, content) => {
            let event: Value = serde_json::from_str(&content).unwrap();
            assert!(event["error"]["message"].is_string(), "{event}");
            assert!(event["error"]["type"].is_string(), "{event}");
        }
        other => panic!("unexpected error: {other:?}"),
    }
}
