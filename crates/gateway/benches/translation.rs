//! Benchmarks of the pure (no I/O) translation work the gateway does for a chat request on
//! top of the upstream call, end to end: from the client's bytes to the upstream's bytes,
//! and from the upstream's bytes back to the client's.
//!
//! - `translate_request/{from}_to_{to}/{case}`: a client body in the OpenAI
//!   (`/v1/chat/completions`) or Anthropic (`/v1/messages`) dialect parsed into the unified
//!   `CompletionRequest` (`openai_codec::parse_chat_request`,
//!   `anthropic_codec::parse_messages_request`), then written as the upstream's request body
//!   (`wire::openai_request_body`, `wire::anthropic_request_body`, not streaming). Cases:
//!   `small` (a system prompt and 3 messages, about 1 KB), `tools` (3 tools with JSON schemas,
//!   a tool call and its result in the history) and `large` (about 100 KB of messages).
//!   Directions: `openai_to_anthropic`, `anthropic_to_openai`, and the pass-through
//!   `openai_to_openai` (`small` and `large`). Throughput is the client body's size.
//! - `translate_response/{from}_to_{to}/{case}`: an upstream's JSON answer, as the testkit
//!   fakes shape it, read into the unified `CompletionResponse` (`wire::anthropic_response`,
//!   `wire::openai_response`), then written as the client's JSON bytes: an OpenAI
//!   `chat.completion` (`openai_codec::completion_json`) or an Anthropic `message`
//!   (`anthropic_codec::message_json`). Cases: `text` (about 800 bytes of prose) and
//!   `tool_calls` (a sentence and two tool calls). Throughput is the upstream body's size.
//! - `translate_stream/{from}_to_{to}/20_chunks`: a whole upstream SSE stream, one `Bytes`
//!   per event, decoded into unified `StreamChunk`s (`wire::anthropic_stream`,
//!   `wire::openai_stream`, polled without a runtime) and written as the client's SSE frames
//!   as the streaming handlers do (`ChunkEncoder` up to `[DONE]` for OpenAI,
//!   `EventEncoder` from `message_start` to `message_stop` for Anthropic), per iteration.
//!   The Anthropic upstream stream is `message_start`, `content_block_start`, `ping`, 18 text
//!   `content_block_delta`s, `content_block_stop`, `message_delta` with the usage and
//!   `message_stop`; the OpenAI one is the role frame, 18 content frames, the finish frame,
//!   the usage frame and `[DONE]`. Either decodes to 20 unified chunks (18 text deltas, the
//!   finish reason, the usage); throughput is in those chunks, so the per-element figure is
//!   the cost per chunk. Directions: `anthropic_to_openai`, `openai_to_anthropic`,
//!   `openai_to_openai`.
//!
//! Routing, limits, metering and the response cache are not measured. Every input is run
//! once and checked before anything is timed; a fixture that fails to translate or comes out
//! wrong aborts the run with a message naming it.
//!
//! ```text
//! cargo bench -p meta-chat --bench translation
//! cargo bench -p meta-chat --bench translation -- translate_stream   # one group
//! ```
//!
//! Each of the 15 benchmarks warms up for 1 s and measures for 3 s; the whole run takes
//! about 70 s once built.

#![allow(clippy::panic, reason = "a benchmark harness aborts on a bad fixture")]

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use futures::{FutureExt, StreamExt};
use meta_chat::api::anthropic_codec::{EventEncoder, message_json, parse_messages_request};
use meta_chat::api::openai_codec::{ChunkEncoder, SSE_DONE, completion_json, parse_chat_request};
use meta_chat_llm::providers::wire;
use meta_chat_llm::{
    ChunkStream, CompletionRequest, CompletionResponse, FinishReason, Message, ProviderConfig,
    ProviderKind, StreamChunk,
};
use serde_json::{Value, json};

/// The ids, creation time and cost the gateway puts in its answers.
const RESPONSE_ID: &str = "chatcmpl-0193b5c4e1a07d2f9a3c5e7b1d4f6a80";
const MESSAGE_ID: &str = "msg_0193b5c4e1a07d2f9a3c5e7b1d4f6a80";
const CREATED: i64 = 1_750_000_000;
const COST_USD: &str = "0.00123400";
const INPUT_ESTIMATE: u64 = 1_200;

