//! Unit tests of the Ollama wire mapping and NDJSON stream decoder.

use super::*;
use crate::types::Extra;
use proptest::prelude::*;
use serde_json::json;

const STREAM: &str = concat!(
    r#"{"model":"llama3.1:8b","created_at":"2024-07-22T20:33:28Z","message":{"role":"assistant","content":"Héllo"},"done":false}"#,
    "\n",
    r#"{"model":"llama3.1:8b","created_at":"2024-07-22T20:33:28Z","message":{"role":"assistant","content":", wörld"},"done":false}"#,
    "\n\n",
    r#"{"model":"llama3.1:8b","created_at":"2024-07-22T20:33:28Z","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"search","arguments":{"q":"rust"}}},{"function":{"name":"time","arguments":{}}}]},"done":false}"#,
    "\r\n",
    r#"{"model":"llama3.1:8b","created_at":"2024-07-22T20:33:28Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":26,"eval_count":9}"#,
    "\n",
);

fn run(parts: Vec<Bytes>) -> Vec<std::result::Result<StreamChunk, String>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        decode_stream(futures::stream::iter(parts.into_iter().map(Ok)))
            .map(|item| item.map_err(|e| e.code().to_owned()))
            .collect()
            .await
    })
}

/// Chunks with the generated ids blanked, so two decodings compare equal.
fn without_ids(
    chunks: Vec<std::result::Result<StreamChunk, String>>,
) -> Vec<std::result::Result<StreamChunk, String>> {
    chunks
        .into_iter()
        .map(|item| {
            item.map(|chunk| match chunk {
                StreamChunk::ToolCallDelta {
                    index,
                    id,
                    name,
                    arguments,
                } => {
                    assert!(id.as_deref().is_some_and(|id| id.starts_with("call_")));
                    StreamChunk::ToolCallDelta {
                        index,
                        id: None,
                        name,
                        arguments,
                    }
                }
                other => other,
            })
        })
        .collect()
}

fn split_at(bytes: &[u8], mut cuts: Vec<usize>) -> Vec<Bytes> {
    cuts.iter_mut().for_each(|c| *c %= bytes.len() + 1);
    cuts.sort_unstable();
    let mut parts = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([bytes.len()]) {
        parts.push(Bytes::copy_from_slice(&bytes[start..cut]));
        start = cut;
    }
    parts
}

#[test]
fn decodes_text_tool_calls_usage_and_finish() {
    let chunks = without_ids(run(vec![Bytes::from_static(STREAM.as_bytes())]));
    let call = |index, name: &str, arguments: &str| {
        Ok(StreamChunk::ToolCallDelta {
            index,
            id: None,
            name: Some(name.into()),
            arguments: arguments.into(),
        })
    };
    assert_eq!(
        chunks,
        vec![
            Ok(StreamChunk::TextDelta {
                text: "Héllo".into()
            }),
            Ok(StreamChunk::TextDelta {
                text: ", wörld".into()
            }),
            call(0, "search", r#"{"q":"rust"}"#),
            call(1, "time", "{}"),
            Ok(StreamChunk::Usage {
                usage: Usage {
                    input_tokens: 26,
                    output_tokens: 9
                }
            }),
            Ok(StreamChunk::Finish {
                reason: FinishReason::ToolCalls
            }),
        ]
    );
}

proptest! {
    #[test]
    fn any_chunk_boundaries_decode_the_same(cuts in proptest::collection::vec(0usize..2000, 0..12)) {
        let whole = without_ids(run(vec![Bytes::from_static(STREAM.as_bytes())]));
        let split = without_ids(run(split_at(STREAM.as_bytes(), cuts)));
        prop_assert_eq!(split, whole);
    }
}

#[test]
fn error_lines_malformed_lines_and_early_ends_are_errors() {
    let error = run(vec![Bytes::from_static(
        b"{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"error\":\"out of memory\"}\n",
    )]);
    assert_eq!(error.len(), 2);
    assert_eq!(error[1], Err("upstream_error".into()));
    let malformed = run(vec![Bytes::from_static(b"{nope\n")]);
    assert_eq!(malformed, vec![Err("malformed_response".into())]);
    let cut = run(vec![Bytes::from_static(
        b"{\"message\":{\"content\":\"a\"},\"done\":false}\n",
    )]);
    assert_eq!(cut[1], Err("connection_error".into()));
}

fn config() -> ProviderConfig {
    ProviderConfig::new(ProviderKind::Ollama, "llama3.1:8b")
}

fn tool_conversation() -> CompletionRequest {
    let mut fields = Map::new();
    fields.insert("keep_alive".into(), json!("5m"));
    fields.insert("model".into(), json!("ignored"));
    fields.insert("options".into(), json!({"num_ctx": 8192, "num_predict": 1}));
    CompletionRequest {
        stop: vec!["END".into()],
        tool_choice: Some(ToolChoice::Required),
        extra: Extra::new(Dialect::Ollama, fields),
        ..CompletionRequest::new(vec![
            Message::system("Be brief."),
            Message::user("Weather?"),
            Message::assistant_tool_calls(
                "",
                vec![ToolCall {
                    id: "call_1".into(),
                    name: "weather".into(),
                    arguments: json!("{\"city\":\"Paris\"}"),
                }],
            ),
            Message::tool_result("call_1", "sunny"),
        ])
        .with_tools(vec![Tool::new(
            "weather",
            "Weather",
            json!({"type": "object"}),
        )])
    }
}

#[test]
fn serialisation_is_deterministic_and_maps_every_field() {
    let request = tool_conversation();
    let first = chat_body(&request, &config(), false).unwrap();
    assert_eq!(first, chat_body(&request, &config(), false).unwrap());
    let body: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(
        body,
        json!({
            "model": "llama3.1:8b",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "weather", "arguments": {"city": "Paris"}}}
                ]},
                {"role": "tool", "content": "sunny", "tool_name": "weather"},
            ],
            "tools": [{"type": "function", "function": {
                "name": "weather", "description": "Weather", "parameters": {"type": "object"}
            }}],
            "stream": false,
            "options": {"temperature": 0.7, "num_predict": 1000, "stop": ["END"], "num_ctx": 8192},
            "keep_alive": "5m",
        })
    );
}

#[test]
fn tool_choice_none_withholds_the_tools() {
    let request = CompletionRequest {
        tool_choice: Some(ToolChoice::None),
        ..tool_conversation()
    };
    let body: Value =
        serde_json::from_slice(&chat_body(&request, &config(), true).unwrap()).unwrap();
    assert!(body.get("tools").is_none());
    assert_eq!(body["stream"], json!(true));
}

#[test]
fn error_bodies_are_classified() {
    let headers = HeaderMap::new();
    let code = |status, body: &str| parse_error(status, &headers, body.as_bytes()).code();
    assert_eq!(
        code(
            404,
            r#"{"error":"model \"x\" not found, try pulling it first"}"#
        ),
        "model_not_found"
    );
    assert_eq!(
        code(400, r#"{"error":"model is required"}"#),
        "invalid_request"
    );
    assert_eq!(code(502, "Bad Gateway"), "upstream_error");
    assert_eq!(
        code(401, r#"{"error":{"message":"no"}}"#),
        "authentication_error"
    );
}
