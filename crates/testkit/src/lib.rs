//! # meta-chat-testkit
//!
//! Protocol-faithful fake OpenAI, Anthropic and Ollama servers on real loopback sockets.
//! One [`FakeServer`] serves all three wire protocols on one ephemeral port (their paths do
//! not overlap):
//!
//! | dialect | paths |
//! |---|---|
//! | OpenAI | `POST /v1/chat/completions`, `POST /v1/embeddings`, `GET /v1/models` |
//! | Anthropic | `POST /v1/messages` |
//! | Ollama | `POST /api/chat`, `POST /api/embed`, `GET /api/tags` |
//!
//! Each chat or embeddings request takes the next scripted [`Reply`]; when none is queued it
//! gets the default reply — an echo of the last user message, or whatever
//! [`FakeServer::set_default_reply`] set (a tool call, a slow stream, …), which is how a
//! load test gives every request the same upstream behaviour. Every request is recorded, so
//! tests can assert the exact wire request the server received
//! ([`FakeServer::set_recording`] turns that off for long-running servers), along with the
//! HTTP version and client connection it came on ([`FakeServer::arrivals`]). The server
//! speaks HTTP/1.1 and HTTP/2 without TLS (h2c, by prior knowledge).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use bytes::Bytes;
use serde_json::Value;

mod anthropic;
mod ollama;
mod openai;

/// A tool call the fake model makes.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeToolCall {
    /// The call id (OpenAI and Anthropic send it; Ollama has none on the wire).
    pub id: String,
    /// The tool name.
    pub name: String,
    /// The arguments object.
    pub arguments: Value,
}

impl FakeToolCall {
    /// A tool call.
    pub fn new(id: impl Into<String>, name: impl Into<String>, arguments: Value) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            arguments,
        }
    }
}

/// What the fake model does for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyKind {
    /// Answer `You said: <last user message>` (the default when nothing is queued).
    Echo,
    /// Answer with this text (embeddings requests get vectors instead).
    Text(String),
    /// Call tools, optionally with some text first.
    ToolCalls {
        /// Text before the calls (may be empty).
        text: String,
        /// The calls.
        calls: Vec<FakeToolCall>,
    },
    /// Answer with an error in the dialect's envelope.
    Error {
        /// HTTP status.
        status: u16,
        /// The message.
        message: String,
        /// The dialect's error code/type to use instead of the one the status implies
        /// (for example OpenAI's `context_length_exceeded`, Anthropic's `overloaded_error`).
        code: Option<String>,
    },
    /// Start streaming, then send the dialect's in-stream error after `after` text frames
    /// (OpenAI: a `data:` error object; Anthropic: an `error` event; Ollama: an
    /// `{"error": …}` line). A non-streamed request gets a 500 error.
    StreamError {
        /// Text frames before the error.
        after: usize,
        /// The message.
        message: String,
    },
    /// Accept the request and never answer.
    Hang,
    /// Answer 200 with a body that is not valid JSON (a stream gets a frame that is not).
    Malformed,
    /// Answer exactly this.
    Raw {
        /// HTTP status.
        status: u16,
        /// `Content-Type`.
        content_type: String,
        /// The body.
        body: String,
    },
}

/// A scripted reply: what to do, plus how to stream it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// What to do.
    pub kind: ReplyKind,
    /// `(input, output)` tokens to report; `None` estimates ~4 characters per token.
    pub usage: Option<(u64, u64)>,
    /// Whether a stream reports usage (OpenAI only when the request asked for it with
    /// `stream_options.include_usage`, as the real API does).
    pub stream_usage: bool,
    /// How many pieces the text is split into when streamed.
    pub chunks: usize,
    /// Pause before each streamed frame.
    pub chunk_delay: Duration,
    /// Cut the connection after this many frames (a stream dropped mid-way).
    pub drop_after: Option<usize>,
    /// Finish reason in unified terms: `stop`, `length`, `tool_calls`, `content_filter`
    /// (mapped to the dialect's own words). `None` picks `stop` or `tool_calls`.
    pub finish: Option<String>,
    /// The model name to answer with; `None` echoes the requested model.
    pub model: Option<String>,
    /// Extra response headers (for example `retry-after`).
    pub headers: Vec<(String, String)>,
}

