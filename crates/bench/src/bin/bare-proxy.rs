//! `bare-proxy`: the floor of the gateway's HTTP stack, for the load benchmark to measure
//! beside the gateway. An axum server (as the gateway's, with `TCP_NODELAY`) forwards every
//! request's method, path, content type, authorization and body to one upstream through a reqwest client
//! set up as the gateway's (one pool, `TCP_NODELAY`) and answers with the upstream's status,
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
use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Plain pass-through HTTP proxy (axum + reqwest).
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
    client: reqwest::Client,
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
    let mut outgoing = upstream
        .client
        .request(parts.method, format!("{}{path}", upstream.base))
        .body(body);
    for name in [header::CONTENT_TYPE, header::AUTHORIZATION] {
        if let Some(value) = parts.headers.get(&name) {
            outgoing = outgoing.header(name, value);
        }
    }
    match outgoing.send().await {
        Ok(answer) => {
            let mut response = Response::builder().status(answer.status().as_u16());
            if let Some(content_type) = answer.headers().get(header::CONTENT_TYPE) {
                response = response.header(header::CONTENT_TYPE, content_type.as_bytes());
            }
            response
                .body(Body::from_stream(answer.bytes_stream()))
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
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut client = reqwest::Client::builder()
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .http2_adaptive_window(true);
    if args.http2_prior_knowledge {
        client = client.http2_prior_knowledge();
    }
    let client = client.build()?;
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
