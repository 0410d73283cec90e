//! The HTTP plumbing every provider shares: one pooled client, error classification,
//! SSE and NDJSON framing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use reqwest::header::HeaderMap;
use serde::de::DeserializeOwned;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::io::StreamReader;

use crate::error::{LlmError, Result};
use crate::types::ProviderKind;

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

/// The process's upstream clients. Each "lane" is a client with its own pool, so an HTTP/2
/// upstream gets one connection per lane in use: a request takes the first lane whose
/// connection to its upstream carries fewer than `streams_per_connection` requests and
/// holds it (a [`Lease`]) until its answer has been read. Plain HTTP/1.1 requests all use
/// the first lane, whose pool keeps one connection per concurrent request anyway.
struct Lanes {
    streams_per_connection: usize,
    /// Negotiating clients (HTTP/2 over TLS where offered; HTTP/1.1 only when `Off`).
    negotiated: Family,
    /// h2c clients, with `PriorKnowledge`.
    prior_knowledge: Option<Family>,
    /// Per upstream origin (`scheme://host:port`): requests in flight on each lane.
    origins: RwLock<HashMap<String, Arc<Origin>>>,
}

struct Family {
    /// Lane 0, also kept outside the lock: plain HTTP/1.1 requests all take it.
    first: reqwest::Client,
    clients: RwLock<Vec<reqwest::Client>>,
    prior_knowledge: bool,
    http1_only: bool,
}

impl Family {
    fn new(prior_knowledge: bool, http1_only: bool) -> std::result::Result<Self, String> {
        let first = build_client(prior_knowledge, http1_only)?;
        Ok(Self {
            clients: RwLock::new(vec![first.clone()]),
            first,
            prior_knowledge,
            http1_only,
        })
    }

    /// The client of lane `lane`, built on first use. Clients are built outside the lock
    /// (building one reads the platform's root certificates), so requests on the lanes
    /// already open never wait for it.
    fn lane(&self, lane: usize) -> Option<reqwest::Client> {
        loop {
            let open = {
                let clients = self.clients.read().ok()?;
                if let Some(client) = clients.get(lane) {
                    return Some(client.clone());
                }
                clients.len()
            };
            match build_client(self.prior_knowledge, self.http1_only) {
                Ok(built) => {
                    let mut clients = self.clients.write().ok()?;
                    // Another request may have added this lane meanwhile; then this one
                    // is not needed.
                    if clients.len() == open {
                        clients.push(built);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot build another upstream client");
                    return self.clients.read().ok()?.last().cloned();
                }
            }
        }
    }
}

fn build_client(
    prior_knowledge: bool,
    http1_only: bool,
) -> std::result::Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        // Enough idle connections for a busy upstream, without keeping thousands of
        // sockets (and their buffers) after a burst of long streams.
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        // Stream windows sized from the measured bandwidth-delay product: large answers
        // (embeddings) are not throttled on a distant upstream, and a slow reader does not
        // let megabytes pile up per stream.
        .http2_adaptive_window(true);
    if prior_knowledge {
        builder = builder.http2_prior_knowledge();
    }
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().map_err(|e| e.to_string())
}

struct Origin {
    in_flight: Box<[AtomicUsize]>,
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
                let negotiated = Family::new(false, options.http2 == Http2Mode::Off)?;
                Ok(Lanes {
                    streams_per_connection: options.streams_per_connection.max(1),
                    negotiated,
                    prior_knowledge: match options.http2 {
                        Http2Mode::PriorKnowledge => Some(Family::new(true, false)?),
                        Http2Mode::Auto | Http2Mode::Off => None,
                    },
                    origins: RwLock::default(),
                })
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The client to send `url` with, and the lease it holds. Plain HTTP/1.1 takes the
    /// first lane without a lease.
    fn pick(&self, provider: ProviderKind, url: &reqwest::Url) -> (reqwest::Client, Option<Lease>) {
        let family = match (url.scheme(), &self.prior_knowledge) {
            ("http", Some(h2c)) if provider != ProviderKind::Ollama => h2c,
            ("https", _) if !self.negotiated.http1_only => &self.negotiated,
            _ => return (self.first(), None),
        };
        let Some(origin) = self.origin(&url[..url::Position::BeforePath]) else {
            return (self.first(), None);
        };
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
        let lease = Lease { origin, lane };
        match family.lane(lane) {
            Some(client) => (client, Some(lease)),
            None => (self.first(), Some(lease)),
        }
    }

    fn first(&self) -> reqwest::Client {
        self.negotiated.first.clone()
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
                        in_flight: (0..MAX_LANES).map(|_| AtomicUsize::new(0)).collect(),
                    })
                })
                .clone(),
        )
    }
}

