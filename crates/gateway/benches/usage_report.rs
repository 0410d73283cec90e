//! Usage writer throughput and report latency on a large usage log.
//!
//! Seeds `--records` usage records (default 1,000,000) across `--tenants` tenants (default
//! 100) over 91 days through `Store::insert_usage` in batches of 1,000 (as the usage writer
//! does, rollups included) and reports records per second; then times reports: a tenant's
//! month with a daily series and the model breakdown (the target: under 50 ms), the same with
//! partial days at both edges, by conversation, and across tenants; then times the dashboard's
//! analytics page (`dashboard::analytics::content`: every query of the page, its SVG charts and
//! its HTML) for a tenant and across tenants (the target: under 200 ms).
//!
//! ```text
//! cargo bench -p meta-chat --bench usage_report
//! cargo bench -p meta-chat --bench usage_report -- --records 200000 --postgres postgres://postgres@127.0.0.1:5432/test
//! ```
//!
//! SQLite runs in a temporary file; PostgreSQL in a temporary schema of `--postgres` (or
//! `TEST_DATABASE_URL`) and is skipped when neither is given.

#![allow(clippy::panic, clippy::cast_precision_loss)] // A benchmark harness: a failure aborts the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use meta_chat::analytics::{self, ReportParams};
use meta_chat::dashboard::analytics::{Subject, content};
use meta_chat::store::{Store, UsageRecord, UsageScope, connect_store};

const MODELS: &[(&str, &str, i64, i64)] = &[
    // provider, model, nano-USD per input token, per output token
    ("openai", "gpt-4o-mini", 150, 600),
    ("openai", "gpt-4o", 2_500, 10_000),
    ("anthropic", "claude-3-5-sonnet-20241022", 3_000, 15_000),
    ("anthropic", "claude-3-haiku-20240307", 250, 1_250),
    ("ollama", "llama3.1:8b", 0, 0),
];
const DAYS: i64 = 91;
const BATCH: usize = 1_000;
/// Requests per conversation.
const TURNS: usize = 10;

struct Options {
    records: usize,
    tenants: usize,
    postgres: Option<String>,
    iterations: usize,
}

