//! `POST /v1/chat/completions` over real sockets (SPEC §4.3): a gateway in front of the fake
//! OpenAI + Anthropic + Ollama server, tenants on each provider, streaming, routing by model
//! name, settings changes, fallback, and the answers to bad callers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{
    ADMIN_KEY, Answer, Gateway, SYSTEM_ANTHROPIC_KEY, SYSTEM_OPENAI_KEY, TENANT_ANTHROPIC_KEY,
    TENANT_OPENAI_KEY, events, hello,
};
use meta_chat_testkit::Reply;
use serde_json::{Value, json};

fn text_of(body: &Value) -> &str {
    body["choices"][0]["message"]["content"].as_str().unwrap()
}

#[tokio::test]
async fn each_provider_answers_with_the_tenant_key_and_headers() {
    let gw = Gateway::start().await;
    let cases = [
        (
            json!({"llm": {"provider": "openai", "model": "gpt-4o-mini", "apiKey": TENANT_OPENAI_KEY}}),
            "openai",
            "gpt-4o-mini",
            "/v1/chat/completions",
            Some(TENANT_OPENAI_KEY),
        ),
        (
            json!({"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307",
                           "apiKey": TENANT_ANTHROPIC_KEY}}),
            "anthropic",
            "claude-3-haiku-20240307",
            "/v1/messages",
            Some(TENANT_ANTHROPIC_KEY),
        ),
        (
            json!({"llm": {"provider": "ollama", "model": "llama3.1:8b"}}),
            "ollama",
            "llama3.1:8b",
            "/api/chat",
            None,
        ),
    ];
    for (settings, provider, model, path, tenant_key) in cases {
        let (_, key) = gw.tenant(settings).await;
        gw.fake.push(Reply::text("Four.").with_usage(10, 2));
        let answer = gw.chat(&key, &hello(json!({}))).await;
        assert_eq!(answer.status, 200, "{provider}: {}", answer.text);
        assert_eq!(answer.header("x-meta-chat-provider"), provider);
        assert_eq!(answer.header("x-meta-chat-model"), model);
        assert_eq!(answer.header("x-meta-chat-cache"), "miss");
        // Plain http:// upstreams get HTTP/1.1 unless UPSTREAM_HTTP2 says otherwise.
        let arrivals = gw.fake.arrivals();
        assert_eq!(arrivals.last().unwrap().version, "HTTP/1.1", "{provider}");
        let cost = answer.header("x-meta-chat-cost-usd").to_owned();
        assert!(cost.contains('.'), "{cost}");
        let request_id = answer.header("x-request-id");
        assert_eq!(
            uuid::Uuid::parse_str(request_id).unwrap().get_version_num(),
            7
        );
        let body = answer.json();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(text_of(&body), "Four.");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["prompt_tokens"], 10);
        assert_eq!(body["usage"]["completion_tokens"], 2);
        assert_eq!(body["usage"]["total_tokens"], 12);
        assert_eq!(body["usage"]["cost_usd"], cost.as_str());

        let recorded = gw.fake.requests_to(path);
        let last = recorded.last().unwrap();
        assert_eq!(last.body["model"], model);
        if let Some(tenant_key) = tenant_key {
            let seen = last
                .header("authorization")
                .or_else(|| last.header("x-api-key"))
                .unwrap();
            assert!(seen.contains(tenant_key), "{provider} got {seen}");
        }
    }
}

