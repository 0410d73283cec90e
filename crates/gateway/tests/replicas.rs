//! Two gateway replicas over one database (SQLite file, and PostgreSQL when
//! `TEST_DATABASE_URL` is set; required when `REQUIRE_SERVICES=1`): a tenant created, switched,
//! rotated or deleted through one replica is served accordingly by the other, without a
//! restart, through each replica's tenant cache.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{Answer, PgSchema};
use meta_chat_testkit::FakeServer;
use reqwest::Method;
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
    let mut vars = vec![
        ("DATABASE_URL", database_url.to_owned()),
        ("ADMIN_API_KEY", ADMIN_KEY.to_owned()),
        ("ENCRYPTION_KEY", ENCRYPTION_KEY.to_owned()),
    ];
    vars.extend(common::upstream_vars(fake));
    vars.extend([
        ("OPENAI_API_KEY", "sk-system-openai-replicas".to_owned()),
        (
            "ANTHROPIC_API_KEY",
            "sk-system-anthropic-replicas".to_owned(),
        ),
        ("LLM_MAX_RETRIES", "0".to_owned()),
    ]);
    let (base, _) = common::serve(common::config(vars)).await;
    Replica { base }
}

/// Sends a request to `path` on `replica` as `key`.
async fn call(
    client: &reqwest::Client,
    replica: &Replica,
    method: Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> Answer {
    common::request(
        client,
        method,
        format!("{}{path}", replica.base),
        Some(key),
        body.map(|body| body.to_string()),
    )
    .await
}

/// Sends a chat through `replica` and returns (status, provider header).
async fn chat(client: &reqwest::Client, replica: &Replica, key: &str) -> (u16, String) {
    let answer = call(
        client,
        replica,
        Method::POST,
        "/v1/chat/completions",
        key,
        Some(json!({"messages": [{"role": "user", "content": "hi"}]})),
    )
    .await;
    let provider = answer
        .headers
        .get("x-meta-chat-provider")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (answer.status, provider)
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

    let (id, key) = call(
        &client,
        &a,
        Method::POST,
        "/api/tenants",
        ADMIN_KEY,
        Some(common::tenant_body(
            "acme",
            json!({"llm": {"provider": "openai", "model": "gpt-4o-mini"}}),
        )),
    )
    .await
    .created_tenant();

    // Created on A, usable on B at once (a key B has not seen is looked up).
    assert_eq!(chat(&client, &b, &key).await, (200, "openai".to_owned()));

    // Switched on A: A serves the new provider on the very next request, B within a poll.
    let answer = call(
        &client,
        &a,
        Method::PUT,
        &format!("/api/tenants/{id}"),
        ADMIN_KEY,
        Some(json!({"settings": {"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307"}}})),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(chat(&client, &a, &key).await, (200, "anthropic".to_owned()));
    eventually("the provider switch on replica B", || async {
        chat(&client, &b, &key).await == (200, "anthropic".to_owned())
    })
    .await;

    // Rotated on A: the new key works on both at once, the old one stops on B within a poll.
    let answer = call(
        &client,
        &a,
        Method::POST,
        &format!("/api/tenants/{id}/rotate-key"),
        ADMIN_KEY,
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let new_key = answer.json()["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(chat(&client, &a, &key).await.0, 401);
    assert_eq!(chat(&client, &b, &new_key).await.0, 200);
    eventually("the old key failing on replica B", || async {
        chat(&client, &b, &key).await.0 == 401
    })
    .await;

    // Deleted on A: the key stops working on A at once and on B within a poll.
    let answer = call(
        &client,
        &a,
        Method::DELETE,
        &format!("/api/tenants/{id}"),
        ADMIN_KEY,
        None,
    )
    .await;
    let status = answer.status;
    assert!(status == 200 || status == 204, "{status}: {}", answer.text);
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
    let Some(base) = common::test_database_url() else {
        return;
    };
    // A private schema, so the test sees only its own tenants.
    let schema = PgSchema::create(&base, "mc_replicas").await;
    two_replicas_share_tenant_changes(&schema.url()).await;
}
