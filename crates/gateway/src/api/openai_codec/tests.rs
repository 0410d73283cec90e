use axum::http::StatusCode;
use base64::Engine as _;
use meta_chat_llm::types::{AssistantMessage, ProviderKind, StreamAccumulator};
use serde_json::json;

use super::*;

fn parse(body: Value) -> Result<ChatCompletionsRequest, ApiError> {
    parse_chat_request(body.to_string().as_bytes())
}

fn parse_err(body: Value) -> ApiError {
    match parse(body) {
        Ok(parsed) => panic!("expected an error, got {parsed:?}"),
        Err(error) => error,
    }
}

fn assert_error(error: &ApiError, code: &str, param: Option<&str>) {
    assert_eq!(error.status, StatusCode::BAD_REQUEST, "{error:?}");
    assert_eq!(error.code, code, "{error:?}");
    assert_eq!(error.param.as_deref(), param, "{error:?}");
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[test]
fn parses_a_rich_request_exactly() {
    let body = json!({
        "model": "anthropic/claude-3-haiku-20240307",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in "},
                {"type": "text", "text": "Paris?"},
            ]},
            {"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "assistant", "content": "It is 18C.", "name": "bot"},
        ],
        "tools": [
            {"type": "function", "function": {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                "strict": true,
            }},
            {"type": "function", "function": {"name": "now"}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0.5,
        "top_p": 0.9,
        "max_completion_tokens": 256,
        "stop": ["\n\n", "END"],
        "stream": true,
        "stream_options": {"include_usage": true},
        "metadata": {"conversation_id": "conv-42"},
        "seed": 7,
        "logit_bias": {"50256": -100},
        "user": "u-1",
        "response_format": {"type": "json_object"},
        "n": 1,
        "presence_penalty": 0.25,
        "parallel_tool_calls": false,
        "logprobs": false,
    });
    let parsed = parse(body).unwrap();

    let mut extra = Map::new();
    extra.insert("seed".into(), json!(7));
    extra.insert("logit_bias".into(), json!({"50256": -100}));
    extra.insert("user".into(), json!("u-1"));
    extra.insert("response_format".into(), json!({"type": "json_object"}));
    extra.insert("n".into(), json!(1));
    extra.insert("presence_penalty".into(), json!(0.25));
    extra.insert("parallel_tool_calls".into(), json!(false));
    extra.insert("logprobs".into(), json!(false));

    let expected = CompletionRequest {
        model: None,
        messages: vec![
            Message::system("Be brief."),
            Message::system("Use tools."),
            Message::user("Weather in Paris?"),
            Message::assistant_tool_calls(
                "",
                vec![ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: json!({"city": "Paris"}),
                }],
            ),
            Message::tool_result("call_1", "18C"),
            Message::assistant("It is 18C."),
        ],
        tools: vec![
            Tool::new(
                "get_weather",
                "Current weather",
                json!({"type": "object", "properties": {"city": {"type": "string"}}}),
            ),
            Tool {
                name: "now".into(),
                description: None,
                parameters: json!({"type": "object", "properties": {}}),
            },
        ],
        tool_choice: Some(ToolChoice::Tool("get_weather".into())),
        temperature: Some(0.5),
        max_tokens: Some(256),
        top_p: Some(0.9),
        stop: vec!["\n\n".into(), "END".into()],
        extra: Extra::new(Dialect::OpenAi, extra),
    };
    assert_eq!(
        parsed,
        ChatCompletionsRequest {
            model: Some("anthropic/claude-3-haiku-20240307".into()),
            stream: true,
            include_usage: true,
            request: expected,
            conversation_id: Some("conv-42".into()),
        }
    );
}

#[test]
fn extra_fields_are_kept_verbatim_in_key_order() {
    let body = json!({
        "messages": user("hi"),
        "seed": 1,
        "zeta": {"nested": [1, 2, {"x": null}]},
        "alpha": "a",
        "logit_bias": {"1": 2},
        "metadata": {"conversation_id": "c", "team": "blue"},
    });
    let source = body.as_object().unwrap().clone();
    let parsed = parse(body).unwrap();
    let extra = &parsed.request.extra;
    assert_eq!(extra.dialect, Some(Dialect::OpenAi));
    // Same keys, in the map's key order, values untouched.
    let mut expected: Vec<&String> = source
        .keys()
        .filter(|k| !matches!(k.as_str(), "messages"))
        .collect();
    expected.sort();
    let keys: Vec<&String> = extra.fields.keys().collect();
    assert_eq!(keys, expected);
    for (key, value) in &extra.fields {
        if key == "metadata" {
            // conversation_id is consumed; the rest of metadata is forwarded.
            assert_eq!(value, &json!({"team": "blue"}));
        } else {
            assert_eq!(value, &source[key]);
        }
    }
    assert_eq!(parsed.conversation_id.as_deref(), Some("c"));
    assert_eq!(extra.for_dialect(Dialect::OpenAi).count(), 5);
    assert_eq!(extra.for_dialect(Dialect::Anthropic).count(), 0);
}

