//! One error type for every provider, saying whether retrying or falling back can help.

use std::time::Duration;

use crate::types::ProviderKind;

/// Result with [`LlmError`].
pub type Result<T, E = LlmError> = std::result::Result<T, E>;

/// Everything that can go wrong talking to a provider.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LlmError {
    /// The provider rejected the credentials (401), or they lack permission (403).
    #[error("{provider}: authentication failed ({status}): {message}")]
    Authentication {
        /// The provider.
        provider: ProviderKind,
        /// The HTTP status.
        status: u16,
        /// The upstream's message.
        message: String,
    },
    /// The request is invalid for this provider; sending it elsewhere would not help.
    #[error("{provider}: invalid request: {message}")]
    InvalidRequest {
        /// The provider.
        provider: ProviderKind,
        /// The HTTP status, when the upstream answered.
        status: Option<u16>,
        /// The upstream's code, such as `invalid_value`.
        code: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// The prompt does not fit the model's context window.
    #[error("{provider}: context length exceeded: {message}")]
    ContextLengthExceeded {
        /// The provider.
        provider: ProviderKind,
        /// The upstream's message.
        message: String,
    },
    /// The model does not exist at this provider (404), so another provider may serve it.
    #[error("{provider}: model not found: {message}")]
    ModelNotFound {
        /// The provider.
        provider: ProviderKind,
        /// The upstream's message.
        message: String,
    },
    /// The provider is rate limiting us (429).
    #[error("{provider}: rate limited: {message}")]
    RateLimited {
        /// The provider.
        provider: ProviderKind,
        /// How long the provider asked us to wait.
        retry_after: Option<Duration>,
        /// The upstream's message.
        message: String,
    },
    /// No answer within the per-attempt timeout.
    #[error("{provider}: no answer within {}ms", after.as_millis())]
    Timeout {
        /// The provider.
        provider: ProviderKind,
        /// The timeout that fired.
        after: Duration,
    },
    /// The connection failed or broke.
    #[error("{provider}: connection failed: {message}")]
    Connection {
        /// The provider.
        provider: ProviderKind,
        /// What happened.
        message: String,
    },
    /// The provider failed (5xx, 408, 409, Anthropic's 529 overloaded, or an error event in a
    /// stream).
    #[error("{provider}: upstream error ({status}): {message}")]
    Upstream {
        /// The provider.
        provider: ProviderKind,
        /// The HTTP status (500 for an error reported inside a stream).
        status: u16,
        /// The upstream's error type or code, such as `overloaded_error`.
        code: Option<String>,
        /// The upstream's message.
        message: String,
        /// How long the provider asked us to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// The provider's answer could not be understood.
    #[error("{provider}: malformed response: {message}")]
    MalformedResponse {
        /// The provider.
        provider: ProviderKind,
        /// What could not be parsed.
        message: String,
    },
    /// The provider does not offer this feature (for example Anthropic embeddings).
    #[error("{provider} does not support {feature}")]
    Unsupported {
        /// The provider.
        provider: ProviderKind,
        /// The missing feature.
        feature: &'static str,
    },
    /// The provider is not configured well enough to be called (for example no API key).
    #[error("{provider}: {message}")]
    Configuration {
        /// The provider.
        provider: ProviderKind,
        /// What is missing or wrong.
        message: String,
    },
}

impl LlmError {
    /// The provider the error came from.
    pub fn provider(&self) -> ProviderKind {
        match self {
            Self::Authentication { provider, .. }
            | Self::InvalidRequest { provider, .. }
            | Self::ContextLengthExceeded { provider, .. }
            | Self::ModelNotFound { provider, .. }
            | Self::RateLimited { provider, .. }
            | Self::Timeout { provider, .. }
            | Self::Connection { provider, .. }
            | Self::Upstream { provider, .. }
            | Self::MalformedResponse { provider, .. }
            | Self::Unsupported { provider, .. }
            | Self::Configuration { provider, .. } => *provider,
        }
    }

    /// A stable machine-readable code, also usable as a bounded metric label.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Authentication { .. } => "authentication_error",
            Self::InvalidRequest { .. } => "invalid_request",
            Self::ContextLengthExceeded { .. } => "context_length_exceeded",
            Self::ModelNotFound { .. } => "model_not_found",
            Self::RateLimited { .. } => "rate_limited",
            Self::Timeout { .. } => "timeout",
            Self::Connection { .. } => "connection_error",
            Self::Upstream { .. } => "upstream_error",
            Self::MalformedResponse { .. } => "malformed_response",
            Self::Unsupported { .. } => "unsupported",
            Self::Configuration { .. } => "provider_not_configured",
        }
    }

    /// The upstream's HTTP status, when it answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Authentication { status, .. } | Self::Upstream { status, .. } => Some(*status),
            Self::InvalidRequest { status, .. } => *status,
            Self::ContextLengthExceeded { .. } => Some(400),
            Self::ModelNotFound { .. } => Some(404),
            Self::RateLimited { .. } => Some(429),
            _ => None,
        }
    }

    /// Whether sending the same request to the same provider again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. }
                | Self::Timeout { .. }
                | Self::Connection { .. }
                | Self::Upstream { .. }
        )
    }

    /// Whether another provider may succeed where this one failed. Never for an invalid
    /// request: it would be just as invalid elsewhere.
    pub fn should_fallback(&self) -> bool {
        match self {
            Self::InvalidRequest { .. } => false,
            Self::Authentication { .. }
            | Self::ContextLengthExceeded { .. }
            | Self::ModelNotFound { .. }
            | Self::RateLimited { .. }
            | Self::Timeout { .. }
            | Self::Connection { .. }
            | Self::Upstream { .. }
            | Self::MalformedResponse { .. }
            | Self::Unsupported { .. }
            | Self::Configuration { .. } => true,
        }
    }

    /// How long the provider asked us to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::Upstream { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    pub(crate) fn connection(provider: ProviderKind, error: &crate::http::SendError) -> Self {
        Self::Connection {
            provider,
            message: error.to_string(),
        }
    }

    pub(crate) fn malformed(provider: ProviderKind, message: impl Into<String>) -> Self {
        Self::MalformedResponse {
            provider,
            message: message.into(),
        }
    }
}

