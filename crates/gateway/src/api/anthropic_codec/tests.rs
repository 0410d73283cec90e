use std::sync::OnceLock;

use axum::http::StatusCode;
use futures::StreamExt;
use meta_chat_llm::providers::AnthropicProvider;
use meta_chat_llm::types::{AssistantMessage, ProviderKind, StreamAccumulator};
use meta_chat_llm::{LlmProvider, ProviderConfig};
use meta_chat_testkit::{FakeServer, Reply};
use proptest::prelude::*;
use serde_json::json;

use super::*;

// ---------------------------------------------------------------------------------------
// Helpers.

fn parse(body: Value) -> Result<MessagesRequest, ApiError> {
    parse_messages_request(body.to_string().as_bytes())
}

fn parse_ok(body: Value) -> MessagesRequest {
    match parse(body) {
        Ok(parsed) => parsed,
        Err(error) => panic!("expected a request, got {error:?}"),
    }
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

/// A minimal valid body with these messages.
fn body_with(messages: Value) -> Value {
    json!({"model": "claude-3-5-haiku-latest", "max_tokens": 64, "messages": messages})
}

fn hi() -> Value {
    json!([{"role": "user", "content": "hi"}])
}

fn call(id: &str, name: &str, arguments: Value) -> ToolCall {
    ToolCall {
        id: id.into(),
        name: name.into(),
        arguments,
    }
}

// ---------------------------------------------------------------------------------------
// Requests.

#[test]
fn parses_a_rich_request_exactly() {
    let body = json!({
        "model": "openai/gpt-4o-mini",
        "max_tokens": 512,
        "system": [
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": ""},
            {"type": "text", "text": "Use tools."},
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in "},
                {"type": "text", "text": "Paris and Rome?"},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "two cities", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Checking "},
                {"type": "text", "text": "both."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather",
                 "input": {"city": "Rome", "units": {"temp": "C"}}, "cache_control": null},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true,
                 "content": [{"type": "text", "text": "Timeout"},
                             {"type": "text", "text": "retry later"}]},
                {"type": "text", "text": "Summarise."},
            ]},
            {"role": "assistant", "content": "Paris 18C; Rome unknown."},
            {"role": "user", "content": [
                {"type": "text", "text": "Thanks"},
                {"type": "tool_result", "tool_use_id": "toolu_3"},
                {"type": "text", "text": "Bye"},
            ]},
        ],
        "tools": [
            {"name": "get_weather", "description": "Current weather",
             "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
             "cache_control": {"type": "ephemeral"}},
            {"type": "custom", "name": "now", "input_schema": {"type": "object"}},
        ],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
        "stop_sequences": ["\n\nHuman:", "END"],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "metadata": {"user_id": "u-1", "conversation_id": " conv-42 "},
        "stream": true,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "service_tier": "auto",
    });
    let parsed = parse_ok(body);

    let mut extra = Map::new();
    extra.insert("top_k".into(), json!(40));
    extra.insert("metadata".into(), json!({"user_id": "u-1"}));
    extra.insert(
        "thinking".into(),
        json!({"type": "enabled", "budget_tokens": 1024}),
    );
    extra.insert("service_tier".into(), json!("auto"));

    let expected = CompletionRequest {
        model: None,
        messages: vec![
            Message::system("Be brief."),
            Message::system("Use tools."),
            Message::user("Weather in "),
            Message::user("Paris and Rome?"),
            Message::assistant_tool_calls(
                "Checking both.",
                vec![
                    call("toolu_1", "get_weather", json!({"city": "Paris"})),
                    call(
                        "toolu_2",
                        "get_weather",
                        json!({"city": "Rome", "units": {"temp": "C"}}),
                    ),
                ],
            ),
            Message::tool_result("toolu_1", "18C"),
            Message::tool_result("toolu_2", "Timeout\n\nretry later"),
            Message::user("Summarise."),
            Message::assistant("Paris 18C; Rome unknown."),
            Message::user("Thanks"),
            Message::tool_result("toolu_3", ""),
            Message::user("Bye"),
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
                parameters: json!({"type": "object"}),
            },
        ],
        tool_choice: Some(ToolChoice::Tool("get_weather".into())),
        temperature: Some(0.5),
        max_tokens: Some(512),
        top_p: Some(0.9),
        stop: vec!["\n\nHuman:".into(), "END".into()],
        extra: Extra::new(Dialect::Anthropic, extra),
    };
    assert_eq!(
        parsed,
        MessagesRequest {
            request: expected,
            stream: true,
            model: Some("openai/gpt-4o-mini".into()),
            conversation_id: Some("conv-42".into()),
        }
    );
}

#[test]
fn minimal_request_has_defaults_and_no_extra() {
    let parsed = parse_ok(json!({
        "model": "default",
        "max_tokens": 1,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": null,
        "metadata": {"conversation_id": "c"},
    }));
    assert_eq!(parsed.model, None);
    assert!(!parsed.stream);
    assert_eq!(parsed.conversation_id.as_deref(), Some("c"));
    assert_eq!(
        parsed.request,
        CompletionRequest {
            messages: vec![Message::system("You are terse."), Message::user("hi")],
            max_tokens: Some(1),
            ..CompletionRequest::default()
        }
    );
    assert_eq!(parsed.request.extra, Extra::default());

    // No model at all, an empty system and empty contents.
    let parsed = parse_ok(json!({
        "max_tokens": 5,
        "system": "",
        "messages": [
            {"role": "user", "content": []},
            {"role": "assistant", "content": []},
            {"role": "user", "content": ""},
        ],
    }));
    assert_eq!(parsed.model, None);
    assert_eq!(
        parsed.request.messages,
        vec![Message::user(""), Message::assistant(""), Message::user("")]
    );
}

