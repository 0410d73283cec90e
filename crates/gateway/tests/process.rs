//! The real `meta-chat` binary as a child process in front of the in-process fake upstream
//! (SPEC §3, §4.3, §4.5): no provider key or `ENCRYPTION_KEY` ever reaches a log line
//! (even at `RUST_LOG=trace`), a response body or a response header; SIGTERM lets an
//! in-flight stream finish while refusing new connections; and an upstream 429 with
//! `Retry-After` is retried (or, without retries, passed on in OpenAI's envelope).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Answer, command, events, free_port, hello};
use futures::StreamExt;
use meta_chat_testkit::{FakeServer, Reply};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::task::JoinHandle;

const ADMIN_KEY: &str = "admin-key-for-process-tests-0123456789abcdef";
const SYSTEM_OPENAI_KEY: &str = "sk-sys-SYSTEMOPENAI-7c1e9b3f5d2a8e40";
const SYSTEM_ANTHROPIC_KEY: &str = "sk-ant-sys-SYSTEMANTHROPIC-4f8a2c6e1b9d3057";
const EMBEDDINGS_KEY: &str = "sk-emb-SYSTEMEMBEDDINGS-93b7d1f5a2c8e604";
const TENANT_OPENAI_KEY: &str = "sk-proj-TENANTOPENAI-1d5f9b3e7a2c4860";
const TENANT_ANTHROPIC_KEY: &str = "sk-ant-api03-TENANTANTHROPIC-8e2a6c4f0b7d1935";
/// A key for an OpenAI-compatible proxy: no `sk-` prefix, so only an exact scrub hides it.
const TENANT_NEW_KEY: &str = "proxy-TENANTNEWKEY-5b9d3f7a1c6e2048";
const ENCRYPTION_KEY: &str = "enc-ENCRYPTIONKEY-0a1b2c3d4e5f6a7b8c9d0e1f";

/// Every secret that must never be seen outside the process.
const SECRETS: [&str; 7] = [
    SYSTEM_OPENAI_KEY,
    SYSTEM_ANTHROPIC_KEY,
    EMBEDDINGS_KEY,
    TENANT_OPENAI_KEY,
    TENANT_ANTHROPIC_KEY,
    TENANT_NEW_KEY,
    ENCRYPTION_KEY,
];

type Lines = Arc<Mutex<Vec<String>>>;

/// Reads every line of `reader` into `lines` until EOF (bytes that are not UTF-8 are kept
/// lossily, so nothing is skipped).
fn drain(mut reader: impl AsyncBufRead + Unpin + Send + 'static, lines: Lines) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            match reader.read_until(b'\n', &mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buffer);
                    lines
                        .lock()
                        .unwrap()
                        .push(line.trim_end_matches(['\r', '\n']).to_owned());
                }
            }
        }
    })
}

/// What a stopped gateway printed.
struct Logs {
    stdout: Vec<String>,
    stderr: Vec<String>,
}

