//! The load generator: HTTP/1.1 keep-alive connections straight on hyper's connection API,
//! pre-built request bodies, and three ways of driving them — closed loop (each connection
//! sends its next request when the previous one completed), open loop (requests issued on a
//! fixed schedule, latency from the intended send time) and many concurrent streams.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderMap, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// The error type of the whole benchmark.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// A result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The gateway's own time per request, in milliseconds.
pub const OVERHEAD_HEADER: &str = "x-meta-chat-overhead-ms";
const CACHE_HEADER: &str = "x-meta-chat-cache";
/// Longest value a histogram holds: 10 minutes in microseconds.
const MAX_MICROS: u64 = 600_000_000;
/// Distinct error messages kept per measurement.
const ERROR_SAMPLES: usize = 5;

type Sender = SendRequest<Full<Bytes>>;

/// How the clients of the `streams` part reach the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamClients {
    /// One HTTP/1.1 connection per stream, as SDK clients open them.
    Http1,
    /// HTTP/2 without TLS, this many streams per connection, as a load balancer or service
    /// mesh multiplexes its clients' requests.
    H2c(usize),
}

/// A stream's way to send its request.
enum StreamSender {
    Http1(Sender),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl StreamSender {
    async fn send(
        &mut self,
        addr: SocketAddr,
        request: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        Ok(match self {
            Self::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
            Self::H2(sender) => {
                // HTTP/2 names the host in the `:authority` of an absolute URI.
                let (mut parts, body) = request.into_parts();
                parts.headers.remove(HOST);
                parts.uri = Uri::builder()
                    .scheme("http")
                    .authority(addr.to_string())
                    .path_and_query(parts.uri.path())
                    .build()?;
                sender.ready().await?;
                sender
                    .send_request(Request::from_parts(parts, body))
                    .await?
            }
        })
    }
}

/// Opens an HTTP/2 connection without TLS (prior knowledge).
async fn connect_h2c(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// One kind of request, built once and sent many times.
#[derive(Debug, Clone)]
pub struct Call {
    /// Where it goes.
    pub addr: SocketAddr,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    /// HTTP statuses that are the expected outcome (anything else is an error).
    pub expect: Vec<u16>,
    /// A streamed answer: time to the first body bytes is recorded.
    pub stream: bool,
    /// Record the gaps between body chunks as they arrive.
    pub gaps: bool,
}

impl Call {
    /// A `POST` of a JSON `body` to `path` with `Authorization: Bearer key`.
    pub fn post(addr: SocketAddr, path: &'static str, key: &str, body: Bytes) -> Result<Self> {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_str(&addr.to_string())?);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}"))?,
        );
        Ok(Self {
            addr,
            uri: Uri::from_static(path),
            headers,
            body,
            expect: vec![200],
            stream: false,
            gaps: false,
        })
    }

    /// Expects these statuses instead of 200.
    pub fn expecting(mut self, statuses: &[u16]) -> Self {
        self.expect = statuses.to_vec();
        self
    }

    /// A streamed request; `gaps` records the time between body chunks.
    pub fn streamed(mut self, gaps: bool) -> Self {
        self.stream = true;
        self.gaps = gaps;
        self
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        request.headers_mut().clone_from(&self.headers);
        request
    }
}

/// A histogram of microseconds.
pub fn histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, MAX_MICROS, 3)?)
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// What one measurement saw. Latencies and times are in microseconds.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Latency of the requests with an expected status (open loop: from the intended send
    /// time; closed loop: from the actual send time), to the end of the body.
    pub latency: Histogram<u64>,
    /// Time to the first body bytes (streams).
    pub ttfb: Histogram<u64>,
    /// Time between consecutive body chunks (streams with `gaps`).
    pub gaps: Histogram<u64>,
    /// `x-meta-chat-overhead-ms` of the answers that carried it.
    pub overhead: Histogram<u64>,
    /// How late requests were actually sent after their intended time (open loop).
    pub send_lag: Histogram<u64>,
    /// Answers with an expected status, body read to the end.
    pub completed: u64,
    /// Transport errors, time-outs and unexpected statuses.
    pub errors: u64,
    /// Every status seen, expected or not.
    pub statuses: BTreeMap<u16, u64>,
    /// Answers with `x-meta-chat-cache: hit`.
    pub cache_hits: u64,
    /// Connections opened while measuring (beyond the ones opened before).
    pub connects: u64,
    /// The first few distinct error messages.
    pub error_samples: Vec<String>,
    /// Wall time of the measurement.
    pub elapsed: Duration,
}

