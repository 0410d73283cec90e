//! Dashboard pages for tenants (see [`super`]):
//!
//! - `GET /dashboard/tenants` (admin): every tenant with its provider, model and today's cost
//!   and requests; `POST` creates a tenant and shows its API key once.
//! - `GET /dashboard/tenants/{id}/settings` (the admin or that tenant): the LLM configuration
//!   form; `POST` saves it through [`crate::tenants::Tenants::update_settings`], the same
//!   validation as `PUT /api/tenants/:id`, and shows field errors next to their inputs.
//! - `POST /dashboard/tenants/{id}/test`: "Send test prompt", through the same code as
//!   `POST /api/test/llm` ([`crate::api::test_llm::test_prompt`]).
//!
//! Form inputs are named by their JSON path in the settings (`llm.temperature`,
//! `fallback[0].model`) and identified by the same path with `-` for `.` and brackets
//! (`llm-temperature`, `fallback-0-model`).

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{TimeDelta, Utc};
use maud::{Markup, html};
use meta_chat_llm::ProviderKind;
use meta_chat_llm::pricing::format_usd;
use serde_json::{Map, Number, Value};

use super::{PageError, Session, page, redirect};
use crate::api::AppState;
use crate::api::json::scrub;
use crate::api::openai::Arrival;
use crate::api::test_llm::{DEFAULT_PROMPT, TestAnswer, TestRequest, test_prompt};
use crate::settings::{FallbackSettings, SettingsError, TenantSettings};
use crate::store::{Tenant, UsageDimension, UsageScope, UsageTotals};
use crate::tenants::{TenantError, TenantView};

/// This module's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard/tenants", get(tenants_page).post(create_tenant))
        .route(
            "/dashboard/tenants/{id}/settings",
            get(settings_page).post(save_settings),
        )
        .route("/dashboard/tenants/{id}/test", post(send_test))
}

/// How long the settings page waits for the Ollama server's model list.
const OLLAMA_TAGS_TIMEOUT: Duration = Duration::from_millis(800);

// ---------------------------------------------------------------------------------------------
// Forms.

/// A submitted form: its fields in order (names may repeat).
type Pairs = Vec<(String, String)>;

/// The submitted fields, or none when the body is not a form.
fn pairs(form: Result<Form<Pairs>, FormRejection>) -> Pairs {
    form.map(|Form(pairs)| pairs).unwrap_or_default()
}

/// The first value of field `name`, trimmed.
fn value<'a>(pairs: &'a Pairs, name: &str) -> Option<&'a str> {
    pairs.iter().find(|(n, _)| n == name).map(|(_, v)| v.trim())
}

/// The first value of field `name`, trimmed, unless empty.
fn filled<'a>(pairs: &'a Pairs, name: &str) -> Option<&'a str> {
    value(pairs, name).filter(|v| !v.is_empty())
}

/// 403 unless the form carries the session's CSRF token.
fn check_csrf(session: &Session, pairs: &Pairs) -> Result<(), PageError> {
    session.check_csrf(
        pairs
            .iter()
            .find(|(n, _)| n == "csrf")
            .map(|(_, v)| v.as_str()),
    )
}

/// The `id` of the input named `name`: `llm.temperature` → `llm-temperature`,
/// `fallback[0].model` → `fallback-0-model`.
pub fn field_id(name: &str) -> String {
    name.replace(['.', '['], "-").replace(']', "")
}

/// A form value as JSON: a number when it reads as one, else the text (which the settings'
/// validation then rejects, naming the field).
fn number_or_text(raw: &str) -> Value {
    if let Ok(n) = raw.parse::<u64>() {
        return Value::Number(n.into());
    }
    if let Ok(n) = raw.parse::<i64>() {
        return Value::Number(n.into());
    }
    match raw.parse::<f64>().ok().and_then(Number::from_f64) {
        Some(n) => Value::Number(n),
        None => Value::String(raw.to_owned()),
    }
}

/// Puts the text field `form_name` into `section` as `key` when it is filled.
fn put_text(section: &mut Map<String, Value>, pairs: &Pairs, form_name: &str, key: &str) {
    if let Some(v) = filled(pairs, form_name) {
        section.insert(key.to_owned(), Value::String(v.to_owned()));
    }
}

/// Puts the numeric field `form_name` into `section` as `key` when it is filled.
fn put_number(section: &mut Map<String, Value>, pairs: &Pairs, form_name: &str, key: &str) {
    if let Some(v) = filled(pairs, form_name) {
        section.insert(key.to_owned(), number_or_text(v));
    }
}

/// One row of the fallback table as submitted.
#[derive(Debug, Clone, Default)]
struct FallbackRow {
    /// Its index in the form (`fallback[i].…`).
    index: usize,
    provider: String,
    model: String,
    priority: String,
    base_url: String,
    api_key: String,
    remove: bool,
}

impl FallbackRow {
    fn is_blank(&self) -> bool {
        self.provider.is_empty()
            && self.model.is_empty()
            && self.priority.is_empty()
            && self.base_url.is_empty()
            && self.api_key.is_empty()
    }
}