#[test]
fn minimal_request_has_defaults_and_no_extra() {
    let parsed = parse(json!({"model": "default", "messages": user("hi")})).unwrap();
    assert_eq!(parsed.model, None);
    assert!(!parsed.stream);
    assert!(!parsed.include_usage);
    assert_eq!(parsed.conversation_id, None);
    assert_eq!(
        parsed.request,
        CompletionRequest::new(vec![Message::user("hi")])
    );
    assert_eq!(parsed.request.extra, Extra::default());

    let parsed = parse(
        json!({"messages": user("hi"), "model": null, "temperature": null,
        "stop": null, "tools": null, "tool_choice": null, "stream": null}),
    )
    .unwrap();
    assert_eq!(parsed.model, None);
    assert_eq!(
        parsed.request,
        CompletionRequest::new(vec![Message::user("hi")])
    );

    let parsed = parse(json!({"model": "gpt-4o-mini", "messages": user("hi"),
        "max_tokens": 10, "stop": "END"}))
    .unwrap();
    assert_eq!(parsed.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(parsed.request.model, None);
    assert_eq!(parsed.request.max_tokens, Some(10));
    assert_eq!(parsed.request.stop, vec!["END".to_owned()]);
}

#[test]
fn legacy_functions_and_function_call_are_accepted() {
    let parsed = parse(json!({
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "function_call":
                {"name": "f", "arguments": "{\"a\":1}"}},
        ],
        "functions": [{"name": "f", "description": "does f",
            "parameters": {"type": "object"}}],
        "function_call": {"name": "f"},
    }))
    .unwrap();
    assert_eq!(
        parsed.request.tools,
        vec![Tool::new("f", "does f", json!({"type": "object"}))]
    );
    assert_eq!(
        parsed.request.tool_choice,
        Some(ToolChoice::Tool("f".into()))
    );
    assert_eq!(
        parsed.request.messages[1],
        Message::assistant_tool_calls(
            "",
            vec![ToolCall {
                id: "call_legacy_1".into(),
                name: "f".into(),
                arguments: json!({"a": 1}),
            }]
        )
    );
    assert_eq!(parsed.request.extra, Extra::default());
}

#[test]
fn tool_choice_modes_and_argument_edge_cases() {
    for (choice, expected) in [
        ("auto", ToolChoice::Auto),
        ("none", ToolChoice::None),
        ("required", ToolChoice::Required),
    ] {
        let parsed = parse(json!({"messages": user("x"), "tool_choice": choice})).unwrap();
        assert_eq!(parsed.request.tool_choice, Some(expected));
    }
    let parsed = parse(json!({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "n", "arguments": ""}},
        {"id": "b", "type": "function", "function": {"name": "n", "arguments": "not json"}},
    ]}]}))
    .unwrap();
    let Message::Assistant {
        tool_calls,
        content,
    } = &parsed.request.messages[0]
    else {
        panic!("not an assistant message");
    };
    assert_eq!(content, "");
    assert_eq!(tool_calls[0].arguments, json!({}));
    assert_eq!(tool_calls[1].arguments, json!("not json"));
}

#[test]
fn body_errors() {
    let error = parse_chat_request(b"{not json").unwrap_err();
    assert_error(&error, "invalid_json", None);
    assert!(error.message.contains("line 1"), "{}", error.message);
    assert_error(&parse_err(json!([1, 2])), "invalid_type", None);
}

