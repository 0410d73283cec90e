//! HTTP/2 without TLS (h2c, by prior knowledge) to plain `http://` upstreams, spoken with the
//! `h2` crate directly.
//!
//! Each lane of an h2c upstream (see [`crate::http`]) keeps one connection in a [`Slot`]. A
//! request is sent on it from the task that asked for it: headers and body are queued on the
//! connection (the body waits there for flow-control credit when the window is spent), and
//! the request's own future waits for the answer's head. Nothing is spawned per request, and
//! no pool is consulted: hyper's client would spawn a task per request to wait for the head
//! (sized like its connection task, 2.6 kB) and box a pool checkout for it (2.7 kB), which
//! every one of thousands of streams would hold until its upstream answered.
//!
//! A connection is opened by the first request that finds its slot empty (the others wait
//! for that one), and forgotten when it fails, when the upstream closes it (`GOAWAY`), or
//! after [`IDLE_TIMEOUT`] without a request; it then closes once its last answer has been
//! read. A request the upstream did not process (refused, or cut off by a `GOAWAY` naming an
//! earlier last stream) is sent again once on a fresh connection; one it may have processed
//! is not, since chat requests are not idempotent.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http_body::{Body, Frame, SizeHint};

#[cfg(test)]
use crate::http::Method;
use crate::http::{SendError, Uri, header};

/// A connection unused this long is closed (as hyper's pool does with idle connections).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Flow-control windows offered to the upstream: hyper's defaults for HTTP/2 clients (2 MiB
/// per stream, 5 MiB per connection), so a large answer is not throttled by the 64 KiB of the
/// protocol's default.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// One lane's connection to an h2c upstream.
pub(crate) struct Slot {
    current: Mutex<Option<Conn>>,
    /// Held while a connection is being opened, so concurrent requests share it.
    connecting: tokio::sync::Mutex<()>,
    /// When a request last started here, in milliseconds since [`epoch`].
    last_used: AtomicU64,
    /// How long a connection may go without a request.
    idle_timeout: Duration,
    /// The last failed connection attempt: when it ended, and why.
    failure: Mutex<Option<(Instant, String)>>,
}

impl Default for Slot {
    fn default() -> Self {
        Self::with_idle_timeout(IDLE_TIMEOUT)
    }
}

#[derive(Clone)]
struct Conn {
    id: u64,
    sender: SendRequest<Bytes>,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Slot {
    fn with_idle_timeout(idle_timeout: Duration) -> Self {
        Self {
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            last_used: AtomicU64::new(now_ms()),
            idle_timeout,
            failure: Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Conn> {
        self.current.lock().ok()?.clone()
    }

    /// Forgets connection `id` if it is still the current one: the next request opens another.
    fn forget(&self, id: u64) {
        if let Ok(mut current) = self.current.lock()
            && current.as_ref().is_some_and(|conn| conn.id == id)
        {
            *current = None;
        }
    }

    fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_used.load(Ordering::Relaxed)))
    }

    /// The current connection, opened first when there is none. Requests that waited for
    /// an attempt that failed share its failure instead of each trying (and, against an
    /// upstream that does not answer, each waiting out the connect timeout) in turn.
    async fn conn(self: &Arc<Self>, uri: &Uri) -> Result<Conn, SendError> {
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let asked = Instant::now();
        let _opening = self.connecting.lock().await;
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        if let Ok(failure) = self.failure.lock()
            && let Some((at, message)) = failure.as_ref()
            && *at >= asked
        {
            return Err(SendError::connect(message.clone()));
        }
        // Boxed: connecting (the TCP connect and the HTTP/2 handshake) is rare, and inline it
        // would size the future of every request.
        let opened = Box::pin(connect(uri, Arc::downgrade(self), self.idle_timeout / 6)).await;
        match opened {
            Ok(conn) => {
                if let Ok(mut current) = self.current.lock() {
                    *current = Some(conn.clone());
                }
                Ok(conn)
            }
            Err(error) => {
                if let Ok(mut failure) = self.failure.lock() {
                    *failure = Some((Instant::now(), error.to_string()));
                }
                Err(error)
            }
        }
    }
}

