//! What a request used, turned into a usage record (SPEC §4.4) and handed to the usage writer.

use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use meta_chat_llm::{CompletionRequest, FallbackExhausted, LlmError, Message, ProviderKind, Usage};

use super::AppState;
use super::error::ApiError;
use super::openai::Arrival;
use crate::metrics::RequestObservation;
use crate::store::UsageRecord;
use crate::usage::estimate_tokens;

/// The header naming a conversation.
pub const CONVERSATION_HEADER: &str = "x-conversation-id";

/// Longest conversation id accepted.
const MAX_CONVERSATION_ID: usize = 256;

/// The conversation of a request: the `X-Conversation-Id` header, else the body's
/// `metadata.conversation_id`. 400 when the header is not text or too long.
pub fn conversation_id(
    headers: &HeaderMap,
    from_body: Option<String>,
) -> Result<Option<String>, ApiError> {
    let invalid = |message: &str| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_value", message)
            .with_param("X-Conversation-Id")
    };
    let id = match headers.get(CONVERSATION_HEADER) {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| invalid("X-Conversation-Id: must be visible ASCII"))?
                .trim()
                .to_owned(),
        ),
        None => from_body,
    };
    match id {
        Some(id) if id.chars().count() > MAX_CONVERSATION_ID => {
            Err(invalid("X-Conversation-Id: at most 256 characters"))
        }
        Some(id) if id.is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// Everything a usage record needs that is known when the request arrives.
#[derive(Debug, Clone)]
pub struct Meter {
    /// Shared state (prices, the recorder).
    pub state: AppState,
    /// The tenant billed.
    pub tenant_id: String,
    /// The conversation, if named.
    pub conversation_id: Option<String>,
    /// The request's id.
    pub request_id: String,
    /// `chat`, `embeddings` or `test`.
    pub endpoint: &'static str,
    /// When the request arrived.
    pub arrival: Arrival,
    /// The tenant's daily cost alert threshold in nano-dollars ([`alert_threshold_nano`]).
    pub alert_threshold_nano: Option<i64>,
    /// The budget reservation and token charge to settle when the request is recorded.
    pub settlement: Option<std::sync::Arc<crate::limits::Settlement>>,
}

impl Meter {
    /// A meter for a `tenant`'s request to `endpoint`; thresholds and settlement are set once
    /// the tenant's settings are read.
    pub fn new(
        state: &AppState,
        tenant: &str,
        conversation_id: Option<String>,
        endpoint: &'static str,
        arrival: Arrival,
    ) -> Self {
        Self {
            state: state.clone(),
            tenant_id: tenant.to_owned(),
            conversation_id,
            request_id: arrival.2.to_string(),
            endpoint,
            arrival,
            alert_threshold_nano: None,
            settlement: None,
        }
    }
}

/// A tenant's daily cost alert threshold in nano-dollars: its `costAlertThreshold`, else
/// `COST_ALERT_THRESHOLD`, else none.
pub fn alert_threshold_nano(
    state: &AppState,
    settings: &crate::settings::TenantSettings,
) -> Option<i64> {
    let usd = settings
        .cost_alert_threshold
        .or(state.config.cost_alert_threshold_usd)?;
    crate::limits::usd_to_nano(usd).filter(|nano| *nano > 0)
}

/// How a request that reached a provider ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The provider that served, or the last one tried.
    pub provider: ProviderKind,
    /// Its model.
    pub model: String,
    /// Chat tokens.
    pub usage: Usage,
    /// Embedded tokens.
    pub embedding_tokens: u64,
    /// Time to the first chunk, for streams.
    pub ttft: Option<Duration>,
    /// `ok`, `error` or `cancelled`.
    pub status: &'static str,
    /// The HTTP status answered (499 when the client left).
    pub http_status: u16,
    /// The error's code when it failed.
    pub error_kind: Option<&'static str>,
    /// The provider that failed before a fallback served.
    pub fallback_from: Option<ProviderKind>,
    /// Token counts are estimates.
    pub estimated: bool,
    /// Answered from the response cache: no provider was called, nothing is billed.
    pub cache_hit: bool,
}

impl Outcome {
    /// A successful answer from `provider`.
    pub fn ok(provider: ProviderKind, model: &str, usage: Usage) -> Self {
        Self {
            provider,
            model: model.to_owned(),
            usage,
            embedding_tokens: 0,
            ttft: None,
            status: "ok",
            http_status: 200,
            error_kind: None,
            fallback_from: None,
            estimated: false,
            cache_hit: false,
        }
    }

    /// A call to `provider` that failed with `error`, nothing used.
    pub fn failed(provider: ProviderKind, model: &str, error: &LlmError) -> Self {
        let mut outcome = Self::ok(provider, model, Usage::default());
        outcome.status = "error";
        outcome.http_status = error.status().unwrap_or(502);
        outcome.error_kind = Some(error.code());
        outcome
    }

    /// Every provider failed: billed to the last one tried, nothing used. `None` when no
    /// provider was reached at all.
    pub fn exhausted(error: &FallbackExhausted) -> Option<Self> {
        let last = error.attempts.last()?;
        let mut outcome = Self::failed(last.provider, &last.model, &last.error);
        if error.attempts.len() > 1 {
            outcome.fallback_from = error.attempts.first().map(|a| a.provider);
        }
        Some(outcome)
    }
}