#[test]
fn tool_choice_modes() {
    for (choice, expected) in [
        (json!({"type": "auto"}), ToolChoice::Auto),
        (json!({"type": "any"}), ToolChoice::Required),
        (json!({"type": "none"}), ToolChoice::None),
        (
            json!({"type": "tool", "name": "x"}),
            ToolChoice::Tool("x".into()),
        ),
        (
            json!({"type": "auto", "disable_parallel_tool_use": false}),
            ToolChoice::Auto,
        ),
    ] {
        let mut body = body_with(hi());
        body["tool_choice"] = choice;
        assert_eq!(parse_ok(body).request.tool_choice, Some(expected));
    }
    let mut body = body_with(hi());
    body["tool_choice"] = Value::Null;
    assert_eq!(parse_ok(body).request.tool_choice, None);
}

#[test]
fn tool_use_without_input_gets_an_empty_object() {
    let parsed = parse_ok(body_with(json!([
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "now"}]},
    ])));
    assert_eq!(
        parsed.request.messages[1],
        Message::assistant_tool_calls("", vec![call("t", "now", json!({}))])
    );
}

#[test]
fn count_tokens_does_not_require_max_tokens() {
    let body = json!({"model": "claude", "messages": hi(), "system": "s"});
    let parsed = match count_tokens_request(body.to_string().as_bytes()) {
        Ok(parsed) => parsed,
        Err(error) => panic!("{error:?}"),
    };
    assert_eq!(parsed.model.as_deref(), Some("claude"));
    assert_eq!(
        parsed.request.messages,
        vec![Message::system("s"), Message::user("hi")]
    );
    assert_eq!(parsed.request.max_tokens, None);
    // The messages endpoint requires it, as Anthropic does.
    assert_error(
        &parse_err(body),
        "missing_required_parameter",
        Some("max_tokens"),
    );
    // Everything else is validated the same way.
    let Err(error) = count_tokens_request(br#"{"messages": [], "max_tokens": 0}"#) else {
        panic!("expected an error");
    };
    assert_error(&error, "invalid_value", Some("max_tokens"));
    let Err(error) = count_tokens_request(br#"{"max_tokens": 3}"#) else {
        panic!("expected an error");
    };
    assert_error(&error, "missing_required_parameter", Some("messages"));
}

#[test]
fn body_errors() {
    let Err(error) = parse_messages_request(b"{not json") else {
        panic!("expected an error");
    };
    assert_error(&error, "invalid_json", None);
    let Err(error) = parse_messages_request(b"[1]") else {
        panic!("expected an error");
    };
    assert_error(&error, "invalid_type", None);
}

#[test]
fn errors_name_their_field() {
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"model": "m", "messages": hi()}),
            "missing_required_parameter",
            "max_tokens",
        ),
        (
            json!({"max_tokens": 0, "messages": hi()}),
            "invalid_value",
            "max_tokens",
        ),
        (
            json!({"max_tokens": 1.5, "messages": hi()}),
            "invalid_type",
            "max_tokens",
        ),
        (
            json!({"max_tokens": 5_000_000_000_u64, "messages": hi()}),
            "invalid_value",
            "max_tokens",
        ),
        (
            json!({"max_tokens": 5}),
            "missing_required_parameter",
            "messages",
        ),
        (
            json!({"max_tokens": 5, "messages": []}),
            "empty_array",
            "messages",
        ),
        (
            json!({"max_tokens": 5, "messages": "hi"}),
            "invalid_type",
            "messages",
        ),
        (
            json!({"max_tokens": 5, "messages": hi(), "model": 3}),
            "invalid_type",
            "model",
        ),
        (body_with(json!(["hi"])), "invalid_type", "messages.0"),
        (
            body_with(json!([{"content": "hi"}])),
            "missing_required_parameter",
            "messages.0.role",
        ),
        (
            body_with(json!([{"role": "system", "content": "hi"}])),
            "invalid_value",
            "messages.0.role",
        ),
        (
            body_with(json!([{"role": "tool", "content": "hi"}])),
            "invalid_value",
            "messages.0.role",
        ),
        (
            body_with(json!([{"role": "user"}])),
            "missing_required_parameter",
            "messages.0.content",
        ),
        (
            body_with(json!([{"role": "user", "content": 7}])),
            "invalid_type",
            "messages.0.content",
        ),
        (
            body_with(json!([{"role": "user", "content": ["hi"]}])),
            "invalid_type",
            "messages.0.content.0",
        ),
        (
            body_with(json!([{"role": "user", "content": [{"text": "hi"}]}])),
            "missing_required_parameter",
            "messages.0.content.0.type",
        ),
        (
            body_with(json!([{"role": "user", "content": [{"type": "text"}]}])),
            "missing_required_parameter",
            "messages.0.content.0.text",
        ),
        (
            body_with(json!([
                {"role": "user", "content": "look"},
                {"role": "user", "content": [
                    {"type": "text", "text": "this:"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                 "data": "iVBORw0KGgo="}},
                ]},
            ])),
            "unsupported_content",
            "messages.1.content.1.type",
        ),
        (
            body_with(json!([{"role": "user", "content": [
                {"type": "document", "source": {"type": "text", "data": "x"}},
            ]}])),
            "unsupported_content",
            "messages.0.content.0.type",
        ),
        (
            body_with(json!([{"role": "user", "content": [{"type": "hologram"}]}])),
            "unsupported_content",
            "messages.0.content.0.type",
        ),
        (
            body_with(json!([{"role": "user", "content": [
                {"type": "tool_use", "id": "t", "name": "n", "input": {}},
            ]}])),
            "invalid_value",
            "messages.0.content.0.type",
        ),
        (
            body_with(json!([{"role": "user", "content": [{"type": "tool_result"}]}])),
            "missing_required_parameter",
            "messages.0.content.0.tool_use_id",
        ),
        (
            body_with(json!([{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t", "is_error": "yes"},
            ]}])),
            "invalid_type",
            "messages.0.content.0.is_error",
        ),
        (
            body_with(json!([{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t", "content": 5},
            ]}])),
            "invalid_type",
            "messages.0.content.0.content",
        ),
        (
            body_with(json!([{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t", "content": [
                    {"type": "text", "text": "a"},
                    {"type": "image", "source": {}},
                ]},
            ]}])),
            "unsupported_content",
            "messages.0.content.0.content.1.type",
        ),
        (
            body_with(json!([
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "tool_use", "name": "n"}]},
            ])),
            "missing_required_parameter",
            "messages.1.content.0.id",
        ),
        (
            body_with(json!([
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t"}]},
            ])),
            "missing_required_parameter",
            "messages.1.content.0.name",
        ),
        (
            body_with(json!([
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "t", "name": "n", "input": "{}"},
                ]},
            ])),
            "invalid_type",
            "messages.1.content.0.input",
        ),
        (
            body_with(json!([
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
            ])),
            "invalid_value",
            "messages.1.content.0.type",
        ),
        (
            body_with(json!([
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "image", "source": {}}]},
            ])),
            "unsupported_content",
            "messages.1.content.0.type",
        ),
    ];
    for (body, code, param) in cases {
        let error = parse_err(body.clone());
        assert_error(&error, code, Some(param));
        assert!(
            error_json(&error)["error"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(&format!("{param}: "))),
            "{body}: {error:?}"
        );
    }
}