/// Opens a connection to `uri`'s authority and starts driving it.
async fn connect(uri: &Uri, slot: Weak<Slot>, idle_check: Duration) -> Result<Conn, SendError> {
    let timeout = CONNECT_TIMEOUT;
    let failed = |message: String| crate::http::connect_failed(uri, &message);
    let tcp = crate::http::connect_tcp(uri, timeout).await?;
    let handshake = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, Bytes>(tcp);
    let (sender, connection) = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(error)) => return Err(failed(format!("HTTP/2 handshake: {error}"))),
        Err(_) => {
            return Err(failed(format!("no HTTP/2 handshake within {timeout:?}")));
        }
    };
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(drive(connection, slot, id, idle_check));
    Ok(Conn { id, sender })
}

/// Runs a connection until it closes; forgets it then, or once it has been idle too long
/// (it closes by itself when its last answer has been read and no handle is left).
async fn drive(
    connection: h2::client::Connection<tokio::net::TcpStream, Bytes>,
    slot: Weak<Slot>,
    id: u64,
    idle_check: Duration,
) {
    let mut connection = std::pin::pin!(connection);
    let mut check = tokio::time::interval(idle_check);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            closed = &mut connection => {
                if let Err(error) = closed {
                    tracing::debug!(%error, "upstream HTTP/2 connection closed");
                }
                break;
            }
            _ = check.tick() => {
                if let Some(slot) = slot.upgrade()
                    && slot.idle_for() >= slot.idle_timeout
                {
                    slot.forget(id);
                }
            }
        }
    }
    if let Some(slot) = slot.upgrade() {
        slot.forget(id);
    }
}

/// Sends a request (`head` and `body`) on `slot`'s connection and waits for the head of its
/// answer.
///
/// The future is written to stay small, as a stream holds it until the upstream answers:
/// the request is kept once (for a second attempt), and while the answer is awaited only
/// the stream's handles are held besides.
pub(crate) fn send(
    slot: Arc<Slot>,
    mut head: ::http::Request<()>,
    body: Bytes,
) -> impl Future<Output = Result<::http::Response<H2Body>, SendError>> + Send + 'static {
    let headers = head.headers_mut();
    // Connection-specific headers are not allowed in HTTP/2 (RFC 9113 §8.2.2).
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::HOST,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if !body.is_empty() && !headers.contains_key(header::CONTENT_LENGTH) {
        headers.insert(
            header::CONTENT_LENGTH,
            header::HeaderValue::from(body.len()),
        );
    }
    slot.last_used.store(now_ms(), Ordering::Relaxed);
    async move {
        let mut retried = false;
        loop {
            let conn = slot.conn(head.uri()).await?;
            let id = conn.id;
            let failed = match exchange(conn.sender, &head, &body).await {
                Ok(response) => {
                    let (parts, recv) = response.into_parts();
                    return Ok(::http::Response::from_parts(parts, H2Body::new(recv)));
                }
                Err(failed) => failed,
            };
            let Failed { error, unprocessed } = failed;
            // A reset stream leaves its connection usable; anything else does not.
            if !error.is_reset() || unprocessed {
                slot.forget(id);
            }
            if unprocessed && !retried {
                tracing::debug!(%error, "upstream did not take the request; sending it again");
                retried = true;
                continue;
            }
            return Err(SendError::new(format!(
                "error sending request to {}: {error}",
                head.uri()
            )));
        }
    }
}

/// A copy of a request's head, for one attempt.
fn copy(head: &::http::Request<()>) -> ::http::Request<()> {
    let mut copy = ::http::Request::new(());
    *copy.method_mut() = head.method().clone();
    *copy.uri_mut() = head.uri().clone();
    *copy.headers_mut() = head.headers().clone();
    copy
}

/// Why an exchange failed, and whether the upstream surely did not process the request.
struct Failed {
    error: h2::Error,
    unprocessed: bool,
}

