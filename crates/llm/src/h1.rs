//! HTTP/1.1 to plain `http://` upstreams (local models, OpenAI-compatible servers, anything
//! reached without TLS), on connections driven by the requests that use them.
//!
//! hyper's pooled client runs each connection in a task of its own: a request is passed to
//! that task through a channel, its answer's head comes back through another, and every
//! chunk of a streamed answer crosses from the connection's task to the reader's through a
//! channel holding one chunk, with a task wake-up each way per chunk. Here the connection
//! (hyper's `client::conn::http1`) is polled by whoever waits on it: the request's future
//! while the head is awaited, then the answer's body as it is read. A chunk is read from the
//! socket, decoded and handed over in the reader's own poll, and the gateway's relay, polled
//! by the client's connection, drives the upstream connection itself: one task per stream.
//!
//! A connection goes back to its upstream's [`Pool`] once its answer has been read to the
//! end and it is ready for the next request; an answer dropped half-read closes it, as
//! HTTP/1.1 has no other way to abandon a response. Idle connections are kept up to
//! [`MAX_IDLE`] per upstream, and the ones unused for [`IDLE_TIMEOUT`] are closed as the pool
//! is next used. A pooled connection found closed is skipped, and a request that a reused
//! connection failed to take (closed before any of it was written) is sent on another
//! connection; one that may have reached the upstream is not sent again, since chat requests
//! are not idempotent.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::http::{SendError, Uri, header};

/// A connection unused this long is closed (as hyper's pool does with idle connections).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept per upstream: enough for a busy upstream, without keeping
/// thousands of sockets (and their buffers) after a burst of long streams.
const MAX_IDLE: usize = 1024;
/// Connections a request tries when reused ones turn out closed before taking it.
const MAX_ATTEMPTS: usize = 3;

type Driver = http1::Connection<TokioIo<tokio::net::TcpStream>, Full<Bytes>>;

/// One HTTP/1.1 connection: the handle requests are sent with and the state machine that
/// reads and writes the socket, polled by whoever uses the connection.
struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    driver: Driver,
    wakes: Absorber,
}

impl Conn {
    /// Drives the connection; `false` once it has closed (or failed) and must be dropped.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> bool {
        let driver = &mut self.driver;
        self.wakes.poll(cx, |cx| drive(driver, cx).map(|()| false)) != Poll::Ready(false)
    }
}

/// Polls a connection's state machine: ready once it has closed or failed.
fn drive(driver: &mut Driver, cx: &mut Context<'_>) -> Poll<()> {
    Pin::new(driver).poll(cx).map(|closed| {
        if let Err(error) = closed {
            tracing::debug!(%error, "upstream HTTP/1.1 connection failed");
        }
    })
}

/// The waker a connection and its answer's body are polled with. The two wake each other
/// within one poll (the body asking for the next chunk, the connection handing one over);
/// woken by the task polling them, tokio would schedule that task again and notify an idle
/// worker to share the work. A wake during a poll is absorbed instead, and the poll goes
/// round once more; a wake while nobody polls (the socket is readable) reaches the task.
struct Absorber {
    wakes: Arc<Wakes>,
    waker: Waker,
}

struct Wakes {
    state: AtomicU8,
    task: AtomicWaker,
}

/// [`Wakes::state`]: being polled; woken since the poll began.
const POLLING: u8 = 1;
const WOKEN: u8 = 2;
/// Rounds of a poll woken from within before the task is woken instead.
const MAX_ROUNDS: usize = 16;

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.state.fetch_or(WOKEN, Ordering::AcqRel) & POLLING == 0 {
            self.task.wake();
        }
    }
}

impl Absorber {
    fn new() -> Self {
        let wakes = Arc::new(Wakes {
            state: AtomicU8::new(0),
            task: AtomicWaker::new(),
        });
        Self {
            waker: Waker::from(wakes.clone()),
            wakes,
        }
    }

