//! `POST /api/test/llm` (SPEC §4.3): one prompt to one provider, answered with the reply,
//! latency, tokens and cost — the design's provider test, for the dashboard's "Send test
//! prompt" button ([`test_prompt`], shared with the dashboard) and for operators.

use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use meta_chat_llm::{
    CompletionRequest, Cost, Message, ProviderConfig, ProviderKind, Usage, create_provider,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::Caller;
use super::json::JsonBody;
use super::metering::{Meter, Outcome};
use super::openai::{Arrival, Failure, llm_error};
use crate::routing;
use crate::store::Tenant;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new().route("/api/test/llm", post(test_llm))
}

/// The prompt used when none is given.
pub const DEFAULT_PROMPT: &str = "What is 2+2?";

/// What to test: the body of `POST /api/test/llm`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TestRequest {
    /// The provider; the caller's default when absent.
    #[serde(default)]
    pub provider: Option<ProviderKind>,
    /// The prompt; [`DEFAULT_PROMPT`] when absent or blank.
    #[serde(default)]
    pub prompt: Option<String>,
    /// The model; the provider's configured one when absent.
    #[serde(default)]
    pub model: Option<String>,
}

/// The answer to a test prompt.
#[derive(Debug, Clone)]
pub struct TestAnswer {
    /// The provider that answered.
    pub provider: ProviderKind,
    /// The model that answered, as the upstream named it.
    pub model: String,
    /// The reply's text.
    pub content: String,
    /// How long the provider took.
    pub latency_ms: u64,
    /// Tokens used.
    pub usage: Usage,
    /// What the call cost.
    pub cost: Cost,
}

impl TestAnswer {
    /// The JSON answer of `POST /api/test/llm`.
    pub fn to_json(&self) -> Value {
        json!({
            "provider": self.provider,
            "model": self.model,
            "content": self.content,
            "latencyMs": self.latency_ms,
            "usage": {
                "inputTokens": self.usage.input_tokens,
                "outputTokens": self.usage.output_tokens,
            },
            "costUsd": self.cost.usd_string(),
            "priced": self.cost.priced,
        })
    }
}

async fn test_llm(
    State(state): State<AppState>,
    arrival: Arrival,
    caller: Caller,
    JsonBody(request): JsonBody<TestRequest>,
) -> Result<axum::Json<Value>, Failure> {
    let answer = test_prompt(&state, caller.tenant(), request, arrival).await?;
    Ok(axum::Json(answer.to_json()))
}

/// Sends one test prompt. A `tenant`'s call goes through its own settings (its key for its
/// own provider, the system key for others) and is billed to it like any other call; with no
/// tenant (the admin) it goes through the system configuration.
pub async fn test_prompt(
    state: &AppState,
    tenant: Option<&Tenant>,
    request: TestRequest,
    arrival: Arrival,
) -> Result<TestAnswer, Failure> {
    let env = &state.config.llm;
    let mut alert_threshold_nano = None;
    let config = match tenant {
        Some(tenant) => {
            let settings = state.tenants.open(tenant).map_err(|error| {
                tracing::error!(tenant = %tenant.id, %error, "cannot open the tenant's settings");
                super::error::ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "cannot read the tenant's settings",
                )
            })?;
            let tenant_provider = settings
                .llm
                .as_ref()
                .and_then(|l| l.provider)
                .unwrap_or(env.default_provider);
            let spec = match (request.provider, &request.model) {
                (Some(provider), Some(model)) => Some(format!("{provider}/{model}")),
                (Some(provider), None) if provider != tenant_provider => {
                    Some(format!("{provider}/{}", env.config(provider).model))
                }
                (_, model) => model.clone(),
            };
            alert_threshold_nano = super::metering::alert_threshold_nano(state, &settings);
            routing::provider_config(env, &settings, spec.as_deref())?.0
        }
        None => {
            let provider = request.provider.unwrap_or(env.default_provider);
            let mut config: ProviderConfig = env.config(provider).clone();
            if let Some(model) = &request.model {
                config.model.clone_from(model);
            }
            config
        }
    };
    // A tenant's test prompt is billed like any other call; the admin's has no tenant.
    let meter = tenant.map(|tenant| Meter {
        state: state.clone(),
        tenant_id: tenant.id.clone(),
        conversation_id: None,
        request_id: arrival.2.to_string(),
        endpoint: "test",
        arrival,
        alert_threshold_nano,
        settlement: None,
    });
    let (provider_kind, model) = (config.provider, config.model.clone());
    let provider = create_provider(config).map_err(|e| llm_error(&e))?;
    let prompt = request
        .prompt
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_PROMPT.to_owned());
    let started = Instant::now();
    let response = match provider
        .complete(&CompletionRequest::new(vec![Message::user(prompt)]))
        .await
    {
        Ok(response) => response,
        Err(error) => {
            if let Some(meter) = &meter {
                meter.record(&Outcome::failed(provider_kind, &model, &error));
            }
            return Err(llm_error(&error));
        }
    };
    if let Some(meter) = &meter {
        meter.record(&Outcome::ok(provider_kind, &model, response.usage));
    }
    let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let cost = env
        .prices
        .cost(response.provider, &response.model, response.usage);
    Ok(TestAnswer {
        provider: response.provider,
        model: response.model,
        content: response.message.content,
        latency_ms,
        usage: response.usage,
        cost,
    })
}