#[tokio::test]
async fn a_stream_reassembles_to_the_same_text_and_ends_with_done() {
    let gw = Gateway::start().await;
    for provider in ["openai", "anthropic", "ollama"] {
        let (_, key) = gw.tenant(json!({"llm": {"provider": provider}})).await;
        gw.fake
            .push(Reply::text("The answer is four.").with_usage(7, 5));
        let plain = gw.chat(&key, &hello(json!({}))).await;
        assert_eq!(plain.status, 200, "{}", plain.text);
        let expected = text_of(&plain.json()).to_owned();

        gw.fake.push(
            Reply::text("The answer is four.")
                .with_usage(7, 5)
                .in_chunks(4),
        );
        let answer = gw
            .chat(
                &key,
                &hello(json!({"stream": true, "stream_options": {"include_usage": true}})),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert!(
            answer
                .header("content-type")
                .starts_with("text/event-stream")
        );
        assert_eq!(answer.header("x-meta-chat-provider"), provider);
        let events = events(&answer.text);
        assert_eq!(events.last().unwrap(), "[DONE]", "{}", answer.text);
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, expected, "{provider}");
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["prompt_tokens"], 7);
        assert_eq!(usage["usage"]["completion_tokens"], 5);
        assert!(usage["usage"]["cost_usd"].is_string());
        assert!(
            chunks
                .iter()
                .any(|c| c["choices"][0]["finish_reason"] == "stop")
        );
    }

    // Without include_usage no usage chunk is sent.
    let (_, key) = gw.tenant(json!({"llm": {"provider": "openai"}})).await;
    gw.fake.push(Reply::text("Hi."));
    let answer = gw.chat(&key, &hello(json!({"stream": true}))).await;
    let events = events(&answer.text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(
        events.iter().all(|e| !e.contains("\"usage\"")),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_mid_stream_error_becomes_an_error_event() {
    let gw = Gateway::start().await;
    let (_, key) = gw.tenant(json!({"llm": {"provider": "openai"}})).await;
    gw.fake.push(Reply::stream_error(1, "the model fell over"));
    let answer = gw.chat(&key, &hello(json!({"stream": true}))).await;
    assert_eq!(answer.status, 200);
    let events = events(&answer.text);
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(error["error"]["message"].is_string(), "{}", answer.text);
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn provider_prefix_routes_to_that_provider() {
    let gw = Gateway::start().await;
    let (_, key) = gw
        .tenant(json!({"llm": {"provider": "openai", "apiKey": TENANT_OPENAI_KEY}}))
        .await;
    let answer = gw
        .chat(
            &key,
            &hello(json!({"model": "anthropic/claude-3-haiku-20240307"})),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "anthropic");
    assert_eq!(
        answer.header("x-meta-chat-model"),
        "claude-3-haiku-20240307"
    );
    let sent = gw.fake.requests_to("/v1/messages");
    let sent = sent.last().unwrap();
    assert_eq!(sent.body["model"], "claude-3-haiku-20240307");
    assert_eq!(
        sent.header("x-api-key"),
        Some(SYSTEM_ANTHROPIC_KEY),
        "the tenant's OpenAI key must not go to Anthropic"
    );

    // A bare model keeps the tenant's provider.
    let answer = gw
        .chat(&key, &hello(json!({"model": "gpt-4.1-nano"})))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "openai");
    assert_eq!(answer.header("x-meta-chat-model"), "gpt-4.1-nano");
    assert_eq!(
        gw.fake
            .requests_to("/v1/chat/completions")
            .last()
            .unwrap()
            .body["model"],
        "gpt-4.1-nano"
    );
}

#[tokio::test]
async fn switching_provider_takes_effect_on_the_next_request() {
    let gw = Gateway::start().await;
    let (id, key) = gw.tenant(json!({"llm": {"provider": "openai"}})).await;
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.header("x-meta-chat-provider"), "openai");
    let put = gw
        .send(
            reqwest::Method::PUT,
            &format!("/api/tenants/{id}"),
            Some(ADMIN_KEY),
            Some(
                json!({"settings": {"llm": {"provider": "ollama", "model": "llama3.1:8b"}}})
                    .to_string(),
            ),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text);
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "ollama");
    assert_eq!(answer.header("x-meta-chat-model"), "llama3.1:8b");
    assert_eq!(
        text_of(&answer.json()),
        "You said: hello there",
        "the fake echoes by default"
    );
}

