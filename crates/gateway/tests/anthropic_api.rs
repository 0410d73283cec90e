//! `POST /v1/messages` and `POST /v1/messages/count_tokens` (issue 6, SPEC §4.1 and §4.3) over
//! real sockets: the Anthropic ingress in front of each provider (OpenAI, Anthropic, Ollama, all
//! on the fake upstream server): answers in Anthropic's message shape, streams in Anthropic's
//! event order whose text matches the plain answer, a tool-use round trip as the provider
//! receives it, system prompts as a string and as blocks, errors in Anthropic's envelope with
//! Anthropic's statuses (also mid-stream), exact usage records under the `messages` endpoint
//! (SQLite and, with `TEST_DATABASE_URL`, PostgreSQL), token counting, fields an Anthropic
//! upstream receives unchanged, and the shared chat path's limits and cache (in process and, with
//! `TEST_REDIS_URL`, on Redis) and fallback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::usage::{Db, haiku_cost, mini_cost, on_sqlite_and_postgres, usd, wait_for_records};
use common::{ADMIN_KEY, Answer, Backend, Gateway, TENANT_ANTHROPIC_KEY, in_process_and_on_redis};
use meta_chat::api::anthropic_codec::parse_messages_request;
use meta_chat::cache::ResponseCache;
use meta_chat::settings::TenantSettings;
use meta_chat::store::UsageRecord;
use meta_chat_testkit::{FakeToolCall, Recorded, Reply};
use serde_json::{Value, json};

const MESSAGES: &str = "/v1/messages";
const COUNT_TOKENS: &str = "/v1/messages/count_tokens";

// ---------------------------------------------------------------------------------------------
// The providers behind the Anthropic ingress.

/// One provider behind a tenant.
#[derive(Clone, Copy)]
struct Case {
    provider: &'static str,
    /// The model the tenant's settings name.
    model: &'static str,
    /// The upstream chat path on the fake server.
    path: &'static str,
    /// The price of (input, output) tokens in nano-dollars.
    cost: fn(i64, i64) -> i64,
}

/// Ollama's models are free.
const fn free(_input: i64, _output: i64) -> i64 {
    0
}

const OPENAI: Case = Case {
    provider: "openai",
    model: "gpt-4o-mini",
    path: "/v1/chat/completions",
    cost: mini_cost,
};
const ANTHROPIC: Case = Case {
    provider: "anthropic",
    model: "claude-3-haiku-20240307",
    path: "/v1/messages",
    cost: haiku_cost,
};
const OLLAMA: Case = Case {
    provider: "ollama",
    model: "llama3.1:8b",
    path: "/api/chat",
    cost: free,
};
const CASES: [Case; 3] = [OPENAI, ANTHROPIC, OLLAMA];

impl Case {
    fn settings(&self) -> Value {
        json!({"llm": {"provider": self.provider, "model": self.model}})
    }

    /// A tenant on this provider; returns (id, key).
    async fn tenant(&self, gw: &Gateway) -> (String, String) {
        gw.tenant_named(self.provider, self.settings()).await
    }

    /// The last chat request the fake upstream received for this provider.
    fn last_upstream(&self, gw: &Gateway) -> Recorded {
        gw.fake
            .requests_to(self.path)
            .pop()
            .unwrap_or_else(|| panic!("{}: no upstream request", self.provider))
    }

    fn cost_usd(&self, input: i64, output: i64) -> String {
        usd((self.cost)(input, output))
    }
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// A Messages request ("hello there", `max_tokens` 256) with `extra` fields merged in.
fn message(extra: Value) -> Value {
    let mut body = json!({
        "model": "default",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "hello there"}],
    });
    if let (Value::Object(map), Value::Object(more)) = (&mut body, extra) {
        map.extend(more);
    }
    body
}

/// A POST of `body` to `path` with these headers (no authentication unless among them).
async fn post_raw(gw: &Gateway, path: &str, headers: &[(&str, &str)], body: String) -> Answer {
    let mut request = gw
        .client
        .post(gw.url(path))
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    Answer::read(request.send().await.unwrap()).await
}

/// A POST as the Anthropic SDK sends it: `x-api-key` and `anthropic-version`.
async fn post(gw: &Gateway, path: &str, key: &str, body: &Value) -> Answer {
    post_raw(
        gw,
        path,
        &[("x-api-key", key), ("anthropic-version", "2023-06-01")],
        body.to_string(),
    )
    .await
}

/// `POST /v1/messages` with `x-api-key`.
async fn messages(gw: &Gateway, key: &str, body: &Value) -> Answer {
    post(gw, MESSAGES, key, body).await
}

/// A `get_weather` tool with Anthropic's `input_schema`.
fn weather_tool() -> Value {
    json!({
        "name": "get_weather",
        "description": "The current weather in a city",
        "input_schema": weather_schema(),
    })
}

fn weather_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
        },
        "required": ["city"]
    })
}

fn weather_input() -> Value {
    json!({"city": "Paris", "unit": "celsius"})
}

// ---------------------------------------------------------------------------------------------
// Answers.

/// Anthropic's error envelope with this error type; returns the message.
fn assert_envelope(answer: &Answer, status: u16, kind: &str) -> String {
    assert_eq!(answer.status, status, "{}", answer.text);
    let body = answer.json();
    assert_eq!(body["type"], "error", "{}", answer.text);
    assert_eq!(body["error"]["type"], kind, "{}", answer.text);
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {}", answer.text));
    assert!(!message.is_empty(), "{}", answer.text);
    // Nothing of OpenAI's envelope.
    assert!(body["error"].get("code").is_none(), "{}", answer.text);
    message.to_owned()
}

/// The `content` of a message answer.
fn content(body: &Value) -> &Vec<Value> {
    body["content"].as_array().expect("content is an array")
}

/// The text of a message answer: its text blocks joined.
fn text_of(body: &Value) -> String {
    content(body)
        .iter()
        .filter(|b| b["type"] == "text")
        .map(|b| b["text"].as_str().unwrap())
        .collect()
}

/// One SSE event: its `event:` name and `data:` JSON.
#[derive(Debug, Clone)]
struct Event {
    name: String,
    data: Value,
}

