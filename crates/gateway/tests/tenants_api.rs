//! `/api/tenants` over a real socket (SPEC §4.1, §4.2): who may do what, what is stored and
//! shown, how bad input is answered, and that no provider key ever leaves in clear — not in a
//! response body and not in the SQLite file. Also `bootstrap::ensure_admin_key`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::sync::Mutex;

use common::{ADMIN_KEY, contains};
use meta_chat::bootstrap;
use meta_chat::config::Config;
use meta_chat::crypto::hash_api_key;
use reqwest::Method;
use serde_json::{Value, json};

const OPENAI_KEY: &str = "sk-proj-SECRETSECRETSECRET1234abcd";
const OPENAI_MASK: &str = "sk-p…abcd";
const ANTHROPIC_KEY: &str = "sk-ant-SECRETANTHROPICKEY0000wxyz";
const ANTHROPIC_MASK: &str = "sk-a…wxyz";
const EMBEDDINGS_KEY: &str = "sk-emb-SECRETEMBEDDINGSKEY00009876";
/// Every provider key the tests send: none may ever come back or be stored in clear.
const SECRETS: [&str; 3] = [OPENAI_KEY, ANTHROPIC_KEY, EMBEDDINGS_KEY];
const MAX_BODY_BYTES: usize = 2048;

/// A gateway on an ephemeral port over a fresh SQLite file, recording every response body.
struct Server {
    base: String,
    client: reqwest::Client,
    dir: tempfile::TempDir,
    bodies: Mutex<Vec<String>>,
    /// The admin key generated at start-up, when `ADMIN_API_KEY` was not set.
    generated_admin_key: Option<String>,
}

/// The configuration of a gateway over `dir`'s SQLite file; `vars` come after (and so
/// override) the defaults.
fn config(dir: &std::path::Path, vars: &[(&str, &str)]) -> Config {
    let defaults = [
        (
            "DATABASE_URL",
            format!("sqlite://{}", dir.join("t.db").display()),
        ),
        ("MAX_BODY_BYTES", MAX_BODY_BYTES.to_string()),
    ];
    common::config(
        defaults.into_iter().chain(
            vars.iter()
                .map(|(name, value)| (*name, (*value).to_owned())),
        ),
    )
}

impl Server {
    async fn start() -> Self {
        Self::start_with(&[("ADMIN_API_KEY", ADMIN_KEY)]).await
    }

    async fn start_with(vars: &[(&str, &str)]) -> Self {
        meta_chat_llm::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let (base, generated_admin_key) = common::serve(config(dir.path(), vars)).await;
        Self {
            base,
            client: reqwest::Client::new(),
            dir,
            bodies: Mutex::new(Vec::new()),
            generated_admin_key,
        }
    }

