//! The analytics page (SPEC §5; see [`super`]): `GET /dashboard/tenants/{id}/analytics` (the
//! admin, or that tenant) and `GET /dashboard/analytics` (the admin, across tenants).
//!
//! A GET form picks the period (`from`, `to`: dates, as the usage API reads them) and the
//! granularity (`day`, `week`, `month`); the defaults are the API's (the last 30 UTC days, by
//! day). `page` pages the conversations, [`CONVERSATIONS_PER_PAGE`] at a time. The numbers come
//! from [`crate::analytics::report`], the code behind `GET /api/tenants/{id}/usage`, so they are
//! the API's; latency and errors per provider from [`Store::provider_latency`].
//!
//! What a browser test can find on the page:
//! - `form#period` with `input#from`, `input#to` (dates) and `select#granularity`;
//! - `section#totals` with one `.stat` per total: `#stat-requests`, `#stat-errors`,
//!   `#stat-input-tokens`, `#stat-output-tokens`, `#stat-embedding-tokens`, `#stat-cost`, each
//!   with the API's value in `data-value` (the cost as the API's `costUsd` string);
//! - `svg#cost-chart` (one `<circle>` per bucket) and `svg#tokens-chart` (one `<circle>` per
//!   bucket for input tokens, then one per bucket for output tokens), each inside a
//!   `figure.chart` whose `data-points` is the number of buckets; the same numbers in
//!   `table#series-table`;
//! - `table#by-model`, `svg#model-chart`, `table#by-provider`, `svg#provider-chart` (bar charts
//!   of cost, one bar `<rect>` per row, top ten), and across tenants `table#by-tenant`,
//!   `svg#tenant-chart`;
//! - `table#conversations` with `nav.pager` (`a[rel=prev]`, `a[rel=next]`);
//! - `table#latency`: requests, errors, error rate, p50 and p95 per provider;
//! - a bad query value: status 400 and `p.error[role=alert]` above the form.

mod charts;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use maud::{Markup, html};

use self::charts::{ACCENT, Bar, ORANGE, Series, SeriesChart};
use super::{PageError, Session, page, trusted};
use crate::analytics::{
    self, BreakdownRow, Granularity, GroupBy, Report, ReportParams, ReportQuery, TotalsView,
};
use crate::api::AppState;
use crate::store::{ProviderLatency, Store, StoreError, Tenant, UsageScope};

/// Conversations per page of the conversation table.
pub const CONVERSATIONS_PER_PAGE: u32 = 20;

/// Bars per breakdown chart (the tables show every row).
const CHART_BARS: usize = 10;

/// Tenants in the across-tenants table.
const TENANT_ROWS: u32 = 20;

/// This module's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard/tenants/{id}/analytics", get(tenant_page))
        .route("/dashboard/analytics", get(all_page))
}

type Pairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

fn pairs(query: Pairs) -> Result<Vec<(String, String)>, String> {
    query
        .map(|Query(pairs)| pairs)
        .map_err(|rejection| format!("the query string cannot be read: {}", rejection.body_text()))
}

async fn tenant_page(
    session: Session,
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    query: Pairs,
) -> Result<Response, PageError> {
    let Ok(Path(id)) = id else {
        return Err(PageError::NotFound);
    };
    session.require_tenant(&id)?;
    let tenant: Arc<Tenant> = match &session.tenant {
        Some(tenant) => Arc::clone(tenant),
        None => Arc::new(
            state
                .store
                .get_tenant(&id)
                .await
                .map_err(|error| match error {
                    StoreError::NotFound => PageError::NotFound,
                    error => unavailable(&error),
                })?,
        ),
    };
    let subject = Subject::Tenant {
        id: &tenant.id,
        name: &tenant.name,
    };
    let (status, body) = content(state.store.as_ref(), subject, pairs(query), Utc::now()).await?;
    let title = format!("Analytics · {}", tenant.name);
    Ok((status, page(&title, Some(&session), body)).into_response())
}

async fn all_page(
    session: Session,
    State(state): State<AppState>,
    query: Pairs,
) -> Result<Response, PageError> {
    session.require_admin()?;
    let (status, body) =
        content(state.store.as_ref(), Subject::All, pairs(query), Utc::now()).await?;
    Ok((
        status,
        page("Analytics · all tenants", Some(&session), body),
    )
        .into_response())
}

