//! The gateway's configuration (SPEC §3): read once from the environment and `.env`,
//! validated, then trusted by the rest of the code.

use std::net::SocketAddr;

use meta_chat_llm::{EnvError, Http2Mode, HttpOptions, LlmEnv};
use secrecy::SecretString;

/// Where tenants, settings and usage live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseKind {
    /// An embedded SQLite file (the default).
    Sqlite,
    /// A PostgreSQL server shared by replicas.
    Postgres,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Providers, sampling defaults, retries, prices (`LLM_*`, `OPENAI_*`, …).
    pub llm: LlmEnv,
    /// `DATABASE_URL`.
    pub database_url: String,
    /// Which database `database_url` names.
    pub database: DatabaseKind,
    /// `BIND_ADDR`.
    pub bind_addr: SocketAddr,
    /// `ENCRYPTION_KEY`, at least 32 characters.
    pub encryption_key: Option<SecretString>,
    /// `ENCRYPTION_KEY_PREVIOUS`, for `rotate-encryption-key`.
    pub encryption_key_previous: Option<SecretString>,
    /// `ADMIN_API_KEY`.
    pub admin_api_key: Option<SecretString>,
    /// `ENABLE_COST_TRACKING`.
    pub cost_tracking: bool,
    /// `COST_ALERT_THRESHOLD` in USD per tenant per UTC day.
    pub cost_alert_threshold_usd: Option<f64>,
    /// `COST_ALERT_WEBHOOK_URL`.
    pub cost_alert_webhook_url: Option<String>,
    /// `REDIS_URL`.
    pub redis_url: Option<String>,
    /// `MAX_BODY_BYTES`: larger request bodies get 413.
    pub max_body_bytes: usize,
    /// `REDIS_KEY_PREFIX`: every key the gateway writes to Redis starts with it.
    pub redis_key_prefix: String,
    /// `REDIS_TIMEOUT_MS`: the longest a request waits for Redis.
    pub redis_timeout: std::time::Duration,
    /// `LIMITS_FAIL_OPEN`: admit requests when the limiter's Redis cannot be reached.
    pub limits_fail_open: bool,
    /// `DEFAULT_REQUESTS_PER_MINUTE`: for tenants without `rateLimit.requestsPerMinute`.
    pub default_requests_per_minute: Option<u64>,
    /// `DEFAULT_TOKENS_PER_DAY`: for tenants without `rateLimit.tokensPerDay`.
    pub default_tokens_per_day: Option<u64>,
    /// `CACHE_MAX_BYTES`: the in-process response cache's size.
    pub cache_max_bytes: u64,
    /// `COOKIE_SECURE`: mark the dashboard's session cookie `Secure` even when the request
    /// did not say it came over TLS.
    pub cookie_secure: bool,
    /// `UPSTREAM_HTTP2` and `UPSTREAM_HTTP2_MAX_STREAMS`: how upstream connections use
    /// HTTP/2.
    pub upstream_http: HttpOptions,
}

