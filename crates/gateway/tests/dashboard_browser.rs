//! The dashboard in a real headless Chromium (SPEC §5), driven over WebDriver
//! (`chromedriver`) with fantoccini; see `common/browser.rs`.
//!
//! - The admin signs in, creates a tenant with the form, opens its LLM configuration, switches
//!   it from OpenAI (the system default) to Anthropic with a model and a key, saves and sees
//!   the confirmation; the tenant's next chat request, sent through the API, reaches the
//!   Anthropic fake with the tenant's key. An invalid temperature shows the field's error and
//!   stores nothing; "Send test prompt" shows the fake's answer, tokens and cost.
//! - The analytics page, after known traffic (records written to the store and calls through
//!   the gateway), shows the expected totals, and its SVG charts one point per bucket for the
//!   day, week and month granularities and a chosen period; the admin's page adds up every
//!   tenant. On SQLite and (with `TEST_DATABASE_URL`) PostgreSQL.
//! - A tenant session lands on its own configuration and gets the 403 page on another
//!   tenant's pages and on the admin's; sign-out ends a session (the old cookie no longer
//!   opens anything).
//!
//! Every page visited is saved as `target/dashboard-screenshots/{name}.png`. Without Chromium
//! and chromedriver the tests skip, unless `REQUIRE_SERVICES=1`, where they fail.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::time::Duration;

use browser::Browser;
use chrono::{TimeDelta, Utc};
use common::dashboard::{api, dollars, page as fetch, thousands};
use common::usage::{
    Db, Sum, chat_record, conversation, embedding_small_cost, embeddings_request, haiku_cost,
    mini_cost, mini_settings, on_sqlite_and_postgres, post, usd, wait_for_records,
};
use common::{ADMIN_KEY, Gateway, SYSTEM_OPENAI_KEY, TENANT_ANTHROPIC_KEY, hello};
use fantoccini::Locator;
use meta_chat::store::UsageRecord;
use meta_chat_testkit::Reply;
use serde_json::{Value, json};

const HAIKU: &str = "claude-3-haiku-20240307";

// ---------------------------------------------------------------------------------------------
// Reading pages.

/// How many elements match `selector`.
async fn count(browser: &Browser, selector: &str) -> usize {
    browser
        .client
        .find_all(Locator::Css(selector))
        .await
        .unwrap()
        .len()
}

/// The attribute `name` of the first element matching `selector`.
async fn attr(browser: &Browser, selector: &str, name: &str) -> Option<String> {
    browser
        .client
        .find(Locator::Css(selector))
        .await
        .unwrap_or_else(|e| panic!("no element {selector}: {e}"))
        .attr(name)
        .await
        .unwrap()
}

/// The current value of the input or select matching `selector`.
async fn value(browser: &Browser, selector: &str) -> String {
    browser
        .client
        .find(Locator::Css(selector))
        .await
        .unwrap_or_else(|e| panic!("no element {selector}: {e}"))
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default()
}

/// The page's path and query (the URL without scheme and host).
async fn path(browser: &Browser) -> String {
    let url = browser.client.current_url().await.unwrap();
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    }
}

/// Scrolls the element matching `selector` into view, for the screenshot. The page's CSP
/// forbids the page's own scripts, not WebDriver's; a failure only changes the picture.
async fn scroll_to(browser: &Browser, selector: &str) {
    let script = format!("document.querySelector({selector:?}).scrollIntoView();");
    let _ = browser.client.execute(&script, Vec::new()).await;
}