/// A `meta-chat` process on a free port, over a fresh SQLite file, pointed at `fake`, with
/// everything it prints captured and every answer it gives recorded.
struct Gateway {
    child: Child,
    base: String,
    client: reqwest::Client,
    stdout: Lines,
    stderr: Lines,
    readers: Vec<JoinHandle<()>>,
    /// Every response so far: status line, headers and body, as text.
    seen: Mutex<Vec<String>>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts the binary and waits for its "listening" line; `vars` come after (and so
    /// override) the defaults.
    async fn start(fake: &FakeServer, vars: &[(&str, &str)]) -> Self {
        meta_chat_llm::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut all: Vec<(&str, String)> = vec![
            ("BIND_ADDR", format!("127.0.0.1:{port}")),
            (
                "DATABASE_URL",
                format!("sqlite://{}", dir.path().join("gateway.db").display()),
            ),
            ("ADMIN_API_KEY", ADMIN_KEY.to_owned()),
            ("ENCRYPTION_KEY", ENCRYPTION_KEY.to_owned()),
        ];
        all.extend(common::upstream_vars(fake));
        all.extend([
            ("OPENAI_API_KEY", SYSTEM_OPENAI_KEY.to_owned()),
            ("ANTHROPIC_API_KEY", SYSTEM_ANTHROPIC_KEY.to_owned()),
            ("EMBEDDINGS_API_KEY", EMBEDDINGS_KEY.to_owned()),
            ("LLM_TIMEOUT", "10000".to_owned()),
        ]);
        all.extend(vars.iter().map(|(n, v)| (*n, (*v).to_owned())));
        let mut child = command(dir.path(), &all).spawn().unwrap();
        let stdout: Lines = Arc::default();
        let stderr: Lines = Arc::default();
        let stderr_reader = drain(BufReader::new(child.stderr.take().unwrap()), stderr.clone());
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let waited = tokio::time::timeout(
            Duration::from_secs(60),
            common::read_until_listening(&mut out, |line| stdout.lock().unwrap().push(line)),
        )
        .await;
        match waited {
            Ok(true) => {}
            Ok(false) => {
                // Let stderr finish so the failure says why.
                let _ = tokio::time::timeout(Duration::from_secs(5), stderr_reader).await;
                panic!(
                    "the server exited before listening: {:?} {:?}",
                    stdout.lock().unwrap(),
                    stderr.lock().unwrap()
                );
            }
            Err(_) => panic!(
                "the server did not start within 60 s: {:?}",
                stderr.lock().unwrap()
            ),
        }
        let stdout_reader = drain(out, stdout.clone());
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            stdout,
            stderr,
            readers: vec![stdout_reader, stderr_reader],
            seen: Mutex::new(Vec::new()),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request and reads the whole answer, recording it.
    async fn send(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> Answer {
        let answer = common::request(
            &self.client,
            method,
            self.url(path),
            key,
            body.map(Value::to_string),
        )
        .await;
        self.record(&answer);
        answer
    }

    fn record(&self, answer: &Answer) {
        let mut seen = format!("HTTP {}\n", answer.status);
        for (name, value) in &answer.headers {
            seen.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        seen.push('\n');
        seen.push_str(&answer.text);
        self.seen.lock().unwrap().push(seen);
    }

    async fn chat(&self, key: &str, body: &Value) -> Answer {
        self.send(Method::POST, "/v1/chat/completions", Some(key), Some(body))
            .await
    }

    /// Creates a tenant as admin; returns (id, tenant key).
    async fn tenant(&self, name: &str, settings: Value) -> (String, String) {
        self.send(
            Method::POST,
            "/api/tenants",
            Some(ADMIN_KEY),
            Some(&common::tenant_body(name, settings)),
        )
        .await
        .created_tenant()
    }

    fn stderr_has(&self, needle: &str) -> bool {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    fn terminate(&self) {
        common::sigterm(&self.child);
    }

    /// Waits for the process to exit (after [`Gateway::terminate`]) and returns its status
    /// and everything it printed.
    async fn wait(mut self, within: Duration) -> (std::process::ExitStatus, Logs) {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the server did not stop in time after SIGTERM")
            .unwrap();
        for reader in self.readers.drain(..) {
            tokio::time::timeout(Duration::from_secs(10), reader)
                .await
                .expect("the output pipes did not close")
                .unwrap();
        }
        let logs = Logs {
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr.lock().unwrap().clone(),
        };
        (status, logs)
    }

    async fn stop(self) -> (std::process::ExitStatus, Logs, Vec<String>) {
        self.terminate();
        let seen = std::mem::take(&mut *self.seen.lock().unwrap());
        let (status, logs) = self.wait(Duration::from_secs(15)).await;
        (status, logs, seen)
    }
}

/// The text a chat completion stream carries.
fn streamed_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Whether `text` holds a secret, or the distinctive middle of one (a masked key shows only
/// its first and last four characters).
fn holds_secret(text: &str) -> bool {
    SECRETS
        .iter()
        .any(|s| text.contains(s) || text.contains(&s[6..s.len() - 6]))
}

/// Whether the fake saw `key` as a credential on some request.
fn fake_saw_key(fake: &FakeServer, key: &str) -> bool {
    fake.requests().iter().any(|r| {
        r.header("authorization") == Some(format!("Bearer {key}").as_str())
            || r.header("x-api-key") == Some(key)
    })
}

#[tokio::test]
async fn no_provider_key_appears_in_logs_responses_or_headers() {
    let fake = FakeServer::start().await.unwrap();
    // One retry, so the retry path (which logs the failed attempt) is exercised too.
    let gw = Gateway::start(&fake, &[("RUST_LOG", "trace"), ("LLM_MAX_RETRIES", "1")]).await;

    let (openai_id, openai_key) = gw
        .tenant(
            "openai-own-key",
            json!({"llm": {"provider": "openai", "model": "gpt-4o-mini", "apiKey": TENANT_OPENAI_KEY}}),
        )
        .await;
    let (anthropic_id, anthropic_key) = gw
        .tenant(
            "anthropic-own-key",
            json!({"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307",
                           "apiKey": TENANT_ANTHROPIC_KEY}}),
        )
        .await;
    let (_, openai_system) = gw
        .tenant("openai-system-key", json!({"llm": {"provider": "openai"}}))
        .await;
    let (_, anthropic_system) = gw
        .tenant(
            "anthropic-system-key",
            json!({"llm": {"provider": "anthropic"}}),
        )
        .await;
    let (_, with_fallback) = gw
        .tenant(
            "fallback",
            json!({
                "llm": {"provider": "openai", "model": "gpt-4o", "apiKey": TENANT_OPENAI_KEY},
                "fallback": [{"provider": "anthropic", "model": "claude-3-haiku-20240307",
                              "priority": 1, "apiKey": TENANT_ANTHROPIC_KEY}]
            }),
        )
        .await;

    // Plain chats with tenant keys and system keys, on both providers.
    for (key, provider) in [
        (&openai_key, "openai"),
        (&anthropic_key, "anthropic"),
        (&openai_system, "openai"),
        (&anthropic_system, "anthropic"),
    ] {
        fake.push(Reply::text("Four.").with_usage(10, 2));
        let answer = gw.chat(key, &hello(json!({}))).await;
        assert_eq!(answer.status, 200, "{provider}: {}", answer.text);
        assert_eq!(answer.header("x-meta-chat-provider"), provider);
    }

    // Streams, with usage.
    for key in [&openai_key, &anthropic_key] {
        fake.push(Reply::text("The answer is four.").in_chunks(4));
        let answer = gw
            .chat(
                key,
                &hello(json!({"stream": true, "stream_options": {"include_usage": true}})),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        let events = events(&answer.text);
        assert_eq!(events.last().unwrap(), "[DONE]", "{}", answer.text);
        assert_eq!(streamed_text(&events), "The answer is four.");
    }

    // Embeddings on the system embeddings key.
    let answer = gw
        .send(
            Method::POST,
            "/v1/embeddings",
            Some(&openai_system),
            Some(&json!({"input": ["one", "two"], "model": "text-embedding-3-small"})),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    // The upstream refuses the key and says it back (not retried).
    fake.push(Reply::error(
        401,
        format!("Incorrect API key provided: {TENANT_OPENAI_KEY}"),
    ));
    let answer = gw.chat(&openai_key, &hello(json!({}))).await;
    assert_eq!(answer.status, 502, "{}", answer.text);
    fake.push(Reply::error(
        401,
        format!("invalid x-api-key {TENANT_ANTHROPIC_KEY}"),
    ));
    let answer = gw.chat(&anthropic_key, &hello(json!({}))).await;
    assert_eq!(answer.status, 502, "{}", answer.text);

    // A 500 whose message echoes the key: retried once, then failed.
    let echo_500 = |key: &str| Reply::error(500, format!("internal error while serving key {key}"));
    fake.push_all([echo_500(SYSTEM_OPENAI_KEY), echo_500(SYSTEM_OPENAI_KEY)]);
    let answer = gw.chat(&openai_system, &hello(json!({}))).await;
    assert_eq!(answer.status, 502, "{}", answer.text);
    fake.push_all([
        echo_500(SYSTEM_ANTHROPIC_KEY),
        echo_500(SYSTEM_ANTHROPIC_KEY),
    ]);
    let answer = gw
        .chat(&anthropic_system, &hello(json!({"stream": true})))
        .await;
    assert!(
        matches!(answer.status, 200 | 502),
        "{}: {}",
        answer.status,
        answer.text
    );

    // A mid-stream error that echoes the key.
    fake.push(Reply::stream_error(
        1,
        format!("stream broke for key {TENANT_OPENAI_KEY}"),
    ));
    let answer = gw.chat(&openai_key, &hello(json!({"stream": true}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(events(&answer.text).last().unwrap(), "[DONE]");

    // The primary fails with the key in its message (twice: one retry), the fallback answers.
    fake.push_all([
        echo_500(TENANT_OPENAI_KEY),
        echo_500(TENANT_OPENAI_KEY),
        Reply::text("from the fallback"),
    ]);
    let answer = gw.chat(&with_fallback, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "anthropic");

    // New provider key through PUT (a proxy key without the `sk-` look), used at once.
    let answer = gw
        .send(
            Method::PUT,
            &format!("/api/tenants/{openai_id}"),
            Some(&openai_key),
            Some(
                &json!({"settings": {"llm": {"provider": "openai", "model": "gpt-4o-mini",
                                               "apiKey": TENANT_NEW_KEY}}}),
            ),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert!(answer.text.contains('…'), "{}", answer.text);
    fake.push(Reply::text("with the new key"));
    let answer = gw.chat(&openai_key, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    fake.push(Reply::error(
        401,
        format!("Incorrect API key provided: {TENANT_NEW_KEY}"),
    ));
    let answer = gw.chat(&openai_key, &hello(json!({}))).await;
    assert_eq!(answer.status, 502, "{}", answer.text);

    // Tenants as the admin and the tenant see them: masked.
    for (id, key) in [
        (&openai_id, ADMIN_KEY),
        (&openai_id, openai_key.as_str()),
        (&anthropic_id, ADMIN_KEY),
    ] {
        let answer = gw
            .send(Method::GET, &format!("/api/tenants/{id}"), Some(key), None)
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert!(
            answer.json()["settings"]["llm"]["apiKey"]
                .as_str()
                .unwrap()
                .contains('…'),
            "{}",
            answer.text
        );
    }
    let answer = gw
        .send(Method::GET, "/api/tenants", Some(ADMIN_KEY), None)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    // The provider test, by the admin (system key) and by a tenant (its own key), and failing.
    fake.push(Reply::text("4"));
    let answer = gw
        .send(
            Method::POST,
            "/api/test/llm",
            Some(ADMIN_KEY),
            Some(&json!({"provider": "openai", "prompt": "What is 2+2?"})),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    fake.push(Reply::text("4"));
    let answer = gw
        .send(
            Method::POST,
            "/api/test/llm",
            Some(&anthropic_key),
            Some(&json!({})),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    fake.push(Reply::error(
        401,
        format!("invalid x-api-key {TENANT_ANTHROPIC_KEY}"),
    ));
    let answer = gw
        .send(
            Method::POST,
            "/api/test/llm",
            Some(&anthropic_key),
            Some(&json!({})),
        )
        .await;
    assert_eq!(answer.status, 502, "{}", answer.text);
    fake.push(Reply::error(
        401,
        format!("Incorrect API key provided: {SYSTEM_OPENAI_KEY}"),
    ));
    let answer = gw
        .send(
            Method::POST,
            "/api/test/llm",
            Some(ADMIN_KEY),
            Some(&json!({"provider": "openai"})),
        )
        .await;
    assert_eq!(answer.status, 502, "{}", answer.text);

    // Every key really went through the process to the upstream…
    for key in [
        SYSTEM_OPENAI_KEY,
        SYSTEM_ANTHROPIC_KEY,
        EMBEDDINGS_KEY,
        TENANT_OPENAI_KEY,
        TENANT_ANTHROPIC_KEY,
        TENANT_NEW_KEY,
    ] {
        assert!(fake_saw_key(&fake, key), "the fake never saw {key}");
    }

    let (status, logs, seen) = gw.stop().await;
    assert!(status.success(), "{status:?}");

    // …the capture really holds the trace output…
    let stderr = logs.stderr.join("\n");
    assert!(logs.stderr.len() > 50, "{stderr}");
    assert!(stderr.contains("meta-chat listening"), "{stderr}");
    assert!(
        stderr.contains("TRACE"),
        "no trace line captured:\n{stderr}"
    );
    assert!(
        logs.stderr
            .iter()
            .any(|l| l.contains("DEBUG") && l.contains("chat completion request")),
        "{stderr}"
    );
    assert!(
        logs.stderr
            .iter()
            .any(|l| l.contains("DEBUG") && l.contains("messages request")),
        "{stderr}"
    );
    assert!(
        stderr.contains("upstream attempt failed, retrying"),
        "{stderr}"
    );
    assert!(stderr.contains("provider failed, falling back"), "{stderr}");
    assert!(stderr.contains("meta-chat stopped"), "{stderr}");

    // …and no secret left the process: not in a log line, a body or a header. Every leak
    // is listed before failing.
    assert!(seen.len() > 25, "{}", seen.len());
    let leaked_lines: Vec<&String> = logs
        .stdout
        .iter()
        .chain(&logs.stderr)
        .filter(|line| holds_secret(line))
        .collect();
    let leaked_responses: Vec<&String> = seen.iter().filter(|r| holds_secret(r)).collect();
    assert!(
        leaked_lines.is_empty() && leaked_responses.is_empty(),
        "secrets left the process\nin log lines: {leaked_lines:#?}\nin responses: {leaked_responses:#?}"
    );
    // Nor do the gateway's own keys reach the logs.
    for key in [
        ADMIN_KEY,
        &openai_key,
        &anthropic_key,
        &openai_system,
        &anthropic_system,
        &with_fallback,
    ] {
        assert!(
            !stderr.contains(key),
            "a log line holds the gateway key {key}"
        );
    }
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_stream_finish() {
    let fake = FakeServer::start().await.unwrap();
    let gw = Gateway::start(&fake, &[("LLM_MAX_RETRIES", "0")]).await;
    let (_, key) = gw
        .tenant("streamer", json!({"llm": {"provider": "openai"}}))
        .await;
    let text = "one two three four five six seven eight";
    // Role, 8 pieces, finish, usage: 11 frames of 180 ms, about 2 s in all.
    fake.push(
        Reply::text(text)
            .in_chunks(8)
            .with_chunk_delay(Duration::from_millis(180)),
    );
    let response = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&hello(
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut received = String::new();
    while !received.contains("data: ") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("no first chunk within 10 s")
            .expect("the stream ended before its first chunk")
            .unwrap();
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!received.contains("[DONE]"), "{received}");

    gw.terminate();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.stderr_has("shutdown signal received") {
        assert!(Instant::now() < deadline, "SIGTERM was not noticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the accept loop see it.
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A new connection is not served while the stream is still going.
    let fresh = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let refused = fresh.get(gw.url("/healthz")).send().await;
    assert!(
        refused.is_err(),
        "a new request was served after SIGTERM: {refused:?}"
    );

    // The stream in flight still gets every chunk and the end.
    let rest = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(chunk) = body.next().await {
            received.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(rest.is_ok(), "the stream did not finish: {received}");
    let events = events(&received);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{received}"
    );
    assert_eq!(streamed_text(&events), text, "{received}");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(usage["usage"]["completion_tokens"].is_u64(), "{received}");

    let (status, logs) = gw.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}: {:?}", logs.stderr);
    assert!(
        logs.stderr.iter().any(|l| l.contains("meta-chat stopped")),
        "{:?}",
        logs.stderr
    );
}

/// Watches the fake and notes when each request to `path` arrived (to within a few ms).
fn arrivals(
    fake: &Arc<FakeServer>,
    path: &'static str,
) -> (Arc<Mutex<Vec<Instant>>>, JoinHandle<()>) {
    let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let watcher = {
        let fake = fake.clone();
        let times = times.clone();
        tokio::spawn(async move {
            loop {
                let count = fake.requests_to(path).len();
                {
                    let mut times = times.lock().unwrap();
                    while times.len() < count {
                        times.push(Instant::now());
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    (times, watcher)
}

// Two workers, so the arrival watcher is not held up by the test's own requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_429_with_retry_after_is_retried_through_the_gateway() {
    let fake = Arc::new(FakeServer::start().await.unwrap());
    let gw = Gateway::start(&fake, &[("LLM_MAX_RETRIES", "2")]).await;
    let (_, key) = gw
        .tenant("patient", json!({"llm": {"provider": "openai"}}))
        .await;
    let (times, watcher) = arrivals(&fake, "/v1/chat/completions");
    fake.push_all([Reply::rate_limited(1), Reply::text("after the wait")]);
    let started = Instant::now();
    let answer = gw.chat(&key, &hello(json!({}))).await;
    let elapsed = started.elapsed();
    // Let the watcher catch up before it is stopped.
    tokio::time::sleep(Duration::from_millis(20)).await;
    watcher.abort();
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        answer.json()["choices"][0]["message"]["content"],
        "after the wait"
    );
    assert_eq!(fake.requests_to("/v1/chat/completions").len(), 2);
    let times = times.lock().unwrap().clone();
    assert_eq!(times.len(), 2);
    // Lower bounds only: Retry-After: 1 means no second attempt within the second.
    let gap = times[1] - times[0];
    assert!(gap >= Duration::from_millis(900), "retried after {gap:?}");
    assert!(
        elapsed >= Duration::from_millis(950),
        "answered in {elapsed:?}"
    );
    let (status, _, _) = gw.stop().await;
    assert!(status.success());
}

#[tokio::test]
async fn upstream_429_without_retries_reaches_the_client_with_retry_after() {
    let fake = FakeServer::start().await.unwrap();
    let gw = Gateway::start(&fake, &[("LLM_MAX_RETRIES", "0")]).await;
    let (_, key) = gw
        .tenant("impatient", json!({"llm": {"provider": "openai"}}))
        .await;
    fake.push(Reply::rate_limited(7));
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 429, "{}", answer.text);
    assert_eq!(answer.header("retry-after"), "7");
    let body = answer.json();
    let error = &body["error"];
    assert_eq!(error["code"], "rate_limit_exceeded", "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("param").is_some_and(Value::is_null), "{body}");
    assert_eq!(fake.requests_to("/v1/chat/completions").len(), 1);
    let (status, _, _) = gw.stop().await;
    assert!(status.success());
}
