//! Which provider and model serve a tenant's request (SPEC §4.3), and the fallback chain
//! behind it (SPEC §4.2 `fallback`).
//!
//! Every provider configuration starts from the environment's (system key, base URL, sampling
//! defaults, retry policy, prices) and is overlaid with what the tenant set for that provider:
//! its own key, base URL and sampling defaults.

use axum::http::StatusCode;
use meta_chat_llm::{LlmEnv, ProviderConfig, ProviderKind};
use secrecy::SecretString;

use crate::api::error::ApiError;
use crate::settings::{FallbackSettings, LlmSettings, TenantSettings};

/// The primary provider configuration and the fallback entries `(priority, config)`, sorted
/// by priority (stable for equal priorities).
pub type Route = (ProviderConfig, Vec<(u32, ProviderConfig)>);

/// Resolves a request's model against the tenant's settings and the environment.
///
/// - `None` or `"default"`: the tenant's `llm.provider` and `llm.model`; without a provider,
///   `LLM_PROVIDER`; without a model, the provider's environment model (`OPENAI_MODEL`, …).
/// - `"provider/model"` with a known provider prefix: that provider and model.
/// - any other name: the tenant's provider with that model.
///
/// The tenant's `apiKey`, `baseUrl`, `temperature`, `maxTokens` and `topP` apply only when
/// the chosen provider is the tenant's `llm.provider` (a key is never sent to another
/// provider).
///
/// # Errors
///
/// 400 `invalid_value` (param `model`) for `"provider/"` with an empty model.
pub fn provider_config(
    env: &LlmEnv,
    settings: &TenantSettings,
    requested_model: Option<&str>,
) -> Result<Route, ApiError> {
    let llm = settings.llm.as_ref();
    let tenant_provider = llm.and_then(|l| l.provider).unwrap_or(env.default_provider);
    let requested = requested_model
        .map(str::trim)
        .filter(|m| !m.is_empty() && *m != "default");

    let (provider, model) = match requested {
        None => (tenant_provider, llm.and_then(|l| l.model.clone())),
        Some(name) => match split_provider(name) {
            Some((provider, model)) => {
                if model.trim().is_empty() {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_value",
                        format!("`{name}` names no model after the provider"),
                    )
                    .with_param("model"));
                }
                (provider, Some(model.to_owned()))
            }
            None => (tenant_provider, Some(name.to_owned())),
        },
    };

    let mut primary = env.config(provider).clone();
    if let Some(model) = model {
        primary.model = model;
    }
    if let Some(llm) = llm.filter(|l| l.provider.unwrap_or(env.default_provider) == provider) {
        overlay_llm(&mut primary, llm);
    }

    let mut fallback: Vec<(u32, ProviderConfig)> = settings
        .fallback
        .iter()
        .flatten()
        .map(|entry| (entry.priority, fallback_config(env, entry)))
        .collect();
    fallback.sort_by_key(|(priority, _)| *priority);
    Ok((primary, fallback))
}

/// `openai/gpt-4o` → (OpenAI, `gpt-4o`); `None` when the prefix is no known provider (so
/// `meta-llama/Llama-3` stays a bare model name).
fn split_provider(name: &str) -> Option<(ProviderKind, &str)> {
    let (prefix, model) = name.split_once('/')?;
    let provider = prefix.parse::<ProviderKind>().ok()?;
    Some((provider, model))
}

/// The embeddings provider for a request: the tenant's `embeddings` settings (provider,
/// model, key, base URL), else the `EMBEDDINGS_*` environment. A requested
/// `"provider/model"` picks that provider (with the tenant's key only when it is the tenant's
/// embeddings provider); a bare model keeps the provider. The model is in
/// [`ProviderConfig::embedding_model`].
///
/// # Errors
///
/// 400 `invalid_value` (param `model`) for `"provider/"` with an empty model.
pub fn embeddings_config(
    env: &LlmEnv,
    settings: &TenantSettings,
    requested_model: Option<&str>,
) -> Result<ProviderConfig, ApiError> {
    let tenant = settings.embeddings.as_ref();
    let tenant_provider = tenant
        .and_then(|e| e.provider)
        .unwrap_or(env.embeddings.provider);
    let base = |provider: ProviderKind| {
        if provider == env.embeddings.provider {
            env.embeddings.clone()
        } else {
            env.config(provider).clone()
        }
    };
    let requested = requested_model
        .map(str::trim)
        .filter(|m| !m.is_empty() && *m != "default");
    let (provider, model) = match requested {
        None => (tenant_provider, tenant.and_then(|e| e.model.clone())),
        Some(name) => match split_provider(name) {
            Some((_, model)) if model.trim().is_empty() => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_value",
                    format!("`{name}` names no model after the provider"),
                )
                .with_param("model"));
            }
            Some((provider, model)) => (provider, Some(model.to_owned())),
            None => (tenant_provider, Some(name.to_owned())),
        },
    };
    let mut config = base(provider);
    if provider == tenant_provider
        && let Some(tenant) = tenant
    {
        if let Some(key) = &tenant.api_key {
            config.api_key = Some(SecretString::from(key.clone()));
        }
        if let Some(url) = &tenant.base_url {
            config.base_url = Some(url.clone());
        }
    }
    if let Some(model) = model {
        config.embedding_model = Some(model);
    }
    Ok(config)
}

