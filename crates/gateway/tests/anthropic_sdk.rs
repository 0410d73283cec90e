//! The gateway's Anthropic-compatible API (issue 6) driven by the official Anthropic SDK for
//! Python, as a user would point it at the gateway (`anthropic.Anthropic(base_url=…,
//! api_key=…)`): `messages.create`, `messages.stream`, tool use with a `tool_result` follow-up
//! and `messages.count_tokens` for tenants on OpenAI, Anthropic and Ollama behind the fake
//! upstream server, and the SDK's exception classes for the gateway's errors.
//!
//! The SDK is installed once per target directory (`python3 -m venv`, then `pip install
//! anthropic`) under `CARGO_TARGET_TMPDIR`, and reused. Without Python, `venv` or PyPI the
//! tests pass with a printed reason, unless `REQUIRE_SERVICES=1`, which makes them fail.
//!
//! Each test runs one Python process that makes its SDK calls in order and prints what it got
//! as one JSON line; the replies of the fake upstream are queued beforehand in the same order.
//! The SDK sends `api_key` as `Authorization: Bearer` (current versions) or `x-api-key`
//! (older ones); `auth_token` is always a bearer token. Retries are off (`max_retries=0`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use common::Gateway;
use meta_chat_testkit::{FakeToolCall, Reply};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// The SDK.

/// Marks a virtual environment whose `pip install` finished.
const READY: &str = "meta-chat-ready";

/// How long one Python script may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// The virtual environment's Python, or why there is none; set up once for every test of this
/// binary.
static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Runs `command`, failing with its output when it does not succeed.
fn run(command: &mut std::process::Command) -> Result<String, String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{command:?} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `…/anthropic-venv` under the target's temporary directory, with the SDK installed.
///
/// Another test process may be installing at the same time, so the environment is built
/// under a name of its own and renamed into place once complete (a venv's Python finds its
/// packages relative to itself, so it survives the move); whoever renames second uses the
/// winner's.
fn install() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = root.join("anthropic-venv");
    let python = venv.join("bin").join("python");
    if usable(&venv) {
        return Ok(python);
    }
    std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let staging = root.join(format!("anthropic-venv.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let result = (|| {
        run(std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&staging))?;
        let staged_python = staging.join("bin").join("python");
        run(std::process::Command::new(&staged_python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "anthropic",
        ]))?;
        let version = run(std::process::Command::new(&staged_python)
            .args(["-c", "import anthropic; print(anthropic.__version__)"]))?;
        std::fs::write(staging.join(READY), &version).map_err(|e| e.to_string())?;
        eprintln!("installed the Anthropic SDK for Python {version}");
        Ok::<_, String>(())
    })();
    if let Err(why) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(why);
    }
    if std::fs::rename(&staging, &venv).is_err() {
        if usable(&venv) {
            // Another process finished first.
            let _ = std::fs::remove_dir_all(&staging);
        } else {
            // What is there was left by an interrupted run, or its base Python went away:
            // replace it.
            let _ = std::fs::remove_dir_all(&venv);
            std::fs::rename(&staging, &venv).map_err(|e| format!("{}: {e}", venv.display()))?;
        }
    }
    Ok(python)
}

/// Whether `venv` is complete and its Python still imports the SDK.
fn usable(venv: &Path) -> bool {
    venv.join(READY).exists()
        && run(std::process::Command::new(venv.join("bin").join("python"))
            .args(["-c", "import anthropic"]))
        .is_ok()
}

/// The SDK's Python; `None` (the test passes, saying why) when it cannot be installed, a
/// failure under `REQUIRE_SERVICES=1`.
async fn sdk_python() -> Option<PathBuf> {
    let python = tokio::task::spawn_blocking(|| PYTHON.get_or_init(install).clone())
        .await
        .unwrap();
    match python {
        Ok(python) => Some(python),
        Err(why) if std::env::var("REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("REQUIRE_SERVICES=1 but the Anthropic SDK for Python is not available: {why}")
        }
        Err(why) => {
            eprintln!("skipping: the Anthropic SDK for Python is not available: {why}");
            None
        }
    }
}