/// Clicks the link or button matching `selector` and waits until the next page replaced this
/// one (a form's answer may come after the click returns).
async fn click_through(browser: &Browser, selector: &str) {
    let old = browser.client.find(Locator::Css("html")).await.unwrap();
    browser.click(selector).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    // The old page's root goes stale once the new page is there.
    while old.tag_name().await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "clicking {selector} led nowhere"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Signs in on the sign-in page with `key`.
async fn sign_in(browser: &Browser, gw: &Gateway, key: &str) {
    browser.open(&gw.url("/dashboard/login")).await;
    browser.fill("#key", key).await;
    click_through(
        browser,
        "form[action=\"/dashboard/login\"] button[type=submit]",
    )
    .await;
}

/// Clicks "Sign out" in the page's header.
async fn sign_out(browser: &Browser) {
    click_through(browser, "form[action=\"/dashboard/logout\"] button").await;
}

/// The `Cookie` header of the browser's dashboard session (read over WebDriver, which sees
/// `HttpOnly` cookies), checking the cookie's flags on the way.
async fn session_cookie(browser: &Browser) -> String {
    let cookie = browser
        .client
        .get_named_cookie("mc_session")
        .await
        .expect("no mc_session cookie");
    assert_eq!(cookie.http_only(), Some(true), "{cookie:?}");
    assert_eq!(
        format!("{:?}", cookie.same_site()),
        "Some(Strict)",
        "{cookie:?}"
    );
    // Plain HTTP without `COOKIE_SECURE`: not `Secure`, or the browser would not send it.
    assert_ne!(cookie.secure(), Some(true), "{cookie:?}");
    assert_eq!(cookie.path(), Some("/dashboard"), "{cookie:?}");
    format!("mc_session={}", cookie.value())
}

/// Nano-dollars from a nine-digit USD string (`x-meta-chat-cost-usd`).
fn nanos(cost_usd: &str) -> i64 {
    let (whole, fraction) = cost_usd.split_once('.').unwrap();
    assert_eq!(fraction.len(), 9, "{cost_usd}");
    whole.parse::<i64>().unwrap() * 1_000_000_000 + fraction.parse::<i64>().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Sign-in, tenants, LLM configuration, test prompt.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_switches_a_new_tenant_to_anthropic() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let gw = Gateway::start().await;
    // Tenants already there, so the list has rows.
    gw.tenant_named("Globex", mini_settings()).await;
    gw.tenant_named(
        "Initech",
        json!({"llm": {"provider": "ollama", "model": "llama3.1:8b"}}),
    )
    .await;

    // Not signed in: the dashboard is the sign-in page.
    browser.open(&gw.url("/dashboard")).await;
    assert_eq!(path(&browser).await, "/dashboard/login");
    assert_eq!(browser.text("h1").await, "Sign in");
    browser.screenshot("login").await;

    // A wrong key is refused on the page.
    sign_in(&browser, &gw, "mc_not-a-valid-key").await;
    assert_eq!(browser.text("p.error").await, "That key is not valid.");
    assert_eq!(
        count(&browser, "form[action=\"/dashboard/logout\"]").await,
        0
    );

    // The admin lands on the tenants page, with an HttpOnly, SameSite=Strict cookie.
    sign_in(&browser, &gw, ADMIN_KEY).await;
    assert_eq!(path(&browser).await, "/dashboard/tenants");
    assert_eq!(browser.text("h1").await, "Tenants");
    assert_eq!(browser.text("header.top .who").await, "admin");
    session_cookie(&browser).await;
    assert_eq!(count(&browser, "#tenants tr[data-tenant-id]").await, 2);

    // Create a tenant with the form: its key is shown once.
    browser.fill("#tenant-name", "Acme").await;
    click_through(&browser, "#create-tenant-submit").await;
    assert_eq!(browser.text("h1").await, "Tenant created");
    assert_eq!(browser.text("#new-tenant-name").await, "Acme");
    let id = browser.text("#new-tenant-id").await;
    let key = browser.text("#new-api-key").await;
    assert!(key.starts_with("mc_"), "{key}");
    browser.screenshot("new-tenant").await;
    let stored = api(&gw, &format!("/api/tenants/{id}")).await;
    assert_eq!(stored["name"], "Acme");
    assert_eq!(stored["settings"], json!({}), "{stored:#}");

    // With no settings, its chats go to OpenAI (the system default) with the system key.
    gw.fake
        .push(Reply::text("Hello from OpenAI.").with_usage(8, 4));
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "openai");
    let openai_cost = nanos(answer.header("x-meta-chat-cost-usd"));
    let sent = gw.fake.requests_to("/v1/chat/completions");
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].header("authorization"),
        Some(format!("Bearer {SYSTEM_OPENAI_KEY}").as_str())
    );
    assert!(gw.fake.requests_to("/v1/messages").is_empty());

    // Its LLM configuration: the system default (OpenAI) is selected.
    click_through(&browser, "#configure-tenant").await;
    assert_eq!(
        path(&browser).await,
        format!("/dashboard/tenants/{id}/settings")
    );
    assert_eq!(browser.text("h1").await, "LLM configuration");
    assert_eq!(browser.text("#tenant-name").await, "Acme");
    assert_eq!(value(&browser, "#llm-provider").await, "");
    let default = browser.text("#llm-provider option:checked").await;
    assert!(default.starts_with("System default (openai"), "{default}");
    assert_eq!(
        browser.text("#llm-apiKey-current").await,
        "None stored: the system key is used."
    );
    // The model picker offers the price table's models and the Ollama server's.
    for model in [HAIKU, "gpt-4o-mini", "llama3.1:8b"] {
        assert!(
            count(
                &browser,
                &format!("datalist#llm-models option[value=\"{model}\"]")
            )
            .await
                >= 1,
            "{model}"
        );
    }

    // Switch to Anthropic with a model and a key, and save.
    browser.select("#llm-provider", "anthropic").await;
    browser.fill("#llm-model", HAIKU).await;
    browser.fill("#llm-apiKey", TENANT_ANTHROPIC_KEY).await;
    browser.fill("#llm-temperature", "0.3").await;
    click_through(&browser, "#save-settings").await;
    assert_eq!(
        path(&browser).await,
        format!("/dashboard/tenants/{id}/settings?saved=1")
    );
    assert_eq!(browser.text("p.ok#saved").await, "Saved.");
    assert_eq!(count(&browser, "#settings-error").await, 0);
    assert_eq!(value(&browser, "#llm-provider").await, "anthropic");
    assert_eq!(value(&browser, "#llm-model").await, HAIKU);
    assert_eq!(value(&browser, "#llm-temperature").await, "0.3");
    // The key is write-only: the input is empty, the stored key shown masked.
    assert_eq!(value(&browser, "#llm-apiKey").await, "");
    assert!(
        browser
            .text("#llm-apiKey-current")
            .await
            .contains("sk-t…2222")
    );
    assert!(!browser.source().await.contains(TENANT_ANTHROPIC_KEY));
    browser.screenshot("settings-saved").await;

    let saved = api(&gw, &format!("/api/tenants/{id}")).await;
    assert_eq!(
        saved["settings"],
        json!({"llm": {"provider": "anthropic", "model": HAIKU, "apiKey": "sk-t…2222",
                       "temperature": 0.3}}),
        "{saved:#}"
    );

    // The tenant's next chat request, through the API, goes to the Anthropic fake: its
    // dialect, the tenant's key, the model chosen.
    gw.fake
        .push(Reply::text("Bonjour from Anthropic.").with_usage(40, 12));
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "anthropic");
    assert_eq!(
        answer.header("x-meta-chat-cost-usd"),
        usd(haiku_cost(40, 12))
    );
    assert_eq!(
        answer.json()["choices"][0]["message"]["content"],
        "Bonjour from Anthropic."
    );
    let sent = gw.fake.requests_to("/v1/messages");
    assert_eq!(sent.len(), 1);
    let request = &sent[0];
    assert_eq!(request.header("x-api-key"), Some(TENANT_ANTHROPIC_KEY));
    assert!(request.header("anthropic-version").is_some(), "{request:?}");
    assert_eq!(request.header("authorization"), None);
    assert_eq!(request.body["model"], HAIKU);
    assert_eq!(request.body["temperature"], 0.3);
    assert!(request.body["max_tokens"].is_u64(), "{:#}", request.body);
    assert_eq!(request.body["messages"][0]["role"], "user");
    assert!(
        request.body["messages"][0]["content"]
            .to_string()
            .contains("hello there")
    );
    assert_eq!(gw.fake.requests_to("/v1/chat/completions").len(), 1);

    // An invalid temperature (with another model in the same form) shows the field's error
    // and stores nothing.
    let before = api(&gw, &format!("/api/tenants/{id}")).await;
    browser
        .fill("#llm-model", "claude-3-5-sonnet-20241022")
        .await;
    browser.fill("#llm-temperature", "3").await;
    click_through(&browser, "#save-settings").await;
    let error = browser.text("#llm-temperature-error").await;
    assert!(error.contains("between 0 and 2"), "{error}");
    let summary = browser.text("#settings-error").await;
    assert!(
        summary.starts_with("Not saved: llm.temperature:"),
        "{summary}"
    );
    assert_eq!(count(&browser, "#saved").await, 0);
    assert_eq!(
        attr(&browser, "#llm-temperature", "aria-invalid")
            .await
            .as_deref(),
        Some("true")
    );
    // The form keeps what was typed, so it can be corrected.
    assert_eq!(value(&browser, "#llm-temperature").await, "3");
    assert_eq!(
        value(&browser, "#llm-model").await,
        "claude-3-5-sonnet-20241022"
    );
    assert!(!browser.source().await.contains(TENANT_ANTHROPIC_KEY));
    browser.screenshot("settings-error").await;
    let after = api(&gw, &format!("/api/tenants/{id}")).await;
    assert_eq!(after, before, "an invalid form changed the tenant");

    // "Send test prompt": the saved configuration answers, with latency, tokens and cost.
    let prompt = "What is 2+2? Answer in one line.";
    let reply = "2 + 2 = 4, says the Anthropic fake.";
    gw.fake.push(Reply::text(reply).with_usage(14, 9));
    browser.fill("#test-prompt", prompt).await;
    click_through(&browser, "#send-test").await;
    assert_eq!(browser.text("#test-answer").await, reply);
    assert_eq!(
        browser.text("#test-model").await,
        format!("anthropic / {HAIKU}")
    );
    assert_eq!(browser.text("#test-tokens").await, "14 in, 9 out");
    assert_eq!(
        browser.text("#test-cost").await,
        format!("${}", usd(haiku_cost(14, 9)))
    );
    let latency = browser.text("#test-latency").await;
    assert!(
        latency
            .strip_suffix(" ms")
            .is_some_and(|ms| ms.parse::<u64>().is_ok()),
        "{latency}"
    );
    assert_eq!(count(&browser, "#test-error").await, 0);
    let sent = gw.fake.requests_to("/v1/messages");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].header("x-api-key"), Some(TENANT_ANTHROPIC_KEY));
    assert_eq!(sent[1].body["model"], HAIKU);
    assert!(sent[1].body["messages"].to_string().contains(prompt));
    scroll_to(&browser, "#test").await;
    browser.screenshot("test-prompt").await;

    // The tenants page shows the new provider and model, and today's requests and cost (the
    // OpenAI chat, the Anthropic chat and the test prompt).
    wait_for_records(
        gw.state.store.as_ref(),
        Some(&id),
        3,
        Duration::from_secs(10),
    )
    .await;
    click_through(&browser, "header.top nav a[href=\"/dashboard/tenants\"]").await;
    assert_eq!(path(&browser).await, "/dashboard/tenants");
    assert_eq!(count(&browser, "#tenants tr[data-tenant-id]").await, 3);
    let row = format!("#tenants tr[data-tenant-id=\"{id}\"]");
    assert!(
        browser
            .text(&format!("{row} td.name"))
            .await
            .starts_with("Acme")
    );
    assert_eq!(
        browser.text(&format!("{row} td.provider")).await,
        "anthropic"
    );
    assert_eq!(browser.text(&format!("{row} td.model")).await, HAIKU);
    assert_eq!(browser.text(&format!("{row} td.requests")).await, "3");
    assert_eq!(
        browser.text(&format!("{row} td.cost")).await,
        format!(
            "${}",
            usd(openai_cost + haiku_cost(40, 12) + haiku_cost(14, 9))
        )
    );
    browser.screenshot("tenants").await;

    browser.close().await;
}

