#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use futures::StreamExt;
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::types::{StreamAccumulator, StreamChunk};

/// A stream as the real API sends it: role delta, text, a tool call in fragments, the
/// finish reason, the usage frame and `[DONE]`; `usage: null` on every choice frame.
const RECORDED: &str = concat!(
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Let me \"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    ": keep-alive comment\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"check — ok\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_abc\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Paris\\\"}\"}}]},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"tool_calls\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,\"total_tokens\":19}}\n\n",
    "data: [DONE]\n\n",
);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// Feeds `bytes` split at `cuts` through the decoder.
fn decode(bytes: &[u8], cuts: &[usize]) -> Vec<std::result::Result<StreamChunk, String>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([bytes.len()]) {
        pieces.push(Ok(Bytes::copy_from_slice(&bytes[start..cut])));
        start = cut;
    }
    runtime().block_on(async move {
        decode_stream(futures::stream::iter(pieces))
            .map(|item| item.map_err(|e| e.code().to_owned()))
            .collect()
            .await
    })
}

fn accumulate(chunks: &[std::result::Result<StreamChunk, String>]) -> CompletionResponse {
    let mut acc = StreamAccumulator::new();
    for chunk in chunks {
        acc.push(chunk.as_ref().unwrap());
    }
    acc.into_response("id", "gpt-4o", PROVIDER)
}

#[test]
fn decodes_the_recorded_stream() {
    let chunks = decode(RECORDED.as_bytes(), &[]);
    let response = accumulate(&chunks);
    assert_eq!(response.message.content, "Let me check — ok");
    assert_eq!(
        response.message.tool_calls,
        vec![ToolCall {
            id: "call_abc".into(),
            name: "get_weather".into(),
            arguments: json!({"city": "Paris"}),
        }]
    );
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        response.usage,
        Usage {
            input_tokens: 12,
            output_tokens: 7
        }
    );
    // Finish comes before usage, as on the wire.
    assert!(matches!(
        chunks[chunks.len() - 2],
        Ok(StreamChunk::Finish { .. })
    ));
    assert!(matches!(
        chunks[chunks.len() - 1],
        Ok(StreamChunk::Usage { .. })
    ));
}

proptest! {
    #[test]
    fn chunk_boundaries_do_not_matter(cuts in proptest::collection::vec(0usize..4096, 0..40)) {
        let whole = decode(RECORDED.as_bytes(), &[]);
        let split = decode(RECORDED.as_bytes(), &cuts);
        prop_assert_eq!(&split, &whole);
        prop_assert_eq!(accumulate(&split), accumulate(&whole));
    }
}

#[test]
fn an_error_frame_ends_the_stream_with_an_upstream_error() {
    let bytes = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
        "data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\"}}\n\n",
    );
    let chunks = decode(bytes.as_bytes(), &[]);
    assert_eq!(chunks.len(), 2);
    assert!(chunks[0].is_ok());
    assert_eq!(chunks[1], Err("upstream_error".to_owned()));
}

#[test]
fn a_frame_that_is_not_json_is_malformed() {
    let chunks = decode(b"data: {not json\n\n", &[]);
    assert_eq!(chunks, vec![Err("malformed_response".to_owned())]);
}

#[test]
fn a_stream_cut_before_its_finish_is_a_connection_error() {
    let bytes = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n";
    let chunks = decode(bytes.as_bytes(), &[]);
    assert_eq!(chunks.last(), Some(&Err("connection_error".to_owned())));
}

fn config(model: &str) -> ProviderConfig {
    ProviderConfig::new(PROVIDER, model)
}

fn rich_request() -> CompletionRequest {
    let mut fields = Map::new();
    fields.insert("seed".into(), json!(7));
    fields.insert("logit_bias".into(), json!({"50256": -100, "1": 5}));
    fields.insert("temperature".into(), json!(1.5));
    CompletionRequest {
        tools: vec![Tool::new(
            "search",
            "Search",
            json!({"type": "object", "properties": {"q": {"type": "string"}, "a": {"type": "integer"}}}),
        )],
        tool_choice: Some(ToolChoice::Tool("search".into())),
        stop: vec!["\n\n".into()],
        extra: Extra::new(Dialect::OpenAi, fields),
        ..CompletionRequest::new(vec![
            Message::system("Be brief."),
            Message::user("Find rust"),
            Message::assistant_tool_calls(
                "",
                vec![ToolCall {
                    id: "call_1".into(),
                    name: "search".into(),
                    arguments: json!({"q": "rust", "a": 1}),
                }],
            ),
            Message::tool_result("call_1", "found"),
        ])
    }
}