/// The events of an Anthropic SSE body; each has an `event:` line whose name is its data's
/// `type`.
fn sse(text: &str) -> Vec<Event> {
    text.split("\n\n")
        .filter(|frame| !frame.trim().is_empty())
        .map(|frame| {
            let mut name = None;
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data.push_str(value);
                }
            }
            let name = name.unwrap_or_else(|| panic!("no event name in {frame:?}"));
            let data: Value = serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("data is not JSON ({e}) in {frame:?}"));
            assert_eq!(data["type"], name.as_str(), "{frame:?}");
            Event { name, data }
        })
        .collect()
}

/// A stream read back: the message shell of `message_start`, the content blocks reassembled
/// (a `tool_use` block's `input` parsed from its `input_json_delta`s), then either the
/// `message_delta` (stop reason, usage) and `message_stop`, or an `error` event.
#[derive(Debug)]
struct Streamed {
    start: Value,
    blocks: Vec<Value>,
    stop_reason: Option<String>,
    usage: Option<Value>,
    error: Option<Value>,
}

impl Streamed {
    fn text(&self) -> String {
        self.blocks
            .iter()
            .filter(|b| b["type"] == "text")
            .map(|b| b["text"].as_str().unwrap())
            .collect()
    }

    fn tool_uses(&self) -> Vec<&Value> {
        self.blocks
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .collect()
    }
}

/// Reads a stream answer, failing on any event out of Anthropic's order: `message_start`
/// first; per block `content_block_start` (indexes 0, 1, … with no overlap), deltas of the
/// block's kind on its index, `content_block_stop`; then `message_delta` and `message_stop`,
/// last; `ping`s anywhere after `message_start`. An `error` event may follow any event after
/// `message_start`, and ends the stream (an interrupted text block is kept as far as it went).
fn read_stream(answer: &Answer) -> Streamed {
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert!(
        answer
            .header("content-type")
            .starts_with("text/event-stream"),
        "{:?}",
        answer.headers
    );
    let events = sse(&answer.text);
    let fail = |why: &str| -> ! { panic!("{why}; stream:\n{}", answer.text) };
    let Some((first, rest)) = events.split_first() else {
        fail("an empty stream")
    };
    if first.name != "message_start" {
        fail("the first event is not message_start");
    }
    let start = first.data["message"].clone();
    let mut streamed = Streamed {
        start,
        blocks: Vec::new(),
        stop_reason: None,
        usage: None,
        error: None,
    };
    // The open block: its index, kind, start and what its deltas carried.
    let mut open: Option<(u64, String, Value, String)> = None;
    let mut stopped = false;
    for (i, event) in rest.iter().enumerate() {
        let last = i + 1 == rest.len();
        let data = &event.data;
        if stopped {
            fail("an event after message_stop");
        }
        match event.name.as_str() {
            "ping" => {}
            "content_block_start" => {
                if open.is_some() || streamed.stop_reason.is_some() {
                    fail("content_block_start while a block is open or after message_delta");
                }
                let index = data["index"].as_u64().unwrap();
                if index != streamed.blocks.len() as u64 {
                    fail("block indexes are not 0, 1, …");
                }
                let block = data["content_block"].clone();
                let kind = block["type"].as_str().unwrap().to_owned();
                match kind.as_str() {
                    "text" => {
                        if block["text"] != "" {
                            fail("a text block does not start empty");
                        }
                    }
                    "tool_use" => {
                        if block["id"].as_str().is_none_or(str::is_empty)
                            || !block["name"].is_string()
                            || block["input"] != json!({})
                        {
                            fail("a tool_use block starts without id, name or empty input");
                        }
                    }
                    _ => fail("an unknown block type"),
                }
                open = Some((index, kind, block, String::new()));
            }
            "content_block_delta" => {
                let Some((index, kind, _, carried)) = open.as_mut() else {
                    fail("a delta outside a block")
                };
                if data["index"].as_u64() != Some(*index) {
                    fail("a delta on another index than the open block's");
                }
                let delta = &data["delta"];
                match (kind.as_str(), delta["type"].as_str()) {
                    ("text", Some("text_delta")) => {
                        carried.push_str(delta["text"].as_str().unwrap())
                    }
                    ("tool_use", Some("input_json_delta")) => {
                        carried.push_str(delta["partial_json"].as_str().unwrap());
                    }
                    _ => fail("a delta of the wrong type for its block"),
                }
            }
            "content_block_stop" => {
                let Some((index, kind, mut block, carried)) = open.take() else {
                    fail("content_block_stop outside a block")
                };
                if data["index"].as_u64() != Some(index) {
                    fail("content_block_stop on another index");
                }
                if kind == "text" {
                    block["text"] = Value::String(carried);
                } else {
                    block["input"] = if carried.is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(&carried).unwrap_or_else(|e| {
                            panic!("tool input {carried:?} is not JSON ({e}): {}", answer.text)
                        })
                    };
                }
                streamed.blocks.push(block);
            }
            "message_delta" => {
                if open.is_some() || streamed.stop_reason.is_some() {
                    fail("message_delta with a block open, or twice");
                }
                let Some(reason) = data["delta"]["stop_reason"].as_str() else {
                    fail("message_delta without a stop_reason")
                };
                streamed.stop_reason = Some(reason.to_owned());
                streamed.usage = Some(data["usage"].clone());
            }
            "message_stop" => {
                if streamed.stop_reason.is_none() {
                    fail("message_stop before message_delta");
                }
                if !last {
                    fail("message_stop is not the last event");
                }
                stopped = true;
            }
            "error" => {
                if !last {
                    fail("an event after the error event");
                }
                streamed.error = Some(data["error"].clone());
                // What the interrupted block carried so far.
                if let Some((_, kind, mut block, carried)) = open.take()
                    && kind == "text"
                {
                    block["text"] = Value::String(carried);
                    streamed.blocks.push(block);
                }
            }
            _ => fail("an unknown event"),
        }
    }
    if streamed.error.is_none() && !stopped {
        fail("the stream ended without message_stop or error");
    }
    streamed
}

/// A stream that completed (no error event).
fn complete_stream(answer: &Answer) -> Streamed {
    let streamed = read_stream(answer);
    assert!(streamed.error.is_none(), "{}", answer.text);
    streamed
}