impl Stats {
    /// Empty.
    pub fn new() -> Result<Self> {
        Ok(Self {
            latency: histogram()?,
            ttfb: histogram()?,
            gaps: histogram()?,
            overhead: histogram()?,
            send_lag: histogram()?,
            completed: 0,
            errors: 0,
            statuses: BTreeMap::new(),
            cache_hits: 0,
            connects: 0,
            error_samples: Vec::new(),
            elapsed: Duration::ZERO,
        })
    }

    /// Adds `other` (elapsed times add up: phases run one after the other).
    pub fn merge(&mut self, other: &Stats) -> Result<()> {
        self.latency.add(&other.latency)?;
        self.ttfb.add(&other.ttfb)?;
        self.gaps.add(&other.gaps)?;
        self.overhead.add(&other.overhead)?;
        self.send_lag.add(&other.send_lag)?;
        self.completed += other.completed;
        self.errors += other.errors;
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
        self.cache_hits += other.cache_hits;
        self.connects += other.connects;
        for sample in &other.error_samples {
            self.note_error(sample);
        }
        self.elapsed += other.elapsed;
        Ok(())
    }

    /// Merges the stats of workers that ran at the same time.
    fn merge_concurrent(&mut self, other: &Stats) -> Result<()> {
        let elapsed = self.elapsed;
        self.merge(other)?;
        self.elapsed = elapsed;
        Ok(())
    }

    fn note_error(&mut self, message: &str) {
        if self.error_samples.len() < ERROR_SAMPLES
            && !self.error_samples.iter().any(|s| s == message)
        {
            self.error_samples.push(message.to_owned());
        }
    }

    fn error(&mut self, message: impl std::fmt::Display) {
        self.errors += 1;
        self.note_error(&message.to_string());
    }

    /// Records one exchange whose clock started at `start`.
    fn record(&mut self, call: &Call, start: Instant, outcome: &Outcome) {
        *self.statuses.entry(outcome.status).or_default() += 1;
        if let Some(overhead) = outcome.overhead_micros {
            self.overhead.saturating_record(overhead);
        }
        if outcome.cache_hit {
            self.cache_hits += 1;
        }
        if !call.expect.contains(&outcome.status) {
            self.error(format!("HTTP {}", outcome.status));
            return;
        }
        self.completed += 1;
        self.latency
            .saturating_record(micros(outcome.done.saturating_duration_since(start)));
        if let Some(first) = outcome.first_byte {
            self.ttfb
                .saturating_record(micros(first.saturating_duration_since(start)));
        }
        for gap in &outcome.gaps {
            self.gaps.saturating_record(micros(*gap));
        }
    }
}

/// What one exchange gave.
#[derive(Debug)]
struct Outcome {
    status: u16,
    overhead_micros: Option<u64>,
    cache_hit: bool,
    first_byte: Option<Instant>,
    gaps: Vec<Duration>,
    done: Instant,
}

/// Opens a keep-alive HTTP/1.1 connection.
async fn connect(addr: SocketAddr) -> Result<Sender> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        // The connection ends when its sender is dropped or the peer closes it; requests on
        // it report the failure themselves.
        let _ = connection.await;
    });
    Ok(sender)
}

/// Sends one request on `sender` and reads the whole answer.
async fn exchange(sender: &mut Sender, call: &Call) -> Result<Outcome> {
    sender.ready().await?;
    let response = sender.send_request(call.request()).await?;
    let status = response.status().as_u16();
    let overhead_micros = response
        .headers()
        .get(OVERHEAD_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| (ms * 1000.0).round() as u64);
    let cache_hit = response
        .headers()
        .get(CACHE_HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"hit"));
    let mut body = response.into_body();
    let mut first_byte = None;
    let mut last = None;
    let mut gaps = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        if frame.data_ref().is_some_and(|data| !data.is_empty()) {
            let now = Instant::now();
            if first_byte.is_none() {
                first_byte = Some(now);
            }
            if call.gaps
                && let Some(previous) = last
            {
                gaps.push(now.saturating_duration_since(previous));
            }
            last = Some(now);
        }
    }
    Ok(Outcome {
        status,
        overhead_micros,
        cache_hit,
        first_byte: if call.stream { first_byte } else { None },
        gaps,
        done: Instant::now(),
    })
}