/// The fallback rows of a submitted form, by form index.
fn fallback_rows(pairs: &Pairs) -> Vec<FallbackRow> {
    let indices: BTreeSet<usize> = pairs
        .iter()
        .filter_map(|(name, _)| name.strip_prefix("fallback["))
        .filter_map(|rest| rest.split_once(']'))
        .filter_map(|(index, _)| index.parse().ok())
        .collect();
    indices
        .into_iter()
        .map(|index| {
            let get = |field: &str| {
                value(pairs, &format!("fallback[{index}].{field}"))
                    .unwrap_or_default()
                    .to_owned()
            };
            FallbackRow {
                index,
                provider: get("provider"),
                model: get("model"),
                priority: get("priority"),
                base_url: get("baseUrl"),
                api_key: get("apiKey"),
                remove: !get("remove").is_empty(),
            }
        })
        .collect()
}

/// The stored key of the fallback entry for `provider` (the one with `model` first): a key is
/// kept only for the same provider, as for `llm.apiKey`.
fn stored_fallback_key<'a>(
    stored: &'a [FallbackSettings],
    provider: &str,
    model: &str,
) -> Option<&'a str> {
    let same_provider = |e: &&FallbackSettings| e.provider.as_str() == provider;
    stored
        .iter()
        .filter(same_provider)
        .find(|e| e.model.as_deref().unwrap_or_default() == model && e.api_key.is_some())
        .or_else(|| {
            stored
                .iter()
                .filter(same_provider)
                .find(|e| e.api_key.is_some())
        })
        .and_then(|e| e.api_key.as_deref())
}

/// The settings update (SPEC §4.2 schema) a submitted configuration form asks for, and, for
/// each entry of its `fallback` array, the form row it came from.
///
/// Empty inputs leave their field out; an empty key field leaves the key out, which keeps the
/// stored key of the same provider. A section that was stored but is now empty is sent empty,
/// so it is cleared. `stored` are the tenant's current settings, keys decrypted: fallback
/// entries keep the stored key of their provider unless a new one is given.
fn settings_from_form(
    pairs: &Pairs,
    stored: &TenantSettings,
) -> Result<(Value, Vec<usize>), SettingsError> {
    let mut out = Map::new();

    let mut llm = Map::new();
    put_text(&mut llm, pairs, "llm.provider", "provider");
    put_text(&mut llm, pairs, "llm.model", "model");
    put_text(&mut llm, pairs, "llm.apiKey", "apiKey");
    put_text(&mut llm, pairs, "llm.baseUrl", "baseUrl");
    put_number(&mut llm, pairs, "llm.temperature", "temperature");
    put_number(&mut llm, pairs, "llm.maxTokens", "maxTokens");
    put_number(&mut llm, pairs, "llm.topP", "topP");
    if !llm.is_empty() || stored.llm.is_some() {
        out.insert("llm".into(), Value::Object(llm));
    }

    let mut embeddings = Map::new();
    put_text(&mut embeddings, pairs, "embeddings.provider", "provider");
    put_text(&mut embeddings, pairs, "embeddings.model", "model");
    put_text(&mut embeddings, pairs, "embeddings.apiKey", "apiKey");
    put_text(&mut embeddings, pairs, "embeddings.baseUrl", "baseUrl");
    if !embeddings.is_empty() || stored.embeddings.is_some() {
        out.insert("embeddings".into(), Value::Object(embeddings));
    }

    let stored_fallback = stored.fallback.as_deref().unwrap_or_default();
    let kept: Vec<FallbackRow> = fallback_rows(pairs)
        .into_iter()
        .filter(|row| !row.remove && !row.is_blank())
        .collect();
    if let Some(row) = kept.iter().find(|row| row.provider.is_empty()) {
        return Err(SettingsError {
            field: format!("fallback[{}].provider", row.index),
            message: "choose a provider for this entry (or tick remove)".into(),
        });
    }
    // Rows without a priority go after the others, in form order.
    let mut next = kept
        .iter()
        .filter_map(|row| row.priority.parse::<u64>().ok())
        .max()
        .map_or(1, |max| max.saturating_add(1));
    let mut entries: Vec<(u64, usize, Map<String, Value>)> = Vec::new();
    for row in &kept {
        let mut entry = Map::new();
        entry.insert("provider".into(), Value::String(row.provider.clone()));
        if !row.model.is_empty() {
            entry.insert("model".into(), Value::String(row.model.clone()));
        }
        let order = if row.priority.is_empty() {
            let priority = next;
            next = next.saturating_add(1);
            entry.insert("priority".into(), Value::Number(priority.into()));
            priority
        } else {
            entry.insert("priority".into(), number_or_text(&row.priority));
            row.priority.parse::<u64>().unwrap_or(u64::MAX)
        };
        let api_key = if row.api_key.is_empty() {
            stored_fallback_key(stored_fallback, &row.provider, &row.model)
        } else {
            Some(row.api_key.as_str())
        };
        if let Some(key) = api_key {
            entry.insert("apiKey".into(), Value::String(key.to_owned()));
        }
        if !row.base_url.is_empty() {
            entry.insert("baseUrl".into(), Value::String(row.base_url.clone()));
        }
        entries.push((order, row.index, entry));
    }
    entries.sort_by_key(|(order, _, _)| *order);
    let rows: Vec<usize> = entries.iter().map(|(_, index, _)| *index).collect();
    if !entries.is_empty() || stored.fallback.is_some() {
        out.insert(
            "fallback".into(),
            Value::Array(
                entries
                    .into_iter()
                    .map(|(_, _, e)| Value::Object(e))
                    .collect(),
            ),
        );
    }

    let mut rate_limit = Map::new();
    put_number(
        &mut rate_limit,
        pairs,
        "rateLimit.requestsPerMinute",
        "requestsPerMinute",
    );
    put_number(
        &mut rate_limit,
        pairs,
        "rateLimit.tokensPerDay",
        "tokensPerDay",
    );
    if !rate_limit.is_empty() || stored.rate_limit.is_some() {
        out.insert("rateLimit".into(), Value::Object(rate_limit));
    }

    let mut cache = Map::new();
    let enabled = filled(pairs, "cache.enabled").is_some();
    put_number(&mut cache, pairs, "cache.ttlSeconds", "ttlSeconds");
    if enabled || !cache.is_empty() || stored.cache.is_some() {
        cache.insert("enabled".into(), Value::Bool(enabled));
        out.insert("cache".into(), Value::Object(cache));
    }

    let mut budget = Map::new();
    put_number(&mut budget, pairs, "budget.dailyUsd", "dailyUsd");
    put_number(&mut budget, pairs, "budget.monthlyUsd", "monthlyUsd");
    if !budget.is_empty() || stored.budget.is_some() {
        out.insert("budget".into(), Value::Object(budget));
    }

    // An emptied threshold turns the alert off.
    match filled(pairs, "costAlertThreshold") {
        Some(v) => {
            out.insert("costAlertThreshold".into(), number_or_text(v));
        }
        None if stored.cost_alert_threshold.is_some() => {
            out.insert("costAlertThreshold".into(), Value::Null);
        }
        None => {}
    }
    Ok((Value::Object(out), rows))
}

