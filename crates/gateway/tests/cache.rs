//! The response cache (SPEC §4.5, README "Response cache"): a hit is the stored answer, costs
//! nothing, reaches no provider and is recorded as a hit; the key follows the parsed request
//! (not the order of its JSON keys), the tenant and the routed model; entries expire after the
//! tenant's TTL; streams are cached once complete and replayed as well-formed streams; failures
//! are never cached; in process the cache stays within `CACHE_MAX_BYTES`.
//!
//! Every test runs twice from one body: with the in-process cache, and with Redis
//! (`TEST_REDIS_URL`, a private `REDIS_KEY_PREFIX`; skipped without it unless
//! `REQUIRE_SERVICES=1`). Only the size bound is in-process alone: Redis bounds itself.
//!
//! Answers are cached in the background once sent, so a test waits until the entry can be read
//! from the gateway's cache (under the key the gateway computes) before it asks again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::usage::{
    mini_cost, stream_events, stream_with_usage, streamed_text, usd, wait_for_records,
    weather_reply, weather_request,
};
use common::{Answer, Backend, Gateway, hello, in_process_and_on_redis};
use meta_chat::api::openai_codec::parse_chat_request;
use meta_chat::cache::{CachedAnswer, ResponseCache};
use meta_chat::settings::TenantSettings;
use meta_chat_testkit::Reply;
use serde_json::{Value, json};

/// How long a background cache fill or a usage write may take before the test fails. Fills
/// take milliseconds; this only bounds a broken implementation.
const PATIENCE: Duration = Duration::from_secs(10);

/// The cost of an answer from the cache, as the gateway writes it.
const FREE: &str = "0.000000000";

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A gateway on `backend` (asserted), `extra` variables last.
async fn start(backend: Backend<'_>, extra: Backend<'_>) -> Gateway {
    let mut vars = backend.to_vec();
    vars.extend_from_slice(extra);
    let gw = Gateway::start_with(&vars).await;
    let redis = backend.iter().any(|(name, _)| *name == "REDIS_URL");
    assert_eq!(
        matches!(gw.state.cache, ResponseCache::Redis(_)),
        redis,
        "{:?}",
        gw.state.cache
    );
    gw
}

/// Settings sending chats to gpt-4o-mini, with the cache on for `ttl` seconds.
fn cached(ttl: u64) -> Value {
    json!({
        "llm": {"provider": "openai", "model": "gpt-4o-mini"},
        "cache": {"enabled": true, "ttlSeconds": ttl},
    })
}

/// A tenant with `settings`: (id, key, settings).
async fn tenant(gw: &Gateway, name: &str, settings: Value) -> (String, String, Value) {
    let (id, key) = gw.tenant_named(name, settings.clone()).await;
    (id, key, settings)
}

/// The cache key the gateway uses for `body` from the tenant `id` with `settings`.
fn key_of(gw: &Gateway, id: &str, settings: &Value, body: &Value) -> String {
    let parsed = parse_chat_request(body.to_string().as_bytes()).unwrap();
    let settings = TenantSettings::parse(settings).unwrap();
    let (primary, _) = meta_chat::routing::provider_config(
        &gw.state.config.llm,
        &settings,
        parsed.model.as_deref(),
    )
    .unwrap();
    ResponseCache::key(id, &primary, &parsed.request)
}