#[test]
fn serialisation_is_deterministic() {
    let request = rich_request();
    let first = chat_body(&config("gpt-4o"), &request, true).unwrap();
    for _ in 0..20 {
        assert_eq!(
            chat_body(&config("gpt-4o"), &request.clone(), true).unwrap(),
            first
        );
    }
    let body: Value = serde_json::from_slice(&first).unwrap();
    // The request's own temperature (the default) wins over the extra field.
    assert_eq!(body["temperature"], json!(0.7));
    assert_eq!(body["seed"], 7);
    assert_eq!(
        body["tool_choice"],
        json!({"type": "function", "function": {"name": "search"}})
    );
    assert_eq!(body["messages"][2]["content"], Value::Null);
    assert_eq!(
        body["messages"][2]["tool_calls"][0]["function"]["arguments"],
        "{\"a\":1,\"q\":\"rust\"}"
    );
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    let text = String::from_utf8(first).unwrap();
    assert!(text.contains("\"temperature\":0.7,"), "{text}");
}

#[test]
fn reasoning_models_take_max_completion_tokens() {
    let request = CompletionRequest::new(vec![Message::user("hi")]).with_max_tokens(50);
    for (model, reasoning) in [
        ("o1", true),
        ("o3-mini", true),
        ("o4-mini-2025-04-16", true),
        ("gpt-5", true),
        ("gpt-5-nano", true),
        ("gpt-4o", false),
        ("gpt-4.1-mini", false),
        ("omni-moderation", false),
        ("O3-Mini", true),
        ("azure/o1", true),
        ("openai/gpt-5-mini", true),
        ("o10", false),
        ("gpt-50", false),
        ("o", false),
        ("", false),
    ] {
        let body: Value =
            serde_json::from_slice(&chat_body(&config(model), &request, false).unwrap()).unwrap();
        let (set, unset) = if reasoning {
            ("max_completion_tokens", "max_tokens")
        } else {
            ("max_tokens", "max_completion_tokens")
        };
        assert_eq!(body[set], 50, "{model}");
        assert!(body.get(unset).is_none(), "{model}");
        assert!(body.get("stream").is_none(), "{model}");
        // The configured default temperature is not forced on reasoning models.
        assert_eq!(body.get("temperature").is_none(), reasoning, "{model}");
    }
    let explicit = request.clone().with_temperature(1.0);
    let body: Value =
        serde_json::from_slice(&chat_body(&config("o3-mini"), &explicit, false).unwrap()).unwrap();
    assert_eq!(body["temperature"], 1.0);
}

#[test]
fn error_bodies_are_classified() {
    let error = |status: u16, body: &str| parse_error(status, &HeaderMap::new(), body.as_bytes());
    let envelope = |code: &str| {
        format!(
            "{{\"error\":{{\"message\":\"m\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":\"{code}\"}}}}"
        )
    };
    assert_eq!(
        error(400, &envelope("context_length_exceeded")).code(),
        "context_length_exceeded"
    );
    assert_eq!(
        error(400, &envelope("model_not_found")).code(),
        "model_not_found"
    );
    assert_eq!(
        error(401, &envelope("invalid_api_key")).code(),
        "authentication_error"
    );
    assert_eq!(
        error(400, &envelope("invalid_value")).code(),
        "invalid_request"
    );
    assert_eq!(
        error(502, "<html>bad gateway</html>").code(),
        "upstream_error"
    );
    match error(400, &envelope("invalid_value")) {
        LlmError::InvalidRequest { code, message, .. } => {
            assert_eq!(code.as_deref(), Some("invalid_value"));
            assert_eq!(message, "m");
        }
        other => panic!("{other:?}"),
    }
}
