//! Two gateway replicas over one database (SQLite file, and PostgreSQL when
//! `TEST_DATABASE_URL` is set; required when `REQUIRE_SERVICES=1`): a tenant created, switched,
//! rotated or deleted through one replica is served accordingly by the other, without a
//! restart, through each replica's tenant cache.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meta_chat::bootstrap;
use meta_chat::config::Config;
use meta_chat_testkit::FakeServer;
use serde_json::{Value, json};

const ADMIN_KEY: &str = "admin-key-for-replica-tests-0123456789";
const ENCRYPTION_KEY: &str = "replica-tests-encryption-key-0123456789abcdef";

/// How long a change may take to reach the other replica before the test fails. The cache
/// polls every 500 ms; this only bounds a broken implementation.
const PATIENCE: Duration = Duration::from_secs(10);

struct Replica {
    base: String,
}

async fn start_replica(database_url: &str, fake: &FakeServer) -> Replica {
    let vars: BTreeMap<&str, String> = [
        ("DATABASE_URL", database_url.to_owned()),
        ("ADMIN_API_KEY", ADMIN_KEY.to_owned()),
        ("ENCRYPTION_KEY", ENCRYPTION_KEY.to_owned()),
        ("OPENAI_BASE_URL", fake.url()),
        ("ANTHROPIC_BASE_URL", fake.url()),
        ("OLLAMA_BASE_URL", fake.url()),
        ("OPENAI_API_KEY", "sk-system-openai-replicas".to_owned()),
        (
            "ANTHROPIC_API_KEY",
            "sk-system-anthropic-replicas".to_owned(),
        ),
        ("LLM_MAX_RETRIES", "0".to_owned()),
    ]
    .into_iter()
    .collect();
    let config = Config::from_lookup(|name| vars.get(name).cloned()).unwrap();
    let (state, _) = bootstrap::app_state(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, meta_chat::api::router(state))
            .await
            .unwrap();
    });
    Replica {
        base: format!("http://{addr}"),
    }
}

async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    key: &str,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut request = client.request(method, url).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

/// Sends a chat through `replica` and returns (status, provider header).
async fn chat(client: &reqwest::Client, replica: &Replica, key: &str) -> (u16, String) {
    let (status, headers, _) = call(
        client,
        reqwest::Method::POST,
        format!("{}/v1/chat/completions", replica.base),
        key,
        Some(json!({"messages": [{"role": "user", "content": "hi"}]})),
    )
    .await;
    let provider = headers
        .get("x-meta-chat-provider")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, provider)
}

/// Retries `check` until it holds or [`PATIENCE`] runs out.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn two_replicas_share_tenant_changes(database_url: &str) {
    meta_chat_llm::install_crypto_provider();
    let fake = FakeServer::start().await.unwrap();
    // Unscripted, the fake echoes: every chat gets an answer.
    let a = start_replica(database_url, &fake).await;
    let b = start_replica(database_url, &fake).await;
    let client = reqwest::Client::new();

    let (status, _, text) = call(
        &client,
        reqwest::Method::POST,
        format!("{}/api/tenants", a.base),
        ADMIN_KEY,
        Some(json!({"name": "acme", "settings": {"llm": {"provider": "openai", "model": "gpt-4o-mini"}}})),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let key = created["apiKey"].as_str().unwrap().to_owned();

    // Created on A, usable on B at once (a key B has not seen is looked up).
    assert_eq!(chat(&client, &b, &key).await, (200, "openai".to_owned()));

    // Switched on A: A serves the new provider on the very next request, B within a poll.
    let (status, _, text) = call(
        &client,
        reqwest::Method::PUT,
        format!("{}/api/tenants/{id}", a.base),
        ADMIN_KEY,
        Some(json!({"settings": {"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307"}}})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(chat(&client, &a, &key).await, (200, "anthropic".to_owned()));
    eventually("the provider switch on replica B", || async {
        chat(&client, &b, &key).await == (200, "anthropic".to_owned())
    })
    .await;

    // Rotated on A: the new key works on both at once, the old one stops on B within a poll.
    let (status, _, text) = call(
        &client,
        reqwest::Method::POST,
        format!("{}/api/tenants/{id}/rotate-key", a.base),
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let new_key = serde_json::from_str::<Value>(&text).unwrap()["apiKey"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(chat(&client, &a, &key).await.0, 401);
    assert_eq!(chat(&client, &b, &new_key).await.0, 200);
    eventually("the old key failing on replica B", || async {
        chat(&client, &b, &key).await.0 == 401
    })
    .await;

    // Deleted on A: the key stops working on A at once and on B within a poll.
    let (status, _, text) = call(
        &client,
        reqwest::Method::DELETE,
        format!("{}/api/tenants/{id}", a.base),
        ADMIN_KEY,
        None,
    )
    .await;
    assert!(status == 200 || status == 204, "{status}: {text}");
    assert_eq!(chat(&client, &a, &new_key).await.0, 401);
    eventually("the deletion on replica B", || async {
        chat(&client, &b, &new_key).await.0 == 401
    })
    .await;
}

#[tokio::test]
async fn replicas_on_one_sqlite_file_share_tenant_changes() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("shared.db").display());
    two_replicas_share_tenant_changes(&url).await;
}

#[tokio::test]
async fn replicas_on_one_postgres_database_share_tenant_changes() {
    let base = match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ if std::env::var("REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("REQUIRE_SERVICES=1 but TEST_DATABASE_URL is not set (PostgreSQL required)")
        }
        _ => {
            eprintln!("skipping PostgreSQL: TEST_DATABASE_URL not set");
            return;
        }
    };
    // A private schema, so the test sees only its own tenants.
    let schema = format!("mc_replicas_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(&admin)
        .await
        .unwrap();
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-csearch_path%3D{schema}");
    two_replicas_share_tenant_changes(&url).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(&admin)
    .await
    .unwrap();
}
