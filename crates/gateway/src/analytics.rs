//! Usage reports (SPEC §4.4): totals, a breakdown and a time series over a period, for one
//! tenant or for all of them. Shared by `GET /api/tenants/{id}/usage`, `GET /api/usage` and
//! `meta-chat usage`, so every surface shows the same numbers.
//!
//! The sums are computed by the database ([`Store::usage_grouped`],
//! [`Store::usage_by_conversation`]): whole UTC days come from the day rollups the usage writer
//! maintains, partial days at the edges of the period from the records. What is left here is
//! validating the query, folding days into weeks or months and filling empty buckets.

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, SecondsFormat, Utc};
use meta_chat_llm::pricing::format_usd;
use serde::Serialize;

use crate::store::{
    ConversationUsage, Store, StoreError, UsageDimension, UsageGroup, UsageScope, UsageTotals,
    midnight,
};

/// The most buckets one report may have (about 2.7 years of days).
pub const MAX_BUCKETS: usize = 1_000;

/// The default number of breakdown rows per page, and the most a page may hold.
pub const DEFAULT_LIMIT: u32 = 100;
/// See [`DEFAULT_LIMIT`].
pub const MAX_LIMIT: u32 = 1_000;

/// The default period: the current UTC day and the 29 before it.
pub const DEFAULT_DAYS: u64 = 30;

/// The width of a time-series bucket. Weeks start on Monday (ISO 8601); all buckets are UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// One UTC day.
    Day,
    /// Monday to Sunday, UTC.
    Week,
    /// A calendar month, UTC.
    Month,
}

impl Granularity {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "day" => Some(Self::Day),
            "week" => Some(Self::Week),
            "month" => Some(Self::Month),
            _ => None,
        }
    }

    /// The first day of the bucket holding `day`.
    pub fn bucket_start(self, day: NaiveDate) -> NaiveDate {
        match self {
            Self::Day => day,
            Self::Week => day - Days::new(u64::from(day.weekday().num_days_from_monday())),
            Self::Month => day.with_day(1).unwrap_or(day),
        }
    }

    /// The first day of the bucket after the one starting at `start`.
    fn next(self, start: NaiveDate) -> Option<NaiveDate> {
        match self {
            Self::Day => start.checked_add_days(Days::new(1)),
            Self::Week => start.checked_add_days(Days::new(7)),
            Self::Month => start.checked_add_months(Months::new(1)),
        }
    }

    /// The name used in queries and answers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
        }
    }
}

/// What the breakdown groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// Provider and model.
    Model,
    /// Provider.
    Provider,
    /// Conversation (`X-Conversation-Id`), most expensive first.
    Conversation,
    /// Tenant, most expensive first (across tenants only).
    Tenant,
}

impl GroupBy {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "model" => Some(Self::Model),
            "provider" => Some(Self::Provider),
            "conversation" => Some(Self::Conversation),
            "tenant" => Some(Self::Tenant),
            _ => None,
        }
    }

    /// The name used in queries and answers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Provider => "provider",
            Self::Conversation => "conversation",
            Self::Tenant => "tenant",
        }
    }
}

/// A query parameter that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param}: {message}")]
pub struct QueryError {
    /// The parameter at fault.
    pub param: String,
    /// What is wrong with it.
    pub message: String,
}

impl QueryError {
    fn new(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: param.to_owned(),
            message: message.into(),
        }
    }
}

/// A validated report query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportQuery {
    /// One tenant, or every tenant.
    pub tenant_id: Option<String>,
    /// First instant covered.
    pub from: DateTime<Utc>,
    /// First instant not covered.
    pub to: DateTime<Utc>,
    /// Width of the time-series buckets.
    pub granularity: Granularity,
    /// What the breakdown groups by.
    pub group_by: GroupBy,
    /// Breakdown rows per page.
    pub limit: u32,
    /// Breakdown rows skipped.
    pub offset: u64,
}

/// The query parameters of a report, as text (from a query string or the command line).
#[derive(Debug, Clone, Default)]
pub struct ReportParams {
    /// `from`: an RFC 3339 instant, or a `YYYY-MM-DD` date (its UTC midnight).
    pub from: Option<String>,
    /// `to`: an RFC 3339 instant (excluded), or a `YYYY-MM-DD` date (included: the period
    /// ends at the following UTC midnight).
    pub to: Option<String>,
    /// `granularity`: `day` (default), `week` or `month`.
    pub granularity: Option<String>,
    /// `groupBy`: `model` (default), `provider`, `conversation`, or `tenant` across tenants.
    pub group_by: Option<String>,
    /// `limit`: breakdown rows per page, 1 to [`MAX_LIMIT`].
    pub limit: Option<String>,
    /// `offset`: breakdown rows to skip.
    pub offset: Option<String>,
}

