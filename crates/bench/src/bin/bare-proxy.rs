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
//! `UPSTREAM_HTTP2=prior-knowledge`).

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyDataStream, Full};
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

#[derive(Debug, Clone)]
struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
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
    match upstream.client.request(outgoing).await {
        Ok(answer) => {
            let (head, body) = answer.into_parts();
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
    let client = Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .http2_adaptive_window(true)
        .http2_only(args.http2_prior_knowledge)
        .build(connector);
    let upstream = Upstream {
        client,
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
