//! The chat path shared by every ingress dialect (`/v1/chat/completions` in OpenAI's shapes,
//! `/v1/messages` in Anthropic's): limits, cache, budgets, routing, fallback, usage and cost
//! are done here once; a [`Dialect`] only writes the answer.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use futures::{FutureExt, StreamExt};
use meta_chat_llm::fallback::FallbackChain;
use meta_chat_llm::{
    ChunkStream, CompletionRequest, CompletionResponse, ProviderKind, StreamAccumulator,
    StreamChunk, Usage, pricing::format_usd,
};

use super::AppState;
use super::admission;
use super::error::ApiError;
use super::metering::{self, Meter, Outcome, estimate_input_tokens};
use super::openai::{
    Arrival, CacheStatus, Failure, build_chain, exhausted, llm_error, open_settings, set_headers,
    timed,
};
use crate::cache::{CachedAnswer, ResponseCache};
use crate::routing;
use crate::store::Tenant;

/// How one API dialect writes answers.
pub trait Dialect: Send + Sync + 'static {
    /// Its stream encoding.
    type Stream: StreamEncoder;

    /// The id of the answer to request `request_id` (`chatcmpl-…`, `msg_…`).
    fn response_id(&self, request_id: uuid::Uuid) -> String;

    /// A complete answer, serialized as JSON, with its cost.
    fn answer_body(
        &self,
        response: &CompletionResponse,
        id: &str,
        created: i64,
        model: &str,
        cost_usd: &str,
    ) -> Vec<u8>;

    /// An encoder for one streamed answer.
    fn stream_encoder(
        &self,
        id: String,
        created: i64,
        model: String,
        input_estimate: u64,
    ) -> Self::Stream;
}

/// Writes a stream of unified chunks as one dialect's SSE events.
pub trait StreamEncoder: Send + 'static {
    /// Events before the first chunk.
    fn start(&mut self) -> Vec<Bytes>;
    /// Events for one chunk.
    fn encode(&mut self, chunk: &StreamChunk) -> Vec<Bytes>;
    /// The closing events, with the usage and cost.
    fn finish(&mut self, usage: Usage, cost_usd: &str) -> Vec<Bytes>;
    /// The events that end a stream that failed.
    fn fail(&mut self, error: &ApiError) -> Vec<Bytes>;
    /// The usage the upstream reported in the stream, if it did.
    fn usage(&self) -> Option<Usage>;
}

/// A parsed chat request, whatever dialect it came in.
#[derive(Debug)]
pub struct ChatCall {
    /// The calling tenant.
    pub tenant: Arc<Tenant>,
    /// `chat` or `messages`, for metrics and usage records.
    pub endpoint: &'static str,
    /// The requested model as the client wrote it (routing resolves it).
    pub model: Option<String>,
    /// The request in the unified shape.
    pub request: CompletionRequest,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The conversation, if named.
    pub conversation_id: Option<String>,
}

/// Serves a chat request: requests per minute, the cache, tokens per day and budgets, then the
/// provider chain; the answer is written by `dialect`.
///
/// A stream keeps this future until its first chunk, so its size counts for every open
/// stream: the arguments are used where they are (an `async fn` would copy them into locals
/// beside themselves), and what admission needs stays inside its own block, so none of it is
/// kept while the provider works.
#[allow(clippy::manual_async_fn)]
pub fn serve<D: Dialect>(
    state: AppState,
    arrival: Arrival,
    call: ChatCall,
    dialect: D,
) -> impl Future<Output = Result<Response, Failure>> + Send {
    async move {
        let request_id = arrival.2;
        let mut meter = Meter::new(
            &state,
            &call.tenant.id,
            call.conversation_id,
            call.endpoint,
            arrival,
        );
        let reply = Reply {
            id: dialect.response_id(request_id),
            created: chrono::Utc::now().timestamp(),
            request_id,
        };
        let admission = admit(
            &state,
            &call.tenant,
            call.model.as_deref(),
            &call.request,
            call.stream,
            &mut meter,
            &dialect,
            &reply,
        )
        .await?;
        let Admission {
            chain,
            admitted,
            cache_fill,
            input_estimate,
            provider,
            model,
        } = match admission {
            Admitted::Call(admission) => admission,
            Admitted::Cached(answer) => return Ok(answer),
        };

        let pending = meter.pending(provider, &model, input_estimate);
        let mut upstream = Duration::ZERO;

        if call.stream {
            let result = timed(&mut upstream, chain.stream_served(&call.request)).await;
            pending.done();
            let served = result.map_err(|e| exhausted(e, &meter))?;
            let encoder = dialect.stream_encoder(
                reply.id,
                reply.created,
                served.model.clone(),
                input_estimate,
            );
            let body = sse_body(
                served.value,
                encoder,
                StreamContext {
                    meter,
                    provider: served.provider,
                    model: served.model.clone(),
                    fallback_from: served.failed.first().map(|f| f.provider),
                    ttft: arrival.0.elapsed(),
                    input_estimate,
                    cache_hit: false,
                    cache_fill,
                },
            );
            let mut response = sse_response(body);
            set_headers(
                &mut response,
                served.provider,
                &served.model,
                None,
                request_id,
                arrival.overhead(upstream),
                CacheStatus::Miss,
                &admitted,
            );
            return Ok(response);
        }

        let result = timed(&mut upstream, chain.complete_served(&call.request)).await;
        pending.done();
        let served = result.map_err(|e| exhausted(e, &meter))?;
        let mut outcome = Outcome::ok(served.provider, &served.model, served.value.usage);
        outcome.fallback_from = served.failed.first().map(|f| f.provider);
        let cost = format_usd(meter.record(&outcome));
        let shown_model = shown_model(&served.value, &served.model);
        let body = dialect.answer_body(&served.value, &reply.id, reply.created, shown_model, &cost);
        if let Some(fill) = cache_fill {
            fill.cache.put_later(
                fill.key,
                CachedAnswer {
                    provider: served.provider,
                    model: served.model.clone(),
                    response: served.value.clone(),
                },
                fill.ttl,
            );
        }
        let mut response = json_response(body);
        set_headers(
            &mut response,
            served.provider,
            &served.model,
            Some(&cost),
            request_id,
            arrival.overhead(upstream),
            CacheStatus::Miss,
            &admitted,
        );
        Ok(response)
    }
}