#[test]
fn message_errors_name_their_field() {
    assert_error(
        &parse_err(json!({})),
        "missing_required_parameter",
        Some("messages"),
    );
    assert_error(
        &parse_err(json!({"messages": []})),
        "empty_array",
        Some("messages"),
    );
    assert_error(
        &parse_err(json!({"messages": "hi"})),
        "invalid_type",
        Some("messages"),
    );
    assert_error(
        &parse_err(json!({"messages": [{"role": "user", "content": "a"}, 3]})),
        "invalid_type",
        Some("messages[1]"),
    );
    assert_error(
        &parse_err(json!({"messages": [{"content": "a"}]})),
        "missing_required_parameter",
        Some("messages[0].role"),
    );
    assert_error(
        &parse_err(json!({"messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": 5},
        ]})),
        "invalid_type",
        Some("messages[2].content"),
    );
    assert_error(
        &parse_err(json!({"messages": [{"role": "user", "content": null}]})),
        "missing_required_parameter",
        Some("messages[0].content"),
    );
    assert_error(
        &parse_err(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        ]}]})),
        "unsupported_content",
        Some("messages[0].content"),
    );
    assert_error(
        &parse_err(
            json!({"messages": [{"role": "system", "content": "s"}, {"role": "user",
            "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}),
        ),
        "unsupported_content",
        Some("messages[1].content"),
    );
    assert_error(
        &parse_err(
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}),
        ),
        "invalid_type",
        Some("messages[0].content[0].text"),
    );
    assert_error(
        &parse_err(json!({"messages": [{"role": "function", "name": "f", "content": "r"}]})),
        "unsupported_role",
        Some("messages[0].role"),
    );
    assert_error(
        &parse_err(json!({"messages": [{"role": "robot", "content": "r"}]})),
        "invalid_value",
        Some("messages[0].role"),
    );
    assert_error(
        &parse_err(json!({"messages": [{"role": "tool", "content": "r"}]})),
        "missing_required_parameter",
        Some("messages[0].tool_call_id"),
    );
    assert_error(
        &parse_err(json!({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "n", "arguments": 5}}]}]})),
        "invalid_type",
        Some("messages[0].tool_calls[0].function.arguments"),
    );
    assert_error(
        &parse_err(json!({"messages": [{"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "n", "arguments": "{}"}}]}]})),
        "missing_required_parameter",
        Some("messages[0].tool_calls[0].id"),
    );
}

#[test]
fn sampling_errors_name_their_field() {
    let with = |field: &str, value: Value| {
        let mut body = json!({"messages": user("hi")});
        body[field] = value;
        parse_err(body)
    };
    assert_error(
        &with("temperature", json!("hot")),
        "invalid_type",
        Some("temperature"),
    );
    assert_error(
        &with("temperature", json!(2.5)),
        "invalid_value",
        Some("temperature"),
    );
    assert_error(
        &with("temperature", json!(-0.1)),
        "invalid_value",
        Some("temperature"),
    );
    assert_error(&with("top_p", json!(1.5)), "invalid_value", Some("top_p"));
    assert_error(&with("top_p", json!(true)), "invalid_type", Some("top_p"));
    assert_error(
        &with("max_tokens", json!(0)),
        "invalid_value",
        Some("max_tokens"),
    );
    assert_error(
        &with("max_tokens", json!(-3)),
        "invalid_value",
        Some("max_tokens"),
    );
    assert_error(
        &with("max_tokens", json!(1.5)),
        "invalid_type",
        Some("max_tokens"),
    );
    assert_error(
        &with("max_completion_tokens", json!(0)),
        "invalid_value",
        Some("max_completion_tokens"),
    );
    assert_error(&with("stop", json!(3)), "invalid_type", Some("stop"));
    assert_error(
        &with("stop", json!(["a", 3])),
        "invalid_type",
        Some("stop[1]"),
    );
    assert_error(
        &with("stream", json!("yes")),
        "invalid_type",
        Some("stream"),
    );
    assert_error(
        &with("stream_options", json!({"include_usage": 1})),
        "invalid_type",
        Some("stream_options.include_usage"),
    );
    assert_error(&with("model", json!(4)), "invalid_type", Some("model"));
    assert_error(
        &with("metadata", json!({"conversation_id": 9})),
        "invalid_type",
        Some("metadata.conversation_id"),
    );
    assert_error(&with("tools", json!({})), "invalid_type", Some("tools"));
    assert_error(
        &with(
            "tools",
            json!([{"type": "function", "function": {"description": "x"}}]),
        ),
        "missing_required_parameter",
        Some("tools[0].function.name"),
    );
    assert_error(
        &with("tools", json!([{"type": "web_search"}])),
        "invalid_value",
        Some("tools[0].type"),
    );
    assert_error(
        &with("tool_choice", json!("maybe")),
        "invalid_value",
        Some("tool_choice"),
    );
    assert_error(
        &with("tool_choice", json!(1)),
        "invalid_type",
        Some("tool_choice"),
    );
    // The edges of the ranges are fine.
    let mut body = json!({"messages": user("hi"), "temperature": 2, "top_p": 0});
    body["max_tokens"] = json!(u32::MAX);
    let parsed = parse(body).unwrap();
    assert_eq!(parsed.request.temperature, Some(2.0));
    assert_eq!(parsed.request.top_p, Some(0.0));
    assert_eq!(parsed.request.max_tokens, Some(u32::MAX));
    assert_error(
        &with("max_tokens", json!(u64::from(u32::MAX) + 1)),
        "invalid_value",
        Some("max_tokens"),
    );
}

fn response(content: &str, tool_calls: Vec<ToolCall>, reason: FinishReason) -> CompletionResponse {
    CompletionResponse {
        id: "up-1".into(),
        message: AssistantMessage {
            content: content.into(),
            tool_calls,
        },
        finish_reason: reason,
        usage: Usage {
            input_tokens: 10,
            output_tokens: 5,
        },
        model: "upstream-model".into(),
        provider: ProviderKind::Anthropic,
    }
}

#[test]
fn completion_json_text_shape() {
    let value = completion_json(
        &response("Hello!", vec![], FinishReason::Stop),
        "chatcmpl-1",
        1_700_000_000,
        "gpt-4o-mini",
        Some("0.000123"),
    );
    assert_eq!(
        value,
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!", "refusal": null},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                "cost_usd": "0.000123"},
            "system_fingerprint": null,
        })
    );
}

#[test]
fn completion_json_tool_only_has_null_content() {
    let calls = vec![
        ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: json!({"city": "Paris"}),
        },
        ToolCall {
            id: "call_2".into(),
            name: "raw".into(),
            arguments: json!("not json"),
        },
    ];
    let value = completion_json(
        &response("", calls, FinishReason::ToolCalls),
        "id",
        1,
        "m",
        None,
    );
    let choice = &value["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    assert_eq!(
        choice["message"]["tool_calls"],
        json!([
            {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_2", "type": "function",
                "function": {"name": "raw", "arguments": "not json"}},
        ])
    );
    assert_eq!(
        value["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
    );
    // Empty text without tools is "", not null; the unified `error` reads as `stop`.
    let value = completion_json(
        &response("", vec![], FinishReason::Error),
        "id",
        1,
        "m",
        None,
    );
    assert_eq!(value["choices"][0]["message"]["content"], "");
    assert!(value["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(value["choices"][0]["finish_reason"], "stop");
    for (reason, name) in [
        (FinishReason::Length, "length"),
        (FinishReason::ContentFilter, "content_filter"),
    ] {
        let value = completion_json(&response("x", vec![], reason), "id", 1, "m", None);
        assert_eq!(value["choices"][0]["finish_reason"], name);
    }
}

fn stream_chunks() -> Vec<StreamChunk> {
    vec![
        StreamChunk::TextDelta {
            text: "Let me ".into(),
        },
        StreamChunk::TextDelta {
            text: String::new(),
        },
        StreamChunk::TextDelta {
            text: "check.".into(),
        },
        StreamChunk::ToolCallDelta {
            index: 1,
            id: Some("call_a".into()),
            name: Some("get_weather".into()),
            arguments: String::new(),
        },
        StreamChunk::ToolCallDelta {
            index: 1,
            id: None,
            name: None,
            arguments: "{\"city\":".into(),
        },
        StreamChunk::ToolCallDelta {
            index: 1,
            id: None,
            name: None,
            arguments: "\"Paris\"}".into(),
        },
        StreamChunk::ToolCallDelta {
            index: 2,
            id: Some("call_b".into()),
            name: Some("now".into()),
            arguments: "{}".into(),
        },
        StreamChunk::Usage {
            usage: Usage {
                input_tokens: 12,
                output_tokens: 7,
            },
        },
        StreamChunk::Finish {
            reason: FinishReason::ToolCalls,
        },
    ]
}

/// Folds OpenAI chunks the way the official SDKs do.
fn fold_openai(chunks: &[Value]) -> (String, Vec<(String, String, String)>, Option<String>) {
    let mut text = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    for chunk in chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            let delta = &choice["delta"];
            if let Some(t) = delta["content"].as_str() {
                text.push_str(t);
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = usize::try_from(call["index"].as_u64().unwrap()).unwrap();
                if index == calls.len() {
                    calls.push(Default::default());
                }
                let entry = &mut calls[index];
                if let Some(id) = call["id"].as_str() {
                    entry.0 = id.to_owned();
                }
                if let Some(name) = call["function"]["name"].as_str() {
                    entry.1.push_str(name);
                }
                entry
                    .2
                    .push_str(call["function"]["arguments"].as_str().unwrap());
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(reason.to_owned());
            }
        }
    }
    (text, calls, finish)
}

/// The JSON of SSE events, each checked to be one `data: {json}\n\n` event.
fn events(frames: Vec<Bytes>) -> Vec<Value> {
    frames
        .iter()
        .map(|frame| {
            let text = std::str::from_utf8(frame).unwrap();
            assert!(
                text.starts_with("data: {") && text.ends_with("}\n\n"),
                "{text}"
            );
            assert_eq!(text.matches('\n').count(), 2, "{text}");
            serde_json::from_str(&text[6..text.len() - 2]).unwrap()
        })
        .collect()
}

#[test]
fn stream_reconstructs_text_and_tool_calls() {
    let mut encoder = ChunkEncoder::new("chatcmpl-9", 1_700_000_001, "gpt-4o", true);
    let mut out = Vec::new();
    let mut accumulator = StreamAccumulator::new();
    for chunk in stream_chunks() {
        accumulator.push(&chunk);
        out.extend(events(encoder.encode(&chunk)));
    }
    assert!(encoder.is_finished());
    let usage = encoder.usage().unwrap();
    let last = encoder.finish_usage(usage, Some("0.0002")).unwrap();
    out.extend(events(vec![last.clone()]));
    assert_eq!(encoder.finish_usage(usage, None), None);

    // role, 2 text, 3 + 1 tool deltas, finish, usage.
    assert_eq!(out.len(), 9);
    for chunk in &out {
        assert_eq!(chunk["id"], "chatcmpl-9");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["created"], 1_700_000_001);
        assert_eq!(chunk["model"], "gpt-4o");
        assert_eq!(chunk["system_fingerprint"], Value::Null);
    }
    assert_eq!(
        out[0]["choices"],
        json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null},
            "logprobs": null, "finish_reason": null}])
    );
    assert_eq!(out[0]["usage"], Value::Null);
    assert_eq!(out[1]["choices"][0]["delta"], json!({"content": "Let me "}));
    assert_eq!(
        out[3]["choices"][0]["delta"],
        json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
            "function": {"name": "get_weather", "arguments": ""}}]})
    );
    assert_eq!(
        out[4]["choices"][0]["delta"],
        json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]})
    );
    assert_eq!(
        out[7]["choices"],
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "tool_calls"}])
    );
    assert_eq!(out[8]["choices"], json!([]));
    assert_eq!(
        out[8]["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19,
            "cost_usd": "0.0002"})
    );

    let (text, calls, finish) = fold_openai(&out);
    let expected = accumulator.into_response("x", "m", ProviderKind::OpenAi);
    assert_eq!(text, expected.message.content);
    assert_eq!(text, "Let me check.");
    assert_eq!(calls.len(), expected.message.tool_calls.len());
    for ((id, name, arguments), call) in calls.iter().zip(&expected.message.tool_calls) {
        assert_eq!(id, &call.id);
        assert_eq!(name, &call.name);
        assert_eq!(parse_arguments(arguments), call.arguments);
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));

    // The events as written, fields in OpenAI's order; text escaped.
    let mut encoder = ChunkEncoder::new("chatcmpl-9", 1_700_000_001, "gpt-\"4o\"", true);
    let frames = encoder.encode(&StreamChunk::TextDelta {
        text: "a \"quote\"\n".into(),
    });
    let head = r#"data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1700000001,"model":"gpt-\"4o\"","system_fingerprint":null,"choices":"#;
    assert_eq!(frames.len(), 2);
    assert_eq!(
        std::str::from_utf8(&frames[1]).unwrap(),
        format!(
            r#"{head}[{{"index":0,"delta":{{"content":"a \"quote\"\n"}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
        ) + "\n\n"
    );
    assert_eq!(
        std::str::from_utf8(&last).unwrap(),
        r#"data: {"id":"chatcmpl-9","object":"chat.completion.chunk","created":1700000001,"model":"gpt-4o","system_fingerprint":null,"choices":[],"usage":{"completion_tokens":7,"cost_usd":"0.0002","prompt_tokens":12,"total_tokens":19}}"#
            .to_owned()
            + "\n\n"
    );

    // Other values (error events) in the same framing.
    let error = ChunkEncoder::error_event("line\nbreak", "upstream_timeout");
    assert_eq!(events(vec![sse_data(&error)]), vec![error]);
    assert_eq!(SSE_DONE, b"data: [DONE]\n\n");
}

