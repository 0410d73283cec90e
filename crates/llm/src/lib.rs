//! # meta-chat-llm
//!
//! One interface over OpenAI, Anthropic and Ollama: chat completion, streaming, tool
//! (function) calling, embeddings and provider info, with retries, timeouts, fallback
//! between providers and cost in integer nano-dollars.
//!
//! ```no_run
//! use meta_chat_llm::{create_provider, CompletionRequest, Message, ProviderConfig, ProviderKind, Tool};
//! use serde_json::json;
//!
//! # async fn run() -> Result<(), meta_chat_llm::LlmError> {
//! // Create a provider from a tenant's configuration.
//! let provider = create_provider(
//!     ProviderConfig::new(ProviderKind::OpenAi, "gpt-4o").with_api_key("sk-proj-..."),
//! )?;
//!
//! let search_knowledge_base = Tool::new(
//!     "search_knowledge_base",
//!     "Search the tenant's knowledge base",
//!     json!({"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}),
//! );
//!
//! // Use the unified interface, whatever the provider.
//! let response = provider
//!     .complete(
//!         &CompletionRequest::new(vec![
//!             Message::system("You are a helpful assistant."),
//!             Message::user("What is 2+2?"),
//!         ])
//!         .with_tools(vec![search_knowledge_base])
//!         .with_temperature(0.7),
//!     )
//!     .await?;
//! println!("{} ({} tokens)", response.message.content, response.usage.total());
//! # Ok(())
//! # }
//! ```

pub mod error;
pub mod factory;
pub mod fallback;
mod h1;
mod h2c;
mod http;
pub mod pricing;
pub mod provider;
pub mod providers;
pub mod redact;
pub mod retry;
pub mod types;

pub use error::{LlmError, Result};
pub use factory::{EnvError, LlmEnv, ProviderConfig, SamplingDefaults, create_provider};
pub use fallback::{FailedAttempt, FallbackChain, FallbackEntry, FallbackExhausted, Served};
pub use http::{Http2Mode, HttpOptions, configure_http, install_crypto_provider, json_from_bytes};
pub use pricing::{Cost, ModelPrice, PriceTable};
pub use provider::{ChunkStream, LlmProvider};
pub use redact::Redacted;
pub use retry::{RetryPolicy, Retrying};
pub use types::*;