/// Admission: the tenant's settings and routing, requests per minute, the cache, tokens per
/// day and budgets. Its own future, so that none of what it holds is kept in the chat
/// future's while the provider works.
#[allow(clippy::too_many_arguments)]
async fn admit<D: Dialect>(
    state: &AppState,
    tenant: &Tenant,
    model: Option<&str>,
    request: &CompletionRequest,
    stream: bool,
    meter: &mut Meter,
    dialect: &D,
    reply: &Reply,
) -> Result<Admitted, Failure> {
    let settings = open_settings(state, tenant)?;
    meter.alert_threshold_nano = metering::alert_threshold_nano(state, &settings);
    let limits = admission::tenant_limits(state, &settings);
    let cache_ttl = admission::cache_ttl(&settings);
    let (primary, fallback) = routing::provider_config(&state.config.llm, &settings, model)?;
    drop(settings);

    // Requests per minute count every request, cached or not. The limit, cache and
    // reservation futures (0.8 – 1.3 kB each, for their Redis paths) are boxed: held inline
    // they would size this future by the largest of them, and with it the chat future a
    // stream keeps until its first chunk; boxed, each takes its memory only while it runs.
    let rate_headers = Box::pin(state.limits.check_rate(&tenant.id, &limits))
        .await
        .map_err(|refusal| admission::refused(state, &tenant.id, refusal))?;

    let cache_key = cache_ttl.map(|_| ResponseCache::key(&tenant.id, &primary, request));
    if let Some(key) = &cache_key
        && let Some(hit) = Box::pin(state.cache.get(key)).await
    {
        state.metrics.record_cache_hit(&tenant.id);
        return Ok(Admitted::Cached(cached_answer(
            meter,
            hit,
            stream,
            dialect,
            reply,
            &rate_headers,
        )));
    }

    // Tokens per day and budgets are for requests that will reach a provider.
    let worst_case = admission::worst_case_cost(
        state,
        std::iter::once(&primary).chain(fallback.iter().map(|(_, config)| config)),
        request,
    );
    let admitted = Box::pin(
        state
            .limits
            .reserve(&tenant.id, &limits, worst_case, rate_headers),
    )
    .await
    .map_err(|refusal| admission::refused(state, &tenant.id, refusal))?;
    let cache_fill = cache_key.zip(cache_ttl).map(|(key, ttl)| {
        Box::new(CacheFill {
            cache: state.cache.clone(),
            key,
            ttl,
        })
    });
    meter.settlement = admitted.settlement;
    Ok(Admitted::Call(Admission {
        input_estimate: estimate_input_tokens(request),
        provider: primary.provider,
        model: primary.model.clone(),
        chain: build_chain(primary, fallback),
        admitted: admitted.headers,
        cache_fill,
    }))
}

/// What admission decided.
enum Admitted {
    /// Go on to the providers.
    Call(Admission),
    /// Answered from the cache.
    Cached(Response),
}