/// Waits until the gateway's cache holds an answer under `key`.
async fn wait_cached(gw: &Gateway, key: &str) -> CachedAnswer {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(answer) = gw.state.cache.get(key).await {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "no cache entry {key} after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The chat requests the fake providers received (OpenAI's and Anthropic's).
fn upstream_chats(gw: &Gateway) -> usize {
    gw.fake.requests_to("/v1/chat/completions").len() + gw.fake.requests_to("/v1/messages").len()
}

/// Asserts a 200 answered from the cache (or not).
fn assert_cache(answer: &Answer, expected: &str) {
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        answer.header("x-meta-chat-cache"),
        expected,
        "{}",
        answer.text
    );
}

/// The text of a JSON answer.
fn content(answer: &Answer) -> String {
    answer.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {}", answer.text))
        .to_owned()
}

/// The SSE events of a stream answer (without `[DONE]`, which must end it), checked to be a
/// well-formed OpenAI stream: `text/event-stream`, chunks of one completion, the assistant
/// role first, exactly one `finish_reason`, no error event.
fn well_formed_stream(answer: &Answer) -> Vec<Value> {
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert!(
        answer
            .header("content-type")
            .starts_with("text/event-stream"),
        "{:?}",
        answer.headers
    );
    assert!(answer.text.ends_with("data: [DONE]\n\n"), "{}", answer.text);
    let events = stream_events(answer);
    assert!(!events.is_empty(), "{}", answer.text);
    let id = &events[0]["id"];
    assert!(id.as_str().is_some_and(|id| !id.is_empty()), "{events:?}");
    for event in &events {
        assert!(event.get("error").is_none(), "{}", answer.text);
        assert_eq!(event["object"], "chat.completion.chunk", "{event}");
        assert_eq!(&event["id"], id, "{event}");
    }
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let finishes = events
        .iter()
        .filter(|e| e["choices"][0]["finish_reason"].is_string())
        .count();
    assert_eq!(finishes, 1, "{}", answer.text);
    events
}

/// The `finish_reason` of a stream's events.
fn stream_finish(events: &[Value]) -> String {
    events
        .iter()
        .find_map(|e| e["choices"][0]["finish_reason"].as_str())
        .unwrap()
        .to_owned()
}

/// The usage chunk a stream ends with when asked (`choices: []`).
fn stream_usage(events: &[Value]) -> &Value {
    let last = events.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    &last["usage"]
}

/// Tool calls as (id, name, arguments parsed) from a JSON answer.
fn json_tool_calls(answer: &Answer) -> Vec<(String, String, Value)> {
    answer.json()["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool calls: {}", answer.text))
        .iter()
        .map(|call| {
            assert_eq!(call["type"], "function");
            (
                call["id"].as_str().unwrap().to_owned(),
                call["function"]["name"].as_str().unwrap().to_owned(),
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap(),
            )
        })
        .collect()
}

/// Tool calls as (id, name, arguments parsed) reassembled from a stream's deltas.
fn streamed_tool_calls(events: &[Value]) -> Vec<(String, String, Value)> {
    let mut calls: BTreeMap<u64, (String, String, String)> = BTreeMap::new();
    for event in events {
        let Some(deltas) = event["choices"][0]["delta"]["tool_calls"].as_array() else {
            continue;
        };
        for delta in deltas {
            let call = calls.entry(delta["index"].as_u64().unwrap()).or_default();
            if let Some(id) = delta["id"].as_str() {
                call.0.push_str(id);
            }
            if let Some(name) = delta["function"]["name"].as_str() {
                call.1.push_str(name);
            }
            if let Some(arguments) = delta["function"]["arguments"].as_str() {
                call.2.push_str(arguments);
            }
        }
    }
    calls
        .into_values()
        .map(|(id, name, arguments)| (id, name, serde_json::from_str(&arguments).unwrap()))
        .collect()
}

/// A `/metrics` sample's value, if present: `series` is the metric name with its labels, as
/// written (`name{label="value"}`).
async fn metric(gw: &Gateway, series: &str) -> Option<f64> {
    let answer = gw.send(reqwest::Method::GET, "/metrics", None, None).await;
    assert_eq!(answer.status, 200);
    answer.text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.trim().parse().unwrap())
    })
}

// ---------------------------------------------------------------------------------------------
// Hits.

in_process_and_on_redis!(repeated_request_hits: repeated_request_hits_in_memory, repeated_request_hits_in_redis);