/// The models the routed provider configurations name, and those the upstreams answer with.
const ANTHROPIC_MODEL: &str = "claude-3-5-haiku-latest";
const ANTHROPIC_SERVED: &str = "claude-3-5-haiku-20241022";
const OPENAI_MODEL: &str = "gpt-4o-mini";
const OPENAI_SERVED: &str = "gpt-4o-mini-2024-07-18";
const FINGERPRINT: &str = "fp_0193b5c4e1";

/// Text deltas in each benchmarked stream; with the finish reason and the usage, the unified
/// chunks it decodes to.
const TEXT_DELTAS: usize = 18;
const STREAM_CHUNKS: usize = TEXT_DELTAS + 2;

/// The fixture's value; a bad fixture ends the run with its error.
fn checked<T>(result: Result<T, String>) -> T {
    match result {
        Ok(value) => value,
        Err(error) => panic!("translation bench: bad fixture: {error}"),
    }
}

/// A JSON body's top-level array `key`'s length.
fn array_len(body: &[u8], key: &str) -> Result<usize, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("output is not JSON: {e}"))?;
    value
        .get(key)
        .and_then(Value::as_array)
        .map(Vec::len)
        .ok_or_else(|| format!("output has no `{key}` array"))
}

/// Words for generated prose, with JSON escapes and multi-byte characters among them.
const WORDS: &[&str] = &[
    "the",
    "gateway",
    "routes",
    "each",
    "request",
    "to",
    "a",
    "provider",
    "and",
    "counts",
    "tokens",
    "for",
    "every",
    "tenant",
    "café",
    "naïve",
    "\"quoted\"",
    "stream",
    "日本語",
    "latency",
    "budget",
    "model",
    "answer,",
    "line\nbreak",
    "tab\tseparated",
    "cost.",
    "résumé",
    "{braces}",
    "path/to/file.rs",
    "42",
];

/// Deterministic prose of at least `len` bytes.
fn prose(seed: u64, len: usize) -> String {
    let mut text = String::with_capacity(len + 16);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    while text.len() < len {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let pick = usize::try_from(state >> 33).unwrap_or(0) % WORDS.len();
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(WORDS[pick]);
    }
    text
}

fn to_bytes(value: &Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|e| format!("serialising a fixture: {e}"))
}

fn throughput_bytes(len: usize) -> Throughput {
    Throughput::Bytes(u64::try_from(len).unwrap_or(u64::MAX))
}

fn ensure(ok: bool, what: &str) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what.to_owned()) }
}

// ---------------------------------------------------------------------------------------
// Requests.

/// A plain conversation: a system prompt and alternating user and assistant turns.
struct Conversation {
    system: String,
    turns: Vec<(&'static str, String)>,
}

impl Conversation {
    fn new(turns: usize, turn_bytes: usize, system_bytes: usize) -> Self {
        Self {
            system: prose(0, system_bytes),
            turns: (0..turns)
                .map(|i| {
                    let role = if i % 2 == 0 { "user" } else { "assistant" };
                    (role, prose(i as u64 + 1, turn_bytes))
                })
                .collect(),
        }
    }

    fn openai(&self, model: &str) -> Value {
        let mut messages = vec![json!({"role": "system", "content": self.system})];
        messages.extend(
            self.turns
                .iter()
                .map(|(role, text)| json!({"role": role, "content": text})),
        );
        json!({
            "model": model,
            "messages": messages,
            "temperature": 0.7,
            "max_tokens": 1024,
            "user": "user-1234",
        })
    }