    /// Polls `f` on behalf of the task of `cx`, going round again while `f` wakes itself.
    fn poll<R>(
        &self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&mut Context<'_>) -> Poll<R>,
    ) -> Poll<R> {
        self.wakes.task.register(cx.waker());
        let mut inner = Context::from_waker(&self.waker);
        let state = &self.wakes.state;
        for _ in 0..MAX_ROUNDS {
            state.store(POLLING, Ordering::Release);
            if let Poll::Ready(ready) = f(&mut inner) {
                state.store(0, Ordering::Release);
                return Poll::Ready(ready);
            }
            if state
                .compare_exchange(POLLING, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Poll::Pending;
            }
        }
        state.store(0, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// The idle connections to one upstream origin.
pub(crate) struct Pool {
    idle: Mutex<Vec<Idle>>,
    /// The `Host` header of the origin's requests, made by the first of them.
    host: OnceLock<Option<header::HeaderValue>>,
    /// How long a connection may wait for its next request.
    idle_timeout: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Self::with_idle_timeout(IDLE_TIMEOUT)
    }
}

impl Pool {
    fn with_idle_timeout(idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::default(),
            host: OnceLock::new(),
            idle_timeout,
        }
    }

    /// The most recently used idle connection still open, if any.
    fn checkout(&self, cx: &mut Context<'_>) -> Option<Box<Conn>> {
        loop {
            let Idle { mut conn, since } = self.idle.lock().ok()?.pop()?;
            // A connection the upstream closed shows it when polled (end of file); one
            // polled here is registered with this task until the request is written.
            if since.elapsed() < self.idle_timeout && conn.poll_open(cx) && conn.sender.is_ready() {
                tracing::trace!("reusing an idle upstream HTTP/1.1 connection");
                return Some(conn);
            }
            tracing::trace!("an idle upstream HTTP/1.1 connection was closed or stale");
        }
    }

    /// Keeps `conn` for the next request; connections idle too long are closed meanwhile.
    fn put_back(&self, conn: Box<Conn>) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let stale = idle
            .iter()
            .take_while(|entry| entry.since.elapsed() >= self.idle_timeout)
            .count();
        // Dropped after the lock is released: closing a socket is a system call.
        let closed: Vec<Idle> = idle.drain(..stale).collect();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
            drop(idle);
        } else {
            drop(idle);
            drop(conn);
        }
        drop(closed);
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().map_or(0, |idle| idle.len())
    }
}

/// Opens a TCP connection to `uri`'s authority and performs hyper's (local) HTTP/1.1 set-up.
///
/// Boxed: hyper's connection state is several hundred bytes, and a connection moves from
/// the pool to the request, to its answer's body and back on every request.
async fn connect(uri: &Uri) -> Result<Box<Conn>, SendError> {
    tracing::debug!(%uri, "opening an upstream HTTP/1.1 connection");
    let tcp = crate::http::connect_tcp(uri, CONNECT_TIMEOUT).await?;
    let (sender, driver) = http1::Builder::new()
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|error| {
            SendError::connect(format!(
                "error sending request to {uri}: HTTP/1.1 set-up: {error}"
            ))
        })?;
    Ok(Box::new(Conn {
        sender,
        driver,
        wakes: Absorber::new(),
    }))
}

/// Sends `request` (whose URI is absolute) to `pool`'s upstream and waits for the head of
/// its answer, driving the connection meanwhile.
pub(crate) fn send(
    pool: Arc<Pool>,
    request: ::http::Request<Full<Bytes>>,
) -> impl Future<Output = Result<::http::Response<H1Body>, SendError>> + Send + 'static {
    let (mut parts, body) = request.into_parts();
    let uri = parts.uri.clone();
    // A pool serves one origin (`scheme://authority`), so the header is made once.
    let host = pool.host.get_or_init(|| {
        uri.authority()
            .and_then(|authority| header::HeaderValue::from_str(authority.as_str()).ok())
    });
    if let Some(host) = host
        && !parts.headers.contains_key(header::HOST)
    {
        parts.headers.insert(header::HOST, host.clone());
    }
    // HTTP/1.1 requests to an origin server name only the path (RFC 9112 §3.2.1).
    parts.uri = uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |path| Uri::from(path.clone()));
    let mut request = ::http::Request::from_parts(parts, body);
    async move {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (mut conn, reused) =
                match std::future::poll_fn(|cx| Poll::Ready(pool.checkout(cx))).await {
                    Some(conn) => (conn, true),
                    None => (connect(&uri).await?, false),
                };
            let mut answer = std::pin::pin!(conn.sender.try_send_request(request));
            let mut open = true;
            let result = std::future::poll_fn(|cx| {
                let Conn { driver, wakes, .. } = &mut *conn;
                wakes.poll(cx, |cx| {
                    if open && drive(driver, cx).is_ready() {
                        open = false;
                    }
                    answer.as_mut().poll(cx)
                })
            })
            .await;
            match result {
                Ok(response) => {
                    let (parts, incoming) = response.into_parts();
                    let body = H1Body {
                        incoming,
                        conn: open.then_some(conn),
                        pool,
                    };
                    return Ok(::http::Response::from_parts(parts, body));
                }
                Err(mut failed) => {
                    // Not written at all: the connection closed under it. Another can take it.
                    if let Some(message) = failed.take_message()
                        && reused
                        && attempts < MAX_ATTEMPTS
                    {
                        tracing::debug!(error = %failed.error(), "pooled upstream connection was closed; sending on another");
                        request = message;
                        continue;
                    }
                    let error = failed.into_error();
                    return Err(SendError::from_hyper(&uri, &error));
                }
            }
        }
    }
}