async fn repeated_request_hits(backend: Backend<'_>) {
    let gw = start(backend, &[]).await;
    let (id, key, settings) = tenant(&gw, "cached", cached(300)).await;
    let body = hello(json!({"temperature": 0.2}));
    gw.fake
        .push(Reply::text("The capital of France is Paris.").with_usage(12, 7));

    let first = gw.chat(&key, &body).await;
    assert_cache(&first, "miss");
    assert_eq!(content(&first), "The capital of France is Paris.");
    let cost = usd(mini_cost(12, 7));
    assert_eq!(first.header("x-meta-chat-cost-usd"), cost);
    assert_eq!(first.json()["usage"]["cost_usd"], cost);

    let stored = wait_cached(&gw, &key_of(&gw, &id, &settings, &body)).await;
    assert_eq!(
        stored.response.message.content,
        "The capital of France is Paris."
    );

    let second = gw.chat(&key, &body).await;
    assert_cache(&second, "hit");
    assert_eq!(content(&second), "The capital of France is Paris.");
    assert_eq!(second.header("x-meta-chat-cost-usd"), FREE);
    let json = second.json();
    assert_eq!(json["usage"]["cost_usd"], FREE);
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(json["choices"][0]["finish_reason"], "stop");
    assert_eq!(second.header("x-meta-chat-provider"), "openai");
    assert_eq!(second.header("x-meta-chat-model"), "gpt-4o-mini");
    // A hit is a request of its own.
    assert_ne!(first.header("x-request-id"), second.header("x-request-id"));
    assert_ne!(first.json()["id"], json["id"]);

    // The hit reached no provider.
    assert_eq!(upstream_chats(&gw), 1);

    // One miss that cost what it used, one hit that used and cost nothing.
    wait_for_records(gw.state.store.as_ref(), Some(&id), 2, PATIENCE).await;
    let records = gw.state.store.recent_usage(&id, 10).await.unwrap();
    let miss = records.iter().find(|r| !r.cache_hit).unwrap();
    let hit = records.iter().find(|r| r.cache_hit).unwrap();
    assert_eq!(
        (miss.input_tokens, miss.output_tokens, miss.cost_nano_usd),
        (12, 7, mini_cost(12, 7))
    );
    assert_eq!(miss.status, "ok");
    assert_eq!(
        (hit.input_tokens, hit.output_tokens, hit.cost_nano_usd),
        (0, 0, 0)
    );
    assert_eq!(hit.status, "ok");
    assert_eq!(hit.endpoint, "chat");
    assert_eq!(hit.request_id, second.header("x-request-id"));
    assert_eq!(
        metric(
            &gw,
            &format!("meta_chat_cache_hits_total{{tenant=\"{id}\"}}")
        )
        .await,
        Some(1.0)
    );
}

// ---------------------------------------------------------------------------------------------
// The key.

/// A request with several parameters, written with its keys in one order…
const ORDERED: &str = r#"{
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is the weather in Paris?"}
    ],
    "temperature": 0.5,
    "top_p": 0.9,
    "max_tokens": 50,
    "stop": ["\n\n"],
    "tools": [{"type": "function", "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}}
    }}],
    "seed": 7,
    "response_format": {"type": "text"}
}"#;

/// …and the same request with every object's keys in another.
const REORDERED: &str = r#"{
    "response_format": {"type": "text"},
    "seed": 7,
    "tools": [{"function": {
        "parameters": {"properties": {"unit": {"type": "string"}, "city": {"type": "string"}}, "type": "object"},
        "description": "The weather in a city",
        "name": "get_weather"
    }, "type": "function"}],
    "stop": ["\n\n"],
    "max_tokens": 50,
    "top_p": 0.9,
    "temperature": 0.5,
    "messages": [
        {"content": "Be terse.", "role": "system"},
        {"content": "What is the weather in Paris?", "role": "user"}
    ],
    "model": "gpt-4o-mini"
}"#;

/// A change to a request.
type Change = Box<dyn Fn(&mut Value)>;

/// Sends `body` exactly as written.
async fn chat_raw(gw: &Gateway, key: &str, body: &str) -> Answer {
    gw.send(
        reqwest::Method::POST,
        "/v1/chat/completions",
        Some(key),
        Some(body.to_owned()),
    )
    .await
}

in_process_and_on_redis!(the_key_is_the_parsed_request: the_key_is_the_parsed_request_in_memory, the_key_is_the_parsed_request_in_redis);

