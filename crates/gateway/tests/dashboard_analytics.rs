//! The dashboard's analytics page (SPEC §5), without a browser: `GET
//! /dashboard/tenants/{id}/analytics` and `GET /dashboard/analytics`, over real sockets.
//!
//! - After known traffic through the fake providers, the page's totals are the usage API's
//!   (`GET /api/tenants/{id}/usage`), its charts have one point per bucket of the API's series
//!   (by day, week and month), and its breakdowns and latency table show what was sent; on
//!   SQLite and (with `TEST_DATABASE_URL`) PostgreSQL.
//! - Conversations are paged 20 at a time, in the API's order.
//! - A tenant session sees its own analytics only; the across-tenants page is the admin's.
//! - Bad query values are a 400 page naming the value, not a crash.
//! - Model, tenant and conversation names are escaped, in the tables and in the SVG.
//! - `Store::provider_latency` gives the nearest-rank p50/p95 computed here by brute force,
//!   the same on SQLite and PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::dashboard::{api, dollars, page, sign_in, thousands};
use common::usage::{
    Db, chat_record, conversation, embedding_small_cost, embeddings_request, haiku_cost, mini_cost,
    mini_settings, on_sqlite_and_postgres, post, usd, wait_for_records,
};
use common::{ADMIN_KEY, Gateway, hello};
use meta_chat::store::{ProviderLatency, Store, UsageRecord, UsageScope, latency_bucket};
use meta_chat_testkit::Reply;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Reading pages.

/// The text from `start` (included) to the first `end` after it (included).
fn between<'a>(html: &'a str, start: &str, end: &str) -> &'a str {
    let from = html
        .find(start)
        .unwrap_or_else(|| panic!("no {start:?} in the page:\n{html}"));
    let rest = &html[from..];
    let to = rest[start.len()..]
        .find(end)
        .unwrap_or_else(|| panic!("no {end:?} after {start:?}"));
    &rest[..start.len() + to + end.len()]
}

/// The `<svg id="{id}">…</svg>` of the page.
fn svg<'a>(html: &'a str, id: &str) -> &'a str {
    between(html, &format!("<svg id=\"{id}\""), "</svg>")
}

/// The `<table id="{id}">…</table>` of the page.
fn table<'a>(html: &'a str, id: &str) -> &'a str {
    between(html, &format!("<table id=\"{id}\""), "</table>")
}

/// The `data-value` of the `.stat` card `id`.
fn stat(html: &str, id: &str) -> String {
    let card = between(html, &format!("id=\"{id}\" data-value=\""), "\">");
    card[format!("id=\"{id}\" data-value=\"").len()..card.len() - 2].to_owned()
}

/// The text of the `.value` of the `.stat` card `id`.
fn stat_text(html: &str, id: &str) -> String {
    let card = &html[html.find(&format!("id=\"{id}\"")).unwrap()..];
    let value = between(card, "<div class=\"value\">", "</div>");
    value["<div class=\"value\">".len()..value.len() - "</div>".len()].to_owned()
}

/// The rows of a table body, each as the texts of its cells.
fn rows(table: &str) -> Vec<Vec<String>> {
    let body = between(table, "<tbody>", "</tbody>");
    body.split("<tr>")
        .skip(1)
        .map(|row| {
            row.split("<td")
                .skip(1)
                .map(|cell| {
                    let text = &cell[cell.find('>').unwrap() + 1..cell.find("</td>").unwrap()];
                    strip_tags(text)
                })
                .collect()
        })
        .collect()
}

