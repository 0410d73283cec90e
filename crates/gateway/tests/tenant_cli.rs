//! `meta-chat tenant …`, `migrate` and `rotate-encryption-key` as real processes on a real
//! SQLite file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Output;

use common::contains;
use serde_json::Value;

const KEY_A: &str = "first-encryption-key-0123456789abcdef";
const KEY_B: &str = "second-encryption-key-0123456789abcdef";
const PROVIDER_KEY: &str = "sk-proj-SECRETSECRETSECRET1234abcd";

/// Runs the binary in `dir` on its `mc.db`; `vars` come after (and so override) that.
fn run(dir: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let database_url = format!("sqlite://{}", dir.join("mc.db").display());
    common::std_command(dir, &[("DATABASE_URL", database_url)])
        .envs(vars.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

fn json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn database_bytes(dir: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for name in ["mc.db", "mc.db-wal"] {
        if let Ok(content) = std::fs::read(dir.join(name)) {
            bytes.extend(content);
        }
    }
    bytes
}

#[test]
fn create_show_list_and_rotate_a_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let settings = format!(
        r#"{{"llm": {{"provider": "openai", "model": "gpt-4o-mini", "apiKey": "{PROVIDER_KEY}"}}}}"#
    );
    let created = json(&run(
        dir.path(),
        &[
            "tenant",
            "create",
            "--name",
            "Acme",
            "--settings",
            &settings,
        ],
        &[],
    ));
    let id = created["id"].as_str().unwrap().to_owned();
    let api_key = created["apiKey"].as_str().unwrap().to_owned();
    assert!(
        api_key.starts_with("mc_") && api_key.len() >= 40,
        "{api_key}"
    );
    assert_eq!(created["name"], "Acme");
    assert_eq!(created["settings"]["llm"]["apiKey"], "sk-p…abcd");

    // The key file was generated beside the database, readable by the owner only.
    let key_file = dir.path().join("mc.db.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // Neither the provider key nor the tenant key is in the database in clear.
    let raw = database_bytes(dir.path());
    assert!(!contains(&raw, PROVIDER_KEY));
    assert!(!contains(&raw, &api_key));

    let shown = json(&run(dir.path(), &["tenant", "show", &id], &[]));
    assert_eq!(shown["settings"]["llm"]["model"], "gpt-4o-mini");
    assert_eq!(shown["settings"]["llm"]["apiKey"], "sk-p…abcd");
    assert!(shown.get("apiKey").is_none());

    let listed = json(&run(dir.path(), &["tenant", "list"], &[]));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());

    let rotated = json(&run(dir.path(), &["tenant", "rotate-key", &id], &[]));
    let new_key = rotated["apiKey"].as_str().unwrap();
    assert_ne!(new_key, api_key);
    assert!(new_key.starts_with("mc_"));
}

#[test]
fn invalid_settings_name_the_field_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (settings, field) in [
        (r#"{"llm": {"temperature": 3}}"#, "llm.temperature"),
        (r#"{"llm": {"provider": "gemini"}}"#, "llm.provider"),
        (
            r#"{"rateLimit": {"requestsPerMinute": 0}}"#,
            "rateLimit.requestsPerMinute",
        ),
        (r#"{"llm": "#, "--settings"),
    ] {
        let output = run(
            dir.path(),
            &["tenant", "create", "--name", "Bad", "--settings", settings],
            &[],
        );
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(field), "{stderr}");
    }
    let listed = json(&run(dir.path(), &["tenant", "list"], &[]));
    assert_eq!(listed, serde_json::json!([]));
}

#[test]
fn unknown_tenants_and_bad_variables_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(dir.path(), &["tenant", "show", "nope"], &[]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("tenant not found"));

    let output = run(
        dir.path(),
        &["tenant", "list"],
        &[("ENCRYPTION_KEY", "short")],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ENCRYPTION_KEY"), "{stderr}");
    assert!(!stderr.contains("short\""), "{stderr}");

    let output = run(
        dir.path(),
        &["migrate"],
        &[("DATABASE_URL", "postgres://127.0.0.1:1/x")],
    );
    assert_eq!(
        output.status.code(),
        Some(2),
        "PostgreSQL without ENCRYPTION_KEY must not start"
    );
}

#[test]
fn migrate_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let output = run(dir.path(), &["migrate"], &[]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(dir.path().join("mc.db").exists());
}

#[test]
fn rotate_encryption_key_moves_every_secret_to_the_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let settings = format!(
        r#"{{"llm": {{"provider": "anthropic", "apiKey": "{PROVIDER_KEY}"}},
             "fallback": [{{"provider": "openai", "apiKey": "sk-fallback-key-0000000000wxyz", "priority": 2}}]}}"#
    );
    let created = json(&run(
        dir.path(),
        &[
            "tenant",
            "create",
            "--name",
            "Rotating",
            "--settings",
            &settings,
        ],
        &[("ENCRYPTION_KEY", KEY_A)],
    ));
    let id = created["id"].as_str().unwrap().to_owned();

    // The new key alone cannot read secrets written under the old one.
    let output = run(
        dir.path(),
        &["tenant", "show", &id],
        &[("ENCRYPTION_KEY", KEY_B)],
    );
    assert!(!output.status.success());

    // Rotation needs both keys.
    let output = run(
        dir.path(),
        &["rotate-encryption-key"],
        &[("ENCRYPTION_KEY", KEY_B)],
    );
    assert_eq!(output.status.code(), Some(2));

    let output = run(
        dir.path(),
        &["rotate-encryption-key"],
        &[
            ("ENCRYPTION_KEY", KEY_B),
            ("ENCRYPTION_KEY_PREVIOUS", KEY_A),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("re-encrypted 2 secret(s)"));

    let shown = json(&run(
        dir.path(),
        &["tenant", "show", &id],
        &[("ENCRYPTION_KEY", KEY_B)],
    ));
    assert_eq!(shown["settings"]["llm"]["apiKey"], "sk-p…abcd");
    assert_eq!(shown["settings"]["fallback"][0]["apiKey"], "sk-f…wxyz");
    let output = run(
        dir.path(),
        &["tenant", "show", &id],
        &[("ENCRYPTION_KEY", KEY_A)],
    );
    assert!(
        !output.status.success(),
        "the old key must no longer read the secrets"
    );
}
