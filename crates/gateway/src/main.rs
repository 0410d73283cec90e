//! `meta-chat`: the gateway's command line. Wiring only; each command lives in its module.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: a request allocates and frees many small
/// buffers across threads, where glibc's malloc spent about a sixth of the gateway's CPU
/// (`BENCHMARKS.md`). Built without the `mimalloc` feature, the system allocator is used
/// (for heap profilers such as heaptrack).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// meta-chat: a multi-tenant LLM gateway over OpenAI, Anthropic and Ollama.
#[derive(Debug, Parser)]
#[command(name = "meta-chat", version, about)]
struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server on `BIND_ADDR` (the default command).
    Serve,
    /// Manage tenants in the database named by `DATABASE_URL`.
    #[command(subcommand)]
    Tenant(commands::tenant::TenantCommand),
    /// Send one prompt to each configured provider and print the answer, latency, tokens
    /// and cost (configuration from the environment and `.env`).
    TestProviders(commands::test_providers::Args),
    /// Print a usage report (totals, time series, breakdown) from the database named by
    /// `DATABASE_URL`, as `GET /api/tenants/{id}/usage` answers it.
    Usage(commands::usage::Args),
    /// Apply pending database migrations.
    Migrate,
    /// Re-encrypt every tenant secret from `ENCRYPTION_KEY_PREVIOUS` to `ENCRYPTION_KEY`.
    RotateEncryptionKey,
}

#[tokio::main]
async fn main() -> ExitCode {
    // `.env` is optional; a missing file is not an error.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    let default_filter = match command {
        Command::Serve => "info,sqlx=warn",
        _ => "warn,sqlx=warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    meta_chat_llm::install_crypto_provider();
    match command {
        Command::Serve => commands::serve::run().await,
        Command::Tenant(command) => commands::tenant::run(command).await,
        Command::TestProviders(args) => commands::test_providers::run(args).await,
        Command::Usage(args) => commands::usage::run(args).await,
        Command::Migrate => commands::tenant::migrate().await,
        Command::RotateEncryptionKey => commands::tenant::rotate_encryption_key().await,
    }
}