/// The script the tests run: `python -c SCRIPT '{"step": …}'` with `GATEWAY_BASE` set. It
/// prints one JSON object; each SDK call is `{"ok": …}` or `{"error": …}` in it.
const SCRIPT: &str = r#"
import json, os, sys

import anthropic
from anthropic.types import TextBlock, ToolUseBlock

config = json.loads(sys.argv[1])
base = os.environ["GATEWAY_BASE"]

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
}
ASK = {"role": "user", "content": "What's the weather in Paris?"}
HELLO = [{"role": "user", "content": "hello there"}]


def client(key, bearer=False):
    if bearer:
        return anthropic.Anthropic(base_url=base, auth_token=key, max_retries=0, timeout=30)
    return anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=30)


def block(b):
    out = b.model_dump(mode="json", exclude_none=True)
    out["class"] = type(b).__name__
    out["is_text_block"] = isinstance(b, TextBlock)
    out["is_tool_use_block"] = isinstance(b, ToolUseBlock)
    return out


def message(m):
    return {
        "class": type(m).__name__,
        "id": m.id,
        "type": m.type,
        "role": m.role,
        "model": m.model,
        "content": [block(b) for b in m.content],
        "stop_reason": m.stop_reason,
        "usage": {"input_tokens": m.usage.input_tokens, "output_tokens": m.usage.output_tokens},
    }


CLASSES = [
    "AuthenticationError", "PermissionDeniedError", "BadRequestError", "RateLimitError",
    "InternalServerError", "APIStatusError", "APIError",
]


def error(e):
    out = {"class": type(e).__name__, "message": str(e),
           "is": [name for name in CLASSES if isinstance(e, getattr(anthropic, name))]}
    if isinstance(e, anthropic.APIStatusError):
        out["status"] = e.status_code
        out["body"] = e.body
        out["retry_after"] = e.response.headers.get("retry-after")
    return out


def attempt(call):
    try:
        return {"ok": call()}
    except Exception as e:
        return {"error": error(e)}


def conversation(key):
    c = client(key)
    out = {"version": anthropic.__version__}
    out["create"] = attempt(lambda: message(c.messages.create(
        model="default", max_tokens=256, system="Be brief.", messages=HELLO)))

    def stream():
        with c.messages.stream(model="default", max_tokens=256, messages=HELLO) as s:
            chunks = list(s.text_stream)
            final = s.get_final_message()
        return {"chunks": chunks, "text": "".join(chunks), "final": message(final)}
    out["stream"] = attempt(stream)

    def tools():
        first = c.messages.create(model="default", max_tokens=256, messages=[ASK],
                                  tools=[WEATHER], tool_choice={"type": "auto"})
        results = [{"type": "tool_result", "tool_use_id": b.id, "content": "18°C and sunny"}
                   for b in first.content if isinstance(b, ToolUseBlock)]
        second = c.messages.create(
            model="default", max_tokens=256, tools=[WEATHER],
            messages=[ASK, {"role": "assistant", "content": first.content},
                      {"role": "user", "content": results}])
        return {"first": message(first), "second": message(second)}
    out["tools"] = attempt(tools)

    def tool_stream():
        with c.messages.stream(model="default", max_tokens=256, messages=[ASK],
                               tools=[WEATHER]) as s:
            return message(s.get_final_message())
    out["tool_stream"] = attempt(tool_stream)

    out["bearer"] = attempt(lambda: message(client(key, bearer=True).messages.create(
        model="default", max_tokens=64, messages=HELLO)))
    out["count_tokens"] = attempt(lambda: c.messages.count_tokens(
        model="default", system="Be brief.", messages=HELLO).input_tokens)
    return out


def errors(keys):
    c = client(keys["ok"])
    create = lambda c, **kw: message(c.messages.create(
        model="default", max_tokens=64, **{"messages": HELLO, **kw}))
    out = {}
    out["bad_key"] = attempt(lambda: create(client("mc_not_a_key")))
    out["bad_token"] = attempt(lambda: create(client("mc_not_a_key", bearer=True)))
    out["bad_block"] = attempt(lambda: create(c, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}}]}]))
    # Through extra_body: not every SDK version has a `temperature` argument.
    out["bad_temperature"] = attempt(lambda: create(c, extra_body={"temperature": 1.5}))
    limited = client(keys["limited"])
    out["limited_first"] = attempt(lambda: create(limited))
    out["limited_second"] = attempt(lambda: create(limited))
    out["upstream_failure"] = attempt(lambda: create(c))

    def broken_stream():
        with c.messages.stream(model="default", max_tokens=64, messages=HELLO) as s:
            return "".join(s.text_stream)
    out["broken_stream"] = attempt(broken_stream)
    return out