#[test]
fn top_level_errors_name_their_field() {
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("system", json!(5), "invalid_type", "system"),
        (
            "system",
            json!([{"type": "image"}]),
            "invalid_value",
            "system.0.type",
        ),
        (
            "system",
            json!([{"type": "text"}]),
            "missing_required_parameter",
            "system.0.text",
        ),
        ("system", json!(["s"]), "invalid_type", "system.0"),
        ("tools", json!({}), "invalid_type", "tools"),
        ("tools", json!([1]), "invalid_type", "tools.0"),
        (
            "tools",
            json!([{"input_schema": {"type": "object"}}]),
            "missing_required_parameter",
            "tools.0.name",
        ),
        (
            "tools",
            json!([{"name": "a", "input_schema": {}}, {"name": "b"}]),
            "missing_required_parameter",
            "tools.1.input_schema",
        ),
        (
            "tools",
            json!([{"name": "a", "input_schema": "{}"}]),
            "invalid_type",
            "tools.0.input_schema",
        ),
        (
            "tools",
            json!([{"name": "a", "description": 1, "input_schema": {}}]),
            "invalid_type",
            "tools.0.description",
        ),
        (
            "tools",
            json!([{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]),
            "unsupported_tool",
            "tools.0.type",
        ),
        ("tool_choice", json!("auto"), "invalid_type", "tool_choice"),
        (
            "tool_choice",
            json!({}),
            "missing_required_parameter",
            "tool_choice.type",
        ),
        (
            "tool_choice",
            json!({"type": "required"}),
            "invalid_value",
            "tool_choice.type",
        ),
        (
            "tool_choice",
            json!({"type": "tool"}),
            "missing_required_parameter",
            "tool_choice.name",
        ),
        (
            "tool_choice",
            json!({"type": "auto", "disable_parallel_tool_use": 1}),
            "invalid_type",
            "tool_choice.disable_parallel_tool_use",
        ),
        (
            "stop_sequences",
            json!("END"),
            "invalid_type",
            "stop_sequences",
        ),
        (
            "stop_sequences",
            json!(["a", 1]),
            "invalid_type",
            "stop_sequences.1",
        ),
        ("temperature", json!(1.5), "invalid_value", "temperature"),
        ("temperature", json!(-0.1), "invalid_value", "temperature"),
        ("temperature", json!("hot"), "invalid_type", "temperature"),
        ("top_p", json!(2), "invalid_value", "top_p"),
        ("top_k", json!(-1), "invalid_value", "top_k"),
        ("top_k", json!(0.5), "invalid_value", "top_k"),
        ("top_k", json!("5"), "invalid_type", "top_k"),
        ("stream", json!("yes"), "invalid_type", "stream"),
        ("metadata", json!("m"), "invalid_type", "metadata"),
        (
            "metadata",
            json!({"conversation_id": 5}),
            "invalid_type",
            "metadata.conversation_id",
        ),
    ];
    for (field, value, code, param) in cases {
        let mut body = body_with(hi());
        body[field] = value;
        assert_error(&parse_err(body), code, Some(param));
    }
}