#[test]
fn stream_without_usage_option() {
    let mut encoder = ChunkEncoder::new("id", 0, "m", false);
    let mut out = Vec::new();
    for chunk in stream_chunks() {
        out.extend(events(encoder.encode(&chunk)));
    }
    assert!(out.iter().all(|c| c.get("usage").is_none()));
    assert_eq!(encoder.finish_usage(Usage::default(), Some("0")), None);
    // A repeated finish sends nothing.
    assert!(
        encoder
            .encode(&StreamChunk::Finish {
                reason: FinishReason::Stop
            })
            .is_empty()
    );

    // A stream that only finishes still opens with the role chunk; `error` reads as `stop`.
    let mut encoder = ChunkEncoder::new("id", 0, "m", false);
    let out = events(encoder.encode(&StreamChunk::Finish {
        reason: FinishReason::Error,
    }));
    assert_eq!(out.len(), 2);
    assert_eq!(out[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(out[1]["choices"][0]["finish_reason"], "stop");

    // A tool call whose first delta has no id gets one.
    let mut encoder = ChunkEncoder::new("cmpl", 0, "m", false);
    let out = events(encoder.encode(&StreamChunk::ToolCallDelta {
        index: 0,
        id: None,
        name: Some("f".into()),
        arguments: "{}".into(),
    }));
    let call = &out[1]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(call["id"], "call_0_cmpl");
    assert_eq!(call["type"], "function");
}

#[test]
fn stream_error_events() {
    assert_eq!(
        ChunkEncoder::error_event("upstream timed out", "upstream_timeout"),
        json!({"error": {"message": "upstream timed out", "type": "api_error",
            "code": "upstream_timeout", "param": null}})
    );
    let error = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow down");
    assert_eq!(
        ChunkEncoder::api_error_event(&error),
        json!({"error": {"message": "slow down", "type": "rate_limit_error",
            "code": "rate_limited", "param": null}})
    );
}

fn parse_embeddings(body: Value) -> Result<EmbeddingsRequest, ApiError> {
    parse_embeddings_request(body.to_string().as_bytes())
}

#[test]
fn embeddings_requests() {
    let parsed = parse_embeddings(json!({"model": "text-embedding-3-small", "input": "hello",
        "user": "u"}))
    .unwrap();
    assert_eq!(parsed.model.as_deref(), Some("text-embedding-3-small"));
    assert!(!parsed.base64);
    assert_eq!(parsed.request, EmbeddingRequest::new(vec!["hello".into()]));

    let parsed = parse_embeddings(json!({"model": "default", "input": ["a", "b"],
        "dimensions": 256, "encoding_format": "base64", "custom": 1}))
    .unwrap();
    assert_eq!(parsed.model, None);
    assert!(parsed.base64);
    assert_eq!(parsed.request.input, vec!["a".to_owned(), "b".to_owned()]);
    assert_eq!(parsed.request.dimensions, Some(256));
    let mut extra = Map::new();
    extra.insert("custom".into(), json!(1));
    assert_eq!(parsed.request.extra, Extra::new(Dialect::OpenAi, extra));

    let err = |body: Value| parse_embeddings(body).unwrap_err();
    assert_error(&err(json!({})), "missing_required_parameter", Some("input"));
    assert_error(&err(json!({"input": []})), "empty_array", Some("input"));
    assert_error(
        &err(json!({"input": [1, 2, 3]})),
        "unsupported_input",
        Some("input"),
    );
    assert_error(
        &err(json!({"input": [[1, 2]]})),
        "unsupported_input",
        Some("input"),
    );
    assert_error(&err(json!({"input": 5})), "invalid_type", Some("input"));
    assert_error(
        &err(json!({"input": ["a", {}]})),
        "invalid_type",
        Some("input[1]"),
    );
    assert_error(
        &err(json!({"input": ["a", ""]})),
        "invalid_value",
        Some("input[1]"),
    );
    assert_error(
        &err(json!({"input": "a", "dimensions": 0})),
        "invalid_value",
        Some("dimensions"),
    );
    assert_error(
        &err(json!({"input": "a", "encoding_format": "int8"})),
        "invalid_value",
        Some("encoding_format"),
    );
    assert_error(
        &parse_embeddings_request(b"nope").unwrap_err(),
        "invalid_json",
        None,
    );
}

#[test]
fn embeddings_json_both_encodings() {
    let response = EmbeddingResponse {
        embeddings: vec![vec![0.1, -2.5, 3.0e-7], vec![1.0, 0.0, -0.333]],
        model: "upstream".into(),
        provider: ProviderKind::OpenAi,
        embedding_tokens: 8,
    };
    let value = embeddings_json(
        &response,
        "text-embedding-3-small",
        Some("0.0000002"),
        false,
    );
    assert_eq!(
        value,
        json!({
            "object": "list",
            "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, -2.5, 3.0e-7]},
                {"object": "embedding", "index": 1, "embedding": [1.0, 0.0, -0.333]},
            ],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8, "total_tokens": 8, "cost_usd": "0.0000002"},
        })
    );
    // Floats survive the JSON round trip exactly.
    for (i, vector) in response.embeddings.iter().enumerate() {
        let back: Vec<f32> = serde_json::from_value(value["data"][i]["embedding"].clone()).unwrap();
        assert_eq!(&back, vector);
    }

    let value = embeddings_json(&response, "m", None, true);
    assert_eq!(
        value["usage"],
        json!({"prompt_tokens": 8, "total_tokens": 8})
    );
    for (i, vector) in response.embeddings.iter().enumerate() {
        let item = &value["data"][i];
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(item["embedding"].as_str().unwrap())
            .unwrap();
        let floats: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(&floats, vector);
    }
}

