//! The dashboard without a browser (SPEC §5): sign-in and its cookie, CSRF, session expiry and
//! sign-out, tenant isolation, escaping, security headers, the tenants page, the LLM
//! configuration form (saving through the shared validation, inline field errors) and
//! "Send test prompt".
//!
//! Cookies are handled by hand (no cookie jar) and redirects are not followed, so every
//! `Set-Cookie` and `Location` is checked as sent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use chrono::{TimeDelta, Utc};
use common::{
    ADMIN_KEY, Answer, Gateway, TENANT_ANTHROPIC_KEY, TENANT_OPENAI_KEY, dashboard::client, hello,
    usage::chat_record,
};
use meta_chat::store::DashboardSession;
use meta_chat_testkit::Reply;
use serde_json::{Value, json};

/// `application/x-www-form-urlencoded` of `fields`.
fn form_body(fields: &[(&str, &str)]) -> String {
    fn encode(text: &str) -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                    (b as char).to_string()
                }
                b' ' => "+".to_owned(),
                other => format!("%{other:02X}"),
            })
            .collect()
    }
    fields
        .iter()
        .map(|(name, value)| format!("{}={}", encode(name), encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The `mc_session` token a `Set-Cookie` header sets.
fn session_token(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .and_then(|pair| pair.trim().strip_prefix("mc_session="))
        .unwrap_or_else(|| panic!("not a session cookie: {set_cookie}"))
        .to_owned()
}

/// The CSRF token in a page's forms.
fn csrf_of(page: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = page
        .find(marker)
        .unwrap_or_else(|| panic!("no CSRF field in {page}"))
        + marker.len();
    page[start..].split('"').next().unwrap().to_owned()
}

/// A signed-in dashboard user.
struct Dash<'a> {
    gw: &'a Gateway,
    client: reqwest::Client,
    token: String,
    csrf: String,
}

impl<'a> Dash<'a> {
    /// Signs in with `key` and reads the CSRF token from the home page it lands on.
    async fn sign_in(gw: &'a Gateway, key: &str) -> Self {
        let client = client();
        let answer = post_form(&client, &gw.url("/dashboard/login"), None, &[("key", key)]).await;
        assert_eq!(answer.status, 303, "{}", answer.text);
        assert_eq!(answer.header("location"), "/dashboard");
        let token = session_token(answer.header("set-cookie"));
        let mut dash = Self {
            gw,
            client,
            token,
            csrf: String::new(),
        };
        let home = dash.get("/dashboard").await;
        assert_eq!(home.status, 303);
        let landing = dash.get(home.header("location")).await;
        assert_eq!(landing.status, 200, "{}", landing.text);
        dash.csrf = csrf_of(&landing.text);
        dash
    }

    fn cookie(&self) -> String {
        format!("mc_session={}", self.token)
    }

    async fn get(&self, path: &str) -> Answer {
        let response = self
            .client
            .get(self.gw.url(path))
            .header("cookie", self.cookie())
            .send()
            .await
            .unwrap();
        Answer::read(response).await
    }

    /// POSTs `fields` with this session's CSRF token.
    async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let mut all = vec![("csrf", self.csrf.as_str())];
        all.extend_from_slice(fields);
        post_form(&self.client, &self.gw.url(path), Some(&self.cookie()), &all).await
    }

    /// POSTs `fields` as they are (no CSRF token added).
    async fn post_raw(&self, path: &str, fields: &[(&str, &str)]) -> Answer {
        post_form(
            &self.client,
            &self.gw.url(path),
            Some(&self.cookie()),
            fields,
        )
        .await
    }
}

async fn post_form(
    client: &reqwest::Client,
    url: &str,
    cookie: Option<&str>,
    fields: &[(&str, &str)],
) -> Answer {
    post_form_with(client, url, cookie, fields, &[]).await
}

async fn post_form_with(
    client: &reqwest::Client,
    url: &str,
    cookie: Option<&str>,
    fields: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> Answer {
    let mut request = client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(fields));
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    Answer::read(request.send().await.unwrap()).await
}