impl ReportParams {
    /// Reads the parameters of a query string; an unknown or repeated parameter is an error.
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<Self, QueryError> {
        let mut params = Self::default();
        for (name, value) in pairs {
            let slot = match name.as_str() {
                "from" => &mut params.from,
                "to" => &mut params.to,
                "granularity" => &mut params.granularity,
                "groupBy" => &mut params.group_by,
                "limit" => &mut params.limit,
                "offset" => &mut params.offset,
                _ => {
                    return Err(QueryError::new(
                        name,
                        "unknown parameter; expected from, to, granularity, groupBy, limit or \
                         offset",
                    ));
                }
            };
            if slot.replace(value.clone()).is_some() {
                return Err(QueryError::new(name, "given more than once"));
            }
        }
        Ok(params)
    }

    /// Validates the parameters for a report on `tenant_id` (or every tenant), with `now` as
    /// the default end of the period.
    pub fn validate(
        &self,
        tenant_id: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<ReportQuery, QueryError> {
        let granularity = match self.granularity.as_deref() {
            None => Granularity::Day,
            Some(text) => Granularity::parse(text).ok_or_else(|| {
                QueryError::new("granularity", "expected `day`, `week` or `month`")
            })?,
        };
        let group_by = match self.group_by.as_deref() {
            None => GroupBy::Model,
            Some(text) => GroupBy::parse(text).ok_or_else(|| {
                QueryError::new(
                    "groupBy",
                    "expected `model`, `provider`, `conversation` or `tenant`",
                )
            })?,
        };
        if group_by == GroupBy::Tenant && tenant_id.is_some() {
            return Err(QueryError::new(
                "groupBy",
                "`tenant` groups across tenants; use it on /api/usage",
            ));
        }
        let to = match self.to.as_deref() {
            None => now,
            Some(text) => parse_instant("to", text, Edge::End)?,
        };
        let from = match self.from.as_deref() {
            Some(text) => parse_instant("from", text, Edge::Start)?,
            None => to
                .date_naive()
                .checked_sub_days(Days::new(DEFAULT_DAYS - 1))
                .map(midnight)
                .ok_or_else(|| QueryError::new("to", "out of range"))?,
        };
        // The databases keep microseconds: a finer instant is rounded up to the next one, so a
        // record is inside the period exactly when its stored time is.
        let (from, to) = (ceil_micros(from), ceil_micros(to));
        if from >= to {
            return Err(QueryError::new("from", "must be before `to`"));
        }
        if bucket_count(granularity, from, to) > MAX_BUCKETS {
            return Err(QueryError::new(
                "granularity",
                format!(
                    "the period has more than {MAX_BUCKETS} {}s; use a coarser granularity or a \
                     shorter period",
                    granularity.as_str()
                ),
            ));
        }
        let limit = match self.limit.as_deref() {
            None => DEFAULT_LIMIT,
            Some(text) => text
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    QueryError::new("limit", format!("expected a number from 1 to {MAX_LIMIT}"))
                })?,
        };
        let offset = match self.offset.as_deref() {
            None => 0,
            Some(text) => text
                .parse::<u64>()
                .map_err(|_| QueryError::new("offset", "expected a number ≥ 0"))?,
        };
        Ok(ReportQuery {
            tenant_id,
            from,
            to,
            granularity,
            group_by,
            limit,
            offset,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edge {
    Start,
    End,
}

/// `t` rounded up to a whole microsecond.
fn ceil_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    let rest = t.timestamp_subsec_nanos() % 1_000;
    if rest == 0 {
        return t;
    }
    t.checked_add_signed(chrono::TimeDelta::nanoseconds(i64::from(1_000 - rest)))
        .unwrap_or(t)
}

/// An RFC 3339 instant, or a date: its UTC midnight as a start, the next midnight as an end
/// (so `to=2026-11-30` includes the 30th).
fn parse_instant(param: &str, text: &str, edge: Edge) -> Result<DateTime<Utc>, QueryError> {
    if let Ok(instant) = DateTime::parse_from_rfc3339(text) {
        return Ok(instant.with_timezone(&Utc));
    }
    let day = NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| {
        QueryError::new(
            param,
            "expected a date (2026-11-30) or an RFC 3339 time (2026-11-30T12:00:00Z)",
        )
    })?;
    match edge {
        Edge::Start => Ok(midnight(day)),
        Edge::End => day
            .checked_add_days(Days::new(1))
            .map(midnight)
            .ok_or_else(|| QueryError::new(param, "out of range")),
    }
}

/// The buckets of `[from, to)`, by their first day.
fn buckets(granularity: Granularity, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<NaiveDate> {
    let mut starts = Vec::new();
    let Some(last) = last_day(to) else {
        return starts;
    };
    let mut start = granularity.bucket_start(from.date_naive());
    while start <= last && starts.len() <= MAX_BUCKETS {
        starts.push(start);
        match granularity.next(start) {
            Some(next) => start = next,
            None => break,
        }
    }
    starts
}

fn bucket_count(granularity: Granularity, from: DateTime<Utc>, to: DateTime<Utc>) -> usize {
    buckets(granularity, from, to).len()
}

/// The UTC day of the last instant before `to`.
fn last_day(to: DateTime<Utc>) -> Option<NaiveDate> {
    to.checked_sub_signed(chrono::TimeDelta::microseconds(1))
        .map(|t| t.date_naive())
}

/// Totals as they are shown: counts, tokens, and cost both as a decimal USD string (exact) and
/// in integer nano-dollars.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TotalsView {
    /// Requests that reached a provider.
    pub requests: i64,
    /// Of those, failed ones.
    pub errors: i64,
    /// Of those, answered from the cache.
    pub cache_hits: i64,
    /// Prompt tokens.
    pub input_tokens: i64,
    /// Generated tokens.
    pub output_tokens: i64,
    /// Embedded tokens.
    pub embedding_tokens: i64,
    /// All three kinds.
    pub total_tokens: i64,
    /// Cost in USD, as a decimal string with nine fractional digits.
    pub cost_usd: String,
    /// Cost in nano-dollars (1e-9 USD).
    pub cost_nano_usd: i64,
}

impl From<UsageTotals> for TotalsView {
    fn from(t: UsageTotals) -> Self {
        Self {
            requests: t.requests,
            errors: t.errors,
            cache_hits: t.cache_hits,
            input_tokens: t.input_tokens,
            output_tokens: t.output_tokens,
            embedding_tokens: t.embedding_tokens,
            total_tokens: t.input_tokens + t.output_tokens + t.embedding_tokens,
            cost_usd: format_usd(u64::try_from(t.cost_nano_usd).unwrap_or(0)),
            cost_nano_usd: t.cost_nano_usd,
        }
    }
}

/// One row of the breakdown: its key fields (those of the grouping) and its totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BreakdownRow {
    /// The tenant (by tenant and conversation across tenants).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// The provider (by model and provider).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The model (by model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The conversation, `null` for requests that named none (by conversation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<Option<String>>,
    /// The conversation's first request in the period (by conversation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_at: Option<String>,
    /// The conversation's last request in the period (by conversation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_at: Option<String>,
    /// Its totals.
    #[serde(flatten)]
    pub totals: TotalsView,
}

