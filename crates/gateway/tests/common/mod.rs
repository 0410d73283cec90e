//! Harness shared by the integration tests (each includes it with `mod common;`): an
//! in-process gateway in front of the fake upstream server, whole HTTP answers, tenants
//! created through `POST /api/tenants`, a private PostgreSQL schema from `TEST_DATABASE_URL`,
//! and the real `meta-chat` binary as a child process.
//!
//! Not every test file uses every item, hence `dead_code` is allowed here.

#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod dashboard;
pub mod usage;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use meta_chat::api::AppState;
use meta_chat::bootstrap;
use meta_chat::config::Config;
use meta_chat_testkit::FakeServer;
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::process::{Child, Command};

pub const ADMIN_KEY: &str = "admin-key-for-tests-0123456789abcdef";
pub const SYSTEM_OPENAI_KEY: &str = "sk-system-openai-0000";
pub const SYSTEM_ANTHROPIC_KEY: &str = "sk-system-anthropic-0000";
pub const TENANT_OPENAI_KEY: &str = "sk-tenant-openai-1111";
pub const TENANT_ANTHROPIC_KEY: &str = "sk-tenant-anthropic-2222";

// ---------------------------------------------------------------------------------------------
// The gateway in this process.

/// A `Config` read from `vars` alone, never from the process environment. A later entry for
/// the same name overrides an earlier one.
pub fn config<'a>(vars: impl IntoIterator<Item = (&'a str, String)>) -> Config {
    let vars: BTreeMap<&str, String> = vars.into_iter().collect();
    Config::from_lookup(|name| vars.get(name).cloned()).unwrap()
}

/// Serves the gateway built from `config` on an ephemeral loopback port, in this process.
/// Returns its base URL and the admin key generated at start-up (when `ADMIN_API_KEY` was not
/// set and none was stored).
pub async fn serve(config: Config) -> (String, Option<String>) {
    let (base, _, generated) = serve_state(config).await;
    (base, generated)
}

/// As [`serve`], also returning the gateway's [`AppState`] (its store, usage recorder, …).
pub async fn serve_state(config: Config) -> (String, AppState, Option<String>) {
    serve_state_with_clock(config, Arc::new(meta_chat::limits::SystemClock)).await
}

/// As [`serve_state`], with the rate limiter and budgets reading `clock` (a
/// [`meta_chat::limits::ManualClock`] lets a test move time).
pub async fn serve_state_with_clock(
    config: Config,
    clock: Arc<dyn meta_chat::limits::Clock>,
) -> (String, AppState, Option<String>) {
    let (state, admin_key) = bootstrap::app_state_with_clock(config, clock)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = meta_chat::api::router(state.clone());
    tokio::spawn(async move {
        meta_chat::server::serve(listener, router, std::future::pending())
            .await
            .unwrap();
    });
    (format!("http://{addr}"), state, admin_key.generated)
}

