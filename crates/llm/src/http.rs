//! The HTTP plumbing every provider shares: pooled upstream connections (hyper's client over
//! TLS; HTTP/1.1 to plain `http://` upstreams by [`crate::h1`], h2c by [`crate::h2c`]; HTTP/2
//! spread over several connections), error classification, SSE and NDJSON framing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::de::DeserializeOwned;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::io::StreamReader;

pub(crate) use ::http::header::{self, HeaderMap, HeaderName, HeaderValue};
pub(crate) use ::http::{Method, Uri};

use crate::error::{LlmError, Result};
use crate::types::ProviderKind;
use crate::{h1, h2c};

/// The longest NDJSON line accepted from an upstream.
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// Turns an upstream's error answer (status, headers, body) into an [`LlmError`].
pub(crate) type ErrorParser = fn(u16, &HeaderMap, &[u8]) -> LlmError;

/// How upstream connections use HTTP/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http2Mode {
    /// HTTP/2 where TLS negotiates it (ALPN, as OpenAI's and Anthropic's APIs do), HTTP/1.1
    /// on plain `http://` endpoints.
    Auto,
    /// As `Auto`, and HTTP/2 without negotiation (h2c) on plain `http://` endpoints of
    /// OpenAI-compatible and Anthropic upstreams, for upstreams known to speak it. Ollama
    /// stays on HTTP/1.1.
    PriorKnowledge,
    /// HTTP/1.1 only.
    Off,
}

/// Process-wide settings of the upstream connections, given once at start-up by
/// [`configure_http`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpOptions {
    /// How HTTP/2 is used.
    pub http2: Http2Mode,
    /// Concurrent requests carried by one HTTP/2 connection before another is opened to the
    /// same upstream. Servers cap streams per connection (100 is the usual minimum, RFC 9113
    /// §6.5.2): past its cap a connection would queue requests instead of sending them.
    pub streams_per_connection: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            http2: Http2Mode::Auto,
            streams_per_connection: 100,
        }
    }
}

/// Sets the upstream connection options for the process. Only the first call counts, and
/// only before the first provider is built; returns whether these options are the ones in
/// force.
pub fn configure_http(options: HttpOptions) -> bool {
    OPTIONS.get_or_init(|| options) == &options
}

static OPTIONS: OnceLock<HttpOptions> = OnceLock::new();

fn options() -> HttpOptions {
    *OPTIONS.get_or_init(HttpOptions::default)
}

/// The most connections opened to one upstream; past it requests share the least busy.
const MAX_LANES: usize = 256;

/// An upstream client: hyper's pooled client over plain TCP or rustls.
type Upstream = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The body of an upstream's answer, whichever client carried it.
type AnswerBody = UnsyncBoxBody<Bytes, BoxError>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The process's upstream clients. Each "lane" is a client with its own pool (over TLS) or
/// one h2c connection (a [`crate::h2c::Slot`]), so an HTTP/2 upstream gets one connection
/// per lane in use: a request takes the first lane whose connection to its upstream carries
/// fewer than `streams_per_connection` requests and holds it (a [`Lease`]) until its answer
/// has been read. Plain `http://` upstreams spoken to over HTTP/1.1 have a pool of their own
/// ([`crate::h1`]) of one connection per concurrent request; HTTP/1.1 over TLS uses the
/// first lane, whose pool does the same.
///
/// When the environment names a proxy (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`), every
/// request goes through reqwest instead, which implements those variables and `NO_PROXY`.
struct Lanes {
    streams_per_connection: usize,
    /// Negotiating clients (HTTP/2 over TLS where offered; HTTP/1.1 only when `Off`).
    negotiated: Family,
    /// h2c to plain `http://` upstreams other than Ollama, with `PriorKnowledge`.
    h2c: bool,
    /// Per upstream origin (`scheme://host:port`): requests in flight on each lane.
    origins: RwLock<HashMap<String, Arc<Origin>>>,
    /// The client for proxied requests, when a proxy is configured.
    proxied: Option<reqwest::Client>,
}

struct Family {
    /// Lane 0, also kept outside the lock: HTTP/1.1 requests over TLS all take it.
    first: Upstream,
    clients: RwLock<Vec<Upstream>>,
    /// The connector every lane clones: one TLS configuration (root certificates, ALPN) for
    /// all of them.
    connector: HttpsConnector<HttpConnector>,
    http1_only: bool,
}

impl Family {
    fn new(http1_only: bool) -> std::result::Result<Self, String> {
        let connector = connector(http1_only)?;
        let first = build_client(&connector);
        Ok(Self {
            clients: RwLock::new(vec![first.clone()]),
            first,
            connector,
            http1_only,
        })
    }