/// One attempt: waits for room on the connection, sends a copy of the request, waits for the
/// answer's head. It borrows the request: an `async fn` keeps its arguments for as long as
/// it runs, and the copy sent is made and given away between two waits, so only the
/// stream's handles are held while the answer is awaited.
async fn exchange(
    sender: SendRequest<Bytes>,
    head: &::http::Request<()>,
    body: &Bytes,
) -> Result<::http::Response<h2::RecvStream>, Failed> {
    let before_sending = |error: h2::Error| Failed {
        error,
        unprocessed: true,
    };
    let (response, _stream) = {
        let mut sender = sender.ready().await.map_err(before_sending)?;
        let (response, mut stream) = sender
            .send_request(copy(head), body.is_empty())
            .map_err(before_sending)?;
        if !body.is_empty() {
            // Queued on the connection; sent as the upstream's window allows.
            stream
                .send_data(body.clone(), true)
                .map_err(before_sending)?;
        }
        (response, stream)
    };
    response.await.map_err(|error| {
        let unprocessed = error.reason() == Some(h2::Reason::REFUSED_STREAM)
            || (error.is_go_away()
                && error.is_remote()
                && error.reason() == Some(h2::Reason::NO_ERROR));
        Failed { error, unprocessed }
    })
}

/// The body of an answer over h2c: its data as it arrives (the window it used is given back
/// as it is read), then its trailers.
pub(crate) struct H2Body {
    recv: h2::RecvStream,
    data_done: bool,
}

