//! `meta-chat serve` (the default command): the HTTP server, until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use meta_chat::bootstrap::{self, StartupError};
use meta_chat::config::Config;

/// Starts the server on `BIND_ADDR` and runs until a shutdown signal; in-flight requests
/// finish before the process exits.
pub async fn run() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let bind_addr = config.bind_addr;
    let (state, admin_key) = match bootstrap::app_state(config).await {
        Ok(ready) => ready,
        Err(error) => {
            eprintln!("error: {error}");
            return match error {
                StartupError::Config(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            };
        }
    };
    if let Some(key) = &admin_key.generated {
        // Printed once, on the first start; only its hash is stored.
        println!("Generated the admin API key (shown only this once): {key}");
    }
    let listener = match tokio::net::TcpListener::bind(bind_addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("error: BIND_ADDR: cannot listen on {bind_addr}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = shutdown_signal();
    let database = state.store.backend();
    let local = listener.local_addr().unwrap_or(bind_addr);
    tracing::info!(addr = %local, database, "meta-chat listening");
    println!("meta-chat listening on http://{local}");
    let usage = state.usage.clone();
    let served = meta_chat::server::serve(listener, meta_chat::api::router(state), shutdown).await;
    // Every request has finished: write the usage records still queued.
    usage.shutdown().await;
    tracing::info!(
        written = usage.written(),
        dropped = usage.dropped(),
        "usage records flushed"
    );
    match served {
        Ok(()) => {
            tracing::info!("meta-chat stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: server failed: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when
/// the future is first polled: a signal that arrives as soon as the server says it is
/// listening must already stop it gracefully.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(interrupt), Ok(terminate)) => Some((interrupt, terminate)),
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(%error, "cannot listen for SIGINT/SIGTERM");
                None
            }
        }
    };
    async move {
        #[cfg(unix)]
        match handlers {
            Some((mut interrupt, mut terminate)) => {
                tokio::select! {
                    _ = interrupt.recv() => {},
                    _ = terminate.recv() => {},
                }
            }
            None => std::future::pending::<()>().await,
        }
        #[cfg(not(unix))]
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        tracing::info!("shutdown signal received; finishing in-flight requests");
    }
}