    /// The client of lane `lane`, built on first use.
    fn lane(&self, lane: usize) -> Option<Upstream> {
        if let Some(client) = self.clients.read().ok()?.get(lane) {
            return Some(client.clone());
        }
        let mut clients = self.clients.write().ok()?;
        while clients.len() <= lane {
            clients.push(build_client(&self.connector));
        }
        clients.get(lane).cloned()
    }
}

/// The connector of one family: TCP with `TCP_NODELAY` and a 10 s connect timeout, TLS on
/// `https://` with the platform's certificate verifier, offering HTTP/2 and HTTP/1.1 by ALPN
/// (HTTP/1.1 only when `http1_only`).
fn connector(http1_only: bool) -> std::result::Result<HttpsConnector<HttpConnector>, String> {
    use rustls_platform_verifier::ConfigVerifierExt;
    let tls = rustls::ClientConfig::with_platform_verifier()
        .map_err(|e| format!("cannot set up TLS certificate verification: {e}"))?;
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(Duration::from_secs(10)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    Ok(if http1_only {
        builder.enable_http1().wrap_connector(tcp)
    } else {
        builder.enable_http1().enable_http2().wrap_connector(tcp)
    })
}

fn build_client(connector: &HttpsConnector<HttpConnector>) -> Upstream {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        // Enough idle connections for a busy upstream, without keeping thousands of
        // sockets (and their buffers) after a burst of long streams.
        .pool_max_idle_per_host(1024)
        // Stream windows sized from the measured bandwidth-delay product: large answers
        // (embeddings) are not throttled on a distant upstream, and a slow reader does not
        // let megabytes pile up per stream.
        .http2_adaptive_window(true);
    builder.build(connector.clone())
}

/// Whether the environment names a proxy for upstream requests.
fn proxy_configured() -> bool {
    [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

/// The client for proxied requests: reqwest, which reads the proxy variables.
fn proxied_client(http1_only: bool) -> std::result::Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .http2_adaptive_window(true);
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().map_err(|e| e.to_string())
}

struct Origin {
    /// Idle HTTP/1.1 connections, for a plain `http://` upstream spoken to over HTTP/1.1.
    h1: Arc<h1::Pool>,
    in_flight: Box<[AtomicUsize]>,
    /// Each lane's connection, for an h2c upstream.
    h2c: Box<[OnceLock<Arc<h2c::Slot>>]>,
}

/// Where a request goes. Made and taken apart at once, never stored: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Route {
    /// hyper's pooled client: HTTP/1.1, or HTTP/2 where TLS negotiates it.
    Client(Upstream, Option<Lease>),
    /// A lane's h2c connection.
    H2c(Arc<h2c::Slot>, Lease),
    /// HTTP/1.1 to a plain `http://` upstream, on a connection its requests drive.
    H1(Arc<h1::Pool>),
}

/// A request's place on a lane, given back when its answer has been read or dropped.
pub(crate) struct Lease {
    origin: Arc<Origin>,
    lane: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(count) = self.origin.in_flight.get(self.lane) {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Lanes {
    fn get() -> std::result::Result<&'static Lanes, String> {
        static LANES: OnceLock<std::result::Result<Lanes, String>> = OnceLock::new();
        LANES
            .get_or_init(|| {
                install_crypto_provider();
                let options = options();
                let http1_only = options.http2 == Http2Mode::Off;
                let proxied = if proxy_configured() {
                    tracing::info!("upstream requests go through the configured proxy");
                    Some(proxied_client(http1_only)?)
                } else {
                    None
                };
                Ok(Lanes {
                    streams_per_connection: options.streams_per_connection.max(1),
                    negotiated: Family::new(http1_only)?,
                    h2c: options.http2 == Http2Mode::PriorKnowledge,
                    origins: RwLock::default(),
                    proxied,
                })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Where to send `uri` (parsed from `url`), and the lease it holds. HTTP/1.1 takes its
    /// origin's pool (plain `http://`) or the first lane (over TLS), without a lease.
    fn pick(&self, provider: ProviderKind, url: &str, uri: &Uri) -> Route {
        let plain = || Route::Client(self.negotiated.first.clone(), None);
        let (h2c, h1) = match uri.scheme_str() {
            Some("http") if self.h2c && provider != ProviderKind::Ollama => (true, false),
            Some("http") => (false, true),
            Some("https") if !self.negotiated.http1_only => (false, false),
            _ => return plain(),
        };
        // `scheme://authority`, as written in the URL the URI was parsed from.
        let origin_len = uri.scheme_str().map_or(0, |s| s.len() + 3)
            + uri.authority().map_or(0, |a| a.as_str().len());
        let Some(origin) = url.get(..origin_len).and_then(|key| self.origin(key)) else {
            return plain();
        };
        if h1 {
            return Route::H1(origin.h1.clone());
        }
        let cap = self.streams_per_connection;
        let mut chosen = None;
        for (lane, count) in origin.in_flight.iter().enumerate() {
            if count.load(Ordering::Relaxed) < cap {
                if count.fetch_add(1, Ordering::Relaxed) < cap {
                    chosen = Some(lane);
                    break;
                }
                count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        // Every lane is at its cap: share the least busy one.
        let lane = chosen.unwrap_or_else(|| {
            let lane = origin
                .in_flight
                .iter()
                .enumerate()
                .min_by_key(|(_, count)| count.load(Ordering::Relaxed))
                .map_or(0, |(lane, _)| lane);
            if let Some(count) = origin.in_flight.get(lane) {
                count.fetch_add(1, Ordering::Relaxed);
            }
            lane
        });
        if h2c {
            let slot = origin
                .h2c
                .get(lane)
                .map(|slot| slot.get_or_init(Arc::default).clone())
                .unwrap_or_default();
            return Route::H2c(slot, Lease { origin, lane });
        }
        let client = self
            .negotiated
            .lane(lane)
            .unwrap_or_else(|| self.negotiated.first.clone());
        Route::Client(client, Some(Lease { origin, lane }))
    }

    fn origin(&self, key: &str) -> Option<Arc<Origin>> {
        /// Distinct upstreams tracked; past it the map starts over (base URLs come from
        /// settings). Leases of forgotten origins still count down their own counters.
        const MAX_ORIGINS: usize = 1024;
        if let Some(origin) = self.origins.read().ok()?.get(key) {
            return Some(origin.clone());
        }
        let mut origins = self.origins.write().ok()?;
        if origins.len() >= MAX_ORIGINS && !origins.contains_key(key) {
            origins.clear();
        }
        Some(
            origins
                .entry(key.to_owned())
                .or_insert_with(|| {
                    Arc::new(Origin {
                        h1: Arc::default(),
                        in_flight: (0..MAX_LANES).map(|_| AtomicUsize::new(0)).collect(),
                        h2c: (0..MAX_LANES).map(|_| OnceLock::new()).collect(),
                    })
                })
                .clone(),
        )
    }
}

/// Checks that the upstream clients can be built (TLS set-up included), for providers to
/// report a broken installation when they are built rather than on their first request.
pub(crate) fn ready(provider: ProviderKind) -> Result<()> {
    Lanes::get()
        .map(|_| ())
        .map_err(|message| LlmError::Configuration {
            provider,
            message: format!("could not build the HTTP client: {message}"),
        })
}

/// A request to an upstream, built by a provider and sent by [`dispatch`] or [`send`].
#[derive(Debug)]
pub(crate) struct Outgoing {
    method: Method,
    url: String,
    headers: HeaderMap,
    body: Bytes,
    /// A header whose value could not be set, reported when the request is sent.
    invalid: Option<HeaderName>,
}

impl Outgoing {
    /// A request to `url` (an upstream endpoint).
    pub(crate) fn new(method: Method, url: String) -> Self {
        Self {
            method,
            url,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            invalid: None,
        }
    }

    /// Sets a header. A value that cannot be a header value makes the request fail when it
    /// is sent, naming the header.
    pub(crate) fn header(mut self, name: impl Into<HeaderName>, value: &str) -> Self {
        let name = name.into();
        match HeaderValue::from_str(value) {
            Ok(value) => {
                self.headers.insert(name, value);
            }
            Err(_) => {
                self.invalid.get_or_insert(name);
            }
        }
        self
    }

    /// `Authorization: Bearer <token>`, marked sensitive.
    pub(crate) fn bearer_auth(mut self, token: &str) -> Self {
        let mut value = Vec::with_capacity(7 + token.len());
        value.extend_from_slice(b"Bearer ");
        value.extend_from_slice(token.as_bytes());
        match HeaderValue::from_bytes(&value) {
            Ok(mut value) => {
                value.set_sensitive(true);
                self.headers.insert(header::AUTHORIZATION, value);
            }
            Err(_) => {
                self.invalid.get_or_insert(header::AUTHORIZATION);
            }
        }
        self
    }

    /// The request body.
    pub(crate) fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// A JSON request body, with its content type.
    pub(crate) fn json(self, body: impl Into<Bytes>) -> Self {
        self.header(header::CONTENT_TYPE, "application/json")
            .body(body)
    }

    /// For a streamed answer (`stream`), asks for server-sent events.
    pub(crate) fn events_if(self, stream: bool) -> Self {
        if stream {
            self.header(header::ACCEPT, "text/event-stream")
        } else {
            self
        }
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub(crate) struct SendError {
    message: String,
    connect: bool,
}

impl SendError {
    /// The connection could not be made (refused, unreachable, TLS handshake failed, timed
    /// out connecting).
    pub(crate) fn is_connect(&self) -> bool {
        self.connect
    }

    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            connect: false,
        }
    }

    /// The connection could not be made.
    pub(crate) fn connect(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            connect: true,
        }
    }

    /// A request on an open HTTP/1.1 connection that got no answer.
    pub(crate) fn from_hyper(uri: &Uri, error: &hyper::Error) -> Self {
        Self::from_error(&uri.to_string(), error, false)
    }

    fn from_error(url: &str, error: &(dyn std::error::Error + 'static), connect: bool) -> Self {
        Self {
            message: format!("error sending request to {url}: {}", describe(error)),
            connect,
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// An error and its causes, `: `-separated.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// An upstream's answer and the lane it holds until the answer has been read.
pub(crate) struct Answer {
    status: ::http::StatusCode,
    headers: HeaderMap,
    body: AnswerBody,
    lease: Option<Lease>,
}

/// Sends a request on the lane chosen for its upstream.
///
/// Not an `async fn`: the request is taken apart and routed at once, and the future returned
/// holds only what the chosen way of sending needs (an `async fn` would keep the whole
/// request beside its moved copy while the upstream works, which a stream does until its
/// upstream answers).
pub(crate) fn dispatch(
    provider: ProviderKind,
    request: Outgoing,
) -> impl Future<Output = std::result::Result<Answer, SendError>> + Send + 'static {
    use futures::future::{Either, FutureExt, TryFutureExt, ready};
    match route(provider, request) {
        Ok(Routed::H2c {
            slot,
            lease,
            head,
            body,
        }) => Either::Left(Either::Left(h2c::send(slot, head, body).map_ok(
            move |response| {
                let (parts, body) = response.into_parts();
                Answer {
                    status: parts.status,
                    headers: parts.headers,
                    body: body.map_err(BoxError::from).boxed_unsync(),
                    lease: Some(lease),
                }
            },
        ))),
        Ok(Routed::Client {
            pending,
            lease,
            url,
        }) => Either::Left(Either::Right(pending.map(move |result| {
            let response = result.map_err(|e| SendError::from_error(&url, &e, e.is_connect()))?;
            let (parts, body) = response.into_parts();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body: body.map_err(BoxError::from).boxed_unsync(),
                lease,
            })
        }))),
        Ok(Routed::H1 { pool, request }) => {
            Either::Right(Either::Left(h1::send(pool, request).map_ok(|response| {
                let (parts, body) = response.into_parts();
                Answer {
                    status: parts.status,
                    headers: parts.headers,
                    body: body.map_err(BoxError::from).boxed_unsync(),
                    lease: None,
                }
            })))
        }
        Ok(Routed::Proxied(proxied)) => Either::Right(Either::Right(Either::Left(proxied))),
        Err(error) => Either::Right(Either::Right(Either::Right(ready(Err(error))))),
    }
}

/// A request on its way: what [`dispatch`] sends it with. Taken apart at once, never stored.
#[allow(clippy::large_enum_variant)]
enum Routed {
    /// On an h2c lane.
    H2c {
        slot: Arc<h2c::Slot>,
        lease: Lease,
        head: ::http::Request<()>,
        body: Bytes,
    },
    /// On hyper's pooled client, already handed to it.
    Client {
        pending: hyper_util::client::legacy::ResponseFuture,
        lease: Option<Lease>,
        url: String,
    },
    /// HTTP/1.1 on a connection the request drives.
    H1 {
        pool: Arc<h1::Pool>,
        request: ::http::Request<Full<Bytes>>,
    },
    /// Through the configured proxy.
    Proxied(futures::future::BoxFuture<'static, std::result::Result<Answer, SendError>>),
}

/// Checks a request and chooses how it is sent.
fn route(provider: ProviderKind, request: Outgoing) -> std::result::Result<Routed, SendError> {
    if let Some(header) = &request.invalid {
        return Err(SendError::new(format!(
            "the value of the `{header}` header cannot be sent: it holds characters HTTP \
             does not allow there"
        )));
    }
    let lanes = Lanes::get().map_err(SendError::new)?;
    if let Some(client) = &lanes.proxied {
        return Ok(Routed::Proxied(Box::pin(dispatch_proxied(client, request))));
    }
    let Outgoing {
        method,
        url,
        headers,
        body,
        ..
    } = request;
    let uri = Uri::try_from(url.as_str())
        .ok()
        .filter(|uri| matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some())
        .ok_or_else(|| {
            SendError::new(format!(
                "invalid upstream URL `{url}`: expected http:// or https:// and a host"
            ))
        })?;
    let route = lanes.pick(provider, &url, &uri);
    let mut head = ::http::Request::new(());
    *head.method_mut() = method;
    *head.uri_mut() = uri;
    *head.headers_mut() = headers;
    Ok(match route {
        Route::H2c(slot, lease) => Routed::H2c {
            slot,
            lease,
            head,
            body,
        },
        Route::H1(pool) => {
            let (parts, ()) = head.into_parts();
            Routed::H1 {
                pool,
                request: ::http::Request::from_parts(parts, Full::new(body)),
            }
        }
        Route::Client(client, lease) => {
            let (parts, ()) = head.into_parts();
            Routed::Client {
                pending: client.request(::http::Request::from_parts(parts, Full::new(body))),
                lease,
                url,
            }
        }
    })
}

async fn dispatch_proxied(
    client: &'static reqwest::Client,
    request: Outgoing,
) -> std::result::Result<Answer, SendError> {
    let response = client
        .request(request.method, request.url.as_str())
        .headers(request.headers)
        .body(request.body)
        .send()
        .await
        .map_err(|e| SendError::from_error(&request.url, &e, e.is_connect()))?;
    let response = ::http::Response::from(response);
    let (parts, body) = response.into_parts();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.map_err(BoxError::from).boxed_unsync(),
        lease: None,
    })
}

/// Opens a TCP connection to `uri`'s authority (port 80 unless it names one), with
/// `TCP_NODELAY`: requests are small writes answered at once, which Nagle's algorithm would
/// hold back.
pub(crate) async fn connect_tcp(
    uri: &Uri,
    timeout: Duration,
) -> std::result::Result<tokio::net::TcpStream, SendError> {
    let host = uri.host().unwrap_or_default();
    // `[::1]` in a URL is `::1` to the resolver.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = uri.port_u16().unwrap_or(80);
    let failed = |message: String| connect_failed(uri, &message);
    let tcp =
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(error)) => return Err(failed(error.to_string())),
            Err(_) => return Err(failed(format!("no connection within {timeout:?}"))),
        };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Installs rustls' ring crypto provider for the process, unless one is installed already.
pub fn install_crypto_provider() {
    // An error only means another provider was installed first, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Sends a request; a non-2xx answer is read and classified by `parse_error`.
pub(crate) fn send(
    provider: ProviderKind,
    request: Outgoing,
    parse_error: ErrorParser,
) -> impl Future<Output = Result<Answer>> + Send + 'static {
    use futures::TryFutureExt;
    dispatch(provider, request)
        .map_err(move |e| LlmError::connection(provider, &e))
        .and_then(move |answer| answer.checked(provider, parse_error))
}

/// [`send`] for a request that may have failed to be built: the failure is the answer.
pub(crate) fn send_built(
    provider: ProviderKind,
    request: Result<Outgoing>,
    parse_error: ErrorParser,
) -> impl Future<Output = Result<Answer>> + Send + 'static {
    use futures::future::{Either, ready};
    match request {
        Ok(request) => Either::Left(send(provider, request, parse_error)),
        Err(error) => Either::Right(ready(Err(error))),
    }
}

impl Answer {
    /// The answer itself when it is a success; otherwise its body read and classified by
    /// `parse_error`. Redirects are not followed (a request carries the provider's key, and
    /// a POST is not to be replayed elsewhere): one is reported as an answer the gateway
    /// cannot use, naming where it points, so the base URL can be corrected.
    ///
    /// A success comes back at once, without a future holding the answer a second time.
    pub(crate) fn checked(
        self,
        provider: ProviderKind,
        parse_error: ErrorParser,
    ) -> impl Future<Output = Result<Self>> + Send + 'static {
        use futures::future::{Either, ready};
        if self.status.is_success() {
            return Either::Left(ready(Ok(self)));
        }
        if self.status.is_redirection() {
            let target = self
                .headers
                .get(header::LOCATION)
                .and_then(|location| location.to_str().ok())
                .unwrap_or("nowhere given");
            return Either::Left(ready(Err(LlmError::malformed(
                provider,
                format!(
                    "the upstream answered HTTP {} redirecting to {target}; redirects are not \
                     followed: set the provider's base URL to the address it redirects to",
                    self.status.as_u16()
                ),
            ))));
        }
        let Answer {
            status,
            headers,
            body,
            lease,
        } = self;
        Either::Right(Box::pin(async move {
            let body = body
                .collect()
                .await
                .map(|collected| collected.to_bytes())
                .unwrap_or_default();
            drop(lease);
            Err(parse_error(status.as_u16(), &headers, &body))
        }))
    }
}

/// Reads a whole JSON answer.
pub(crate) async fn read_json<T: DeserializeOwned>(
    provider: ProviderKind,
    answer: Answer,
) -> Result<T> {
    let Answer { body, lease, .. } = answer;
    let body = body
        .collect()
        .await
        .map_err(|e| LlmError::Connection {
            provider,
            message: format!("error reading the answer: {}", describe(e.as_ref())),
        })?
        .to_bytes();
    drop(lease);
    parse_json(provider, &body)
}

/// JSON bytes parsed into `T`. They are checked to be UTF-8 once and read as text:
/// serde_json reading bytes checks each string it meets on its own, which for the short
/// strings of a request, an answer or a chunk costs more than one pass over all of them.
/// Bytes that are not UTF-8 are read as bytes, for serde_json's own error (with its line and
/// column).
pub fn json_from_bytes<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

/// Parses a JSON body (by [`json_from_bytes`]), describing what was wrong if it cannot be
/// parsed.
pub(crate) fn parse_json<T: DeserializeOwned>(provider: ProviderKind, body: &[u8]) -> Result<T> {
    json_from_bytes(body).map_err(|e| {
        LlmError::malformed(
            provider,
            format!("{e} in {}", String::from_utf8_lossy(truncate(body, 200))),
        )
    })
}

/// [`parse_json`] of text (an SSE event's data, an NDJSON line).
pub(crate) fn parse_json_str<T: DeserializeOwned>(provider: ProviderKind, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| {
        LlmError::malformed(
            provider,
            format!(
                "{e} in {}",
                String::from_utf8_lossy(truncate(text.as_bytes(), 200))
            ),
        )
    })
}

fn truncate(body: &[u8], max: usize) -> &[u8] {
    &body[..body.len().min(max)]
}

/// A byte stream from an upstream.
pub(crate) fn byte_stream(
    provider: ProviderKind,
    answer: Answer,
) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
    let Answer { body, lease, .. } = answer;
    // The lease lives as long as the stream, and goes when the stream ends or is dropped.
    BodyDataStream::new(body).map_err(move |e| {
        let _held = &lease;
        LlmError::Connection {
            provider,
            message: format!("error reading the stream: {}", describe(e.as_ref())),
        }
    })
}

/// One server-sent event: its type (the `event:` field, empty when absent) and its data
/// (the `data:` lines joined with newlines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Server-sent events parsed from a byte stream (framing across chunk boundaries, line
/// endings, comments and unknown fields handled by `sse-stream`). Blocks without a `data:`
/// line (an `id:` or `retry:` alone) carry nothing to decode and are skipped. A transport
/// failure comes back as the error the byte stream gave.
pub(crate) fn sse_events<S>(
    provider: ProviderKind,
    bytes: S,
) -> impl Stream<Item = Result<SseEvent>> + Send + 'static
where
    S: Stream<Item = Result<Bytes>> + Send + 'static,
{
    futures::StreamExt::filter_map(sse_stream::SseByteStream::new(bytes), move |item| {
        futures::future::ready(match item {
            Ok(sse) => sse.data.map(|data| {
                Ok(SseEvent {
                    event: sse.event.unwrap_or_default(),
                    data,
                })
            }),
            Err(sse_stream::Error::Body(error)) => Some(Err(match error.downcast::<LlmError>() {
                Ok(error) => *error,
                Err(other) => LlmError::Connection {
                    provider,
                    message: other.to_string(),
                },
            })),
            Err(sse_stream::Error::Utf8Parse(e)) => Some(Err(LlmError::malformed(
                provider,
                format!("invalid UTF-8 in an event: {e}"),
            ))),
            Err(other) => Some(Err(LlmError::malformed(
                provider,
                format!("invalid SSE: {other}"),
            ))),
        })
    })
}

/// Newline-delimited lines from a byte stream, without their line endings; blank lines are
/// skipped.
pub(crate) fn ndjson_lines<S>(
    provider: ProviderKind,
    bytes: S,
) -> impl Stream<Item = Result<String>> + Send + 'static
where
    S: Stream<Item = Result<Bytes>> + Send + 'static,
{
    let reader = StreamReader::new(bytes.map_err(std::io::Error::other));
    FramedRead::new(reader, LinesCodec::new_with_max_length(MAX_LINE_BYTES))
        .map_err(move |e| match e {
            tokio_util::codec::LinesCodecError::Io(io) => {
                let invalid_data = io.kind() == std::io::ErrorKind::InvalidData;
                match io.into_inner().map(|inner| inner.downcast::<LlmError>()) {
                    Some(Ok(llm)) => *llm,
                    _ if invalid_data => {
                        LlmError::malformed(provider, "an NDJSON line is not UTF-8")
                    }
                    Some(Err(other)) => LlmError::Connection {
                        provider,
                        message: other.to_string(),
                    },
                    None => LlmError::Connection {
                        provider,
                        message: "the stream broke".into(),
                    },
                }
            }
            tokio_util::codec::LinesCodecError::MaxLineLengthExceeded => {
                LlmError::malformed(provider, "an NDJSON line exceeds 16 MiB")
            }
        })
        .try_filter(|line| futures::future::ready(!line.trim().is_empty()))
}

/// A connection to `uri` that could not be opened (TCP or, for h2c, the HTTP/2 handshake).
pub(crate) fn connect_failed(uri: &Uri, message: &str) -> SendError {
    SendError::connect(format!(
        "error sending request to {uri}: could not connect: {message}"
    ))
}

/// What the transport tests of [`crate::h1`] and [`crate::h2c`] share.
#[cfg(test)]
pub(crate) mod test_support {
    use bytes::Bytes;
    use http_body_util::BodyExt;

    use super::{HeaderMap, SendError, header};

    /// A non-streamed chat request body.
    pub(crate) const CHAT: &str =
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

    /// The headers of a provider's JSON request.
    pub(crate) fn json_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            header::HeaderValue::from_static("Bearer fake"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        headers
    }

    /// Checks that `fake` took `count` requests, all over one connection speaking `version`,
    /// and that the first was [`CHAT`] whole, with its length; returns the requests.
    pub(crate) fn assert_one_connection_carried(
        fake: &meta_chat_testkit::FakeServer,
        version: &str,
        count: usize,
    ) -> Vec<meta_chat_testkit::Recorded> {
        let arrivals = fake.arrivals();
        assert_eq!(arrivals.len(), count, "{arrivals:?}");
        assert!(
            arrivals.iter().all(|a| a.version == version),
            "{arrivals:?}"
        );
        assert!(
            arrivals.iter().all(|a| a.peer == arrivals[0].peer),
            "one connection: {arrivals:?}"
        );
        let recorded = fake.requests_to("/v1/chat/completions");
        assert_eq!(&recorded[0].raw[..], CHAT.as_bytes());
        let length = CHAT.len().to_string();
        assert_eq!(recorded[0].header("content-length"), Some(length.as_str()));
        recorded
    }

    /// An answer's status and whole body; a body that fails is the error.
    pub(crate) async fn read_whole<B>(
        answer: ::http::Response<B>,
    ) -> Result<(u16, Bytes), SendError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let status = answer.status().as_u16();
        let body = answer
            .into_body()
            .collect()
            .await
            .map_err(|e| SendError::new(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_url() -> String {
        // A port that was free a moment ago: nothing listens on it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("its address").port();
        drop(listener);
        format!("http://127.0.0.1:{port}/v1/chat/completions")
    }

    async fn failure(request: Outgoing) -> SendError {
        match dispatch(ProviderKind::OpenAi, request).await {
            Ok(answer) => panic!("expected a failure, got HTTP {}", answer.status),
            Err(error) => error,
        }
    }

    #[tokio::test]
    async fn a_header_value_http_cannot_carry_is_named_without_its_value() {
        let error = failure(Outgoing::new(Method::POST, refused_url()).header(
            HeaderName::from_static("x-api-key"),
            "sk-secret\r\nx-evil: 1",
        ))
        .await;
        assert!(!error.is_connect());
        assert!(error.to_string().contains("`x-api-key`"), "{error}");
        assert!(!error.to_string().contains("sk-secret"), "{error}");

        let error =
            failure(Outgoing::new(Method::POST, refused_url()).bearer_auth("sk-a\nb")).await;
        assert!(error.to_string().contains("`authorization`"), "{error}");
        assert!(!error.to_string().contains("sk-a"), "{error}");
    }

    #[tokio::test]
    async fn an_upstream_url_that_is_not_http_is_refused_before_connecting() {
        for url in [
            "ftp://example.com/v1",
            "not a url",
            "/v1/chat/completions",
            "",
        ] {
            let error = failure(Outgoing::new(Method::GET, url.to_owned())).await;
            assert!(!error.is_connect(), "{url}: {error}");
            assert!(
                error.to_string().starts_with("invalid upstream URL"),
                "{url}: {error}"
            );
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_naming_the_url() {
        let url = refused_url();
        let error = failure(Outgoing::new(Method::POST, url.clone()).body("{}")).await;
        assert!(error.is_connect(), "{error}");
        assert!(
            error
                .to_string()
                .starts_with(&format!("error sending request to {url}: ")),
            "{error}"
        );
    }

    /// The events of `input` fed in pieces cut at `cuts`, then the transport failure `tail`.
    async fn events(
        input: &[u8],
        cuts: &[usize],
        tail: Option<LlmError>,
    ) -> Vec<std::result::Result<SseEvent, String>> {
        use futures::StreamExt;
        let mut pieces = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            pieces.push(Ok(Bytes::copy_from_slice(&input[start..cut])));
            start = cut;
        }
        pieces.extend(tail.map(Err));
        sse_events(ProviderKind::Anthropic, futures::stream::iter(pieces))
            .map(|item| item.map_err(|e| format!("{}: {e}", e.code())))
            .collect()
            .await
    }

    fn event(event: &str, data: &str) -> std::result::Result<SseEvent, String> {
        Ok(SseEvent {
            event: event.into(),
            data: data.into(),
        })
    }

    #[tokio::test]
    async fn server_sent_events_are_read_as_the_standard_says_at_any_chunk_boundary() {
        // A byte-order mark, LF, CRLF and CR line endings, a comment, fields the standard
        // does not know (and one without a colon), a block with no data, multi-line data.
        let input = "\u{feff}event: message_start\ndata: {\"a\":1}\n\n\
                     : keep-alive\r\n\r\n\
                     data: one\rdata:two\r\r\
                     id: 7\nretry: 10\n\n\
                     foo: bar\nbaz\nevent: ping\ndata: {}\n\n\
                     data: Ünïcödé ✓\n\n";
        let expected = vec![
            event("message_start", "{\"a\":1}"),
            event("", "one\ntwo"),
            event("ping", "{}"),
            event("", "Ünïcödé ✓"),
        ];
        assert_eq!(events(input.as_bytes(), &[], None).await, expected);
        for cut in 1..input.len() {
            assert_eq!(
                events(input.as_bytes(), &[cut], None).await,
                expected,
                "cut at byte {cut}"
            );
        }
        let every_byte: Vec<usize> = (1..input.len()).collect();
        assert_eq!(events(input.as_bytes(), &every_byte, None).await, expected);
        // A block the stream ends in the middle of is not an event.
        assert_eq!(
            events(b"data: whole\n\ndata: half", &[], None).await,
            vec![event("", "whole")]
        );
    }

    #[tokio::test]
    async fn a_transport_failure_or_bad_text_ends_the_events_with_an_error() {
        let broken = LlmError::Connection {
            provider: ProviderKind::Anthropic,
            message: "the connection reset".into(),
        };
        assert_eq!(
            events(b"data: a\n\ndata: b", &[], Some(broken)).await,
            vec![
                event("", "a"),
                Err("connection_error: anthropic: connection failed: the connection reset".into())
            ]
        );
        let got = events(b"data: a\n\ndata: \xff\xfe\n\ndata: c\n\n", &[], None).await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0], event("", "a"));
        let error = got[1].as_ref().unwrap_err();
        assert!(
            error.starts_with("malformed_response: ") && error.contains("UTF-8"),
            "{error}"
        );
    }

    #[test]
    fn answers_parse_as_text_and_bytes_that_are_not_utf8_are_malformed() {
        let value: serde_json::Value =
            parse_json(ProviderKind::OpenAi, "{\"a\": \"caf\u{e9}\"}".as_bytes()).unwrap();
        assert_eq!(value["a"], "caf\u{e9}");
        let error = parse_json::<serde_json::Value>(ProviderKind::OpenAi, b"{\"a\": \"caf\xe9\"}")
            .unwrap_err();
        assert!(
            matches!(error, LlmError::MalformedResponse { .. }),
            "{error:?}"
        );
        let error =
            parse_json_str::<serde_json::Value>(ProviderKind::OpenAi, "{\"a\": ").unwrap_err();
        assert!(
            matches!(error, LlmError::MalformedResponse { .. }),
            "{error:?}"
        );
    }
}