step = config["step"]
if step == "conversation":
    result = conversation(config["key"])
elif step == "errors":
    result = errors(config["keys"])
else:
    raise SystemExit(f"unknown step {step}")
print(json.dumps(result, default=str))
"#;

/// Runs [`SCRIPT`] with `config` against `gw`; its JSON output.
async fn run_script(python: &Path, gw: &Gateway, config: &Value) -> Value {
    let mut command = tokio::process::Command::new(python);
    command
        .arg("-c")
        .arg(SCRIPT)
        .arg(config.to_string())
        // Nothing of this environment (proxies, ANTHROPIC_* variables) reaches the SDK.
        .env_clear()
        .env("GATEWAY_BASE", &gw.base)
        .env("PYTHONIOENCODING", "utf-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("the SDK script took longer than {SCRIPT_TIMEOUT:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the SDK script failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let line = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no output; stderr:\n{stderr}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"))
}

/// The value of a call that must have succeeded.
fn ok<'a>(result: &'a Value, call: &str) -> &'a Value {
    result[call]
        .get("ok")
        .unwrap_or_else(|| panic!("{call} failed: {:#}", result[call]))
}

/// The error of a call that must have failed.
fn err<'a>(result: &'a Value, call: &str) -> &'a Value {
    result[call]
        .get("error")
        .unwrap_or_else(|| panic!("{call} did not fail: {:#}", result[call]))
}

// ---------------------------------------------------------------------------------------------
// Create, stream, tool use and token counting for each provider.

/// One provider behind a tenant.
struct Case {
    provider: &'static str,
    model: &'static str,
    /// The upstream chat path on the fake server.
    path: &'static str,
}

const STREAMED: &str = "The answer is four, as two and two make four.";

fn weather_input() -> Value {
    json!({"city": "Paris", "unit": "celsius"})
}

/// The `(tool call id, content)` of the tool result the provider received in its own
/// dialect (Ollama's carries no id).
fn tool_result_sent(case: &Case, sent: &Value) -> (Option<String>, String) {
    let turns = sent["messages"].as_array().unwrap();
    match case.provider {
        "anthropic" => {
            let block = &turns[2]["content"][0];
            assert_eq!(block["type"], "tool_result", "{sent}");
            (
                block["tool_use_id"].as_str().map(str::to_owned),
                block["content"].as_str().unwrap().to_owned(),
            )
        }
        _ => {
            assert_eq!(turns[2]["role"], "tool", "{sent}");
            (
                turns[2]["tool_call_id"].as_str().map(str::to_owned),
                turns[2]["content"].as_str().unwrap().to_owned(),
            )
        }
    }
}