/// One request on a fresh connection, for set-up and checks: status, headers and body.
pub async fn once(
    addr: SocketAddr,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<Bytes>,
) -> Result<(u16, HeaderMap, Bytes)> {
    let mut sender = connect(addr).await?;
    let mut request = Request::new(Full::new(body.unwrap_or_default()));
    *request.method_mut() = method;
    *request.uri_mut() = path.parse()?;
    let headers = request.headers_mut();
    headers.insert(HOST, HeaderValue::from_str(&addr.to_string())?);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(key) = key {
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}"))?,
        );
    }
    sender.ready().await?;
    let response = tokio::time::timeout(Duration::from_secs(60), sender.send_request(request))
        .await
        .map_err(|_| format!("{path}: no answer within 60 s"))??;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(60), response.into_body().collect())
        .await
        .map_err(|_| format!("{path}: body not finished within 60 s"))??
        .to_bytes();
    Ok((status, headers, body))
}

/// One request of `call` on a fresh connection: status, headers and the whole body (to
/// check a scenario before measuring it).
pub async fn probe(call: &Call) -> Result<(u16, HeaderMap, Bytes)> {
    let mut sender = connect(call.addr).await?;
    sender.ready().await?;
    let exchange = async {
        let response = sender.send_request(call.request()).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, Error>((status, headers, body))
    };
    tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .map_err(|_| "no complete answer within 60 s")?
}

/// Opens `n` connections to `addr`.
async fn connect_many(addr: SocketAddr, n: usize) -> Result<Vec<Sender>> {
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        senders.push(connect(addr).await?);
    }
    Ok(senders)
}