async fn the_key_is_the_parsed_request(backend: Backend<'_>) {
    let gw = start(backend, &[]).await;
    let (id, key, settings) = tenant(&gw, "cached", cached(300)).await;
    let base: Value = serde_json::from_str(ORDERED).unwrap();
    assert_eq!(base, serde_json::from_str::<Value>(REORDERED).unwrap());

    assert_cache(&chat_raw(&gw, &key, ORDERED).await, "miss");
    wait_cached(&gw, &key_of(&gw, &id, &settings, &base)).await;
    let mut upstream = 1;
    assert_eq!(upstream_chats(&gw), upstream);

    // The order of JSON keys, at any depth, makes no difference; nor does how the routed
    // model is spelled (the tenant's default, named or not).
    assert_cache(&chat_raw(&gw, &key, REORDERED).await, "hit");
    let mut spelled = base.clone();
    spelled["model"] = json!("openai/gpt-4o-mini");
    assert_cache(&gw.chat(&key, &spelled).await, "hit");
    spelled.as_object_mut().unwrap().remove("model");
    assert_cache(&gw.chat(&key, &spelled).await, "hit");
    assert_eq!(upstream_chats(&gw), upstream);

    // Any parameter does.
    let variants: Vec<(&str, Change)> = vec![
        ("temperature", Box::new(|b| b["temperature"] = json!(0.6))),
        ("top_p", Box::new(|b| b["top_p"] = json!(0.8))),
        ("max_tokens", Box::new(|b| b["max_tokens"] = json!(51))),
        (
            "max_completion_tokens",
            Box::new(|b| {
                b.as_object_mut().unwrap().remove("max_tokens");
                b["max_completion_tokens"] = json!(49);
            }),
        ),
        ("stop", Box::new(|b| b["stop"] = json!(["END"]))),
        ("no stop", Box::new(|b| b["stop"] = json!([]))),
        (
            "a tool's description",
            Box::new(|b| b["tools"][0]["function"]["description"] = json!("Weather")),
        ),
        (
            "a tool's parameters",
            Box::new(|b| {
                b["tools"][0]["function"]["parameters"]["required"] = json!(["city"]);
            }),
        ),
        (
            "another tool",
            Box::new(|b| {
                let mut other = b["tools"][0].clone();
                other["function"]["name"] = json!("get_time");
                b["tools"].as_array_mut().unwrap().push(other);
            }),
        ),
        ("no tools", Box::new(|b| b["tools"] = json!([]))),
        (
            "tool_choice",
            Box::new(|b| b["tool_choice"] = json!("required")),
        ),
        (
            "the user message",
            Box::new(|b| b["messages"][1]["content"] = json!("What is the weather in Lyon?")),
        ),
        (
            "the system message",
            Box::new(|b| b["messages"][0]["content"] = json!("Be verbose.")),
        ),
        (
            "one more message",
            Box::new(|b| {
                b["messages"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"role": "user", "content": "Thanks."}));
            }),
        ),
        ("seed", Box::new(|b| b["seed"] = json!(8))),
        (
            "response_format",
            Box::new(|b| b["response_format"] = json!({"type": "json_object"})),
        ),
        ("model", Box::new(|b| b["model"] = json!("gpt-4o"))),
        (
            "provider",
            Box::new(|b| b["model"] = json!("anthropic/claude-3-haiku-20240307")),
        ),
    ];
    for (what, change) in &variants {
        let mut body = base.clone();
        change(&mut body);
        let answer = gw.chat(&key, &body).await;
        assert_cache(&answer, "miss");
        upstream += 1;
        assert_eq!(upstream_chats(&gw), upstream, "{what}");
        assert_ne!(
            key_of(&gw, &id, &settings, &body),
            key_of(&gw, &id, &settings, &base),
            "{what}"
        );
    }

    // Each of them got an entry of its own: asked again, each is a hit.
    for (what, change) in &variants {
        let mut body = base.clone();
        change(&mut body);
        wait_cached(&gw, &key_of(&gw, &id, &settings, &body)).await;
        let answer = gw.chat(&key, &body).await;
        assert_eq!(answer.header("x-meta-chat-cache"), "hit", "{what}");
    }
    assert_cache(&chat_raw(&gw, &key, ORDERED).await, "hit");
    assert_eq!(upstream_chats(&gw), upstream);
}

in_process_and_on_redis!(other_tenants_miss: other_tenants_miss_in_memory, other_tenants_miss_in_redis);