/// The SDK's create, stream, tool use (blocking and streamed), bearer token and token count
/// through a tenant on `case`.
async fn conversation(case: Case) {
    let Some(python) = sdk_python().await else {
        return;
    };
    let gw = Gateway::start().await;
    let (_, key) = gw
        .tenant_named(
            case.provider,
            json!({"llm": {"provider": case.provider, "model": case.model}}),
        )
        .await;
    let call = || FakeToolCall::new("toolu_sdk_1", "get_weather", weather_input());
    gw.fake.push_all([
        Reply::text("Four.").with_usage(10, 2),
        Reply::text(STREAMED).with_usage(7, 5).in_chunks(5),
        Reply::text_and_tool_calls("Let me check.", vec![call()]).with_usage(20, 8),
        Reply::text("It is 18°C and sunny in Paris.").with_usage(30, 9),
        Reply::tool_calls(vec![call()])
            .with_usage(20, 8)
            .in_chunks(3),
        Reply::text("Bearer works.").with_usage(3, 2),
    ]);
    let result = run_script(&python, &gw, &json!({"step": "conversation", "key": key})).await;
    let provider = case.provider;
    eprintln!("anthropic SDK {} ({provider})", result["version"]);

    // messages.create
    let created = ok(&result, "create");
    assert_eq!(created["class"], "Message", "{created:#}");
    assert!(
        created["id"].as_str().unwrap().starts_with("msg_"),
        "{created:#}"
    );
    assert_eq!(created["type"], "message");
    assert_eq!(created["role"], "assistant");
    assert_eq!(created["model"], case.model, "{provider}");
    assert_eq!(created["stop_reason"], "end_turn");
    assert_eq!(
        created["content"].as_array().unwrap().len(),
        1,
        "{created:#}"
    );
    let text = &created["content"][0];
    assert_eq!(text["class"], "TextBlock", "{created:#}");
    assert_eq!(text["is_text_block"], true);
    assert_eq!(text["text"], "Four.");
    assert_eq!(
        created["usage"],
        json!({"input_tokens": 10, "output_tokens": 2})
    );
    let sent = gw.fake.requests_to(case.path);
    assert_eq!(sent.len(), 6, "{provider}: {sent:#?}");
    let system = match provider {
        "anthropic" => sent[0].body["system"].clone(),
        _ => sent[0].body["messages"][0].clone(),
    };
    assert!(system.to_string().contains("Be brief."), "{}", sent[0].body);

    // messages.stream
    let streamed = ok(&result, "stream");
    assert_eq!(streamed["text"], STREAMED, "{provider}: {streamed:#}");
    assert!(
        streamed["chunks"].as_array().unwrap().len() > 1,
        "{streamed:#}"
    );
    let last = &streamed["final"];
    assert_eq!(last["content"][0]["text"], STREAMED, "{last:#}");
    assert_eq!(last["stop_reason"], "end_turn");
    assert_eq!(last["model"], case.model);
    assert_eq!(
        last["usage"],
        json!({"input_tokens": 7, "output_tokens": 5}),
        "{provider}"
    );
    assert_eq!(sent[1].body["stream"], true);

    // Tool use, then the tool's result.
    let tools = ok(&result, "tools");
    let first = &tools["first"];
    assert_eq!(first["stop_reason"], "tool_use", "{first:#}");
    let blocks = first["content"].as_array().unwrap();
    let classes: Vec<&str> = blocks
        .iter()
        .map(|b| b["class"].as_str().unwrap())
        .collect();
    assert_eq!(classes, ["TextBlock", "ToolUseBlock"], "{first:#}");
    assert_eq!(blocks[0]["text"], "Let me check.");
    let tool_use = &blocks[1];
    assert_eq!(tool_use["is_tool_use_block"], true);
    assert_eq!(tool_use["name"], "get_weather");
    assert_eq!(tool_use["input"], weather_input(), "{first:#}");
    let id = tool_use["id"].as_str().unwrap();
    if provider != "ollama" {
        assert_eq!(id, "toolu_sdk_1");
    }
    let second = &tools["second"];
    assert_eq!(
        second["content"][0]["text"], "It is 18°C and sunny in Paris.",
        "{second:#}"
    );
    assert_eq!(second["stop_reason"], "end_turn");
    let (sent_id, sent_content) = tool_result_sent(&case, &sent[3].body);
    assert_eq!(sent_content, "18°C and sunny", "{}", sent[3].body);
    if provider == "ollama" {
        assert_eq!(sent[3].body["messages"][2]["tool_name"], "get_weather");
    } else {
        assert_eq!(sent_id.as_deref(), Some(id), "{}", sent[3].body);
    }

    // A streamed tool call: the SDK assembles the input from its input_json_deltas.
    let final_message = ok(&result, "tool_stream");
    assert_eq!(
        final_message["stop_reason"], "tool_use",
        "{final_message:#}"
    );
    let blocks = final_message["content"].as_array().unwrap();
    assert_eq!(blocks.len(), 1, "{final_message:#}");
    assert_eq!(blocks[0]["class"], "ToolUseBlock");
    assert_eq!(blocks[0]["name"], "get_weather");
    assert_eq!(blocks[0]["input"], weather_input(), "{final_message:#}");
    assert_eq!(
        final_message["usage"],
        json!({"input_tokens": 20, "output_tokens": 8})
    );

    // auth_token= (always a bearer token).
    let bearer = ok(&result, "bearer");
    assert_eq!(bearer["content"][0]["text"], "Bearer works.");

    // "Be brief." and "hello there": 3 + 3 tokens at ~4 characters a token.
    assert_eq!(*ok(&result, "count_tokens"), json!(6));
}