fn unavailable(error: &StoreError) -> PageError {
    tracing::warn!(%error, "the analytics page cannot read the database");
    PageError::Unavailable
}

/// Whose usage the page shows.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    /// One tenant's.
    Tenant {
        /// Its id.
        id: &'a str,
        /// Its name.
        name: &'a str,
    },
    /// Every tenant's (the admin's view).
    All,
}

impl Subject<'_> {
    fn tenant_id(&self) -> Option<&str> {
        match self {
            Self::Tenant { id, .. } => Some(id),
            Self::All => None,
        }
    }

    /// The page's own path, the form's target.
    fn path(&self) -> String {
        match self {
            Self::Tenant { id, .. } => format!("/dashboard/tenants/{}/analytics", encode(id)),
            Self::All => "/dashboard/analytics".to_owned(),
        }
    }
}

/// The page's query: the form's fields, as text.
#[derive(Debug, Clone, Default)]
struct PageQuery {
    from: Option<String>,
    to: Option<String>,
    granularity: Option<String>,
    page: Option<String>,
}

/// A query value the page cannot use, as the usage API words it (`param: message`).
#[derive(Debug, Clone)]
struct BadQuery(String);

impl PageQuery {
    /// Reads the query string; an empty field (a cleared date input) counts as not given.
    fn read(pairs: &[(String, String)]) -> Result<Self, BadQuery> {
        let mut query = Self::default();
        for (name, value) in pairs {
            let slot = match name.as_str() {
                "from" => &mut query.from,
                "to" => &mut query.to,
                "granularity" => &mut query.granularity,
                "page" => &mut query.page,
                _ => {
                    return Err(BadQuery(format!(
                        "{name}: unknown parameter; expected from, to, granularity or page"
                    )));
                }
            };
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            if slot.replace(value.to_owned()).is_some() {
                return Err(BadQuery(format!("{name}: given more than once")));
            }
        }
        Ok(query)
    }