/// The form field an error of the update names: `fallback[k]` is the k-th entry of the
/// update, which came from form row `rows[k]`.
fn form_field(field: &str, rows: &[usize]) -> String {
    let Some(rest) = field.strip_prefix("fallback[") else {
        return field.to_owned();
    };
    match rest.split_once(']') {
        Some((k, tail)) => match k.parse::<usize>().ok().and_then(|k| rows.get(k)) {
            Some(row) => format!("fallback[{row}]{tail}"),
            None => field.to_owned(),
        },
        None => field.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// The configuration form's contents.

/// What the configuration form shows: field values by input name, the fallback rows, the
/// masked stored keys, and an error.
#[derive(Debug, Default)]
struct FormState {
    values: HashMap<String, String>,
    rows: Vec<FallbackRow>,
    /// Masked stored keys by input name (`llm.apiKey`, `fallback[0].apiKey`).
    masked: HashMap<String, String>,
    /// The field at fault (an input name) and what is wrong.
    error: Option<(String, String)>,
}

impl FormState {
    /// The form filled from the stored (masked) settings.
    fn from_view(view: &TenantView) -> Self {
        let mut state = Self::default();
        if let Value::Object(settings) = &view.settings {
            for (section, content) in settings {
                match (section.as_str(), content) {
                    ("fallback", _) => {}
                    (_, Value::Object(fields)) => {
                        for (field, v) in fields {
                            let name = format!("{section}.{field}");
                            if field == "apiKey" {
                                if let Value::String(masked) = v {
                                    state.masked.insert(name, masked.clone());
                                }
                            } else {
                                state.values.insert(name, display(v));
                            }
                        }
                    }
                    (_, v) => {
                        state.values.insert(section.clone(), display(v));
                    }
                }
            }
        }
        let mut fallback = masked_fallback(view);
        fallback.sort_by_key(|e| e.priority);
        for (index, entry) in fallback.iter().enumerate() {
            if let Some(key) = &entry.api_key {
                state
                    .masked
                    .insert(format!("fallback[{index}].apiKey"), key.clone());
            }
            state.rows.push(FallbackRow {
                index,
                provider: entry.provider.as_str().to_owned(),
                model: entry.model.clone().unwrap_or_default(),
                priority: entry.priority.to_string(),
                base_url: entry.base_url.clone().unwrap_or_default(),
                api_key: String::new(),
                remove: false,
            });
        }
        state.add_blank_row();
        state
    }

    /// The form as submitted (keys left out), with the masked stored keys from `view`.
    fn from_submitted(pairs: &Pairs, view: &TenantView) -> Self {
        let mut state = Self::default();
        for (name, v) in pairs {
            if name == "csrf" || name.starts_with("fallback[") || name.ends_with(".apiKey") {
                continue;
            }
            state
                .values
                .entry(name.clone())
                .or_insert_with(|| v.trim().to_owned());
        }
        let stored = masked_fallback(view);
        for (i, mut row) in fallback_rows(pairs)
            .into_iter()
            .filter(|row| !row.is_blank())
            .enumerate()
        {
            row.index = i;
            row.api_key.clear();
            if let Some(key) = stored_fallback_key(&stored, &row.provider, &row.model) {
                state
                    .masked
                    .insert(format!("fallback[{i}].apiKey"), key.to_owned());
            }
            state.rows.push(row);
        }
        for name in ["llm.apiKey", "embeddings.apiKey"] {
            if let Some(key) = view
                .settings
                .pointer(&format!("/{}", name.replace('.', "/")))
                .and_then(Value::as_str)
            {
                state.masked.insert(name.to_owned(), key.to_owned());
            }
        }
        state.add_blank_row();
        state
    }

    fn add_blank_row(&mut self) {
        self.rows.push(FallbackRow {
            index: self.rows.len(),
            ..FallbackRow::default()
        });
    }

    fn value(&self, name: &str) -> &str {
        self.values.get(name).map_or("", String::as_str)
    }

    /// The error of field `name`, if it is the one at fault.
    fn error_of(&self, name: &str) -> Option<&str> {
        self.error
            .as_ref()
            .filter(|(field, _)| field == name)
            .map(|(_, message)| message.as_str())
    }
}

/// The stored fallback entries, keys masked.
fn masked_fallback(view: &TenantView) -> Vec<FallbackSettings> {
    view.settings
        .get("fallback")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// A JSON value as a form shows it.
fn display(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The labels of the form's inputs, by name.
const LABELS: &[(&str, &str)] = &[
    ("llm.provider", "Provider"),
    ("llm.model", "Model"),
    ("llm.apiKey", "API key"),
    ("llm.baseUrl", "Base URL"),
    ("llm.temperature", "Temperature (0–2)"),
    ("llm.maxTokens", "Max tokens"),
    ("llm.topP", "Top-p (0–1)"),
    ("embeddings.provider", "Provider"),
    ("embeddings.model", "Model"),
    ("embeddings.apiKey", "API key"),
    ("embeddings.baseUrl", "Base URL"),
    ("rateLimit.requestsPerMinute", "Requests per minute"),
    ("rateLimit.tokensPerDay", "Tokens per day"),
    ("cache.enabled", "Cache answers"),
    ("cache.ttlSeconds", "Time to live (seconds)"),
    ("budget.dailyUsd", "Daily budget (USD)"),
    ("budget.monthlyUsd", "Monthly budget (USD)"),
    ("costAlertThreshold", "Daily cost alert threshold (USD)"),
];

fn label_of(name: &str) -> &'static str {
    LABELS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, label)| label)
}

// ---------------------------------------------------------------------------------------------
// Model lists.

/// Model names offered by the model inputs' `<datalist>`s, with the provider of each.
struct ModelLists {
    chat: Vec<(ProviderKind, String)>,
    embedding: Vec<(ProviderKind, String)>,
}

fn http_client() -> Option<&'static reqwest::Client> {
    static CLIENT: OnceLock<Option<reqwest::Client>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .timeout(OLLAMA_TAGS_TIMEOUT)
                .connect_timeout(OLLAMA_TAGS_TIMEOUT)
                .build()
                .ok()
        })
        .as_ref()
}