fn strip_tags(html: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for c in html.chars() {
        match c {
            '<' => inside = true,
            '>' => inside = false,
            c if !inside => out.push(c),
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Known traffic.

/// Sends known calls for a tenant through the fakes; returns (tenant id, key, other tenant's
/// id, other tenant's key) once all usage records are stored.
async fn known_traffic(gw: &Gateway) -> (String, String, String, String) {
    let (tenant, key) = gw.tenant_named("Acme", mini_settings()).await;
    let (other, other_key) = gw.tenant_named("Other", mini_settings()).await;
    let chat = "/v1/chat/completions";

    gw.fake.push(Reply::text("Four.").with_usage(10, 2));
    let a = post(gw, chat, &key, &hello(json!({})), &conversation("conv-a")).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.header("x-meta-chat-cost-usd"), usd(mini_cost(10, 2)));

    gw.fake.push(Reply::text("Five.").with_usage(1_200, 345));
    let b = post(gw, chat, &key, &hello(json!({})), &conversation("conv-b")).await;
    assert_eq!(b.status, 200, "{}", b.text);

    gw.fake.push(Reply::text("Bonjour.").with_usage(40, 12));
    let c = post(
        gw,
        chat,
        &key,
        &hello(json!({"model": "anthropic/claude-3-haiku-20240307"})),
        &conversation("conv-b"),
    )
    .await;
    assert_eq!(c.status, 200, "{}", c.text);
    assert_eq!(c.header("x-meta-chat-cost-usd"), usd(haiku_cost(40, 12)));

    let e = post(gw, "/v1/embeddings", &key, &embeddings_request(), &[]).await;
    assert_eq!(e.status, 200, "{}", e.text);

    gw.fake.push(Reply::error(500, "the upstream exploded"));
    let failed = post(gw, chat, &key, &hello(json!({})), &conversation("conv-a")).await;
    assert_eq!(failed.status, 502, "{}", failed.text);

    gw.fake.push(Reply::text("Other.").with_usage(1_000, 1_000));
    let o = post(gw, chat, &other_key, &hello(json!({})), &[]).await;
    assert_eq!(o.status, 200, "{}", o.text);

    wait_for_records(gw.state.store.as_ref(), None, 6, Duration::from_secs(10)).await;
    (tenant, key, other, other_key)
}

async fn page_shows_the_apis_numbers(db: Db) {
    let gw = db.gateway(&[]).await;
    let (tenant, _, other, _) = known_traffic(&gw).await;
    let admin = sign_in(&gw, ADMIN_KEY).await;

    let expected_cost =
        mini_cost(10, 2) + mini_cost(1_200, 345) + haiku_cost(40, 12) + embedding_small_cost(6);
    for granularity in ["day", "week", "month"] {
        let path = format!("/dashboard/tenants/{tenant}/analytics?granularity={granularity}");
        let html = page(&gw, &admin, &path).await;
        assert_eq!(html.status, 200, "{}", html.text);
        let html = html.text;
        let report = api(
            &gw,
            &format!("/api/tenants/{tenant}/usage?granularity={granularity}"),
        )
        .await;
        let totals = &report["totals"];

        // The totals, as the API gives them and as they read.
        assert_eq!(totals["requests"], 5, "{report:#}");
        assert_eq!(totals["errors"], 1);
        assert_eq!(totals["inputTokens"], 10 + 1_200 + 40);
        assert_eq!(totals["outputTokens"], 2 + 345 + 12);
        assert_eq!(totals["embeddingTokens"], 6);
        assert_eq!(totals["costUsd"], usd(expected_cost));
        for (card, field) in [
            ("stat-requests", "requests"),
            ("stat-errors", "errors"),
            ("stat-input-tokens", "inputTokens"),
            ("stat-output-tokens", "outputTokens"),
            ("stat-embedding-tokens", "embeddingTokens"),
        ] {
            let n = totals[field].as_i64().unwrap();
            assert_eq!(stat(&html, card), n.to_string(), "{card}");
            assert_eq!(stat_text(&html, card), thousands(n), "{card}");
        }
        let cost = totals["costUsd"].as_str().unwrap();
        assert_eq!(stat(&html, "stat-cost"), cost);
        assert_eq!(stat_text(&html, "stat-cost"), dollars(cost));
        assert_eq!(stat_text(&html, "stat-input-tokens"), "1,250");

        // One point per bucket: the cost chart has one circle per bucket, the token chart one
        // per bucket for input and one for output tokens, in their colours.
        let buckets = report["series"].as_array().unwrap().len();
        match granularity {
            "day" => assert_eq!(buckets, 30),
            "week" => assert!((5..=6).contains(&buckets), "{buckets}"),
            _ => assert!((1..=2).contains(&buckets), "{buckets}"),
        }
        let cost_chart = svg(&html, "cost-chart");
        assert_eq!(
            cost_chart.matches("<circle").count(),
            buckets,
            "{cost_chart}"
        );
        let tokens_chart = svg(&html, "tokens-chart");
        assert_eq!(tokens_chart.matches("<circle").count(), 2 * buckets);
        assert_eq!(
            tokens_chart.matches("<circle").count(),
            tokens_chart.matches("fill=\"#2F5FD0\"").count()
                + tokens_chart.matches("fill=\"#D97306\"").count()
        );
        assert!(html.contains(&format!("data-points=\"{buckets}\"")));
        // Axes with their labels and tick values, as SVG text.
        for label in ["Cost (USD)", "Tokens"] {
            assert!(html.contains(&format!("{label}\n</text>")), "{label}");
        }
        let x_label = match granularity {
            "day" => "Day (UTC)",
            "week" => "Week from Monday (UTC)",
            _ => "Month (UTC)",
        };
        assert!(
            cost_chart.contains(&format!(">\n{x_label}\n</text>")),
            "{cost_chart}"
        );
        assert!(cost_chart.contains(">\n$0\n</text>"), "{cost_chart}");
        assert!(tokens_chart.contains(">\n0\n</text>"), "{tokens_chart}");
        assert!(cost_chart.contains("<polyline"));
        // The series table holds the same numbers as the API's series.
        let series_rows = rows(table(&html, "series-table"));
        assert_eq!(series_rows.len(), buckets);
        for (row, point) in series_rows.iter().zip(report["series"].as_array().unwrap()) {
            assert_eq!(row[0], point["start"].as_str().unwrap());
            assert_eq!(row[1], thousands(point["requests"].as_i64().unwrap()));
            assert_eq!(row[6], dollars(point["costUsd"].as_str().unwrap()));
        }
    }

    let html = page(
        &gw,
        &admin,
        &format!("/dashboard/tenants/{tenant}/analytics"),
    )
    .await;
    assert_eq!(html.status, 200);
    let html = html.text;

    // By model: the API's rows, most expensive first, and a bar per row.
    let by_model = api(&gw, &format!("/api/tenants/{tenant}/usage?groupBy=model")).await;
    let model_rows = rows(table(&html, "by-model"));
    let api_rows = by_model["breakdown"].as_array().unwrap();
    assert_eq!(model_rows.len(), api_rows.len());
    assert_eq!(model_rows.len(), 3, "{model_rows:?}");
    for (row, expected) in model_rows.iter().zip(api_rows) {
        assert_eq!(row[0], expected["provider"].as_str().unwrap());
        assert_eq!(row[1], expected["model"].as_str().unwrap());
        assert_eq!(row[2], thousands(expected["requests"].as_i64().unwrap()));
        assert_eq!(row[7], dollars(expected["costUsd"].as_str().unwrap()));
    }
    assert_eq!(model_rows[0][1], "gpt-4o-mini");
    assert_eq!(model_rows[0][2], "3");
    assert_eq!(model_rows[0][3], "1");
    let model_chart = svg(&html, "model-chart");
    assert_eq!(
        model_chart.matches("fill=\"#3B82A6\"").count(),
        3,
        "{model_chart}"
    );
    assert!(model_chart.contains("openai/gpt-4o-mini"));

    // By provider.
    let by_provider = api(
        &gw,
        &format!("/api/tenants/{tenant}/usage?groupBy=provider"),
    )
    .await;
    let provider_rows = rows(table(&html, "by-provider"));
    let api_rows = by_provider["breakdown"].as_array().unwrap();
    assert_eq!(provider_rows.len(), 2);
    for (row, expected) in provider_rows.iter().zip(api_rows) {
        assert_eq!(row[0], expected["provider"].as_str().unwrap());
        assert_eq!(row[6], dollars(expected["costUsd"].as_str().unwrap()));
    }
    assert_eq!(
        svg(&html, "provider-chart")
            .matches("fill=\"#3B82A6\"")
            .count(),
        2
    );

    // Conversations: b (two calls), a (one call and a failure), then the embeddings without
    // one.
    let conversations = rows(table(&html, "conversations"));
    let names: Vec<&str> = conversations.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["conv-b", "conv-a", "(none)"]);
    assert_eq!(
        conversations[0][6],
        dollars(&usd(mini_cost(1_200, 345) + haiku_cost(40, 12)))
    );
    assert!(html.contains("Page 1 of 1"));
    assert!(!html.contains("rel=\"next\""));

    // Latency and errors per provider: every request is counted.
    let latency = rows(table(&html, "latency"));
    assert_eq!(latency.len(), 2, "{latency:?}");
    assert_eq!(latency[0][..4], ["anthropic", "1", "0", "0.0%"]);
    assert_eq!(latency[1][..4], ["openai", "4", "1", "25.0%"]);
    let stored = gw.state.store.recent_usage(&tenant, 100).await.unwrap();
    let mut openai: Vec<i64> = stored
        .iter()
        .filter(|r| r.provider == "openai")
        .map(|r| r.latency_ms)
        .collect();
    openai.sort_unstable();
    assert_eq!(latency[1][4], thousands(openai[1]), "{openai:?}"); // rank ⌈0.5·4⌉ = 2
    assert_eq!(latency[1][5], thousands(openai[3]), "{openai:?}"); // rank ⌈0.95·4⌉ = 4

    // The other tenant's traffic is not in this page, but is in the admin's.
    assert!(!html.contains("Other"), "{html}");
    let all = page(&gw, &admin, "/dashboard/analytics").await;
    assert_eq!(all.status, 200, "{}", all.text);
    let report = api(&gw, "/api/usage").await;
    assert_eq!(stat(&all.text, "stat-requests"), "6");
    assert_eq!(
        stat(&all.text, "stat-cost"),
        report["totals"]["costUsd"].as_str().unwrap()
    );
    let tenants = rows(table(&all.text, "by-tenant"));
    let names: Vec<&str> = tenants.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["Other", "Acme"]);
    assert!(
        all.text
            .contains(&format!("href=\"/dashboard/tenants/{other}/analytics\""))
    );
    assert_eq!(
        svg(&all.text, "tenant-chart")
            .matches("fill=\"#3B82A6\"")
            .count(),
        2
    );
    assert_eq!(
        svg(&all.text, "cost-chart").matches("<circle").count(),
        report["series"].as_array().unwrap().len()
    );
    // Across tenants, conversations carry their tenant's name.
    let conversations = rows(table(&all.text, "conversations"));
    assert_eq!(conversations.len(), 4);
    assert!(
        conversations
            .iter()
            .any(|r| r[0] == "Other" && r[1] == "(none)")
    );
}