    /// The report query (by model) and the conversation page number (from 1).
    fn validate(
        &self,
        tenant_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<(ReportQuery, u32), BadQuery> {
        let params = ReportParams {
            from: self.from.clone(),
            to: self.to.clone(),
            granularity: self.granularity.clone(),
            group_by: Some(GroupBy::Model.as_str().to_owned()),
            limit: None,
            offset: None,
        };
        let query = params
            .validate(tenant_id.map(str::to_owned), now)
            .map_err(|error| BadQuery(error.to_string()))?;
        let page = match self.page.as_deref() {
            None => 1,
            Some(text) => text
                .parse::<u32>()
                .ok()
                .filter(|page| *page >= 1)
                .ok_or_else(|| BadQuery("page: expected a number ≥ 1".to_owned()))?,
        };
        Ok((query, page))
    }
}

/// Everything the page shows, read from the store.
#[derive(Debug)]
struct Data {
    query: ReportQuery,
    page: u32,
    by_model: Report,
    by_provider: Report,
    conversations: Report,
    latency: Vec<ProviderLatency>,
    /// Across tenants: the most expensive tenants, and every tenant's name by id.
    by_tenant: Option<(Report, HashMap<String, String>)>,
}

async fn load(
    store: &dyn Store,
    subject: Subject<'_>,
    query: ReportQuery,
    page: u32,
) -> Result<Data, StoreError> {
    let with = |group_by: GroupBy, limit: u32, offset: u64| ReportQuery {
        group_by,
        limit,
        offset,
        ..query.clone()
    };
    let by_model = query.clone();
    let by_provider = with(GroupBy::Provider, analytics::DEFAULT_LIMIT, 0);
    let conversations = with(
        GroupBy::Conversation,
        CONVERSATIONS_PER_PAGE,
        u64::from(page - 1) * u64::from(CONVERSATIONS_PER_PAGE),
    );
    let by_tenant = with(GroupBy::Tenant, TENANT_ROWS, 0);
    let scope = UsageScope {
        tenant_id: subject.tenant_id(),
        from: query.from,
        to: query.to,
    };
    let tenants = async {
        match subject {
            Subject::Tenant { .. } => Ok(None),
            Subject::All => {
                let (report, tenants) =
                    futures::try_join!(analytics::report(store, &by_tenant), store.list_tenants())?;
                let names = tenants.into_iter().map(|t| (t.id, t.name)).collect();
                Ok(Some((report, names)))
            }
        }
    };
    let (by_model, by_provider, conversations, latency, by_tenant) = futures::try_join!(
        analytics::report(store, &by_model),
        analytics::report(store, &by_provider),
        analytics::report(store, &conversations),
        store.provider_latency(&scope),
        tenants,
    )?;
    Ok(Data {
        query,
        page,
        by_model,
        by_provider,
        conversations,
        latency,
        by_tenant,
    })
}

/// The page's body (inside [`page`]) for `subject`, from the query string's `pairs` (or why it
/// could not be read), with `now` the default end of the period: 200 with the analytics, or
/// 400 with the form and the error. Public for the page-load benchmark.
pub async fn content(
    store: &dyn Store,
    subject: Subject<'_>,
    pairs: Result<Vec<(String, String)>, String>,
    now: DateTime<Utc>,
) -> Result<(StatusCode, Markup), PageError> {
    let query = pairs
        .map_err(BadQuery)
        .and_then(|pairs| PageQuery::read(&pairs));
    let (form_query, validated) = match query {
        Ok(query) => {
            let validated = query.validate(subject.tenant_id(), now);
            (query, validated)
        }
        Err(error) => (PageQuery::default(), Err(error)),
    };
    let (query, page_number) = match validated {
        Ok(validated) => validated,
        Err(BadQuery(message)) => {
            let body = html! {
                div.analytics {
                    (heading(subject))
                    p.error role="alert" { (message) }
                    (form(subject, &form_query, None))
                }
            };
            return Ok((StatusCode::BAD_REQUEST, body));
        }
    };
    let data = load(store, subject, query, page_number)
        .await
        .map_err(|error| unavailable(&error))?;
    Ok((StatusCode::OK, render(subject, &form_query, &data)))
}

fn heading(subject: Subject<'_>) -> Markup {
    html! {
        @match subject {
            Subject::Tenant { name, .. } => h1 { "Analytics · " (name) },
            Subject::All => h1 { "Analytics · all tenants" },
        }
    }
}

/// The period form, filled with what was asked or, when nothing was, with the period shown.
fn form(subject: Subject<'_>, asked: &PageQuery, shown: Option<&ReportQuery>) -> Markup {
    let from = asked
        .from
        .clone()
        .or_else(|| shown.map(|q| date_input(q.from.date_naive())));
    let to = asked
        .to
        .clone()
        .or_else(|| shown.map(|q| date_input(last_day(q.to))));
    let granularity = shown.map_or(asked.granularity.as_deref(), |q| {
        Some(q.granularity.as_str())
    });
    html! {
        form #period .card .filters method="get" action=(subject.path()) {
            div {
                label for="from" { "From" }
                input #from type="date" name="from" value=[from];
            }
            div {
                label for="to" { "To (included)" }
                input #to type="date" name="to" value=[to];
            }
            div {
                label for="granularity" { "Granularity" }
                select #granularity name="granularity" {
                    @for (value, label) in [("day", "Day"), ("week", "Week"), ("month", "Month")] {
                        option value=(value) selected[granularity == Some(value)] { (label) }
                    }
                }
            }
            div { button type="submit" { "Show" } }
        }
    }
}

fn date_input(day: NaiveDate) -> String {
    day.format("%Y-%m-%d").to_string()
}

/// The UTC day of the last instant before `to`.
fn last_day(to: DateTime<Utc>) -> NaiveDate {
    to.checked_sub_signed(TimeDelta::microseconds(1))
        .unwrap_or(to)
        .date_naive()
}