fn overlay_llm(config: &mut ProviderConfig, llm: &LlmSettings) {
    if let Some(key) = &llm.api_key {
        config.api_key = Some(SecretString::from(key.clone()));
    }
    if let Some(url) = &llm.base_url {
        config.base_url = Some(url.clone());
    }
    if let Some(temperature) = llm.temperature {
        config.defaults.temperature = Some(temperature as f32);
    }
    if let Some(max_tokens) = llm.max_tokens {
        config.defaults.max_tokens = u32::try_from(max_tokens).unwrap_or(u32::MAX);
    }
    if let Some(top_p) = llm.top_p {
        config.defaults.top_p = Some(top_p as f32);
    }
}

fn fallback_config(env: &LlmEnv, entry: &FallbackSettings) -> ProviderConfig {
    let mut config = env.config(entry.provider).clone();
    if let Some(model) = &entry.model {
        config.model = model.clone();
    }
    if let Some(key) = &entry.api_key {
        config.api_key = Some(SecretString::from(key.clone()));
    }
    if let Some(url) = &entry.base_url {
        config.base_url = Some(url.clone());
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn env(pairs: &[(&str, &str)]) -> LlmEnv {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        LlmEnv::from_lookup(|k| map.get(k).cloned()).unwrap()
    }

    fn system_env() -> LlmEnv {
        env(&[
            ("OPENAI_API_KEY", "sk-system-openai"),
            ("ANTHROPIC_API_KEY", "sk-system-anthropic"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:1"),
            ("ANTHROPIC_MODEL", "claude-env"),
            ("OLLAMA_MODEL", "llama-env"),
            ("LLM_MAX_TOKENS", "500"),
        ])
    }

    fn settings(value: serde_json::Value) -> TenantSettings {
        TenantSettings::parse(&value).unwrap()
    }

    fn key(config: &ProviderConfig) -> Option<&str> {
        config.api_key.as_ref().map(|k| k.expose_secret())
    }

    #[test]
    fn no_settings_use_the_environment_default() {
        let (primary, fallback) =
            provider_config(&system_env(), &TenantSettings::default(), None).unwrap();
        assert_eq!(primary.provider, ProviderKind::OpenAi);
        assert_eq!(primary.model, "gpt-4o");
        assert_eq!(key(&primary), Some("sk-system-openai"));
        assert_eq!(primary.defaults.max_tokens, 500);
        assert!(fallback.is_empty());

        let env = env(&[("LLM_PROVIDER", "ollama"), ("OLLAMA_MODEL", "qwen")]);
        let (primary, _) =
            provider_config(&env, &TenantSettings::default(), Some("default")).unwrap();
        assert_eq!(primary.provider, ProviderKind::Ollama);
        assert_eq!(primary.model, "qwen");
    }

    #[test]
    fn default_uses_the_tenant_llm_settings() {
        let tenant = settings(json!({"llm": {
            "provider": "anthropic", "model": "claude-3-haiku-20240307", "apiKey": "sk-tenant",
            "baseUrl": "http://tenant.example", "temperature": 0.2, "maxTokens": 64, "topP": 0.5
        }}));
        for requested in [None, Some("default")] {
            let (primary, _) = provider_config(&system_env(), &tenant, requested).unwrap();
            assert_eq!(primary.provider, ProviderKind::Anthropic);
            assert_eq!(primary.model, "claude-3-haiku-20240307");
            assert_eq!(key(&primary), Some("sk-tenant"));
            assert_eq!(primary.base_url.as_deref(), Some("http://tenant.example"));
            assert_eq!(primary.defaults.temperature, Some(0.2));
            assert_eq!(primary.defaults.max_tokens, 64);
            assert_eq!(primary.defaults.top_p, Some(0.5));
        }
    }

    #[test]
    fn tenant_provider_without_model_uses_the_env_model() {
        let tenant = settings(json!({"llm": {"provider": "ollama"}}));
        let (primary, _) = provider_config(&system_env(), &tenant, None).unwrap();
        assert_eq!(primary.provider, ProviderKind::Ollama);
        assert_eq!(primary.model, "llama-env");
    }

    #[test]
    fn a_bare_model_uses_the_tenant_provider() {
        let tenant = settings(json!({"llm": {"provider": "anthropic", "apiKey": "sk-tenant"}}));
        let (primary, _) = provider_config(&system_env(), &tenant, Some("claude-x")).unwrap();
        assert_eq!(primary.provider, ProviderKind::Anthropic);
        assert_eq!(primary.model, "claude-x");
        assert_eq!(key(&primary), Some("sk-tenant"));
        // An unknown prefix is part of a bare model name.
        let (primary, _) =
            provider_config(&system_env(), &tenant, Some("meta-llama/Llama-3")).unwrap();
        assert_eq!(primary.provider, ProviderKind::Anthropic);
        assert_eq!(primary.model, "meta-llama/Llama-3");
    }

    #[test]
    fn provider_prefix_picks_that_provider_with_the_system_key() {
        let tenant = settings(
            json!({"llm": {"provider": "anthropic", "apiKey": "sk-tenant",
                                             "temperature": 0.1}}),
        );
        let (primary, _) =
            provider_config(&system_env(), &tenant, Some("openai/gpt-4o-mini")).unwrap();
        assert_eq!(primary.provider, ProviderKind::OpenAi);
        assert_eq!(primary.model, "gpt-4o-mini");
        assert_eq!(
            key(&primary),
            Some("sk-system-openai"),
            "an Anthropic key must never go to OpenAI"
        );
        assert_eq!(primary.base_url.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(primary.defaults.temperature, Some(0.7));

        let (primary, _) =
            provider_config(&system_env(), &tenant, Some("anthropic/claude-y")).unwrap();
        assert_eq!(primary.model, "claude-y");
        assert_eq!(key(&primary), Some("sk-tenant"));
        assert_eq!(primary.defaults.temperature, Some(0.1));

        let error = provider_config(&system_env(), &tenant, Some("openai/")).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert_eq!(error.param.as_deref(), Some("model"));
    }

    #[test]
    fn embeddings_use_the_tenant_settings_else_the_environment() {
        let env = env(&[
            ("OPENAI_API_KEY", "sk-system-openai"),
            ("EMBEDDINGS_MODEL", "text-embedding-3-large"),
        ]);
        let config = embeddings_config(&env, &TenantSettings::default(), None).unwrap();
        assert_eq!(config.provider, ProviderKind::OpenAi);
        assert_eq!(
            config.embedding_model.as_deref(),
            Some("text-embedding-3-large")
        );
        assert_eq!(key(&config), Some("sk-system-openai"));

        let tenant = settings(json!({"embeddings": {"provider": "ollama",
            "model": "nomic-embed-text", "baseUrl": "http://ollama.example"}}));
        let config = embeddings_config(&env, &tenant, None).unwrap();
        assert_eq!(config.provider, ProviderKind::Ollama);
        assert_eq!(config.embedding_model.as_deref(), Some("nomic-embed-text"));
        assert_eq!(config.base_url.as_deref(), Some("http://ollama.example"));

        let tenant = settings(json!({"embeddings": {"apiKey": "sk-tenant"}}));
        let config = embeddings_config(&env, &tenant, Some("text-embedding-3-small")).unwrap();
        assert_eq!(config.provider, ProviderKind::OpenAi);
        assert_eq!(key(&config), Some("sk-tenant"));
        assert_eq!(
            config.embedding_model.as_deref(),
            Some("text-embedding-3-small")
        );
        let config = embeddings_config(&env, &tenant, Some("ollama/all-minilm")).unwrap();
        assert_eq!(config.provider, ProviderKind::Ollama);
        assert_eq!(key(&config), None);
        assert_eq!(config.embedding_model.as_deref(), Some("all-minilm"));
    }

    #[test]
    fn fallback_entries_are_sorted_and_keyed() {
        let tenant = settings(json!({
            "llm": {"provider": "anthropic", "apiKey": "sk-tenant"},
            "fallback": [
                {"provider": "ollama", "model": "llama3.1:8b", "priority": 3},
                {"provider": "openai", "model": "gpt-4o-mini", "priority": 2,
                 "apiKey": "sk-fallback", "baseUrl": "http://fallback.example"},
                {"provider": "anthropic", "priority": 5}
            ]
        }));
        let (_, fallback) = provider_config(&system_env(), &tenant, None).unwrap();
        let order: Vec<(u32, ProviderKind, &str)> = fallback
            .iter()
            .map(|(p, c)| (*p, c.provider, c.model.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                (2, ProviderKind::OpenAi, "gpt-4o-mini"),
                (3, ProviderKind::Ollama, "llama3.1:8b"),
                (5, ProviderKind::Anthropic, "claude-env"),
            ]
        );
        assert_eq!(key(&fallback[0].1), Some("sk-fallback"));
        assert_eq!(
            fallback[0].1.base_url.as_deref(),
            Some("http://fallback.example")
        );
        assert_eq!(key(&fallback[1].1), None);
        assert_eq!(
            key(&fallback[2].1),
            Some("sk-system-anthropic"),
            "a fallback entry uses its own key or the system key"
        );
    }
}
