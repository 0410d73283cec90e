#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use futures::StreamExt;
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::types::{Extra, StreamAccumulator, StreamChunk};

/// A stream as the real API sends it: text, a ping, a thinking-free tool call whose input
/// arrives in `input_json_delta` fragments (the first one empty), cumulative usage in
/// `message_delta`, and an event type this adapter does not know.
const RECORDED: &str = concat!(
    "event: message_start\n",
    "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-3-5-sonnet-20241022\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":472,\"cache_read_input_tokens\":8,\"output_tokens\":2}}}\n\n",
    "event: content_block_start\n",
    "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: ping\n",
    "data: {\"type\": \"ping\"}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Let me \"}}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"check — ok\"}}\n\n",
    "event: content_block_stop\n",
    "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: content_block_start\n",
    "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_01\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\": \"}}\n\n",
    "event: brand_new_event\n",
    "data: {\"type\":\"brand_new_event\",\"whatever\":1}\n\n",
    "event: content_block_delta\n",
    "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"Paris\\\"}\"}}\n\n",
    "event: content_block_stop\n",
    "data: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
    "event: message_delta\n",
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":89}}\n\n",
    "event: message_stop\n",
    "data: {\"type\":\"message_stop\"}\n\n",
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
    acc.into_response("id", "claude", PROVIDER)
}

#[test]
fn decodes_the_recorded_stream() {
    let chunks = decode(RECORDED.as_bytes(), &[]);
    let response = accumulate(&chunks);
    assert_eq!(response.message.content, "Let me check — ok");
    assert_eq!(
        response.message.tool_calls,
        vec![ToolCall {
            id: "toolu_01".into(),
            name: "get_weather".into(),
            arguments: json!({"city": "Paris"}),
        }]
    );
    assert_eq!(response.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        response.usage,
        Usage {
            input_tokens: 480,
            output_tokens: 89
        }
    );
    // The tool call counts from 0 although it is content block 1.
    assert!(chunks.contains(&Ok(StreamChunk::ToolCallDelta {
        index: 0,
        id: Some("toolu_01".into()),
        name: Some("get_weather".into()),
        arguments: String::new(),
    })));
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
fn an_error_event_ends_the_stream() {
    let text = concat!(
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: error\n",
        "data: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
    );
    let chunks = decode(text.as_bytes(), &[]);
    assert_eq!(
        chunks,
        vec![
            Ok(StreamChunk::TextDelta { text: "Hi".into() }),
            Err("upstream_error".into())
        ]
    );
    let rate = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"slow\"}}\n\n";
    assert_eq!(
        decode(rate.as_bytes(), &[]),
        vec![Err("rate_limited".into())]
    );
}

#[test]
fn events_without_a_type_are_named_by_their_event_line() {
    let text = concat!(
        "event: content_block_delta\n",
        "data: {\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: message_delta\n",
        "data: {\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\n",
        "event: message_stop\ndata: {}\n\n",
    );
    let chunks = decode(text.as_bytes(), &[]);
    assert_eq!(chunks[0], Ok(StreamChunk::TextDelta { text: "Hi".into() }));
    let response = accumulate(&chunks);
    assert_eq!(response.message.content, "Hi");
    assert_eq!(response.finish_reason, FinishReason::Stop);
    assert_eq!(response.usage.output_tokens, 2);
    // Data that is no event under either name is malformed, naming the event.
    let chunks = decode(
        b"event: content_block_delta\ndata: {\"index\":\"x\"}\n\n",
        &[],
    );
    assert_eq!(chunks, vec![Err("malformed_response".to_owned())]);
}

#[test]
fn data_that_is_not_json_is_malformed() {
    let chunks = decode(b"event: content_block_delta\ndata: {not json\n\n", &[]);
    assert_eq!(chunks, vec![Err("malformed_response".to_owned())]);
}

#[test]
fn a_stream_cut_before_its_finish_is_a_connection_error() {
    let text = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n";
    let chunks = decode(text.as_bytes(), &[]);
    assert_eq!(chunks.last(), Some(&Err("connection_error".to_owned())));
}

#[test]
fn a_tool_input_given_up_front_is_kept() {
    let text = concat!(
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"f\",\"input\":{\"a\":1}}}\n\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":3}}\n\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );
    let response = accumulate(&decode(text.as_bytes(), &[]));
    assert_eq!(response.message.tool_calls[0].arguments, json!({"a": 1}));
    assert_eq!(response.usage.output_tokens, 3);
}

fn config() -> ProviderConfig {
    ProviderConfig::new(PROVIDER, "claude-3-5-sonnet-20241022")
}