/// The system prompts of an upstream request, in the provider's own dialect.
fn system_texts(case: Case, sent: &Value) -> Vec<String> {
    match case.provider {
        // Anthropic's top-level `system` (the adapter joins system messages).
        "anthropic" => sent["system"]
            .as_str()
            .map(|s| vec![s.to_owned()])
            .unwrap_or_default(),
        _ => sent["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] == "system")
            .map(|m| m["content"].as_str().unwrap().to_owned())
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Text.

#[tokio::test]
async fn each_provider_answers_in_anthropics_message_shape() {
    let gw = Gateway::start().await;
    for case in CASES {
        let (_, key) = case.tenant(&gw).await;
        gw.fake
            .push(Reply::text("The answer is four.").with_usage(10, 3));
        let answer = messages(&gw, &key, &message(json!({}))).await;
        assert_eq!(answer.status, 200, "{}: {}", case.provider, answer.text);
        assert!(
            answer
                .header("content-type")
                .starts_with("application/json")
        );
        assert_eq!(answer.header("x-meta-chat-provider"), case.provider);
        assert_eq!(answer.header("x-meta-chat-model"), case.model);
        assert_eq!(answer.header("x-meta-chat-cache"), "miss");
        let cost = case.cost_usd(10, 3);
        assert_eq!(answer.header("x-meta-chat-cost-usd"), cost);
        let request_id = uuid::Uuid::parse_str(answer.header("x-request-id")).unwrap();

        let body = answer.json();
        assert_eq!(
            body,
            json!({
                "id": format!("msg_{}", request_id.simple()),
                "type": "message",
                "role": "assistant",
                "model": case.model,
                "content": [{"type": "text", "text": "The answer is four."}],
                "stop_reason": "end_turn",
                "stop_sequence": null,
                "usage": {"input_tokens": 10, "output_tokens": 3, "cost_usd": cost},
            }),
            "{}",
            case.provider
        );

        // What reached the provider: the model, max_tokens and the user's turn.
        let sent = case.last_upstream(&gw);
        assert_eq!(sent.body["model"], case.model, "{}", case.provider);
        let max_tokens = match case.provider {
            "openai" => sent.body["max_completion_tokens"]
                .as_u64()
                .or(sent.body["max_tokens"].as_u64()),
            "anthropic" => sent.body["max_tokens"].as_u64(),
            _ => sent.body["options"]["num_predict"].as_u64(),
        };
        assert_eq!(max_tokens, Some(256), "{}: {}", case.provider, sent.body);
        let turns = sent.body["messages"].as_array().unwrap();
        assert_eq!(turns.len(), 1, "{}: {}", case.provider, sent.body);
        assert_eq!(turns[0]["role"], "user");
        assert_eq!(turns[0]["content"], "hello there");

        // Finish reasons in Anthropic's words.
        for (finish, stop_reason) in [("length", "max_tokens"), ("stop", "end_turn")] {
            gw.fake
                .push(Reply::text("cut").with_usage(1, 1).with_finish(finish));
            let answer = messages(&gw, &key, &message(json!({}))).await;
            assert_eq!(answer.status, 200, "{}", answer.text);
            assert_eq!(
                answer.json()["stop_reason"],
                stop_reason,
                "{} {finish}",
                case.provider
            );
        }
    }
}

#[tokio::test]
async fn content_blocks_several_turns_and_either_authentication_are_accepted() {
    let gw = Gateway::start().await;
    let (_, key) = OPENAI.tenant(&gw).await;
    let body = message(json!({
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "first"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "noted"}]},
            {"role": "user", "content": [
                {"type": "text", "text": "second"},
                {"type": "text", "text": "third", "cache_control": {"type": "ephemeral"}},
            ]},
        ],
    }));
    let auths: [&[(&str, &str)]; 4] = [
        &[("x-api-key", &key), ("anthropic-version", "2023-06-01")],
        // Newer SDKs' dates, beta headers, and Bearer instead of x-api-key.
        &[
            ("authorization", &format!("Bearer {key}")),
            ("anthropic-version", "2099-12-31"),
            ("anthropic-beta", "tools-2024-04-04"),
        ],
        // No version at all.
        &[("x-api-key", &key)],
        &[("Authorization", &format!("Bearer {key}"))],
    ];
    for headers in auths {
        gw.fake.push(Reply::text("ok").with_usage(4, 1));
        let answer = post_raw(&gw, MESSAGES, headers, body.to_string()).await;
        assert_eq!(answer.status, 200, "{headers:?}: {}", answer.text);
        assert_eq!(text_of(&answer.json()), "ok");
        let sent = OPENAI.last_upstream(&gw).body;
        let turns: Vec<(&str, &str)> = sent["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        assert_eq!(
            turns,
            [
                ("user", "first"),
                ("assistant", "noted"),
                ("user", "second"),
                ("user", "third")
            ],
            "{sent}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Streams.

#[tokio::test]
async fn streams_follow_anthropics_event_order_and_match_the_plain_answer() {
    let gw = Gateway::start().await;
    let text = "The answer is four, as two and two make four.";
    for case in CASES {
        let (_, key) = case.tenant(&gw).await;
        gw.fake.push(Reply::text(text).with_usage(7, 5));
        let plain = messages(&gw, &key, &message(json!({}))).await;
        assert_eq!(plain.status, 200, "{}", plain.text);
        let expected = text_of(&plain.json());
        assert_eq!(expected, text);

        gw.fake
            .push(Reply::text(text).with_usage(7, 5).in_chunks(6));
        let answer = messages(&gw, &key, &message(json!({"stream": true}))).await;
        assert_eq!(answer.header("x-meta-chat-provider"), case.provider);
        assert_eq!(answer.header("cache-control"), "no-cache");
        let request_id = uuid::Uuid::parse_str(answer.header("x-request-id")).unwrap();
        let streamed = complete_stream(&answer);
        assert_eq!(streamed.text(), expected, "{}", case.provider);
        assert_eq!(streamed.blocks.len(), 1, "{}", answer.text);
        let deltas = sse(&answer.text)
            .iter()
            .filter(|e| e.name == "content_block_delta")
            .count();
        assert!(
            deltas > 1,
            "{}: one delta only: {}",
            case.provider,
            answer.text
        );

        let start = &streamed.start;
        assert_eq!(start["id"], format!("msg_{}", request_id.simple()));
        assert_eq!(start["type"], "message");
        assert_eq!(start["role"], "assistant");
        assert_eq!(start["model"], case.model);
        assert_eq!(start["content"], json!([]));
        assert_eq!(start["stop_reason"], Value::Null);
        assert!(start["usage"]["input_tokens"].is_u64(), "{start}");

        assert_eq!(streamed.stop_reason.as_deref(), Some("end_turn"));
        assert_eq!(
            streamed.usage.unwrap(),
            json!({"input_tokens": 7, "output_tokens": 5, "cost_usd": case.cost_usd(7, 5)}),
            "{}",
            case.provider
        );
        assert_eq!(
            case.last_upstream(&gw).body["stream"],
            true,
            "{}",
            case.provider
        );

        // A stream cut by the token limit.
        gw.fake.push(
            Reply::text("cut short")
                .with_usage(2, 2)
                .with_finish("length"),
        );
        let answer = messages(&gw, &key, &message(json!({"stream": true}))).await;
        let streamed = complete_stream(&answer);
        assert_eq!(streamed.stop_reason.as_deref(), Some("max_tokens"));
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Tool use.

/// The tool call the fake model makes; Ollama's calls carry no id, so the gateway makes one.
fn weather_call() -> FakeToolCall {
    FakeToolCall::new("toolu_weather_1", "get_weather", weather_input())
}

/// Checks the provider received the `get_weather` tool in its own dialect, and the tool
/// choice (`any`: a tool must be called).
fn assert_upstream_tools(case: Case, sent: &Value) {
    let tools = sent["tools"].as_array().unwrap_or_else(|| panic!("{sent}"));
    assert_eq!(tools.len(), 1, "{sent}");
    match case.provider {
        "anthropic" => {
            assert_eq!(tools[0], weather_tool(), "{sent}");
            assert_eq!(sent["tool_choice"], json!({"type": "any"}), "{sent}");
        }
        _ => {
            assert_eq!(tools[0]["type"], "function", "{sent}");
            assert_eq!(tools[0]["function"]["name"], "get_weather", "{sent}");
            assert_eq!(
                tools[0]["function"]["description"],
                "The current weather in a city"
            );
            assert_eq!(tools[0]["function"]["parameters"], weather_schema());
            if case.provider == "openai" {
                assert_eq!(sent["tool_choice"], "required", "{sent}");
            }
        }
    }
}

/// Checks the follow-up reached the provider as a tool-call turn and its result.
fn assert_upstream_round_trip(case: Case, sent: &Value, id: &str) {
    let turns = sent["messages"].as_array().unwrap();
    match case.provider {
        "openai" => {
            assert_eq!(turns.len(), 4, "{sent}");
            assert_eq!(
                turns[0],
                json!({"role": "user", "content": "What's the weather in Paris?"})
            );
            assert_eq!(turns[1]["role"], "assistant", "{sent}");
            assert_eq!(turns[1]["content"], "Let me check.", "{sent}");
            let calls = turns[1]["tool_calls"].as_array().unwrap();
            assert_eq!(calls.len(), 1, "{sent}");
            assert_eq!(calls[0]["id"], id);
            assert_eq!(calls[0]["type"], "function");
            assert_eq!(calls[0]["function"]["name"], "get_weather");
            let arguments: Value =
                serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(arguments, weather_input());
            assert_eq!(
                turns[2],
                json!({"role": "tool", "tool_call_id": id, "content": "18°C and sunny"}),
                "{sent}"
            );
            assert_eq!(turns[3], json!({"role": "user", "content": "Thanks!"}));
        }
        "anthropic" => {
            assert_eq!(
                sent["messages"],
                json!([
                    {"role": "user", "content": "What's the weather in Paris?"},
                    {"role": "assistant", "content": [
                        {"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": id, "name": "get_weather",
                         "input": weather_input()},
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": id, "content": "18°C and sunny"},
                        {"type": "text", "text": "Thanks!"},
                    ]},
                ]),
                "{sent}"
            );
        }
        _ => {
            assert_eq!(turns.len(), 4, "{sent}");
            assert_eq!(turns[0]["content"], "What's the weather in Paris?");
            assert_eq!(turns[1]["role"], "assistant", "{sent}");
            assert_eq!(turns[1]["content"], "Let me check.", "{sent}");
            let calls = turns[1]["tool_calls"].as_array().unwrap();
            assert_eq!(calls.len(), 1, "{sent}");
            assert_eq!(calls[0]["function"]["name"], "get_weather");
            assert_eq!(calls[0]["function"]["arguments"], weather_input());
            assert_eq!(turns[2]["role"], "tool", "{sent}");
            assert_eq!(turns[2]["content"], "18°C and sunny", "{sent}");
            assert_eq!(turns[2]["tool_name"], "get_weather", "{sent}");
            assert_eq!(turns[3]["role"], "user", "{sent}");
            assert_eq!(turns[3]["content"], "Thanks!", "{sent}");
        }
    }
}

#[tokio::test]
async fn tool_use_round_trips_through_each_provider() {
    let gw = Gateway::start().await;
    let ask = json!({"role": "user", "content": "What's the weather in Paris?"});
    let request = message(json!({
        "messages": [ask],
        "tools": [weather_tool()],
        "tool_choice": {"type": "any"},
    }));
    for case in CASES {
        let (_, key) = case.tenant(&gw).await;

        // The model calls the tool: a text block, then a tool_use block with the parsed input.
        gw.fake.push(
            Reply::text_and_tool_calls("Let me check.", vec![weather_call()]).with_usage(20, 8),
        );
        let answer = messages(&gw, &key, &request).await;
        assert_eq!(answer.status, 200, "{}: {}", case.provider, answer.text);
        assert_upstream_tools(case, &case.last_upstream(&gw).body);
        let body = answer.json();
        assert_eq!(body["stop_reason"], "tool_use", "{}", answer.text);
        assert_eq!(body["usage"]["input_tokens"], 20);
        assert_eq!(body["usage"]["output_tokens"], 8);
        let blocks = content(&body);
        assert_eq!(blocks.len(), 2, "{}", answer.text);
        assert_eq!(blocks[0], json!({"type": "text", "text": "Let me check."}));
        let tool_use = &blocks[1];
        assert_eq!(tool_use["type"], "tool_use", "{}", answer.text);
        assert_eq!(tool_use["name"], "get_weather");
        assert_eq!(tool_use["input"], weather_input());
        let id = tool_use["id"].as_str().unwrap().to_owned();
        if case.provider == "ollama" {
            assert!(!id.is_empty(), "{}", answer.text);
        } else {
            assert_eq!(id, "toolu_weather_1");
        }

        // The same call streamed: a tool_use block whose input_json_deltas make the input.
        gw.fake.push(
            Reply::text_and_tool_calls("Let me check.", vec![weather_call()])
                .with_usage(20, 8)
                .in_chunks(3),
        );
        let mut stream_request = request.clone();
        stream_request["stream"] = json!(true);
        let answer = messages(&gw, &key, &stream_request).await;
        let streamed = complete_stream(&answer);
        assert_upstream_tools(case, &case.last_upstream(&gw).body);
        assert_eq!(streamed.text(), "Let me check.", "{}", answer.text);
        assert_eq!(streamed.stop_reason.as_deref(), Some("tool_use"));
        let tool_uses = streamed.tool_uses();
        assert_eq!(tool_uses.len(), 1, "{}", answer.text);
        assert_eq!(tool_uses[0]["name"], "get_weather");
        assert_eq!(tool_uses[0]["input"], weather_input(), "{}", answer.text);
        if case.provider != "ollama" {
            assert_eq!(tool_uses[0]["id"], "toolu_weather_1");
        }
        assert_eq!(
            streamed.usage.unwrap(),
            json!({"input_tokens": 20, "output_tokens": 8, "cost_usd": case.cost_usd(20, 8)})
        );

        // The follow-up: the assistant turn as the SDK sends it back (the answer's blocks),
        // then the tool's result and more text in one user turn.
        gw.fake
            .push(Reply::text("It is 18°C and sunny in Paris.").with_usage(30, 9));
        let follow_up = message(json!({
            "messages": [
                ask,
                {"role": "assistant", "content": blocks},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": id,
                     "content": [{"type": "text", "text": "18°C and sunny"}]},
                    {"type": "text", "text": "Thanks!"},
                ]},
            ],
            "tools": [weather_tool()],
        }));
        let answer = messages(&gw, &key, &follow_up).await;
        assert_eq!(answer.status, 200, "{}: {}", case.provider, answer.text);
        let body = answer.json();
        assert_eq!(text_of(&body), "It is 18°C and sunny in Paris.");
        assert_eq!(body["stop_reason"], "end_turn");
        assert_upstream_round_trip(case, &case.last_upstream(&gw).body, &id);
    }
}

#[tokio::test]
async fn tool_result_text_blocks_are_joined_and_errors_keep_their_text() {
    let gw = Gateway::start().await;
    let (_, key) = ANTHROPIC.tenant(&gw).await;
    let body = message(json!({
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Oslo"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": true,
                 "content": [{"type": "text", "text": "no such city"},
                             {"type": "text", "text": "try another"}]},
            ]},
        ],
        "tools": [weather_tool()],
    }));
    let answer = messages(&gw, &key, &body).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let sent = ANTHROPIC.last_upstream(&gw).body;
    assert_eq!(
        sent["messages"][2],
        json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": "no such city\n\ntry another"},
        ]}),
        "{sent}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. System prompts.

