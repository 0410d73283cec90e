//! The price table and cost in integer nano-dollars (1e-9 USD).
//!
//! Prices are written in USD per million tokens, as providers publish them, and held as
//! integer micro-dollars per million tokens (so $0.15 is 150 000), which is exact for every
//! published price. A cost is `tokens × price / 1000` nano-dollars, rounded half up: a
//! 10-token embedding still costs something, and no float is ever summed.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::types::{ProviderKind, Usage};

const BUILTIN: &str = include_str!("../pricing.json");

/// The price of one model, in micro-dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelPrice {
    /// Input (prompt or embedded) tokens.
    pub input_micros_per_mtok: u64,
    /// Output (generated) tokens.
    pub output_micros_per_mtok: u64,
    /// The model's context window, when known.
    pub context_window: Option<u32>,
    /// Whether this is an embedding model.
    pub embedding: bool,
}

/// The cost of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cost {
    /// Nano-dollars (1e-9 USD).
    pub nano_usd: u64,
    /// Whether the price table knew the model; an unpriced model costs 0.
    pub priced: bool,
}

impl Cost {
    /// The cost as a decimal USD string with nine decimals, such as `0.000450000`.
    pub fn usd_string(&self) -> String {
        format_usd(self.nano_usd)
    }
}

/// Formats nano-dollars as a decimal USD string with nine decimals.
pub fn format_usd(nano_usd: u64) -> String {
    decimal(nano_usd, 9)
}

/// `units / 10^places` as text with exactly `places` decimals: `decimal(1_500, 3)` is
/// `"1.500"`, `decimal(5, 3)` is `"0.005"`. Written digit by digit: answers carry such values
/// in headers, and `format!` costs several times more.
pub fn decimal(units: u64, places: usize) -> String {
    let mut reversed = Vec::with_capacity(places + 21);
    let mut rest = units;
    while rest > 0 || reversed.len() <= places {
        if places > 0 && reversed.len() == places {
            reversed.push(b'.');
        }
        reversed.push(b'0' + (rest % 10) as u8);
        rest /= 10;
    }
    reversed.reverse();
    String::from_utf8(reversed).unwrap_or_default()
}

/// Why a price table could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PriceTableError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The JSON is not a price table.
    #[error("invalid price table: {0}")]
    Invalid(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    #[serde(default)]
    models: BTreeMap<String, PriceEntry>,
    #[serde(default)]
    aliases: BTreeMap<String, String>,
    #[serde(default)]
    providers: BTreeMap<String, PriceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PriceEntry {
    input: serde_json::Number,
    output: serde_json::Number,
    #[serde(default)]
    context_window: Option<u32>,
    #[serde(default)]
    embedding: bool,
}

impl PriceEntry {
    fn to_price(&self, name: &str) -> Result<ModelPrice, PriceTableError> {
        Ok(ModelPrice {
            input_micros_per_mtok: usd_to_micros(&self.input)
                .ok_or_else(|| bad_price(name, "input", &self.input))?,
            output_micros_per_mtok: usd_to_micros(&self.output)
                .ok_or_else(|| bad_price(name, "output", &self.output))?,
            context_window: self.context_window,
            embedding: self.embedding,
        })
    }
}

fn bad_price(name: &str, field: &str, value: &serde_json::Number) -> PriceTableError {
    PriceTableError::Invalid(format!(
        "{name}.{field}: `{value}` is not a non-negative USD amount with at most 6 decimals"
    ))
}

/// Parses a decimal USD-per-million-tokens amount exactly into micro-dollars.
fn usd_to_micros(value: &serde_json::Number) -> Option<u64> {
    let text = value.to_string();
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    if whole.starts_with('-') || fraction.len() > 6 || text.contains(['e', 'E']) {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    let fraction: u64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<6}").parse().ok()?
    };
    whole.checked_mul(1_000_000)?.checked_add(fraction)
}

/// Model prices by provider and model, with aliases and per-provider defaults.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    models: BTreeMap<String, ModelPrice>,
    aliases: BTreeMap<String, String>,
    providers: BTreeMap<String, ModelPrice>,
}