#[test]
fn error_types_follow_anthropic() {
    for (status, kind) in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (409, "invalid_request_error"),
        (413, "request_too_large"),
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "api_error"),
        (529, "overloaded_error"),
    ] {
        assert_eq!(error_type(status), kind, "{status}");
    }

    let error = parse_err(json!({"messages": hi()}));
    assert_eq!(
        error_json(&error),
        json!({"type": "error", "error": {
            "type": "invalid_request_error",
            "message": "max_tokens: Field required",
        }})
    );
    // Without a param, or with a message that already names it, the message is as it is.
    let error = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow down");
    assert_eq!(
        error_json(&error),
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
    );
    let error =
        ApiError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", "x: bad").with_param("x");
    assert_eq!(error_json(&error)["error"]["message"], "x: bad");
    assert_eq!(error_json(&error)["error"]["type"], "authentication_error");
}

// ---------------------------------------------------------------------------------------
// Responses.

fn response(content: &str, tool_calls: Vec<ToolCall>, reason: FinishReason) -> CompletionResponse {
    CompletionResponse {
        id: "upstream-id".into(),
        message: AssistantMessage {
            content: content.into(),
            tool_calls,
        },
        finish_reason: reason,
        usage: Usage {
            input_tokens: 12,
            output_tokens: 7,
        },
        model: "upstream-model".into(),
        provider: ProviderKind::OpenAi,
    }
}

#[test]
fn message_json_text_shape() {
    let value = message_json(
        &response("Hello \"there\"\n", Vec::new(), FinishReason::Stop),
        "msg_1",
        "gpt-4o",
        Some("0.000123"),
    );
    assert_eq!(
        value,
        json!({
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "gpt-4o",
            "content": [{"type": "text", "text": "Hello \"there\"\n"}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": 12, "output_tokens": 7, "cost_usd": "0.000123"},
        })
    );
}

#[test]
fn message_json_tool_shapes() {
    let calls = vec![
        call("toolu_1", "get_weather", json!({"city": "Paris"})),
        // Arguments kept as JSON text are sent as the object they hold; text that is not
        // JSON stays as it is; no arguments are an empty object.
        call("toolu_2", "now", json!("{\"tz\":\"UTC\"}")),
        call("toolu_3", "odd", json!("not json")),
        call("toolu_4", "none", Value::Null),
    ];
    let value = message_json(
        &response("", calls.clone(), FinishReason::ToolCalls),
        "msg_2",
        "m",
        None,
    );
    assert_eq!(
        value["content"],
        json!([
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "now", "input": {"tz": "UTC"}},
            {"type": "tool_use", "id": "toolu_3", "name": "odd", "input": "not json"},
            {"type": "tool_use", "id": "toolu_4", "name": "none", "input": {}},
        ])
    );
    assert_eq!(value["stop_reason"], "tool_use");
    assert_eq!(
        value["usage"],
        json!({"input_tokens": 12, "output_tokens": 7})
    );

    let value = message_json(
        &response(
            "Let me check.",
            calls[..1].to_vec(),
            FinishReason::ToolCalls,
        ),
        "msg_3",
        "m",
        None,
    );
    assert_eq!(
        value["content"],
        json!([
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ])
    );

    // An empty reply has no blocks, as Anthropic sends it.
    let value = message_json(
        &response("", Vec::new(), FinishReason::Length),
        "m",
        "m",
        None,
    );
    assert_eq!(value["content"], json!([]));
}

#[test]
fn stop_reasons() {
    for (reason, expected) in [
        (FinishReason::Stop, "end_turn"),
        (FinishReason::Length, "max_tokens"),
        (FinishReason::ToolCalls, "tool_use"),
        (FinishReason::ContentFilter, "refusal"),
        (FinishReason::Error, "end_turn"),
    ] {
        assert_eq!(stop_reason(reason), expected);
        let value = message_json(&response("x", Vec::new(), reason), "i", "m", None);
        assert_eq!(value["stop_reason"], expected);
    }
}

// ---------------------------------------------------------------------------------------
// Streams.

/// Splits SSE bytes into `(event name, data)` pairs, checking the framing: every event has
/// one `event:` and one `data:` line, and the name equals the data's `type`.
fn sse_events(frames: &[Bytes]) -> Vec<(String, Value)> {
    let text: String = frames
        .iter()
        .map(|b| match std::str::from_utf8(b) {
            Ok(s) => s.to_owned(),
            Err(e) => panic!("not UTF-8: {e}"),
        })
        .collect();
    assert!(text.ends_with("\n\n"), "{text:?}");
    text.split_terminator("\n\n")
        .map(|event| {
            let lines: Vec<&str> = event.split('\n').collect();
            let [name, data] = lines.as_slice() else {
                panic!("expected two lines: {event:?}");
            };
            let name = name.strip_prefix("event: ").expect("an event line");
            let data: Value =
                serde_json::from_str(data.strip_prefix("data: ").expect("a data line"))
                    .expect("JSON data");
            assert_eq!(data["type"], name, "{event}");
            (name.to_owned(), data)
        })
        .collect()
}