/// The variables that send every provider (OpenAI, Anthropic, Ollama) to `fake`.
pub fn upstream_vars(fake: &FakeServer) -> [(&'static str, String); 3] {
    [
        ("OPENAI_BASE_URL", fake.url()),
        ("ANTHROPIC_BASE_URL", fake.url()),
        ("OLLAMA_BASE_URL", fake.url()),
    ]
}

/// A gateway in front of a fake upstream, on real loopback sockets, over a fresh SQLite file.
pub struct Gateway {
    pub base: String,
    pub client: reqwest::Client,
    pub fake: FakeServer,
    /// The in-process gateway's state: its store and usage recorder, for example.
    pub state: AppState,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts a gateway with the system keys above, no retries and a 5 s timeout.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// As [`Gateway::start`]; `extra` come after (and so override) the defaults.
    pub async fn start_with(extra: &[(&str, &str)]) -> Self {
        Self::start_with_clock(extra, Arc::new(meta_chat::limits::SystemClock)).await
    }

    /// As [`Gateway::start_with`], with the limiter reading `clock`.
    pub async fn start_with_clock(
        extra: &[(&str, &str)],
        clock: Arc<dyn meta_chat::limits::Clock>,
    ) -> Self {
        meta_chat_llm::install_crypto_provider();
        let fake = FakeServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut vars = vec![
            (
                "DATABASE_URL",
                format!("sqlite://{}", dir.path().join("t.db").display()),
            ),
            ("ADMIN_API_KEY", ADMIN_KEY.to_owned()),
        ];
        vars.extend(upstream_vars(&fake));
        vars.extend([
            ("OPENAI_API_KEY", SYSTEM_OPENAI_KEY.to_owned()),
            ("ANTHROPIC_API_KEY", SYSTEM_ANTHROPIC_KEY.to_owned()),
            ("LLM_MAX_RETRIES", "0".to_owned()),
            ("LLM_TIMEOUT", "5000".to_owned()),
        ]);
        vars.extend(
            extra
                .iter()
                .map(|(name, value)| (*name, (*value).to_owned())),
        );
        let (base, state, _) = serve_state_with_clock(config(vars), clock).await;
        Self {
            base,
            client: reqwest::Client::new(),
            fake,
            state,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request and reads the whole answer.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<String>,
    ) -> Answer {
        request(&self.client, method, self.url(path), key, body).await
    }

    pub async fn chat(&self, key: &str, body: &Value) -> Answer {
        self.send(
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(key),
            Some(body.to_string()),
        )
        .await
    }

    /// Creates a tenant named "t" as admin; returns (id, tenant key).
    pub async fn tenant(&self, settings: Value) -> (String, String) {
        self.tenant_named("t", settings).await
    }

    /// Creates a tenant as admin; returns (id, tenant key).
    pub async fn tenant_named(&self, name: &str, settings: Value) -> (String, String) {
        self.send(
            reqwest::Method::POST,
            "/api/tenants",
            Some(ADMIN_KEY),
            Some(tenant_body(name, settings).to_string()),
        )
        .await
        .created_tenant()
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and answers.

/// One answer, read whole.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Answer {
    /// Reads `response` whole.
    pub async fn read(response: reqwest::Response) -> Self {
        Self {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            text: response.text().await.unwrap(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("{} answer is not JSON ({e}): {}", self.status, self.text))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header: {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    /// The (id, tenant key) of the answer to a tenant creation, which must be a 201.
    pub fn created_tenant(&self) -> (String, String) {
        assert_eq!(self.status, 201, "{}", self.text);
        let body = self.json();
        (
            body["id"].as_str().unwrap().to_owned(),
            body["apiKey"].as_str().unwrap().to_owned(),
        )
    }
}

/// Sends a request (with `key` as a bearer token, `body` as JSON) and reads the whole answer.
pub async fn request(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    key: Option<&str>,
    body: Option<String>,
) -> Answer {
    let mut request = client.request(method, url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    Answer::read(request.send().await.unwrap()).await
}

/// The body of `POST /api/tenants`.
pub fn tenant_body(name: &str, settings: Value) -> Value {
    json!({"name": name, "settings": settings})
}

/// A one-message chat request ("hello there"), with `extra` fields merged in.
pub fn hello(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": "hello there"}]});
    if let (Value::Object(map), Value::Object(more)) = (&mut body, extra) {
        map.extend(more);
    }
    body
}

/// The `data:` payloads of an SSE body.
pub fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| event.trim().strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: impl AsRef<[u8]>) -> bool {
    let needle = needle.as_ref();
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL.

/// `TEST_DATABASE_URL`, or `None` (PostgreSQL skipped, saying so) unless `REQUIRE_SERVICES=1`,
/// which makes a missing URL a failure.
pub fn test_database_url() -> Option<String> {
    match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("REQUIRE_SERVICES=1 but TEST_DATABASE_URL is not set (PostgreSQL required)")
        }
        _ => {
            eprintln!("skipping PostgreSQL: TEST_DATABASE_URL not set");
            None
        }
    }
}

/// `TEST_REDIS_URL`, or `None` (Redis skipped, saying so) unless `REQUIRE_SERVICES=1`, which
/// makes a missing URL a failure.
pub fn test_redis_url() -> Option<String> {
    match std::env::var("TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("REQUIRE_SERVICES=1 but TEST_REDIS_URL is not set (Redis required)")
        }
        _ => {
            eprintln!("skipping Redis: TEST_REDIS_URL not set");
            None
        }
    }
}

/// A `REDIS_KEY_PREFIX` private to one test, so tests sharing a Redis never see each other's
/// keys.
pub fn redis_prefix(test: &str) -> String {
    format!("mc-test:{test}:{}:", uuid::Uuid::new_v4().simple())
}

/// Variables choosing where limits and the cache live: none (in process), or Redis and a key
/// prefix.
pub type Backend<'a> = &'a [(&'a str, &'a str)];

/// Two tests of `$body` (an `async fn(Backend)`): `$memory` in process, `$redis` on Redis
/// (passing, with a printed reason, when `TEST_REDIS_URL` is not set and `REQUIRE_SERVICES` is
/// not `1`), with the variables `$name = $value` after `REDIS_URL` and `REDIS_KEY_PREFIX`.
///
/// Test binaries without such tests leave it unused, which `dead_code` does not cover for a
/// macro and its re-export: hence the two `allow`s.
#[allow(unused_macros)]
macro_rules! in_process_and_on_redis {
    ($body:ident: $memory:ident, $redis:ident $(, $name:literal = $value:literal)* $(,)?) => {
        #[tokio::test]
        async fn $memory() {
            $body(&[]).await;
        }

        #[tokio::test]
        async fn $redis() {
            let Some(url) = $crate::common::test_redis_url() else {
                return;
            };
            let prefix = $crate::common::redis_prefix(stringify!($redis));
            $body(&[
                ("REDIS_URL", url.as_str()),
                ("REDIS_KEY_PREFIX", prefix.as_str()),
                $(($name, $value),)*
            ])
            .await;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use in_process_and_on_redis;

/// A PostgreSQL schema private to one test, so tests run in parallel without seeing each
/// other's rows; dropped when the test ends, also when it fails.
pub struct PgSchema {
    base_url: String,
    name: String,
}

impl PgSchema {
    /// Creates a schema named `{prefix}_<random>` in the database at `base_url`.
    pub async fn create(base_url: &str, prefix: &str) -> Self {
        let admin = sqlx::PgPool::connect(base_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to TEST_DATABASE_URL: {e}"));
        let schema = Self {
            base_url: base_url.to_owned(),
            name: format!("{prefix}_{}", uuid::Uuid::new_v4().simple()),
        };
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA \"{}\"",
            schema.name
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
        schema
    }

    /// The database URL with this schema as the search path.
    pub fn url(&self) -> String {
        let separator = if self.base_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{separator}options=-csearch_path%3D{}",
            self.base_url, self.name
        )
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let base_url = self.base_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread with
        // its own runtime. That runtime stays blocked meanwhile, so a gateway of the test
        // can be halfway through a transaction it will never finish (its usage writer, say)
        // while holding locks in the schema: such sessions are ended first, and the drop
        // waits for locks at most a second per attempt.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                use sqlx::Connection;
                let mut admin = sqlx::PgConnection::connect(&base_url).await.unwrap();
                sqlx::query("SET lock_timeout = '1s'")
                    .execute(&mut admin)
                    .await
                    .unwrap();
                let drop_sql = format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE");
                let mut attempts = 0;
                loop {
                    sqlx::query(
                        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l \
                         JOIN pg_class c ON c.oid = l.relation \
                         JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE n.nspname = $1 AND l.pid <> pg_backend_pid()",
                    )
                    .bind(&name)
                    .execute(&mut admin)
                    .await
                    .unwrap();
                    match sqlx::query(sqlx::AssertSqlSafe(drop_sql.clone()))
                        .execute(&mut admin)
                        .await
                    {
                        Ok(_) => break,
                        Err(error) if attempts < 10 => {
                            attempts += 1;
                            eprintln!("dropping test schema {name}: {error}; again");
                        }
                        Err(error) => panic!("cannot drop test schema {name}: {error}"),
                    }
                }
                admin.close().await.unwrap();
            });
        });
        if cleanup.join().is_err() && !std::thread::panicking() {
            panic!("could not drop test schema {}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary.

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `meta-chat` binary, run in `dir` (so no other `.env` is read) with only `PATH` and
/// `vars` in its environment, its output piped; blocking.
pub fn std_command<V: AsRef<OsStr>>(dir: &Path, vars: &[(&str, V)]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_meta-chat"));
    command
        .current_dir(dir)
        .env_clear()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    for (name, value) in vars {
        command.env(name, value);
    }
    command
}

/// [`std_command`] for tokio, killed when dropped.
pub fn command<V: AsRef<OsStr>>(dir: &Path, vars: &[(&str, V)]) -> Command {
    let mut command = Command::from(std_command(dir, vars));
    command.kill_on_drop(true);
    command
}

/// Reads `out` line by line (bytes that are not UTF-8 kept lossily), handing each line to
/// `seen`, up to the server's "listening on" line. False when the output ends before it.
pub async fn read_until_listening(
    out: &mut (impl AsyncBufRead + Unpin),
    mut seen: impl FnMut(String),
) -> bool {
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        if out.read_until(b'\n', &mut buffer).await.unwrap() == 0 {
            return false;
        }
        let line = String::from_utf8_lossy(&buffer)
            .trim_end_matches(['\r', '\n'])
            .to_owned();
        let done = line.contains("listening on");
        seen(line);
        if done {
            return true;
        }
    }
}

/// Starts `meta-chat serve` as [`command`] does and waits up to 30 s for it to listen;
/// returns it with the lines it printed until then.
pub async fn serve_until_listening<V: AsRef<OsStr>>(
    dir: &Path,
    vars: &[(&str, V)],
) -> (Child, Vec<String>) {
    let mut child = command(dir, vars).spawn().unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut printed = Vec::new();
    let listening = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        read_until_listening(&mut out, |line| printed.push(line)),
    )
    .await
    .expect("the server did not start within 30 s");
    assert!(listening, "the server exited before listening: {printed:?}");
    (child, printed)
}

/// Sends SIGTERM to `child`.
pub fn sigterm(child: &Child) {
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
}