async fn other_tenants_miss(backend: Backend<'_>) {
    let gw = start(backend, &[]).await;
    let (id, key, settings) = tenant(&gw, "first", cached(300)).await;
    let body = hello(json!({}));
    gw.fake.push(Reply::text("first tenant's answer"));
    assert_cache(&gw.chat(&key, &body).await, "miss");
    wait_cached(&gw, &key_of(&gw, &id, &settings, &body)).await;
    assert_cache(&gw.chat(&key, &body).await, "hit");

    // Another tenant with the same settings asking the same: its own miss, its own entry.
    let (other_id, other_key, _) = tenant(&gw, "second", cached(300)).await;
    gw.fake.push(Reply::text("second tenant's answer"));
    let answer = gw.chat(&other_key, &body).await;
    assert_cache(&answer, "miss");
    assert_eq!(content(&answer), "second tenant's answer");
    wait_cached(&gw, &key_of(&gw, &other_id, &settings, &body)).await;
    let answer = gw.chat(&other_key, &body).await;
    assert_cache(&answer, "hit");
    assert_eq!(content(&answer), "second tenant's answer");
    let answer = gw.chat(&key, &body).await;
    assert_cache(&answer, "hit");
    assert_eq!(content(&answer), "first tenant's answer");
    assert_eq!(upstream_chats(&gw), 2);

    // Tenants without the cache, or with it switched off, always miss and store nothing.
    let plain = json!({"llm": {"provider": "openai", "model": "gpt-4o-mini"}});
    let off = json!({
        "llm": {"provider": "openai", "model": "gpt-4o-mini"},
        "cache": {"enabled": false, "ttlSeconds": 300},
    });
    for (name, settings) in [("plain", plain), ("off", off)] {
        let (id, key, settings) = tenant(&gw, name, settings).await;
        for _ in 0..3 {
            let answer = gw.chat(&key, &body).await;
            assert_cache(&answer, "miss");
            assert_ne!(answer.header("x-meta-chat-cost-usd"), FREE);
        }
        assert!(
            gw.state
                .cache
                .get(&key_of(&gw, &id, &cached(300), &body))
                .await
                .is_none(),
            "{name}"
        );
        assert!(
            gw.state
                .cache
                .get(&key_of(&gw, &id, &settings, &body))
                .await
                .is_none(),
            "{name}"
        );
    }
    assert_eq!(upstream_chats(&gw), 2 + 6);
}

// ---------------------------------------------------------------------------------------------
// Expiry.

in_process_and_on_redis!(entries_expire_after_their_ttl: entries_expire_after_their_ttl_in_memory, entries_expire_after_their_ttl_in_redis);

async fn entries_expire_after_their_ttl(backend: Backend<'_>) {
    let gw = start(backend, &[]).await;
    let (id, key, settings) = tenant(&gw, "brief", cached(1)).await;
    let body = hello(json!({}));
    assert_cache(&gw.chat(&key, &body).await, "miss");
    wait_cached(&gw, &key_of(&gw, &id, &settings, &body)).await;
    assert_cache(&gw.chat(&key, &body).await, "hit");
    assert_eq!(upstream_chats(&gw), 1);

    // A little over the tenant's TTL of one second later, the entry is gone.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        gw.state
            .cache
            .get(&key_of(&gw, &id, &settings, &body))
            .await
            .is_none()
    );
    assert_cache(&gw.chat(&key, &body).await, "miss");
    assert_eq!(upstream_chats(&gw), 2);
}

// ---------------------------------------------------------------------------------------------
// Streams.

in_process_and_on_redis!(streams_are_cached_and_replayed: streams_are_cached_and_replayed_in_memory, streams_are_cached_and_replayed_in_redis);

