//! The response cache (SPEC §4.5): chat answers of tenants that enable it (`cache.enabled`,
//! `cache.ttlSeconds`), in this process (moka, bounded by size) or in Redis (shared by every
//! replica).
//!
//! The key is a SHA-256 over the tenant, the provider and model the request is routed to,
//! the provider's server and sampling defaults, and the request in its unified form (so the
//! order of JSON keys, or `stream`, makes no difference; any other parameter — temperature,
//! tools, stop sequences, a message — does). A streamed and a non-streamed request share
//! entries: a hit on a streamed request is replayed as a stream. Redis failures count as
//! misses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meta_chat_llm::{CompletionRequest, CompletionResponse, ProviderConfig, ProviderKind};
use moka::Expiry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::redis_conn::Redis;

/// The default time an answer stays cached (`cache.ttlSeconds` unset).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3_600);

/// A cached answer: who gave it and what it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    /// The provider that answered.
    pub provider: ProviderKind,
    /// The model it was asked for.
    pub model: String,
    /// The answer.
    pub response: CompletionResponse,
}

/// Feeds serialised bytes into a SHA-256.
struct HashWriter(Sha256);

impl std::io::Write for HashWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A cached answer as stored: its JSON and how long it lives.
#[derive(Debug)]
pub struct Entry {
    json: Vec<u8>,
    ttl: Duration,
}

/// Each entry expires after its own TTL (tenants choose theirs).
struct PerEntryTtl;

impl Expiry<String, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The cache: in memory or in Redis. Cheap to clone.
#[derive(Clone)]
pub enum ResponseCache {
    /// In this process, at most the configured number of bytes (keys and values).
    Memory(moka::future::Cache<String, Arc<Entry>>),
    /// In Redis, shared by every replica; entries expire by Redis TTL.
    Redis(Redis),
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Memory(cache) => f
                .debug_struct("ResponseCache::Memory")
                .field("entries", &cache.entry_count())
                .field("bytes", &cache.weighted_size())
                .finish(),
            Self::Redis(redis) => f.debug_tuple("ResponseCache::Redis").field(redis).finish(),
        }
    }
}

impl ResponseCache {
    /// An in-process cache holding at most `max_bytes` of keys and answers; the least
    /// recently used entries go first.
    pub fn memory(max_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            // Least recently used first. moka's default (TinyLFU) refuses a new entry that is
            // not asked for more often than the one it would evict: once full, the cache would
            // stop taking new answers until old ones expired.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .weigher(|key: &String, entry: &Arc<Entry>| {
                u32::try_from(key.len() + entry.json.len() + 64).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build();
        Self::Memory(cache)
    }