fn rich_request() -> CompletionRequest {
    let mut fields = Map::new();
    fields.insert("metadata".into(), json!({"user_id": "u1", "a": 2}));
    fields.insert("top_k".into(), json!(5));
    fields.insert("max_tokens".into(), json!(1));
    fields.insert("stream".into(), json!(true));
    CompletionRequest {
        tools: vec![Tool::new(
            "search",
            "Search",
            json!({"type": "object", "properties": {"q": {"type": "string"}, "a": {"type": "integer"}}}),
        )],
        tool_choice: Some(ToolChoice::Required),
        stop: vec!["\n\nHuman:".into()],
        temperature: Some(1.7),
        extra: Extra::new(Dialect::Anthropic, fields),
        ..CompletionRequest::new(vec![
            Message::system("Be brief."),
            Message::user("Find rust"),
            Message::assistant_tool_calls(
                "",
                vec![ToolCall {
                    id: "toolu_1".into(),
                    name: "search".into(),
                    arguments: json!({"q": "rust", "a": 1}),
                }],
            ),
            Message::tool_result("toolu_1", "found"),
            Message::user("Thanks"),
        ])
    }
}

#[test]
fn serialisation_is_deterministic() {
    let request = rich_request();
    let first = messages_body(&config(), &request, false).unwrap();
    for _ in 0..20 {
        assert_eq!(
            messages_body(&config(), &request.clone(), false).unwrap(),
            first
        );
    }
    let text = String::from_utf8(first).unwrap();
    assert_eq!(
        text,
        concat!(
            r#"{"model":"claude-3-5-sonnet-20241022","system":"Be brief.","#,
            r#""messages":[{"role":"user","content":"Find rust"},"#,
            r#"{"role":"assistant","content":[{"type":"tool_use","id":"toolu_1","name":"search","input":{"a":1,"q":"rust"}}]},"#,
            r#"{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"found"},{"type":"text","text":"Thanks"}]}],"#,
            r#""max_tokens":1000,"temperature":1.0,"stop_sequences":["\n\nHuman:"],"#,
            r#""tools":[{"name":"search","description":"Search","input_schema":{"properties":{"a":{"type":"integer"},"q":{"type":"string"}},"type":"object"}}],"#,
            r#""tool_choice":{"type":"any"},"metadata":{"a":2,"user_id":"u1"},"top_k":5}"#,
        )
    );
}

#[test]
fn tool_choices_map_to_anthropic_ones() {
    for (choice, wire) in [
        (ToolChoice::Auto, json!({"type": "auto"})),
        (ToolChoice::None, json!({"type": "none"})),
        (ToolChoice::Required, json!({"type": "any"})),
        (
            ToolChoice::Tool("f".into()),
            json!({"type": "tool", "name": "f"}),
        ),
    ] {
        let request = CompletionRequest {
            tool_choice: Some(choice),
            ..CompletionRequest::new(vec![Message::user("hi")])
        };
        let body: Value =
            serde_json::from_slice(&messages_body(&config(), &request, true).unwrap()).unwrap();
        assert_eq!(body["tool_choice"], wire);
        assert_eq!(body["stream"], true);
    }
}

#[test]
fn string_arguments_are_sent_back_as_objects() {
    let call = |arguments: Value| ToolCall {
        id: "t".into(),
        name: "f".into(),
        arguments,
    };
    assert_eq!(
        *call(json!("{\"a\":1}")).arguments_object(),
        json!({"a": 1})
    );
    assert_eq!(*call(Value::Null).arguments_object(), json!({}));
    assert_eq!(*call(json!("")).arguments_object(), json!({}));
    assert_eq!(
        *call(json!("not json")).arguments_object(),
        json!("not json")
    );
    assert_eq!(*call(json!("[1]")).arguments_object(), json!("[1]"));
    assert_eq!(*call(json!({"b": 2})).arguments_object(), json!({"b": 2}));
}

#[test]
fn error_bodies_are_classified() {
    let error = |status: u16, kind: &str, message: &str| {
        let body = json!({"type": "error", "error": {"type": kind, "message": message}});
        parse_error(status, &HeaderMap::new(), body.to_string().as_bytes())
    };
    let cases = [
        (400, "invalid_request_error", "bad", "invalid_request"),
        (
            400,
            "invalid_request_error",
            "prompt is too long: 210000 tokens > 200000 maximum",
            "context_length_exceeded",
        ),
        (
            401,
            "authentication_error",
            "invalid x-api-key",
            "authentication_error",
        ),
        (403, "permission_error", "no", "authentication_error"),
        (404, "not_found_error", "model: claude-9", "model_not_found"),
        (413, "request_too_large", "too big", "invalid_request"),
        (429, "rate_limit_error", "slow", "rate_limited"),
        (500, "api_error", "oops", "upstream_error"),
        (529, "overloaded_error", "Overloaded", "upstream_error"),
    ];
    for (status, kind, message, code) in cases {
        assert_eq!(error(status, kind, message).code(), code, "{status} {kind}");
    }
    match error(529, "overloaded_error", "Overloaded") {
        LlmError::Upstream { status, code, .. } => {
            assert_eq!(status, 529);
            assert_eq!(code.as_deref(), Some("overloaded_error"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        parse_error(502, &HeaderMap::new(), b"<html>bad gateway</html>").code(),
        "upstream_error"
    );
}