async fn streams_are_cached_and_replayed(backend: Backend<'_>) {
    let gw = start(backend, &[]).await;
    let (id, key, settings) = tenant(&gw, "streams", cached(300)).await;
    let text = "Streams are cached once they complete, then replayed.";

    // Streamed first: cached when the stream completed, replayed as a stream.
    let stream = hello(stream_with_usage());
    gw.fake
        .push(Reply::text(text).in_chunks(5).with_usage(9, 8));
    let first = gw.chat(&key, &stream).await;
    assert_eq!(first.header("x-meta-chat-cache"), "miss");
    let events = well_formed_stream(&first);
    assert_eq!(streamed_text(&events), text);
    assert_eq!(stream_finish(&events), "stop");
    assert_eq!(stream_usage(&events)["cost_usd"], usd(mini_cost(9, 8)));

    let stored = wait_cached(&gw, &key_of(&gw, &id, &settings, &stream)).await;
    assert_eq!(stored.response.message.content, text);

    let replay = gw.chat(&key, &stream).await;
    assert_eq!(replay.header("x-meta-chat-cache"), "hit");
    assert_eq!(replay.header("x-meta-chat-provider"), "openai");
    let replayed = well_formed_stream(&replay);
    assert_eq!(streamed_text(&replayed), streamed_text(&events));
    assert_eq!(stream_finish(&replayed), "stop");
    assert_eq!(stream_usage(&replayed)["cost_usd"], FREE);
    assert_ne!(replayed[0]["id"], events[0]["id"]);

    // Without `include_usage` the replay has no usage chunk, and is otherwise the same.
    let mut bare = hello(json!({}));
    bare["stream"] = json!(true);
    let replay = gw.chat(&key, &bare).await;
    assert_eq!(replay.header("x-meta-chat-cache"), "hit");
    let replayed = well_formed_stream(&replay);
    assert_eq!(streamed_text(&replayed), text);
    assert!(replayed.iter().all(|e| e["choices"] != json!([])));

    // The same request not streamed: a hit on the streamed answer.
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_cache(&answer, "hit");
    assert_eq!(content(&answer), text);
    assert_eq!(answer.header("x-meta-chat-cost-usd"), FREE);
    assert_eq!(upstream_chats(&gw), 1);

    // Asked as JSON first: a later stream is a hit replayed from the JSON answer.
    let question = json!({"messages": [{"role": "user", "content": "and the other way round?"}]});
    gw.fake
        .push(Reply::text("JSON first, stream later.").with_usage(5, 6));
    let answer = gw.chat(&key, &question).await;
    assert_cache(&answer, "miss");
    wait_cached(&gw, &key_of(&gw, &id, &settings, &question)).await;
    let mut streamed = question.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let replay = gw.chat(&key, &streamed).await;
    assert_eq!(replay.header("x-meta-chat-cache"), "hit");
    let replayed = well_formed_stream(&replay);
    assert_eq!(streamed_text(&replayed), "JSON first, stream later.");
    assert_eq!(stream_finish(&replayed), "stop");
    assert_eq!(stream_usage(&replayed)["cost_usd"], FREE);
    assert_eq!(upstream_chats(&gw), 2);

    // Two misses that cost what they used, four hits that cost nothing, streamed or not.
    wait_for_records(gw.state.store.as_ref(), Some(&id), 6, PATIENCE).await;
    let records = gw.state.store.recent_usage(&id, 10).await.unwrap();
    let (hits, misses): (Vec<_>, Vec<_>) = records.iter().partition(|r| r.cache_hit);
    assert_eq!(hits.len(), 4);
    for hit in hits {
        assert_eq!(
            (hit.input_tokens, hit.output_tokens, hit.cost_nano_usd),
            (0, 0, 0)
        );
        assert_eq!(hit.status, "ok");
    }
    let mut costs: Vec<i64> = misses.iter().map(|r| r.cost_nano_usd).collect();
    costs.sort_unstable();
    assert_eq!(costs, [mini_cost(5, 6), mini_cost(9, 8)]);
}

in_process_and_on_redis!(tool_calls_replay_unchanged: tool_calls_replay_unchanged_in_memory, tool_calls_replay_unchanged_in_redis);