/// The body of an answer over HTTP/1.1. Reading it drives its connection, which goes back
/// to the pool once the body has been read to its end.
pub(crate) struct H1Body {
    incoming: Incoming,
    /// The connection, while the body is being read.
    conn: Option<Box<Conn>>,
    pool: Arc<Pool>,
}

impl H1Body {
    /// The connection is done with this answer: pooled if ready for another request.
    fn release(&mut self, cx: &mut Context<'_>) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if conn.sender.is_ready() || (conn.poll_open(cx) && conn.sender.is_ready()) {
            self.pool.put_back(conn);
        }
    }
}

/// Left unread when an answer is dropped and the rest of it has arrived already: read and
/// discarded so that the connection can serve another request. More closes it.
const DRAIN_BYTES: usize = 64 * 1024;

impl Drop for H1Body {
    /// A reader that stops at the end of what it wanted (a stream's last event) often leaves
    /// only the body's terminator, which has usually arrived with it: that is read here,
    /// without waiting, so the connection goes back to the pool instead of being closed.
    fn drop(&mut self) {
        if self.conn.is_none() {
            return;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut drained = 0;
        loop {
            match Pin::new(&mut *self).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    drained += frame.data_ref().map_or(0, Bytes::len);
                    if drained > DRAIN_BYTES {
                        return;
                    }
                }
                // Released at the end; dropped on an error or when more is to come.
                Poll::Ready(_) | Poll::Pending => return,
            }
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let incoming = &mut this.incoming;
        let Some(Conn { driver, wakes, .. }) = this.conn.as_deref_mut() else {
            return Pin::new(incoming).poll_frame(cx);
        };
        let mut open = true;
        let polled = wakes.poll(cx, |cx| {
            // Asked for first: the connection hands the body a chunk once it is wanted.
            let polled = Pin::new(&mut *incoming).poll_frame(cx);
            if polled.is_ready() || !open {
                return polled;
            }
            if drive(driver, cx).is_ready() {
                open = false;
            }
            Pin::new(&mut *incoming).poll_frame(cx)
        });
        if !open {
            this.conn = None;
        }
        match &polled {
            Poll::Ready(None) => this.release(cx),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use meta_chat_testkit::{FakeServer, Reply};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::http::Method;
    use crate::http::test_support::{
        CHAT, assert_one_connection_carried, json_headers, read_whole,
    };

    const STREAM: &str =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

    fn request(addr: SocketAddr, body: &'static str) -> ::http::Request<Full<Bytes>> {
        let mut request = ::http::Request::new(Full::new(Bytes::from_static(body.as_bytes())));
        *request.method_mut() = Method::POST;
        *request.uri_mut() =
            Uri::try_from(format!("http://{addr}/v1/chat/completions?x=1")).expect("a URI");
        *request.headers_mut() = json_headers();
        request
    }

    async fn post(pool: &Arc<Pool>, addr: SocketAddr) -> Result<(u16, Bytes), SendError> {
        read_whole(send(pool.clone(), request(addr, CHAT)).await?).await
    }

    /// A fake that answers a stream with `reply`, a pool, and the body of that stream.
    async fn streamed(reply: Reply) -> (FakeServer, Arc<Pool>, H1Body) {
        let fake = FakeServer::start().await.expect("fake");
        fake.push(reply);
        let pool = Arc::new(Pool::default());
        let answer = send(pool.clone(), request(fake.addr(), STREAM))
            .await
            .expect("the head");
        assert_eq!(answer.status(), 200);
        (fake, pool, answer.into_body())
    }

    #[tokio::test]
    async fn requests_in_turn_share_one_connection_and_arrive_whole() {
        let fake = FakeServer::start().await.expect("fake");
        let pool = Arc::new(Pool::default());
        for _ in 0..3 {
            let (status, body) = post(&pool, fake.addr()).await.expect("an answer");
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let answer: serde_json::Value = serde_json::from_slice(&body).expect("JSON answer");
            assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
            assert_eq!(pool.idle_count(), 1, "the connection is back in the pool");
        }
        let recorded = assert_one_connection_carried(&fake, "HTTP/1.1", 3);
        let host = fake.addr().to_string();
        assert_eq!(recorded[0].header("host"), Some(host.as_str()));
    }

    #[tokio::test]
    async fn concurrent_requests_take_a_connection_each_and_all_are_kept() {
        let fake = FakeServer::start().await.expect("fake");
        let pool = Arc::new(Pool::default());
        for _ in 0..2 {
            let answers = futures::future::join_all((0..4).map(|_| post(&pool, fake.addr()))).await;
            for answer in answers {
                assert_eq!(answer.expect("an answer").0, 200);
            }
        }
        assert_eq!(pool.idle_count(), 4);
        let arrivals = fake.arrivals();
        let first: std::collections::BTreeSet<_> = arrivals[..4].iter().map(|a| a.peer).collect();
        let second: std::collections::BTreeSet<_> = arrivals[4..].iter().map(|a| a.peer).collect();
        assert_eq!(first.len(), 4, "{arrivals:?}");
        assert_eq!(
            first, second,
            "the second round reuses the first's connections"
        );
    }

    #[tokio::test]
    async fn a_streamed_answer_arrives_chunk_by_chunk_and_leaves_its_connection_pooled() {
        let (fake, pool, mut body) = streamed(
            Reply::text("one two three four five")
                .in_chunks(5)
                .with_chunk_delay(Duration::from_millis(30)),
        )
        .await;
        let mut frames = 0;
        let mut text = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("a frame");
            if let Some(data) = frame.data_ref() {
                frames += 1;
                text.extend_from_slice(data);
            }
            if frames == 1 {
                assert_eq!(pool.idle_count(), 0, "in use while the answer is read");
            }
        }
        let text = String::from_utf8(text).expect("UTF-8");
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        // The pieces were 30 ms apart: each came as it was sent, not all at the end.
        assert!(frames >= 5, "{frames} frames: {text}");
        assert_eq!(pool.idle_count(), 1);
        post(&pool, fake.addr()).await.expect("the next answer");
        let arrivals = fake.arrivals();
        assert_eq!(arrivals[0].peer, arrivals[1].peer, "{arrivals:?}");
    }

    #[tokio::test]
    async fn a_stream_read_to_its_last_event_and_dropped_leaves_its_connection_pooled() {
        let (fake, pool, mut body) = streamed(Reply::text("one two three").in_chunks(3)).await;
        let mut text = String::new();
        while !text.contains("data: [DONE]") {
            let frame = body.frame().await.expect("a frame").expect("data");
            text.push_str(std::str::from_utf8(frame.data_ref().expect("data")).expect("UTF-8"));
        }
        // The body's terminator (the empty chunk after the last event) arrives meanwhile
        // and is read when the body is dropped, without waiting.
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(body);
        assert_eq!(pool.idle_count(), 1, "{text}");
        post(&pool, fake.addr()).await.expect("the next answer");
        let arrivals = fake.arrivals();
        assert_eq!(arrivals[0].peer, arrivals[1].peer, "{arrivals:?}");
    }

    /// Counts the wakes that reach it.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn wakes_during_a_poll_go_round_again_and_later_ones_reach_the_task() {
        let task = Arc::new(Counting(AtomicUsize::new(0)));
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        let absorber = Absorber::new();
        // Woken from within twice, then ready: three rounds, and the task is not woken.
        let mut rounds = 0;
        let polled = absorber.poll(&mut cx, |inner| {
            rounds += 1;
            if rounds < 3 {
                inner.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(rounds)
            }
        });
        assert_eq!(polled, Poll::Ready(3));
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
        // Pending without a wake: one round; a wake afterwards reaches the task.
        let mut kept = None;
        let polled: Poll<()> = absorber.poll(&mut cx, |inner| {
            kept = Some(inner.waker().clone());
            Poll::Pending
        });
        assert_eq!(polled, Poll::Pending);
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
        kept.expect("a waker").wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        // Woken from within on every round: after the last round, the task is woken
        // instead, so that it polls again.
        let polled: Poll<()> = absorber.poll(&mut cx, |inner| {
            inner.waker().wake_by_ref();
            Poll::Pending
        });
        assert_eq!(polled, Poll::Pending);
        assert_eq!(task.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_answer_dropped_half_read_closes_its_connection() {
        let (fake, pool, mut body) = streamed(
            Reply::text("one two three four five six")
                .in_chunks(6)
                .with_chunk_delay(Duration::from_millis(50)),
        )
        .await;
        body.frame().await.expect("a frame").expect("data");
        drop(body);
        assert_eq!(
            pool.idle_count(),
            0,
            "a half-read answer's connection is not reused"
        );
        let (status, _) = post(&pool, fake.addr()).await.expect("an answer");
        assert_eq!(status, 200);
        let arrivals = fake.arrivals();
        assert_ne!(arrivals[0].peer, arrivals[1].peer, "{arrivals:?}");
    }

    #[tokio::test]
    async fn a_connection_idle_too_long_is_not_used_again() {
        let fake = FakeServer::start().await.expect("fake");
        let pool = Arc::new(Pool::with_idle_timeout(Duration::from_millis(200)));
        post(&pool, fake.addr()).await.expect("an answer");
        post(&pool, fake.addr()).await.expect("an answer");
        tokio::time::sleep(Duration::from_millis(400)).await;
        post(&pool, fake.addr())
            .await
            .expect("an answer on a new connection");
        assert_eq!(pool.idle_count(), 1, "the stale connection was closed");
        let arrivals = fake.arrivals();
        assert_eq!(arrivals[0].peer, arrivals[1].peer, "{arrivals:?}");
        assert_ne!(arrivals[1].peer, arrivals[2].peer, "{arrivals:?}");
    }

    #[tokio::test]
    async fn a_port_nobody_listens_on_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = listener.local_addr().expect("its address");
        drop(listener);
        let pool = Arc::new(Pool::default());
        let error = post(&pool, addr).await.expect_err("nothing listens");
        assert!(error.is_connect(), "{error}");
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
    }

    /// What a scripted HTTP/1.1 server does with the `n`th request (from 0, over all its
    /// connections).
    #[derive(Clone, Copy, Debug)]
    enum Act {
        /// `answer n`, keeping the connection open.
        Answer,
        /// Answers, then closes the connection a moment later without having said so.
        AnswerThenClose,
        /// Answers with `Connection: close`, then closes.
        AnswerConnectionClose,
        /// Closes the connection without answering.
        Close,
        /// A chunked answer's head and first chunk, then the connection closes.
        CutMidBody,
    }

    /// A plain HTTP/1.1 server on raw sockets acting out `script` request by request;
    /// returns its address, the counts of connections and requests it saw, and the heads of
    /// the requests as they were written.
    async fn scripted(
        script: fn(usize) -> Act,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (conns, seen) = (connections.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    loop {
                        // One request: its head, then as many bytes as its content-length says.
                        let head_end = loop {
                            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                                break end + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
                        let length: usize = head
                            .lines()
                            .find_map(|line| {
                                let (name, value) = line.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length")
                                    .then(|| value.trim().parse().ok())?
                            })
                            .unwrap_or(0);
                        while buffer.len() < head_end + length {
                            let mut chunk = [0u8; 4096];
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buffer.drain(..head_end + length);
                        let n = {
                            let mut heads = seen.lock().expect("heads");
                            heads.push(head);
                            heads.len() - 1
                        };
                        let body = format!("answer {n}");
                        let answer = |extra: &str| {
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{extra}\r\n{body}",
                                body.len()
                            )
                        };
                        match script(n) {
                            Act::Answer => {
                                if tcp.write_all(answer("").as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            Act::AnswerThenClose => {
                                let _ = tcp.write_all(answer("").as_bytes()).await;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                return;
                            }
                            Act::AnswerConnectionClose => {
                                let _ = tcp
                                    .write_all(answer("connection: close\r\n").as_bytes())
                                    .await;
                                return;
                            }
                            Act::Close => return,
                            Act::CutMidBody => {
                                let _ = tcp
                                    .write_all(
                                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                                          5\r\nfirst\r\n",
                                    )
                                    .await;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, connections, heads)
    }

    #[tokio::test]
    async fn the_request_names_only_its_path_and_its_host_in_a_header() {
        let (addr, _, heads) = scripted(|_| Act::Answer).await;
        let pool = Arc::new(Pool::default());
        let (status, body) = post(&pool, addr).await.expect("an answer");
        assert_eq!((status, &body[..]), (200, &b"answer 0"[..]));
        let head = heads.lock().expect("heads")[0].clone();
        assert!(
            head.starts_with("POST /v1/chat/completions?x=1 HTTP/1.1\r\n"),
            "{head}"
        );
        let head = head.to_ascii_lowercase();
        assert!(head.contains(&format!("\r\nhost: {addr}\r\n")), "{head}");
        assert!(
            head.contains("\r\nauthorization: bearer fake\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn a_pooled_connection_the_upstream_closed_is_passed_over() {
        let (addr, connections, heads) = scripted(|n| match n {
            0 => Act::AnswerThenClose,
            _ => Act::Answer,
        })
        .await;
        let pool = Arc::new(Pool::default());
        let (_, first) = post(&pool, addr).await.expect("first answer");
        assert_eq!(&first[..], b"answer 0");
        assert_eq!(pool.idle_count(), 1, "nothing said it would close");
        // The close reaches this end meanwhile.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, second) = post(&pool, addr).await.expect("second answer");
        assert_eq!(&second[..], b"answer 1");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        assert_eq!(
            heads.lock().expect("heads").len(),
            2,
            "each request sent once"
        );
    }

    #[tokio::test]
    async fn an_answer_that_closes_the_connection_leaves_nothing_pooled() {
        let (addr, connections, _) = scripted(|n| match n {
            0 => Act::AnswerConnectionClose,
            _ => Act::Answer,
        })
        .await;
        let pool = Arc::new(Pool::default());
        let (_, first) = post(&pool, addr).await.expect("first answer");
        assert_eq!(&first[..], b"answer 0");
        assert_eq!(pool.idle_count(), 0);
        let (_, second) = post(&pool, addr).await.expect("second answer");
        assert_eq!(&second[..], b"answer 1");
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_the_upstream_took_and_left_unanswered_is_not_sent_again() {
        let (addr, connections, heads) = scripted(|n| match n {
            0 => Act::Answer,
            _ => Act::Close,
        })
        .await;
        let pool = Arc::new(Pool::default());
        post(&pool, addr).await.expect("first answer");
        // On the pooled connection, written, then the upstream hangs up.
        let error = post(&pool, addr).await.expect_err("no answer");
        assert!(!error.is_connect(), "{error}");
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
        // On a fresh connection, likewise.
        let error = post(&pool, addr).await.expect_err("no answer");
        assert!(!error.is_connect(), "{error}");
        assert_eq!(
            heads.lock().expect("heads").len(),
            3,
            "each request sent once"
        );
        assert_eq!(connections.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn an_answer_cut_mid_body_is_an_error_of_the_body() {
        let (addr, _, _) = scripted(|_| Act::CutMidBody).await;
        let pool = Arc::new(Pool::default());
        let answer = send(pool.clone(), request(addr, CHAT))
            .await
            .expect("the head arrives");
        assert_eq!(answer.status(), 200);
        let mut body = answer.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.data_ref().map(|d| &d[..]), Some(&b"first"[..]));
        let error = body.frame().await.expect("an end").expect_err("cut");
        assert!(error.to_string().contains("body"), "{error}");
        assert_eq!(pool.idle_count(), 0);
    }
}