on_sqlite_and_postgres! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    page_shows_the_apis_numbers: page_matches_api_sqlite, page_matches_api_postgres
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chosen_period_and_granularity_have_one_point_per_bucket() {
    let gw = Gateway::start().await;
    let (tenant, _) = gw.tenant(mini_settings()).await;
    let mut records = Vec::new();
    // Records on 2026-01-30 (Friday), 2026-02-02 (Monday) and 2026-03-31.
    for (day, cost) in [
        ("2026-01-30", 5_000),
        ("2026-02-02", 7_000),
        ("2026-03-31", 11_000),
    ] {
        let mut record = chat_record(&tenant, common::usage::at(&format!("{day}T10:00:00Z")));
        record.cost_nano_usd = cost;
        record.input_tokens = cost / 10;
        record.output_tokens = cost / 100;
        records.push(record);
    }
    gw.state.store.insert_usage(&records).await.unwrap();
    let admin = sign_in(&gw, ADMIN_KEY).await;
    for (granularity, buckets) in [("day", 61), ("week", 10), ("month", 3)] {
        let query = format!("from=2026-01-30&to=2026-03-31&granularity={granularity}");
        let html = page(
            &gw,
            &admin,
            &format!("/dashboard/tenants/{tenant}/analytics?{query}"),
        )
        .await;
        assert_eq!(html.status, 200, "{}", html.text);
        let report = api(&gw, &format!("/api/tenants/{tenant}/usage?{query}")).await;
        assert_eq!(report["series"].as_array().unwrap().len(), buckets);
        assert_eq!(
            svg(&html.text, "cost-chart").matches("<circle").count(),
            buckets
        );
        assert_eq!(
            svg(&html.text, "tokens-chart").matches("<circle").count(),
            2 * buckets
        );
        assert_eq!(stat(&html.text, "stat-cost"), usd(23_000));
        assert_eq!(stat(&html.text, "stat-cost"), report["totals"]["costUsd"]);
        // The form shows the period and granularity asked for.
        assert!(html.text.contains("name=\"from\" value=\"2026-01-30\""));
        assert!(html.text.contains("name=\"to\" value=\"2026-03-31\""));
        assert!(
            html.text
                .contains(&format!("value=\"{granularity}\" selected"))
        );
    }
    // Month ticks name the months.
    let html = page(
        &gw,
        &admin,
        &format!(
            "/dashboard/tenants/{tenant}/analytics?from=2026-01-30&to=2026-03-31&granularity=month"
        ),
    )
    .await;
    let chart = svg(&html.text, "cost-chart");
    for month in ["Jan 2026", "Feb 2026", "Mar 2026"] {
        assert!(chart.contains(&format!(">\n{month}\n</text>")), "{chart}");
    }
    // Empty fields are the defaults: the last 30 days by day.
    let html = page(
        &gw,
        &admin,
        &format!("/dashboard/tenants/{tenant}/analytics?from=&to=&granularity=day"),
    )
    .await;
    assert_eq!(html.status, 200, "{}", html.text);
    assert_eq!(svg(&html.text, "cost-chart").matches("<circle").count(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_are_paged_in_the_apis_order() {
    let gw = Gateway::start().await;
    let (tenant, _) = gw.tenant(mini_settings()).await;
    let now = Utc::now() - TimeDelta::minutes(5);
    let records: Vec<UsageRecord> = (0..45)
        .map(|i| {
            let mut record = chat_record(&tenant, now - TimeDelta::seconds(i));
            record.conversation_id = Some(format!("conv-{i:02}"));
            // Every cost different, some equal (then by requests, then by id).
            record.cost_nano_usd = (i % 30) * 1_000;
            record
        })
        .collect();
    gw.state.store.insert_usage(&records).await.unwrap();
    let admin = sign_in(&gw, ADMIN_KEY).await;
    let base = format!("/dashboard/tenants/{tenant}/analytics");
    let mut seen = Vec::new();
    for (page_number, expected_rows) in [(1, 20), (2, 20), (3, 5)] {
        let html = page(&gw, &admin, &format!("{base}?page={page_number}")).await;
        assert_eq!(html.status, 200, "{}", html.text);
        let rows = rows(table(&html.text, "conversations"));
        assert_eq!(rows.len(), expected_rows);
        let report = api(
            &gw,
            &format!(
                "/api/tenants/{tenant}/usage?groupBy=conversation&limit=20&offset={}",
                (page_number - 1) * 20
            ),
        )
        .await;
        let api_ids: Vec<&str> = report["breakdown"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["conversationId"].as_str().unwrap())
            .collect();
        let page_ids: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(page_ids, api_ids);
        assert!(html.text.contains(&format!("Page {page_number} of 3")));
        assert_eq!(html.text.contains("rel=\"prev\""), page_number > 1);
        assert_eq!(html.text.contains("rel=\"next\""), page_number < 3);
        seen.extend(rows.into_iter().map(|r| r[0].clone()));
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 45);
    // The links keep the period and granularity.
    let html = page(&gw, &admin, &format!("{base}?page=2&granularity=week")).await;
    let next = between(&html.text, "<a rel=\"next\" href=\"", "\"");
    assert!(
        next.contains("granularity=week") && next.contains("page=3"),
        "{next}"
    );
    // A page past the end is empty, not an error.
    let html = page(&gw, &admin, &format!("{base}?page=9")).await;
    assert_eq!(html.status, 200);
    assert!(html.text.contains("No conversations on this page."));
    assert!(html.text.contains("Page 9 of 3"), "{}", html.text);
    assert!(html.text.contains("45 conversations in the period"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_sees_only_its_own_analytics() {
    let gw = Gateway::start().await;
    let (tenant, key) = gw.tenant_named("Acme", mini_settings()).await;
    let (other, _) = gw.tenant_named("Other", mini_settings()).await;
    let session = sign_in(&gw, &key).await;

    let own = page(
        &gw,
        &session,
        &format!("/dashboard/tenants/{tenant}/analytics"),
    )
    .await;
    assert_eq!(own.status, 200, "{}", own.text);
    assert!(
        own.text.contains("<h1>Analytics · Acme</h1>"),
        "{}",
        own.text
    );
    assert_eq!(own.header("x-frame-options"), "DENY");

    let others = page(
        &gw,
        &session,
        &format!("/dashboard/tenants/{other}/analytics"),
    )
    .await;
    assert_eq!(others.status, 403, "{}", others.text);
    assert!(!others.text.contains("Other"));
    let all = page(&gw, &session, "/dashboard/analytics").await;
    assert_eq!(all.status, 403, "{}", all.text);
    let missing = page(&gw, &session, "/dashboard/tenants/no-such-tenant/analytics").await;
    assert_eq!(missing.status, 403);

    // The admin sees both, and a 404 for a tenant that does not exist.
    let admin = sign_in(&gw, ADMIN_KEY).await;
    let theirs = page(
        &gw,
        &admin,
        &format!("/dashboard/tenants/{other}/analytics"),
    )
    .await;
    assert_eq!(theirs.status, 200);
    assert!(theirs.text.contains("<h1>Analytics · Other</h1>"));
    let missing = page(&gw, &admin, "/dashboard/tenants/no-such-tenant/analytics").await;
    assert_eq!(missing.status, 404);

    // Without a session: to the sign-in page.
    let anonymous = page(&gw, "mc_session=nothing", "/dashboard/analytics").await;
    assert_eq!(anonymous.status, 303);
    assert_eq!(anonymous.header("location"), "/dashboard/login");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_values_are_a_400_page() {
    let gw = Gateway::start().await;
    let (tenant, _) = gw.tenant(mini_settings()).await;
    let admin = sign_in(&gw, ADMIN_KEY).await;
    for (query, message) in [
        (
            "granularity=hour",
            "granularity: expected `day`, `week` or `month`",
        ),
        ("from=yesterday", "from: expected a date"),
        ("from=2026-02-01&to=2026-01-01", "from: must be before `to`"),
        (
            "from=2000-01-01&to=2026-01-01",
            "granularity: the period has more than 1000",
        ),
        ("page=0", "page: expected a number ≥ 1"),
        ("page=-3", "page: expected a number ≥ 1"),
        ("colour=red", "colour: unknown parameter"),
        ("to=2026-01-01&to=2026-01-02", "to: given more than once"),
        ("from=%3Cscript%3E", "from: expected a date"),
    ] {
        for path in [
            format!("/dashboard/tenants/{tenant}/analytics?{query}"),
            format!("/dashboard/analytics?{query}"),
        ] {
            let answer = page(&gw, &admin, &path).await;
            assert_eq!(answer.status, 400, "{path}: {}", answer.text);
            let alert = between(&answer.text, "<p class=\"error\" role=\"alert\">", "</p>");
            assert!(
                alert.contains(message),
                "{path}: {alert} in {}",
                answer.text
            );
            // The form is there to fix it, with what was sent escaped.
            assert!(
                answer
                    .text
                    .contains("<form class=\"card filters\" id=\"period\""),
                "{path}: {}",
                answer.text
            );
            assert!(!answer.text.contains("<script"), "{path}");
        }
    }
    let answer = page(
        &gw,
        &admin,
        &format!("/dashboard/tenants/{tenant}/analytics?from=%3Cscript%3E"),
    )
    .await;
    assert!(
        answer.text.contains("value=\"&lt;script&gt;\""),
        "{}",
        answer.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_escaped_in_tables_and_charts() {
    let gw = Gateway::start().await;
    let (tenant, _) = gw
        .tenant_named("<script>alert('tenant')</script>", mini_settings())
        .await;
    let at = Utc::now() - TimeDelta::minutes(5);
    let mut record = chat_record(&tenant, at);
    record.model = "<script>alert(1)</script>".to_owned();
    record.provider = "openai".to_owned();
    record.conversation_id = Some("<b>conv</b>".to_owned());
    record.cost_nano_usd = 123_000;
    let mut other = chat_record(&tenant, at);
    other.provider = "<img src=x onerror=alert(2)>".to_owned();
    other.cost_nano_usd = 1_000;
    gw.state.store.insert_usage(&[record, other]).await.unwrap();
    let admin = sign_in(&gw, ADMIN_KEY).await;

    for path in [
        format!("/dashboard/tenants/{tenant}/analytics"),
        "/dashboard/analytics".to_owned(),
    ] {
        let html = page(&gw, &admin, &path).await;
        assert_eq!(html.status, 200, "{}", html.text);
        let html = html.text;
        assert!(!html.contains("<script"), "{path}: {html}");
        assert!(!html.contains("<img"), "{path}");
        assert!(!html.contains("<b>"), "{path}");
        let models = table(&html, "by-model");
        assert!(
            models.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{models}"
        );
        let chart = svg(&html, "model-chart");
        assert!(
            chart.contains("openai/&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{chart}"
        );
        let providers = svg(&html, "provider-chart");
        assert!(
            providers.contains("&lt;img src=x onerror=alert(2)&gt;"),
            "{providers}"
        );
        assert!(table(&html, "conversations").contains("&lt;b&gt;conv&lt;/b&gt;"));
        assert!(table(&html, "latency").contains("&lt;img src=x onerror=alert(2)&gt;"));
    }
    let html = page(&gw, &admin, "/dashboard/analytics").await.text;
    assert!(
        table(&html, "by-tenant").contains("&lt;script&gt;alert(&#39;tenant&#39;)&lt;/script&gt;")
            || table(&html, "by-tenant").contains("&lt;script&gt;alert('tenant')&lt;/script&gt;")
    );
    assert!(
        svg(&html, "tenant-chart")
            .contains("&lt;script&gt;alert(&apos;tenant&apos;)&lt;/script&gt;")
    );
    let html = page(
        &gw,
        &admin,
        &format!("/dashboard/tenants/{tenant}/analytics"),
    )
    .await
    .text;
    assert!(html.contains("<title>Analytics · &lt;script&gt;"), "{html}");
}

// ---------------------------------------------------------------------------------------------
// Latency percentiles, SQLite and PostgreSQL.

/// The nearest-rank percentile: the value at rank ⌈p·n⌉ (p in hundredths) of `sorted`.
fn nearest_rank(sorted: &[i64], percent: usize) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (percent * sorted.len()).div_ceil(100);
    Some(sorted[rank.max(1) - 1])
}

/// Records of a tenant "t" in `[from, from + 1 day)` with chosen latencies per provider, cache
/// hits, errors, and records outside the scope (another tenant, before and after).
fn latency_records(from: DateTime<Utc>) -> Vec<UsageRecord> {
    let mut rng = fastrand::Rng::with_seed(11);
    let mut records = Vec::new();
    // provider → number of (non-cache-hit) records: ranks at the edges of ⌈0.5·n⌉, ⌈0.95·n⌉.
    let providers = [
        ("openai", 1),
        ("anthropic", 2),
        ("ollama", 19),
        ("p20", 20),
        ("p21", 21),
        ("p100", 100),
        ("p1013", 1_013),
    ];
    for (provider, n) in providers {
        for i in 0..n {
            let mut record = chat_record("t", from + TimeDelta::seconds(rng.i64(0..86_399)));
            record.provider = provider.to_owned();
            // Duplicates on purpose: few distinct values for the big ones.
            record.latency_ms = if n > 50 {
                rng.i64(1..40)
            } else {
                rng.i64(1..10_000)
            };
            if i % 7 == 3 {
                record.status = "error".to_owned();
                record.error_kind = Some("upstream_error".to_owned());
            }
            records.push(record);
        }
        // Cache hits: counted as requests, not as latencies.
        for _ in 0..3 {
            let mut record = chat_record("t", from + TimeDelta::seconds(rng.i64(0..86_399)));
            record.provider = provider.to_owned();
            record.cache_hit = true;
            record.latency_ms = 0;
            records.push(record);
        }
    }
    // Only cache hits: no latency.
    let mut cached = chat_record("t", from + TimeDelta::hours(1));
    cached.provider = "cached-only".to_owned();
    cached.cache_hit = true;
    records.push(cached);
    // Outside the scope: another tenant, the instant before, the instant the period ends.
    for (tenant, at) in [
        ("u", from + TimeDelta::hours(2)),
        ("t", from - TimeDelta::microseconds(1)),
        ("t", from + TimeDelta::days(1)),
    ] {
        let mut record = chat_record(tenant, at);
        record.provider = "openai".to_owned();
        record.latency_ms = 1_000_000;
        records.push(record);
    }
    records
}

/// What `provider_latency` should return for `records` in `scope`, by brute force.
fn expected_latency(records: &[UsageRecord], scope: &UsageScope<'_>) -> Vec<ProviderLatency> {
    let mut by_provider: BTreeMap<&str, (i64, i64, Vec<i64>)> = BTreeMap::new();
    for r in records {
        if scope.tenant_id.is_some_and(|t| t != r.tenant_id)
            || r.created_at < scope.from
            || r.created_at >= scope.to
        {
            continue;
        }
        let entry = by_provider.entry(&r.provider).or_default();
        entry.0 += 1;
        entry.1 += i64::from(r.status == "error");
        if !r.cache_hit {
            // Across tenants the percentiles come from histogram buckets (at most 3.2 % wide).
            entry.2.push(if scope.tenant_id.is_some() {
                r.latency_ms
            } else {
                latency_bucket(r.latency_ms)
            });
        }
    }
    by_provider
        .into_iter()
        .map(|(provider, (requests, errors, mut latencies))| {
            latencies.sort_unstable();
            ProviderLatency {
                provider: provider.to_owned(),
                requests,
                errors,
                p50_ms: nearest_rank(&latencies, 50),
                p95_ms: nearest_rank(&latencies, 95),
            }
        })
        .collect()
}

async fn latency_of(
    store: &dyn Store,
    records: &[UsageRecord],
    from: DateTime<Utc>,
) -> [Vec<ProviderLatency>; 3] {
    store.insert_usage(records).await.unwrap();
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    // A tenant's day (exact, from the records), everyone's day (from the day's histogram), and
    // everyone's day with an hour of records on either side (partial days from the records).
    let scopes = [
        (Some("t"), from, from + TimeDelta::days(1)),
        (None, from, from + TimeDelta::days(1)),
        (
            None,
            from - TimeDelta::hours(1),
            from + TimeDelta::days(1) + TimeDelta::hours(1),
        ),
    ];
    for (slot, (tenant, from, to)) in out.iter_mut().zip(scopes) {
        let scope = UsageScope {
            tenant_id: tenant,
            from,
            to,
        };
        *slot = store.provider_latency(&scope).await.unwrap();
        assert_eq!(
            *slot,
            expected_latency(records, &scope),
            "{} {tenant:?}",
            store.backend()
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_percentiles_are_nearest_rank_on_sqlite_and_postgres() {
    let from = common::usage::at("2026-05-04T00:00:00Z");
    let records = latency_records(from);
    // The expectations themselves, at the rank edges.
    assert_eq!(nearest_rank(&[5], 95), Some(5));
    assert_eq!(nearest_rank(&[1, 2], 50), Some(1));
    assert_eq!(nearest_rank(&[1, 2], 95), Some(2));
    let twenty: Vec<i64> = (1..=20).collect();
    assert_eq!(nearest_rank(&twenty, 50), Some(10));
    assert_eq!(nearest_rank(&twenty, 95), Some(19));
    // The histogram buckets: exact under 64 ms, then 32 per power of two, named by their
    // largest value.
    for (latency, bucket) in [
        (-5, 0),
        (0, 0),
        (63, 63),
        (64, 65),
        (65, 65),
        (66, 67),
        (127, 127),
        (128, 131),
        (1_000, 1_007),
        (1_007, 1_007),
        (1_008, 1_023),
        (1_000_000, 1_015_807),
    ] {
        assert_eq!(latency_bucket(latency), bucket, "{latency}");
    }
    for latency in [64_i64, 100, 999, 4_096, 65_535, 10_000_000] {
        let bucket = latency_bucket(latency);
        assert!(
            bucket >= latency && (bucket - latency) * 1_000 <= latency * 32,
            "{latency}"
        );
    }
    let twenty_one: Vec<i64> = (1..=21).collect();
    assert_eq!(nearest_rank(&twenty_one, 50), Some(11));
    assert_eq!(nearest_rank(&twenty_one, 95), Some(20));

    let sqlite = Db::sqlite();
    let on_sqlite = latency_of(sqlite.store().await.as_ref(), &records, from).await;
    let cached_only = on_sqlite[0]
        .iter()
        .find(|p| p.provider == "cached-only")
        .unwrap();
    assert_eq!(
        (cached_only.requests, cached_only.p50_ms, cached_only.p95_ms),
        (1, None, None)
    );
    assert_eq!(
        on_sqlite[1]
            .iter()
            .find(|p| p.provider == "openai")
            .unwrap()
            .requests,
        5
    );

    if let Some(postgres) = Db::postgres().await {
        let on_postgres = latency_of(postgres.store().await.as_ref(), &records, from).await;
        assert_eq!(on_postgres, on_sqlite);
    }
}