    /// Sends a request; the answer must be JSON (or empty, for 204).
    async fn send(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<String>,
    ) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        request = match auth {
            Auth::None => request,
            Auth::Bearer(key) => request.bearer_auth(key),
            Auth::XApiKey(key) => request.header("x-api-key", key),
            Auth::Raw(value) => request.header("authorization", value),
        };
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        self.bodies.lock().unwrap().push(text.clone());
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{status} answer is not JSON ({e}): {text}"))
        };
        (status, value)
    }

    async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        self.send(Method::GET, path, Auth::Bearer(key), None).await
    }

    async fn post(&self, path: &str, key: &str, body: &Value) -> (u16, Value) {
        self.send(
            Method::POST,
            path,
            Auth::Bearer(key),
            Some(body.to_string()),
        )
        .await
    }

    async fn put(&self, path: &str, key: &str, body: &Value) -> (u16, Value) {
        self.send(Method::PUT, path, Auth::Bearer(key), Some(body.to_string()))
            .await
    }

    async fn delete(&self, path: &str, key: &str) -> (u16, Value) {
        self.send(Method::DELETE, path, Auth::Bearer(key), None)
            .await
    }

    /// Creates a tenant as admin; returns (id, tenant key, answer).
    async fn create(&self, name: &str, settings: Value) -> (String, String, Value) {
        let (status, body) = self
            .post(
                "/api/tenants",
                ADMIN_KEY,
                &json!({"name": name, "settings": settings}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let id = body["id"].as_str().unwrap().to_owned();
        let key = body["apiKey"].as_str().unwrap().to_owned();
        (id, key, body)
    }

    /// The tenant as the admin sees it, which must not change after a rejected request.
    async fn snapshot(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/tenants/{id}"), ADMIN_KEY).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// No response so far, and no byte of the database files, holds a provider key in clear.
    fn assert_no_secret_leaked(&self) {
        for body in self.bodies.lock().unwrap().iter() {
            for secret in SECRETS {
                assert!(!body.contains(secret), "a response holds a secret: {body}");
            }
        }
        let files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().contains("t.db"))
            .collect();
        assert!(files.iter().any(|p| p.ends_with("t.db")), "{files:?}");
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            for secret in SECRETS {
                assert!(
                    !contains(&bytes, secret.as_bytes()),
                    "{} holds a secret in clear",
                    file.display()
                );
                // Not even the distinctive middle of it.
                assert!(!contains(&bytes, &secret.as_bytes()[7..20]));
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
    XApiKey(&'a str),
    Raw(&'a str),
}

fn time(value: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(value.as_str().unwrap()).unwrap()
}

/// Asserts an error answer in the OpenAI envelope.
fn assert_error(answer: &(u16, Value), status: u16, code: &str) {
    let (got, body) = answer;
    assert_eq!(*got, status, "{body}");
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].as_str().is_some(), "{body}");
    assert!(error.get("param").is_some(), "{body}");
}

fn openai_settings() -> Value {
    json!({
        "llm": {"provider": "openai", "model": "gpt-4o-mini", "apiKey": OPENAI_KEY,
                "temperature": 0.3, "maxTokens": 500},
        "embeddings": {"provider": "openai", "apiKey": EMBEDDINGS_KEY},
        "rateLimit": {"requestsPerMinute": 10, "tokensPerDay": 100_000},
        "cache": {"enabled": true, "ttlSeconds": 3600}
    })
}

#[tokio::test]
async fn tenant_lifecycle_create_list_show_update_rotate_delete() {
    let server = Server::start().await;

    // Create: 201, the key shown once, provider keys masked.
    let (id, key, created) = server.create("Acme", openai_settings()).await;
    assert!(key.starts_with("mc_"), "{key}");
    assert_eq!(created["name"], "Acme");
    assert_eq!(created["settings"]["llm"]["apiKey"], OPENAI_MASK);
    assert_eq!(created["settings"]["llm"]["model"], "gpt-4o-mini");
    assert_eq!(created["settings"]["rateLimit"]["requestsPerMinute"], 10);
    assert!(created["createdAt"].is_string() && created["updatedAt"].is_string());

    // List and show: the tenant, masked, and never its API key again.
    let (status, list) = server.get("/api/tenants", ADMIN_KEY).await;
    assert_eq!(status, 200, "{list}");
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], id.as_str());
    assert!(data[0].get("apiKey").is_none());
    assert_eq!(data[0]["settings"]["llm"]["apiKey"], OPENAI_MASK);
    let shown = server.snapshot(&id).await;
    assert!(shown.get("apiKey").is_none(), "{shown}");
    assert_eq!(shown["settings"], created["settings"]);
    let (status, own) = server.get(&format!("/api/tenants/{id}"), &key).await;
    assert_eq!((status, &own), (200, &shown));

    // Switch openai → anthropic without a key: persisted, the OpenAI key dropped (it must
    // never be sent to Anthropic), other sections kept.
    let path = format!("/api/tenants/{id}");
    let (status, updated) = server
        .put(
            &path,
            ADMIN_KEY,
            &json!({"settings": {"llm": {"provider": "anthropic", "model": "claude-3-haiku-20240307"}}}),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    let shown = server.snapshot(&id).await;
    assert_eq!(shown, updated);
    assert_eq!(shown["settings"]["llm"]["provider"], "anthropic");
    assert_eq!(shown["settings"]["llm"]["model"], "claude-3-haiku-20240307");
    assert!(shown["settings"]["llm"].get("apiKey").is_none(), "{shown}");
    // The `llm` section was replaced as a whole: its old temperature is gone.
    assert!(
        shown["settings"]["llm"].get("temperature").is_none(),
        "{shown}"
    );
    assert_eq!(
        shown["settings"]["cache"],
        json!({"enabled": true, "ttlSeconds": 3600})
    );
    assert_eq!(shown["settings"]["rateLimit"]["tokensPerDay"], 100_000);
    assert_eq!(shown["settings"]["embeddings"]["apiKey"], "sk-e…9876");
    assert!(time(&shown["updatedAt"]) > time(&created["updatedAt"]));

    // A section given as null is removed; the others stay.
    let (status, updated) = server
        .put(
            &path,
            ADMIN_KEY,
            &json!({"settings": {"cache": null, "costAlertThreshold": null}}),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert!(updated["settings"].get("cache").is_none(), "{updated}");
    assert!(
        updated["settings"].get("costAlertThreshold").is_none(),
        "{updated}"
    );
    assert_eq!(updated["settings"]["rateLimit"]["tokensPerDay"], 100_000);
    assert_eq!(server.snapshot(&id).await, updated);

    // The tenant itself sets a new provider key: shown masked, the new one.
    let (status, updated) = server
        .put(
            &path,
            &key,
            &json!({"settings": {"llm": {"provider": "anthropic", "apiKey": ANTHROPIC_KEY}}}),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["settings"]["llm"]["apiKey"], ANTHROPIC_MASK);
    assert_eq!(
        server.snapshot(&id).await["settings"]["llm"]["apiKey"],
        ANTHROPIC_MASK
    );

    // Rotate with the tenant's own key: the old key stops working, the new one works.
    let (status, rotated) = server
        .send(
            Method::POST,
            &format!("{path}/rotate-key"),
            Auth::Bearer(&key),
            None,
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let new_key = rotated["apiKey"].as_str().unwrap().to_owned();
    assert!(new_key.starts_with("mc_") && new_key != key);
    assert_eq!(rotated["id"], id.as_str());
    assert_eq!(rotated["settings"]["llm"]["apiKey"], ANTHROPIC_MASK);
    assert_error(&server.get(&path, &key).await, 401, "invalid_api_key");
    assert_eq!(server.get(&path, &new_key).await.0, 200);

    // The admin rotates too.
    let (status, rotated) = server
        .send(
            Method::POST,
            &format!("{path}/rotate-key"),
            Auth::Bearer(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    assert_error(&server.get(&path, &new_key).await, 401, "invalid_api_key");
    let newest_key = rotated["apiKey"].as_str().unwrap().to_owned();
    assert_eq!(server.get(&path, &newest_key).await.0, 200);

    // Delete: 204, then 404 for the admin and 401 for the tenant's key.
    let (status, body) = server.delete(&path, ADMIN_KEY).await;
    assert_eq!((status, body), (204, Value::Null));
    assert_error(&server.get(&path, ADMIN_KEY).await, 404, "tenant_not_found");
    assert_error(
        &server.get(&path, &newest_key).await,
        401,
        "invalid_api_key",
    );
    assert_error(
        &server.delete(&path, ADMIN_KEY).await,
        404,
        "tenant_not_found",
    );
    let (_, list) = server.get("/api/tenants", ADMIN_KEY).await;
    assert_eq!(list["data"], json!([]));

    server.assert_no_secret_leaked();
}

#[tokio::test]
async fn a_tenant_key_touches_only_its_own_tenant() {
    let server = Server::start().await;
    let (a, key_a, _) = server.create("A", openai_settings()).await;
    let (b, key_b, _) = server.create("B", json!({})).await;
    let b_before = server.snapshot(&b).await;
    let path_b = format!("/api/tenants/{b}");

    assert_error(&server.get(&path_b, &key_a).await, 403, "forbidden");
    let change = json!({"settings": {"cache": {"enabled": true}}});
    assert_error(
        &server.put(&path_b, &key_a, &change).await,
        403,
        "forbidden",
    );
    // Access is checked before the body is read: junk gets 403, not 400.
    let junk = server
        .send(
            Method::PUT,
            &path_b,
            Auth::Bearer(&key_a),
            Some("{nope".into()),
        )
        .await;
    assert_error(&junk, 403, "forbidden");
    let rotate = server
        .send(
            Method::POST,
            &format!("{path_b}/rotate-key"),
            Auth::Bearer(&key_a),
            None,
        )
        .await;
    assert_error(&rotate, 403, "forbidden");
    assert_error(&server.delete(&path_b, &key_a).await, 403, "admin_required");
    // An id that does not exist is 403 too: a tenant key cannot probe for tenants.
    assert_error(
        &server.get("/api/tenants/no-such-tenant", &key_a).await,
        403,
        "forbidden",
    );
    assert_eq!(server.snapshot(&b).await, b_before);
    assert_eq!(server.get(&path_b, &key_b).await.0, 200);

    // A reads and changes itself, but cannot delete itself.
    let path_a = format!("/api/tenants/{a}");
    assert_eq!(server.get(&path_a, &key_a).await.0, 200);
    assert_eq!(server.put(&path_a, &key_a, &change).await.0, 200);
    assert_error(&server.delete(&path_a, &key_a).await, 403, "admin_required");

    // Tenant keys cannot list or create, whatever the body.
    assert_error(
        &server.get("/api/tenants", &key_a).await,
        403,
        "admin_required",
    );
    let create = server
        .post("/api/tenants", &key_a, &json!({"name": "Sneaky"}))
        .await;
    assert_error(&create, 403, "admin_required");
    let create = server
        .send(
            Method::POST,
            "/api/tenants",
            Auth::Bearer(&key_b),
            Some("{".into()),
        )
        .await;
    assert_error(&create, 403, "admin_required");
    let (_, list) = server.get("/api/tenants", ADMIN_KEY).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);

    server.assert_no_secret_leaked();
}

#[tokio::test]
async fn missing_and_wrong_keys_are_401_and_x_api_key_works() {
    let server = Server::start().await;
    let (id, key, _) = server.create("A", openai_settings()).await;
    let path = format!("/api/tenants/{id}");

    let missing = server
        .send(Method::GET, "/api/tenants", Auth::None, None)
        .await;
    assert_error(&missing, 401, "missing_api_key");
    assert_eq!(missing.1["error"]["type"], "authentication_error");
    let basic = server
        .send(
            Method::GET,
            &path,
            Auth::Raw("Basic YWRtaW46YWRtaW4="),
            None,
        )
        .await;
    assert_error(&basic, 401, "missing_api_key");
    let empty = server
        .send(Method::GET, &path, Auth::Raw("Bearer "), None)
        .await;
    assert_error(&empty, 401, "missing_api_key");

    let wrong_key = "mc_thisIsNotAKeyOfAnyoneButLooksLikeOne000000";
    let wrong = server.get(&path, wrong_key).await;
    assert_error(&wrong, 401, "invalid_api_key");
    assert!(!wrong.1.to_string().contains(wrong_key));
    let almost_admin = format!("{ADMIN_KEY}x");
    assert_error(
        &server.get("/api/tenants", &almost_admin).await,
        401,
        "invalid_api_key",
    );
    let wrong_x = server
        .send(Method::GET, &path, Auth::XApiKey(wrong_key), None)
        .await;
    assert_error(&wrong_x, 401, "invalid_api_key");
    // Writes without a valid key change nothing and create nothing.
    let before = server.snapshot(&id).await;
    let put = server
        .send(
            Method::PUT,
            &path,
            Auth::None,
            Some(json!({"settings": {"cache": {"enabled": false}}}).to_string()),
        )
        .await;
    assert_error(&put, 401, "missing_api_key");
    assert_error(
        &server
            .post("/api/tenants", wrong_key, &json!({"name": "x"}))
            .await,
        401,
        "invalid_api_key",
    );
    assert_eq!(server.snapshot(&id).await, before);

    // `x-api-key` (Anthropic style) is accepted for the admin and for tenants.
    let admin_x = server
        .send(Method::GET, "/api/tenants", Auth::XApiKey(ADMIN_KEY), None)
        .await;
    assert_eq!(admin_x.0, 200, "{}", admin_x.1);
    let tenant_x = server
        .send(Method::GET, &path, Auth::XApiKey(&key), None)
        .await;
    assert_eq!(tenant_x.0, 200, "{}", tenant_x.1);

    server.assert_no_secret_leaked();
}

#[tokio::test]
async fn bad_input_is_rejected_in_the_envelope_and_changes_nothing() {
    let server = Server::start().await;
    let (id, key, _) = server.create("A", openai_settings()).await;
    let path = format!("/api/tenants/{id}");
    let before = server.snapshot(&id).await;

    let raw = |body: &str| Some(body.to_owned());
    let cases: Vec<(Option<String>, u16, &str, Option<&str>)> = vec![
        (raw("{\"settings\": {\"llm\": "), 400, "invalid_json", None),
        (raw("not json"), 400, "invalid_json", None),
        (raw(""), 400, "invalid_json", None),
        (raw("[]"), 400, "invalid_json", None),
        (
            raw(r#"{"settings": {"llm": {"temperature": 3}}}"#),
            422,
            "invalid_settings",
            Some("llm.temperature"),
        ),
        (
            raw(r#"{"settings": {"llm": {"provider": "mistral", "apiKey": "sk-x"}}}"#),
            422,
            "invalid_settings",
            Some("llm.provider"),
        ),
        (
            raw(r#"{"settings": {"llm": {"topP": 1.5}}}"#),
            422,
            "invalid_settings",
            Some("llm.topP"),
        ),
        (
            raw(r#"{"settings": {"rateLimit": {"requestsPerMinute": 0}}}"#),
            422,
            "invalid_settings",
            Some("rateLimit.requestsPerMinute"),
        ),
        (
            raw(r#"{"settings": {"llm": {"baseUrl": "ftp://x"}}}"#),
            422,
            "invalid_settings",
            Some("llm.baseUrl"),
        ),
        (
            raw(r#"{"settings": {"llm": {"maxTokens": "sk-proj-SECRETSECRETSECRET1234abcd"}}}"#),
            422,
            "invalid_settings",
            Some("llm.maxTokens"),
        ),
        (
            raw(r#"{"settings": 5}"#),
            422,
            "invalid_settings",
            Some("settings"),
        ),
        (raw(r#"{}"#), 422, "invalid_field", Some("settings")),
        (
            raw(r#"{"llm": {"temperature": 0.5}}"#),
            422,
            "invalid_field",
            Some("llm"),
        ),
    ];
    for (body, status, code, param) in cases {
        for caller in [ADMIN_KEY, key.as_str()] {
            let answer = server
                .send(Method::PUT, &path, Auth::Bearer(caller), body.clone())
                .await;
            assert_error(&answer, status, code);
            assert_eq!(answer.1["error"]["param"].as_str(), param, "{}", answer.1);
            assert_eq!(answer.1["error"]["type"], "invalid_request_error");
            assert_eq!(
                server.snapshot(&id).await,
                before,
                "{body:?} changed the tenant"
            );
        }
    }

    // Over MAX_BODY_BYTES: 413 in the envelope, nothing changed.
    let padding = "x".repeat(MAX_BODY_BYTES);
    let big = json!({"settings": {"llm": {"model": padding}}});
    assert_error(
        &server.put(&path, ADMIN_KEY, &big).await,
        413,
        "request_too_large",
    );
    assert_eq!(server.snapshot(&id).await, before);
    let big = json!({"name": padding});
    assert_error(
        &server.post("/api/tenants", ADMIN_KEY, &big).await,
        413,
        "request_too_large",
    );

    // Creation: bad names and settings, and nothing is created.
    let create_cases: Vec<(Value, u16, &str, &str)> = vec![
        (json!({"name": 5}), 422, "invalid_field", "name"),
        (json!({"name": null}), 422, "invalid_field", "name"),
        (json!({}), 422, "invalid_field", "name"),
        (json!({"name": "  "}), 422, "invalid_name", "name"),
        (
            json!({"name": "x".repeat(201)}),
            422,
            "invalid_name",
            "name",
        ),
        (
            json!({"name": "B", "sttings": {}}),
            422,
            "invalid_field",
            "sttings",
        ),
        (
            json!({"name": "B", "settings": {"llm": {"temperature": 3}}}),
            422,
            "invalid_settings",
            "llm.temperature",
        ),
        (
            json!({"name": "B", "settings": {"llm": {"provider": "nope"}}}),
            422,
            "invalid_settings",
            "llm.provider",
        ),
        (
            json!({"name": "B", "settings": {"embeddings": {"provider": "anthropic"}}}),
            422,
            "invalid_settings",
            "embeddings.provider",
        ),
    ];
    for (body, status, code, param) in create_cases {
        let answer = server.post("/api/tenants", ADMIN_KEY, &body).await;
        assert_error(&answer, status, code);
        assert_eq!(answer.1["error"]["param"], param, "{}", answer.1);
    }
    let malformed = server
        .send(
            Method::POST,
            "/api/tenants",
            Auth::Bearer(ADMIN_KEY),
            Some("{\"name\"".into()),
        )
        .await;
    assert_error(&malformed, 400, "invalid_json");
    let (_, list) = server.get("/api/tenants", ADMIN_KEY).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(server.snapshot(&id).await, before);

    server.assert_no_secret_leaked();
}

#[tokio::test]
async fn unknown_routes_ids_and_methods_answer_in_the_envelope() {
    let server = Server::start().await;
    assert_error(&server.get("/api/nope", ADMIN_KEY).await, 404, "not_found");
    assert_error(
        &server.get("/api/tenants/no-such-tenant", ADMIN_KEY).await,
        404,
        "tenant_not_found",
    );
    let put = server
        .put(
            "/api/tenants/no-such-tenant",
            ADMIN_KEY,
            &json!({"settings": {}}),
        )
        .await;
    assert_error(&put, 404, "tenant_not_found");
    let rotate = server
        .send(
            Method::POST,
            "/api/tenants/no-such-tenant/rotate-key",
            Auth::Bearer(ADMIN_KEY),
            None,
        )
        .await;
    assert_error(&rotate, 404, "tenant_not_found");
    for (method, path) in [
        (Method::PATCH, "/api/tenants"),
        (Method::DELETE, "/api/tenants"),
        (Method::POST, "/api/tenants/x"),
        (Method::GET, "/api/tenants/x/rotate-key"),
    ] {
        let answer = server
            .send(method.clone(), path, Auth::Bearer(ADMIN_KEY), None)
            .await;
        assert_error(&answer, 405, "method_not_allowed");
    }
    let response = reqwest::Client::new()
        .patch(format!("{}/api/tenants", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let allow = response.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
}

#[tokio::test]
async fn a_generated_admin_key_is_printed_once_and_works() {
    let server = Server::start_with(&[]).await;
    let admin = server.generated_admin_key.clone().unwrap();
    assert!(admin.starts_with("mc_"));
    assert_eq!(server.get("/api/tenants", &admin).await.0, 200);
    assert_error(
        &server.get("/api/tenants", ADMIN_KEY).await,
        401,
        "invalid_api_key",
    );
}

#[tokio::test]
async fn ensure_admin_key_prefers_the_environment_and_stores_only_a_hash() {
    let dir = tempfile::tempdir().unwrap();
    let with_env = config(dir.path(), &[("ADMIN_API_KEY", ADMIN_KEY)]);
    let store = bootstrap::open_store(&with_env).await.unwrap();

    let key = bootstrap::ensure_admin_key(store.as_ref(), &with_env)
        .await
        .unwrap();
    assert_eq!(key.hash, hash_api_key(ADMIN_KEY));
    assert!(key.generated.is_none());
    assert_eq!(
        store.admin_key_hash().await.unwrap(),
        Some(hash_api_key(ADMIN_KEY))
    );
    assert!(!format!("{key:?}").contains(ADMIN_KEY));

    // Without the variable the stored hash is used; nothing is generated.
    let without = config(dir.path(), &[]);
    let key = bootstrap::ensure_admin_key(store.as_ref(), &without)
        .await
        .unwrap();
    assert_eq!(key.hash, hash_api_key(ADMIN_KEY));
    assert!(key.generated.is_none());

    // A different variable replaces the stored hash.
    let other = "another-admin-key-0123456789abcdef";
    let changed = config(dir.path(), &[("ADMIN_API_KEY", other)]);
    let key = bootstrap::ensure_admin_key(store.as_ref(), &changed)
        .await
        .unwrap();
    assert_eq!(key.hash, hash_api_key(other));
    assert_eq!(
        store.admin_key_hash().await.unwrap(),
        Some(hash_api_key(other))
    );

    drop(store);
    let bytes = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect::<Vec<_>>()
        .concat();
    assert!(!contains(&bytes, ADMIN_KEY.as_bytes()));
    assert!(!contains(&bytes, other.as_bytes()));
}

#[tokio::test]
async fn ensure_admin_key_generates_once_then_reuses_the_stored_hash() {
    let dir = tempfile::tempdir().unwrap();
    let without = config(dir.path(), &[]);
    let store = bootstrap::open_store(&without).await.unwrap();

    let first = bootstrap::ensure_admin_key(store.as_ref(), &without)
        .await
        .unwrap();
    let generated = first.generated.clone().unwrap();
    assert!(generated.starts_with("mc_"));
    assert_eq!(first.hash, hash_api_key(&generated));
    assert_eq!(
        store.admin_key_hash().await.unwrap(),
        Some(first.hash.clone())
    );
    assert!(!format!("{first:?}").contains(&generated));

    let second = bootstrap::ensure_admin_key(store.as_ref(), &without)
        .await
        .unwrap();
    assert!(second.generated.is_none());
    assert_eq!(second.hash, first.hash);
}