/// The models the Ollama server has (`GET /api/tags`); none when it cannot be reached soon.
async fn ollama_models(state: &AppState) -> Vec<String> {
    let Some(client) = http_client() else {
        return Vec::new();
    };
    let url = format!("{}/api/tags", state.config.llm.ollama.resolved_base_url());
    let answer = match client.get(&url).send().await {
        Ok(response) if response.status().is_success() => response.json::<Value>().await,
        Ok(response) => {
            tracing::debug!(status = %response.status(), "ollama /api/tags failed");
            return Vec::new();
        }
        Err(error) => {
            tracing::debug!(%error, "ollama /api/tags unreachable");
            return Vec::new();
        }
    };
    answer
        .ok()
        .as_ref()
        .and_then(|body| body.get("models"))
        .and_then(Value::as_array)
        .map(|models| {
            models
                .iter()
                .filter_map(|m| m.get("name").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

async fn model_lists(state: &AppState) -> ModelLists {
    let prices = &state.config.llm.prices;
    let ollama = ollama_models(state).await;
    let mut chat = Vec::new();
    for provider in [ProviderKind::OpenAi, ProviderKind::Anthropic] {
        chat.extend(
            prices
                .models(provider, false)
                .into_iter()
                .map(|m| (provider, m)),
        );
    }
    chat.extend(ollama.iter().map(|m| (ProviderKind::Ollama, m.clone())));
    let mut embedding = Vec::new();
    for provider in [ProviderKind::OpenAi, ProviderKind::Ollama] {
        embedding.extend(
            prices
                .models(provider, true)
                .into_iter()
                .map(|m| (provider, m)),
        );
    }
    embedding.extend(ollama.into_iter().map(|m| (ProviderKind::Ollama, m)));
    embedding.dedup();
    ModelLists { chat, embedding }
}

// ---------------------------------------------------------------------------------------------
// The tenants page.

fn map_tenant_error(error: TenantError) -> PageError {
    match error {
        TenantError::NotFound => PageError::NotFound,
        TenantError::InvalidName => {
            PageError::BadRequest("name: must be 1 to 200 characters".into())
        }
        TenantError::InvalidSettings(e) => {
            PageError::BadRequest(format!("{}: {}", e.field, scrub(&e.message)))
        }
        TenantError::Store(error) => {
            tracing::warn!(%error, "dashboard: the store failed");
            PageError::Unavailable
        }
        TenantError::Crypto(error) => {
            tracing::error!(%error, "dashboard: cannot decrypt a tenant's settings");
            PageError::Unavailable
        }
    }
}

/// The tenant's provider and model as configured, or the system defaults (marked).
fn provider_and_model(state: &AppState, settings: &Value) -> (String, String) {
    let env = &state.config.llm;
    let provider = settings
        .pointer("/llm/provider")
        .and_then(Value::as_str)
        .and_then(|p| p.parse::<ProviderKind>().ok());
    let model = settings.pointer("/llm/model").and_then(Value::as_str);
    let effective = provider.unwrap_or(env.default_provider);
    (
        match provider {
            Some(p) => p.as_str().to_owned(),
            None => format!("{} (default)", env.default_provider),
        },
        match model {
            Some(m) => m.to_owned(),
            None => format!("{} (default)", env.config(effective).model),
        },
    )
}

async fn tenants_page(
    State(state): State<AppState>,
    session: Session,
) -> Result<Response, PageError> {
    session.require_admin()?;
    render_tenants(&state, &session, None, StatusCode::OK).await
}

async fn render_tenants(
    state: &AppState,
    session: &Session,
    name_error: Option<(&str, &str)>,
    status: StatusCode,
) -> Result<Response, PageError> {
    let tenants = state.tenants.list().await.map_err(map_tenant_error)?;
    let from = crate::store::midnight(Utc::now().date_naive());
    let scope = UsageScope {
        tenant_id: None,
        from,
        to: from + TimeDelta::days(1),
    };
    let today: HashMap<String, UsageTotals> = state
        .store
        .usage_grouped(&scope, UsageDimension::Tenant)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "dashboard: cannot read today's usage");
            PageError::Unavailable
        })?
        .into_iter()
        .map(|(tenant, _, totals)| (tenant, totals))
        .collect();
    let (entered, error) = name_error.unzip();
    let body = html! {
        h1 { "Tenants" }
        @if tenants.is_empty() {
            p.muted #no-tenants { "No tenants yet." }
        } @else {
            table #tenants {
                thead { tr {
                    th { "Name" } th { "Provider" } th { "Model" }
                    th.num { "Cost today (USD)" } th.num { "Requests today" } th { "" }
                } }
                tbody {
                    @for tenant in &tenants {
                        @let (provider, model) = provider_and_model(state, &tenant.settings);
                        @let usage = today.get(&tenant.id).cloned().unwrap_or_default();
                        tr data-tenant-id=(tenant.id) {
                            td.name { (tenant.name) br; code.muted { (tenant.id) } }
                            td.provider { (provider) }
                            td.model { (model) }
                            td.num.cost { "$" (format_usd(u64::try_from(usage.cost_nano_usd).unwrap_or(0))) }
                            td.num.requests { (usage.requests) }
                            td.links {
                                a.settings-link href={ "/dashboard/tenants/" (tenant.id) "/settings" } { "Configuration" }
                                " · "
                                a.analytics-link href={ "/dashboard/tenants/" (tenant.id) "/analytics" } { "Analytics" }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Create a tenant" }
        form.card #create-tenant method="post" action="/dashboard/tenants" {
            (session.csrf_field())
            label for="tenant-name" { "Name" }
            input #tenant-name type="text" name="name" maxlength="200" required value=(entered.unwrap_or(""));
            @if let Some(error) = error {
                p.field-error #tenant-name-error role="alert" { (error) }
            }
            p { button #create-tenant-submit type="submit" { "Create tenant" } }
        }
    };
    Ok((status, page("Tenants", Some(session), body)).into_response())
}

async fn create_tenant(
    State(state): State<AppState>,
    session: Session,
    form: Result<Form<Pairs>, FormRejection>,
) -> Result<Response, PageError> {
    let pairs = pairs(form);
    check_csrf(&session, &pairs)?;
    session.require_admin()?;
    let name = value(&pairs, "name").unwrap_or_default();
    let created = match state.tenants.create(name, None).await {
        Ok(created) => created,
        Err(TenantError::InvalidName) => {
            return render_tenants(
                &state,
                &session,
                Some((name, "The name must be 1 to 200 characters.")),
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await;
        }
        Err(error) => return Err(map_tenant_error(error)),
    };
    tracing::info!(tenant = %created.tenant.id, "dashboard: tenant created");
    let id = &created.tenant.id;
    let body = html! {
        h1 { "Tenant created" }
        p {
            "Tenant " strong #new-tenant-name { (created.tenant.name) }
            " (id " code #new-tenant-id { (id) } ") was created. "
            "Its API key is shown only this once — copy it now:"
        }
        p.secret #new-api-key { (created.api_key) }
        p {
            a #configure-tenant href={ "/dashboard/tenants/" (id) "/settings" } { "Open its LLM configuration" }
            " · "
            a href="/dashboard/tenants" { "Back to tenants" }
        }
    };
    Ok((
        StatusCode::CREATED,
        page("Tenant created", Some(&session), body),
    )
        .into_response())
}

// ---------------------------------------------------------------------------------------------
// The configuration page.

/// What happened on the settings page before it is shown.
#[derive(Default)]
struct Notice {
    saved: bool,
    prompt: Option<String>,
    test: Option<Result<TestAnswer, String>>,
}

async fn settings_page(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, PageError> {
    session.require_tenant(&id)?;
    let view = state.tenants.show(&id).await.map_err(map_tenant_error)?;
    let saved = query
        .as_deref()
        .is_some_and(|q| q.split('&').any(|p| p == "saved=1"));
    let form = FormState::from_view(&view);
    let notice = Notice {
        saved,
        ..Notice::default()
    };
    render_settings(&state, &session, &view, &form, notice, StatusCode::OK).await
}

/// The fields of a form posted to tenant `id`'s pages and the stored tenant, after the CSRF
/// check and the session's access to the tenant.
async fn tenant_form(
    state: &AppState,
    session: &Session,
    id: &str,
    form: Result<Form<Pairs>, FormRejection>,
) -> Result<(Pairs, Tenant), PageError> {
    let pairs = pairs(form);
    check_csrf(session, &pairs)?;
    session.require_tenant(id)?;
    let tenant = state
        .store
        .get_tenant(id)
        .await
        .map_err(|e| map_tenant_error(e.into()))?;
    Ok((pairs, tenant))
}

async fn save_settings(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    form: Result<Form<Pairs>, FormRejection>,
) -> Result<Response, PageError> {
    let (pairs, tenant) = tenant_form(&state, &session, &id, form).await?;
    let stored = state.tenants.open(&tenant).map_err(map_tenant_error)?;
    let built = settings_from_form(&pairs, &stored);
    let (error, rows) = match built {
        Ok((update, rows)) => match state.tenants.update_settings(&id, &update).await {
            Ok(_) => {
                tracing::info!(tenant = %id, "dashboard: settings saved");
                return Ok(redirect(&format!(
                    "/dashboard/tenants/{id}/settings?saved=1"
                )));
            }
            Err(TenantError::InvalidSettings(error)) => (error, rows),
            Err(error) => return Err(map_tenant_error(error)),
        },
        Err(error) => (error, Vec::new()),
    };
    let view = state.tenants.show(&id).await.map_err(map_tenant_error)?;
    let mut form = FormState::from_submitted(&pairs, &view);
    // Rows were renumbered without the blank ones: map the error to the row shown.
    let field = form_field(&error.field, &rows);
    let field = renumber_row(&field, &pairs);
    form.error = Some((field, scrub(&error.message)));
    render_settings(
        &state,
        &session,
        &view,
        &form,
        Notice::default(),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await
}

/// `fallback[i]…` of the submitted form as numbered on the re-rendered form, which leaves out
/// blank rows.
fn renumber_row(field: &str, pairs: &Pairs) -> String {
    let Some((index, tail)) = field
        .strip_prefix("fallback[")
        .and_then(|rest| rest.split_once(']'))
    else {
        return field.to_owned();
    };
    let Ok(index) = index.parse::<usize>() else {
        return field.to_owned();
    };
    fallback_rows(pairs)
        .iter()
        .filter(|row| !row.is_blank())
        .position(|row| row.index == index)
        .map_or_else(
            || field.to_owned(),
            |shown| format!("fallback[{shown}]{tail}"),
        )
}

async fn send_test(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    form: Result<Form<Pairs>, FormRejection>,
) -> Result<Response, PageError> {
    let (pairs, tenant) = tenant_form(&state, &session, &id, form).await?;
    let prompt = filled(&pairs, "prompt")
        .unwrap_or(DEFAULT_PROMPT)
        .to_owned();
    let request = TestRequest {
        provider: None,
        prompt: Some(prompt.clone()),
        model: None,
    };
    let outcome = test_prompt(&state, Some(&tenant), request, Arrival::now())
        .await
        .map_err(|failure| failure.error().message.clone());
    let view = state.tenants.show(&id).await.map_err(map_tenant_error)?;
    let form = FormState::from_view(&view);
    let notice = Notice {
        saved: false,
        prompt: Some(prompt),
        test: Some(outcome),
    };
    render_settings(&state, &session, &view, &form, notice, StatusCode::OK).await
}

/// One labelled input, with its error when it is the field at fault.
fn input(form: &FormState, name: &str, kind: &str, list: Option<&str>) -> Markup {
    let id = field_id(name);
    let error = form.error_of(name);
    let (input_type, inputmode) = match kind {
        "number" => ("text", Some("decimal")),
        "url" => ("text", Some("url")),
        other => (other, None),
    };
    let masked = form.masked.get(name);
    html! {
        div.field {
            label for=(id) { (label_of(name)) }
            @if input_type == "password" {
                input id=(id) name=(name) type="password" value="" autocomplete="off"
                    placeholder=(masked.map_or("not set", String::as_str))
                    aria-invalid=[error.map(|_| "true")];
                p.hint.muted id={ (id) "-current" } {
                    @match masked {
                        Some(masked) => { "Stored: " code.masked-key { (masked) } " — leave empty to keep it." }
                        None => "None stored: the system key is used.",
                    }
                }
            } @else {
                input id=(id) name=(name) type=(input_type) value=(form.value(name))
                    inputmode=[inputmode] list=[list] autocomplete="off"
                    class=[error.map(|_| "invalid")] aria-invalid=[error.map(|_| "true")];
            }
            @if let Some(error) = error {
                p.field-error id={ (id) "-error" } role="alert" { (error) }
            }
        }
    }
}

/// A provider `<select>`; `choices` are the providers offered after the "system default".
fn provider_select(
    form: &FormState,
    name: &str,
    choices: &[ProviderKind],
    default_label: &str,
) -> Markup {
    let id = field_id(name);
    let current = form.value(name);
    let error = form.error_of(name);
    html! {
        div.field {
            label for=(id) { (label_of(name)) }
            select id=(id) name=(name) aria-invalid=[error.map(|_| "true")] {
                option value="" selected[current.is_empty()] { (default_label) }
                @for provider in choices {
                    option value=(provider.as_str()) selected[current == provider.as_str()] {
                        (provider_label(*provider))
                    }
                }
            }
            @if let Some(error) = error {
                p.field-error id={ (id) "-error" } role="alert" { (error) }
            }
        }
    }
}

fn provider_label(provider: ProviderKind) -> &'static str {
    match provider {
        ProviderKind::OpenAi => "OpenAI",
        ProviderKind::Anthropic => "Anthropic",
        ProviderKind::Ollama => "Ollama",
    }
}

fn fallback_table(form: &FormState) -> Markup {
    let cell_error = |row: &FallbackRow, field: &str| -> Markup {
        let name = format!("fallback[{}].{field}", row.index);
        html! {
            @if let Some(error) = form.error_of(&name) {
                p.field-error id={ (field_id(&name)) "-error" } role="alert" { (error) }
            }
        }
    };
    html! {
        table #fallback {
            thead { tr {
                th { "Priority" } th { "Provider" } th { "Model" } th { "Base URL" }
                th { "API key" } th { "Remove" }
            } }
            tbody {
                @for row in &form.rows {
                    @let name = |field: &str| format!("fallback[{}].{field}", row.index);
                    @let id = |field: &str| field_id(&name(field));
                    @let masked = form.masked.get(&name("apiKey"));
                    tr.fallback-row {
                        td {
                            input.priority id=(id("priority")) name=(name("priority")) type="text"
                                inputmode="numeric" size="4" value=(row.priority)
                                aria-label="Priority (lower goes first)";
                            (cell_error(row, "priority"))
                        }
                        td {
                            select id=(id("provider")) name=(name("provider")) aria-label="Provider" {
                                option value="" selected[row.provider.is_empty()] { "—" }
                                @for provider in ProviderKind::ALL {
                                    option value=(provider.as_str()) selected[row.provider == provider.as_str()] {
                                        (provider_label(provider))
                                    }
                                }
                            }
                            (cell_error(row, "provider"))
                        }
                        td {
                            input id=(id("model")) name=(name("model")) type="text" list="llm-models"
                                value=(row.model) aria-label="Model" autocomplete="off";
                            (cell_error(row, "model"))
                        }
                        td {
                            input id=(id("baseUrl")) name=(name("baseUrl")) type="text" inputmode="url"
                                value=(row.base_url) aria-label="Base URL" autocomplete="off";
                            (cell_error(row, "baseUrl"))
                        }
                        td {
                            input id=(id("apiKey")) name=(name("apiKey")) type="password" value=""
                                autocomplete="off" aria-label="API key (empty keeps the stored one)"
                                placeholder=(masked.map_or("not set", String::as_str));
                        }
                        td {
                            input id=(id("remove")) name=(name("remove")) type="checkbox" value="1"
                                checked[row.remove] aria-label="Remove this entry";
                        }
                    }
                }
            }
        }
        p.hint.muted {
            "Tried in order of priority (lower first) when the primary provider fails. "
            "Fill the empty row to add an entry, tick “Remove” to drop one, change the numbers to reorder."
        }
    }
}

fn test_section(session: &Session, id: &str, notice: &Notice) -> Markup {
    let prompt = notice.prompt.as_deref().unwrap_or(DEFAULT_PROMPT);
    html! {
        h2 #test { "Send test prompt" }
        form.card #test-form method="post" action={ "/dashboard/tenants/" (id) "/test" } {
            (session.csrf_field())
            label for="test-prompt" { "Prompt" }
            input #test-prompt type="text" name="prompt" value=(prompt);
            p { button #send-test type="submit" { "Send test prompt" } }
            p.hint.muted { "Sent with the saved configuration; the call is billed to the tenant." }
        }
        @match &notice.test {
            Some(Ok(answer)) => {
                div.card #test-result role="status" {
                    p.ok { "The provider answered." }
                    dl.result {
                        dt { "Answer" } dd #test-answer { (answer.content) }
                        dt { "Provider / model" } dd #test-model { (answer.provider) " / " (answer.model) }
                        dt { "Latency" } dd #test-latency { (answer.latency_ms) " ms" }
                        dt { "Tokens" } dd #test-tokens {
                            (answer.usage.input_tokens) " in, " (answer.usage.output_tokens) " out"
                        }
                        dt { "Cost" } dd #test-cost {
                            "$" (answer.cost.usd_string())
                            @if !answer.cost.priced { " (model not in the price table)" }
                        }
                    }
                }
            }
            Some(Err(message)) => {
                div.card #test-result {
                    p.error #test-error role="alert" { "The test prompt failed: " (message) }
                }
            }
            None => {}
        }
    }
}

async fn render_settings(
    state: &AppState,
    session: &Session,
    view: &TenantView,
    form: &FormState,
    notice: Notice,
    status: StatusCode,
) -> Result<Response, PageError> {
    let models = model_lists(state).await;
    let env = &state.config.llm;
    let id = &view.id;
    let default_chat = format!(
        "System default ({}, {})",
        env.default_provider,
        env.config(env.default_provider).model
    );
    let default_embeddings = format!("System default ({})", env.embeddings.provider);
    let body = html! {
        h1 { "LLM configuration" }
        p.muted {
            "Tenant " strong #tenant-name { (view.name) } " · id " code { (id) }
            " · " a href={ "/dashboard/tenants/" (id) "/analytics" } { "Analytics" }
        }
        @if notice.saved {
            p.ok #saved role="status" { "Saved." }
        }
        @if let Some((field, message)) = &form.error {
            p.error #settings-error role="alert" {
                "Not saved: " (field) ": " (message)
            }
        }
        form.card #settings-form method="post" action={ "/dashboard/tenants/" (id) "/settings" } novalidate {
            (session.csrf_field())
            fieldset #llm {
                legend { "LLM" }
                (provider_select(form, "llm.provider", &ProviderKind::ALL, &default_chat))
                (input(form, "llm.model", "text", Some("llm-models")))
                (input(form, "llm.apiKey", "password", None))
                (input(form, "llm.baseUrl", "url", None))
                div.row {
                    (input(form, "llm.temperature", "number", None))
                    (input(form, "llm.maxTokens", "number", None))
                    (input(form, "llm.topP", "number", None))
                }
            }
            fieldset #embeddings {
                legend { "Embeddings" }
                (provider_select(form, "embeddings.provider", &[ProviderKind::OpenAi, ProviderKind::Ollama], &default_embeddings))
                (input(form, "embeddings.model", "text", Some("embedding-models")))
                (input(form, "embeddings.apiKey", "password", None))
                (input(form, "embeddings.baseUrl", "url", None))
            }
            fieldset #fallback-chain {
                legend { "Fallback chain" }
                (fallback_table(form))
            }
            fieldset #rate-limits {
                legend { "Rate limits" }
                div.row {
                    (input(form, "rateLimit.requestsPerMinute", "number", None))
                    (input(form, "rateLimit.tokensPerDay", "number", None))
                }
            }
            fieldset #cache {
                legend { "Cache" }
                div.field.check {
                    input #cache-enabled type="checkbox" name="cache.enabled" value="true"
                        checked[form.value("cache.enabled") == "true"];
                    label for="cache-enabled" { (label_of("cache.enabled")) }
                }
                (input(form, "cache.ttlSeconds", "number", None))
            }
            fieldset #budgets {
                legend { "Budgets and alerts" }
                div.row {
                    (input(form, "budget.dailyUsd", "number", None))
                    (input(form, "budget.monthlyUsd", "number", None))
                    (input(form, "costAlertThreshold", "number", None))
                }
            }
            p.hint.muted { "Empty fields use the system defaults." }
            p { button #save-settings type="submit" { "Save" } }
        }
        datalist #llm-models {
            @for (provider, model) in &models.chat {
                option value=(model) label=(provider.as_str()) {}
            }
        }
        datalist #embedding-models {
            @for (provider, model) in &models.embedding {
                option value=(model) label=(provider.as_str()) {}
            }
        }
        (test_section(session, id, &notice))
    };
    Ok((status, page("LLM configuration", Some(session), body)).into_response())
}