/// Checks Anthropic's event grammar: `message_start`, then content blocks numbered from 0,
/// each `content_block_start`, deltas of its own kind, `content_block_stop`, never two open
/// at once; then `message_delta` and `message_stop` (pings anywhere after the start). Returns
/// the names in order.
fn assert_valid_order(events: &[(String, Value)]) -> Vec<String> {
    let names: Vec<String> = events.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        names.first().map(String::as_str),
        Some("message_start"),
        "{names:?}"
    );
    let n = names.len();
    assert!(n >= 3, "{names:?}");
    assert_eq!(names[n - 2], "message_delta", "{names:?}");
    assert_eq!(names[n - 1], "message_stop", "{names:?}");
    let mut open: Option<(u64, String)> = None;
    let mut next = 0;
    for (name, data) in &events[1..n - 2] {
        match name.as_str() {
            "content_block_start" => {
                assert!(open.is_none(), "{names:?}");
                assert_eq!(data["index"], next, "{names:?}");
                let kind = data["content_block"]["type"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                match kind.as_str() {
                    "text" => assert_eq!(data["content_block"]["text"], ""),
                    "tool_use" => {
                        assert!(data["content_block"]["id"].is_string());
                        assert!(data["content_block"]["name"].is_string());
                        assert_eq!(data["content_block"]["input"], json!({}));
                    }
                    other => panic!("unexpected block type {other}"),
                }
                open = Some((next, kind));
                next += 1;
            }
            "content_block_delta" => {
                let Some((index, kind)) = &open else {
                    panic!("delta outside a block: {names:?}");
                };
                assert_eq!(data["index"], *index);
                let expected = if kind == "text" {
                    "text_delta"
                } else {
                    "input_json_delta"
                };
                assert_eq!(data["delta"]["type"], expected);
            }
            "content_block_stop" => {
                let Some((index, _)) = open.take() else {
                    panic!("stop outside a block: {names:?}");
                };
                assert_eq!(data["index"], index);
            }
            "ping" => {}
            other => panic!("unexpected event {other} in {names:?}"),
        }
    }
    assert!(open.is_none(), "a block was left open: {names:?}");
    names
}

fn encode_all(encoder: &mut EventEncoder, chunks: &[StreamChunk]) -> Vec<Bytes> {
    chunks.iter().flat_map(|c| encoder.encode(c)).collect()
}

fn text(t: &str) -> StreamChunk {
    StreamChunk::TextDelta { text: t.into() }
}

fn tool(index: u32, id: Option<&str>, name: Option<&str>, arguments: &str) -> StreamChunk {
    StreamChunk::ToolCallDelta {
        index,
        id: id.map(str::to_owned),
        name: name.map(str::to_owned),
        arguments: arguments.into(),
    }
}

fn finish(reason: FinishReason) -> StreamChunk {
    StreamChunk::Finish { reason }
}

const USAGE: Usage = Usage {
    input_tokens: 11,
    output_tokens: 5,
};

#[test]
fn text_stream_is_exactly_anthropics_sequence() {
    let mut encoder = EventEncoder::new("msg_1", "claude-x", 9);
    let mut frames = vec![encoder.start(), EventEncoder::ping()];
    frames.extend(encode_all(
        &mut encoder,
        &[
            text("Hel"),
            text(""),
            text("lo \"w\"\n"),
            StreamChunk::Usage { usage: USAGE },
            finish(FinishReason::Stop),
        ],
    ));
    assert_eq!(encoder.usage(), Some(USAGE));
    assert_eq!(encoder.finish_reason(), Some(FinishReason::Stop));
    frames.extend(encoder.finish(USAGE, Some("0.5")));
    assert!(encoder.is_finished());

    let expected = concat!(
        "event: message_start\ndata: {\"message\":{\"content\":[],\"id\":\"msg_1\",",
        "\"model\":\"claude-x\",\"role\":\"assistant\",\"stop_reason\":null,",
        "\"stop_sequence\":null,\"type\":\"message\",\"usage\":{\"input_tokens\":9,",
        "\"output_tokens\":0}},\"type\":\"message_start\"}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        "event: content_block_start\ndata: {\"content_block\":{\"text\":\"\",\"type\":\"text\"},",
        "\"index\":0,\"type\":\"content_block_start\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,",
        "\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,",
        "\"delta\":{\"type\":\"text_delta\",\"text\":\"lo \\\"w\\\"\\n\"}}\n\n",
        "event: content_block_stop\ndata: {\"index\":0,\"type\":\"content_block_stop\"}\n\n",
        "event: message_delta\ndata: {\"delta\":{\"stop_reason\":\"end_turn\",",
        "\"stop_sequence\":null},\"type\":\"message_delta\",\"usage\":{\"cost_usd\":\"0.5\",",
        "\"input_tokens\":11,\"output_tokens\":5}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let joined: Vec<u8> = frames.iter().flat_map(|b| b.to_vec()).collect();
    assert_eq!(String::from_utf8_lossy(&joined), expected);
    assert_valid_order(&sse_events(&frames));

    // Nothing after the end.
    assert!(encoder.finish(USAGE, None).is_empty());
    assert!(encoder.encode(&text("late")).is_empty());
}

#[test]
fn tool_stream_opens_one_block_per_call() {
    let mut encoder = EventEncoder::new("msg_2", "m", 3);
    let mut frames = encode_all(
        &mut encoder,
        &[
            tool(0, Some("toolu_a"), Some("get_weather"), ""),
            tool(0, None, None, "{\"city\":"),
            tool(0, None, None, "\"Paris\"}"),
            tool(1, Some("toolu_b"), Some("now"), "{}"),
            finish(FinishReason::ToolCalls),
            StreamChunk::Usage { usage: USAGE },
        ],
    );
    frames.extend(encoder.finish(USAGE, None));
    let events = sse_events(&frames);
    assert_eq!(
        assert_valid_order(&events),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}})
    );
    assert_eq!(
        events[2].1["delta"],
        json!({"type": "input_json_delta", "partial_json": "{\"city\":"})
    );
    assert_eq!(
        events[5].1["content_block"],
        json!({"type": "tool_use", "id": "toolu_b", "name": "now", "input": {}})
    );
    assert_eq!(events[5].1["index"], 1);
    assert_eq!(
        events[8].1,
        json!({
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"input_tokens": 11, "output_tokens": 5},
        })
    );
}

