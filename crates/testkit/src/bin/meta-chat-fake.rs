//! `meta-chat-fake`: fake OpenAI, Anthropic and Ollama servers on one port, so the gateway
//! can be tried without API keys. By default every request is answered with an echo of its
//! last user message; the flags change that answer for every request (a stream in more or
//! slower chunks, a tool call), for load tests. Requests are not recorded, so the process
//! stays small however long it serves.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use meta_chat_testkit::{FakeServer, FakeToolCall, Reply};

/// Fake OpenAI + Anthropic + Ollama server.
#[derive(Debug, Parser)]
#[command(name = "meta-chat-fake", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "FAKE_BIND_ADDR", default_value = "127.0.0.1:4010")]
    bind: SocketAddr,
    /// Streamed answers come in this many text pieces.
    #[arg(long, default_value_t = 3)]
    chunks: usize,
    /// Pause before each streamed frame, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Answer every chat request with a tool call (`get_weather` for Paris) instead of text.
    #[arg(long)]
    tool_calls: bool,
}

impl Args {
    /// The reply every request gets.
    fn reply(&self) -> Reply {
        let reply = if self.tool_calls {
            Reply::tool_calls(vec![FakeToolCall::new(
                "call_fake_weather",
                "get_weather",
                serde_json::json!({"city": "Paris", "unit": "celsius"}),
            )])
        } else {
            Reply::echo()
        };
        reply
            .in_chunks(self.chunks)
            .with_chunk_delay(Duration::from_millis(self.chunk_delay_ms))
    }
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
    server.set_recording(false);
    server.set_default_reply(args.reply());
    let url = server.url();
    println!("meta-chat-fake listening on {url}");
    println!("  OPENAI_BASE_URL={url} OPENAI_API_KEY=fake");
    println!("  ANTHROPIC_BASE_URL={url} ANTHROPIC_API_KEY=fake");
    println!("  OLLAMA_BASE_URL={url}");
    tokio::signal::ctrl_c().await?;
    drop(server);
    Ok(())
}
