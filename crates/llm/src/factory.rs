//! Building providers from a [`ProviderConfig`] or from the environment (SPEC §3).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use crate::error::{LlmError, Result};
use crate::pricing::PriceTable;
use crate::provider::LlmProvider;
use crate::providers::{AnthropicProvider, OllamaProvider, OpenAiProvider};
use crate::redact::Redacted;
use crate::retry::{RetryPolicy, Retrying};
use crate::types::ProviderKind;

/// Sampling parameters used when a request leaves them unset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingDefaults {
    /// Temperature, 0–2.
    pub temperature: Option<f32>,
    /// Maximum output tokens (Anthropic requires one; `LLM_MAX_TOKENS`).
    pub max_tokens: u32,
    /// Nucleus sampling, 0–1.
    pub top_p: Option<f32>,
}

impl Default for SamplingDefaults {
    fn default() -> Self {
        Self {
            temperature: Some(0.7),
            max_tokens: 1000,
            top_p: None,
        }
    }
}

/// Everything needed to talk to one provider with one model.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Which provider.
    pub provider: ProviderKind,
    /// The chat model.
    pub model: String,
    /// The embedding model, for providers that embed.
    pub embedding_model: Option<String>,
    /// The API key (not needed for Ollama).
    pub api_key: Option<SecretString>,
    /// The server; `None` uses the provider's public endpoint (or `http://localhost:11434`).
    pub base_url: Option<String>,
    /// OpenAI organization id, sent as `OpenAI-Organization`.
    pub organization: Option<String>,
    /// Sampling defaults for requests that leave them unset.
    pub defaults: SamplingDefaults,
    /// Retry and per-attempt timeout policy.
    pub retry: RetryPolicy,
    /// Prices, for [`crate::ProviderInfo::price`].
    pub prices: Arc<PriceTable>,
}

impl ProviderConfig {
    /// The API key, or `provider`'s configuration error naming `variable` (where it is
    /// usually set) when there is none or it is blank.
    pub(crate) fn required_api_key(&self, provider: ProviderKind, variable: &str) -> Result<&str> {
        use secrecy::ExposeSecret;
        self.api_key
            .as_ref()
            .map(|k| k.expose_secret())
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| LlmError::Configuration {
                provider,
                message: format!("no API key configured: set {variable}"),
            })
    }

    /// A configuration with the provider's documented defaults (SPEC §3) for everything but
    /// the provider and model.
    pub fn new(provider: ProviderKind, model: impl Into<String>) -> Self {
        Self {
            provider,
            model: model.into(),
            embedding_model: match provider {
                ProviderKind::OpenAi => Some("text-embedding-3-small".into()),
                ProviderKind::Anthropic => None,
                ProviderKind::Ollama => Some("nomic-embed-text".into()),
            },
            api_key: None,
            base_url: None,
            organization: None,
            defaults: SamplingDefaults::default(),
            retry: RetryPolicy::default(),
            prices: PriceTable::builtin(),
        }
    }

    /// Sets the API key.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(SecretString::from(key.into()));
        self
    }

    /// Sets the server's base URL.
    pub fn with_base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// Sets the retry and timeout policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The base URL to use: the configured one, or the provider's public endpoint.
    pub fn resolved_base_url(&self) -> String {
        let url = self.base_url.as_deref().unwrap_or(match self.provider {
            ProviderKind::OpenAi => "https://api.openai.com",
            ProviderKind::Anthropic => "https://api.anthropic.com",
            ProviderKind::Ollama => "http://localhost:11434",
        });
        normalize_base_url(url)
    }
}

/// Strips trailing slashes and a trailing `/v1` (OpenAI SDKs write base URLs with it; the
/// provider modules add the API path themselves).
pub fn normalize_base_url(url: &str) -> String {
    let trimmed = url.trim().trim_end_matches('/');
    trimmed
        .strip_suffix("/v1")
        .unwrap_or(trimmed)
        .trim_end_matches('/')
        .to_owned()
}