#[tokio::test]
async fn the_sdk_through_an_openai_tenant() {
    conversation(Case {
        provider: "openai",
        model: "gpt-4o-mini",
        path: "/v1/chat/completions",
    })
    .await;
}

#[tokio::test]
async fn the_sdk_through_an_anthropic_tenant() {
    conversation(Case {
        provider: "anthropic",
        model: "claude-3-haiku-20240307",
        path: "/v1/messages",
    })
    .await;
}

#[tokio::test]
async fn the_sdk_through_an_ollama_tenant() {
    conversation(Case {
        provider: "ollama",
        model: "llama3.1:8b",
        path: "/api/chat",
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Exception classes.

/// Checks the SDK raised `class` (and so its bases) for this status and Anthropic error type.
fn assert_raised(error: &Value, class: &str, status: u16, kind: &str) {
    assert_eq!(error["class"], class, "{error:#}");
    let is: Vec<&str> = error["is"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        is.contains(&"APIStatusError") && is.contains(&"APIError"),
        "{error:#}"
    );
    assert_eq!(error["status"], status, "{error:#}");
    assert_eq!(error["body"]["type"], "error", "{error:#}");
    assert_eq!(error["body"]["error"]["type"], kind, "{error:#}");
}

#[tokio::test]
async fn the_sdk_raises_its_exception_classes_for_the_gateways_errors() {
    let Some(python) = sdk_python().await else {
        return;
    };
    let gw = Gateway::start().await;
    let settings = json!({"llm": {"provider": "openai", "model": "gpt-4o-mini"}});
    let (_, key) = gw.tenant_named("ok", settings.clone()).await;
    let mut limited = settings;
    limited["rateLimit"] = json!({"requestsPerMinute": 1});
    let (_, limited_key) = gw.tenant_named("limited", limited).await;
    gw.fake.push_all([
        // The limited tenant's one admitted request.
        Reply::text("admitted").with_usage(3, 1),
        Reply::error(500, "the upstream exploded"),
        Reply::stream_error(2, "the model fell over"),
    ]);
    let result = run_script(
        &python,
        &gw,
        &json!({"step": "errors", "keys": {"ok": key, "limited": limited_key}}),
    )
    .await;

    assert_raised(
        err(&result, "bad_key"),
        "AuthenticationError",
        401,
        "authentication_error",
    );
    assert_raised(
        err(&result, "bad_token"),
        "AuthenticationError",
        401,
        "authentication_error",
    );
    let bad_block = err(&result, "bad_block");
    assert_raised(bad_block, "BadRequestError", 400, "invalid_request_error");
    assert!(
        bad_block["body"]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("messages.0.content.0.type"),
        "{bad_block:#}"
    );
    assert_raised(
        err(&result, "bad_temperature"),
        "BadRequestError",
        400,
        "invalid_request_error",
    );

    assert_eq!(
        ok(&result, "limited_first")["content"][0]["text"],
        "admitted"
    );
    let limited = err(&result, "limited_second");
    assert_raised(limited, "RateLimitError", 429, "rate_limit_error");
    let retry_after: u64 = limited["retry_after"]
        .as_str()
        .unwrap_or_else(|| panic!("no retry-after: {limited:#}"))
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{limited:#}");

    assert_raised(
        err(&result, "upstream_failure"),
        "InternalServerError",
        502,
        "api_error",
    );

    // An `error` event in a 200 stream: the SDK raises its generic status error with the
    // event's envelope.
    let broken = err(&result, "broken_stream");
    assert_eq!(broken["body"]["type"], "error", "{broken:#}");
    assert_eq!(broken["body"]["error"]["type"], "api_error", "{broken:#}");
    assert!(
        broken["is"]
            .as_array()
            .unwrap()
            .contains(&json!("APIStatusError")),
        "{broken:#}"
    );

    // Only the admitted, failed and broken requests reached the provider.
    assert_eq!(gw.fake.requests_to("/v1/chat/completions").len(), 3);
}
