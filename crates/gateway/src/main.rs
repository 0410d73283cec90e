//! `meta-chat`: the gateway's command line. Wiring only; each command lives in its module.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// meta-chat: one interface over OpenAI, Anthropic and Ollama for every tenant.
#[derive(Debug, Parser)]
#[command(name = "meta-chat", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send one prompt to each configured provider and print the answer, latency, tokens
    /// and cost (configuration from the environment and `.env`).
    TestProviders(commands::test_providers::Args),
    /// Manage tenants in the database named by `DATABASE_URL`.
    #[command(subcommand)]
    Tenant(commands::tenant::TenantCommand),
    /// Apply pending database migrations.
    Migrate,
    /// Re-encrypt every tenant secret from `ENCRYPTION_KEY_PREVIOUS` to `ENCRYPTION_KEY`.
    RotateEncryptionKey,
}

#[tokio::main]
async fn main() -> ExitCode {
    // `.env` is optional; a missing file is not an error.
    let _ = dotenvy::dotenv();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    meta_chat_llm::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::TestProviders(args) => commands::test_providers::run(args).await,
        Command::Tenant(command) => commands::tenant::run(command).await,
        Command::Migrate => commands::tenant::migrate().await,
        Command::RotateEncryptionKey => commands::tenant::rotate_encryption_key().await,
    }
}
