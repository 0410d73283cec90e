//! `meta-chat usage` (SPEC §4.4) as a real process, on a SQLite file the test fills with known
//! usage records: the tables carry the right totals, series rows and breakdown rows for every
//! granularity and grouping; `--json` prints exactly what `meta_chat::analytics::report`
//! computes for the same query; bad flags exit 2 naming the flag; an unknown tenant exits 1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Output;

use chrono::{NaiveDate, Utc};
use common::usage::{Sum, at, bucket_of, chat_record, day, error_kind_of};
use meta_chat::analytics::{self, ReportParams};
use meta_chat::store::{NewTenant, SqliteStore, Store, UsageRecord};
use meta_chat_llm::pricing::format_usd;
use serde_json::{Value, json};

/// The period of most queries: October 1 to November 15, 2026 (both included).
const FROM: &str = "2026-10-01";
const TO: &str = "2026-11-15";

/// A database with two tenants and known usage records.
struct Fixture {
    dir: tempfile::TempDir,
    store: SqliteStore,
    /// Created with `meta-chat tenant create`.
    tenant: String,
    records: Vec<UsageRecord>,
}

impl Fixture {
    /// Runs `meta-chat usage` with `args`.
    async fn usage(&self, args: &[&str]) -> Output {
        run(self.dir.path(), "usage", args).await
    }

    /// Runs `meta-chat usage` with `args`, which must succeed; returns its standard output.
    async fn usage_ok(&self, args: &[&str]) -> String {
        let output = self.usage(args).await;
        assert!(
            output.status.success(),
            "meta-chat usage {args:?}: {:?}\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// [`Fixture::usage_ok`] for the tenant from `from` to `to`, then `extra`.
    async fn tenant_usage(&self, from: &str, to: &str, extra: &[&str]) -> String {
        let mut args = vec!["--tenant", &self.tenant, "--from", from, "--to", to];
        args.extend_from_slice(extra);
        self.usage_ok(&args).await
    }

    /// What `meta_chat::analytics::report` answers for the same query, as JSON.
    async fn report(
        &self,
        tenant: Option<&str>,
        from: &str,
        to: &str,
        granularity: &str,
        group_by: &str,
    ) -> Value {
        let query = ReportParams {
            from: Some(from.to_owned()),
            to: Some(to.to_owned()),
            granularity: Some(granularity.to_owned()),
            group_by: Some(group_by.to_owned()),
            limit: None,
            offset: None,
        }
        .validate(tenant.map(str::to_owned), Utc::now())
        .unwrap();
        serde_json::to_value(analytics::report(&self.store, &query).await.unwrap()).unwrap()
    }
}

fn database_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("usage.db").display())
}

/// Runs `meta-chat {command} {args}` in `dir` on its database, nothing else in its environment.
async fn run(dir: &Path, command: &str, args: &[&str]) -> Output {
    common::command(dir, &[("DATABASE_URL", database_url(dir))])
        .arg(command)
        .args(args)
        .output()
        .await
        .unwrap()
}

const MINI: (&str, &str) = ("openai", "gpt-4o-mini");
const HAIKU: (&str, &str) = ("anthropic", "claude-3-5-haiku-20241022");
const EMBEDDING: (&str, &str) = ("openai", "text-embedding-3-small");
const GPT4O: (&str, &str) = ("openai", "gpt-4o");

/// A record with the given key fields, tokens (input, output, embedding) and cost.
fn record(
    tenant: &str,
    created_at: &str,
    (provider, model): (&str, &str),
    conversation: Option<&str>,
    (input, output, embedding): (i64, i64, i64),
    cost: i64,
    status: &str,
) -> UsageRecord {
    UsageRecord {
        conversation_id: conversation.map(str::to_owned),
        endpoint: if embedding > 0 { "embeddings" } else { "chat" }.to_owned(),
        provider: provider.to_owned(),
        model: model.to_owned(),
        input_tokens: input,
        output_tokens: output,
        embedding_tokens: embedding,
        cost_nano_usd: cost,
        latency_ms: 120,
        status: status.to_owned(),
        error_kind: error_kind_of(status),
        ..chat_record(tenant, at(created_at))
    }
}

const OTHER: &str = "other-tenant";

