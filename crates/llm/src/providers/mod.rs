//! The three provider adapters. Each owns its private wire types and the mapping to and
//! from the unified types; none knows about the others.

mod anthropic;
mod ollama;
mod openai;

pub use anthropic::AnthropicProvider;
pub use ollama::OllamaProvider;
pub use openai::OpenAiProvider;

use crate::factory::ProviderConfig;
use crate::types::{Capabilities, ProviderInfo};

/// The provider info of a configuration, with its price from the configured table.
pub(crate) fn info_for(config: &ProviderConfig, capabilities: Capabilities) -> ProviderInfo {
    let price = config.prices.price(config.provider, &config.model);
    ProviderInfo {
        provider: config.provider,
        model: config.model.clone(),
        embedding_model: config.embedding_model.clone(),
        context_window: price.and_then(|p| p.context_window),
        capabilities,
        price,
    }
}

/// A response id for upstreams that give none.
pub(crate) fn generated_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + 24);
    id.push_str(prefix);
    id.extend(std::iter::repeat_with(fastrand::alphanumeric).take(24));
    id
}
