//! The HTTP server (`meta_chat::server`): HTTP/1.1 and h2c on one port, clients that send
//! their first bytes slowly or nothing at all, and a shutdown that lets answers in flight
//! finish.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{ADMIN_KEY, Gateway, events, hello};
use meta_chat_testkit::{FakeServer, Reply};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

#[tokio::test]
async fn http2_clients_are_served_on_the_same_port() {
    let gw = Gateway::start().await;
    let (_, key) = gw
        .tenant(json!({"llm": {"provider": "openai", "model": "gpt-4o-mini"}}))
        .await;
    let client = h2c_client();

    let health = client.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(health.version(), reqwest::Version::HTTP_2);
    assert_eq!(health.status(), 200);

    // Several requests at once on the one connection, a stream among them.
    gw.fake
        .set_default_reply(Reply::text("over two").in_chunks(3));
    let post = |stream: bool| {
        client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&hello(json!({"stream": stream})))
            .send()
    };
    let (whole, streamed) = tokio::join!(post(false), post(true));
    let whole = whole.unwrap();
    assert_eq!(whole.version(), reqwest::Version::HTTP_2);
    assert_eq!(whole.status(), 200);
    let body: serde_json::Value = whole.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "over two");
    let streamed = streamed.unwrap();
    assert_eq!(streamed.status(), 200);
    let text = streamed.text().await.unwrap();
    assert_eq!(events(&text).last().map(String::as_str), Some("[DONE]"));

    // Failures keep their envelope over HTTP/2 too.
    let refused = client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("mc_not-a-key")
        .json(&hello(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let error: serde_json::Value = refused.json().await.unwrap();
    assert!(error["error"]["message"].is_string(), "{error}");
}

/// Reads a whole `Connection: close` answer from `tcp`.
async fn read_all(tcp: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn slow_first_bytes_and_silent_connections_are_handled() {
    let gw = Gateway::start().await;
    let addr = gw.base.trim_start_matches("http://").to_owned();

    // A request line written a byte at a time at first: `P`, `PO`, … is not the HTTP/2
    // preface, and the request is read as HTTP/1.1.
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "POST /api/tenants HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    for byte in &request.as_bytes()[..3] {
        tcp.write_all(&[*byte]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tcp.write_all(&request.as_bytes()[3..]).await.unwrap();
    let answer = read_all(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 422"), "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");

    // Connections that close at once, or send garbage, leave the server serving.
    for junk in [
        &b""[..],
        b"\x16\x03\x01\x02\x00",
        b"PRX nonsense\r\n\r\n",
        b"PRI * HTTP/1.1\r\n\r\n",
    ] {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(junk).await.unwrap();
        tcp.shutdown().await.unwrap();
        let _ = read_all(&mut tcp).await;
    }
    let health = gw.client.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn shutdown_lets_streams_in_flight_finish() {
    meta_chat_llm::install_crypto_provider();
    let fake = FakeServer::start().await.unwrap();
    fake.set_default_reply(
        Reply::text("one two three")
            .in_chunks(3)
            .with_chunk_delay(Duration::from_millis(300)),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut vars = vec![
        (
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("t.db").display()),
        ),
        ("ADMIN_API_KEY", ADMIN_KEY.to_owned()),
        ("OPENAI_API_KEY", "sk-system".to_owned()),
    ];
    vars.extend(common::upstream_vars(&fake));
    let (state, _) = meta_chat::bootstrap::app_state(common::config(vars))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(meta_chat::server::serve(
        listener,
        meta_chat::api::router(state),
        async {
            let _ = stopped.await;
        },
    ));
    let client = reqwest::Client::new();
    let created = common::request(
        &client,
        reqwest::Method::POST,
        format!("{base}/api/tenants"),
        Some(ADMIN_KEY),
        Some(
            common::tenant_body(
                "t",
                json!({"llm": {"provider": "openai", "model": "gpt-4o"}}),
            )
            .to_string(),
        ),
    )
    .await;
    let (_, key) = created.created_tenant();

    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&hello(json!({"stream": true})))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    stop.send(()).unwrap();
    // The server waits for the stream, which still arrives whole.
    let text = response.text().await.unwrap();
    assert_eq!(
        events(&text).last().map(String::as_str),
        Some("[DONE]"),
        "{text}"
    );
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops once its streams are done")
        .unwrap()
        .unwrap();
    // And accepts nothing new.
    assert!(client.get(format!("{base}/healthz")).send().await.is_err());
}