fn render(subject: Subject<'_>, asked: &PageQuery, data: &Data) -> Markup {
    let query = &data.query;
    let report = &data.by_model;
    let totals = &report.totals;
    html! {
        div.analytics {
            (heading(subject))
            @if let Subject::Tenant { id, .. } = subject {
                p.muted {
                    a href={ "/dashboard/tenants/" (encode(id)) "/settings" } { "LLM configuration" }
                }
            }
            (form(subject, asked, Some(query)))
            p.muted #period-shown {
                "From " time datetime=(report.from) { (report.from) }
                " to " time datetime=(report.to) { (report.to) }
                " (UTC, end excluded), by " (query.granularity.as_str()) "."
            }
            section #totals {
                h2 { "Totals" }
                div.grid {
                    (stat("stat-requests", "Requests", &thousands(totals.requests), &totals.requests.to_string(), None))
                    (stat("stat-errors", "Errors", &thousands(totals.errors), &totals.errors.to_string(),
                        Some(format!("{} of requests", percent(totals.errors, totals.requests)))))
                    (stat("stat-input-tokens", "Input tokens", &thousands(totals.input_tokens), &totals.input_tokens.to_string(), None))
                    (stat("stat-output-tokens", "Output tokens", &thousands(totals.output_tokens), &totals.output_tokens.to_string(), None))
                    (stat("stat-embedding-tokens", "Embedding tokens", &thousands(totals.embedding_tokens), &totals.embedding_tokens.to_string(), None))
                    (stat("stat-cost", "Cost", &usd(&totals.cost_usd), &totals.cost_usd, None))
                }
            }
            (time_series(query.granularity, report))
            section #models {
                h2 { "By model" }
                (breakdown_table("by-model", &data.by_model, Columns::Model, None))
                (breakdown_chart("model-chart", "Cost by model", &data.by_model.breakdown, |row| {
                    format!("{}/{}", row.provider.as_deref().unwrap_or(""), row.model.as_deref().unwrap_or(""))
                }))
            }
            section #providers {
                h2 { "By provider" }
                (breakdown_table("by-provider", &data.by_provider, Columns::Provider, None))
                (breakdown_chart("provider-chart", "Cost by provider", &data.by_provider.breakdown, |row| {
                    row.provider.clone().unwrap_or_default()
                }))
            }
            @if let Some((by_tenant, names)) = &data.by_tenant {
                section #tenants {
                    h2 { "By tenant" }
                    @if by_tenant.breakdown_total > by_tenant.breakdown.len() as u64 {
                        p.muted { "The " (by_tenant.breakdown.len()) " most expensive of " (by_tenant.breakdown_total) " tenants." }
                    }
                    (breakdown_table("by-tenant", by_tenant, Columns::Tenant, Some(names)))
                    (breakdown_chart("tenant-chart", "Cost by tenant", &by_tenant.breakdown, |row| {
                        let id = row.tenant_id.as_deref().unwrap_or("");
                        names.get(id).cloned().unwrap_or_else(|| id.to_owned())
                    }))
                }
            }
            (conversations(subject, query, data))
            (latency_table(&data.latency))
        }
    }
}

fn stat(id: &str, label: &str, shown: &str, value: &str, sub: Option<String>) -> Markup {
    html! {
        div.stat id=(id) data-value=(value) {
            div.label.muted { (label) }
            div.value { (shown) }
            @if let Some(sub) = sub { div.sub.muted { (sub) } }
        }
    }
}