/// What admission leaves for the call: the provider chain, the admission's headers, where to
/// cache the answer, and the primary provider for the records.
struct Admission {
    chain: FallbackChain,
    admitted: Vec<(&'static str, String)>,
    cache_fill: Option<Box<CacheFill>>,
    input_estimate: u64,
    provider: ProviderKind,
    model: String,
}

/// Where a fresh answer is cached.
struct CacheFill {
    cache: ResponseCache,
    key: String,
    ttl: Duration,
}

/// What every answer to a chat request carries.
struct Reply {
    id: String,
    created: i64,
    request_id: uuid::Uuid,
}

/// An answer from the cache: the stored completion, as JSON or replayed as a stream; recorded
/// as a hit that cost nothing.
fn cached_answer<D: Dialect>(
    meter: &Meter,
    hit: CachedAnswer,
    stream: bool,
    dialect: &D,
    reply: &Reply,
    rate_headers: &[(&'static str, String)],
) -> Response {
    let overhead = meter.arrival.0.elapsed();
    if stream {
        let chunks = admission::replay_chunks(&hit.response);
        let stream: ChunkStream = Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)));
        let encoder = dialect.stream_encoder(
            reply.id.clone(),
            reply.created,
            hit.model.clone(),
            hit.response.usage.input_tokens,
        );
        let body = sse_body(
            stream,
            encoder,
            StreamContext {
                meter: meter.clone(),
                provider: hit.provider,
                model: hit.model.clone(),
                fallback_from: None,
                ttft: meter.arrival.0.elapsed(),
                input_estimate: 0,
                cache_hit: true,
                cache_fill: None,
            },
        );
        let mut response = sse_response(body);
        set_headers(
            &mut response,
            hit.provider,
            &hit.model,
            None,
            reply.request_id,
            overhead,
            CacheStatus::Hit,
            rate_headers,
        );
        return response;
    }
    let mut outcome = Outcome::ok(hit.provider, &hit.model, hit.response.usage);
    outcome.cache_hit = true;
    let cost = format_usd(meter.record(&outcome));
    let shown_model = shown_model(&hit.response, &hit.model);
    let body = dialect.answer_body(&hit.response, &reply.id, reply.created, shown_model, &cost);
    let mut response = json_response(body);
    set_headers(
        &mut response,
        hit.provider,
        &hit.model,
        Some(&cost),
        reply.request_id,
        overhead,
        CacheStatus::Hit,
        rate_headers,
    );
    response
}

/// The model an answer names: the one the upstream reported, else the one asked for.
fn shown_model<'a>(response: &'a CompletionResponse, asked: &'a str) -> &'a str {
    if response.model.is_empty() {
        asked
    } else {
        &response.model
    }
}