#[tokio::test]
async fn a_changed_provider_key_is_sent_from_the_next_request() {
    let gw = Gateway::start().await;
    let settings = |key: &str| json!({"llm": {"provider": "openai", "apiKey": key}});
    let (id, key) = gw.tenant(settings("sk-tenant-first")).await;
    let sent_key = || {
        gw.fake
            .requests_to("/v1/chat/completions")
            .last()
            .unwrap()
            .header("authorization")
            .map(str::to_owned)
    };
    for _ in 0..2 {
        let answer = gw.chat(&key, &hello(json!({}))).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(sent_key().as_deref(), Some("Bearer sk-tenant-first"));
    }
    let put = gw
        .send(
            reqwest::Method::PUT,
            &format!("/api/tenants/{id}"),
            Some(ADMIN_KEY),
            Some(json!({"settings": settings("sk-tenant-second")}).to_string()),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text);
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(sent_key().as_deref(), Some("Bearer sk-tenant-second"));
}

#[tokio::test]
async fn upstream_failures_fall_back_but_invalid_requests_do_not() {
    let gw = Gateway::start().await;
    let (_, key) = gw
        .tenant(json!({
            "llm": {"provider": "openai", "model": "gpt-4o"},
            "fallback": [{"provider": "anthropic", "model": "claude-3-haiku-20240307",
                          "priority": 1, "apiKey": TENANT_ANTHROPIC_KEY}]
        }))
        .await;
    gw.fake.push_all([
        Reply::error(500, "internal failure"),
        Reply::text("from the fallback"),
    ]);
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "anthropic");
    assert_eq!(
        answer.header("x-meta-chat-model"),
        "claude-3-haiku-20240307"
    );
    assert_eq!(text_of(&answer.json()), "from the fallback");
    assert_eq!(
        gw.fake
            .requests_to("/v1/messages")
            .last()
            .unwrap()
            .header("x-api-key"),
        Some(TENANT_ANTHROPIC_KEY)
    );

    let before = gw.fake.requests_to("/v1/messages").len();
    gw.fake
        .push(Reply::error_code(400, "invalid_value", "bad temperature"));
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert_eq!(answer.json()["error"]["code"], "invalid_value");
    assert_eq!(gw.fake.requests_to("/v1/messages").len(), before);
}

#[tokio::test]
async fn upstream_errors_use_openai_statuses_without_keys() {
    let gw = Gateway::start().await;
    let (_, key) = gw
        .tenant(json!({"llm": {"provider": "openai", "apiKey": TENANT_OPENAI_KEY}}))
        .await;
    gw.fake.push(Reply::error(
        401,
        format!("Incorrect API key provided: {TENANT_OPENAI_KEY}"),
    ));
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 502, "{}", answer.text);
    assert_eq!(
        answer.json()["error"]["code"],
        "upstream_authentication_error"
    );
    assert!(!answer.text.contains(TENANT_OPENAI_KEY));

    gw.fake.push(Reply::rate_limited(9));
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 429, "{}", answer.text);
    assert_eq!(answer.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(answer.header("retry-after"), "9");

    gw.fake.push(Reply::error_code(
        400,
        "context_length_exceeded",
        "too long",
    ));
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert_eq!(answer.json()["error"]["code"], "context_length_exceeded");
}

#[tokio::test]
async fn bad_callers_are_refused() {
    let gw = Gateway::start().await;
    let answer = gw.chat(ADMIN_KEY, &hello(json!({}))).await;
    assert_eq!(answer.status, 403, "{}", answer.text);
    assert_eq!(answer.json()["error"]["code"], "tenant_key_required");

    let answer = gw
        .send(
            reqwest::Method::POST,
            "/v1/chat/completions",
            None,
            Some(hello(json!({})).to_string()),
        )
        .await;
    assert_eq!(answer.status, 401, "{}", answer.text);

    let (_, key) = gw.tenant(json!({})).await;
    let answer = gw
        .send(
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(&key),
            Some("{not json".to_owned()),
        )
        .await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert_eq!(answer.json()["error"]["code"], "invalid_json");
    assert!(gw.fake.requests().is_empty());
}