#[tokio::test]
async fn system_prompts_as_a_string_or_blocks_reach_each_provider() {
    let gw = Gateway::start().await;
    for case in CASES {
        let (_, key) = case.tenant(&gw).await;

        let answer = messages(&gw, &key, &message(json!({"system": "You are terse."}))).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        let sent = case.last_upstream(&gw).body;
        assert_eq!(
            system_texts(case, &sent),
            ["You are terse."],
            "{}: {sent}",
            case.provider
        );
        if case.provider != "anthropic" {
            assert_eq!(sent["messages"][0]["role"], "system", "{sent}");
            assert_eq!(sent["messages"][1]["content"], "hello there", "{sent}");
        }

        let blocks = json!([
            {"type": "text", "text": "Rule one."},
            {"type": "text", "text": "Rule two.", "cache_control": {"type": "ephemeral"}},
        ]);
        let answer = messages(&gw, &key, &message(json!({"system": blocks}))).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        let sent = case.last_upstream(&gw).body;
        let expected: &[&str] = if case.provider == "anthropic" {
            &["Rule one.\n\nRule two."]
        } else {
            &["Rule one.", "Rule two."]
        };
        assert_eq!(
            system_texts(case, &sent),
            expected,
            "{}: {sent}",
            case.provider
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Errors.

#[tokio::test]
async fn authentication_failures_use_anthropics_envelope() {
    let gw = Gateway::start().await;
    let body = message(json!({})).to_string();
    for headers in [
        &[("anthropic-version", "2023-06-01")][..],
        &[("x-api-key", "sk-ant-not-a-key")][..],
        &[("authorization", "Bearer mc_not_a_key")][..],
        &[("x-api-key", "")][..],
    ] {
        for path in [MESSAGES, COUNT_TOKENS] {
            let answer = post_raw(&gw, path, headers, body.clone()).await;
            assert_envelope(&answer, 401, "authentication_error");
        }
    }
    // The admin key has no provider settings.
    let answer = post(&gw, MESSAGES, ADMIN_KEY, &message(json!({}))).await;
    assert_envelope(&answer, 403, "permission_error");
    assert!(gw.fake.requests().is_empty());
}

#[tokio::test]
async fn invalid_requests_are_invalid_request_errors_naming_the_field() {
    let gw = Gateway::start().await;
    let (_, key) = OPENAI.tenant(&gw).await;
    let without_max_tokens = {
        let mut body = message(json!({}));
        body.as_object_mut().unwrap().remove("max_tokens");
        body
    };
    let cases = [
        (without_max_tokens, "max_tokens"),
        (message(json!({"max_tokens": 0})), "max_tokens"),
        (message(json!({"messages": []})), "messages"),
        (
            message(json!({"messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "iVBORw0KGgo="}},
            ]}]})),
            "messages.0.content.0.type",
        ),
        (
            message(json!({"messages": [{"role": "user", "content": [{"type": "bogus"}]}]})),
            "messages.0.content.0.type",
        ),
        (
            message(json!({"messages": [{"role": "user", "content": [{"text": "no type"}]}]})),
            "messages.0.content.0.type",
        ),
        (
            message(json!({"messages": [{"role": "system", "content": "hi"}]})),
            "messages.0.role",
        ),
        (message(json!({"temperature": 1.5})), "temperature"),
        (
            message(json!({"tools": [{"name": "get_weather"}]})),
            "tools.0.input_schema",
        ),
        (
            message(json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})),
            "tools.0.type",
        ),
        (
            message(json!({"tool_choice": {"type": "sometimes"}})),
            "tool_choice.type",
        ),
    ];
    for (body, field) in cases {
        let answer = messages(&gw, &key, &body).await;
        let message = assert_envelope(&answer, 400, "invalid_request_error");
        assert!(message.starts_with(field), "{field}: {message}");
    }
    let answer = post_raw(
        &gw,
        MESSAGES,
        &[("x-api-key", &key)],
        "{not json".to_owned(),
    )
    .await;
    assert_envelope(&answer, 400, "invalid_request_error");
    assert!(gw.fake.requests().is_empty(), "{:?}", gw.fake.requests());
}

