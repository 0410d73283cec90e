//! What a request must pass before it reaches a provider, shared by the completion
//! endpoints: the tenant's effective limits, the worst-case cost reserved against its
//! budgets, the response cache policy, and refusals in OpenAI's terms.

use std::time::Duration;

use axum::http::StatusCode;
use meta_chat_llm::{
    CompletionRequest, CompletionResponse, Message, ProviderConfig, StreamChunk, Usage,
};

use super::AppState;
use super::error::ApiError;
use super::openai::Failure;
use crate::cache::DEFAULT_TTL;
use crate::limits::{Refusal, TenantLimits, usd_to_nano};
use crate::settings::TenantSettings;

/// The limits that apply to a tenant: its settings, else the system-wide defaults
/// (`DEFAULT_REQUESTS_PER_MINUTE`, `DEFAULT_TOKENS_PER_DAY`).
pub fn tenant_limits(state: &AppState, settings: &TenantSettings) -> TenantLimits {
    let rate = settings.rate_limit.as_ref();
    let budget = settings.budget.as_ref();
    TenantLimits {
        requests_per_minute: rate
            .and_then(|r| r.requests_per_minute)
            .or(state.config.default_requests_per_minute),
        tokens_per_day: rate
            .and_then(|r| r.tokens_per_day)
            .or(state.config.default_tokens_per_day),
        daily_budget_nano: budget.and_then(|b| b.daily_usd).and_then(usd_to_nano),
        monthly_budget_nano: budget.and_then(|b| b.monthly_usd).and_then(usd_to_nano),
    }
}

/// How long the tenant's answers are cached, or `None` when its cache is off.
pub fn cache_ttl(settings: &TenantSettings) -> Option<Duration> {
    let cache = settings.cache.as_ref().filter(|c| c.enabled)?;
    Some(cache.ttl_seconds.map_or(DEFAULT_TTL, Duration::from_secs))
}

/// An upper bound of a request's prompt tokens: BPE tokens are at least one byte, so the
/// bytes of its texts, plus a few tokens of framing per message and tool.
pub fn max_input_tokens(request: &CompletionRequest) -> u64 {
    const FRAMING: u64 = 8;
    let texts: u64 = request
        .messages
        .iter()
        .map(|message| {
            FRAMING
                + match message {
                    Message::System { content } | Message::User { content } => content.len() as u64,
                    Message::Assistant {
                        content,
                        tool_calls,
                    } => {
                        content.len() as u64
                            + tool_calls
                                .iter()
                                .map(|c| {
                                    (c.id.len() + c.name.len()) as u64 + json_len(&c.arguments)
                                })
                                .sum::<u64>()
                    }
                    Message::Tool {
                        content,
                        tool_call_id,
                    } => (content.len() + tool_call_id.len()) as u64,
                }
        })
        .sum();
    let tools: u64 = request
        .tools
        .iter()
        .map(|tool| FRAMING + serde_json::to_vec(tool).map_or(0, |v| v.len() as u64))
        .sum();
    texts + tools + FRAMING
}

fn json_len(value: &serde_json::Value) -> u64 {
    serde_json::to_vec(value).map_or(0, |v| v.len() as u64)
}

/// The most `request` can cost on any provider of its chain: the prompt bound and
/// `max_tokens` of output (the request's, else the provider's default) at the dearest price.
pub fn worst_case_cost<'a>(
    state: &AppState,
    chain: impl IntoIterator<Item = &'a ProviderConfig>,
    request: &CompletionRequest,
) -> i64 {
    let input = max_input_tokens(request);
    chain
        .into_iter()
        .map(|config| {
            let usage = Usage {
                input_tokens: input,
                output_tokens: u64::from(request.max_tokens.unwrap_or(config.defaults.max_tokens)),
            };
            state
                .config
                .llm
                .prices
                .cost(config.provider, &config.model, usage)
                .nano_usd
        })
        .max()
        .map_or(0, |nano| i64::try_from(nano).unwrap_or(i64::MAX))
}

/// The most an embeddings request can cost: every input's bytes as tokens.
pub fn worst_case_embedding_cost(
    state: &AppState,
    config: &ProviderConfig,
    inputs: &[String],
) -> i64 {
    let tokens: u64 = inputs.iter().map(|text| text.len() as u64 + 2).sum();
    let model = config.embedding_model.as_deref().unwrap_or_default();
    let cost = state
        .config
        .llm
        .prices
        .embedding_cost(config.provider, model, tokens);
    i64::try_from(cost.nano_usd).unwrap_or(i64::MAX)
}

/// A refusal as an answer: 429 with `Retry-After` and the `x-ratelimit-*` headers (OpenAI's
/// `rate_limit_exceeded`, or `budget_exceeded`), or 503 when the limiter is unreachable and
/// limits fail closed. Counted in `meta_chat_rate_limited_total`.
pub fn refused(state: &AppState, tenant: &str, refusal: Refusal) -> Failure {
    let status = if refusal.code == "limits_unavailable" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        state.metrics.record_rate_limited(tenant, refusal.code);
        StatusCode::TOO_MANY_REQUESTS
    };
    Failure::limited(
        ApiError::new(status, refusal.code, refusal.message),
        refusal.retry_after,
        refusal.headers,
    )
}

/// A cached answer as the chunks of a stream: its text, its tool calls, the finish and the
/// usage.
pub fn replay_chunks(response: &CompletionResponse) -> Vec<StreamChunk> {
    let mut chunks = Vec::with_capacity(3 + response.message.tool_calls.len());
    if !response.message.content.is_empty() {
        chunks.push(StreamChunk::TextDelta {
            text: response.message.content.clone(),
        });
    }
    for (index, call) in response.message.tool_calls.iter().enumerate() {
        let arguments = match &call.arguments {
            // Arguments that were not JSON are kept as their text.
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        chunks.push(StreamChunk::ToolCallDelta {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            id: Some(call.id.clone()),
            name: Some(call.name.clone()),
            arguments,
        });
    }
    chunks.push(StreamChunk::Finish {
        reason: response.finish_reason,
    });
    chunks.push(StreamChunk::Usage {
        usage: response.usage,
    });
    chunks
}

#[cfg(test)]
mod tests {
    use meta_chat_llm::{
        AssistantMessage, FinishReason, ProviderKind, StreamAccumulator, ToolCall,
    };

    use super::*;

    #[test]
    fn the_prompt_bound_is_never_below_the_estimate() {
        let request = CompletionRequest::new(vec![
            Message::system("You are terse."),
            Message::user("héllo wörld, what is 2+2?"),
        ]);
        assert!(
            max_input_tokens(&request) >= super::super::metering::estimate_input_tokens(&request)
        );
        assert!(max_input_tokens(&request) >= 30);
    }

    #[test]
    fn a_replayed_answer_folds_back_into_itself() {
        let response = CompletionResponse {
            id: "x".into(),
            message: AssistantMessage {
                content: "Let me look.".into(),
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "weather".into(),
                    arguments: serde_json::json!({"city": "Paris"}),
                }],
            },
            finish_reason: FinishReason::ToolCalls,
            usage: Usage {
                input_tokens: 12,
                output_tokens: 7,
            },
            model: "m".into(),
            provider: ProviderKind::OpenAi,
        };
        let mut accumulator = StreamAccumulator::new();
        for chunk in replay_chunks(&response) {
            accumulator.push(&chunk);
        }
        assert_eq!(
            accumulator.into_response("x", "m", ProviderKind::OpenAi),
            response
        );
    }
}