/// Closed loop: `connections` connections, each sending its next request as soon as the
/// previous answer was read, until `duration` has passed. Latency is from the actual send.
pub async fn closed_loop(
    call: Arc<Call>,
    connections: usize,
    duration: Duration,
    timeout: Duration,
) -> Result<Stats> {
    let senders = connect_many(call.addr, connections.max(1)).await?;
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = JoinSet::new();
    for sender in senders {
        workers.spawn(closed_worker(sender, call.clone(), deadline, timeout));
    }
    let mut total = Stats::new()?;
    while let Some(stats) = workers.join_next().await {
        total.merge_concurrent(&stats??)?;
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

async fn closed_worker(
    sender: Sender,
    call: Arc<Call>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Stats> {
    let mut stats = Stats::new()?;
    let mut sender = Some(sender);
    while Instant::now() < deadline {
        let mut current = match sender.take() {
            Some(current) if !current.is_closed() => current,
            _ => match connect(call.addr).await {
                Ok(fresh) => {
                    stats.connects += 1;
                    fresh
                }
                Err(error) => {
                    stats.error(format!("connect: {error}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let start = Instant::now();
        match tokio::time::timeout(timeout, exchange(&mut current, &call)).await {
            Ok(Ok(outcome)) => {
                stats.record(&call, start, &outcome);
                sender = Some(current);
            }
            Ok(Err(error)) => stats.error(error),
            Err(_) => stats.error(format!("no complete answer within {timeout:?}")),
        }
    }
    Ok(stats)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// State shared by the requests of one open-loop run.
#[derive(Debug)]
struct OpenLoop {
    call: Arc<Call>,
    pool: Mutex<Vec<Sender>>,
    stats: Mutex<Stats>,
    finished: AtomicU64,
    last_done: Mutex<Option<Instant>>,
    timeout: Duration,
}

/// Open loop: `rate` requests per second for `duration`, request `i` due at `t0 + i/rate`
/// whatever the answers do. A dedicated thread keeps the schedule (sleeping to each due
/// time) and hands every request to the runtime; a request takes an idle keep-alive
/// connection from the pool (`pool` opened beforehand) or opens one more, so nothing
/// queues behind a slow answer. Latency is measured from the intended send time (no
/// coordinated omission); how late requests actually left is in `send_lag`.
pub async fn open_loop(
    call: Arc<Call>,
    rate: f64,
    duration: Duration,
    pool: usize,
    timeout: Duration,
) -> Result<Stats> {
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let shared = Arc::new(OpenLoop {
        pool: Mutex::new(connect_many(call.addr, pool).await?),
        call,
        stats: Mutex::new(Stats::new()?),
        finished: AtomicU64::new(0),
        last_done: Mutex::new(None),
        timeout,
    });
    let runtime = tokio::runtime::Handle::current();
    let t0 = Instant::now() + Duration::from_millis(20);
    let pacer_shared = shared.clone();
    let pacer = tokio::task::spawn_blocking(move || {
        for i in 0..total {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            runtime.spawn(open_request(pacer_shared.clone(), due));
        }
    });
    pacer.await?;
    let wait_until = Instant::now() + timeout + Duration::from_secs(1);
    while shared.finished.load(Ordering::Acquire) < total && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut stats = lock(&shared.stats).clone();
    let unfinished = total.saturating_sub(shared.finished.load(Ordering::Acquire));
    if unfinished > 0 {
        stats.errors += unfinished;
        stats.note_error(&format!("{unfinished} requests unfinished at the end"));
    }
    let end = lock(&shared.last_done).unwrap_or_else(Instant::now);
    stats.elapsed = end.saturating_duration_since(t0);
    lock(&shared.pool).clear();
    Ok(stats)
}

async fn open_request(shared: Arc<OpenLoop>, due: Instant) {
    let pooled = lock(&shared.pool).pop();
    let mut connected = false;
    let sender = match pooled {
        Some(sender) if !sender.is_closed() => Ok(sender),
        _ => {
            connected = true;
            connect(shared.call.addr).await
        }
    };
    let sent = Instant::now();
    let result = match sender {
        Ok(mut sender) => {
            match tokio::time::timeout(shared.timeout, exchange(&mut sender, &shared.call)).await {
                Ok(Ok(outcome)) => Ok((outcome, sender)),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err(format!("no complete answer within {:?}", shared.timeout)),
            }
        }
        Err(error) => Err(format!("connect: {error}")),
    };
    {
        let mut stats = lock(&shared.stats);
        if connected {
            stats.connects += 1;
        }
        stats
            .send_lag
            .saturating_record(micros(sent.saturating_duration_since(due)));
        match result {
            Ok((outcome, sender)) => {
                stats.record(&shared.call, due, &outcome);
                drop(stats);
                lock(&shared.pool).push(sender);
                let mut last = lock(&shared.last_done);
                if last.is_none_or(|l| l < outcome.done) {
                    *last = Some(outcome.done);
                }
            }
            Err(error) => stats.error(error),
        }
    }
    shared.finished.fetch_add(1, Ordering::Release);
}

/// What [`many_streams`] saw.
#[derive(Debug)]
pub struct ManyStreams {
    /// Streams asked for.
    pub requested: usize,
    /// Connections established.
    pub connected: u64,
    /// Streams whose first body bytes arrived.
    pub first_chunk: u64,
    /// The most streams open at once (answer head received, body not finished).
    pub open_peak: u64,
    /// Time from the first connection to the moment every stream had its first chunk (or
    /// the wait gave up).
    pub all_first_after: Duration,
    /// Whether every stream got its first chunk before the wait gave up.
    pub all_first: bool,
    /// Latency, time to first chunk, statuses and errors.
    pub stats: Stats,
}

#[derive(Debug, Default)]
struct StreamCounters {
    connected: AtomicU64,
    first_chunk: AtomicU64,
    failed: AtomicU64,
    open: AtomicU64,
    open_peak: AtomicU64,
}

/// Opens `n` connections (at most `connecting` connection attempts at a time), sends one
/// streamed request on each, waits until every stream received its first chunk (or
/// `first_wait` passed), calls `at_peak` — every stream is open then — and reads all
/// streams to their end (giving up after `finish_wait`).
pub async fn many_streams<T>(
    call: Arc<Call>,
    n: usize,
    connecting: usize,
    first_wait: Duration,
    finish_wait: Duration,
    clients: StreamClients,
    at_peak: impl FnOnce() -> T,
) -> Result<(ManyStreams, T)> {
    let counters = Arc::new(StreamCounters::default());
    let stats = Arc::new(Mutex::new(Stats::new()?));
    let gate = Arc::new(tokio::sync::Semaphore::new(connecting.max(1)));
    let started = Instant::now();
    let mut shared = Vec::new();
    if let StreamClients::H2c(per_connection) = clients {
        for _ in 0..n.div_ceil(per_connection.max(1)) {
            shared.push(connect_h2c(call.addr).await?);
        }
    }
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let sender = match clients {
            StreamClients::Http1 => None,
            StreamClients::H2c(per_connection) => shared
                .get(i / per_connection.max(1))
                .cloned()
                .map(StreamSender::H2),
        };
        tasks.spawn(one_stream(
            call.clone(),
            sender,
            gate.clone(),
            counters.clone(),
            stats.clone(),
            finish_wait,
        ));
    }
    drop(shared);
    let target = n as u64;
    let give_up = started + first_wait;
    let settled =
        || counters.first_chunk.load(Ordering::Acquire) + counters.failed.load(Ordering::Acquire);
    while settled() < target && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all_first_after = started.elapsed();
    let all_first = counters.first_chunk.load(Ordering::Acquire) >= target;
    let peak = at_peak();
    let finish_by = tokio::time::Instant::now() + finish_wait;
    loop {
        match tokio::time::timeout_at(finish_by, tasks.join_next()).await {
            Ok(Some(joined)) => joined?,
            Ok(None) => break,
            Err(_) => {
                let left = tasks.len();
                tasks.abort_all();
                let mut stats = lock(&stats);
                stats.errors += left as u64;
                stats.note_error(&format!("{left} streams unfinished at the end"));
                break;
            }
        }
    }
    let mut stats = lock(&stats).clone();
    stats.elapsed = started.elapsed();
    Ok((
        ManyStreams {
            requested: n,
            connected: counters.connected.load(Ordering::Acquire),
            first_chunk: counters.first_chunk.load(Ordering::Acquire),
            open_peak: counters.open_peak.load(Ordering::Acquire),
            all_first_after,
            all_first,
            stats,
        },
        peak,
    ))
}

async fn one_stream(
    call: Arc<Call>,
    sender: Option<StreamSender>,
    gate: Arc<tokio::sync::Semaphore>,
    counters: Arc<StreamCounters>,
    stats: Arc<Mutex<Stats>>,
    timeout: Duration,
) {
    // A stream counts as settled once: at its first chunk or when it fails before one.
    let got_first = AtomicBool::new(false);
    let failed = |message: String| {
        if !got_first.load(Ordering::Acquire) {
            counters.failed.fetch_add(1, Ordering::AcqRel);
        }
        lock(&stats).error(message);
    };
    let mut sender = match sender {
        Some(shared) => shared,
        None => {
            let connected = {
                let Ok(_permit) = gate.acquire().await else {
                    return failed("connection gate closed".into());
                };
                tokio::time::timeout(Duration::from_secs(10), connect(call.addr)).await
            };
            match connected {
                Ok(Ok(sender)) => StreamSender::Http1(sender),
                Ok(Err(error)) => return failed(format!("connect: {error}")),
                Err(_) => return failed("connect: no connection within 10 s".into()),
            }
        }
    };
    counters.connected.fetch_add(1, Ordering::AcqRel);
    let start = Instant::now();
    let result = tokio::time::timeout(timeout, async {
        let response = sender.send(call.addr, call.request()).await?;
        let status = response.status().as_u16();
        let open = counters.open.fetch_add(1, Ordering::AcqRel) + 1;
        counters.open_peak.fetch_max(open, Ordering::AcqRel);
        let mut body = response.into_body();
        let mut first_byte = None;
        let read = async {
            while let Some(frame) = body.frame().await {
                let frame = frame?;
                if first_byte.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                    first_byte = Some(Instant::now());
                    got_first.store(true, Ordering::Release);
                    counters.first_chunk.fetch_add(1, Ordering::AcqRel);
                }
            }
            Ok::<(), Error>(())
        }
        .await;
        counters.open.fetch_sub(1, Ordering::AcqRel);
        read?;
        Ok::<Outcome, Error>(Outcome {
            status,
            overhead_micros: None,
            cache_hit: false,
            first_byte,
            gaps: Vec::new(),
            done: Instant::now(),
        })
    })
    .await;
    match result {
        Ok(Ok(outcome)) => {
            if outcome.first_byte.is_none() {
                counters.failed.fetch_add(1, Ordering::AcqRel);
            }
            lock(&stats).record(&call, start, &outcome);
        }
        Ok(Err(error)) => failed(error.to_string()),
        Err(_) => failed(format!("stream not finished within {timeout:?}")),
    }
}