    fn anthropic(&self) -> Value {
        let messages: Vec<Value> = self
            .turns
            .iter()
            .map(|(role, text)| json!({"role": role, "content": text}))
            .collect();
        json!({
            "model": "openai/gpt-4o-mini",
            "system": self.system,
            "messages": messages,
            "temperature": 0.7,
            "max_tokens": 1024,
            "metadata": {"user_id": "user-1234"},
        })
    }
}

/// The JSON schemas of the three tools, with their names and descriptions.
fn tool_schemas() -> [(&'static str, &'static str, Value); 3] {
    [
        (
            "get_weather",
            "Current conditions and the forecast for a place and day.",
            json!({
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "City and country, e.g. Paris, FR"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "date": {"type": "string", "format": "date"},
                },
                "required": ["location"],
                "additionalProperties": false,
            }),
        ),
        (
            "search_flights",
            "Searches scheduled flights between two airports.",
            json!({
                "type": "object",
                "properties": {
                    "origin": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "IATA code"},
                    "destination": {"type": "string", "pattern": "^[A-Z]{3}$", "description": "IATA code"},
                    "depart_date": {"type": "string", "format": "date"},
                    "return_date": {"type": "string", "format": "date"},
                    "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                    "cabin": {"type": "string", "enum": ["economy", "premium_economy", "business", "first"]},
                    "max_price": {"type": "number", "minimum": 0},
                },
                "required": ["origin", "destination", "depart_date"],
                "additionalProperties": false,
            }),
        ),
        (
            "create_calendar_event",
            "Creates an event in the user's calendar and invites the attendees.",
            json!({
                "type": "object",
                "properties": {
                    "title": {"type": "string", "maxLength": 200},
                    "start": {"type": "string", "format": "date-time"},
                    "end": {"type": "string", "format": "date-time"},
                    "attendees": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "email": {"type": "string", "format": "email"},
                                "optional": {"type": "boolean"},
                            },
                            "required": ["email"],
                        },
                    },
                    "reminders": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                },
                "required": ["title", "start"],
                "additionalProperties": false,
            }),
        ),
    ]
}

const TOOL_SYSTEM: &str = "You are a travel assistant. Use the tools to look things up; never guess \
     prices or the weather. Answer briefly.";
const TOOL_QUESTION: &str = "What's the weather in Paris on 2 June, and can you find me a flight \
     from Berlin that morning?";
const TOOL_FOLLOW_UP: &str = "Thanks. Now the flights, please: two passengers, economy.";

fn weather_arguments() -> Value {
    json!({"location": "Paris, FR", "unit": "celsius", "date": "2025-06-02"})
}

fn weather_result() -> Value {
    json!({
        "temperature": 21,
        "conditions": "partly cloudy",
        "precipitation_chance": 0.2,
        "wind_kph": 14,
    })
}

fn openai_tools_body() -> Value {
    let tools: Vec<Value> = tool_schemas()
        .into_iter()
        .map(|(name, description, parameters)| {
            json!({
                "type": "function",
                "function": {"name": name, "description": description, "parameters": parameters},
            })
        })
        .collect();
    json!({
        "model": "anthropic/claude-3-5-sonnet-latest",
        "messages": [
            {"role": "system", "content": TOOL_SYSTEM},
            {"role": "user", "content": TOOL_QUESTION},
            {
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "id": "call_weather_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": weather_arguments().to_string()},
                }],
            },
            {"role": "tool", "tool_call_id": "call_weather_1", "content": weather_result().to_string()},
            {"role": "user", "content": TOOL_FOLLOW_UP},
        ],
        "tools": tools,
        "tool_choice": "auto",
        "max_tokens": 1024,
    })
}

fn anthropic_tools_body() -> Value {
    let tools: Vec<Value> = tool_schemas()
        .into_iter()
        .map(|(name, description, input_schema)| {
            json!({"name": name, "description": description, "input_schema": input_schema})
        })
        .collect();
    json!({
        "model": "openai/gpt-4o",
        "system": TOOL_SYSTEM,
        "messages": [
            {"role": "user", "content": TOOL_QUESTION},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check the weather first."},
                    {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": weather_arguments()},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01", "content": weather_result().to_string()},
                    {"type": "text", "text": TOOL_FOLLOW_UP},
                ],
            },
        ],
        "tools": tools,
        "tool_choice": {"type": "auto"},
        "max_tokens": 1024,
    })
}

fn small_conversation() -> Conversation {
    Conversation::new(3, 220, 180)
}

fn large_conversation() -> Conversation {
    Conversation::new(100, 1_000, 1_000)
}

/// A client dialect's parser: body bytes to the unified request.
type ParseRequest = fn(&[u8]) -> Result<CompletionRequest, String>;

/// An upstream's request writer: the unified request to the upstream's body bytes.
type WriteRequest = fn(&ProviderConfig, &CompletionRequest, bool) -> meta_chat_llm::Result<Vec<u8>>;

fn parse_openai(body: &[u8]) -> Result<CompletionRequest, String> {
    parse_chat_request(body)
        .map(|parsed| parsed.request)
        .map_err(|e| e.message)
}

fn parse_anthropic(body: &[u8]) -> Result<CompletionRequest, String> {
    parse_messages_request(body)
        .map(|parsed| parsed.request)
        .map_err(|e| e.message)
}