impl PriceTable {
    /// The built-in table (shared; parsed once).
    pub fn builtin() -> Arc<PriceTable> {
        static TABLE: OnceLock<Arc<PriceTable>> = OnceLock::new();
        TABLE
            .get_or_init(|| Arc::new(Self::from_json(BUILTIN).unwrap_or_default()))
            .clone()
    }

    /// A table from JSON of the built-in file's shape.
    pub fn from_json(json: &str) -> Result<Self, PriceTableError> {
        let file: PriceFile =
            serde_json::from_str(json).map_err(|e| PriceTableError::Invalid(e.to_string()))?;
        let mut table = Self::default();
        table.merge(file)?;
        Ok(table)
    }

    /// The built-in table with the entries of the JSON file at `path` added or replacing
    /// the built-in ones (`PRICING_FILE`).
    pub fn builtin_with_override_file(path: &str) -> Result<Self, PriceTableError> {
        let json = std::fs::read_to_string(path).map_err(|source| PriceTableError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: PriceFile =
            serde_json::from_str(&json).map_err(|e| PriceTableError::Invalid(e.to_string()))?;
        let mut table = (*Self::builtin()).clone();
        table.merge(file)?;
        Ok(table)
    }

    fn merge(&mut self, file: PriceFile) -> Result<(), PriceTableError> {
        for (name, entry) in &file.models {
            if !name.contains('/') {
                return Err(PriceTableError::Invalid(format!(
                    "model `{name}` must be written as provider/model"
                )));
            }
            self.models
                .insert(name.to_ascii_lowercase(), entry.to_price(name)?);
        }
        for (alias, target) in file.aliases {
            self.aliases
                .insert(alias.to_ascii_lowercase(), target.to_ascii_lowercase());
        }
        for (provider, entry) in &file.providers {
            self.providers
                .insert(provider.to_ascii_lowercase(), entry.to_price(provider)?);
        }
        Ok(())
    }

    /// The price of `model` at `provider`: the exact entry, else an alias, else the model
    /// without a date suffix (`gpt-4o-2024-08-06` → `gpt-4o`) or `-latest`, else the
    /// provider's default (every Ollama model is free). `None` means unpriced.
    pub fn price(&self, provider: ProviderKind, model: &str) -> Option<ModelPrice> {
        let key = table_key(provider, model);
        self.lookup(&key)
            .or_else(|| strip_version(&key).and_then(|base| self.lookup(&base)))
            .or_else(|| self.providers.get(provider.as_str()).copied())
    }

    /// The table's own name for `model` at `provider`, without the provider prefix: the
    /// model entry or alias that [`PriceTable::price`] finds for it, directly or after
    /// dropping a date or `-latest` suffix (`gpt-4o-2024-08-06` → `gpt-4o`). `None` when no
    /// entry names the model, even if a provider-wide default prices it (every Ollama model).
    ///
    /// The answer is always one of the table's own entries, so it is a bounded label for
    /// metrics, whatever model names clients send.
    pub fn known_model(&self, provider: ProviderKind, model: &str) -> Option<String> {
        let key = table_key(provider, model);
        let found = if self.lookup(&key).is_some() {
            key
        } else {
            strip_version(&key).filter(|base| self.lookup(base).is_some())?
        };
        found
            .strip_prefix(&format!("{}/", provider.as_str()))
            .map(str::to_owned)
    }

    fn lookup(&self, key: &str) -> Option<ModelPrice> {
        self.models.get(key).copied().or_else(|| {
            self.aliases
                .get(key)
                .and_then(|target| self.models.get(target).copied())
        })
    }

    /// The cost of a chat completion.
    pub fn cost(&self, provider: ProviderKind, model: &str, usage: Usage) -> Cost {
        match self.price(provider, model) {
            Some(price) => Cost {
                nano_usd: nanos(usage.input_tokens, price.input_micros_per_mtok)
                    .saturating_add(nanos(usage.output_tokens, price.output_micros_per_mtok)),
                priced: true,
            },
            None => Cost::default(),
        }
    }

    /// The cost of embedding `tokens` tokens.
    pub fn embedding_cost(&self, provider: ProviderKind, model: &str, tokens: u64) -> Cost {
        self.cost(
            provider,
            model,
            Usage {
                input_tokens: tokens,
                output_tokens: 0,
            },
        )
    }

    /// The chat (`embedding == false`) or embedding models with an entry for `provider`,
    /// without the provider prefix, sorted.
    pub fn models(&self, provider: ProviderKind, embedding: bool) -> Vec<String> {
        let prefix = format!("{}/", provider.as_str());
        self.models
            .iter()
            .filter(|(_, price)| price.embedding == embedding)
            .filter_map(|(k, _)| k.strip_prefix(&prefix).map(str::to_owned))
            .collect()
    }
}

/// `provider/model`, lowercased, whether or not `model` already carries the prefix.
fn table_key(provider: ProviderKind, model: &str) -> String {
    // One allocation: this runs for every priced request.
    let provider = provider.as_str();
    let model = model.trim();
    let n = provider.len();
    let prefixed = model.as_bytes().get(..=n).is_some_and(|head| {
        head.get(..n)
            .is_some_and(|name| name.eq_ignore_ascii_case(provider.as_bytes()))
            && head.get(n) == Some(&b'/')
    });
    let mut key = String::with_capacity(n + 1 + model.len());
    if !prefixed {
        key.push_str(provider);
        key.push('/');
    }
    key.push_str(model);
    // The provider's name is lowercase already.
    key.make_ascii_lowercase();
    key
}

/// `tokens × micro-dollars per million tokens` in nano-dollars, rounded half up.
fn nanos(tokens: u64, micros_per_mtok: u64) -> u64 {
    let exact = u128::from(tokens) * u128::from(micros_per_mtok);
    u64::try_from((exact + 500) / 1000).unwrap_or(u64::MAX)
}

/// `gpt-4o-2024-08-06` → `gpt-4o`, `claude-3-haiku-20240307` → `claude-3-haiku`,
/// `claude-3-5-sonnet-latest` → `claude-3-5-sonnet`.
fn strip_version(key: &str) -> Option<String> {
    if let Some(base) = key.strip_suffix("-latest") {
        return Some(base.to_owned());
    }
    let bytes = key.as_bytes();
    let is_digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    let n = bytes.len();
    // -YYYY-MM-DD
    if n > 11
        && bytes[n - 11] == b'-'
        && is_digits(&bytes[n - 10..n - 6])
        && bytes[n - 6] == b'-'
        && is_digits(&bytes[n - 5..n - 3])
        && bytes[n - 3] == b'-'
        && is_digits(&bytes[n - 2..])
    {
        return Some(key[..n - 11].to_owned());
    }
    // -YYYYMMDD
    if n > 9 && bytes[n - 9] == b'-' && is_digits(&bytes[n - 8..]) {
        return Some(key[..n - 9].to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_written_with_their_places() {
        for (units, places) in [
            (0u64, 9usize),
            (1, 9),
            (450_000, 9),
            (1_000_000_000, 9),
            (123_456_789_012, 9),
            (u64::MAX, 9),
            (0, 3),
            (5, 3),
            (999, 3),
            (1_000, 3),
            (1_234_567, 3),
            (0, 0),
            (42, 0),
            (7, 1),
        ] {
            let scale = 10u128.pow(u32::try_from(places).unwrap());
            let expected = if places == 0 {
                units.to_string()
            } else {
                format!(
                    "{}.{:0width$}",
                    u128::from(units) / scale,
                    u128::from(units) % scale,
                    width = places
                )
            };
            assert_eq!(
                decimal(units, places),
                expected,
                "{units} with {places} places"
            );
        }
        assert_eq!(format_usd(450_000), "0.000450000");
    }

    /// The key as the definition reads: trimmed, lowercased, prefixed with the provider
    /// unless it already is.
    fn spelled_out_key(provider: ProviderKind, model: &str) -> String {
        let model = model.trim().to_ascii_lowercase();
        let prefix = format!("{}/", provider.as_str());
        match model.strip_prefix(&prefix) {
            Some(_) => model,
            None => prefix + &model,
        }
    }

    #[test]
    fn table_keys_are_the_lowercased_prefixed_model() {
        for model in [
            "gpt-4o",
            " GPT-4o-Mini ",
            "openai/gpt-4o",
            "OpenAI/GPT-4o",
            "openai",
            "openai/",
            "openaix/gpt",
            "anthropic/claude-3-haiku",
            "é/x",
            "opén/x",
            "",
        ] {
            for provider in [
                ProviderKind::OpenAi,
                ProviderKind::Anthropic,
                ProviderKind::Ollama,
            ] {
                assert_eq!(
                    table_key(provider, model),
                    spelled_out_key(provider, model),
                    "{provider} {model:?}"
                );
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn table_keys_match_the_definition(model in "\\PC{0,24}") {
            for provider in [ProviderKind::OpenAi, ProviderKind::Anthropic, ProviderKind::Ollama] {
                proptest::prop_assert_eq!(
                    table_key(provider, &model),
                    spelled_out_key(provider, &model)
                );
            }
        }
    }

    fn usage(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
        }
    }

    #[test]
    fn seed_prices_are_exact() {
        let table = PriceTable::builtin();
        let mini = table.cost(ProviderKind::OpenAi, "gpt-4o-mini", usage(1000, 500));
        assert_eq!(mini.nano_usd, 450_000);
        assert_eq!(mini.usd_string(), "0.000450000");
        let embed = table.embedding_cost(ProviderKind::OpenAi, "text-embedding-3-small", 10);
        assert_eq!(embed.nano_usd, 200);
        assert!(embed.priced);
        let gpt4o = table.cost(ProviderKind::OpenAi, "gpt-4o", usage(1_000_000, 1_000_000));
        assert_eq!(gpt4o.nano_usd, 12_500_000_000);
        let sonnet = table.cost(
            ProviderKind::Anthropic,
            "claude-3-5-sonnet-20241022",
            usage(1_000_000, 1_000_000),
        );
        assert_eq!(sonnet.nano_usd, 18_000_000_000);
        let haiku = table.cost(
            ProviderKind::Anthropic,
            "claude-3-haiku-20240307",
            usage(1000, 1000),
        );
        assert_eq!(haiku.nano_usd, 250_000 + 1_250_000);
        let llama = table.cost(ProviderKind::Ollama, "llama3.1:8b", usage(5000, 5000));
        assert_eq!(
            llama,
            Cost {
                nano_usd: 0,
                priced: true
            }
        );
    }

    #[test]
    fn aliases_and_dated_versions_resolve() {
        let table = PriceTable::builtin();
        let base = table.price(ProviderKind::OpenAi, "gpt-4o-mini");
        assert_eq!(
            table.price(ProviderKind::OpenAi, "gpt-4o-mini-2024-07-18"),
            base
        );
        assert_eq!(
            table.price(ProviderKind::OpenAi, "openai/GPT-4o-mini"),
            base
        );
        let sonnet = table.price(ProviderKind::Anthropic, "claude-3-5-sonnet-20241022");
        assert_eq!(
            table.price(ProviderKind::Anthropic, "claude-3-5-sonnet-latest"),
            sonnet
        );
        // A dated version with its own entry keeps its own price.
        let may = table
            .price(ProviderKind::OpenAi, "gpt-4o-2024-05-13")
            .unwrap();
        assert_eq!(may.input_micros_per_mtok, 5_000_000);
    }

    #[test]
    fn unknown_models_are_unpriced() {
        let table = PriceTable::builtin();
        let cost = table.cost(ProviderKind::OpenAi, "my-finetune", usage(100, 100));
        assert_eq!(cost, Cost::default());
        assert!(!cost.priced);
        // The same model name at another provider is not that provider's price.
        assert_eq!(table.price(ProviderKind::Anthropic, "gpt-4o"), None);
    }

    #[test]
    fn known_models_are_the_tables_own_names() {
        let table = PriceTable::builtin();
        let known = |provider, model| table.known_model(provider, model);
        assert_eq!(
            known(ProviderKind::OpenAi, "gpt-4o-mini").as_deref(),
            Some("gpt-4o-mini")
        );
        assert_eq!(
            known(ProviderKind::OpenAi, " OpenAI/GPT-4o-mini ").as_deref(),
            Some("gpt-4o-mini")
        );
        // A dated version without its own entry is named by its base entry…
        assert_eq!(
            known(ProviderKind::OpenAi, "gpt-4o-2024-08-06").as_deref(),
            Some("gpt-4o")
        );
        // …and one with its own entry keeps it.
        assert_eq!(
            known(ProviderKind::OpenAi, "gpt-4o-2024-05-13").as_deref(),
            Some("gpt-4o-2024-05-13")
        );
        // An alias is an entry of the table too.
        assert_eq!(
            known(ProviderKind::Anthropic, "claude-3-5-sonnet-latest").as_deref(),
            Some("claude-3-5-sonnet-latest")
        );
        assert_eq!(
            known(ProviderKind::OpenAi, "text-embedding-3-small").as_deref(),
            Some("text-embedding-3-small")
        );
        // Unknown names, other providers' models and models priced only by a provider-wide
        // default are not known, whatever their price.
        assert_eq!(known(ProviderKind::OpenAi, "my-finetune"), None);
        assert_eq!(known(ProviderKind::Anthropic, "gpt-4o"), None);
        assert_eq!(known(ProviderKind::OpenAi, "anthropic/gpt-4o"), None);
        assert_eq!(known(ProviderKind::OpenAi, "gpt-4o-2099-01-01x"), None);
        assert!(table.price(ProviderKind::Ollama, "llama3.1:8b").is_some());
        assert_eq!(known(ProviderKind::Ollama, "llama3.1:8b"), None);
    }

    #[test]
    fn rounding_is_half_up_in_nanos() {
        // $0.15 per 1M tokens = 150 nano-dollars per token.
        assert_eq!(nanos(1, 150_000), 150);
        // $0.000001 per 1M tokens = 0.001 nano-dollars per token: half up.
        assert_eq!(nanos(499, 1), 0);
        assert_eq!(nanos(500, 1), 1);
        assert_eq!(nanos(10, 20_000), 200);
        assert_eq!(nanos(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn override_file_replaces_and_adds() {
        let dir = std::env::temp_dir().join(format!("prices-{}", fastrand::u64(..)));
        std::fs::write(
            &dir,
            r#"{"models": {"openai/gpt-4o": {"input": 1, "output": 2},
                           "openai/my-finetune": {"input": 0.5, "output": 0.75}}}"#,
        )
        .unwrap();
        let table = PriceTable::builtin_with_override_file(dir.to_str().unwrap()).unwrap();
        std::fs::remove_file(&dir).ok();
        assert_eq!(
            table
                .cost(ProviderKind::OpenAi, "gpt-4o", usage(1_000_000, 0))
                .nano_usd,
            1_000_000_000
        );
        assert!(
            table
                .cost(ProviderKind::OpenAi, "my-finetune", usage(1, 1))
                .priced
        );
        assert!(
            table
                .cost(ProviderKind::OpenAi, "gpt-4o-mini", usage(1, 1))
                .priced
        );
    }

    #[test]
    fn invalid_tables_are_rejected() {
        for json in [
            r#"{"models": {"gpt-4o": {"input": 1, "output": 2}}}"#,
            r#"{"models": {"openai/x": {"input": -1, "output": 2}}}"#,
            r#"{"models": {"openai/x": {"input": 0.0000001, "output": 2}}}"#,
            r#"{"modles": {}}"#,
        ] {
            assert!(PriceTable::from_json(json).is_err(), "{json}");
        }
    }

    #[test]
    fn usd_strings() {
        assert_eq!(format_usd(0), "0.000000000");
        assert_eq!(format_usd(1_500_000_000), "1.500000000");
    }
}
