//! The HTTP server: accepts connections and serves the router on each until shutdown, then
//! lets the requests in flight finish. It speaks HTTP/1.1, and HTTP/2 without TLS (h2c, by
//! prior knowledge) to clients that open with the HTTP/2 preface, as load balancers and
//! service meshes do in front of a fleet.
//!
//! Written on hyper's connection types directly rather than `axum::serve`: a gateway holds a
//! client connection or stream per open answer, so what each one costs while it waits is what
//! 10,000 concurrent streams cost. `axum::serve` decides between the protocols inside one
//! connection future, so every HTTP/1.1 connection carries room for HTTP/2's state as well;
//! here the protocol is known before the connection's task is spawned, and each task holds
//! only its own protocol (BENCHMARKS.md has the figures).

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

/// How long a client has to send a request's headers once it has opened a connection or
/// finished its previous request (HTTP/1.1), or to send anything at all before the protocol
/// is known.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4); no HTTP/1.1 method is `PRI`.
const H2_PREFACE_START: &[u8] = b"PRI ";

/// Concurrent streams an HTTP/2 client may open on one connection.
const H2_MAX_CONCURRENT_STREAMS: u32 = 1000;

/// Serves `router` on `listener` until `shutdown` resolves, then waits for the requests in
/// flight. Connections get `TCP_NODELAY`: streamed answers are many small writes, which
/// Nagle's algorithm would hold back until the client's delayed ACK (40 ms on Linux).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(Duration::from_secs(30));
    // Handlers get their state now, once: served without it, axum would do so per request.
    let router = router.with_state(());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before it was
                    // accepted: wait a little rather than spin, and go on.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
        }
        let service = TowerToHyperService::new(router.clone());
        let (http1, http2, watcher) = (http1.clone(), http2.clone(), graceful.watcher());
        tokio::spawn(async move {
            let speaks_h2 =
                match tokio::time::timeout(HEADER_READ_TIMEOUT, opens_with_h2(&stream)).await {
                    Ok(Ok(h2)) => h2,
                    Ok(Err(error)) => {
                        tracing::debug!(%error, %peer, "connection closed before a request");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "no request within the header timeout");
                        return;
                    }
                };
            // Each protocol's connection in its own task, sized for that protocol alone.
            let io = TokioIo::new(stream);
            let ended = if speaks_h2 {
                tokio::spawn(watcher.watch(http2.serve_connection(io, service)))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            } else {
                watcher
                    .watch(http1.serve_connection(io, service))
                    .await
                    .map_err(|e| e.to_string())
            };
            if let Err(error) = ended {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Whether the client starts with the HTTP/2 preface, from its first bytes (peeked, left for
/// the protocol to read). A method's first letters settle it: only `P…` needs a few bytes.
async fn opens_with_h2(stream: &TcpStream) -> std::io::Result<bool> {
    let mut start = [0u8; H2_PREFACE_START.len()];
    loop {
        let n = stream.peek(&mut start).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let seen = start.get(..n).unwrap_or_default();
        if !H2_PREFACE_START.starts_with(seen) {
            return Ok(false);
        }
        if n == start.len() {
            return Ok(true);
        }
        // Part of `PRI ` so far (a client writing a byte at a time): `peek` would answer at
        // once with the same bytes, so wait a moment for the rest.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