/// One way through the gateway for a request: a client dialect in, an upstream out.
struct RequestPath {
    name: &'static str,
    parse: ParseRequest,
    write: WriteRequest,
    config: ProviderConfig,
    /// The client bodies, by case name.
    cases: Vec<(&'static str, Vec<u8>)>,
}

impl BodyPath for RequestPath {
    fn name(&self) -> &str {
        self.name
    }

    fn cases(&self) -> &[(&'static str, Vec<u8>)] {
        &self.cases
    }

    /// The client body as the upstream's (non-streaming) request body.
    fn translate(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let request = (self.parse)(body)?;
        (self.write)(&self.config, &request, false).map_err(|e| e.to_string())
    }

    /// Runs `body` once and checks the unified request and the upstream body.
    fn check(&self, case: &str, body: &[u8]) -> Result<(), String> {
        let context = |e: String| format!("translate_request/{}/{case}: {e}", self.name);
        let request = (self.parse)(body).map_err(|e| context(format!("client body: {e}")))?;
        let expected_tools = match case {
            "small" => ensure(request.messages.len() == 4, "4 unified messages"),
            "tools" => ensure(
                request.tools.len() == 3
                    && request.messages.iter().any(|m| {
                        matches!(m, Message::Assistant { tool_calls, .. } if tool_calls.len() == 1)
                    })
                    && request
                        .messages
                        .iter()
                        .any(|m| matches!(m, Message::Tool { .. })),
                "3 tools, a tool call and its result",
            ),
            _ => ensure(request.messages.len() == 101, "101 unified messages"),
        }
        .map(|()| request.tools.len())
        .map_err(context)?;
        let upstream = self.translate(body).map_err(context)?;
        ensure(
            array_len(&upstream, "messages").map_err(context)? > 0,
            "upstream messages",
        )
        .map_err(context)?;
        if expected_tools > 0 {
            ensure(
                array_len(&upstream, "tools").map_err(context)? == expected_tools,
                "3 upstream tools",
            )
            .map_err(context)?;
        }
        Ok(())
    }
}

fn openai_cases(model: &str, with_tools: bool) -> Result<Vec<(&'static str, Vec<u8>)>, String> {
    let mut cases = vec![("small", to_bytes(&small_conversation().openai(model))?)];
    if with_tools {
        cases.push(("tools", to_bytes(&openai_tools_body())?));
    }
    cases.push(("large", to_bytes(&large_conversation().openai(model))?));
    Ok(cases)
}

fn anthropic_cases() -> Result<Vec<(&'static str, Vec<u8>)>, String> {
    Ok(vec![
        ("small", to_bytes(&small_conversation().anthropic())?),
        ("tools", to_bytes(&anthropic_tools_body())?),
        ("large", to_bytes(&large_conversation().anthropic())?),
    ])
}

fn request_paths() -> Result<Vec<RequestPath>, String> {
    let anthropic = ProviderConfig::new(ProviderKind::Anthropic, ANTHROPIC_MODEL);
    let openai = ProviderConfig::new(ProviderKind::OpenAi, OPENAI_MODEL);
    Ok(vec![
        RequestPath {
            name: "openai_to_anthropic",
            parse: parse_openai,
            write: wire::anthropic_request_body,
            config: anthropic,
            cases: openai_cases("anthropic/claude-3-5-haiku-latest", true)?,
        },
        RequestPath {
            name: "anthropic_to_openai",
            parse: parse_anthropic,
            write: wire::openai_request_body,
            config: openai.clone(),
            cases: anthropic_cases()?,
        },
        RequestPath {
            name: "openai_to_openai",
            parse: parse_openai,
            write: wire::openai_request_body,
            config: openai,
            cases: openai_cases("openai/gpt-4o-mini", false)?,
        },
    ])
}

fn translate_request(c: &mut Criterion) {
    bench_paths(c, "translate_request", request_paths());
}

// ---------------------------------------------------------------------------------------
// Responses.

const ANSWER_TEXT_SEED: u64 = 7;
const TOOL_PREAMBLE: &str = "I'll search both directions and add the trip to your calendar.";

fn flight_arguments() -> Value {
    json!({
        "origin": "BER",
        "destination": "CDG",
        "depart_date": "2025-06-02",
        "passengers": 2,
        "cabin": "economy",
    })
}

fn calendar_arguments() -> Value {
    json!({
        "title": "Paris trip",
        "start": "2025-06-02T07:00:00+02:00",
        "attendees": [{"email": "ada@example.com"}, {"email": "bob@example.com", "optional": true}],
        "reminders": [1440, 60],
    })
}

/// An Anthropic Messages answer, shaped as the testkit's fake writes it.
fn anthropic_answer_body(tool_calls: bool) -> Value {
    let (content, stop_reason, output_tokens) = if tool_calls {
        (
            json!([
                {"type": "text", "text": TOOL_PREAMBLE},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "search_flights", "input": flight_arguments()},
                {"type": "tool_use", "id": "toolu_01B19r01rx01mr028946mr0", "name": "create_calendar_event", "input": calendar_arguments()},
            ]),
            "tool_use",
            121,
        )
    } else {
        (
            json!([{"type": "text", "text": prose(ANSWER_TEXT_SEED, 800)}]),
            "end_turn",
            196,
        )
    };
    json!({
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": ANTHROPIC_SERVED,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
        "usage": {"input_tokens": 1_180, "output_tokens": output_tokens},
    })
}

/// An OpenAI `chat.completion`, shaped as the testkit's fake writes it.
fn openai_answer_body(tool_calls: bool) -> Value {
    let (message, finish_reason, output_tokens) = if tool_calls {
        let call = |id: &str, name: &str, arguments: Value| {
            json!({
                "id": id,
                "type": "function",
                "function": {"name": name, "arguments": arguments.to_string()},
            })
        };
        (
            json!({
                "role": "assistant",
                "content": null,
                "refusal": null,
                "tool_calls": [
                    call("call_Hk2nQ8vXyZ4mP1rT6sW9bC3d", "search_flights", flight_arguments()),
                    call("call_Jm5pR2tVwA7nQ4sX8yB1cD6f", "create_calendar_event", calendar_arguments()),
                ],
            }),
            "tool_calls",
            98,
        )
    } else {
        (
            json!({
                "role": "assistant",
                "content": prose(ANSWER_TEXT_SEED, 800),
                "refusal": null,
            }),
            "stop",
            196,
        )
    };
    json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": CREATED,
        "model": OPENAI_SERVED,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": 1_180,
            "completion_tokens": output_tokens,
            "total_tokens": 1_180 + output_tokens,
        },
        "system_fingerprint": FINGERPRINT,
    })
}

