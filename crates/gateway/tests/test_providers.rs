//! `meta-chat test-providers` against the fake upstreams, run as a real process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Output;

use meta_chat_testkit::{FakeServer, Reply};

/// Runs the binary in an empty working folder (so no `.env` is read) with only `vars` set.
async fn run(args: &[&str], vars: &[(&str, String)]) -> Output {
    let dir = std::env::temp_dir().join(format!("meta-chat-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    common::command(&dir, vars)
        .arg("test-providers")
        .args(args)
        .output()
        .await
        .unwrap()
}

fn all_fake(fake: &FakeServer) -> Vec<(&'static str, String)> {
    vec![
        ("OPENAI_API_KEY", "sk-fake".into()),
        ("OPENAI_BASE_URL", format!("{}/v1", fake.url())),
        ("ANTHROPIC_API_KEY", "sk-ant-fake".into()),
        ("ANTHROPIC_BASE_URL", fake.url()),
        ("OLLAMA_BASE_URL", fake.url()),
        ("LLM_MAX_RETRIES", "0".into()),
    ]
}

#[tokio::test]
async fn calls_every_configured_provider_and_prints_answer_latency_tokens_and_cost() {
    let fake = FakeServer::start().await.unwrap();
    fake.push_all([
        Reply::text("4").with_usage(1000, 500),
        Reply::text("Four.").with_usage(12, 3),
        Reply::text("2+2 is 4").with_usage(20, 6),
    ]);
    let vars = [
        all_fake(&fake),
        vec![("OPENAI_MODEL", "gpt-4o-mini".to_owned())],
    ]
    .concat();
    let output = run(&[], &vars).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("✓ openai (gpt-4o-mini)"), "{stdout}");
    assert!(stdout.contains("answer:  4"), "{stdout}");
    assert!(stdout.contains("tokens:  1000 in, 500 out"), "{stdout}");
    assert!(stdout.contains("cost:    $0.000450000"), "{stdout}");
    assert!(
        stdout.contains("✓ anthropic (claude-3-5-sonnet-20241022)"),
        "{stdout}"
    );
    assert!(stdout.contains("answer:  Four."), "{stdout}");
    assert!(stdout.contains("✓ ollama (llama3.1:8b)"), "{stdout}");
    assert!(stdout.contains("cost:    $0.000000000"), "{stdout}");
    assert!(stdout.contains("latency:"), "{stdout}");
    let prompts: Vec<_> = fake
        .requests()
        .iter()
        .map(|r| r.raw.clone())
        .filter(|raw| String::from_utf8_lossy(raw).contains("What is 2+2?"))
        .collect();
    assert_eq!(prompts.len(), 3);
}

#[tokio::test]
async fn one_provider_and_a_custom_prompt() {
    let fake = FakeServer::start().await.unwrap();
    let output = run(
        &["--provider", "ollama", "--prompt", "Say hi"],
        &all_fake(&fake),
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("You said: Say hi"), "{stdout}");
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn unconfigured_providers_are_named_with_the_missing_variable() {
    let fake = FakeServer::start().await.unwrap();
    let output = run(&[], &[("OLLAMA_BASE_URL", fake.url())]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("openai (gpt-4o): not configured (set OPENAI_API_KEY)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "anthropic (claude-3-5-sonnet-20241022): not configured (set ANTHROPIC_API_KEY)"
        ),
        "{stdout}"
    );

    let output = run(&["--provider", "anthropic"], &[]).await;
    assert!(!output.status.success());
}

#[tokio::test]
async fn an_unreachable_ollama_says_how_to_start_it() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let output = run(
        &["--provider", "ollama"],
        &[
            ("OLLAMA_BASE_URL", format!("http://127.0.0.1:{port}")),
            ("LLM_MAX_RETRIES", "0".into()),
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(
        stdout.contains(&format!("http://127.0.0.1:{port}")),
        "{stdout}"
    );
    assert!(stdout.contains("ollama serve"), "{stdout}");
}

#[tokio::test]
async fn a_bad_variable_stops_with_its_name() {
    let output = run(&[], &[("LLM_TEMPERATURE", "hot".into())]).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("LLM_TEMPERATURE"));
}

#[tokio::test]
async fn an_upstream_error_is_reported_and_fails_the_run() {
    let fake = FakeServer::start().await.unwrap();
    fake.push(Reply::error(401, "Incorrect API key provided"));
    let output = run(&["--provider", "openai"], &all_fake(&fake)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(stdout.contains("✗ openai"), "{stdout}");
    assert!(stdout.contains("check the openai API key"), "{stdout}");
    assert!(
        !stdout.contains("sk-fake"),
        "the key must never be printed: {stdout}"
    );
}
