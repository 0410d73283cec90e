//! Upstream connections over HTTP/2 (`UPSTREAM_HTTP2=prior-knowledge`): requests to one
//! upstream are multiplexed on a connection until it carries `UPSTREAM_HTTP2_MAX_STREAMS`,
//! then spread over further connections, and each request gives its place back when its
//! answer has been read (streamed, whole or an error). Ollama stays on HTTP/1.1.
//!
//! The options are process-wide, so this file's tests all use the same ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::{Gateway, events, hello};
use meta_chat_testkit::{Arrival, Reply};
use serde_json::json;

const OPTIONS: &[(&str, &str)] = &[
    ("UPSTREAM_HTTP2", "prior-knowledge"),
    ("UPSTREAM_HTTP2_MAX_STREAMS", "2"),
];

fn chats(arrivals: &[Arrival]) -> Vec<&Arrival> {
    arrivals
        .iter()
        .filter(|a| a.path == "/v1/chat/completions")
        .collect()
}

/// Requests per connection.
fn per_peer(arrivals: &[&Arrival]) -> BTreeMap<SocketAddr, usize> {
    let mut counts = BTreeMap::new();
    for arrival in arrivals {
        *counts.entry(arrival.peer).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn streams_spread_over_connections_at_the_cap_and_give_their_place_back() {
    let gw = Gateway::start_with(OPTIONS).await;
    let (_, key) = gw
        .tenant(json!({"llm": {"provider": "openai", "model": "gpt-4o-mini"}}))
        .await;

    // Five streams open at once (each lasts over a second), two per connection at most.
    gw.fake.set_default_reply(
        Reply::text("one two three four")
            .in_chunks(4)
            .with_chunk_delay(Duration::from_millis(300)),
    );
    let body = hello(json!({"stream": true}));
    let answers = futures::future::join_all((0..5).map(|_| gw.chat(&key, &body))).await;
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.text);
        let data = events(&answer.text);
        assert_eq!(
            data.last().map(String::as_str),
            Some("[DONE]"),
            "{}",
            answer.text
        );
        let text: String = data
            .iter()
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter_map(|d| {
                d["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(text, "one two three four");
    }
    let arrivals = gw.fake.arrivals();
    let streamed = chats(&arrivals);
    assert_eq!(streamed.len(), 5, "{arrivals:?}");
    assert!(
        streamed.iter().all(|a| a.version == "HTTP/2.0"),
        "{arrivals:?}"
    );
    let spread = per_peer(&streamed);
    assert_eq!(spread.len(), 3, "{spread:?}");
    assert!(spread.values().all(|&n| n <= 2), "{spread:?}");
    let first_connection = streamed[0].peer;

    // Errors and whole answers give their places back too: with every stream finished,
    // these all fit on the first connection again.
    gw.fake.clear_default_reply();
    gw.fake.push(Reply::error(400, "bad request"));
    let failed = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(failed.status, 400, "{}", failed.text);
    let plain = hello(json!({}));
    let whole = futures::future::join_all((0..2).map(|_| gw.chat(&key, &plain))).await;
    for answer in &whole {
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    let again = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(again.status, 200, "{}", again.text);
    let arrivals = gw.fake.arrivals();
    let later = &chats(&arrivals)[5..];
    assert_eq!(later.len(), 4, "{arrivals:?}");
    for arrival in later {
        assert_eq!(arrival.version, "HTTP/2.0");
        assert_eq!(arrival.peer, first_connection, "{arrivals:?}");
    }
}

#[tokio::test]
async fn ollama_stays_on_http1() {
    let gw = Gateway::start_with(OPTIONS).await;
    let (_, key) = gw
        .tenant(json!({"llm": {"provider": "ollama", "model": "llama3.1:8b"}}))
        .await;
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let arrivals = gw.fake.arrivals();
    let chat = arrivals.iter().find(|a| a.path == "/api/chat").unwrap();
    assert_eq!(chat.version, "HTTP/1.1");
}

/// The body frames of a streamed chat, as the client reads them.
async fn frames(gw: &Gateway, key: &str) -> Vec<String> {
    use futures::StreamExt;
    let response = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&hello(
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut frames = Vec::new();
    while let Some(frame) = body.next().await {
        frames.push(String::from_utf8(frame.unwrap().to_vec()).unwrap());
    }
    frames
}

/// The streamed text of `frames`, checking that every frame holds whole events.
fn streamed_text(frames: &[String]) -> String {
    for frame in frames {
        assert!(frame.ends_with("\n\n"), "a frame cut an event: {frame:?}");
    }
    let data = events(&frames.concat());
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "{frames:?}"
    );
    data.iter()
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|d| {
            d["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn chunks_that_arrived_together_leave_together_and_late_ones_are_not_waited_for() {
    let gw = Gateway::start_with(OPTIONS).await;
    let (_, key) = gw
        .tenant(json!({"llm": {"provider": "openai", "model": "gpt-4o-mini"}}))
        .await;
    let text = "one two three four five six seven eight nine ten eleven twelve";

    // An upstream that sends its 12 pieces at once (with the role, finish and usage frames,
    // 15 events and `[DONE]`): what has arrived when the first is encoded goes out with it.
    // The upstream's frames reach the gateway in one read or a few, so in at least one of
    // five answers the client reads the events in a few frames.
    let mut fewest = usize::MAX;
    for _ in 0..5 {
        gw.fake.push(Reply::text(text).in_chunks(12));
        let frames = frames(&gw, &key).await;
        assert_eq!(streamed_text(&frames), text);
        fewest = fewest.min(frames.len());
    }
    // One frame at best; without joining, 13 (the role event alone, then one per chunk).
    assert!(
        fewest <= 4,
        "events that arrived together were not joined: {fewest} frames"
    );

    // An upstream that sends its pieces 150 ms apart: each is forwarded when it arrives,
    // without waiting for the next, so every piece of text comes in a frame of its own.
    gw.fake.push(
        Reply::text("alpha beta gamma")
            .in_chunks(3)
            .with_chunk_delay(Duration::from_millis(150)),
    );
    let frames = frames(&gw, &key).await;
    assert_eq!(streamed_text(&frames), "alpha beta gamma");
    // Text pieces per frame: each piece came alone.
    let pieces: Vec<usize> = frames
        .iter()
        .map(|frame| {
            events(frame)
                .iter()
                .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                .filter(|d| {
                    d["choices"][0]["delta"]["content"]
                        .as_str()
                        .is_some_and(|c| !c.is_empty())
                })
                .count()
        })
        .filter(|&n| n > 0)
        .collect();
    assert_eq!(pieces, [1, 1, 1], "pieces were held back: {frames:?}");
}