/// One bucket of the time series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SeriesPoint {
    /// The bucket's first day (UTC). The first and last buckets may extend beyond the period;
    /// they count only what lies inside it.
    pub start: NaiveDate,
    /// Its totals; zero for a bucket without requests.
    #[serde(flatten)]
    pub totals: TotalsView,
}

/// A usage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The tenant, or `null` across tenants.
    pub tenant_id: Option<String>,
    /// First instant covered (RFC 3339, UTC).
    pub from: String,
    /// First instant not covered.
    pub to: String,
    /// Width of the series buckets.
    pub granularity: Granularity,
    /// What the breakdown groups by.
    pub group_by: GroupBy,
    /// Everything in the period.
    pub totals: TotalsView,
    /// The page of the breakdown, most expensive first.
    pub breakdown: Vec<BreakdownRow>,
    /// How many breakdown rows there are in all (for paging).
    pub breakdown_total: u64,
    /// One point per bucket, oldest first, empty buckets included.
    pub series: Vec<SeriesPoint>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Computes the report for `query`.
pub async fn report(store: &dyn Store, query: &ReportQuery) -> Result<Report, StoreError> {
    let scope = UsageScope {
        tenant_id: query.tenant_id.as_deref(),
        from: query.from,
        to: query.to,
    };
    let days = store.usage_grouped(&scope, UsageDimension::Day).await?;
    let starts = buckets(query.granularity, query.from, query.to);
    let mut series: Vec<(NaiveDate, UsageTotals)> = starts
        .iter()
        .map(|&start| (start, UsageTotals::default()))
        .collect();
    let mut totals = UsageTotals::default();
    for (day, _, day_totals) in days {
        let Ok(day) = NaiveDate::parse_from_str(&day, "%Y-%m-%d") else {
            return Err(StoreError::Database(format!("unexpected day key {day:?}")));
        };
        totals += day_totals;
        let start = query.granularity.bucket_start(day);
        if let Ok(index) = series.binary_search_by_key(&start, |(s, _)| *s) {
            series[index].1 += day_totals;
        }
    }

    let (breakdown, breakdown_total) = match query.group_by {
        GroupBy::Conversation => {
            let page = store
                .usage_by_conversation(&scope, query.limit, query.offset)
                .await?;
            let rows = page
                .conversations
                .into_iter()
                .map(|c| conversation_row(c, query.tenant_id.is_none()))
                .collect();
            (rows, page.total)
        }
        group_by => {
            let dimension = match group_by {
                GroupBy::Provider => UsageDimension::Provider,
                GroupBy::Tenant => UsageDimension::Tenant,
                _ => UsageDimension::Model,
            };
            let mut groups = store.usage_grouped(&scope, dimension).await?;
            groups.sort_by(|a, b| {
                (b.2.cost_nano_usd, b.2.requests)
                    .cmp(&(a.2.cost_nano_usd, a.2.requests))
                    .then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1)))
            });
            let total = groups.len() as u64;
            let rows = groups
                .into_iter()
                .skip(usize::try_from(query.offset).unwrap_or(usize::MAX))
                .take(query.limit as usize)
                .map(|group| group_row(group, group_by))
                .collect();
            (rows, total)
        }
    };

    Ok(Report {
        tenant_id: query.tenant_id.clone(),
        from: rfc3339(query.from),
        to: rfc3339(query.to),
        granularity: query.granularity,
        group_by: query.group_by,
        totals: totals.into(),
        breakdown,
        breakdown_total,
        series: series
            .into_iter()
            .map(|(start, totals)| SeriesPoint {
                start,
                totals: totals.into(),
            })
            .collect(),
    })
}