async fn api_settings(gw: &Gateway, id: &str) -> Value {
    let answer = gw
        .send(
            reqwest::Method::GET,
            &format!("/api/tenants/{id}"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    answer.json()["settings"].clone()
}

async fn tenant_count(gw: &Gateway) -> usize {
    let answer = gw
        .send(reqwest::Method::GET, "/api/tenants", Some(ADMIN_KEY), None)
        .await;
    let body = answer.json();
    body.as_array()
        .or_else(|| body["data"].as_array())
        .or_else(|| body["tenants"].as_array())
        .unwrap_or_else(|| panic!("no tenant list in {body}"))
        .len()
}

fn openai_settings() -> Value {
    json!({"llm": {"provider": "openai", "model": "gpt-4o-mini", "apiKey": TENANT_OPENAI_KEY}})
}

// ---------------------------------------------------------------------------------------------
// Sign-in, cookie, sign-out, expiry.

#[tokio::test]
async fn sign_in_sets_an_http_only_strict_cookie_secure_only_over_tls() {
    let gw = Gateway::start().await;
    let client = client();
    let login = gw.url("/dashboard/login");

    let answer = post_form(&client, &login, None, &[("key", ADMIN_KEY)]).await;
    assert_eq!(answer.status, 303, "{}", answer.text);
    let cookie = answer.header("set-cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
        assert!(cookie.contains(flag), "{flag} missing: {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    assert!(session_token(cookie).len() >= 32, "{cookie}");

    let answer = post_form_with(
        &client,
        &login,
        None,
        &[("key", ADMIN_KEY)],
        &[("x-forwarded-proto", "https")],
    )
    .await;
    assert_eq!(answer.status, 303);
    assert!(answer.header("set-cookie").contains("; Secure"));

    let secure = Gateway::start_with(&[("COOKIE_SECURE", "true")]).await;
    let answer = post_form(
        &client,
        &secure.url("/dashboard/login"),
        None,
        &[("key", ADMIN_KEY)],
    )
    .await;
    assert_eq!(answer.status, 303);
    let cookie = answer.header("set-cookie");
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
}

#[tokio::test]
async fn a_bad_key_gets_the_sign_in_page_with_401_and_no_cookie() {
    let gw = Gateway::start().await;
    let client = client();
    for key in ["mc_not-a-real-key", "", "admin"] {
        let answer = post_form(&client, &gw.url("/dashboard/login"), None, &[("key", key)]).await;
        assert_eq!(answer.status, 401, "{key:?}: {}", answer.text);
        assert!(answer.headers.get("set-cookie").is_none());
        assert!(
            answer.text.contains("That key is not valid."),
            "{}",
            answer.text
        );
        assert!(answer.text.contains("name=\"key\""), "{}", answer.text);
    }
    // Without a session every page sends to the sign-in page.
    for path in [
        "/dashboard",
        "/dashboard/tenants",
        "/dashboard/tenants/x/settings",
    ] {
        let answer = Answer::read(client.get(gw.url(path)).send().await.unwrap()).await;
        assert_eq!(answer.status, 303, "{path}");
        assert_eq!(answer.header("location"), "/dashboard/login", "{path}");
    }
}

#[tokio::test]
async fn a_tenant_key_signs_in_to_its_own_configuration() {
    let gw = Gateway::start().await;
    let (id, key) = gw.tenant(openai_settings()).await;
    let dash = Dash::sign_in(&gw, &key).await;
    let home = dash.get("/dashboard").await;
    assert_eq!(
        home.header("location"),
        format!("/dashboard/tenants/{id}/settings")
    );
    let page = dash.get(&format!("/dashboard/tenants/{id}/settings")).await;
    assert_eq!(page.status, 200);
    assert!(page.text.contains("LLM configuration"));
}

#[tokio::test]
async fn an_expired_session_sends_to_sign_in() {
    let gw = Gateway::start().await;
    let now = Utc::now();
    let session = |token: &str, expires_at| DashboardSession {
        id_hash: meta_chat::crypto::hash_api_key(token),
        tenant_id: None,
        csrf_token: "csrf-token-for-tests".into(),
        created_at: now - TimeDelta::hours(13),
        expires_at,
        revoked_at: None,
    };
    let store = &gw.state.store;
    store
        .create_session(&session("live-token", now + TimeDelta::hours(1)))
        .await
        .unwrap();
    store
        .create_session(&session("expired-token", now - TimeDelta::seconds(1)))
        .await
        .unwrap();
    let client = client();
    let get = |token: &'static str| {
        let request = client
            .get(gw.url("/dashboard/tenants"))
            .header("cookie", format!("mc_session={token}"));
        async move { Answer::read(request.send().await.unwrap()).await }
    };
    assert_eq!(get("live-token").await.status, 200);
    let answer = get("expired-token").await;
    assert_eq!(answer.status, 303);
    assert_eq!(answer.header("location"), "/dashboard/login");
    // An expired session's form is refused too (sent to sign in, nothing created).
    let before = tenant_count(&gw).await;
    let answer = post_form(
        &client,
        &gw.url("/dashboard/tenants"),
        Some("mc_session=expired-token"),
        &[("csrf", "csrf-token-for-tests"), ("name", "late")],
    )
    .await;
    assert_eq!(answer.status, 303);
    assert_eq!(tenant_count(&gw).await, before);
}

#[tokio::test]
async fn sign_out_revokes_the_session() {
    let gw = Gateway::start().await;
    let dash = Dash::sign_in(&gw, ADMIN_KEY).await;
    assert_eq!(dash.get("/dashboard/tenants").await.status, 200);

    // Without the CSRF token sign-out is refused and the session lives on.
    assert_eq!(dash.post_raw("/dashboard/logout", &[]).await.status, 403);
    assert_eq!(dash.get("/dashboard/tenants").await.status, 200);

    let answer = dash.post("/dashboard/logout", &[]).await;
    assert_eq!(answer.status, 303);
    assert_eq!(answer.header("location"), "/dashboard/login");
    assert!(answer.header("set-cookie").contains("Max-Age=0"));
    let answer = dash.get("/dashboard/tenants").await;
    assert_eq!(answer.status, 303, "the old cookie must not work");
    assert_eq!(answer.header("location"), "/dashboard/login");
}

// ---------------------------------------------------------------------------------------------
// CSRF, access, escaping, headers.

#[tokio::test]
async fn a_post_without_the_csrf_token_is_refused_and_changes_nothing() {
    let gw = Gateway::start().await;
    let (id, _) = gw.tenant(openai_settings()).await;
    let dash = Dash::sign_in(&gw, ADMIN_KEY).await;
    let before = tenant_count(&gw).await;
    let stored = api_settings(&gw, &id).await;
    let settings = format!("/dashboard/tenants/{id}/settings");
    let test = format!("/dashboard/tenants/{id}/test");
    for csrf in [None, Some(""), Some("wrong-token")] {
        let with = |fields: &[(&'static str, &'static str)]| {
            let mut all: Vec<(&str, &str)> = csrf.map(|c| ("csrf", c)).into_iter().collect();
            all.extend_from_slice(fields);
            all
        };
        let answer = dash
            .post_raw("/dashboard/tenants", &with(&[("name", "sneaky")]))
            .await;
        assert_eq!(answer.status, 403, "{csrf:?}: {}", answer.text);
        assert!(answer.text.contains("CSRF"), "{}", answer.text);
        let answer = dash
            .post_raw(
                &settings,
                &with(&[
                    ("llm.provider", "anthropic"),
                    ("llm.model", "claude-3-haiku-20240307"),
                ]),
            )
            .await;
        assert_eq!(answer.status, 403, "{csrf:?}");
        let answer = dash.post_raw(&test, &with(&[("prompt", "hi")])).await;
        assert_eq!(answer.status, 403, "{csrf:?}");
    }
    // A body that is not a form at all.
    let answer = Answer::read(
        dash.client
            .post(gw.url("/dashboard/tenants"))
            .header("cookie", dash.cookie())
            .header("content-type", "application/json")
            .body(json!({"csrf": dash.csrf, "name": "json"}).to_string())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(answer.status, 403);
    // Another session's token is not this one's.
    let other = Dash::sign_in(&gw, ADMIN_KEY).await;
    assert_ne!(other.csrf, dash.csrf);
    let answer = other
        .post_raw(
            "/dashboard/tenants",
            &[("csrf", dash.csrf.as_str()), ("name", "x")],
        )
        .await;
    assert_eq!(answer.status, 403);

    assert_eq!(tenant_count(&gw).await, before);
    assert_eq!(api_settings(&gw, &id).await, stored);
    assert!(gw.fake.requests().is_empty(), "no test prompt was sent");
}

#[tokio::test]
async fn a_tenant_session_sees_only_its_own_tenant() {
    let gw = Gateway::start().await;
    let (mine, key) = gw.tenant_named("mine", openai_settings()).await;
    let (theirs, _) = gw.tenant_named("theirs", openai_settings()).await;
    let dash = Dash::sign_in(&gw, &key).await;
    let stored = api_settings(&gw, &theirs).await;

    assert_eq!(
        dash.get(&format!("/dashboard/tenants/{mine}/settings"))
            .await
            .status,
        200
    );
    assert_eq!(dash.get("/dashboard/tenants").await.status, 403);
    let answer = dash
        .get(&format!("/dashboard/tenants/{theirs}/settings"))
        .await;
    assert_eq!(answer.status, 403);
    assert!(!answer.text.contains("theirs"));
    // Still signed in: the refusal keeps the session's navigation and sign-out button.
    assert!(
        answer.text.contains("Sign out")
            && answer
                .text
                .contains(&format!("/dashboard/tenants/{mine}/analytics")),
        "{}",
        answer.text
    );
    assert_eq!(
        dash.get("/dashboard/tenants/no-such-tenant/settings")
            .await
            .status,
        403
    );
    let answer = dash
        .post(
            &format!("/dashboard/tenants/{theirs}/settings"),
            &[("llm.provider", "anthropic")],
        )
        .await;
    assert_eq!(answer.status, 403);
    let answer = dash
        .post(
            &format!("/dashboard/tenants/{theirs}/test"),
            &[("prompt", "hi")],
        )
        .await;
    assert_eq!(answer.status, 403);
    assert_eq!(
        dash.post("/dashboard/tenants", &[("name", "new")])
            .await
            .status,
        403
    );
    assert_eq!(api_settings(&gw, &theirs).await, stored);
    assert!(
        gw.fake.requests_to("/v1/chat/completions").is_empty(),
        "no test prompt was sent"
    );

    // The admin may open any tenant; an unknown one is 404.
    let admin = Dash::sign_in(&gw, ADMIN_KEY).await;
    assert_eq!(
        admin
            .get(&format!("/dashboard/tenants/{theirs}/settings"))
            .await
            .status,
        200
    );
    let missing = admin
        .get("/dashboard/tenants/no-such-tenant/settings")
        .await;
    assert_eq!(missing.status, 404);
    // Any error page of a signed-in request keeps the session's layout.
    assert!(
        missing.text.contains("Sign out") && missing.text.contains("/dashboard/analytics"),
        "{}",
        missing.text
    );
}

#[tokio::test]
async fn user_text_is_escaped_and_pages_carry_the_security_headers() {
    let gw = Gateway::start().await;
    let name = "<script>alert(1)</script>";
    let (id, _) = gw
        .tenant_named(
            name,
            json!({"llm": {"provider": "openai", "model": "<img src=x onerror=alert(2)>"}}),
        )
        .await;
    let dash = Dash::sign_in(&gw, ADMIN_KEY).await;
    for path in [
        "/dashboard/tenants".to_owned(),
        format!("/dashboard/tenants/{id}/settings"),
    ] {
        let page = dash.get(&path).await;
        assert_eq!(page.status, 200, "{path}");
        if path == "/dashboard/tenants" {
            assert!(
                page.text.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
                "{}",
                page.text
            );
        }
        assert!(!page.text.contains("<script"), "{path}: {}", page.text);
        assert!(!page.text.contains("<img"), "{path}: {}", page.text);
        assert!(
            page.text.contains("&lt;img src=x onerror=alert(2)&gt;"),
            "{path}"
        );
        let csp = page.header("content-security-policy");
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(page.header("x-frame-options"), "DENY");
        assert_eq!(page.header("referrer-policy"), "no-referrer");
        assert_eq!(page.header("x-content-type-options"), "nosniff");
    }
    // The sign-in page and errors carry them as well.
    let login = Answer::read(
        client()
            .get(gw.url("/dashboard/login"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(login.header("x-frame-options"), "DENY");
    let forbidden = dash.post_raw("/dashboard/tenants", &[]).await;
    assert_eq!(forbidden.status, 403);
    assert!(forbidden.headers.contains_key("content-security-policy"));
}

// ---------------------------------------------------------------------------------------------
// The tenants page.

#[tokio::test]
async fn the_tenants_page_lists_provider_model_and_todays_cost_and_requests() {
    let gw = Gateway::start().await;
    let (busy, _) = gw.tenant_named("busy", openai_settings()).await;
    let (idle, _) = gw.tenant_named("idle", json!({})).await;
    let now = Utc::now();
    let mut records = Vec::new();
    for cost in [1_500_000_000_i64, 250_000_000] {
        let mut record = chat_record(&busy, now);
        record.cost_nano_usd = cost;
        records.push(record);
    }
    // Yesterday's usage is not today's.
    let mut old = chat_record(&busy, now - TimeDelta::days(2));
    old.cost_nano_usd = 9_000_000_000;
    records.push(old);
    gw.state.store.insert_usage(&records).await.unwrap();

    let dash = Dash::sign_in(&gw, ADMIN_KEY).await;
    let page = dash.get("/dashboard/tenants").await;
    assert_eq!(page.status, 200);
    let row = |id: &str| {
        let start = page
            .text
            .find(&format!("data-tenant-id=\"{id}\""))
            .unwrap_or_else(|| panic!("no row for {id}: {}", page.text));
        let end = page.text[start..].find("</tr>").unwrap() + start;
        page.text[start..end].to_owned()
    };
    let busy_row = row(&busy);
    assert!(busy_row.contains("busy"), "{busy_row}");
    assert!(busy_row.contains(">openai<"), "{busy_row}");
    assert!(busy_row.contains(">gpt-4o-mini<"), "{busy_row}");
    assert!(busy_row.contains("$1.750000000"), "{busy_row}");
    assert!(busy_row.contains("class=\"num requests\">2<"), "{busy_row}");
    assert!(
        busy_row.contains(&format!("href=\"/dashboard/tenants/{busy}/settings\"")),
        "{busy_row}"
    );
    assert!(
        busy_row.contains(&format!("href=\"/dashboard/tenants/{busy}/analytics\"")),
        "{busy_row}"
    );
    let idle_row = row(&idle);
    assert!(idle_row.contains("(default)"), "{idle_row}");
    assert!(idle_row.contains("$0.000000000"), "{idle_row}");
    assert!(idle_row.contains("class=\"num requests\">0<"), "{idle_row}");
}

#[tokio::test]
async fn creating_a_tenant_shows_its_key_once() {
    let gw = Gateway::start().await;
    let dash = Dash::sign_in(&gw, ADMIN_KEY).await;
    let page = dash
        .post("/dashboard/tenants", &[("name", "Acme <Corp>")])
        .await;
    assert_eq!(page.status, 201, "{}", page.text);
    assert!(page.text.contains("Acme &lt;Corp&gt;"));
    let marker = "class=\"secret\" id=\"new-api-key\">";
    let start = page
        .text
        .find(marker)
        .unwrap_or_else(|| panic!("{}", page.text))
        + marker.len();
    let key = page.text[start..].split('<').next().unwrap().to_owned();
    assert!(key.starts_with("mc_"), "{key}");
    let id_marker = "id=\"new-tenant-id\">";
    let start = page.text.find(id_marker).unwrap() + id_marker.len();
    let id = page.text[start..].split('<').next().unwrap().to_owned();
    assert!(
        page.text
            .contains(&format!("href=\"/dashboard/tenants/{id}/settings\""))
    );

    // The key works, and is not shown again.
    let tenant = Dash::sign_in(&gw, &key).await;
    let own = tenant
        .get(&format!("/dashboard/tenants/{id}/settings"))
        .await;
    assert_eq!(own.status, 200);
    let list = dash.get("/dashboard/tenants").await;
    assert!(list.text.contains("Acme &lt;Corp&gt;"));
    assert!(!list.text.contains(&key));

    // A blank name is refused next to the field.
    let before = tenant_count(&gw).await;
    let page = dash.post("/dashboard/tenants", &[("name", "   ")]).await;
    assert_eq!(page.status, 422);
    assert!(
        page.text.contains("id=\"tenant-name-error\""),
        "{}",
        page.text
    );
    assert_eq!(tenant_count(&gw).await, before);
}

// ---------------------------------------------------------------------------------------------
// The LLM configuration form.

/// The fields of a whole configuration form as a browser sends it (empty inputs included).
fn full_form<'a>(changes: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut fields: Vec<(&str, &str)> = vec![
        ("llm.provider", ""),
        ("llm.model", ""),
        ("llm.apiKey", ""),
        ("llm.baseUrl", ""),
        ("llm.temperature", ""),
        ("llm.maxTokens", ""),
        ("llm.topP", ""),
        ("embeddings.provider", ""),
        ("embeddings.model", ""),
        ("embeddings.apiKey", ""),
        ("embeddings.baseUrl", ""),
        ("fallback[0].priority", ""),
        ("fallback[0].provider", ""),
        ("fallback[0].model", ""),
        ("fallback[0].baseUrl", ""),
        ("fallback[0].apiKey", ""),
        ("rateLimit.requestsPerMinute", ""),
        ("rateLimit.tokensPerDay", ""),
        ("cache.ttlSeconds", ""),
        ("budget.dailyUsd", ""),
        ("budget.monthlyUsd", ""),
        ("costAlertThreshold", ""),
    ];
    for (name, value) in changes {
        match fields.iter_mut().find(|(n, _)| n == name) {
            Some(field) => field.1 = value,
            None => fields.push((name, value)),
        }
    }
    fields
}

#[tokio::test]
async fn the_form_shows_the_stored_settings_masked_and_the_model_lists() {
    let gw = Gateway::start().await;
    gw.fake
        .set_ollama_models(vec!["llama3.1:8b".into(), "qwen2.5:7b".into()]);
    let (id, _) = gw
        .tenant(json!({
            "llm": {"provider": "openai", "model": "gpt-4o-mini", "apiKey": TENANT_OPENAI_KEY,
                    "temperature": 0.3, "maxTokens": 500},
            "fallback": [{"provider": "ollama", "model": "llama3.1:8b", "priority": 3},
                         {"provider": "anthropic", "model": "claude-3-haiku-20240307",
                          "priority": 2, "apiKey": TENANT_ANTHROPIC_KEY}],
            "rateLimit": {"requestsPerMinute": 10},
            "cache": {"enabled": true, "ttlSeconds": 60}
        }))
        .await;
    let dash = Dash::sign_in(&gw, ADMIN_KEY).await;
    let page = dash.get(&format!("/dashboard/tenants/{id}/settings")).await;
    assert_eq!(page.status, 200);
    let text = &page.text;
    assert!(!text.contains(TENANT_OPENAI_KEY) && !text.contains(TENANT_ANTHROPIC_KEY));
    assert!(text.contains("…1111"), "masked key shown: {text}");
    assert!(
        text.contains("<option value=\"openai\" selected>"),
        "{text}"
    );
    assert!(
        text.contains("name=\"llm.apiKey\" type=\"password\" value=\"\""),
        "{text}"
    );
    assert!(
        text.contains(
            "id=\"llm-temperature\" name=\"llm.temperature\" type=\"text\" value=\"0.3\""
        ),
        "{text}"
    );
    assert!(text.contains("value=\"500\""));
    assert!(
        text.contains(
            "id=\"cache-enabled\" type=\"checkbox\" name=\"cache.enabled\" value=\"true\" checked"
        ),
        "{text}"
    );
    // Fallback rows in priority order, plus an empty one to add.
    let anthropic_row = text.find("value=\"claude-3-haiku-20240307\"").unwrap();
    let ollama_row = text.find("id=\"fallback-1-model\"").unwrap();
    assert!(anthropic_row < ollama_row);
    assert!(text.contains("id=\"fallback-2-provider\""), "blank row");
    assert!(!text.contains("id=\"fallback-3-provider\""));
    // Model suggestions: the price table's, and the Ollama server's.
    for model in [
        "gpt-4o-mini",
        "claude-3-haiku-20240307",
        "qwen2.5:7b",
        "text-embedding-3-small",
    ] {
        assert!(
            text.contains(&format!("<option value=\"{model}\"")),
            "{model}"
        );
    }
    assert!(!gw.fake.requests_to("/api/tags").is_empty());
}

#[tokio::test]
async fn saving_the_form_switches_the_provider_for_the_next_request() {
    let gw = Gateway::start().await;
    let (id, key) = gw.tenant(openai_settings()).await;
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "openai");

    let dash = Dash::sign_in(&gw, ADMIN_KEY).await;
    let settings = format!("/dashboard/tenants/{id}/settings");
    let answer = dash
        .post(
            &settings,
            &full_form(&[
                ("llm.provider", "anthropic"),
                ("llm.model", "claude-3-haiku-20240307"),
                ("llm.apiKey", TENANT_ANTHROPIC_KEY),
                ("llm.temperature", "0.5"),
                ("fallback[0].provider", "openai"),
                ("fallback[0].model", "gpt-4o-mini"),
                ("rateLimit.requestsPerMinute", "100"),
                ("cache.enabled", "true"),
                ("cache.ttlSeconds", "600"),
                ("budget.dailyUsd", "5"),
                ("costAlertThreshold", "2.5"),
            ]),
        )
        .await;
    assert_eq!(answer.status, 303, "{}", answer.text);
    assert_eq!(answer.header("location"), format!("{settings}?saved=1"));
    let page = dash.get(answer.header("location")).await;
    assert!(page.text.contains("id=\"saved\""), "{}", page.text);
    assert!(page.text.contains("Saved."));

    let stored = api_settings(&gw, &id).await;
    assert_eq!(
        stored,
        json!({
            "llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307",
                    "apiKey": "sk-t…2222", "temperature": 0.5},
            "fallback": [{"provider": "openai", "model": "gpt-4o-mini", "priority": 1}],
            "rateLimit": {"requestsPerMinute": 100},
            "cache": {"enabled": true, "ttlSeconds": 600},
            "budget": {"dailyUsd": 5.0},
            "costAlertThreshold": 2.5
        })
    );

    gw.fake.push(Reply::text("Bonjour"));
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("x-meta-chat-provider"), "anthropic");
    let sent = gw.fake.requests_to("/v1/messages");
    assert_eq!(
        sent.last().unwrap().header("x-api-key"),
        Some(TENANT_ANTHROPIC_KEY)
    );
    assert_eq!(
        sent.last().unwrap().body["model"],
        "claude-3-haiku-20240307"
    );

    // Saving again with the key field empty keeps the stored key; the fallback entry is
    // removed and the rate limit cleared.
    let answer = dash
        .post(
            &settings,
            &full_form(&[
                ("llm.provider", "anthropic"),
                ("llm.model", "claude-3-5-sonnet-20241022"),
                ("fallback[0].provider", "openai"),
                ("fallback[0].model", "gpt-4o-mini"),
                ("fallback[0].priority", "1"),
                ("fallback[0].remove", "1"),
                ("fallback[1].provider", "ollama"),
                ("fallback[1].model", "llama3.1:8b"),
                ("fallback[1].priority", "7"),
                ("fallback[1].baseUrl", "http://ollama.internal:11434"),
            ]),
        )
        .await;
    assert_eq!(answer.status, 303, "{}", answer.text);
    let stored = api_settings(&gw, &id).await;
    assert_eq!(stored["llm"]["apiKey"], "sk-t…2222");
    assert_eq!(stored["llm"]["model"], "claude-3-5-sonnet-20241022");
    assert_eq!(
        stored["fallback"],
        json!([{"provider": "ollama", "model": "llama3.1:8b", "priority": 7,
                "baseUrl": "http://ollama.internal:11434"}])
    );
    assert_eq!(stored["rateLimit"], json!({}));
    assert_eq!(stored["cache"], json!({"enabled": false}));
    // The emptied alert threshold turned the alert off.
    assert!(stored.get("costAlertThreshold").is_none(), "{stored}");
    gw.fake.push(Reply::text("Hi"));
    let answer = gw.chat(&key, &hello(json!({}))).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let sent = gw.fake.requests_to("/v1/messages");
    assert_eq!(
        sent.last().unwrap().header("x-api-key"),
        Some(TENANT_ANTHROPIC_KEY)
    );
}

#[tokio::test]
async fn fallback_rows_are_ordered_by_priority_and_keep_their_keys() {
    let gw = Gateway::start().await;
    let (id, _) = gw
        .tenant(json!({"fallback": [
            {"provider": "anthropic", "model": "claude-3-haiku-20240307", "priority": 1,
             "apiKey": TENANT_ANTHROPIC_KEY}
        ]}))
        .await;
    let dash = Dash::sign_in(&gw, ADMIN_KEY).await;
    let answer = dash
        .post(
            &format!("/dashboard/tenants/{id}/settings"),
            &full_form(&[
                ("fallback[0].provider", "anthropic"),
                ("fallback[0].model", "claude-3-haiku-20240307"),
                ("fallback[0].priority", "5"),
                ("fallback[1].provider", "openai"),
                ("fallback[1].model", "gpt-4o-mini"),
                ("fallback[1].priority", "2"),
                ("fallback[2].provider", "ollama"),
                ("fallback[2].model", "llama3.1:8b"),
            ]),
        )
        .await;
    assert_eq!(answer.status, 303, "{}", answer.text);
    let stored = api_settings(&gw, &id).await;
    assert_eq!(
        stored["fallback"],
        json!([
            {"provider": "openai", "model": "gpt-4o-mini", "priority": 2},
            {"provider": "anthropic", "model": "claude-3-haiku-20240307", "priority": 5,
             "apiKey": "sk-t…2222"},
            {"provider": "ollama", "model": "llama3.1:8b", "priority": 6}
        ])
    );
}

#[tokio::test]
async fn an_invalid_value_is_shown_next_to_its_field_and_nothing_is_stored() {
    let gw = Gateway::start().await;
    let (id, key) = gw.tenant(openai_settings()).await;
    let stored = api_settings(&gw, &id).await;
    let dash = Dash::sign_in(&gw, &key).await;
    let settings = format!("/dashboard/tenants/{id}/settings");
    for (field, value, message) in [
        ("llm.temperature", "5", "must be between 0 and 2"),
        ("llm.topP", "1.5", "must be between 0 and 1"),
        ("llm.maxTokens", "0", "must be at least 1"),
        ("llm.temperature", "hot", "invalid type"),
        ("llm.baseUrl", "ftp://example.com", "must be an http(s) URL"),
        ("rateLimit.requestsPerMinute", "0", "must be at least 1"),
        ("budget.dailyUsd", "-3", "positive"),
    ] {
        let page = dash
            .post(
                &settings,
                &full_form(&[
                    ("llm.provider", "anthropic"),
                    ("llm.model", "claude-3-haiku-20240307"),
                    ("llm.apiKey", "sk-ant-typed-but-not-saved"),
                    (field, value),
                ]),
            )
            .await;
        assert_eq!(page.status, 422, "{field}={value}: {}", page.text);
        let id_attr = field.replace('.', "-");
        let error_marker = format!("id=\"{id_attr}-error\"");
        let at = page
            .text
            .find(&error_marker)
            .unwrap_or_else(|| panic!("{field}: no inline error in {}", page.text));
        assert!(page.text[at..].contains(message), "{field}: {}", page.text);
        assert!(
            page.text.contains(&format!("Not saved: {field}:")),
            "{}",
            page.text
        );
        // The user's values are kept, the typed key is not echoed.
        assert!(page.text.contains("<option value=\"anthropic\" selected>"));
        assert!(
            page.text
                .contains(&format!("value=\"{}\"", value.replace('&', "&amp;")))
        );
        assert!(!page.text.contains("sk-ant-typed-but-not-saved"));
        assert_eq!(
            api_settings(&gw, &id).await,
            stored,
            "{field}: nothing stored"
        );
    }

    // An error in a fallback row is shown in that row.
    let page = dash
        .post(
            &settings,
            &full_form(&[
                ("fallback[0].provider", "openai"),
                ("fallback[0].baseUrl", "not a url"),
            ]),
        )
        .await;
    assert_eq!(page.status, 422);
    assert!(
        page.text.contains("id=\"fallback-0-baseUrl-error\""),
        "{}",
        page.text
    );
    let page = dash
        .post(&settings, &full_form(&[("fallback[0].model", "gpt-4o")]))
        .await;
    assert_eq!(page.status, 422);
    assert!(
        page.text.contains("id=\"fallback-0-provider-error\""),
        "{}",
        page.text
    );
    assert_eq!(api_settings(&gw, &id).await, stored);
}

#[tokio::test]
async fn the_test_prompt_form_shows_the_answer_latency_tokens_and_cost() {
    let gw = Gateway::start().await;
    let (id, key) = gw
        .tenant(
            json!({"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307",
                                "apiKey": TENANT_ANTHROPIC_KEY}}),
        )
        .await;
    let dash = Dash::sign_in(&gw, &key).await;
    let page = dash.get(&format!("/dashboard/tenants/{id}/settings")).await;
    assert!(
        page.text
            .contains("id=\"test-prompt\" type=\"text\" name=\"prompt\" value=\"What is 2+2?\""),
        "{}",
        page.text
    );

    gw.fake
        .push(Reply::text("Four <b>exactly</b>").with_usage(1000, 400));
    let page = dash
        .post(
            &format!("/dashboard/tenants/{id}/test"),
            &[("prompt", "What is 2+2?")],
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.text);
    assert!(
        page.text
            .contains("id=\"test-answer\">Four &lt;b&gt;exactly&lt;/b&gt;<"),
        "{}",
        page.text
    );
    assert!(
        page.text.contains("anthropic / claude-3-haiku-20240307"),
        "{}",
        page.text
    );
    assert!(page.text.contains("1000 in, 400 out"), "{}", page.text);
    // 1000 × $0.25 + 400 × $1.25 per million tokens.
    assert!(page.text.contains("$0.000750000"), "{}", page.text);
    assert!(page.text.contains(" ms<"), "{}", page.text);
    let sent = gw.fake.requests_to("/v1/messages");
    assert_eq!(
        sent.last().unwrap().header("x-api-key"),
        Some(TENANT_ANTHROPIC_KEY)
    );
    assert!(String::from_utf8_lossy(&sent.last().unwrap().raw).contains("What is 2+2?"));

    // An upstream failure is shown, escaped, without the key.
    gw.fake.push(Reply::error(500, "<boom> upstream"));
    let page = dash
        .post(
            &format!("/dashboard/tenants/{id}/test"),
            &[("prompt", "again")],
        )
        .await;
    assert_eq!(page.status, 200);
    assert!(page.text.contains("id=\"test-error\""), "{}", page.text);
    assert!(!page.text.contains("<boom>"));
    assert!(!page.text.contains(TENANT_ANTHROPIC_KEY));
}
