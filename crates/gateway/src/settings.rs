//! Tenant settings (SPEC §4.2): the schema, its validation, and merging a partial update.

use meta_chat_llm::ProviderKind;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A tenant's settings. Every section is optional; unset fields use the system defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantSettings {
    /// The chat provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmSettings>,
    /// The embeddings provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<EmbeddingSettings>,
    /// Providers tried, by priority, when the primary fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Vec<FallbackSettings>>,
    /// Request and token limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSettings>,
    /// Response cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSettings>,
    /// Hard spending limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSettings>,
    /// Daily spend (USD) above which an alert is raised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_alert_threshold: Option<f64>,
}

/// `llm`: the tenant's chat provider and sampling defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LlmSettings {
    /// `openai`, `anthropic` or `ollama`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderKind>,
    /// The model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The tenant's own provider key; encrypted at rest, masked when shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// An http(s) URL of an endpoint speaking the provider's protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// 0–2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// At least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
}

/// `embeddings`: the tenant's embeddings provider.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EmbeddingSettings {
    /// `openai` or `ollama` (Anthropic has no embeddings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderKind>,
    /// The embedding model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The tenant's own key; encrypted at rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// An http(s) URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

/// One entry of `fallback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackSettings {
    /// The provider.
    pub provider: ProviderKind,
    /// Its model; the system default for the provider when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Lower goes first.
    #[serde(default)]
    pub priority: u32,
    /// The tenant's own key for this provider; encrypted at rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// An http(s) URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

/// `rateLimit`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSettings {
    /// At least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// At least 1; input plus output tokens per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
}

/// `cache`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheSettings {
    /// Whether answers are cached.
    #[serde(default)]
    pub enabled: bool,
    /// At least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// `budget`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetSettings {
    /// USD per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_usd: Option<f64>,
    /// USD per calendar month (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_usd: Option<f64>,
}

/// A setting that is not valid, named by its JSON path (such as `llm.temperature`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SettingsError {
    /// The JSON path of the field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn error(field: impl Into<String>, message: impl Into<String>) -> SettingsError {
    SettingsError {
        field: field.into(),
        message: message.into(),
    }
}