/// An upstream's answer reader: body bytes (and the routed model) to the unified response.
type ReadResponse = fn(&[u8], &str) -> meta_chat_llm::Result<CompletionResponse>;

/// A client dialect's answer writer: the unified response (and the routed model, shown
/// when the upstream named none) to the client's JSON bytes.
type WriteAnswer = fn(&CompletionResponse, &str) -> serde_json::Result<Vec<u8>>;

/// The model the gateway shows: the upstream's, or the routed one when it gave none.
fn shown_model<'a>(response: &'a CompletionResponse, routed: &'a str) -> &'a str {
    if response.model.is_empty() {
        routed
    } else {
        &response.model
    }
}

fn openai_answer(response: &CompletionResponse, routed: &str) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&completion_json(
        response,
        RESPONSE_ID,
        CREATED,
        shown_model(response, routed),
        Some(COST_USD),
    ))
}

fn anthropic_answer(response: &CompletionResponse, routed: &str) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&message_json(
        response,
        MESSAGE_ID,
        shown_model(response, routed),
        Some(COST_USD),
    ))
}

/// One way back through the gateway for an answer: an upstream in, a client dialect out.
struct ResponsePath {
    name: &'static str,
    read: ReadResponse,
    write: WriteAnswer,
    routed_model: &'static str,
    /// The client's top-level array holding the answer (`choices`, `content`), checked once.
    client_array: &'static str,
    /// The upstream bodies, by case name.
    cases: Vec<(&'static str, Vec<u8>)>,
}

impl BodyPath for ResponsePath {
    fn name(&self) -> &str {
        self.name
    }