async fn tool_calls_replay_unchanged(backend: Backend<'_>) {
    let gw = start(backend, &[]).await;
    let (id, key, settings) = tenant(&gw, "tools", cached(300)).await;
    let expected = vec![(
        "call_weather_1".to_owned(),
        "get_weather".to_owned(),
        json!({"city": "Paris"}),
    )];

    // Called as JSON first.
    let request = weather_request();
    gw.fake.push(weather_reply());
    let first = gw.chat(&key, &request).await;
    assert_cache(&first, "miss");
    assert_eq!(json_tool_calls(&first), expected);
    assert_eq!(first.json()["choices"][0]["finish_reason"], "tool_calls");
    wait_cached(&gw, &key_of(&gw, &id, &settings, &request)).await;

    let again = gw.chat(&key, &request).await;
    assert_cache(&again, "hit");
    assert_eq!(
        again.json()["choices"][0]["message"]["tool_calls"],
        first.json()["choices"][0]["message"]["tool_calls"]
    );
    assert_eq!(again.json()["choices"][0]["finish_reason"], "tool_calls");

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let replay = gw.chat(&key, &streamed).await;
    assert_eq!(replay.header("x-meta-chat-cache"), "hit");
    let events = well_formed_stream(&replay);
    assert_eq!(streamed_tool_calls(&events), expected);
    assert_eq!(stream_finish(&events), "tool_calls");
    assert_eq!(upstream_chats(&gw), 1);

    // Streamed first: the calls assembled from the stream are what is cached.
    let mut request = weather_request();
    request["messages"][0]["content"] = json!("and in Paris tomorrow?");
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    gw.fake.push(weather_reply().in_chunks(3));
    let first = gw.chat(&key, &streamed).await;
    assert_eq!(first.header("x-meta-chat-cache"), "miss");
    let events = well_formed_stream(&first);
    assert_eq!(streamed_tool_calls(&events), expected);
    wait_cached(&gw, &key_of(&gw, &id, &settings, &request)).await;

    let answer = gw.chat(&key, &request).await;
    assert_cache(&answer, "hit");
    assert_eq!(json_tool_calls(&answer), expected);
    assert_eq!(answer.json()["choices"][0]["finish_reason"], "tool_calls");
    let replay = gw.chat(&key, &streamed).await;
    assert_eq!(replay.header("x-meta-chat-cache"), "hit");
    let events = well_formed_stream(&replay);
    assert_eq!(streamed_tool_calls(&events), expected);
    assert_eq!(stream_finish(&events), "tool_calls");
    assert_eq!(upstream_chats(&gw), 2);
}

// ---------------------------------------------------------------------------------------------
// Failures.

in_process_and_on_redis!(failures_are_not_cached: failures_are_not_cached_in_memory, failures_are_not_cached_in_redis);

async fn failures_are_not_cached(backend: Backend<'_>) {
    let gw = start(backend, &[]).await;
    let (id, key, settings) = tenant(&gw, "failures", cached(300)).await;
    let question = |text: &str, stream: bool| {
        let mut body = json!({"messages": [{"role": "user", "content": text}]});
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    };

    // A stream the provider breaks off with an error event.
    gw.fake.push(Reply::stream_error(1, "the model fell over"));
    let failed = gw.chat(&key, &question("stream error", true)).await;
    assert_eq!(failed.status, 200);
    assert_eq!(failed.header("x-meta-chat-cache"), "miss");
    let events = common::events(&failed.text);
    assert!(
        events.iter().any(|e| e.contains("\"error\"")),
        "{}",
        failed.text
    );

    // A stream whose connection is cut mid-way.
    gw.fake.push(
        Reply::text("one two three four five six")
            .in_chunks(6)
            .drop_after(3),
    );
    let cut = gw.chat(&key, &question("cut stream", true)).await;
    assert_eq!(cut.status, 200);
    let events = common::events(&cut.text);
    assert!(
        events.iter().any(|e| e.contains("\"error\"")),
        "a cut stream must end with an error event: {}",
        cut.text
    );

    // A plain upstream error.
    gw.fake.push(Reply::error(500, "internal failure"));
    let error = gw.chat(&key, &question("upstream error", false)).await;
    assert_eq!(error.status, 502, "{}", error.text);

    // A good answer after them is cached; none of the failures is.
    gw.fake.push(Reply::text("fine"));
    assert_cache(&gw.chat(&key, &question("fine", false)).await, "miss");
    wait_cached(&gw, &key_of(&gw, &id, &settings, &question("fine", false))).await;
    for text in ["stream error", "cut stream", "upstream error"] {
        let body = question(text, false);
        assert!(
            gw.state
                .cache
                .get(&key_of(&gw, &id, &settings, &body))
                .await
                .is_none(),
            "{text} was cached"
        );
    }
    assert_eq!(upstream_chats(&gw), 4);

    // Asked again, each goes to the provider, which answers this time.
    for text in ["stream error", "cut stream"] {
        let answer = gw.chat(&key, &question(text, true)).await;
        assert_eq!(answer.header("x-meta-chat-cache"), "miss", "{text}");
        let events = well_formed_stream(&answer);
        assert_eq!(streamed_text(&events), format!("You said: {text}"));
    }
    let answer = gw.chat(&key, &question("upstream error", false)).await;
    assert_cache(&answer, "miss");
    assert_eq!(upstream_chats(&gw), 7);
}