fn sse_response(body: Body) -> Response {
    let mut response = Response::new(body);
    *response.headers_mut() = HeaderMap::with_capacity(ANSWER_HEADERS);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// What the end of a stream needs to price and record it.
struct StreamContext {
    meter: Meter,
    provider: ProviderKind,
    model: String,
    fallback_from: Option<ProviderKind>,
    ttft: Duration,
    input_estimate: u64,
    /// Replaying a cached answer: recorded as a hit that cost nothing.
    cache_hit: bool,
    /// Where to cache the answer once the stream completed.
    cache_fill: Option<Box<CacheFill>>,
}

impl StreamContext {
    /// The stream's usage: as the provider reported it, else estimated from the prompt and
    /// the text sent (flagged).
    fn outcome(&self, reported: Option<Usage>, output_text: &str) -> Outcome {
        let (usage, estimated) = match reported {
            Some(usage) => (usage, false),
            None => (
                Usage {
                    input_tokens: self.input_estimate,
                    output_tokens: crate::usage::estimate_tokens(output_text),
                },
                true,
            ),
        };
        let mut outcome = Outcome::ok(self.provider, &self.model, usage);
        outcome.estimated = estimated;
        outcome.ttft = Some(self.ttft);
        outcome.fallback_from = self.fallback_from;
        outcome.cache_hit = self.cache_hit;
        outcome
    }
}

/// The SSE body: the dialect's opening events, one or more events per chunk, then its
/// closing events with the usage and cost; a failure mid-stream ends it with the dialect's
/// error events.
///
/// The stream's usage is recorded when it ends: completed, failed upstream (what was used,
/// with status `error`) or abandoned by the client (status `cancelled`; the upstream stream is
/// dropped, which closes its connection).
fn sse_body<E: StreamEncoder>(stream: ChunkStream, encoder: E, context: StreamContext) -> Body {
    let relay = Relay {
        stream,
        encoder,
        context,
        received: StreamAccumulator::new(),
        pending: std::collections::VecDeque::new(),
        started: false,
        recorded: false,
    };
    let body = futures::stream::unfold(relay, |mut relay| async move {
        relay
            .next_event()
            .await
            .map(|event| (Ok::<Bytes, Infallible>(event), relay))
    });
    Body::from_stream(body)
}

/// How many bytes of events already at hand are joined into one body frame, at most.
const COALESCE_BYTES: usize = 16 * 1024;

/// Turns an upstream's unified chunks into one dialect's events as the response body polls
/// for them: each chunk is encoded and written as soon as it arrives, with no task or
/// channel in between. The outcome is recorded once: when the upstream ends or fails, or —
/// when the client goes away and the body is dropped — as cancelled.
struct Relay<E: StreamEncoder> {
    stream: ChunkStream,
    encoder: E,
    context: StreamContext,
    received: StreamAccumulator,
    /// Events encoded and not yet written.
    pending: std::collections::VecDeque<Bytes>,
    started: bool,
    /// Whether the outcome was recorded (the upstream ended or failed).
    recorded: bool,
}

impl<E: StreamEncoder> Relay<E> {
    /// The next bytes to write; `None` once the stream is over. The events one chunk gives
    /// (an Anthropic text block opens with two; the end brings the usage and the closing
    /// events) go out as one write, and so do the chunks that have already arrived from the
    /// upstream when the first of them is encoded (up to [`COALESCE_BYTES`]): an upstream
    /// that sent several at once has them forwarded at once, in one body frame instead of
    /// one frame each. Nothing waits for more: an upstream chunk that has not arrived yet
    /// leaves what is ready to be written.
    async fn next_event(&mut self) -> Option<Bytes> {
        let first = self.next_single().await?;
        let mut size = first.len() + self.pending.iter().map(Bytes::len).sum::<usize>();
        while !self.recorded && size < COALESCE_BYTES {
            let Some(item) = self.stream.next().now_or_never() else {
                break;
            };
            let before = self.pending.len();
            self.take(item);
            size += self.pending.range(before..).map(Bytes::len).sum::<usize>();
        }
        if self.pending.is_empty() {
            return Some(first);
        }
        let mut batch = bytes::BytesMut::with_capacity(size);
        batch.extend_from_slice(&first);
        while let Some(event) = self.pending.pop_front() {
            batch.extend_from_slice(&event);
        }
        Some(batch.freeze())
    }

    /// The next single event, waiting for the upstream when none is pending.
    async fn next_single(&mut self) -> Option<Bytes> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.recorded {
                return None;
            }
            if !self.started {
                self.started = true;
                self.pending.extend(self.encoder.start());
                continue;
            }
            let item = self.stream.next().await;
            self.take(item);
        }
    }

    /// Encodes what the upstream gave: a chunk, a failure, or the end (`None`); the last two
    /// record the outcome.
    fn take(&mut self, item: Option<meta_chat_llm::Result<StreamChunk>>) {
        match item {
            Some(Ok(chunk)) => {
                self.received.push(&chunk);
                self.pending.extend(self.encoder.encode(&chunk));
            }
            Some(Err(error)) => {
                let mut outcome = self
                    .context
                    .outcome(self.encoder.usage(), self.received.text());
                outcome.status = "error";
                outcome.http_status = error.status().unwrap_or(502);
                outcome.error_kind = Some(error.code());
                self.context.meter.record(&outcome);
                self.recorded = true;
                let failure = llm_error(&error);
                self.pending.extend(self.encoder.fail(failure.error()));
            }
            None => {
                let outcome = self
                    .context
                    .outcome(self.encoder.usage(), self.received.text());
                let cost = format_usd(self.context.meter.record(&outcome));
                self.recorded = true;
                if let Some(fill) = &self.context.cache_fill {
                    let received = std::mem::take(&mut self.received);
                    let response = received.into_response(
                        String::new(),
                        &self.context.model,
                        self.context.provider,
                    );
                    fill.cache.put_later(
                        fill.key.clone(),
                        CachedAnswer {
                            provider: self.context.provider,
                            model: self.context.model.clone(),
                            response,
                        },
                        fill.ttl,
                    );
                }
                self.pending
                    .extend(self.encoder.finish(outcome.usage, &cost));
            }
        }
    }
}

impl<E: StreamEncoder> Drop for Relay<E> {
    fn drop(&mut self) {
        if !self.recorded {
            // The client went away before the upstream finished.
            let mut outcome = self
                .context
                .outcome(self.encoder.usage(), self.received.text());
            outcome.status = "cancelled";
            self.context.meter.record(&outcome);
        }
    }
}

/// Headers an answer carries (content type, provider, model, cache, cost, request id, overhead,
/// rate limits): its map is sized for them at once instead of growing while they are set.
const ANSWER_HEADERS: usize = 12;

/// A 200 answer with a JSON body already serialized.
fn json_response(body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.headers_mut() = HeaderMap::with_capacity(ANSWER_HEADERS);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