impl Reply {
    fn of(kind: ReplyKind) -> Self {
        Self {
            kind,
            usage: None,
            stream_usage: true,
            chunks: 3,
            chunk_delay: Duration::ZERO,
            drop_after: None,
            finish: None,
            model: None,
            headers: Vec::new(),
        }
    }

    /// Answer with an echo of the last user message.
    pub fn echo() -> Self {
        Self::of(ReplyKind::Echo)
    }

    /// Answer with `text`.
    pub fn text(text: impl Into<String>) -> Self {
        Self::of(ReplyKind::Text(text.into()))
    }

    /// Call these tools.
    pub fn tool_calls(calls: Vec<FakeToolCall>) -> Self {
        Self::of(ReplyKind::ToolCalls {
            text: String::new(),
            calls,
        })
    }

    /// Say `text`, then call these tools.
    pub fn text_and_tool_calls(text: impl Into<String>, calls: Vec<FakeToolCall>) -> Self {
        Self::of(ReplyKind::ToolCalls {
            text: text.into(),
            calls,
        })
    }

    /// An error with this status, in the dialect's envelope.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::of(ReplyKind::Error {
            status,
            message: message.into(),
            code: None,
        })
    }

    /// An error with this status and the dialect's error code/type.
    pub fn error_code(status: u16, code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::of(ReplyKind::Error {
            status,
            message: message.into(),
            code: Some(code.into()),
        })
    }

    /// 429 with `Retry-After: seconds`.
    pub fn rate_limited(retry_after_seconds: u64) -> Self {
        Self::error(429, "Rate limit reached, please retry later")
            .header("retry-after", retry_after_seconds.to_string())
    }

    /// An error in the middle of a stream after `after` text frames.
    pub fn stream_error(after: usize, message: impl Into<String>) -> Self {
        Self::of(ReplyKind::StreamError {
            after,
            message: message.into(),
        })
    }

    /// Never answer.
    pub fn hang() -> Self {
        Self::of(ReplyKind::Hang)
    }

    /// A 200 answer that is not valid JSON.
    pub fn malformed() -> Self {
        Self::of(ReplyKind::Malformed)
    }

    /// Exactly this status, content type and body.
    pub fn raw(status: u16, content_type: impl Into<String>, body: impl Into<String>) -> Self {
        Self::of(ReplyKind::Raw {
            status,
            content_type: content_type.into(),
            body: body.into(),
        })
    }

    /// Reports these token counts.
    pub fn with_usage(mut self, input: u64, output: u64) -> Self {
        self.usage = Some((input, output));
        self
    }

    /// Streams the text in `n` pieces.
    pub fn in_chunks(mut self, n: usize) -> Self {
        self.chunks = n.max(1);
        self
    }

    /// Waits this long before each streamed frame.
    pub fn with_chunk_delay(mut self, delay: Duration) -> Self {
        self.chunk_delay = delay;
        self
    }

    /// Cuts the connection after `frames` streamed frames.
    pub fn drop_after(mut self, frames: usize) -> Self {
        self.drop_after = Some(frames);
        self
    }

    /// A stream without usage.
    pub fn without_stream_usage(mut self) -> Self {
        self.stream_usage = false;
        self
    }

    /// Finishes for this unified reason (`stop`, `length`, `tool_calls`, `content_filter`).
    pub fn with_finish(mut self, reason: impl Into<String>) -> Self {
        self.finish = Some(reason.into());
        self
    }

    /// Answers as this model.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Adds a response header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The `(input, output)` usage to report for a request and an answer text.
    pub(crate) fn usage_for(&self, request: &Value, answer: &str) -> (u64, u64) {
        self.usage.unwrap_or_else(|| {
            (
                estimate_tokens(&request.to_string()),
                estimate_tokens(answer).max(1),
            )
        })
    }

    /// What the fake model says: its text and tool calls (an echo of `last_user_text` for
    /// [`ReplyKind::Echo`] and anything that is not an answer).
    pub(crate) fn answer(
        &self,
        last_user_text: impl FnOnce() -> String,
    ) -> (String, Vec<FakeToolCall>) {
        match &self.kind {
            ReplyKind::Text(text) => (text.clone(), Vec::new()),
            ReplyKind::ToolCalls { text, calls } => (text.clone(), calls.clone()),
            _ => (echo(&last_user_text()), Vec::new()),
        }
    }

    /// The unified finish reason of this reply.
    pub(crate) fn finish_reason(&self) -> &str {
        match (&self.finish, &self.kind) {
            (Some(reason), _) => reason,
            (None, ReplyKind::ToolCalls { .. }) => "tool_calls",
            _ => "stop",
        }
    }

    /// The model to report.
    pub(crate) fn model_for(&self, request: &Value) -> String {
        self.model.clone().unwrap_or_else(|| {
            request
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("fake-model")
                .to_owned()
        })
    }
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method.
    pub method: String,
    /// Path (without the query).
    pub path: String,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON (`Null` when empty or not JSON).
    pub body: Value,
    /// The body's exact bytes.
    pub raw: Bytes,
}

