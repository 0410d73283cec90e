//! Upstream requests through the proxy the environment names (`HTTP_PROXY`, `NO_PROXY`):
//! `meta-chat serve` as a real process, a forward proxy and the fake OpenAI upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::free_port;
use meta_chat_testkit::{FakeServer, Reply};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;

const ADMIN_KEY: &str = "admin-proxy-test-key-0123456789abcdef";

/// A forward proxy for plain-HTTP requests: reads each connection's first request head in
/// absolute form (`POST http://host:port/path HTTP/1.1`), records its request line, connects
/// to the host, relays the request in origin form and then pipes both ways.
async fn forward_proxy() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let _ = relay(client, record).await;
            });
        }
    });
    (format!("http://{addr}"), seen)
}

async fn relay(mut client: TcpStream, seen: Arc<Mutex<Vec<String>>>) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let (line, rest) = head.split_once("\r\n").unwrap_or((&head, ""));
    seen.lock().unwrap().push(line.to_owned());
    let mut parts = line.splitn(3, ' ');
    let (method, target, version) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let Some(after_scheme) = target.strip_prefix("http://") else {
        client
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let (authority, path) = after_scheme
        .find('/')
        .map_or((after_scheme, "/"), |i| after_scheme.split_at(i));
    let mut upstream = TcpStream::connect(authority).await?;
    upstream
        .write_all(format!("{method} {path} {version}\r\n{rest}").as_bytes())
        .await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// `meta-chat serve` with the fake as its OpenAI upstream and `extra` in its environment.
async fn start(dir: &Path, port: u16, fake: &FakeServer, extra: &[(&str, String)]) -> Child {
    let mut vars = vec![
        ("BIND_ADDR", format!("127.0.0.1:{port}")),
        ("ADMIN_API_KEY", ADMIN_KEY.to_owned()),
        ("OPENAI_API_KEY", "sk-test".to_owned()),
        ("OPENAI_BASE_URL", fake.url()),
    ];
    vars.extend(extra.iter().cloned());
    common::serve_until_listening(dir, &vars).await.0
}

/// Creates a tenant on the OpenAI upstream and sends it one chat request; the answer's
/// status and body.
async fn chat_through(port: u16) -> (u16, Value) {
    meta_chat_llm::install_crypto_provider();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let created: Value = client
        .post(format!("{base}/api/tenants"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"name": "proxied", "settings": {"llm": {"provider": "openai", "model": "gpt-4o-mini"}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["apiKey"].as_str().expect("an API key").to_owned();
    let answer = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap())
}

#[tokio::test]
async fn upstream_requests_go_through_the_proxy_the_environment_names() {
    let fake = FakeServer::start().await.unwrap();
    fake.set_default_reply(Reply::text("through the proxy"));
    let (proxy, seen) = forward_proxy().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let gateway = start(dir.path(), port, &fake, &[("HTTP_PROXY", proxy)]).await;

    let (status, body) = chat_through(port).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"], "through the proxy",
        "{body}"
    );
    assert_eq!(fake.requests_to("/v1/chat/completions").len(), 1);
    let expected = format!("POST {}/v1/chat/completions HTTP/1.1", fake.url());
    assert_eq!(
        *seen.lock().unwrap(),
        vec![expected],
        "the proxy relayed it"
    );
    drop(gateway);
}

#[tokio::test]
async fn hosts_in_no_proxy_are_reached_directly() {
    let fake = FakeServer::start().await.unwrap();
    fake.set_default_reply(Reply::text("direct"));
    let (proxy, seen) = forward_proxy().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let gateway = start(
        dir.path(),
        port,
        &fake,
        &[("HTTP_PROXY", proxy), ("NO_PROXY", "127.0.0.1".to_owned())],
    )
    .await;

    let (status, body) = chat_through(port).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "direct", "{body}");
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );
    drop(gateway);
}

#[tokio::test]
async fn an_unreachable_proxy_is_a_clear_bad_gateway() {
    let fake = FakeServer::start().await.unwrap();
    fake.set_default_reply(Reply::text("never"));
    // A port nothing listens on.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let gateway = start(dir.path(), port, &fake, &[("HTTP_PROXY", dead)]).await;

    let (status, body) = chat_through(port).await;
    assert_eq!(status, 502, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(fake.requests().is_empty());
    drop(gateway);
}