impl TenantSettings {
    /// Parses and validates settings JSON. Errors name the offending field.
    pub fn parse(value: &Value) -> Result<Self, SettingsError> {
        let settings: Self = serde_path_error(value)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every documented range (SPEC §4.2).
    pub fn validate(&self) -> Result<(), SettingsError> {
        if let Some(llm) = &self.llm {
            check_range("llm.temperature", llm.temperature, 0.0, 2.0)?;
            check_range("llm.topP", llm.top_p, 0.0, 1.0)?;
            check_min("llm.maxTokens", llm.max_tokens)?;
            check_url("llm.baseUrl", llm.base_url.as_deref())?;
            check_text("llm.model", llm.model.as_deref())?;
        }
        if let Some(embeddings) = &self.embeddings {
            if embeddings.provider == Some(ProviderKind::Anthropic) {
                return Err(error(
                    "embeddings.provider",
                    "anthropic has no embeddings; use openai or ollama",
                ));
            }
            check_url("embeddings.baseUrl", embeddings.base_url.as_deref())?;
            check_text("embeddings.model", embeddings.model.as_deref())?;
        }
        for (i, entry) in self.fallback.iter().flatten().enumerate() {
            check_url(&format!("fallback[{i}].baseUrl"), entry.base_url.as_deref())?;
            check_text(&format!("fallback[{i}].model"), entry.model.as_deref())?;
        }
        if let Some(limits) = &self.rate_limit {
            check_min("rateLimit.requestsPerMinute", limits.requests_per_minute)?;
            check_min("rateLimit.tokensPerDay", limits.tokens_per_day)?;
        }
        if let Some(cache) = &self.cache {
            check_min("cache.ttlSeconds", cache.ttl_seconds)?;
        }
        if let Some(budget) = &self.budget {
            check_positive("budget.dailyUsd", budget.daily_usd)?;
            check_positive("budget.monthlyUsd", budget.monthly_usd)?;
        }
        check_positive("costAlertThreshold", self.cost_alert_threshold)?;
        Ok(())
    }

    /// Replaces the sections present in `update` and keeps the others (SPEC §4.2 `PUT`).
    /// A section's `apiKey` left out of the update keeps the stored key.
    pub fn merge(&mut self, update: TenantSettings) {
        // A stored key is kept only for the same provider: an OpenAI key must never be sent
        // to Anthropic because a tenant switched providers without giving a new key.
        if let Some(mut llm) = update.llm {
            if llm.api_key.is_none() {
                llm.api_key = self
                    .llm
                    .as_ref()
                    .filter(|old| old.provider == llm.provider)
                    .and_then(|old| old.api_key.clone());
            }
            self.llm = Some(llm);
        }
        if let Some(mut embeddings) = update.embeddings {
            if embeddings.api_key.is_none() {
                embeddings.api_key = self
                    .embeddings
                    .as_ref()
                    .filter(|old| old.provider == embeddings.provider)
                    .and_then(|old| old.api_key.clone());
            }
            self.embeddings = Some(embeddings);
        }
        if update.fallback.is_some() {
            self.fallback = update.fallback;
        }
        if update.rate_limit.is_some() {
            self.rate_limit = update.rate_limit;
        }
        if update.cache.is_some() {
            self.cache = update.cache;
        }
        if update.budget.is_some() {
            self.budget = update.budget;
        }
        if update.cost_alert_threshold.is_some() {
            self.cost_alert_threshold = update.cost_alert_threshold;
        }
    }

    /// Removes the sections `update` sets to `null`: `{"costAlertThreshold": null}` turns the
    /// alert off, `{"budget": null}` drops the budgets, `{"llm": null}` goes back to the
    /// system default provider.
    pub fn clear_nulls(&mut self, update: &Value) {
        let Some(sections) = update.as_object() else {
            return;
        };
        for (section, value) in sections {
            if !value.is_null() {
                continue;
            }
            match section.as_str() {
                "llm" => self.llm = None,
                "embeddings" => self.embeddings = None,
                "fallback" => self.fallback = None,
                "rateLimit" => self.rate_limit = None,
                "cache" => self.cache = None,
                "budget" => self.budget = None,
                "costAlertThreshold" => self.cost_alert_threshold = None,
                _ => {}
            }
        }
    }

    /// Every secret field, as (field name, value) pairs, for encryption and masking.
    pub fn secrets_mut(&mut self) -> Vec<(String, &mut String)> {
        let mut out = Vec::new();
        if let Some(key) = self.llm.as_mut().and_then(|l| l.api_key.as_mut()) {
            out.push(("llm.apiKey".to_owned(), key));
        }
        if let Some(key) = self.embeddings.as_mut().and_then(|e| e.api_key.as_mut()) {
            out.push(("embeddings.apiKey".to_owned(), key));
        }
        for (i, entry) in self.fallback.iter_mut().flatten().enumerate() {
            if let Some(key) = entry.api_key.as_mut() {
                out.push((format!("fallback[{i}].apiKey"), key));
            }
        }
        out
    }
}

/// Deserialises with the failing field's JSON path in the error.
fn serde_path_error(value: &Value) -> Result<TenantSettings, SettingsError> {
    if !value.is_object() {
        return Err(error("settings", "must be an object"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let field = match path.as_str() {
            "." | "" => unknown_field(&inner).unwrap_or_else(|| "settings".to_owned()),
            path => path.to_owned(),
        };
        error(field, inner)
    })
}

/// The name serde quotes in "unknown field `x`, expected …".
fn unknown_field(message: &str) -> Option<String> {
    message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name.to_owned())
}

fn check_range(field: &str, value: Option<f64>, min: f64, max: f64) -> Result<(), SettingsError> {
    match value {
        Some(v) if !(v.is_finite() && (min..=max).contains(&v)) => Err(error(
            field,
            format!("must be between {min} and {max}, got {v}"),
        )),
        _ => Ok(()),
    }
}

fn check_min(field: &str, value: Option<u64>) -> Result<(), SettingsError> {
    match value {
        Some(0) => Err(error(field, "must be at least 1")),
        _ => Ok(()),
    }
}

fn check_positive(field: &str, value: Option<f64>) -> Result<(), SettingsError> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0) => Err(error(
            field,
            format!("must be a positive USD amount, got {v}"),
        )),
        _ => Ok(()),
    }
}

fn check_text(field: &str, value: Option<&str>) -> Result<(), SettingsError> {
    match value {
        Some(v) if v.trim().is_empty() || v.len() > 200 => {
            Err(error(field, "must be 1 to 200 characters"))
        }
        _ => Ok(()),
    }
}