#[tokio::test]
async fn upstream_errors_map_to_anthropic_statuses_and_types() {
    let gw = Gateway::start().await;
    for case in CASES {
        let (_, key) = case.tenant(&gw).await;

        gw.fake.push(Reply::rate_limited(7));
        let answer = messages(&gw, &key, &message(json!({}))).await;
        assert_envelope(&answer, 429, "rate_limit_error");
        assert_eq!(answer.header("retry-after"), "7", "{}", case.provider);

        gw.fake.push(Reply::error(500, "the upstream exploded"));
        let answer = messages(&gw, &key, &message(json!({}))).await;
        assert_envelope(&answer, 502, "api_error");

        // A provider key the upstream refuses is the gateway's problem, not the caller's: a
        // 5xx, so the SDK does not report the caller's key as wrong.
        gw.fake.push(Reply::error(401, "invalid api key"));
        let answer = messages(&gw, &key, &message(json!({}))).await;
        assert_envelope(&answer, 502, "api_error");

        gw.fake
            .push(Reply::error(400, "the upstream did not like it"));
        let answer = messages(&gw, &key, &message(json!({}))).await;
        assert_envelope(&answer, 400, "invalid_request_error");

        // The same failures before a stream starts are plain error answers too.
        gw.fake.push(Reply::rate_limited(3));
        let answer = messages(&gw, &key, &message(json!({"stream": true}))).await;
        assert_envelope(&answer, 429, "rate_limit_error");
        assert_eq!(answer.header("retry-after"), "3");
    }
}