// ---------------------------------------------------------------------------------------------
// Size (in process).

#[tokio::test]
async fn the_in_process_cache_stays_within_cache_max_bytes() {
    const MAX_BYTES: u64 = 32 * 1024;
    const ANSWERS: usize = 40;
    let gw = start(&[], &[("CACHE_MAX_BYTES", "32768")]).await;
    let ResponseCache::Memory(memory) = &gw.state.cache else {
        panic!("{:?}", gw.state.cache);
    };
    let (id, key, settings) = tenant(&gw, "big", cached(300)).await;
    // Answers of about 2 KB each: 40 of them are well over the bound.
    let answer = |i: usize| format!("{i:03} {}", "lorem ipsum ".repeat(170));
    let question =
        |i: usize| json!({"messages": [{"role": "user", "content": format!("question {i}")}]});
    let keys: Vec<String> = (0..ANSWERS)
        .map(|i| key_of(&gw, &id, &settings, &question(i)))
        .collect();

    for (i, cache_key) in keys.iter().enumerate() {
        gw.fake.push(Reply::text(answer(i)).with_usage(10, 500));
        let reply = gw.chat(&key, &question(i)).await;
        assert_cache(&reply, "miss");
        assert_eq!(content(&reply), answer(i));
        // Wait for the fill, so the answers enter the cache in order.
        wait_cached(&gw, cache_key).await;
        memory.run_pending_tasks().await;
        assert!(
            memory.weighted_size() <= MAX_BYTES,
            "{} bytes cached after {} answers",
            memory.weighted_size(),
            i + 1
        );
    }
    memory.run_pending_tasks().await;
    let entries = memory.entry_count();
    assert!(
        (1..ANSWERS as u64).contains(&entries),
        "{entries} entries of ~2 KB in {MAX_BYTES} bytes"
    );

    // The oldest answers left to make room: what is left are the newest. (Reading them in
    // order keeps their order of use.)
    let mut present = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        if gw.state.cache.get(key).await.is_some() {
            present.push(i);
        }
    }
    assert_eq!(present.len() as u64, entries);
    assert_eq!(
        present,
        (ANSWERS - present.len()..ANSWERS).collect::<Vec<_>>(),
        "the newest answers should stay"
    );

    // Least recently *used*: the oldest entry, asked for again, stays when the next answer
    // comes in; the one after it leaves instead.
    let (oldest, second) = (present[0], present[1]);
    let hit = gw.chat(&key, &question(oldest)).await;
    assert_cache(&hit, "hit");
    assert_eq!(content(&hit), answer(oldest));
    gw.fake
        .push(Reply::text(answer(ANSWERS)).with_usage(10, 500));
    assert_cache(&gw.chat(&key, &question(ANSWERS)).await, "miss");
    wait_cached(&gw, &key_of(&gw, &id, &settings, &question(ANSWERS))).await;
    memory.run_pending_tasks().await;
    assert!(memory.weighted_size() <= MAX_BYTES);
    assert!(gw.state.cache.get(&keys[oldest]).await.is_some());
    assert!(gw.state.cache.get(&keys[second]).await.is_none());

    // Through the API: the newest is a hit, the first a miss.
    let newest = gw.chat(&key, &question(ANSWERS - 1)).await;
    assert_cache(&newest, "hit");
    assert_eq!(content(&newest), answer(ANSWERS - 1));
    let first = gw.chat(&key, &question(0)).await;
    assert_cache(&first, "miss");
    assert_eq!(upstream_chats(&gw), ANSWERS + 2);
}
