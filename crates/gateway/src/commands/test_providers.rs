//! `meta-chat test-providers`: one call per configured provider (the design's test script).

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use meta_chat_llm::{CompletionRequest, LlmEnv, LlmError, Message, ProviderKind};

/// Arguments of `test-providers`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Test only this provider (openai, anthropic, ollama); by default every configured one.
    #[arg(long, value_parser = parse_provider)]
    provider: Option<ProviderKind>,
    /// The prompt to send.
    #[arg(long, default_value = "What is 2+2?")]
    prompt: String,
}

fn parse_provider(value: &str) -> Result<ProviderKind, String> {
    value
        .parse()
        .map_err(|e: meta_chat_llm::types::UnknownProvider| e.to_string())
}

/// Runs the command; the exit code is 0 when every tested provider answered.
pub async fn run(args: Args) -> ExitCode {
    let env = match LlmEnv::from_env() {
        Ok(env) => env,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let targets: Vec<ProviderKind> = match args.provider {
        Some(provider) => vec![provider],
        None => ProviderKind::ALL.to_vec(),
    };
    let mut stdout = std::io::stdout().lock();
    let mut failures = 0;
    for provider in targets {
        let config = env.config(provider);
        let header = format!("{provider} ({})", config.model);
        if !env.is_configured(provider) {
            let missing = match provider {
                ProviderKind::OpenAi => "OPENAI_API_KEY",
                ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
                ProviderKind::Ollama => "OLLAMA_BASE_URL",
            };
            let _ = writeln!(stdout, "- {header}: not configured (set {missing})");
            if args.provider.is_some() {
                failures += 1;
            }
            continue;
        }
        match call(&env, provider, &args.prompt).await {
            Ok(report) => {
                let _ = writeln!(stdout, "✓ {header}\n{report}");
            }
            Err(error) => {
                failures += 1;
                let _ = writeln!(
                    stdout,
                    "✗ {header} at {}: {}",
                    config.resolved_base_url(),
                    explain(&error, &config.resolved_base_url())
                );
            }
        }
    }
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn call(env: &LlmEnv, provider: ProviderKind, prompt: &str) -> Result<String, LlmError> {
    let client = env.create(provider)?;
    let started = Instant::now();
    let response = client
        .complete(&CompletionRequest::new(vec![Message::user(prompt)]))
        .await?;
    let latency = started.elapsed();
    let cost = env.prices.cost(provider, &response.model, response.usage);
    let price_note = if cost.priced {
        ""
    } else {
        " (model not in the price table)"
    };
    Ok(format!(
        "  answer:  {}\n  latency: {} ms\n  tokens:  {} in, {} out\n  cost:    ${}{price_note}",
        response.message.content.trim(),
        latency.as_millis(),
        response.usage.input_tokens,
        response.usage.output_tokens,
        cost.usd_string(),
    ))
}

/// Says what to do about an error, beyond what it is.
fn explain(error: &LlmError, base_url: &str) -> String {
    match error {
        LlmError::Connection {
            provider: ProviderKind::Ollama,
            ..
        } => {
            // The Ollama adapter's message already says to run `ollama serve`.
            error.to_string()
        }
        LlmError::Connection { provider, .. } | LlmError::Timeout { provider, .. } => format!(
            "{error} — could not reach {provider} at {base_url}; check the base URL and network"
        ),
        LlmError::Authentication { provider, .. } => {
            format!("{error} — check the {provider} API key")
        }
        _ => error.to_string(),
    }
}