/// Creates the database: tenant "Acme" through `meta-chat tenant create`, another tenant
/// through the store, and their records through `insert_usage`.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let created = run(
        dir.path(),
        "tenant",
        &[
            "create",
            "--name",
            "Acme",
            "--settings",
            r#"{"llm": {"provider": "openai", "model": "gpt-4o-mini"}}"#,
        ],
    )
    .await;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let created: Value = serde_json::from_slice(&created.stdout).unwrap();
    let tenant = created["id"].as_str().unwrap().to_owned();

    let store = SqliteStore::connect(&database_url(dir.path()))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store
        .create_tenant(NewTenant {
            id: OTHER.to_owned(),
            name: "Other".to_owned(),
            api_key_hash: "not-a-real-key-hash".to_owned(),
            settings: json!({}),
        })
        .await
        .unwrap();

    let t = tenant.as_str();
    // 2026-10-05 and 2026-10-12 are Mondays; 2026-10-01 is a Thursday.
    #[rustfmt::skip]
    let records = [
        // Before the period.
        (t, "2026-09-30T23:59:59Z", MINI, Some("c0"), (1, 1, 0), 7, "ok"),
        (t, "2026-10-05T09:00:00Z", MINI, Some("c1"), (100, 50, 0), 45_000, "ok"),
        (t, "2026-10-05T23:59:59.500Z", MINI, Some("c1"), (200, 100, 0), 90_000, "ok"),
        (t, "2026-10-07T12:00:00Z", HAIKU, Some("c2"), (1000, 10, 0), 1_040_000, "ok"),
        (t, "2026-10-07T13:00:00Z", HAIKU, Some("c2"), (0, 0, 0), 0, "error"),
        (t, "2026-10-12T08:00:00Z", EMBEDDING, None, (0, 0, 500), 10_000, "ok"),
        (t, "2026-10-31T23:00:00Z", HAIKU, Some("c2"), (2000, 100, 0), 2_000_000, "ok"),
        (t, "2026-11-02T09:00:00Z", MINI, Some("c3"), (10, 5, 0), 4_500, "ok"),
        // After the period.
        (t, "2026-11-16T00:00:00Z", MINI, Some("c3"), (1, 1, 0), 11, "ok"),
        // Another tenant, same conversation id, inside the period.
        (OTHER, "2026-10-05T10:00:00Z", GPT4O, Some("c1"), (70, 30, 0), 999_999, "ok"),
    ]
    .map(|(tenant, at, model, conversation, tokens, cost, status)| {
        record(tenant, at, model, conversation, tokens, cost, status)
    })
    .to_vec();
    // Two batches, like two flushes of the usage writer.
    store.insert_usage(&records[..4]).await.unwrap();
    store.insert_usage(&records[4..]).await.unwrap();
    Fixture {
        dir,
        store,
        tenant,
        records,
    }
}

// ---------------------------------------------------------------------------------------------
// The tables.

/// The cells of a table row as printed: label, requests, errors, input, output, embedding
/// tokens and cost in USD.
fn row(label: &str, totals: [i64; 5], cost_nano: i64) -> Vec<String> {
    let mut cells = vec![label.to_owned()];
    cells.extend(totals.iter().map(i64::to_string));
    cells.push(format_usd(u64::try_from(cost_nano).unwrap()));
    cells
}

/// The sums over `records` as a table row labelled `label`.
fn sum_row<'a>(label: &str, records: impl IntoIterator<Item = &'a UsageRecord>) -> Vec<String> {
    let s = Sum::of(records);
    row(
        label,
        [s.requests, s.errors, s.input, s.output, s.embedding],
        s.cost,
    )
}

/// The printed report: its title line and its three tables (header, rows), split into cells.
#[derive(Debug)]
struct Printed {
    title: String,
    totals: (Vec<String>, Vec<Vec<String>>),
    series: (Vec<String>, Vec<Vec<String>>),
    breakdown: (Vec<String>, Vec<Vec<String>>),
    footer: Option<String>,
}