fn group_row((key, model, totals): UsageGroup, group_by: GroupBy) -> BreakdownRow {
    let mut row = BreakdownRow {
        tenant_id: None,
        provider: None,
        model: None,
        conversation_id: None,
        first_at: None,
        last_at: None,
        totals: totals.into(),
    };
    match group_by {
        GroupBy::Tenant => row.tenant_id = Some(key),
        GroupBy::Provider => row.provider = Some(key),
        _ => {
            row.provider = Some(key);
            row.model = Some(model);
        }
    }
    row
}

fn conversation_row(c: ConversationUsage, with_tenant: bool) -> BreakdownRow {
    BreakdownRow {
        tenant_id: with_tenant.then_some(c.tenant_id),
        provider: None,
        model: None,
        conversation_id: Some(c.conversation_id),
        first_at: Some(rfc3339(c.first_at)),
        last_at: Some(rfc3339(c.last_at)),
        totals: c.totals.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn day(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    fn params(pairs: &[(&str, &str)]) -> Result<ReportParams, QueryError> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect();
        ReportParams::from_pairs(&pairs)
    }

    fn query(pairs: &[(&str, &str)]) -> Result<ReportQuery, QueryError> {
        params(pairs)?.validate(Some("t".into()), at("2026-11-26T10:00:00Z"))
    }

    #[test]
    fn defaults_cover_the_last_thirty_days_by_day_and_model() {
        let q = query(&[]).unwrap();
        assert_eq!(q.from, at("2026-10-28T00:00:00Z"));
        assert_eq!(q.to, at("2026-11-26T10:00:00Z"));
        assert_eq!(q.granularity, Granularity::Day);
        assert_eq!(q.group_by, GroupBy::Model);
        assert_eq!((q.limit, q.offset), (DEFAULT_LIMIT, 0));
        assert_eq!(buckets(q.granularity, q.from, q.to).len(), 30);
    }

    #[test]
    fn a_date_as_to_includes_that_day() {
        let q = query(&[("from", "2026-11-01"), ("to", "2026-11-30")]).unwrap();
        assert_eq!(q.from, at("2026-11-01T00:00:00Z"));
        assert_eq!(q.to, at("2026-12-01T00:00:00Z"));
        let q = query(&[
            ("from", "2026-11-01T02:00:00+02:00"),
            ("to", "2026-11-02T00:00:00Z"),
        ])
        .unwrap();
        assert_eq!(q.from, at("2026-11-01T00:00:00Z"));
        assert_eq!(q.to, at("2026-11-02T00:00:00Z"));
    }

    #[test]
    fn bad_parameters_name_themselves() {
        let param = |pairs: &[(&str, &str)]| query(pairs).unwrap_err().param;
        assert_eq!(param(&[("from", "yesterday")]), "from");
        assert_eq!(param(&[("to", "2026-13-01")]), "to");
        assert_eq!(
            param(&[("from", "2026-11-02"), ("to", "2026-11-01")]),
            "from"
        );
        assert_eq!(
            param(&[
                ("from", "2026-11-02T00:00:00Z"),
                ("to", "2026-11-02T00:00:00Z")
            ]),
            "from"
        );
        assert_eq!(param(&[("granularity", "hour")]), "granularity");
        assert_eq!(param(&[("groupBy", "colour")]), "groupBy");
        assert_eq!(param(&[("groupBy", "tenant")]), "groupBy");
        assert_eq!(param(&[("limit", "0")]), "limit");
        assert_eq!(param(&[("limit", "1001")]), "limit");
        assert_eq!(param(&[("offset", "-1")]), "offset");
        assert_eq!(
            params(&[("group_by", "model")]).unwrap_err().param,
            "group_by"
        );
        assert_eq!(params(&[("to", "a"), ("to", "b")]).unwrap_err().param, "to");
        assert_eq!(
            param(&[("from", "2020-01-01"), ("to", "2026-01-01")]),
            "granularity"
        );
        assert!(
            query(&[
                ("from", "2020-01-01"),
                ("to", "2026-01-01"),
                ("granularity", "week")
            ])
            .is_ok()
        );
        assert_eq!(param(&[("to", "+262142-12-31")]), "to");
    }

    #[test]
    fn instants_finer_than_a_microsecond_round_up() {
        let q = query(&[
            ("from", "2026-03-01T00:00:00.0000005Z"),
            ("to", "2026-03-02T00:00:00.000001001Z"),
        ])
        .unwrap();
        assert_eq!(q.from, at("2026-03-01T00:00:00.000001Z"));
        assert_eq!(q.to, at("2026-03-02T00:00:00.000002Z"));
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        // 2026-11-26 is a Thursday.
        assert_eq!(
            Granularity::Week.bucket_start(day("2026-11-26")),
            day("2026-11-23")
        );
        assert_eq!(
            Granularity::Week.bucket_start(day("2026-11-23")),
            day("2026-11-23")
        );
        assert_eq!(
            Granularity::Week.bucket_start(day("2026-11-22")),
            day("2026-11-16")
        );
        assert_eq!(
            Granularity::Month.bucket_start(day("2026-11-26")),
            day("2026-11-01")
        );
        assert_eq!(
            Granularity::Day.bucket_start(day("2026-11-26")),
            day("2026-11-26")
        );
    }

    #[test]
    fn buckets_span_the_period_across_boundaries() {
        let weeks = buckets(
            Granularity::Week,
            at("2026-12-30T00:00:00Z"),
            at("2027-01-12T00:00:00Z"),
        );
        assert_eq!(
            weeks,
            vec![day("2026-12-28"), day("2027-01-04"), day("2027-01-11")]
        );
        let months = buckets(
            Granularity::Month,
            at("2026-01-31T23:00:00Z"),
            at("2026-03-01T00:00:00Z"),
        );
        assert_eq!(months, vec![day("2026-01-01"), day("2026-02-01")]);
        let days = buckets(
            Granularity::Day,
            at("2026-11-01T12:00:00Z"),
            at("2026-11-03T00:00:01Z"),
        );
        assert_eq!(
            days,
            vec![day("2026-11-01"), day("2026-11-02"), day("2026-11-03")]
        );
    }
}