#[tokio::test]
async fn embeddings_follow_the_tenant_settings() {
    let gw = Gateway::start().await;
    // No embeddings settings: the EMBEDDINGS_* environment (OpenAI, system key).
    let (_, key) = gw.tenant(json!({})).await;
    let body = json!({"input": ["one", "two"], "model": "text-embedding-3-small"});
    let answer = gw
        .send(
            reqwest::Method::POST,
            "/v1/embeddings",
            Some(&key),
            Some(body.to_string()),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "openai");
    assert_eq!(answer.header("x-meta-chat-model"), "text-embedding-3-small");
    let json = answer.json();
    assert_eq!(json["object"], "list");
    assert_eq!(json["data"].as_array().unwrap().len(), 2);
    assert!(json["data"][1]["embedding"].is_array());
    assert!(json["usage"]["cost_usd"].is_string());
    let sent = gw.fake.requests_to("/v1/embeddings");
    assert_eq!(
        sent.last().unwrap().header("authorization"),
        Some(format!("Bearer {SYSTEM_OPENAI_KEY}").as_str())
    );

    // The tenant's own embeddings provider.
    let (_, key) = gw
        .tenant(json!({"embeddings": {"provider": "ollama", "model": "nomic-embed-text"}}))
        .await;
    let answer = gw
        .send(
            reqwest::Method::POST,
            "/v1/embeddings",
            Some(&key),
            Some(json!({"input": "hello"}).to_string()),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "ollama");
    assert_eq!(answer.header("x-meta-chat-model"), "nomic-embed-text");
    assert_eq!(gw.fake.requests_to("/api/embed").len(), 1);
}

#[tokio::test]
async fn models_lists_what_the_tenant_can_use() {
    let gw = Gateway::start().await;
    let (_, key) = gw
        .tenant(json!({"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307"}}))
        .await;
    let answer = gw
        .send(reqwest::Method::GET, "/v1/models", Some(&key), None)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let json = answer.json();
    assert_eq!(json["object"], "list");
    let ids: Vec<&str> = json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids[0], "anthropic/claude-3-haiku-20240307");
    assert!(ids.contains(&"openai/gpt-4o-mini"), "{ids:?}");
    assert!(!ids.iter().any(|id| id.contains("embedding")), "{ids:?}");
    assert_eq!(json["data"][0]["owned_by"], "anthropic");

    let answer = gw
        .send(reqwest::Method::GET, "/v1/models", Some(ADMIN_KEY), None)
        .await;
    assert_eq!(answer.status, 403);
}

#[tokio::test]
async fn test_llm_answers_with_content_latency_usage_and_cost() {
    let gateway = Gateway::start().await;
    // The admin tests the system configuration.
    gateway.fake.push(Reply::text("4").with_usage(1000, 500));
    let answer = gateway
        .send(
            reqwest::Method::POST,
            "/api/test/llm",
            Some(ADMIN_KEY),
            Some(
                json!({"provider": "openai", "prompt": "What is 2+2?", "model": "gpt-4o-mini"})
                    .to_string(),
            ),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    assert_eq!(body["provider"], "openai");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["content"], "4");
    assert_eq!(
        body["usage"],
        json!({"inputTokens": 1000, "outputTokens": 500})
    );
    assert_eq!(body["costUsd"], "0.000450000");
    assert!(body["latencyMs"].is_u64());
    let sent = gateway.fake.requests_to("/v1/chat/completions");
    assert_eq!(
        sent.last().unwrap().header("authorization"),
        Some(format!("Bearer {SYSTEM_OPENAI_KEY}").as_str())
    );

    // An upstream failure is an error envelope without the key; bad input is rejected.
    gateway.fake.push(Reply::error(401, "bad key"));
    let answer = gateway
        .send(
            reqwest::Method::POST,
            "/api/test/llm",
            Some(ADMIN_KEY),
            Some(json!({"provider": "anthropic"}).to_string()),
        )
        .await;
    assert_eq!(answer.status, 502, "{}", answer.text);
    assert!(!answer.text.contains(SYSTEM_ANTHROPIC_KEY));
    for body in [
        json!({"provider": "gemini"}),
        json!({"prompt": 5}),
        json!({"colour": "blue"}),
    ] {
        let answer = gateway
            .send(
                reqwest::Method::POST,
                "/api/test/llm",
                Some(ADMIN_KEY),
                Some(body.to_string()),
            )
            .await;
        assert!(
            matches!(answer.status, 400 | 422),
            "{body}: {}",
            answer.text
        );
    }
    let answer = gateway
        .send(
            reqwest::Method::POST,
            "/api/test/llm",
            None,
            Some("{}".into()),
        )
        .await;
    assert_eq!(answer.status, 401);
}

