//! `meta-chat-fake`: fake OpenAI, Anthropic and Ollama servers on one port, so the gateway
//! can be tried without API keys. Every request is answered with an echo of its last user
//! message.

use std::net::SocketAddr;

use clap::Parser;
use meta_chat_testkit::FakeServer;

/// Fake OpenAI + Anthropic + Ollama server.
#[derive(Debug, Parser)]
#[command(name = "meta-chat-fake", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "FAKE_BIND_ADDR", default_value = "127.0.0.1:4010")]
    bind: SocketAddr,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let server = FakeServer::bind(args.bind).await?;
    let url = server.url();
    println!("meta-chat-fake listening on {url}");
    println!("  OPENAI_BASE_URL={url} OPENAI_API_KEY=fake");
    println!("  ANTHROPIC_BASE_URL={url} ANTHROPIC_API_KEY=fake");
    println!("  OLLAMA_BASE_URL={url}");
    tokio::signal::ctrl_c().await?;
    drop(server);
    Ok(())
}
