//! `meta-chat serve` as a real process: start-up on the embedded defaults, the operational
//! endpoints, the admin key printed once, and a clean exit on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{command, free_port};
use tokio::process::Child;

/// Starts the server and returns it with the lines it printed up to "listening".
async fn start(dir: &Path, port: u16) -> (Child, Vec<String>) {
    common::serve_until_listening(dir, &[("BIND_ADDR", format!("127.0.0.1:{port}"))]).await
}

async fn stop(mut child: Child) -> std::process::ExitStatus {
    common::sigterm(&child);
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the server did not stop within 10 s of SIGTERM")
        .unwrap()
}

#[tokio::test]
async fn serves_on_the_embedded_defaults_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (child, printed) = start(dir.path(), port).await;
    let admin_lines: Vec<_> = printed
        .iter()
        .filter(|l| l.contains("admin API key"))
        .collect();
    assert_eq!(admin_lines.len(), 1, "{printed:?}");
    let admin_key = admin_lines[0].rsplit(' ').next().unwrap().to_owned();
    assert!(admin_key.starts_with("mc_"), "{admin_key}");
    // SQLite file and key file beside it, created on first start.
    assert!(dir.path().join("meta-chat.db").exists());
    assert!(dir.path().join("meta-chat.db.key").exists());

    meta_chat_llm::install_crypto_provider();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready: serde_json::Value = client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["database"], "sqlite");
    let missing = client
        .get(format!("{base}/no/such/route"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(body["error"]["type"], "not_found_error");

    let status = stop(child).await;
    assert!(status.success(), "{status:?}");

    // A second start reuses the stored admin key: nothing is printed.
    let (child, printed) = start(dir.path(), port).await;
    assert!(
        !printed.iter().any(|l| l.contains("admin API key")),
        "{printed:?}"
    );
    assert!(stop(child).await.success());
}

#[tokio::test]
async fn bad_configuration_stops_start_up_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    for (vars, variable) in [
        (vec![("BIND_ADDR", "nowhere".to_owned())], "BIND_ADDR"),
        (
            vec![("DATABASE_URL", "postgres://127.0.0.1:1/x".to_owned())],
            "ENCRYPTION_KEY",
        ),
        (
            vec![("LLM_MAX_RETRIES", "many".to_owned())],
            "LLM_MAX_RETRIES",
        ),
    ] {
        let output = command(dir.path(), &vars).output().await.unwrap();
        assert_eq!(output.status.code(), Some(2), "{vars:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{stderr}");
    }
}

#[tokio::test]
async fn a_port_in_use_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let output = command(dir.path(), &[("BIND_ADDR", format!("127.0.0.1:{port}"))])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("BIND_ADDR"));
}