// ---------------------------------------------------------------------------------------------
// Analytics.

/// Settings sending a tenant's chats to Anthropic's Claude 3 Haiku with its own key.
fn haiku_settings() -> Value {
    json!({"llm": {"provider": "anthropic", "model": HAIKU, "apiKey": TENANT_ANTHROPIC_KEY}})
}

/// Usage records of the 24 days before today: Claude 3 Haiku chats of `acme` every day
/// (in four conversations), a gpt-4o-mini chat every third day, a failure every fifth, and a
/// gpt-4o-mini chat of `globex` every day.
fn history(acme: &str, globex: &str) -> Vec<UsageRecord> {
    let now = Utc::now();
    let mut records = Vec::new();
    for d in 1..=24_i64 {
        let at = now - TimeDelta::days(d);
        let mut record = chat_record(acme, at);
        record.provider = "anthropic".to_owned();
        record.model = HAIKU.to_owned();
        record.conversation_id = Some(format!("support-{}", d % 4));
        record.input_tokens = 900 + 170 * (d % 5) + 40 * d;
        record.output_tokens = 260 + 45 * (d % 4) + 12 * d;
        record.cost_nano_usd = haiku_cost(record.input_tokens, record.output_tokens);
        record.latency_ms = 420 + 35 * (d % 6);
        records.push(record);
        if d % 3 == 0 {
            let mut record = chat_record(acme, at - TimeDelta::hours(2));
            record.conversation_id = Some("research".to_owned());
            record.input_tokens = 2_400 + 100 * d;
            record.output_tokens = 700;
            record.cost_nano_usd = mini_cost(record.input_tokens, record.output_tokens);
            record.latency_ms = 610;
            records.push(record);
        }
        if d % 5 == 0 {
            let mut record = chat_record(acme, at - TimeDelta::hours(1));
            record.provider = "anthropic".to_owned();
            record.model = HAIKU.to_owned();
            record.status = "error".to_owned();
            record.error_kind = Some("upstream_error".to_owned());
            record.latency_ms = 95;
            records.push(record);
        }
        let mut record = chat_record(globex, at);
        record.input_tokens = 1_500 + 60 * d;
        record.output_tokens = 500;
        record.cost_nano_usd = mini_cost(record.input_tokens, record.output_tokens);
        records.push(record);
    }
    records
}