fn check_url(field: &str, value: Option<&str>) -> Result<(), SettingsError> {
    let Some(raw) = value else {
        return Ok(());
    };
    let valid = raw
        .split_once("://")
        .is_some_and(|(scheme, rest)| matches!(scheme, "http" | "https") && !rest.is_empty());
    if valid {
        Ok(())
    } else {
        Err(error(field, "must be an http(s) URL"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(value: Value) -> String {
        TenantSettings::parse(&value).unwrap_err().field
    }

    #[test]
    fn the_spec_example_is_valid() {
        let settings = TenantSettings::parse(&json!({
            "llm": {"provider": "anthropic", "model": "claude-3-5-sonnet-20241022",
                    "apiKey": "sk-ant-x", "baseUrl": null, "temperature": 0.7,
                    "maxTokens": 1000, "topP": 1.0},
            "embeddings": {"provider": "openai", "model": "text-embedding-3-small", "apiKey": "k"},
            "fallback": [{"provider": "openai", "model": "gpt-4o-mini", "priority": 2},
                         {"provider": "ollama", "model": "llama3.1:8b", "priority": 3}],
            "rateLimit": {"requestsPerMinute": 10, "tokensPerDay": 100000},
            "cache": {"enabled": true, "ttlSeconds": 3600},
            "budget": {"dailyUsd": 50, "monthlyUsd": 1000},
            "costAlertThreshold": 100
        }))
        .unwrap();
        assert_eq!(
            settings.llm.as_ref().unwrap().provider,
            Some(ProviderKind::Anthropic)
        );
        assert_eq!(settings.fallback.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn invalid_values_name_their_field() {
        assert_eq!(
            field_of(json!({"llm": {"temperature": 3}})),
            "llm.temperature"
        );
        assert_eq!(field_of(json!({"llm": {"topP": 1.5}})), "llm.topP");
        assert_eq!(field_of(json!({"llm": {"maxTokens": 0}})), "llm.maxTokens");
        assert_eq!(
            field_of(json!({"llm": {"provider": "gemini"}})),
            "llm.provider"
        );
        assert_eq!(
            field_of(json!({"llm": {"baseUrl": "ftp://x"}})),
            "llm.baseUrl"
        );
        assert_eq!(
            field_of(json!({"rateLimit": {"requestsPerMinute": 0}})),
            "rateLimit.requestsPerMinute"
        );
        assert_eq!(
            field_of(json!({"cache": {"ttlSeconds": 0}})),
            "cache.ttlSeconds"
        );
        assert_eq!(
            field_of(json!({"budget": {"dailyUsd": -1}})),
            "budget.dailyUsd"
        );
        assert_eq!(
            field_of(json!({"embeddings": {"provider": "anthropic"}})),
            "embeddings.provider"
        );
        assert_eq!(
            field_of(json!({"fallback": [{"provider": "openai", "baseUrl": "x"}]})),
            "fallback[0].baseUrl"
        );
        assert_eq!(
            field_of(json!({"llm": {"temprature": 1}})),
            "llm.temprature"
        );
        assert_eq!(field_of(json!({"colour": "blue"})), "colour");
        assert_eq!(field_of(json!([1, 2])), "settings");
        assert_eq!(
            field_of(json!({"llm": {"temperature": "hot"}})),
            "llm.temperature"
        );
        assert_eq!(
            field_of(json!({"fallback": [{"provider": "openai", "priority": "first"}]})),
            "fallback[0].priority"
        );
    }

    #[test]
    fn merge_replaces_given_sections_and_keeps_keys() {
        let mut stored = TenantSettings::parse(&json!({
            "llm": {"provider": "openai", "model": "gpt-4o", "apiKey": "sk-old"},
            "cache": {"enabled": true}
        }))
        .unwrap();
        let same_provider =
            TenantSettings::parse(&json!({"llm": {"provider": "openai", "model": "gpt-4o-mini"}}))
                .unwrap();
        stored.merge(same_provider);
        let llm = stored.llm.as_ref().unwrap();
        assert_eq!(llm.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(llm.api_key.as_deref(), Some("sk-old"));
        assert!(stored.cache.as_ref().unwrap().enabled);
        let other_provider = TenantSettings::parse(
            &json!({"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307"}}),
        )
        .unwrap();
        stored.merge(other_provider);
        let llm = stored.llm.as_ref().unwrap();
        assert_eq!(llm.provider, Some(ProviderKind::Anthropic));
        assert_eq!(llm.api_key, None, "another provider's key must not be kept");
    }

    #[test]
    fn secrets_are_listed_with_their_field_names() {
        let mut settings = TenantSettings::parse(&json!({
            "llm": {"apiKey": "a"}, "embeddings": {"apiKey": "b"},
            "fallback": [{"provider": "openai"}, {"provider": "anthropic", "apiKey": "c"}]
        }))
        .unwrap();
        let names: Vec<String> = settings.secrets_mut().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            ["llm.apiKey", "embeddings.apiKey", "fallback[1].apiKey"]
        );
    }
}