impl Config {
    /// Reads the process environment (after `.env` was loaded into it).
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, EnvError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let llm = LlmEnv::from_lookup(&lookup)?;
        let database_url = get("DATABASE_URL").unwrap_or_else(|| "sqlite://meta-chat.db".into());
        let database = if database_url.starts_with("sqlite:") {
            DatabaseKind::Sqlite
        } else if database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://")
        {
            DatabaseKind::Postgres
        } else {
            return Err(invalid(
                "DATABASE_URL",
                "must start with sqlite:// or postgres://".into(),
            ));
        };
        let bind_addr = get("BIND_ADDR")
            .unwrap_or_else(|| "127.0.0.1:8080".into())
            .trim()
            .parse()
            .map_err(|e| invalid("BIND_ADDR", format!("not a socket address: {e}")))?;
        let encryption_key = get("ENCRYPTION_KEY").map(SecretString::from);
        let encryption_key_previous = get("ENCRYPTION_KEY_PREVIOUS").map(SecretString::from);
        for (name, key) in [
            ("ENCRYPTION_KEY", &encryption_key),
            ("ENCRYPTION_KEY_PREVIOUS", &encryption_key_previous),
        ] {
            if let Some(key) = key {
                check_key_length(name, key)?;
            }
        }
        if database == DatabaseKind::Postgres && encryption_key.is_none() {
            return Err(invalid(
                "ENCRYPTION_KEY",
                "is required with PostgreSQL (replicas must share it); set at least 32 characters"
                    .into(),
            ));
        }
        let cost_tracking = match get("ENABLE_COST_TRACKING").as_deref().map(str::trim) {
            None => true,
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => true,
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => false,
            Some(v) => {
                return Err(invalid(
                    "ENABLE_COST_TRACKING",
                    format!("`{v}` is not true or false"),
                ));
            }
        };
        let cost_alert_threshold_usd = match get("COST_ALERT_THRESHOLD") {
            None => None,
            Some(raw) => match raw.trim().parse::<f64>() {
                Ok(v) if v.is_finite() && v > 0.0 => Some(v),
                _ => {
                    return Err(invalid(
                        "COST_ALERT_THRESHOLD",
                        format!("`{raw}` is not a positive USD amount"),
                    ));
                }
            },
        };
        let cost_alert_webhook_url = get("COST_ALERT_WEBHOOK_URL")
            .map(|raw| http_url("COST_ALERT_WEBHOOK_URL", &raw))
            .transpose()?;
        let redis_url = get("REDIS_URL")
            .map(|raw| {
                if raw.starts_with("redis://") || raw.starts_with("rediss://") {
                    Ok(raw)
                } else {
                    Err(invalid(
                        "REDIS_URL",
                        "must start with redis:// or rediss://".into(),
                    ))
                }
            })
            .transpose()?;
        let max_body_bytes = match get("MAX_BODY_BYTES") {
            None => 4 * 1024 * 1024,
            Some(raw) => match raw.trim().parse::<usize>() {
                Ok(v) if v >= 1024 => v,
                _ => {
                    return Err(invalid(
                        "MAX_BODY_BYTES",
                        format!("`{raw}` is not a size in bytes of at least 1024"),
                    ));
                }
            },
        };
        let positive = |name: &'static str, what: &str| -> Result<Option<u64>, EnvError> {
            match get(name) {
                None => Ok(None),
                Some(raw) => match raw.trim().parse::<u64>() {
                    Ok(v) if v >= 1 => Ok(Some(v)),
                    _ => Err(invalid(name, format!("`{raw}` is not {what}"))),
                },
            }
        };
        let redis_key_prefix = get("REDIS_KEY_PREFIX").unwrap_or_else(|| "meta-chat:".into());
        let redis_timeout = std::time::Duration::from_millis(
            positive("REDIS_TIMEOUT_MS", "a number of milliseconds ≥ 1")?.unwrap_or(250),
        );
        let limits_fail_open = match get("LIMITS_FAIL_OPEN").as_deref().map(str::trim) {
            None => true,
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => true,
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => false,
            Some(v) => {
                return Err(invalid(
                    "LIMITS_FAIL_OPEN",
                    format!("`{v}` is not true or false"),
                ));
            }
        };
        let default_requests_per_minute =
            positive("DEFAULT_REQUESTS_PER_MINUTE", "a whole number ≥ 1")?;
        let default_tokens_per_day = positive("DEFAULT_TOKENS_PER_DAY", "a whole number ≥ 1")?;
        let cache_max_bytes =
            positive("CACHE_MAX_BYTES", "a size in bytes ≥ 1")?.unwrap_or(64 * 1024 * 1024);
        let cookie_secure = match get("COOKIE_SECURE").as_deref().map(str::trim) {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("true") || v == "1" => true,
            Some(v) if v.eq_ignore_ascii_case("false") || v == "0" => false,
            Some(v) => {
                return Err(invalid(
                    "COOKIE_SECURE",
                    format!("`{v}` is not true or false"),
                ));
            }
        };
        let http2 = match get("UPSTREAM_HTTP2").as_deref().map(str::trim) {
            None => Http2Mode::Auto,
            Some(v) if v.eq_ignore_ascii_case("auto") => Http2Mode::Auto,
            Some(v) if v.eq_ignore_ascii_case("prior-knowledge") => Http2Mode::PriorKnowledge,
            Some(v) if v.eq_ignore_ascii_case("off") => Http2Mode::Off,
            Some(v) => {
                return Err(invalid(
                    "UPSTREAM_HTTP2",
                    format!("`{v}` is not auto, prior-knowledge or off"),
                ));
            }
        };
        let streams_per_connection = positive("UPSTREAM_HTTP2_MAX_STREAMS", "a whole number ≥ 1")?
            .map_or(HttpOptions::default().streams_per_connection, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            });
        Ok(Self {
            llm,
            database_url,
            database,
            bind_addr,
            encryption_key,
            encryption_key_previous,
            admin_api_key: get("ADMIN_API_KEY").map(SecretString::from),
            cost_tracking,
            cost_alert_threshold_usd,
            cost_alert_webhook_url,
            redis_url,
            max_body_bytes,
            redis_key_prefix,
            redis_timeout,
            limits_fail_open,
            default_requests_per_minute,
            default_tokens_per_day,
            cache_max_bytes,
            cookie_secure,
            upstream_http: HttpOptions {
                http2,
                streams_per_connection,
            },
        })
    }
}