fn options() -> Options {
    let mut options = Options {
        records: 1_000_000,
        tenants: 100,
        postgres: std::env::var("TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty()),
        iterations: 50,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match arg.as_str() {
            "--records" => options.records = value().parse().unwrap_or(options.records),
            "--tenants" => options.tenants = value().parse().unwrap_or(options.tenants).max(1),
            "--iterations" => {
                options.iterations = value().parse().unwrap_or(options.iterations).max(1);
            }
            "--postgres" => options.postgres = Some(value()),
            "--no-postgres" => options.postgres = None,
            _ => {} // `cargo bench` passes `--bench`.
        }
    }
    options
}

fn start() -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(2026, 8, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
        .unwrap_or_default()
}

/// The `i`-th record: tenants round-robin, times spread evenly over [`DAYS`], models varied,
/// one request in 50 failed. Conversations are runs of [`TURNS`] consecutive requests of a
/// tenant (about 2 hours of its traffic; 100,000 conversations in 1,000,000 records).
fn record(i: usize, options: &Options, rng: &mut fastrand::Rng) -> UsageRecord {
    let tenant = i % options.tenants;
    let (provider, model, input_price, output_price) = MODELS[rng.usize(..MODELS.len())];
    let input = rng.i64(10..4_000);
    let output = rng.i64(1..1_000);
    let failed = rng.u8(..50) == 0;
    let span = DAYS * 86_400_000_000;
    let offset = (i as i64).saturating_mul(span) / options.records.max(1) as i64;
    UsageRecord {
        tenant_id: format!("tenant-{tenant:03}"),
        conversation_id: Some(format!("conv-{}", i / options.tenants / TURNS)),
        request_id: format!("req-{i}"),
        endpoint: "chat".into(),
        provider: provider.into(),
        model: model.into(),
        input_tokens: input,
        output_tokens: if failed { 0 } else { output },
        embedding_tokens: 0,
        cost_nano_usd: input * input_price + if failed { 0 } else { output * output_price },
        latency_ms: rng.i64(100..3_000),
        ttft_ms: Some(rng.i64(50..500)),
        status: if failed { "error" } else { "ok" }.into(),
        error_kind: failed.then(|| "upstream_error".into()),
        cache_hit: false,
        fallback_from: None,
        tokens_estimated: false,
        created_at: start() + TimeDelta::microseconds(offset),
    }
}

async fn seed(store: &dyn Store, options: &Options) -> f64 {
    let mut rng = fastrand::Rng::with_seed(7);
    let mut batch = Vec::with_capacity(BATCH);
    let mut busy = Duration::ZERO;
    for i in 0..options.records {
        batch.push(record(i, options, &mut rng));
        if batch.len() == BATCH || i + 1 == options.records {
            let started = Instant::now();
            store
                .insert_usage(&batch)
                .await
                .unwrap_or_else(|e| panic!("insert failed: {e}"));
            busy += started.elapsed();
            batch.clear();
        }
    }
    options.records as f64 / busy.as_secs_f64()
}

struct Timing {
    median: Duration,
    p95: Duration,
    max: Duration,
}

async fn time_report(
    store: &dyn Store,
    tenant: Option<&str>,
    pairs: &[(&str, &str)],
    iterations: usize,
) -> (Timing, analytics::Report) {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let query = ReportParams::from_pairs(&pairs)
        .and_then(|p| p.validate(tenant.map(str::to_owned), Utc::now()))
        .unwrap_or_else(|e| panic!("bad query: {e}"));
    let mut report = None;
    for _ in 0..3 {
        report = Some(
            analytics::report(store, &query)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        report = Some(
            analytics::report(store, &query)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
        times.push(started.elapsed());
    }
    (timing(times), report.unwrap_or_else(|| panic!("no report")))
}

fn timing(mut times: Vec<Duration>) -> Timing {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Timing {
        median: at(0.5),
        p95: at(0.95),
        max: at(1.0),
    }
}

/// September 2026 (30 days), as `[from, to)`.
fn september() -> (DateTime<Utc>, DateTime<Utc>) {
    let day = |d: u32| {
        NaiveDate::from_ymd_opt(2026, d / 100, d % 100)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|d| d.and_utc())
            .unwrap_or_default()
    };
    (day(901), day(1001))
}

/// A report to time: its label, whether it is for one tenant, its query parameters.
type Case<'a> = (&'a str, bool, &'a [(&'a str, &'a str)]);

async fn run(name: &str, store: Arc<dyn Store>, options: &Options) {
    store
        .migrate()
        .await
        .unwrap_or_else(|e| panic!("migrate failed: {e}"));
    println!(
        "\n{name}: seeding {} records across {} tenants…",
        options.records, options.tenants
    );
    let rate = seed(store.as_ref(), options).await;
    println!("{name}: insert_usage (batches of {BATCH}, rollups included): {rate:.0} records/s");
    let tenant = format!("tenant-{:03}", 42 % options.tenants);
    let cases: &[Case] = &[
        (
            "tenant month, daily series, by model",
            true,
            &[
                ("from", "2026-09-01"),
                ("to", "2026-09-30"),
                ("granularity", "day"),
                ("groupBy", "model"),
            ],
        ),
        (
            "tenant month, partial edge days, by model",
            true,
            &[
                ("from", "2026-09-01T12:00:00Z"),
                ("to", "2026-10-01T12:00:00Z"),
                ("groupBy", "model"),
            ],
        ),
        (
            "tenant month, weekly series, by conversation",
            true,
            &[
                ("from", "2026-09-01"),
                ("to", "2026-09-30"),
                ("granularity", "week"),
                ("groupBy", "conversation"),
            ],
        ),
        (
            "tenant 91 days, monthly series, by provider",
            true,
            &[
                ("from", "2026-08-01"),
                ("to", "2026-10-30"),
                ("granularity", "month"),
                ("groupBy", "provider"),
            ],
        ),
        (
            "all tenants month, daily series, by tenant",
            false,
            &[
                ("from", "2026-09-01"),
                ("to", "2026-09-30"),
                ("groupBy", "tenant"),
            ],
        ),
        (
            "all tenants month, conversations 1-20",
            false,
            &[
                ("from", "2026-09-01"),
                ("to", "2026-09-30"),
                ("groupBy", "conversation"),
                ("limit", "20"),
            ],
        ),
    ];
    println!(
        "{:<46} {:>10} {:>10} {:>10} {:>9}",
        "report", "median", "p95", "max", "requests"
    );
    for (label, for_tenant, pairs) in cases {
        let (timing, report) = time_report(
            store.as_ref(),
            for_tenant.then_some(tenant.as_str()),
            pairs,
            options.iterations,
        )
        .await;
        println!(
            "{label:<46} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>9}",
            timing.median.as_secs_f64() * 1e3,
            timing.p95.as_secs_f64() * 1e3,
            timing.max.as_secs_f64() * 1e3,
            report.totals.requests
        );
    }
    for (label, scope_tenant) in [
        (
            "latency p50/p95 per provider, tenant month",
            Some(tenant.as_str()),
        ),
        ("latency p50/p95 per provider, all tenants month", None),
    ] {
        let scope = UsageScope {
            tenant_id: scope_tenant,
            from: september().0,
            to: september().1,
        };
        let mut times = Vec::with_capacity(options.iterations);
        let mut requests = 0;
        for i in 0..options.iterations + 2 {
            let started = Instant::now();
            let latency = store
                .provider_latency(&scope)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            if i >= 2 {
                times.push(started.elapsed());
            }
            requests = latency.iter().map(|p| p.requests).sum::<i64>();
        }
        let timing = timing(times);
        println!(
            "{label:<46} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>9}",
            timing.median.as_secs_f64() * 1e3,
            timing.p95.as_secs_f64() * 1e3,
            timing.max.as_secs_f64() * 1e3,
            requests
        );
    }
    time_pages(store.as_ref(), &tenant, options).await;
}

/// A dashboard analytics page to time: its label, for one tenant (or across tenants), its
/// query string's pairs.
type PageCase<'a> = (&'a str, bool, &'a [(&'a str, &'a str)]);

/// Times the analytics page's server work (`dashboard::analytics::content`: the reports, the
/// latency percentiles, the SVG charts and the HTML) the way `GET
/// /dashboard/tenants/{id}/analytics` and `GET /dashboard/analytics` do it.
async fn time_pages(store: &dyn Store, tenant: &str, options: &Options) {
    let cases: &[PageCase] = &[
        (
            "page: tenant month, by day",
            true,
            &[
                ("from", "2026-09-01"),
                ("to", "2026-09-30"),
                ("granularity", "day"),
            ],
        ),
        (
            "page: tenant month, by day, conversations p.3",
            true,
            &[
                ("from", "2026-09-01"),
                ("to", "2026-09-30"),
                ("granularity", "day"),
                ("page", "3"),
            ],
        ),
        (
            "page: tenant 91 days, by week",
            true,
            &[
                ("from", "2026-08-01"),
                ("to", "2026-10-30"),
                ("granularity", "week"),
            ],
        ),
        (
            "page: all tenants month, by day",
            false,
            &[
                ("from", "2026-09-01"),
                ("to", "2026-09-30"),
                ("granularity", "day"),
            ],
        ),
        (
            "page: all tenants 91 days, by month",
            false,
            &[
                ("from", "2026-08-01"),
                ("to", "2026-10-30"),
                ("granularity", "month"),
            ],
        ),
    ];
    let iterations = options.iterations.min(20);
    println!(
        "{:<46} {:>10} {:>10} {:>10} {:>9}",
        "analytics page (server work)", "median", "p95", "max", "KiB"
    );
    for (label, for_tenant, pairs) in cases {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let subject = if *for_tenant {
            Subject::Tenant {
                id: tenant,
                name: tenant,
            }
        } else {
            Subject::All
        };
        let render = || async {
            let (status, body) = content(store, subject, Ok(pairs.clone()), Utc::now())
                .await
                .unwrap_or_else(|e| panic!("{label}: {e:?}"));
            assert_eq!(status.as_u16(), 200, "{label}");
            body.into_string()
        };
        let mut html = String::new();
        for _ in 0..2 {
            html = render().await;
        }
        let mut times = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let started = Instant::now();
            html = render().await;
            times.push(started.elapsed());
        }
        let timing = timing(times);
        println!(
            "{label:<46} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>9.0}",
            timing.median.as_secs_f64() * 1e3,
            timing.p95.as_secs_f64() * 1e3,
            timing.max.as_secs_f64() * 1e3,
            html.len() as f64 / 1024.0
        );
    }
}

fn main() {
    let options = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let sqlite = connect_store(&url).await.unwrap_or_else(|e| panic!("{e}"));
        run("sqlite", sqlite, &options).await;

        if let Some(base) = &options.postgres {
            let admin = sqlx::PgPool::connect(base)
                .await
                .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL: {e}"));
            let schema = format!("bench_usage_{}", std::process::id());
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                .execute(&admin)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let separator = if base.contains('?') { '&' } else { '?' };
            let url = format!("{base}{separator}options=-csearch_path%3D{schema}");
            let postgres = connect_store(&url).await.unwrap_or_else(|e| panic!("{e}"));
            run("postgres", Arc::clone(&postgres), &options).await;
            drop(postgres);
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&admin)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        } else {
            println!("\npostgres: skipped (pass --postgres URL or set TEST_DATABASE_URL)");
        }
    });
}