    /// The cache key of `request` for `tenant` when routed to `config`.
    pub fn key(tenant: &str, config: &ProviderConfig, request: &CompletionRequest) -> String {
        // Serialised straight into the hash, without copying the request. Field order is
        // fixed by these structs; maps inside (`extra`, tool schemas) are ordered by serde_json.
        // The routing already resolved the requested model into provider and model, so the
        // request's own `model` is left out.
        #[derive(Serialize)]
        struct Material<'a> {
            v: u8,
            tenant: &'a str,
            provider: ProviderKind,
            model: &'a str,
            base_url: Option<&'a str>,
            default_temperature: Option<f32>,
            default_max_tokens: u32,
            default_top_p: Option<f32>,
            messages: &'a [meta_chat_llm::Message],
            tools: &'a [meta_chat_llm::Tool],
            tool_choice: &'a Option<meta_chat_llm::ToolChoice>,
            temperature: Option<f32>,
            max_tokens: Option<u32>,
            top_p: Option<f32>,
            stop: &'a [String],
            extra: &'a meta_chat_llm::Extra,
        }
        // Exhaustive on purpose: a new request field will not compile until it is keyed.
        let CompletionRequest {
            model: _,
            messages,
            tools,
            tool_choice,
            temperature,
            max_tokens,
            top_p,
            stop,
            extra,
        } = request;
        let material = Material {
            v: 2,
            tenant,
            provider: config.provider,
            model: &config.model,
            base_url: config.base_url.as_deref(),
            default_temperature: config.defaults.temperature,
            default_max_tokens: config.defaults.max_tokens,
            default_top_p: config.defaults.top_p,
            messages,
            tools,
            tool_choice,
            temperature: *temperature,
            max_tokens: *max_tokens,
            top_p: *top_p,
            stop,
            extra,
        };
        let mut hasher = HashWriter(Sha256::new());
        // Writing into a hasher cannot fail, and the unified types always serialise.
        let _ = serde_json::to_writer(&mut hasher, &material);
        crate::crypto::hex(&hasher.0.finalize())
    }

    /// The answer cached under `key`, if any (and readable).
    pub async fn get(&self, key: &str) -> Option<CachedAnswer> {
        let json = match self {
            Self::Memory(cache) => cache.get(key).await.map(|entry| entry.json.clone())?,
            Self::Redis(redis) => {
                let key = redis.key(&format!("cache:{key}"));
                redis
                    .run("cache_get", |mut c| async move {
                        redis::cmd("GET")
                            .arg(key)
                            .query_async::<Option<Vec<u8>>>(&mut c)
                            .await
                    })
                    .await
                    .ok()??
            }
        };
        match serde_json::from_slice(&json) {
            Ok(answer) => Some(answer),
            Err(error) => {
                tracing::warn!(%error, "unreadable cache entry; treated as a miss");
                None
            }
        }
    }

    /// Caches `answer` under `key` for `ttl`.
    pub async fn put(&self, key: &str, answer: &CachedAnswer, ttl: Duration) {
        let Ok(json) = serde_json::to_vec(answer) else {
            return;
        };
        match self {
            Self::Memory(cache) => {
                cache
                    .insert(key.to_owned(), Arc::new(Entry { json, ttl }))
                    .await;
            }
            Self::Redis(redis) => {
                let key = redis.key(&format!("cache:{key}"));
                let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
                let _ = redis
                    .run("cache_put", |mut c| async move {
                        redis::cmd("SET")
                            .arg(key)
                            .arg(json)
                            .arg("PX")
                            .arg(ttl_ms)
                            .query_async::<()>(&mut c)
                            .await
                    })
                    .await;
            }
        }
    }

    /// Caches `answer` in the background: the request does not wait for the cache.
    pub fn put_later(&self, key: String, answer: CachedAnswer, ttl: Duration) {
        let cache = self.clone();
        tokio::spawn(async move { cache.put(&key, &answer, ttl).await });
    }
}

#[cfg(test)]
mod tests {
    use meta_chat_llm::{Message, Tool};

    use super::*;

    fn request() -> CompletionRequest {
        CompletionRequest::new(vec![Message::user("hi")]).with_temperature(0.5)
    }

    #[test]
    fn keys_follow_every_parameter_but_not_the_model_spelling() {
        let config = ProviderConfig::new(ProviderKind::OpenAi, "gpt-4o-mini");
        let base = ResponseCache::key("t", &config, &request());
        assert_eq!(base.len(), 64);
        assert_eq!(
            base,
            ResponseCache::key("t", &config, &request().with_model("openai/gpt-4o-mini"))
        );
        assert_ne!(base, ResponseCache::key("u", &config, &request()));
        assert_ne!(
            base,
            ResponseCache::key("t", &config, &request().with_temperature(0.6))
        );
        let tools = request().with_tools(vec![Tool::new("f", "", serde_json::json!({}))]);
        assert_ne!(base, ResponseCache::key("t", &config, &tools));
        let other = ProviderConfig::new(ProviderKind::OpenAi, "gpt-4o");
        assert_ne!(base, ResponseCache::key("t", &other, &request()));
    }

    #[tokio::test]
    async fn entries_expire_after_their_ttl() {
        let cache = ResponseCache::memory(1 << 20);
        let answer = CachedAnswer {
            provider: ProviderKind::OpenAi,
            model: "m".into(),
            response: CompletionResponse {
                id: "x".into(),
                message: meta_chat_llm::AssistantMessage {
                    content: "hello".into(),
                    tool_calls: vec![],
                },
                finish_reason: meta_chat_llm::FinishReason::Stop,
                usage: meta_chat_llm::Usage::default(),
                model: "m".into(),
                provider: ProviderKind::OpenAi,
            },
        };
        cache.put("a", &answer, Duration::from_millis(50)).await;
        assert_eq!(cache.get("a").await, Some(answer));
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(cache.get("a").await, None);
    }
}