#[tokio::test]
async fn test_llm_uses_the_tenants_own_settings() {
    let gateway = Gateway::start().await;
    let (_, key) = gateway
        .tenant(json!({"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307", "apiKey": TENANT_ANTHROPIC_KEY}}))
        .await;
    gateway.fake.push(Reply::text("Four.").with_usage(10, 2));
    let answer = gateway
        .send(
            reqwest::Method::POST,
            "/api/test/llm",
            Some(&key),
            Some("{}".into()),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    assert_eq!(body["provider"], "anthropic");
    assert_eq!(body["content"], "Four.");
    let sent = gateway.fake.requests_to("/v1/messages");
    let last = sent.last().unwrap();
    assert_eq!(last.header("x-api-key"), Some(TENANT_ANTHROPIC_KEY));
    assert_eq!(last.body["model"], "claude-3-haiku-20240307");
    assert!(!answer.text.contains(TENANT_ANTHROPIC_KEY));

    // Another provider by name: the system key, never the tenant's Anthropic key.
    let answer = gateway
        .send(
            reqwest::Method::POST,
            "/api/test/llm",
            Some(&key),
            Some(json!({"provider": "ollama", "prompt": "Hi"}).to_string()),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json()["provider"], "ollama");
    assert_eq!(answer.json()["content"], "You said: Hi");
}

#[tokio::test]
async fn overhead_header_excludes_the_time_spent_upstream() {
    let gw = Gateway::start().await;
    let (_, key) = gw
        .tenant(json!({"llm": {"provider": "openai", "model": "gpt-4o-mini"}}))
        .await;
    let overhead = |answer: &Answer| -> f64 {
        let value = answer.header("x-meta-chat-overhead-ms");
        let ms: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {value}"));
        assert!(ms >= 0.0, "{value}");
        ms
    };
    // Refusals carry it too: all their time was the gateway's.
    let refused = gw.chat("mc_wrong", &hello(json!({}))).await;
    assert_eq!(refused.status, 401, "{}", refused.text);
    overhead(&refused);
    gw.fake.push(Reply::text("Four."));
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    overhead(&answer);

    // The upstream waits 600 ms before its first frame (and so before the gateway can answer);
    // that wait is not the gateway's.
    gw.fake.push(
        Reply::text("one two three")
            .in_chunks(2)
            .with_chunk_delay(std::time::Duration::from_millis(600)),
    );
    let started = std::time::Instant::now();
    let answer = gw.chat(&key, &hello(json!({"stream": true}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert!(started.elapsed() >= std::time::Duration::from_millis(600));
    let ms = overhead(&answer);
    assert!(ms < 600.0, "the upstream's wait was counted: {ms} ms");

    let answer = gw
        .send(
            reqwest::Method::POST,
            "/v1/embeddings",
            Some(&key),
            Some(json!({"input": "hi", "model": "text-embedding-3-small"}).to_string()),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    overhead(&answer);
}