#[tokio::test]
async fn a_failure_mid_stream_ends_with_an_error_event() {
    let gw = Gateway::start().await;
    for case in CASES {
        let (_, key) = case.tenant(&gw).await;

        // The upstream sends its own in-stream error after two text frames.
        gw.fake.push(Reply::stream_error(2, "the model fell over"));
        let answer = messages(&gw, &key, &message(json!({"stream": true}))).await;
        let streamed = read_stream(&answer);
        let error = streamed
            .error
            .clone()
            .unwrap_or_else(|| panic!("{}: no error event: {}", case.provider, answer.text));
        assert!(error["type"].is_string(), "{}", answer.text);
        assert!(
            ["api_error", "overloaded_error"].contains(&error["type"].as_str().unwrap()),
            "{}: {}",
            case.provider,
            answer.text
        );
        assert!(error["message"].is_string(), "{}", answer.text);
        assert!(!streamed.text().is_empty(), "{}", answer.text);
        assert_eq!(streamed.stop_reason, None);

        // The upstream connection is cut after five frames: some text in every dialect
        // (Anthropic's stream opens with three frames before its first text).
        gw.fake.push(
            Reply::text("one two three four five six seven eight")
                .in_chunks(8)
                .drop_after(5),
        );
        let answer = messages(&gw, &key, &message(json!({"stream": true}))).await;
        let streamed = read_stream(&answer);
        let error = streamed
            .error
            .clone()
            .unwrap_or_else(|| panic!("{}: no error event: {}", case.provider, answer.text));
        assert_eq!(error["type"], "api_error", "{}", answer.text);
        assert!(error["message"].is_string(), "{}", answer.text);
        let text = streamed.text();
        assert!(
            !text.is_empty() && "one two three four five six seven eight".starts_with(&text),
            "{}: {}",
            case.provider,
            answer.text
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Usage records.

/// The usage records of `tenant`, oldest first.
async fn records_of(gw: &Gateway, tenant: &str, expected: u64) -> Vec<UsageRecord> {
    wait_for_records(
        gw.state.store.as_ref(),
        Some(tenant),
        expected,
        Duration::from_secs(10),
    )
    .await;
    let mut records = gw.state.store.recent_usage(tenant, 100).await.unwrap();
    records.reverse();
    records
}

fn by_request_id<'a>(records: &'a [UsageRecord], answer: &Answer) -> &'a UsageRecord {
    let id = answer.header("x-request-id");
    let found: Vec<_> = records.iter().filter(|r| r.request_id == id).collect();
    assert_eq!(found.len(), 1, "records for request {id}: {records:#?}");
    found[0]
}

async fn usage_is_recorded_under_the_messages_endpoint(db: Db) {
    let gw = db.gateway(&[]).await;
    for case in CASES {
        let (tenant, key) = case.tenant(&gw).await;

        gw.fake.push(Reply::text("Four.").with_usage(10, 2));
        let plain = post_raw(
            &gw,
            MESSAGES,
            &[("x-api-key", &key), ("x-conversation-id", "conv-header")],
            message(json!({})).to_string(),
        )
        .await;
        assert_eq!(plain.status, 200, "{}", plain.text);

        gw.fake.push(
            Reply::text("Streamed answer.")
                .with_usage(7, 5)
                .in_chunks(3),
        );
        let streamed = messages(
            &gw,
            &key,
            &message(json!({
                "stream": true,
                "metadata": {"conversation_id": "conv-body", "user_id": "u-1"},
            })),
        )
        .await;
        complete_stream(&streamed);

        gw.fake
            .push(Reply::text_and_tool_calls("", vec![weather_call()]).with_usage(20, 8));
        let tool = messages(&gw, &key, &message(json!({"tools": [weather_tool()]}))).await;
        assert_eq!(tool.status, 200, "{}", tool.text);

        gw.fake.push(Reply::error(500, "the upstream exploded"));
        let failed = messages(&gw, &key, &message(json!({}))).await;
        assert_eq!(failed.status, 502, "{}", failed.text);

        // Refused before any provider: no record.
        let refused = messages(&gw, &key, &message(json!({"max_tokens": null}))).await;
        assert_eq!(refused.status, 400, "{}", refused.text);

        let records = records_of(&gw, &tenant, 4).await;
        for record in &records {
            assert_eq!(record.tenant_id, tenant);
            assert_eq!(record.endpoint, "messages", "{record:?}");
            assert_eq!(record.provider, case.provider, "{record:?}");
            assert_eq!(record.model, case.model, "{record:?}");
            assert!(!record.cache_hit, "{record:?}");
            assert_eq!(record.fallback_from, None, "{record:?}");
            assert_eq!(record.embedding_tokens, 0, "{record:?}");
            assert!(!record.tokens_estimated, "{record:?}");
        }
        for (answer, (input, output), conversation) in [
            (&plain, (10, 2), Some("conv-header")),
            (&streamed, (7, 5), Some("conv-body")),
            (&tool, (20, 8), None),
        ] {
            let record = by_request_id(&records, answer);
            assert_eq!(record.status, "ok", "{record:?}");
            assert_eq!(
                (record.input_tokens, record.output_tokens),
                (input, output),
                "{}: {record:?}",
                case.provider
            );
            assert_eq!(
                record.cost_nano_usd,
                (case.cost)(input, output),
                "{record:?}"
            );
            assert_eq!(
                record.conversation_id.as_deref(),
                conversation,
                "{record:?}"
            );
        }
        assert_eq!(
            plain.json()["usage"]["cost_usd"],
            case.cost_usd(10, 2),
            "{}",
            plain.text
        );
        let stream_record = by_request_id(&records, &streamed);
        let ttft = stream_record.ttft_ms.expect("a stream has a ttft");
        assert!(
            (0..=stream_record.latency_ms).contains(&ttft),
            "{stream_record:?}"
        );
        let failed_record = by_request_id(&records, &failed);
        assert_eq!(failed_record.status, "error", "{failed_record:?}");
        assert_eq!(failed_record.cost_nano_usd, 0, "{failed_record:?}");

        // The conversation id went nowhere upstream; the rest of the metadata went to
        // Anthropic only.
        let sent = &gw.fake.requests_to(case.path)[1].body;
        assert!(!sent.to_string().contains("conv-body"), "{sent}");
        if case.provider == "anthropic" {
            assert_eq!(sent["metadata"], json!({"user_id": "u-1"}), "{sent}");
        }
    }
}

on_sqlite_and_postgres! {
    #[tokio::test]
    usage_is_recorded_under_the_messages_endpoint:
        usage_is_recorded_under_the_messages_endpoint_on_sqlite,
        usage_is_recorded_under_the_messages_endpoint_on_postgres
}

#[tokio::test]
async fn metrics_count_requests_under_the_messages_endpoint() {
    let gw = Gateway::start().await;
    let (_, key) = OPENAI.tenant(&gw).await;
    let answer = messages(&gw, &key, &message(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let refused = messages(&gw, &key, &json!({"messages": []})).await;
    assert_eq!(refused.status, 400, "{}", refused.text);
    let metrics = gw.client.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("endpoint=\"messages\""))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("meta_chat_requests_total") && l.contains("provider=\"openai\"")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("meta_chat_rejected_requests_total")
                && l.contains("reason=\"invalid_request\"")),
        "{lines:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Token counting.

#[tokio::test]
async fn count_tokens_answers_an_estimate_without_asking_a_provider() {
    let gw = Gateway::start().await;
    let (_, key) = ANTHROPIC.tenant(&gw).await;
    let count = |body: Value| {
        let gw = &gw;
        let key = key.clone();
        async move { post(gw, COUNT_TOKENS, &key, &body).await }
    };

    // ~4 characters a token: "hello there" (11) is 3, "Be brief." (9) is 3; max_tokens is
    // not needed.
    let answer = count(json!({
        "model": "claude-3-haiku-20240307",
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "hello there"}],
    }))
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json(), json!({"input_tokens": 6}));

    // Blocks count as their text; a tool adds its definition.
    let answer = count(json!({
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
    }))
    .await;
    assert_eq!(answer.json(), json!({"input_tokens": 6}), "{}", answer.text);
    let answer = count(message(json!({"tools": [weather_tool()]}))).await;
    let with_tool = answer.json()["input_tokens"].as_u64().unwrap();
    assert!(with_tool > 3 + 20, "{}", answer.text);

    let answer = count(json!({"messages": "hello"})).await;
    let message = assert_envelope(&answer, 400, "invalid_request_error");
    assert!(message.starts_with("messages"), "{message}");
    let answer = count(json!({})).await;
    assert_envelope(&answer, 400, "invalid_request_error");
    assert!(gw.fake.requests().is_empty(), "{:?}", gw.fake.requests());
}