#[test]
fn text_then_tools_then_text() {
    let mut encoder = EventEncoder::new("msg_3", "m", 0);
    let mut frames = encode_all(
        &mut encoder,
        &[
            text("Let me look."),
            tool(0, Some("t0"), Some("search"), "{\"q\":\"rust\"}"),
            // A call with no arguments at all still gets its block.
            tool(1, Some("t1"), Some("now"), ""),
            text("Done"),
            text("."),
        ],
    );
    // No finish chunk: tools were called, so the reason is tool_use.
    frames.extend(encoder.finish(USAGE, None));
    let events = sse_events(&frames);
    let names = assert_valid_order(&events);
    assert_eq!(
        names.iter().filter(|n| *n == "content_block_start").count(),
        4
    );
    let kinds: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| &d["content_block"]["type"])
        .collect();
    assert_eq!(
        kinds,
        [
            &json!("text"),
            &json!("tool_use"),
            &json!("tool_use"),
            &json!("text")
        ]
    );
    assert_eq!(
        events[events.len() - 2].1["delta"]["stop_reason"],
        "tool_use"
    );
}

#[test]
fn tool_id_and_name_may_come_in_pieces_before_the_arguments() {
    let mut encoder = EventEncoder::new("msg_4", "m", 0);
    let mut frames = encode_all(
        &mut encoder,
        &[
            tool(0, None, Some("get_"), ""),
            tool(0, Some("call_9"), Some("weather"), ""),
            tool(0, None, None, "{}"),
            // A name piece after the block started cannot be sent, and is dropped.
            tool(0, None, Some("_late"), ""),
            // A call without any id gets a generated one.
            tool(1, None, Some("now"), ""),
            finish(FinishReason::Stop),
        ],
    );
    frames.extend(encoder.finish(USAGE, None));
    let events = sse_events(&frames);
    assert_valid_order(&events);
    let starts: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| &d["content_block"])
        .collect();
    assert_eq!(
        starts,
        [
            &json!({"type": "tool_use", "id": "call_9", "name": "get_weather", "input": {}}),
            &json!({"type": "tool_use", "id": "toolu_1_msg_4", "name": "now", "input": {}}),
        ]
    );
    assert_eq!(
        events[events.len() - 2].1["delta"]["stop_reason"],
        "end_turn"
    );
}

#[test]
fn encode_and_finish_send_message_start_themselves() {
    let mut encoder = EventEncoder::new("msg_5", "m", 4);
    let frames = encoder.encode(&text("a"));
    let events = sse_events(&frames);
    assert_eq!(events[0].0, "message_start");
    assert_eq!(
        events[0].1["message"]["usage"],
        json!({"input_tokens": 4, "output_tokens": 0})
    );
    // A text delta as written, its text escaped.
    assert_eq!(
        std::str::from_utf8(frames.last().unwrap()).unwrap(),
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\
         \"delta\":{\"type\":\"text_delta\",\"text\":\"a\"}}\n\n"
    );
    let frames = encoder.encode(&text("line\n\"quoted\" \u{7f} ✓"));
    assert_eq!(
        std::str::from_utf8(&frames[0]).unwrap(),
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\
         \"delta\":{\"type\":\"text_delta\",\"text\":\"line\\n\\\"quoted\\\" \u{7f} ✓\"}}\n\n"
    );
    assert_eq!(
        sse_events(&frames)[0].1["delta"]["text"],
        "line\n\"quoted\" \u{7f} ✓"
    );
    // Usage and empty chunks produce nothing.
    assert!(
        encoder
            .encode(&StreamChunk::Usage { usage: USAGE })
            .is_empty()
    );
    assert!(encoder.encode(&text("")).is_empty());

    // An empty stream is still a complete message.
    let mut encoder = EventEncoder::new("msg_6", "m", 4);
    let events = sse_events(&encoder.finish(Usage::default(), None));
    assert_eq!(
        assert_valid_order(&events),
        ["message_start", "message_delta", "message_stop"]
    );
}

#[test]
fn finish_reasons_reach_message_delta() {
    for (reason, expected) in [
        (FinishReason::Length, "max_tokens"),
        (FinishReason::ContentFilter, "refusal"),
        (FinishReason::Error, "end_turn"),
    ] {
        let mut encoder = EventEncoder::new("m", "m", 0);
        let mut frames = encode_all(
            &mut encoder,
            &[text("x"), finish(reason), finish(FinishReason::Stop)],
        );
        frames.extend(encoder.finish(USAGE, None));
        let events = sse_events(&frames);
        assert_valid_order(&events);
        assert_eq!(events[events.len() - 2].1["delta"]["stop_reason"], expected);
    }
}

#[test]
fn interleaved_tool_fragments_are_kept_on_their_block() {
    let mut encoder = EventEncoder::new("msg_7", "m", 0);
    let frames = encode_all(
        &mut encoder,
        &[
            tool(0, Some("a"), Some("f"), "{\"x\":"),
            tool(1, Some("b"), Some("g"), "{}"),
            tool(0, None, None, "1}"),
        ],
    );
    let events = sse_events(&frames);
    let last = &events[events.len() - 1].1;
    assert_eq!(
        last,
        &json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": "1}"}})
    );
}

#[test]
fn error_events() {
    let error = ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", "upstream failed");
    let bytes = EventEncoder::error_event(&error);
    assert_eq!(
        &bytes[..],
        b"event: error\ndata: {\"error\":{\"message\":\"upstream failed\",\"type\":\"api_error\"},\"type\":\"error\"}\n\n"
    );
    let error = ApiError::new(
        StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        "overloaded",
        "busy",
    );
    let events = sse_events(&[EventEncoder::error_event(&error)]);
    assert_eq!(events[0].1["error"]["type"], "overloaded_error");
}