/// The client providers build their requests with; [`send`] chooses the connection.
pub(crate) fn client(provider: ProviderKind) -> Result<reqwest::Client> {
    Lanes::get()
        .map(Lanes::first)
        .map_err(|message| LlmError::Configuration {
            provider,
            message: format!("could not build the HTTP client: {message}"),
        })
}

/// An upstream's answer and the lane it holds until the answer has been read.
pub(crate) struct Answer {
    response: reqwest::Response,
    lease: Option<Lease>,
}

/// Sends a built request on the lane chosen for its upstream.
pub(crate) async fn dispatch(
    provider: ProviderKind,
    request: reqwest::RequestBuilder,
) -> std::result::Result<Answer, reqwest::Error> {
    let (client, request) = request.build_split();
    let request = request?;
    let (client, lease) = match Lanes::get() {
        Ok(lanes) => lanes.pick(provider, request.url()),
        Err(_) => (client, None),
    };
    let response = client.execute(request).await?;
    Ok(Answer { response, lease })
}

/// A request to `url` (an upstream endpoint): parsed once per process and then cloned, where
/// reqwest would parse the string (host name normalisation included) on every request. A URL
/// that does not parse is handed over as it is, for reqwest to report.
pub(crate) fn request_to(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
) -> reqwest::RequestBuilder {
    /// Distinct endpoints kept; past it the cache starts over (base URLs come from settings).
    const MAX_ENDPOINTS: usize = 1024;
    static PARSED: OnceLock<RwLock<HashMap<String, reqwest::Url>>> = OnceLock::new();
    let parsed = PARSED.get_or_init(Default::default);
    let known = parsed
        .read()
        .ok()
        .and_then(|endpoints| endpoints.get(&url).cloned());
    if let Some(known) = known {
        return client.request(method, known);
    }
    match reqwest::Url::parse(&url) {
        Ok(fresh) => {
            if let Ok(mut endpoints) = parsed.write() {
                if endpoints.len() >= MAX_ENDPOINTS {
                    endpoints.clear();
                }
                endpoints.insert(url, fresh.clone());
            }
            client.request(method, fresh)
        }
        Err(_) => client.request(method, url),
    }
}

/// Installs rustls' ring crypto provider for the process, unless one is installed already.
pub fn install_crypto_provider() {
    // An error only means another provider was installed first, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Sends a request; a non-2xx answer is read and classified by `parse_error`.
pub(crate) async fn send(
    provider: ProviderKind,
    request: reqwest::RequestBuilder,
    parse_error: ErrorParser,
) -> Result<Answer> {
    let answer = dispatch(provider, request)
        .await
        .map_err(|e| LlmError::connection(provider, &e))?;
    answer.checked(parse_error).await
}

impl Answer {
    /// The answer itself when it is a success; otherwise its body read and classified by
    /// `parse_error`.
    pub(crate) async fn checked(self, parse_error: ErrorParser) -> Result<Self> {
        let status = self.response.status();
        if status.is_success() {
            return Ok(self);
        }
        let headers = self.response.headers().clone();
        let body = self.response.bytes().await.unwrap_or_default();
        Err(parse_error(status.as_u16(), &headers, &body))
    }
}

/// Reads a whole JSON answer.
pub(crate) async fn read_json<T: DeserializeOwned>(
    provider: ProviderKind,
    answer: Answer,
) -> Result<T> {
    let Answer { response, lease } = answer;
    let body = response
        .bytes()
        .await
        .map_err(|e| LlmError::connection(provider, &e))?;
    drop(lease);
    parse_json(provider, &body)
}

/// Parses a JSON body, describing what was wrong if it cannot be parsed.
pub(crate) fn parse_json<T: DeserializeOwned>(provider: ProviderKind, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        LlmError::malformed(
            provider,
            format!("{e} in {}", String::from_utf8_lossy(truncate(body, 200))),
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
    let Answer { response, lease } = answer;
    // The lease lives as long as the stream, and goes when the stream ends or is dropped.
    response.bytes_stream().map_err(move |e| {
        let _held = &lease;
        LlmError::connection(provider, &e)
    })
}

/// Server-sent events parsed from a byte stream (framing across chunk boundaries handled by
/// `eventsource-stream`).
pub(crate) fn sse_events<S>(
    provider: ProviderKind,
    bytes: S,
) -> impl Stream<Item = Result<eventsource_stream::Event>> + Send + 'static
where
    S: Stream<Item = Result<Bytes>> + Send + 'static,
{
    use eventsource_stream::{EventStreamError, Eventsource};
    bytes.eventsource().map_err(move |e| match e {
        EventStreamError::Transport(inner) => inner,
        EventStreamError::Utf8(e) => LlmError::malformed(provider, format!("invalid UTF-8: {e}")),
        EventStreamError::Parser(e) => LlmError::malformed(provider, format!("invalid SSE: {e}")),
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