// ---------------------------------------------------------------------------------------------
// 8. Anthropic → Anthropic loses nothing.

#[tokio::test]
async fn an_anthropic_upstream_receives_fields_the_unified_request_does_not_model() {
    let gw = Gateway::start().await;
    let (_, key) = gw
        .tenant_named(
            "passthrough",
            json!({"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307",
                           "apiKey": TENANT_ANTHROPIC_KEY}}),
        )
        .await;
    let unmodelled = json!({
        "top_k": 5,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "service_tier": "standard_only",
        "container": null,
        "some_future_field": {"nested": [1, 2, {"deep": true}]},
    });
    let mut body = message(json!({
        "system": "Be brief.",
        "metadata": {"user_id": "user-42", "conversation_id": "conv-9"},
        "stop_sequences": ["\n\nHuman:", "END"],
        "temperature": 0.25,
        "top_p": 0.5,
        "tools": [weather_tool()],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }));
    body.as_object_mut()
        .unwrap()
        .extend(unmodelled.as_object().unwrap().clone());

    for stream in [false, true] {
        body["stream"] = json!(stream);
        let answer = messages(&gw, &key, &body).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        if stream {
            complete_stream(&answer);
        }
        let sent = ANTHROPIC.last_upstream(&gw);
        assert_eq!(sent.header("x-api-key"), Some(TENANT_ANTHROPIC_KEY));
        assert!(sent.header("anthropic-version").is_some());
        let sent = sent.body;
        for (field, value) in unmodelled.as_object().unwrap() {
            assert_eq!(&sent[field], value, "{field}: {sent}");
            assert!(
                sent.as_object().unwrap().contains_key(field),
                "{field}: {sent}"
            );
        }
        assert_eq!(sent["metadata"], json!({"user_id": "user-42"}), "{sent}");
        assert_eq!(
            sent["stop_sequences"],
            json!(["\n\nHuman:", "END"]),
            "{sent}"
        );
        assert_eq!(sent["temperature"], 0.25, "{sent}");
        assert_eq!(sent["top_p"], 0.5, "{sent}");
        assert_eq!(sent["system"], "Be brief.", "{sent}");
        assert_eq!(sent["max_tokens"], 256, "{sent}");
        assert_eq!(sent["model"], "claude-3-haiku-20240307", "{sent}");
        assert_eq!(sent["tools"], json!([weather_tool()]), "{sent}");
        assert_eq!(
            sent["tool_choice"],
            json!({"type": "tool", "name": "get_weather"}),
            "{sent}"
        );
        if stream {
            assert_eq!(sent["stream"], true, "{sent}");
        } else {
            assert!(sent.get("stream").is_none(), "{sent}");
        }
    }

    // Another provider takes what it models and nothing of Anthropic's own fields.
    let (_, key) = OPENAI.tenant(&gw).await;
    body["stream"] = json!(false);
    let answer = messages(&gw, &key, &body).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let sent = OPENAI.last_upstream(&gw).body;
    for field in [
        "top_k",
        "thinking",
        "service_tier",
        "some_future_field",
        "metadata",
    ] {
        assert!(sent.get(field).is_none(), "{field}: {sent}");
    }
    assert_eq!(sent["stop"], json!(["\n\nHuman:", "END"]), "{sent}");
    assert_eq!(sent["temperature"], 0.25, "{sent}");
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}}),
        "{sent}"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. Limits, cache and fallback on this endpoint.

