//! `bare-proxy`: the floor of the gateway's HTTP stack, for the load benchmark to measure
//! beside the gateway. An axum server (as the gateway's, with `TCP_NODELAY`) forwards every
//! request's method, path, content type, authorization and body to one upstream through
//! hyper's pooled client set up as the gateway's (`TCP_NODELAY`, the same pool and HTTP/2
//! settings) and answers with the upstream's status,
//! content type and body, streamed through. No JSON, no authentication (the client's
//! `Authorization` is passed on unchecked, as the fakes require one), no accounting: what is
//! left is two HTTP exchanges per request on the same libraries.
//!
//! `bare-proxy --bind 127.0.0.1:4000 --upstream http://127.0.0.1:4010 [--http2-prior-knowledge]`
//! (the last to speak HTTP/2 to the upstream, as the gateway does with
//! `UPSTREAM_HTTP2=prior-knowledge`). Over HTTP/2 it spreads requests over connections as the
//! gateway does: each request takes the first connection carrying fewer than 100, so
//! thousands of concurrent streams stay within the upstream's limit per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Plain pass-through HTTP proxy (axum + hyper's client).
#[derive(Debug, Parser)]
#[command(name = "bare-proxy", about)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    bind: SocketAddr,
    /// HTTP/2 without negotiation (h2c) to the upstream.
    #[arg(long)]
    http2_prior_knowledge: bool,
    /// Upstream base URL, e.g. `http://127.0.0.1:4010`.
    #[arg(long)]
    upstream: String,
}

/// Requests per upstream connection before the next one is used, as the gateway's default
/// (`UPSTREAM_STREAMS_PER_CONNECTION`).
const STREAMS_PER_CONNECTION: usize = 100;

/// Connections (clients) at most, as the gateway's lanes.
const LANES: usize = 256;

#[derive(Debug, Clone)]
struct Upstream {
    /// One pooled client per lane; over HTTP/1.1 only the first is used (its pool keeps a
    /// connection per concurrent request anyway).
    lanes: Arc<[Client<HttpConnector, Full<Bytes>>]>,
    in_flight: Arc<[AtomicUsize]>,
    base: String,
}

/// A request's place on a lane, given back when its answer has been read or dropped.
struct Lease {
    in_flight: Arc<[AtomicUsize]>,
    lane: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(count) = self.in_flight.get(self.lane) {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Upstream {
    /// The first lane below its cap (the least busy when all are full), held by the lease.
    fn pick(&self) -> Lease {
        let lane = self
            .in_flight
            .iter()
            .position(|count| count.load(Ordering::Relaxed) < STREAMS_PER_CONNECTION)
            .or_else(|| {
                self.in_flight
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, count)| count.load(Ordering::Relaxed))
                    .map(|(lane, _)| lane)
            })
            .unwrap_or(0);
        if let Some(count) = self.in_flight.get(lane) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        Lease {
            in_flight: Arc::clone(&self.in_flight),
            lane,
        }
    }
}

/// The largest request body forwarded (as the gateway's default limit).
const MAX_BODY: usize = 10 * 1024 * 1024;

async fn forward(State(upstream): State<Upstream>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(error) => return (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut outgoing = axum::http::Request::new(Full::new(body));
    *outgoing.method_mut() = parts.method;
    *outgoing.uri_mut() = match format!("{}{path}", upstream.base).parse() {
        Ok(uri) => uri,
        Err(error) => return (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
    };
    for name in [header::CONTENT_TYPE, header::AUTHORIZATION] {
        if let Some(value) = parts.headers.get(&name) {
            outgoing.headers_mut().insert(name, value.clone());
        }
    }
    let lease = upstream.pick();
    let Some(client) = upstream.lanes.get(lease.lane) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "no lane").into_response();
    };
    match client.request(outgoing).await {
        Ok(answer) => {
            let (head, body) = answer.into_parts();
            // The lease lives as long as the body is read.
            let body = body.map_frame(move |frame| {
                let _held = &lease;
                frame
            });
            let mut response = Response::builder().status(head.status.as_u16());
            if let Some(content_type) = head.headers.get(header::CONTENT_TYPE) {
                response = response.header(header::CONTENT_TYPE, content_type.as_bytes());
            }
            response
                .body(Body::from_stream(BodyDataStream::new(body)))
                .unwrap_or_else(|error| {
                    (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
                })
        }
        Err(error) => (StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = || {
        Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .http2_adaptive_window(true)
            .http2_only(args.http2_prior_knowledge)
            .build(connector.clone())
    };
    let lanes = if args.http2_prior_knowledge { LANES } else { 1 };
    let upstream = Upstream {
        lanes: (0..lanes).map(|_| client()).collect(),
        in_flight: (0..lanes).map(|_| AtomicUsize::new(0)).collect(),
        base: args.upstream.trim_end_matches('/').to_owned(),
    };
    let app = axum::Router::new()
        .fallback(forward)
        .with_state(upstream)
        .into_make_service();
    let listener = tokio::net::TcpListener::bind(args.bind).await?;
    println!("bare-proxy listening on http://{}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}
