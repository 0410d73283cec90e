//! The HTTP plumbing every provider shares: one pooled client, error classification,
//! SSE and NDJSON framing.

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use reqwest::header::HeaderMap;
use serde::de::DeserializeOwned;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::io::StreamReader;

use crate::error::{LlmError, Result};
use crate::types::ProviderKind;

/// The longest NDJSON line accepted from an upstream.
const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// Turns an upstream's error answer (status, headers, body) into an [`LlmError`].
pub(crate) type ErrorParser = fn(u16, &HeaderMap, &[u8]) -> LlmError;

/// The process-wide HTTP client: one connection pool shared by every provider instance.
pub(crate) fn client(provider: ProviderKind) -> Result<reqwest::Client> {
    static CLIENT: OnceLock<std::result::Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            install_crypto_provider();
            reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .pool_idle_timeout(std::time::Duration::from_secs(90))
                // Enough idle connections for a busy upstream, without keeping thousands of
                // sockets (and their buffers) after a burst of long streams.
                .pool_max_idle_per_host(1024)
                .tcp_nodelay(true)
                .build()
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|message| LlmError::Configuration {
            provider,
            message: format!("could not build the HTTP client: {message}"),
        })
}

/// A request to `url` (an upstream endpoint): parsed once per process and then cloned, where
/// reqwest would parse the string (host name normalisation included) on every request. A URL
/// that does not parse is handed over as it is, for reqwest to report.
pub(crate) fn request_to(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
) -> reqwest::RequestBuilder {
    /// Distinct endpoints kept; past it the cache starts over (base URLs come from settings).
    const MAX_ENDPOINTS: usize = 1024;
    static PARSED: OnceLock<RwLock<HashMap<String, reqwest::Url>>> = OnceLock::new();
    let parsed = PARSED.get_or_init(Default::default);
    let known = parsed
        .read()
        .ok()
        .and_then(|endpoints| endpoints.get(&url).cloned());
    if let Some(known) = known {
        return client.request(method, known);
    }
    match reqwest::Url::parse(&url) {
        Ok(fresh) => {
            if let Ok(mut endpoints) = parsed.write() {
                if endpoints.len() >= MAX_ENDPOINTS {
                    endpoints.clear();
                }
                endpoints.insert(url, fresh.clone());
            }
            client.request(method, fresh)
        }
        Err(_) => client.request(method, url),
    }
}

/// Installs rustls' ring crypto provider for the process, unless one is installed already.
pub fn install_crypto_provider() {
    // An error only means another provider was installed first, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Sends a request; a non-2xx answer is read and classified by `parse_error`.
pub(crate) async fn send(
    provider: ProviderKind,
    request: reqwest::RequestBuilder,
    parse_error: ErrorParser,
) -> Result<reqwest::Response> {
    let response = request
        .send()
        .await
        .map_err(|e| LlmError::connection(provider, &e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap_or_default();
    Err(parse_error(status.as_u16(), &headers, &body))
}

/// Reads a whole JSON answer.
pub(crate) async fn read_json<T: DeserializeOwned>(
    provider: ProviderKind,
    response: reqwest::Response,
) -> Result<T> {
    let body = response
        .bytes()
        .await
        .map_err(|e| LlmError::connection(provider, &e))?;
    parse_json(provider, &body)
}

/// Parses a JSON body, describing what was wrong if it cannot be parsed.
pub(crate) fn parse_json<T: DeserializeOwned>(provider: ProviderKind, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        LlmError::malformed(
            provider,
            format!("{e} in {}", String::from_utf8_lossy(truncate(body, 200))),
        )
    })
}

fn truncate(body: &[u8], max: usize) -> &[u8] {
    &body[..body.len().min(max)]
}

/// A byte stream from an upstream.
pub(crate) fn byte_stream(
    provider: ProviderKind,
    response: reqwest::Response,
) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
    response
        .bytes_stream()
        .map_err(move |e| LlmError::connection(provider, &e))
}

/// Server-sent events parsed from a byte stream (framing across chunk boundaries handled by
/// `eventsource-stream`).
pub(crate) fn sse_events<S>(
    provider: ProviderKind,
    bytes: S,
) -> impl Stream<Item = Result<eventsource_stream::Event>> + Send + 'static
where
    S: Stream<Item = Result<Bytes>> + Send + 'static,
{
    use eventsource_stream::{EventStreamError, Eventsource};
    bytes.eventsource().map_err(move |e| match e {
        EventStreamError::Transport(inner) => inner,
        EventStreamError::Utf8(e) => LlmError::malformed(provider, format!("invalid UTF-8: {e}")),
        EventStreamError::Parser(e) => LlmError::malformed(provider, format!("invalid SSE: {e}")),
    })
}

/// Newline-delimited lines from a byte stream, without their line endings; blank lines are
/// skipped.
pub(crate) fn ndjson_lines<S>(
    provider: ProviderKind,
    bytes: S,
) -> impl Stream<Item = Result<String>> + Send + 'static
where
    S: Stream<Item = Result<Bytes>> + Send + 'static,
{
    let reader = StreamReader::new(bytes.map_err(std::io::Error::other));
    FramedRead::new(reader, LinesCodec::new_with_max_length(MAX_LINE_BYTES))
        .map_err(move |e| match e {
            tokio_util::codec::LinesCodecError::Io(io) => {
                let invalid_data = io.kind() == std::io::ErrorKind::InvalidData;
                match io.into_inner().map(|inner| inner.downcast::<LlmError>()) {
                    Some(Ok(llm)) => *llm,
                    _ if invalid_data => {
                        LlmError::malformed(provider, "an NDJSON line is not UTF-8")
                    }
                    Some(Err(other)) => LlmError::Connection {
                        provider,
                        message: other.to_string(),
                    },
                    None => LlmError::Connection {
                        provider,
                        message: "the stream broke".into(),
                    },
                }
            }
            tokio_util::codec::LinesCodecError::MaxLineLengthExceeded => {
                LlmError::malformed(provider, "an NDJSON line exceeds 16 MiB")
            }
        })
        .try_filter(|line| futures::future::ready(!line.trim().is_empty()))
}