/// A gateway on `backend` (asserted).
async fn on_backend(backend: Backend<'_>) -> Gateway {
    let gw = Gateway::start_with(backend).await;
    assert_eq!(
        matches!(gw.state.cache, ResponseCache::Redis(_)),
        !backend.is_empty(),
        "{:?}",
        gw.state.cache
    );
    gw
}

async fn the_rate_limit_refuses_in_anthropics_envelope(backend: Backend<'_>) {
    let gw = on_backend(backend).await;
    let (_, key) = gw
        .tenant_named(
            "limited",
            json!({"llm": {"provider": "openai", "model": "gpt-4o-mini"},
                   "rateLimit": {"requestsPerMinute": 1}}),
        )
        .await;
    let answer = messages(&gw, &key, &message(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-ratelimit-limit-requests"), "1");
    for body in [message(json!({})), message(json!({"stream": true}))] {
        let answer = messages(&gw, &key, &body).await;
        let text = assert_envelope(&answer, 429, "rate_limit_error");
        assert!(text.contains("1 requests per minute"), "{text}");
        let retry_after: u64 = answer.header("retry-after").parse().unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
    }
    assert_eq!(gw.fake.requests().len(), 1);
}

in_process_and_on_redis! {
    the_rate_limit_refuses_in_anthropics_envelope:
        the_rate_limit_refuses_in_anthropics_envelope_in_process,
        the_rate_limit_refuses_in_anthropics_envelope_on_redis,
        "REDIS_TIMEOUT_MS" = "5000"
}

async fn an_identical_request_is_answered_from_the_cache(backend: Backend<'_>) {
    let gw = on_backend(backend).await;
    let settings = json!({
        "llm": {"provider": "openai", "model": "gpt-4o-mini"},
        "cache": {"enabled": true, "ttlSeconds": 300},
    });
    let (id, key) = gw.tenant_named("cached", settings.clone()).await;
    let body = message(json!({"system": "Be brief.", "temperature": 0}));
    gw.fake.push(Reply::text("Cached four.").with_usage(10, 2));
    let first = messages(&gw, &key, &body).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.header("x-meta-chat-cache"), "miss");

    // Answers are cached in the background: wait for the entry under the gateway's key.
    let parsed = parse_messages_request(body.to_string().as_bytes()).unwrap();
    let settings = TenantSettings::parse(&settings).unwrap();
    let (primary, _) =
        meta_chat::routing::provider_config(&gw.state.config.llm, &settings, None).unwrap();
    let cache_key = ResponseCache::key(&id, &primary, &parsed.request);
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.state.cache.get(&cache_key).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "nothing cached under {cache_key}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let second = messages(&gw, &key, &body).await;
    assert_eq!(second.status, 200, "{}", second.text);
    assert_eq!(second.header("x-meta-chat-cache"), "hit");
    assert_eq!(second.header("x-meta-chat-cost-usd"), "0.000000000");
    let (a, b) = (first.json(), second.json());
    assert_eq!(b["content"], a["content"]);
    assert_eq!(b["usage"]["input_tokens"], 10);
    assert_eq!(b["usage"]["cost_usd"], "0.000000000");
    assert_ne!(b["id"], a["id"]);

    // The same request streamed replays the cached answer as a well-formed stream.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let answer = messages(&gw, &key, &streamed).await;
    assert_eq!(answer.header("x-meta-chat-cache"), "hit");
    let replay = complete_stream(&answer);
    assert_eq!(replay.text(), "Cached four.");
    assert_eq!(replay.stop_reason.as_deref(), Some("end_turn"));

    assert_eq!(gw.fake.requests_to(OPENAI.path).len(), 1);
    let records = records_of(&gw, &id, 3).await;
    assert_eq!(
        records.iter().filter(|r| r.cache_hit).count(),
        2,
        "{records:#?}"
    );
}

in_process_and_on_redis! {
    an_identical_request_is_answered_from_the_cache:
        an_identical_request_is_answered_from_the_cache_in_process,
        an_identical_request_is_answered_from_the_cache_on_redis,
        "REDIS_TIMEOUT_MS" = "5000"
}

#[tokio::test]
async fn a_failing_provider_falls_back() {
    let gw = Gateway::start().await;
    let (id, key) = gw
        .tenant_named(
            "fallback",
            json!({
                "llm": {"provider": "openai", "model": "gpt-4o-mini"},
                "fallback": [{"provider": "anthropic", "model": "claude-3-haiku-20240307",
                              "priority": 1}],
            }),
        )
        .await;
    gw.fake.push_all([
        Reply::error(500, "internal failure"),
        Reply::text("from the fallback").with_usage(5, 3),
    ]);
    let answer = messages(&gw, &key, &message(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "anthropic");
    let body = answer.json();
    assert_eq!(text_of(&body), "from the fallback");
    assert_eq!(body["model"], "claude-3-haiku-20240307");
    assert_eq!(body["usage"]["cost_usd"], usd(haiku_cost(5, 3)));
    let records = records_of(&gw, &id, 1).await;
    assert_eq!(records[0].fallback_from.as_deref(), Some("openai"));
    assert_eq!(records[0].endpoint, "messages");

    // A request naming another provider's model is routed there.
    let answer = messages(&gw, &key, &message(json!({"model": "ollama/llama3.1:8b"}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "ollama");
    assert_eq!(answer.json()["model"], "llama3.1:8b");
}