    fn cases(&self) -> &[(&'static str, Vec<u8>)] {
        &self.cases
    }

    /// The upstream's answer as the client's.
    fn translate(&self, body: &[u8]) -> Result<Vec<u8>, String> {
        let response = (self.read)(body, self.routed_model).map_err(|e| e.to_string())?;
        (self.write)(&response, self.routed_model).map_err(|e| e.to_string())
    }

    /// Runs `body` once and checks the unified response and the client's answer.
    fn check(&self, case: &str, body: &[u8]) -> Result<(), String> {
        let context = |e: String| format!("translate_response/{}/{case}: {e}", self.name);
        let response = (self.read)(body, self.routed_model)
            .map_err(|e| context(format!("upstream body: {e}")))?;
        let tool_calls = case == "tool_calls";
        ensure(
            if tool_calls {
                response.message.tool_calls.len() == 2
                    && response.finish_reason == FinishReason::ToolCalls
            } else {
                response.message.content.len() >= 800
                    && response.message.tool_calls.is_empty()
                    && response.finish_reason == FinishReason::Stop
            },
            if tool_calls {
                "two tool calls, finish reason tool_calls"
            } else {
                "the text, finish reason stop"
            },
        )
        .map_err(context)?;
        let answer = self.translate(body).map_err(context)?;
        // OpenAI answers in one choice; Anthropic in a block for the text, when there is
        // any, and one per tool call.
        let expected = if self.client_array == "choices" {
            1
        } else {
            usize::from(!response.message.content.is_empty()) + response.message.tool_calls.len()
        };
        let found = array_len(&answer, self.client_array).map_err(context)?;
        ensure(
            found == expected,
            &format!(
                "the answer's `{}` has {found} entries, expected {expected}",
                self.client_array
            ),
        )
        .map_err(context)
    }
}

fn response_paths() -> Result<Vec<ResponsePath>, String> {
    let cases = |body: fn(bool) -> Value| -> Result<Vec<(&'static str, Vec<u8>)>, String> {
        Ok(vec![
            ("text", to_bytes(&body(false))?),
            ("tool_calls", to_bytes(&body(true))?),
        ])
    };
    Ok(vec![
        ResponsePath {
            name: "anthropic_to_openai",
            read: wire::anthropic_response,
            write: openai_answer,
            routed_model: ANTHROPIC_MODEL,
            client_array: "choices",
            cases: cases(anthropic_answer_body)?,
        },
        ResponsePath {
            name: "openai_to_anthropic",
            read: wire::openai_response,
            write: anthropic_answer,
            routed_model: OPENAI_MODEL,
            client_array: "content",
            cases: cases(openai_answer_body)?,
        },
    ])
}

fn translate_response(c: &mut Criterion) {
    bench_paths(c, "translate_response", response_paths());
}

/// A translation path over whole bodies (a request or a response), with its cases.
trait BodyPath {
    fn name(&self) -> &str;
    fn cases(&self) -> &[(&'static str, Vec<u8>)];
    fn translate(&self, body: &[u8]) -> Result<Vec<u8>, String>;
    fn check(&self, case: &str, body: &[u8]) -> Result<(), String>;
}

/// The paths, each case run once and checked.
fn checked_paths<P: BodyPath>(paths: Result<Vec<P>, String>) -> Vec<P> {
    let paths = checked(paths);
    for path in &paths {
        for (case, body) in path.cases() {
            checked(path.check(case, body));
        }
    }
    paths
}

/// Checks every case of `paths` once, then times each, with its body size as throughput.
fn bench_paths<P: BodyPath>(c: &mut Criterion, group: &str, paths: Result<Vec<P>, String>) {
    let paths = checked_paths(paths);
    let mut group = c.benchmark_group(group);
    for path in &paths {
        for (case, body) in path.cases() {
            group.throughput(throughput_bytes(body.len()));
            group.bench_function(format!("{}/{case}", path.name()), |b| {
                b.iter(|| path.translate(black_box(body)));
            });
        }
    }
    group.finish();
}

// ---------------------------------------------------------------------------------------
// Streams.

const STREAM_INPUT_TOKENS: u64 = 1_180;
const STREAM_OUTPUT_TOKENS: u64 = 96;

/// The text of the stream's deltas.
fn delta_texts() -> impl Iterator<Item = String> {
    (0..TEXT_DELTAS as u64).map(|i| prose(100 + i, 24))
}

fn sse_event(name: Option<&str>, data: &Value) -> Bytes {
    let mut frame = String::new();
    if let Some(name) = name {
        frame.push_str("event: ");
        frame.push_str(name);
        frame.push('\n');
    }
    frame.push_str("data: ");
    frame.push_str(&data.to_string());
    frame.push_str("\n\n");
    Bytes::from(frame)
}

/// A whole Anthropic SSE answer, one event per `Bytes`, as the testkit's fake writes it.
fn anthropic_upstream_stream() -> Vec<Bytes> {
    let event = |name: &str, data: Value| sse_event(Some(name), &data);
    let mut frames = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
                "type": "message",
                "role": "assistant",
                "model": ANTHROPIC_SERVED,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {"input_tokens": STREAM_INPUT_TOKENS, "output_tokens": 1},
            }}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    frames.extend(delta_texts().map(|text| {
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        )
    }));
    frames.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    frames.push(event(
        "message_delta",
        json!({"type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": STREAM_OUTPUT_TOKENS}}),
    ));
    frames.push(event("message_stop", json!({"type": "message_stop"})));
    frames
}

