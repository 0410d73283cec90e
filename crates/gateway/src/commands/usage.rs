//! `meta-chat usage`: the usage report of `GET /api/tenants/{id}/usage` (or, without
//! `--tenant`, of `GET /api/usage`) as tables in the terminal, from the same code.

use std::process::ExitCode;

use meta_chat::analytics::{self, BreakdownRow, GroupBy, Report, ReportParams, TotalsView};
use meta_chat::bootstrap::{self, StartupError};
use meta_chat::config::Config;
use meta_chat::store::StoreError;

/// `meta-chat usage` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The tenant's id; every tenant when omitted.
    #[arg(long)]
    tenant: Option<String>,
    /// Start: a date (2026-11-01, its UTC midnight) or an RFC 3339 time. Default: 29 days
    /// before the end's day.
    #[arg(long)]
    from: Option<String>,
    /// End: a date (included) or an RFC 3339 time (excluded). Default: now.
    #[arg(long)]
    to: Option<String>,
    /// Bucket width of the series: day, week or month.
    #[arg(long, default_value = "day")]
    granularity: String,
    /// Breakdown by model, provider, conversation (or tenant, without --tenant).
    #[arg(long, default_value = "model")]
    group_by: String,
    /// Breakdown rows to show.
    #[arg(long, default_value_t = analytics::DEFAULT_LIMIT)]
    limit: u32,
    /// Print the report as JSON (the API's answer) instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("--{flag}: {message}")]
    Query { flag: String, message: String },
    #[error("no such tenant: {0}")]
    NoTenant(String),
    #[error("cannot read usage: {0}")]
    Store(#[from] StoreError),
}

/// Runs `meta-chat usage`.
pub async fn run(args: Args) -> ExitCode {
    match report(&args).await {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(error) => {
                        eprintln!("error: {error}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", render(&report));
            }
            ExitCode::SUCCESS
        }
        Err(
            error @ (CommandError::Query { .. } | CommandError::Startup(StartupError::Config(_))),
        ) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn report(args: &Args) -> Result<Report, CommandError> {
    let params = ReportParams {
        from: args.from.clone(),
        to: args.to.clone(),
        granularity: Some(args.granularity.clone()),
        group_by: Some(args.group_by.clone()),
        limit: Some(args.limit.to_string()),
        offset: None,
    };
    let query = params
        .validate(args.tenant.clone(), chrono::Utc::now())
        .map_err(|error| CommandError::Query {
            flag: match error.param.as_str() {
                "groupBy" => "group-by".to_owned(),
                other => other.to_owned(),
            },
            message: error.message,
        })?;
    let config = Config::from_env().map_err(StartupError::from)?;
    let store = bootstrap::open_store(&config).await?;
    if let Some(id) = &args.tenant {
        store.get_tenant(id).await.map_err(|error| match error {
            StoreError::NotFound => CommandError::NoTenant(id.clone()),
            error => CommandError::Store(error),
        })?;
    }
    Ok(analytics::report(store.as_ref(), &query).await?)
}

/// The report as text tables.
fn render(report: &Report) -> String {
    let mut out = String::new();
    let who = report
        .tenant_id
        .as_deref()
        .map_or_else(|| "all tenants".to_owned(), |id| format!("tenant {id}"));
    out.push_str(&format!(
        "Usage of {who} from {} to {}\n\n",
        report.from, report.to
    ));
    out.push_str(&table(
        &[
            "",
            "REQUESTS",
            "ERRORS",
            "INPUT",
            "OUTPUT",
            "EMBEDDING",
            "COST (USD)",
        ],
        &[totals_cells("total".to_owned(), &report.totals)],
    ));
    out.push('\n');
    let series: Vec<Vec<String>> = report
        .series
        .iter()
        .map(|point| totals_cells(point.start.to_string(), &point.totals))
        .collect();
    let period = format!("{} STARTING", report.granularity.as_str().to_uppercase());
    out.push_str(&table(
        &[
            &period,
            "REQUESTS",
            "ERRORS",
            "INPUT",
            "OUTPUT",
            "EMBEDDING",
            "COST (USD)",
        ],
        &series,
    ));
    out.push('\n');
    let key_header = match report.group_by {
        GroupBy::Model => "PROVIDER/MODEL",
        GroupBy::Provider => "PROVIDER",
        GroupBy::Conversation => "CONVERSATION",
        GroupBy::Tenant => "TENANT",
    };
    let rows: Vec<Vec<String>> = report
        .breakdown
        .iter()
        .map(|row| totals_cells(breakdown_key(row), &row.totals))
        .collect();
    out.push_str(&table(
        &[
            key_header,
            "REQUESTS",
            "ERRORS",
            "INPUT",
            "OUTPUT",
            "EMBEDDING",
            "COST (USD)",
        ],
        &rows,
    ));
    if report.breakdown_total > report.breakdown.len() as u64 {
        out.push_str(&format!(
            "({} of {} rows; raise --limit to see more)\n",
            report.breakdown.len(),
            report.breakdown_total
        ));
    }
    out
}

fn breakdown_key(row: &BreakdownRow) -> String {
    let mut key = String::new();
    if let Some(tenant) = &row.tenant_id {
        key.push_str(tenant);
    }
    if let Some(conversation) = &row.conversation_id {
        if !key.is_empty() {
            key.push('/');
        }
        key.push_str(conversation.as_deref().unwrap_or("(none)"));
    }
    match (&row.provider, &row.model) {
        (Some(provider), Some(model)) => key.push_str(&format!("{provider}/{model}")),
        (Some(provider), None) => key.push_str(provider),
        _ => {}
    }
    key
}

fn totals_cells(label: String, totals: &TotalsView) -> Vec<String> {
    vec![
        label,
        totals.requests.to_string(),
        totals.errors.to_string(),
        totals.input_tokens.to_string(),
        totals.output_tokens.to_string(),
        totals.embedding_tokens.to_string(),
        totals.cost_usd.clone(),
    ]
}

/// Columns padded to their widest cell: the first left-aligned, the numbers right-aligned.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.zip(&widths).enumerate() {
            if i == 0 {
                text.push_str(&format!("{cell:<width$}"));
            } else {
                text.push_str(&format!("  {cell:>width$}"));
            }
        }
        text.truncate(text.trim_end().len());
        text.push('\n');
        text
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let text = table(
            &["NAME", "N"],
            &[
                vec!["a".into(), "1".into()],
                vec!["longer".into(), "12345".into()],
            ],
        );
        assert_eq!(text, "NAME        N\na           1\nlonger  12345\n");
        assert_eq!(table(&["X"], &[]), "X\n(none)\n");
    }
}