impl Meter {
    /// The cost of `outcome` in nano-dollars, from the price table.
    pub fn cost_nano_usd(&self, outcome: &Outcome) -> u64 {
        let prices = &self.state.config.llm.prices;
        let chat = prices.cost(outcome.provider, &outcome.model, outcome.usage);
        let embedding =
            prices.embedding_cost(outcome.provider, &outcome.model, outcome.embedding_tokens);
        chat.nano_usd.saturating_add(embedding.nano_usd)
    }

    /// Counts `outcome` in the metrics, settles the request's budget reservation and token
    /// charge, and hands its record to the usage writer (never waits). Returns its cost in
    /// nano-dollars. A cache hit costs nothing and is recorded with no tokens.
    pub fn record(&self, outcome: &Outcome) -> u64 {
        let billed;
        let outcome = if outcome.cache_hit {
            billed = Outcome {
                usage: Usage::default(),
                embedding_tokens: 0,
                ..outcome.clone()
            };
            &billed
        } else {
            outcome
        };
        let cost = self.cost_nano_usd(outcome);
        if let Some(settlement) = &self.settlement {
            let tokens = outcome
                .usage
                .input_tokens
                .saturating_add(outcome.usage.output_tokens);
            settlement.settle(
                i64::try_from(cost).unwrap_or(i64::MAX),
                i64::try_from(tokens).unwrap_or(i64::MAX),
            );
        }
        let http_status = match outcome.status {
            "cancelled" => 499,
            _ => outcome.http_status,
        };
        self.state.metrics.record_request(&RequestObservation {
            endpoint: self.endpoint,
            tenant: Some(&self.tenant_id),
            provider: Some(outcome.provider),
            model: &outcome.model,
            status: http_status,
            error_kind: outcome.error_kind,
            upstream_latency: Some(self.arrival.0.elapsed()),
            time_to_first_token: outcome.ttft,
            overhead: None,
            input_tokens: outcome.usage.input_tokens,
            output_tokens: outcome.usage.output_tokens,
            embedding_tokens: outcome.embedding_tokens,
            cost_nano_usd: cost,
            fallback_from: outcome.fallback_from,
        });
        if !self.state.usage.is_enabled() {
            return cost;
        }
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.state.usage.record(
            UsageRecord {
                tenant_id: self.tenant_id.clone(),
                conversation_id: self.conversation_id.clone(),
                request_id: self.request_id.clone(),
                endpoint: self.endpoint.to_owned(),
                provider: outcome.provider.as_str().to_owned(),
                model: outcome.model.clone(),
                input_tokens: as_i64(outcome.usage.input_tokens),
                output_tokens: as_i64(outcome.usage.output_tokens),
                embedding_tokens: as_i64(outcome.embedding_tokens),
                cost_nano_usd: as_i64(cost),
                latency_ms: millis(self.arrival.0.elapsed()),
                ttft_ms: outcome.ttft.map(millis),
                status: outcome.status.to_owned(),
                error_kind: outcome.error_kind.map(str::to_owned),
                cache_hit: outcome.cache_hit,
                fallback_from: outcome.fallback_from.map(|p| p.as_str().to_owned()),
                tokens_estimated: outcome.estimated,
                created_at: self.arrival.1,
            },
            self.alert_threshold_nano,
        );
        cost
    }
}

/// A request on its way to a provider. If it is dropped before [`Pending::done`] — the client
/// hung up and the handler was cancelled while the provider was working — the request is
/// recorded as `cancelled`, with its prompt tokens estimated: the provider saw it.
#[derive(Debug)]
pub struct Pending<'m> {
    /// The request's meter (borrowed: the handler holds it across the call anyway), until
    /// the call returns.
    meter: Option<&'m Meter>,
    provider: ProviderKind,
    model: String,
    input_estimate: u64,
}

impl Meter {
    /// Arms a [`Pending`] for a call to `provider`/`model` with about `input_estimate` prompt
    /// tokens.
    pub fn pending(&self, provider: ProviderKind, model: &str, input_estimate: u64) -> Pending<'_> {
        Pending {
            meter: Some(self),
            provider,
            model: model.to_owned(),
            input_estimate,
        }
    }
}

impl Pending<'_> {
    /// The call returned (the handler records its outcome itself).
    pub fn done(mut self) {
        self.meter = None;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(meter) = self.meter.take() {
            let usage = Usage {
                input_tokens: self.input_estimate,
                output_tokens: 0,
            };
            let mut outcome = Outcome::ok(self.provider, &self.model, usage);
            outcome.status = "cancelled";
            outcome.http_status = 499;
            outcome.error_kind = Some("client_disconnected");
            outcome.estimated = self.input_estimate > 0;
            meter.record(&outcome);
        }
    }
}

/// An estimate of a request's prompt tokens, from its messages and tools.
pub fn estimate_input_tokens(request: &CompletionRequest) -> u64 {
    let messages: u64 = request
        .messages
        .iter()
        .map(|message| match message {
            Message::System { content } | Message::User { content } => estimate_tokens(content),
            Message::Assistant {
                content,
                tool_calls,
            } => {
                estimate_tokens(content)
                    + tool_calls
                        .iter()
                        .map(|call| {
                            estimate_tokens(&call.name)
                                + estimate_tokens(&call.arguments.to_string())
                        })
                        .sum::<u64>()
            }
            Message::Tool { content, .. } => estimate_tokens(content),
        })
        .sum();
    let tools: u64 = request
        .tools
        .iter()
        .map(|tool| estimate_tokens(&serde_json::to_string(tool).unwrap_or_default()))
        .sum();
    messages + tools
}