fn cells(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

fn parse(text: &str) -> Printed {
    let sections: Vec<&str> = text.split("\n\n").collect();
    assert_eq!(sections.len(), 4, "{text}");
    let table = |section: &str| {
        let mut lines = section.lines();
        let header = cells(lines.next().unwrap());
        (header, lines.map(cells).collect::<Vec<_>>())
    };
    let mut breakdown = table(sections[3]);
    let footer = breakdown
        .1
        .last()
        .filter(|cells| cells.join(" ").contains("raise --limit"))
        .map(|cells| cells.join(" "));
    if footer.is_some() {
        breakdown.1.pop();
    }
    Printed {
        title: sections[0].to_owned(),
        totals: table(sections[1]),
        series: table(sections[2]),
        breakdown,
        footer,
    }
}

const COLUMNS: [&str; 6] = ["REQUESTS", "ERRORS", "INPUT", "OUTPUT", "EMBEDDING", "COST"];

/// A table header: `first` (split like the rest), then the totals columns ("COST (USD)" is
/// two cells once split).
fn header(first: &[&str]) -> Vec<String> {
    first
        .iter()
        .chain(&COLUMNS)
        .chain(&["(USD)"])
        .map(|s| (*s).to_owned())
        .collect()
}

impl Fixture {
    /// The tenant's records created in `[from, to)`.
    fn in_period(&self, from: &str, to: &str) -> Vec<&UsageRecord> {
        let (from, to) = (at(from), at(to));
        self.records
            .iter()
            .filter(|r| r.tenant_id == self.tenant && r.created_at >= from && r.created_at < to)
            .collect()
    }

    /// The tables of the tenant over the whole period, with `extra` flags, as printed and
    /// parsed; their title and totals checked.
    async fn period_tables(&self, extra: &[&str]) -> (String, Printed) {
        let text = self.tenant_usage(FROM, TO, extra).await;
        let printed = parse(&text);
        assert_title_and_totals(self, &printed);
        (text, printed)
    }
}

const PERIOD_FROM: &str = "2026-10-01T00:00:00Z";
const PERIOD_TO: &str = "2026-11-16T00:00:00Z";

/// What every report of the tenant over the whole period prints above its series.
fn assert_title_and_totals(fixture: &Fixture, printed: &Printed) {
    assert_eq!(
        printed.title,
        format!(
            "Usage of tenant {} from {PERIOD_FROM} to {PERIOD_TO}",
            fixture.tenant
        )
    );
    assert_eq!(printed.totals.0, header(&[]));
    // 7 requests, 1 failed; tokens and cost added up by hand.
    let expected = row("total", [7, 1, 3310, 265, 500], 3_189_500);
    assert_eq!(printed.totals.1, vec![expected.clone()]);
    assert_eq!(
        printed.totals.1,
        vec![sum_row("total", fixture.in_period(PERIOD_FROM, PERIOD_TO))]
    );
}

/// The series table of a report of the tenant over the whole period by `granularity`: one row
/// per bucket start in `starts`, each summing the tenant's records in the period whose day
/// falls in that bucket.
fn assert_series(fixture: &Fixture, printed: &Printed, granularity: &str, starts: &[NaiveDate]) {
    let label = granularity.to_uppercase();
    assert_eq!(printed.series.0, header(&[&label, "STARTING"]));
    let records = fixture.in_period(PERIOD_FROM, PERIOD_TO);
    let expected: Vec<Vec<String>> = starts
        .iter()
        .map(|start| {
            sum_row(
                &start.to_string(),
                records
                    .iter()
                    .copied()
                    .filter(|r| bucket_of(granularity, r.created_at.date_naive()) == *start),
            )
        })
        .collect();
    assert_eq!(printed.series.1, expected);
}

#[tokio::test]
async fn tables_by_day_and_model() {
    let fixture = fixture().await;
    let (text, printed) = fixture.period_tables(&[]).await;

    // One row per day, October 1 to November 15, empty days included.
    let days: Vec<NaiveDate> = day(FROM)
        .iter_days()
        .take_while(|d| *d <= day(TO))
        .collect();
    assert_eq!(days.len(), 46);
    assert_series(&fixture, &printed, "day", &days);
    let series_row = |label: &str| {
        printed
            .series
            .1
            .iter()
            .find(|cells| cells[0] == label)
            .unwrap_or_else(|| panic!("no {label} row: {text}"))
            .clone()
    };
    // By hand: two days with traffic and an empty one.
    assert_eq!(
        series_row("2026-10-05"),
        row("2026-10-05", [2, 0, 300, 150, 0], 135_000)
    );
    assert_eq!(
        series_row("2026-10-07"),
        row("2026-10-07", [2, 1, 1000, 10, 0], 1_040_000)
    );
    assert_eq!(series_row("2026-10-06"), row("2026-10-06", [0; 5], 0));

    // Most expensive first.
    assert_eq!(printed.breakdown.0, header(&["PROVIDER/MODEL"]));
    assert_eq!(
        printed.breakdown.1,
        vec![
            row(
                "anthropic/claude-3-5-haiku-20241022",
                [3, 1, 3000, 110, 0],
                3_040_000
            ),
            row("openai/gpt-4o-mini", [3, 0, 310, 155, 0], 139_500),
            row("openai/text-embedding-3-small", [1, 0, 0, 0, 500], 10_000),
        ]
    );
    assert_eq!(printed.footer, None);
    // The other tenant's model is nowhere.
    assert!(!text.contains("gpt-4o "), "{text}");
    assert!(!text.contains("openai/gpt-4o\n"), "{text}");
}

#[tokio::test]
async fn tables_by_week_and_provider() {
    let fixture = fixture().await;
    let (_, printed) = fixture
        .period_tables(&["--granularity", "week", "--group-by", "provider"])
        .await;

    // Weeks start on Monday: the first bucket (September 28) starts before the period and
    // counts only what lies inside it (not September 30's record).
    let mondays: Vec<NaiveDate> = [
        "2026-09-28",
        "2026-10-05",
        "2026-10-12",
        "2026-10-19",
        "2026-10-26",
        "2026-11-02",
        "2026-11-09",
    ]
    .into_iter()
    .map(day)
    .collect();
    assert_series(&fixture, &printed, "week", &mondays);
    assert_eq!(
        printed.series.1,
        vec![
            row("2026-09-28", [0; 5], 0),
            row("2026-10-05", [4, 1, 1300, 160, 0], 1_175_000),
            row("2026-10-12", [1, 0, 0, 0, 500], 10_000),
            row("2026-10-19", [0; 5], 0),
            row("2026-10-26", [1, 0, 2000, 100, 0], 2_000_000),
            row("2026-11-02", [1, 0, 10, 5, 0], 4_500),
            row("2026-11-09", [0; 5], 0),
        ]
    );

    assert_eq!(printed.breakdown.0, header(&["PROVIDER"]));
    assert_eq!(
        printed.breakdown.1,
        vec![
            row("anthropic", [3, 1, 3000, 110, 0], 3_040_000),
            row("openai", [4, 0, 310, 155, 500], 149_500),
        ]
    );
}

#[tokio::test]
async fn tables_by_month_and_conversation() {
    let fixture = fixture().await;
    let (_, printed) = fixture
        .period_tables(&["--granularity", "month", "--group-by", "conversation"])
        .await;

    let months = [day("2026-10-01"), day("2026-11-01")];
    assert_series(&fixture, &printed, "month", &months);
    assert_eq!(
        printed.series.1,
        vec![
            row("2026-10-01", [6, 1, 3300, 260, 500], 3_185_000),
            row("2026-11-01", [1, 0, 10, 5, 0], 4_500),
        ]
    );

    // Most expensive first; requests without a conversation grouped as "(none)"; the other
    // tenant's "c1" not counted.
    assert_eq!(printed.breakdown.0, header(&["CONVERSATION"]));
    assert_eq!(
        printed.breakdown.1,
        vec![
            row("c2", [3, 1, 3000, 110, 0], 3_040_000),
            row("c1", [2, 0, 300, 150, 0], 135_000),
            row("(none)", [1, 0, 0, 0, 500], 10_000),
            row("c3", [1, 0, 10, 5, 0], 4_500),
        ]
    );

    // A shorter page says how many rows there are.
    let text = fixture
        .tenant_usage(FROM, TO, &["--group-by", "conversation", "--limit", "2"])
        .await;
    let printed = parse(&text);
    assert_eq!(
        printed.breakdown.1,
        vec![
            row("c2", [3, 1, 3000, 110, 0], 3_040_000),
            row("c1", [2, 0, 300, 150, 0], 135_000),
        ]
    );
    assert_eq!(
        printed.footer.as_deref(),
        Some("(2 of 4 rows; raise --limit to see more)")
    );
}

/// Instants, not dates: the edges are partial days, read from the records themselves.
#[tokio::test]
async fn partial_days_at_the_edges() {
    let fixture = fixture().await;
    let tenant = fixture.tenant.as_str();
    let (from, to) = ("2026-10-05T12:00:00Z", "2026-10-31T23:30:00Z");
    let text = fixture.tenant_usage(from, to, &[]).await;
    let printed = parse(&text);
    assert_eq!(
        printed.title,
        format!("Usage of tenant {tenant} from {from} to {to}")
    );
    // Without 2026-10-05 09:00 (before) and 2026-11-02 (after).
    assert_eq!(
        printed.totals.1,
        vec![row("total", [5, 1, 3200, 210, 500], 3_140_000)]
    );
    assert_eq!(
        printed.totals.1,
        vec![sum_row("total", fixture.in_period(from, to))]
    );
    assert_eq!(
        printed.series.1.first(),
        Some(&row("2026-10-05", [1, 0, 200, 100, 0], 90_000))
    );
    assert_eq!(
        printed.series.1.last(),
        Some(&row("2026-10-31", [1, 0, 2000, 100, 0], 2_000_000))
    );
}

// ---------------------------------------------------------------------------------------------
// --json.

#[tokio::test]
async fn json_is_the_report_of_the_same_query() {
    let fixture = fixture().await;
    let tenant = fixture.tenant.as_str();
    for (granularity, group_by) in [
        ("day", "model"),
        ("week", "provider"),
        ("month", "conversation"),
        ("day", "conversation"),
    ] {
        for (from, to) in [(FROM, TO), ("2026-10-05T12:00:00Z", "2026-10-31T23:30:00Z")] {
            let text = fixture
                .tenant_usage(
                    from,
                    to,
                    &[
                        "--granularity",
                        granularity,
                        "--group-by",
                        group_by,
                        "--json",
                    ],
                )
                .await;
            let printed: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
            let expected = fixture
                .report(Some(tenant), from, to, granularity, group_by)
                .await;
            assert_eq!(
                printed, expected,
                "{granularity} by {group_by}, {from}..{to}"
            );
        }
    }

    // Spot checks of the JSON itself.
    let text = fixture.tenant_usage(FROM, TO, &["--json"]).await;
    let printed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(printed["tenantId"], tenant);
    assert_eq!(printed["totals"]["requests"], 7);
    assert_eq!(printed["totals"]["costNanoUsd"], 3_189_500);
    assert_eq!(printed["totals"]["costUsd"], "0.003189500");
    assert_eq!(printed["series"].as_array().unwrap().len(), 46);
    assert_eq!(printed["breakdownTotal"], 3);

    // Across tenants, by tenant: both tenants, the other one's record included.
    let text = fixture
        .usage_ok(&["--from", FROM, "--to", TO, "--group-by", "tenant", "--json"])
        .await;
    let printed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        printed,
        fixture.report(None, FROM, TO, "day", "tenant").await
    );
    assert_eq!(printed["tenantId"], Value::Null);
    assert_eq!(printed["totals"]["requests"], 8);
    assert_eq!(printed["totals"]["costNanoUsd"], 3_189_500 + 999_999);
    let tenants: Vec<&str> = printed["breakdown"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["tenantId"].as_str().unwrap())
        .collect();
    assert_eq!(tenants, vec![tenant, OTHER]);

    // The same as a table.
    let printed = parse(
        &fixture
            .usage_ok(&["--from", FROM, "--to", TO, "--group-by", "tenant"])
            .await,
    );
    assert_eq!(
        printed.title,
        format!("Usage of all tenants from {PERIOD_FROM} to {PERIOD_TO}")
    );
    assert_eq!(
        printed.breakdown.1,
        vec![
            row(tenant, [7, 1, 3310, 265, 500], 3_189_500),
            row(OTHER, [1, 0, 70, 30, 0], 999_999),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Failures.

#[tokio::test]
async fn bad_flags_exit_2_naming_the_flag() {
    let fixture = fixture().await;
    let tenant = fixture.tenant.as_str();
    for (args, flag) in [
        (vec!["--from", "yesterday"], "--from"),
        (vec!["--from", "2026-13-01"], "--from"),
        (vec!["--from", "2026-11-02", "--to", "2026-11-01"], "--from"),
        (vec!["--to", "someday"], "--to"),
        (vec!["--granularity", "hour"], "--granularity"),
        (vec!["--group-by", "colour"], "--group-by"),
        (vec!["--limit", "0"], "--limit"),
    ] {
        let mut all = vec!["--tenant", tenant];
        all.extend(&args);
        let output = fixture.usage(&all).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("error: {flag}: ")),
            "{args:?}: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    // Also with --json, and before the tenant is even looked up.
    let output = fixture
        .usage(&["--tenant", "nope", "--from", "yesterday", "--json"])
        .await;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--from"));
    assert!(output.stdout.is_empty());
}

#[tokio::test]
async fn an_unknown_tenant_exits_1() {
    let fixture = fixture().await;
    for json in [false, true] {
        let mut args = vec!["--tenant", "nope", "--from", FROM, "--to", TO];
        if json {
            args.push("--json");
        }
        let output = fixture.usage(&args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("error: no such tenant: nope"), "{stderr}");
        assert!(output.stdout.is_empty());
    }
}