/// Builds a provider from its configuration, wrapped in the configured retry and timeout
/// policy, with its API key redacted from every error it returns ([`Redacted`]), so retries,
/// fallbacks and callers can log errors freely. This is the design's
/// `createLLMProvider(config)`.
pub fn create_provider(config: ProviderConfig) -> Result<Box<dyn LlmProvider>> {
    let retry = config.retry;
    let key = config.api_key.clone();
    Ok(match config.provider {
        ProviderKind::OpenAi => Box::new(Retrying::new(
            Redacted::new(OpenAiProvider::new(config)?, key),
            retry,
        )),
        ProviderKind::Anthropic => Box::new(Retrying::new(
            Redacted::new(AnthropicProvider::new(config)?, key),
            retry,
        )),
        ProviderKind::Ollama => Box::new(Retrying::new(
            Redacted::new(OllamaProvider::new(config)?, key),
            retry,
        )),
    })
}

/// A variable of SPEC §3 that has a bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct EnvError {
    /// The variable's name.
    pub variable: &'static str,
    /// What is wrong with its value.
    pub message: String,
}

/// The library's part of the environment (SPEC §3), read once and validated.
#[derive(Debug, Clone)]
pub struct LlmEnv {
    /// `LLM_PROVIDER`.
    pub default_provider: ProviderKind,
    /// `OPENAI_*`.
    pub openai: ProviderConfig,
    /// `ANTHROPIC_*`.
    pub anthropic: ProviderConfig,
    /// `OLLAMA_*`.
    pub ollama: ProviderConfig,
    /// `EMBEDDINGS_*`: the separate embeddings backend.
    pub embeddings: ProviderConfig,
    /// `LLM_TEMPERATURE`, `LLM_MAX_TOKENS`.
    pub defaults: SamplingDefaults,
    /// `LLM_TIMEOUT`, `LLM_MAX_RETRIES`.
    pub retry: RetryPolicy,
    /// The built-in prices, overridden by `PRICING_FILE`.
    pub prices: Arc<PriceTable>,
}

