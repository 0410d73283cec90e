//! `meta-chat tenant …`, `meta-chat migrate` and `meta-chat rotate-encryption-key`: the
//! tenant operations of the HTTP API, through the same code, from the command line.

use std::process::ExitCode;

use meta_chat::bootstrap::{self, StartupError};
use meta_chat::config::Config;
use meta_chat::tenants::TenantError;
use serde::Serialize;

/// `meta-chat tenant` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and print it with its API key (shown only this once).
    Create {
        /// The tenant's name.
        #[arg(long)]
        name: String,
        /// Settings as JSON (SPEC §4.2), for example '{"llm":{"provider":"ollama"}}'.
        #[arg(long)]
        settings: Option<String>,
    },
    /// List every tenant (provider keys masked).
    List,
    /// Show one tenant (provider keys masked).
    Show {
        /// The tenant's id.
        id: String,
    },
    /// Give a tenant a new API key; the old one stops working.
    RotateKey {
        /// The tenant's id.
        id: String,
    },
}

/// Why a command failed; printed to stderr.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error(transparent)]
    Tenant(#[from] TenantError),
    #[error("--settings: not JSON: {0}")]
    SettingsJson(serde_json::Error),
}

fn finish(result: Result<(), CommandError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CommandError::Startup(StartupError::Config(error))) => {
            eprintln!("error: {error}");
            ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(value: &impl Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(error) => eprintln!("error: {error}"),
    }
}

/// Runs a `tenant` subcommand.
pub async fn run(command: TenantCommand) -> ExitCode {
    finish(tenant(command).await)
}

async fn tenant(command: TenantCommand) -> Result<(), CommandError> {
    let config = Config::from_env().map_err(StartupError::from)?;
    let tenants = bootstrap::open_tenants(&config).await?;
    match command {
        TenantCommand::Create { name, settings } => {
            let settings = settings
                .map(|s| serde_json::from_str(&s))
                .transpose()
                .map_err(CommandError::SettingsJson)?;
            print_json(&tenants.create(&name, settings.as_ref()).await?);
            eprintln!("The API key is shown only this once; store it now.");
        }
        TenantCommand::List => print_json(&tenants.list().await?),
        TenantCommand::Show { id } => print_json(&tenants.show(&id).await?),
        TenantCommand::RotateKey { id } => {
            print_json(&tenants.rotate_key(&id).await?);
            eprintln!("The old key no longer works; the new one is shown only this once.");
        }
    }
    Ok(())
}

/// `meta-chat migrate`: applies pending database migrations.
pub async fn migrate() -> ExitCode {
    finish(
        async {
            let config = Config::from_env().map_err(StartupError::from)?;
            bootstrap::open_store(&config).await?;
            println!("migrations applied to {}", redact_url(&config.database_url));
            Ok(())
        }
        .await,
    )
}

/// `meta-chat rotate-encryption-key`: re-encrypts every tenant secret from
/// `ENCRYPTION_KEY_PREVIOUS` to `ENCRYPTION_KEY`.
pub async fn rotate_encryption_key() -> ExitCode {
    finish(
        async {
            let config = Config::from_env().map_err(StartupError::from)?;
            if config.encryption_key.is_none() || config.encryption_key_previous.is_none() {
                return Err(StartupError::Config(meta_chat_llm::EnvError {
                    variable: "ENCRYPTION_KEY_PREVIOUS",
                    message: "set ENCRYPTION_KEY_PREVIOUS to the old key and ENCRYPTION_KEY to the new one".into(),
                })
                .into());
            }
            let tenants = bootstrap::open_tenants(&config).await?;
            let moved = tenants.reencrypt_all().await?;
            println!("re-encrypted {moved} secret(s) under the new key");
            Ok(())
        }
        .await,
    )
}

/// The URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