// ---------------------------------------------------------------------------------------
// Against the library's Anthropic provider: what it sends for a parsed request, and what it
// reads back from our responses and streams (the decoder an Anthropic upstream is read
// with, behind a real HTTP connection).

/// A fake Anthropic server, a runtime that keeps it running, and a provider pointed at it.
/// Tests run in parallel and share it, so each exchange holds `lock`.
struct Harness {
    runtime: tokio::runtime::Runtime,
    server: FakeServer,
    provider: AnthropicProvider,
    lock: std::sync::Mutex<()>,
}

impl Harness {
    /// Runs one exchange with the fake server, alone.
    fn exchange<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let _alone = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.runtime.block_on(f)
    }
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let server = runtime
            .block_on(FakeServer::start())
            .expect("the fake server");
        let provider = AnthropicProvider::new(
            ProviderConfig::new(ProviderKind::Anthropic, "claude-fake")
                .with_api_key("sk-ant-test")
                .with_base_url(server.url()),
        )
        .expect("the provider");
        Harness {
            runtime,
            server,
            provider,
            lock: std::sync::Mutex::new(()),
        }
    })
}

/// Streams `body` as an Anthropic SSE answer through the provider; the unified chunks.
fn decode_stream(body: String) -> Result<Vec<StreamChunk>, meta_chat_llm::LlmError> {
    let h = harness();
    h.exchange(async {
        h.server.push(Reply::raw(200, "text/event-stream", body));
        let stream = h
            .provider
            .stream(&CompletionRequest::new(vec![Message::user("hi")]))
            .await?;
        stream.collect::<Vec<_>>().await.into_iter().collect()
    })
}

fn accumulate(chunks: &[StreamChunk]) -> StreamAccumulator {
    let mut acc = StreamAccumulator::new();
    for chunk in chunks {
        acc.push(chunk);
    }
    acc
}

fn joined(frames: &[Bytes]) -> String {
    frames
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect()
}

#[test]
fn anthropic_to_anthropic_keeps_every_modelled_field() {
    // Written as an Anthropic client writes it; the provider must send back the same body
    // (minus the gateway's own `metadata.conversation_id`).
    let original = json!({
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 300,
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Paris", "nested": {"a": [1, 2, null]}}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "text", "text": "And tomorrow?"},
            ]},
        ],
        "tools": [{"name": "get_weather", "description": "Current weather",
                   "input_schema": {"type": "object",
                                    "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "any"},
        "stop_sequences": ["END"],
        "temperature": 0.25,
        "top_p": 0.5,
        "top_k": 20,
        "metadata": {"user_id": "u-7", "conversation_id": "conv-1"},
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "service_tier": "standard_only",
        "future_field": {"anything": [true]},
    });
    let parsed = parse_ok(original.clone());
    let mut request = parsed.request;
    request.model = parsed.model;

    let h = harness();
    let sent = h.exchange(async {
        h.server.push(Reply::text("ok"));
        let before = h.server.requests_to("/v1/messages").len();
        let answer = h.provider.complete(&request).await.expect("an answer");
        assert_eq!(answer.message.content, "ok");
        h.server
            .requests_to("/v1/messages")
            .get(before)
            .map(|r| r.body.clone())
            .expect("the request")
    });
    let mut expected = original;
    expected["metadata"] = json!({"user_id": "u-7"});
    assert_eq!(sent, expected);
}

#[test]
fn message_json_reads_back_through_the_provider() {
    let original = response(
        "Let me check \u{1F326}.",
        vec![
            call("toolu_1", "get_weather", json!({"city": "Paris"})),
            call("toolu_2", "now", json!({})),
        ],
        FinishReason::ToolCalls,
    );
    let body = message_json(&original, "msg_9", "claude-x", Some("0.01"));
    let h = harness();
    let read = h
        .exchange(async {
            h.server
                .push(Reply::raw(200, "application/json", body.to_string()));
            h.provider
                .complete(&CompletionRequest::new(vec![Message::user("hi")]))
                .await
        })
        .expect("a response");
    assert_eq!(read.id, "msg_9");
    assert_eq!(read.model, "claude-x");
    assert_eq!(read.message, original.message);
    assert_eq!(read.finish_reason, original.finish_reason);
    assert_eq!(read.usage, original.usage);
}

#[test]
fn streams_read_back_through_the_provider() {
    let chunks = [
        text("Let me "),
        text("look."),
        tool(0, Some("toolu_a"), Some("search"), "{\"q\":"),
        tool(0, None, None, "\"rust\"}"),
        tool(1, Some("toolu_b"), Some("now"), ""),
        finish(FinishReason::ToolCalls),
        StreamChunk::Usage { usage: USAGE },
    ];
    let mut encoder = EventEncoder::new("msg_s", "m", 2);
    let mut frames = vec![encoder.start(), EventEncoder::ping()];
    frames.extend(encode_all(&mut encoder, &chunks));
    frames.extend(encoder.finish(USAGE, Some("0.1")));
    let decoded = decode_stream(joined(&frames)).expect("a stream");
    let acc = accumulate(&decoded);
    let expected = accumulate(&chunks);
    assert_eq!(acc.message(), expected.message());
    assert_eq!(acc.usage(), Some(USAGE));
    assert_eq!(acc.finish_reason(), Some(FinishReason::ToolCalls));

    // An error event reaches the provider as an error.
    let mut encoder = EventEncoder::new("msg_e", "m", 2);
    let mut frames = encode_all(&mut encoder, &[text("partial")]);
    frames.push(EventEncoder::error_event(&ApiError::new(
        StatusCode::BAD_GATEWAY,
        "upstream_error",
        "upstream failed",
    )));
    let error = decode_stream(joined(&frames)).expect_err("an error");
    assert!(error.to_string().contains("upstream failed"), "{error}");
}