/// The parts of an upstream error answer each provider module extracts from its body.
#[derive(Debug, Clone, Default)]
pub(crate) struct UpstreamFailure {
    pub status: u16,
    pub code: Option<String>,
    pub kind: Option<String>,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl UpstreamFailure {
    /// Classifies an HTTP error answer. Provider modules fill in `code`/`kind` from the body
    /// and handle their own special codes before falling back to this status-based mapping.
    pub(crate) fn into_error(self, provider: ProviderKind) -> LlmError {
        let code = self.code.or(self.kind);
        let message = if self.message.is_empty() {
            format!("HTTP {}", self.status)
        } else {
            self.message
        };
        if code.as_deref() == Some("context_length_exceeded") || mentions_context_length(&message) {
            return LlmError::ContextLengthExceeded { provider, message };
        }
        match self.status {
            401 | 403 => LlmError::Authentication {
                provider,
                status: self.status,
                message,
            },
            404 => LlmError::ModelNotFound { provider, message },
            429 => LlmError::RateLimited {
                provider,
                retry_after: self.retry_after,
                message,
            },
            408 | 409 | 500..=599 => LlmError::Upstream {
                provider,
                status: self.status,
                code,
                message,
                retry_after: self.retry_after,
            },
            status => LlmError::InvalidRequest {
                provider,
                status: Some(status),
                code,
                message,
            },
        }
    }
}

fn mentions_context_length(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("context length")
        || lower.contains("context window")
        || lower.contains("prompt is too long")
        || lower.contains("maximum context")
}

/// Parses a `Retry-After` header: delay-seconds or an HTTP-date.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Reads the wait time from `retry-after-ms` (OpenAI) or `retry-after`.
pub(crate) fn retry_after_from_headers(headers: &crate::http::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    headers
        .get(crate::http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(status: u16, code: Option<&str>, message: &str) -> LlmError {
        UpstreamFailure {
            status,
            code: code.map(str::to_owned),
            message: message.into(),
            ..UpstreamFailure::default()
        }
        .into_error(ProviderKind::OpenAi)
    }

    #[test]
    fn classifies_by_status_and_code() {
        assert_eq!(failure(401, None, "bad key").code(), "authentication_error");
        assert_eq!(failure(400, None, "bad").code(), "invalid_request");
        assert_eq!(
            failure(400, Some("context_length_exceeded"), "too long").code(),
            "context_length_exceeded"
        );
        assert_eq!(failure(429, None, "slow down").code(), "rate_limited");
        assert_eq!(failure(503, None, "down").code(), "upstream_error");
        assert_eq!(failure(404, None, "no model").code(), "model_not_found");
    }

    #[test]
    fn retry_and_fallback_rules() {
        let invalid = failure(400, None, "bad");
        assert!(!invalid.is_retryable());
        assert!(!invalid.should_fallback());
        let down = failure(500, None, "down");
        assert!(down.is_retryable());
        assert!(down.should_fallback());
        let auth = failure(401, None, "bad key");
        assert!(!auth.is_retryable());
        assert!(auth.should_fallback());
        assert_eq!(auth.status(), Some(401));
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        let future = std::time::SystemTime::now() + Duration::from_secs(30);
        let parsed = parse_retry_after(&httpdate::fmt_http_date(future)).unwrap();
        assert!(parsed > Duration::from_secs(25) && parsed <= Duration::from_secs(30));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}