#[test]
fn models_list() {
    assert_eq!(
        models_json(&[
            ("gpt-4o-mini".into(), "openai".into()),
            (
                "anthropic/claude-3-haiku-20240307".into(),
                "anthropic".into()
            ),
        ]),
        json!({"object": "list", "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "openai"},
            {"id": "anthropic/claude-3-haiku-20240307", "object": "model", "created": 0,
                "owned_by": "anthropic"},
        ]})
    );
    assert_eq!(models_json(&[]), json!({"object": "list", "data": []}));
}

// ---------------------------------------------------------------------------------------
// The typed reader of common requests against the tree parser.

mod fast_path {
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::super::{fast, parse_chat_request_tree};

    /// Values for a field: the right types, edge values and wrong types.
    fn value_from(choices: Vec<Value>) -> impl Strategy<Value = Value> {
        prop::sample::select(choices)
    }

    fn text() -> impl Strategy<Value = Value> {
        value_from(vec![
            json!("Hello"),
            json!(""),
            json!("quote \" and \\ and \n and é and \u{1F600}"),
            json!(null),
            json!(5),
            json!(true),
            json!([{"type": "text", "text": "part"}]),
            json!({"text": "x"}),
        ])
    }

    fn message() -> impl Strategy<Value = Value> {
        (
            value_from(vec![
                json!("system"),
                json!("developer"),
                json!("user"),
                json!("assistant"),
                json!("tool"),
                json!("function"),
                json!("robot"),
                json!(null),
                json!(3),
            ]),
            prop::option::of(text()),
            prop::option::of(value_from(vec![json!("call_1"), json!(null), json!(7)])),
            prop::option::of(value_from(vec![
                json!(null),
                json!([]),
                json!([{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
            ])),
            prop::option::of(value_from(vec![json!(null), json!({"name": "f"})])),
            prop::option::of(value_from(vec![json!("Ann"), json!(null)])),
        )
            .prop_map(|(role, content, call_id, calls, legacy, name)| {
                let mut m = Map::new();
                m.insert("role".into(), role);
                for (key, value) in [
                    ("content", content),
                    ("tool_call_id", call_id),
                    ("tool_calls", calls),
                    ("function_call", legacy),
                    ("name", name),
                ] {
                    if let Some(value) = value {
                        m.insert(key.into(), value);
                    }
                }
                Value::Object(m)
            })
    }

    fn field() -> impl Strategy<Value = (&'static str, Value)> {
        let number = || {
            value_from(vec![
                json!(0),
                json!(1),
                json!(256),
                json!(4_294_967_295_u64),
                json!(4_294_967_296_u64),
                json!(-1),
                json!(0.5),
                json!(1.5),
                json!(2.5),
                json!(256.0),
                json!(null),
                json!("7"),
            ])
        };
        prop_oneof![
            value_from(vec![
                json!("gpt-4o-mini"),
                json!("default"),
                json!(""),
                json!(null),
                json!(4)
            ])
            .prop_map(|v| ("model", v)),
            number().prop_map(|v| ("max_tokens", v)),
            number().prop_map(|v| ("max_completion_tokens", v)),
            number().prop_map(|v| ("temperature", v)),
            number().prop_map(|v| ("top_p", v)),
            value_from(vec![
                json!("END"),
                json!(["a", "b"]),
                json!([]),
                json!(["a", null]),
                json!(null),
                json!(3)
            ])
            .prop_map(|v| ("stop", v)),
            value_from(vec![json!(true), json!(false), json!(null), json!("yes")])
                .prop_map(|v| ("stream", v)),
            value_from(vec![
                json!({"include_usage": true}),
                json!({"include_usage": null}),
                json!({"other": 1}),
                json!(null),
                json!(true)
            ])
            .prop_map(|v| ("stream_options", v)),
            value_from(vec![json!({"conversation_id": "c-1"}), json!(null)])
                .prop_map(|v| ("metadata", v)),
            value_from(vec![json!("user-1"), json!(null)]).prop_map(|v| ("user", v)),
            value_from(vec![json!([]), json!(null), json!("auto")]).prop_map(|v| ("tools", v)),
            value_from(vec![json!("auto"), json!(null)]).prop_map(|v| ("tool_choice", v)),
        ]
    }

    fn request() -> impl Strategy<Value = Value> {
        (
            prop::option::of(prop_oneof![
                prop::collection::vec(message(), 0..4).prop_map(Value::Array),
                value_from(vec![json!(null), json!("hi"), json!({})]),
            ]),
            prop::collection::vec(field(), 0..6),
        )
            .prop_map(|(messages, fields)| {
                let mut body = Map::new();
                if let Some(messages) = messages {
                    body.insert("messages".into(), messages);
                }
                body.extend(fields.into_iter().map(|(k, v)| (k.to_owned(), v)));
                Value::Object(body)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Whenever the typed reader accepts a request, the tree parser reads the same.
        #[test]
        fn the_typed_reader_agrees_with_the_tree_parser(body in request()) {
            let text = body.to_string();
            if let Some(fast) = fast::parse(text.as_bytes()) {
                let tree = parse_chat_request_tree(text.as_bytes());
                prop_assert_eq!(Ok(&fast), tree.as_ref().map_err(|e| &e.message), "{}", text);
            }
        }
    }

    #[test]
    fn common_requests_take_the_typed_reader() {
        for body in [
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}),
            json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi", "name": "ann"},
                    {"role": "assistant", "content": "Hello", "tool_calls": null},
                    {"role": "tool", "tool_call_id": "call_1", "content": "{}"},
                ],
                "max_tokens": 256,
                "temperature": 0.2,
                "top_p": 1,
                "stop": ["\n\n"],
                "stream": true,
                "stream_options": {"include_usage": true},
            }),
        ] {
            let text = body.to_string();
            let fast = fast::parse(text.as_bytes()).expect("the typed reader takes it");
            assert_eq!(
                Ok(fast),
                parse_chat_request_tree(text.as_bytes()).map_err(|e| e.message)
            );
        }
    }

    #[test]
    fn other_requests_go_to_the_tree_parser() {
        for body in [
            "not json".to_owned(),
            json!([1]).to_string(),
            json!({"messages": []}).to_string(),
            json!({"messages": [{"role": "user", "content": "a"}], "user": "u"}).to_string(),
            json!({"messages": [{"role": "user", "content": "a"}], "tools": []}).to_string(),
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]})
                .to_string(),
            json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}).to_string(),
            json!({"messages": [{"role": "user", "content": "a"}], "temperature": 3}).to_string(),
            r#"{"messages": [{"role": "user", "content": "a"}], "model": "a", "model": "b"}"#
                .to_owned(),
        ] {
            assert!(fast::parse(body.as_bytes()).is_none(), "{body}");
        }
    }
}