/// Checks the totals cards against `expected` (and the API's `totals`).
async fn check_totals(browser: &Browser, expected: &Sum, api_totals: &Value) {
    for (card, n, field) in [
        ("stat-requests", expected.requests, "requests"),
        ("stat-errors", expected.errors, "errors"),
        ("stat-input-tokens", expected.input, "inputTokens"),
        ("stat-output-tokens", expected.output, "outputTokens"),
        (
            "stat-embedding-tokens",
            expected.embedding,
            "embeddingTokens",
        ),
    ] {
        assert_eq!(api_totals[field], n, "{field}: {api_totals:#}");
        assert_eq!(
            attr(browser, &format!("#{card}"), "data-value")
                .await
                .as_deref(),
            Some(n.to_string().as_str()),
            "{card}"
        );
        assert_eq!(
            browser.text(&format!("#{card} .value")).await,
            thousands(n),
            "{card}"
        );
    }
    let cost = usd(expected.cost);
    assert_eq!(api_totals["costUsd"], cost, "{api_totals:#}");
    assert_eq!(
        attr(browser, "#stat-cost", "data-value").await.as_deref(),
        Some(cost.as_str())
    );
    assert_eq!(browser.text("#stat-cost .value").await, dollars(&cost));
}

/// Checks the time-series charts: one point per bucket of the API's `report`.
async fn check_series(browser: &Browser, report: &Value, buckets: usize) {
    assert_eq!(
        report["series"].as_array().unwrap().len(),
        buckets,
        "{report:#}"
    );
    let points = buckets.to_string();
    for section in ["#cost-over-time", "#tokens-over-time"] {
        assert_eq!(
            attr(browser, &format!("{section} figure.chart"), "data-points")
                .await
                .as_deref(),
            Some(points.as_str()),
            "{section}"
        );
    }
    // The cost chart: one circle per bucket; the token chart: one per bucket for input tokens
    // and one per bucket for output tokens, in their colours.
    assert_eq!(count(browser, "svg#cost-chart circle").await, buckets);
    assert_eq!(count(browser, "svg#tokens-chart circle").await, 2 * buckets);
    assert_eq!(
        count(browser, "svg#tokens-chart circle[fill=\"#2F5FD0\"]").await,
        buckets
    );
    assert_eq!(
        count(browser, "svg#tokens-chart circle[fill=\"#D97306\"]").await,
        buckets
    );
    // The points are joined by a line in the series' colour.
    assert!(count(browser, "svg#cost-chart polyline[stroke=\"#2F5FD0\"]").await >= 1);
    // Axes carry their labels.
    let cost_chart = browser.text("svg#cost-chart").await;
    assert!(cost_chart.contains("Cost (USD)"), "{cost_chart}");
    assert_eq!(
        count(browser, "#series-table tbody tr").await,
        buckets,
        "the numbers behind the charts"
    );
}