/// A whole OpenAI SSE answer with the usage chunk the provider asks for, one frame per
/// `Bytes`, as the testkit's fake writes it.
fn openai_upstream_stream() -> Vec<Bytes> {
    let frame = |delta: Value, finish_reason: Option<&str>| {
        sse_event(
            None,
            &json!({
                "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": OPENAI_SERVED,
                "system_fingerprint": FINGERPRINT,
                "choices": [{
                    "index": 0,
                    "delta": delta,
                    "logprobs": null,
                    "finish_reason": finish_reason,
                }],
                "usage": null,
            }),
        )
    };
    let mut frames = vec![frame(json!({"role": "assistant", "content": ""}), None)];
    frames.extend(delta_texts().map(|text| frame(json!({"content": text}), None)));
    frames.push(frame(json!({}), Some("stop")));
    frames.push(sse_event(
        None,
        &json!({
            "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": OPENAI_SERVED,
            "system_fingerprint": FINGERPRINT,
            "choices": [],
            "usage": {
                "prompt_tokens": STREAM_INPUT_TOKENS,
                "completion_tokens": STREAM_OUTPUT_TOKENS,
                "total_tokens": STREAM_INPUT_TOKENS + STREAM_OUTPUT_TOKENS,
            },
        }),
    ));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

/// The upstream's body as the HTTP client hands it over: a stream of byte chunks.
type ByteStream = futures::stream::Iter<
    std::iter::Map<std::vec::IntoIter<Bytes>, fn(Bytes) -> meta_chat_llm::Result<Bytes>>,
>;

fn byte_stream(frames: Vec<Bytes>) -> ByteStream {
    let ok: fn(Bytes) -> meta_chat_llm::Result<Bytes> = Ok;
    futures::stream::iter(frames.into_iter().map(ok))
}

/// An upstream's stream decoder: its SSE bytes to unified chunks.
type DecodeStream = fn(ByteStream) -> ChunkStream;

/// A client dialect's stream writer: unified chunks (and the routed model) to the frames the
/// streaming handler sends, from the first to the last.
type WriteStream = fn(ChunkStream, &str) -> Result<Vec<Bytes>, String>;

/// The next unified chunk; the byte stream is in memory, so the decoder never waits.
fn next_chunk(stream: &mut ChunkStream) -> Result<Option<StreamChunk>, String> {
    match stream.next().now_or_never() {
        Some(Some(Ok(chunk))) => Ok(Some(chunk)),
        Some(Some(Err(error))) => Err(format!("upstream stream failed: {error}")),
        Some(None) => Ok(None),
        None => Err("the decoder waited on an in-memory stream".to_owned()),
    }
}

/// What the OpenAI streaming handler sends for a whole stream.
fn openai_client_stream(mut upstream: ChunkStream, model: &str) -> Result<Vec<Bytes>, String> {
    let mut encoder = ChunkEncoder::new(RESPONSE_ID, CREATED, model, true);
    let mut frames = Vec::with_capacity(STREAM_CHUNKS + 4);
    while let Some(chunk) = next_chunk(&mut upstream)? {
        frames.extend(encoder.encode(&chunk));
    }
    let usage = encoder.usage().unwrap_or_default();
    frames.extend(encoder.finish_usage(usage, Some(COST_USD)));
    frames.push(Bytes::from_static(SSE_DONE));
    Ok(frames)
}

/// What the Anthropic streaming handler sends for a whole stream.
fn anthropic_client_stream(mut upstream: ChunkStream, model: &str) -> Result<Vec<Bytes>, String> {
    let mut encoder = EventEncoder::new(MESSAGE_ID, model, INPUT_ESTIMATE);
    let mut frames = Vec::with_capacity(STREAM_CHUNKS + 6);
    frames.push(encoder.start());
    while let Some(chunk) = next_chunk(&mut upstream)? {
        frames.extend(encoder.encode(&chunk));
    }
    let usage = encoder.usage().unwrap_or_default();
    frames.extend(encoder.finish(usage, Some(COST_USD)));
    Ok(frames)
}

/// One way back through the gateway for a streamed answer.
struct StreamPath {
    name: &'static str,
    decode: DecodeStream,
    write: WriteStream,
    routed_model: &'static str,
    /// The last frame the client gets.
    last_frame: &'static str,
    upstream: Vec<Bytes>,
}

impl StreamPath {
    fn translate(&self, upstream: Vec<Bytes>) -> Result<Vec<Bytes>, String> {
        (self.write)((self.decode)(byte_stream(upstream)), self.routed_model)
    }

    /// Runs the stream once and checks the unified chunks and the client's frames.
    fn check(&self) -> Result<(), String> {
        let context = |e: String| format!("translate_stream/{}: {e}", self.name);
        let mut decoded = (self.decode)(byte_stream(self.upstream.clone()));
        let mut chunks = Vec::new();
        while let Some(chunk) = next_chunk(&mut decoded).map_err(context)? {
            chunks.push(chunk);
        }
        let texts = chunks
            .iter()
            .filter(|c| matches!(c, StreamChunk::TextDelta { text } if !text.is_empty()))
            .count();
        let finish = chunks
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    StreamChunk::Finish {
                        reason: FinishReason::Stop
                    }
                )
            })
            .count();
        let usage = chunks
            .iter()
            .filter(|c| {
                matches!(c, StreamChunk::Usage { usage }
                    if usage.input_tokens == STREAM_INPUT_TOKENS
                        && usage.output_tokens == STREAM_OUTPUT_TOKENS)
            })
            .count();
        ensure(
            chunks.len() == STREAM_CHUNKS && texts == TEXT_DELTAS && finish == 1 && usage == 1,
            &format!(
                "expected {TEXT_DELTAS} text deltas, a finish reason and the usage; decoded \
                 {chunks:?}"
            ),
        )
        .map_err(context)?;
        let frames = self.translate(self.upstream.clone()).map_err(context)?;
        let last = frames.last().map(|frame| String::from_utf8_lossy(frame));
        ensure(
            frames.len() > TEXT_DELTAS && last.is_some_and(|frame| frame.contains(self.last_frame)),
            &format!("the client's frames end with `{}`", self.last_frame),
        )
        .map_err(context)
    }
}