impl Recorded {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How a request reached the fake: its HTTP version and the client's end of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// The path requested.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The client's address: requests with the same peer came on the same connection.
    pub peer: SocketAddr,
}

#[derive(Debug, Default)]
struct Script {
    replies: VecDeque<Reply>,
    arrivals: Vec<Arrival>,
    /// The reply when none is queued; `None` echoes.
    default_reply: Option<Reply>,
    requests: Vec<Recorded>,
    /// Requests are not recorded (a server under load would keep every body).
    not_recording: bool,
    ollama_models: Vec<String>,
}

impl Script {
    fn record(&mut self, recorded: impl FnOnce() -> Recorded) {
        if !self.not_recording {
            self.requests.push(recorded());
        }
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Shared {
    script: Arc<Mutex<Script>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Script> {
        // A poisoned lock only means a test thread panicked; the script is still usable.
        self.script.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A fake OpenAI + Anthropic + Ollama server on `127.0.0.1` and an ephemeral port. It stops
/// when dropped.
#[derive(Debug)]
pub struct FakeServer {
    addr: SocketAddr,
    shared: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    /// Starts a server on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?).await
    }

    /// Starts a server on `addr`.
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let shared = Shared::default();
        shared.lock().ollama_models = vec![
            "llama3.1:8b".into(),
            "mistral:7b".into(),
            "nomic-embed-text:latest".into(),
        ];
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        // Frames go out as they are produced, as a real API's do: without TCP_NODELAY a
        // stream's small writes wait for the peer's delayed ACK (40 ms on Linux).
        let listener = listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
        // Built once, not per connection (served as a `Router`, axum rebuilds its routes for
        // every connection).
        let app = router(shared.clone())
            .with_state(())
            .into_make_service_with_connect_info::<SocketAddr>();
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "fake server stopped");
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues a reply for the next chat or embeddings request.
    pub fn push(&self, reply: Reply) {
        self.shared.lock().replies.push_back(reply);
    }

    /// Queues several replies, in order.
    pub fn push_all(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.lock().replies.extend(replies);
    }

    /// The reply every chat or embeddings request gets when no reply is queued (instead of
    /// the echo), for example a tool call or a stream in many delayed chunks.
    pub fn set_default_reply(&self, reply: Reply) {
        self.shared.lock().default_reply = Some(reply);
    }

    /// Back to echoing when no reply is queued.
    pub fn clear_default_reply(&self) {
        self.shared.lock().default_reply = None;
    }

    /// Whether requests are recorded (on by default). A server that answers many requests
    /// turns it off, since every recorded request keeps its body.
    pub fn set_recording(&self, on: bool) {
        let mut script = self.shared.lock();
        script.not_recording = !on;
        if !on {
            script.requests = Vec::new();
            script.arrivals = Vec::new();
        }
    }

    /// How every request received so far arrived, in order (recorded while recording is on).
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.shared.lock().arrivals.clone()
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// The requests received on `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// The models Ollama's `/api/tags` lists.
    pub fn set_ollama_models(&self, models: Vec<String>) {
        self.shared.lock().ollama_models = models;
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn router(shared: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/v1/messages", post(anthropic::messages))
        .route("/api/chat", post(ollama::chat))
        .route("/api/embed", post(ollama::embed))
        .route("/api/tags", get(ollama::tags))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            note_arrival,
        ))
        .with_state(shared)
}

/// Records how a request arrived, before its handler runs.
async fn note_arrival(
    axum::extract::State(shared): axum::extract::State<Shared>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    {
        let mut script = shared.lock();
        if !script.not_recording {
            let arrival = Arrival {
                path: request.uri().path().to_owned(),
                version: format!("{:?}", request.version()),
                peer,
            };
            script.arrivals.push(arrival);
        }
    }
    next.run(request).await
}

/// What a handler gets: the recorded request and the reply to give.
pub(crate) struct Exchange {
    pub request: Value,
    pub headers: HeaderMap,
    pub reply: Reply,
}

impl Exchange {
    /// Records the request and takes the next reply (the default reply when none is queued).
    pub(crate) fn take(
        shared: &Shared,
        method: Method,
        uri: &Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Self {
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let mut script = shared.lock();
        script.record(|| Recorded {
            method: method.to_string(),
            path: uri.path().to_owned(),
            headers: recorded_headers(&headers),
            body: request.clone(),
            raw: body,
        });
        let reply = match script.replies.pop_front() {
            Some(reply) => reply,
            None => script.default_reply.clone().unwrap_or_else(Reply::echo),
        };
        Self {
            request,
            headers,
            reply,
        }
    }

    /// Records a request that consumes no reply (model listings).
    pub(crate) fn record_only(shared: &Shared, method: Method, uri: &Uri, headers: &HeaderMap) {
        shared.lock().record(|| Recorded {
            method: method.to_string(),
            path: uri.path().to_owned(),
            headers: recorded_headers(headers),
            body: Value::Null,
            raw: Bytes::new(),
        });
    }
}

/// Header names lowercased, values as text.
fn recorded_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// How a dialect module answers.
pub(crate) enum Rendered {
    /// A JSON answer.
    Json { status: u16, body: Value },
    /// A stream of complete frames (SSE events or NDJSON lines), sent with the reply's
    /// delay and cut after `drop_after` frames.
    Stream {
        content_type: &'static str,
        frames: Vec<Bytes>,
    },
    /// Exactly these bytes.
    Raw {
        status: u16,
        content_type: String,
        body: Bytes,
    },
}

impl Rendered {
    /// Exactly this status, content type and body ([`ReplyKind::Raw`]).
    pub(crate) fn raw(status: u16, content_type: &str, body: &str) -> Self {
        Self::Raw {
            status,
            content_type: content_type.to_owned(),
            body: Bytes::from(body.to_owned()),
        }
    }
}

/// Turns a dialect's rendering into the HTTP response, applying hang, delays, drops and
/// extra headers from the reply.
pub(crate) async fn respond(reply: &Reply, rendered: Rendered) -> Response {
    if reply.kind == ReplyKind::Hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let mut response = match rendered {
        Rendered::Json { status, body } => (status_code(status), axum::Json(body)).into_response(),
        Rendered::Raw {
            status,
            content_type,
            body,
        } => (
            status_code(status),
            [(axum::http::header::CONTENT_TYPE, content_type)],
            body,
        )
            .into_response(),
        Rendered::Stream {
            content_type,
            frames,
        } => {
            let delay = reply.chunk_delay;
            let drop_after = reply.drop_after;
            let body = futures::stream::unfold(
                (frames.into_iter(), 0usize, false),
                move |(mut frames, sent, done)| async move {
                    if done {
                        return None;
                    }
                    if drop_after.is_some_and(|n| sent >= n) {
                        // Without a pause hyper may abort before flushing the head and the
                        // frames already "sent", and the client would see no stream at all.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let cut = std::io::Error::other("connection dropped by the script");
                        return Some((Err(cut), (frames, sent, true)));
                    }
                    let frame = frames.next()?;
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Some((
                        Ok::<Bytes, std::io::Error>(frame),
                        (frames, sent + 1, false),
                    ))
                },
            );
            let mut response = Response::new(Body::from_stream(body));
            response.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static(content_type),
            );
            response.headers_mut().insert(
                "cache-control",
                axum::http::HeaderValue::from_static("no-cache"),
            );
            response
        }
    };
    for (name, value) in &reply.headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            axum::http::HeaderValue::from_str(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// About four characters per token, at least one for non-empty text.
pub fn estimate_tokens(text: &str) -> u64 {
    let chars = text.chars().count() as u64;
    chars.div_ceil(4)
}

/// Splits `text` into `n` pieces on character boundaries (fewer when the text is shorter);
/// concatenating them gives `text` back.
pub fn split_text(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return Vec::new();
    }
    let n = n.clamp(1, chars.len());
    let size = chars.len().div_ceil(n);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// A deterministic unit-length vector for `text` (the same text always gets the same
/// vector), of `dimensions` components.
pub fn fake_embedding(text: &str, dimensions: usize) -> Vec<f32> {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        state ^= u64::from(byte);
        state = state.wrapping_mul(0x0100_0000_01b3);
    }
    let mut values: Vec<f32> = (0..dimensions.max(1))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    if norm > 0.0 {
        values.iter_mut().for_each(|v| *v /= norm);
    }
    values
}

/// The default answer: an echo of the last user message.
pub(crate) fn echo(last_user_text: &str) -> String {
    if last_user_text.is_empty() {
        "Hello from the fake server.".to_owned()
    } else {
        format!("You said: {last_user_text}")
    }
}

/// A random id with a prefix, like the real APIs give.
pub(crate) fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{prefix}{:016x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// One SSE frame: optional `event:` line and a `data:` line.
pub(crate) fn sse_frame(event: Option<&str>, data: &Value) -> Bytes {
    let mut frame = String::new();
    if let Some(event) = event {
        frame.push_str("event: ");
        frame.push_str(event);
        frame.push('\n');
    }
    frame.push_str("data: ");
    frame.push_str(&data.to_string());
    frame.push_str("\n\n");
    Bytes::from(frame)
}

/// One NDJSON line.
pub(crate) fn ndjson_frame(data: &Value) -> Bytes {
    let mut line = data.to_string();
    line.push('\n');
    Bytes::from(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_text_round_trips() {
        for (text, n) in [("hello world", 3), ("héllo", 10), ("", 3), ("a", 1)] {
            assert_eq!(split_text(text, n).concat(), text);
        }
        assert_eq!(split_text("abcdef", 3), vec!["ab", "cd", "ef"]);
    }

    /// One `POST` over a fresh connection; the raw response (head and body).
    async fn post(addr: SocketAddr, path: &str, body: &str) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer fake\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    const CHAT: &str =
        r#"{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ping"}]}"#;

    #[tokio::test]
    async fn the_default_reply_serves_every_request_once_the_queue_is_empty() {
        let server = FakeServer::start().await.unwrap();
        let chat = || post(server.addr(), "/v1/chat/completions", CHAT);
        assert!(chat().await.unwrap().contains("You said: ping"));

        server.set_default_reply(Reply::text("pong"));
        server.push(Reply::text("queued"));
        assert!(chat().await.unwrap().contains("\"queued\""));
        for _ in 0..2 {
            assert!(chat().await.unwrap().contains("\"pong\""));
        }

        server.set_default_reply(Reply::tool_calls(vec![FakeToolCall::new(
            "call_1",
            "get_weather",
            serde_json::json!({"city": "Paris"}),
        )]));
        let answer = chat().await.unwrap();
        assert!(answer.contains("\"tool_calls\"") && answer.contains("get_weather"));

        server.clear_default_reply();
        assert!(chat().await.unwrap().contains("You said: ping"));
        assert_eq!(server.requests_to("/v1/chat/completions").len(), 6);
    }

    #[tokio::test]
    async fn a_server_can_stop_recording() {
        let server = FakeServer::start().await.unwrap();
        post(server.addr(), "/v1/chat/completions", CHAT)
            .await
            .unwrap();
        server.set_recording(false);
        assert!(server.requests().is_empty());
        let answer = post(server.addr(), "/v1/chat/completions", CHAT)
            .await
            .unwrap();
        assert!(answer.contains("You said: ping"));
        assert!(server.requests().is_empty());
        server.set_recording(true);
        post(
            server.addr(),
            "/v1/embeddings",
            r#"{"model": "m", "input": "x"}"#,
        )
        .await
        .unwrap();
        assert_eq!(server.requests().len(), 1);
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = fake_embedding("hello", 8);
        assert_eq!(a, fake_embedding("hello", 8));
        assert_ne!(a, fake_embedding("world", 8));
        let norm: f32 = a.iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}