fn invalid(variable: &'static str, message: String) -> EnvError {
    EnvError { variable, message }
}

fn check_key_length(name: &'static str, key: &SecretString) -> Result<(), EnvError> {
    use secrecy::ExposeSecret;
    let length = key.expose_secret().chars().count();
    if length < 32 {
        return Err(invalid(
            name,
            format!("must be at least 32 characters (got {length})"),
        ));
    }
    Ok(())
}

fn http_url(name: &'static str, raw: &str) -> Result<String, EnvError> {
    match url_scheme(raw) {
        Some("http" | "https") => Ok(raw.trim().to_owned()),
        _ => Err(invalid(name, format!("`{raw}` is not an http(s) URL"))),
    }
}

fn url_scheme(raw: &str) -> Option<&str> {
    let (scheme, rest) = raw.trim().split_once("://")?;
    (!rest.is_empty()).then_some(scheme)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, EnvError> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_need_nothing() {
        let config = config(&[]).unwrap();
        assert_eq!(config.database_url, "sqlite://meta-chat.db");
        assert_eq!(config.database, DatabaseKind::Sqlite);
        assert_eq!(config.bind_addr.to_string(), "127.0.0.1:8080");
        assert!(config.cost_tracking);
        assert_eq!(config.max_body_bytes, 4 * 1024 * 1024);
        assert!(config.encryption_key.is_none());
        assert_eq!(config.upstream_http, HttpOptions::default());
    }

    #[test]
    fn upstream_http2_modes() {
        for (value, mode) in [
            ("auto", Http2Mode::Auto),
            ("Prior-Knowledge", Http2Mode::PriorKnowledge),
            (" off ", Http2Mode::Off),
        ] {
            let config = config(&[
                ("UPSTREAM_HTTP2", value),
                ("UPSTREAM_HTTP2_MAX_STREAMS", "8"),
            ])
            .unwrap();
            assert_eq!(config.upstream_http.http2, mode);
            assert_eq!(config.upstream_http.streams_per_connection, 8);
        }
    }

    #[test]
    fn postgres_requires_an_encryption_key() {
        let err = config(&[("DATABASE_URL", "postgres://localhost/x")]).unwrap_err();
        assert_eq!(err.variable, "ENCRYPTION_KEY");
        let ok = config(&[
            ("DATABASE_URL", "postgres://localhost/x"),
            ("ENCRYPTION_KEY", "0123456789abcdef0123456789abcdef"),
        ])
        .unwrap();
        assert_eq!(ok.database, DatabaseKind::Postgres);
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            ("DATABASE_URL", "mysql://x"),
            ("BIND_ADDR", "localhost"),
            ("ENCRYPTION_KEY", "too-short"),
            ("ENCRYPTION_KEY_PREVIOUS", "short"),
            ("ENABLE_COST_TRACKING", "maybe"),
            ("COST_ALERT_THRESHOLD", "-5"),
            ("COST_ALERT_WEBHOOK_URL", "not a url"),
            ("REDIS_URL", "http://x"),
            ("MAX_BODY_BYTES", "12"),
            ("LLM_TEMPERATURE", "9"),
            ("UPSTREAM_HTTP2", "sometimes"),
            ("UPSTREAM_HTTP2_MAX_STREAMS", "0"),
        ] {
            let err = config(&[(name, value)]).unwrap_err();
            assert_eq!(err.variable, name, "{err}");
        }
    }

    #[test]
    fn errors_never_echo_a_key() {
        let err = config(&[("ENCRYPTION_KEY", "secret-but-short")]).unwrap_err();
        assert!(!err.to_string().contains("secret-but-short"));
    }
}