// ---------------------------------------------------------------------------------------
// Property: unified chunks → Anthropic SSE → parsed back gives the same message.

/// One stretch of a generated reply.
#[derive(Debug, Clone)]
enum Segment {
    Text(String),
    Tool {
        id: String,
        name: String,
        arguments: Value,
    },
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[\"\\\\\n\r\t {}:,a-zé😀]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map("[a-z_\"\\\\ é]{1,8}", json_value(), 0..5)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        prop_oneof![
            any::<String>(),
            "[\"\\\\\n\r\t a-zé😀\u{0}-\u{1f}]{0,40}",
            Just("event: x\ndata: y\n\n".to_owned()),
        ]
        .prop_map(Segment::Text),
        (
            "toolu_[a-zA-Z0-9]{1,12}",
            "[a-zA-Z_][a-zA-Z0-9_-]{0,20}",
            json_object()
        )
            .prop_map(|(id, name, arguments)| Segment::Tool {
                id,
                name,
                arguments
            }),
    ]
}

/// `text` cut at these byte positions (moved to character boundaries).
fn split(text: &str, cuts: &[usize]) -> Vec<String> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| {
            let mut p = c % (text.len() + 1);
            while !text.is_char_boundary(p) {
                p -= 1;
            }
            p
        })
        .collect();
    points.push(0);
    points.push(text.len());
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| text[w[0]..w[1]].to_owned())
        .collect()
}

fn finish_reason_strategy() -> impl Strategy<Value = Option<FinishReason>> {
    prop_oneof![
        Just(None),
        Just(Some(FinishReason::Stop)),
        Just(Some(FinishReason::Length)),
        Just(Some(FinishReason::ToolCalls)),
        Just(Some(FinishReason::ContentFilter)),
        Just(Some(FinishReason::Error)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn unified_to_anthropic_sse_and_back(
        segments in prop::collection::vec(segment(), 0..6),
        cuts in prop::collection::vec(prop::collection::vec(any::<usize>(), 0..6), 6),
        reason in finish_reason_strategy(),
        input_tokens in 0_u64..1_000_000,
        output_tokens in 0_u64..1_000_000,
        estimate in 0_u64..1_000,
        explicit_start in any::<bool>(),
    ) {
        // The unified stream a provider would give.
        let mut chunks = Vec::new();
        let mut tool_index = 0_u32;
        for (i, segment) in segments.iter().enumerate() {
            match segment {
                Segment::Text(t) => {
                    chunks.extend(split(t, &cuts[i]).into_iter().map(|text| StreamChunk::TextDelta { text }));
                }
                Segment::Tool { id, name, arguments } => {
                    let pieces = split(&arguments.to_string(), &cuts[i]);
                    for (k, piece) in pieces.into_iter().enumerate() {
                        chunks.push(StreamChunk::ToolCallDelta {
                            index: tool_index,
                            id: (k == 0).then(|| id.clone()),
                            name: (k == 0).then(|| name.clone()),
                            arguments: piece,
                        });
                    }
                    tool_index += 1;
                }
            }
        }
        if let Some(reason) = reason {
            chunks.push(StreamChunk::Finish { reason });
        }
        let usage = Usage { input_tokens, output_tokens };
        chunks.push(StreamChunk::Usage { usage });

        // Our encoding.
        let mut encoder = EventEncoder::new("msg_prop", "claude-prop", estimate);
        let mut frames = Vec::new();
        if explicit_start {
            frames.push(encoder.start());
        }
        frames.extend(encode_all(&mut encoder, &chunks));
        prop_assert_eq!(encoder.usage(), Some(usage));
        frames.extend(encoder.finish(usage, None));
        assert_valid_order(&sse_events(&frames));

        // Read back by the Anthropic provider's decoder, over HTTP.
        let decoded = decode_stream(joined(&frames));
        prop_assert!(decoded.is_ok(), "{:?}", decoded);
        let decoded = decoded.unwrap_or_default();
        let got = accumulate(&decoded);
        let expected = accumulate(&chunks);
        prop_assert_eq!(got.text(), expected.text());
        prop_assert_eq!(got.message(), expected.message());
        let calls: Vec<(String, String, Value)> = segments
            .iter()
            .filter_map(|s| match s {
                Segment::Tool { id, name, arguments } => {
                    Some((id.clone(), name.clone(), arguments.clone()))
                }
                Segment::Text(_) => None,
            })
            .collect();
        let got_calls: Vec<(String, String, Value)> = got
            .message()
            .tool_calls
            .into_iter()
            .map(|c| (c.id, c.name, c.arguments))
            .collect();
        prop_assert_eq!(got_calls, calls);
        prop_assert_eq!(got.usage(), Some(usage));
        // Anthropic has no error stop reason: an error finish reads back as `stop`.
        let expected_reason = match reason {
            Some(FinishReason::Error) => FinishReason::Stop,
            Some(reason) => reason,
            None if tool_index > 0 => FinishReason::ToolCalls,
            None => FinishReason::Stop,
        };
        prop_assert_eq!(got.finish_reason(), Some(expected_reason));
    }
}