/// The two time-series charts and their numbers.
fn time_series(granularity: Granularity, report: &Report) -> Markup {
    let series = &report.series;
    let labels: Vec<String> = series
        .iter()
        .map(|point| bucket_label(granularity, point.start))
        .collect();
    let cost = [Series {
        name: "Cost (USD)",
        color: ACCENT,
        values: series.iter().map(|p| dollars(&p.totals)).collect(),
    }];
    let tokens = [
        Series {
            name: "Input tokens",
            color: ACCENT,
            values: series
                .iter()
                .map(|p| count(p.totals.input_tokens))
                .collect(),
        },
        Series {
            name: "Output tokens",
            color: ORANGE,
            values: series
                .iter()
                .map(|p| count(p.totals.output_tokens))
                .collect(),
        },
    ];
    let x_desc = match granularity {
        Granularity::Day => "Day (UTC)",
        Granularity::Week => "Week from Monday (UTC)",
        Granularity::Month => "Month (UTC)",
    };
    let cost_chart = charts::series_chart(&SeriesChart {
        id: "cost-chart",
        title: "Cost over time",
        x_desc,
        y_desc: "Cost (USD)",
        buckets: &labels,
        series: &cost,
        y_format: usd_tick,
    });
    let tokens_chart = charts::series_chart(&SeriesChart {
        id: "tokens-chart",
        title: "Token usage over time",
        x_desc,
        y_desc: "Tokens",
        buckets: &labels,
        series: &tokens,
        y_format: compact,
    });
    html! {
        section #cost-over-time {
            h2 { "Cost over time" }
            (chart_figure(cost_chart, series.len()))
        }
        section #tokens-over-time {
            h2 { "Token usage over time" }
            (chart_figure(tokens_chart, series.len()))
            details {
                summary { "The numbers, per " (granularity.as_str()) }
                table #series-table {
                    thead { tr {
                        th { (granularity.as_str()) " from" }
                        th.num { "Requests" } th.num { "Errors" } th.num { "Input tokens" }
                        th.num { "Output tokens" } th.num { "Embedding tokens" } th.num { "Cost (USD)" }
                    } }
                    tbody {
                        @for point in series {
                            tr {
                                td { (date_input(point.start)) }
                                td.num { (thousands(point.totals.requests)) }
                                td.num { (thousands(point.totals.errors)) }
                                td.num { (thousands(point.totals.input_tokens)) }
                                td.num { (thousands(point.totals.output_tokens)) }
                                td.num { (thousands(point.totals.embedding_tokens)) }
                                td.num { (usd(&point.totals.cost_usd)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn chart_figure(chart: Result<String, charts::ChartError>, points: usize) -> Markup {
    match chart {
        Ok(svg) => html! { figure.chart data-points=(points) { (trusted(svg)) } },
        Err(error) => {
            tracing::warn!(%error, "an analytics chart failed");
            html! { p.error { (error.to_string()) } }
        }
    }
}

fn bucket_label(granularity: Granularity, start: NaiveDate) -> String {
    match granularity {
        Granularity::Day | Granularity::Week => start.format("%b %-d").to_string(),
        Granularity::Month => start.format("%b %Y").to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Columns {
    Model,
    Provider,
    Tenant,
}

fn breakdown_table(
    id: &str,
    report: &Report,
    columns: Columns,
    names: Option<&HashMap<String, String>>,
) -> Markup {
    if report.breakdown.is_empty() {
        return html! { p.muted id=(id) { "No usage in this period." } };
    }
    html! {
        div.scroll { table id=(id) {
            thead { tr {
                @match columns {
                    Columns::Model => { th { "Provider" } th { "Model" } }
                    Columns::Provider => { th { "Provider" } }
                    Columns::Tenant => { th { "Tenant" } }
                }
                th.num { "Requests" } th.num { "Errors" } th.num { "Input tokens" }
                th.num { "Output tokens" } th.num { "Embedding tokens" } th.num { "Cost (USD)" }
            } }
            tbody {
                @for row in &report.breakdown {
                    tr {
                        @match columns {
                            Columns::Model => {
                                td { (row.provider.as_deref().unwrap_or("")) }
                                td { (row.model.as_deref().unwrap_or("")) }
                            }
                            Columns::Provider => { td { (row.provider.as_deref().unwrap_or("")) } }
                            Columns::Tenant => {
                                @let tenant = row.tenant_id.as_deref().unwrap_or("");
                                td {
                                    a href={ "/dashboard/tenants/" (encode(tenant)) "/analytics" } {
                                        (names.and_then(|n| n.get(tenant)).map_or(tenant, String::as_str))
                                    }
                                }
                            }
                        }
                        (totals_cells(&row.totals))
                    }
                }
            }
        } }
    }
}

fn totals_cells(totals: &TotalsView) -> Markup {
    html! {
        td.num { (thousands(totals.requests)) }
        td.num { (thousands(totals.errors)) }
        td.num { (thousands(totals.input_tokens)) }
        td.num { (thousands(totals.output_tokens)) }
        td.num { (thousands(totals.embedding_tokens)) }
        td.num data-value=(totals.cost_usd) { (usd(&totals.cost_usd)) }
    }
}

fn breakdown_chart(
    id: &str,
    title: &str,
    rows: &[BreakdownRow],
    label: impl Fn(&BreakdownRow) -> String,
) -> Markup {
    if rows.is_empty() {
        return html! {};
    }
    let bars: Vec<Bar> = rows
        .iter()
        .take(CHART_BARS)
        .map(|row| Bar {
            label: label(row),
            value: dollars(&row.totals),
            value_label: usd(&row.totals.cost_usd),
        })
        .collect();
    let points = bars.len();
    chart_figure(
        charts::bar_chart(id, title, "Cost (USD)", &bars, &usd_tick),
        points,
    )
}

fn conversations(subject: Subject<'_>, query: &ReportQuery, data: &Data) -> Markup {
    let report = &data.conversations;
    let per_page = u64::from(CONVERSATIONS_PER_PAGE);
    let pages = report.breakdown_total.div_ceil(per_page).max(1);
    let page = u64::from(data.page);
    let across = matches!(subject, Subject::All);
    let link = |page: u64| {
        let mut url = format!(
            "{}?from={}&to={}&granularity={}",
            subject.path(),
            encode(&date_input(query.from.date_naive())),
            encode(&date_input(last_day(query.to))),
            query.granularity.as_str()
        );
        if page > 1 {
            url.push_str(&format!("&page={page}"));
        }
        url
    };
    let names = data.by_tenant.as_ref().map(|(_, names)| names);
    html! {
        section #conversations-section {
            h2 { "Cost per conversation" }
            p.muted {
                (report.breakdown_total) " conversations in the period, most expensive first"
                " (requests without a conversation id count as one)."
            }
            @if report.breakdown.is_empty() {
                p.muted #conversations { "No conversations on this page." }
            } @else {
                div.scroll { table #conversations {
                    thead { tr {
                        @if across { th { "Tenant" } }
                        th { "Conversation" }
                        th.num { "Requests" } th.num { "Errors" } th.num { "Input tokens" }
                        th.num { "Output tokens" } th.num { "Embedding tokens" } th.num { "Cost (USD)" }
                        th { "First" } th { "Last" }
                    } }
                    tbody {
                        @for row in &report.breakdown {
                            tr {
                                @if across {
                                    @let tenant = row.tenant_id.as_deref().unwrap_or("");
                                    td { (names.and_then(|n| n.get(tenant)).map_or(tenant, String::as_str)) }
                                }
                                td {
                                    @match row.conversation_id.as_ref().and_then(Option::as_deref) {
                                        Some(id) => code { (id) },
                                        None => span.muted { "(none)" },
                                    }
                                }
                                (totals_cells(&row.totals))
                                td { (instant(row.first_at.as_deref())) }
                                td { (instant(row.last_at.as_deref())) }
                            }
                        }
                    }
                } }
            }
            nav.pager aria-label="Conversation pages" {
                @if page > 1 {
                    a rel="prev" href=(link((page - 1).min(pages))) { "← Previous" }
                }
                span.page-of { "Page " (page) " of " (pages) }
                @if page < pages {
                    a rel="next" href=(link(page + 1)) { "Next →" }
                }
            }
        }
    }
}

/// An RFC 3339 instant of a report, shown to the second (`2026-11-26 10:04:05`), whole in
/// its `datetime`.
fn instant(text: Option<&str>) -> Markup {
    let text = text.unwrap_or("");
    let shown = DateTime::parse_from_rfc3339(text).map_or_else(
        |_| text.to_owned(),
        |t| {
            t.with_timezone(&Utc)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        },
    );
    html! { time datetime=(text) { (shown) } }
}

fn latency_table(latency: &[ProviderLatency]) -> Markup {
    let ms = |value: Option<i64>| value.map_or_else(|| "–".to_owned(), thousands);
    html! {
        section #latency-section {
            h2 { "Latency and errors per provider" }
            @if latency.is_empty() {
                p.muted #latency { "No requests in this period." }
            } @else {
                table #latency {
                    thead { tr {
                        th { "Provider" } th.num { "Requests" } th.num { "Errors" }
                        th.num { "Error rate" } th.num { "p50 (ms)" } th.num { "p95 (ms)" }
                    } }
                    tbody {
                        @for row in latency {
                            tr {
                                td { (row.provider) }
                                td.num { (thousands(row.requests)) }
                                td.num { (thousands(row.errors)) }
                                td.num { (percent(row.errors, row.requests)) }
                                td.num data-value=[row.p50_ms] { (ms(row.p50_ms)) }
                                td.num data-value=[row.p95_ms] { (ms(row.p95_ms)) }
                            }
                        }
                    }
                }
                p.muted {
                    "Latency from arrival to the end of the answer, nearest-rank percentiles; "
                    "cache hits are counted as requests but left out of the latencies."
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Numbers as they read.

/// `1234567` → `1,234,567`.
fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The API's nine-digit USD string without trailing zeros (at least two decimals), with `$`.
fn usd(cost_usd: &str) -> String {
    let trimmed = match cost_usd.split_once('.') {
        Some((whole, fraction)) => {
            let fraction = fraction.trim_end_matches('0');
            let fraction = if fraction.len() < 2 {
                format!("{fraction:0<2}")
            } else {
                fraction.to_owned()
            };
            format!("{whole}.{fraction}")
        }
        None => cost_usd.to_owned(),
    };
    format!("${trimmed}")
}

/// A USD tick value.
fn usd_tick(value: f64) -> String {
    if value.abs() < 1e-12 {
        return "$0".to_owned();
    }
    usd(&format!("{value:.9}"))
}

/// A token count as a tick value: `950`, `12.5k`, `3.2M`.
fn compact(value: f64) -> String {
    let abs = value.abs();
    let (scaled, suffix) = if abs >= 1e9 {
        (value / 1e9, "B")
    } else if abs >= 1e6 {
        (value / 1e6, "M")
    } else if abs >= 1e3 {
        (value / 1e3, "k")
    } else {
        return format!("{value:.0}");
    };
    let text = format!("{scaled:.1}");
    format!("{}{suffix}", text.trim_end_matches(".0"))
}

#[allow(clippy::cast_precision_loss)] // For drawing only; the page's numbers are exact.
fn dollars(totals: &TotalsView) -> f64 {
    totals.cost_nano_usd as f64 / 1e9
}

#[allow(clippy::cast_precision_loss)] // For drawing only.
fn count(n: i64) -> f64 {
    n as f64
}

/// `part` of `whole` as a percentage with one decimal, `–` when `whole` is zero.
#[allow(clippy::cast_precision_loss)] // One decimal of a ratio.
fn percent(part: i64, whole: i64) -> String {
    if whole == 0 {
        "–".to_owned()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

/// Percent-encodes `text` for a URL path segment or query value.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(-1_234_567), "-1,234,567");
        assert_eq!(usd("0.000012300"), "$0.0000123");
        assert_eq!(usd("12.500000000"), "$12.50");
        assert_eq!(usd("3.000000000"), "$3.00");
        assert_eq!(usd_tick(0.0), "$0");
        assert_eq!(usd_tick(0.30000000000000004), "$0.30");
        assert_eq!(usd_tick(0.0002), "$0.0002");
        assert_eq!(compact(950.0), "950");
        assert_eq!(compact(12_500.0), "12.5k");
        assert_eq!(compact(3_000_000.0), "3M");
        assert_eq!(percent(1, 3), "33.3%");
        assert_eq!(percent(0, 0), "–");
        assert_eq!(encode("a b/c<d>"), "a%20b%2Fc%3Cd%3E");
    }

    #[test]
    fn bad_queries_are_named() {
        let now = Utc::now();
        let read = |pairs: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect();
            PageQuery::read(&pairs).and_then(|q| q.validate(Some("t"), now))
        };
        assert!(read(&[]).is_ok());
        assert!(read(&[("from", ""), ("to", "")]).is_ok());
        let message = |pairs: &[(&str, &str)]| read(pairs).unwrap_err().0;
        assert!(message(&[("from", "soon")]).starts_with("from:"));
        assert!(message(&[("granularity", "hour")]).starts_with("granularity:"));
        assert!(message(&[("page", "0")]).starts_with("page:"));
        assert!(message(&[("page", "x")]).starts_with("page:"));
        assert!(message(&[("groupBy", "model")]).starts_with("groupBy:"));
        assert!(message(&[("to", "2026-01-01"), ("to", "2026-01-02")]).starts_with("to:"));
    }
}