impl LlmEnv {
    /// Reads the process environment.
    pub fn from_env() -> std::result::Result<Self, EnvError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `lookup` (tests and `.env`-aware callers use this).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<Self, EnvError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let defaults = SamplingDefaults {
            temperature: Some(parse_range(&get, "LLM_TEMPERATURE", 0.7, 0.0, 2.0)?),
            max_tokens: parse_int(&get, "LLM_MAX_TOKENS", 1000, 1)?,
            top_p: None,
        };
        let retry = RetryPolicy {
            max_retries: parse_int(&get, "LLM_MAX_RETRIES", 3, 0)?,
            timeout: Duration::from_millis(parse_int::<u64>(&get, "LLM_TIMEOUT", 30_000, 1)?),
            ..RetryPolicy::default()
        };
        let prices = match get("PRICING_FILE") {
            Some(path) => {
                Arc::new(
                    PriceTable::builtin_with_override_file(&path).map_err(|e| EnvError {
                        variable: "PRICING_FILE",
                        message: e.to_string(),
                    })?,
                )
            }
            None => PriceTable::builtin(),
        };
        let provider = |name: &'static str| -> std::result::Result<ProviderKind, EnvError> {
            get(name)
                .map(|v| v.parse())
                .transpose()
                .map_err(|e: crate::types::UnknownProvider| EnvError {
                    variable: name,
                    message: e.to_string(),
                })
                .map(|p| p.unwrap_or(ProviderKind::OpenAi))
        };
        let base = |kind, model: String| ProviderConfig {
            defaults,
            retry,
            prices: prices.clone(),
            ..ProviderConfig::new(kind, model)
        };

        let mut openai = base(
            ProviderKind::OpenAi,
            get("OPENAI_MODEL").unwrap_or_else(|| "gpt-4o".into()),
        );
        openai.api_key = get("OPENAI_API_KEY").map(SecretString::from);
        openai.base_url = parse_url(&get, "OPENAI_BASE_URL")?;
        openai.organization = get("OPENAI_ORG_ID");
        openai.embedding_model =
            Some(get("OPENAI_EMBEDDING_MODEL").unwrap_or_else(|| "text-embedding-3-small".into()));

        let mut anthropic = base(
            ProviderKind::Anthropic,
            get("ANTHROPIC_MODEL").unwrap_or_else(|| "claude-3-5-sonnet-20241022".into()),
        );
        anthropic.api_key = get("ANTHROPIC_API_KEY").map(SecretString::from);
        anthropic.base_url = parse_url(&get, "ANTHROPIC_BASE_URL")?;

        let mut ollama = base(
            ProviderKind::Ollama,
            get("OLLAMA_MODEL").unwrap_or_else(|| "llama3.1:8b".into()),
        );
        ollama.base_url = parse_url(&get, "OLLAMA_BASE_URL")?;

        let embeddings_kind = provider("EMBEDDINGS_PROVIDER")?;
        let mut embeddings = match embeddings_kind {
            ProviderKind::OpenAi => openai.clone(),
            ProviderKind::Anthropic => anthropic.clone(),
            ProviderKind::Ollama => ollama.clone(),
        };
        if let Some(model) = get("EMBEDDINGS_MODEL") {
            embeddings.embedding_model = Some(model);
        } else if embeddings_kind == ProviderKind::OpenAi {
            embeddings.embedding_model = Some("text-embedding-3-small".into());
        }
        if let Some(key) = get("EMBEDDINGS_API_KEY") {
            embeddings.api_key = Some(SecretString::from(key));
        }

        Ok(Self {
            default_provider: provider("LLM_PROVIDER")?,
            openai,
            anthropic,
            ollama,
            embeddings,
            defaults,
            retry,
            prices,
        })
    }

    /// The configuration of one provider.
    pub fn config(&self, provider: ProviderKind) -> &ProviderConfig {
        match provider {
            ProviderKind::OpenAi => &self.openai,
            ProviderKind::Anthropic => &self.anthropic,
            ProviderKind::Ollama => &self.ollama,
        }
    }

    /// Whether a provider has what it needs to be called: an API key for OpenAI and
    /// Anthropic; Ollama needs none (its server must be running).
    pub fn is_configured(&self, provider: ProviderKind) -> bool {
        match provider {
            ProviderKind::OpenAi | ProviderKind::Anthropic => {
                self.config(provider).api_key.is_some()
            }
            ProviderKind::Ollama => true,
        }
    }

    /// Each provider, with whether it is configured.
    pub fn providers(&self) -> BTreeMap<ProviderKind, bool> {
        ProviderKind::ALL
            .into_iter()
            .map(|p| (p, self.is_configured(p)))
            .collect()
    }

    /// Builds one provider from the environment's configuration.
    pub fn create(&self, provider: ProviderKind) -> Result<Box<dyn LlmProvider>> {
        if !self.is_configured(provider) {
            let variable = match provider {
                ProviderKind::OpenAi => "OPENAI_API_KEY",
                ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
                ProviderKind::Ollama => "OLLAMA_BASE_URL",
            };
            return Err(LlmError::Configuration {
                provider,
                message: format!("not configured: set {variable}"),
            });
        }
        create_provider(self.config(provider).clone())
    }
}

fn parse_int<T>(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: T,
    min: T,
) -> std::result::Result<T, EnvError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let Some(raw) = get(name) else {
        return Ok(default);
    };
    let value: T = raw.trim().parse().map_err(|_| EnvError {
        variable: name,
        message: format!("`{raw}` is not a whole number"),
    })?;
    if value < min {
        return Err(EnvError {
            variable: name,
            message: format!("must be at least {min}, got {value}"),
        });
    }
    Ok(value)
}

fn parse_range(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: f32,
    min: f32,
    max: f32,
) -> std::result::Result<f32, EnvError> {
    let Some(raw) = get(name) else {
        return Ok(default);
    };
    match raw.trim().parse::<f32>() {
        Ok(value) if (min..=max).contains(&value) => Ok(value),
        _ => Err(EnvError {
            variable: name,
            message: format!("`{raw}` is not a number from {min} to {max}"),
        }),
    }
}