impl H2Body {
    fn new(recv: h2::RecvStream) -> Self {
        Self {
            recv,
            data_done: false,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Errors here mean the stream is gone; the next poll reports it.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use meta_chat_testkit::FakeServer;

    use super::*;
    use crate::http::test_support::{
        CHAT, assert_one_connection_carried, json_headers, read_whole,
    };

    fn uri(addr: SocketAddr, path: &str) -> Uri {
        Uri::try_from(format!("http://{addr}{path}")).expect("a URI")
    }

    fn chat_head(addr: SocketAddr) -> ::http::Request<()> {
        let mut head = ::http::Request::new(());
        *head.method_mut() = Method::POST;
        *head.uri_mut() = uri(addr, "/v1/chat/completions");
        *head.headers_mut() = json_headers();
        head
    }

    async fn post(slot: &Arc<Slot>, addr: SocketAddr) -> Result<(u16, Bytes), SendError> {
        let answer = send(
            slot.clone(),
            chat_head(addr),
            Bytes::from_static(CHAT.as_bytes()),
        )
        .await?;
        read_whole(answer).await
    }

    #[tokio::test]
    async fn requests_share_one_connection_and_arrive_whole() {
        let fake = FakeServer::start().await.expect("fake");
        let slot = Arc::new(Slot::default());
        let (status, body) = post(&slot, fake.addr()).await.expect("first answer");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let answer: serde_json::Value = serde_json::from_slice(&body).expect("JSON answer");
        assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
        let together = futures::future::join_all((0..5).map(|_| post(&slot, fake.addr()))).await;
        for answer in together {
            assert_eq!(answer.expect("an answer").0, 200);
        }
        assert_one_connection_carried(&fake, "HTTP/2.0", 6);
    }

    #[tokio::test]
    async fn a_port_nobody_listens_on_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = listener.local_addr().expect("its address");
        drop(listener);
        let slot = Arc::new(Slot::default());
        let error = post(&slot, addr).await.expect_err("nothing listens");
        assert!(error.is_connect(), "{error}");
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
    }

    /// What a scripted HTTP/2 server does with the `n`th request (from 0, over all its
    /// connections) arriving on its `c`th connection.
    #[derive(Clone, Copy)]
    enum Act {
        Answer,
        /// `RST_STREAM` with this code before any answer.
        Reset(h2::Reason),
        /// Answers, then closes the connection gracefully (`GOAWAY`).
        AnswerThenGoAway,
        /// The head and part of the body, then `RST_STREAM(INTERNAL_ERROR)`.
        CutMidBody,
    }

    /// A plain HTTP/2 server (the `h2` crate's) acting out `script` request by request;
    /// returns its address and the counts of connections and requests it saw.
    async fn scripted(
        script: fn(usize) -> Act,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (conns, reqs) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::SeqCst);
                let reqs = reqs.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((request, mut respond))) = conn.accept().await {
                        let n = reqs.fetch_add(1, Ordering::SeqCst);
                        let mut body = request.into_body();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                        }
                        let act = script(n);
                        if let Act::Reset(reason) = act {
                            respond.send_reset(reason);
                            continue;
                        }
                        let Ok(mut out) = respond.send_response(::http::Response::new(()), false)
                        else {
                            continue;
                        };
                        if let Act::CutMidBody = act {
                            let _ = out.send_data(Bytes::from_static(b"{\"partial\":"), false);
                            // Later, while the connection goes on being served.
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                out.send_reset(h2::Reason::INTERNAL_ERROR);
                            });
                            continue;
                        }
                        let _ = out.send_data(Bytes::from(format!("answer {n}")), true);
                        if let Act::AnswerThenGoAway = act {
                            conn.graceful_shutdown();
                        }
                    }
                });
            }
        });
        (addr, connections, requests)
    }

    #[tokio::test]
    async fn a_refused_stream_is_sent_again_on_a_new_connection() {
        let (addr, connections, requests) = scripted(|n| match n {
            0 => Act::Reset(h2::Reason::REFUSED_STREAM),
            _ => Act::Answer,
        })
        .await;
        let slot = Arc::new(Slot::default());
        let (status, body) = post(&slot, addr).await.expect("answered the second time");
        assert_eq!((status, &body[..]), (200, &b"answer 1"[..]));
        assert_eq!(requests.load(Ordering::SeqCst), 2);
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_the_upstream_may_have_processed_is_not_sent_again() {
        let (addr, connections, requests) = scripted(|n| match n {
            0 => Act::Reset(h2::Reason::INTERNAL_ERROR),
            _ => Act::Answer,
        })
        .await;
        let slot = Arc::new(Slot::default());
        let error = post(&slot, addr).await.expect_err("reset");
        assert!(!error.is_connect(), "{error}");
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        // A reset stream leaves its connection in use.
        let (status, _) = post(&slot, addr).await.expect("the next answer");
        assert_eq!(status, 200);
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn after_the_upstream_closes_a_connection_the_next_request_opens_another() {
        let (addr, connections, requests) = scripted(|n| match n {
            0 => Act::AnswerThenGoAway,
            _ => Act::Answer,
        })
        .await;
        let slot = Arc::new(Slot::default());
        let (_, first) = post(&slot, addr).await.expect("first answer");
        assert_eq!(&first[..], b"answer 0");
        // Whether the GOAWAY has arrived by then or not, the next request is answered.
        let (_, second) = post(&slot, addr).await.expect("second answer");
        assert_eq!(&second[..], b"answer 1");
        assert_eq!(requests.load(Ordering::SeqCst), 2);
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_stream_cut_mid_answer_is_an_error_of_the_body() {
        let (addr, _, _) = scripted(|_| Act::CutMidBody).await;
        let slot = Arc::new(Slot::default());
        let answer = send(
            slot.clone(),
            chat_head(addr),
            Bytes::from_static(CHAT.as_bytes()),
        )
        .await
        .expect("the head arrives");
        assert_eq!(answer.status(), 200);
        let error = answer.into_body().collect().await.expect_err("cut");
        assert_eq!(error.reason(), Some(h2::Reason::INTERNAL_ERROR), "{error}");
    }

    #[tokio::test]
    async fn a_connection_idle_too_long_is_closed_and_the_next_request_opens_another() {
        let fake = FakeServer::start().await.expect("fake");
        let slot = Arc::new(Slot::with_idle_timeout(Duration::from_millis(300)));
        post(&slot, fake.addr()).await.expect("an answer");
        post(&slot, fake.addr()).await.expect("an answer");
        assert!(slot.current().is_some());
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(slot.current().is_none(), "forgotten once idle");
        post(&slot, fake.addr())
            .await
            .expect("an answer on a new connection");
        let arrivals = fake.arrivals();
        assert_eq!(arrivals.len(), 3);
        assert_eq!(arrivals[0].peer, arrivals[1].peer, "{arrivals:?}");
        assert_ne!(arrivals[1].peer, arrivals[2].peer, "{arrivals:?}");
    }

    #[tokio::test]
    async fn a_failed_connection_attempt_fails_its_waiters_and_not_later_requests() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = listener.local_addr().expect("its address");
        drop(listener);
        let slot = Arc::new(Slot::default());
        let failures = futures::future::join_all((0..5).map(|_| post(&slot, addr))).await;
        for failure in failures {
            let error = failure.expect_err("nothing listens");
            assert!(error.is_connect(), "{error}");
            assert!(error.to_string().contains(&addr.to_string()), "{error}");
        }
        // The upstream comes up: the next request connects instead of being given the old
        // failure.
        let fake = FakeServer::bind(addr).await.expect("the port again");
        let (status, _) = post(&slot, fake.addr()).await.expect("connected now");
        assert_eq!(status, 200);
    }
}