/// Bars of the breakdown chart `id`.
async fn bars(browser: &Browser, id: &str) -> usize {
    count(browser, &format!("svg#{id} rect[fill=\"#3B82A6\"]")).await
}

async fn analytics_after_known_traffic(db: Db) {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let screenshots = db.backend() == "sqlite";
    let gw = db.gateway(&[]).await;
    let (acme, acme_key) = gw.tenant_named("Acme", haiku_settings()).await;
    let (globex, globex_key) = gw.tenant_named("Globex", mini_settings()).await;
    let history = history(&acme, &globex);
    gw.state.store.insert_usage(&history).await.unwrap();

    // Today, through the gateway: two chats of Acme (Haiku, its default, and gpt-4o-mini),
    // one embeddings call, one failure; one chat of Globex.
    let chat = "/v1/chat/completions";
    gw.fake.push(Reply::text("Four.").with_usage(10, 2));
    let a = post(
        &gw,
        chat,
        &acme_key,
        &hello(json!({})),
        &conversation("live"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.header("x-meta-chat-provider"), "anthropic");
    gw.fake.push(Reply::text("Five.").with_usage(120, 30));
    let b = post(
        &gw,
        chat,
        &acme_key,
        &hello(json!({"model": "openai/gpt-4o-mini"})),
        &conversation("live"),
    )
    .await;
    assert_eq!(b.status, 200, "{}", b.text);
    assert_eq!(b.header("x-meta-chat-provider"), "openai");
    let e = post(&gw, "/v1/embeddings", &acme_key, &embeddings_request(), &[]).await;
    assert_eq!(e.status, 200, "{}", e.text);
    gw.fake.push(Reply::error(500, "the upstream exploded"));
    let failed = post(&gw, chat, &acme_key, &hello(json!({})), &[]).await;
    assert_eq!(failed.status, 502, "{}", failed.text);
    gw.fake.push(Reply::text("Other.").with_usage(1_000, 1_000));
    let o = post(&gw, chat, &globex_key, &hello(json!({})), &[]).await;
    assert_eq!(o.status, 200, "{}", o.text);
    let total_records = u64::try_from(history.len()).unwrap() + 5;
    wait_for_records(
        gw.state.store.as_ref(),
        None,
        total_records,
        Duration::from_secs(10),
    )
    .await;

    // What the pages must show, worked out here.
    let live_acme = Sum {
        requests: 4,
        errors: 1,
        cache_hits: 0,
        input: 10 + 120,
        output: 2 + 30,
        embedding: 6,
        cost: haiku_cost(10, 2) + mini_cost(120, 30) + embedding_small_cost(6),
    };
    let add = |mut sum: Sum, more: Sum| {
        sum.requests += more.requests;
        sum.errors += more.errors;
        sum.input += more.input;
        sum.output += more.output;
        sum.embedding += more.embedding;
        sum.cost += more.cost;
        sum
    };
    let acme_sum = add(
        Sum::of(history.iter().filter(|r| r.tenant_id == acme)),
        live_acme,
    );
    let globex_sum = add(
        Sum::of(history.iter().filter(|r| r.tenant_id == globex)),
        Sum {
            requests: 1,
            input: 1_000,
            output: 1_000,
            cost: mini_cost(1_000, 1_000),
            ..Sum::default()
        },
    );
    let all_sum = add(acme_sum, globex_sum);
    let stored = gw.state.store.recent_usage(&acme, 1_000).await.unwrap();
    assert_eq!(Sum::of(&stored), acme_sum, "the stored records");

    // The admin opens Acme's analytics from the tenants page.
    sign_in(&browser, &gw, ADMIN_KEY).await;
    assert_eq!(path(&browser).await, "/dashboard/tenants");
    click_through(
        &browser,
        &format!("#tenants tr[data-tenant-id=\"{acme}\"] a.analytics-link"),
    )
    .await;
    let page = format!("/dashboard/tenants/{acme}/analytics");
    assert_eq!(path(&browser).await, page);
    assert_eq!(browser.text("h1").await, "Analytics · Acme");
    assert_eq!(value(&browser, "#granularity").await, "day");

    // The last 30 days by day (the defaults): totals and one point per day.
    let report = api(&gw, &format!("/api/tenants/{acme}/usage")).await;
    check_totals(&browser, &acme_sum, &report["totals"]).await;
    check_series(&browser, &report, 30).await;
    // Breakdowns: three models (Haiku, gpt-4o-mini, the embedding model) and two providers,
    // as tables and as bar charts.
    let by_model = api(&gw, &format!("/api/tenants/{acme}/usage?groupBy=model")).await;
    assert_eq!(by_model["breakdown"].as_array().unwrap().len(), 3);
    assert_eq!(count(&browser, "table#by-model tbody tr").await, 3);
    assert_eq!(bars(&browser, "model-chart").await, 3);
    assert_eq!(count(&browser, "table#by-provider tbody tr").await, 2);
    assert_eq!(bars(&browser, "provider-chart").await, 2);
    // Conversations: support-0..3, research, live and the embeddings call without one.
    assert_eq!(count(&browser, "table#conversations tbody tr").await, 7);
    assert_eq!(browser.text("nav.pager .page-of").await, "Page 1 of 1");
    // Latency and errors per provider.
    assert_eq!(count(&browser, "table#latency tbody tr").await, 2);
    let anthropic = stored.iter().filter(|r| r.provider == "anthropic").count();
    let cell = |n: usize| format!("table#latency tbody tr:first-child td:nth-child({n})");
    assert_eq!(browser.text(&cell(1)).await, "anthropic");
    assert_eq!(browser.text(&cell(2)).await, anthropic.to_string());
    // Every failure was Anthropic's.
    assert_eq!(browser.text(&cell(3)).await, acme_sum.errors.to_string());
    // Nothing of the other tenant.
    assert!(!browser.source().await.contains("Globex"));
    if screenshots {
        // Taller, so the picture holds the totals and both time-series charts.
        browser.client.set_window_size(1280, 1600).await.unwrap();
        browser.screenshot("analytics-tenant").await;
    }

    // The granularity selector: by week, then by month, over the same period.
    for (granularity, report_query) in
        [("week", "granularity=week"), ("month", "granularity=month")]
    {
        browser.select("#granularity", granularity).await;
        click_through(&browser, "form#period button[type=submit]").await;
        let now_at = path(&browser).await;
        assert!(now_at.starts_with(&format!("{page}?")), "{now_at}");
        assert!(
            now_at.contains(&format!("granularity={granularity}")),
            "{now_at}"
        );
        let report = api(&gw, &format!("/api/tenants/{acme}/usage?{report_query}")).await;
        let buckets = report["series"].as_array().unwrap().len();
        match granularity {
            "week" => assert!((5..=6).contains(&buckets), "{buckets}"),
            _ => assert!((1..=2).contains(&buckets), "{buckets}"),
        }
        check_totals(&browser, &acme_sum, &report["totals"]).await;
        check_series(&browser, &report, buckets).await;
        assert_eq!(value(&browser, "#granularity").await, granularity);
    }

    // A chosen period: the last seven days, by day.
    let today = Utc::now().date_naive();
    let from = today - TimeDelta::days(6);
    let query = format!("from={from}&to={today}&granularity=day");
    browser.open(&gw.url(&format!("{page}?{query}"))).await;
    assert_eq!(value(&browser, "#from").await, from.to_string());
    assert_eq!(value(&browser, "#to").await, today.to_string());
    let week_sum = add(
        Sum::of(
            history
                .iter()
                .filter(|r| r.tenant_id == acme && r.created_at.date_naive() >= from),
        ),
        live_acme,
    );
    let report = api(&gw, &format!("/api/tenants/{acme}/usage?{query}")).await;
    check_totals(&browser, &week_sum, &report["totals"]).await;
    check_series(&browser, &report, 7).await;

    // The admin's page across tenants.
    click_through(&browser, "header.top nav a[href=\"/dashboard/analytics\"]").await;
    assert_eq!(path(&browser).await, "/dashboard/analytics");
    assert_eq!(browser.text("h1").await, "Analytics · all tenants");
    let report = api(&gw, "/api/usage").await;
    check_totals(&browser, &all_sum, &report["totals"]).await;
    check_series(&browser, &report, 30).await;
    assert_eq!(count(&browser, "table#by-tenant tbody tr").await, 2);
    assert_eq!(bars(&browser, "tenant-chart").await, 2);
    let first = browser.text("table#by-tenant tbody tr:first-child").await;
    let most_expensive = if acme_sum.cost >= globex_sum.cost {
        "Acme"
    } else {
        "Globex"
    };
    assert!(first.starts_with(most_expensive), "{first}");
    if screenshots {
        browser.screenshot("analytics-admin").await;
    }

    browser.close().await;
}

on_sqlite_and_postgres! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    analytics_after_known_traffic: analytics_sqlite, analytics_postgres
}