fn stream_paths() -> Vec<StreamPath> {
    let anthropic = anthropic_upstream_stream();
    let openai = openai_upstream_stream();
    vec![
        StreamPath {
            name: "anthropic_to_openai",
            decode: wire::anthropic_stream::<ByteStream>,
            write: openai_client_stream,
            routed_model: ANTHROPIC_MODEL,
            last_frame: "[DONE]",
            upstream: anthropic,
        },
        StreamPath {
            name: "openai_to_anthropic",
            decode: wire::openai_stream::<ByteStream>,
            write: anthropic_client_stream,
            routed_model: OPENAI_MODEL,
            last_frame: "message_stop",
            upstream: openai.clone(),
        },
        StreamPath {
            name: "openai_to_openai",
            decode: wire::openai_stream::<ByteStream>,
            write: openai_client_stream,
            routed_model: OPENAI_MODEL,
            last_frame: "[DONE]",
            upstream: openai,
        },
    ]
}

/// The stream paths, each run once and checked.
fn checked_stream_paths() -> Vec<StreamPath> {
    let paths = stream_paths();
    for path in &paths {
        checked(path.check());
    }
    paths
}

fn translate_stream(c: &mut Criterion) {
    let paths = checked_stream_paths();
    let mut group = c.benchmark_group("translate_stream");
    group.throughput(Throughput::Elements(STREAM_CHUNKS as u64));
    for path in &paths {
        group.bench_function(format!("{}/{STREAM_CHUNKS}_chunks", path.name), |b| {
            b.iter_batched(
                || path.upstream.clone(),
                |upstream| path.translate(upstream),
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

/// Runs every fixture once before anything is timed, so a bad one aborts the run at once.
fn check_fixtures(_: &mut Criterion) {
    checked_paths(request_paths());
    checked_paths(response_paths());
    checked_stream_paths();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = check_fixtures, translate_request, translate_response, translate_stream
}
criterion_main!(benches);