fn parse_url(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
) -> std::result::Result<Option<String>, EnvError> {
    let Some(raw) = get(name) else {
        return Ok(None);
    };
    match url::Url::parse(raw.trim()) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            Ok(Some(raw.trim().to_owned()))
        }
        _ => Err(EnvError {
            variable: name,
            message: format!("`{raw}` is not an http(s) URL"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn env(pairs: &[(&str, &str)]) -> std::result::Result<LlmEnv, EnvError> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        LlmEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[tokio::test]
    async fn a_missing_or_blank_key_fails_the_request_naming_its_variable() {
        use crate::CompletionRequest;
        for (provider, variable) in [
            (ProviderKind::OpenAi, "OPENAI_API_KEY"),
            (ProviderKind::Anthropic, "ANTHROPIC_API_KEY"),
        ] {
            for key in [None, Some("  ")] {
                let mut config = ProviderConfig::new(provider, "some-model");
                config.api_key = key.map(|k| SecretString::from(k.to_owned()));
                // Nothing listens there: the request must fail before it is sent.
                config.base_url = Some("http://127.0.0.1:9".into());
                let built = create_provider(config).expect("a provider");
                let error = built
                    .complete(&CompletionRequest::default())
                    .await
                    .expect_err("no key");
                assert!(
                    matches!(&error, LlmError::Configuration { provider: p, message }
                        if *p == provider && message.contains(variable)),
                    "{error:?}"
                );
            }
        }
    }

    #[test]
    fn defaults_follow_the_spec() {
        let env = env(&[]).unwrap();
        assert_eq!(env.default_provider, ProviderKind::OpenAi);
        assert_eq!(env.openai.model, "gpt-4o");
        assert_eq!(env.anthropic.model, "claude-3-5-sonnet-20241022");
        assert_eq!(env.ollama.model, "llama3.1:8b");
        assert_eq!(env.ollama.resolved_base_url(), "http://localhost:11434");
        assert_eq!(env.defaults.max_tokens, 1000);
        assert_eq!(env.defaults.temperature, Some(0.7));
        assert_eq!(env.retry.max_retries, 3);
        assert_eq!(env.retry.timeout, Duration::from_secs(30));
        assert!(!env.is_configured(ProviderKind::OpenAi));
        assert!(env.is_configured(ProviderKind::Ollama));
    }

    #[test]
    fn reads_every_provider_variable() {
        let env = env(&[
            ("LLM_PROVIDER", "anthropic"),
            ("OPENAI_API_KEY", "sk-test"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
            ("OPENAI_ORG_ID", "org-1"),
            ("ANTHROPIC_API_KEY", "sk-ant"),
            ("LLM_TIMEOUT", "1500"),
            ("LLM_MAX_RETRIES", "0"),
            ("EMBEDDINGS_PROVIDER", "ollama"),
            ("EMBEDDINGS_MODEL", "nomic-embed-text"),
        ])
        .unwrap();
        assert_eq!(env.default_provider, ProviderKind::Anthropic);
        assert_eq!(env.openai.resolved_base_url(), "http://127.0.0.1:9");
        assert_eq!(env.openai.organization.as_deref(), Some("org-1"));
        assert_eq!(
            env.openai.api_key.as_ref().unwrap().expose_secret(),
            "sk-test"
        );
        assert_eq!(env.retry.timeout, Duration::from_millis(1500));
        assert_eq!(env.retry.max_retries, 0);
        assert_eq!(env.embeddings.provider, ProviderKind::Ollama);
        assert_eq!(
            env.embeddings.embedding_model.as_deref(),
            Some("nomic-embed-text")
        );
    }

    #[test]
    fn embeddings_key_falls_back_to_the_openai_key() {
        let env = env(&[("OPENAI_API_KEY", "sk-test")]).unwrap();
        assert_eq!(
            env.embeddings.api_key.as_ref().unwrap().expose_secret(),
            "sk-test"
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            ("LLM_PROVIDER", "gemini"),
            ("LLM_TEMPERATURE", "3"),
            ("LLM_MAX_TOKENS", "0"),
            ("LLM_TIMEOUT", "soon"),
            ("LLM_MAX_RETRIES", "-1"),
            ("OPENAI_BASE_URL", "ftp://x"),
            ("EMBEDDINGS_PROVIDER", "cohere"),
            ("PRICING_FILE", "/nonexistent/prices.json"),
        ] {
            let err = env(&[(name, value)]).unwrap_err();
            assert_eq!(err.variable, name, "{err}");
        }
    }

    #[test]
    fn normalizes_base_urls() {
        assert_eq!(normalize_base_url("https://x.io/v1"), "https://x.io");
        assert_eq!(normalize_base_url("https://x.io/v1/"), "https://x.io");
        assert_eq!(normalize_base_url("https://x.io/"), "https://x.io");
        assert_eq!(
            normalize_base_url("https://x.io/proxy"),
            "https://x.io/proxy"
        );
    }
}