// ---------------------------------------------------------------------------------------------
// Sessions: a tenant sees only its own pages; sign-out ends a session.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_session_is_confined_and_sign_out_ends_it() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let gw = Gateway::start().await;
    let (acme, acme_key) = gw.tenant_named("Acme", haiku_settings()).await;
    let (globex, _) = gw.tenant_named("Globex", mini_settings()).await;

    // The admin signs in and out: the session ends, in the browser and on the server.
    sign_in(&browser, &gw, ADMIN_KEY).await;
    assert_eq!(path(&browser).await, "/dashboard/tenants");
    let admin_cookie = session_cookie(&browser).await;
    assert_eq!(
        fetch(&gw, &admin_cookie, "/dashboard/tenants").await.status,
        200
    );
    sign_out(&browser).await;
    assert_eq!(path(&browser).await, "/dashboard/login");
    browser.open(&gw.url("/dashboard")).await;
    assert_eq!(path(&browser).await, "/dashboard/login");
    browser.open(&gw.url("/dashboard/tenants")).await;
    assert_eq!(path(&browser).await, "/dashboard/login");
    let answer = fetch(&gw, &admin_cookie, "/dashboard/tenants").await;
    assert_eq!(answer.status, 303, "the revoked session still works");
    assert_eq!(answer.header("location"), "/dashboard/login");

    // Acme signs in with its key and lands on its own configuration.
    sign_in(&browser, &gw, &acme_key).await;
    assert_eq!(
        path(&browser).await,
        format!("/dashboard/tenants/{acme}/settings")
    );
    assert_eq!(browser.text("header.top .who").await, "Acme");
    assert_eq!(value(&browser, "#llm-provider").await, "anthropic");
    let cookie = session_cookie(&browser).await;
    // Its navigation has no admin pages.
    assert_eq!(
        count(&browser, "header.top nav a[href=\"/dashboard/tenants\"]").await,
        0
    );
    click_through(
        &browser,
        &format!("header.top nav a[href=\"/dashboard/tenants/{acme}/analytics\"]"),
    )
    .await;
    assert_eq!(browser.text("h1").await, "Analytics · Acme");

    // Another tenant's pages, and the admin's, are the 403 page.
    let forbidden = [
        format!("/dashboard/tenants/{globex}/settings"),
        format!("/dashboard/tenants/{globex}/analytics"),
        "/dashboard/tenants".to_owned(),
        "/dashboard/analytics".to_owned(),
    ];
    for (i, page) in forbidden.iter().enumerate() {
        browser.open(&gw.url(page)).await;
        assert_eq!(path(&browser).await, *page, "no redirect");
        assert_eq!(browser.text("h1").await, "Forbidden", "{page}");
        assert_eq!(
            browser.text("main p.error").await,
            "This session may not see that page.",
            "{page}"
        );
        let source = browser.source().await;
        assert!(!source.contains("Globex"), "{page}: {source}");
        if i == 0 {
            browser.screenshot("forbidden").await;
        }
        let answer = fetch(&gw, &cookie, page).await;
        assert_eq!(answer.status, 403, "{page}: {}", answer.text);
    }
    // Its own pages still open.
    for page in [
        format!("/dashboard/tenants/{acme}/settings"),
        format!("/dashboard/tenants/{acme}/analytics"),
    ] {
        assert_eq!(fetch(&gw, &cookie, &page).await.status, 200, "{page}");
    }

    // Sign-out ends the tenant's session too.
    browser
        .open(&gw.url(&format!("/dashboard/tenants/{acme}/settings")))
        .await;
    sign_out(&browser).await;
    assert_eq!(path(&browser).await, "/dashboard/login");
    browser.open(&gw.url("/dashboard")).await;
    assert_eq!(path(&browser).await, "/dashboard/login");
    assert_eq!(browser.text("h1").await, "Sign in");
    browser
        .open(&gw.url(&format!("/dashboard/tenants/{acme}/settings")))
        .await;
    assert_eq!(path(&browser).await, "/dashboard/login");
    assert_eq!(
        fetch(&gw, &cookie, &format!("/dashboard/tenants/{acme}/settings"))
            .await
            .status,
        303
    );

    browser.close().await;
}
