//! The OpenAI SSE stream: `chat.completion.chunk` frames up to `data: [DONE]`.

use std::collections::VecDeque;
use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::Value;

use super::{PROVIDER, WireError, WireUsage, finish_reason};
use crate::error::{LlmError, Result};
use crate::http;
use crate::provider::ChunkStream;
use crate::types::StreamChunk;

#[derive(Deserialize)]
struct StreamFrame {
    choices: Option<Vec<StreamChoice>>,
    usage: Option<WireUsage>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct StreamChoice {
    index: Option<u32>,
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Option<Vec<DeltaToolCall>>,
}

#[derive(Deserialize)]
struct DeltaToolCall {
    index: Option<u32>,
    id: Option<String>,
    function: Option<DeltaFunction>,
}

#[derive(Deserialize)]
struct DeltaFunction {
    name: Option<String>,
    arguments: Option<String>,
}

/// The chunks one `data:` frame carries, in the order the frame gives them.
pub(super) fn decode_frame(data: &str, saw_tool_calls: &mut bool) -> Result<Vec<StreamChunk>> {
    let frame: StreamFrame = http::parse_json_str(PROVIDER, data)?;
    if let Some(error) = frame.error {
        let (message, code) = match error {
            Value::String(message) => (message, None),
            value => match serde_json::from_value::<WireError>(value) {
                Ok(error) => {
                    let code = error.code().or(error.kind);
                    (error.message.unwrap_or_default(), code)
                }
                Err(_) => (String::new(), None),
            },
        };
        return Err(LlmError::Upstream {
            provider: PROVIDER,
            status: 500,
            code,
            message: if message.is_empty() {
                "error event in the stream".into()
            } else {
                message
            },
            retry_after: None,
        });
    }
    let mut chunks = Vec::new();
    // Only the first choice is ours: requests never ask for `n > 1`.
    for choice in frame.choices.unwrap_or_default() {
        if choice.index.unwrap_or(0) != 0 {
            continue;
        }
        if let Some(delta) = choice.delta {
            for text in [delta.content, delta.refusal].into_iter().flatten() {
                if !text.is_empty() {
                    chunks.push(StreamChunk::TextDelta { text });
                }
            }
            for (position, call) in delta.tool_calls.unwrap_or_default().into_iter().enumerate() {
                *saw_tool_calls = true;
                let (name, arguments) = match call.function {
                    Some(function) => (function.name, function.arguments.unwrap_or_default()),
                    None => (None, String::new()),
                };
                chunks.push(StreamChunk::ToolCallDelta {
                    index: call.index.unwrap_or(position as u32),
                    id: call.id.filter(|id| !id.is_empty()),
                    name: name.filter(|name| !name.is_empty()),
                    arguments,
                });
            }
        }
        if let Some(reason) = choice.finish_reason {
            chunks.push(StreamChunk::Finish {
                reason: finish_reason(Some(&reason), *saw_tool_calls),
            });
        }
    }
    if let Some(usage) = frame.usage {
        chunks.push(StreamChunk::Usage {
            usage: usage.unified(),
        });
    }
    Ok(chunks)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<http::SseEvent>> + Send + 'static>>;

struct Decoder {
    events: EventStream,
    pending: VecDeque<StreamChunk>,
    saw_finish: bool,
    saw_tool_calls: bool,
    ended: bool,
}

/// Decodes an SSE byte stream of `chat.completion.chunk` frames, up to `[DONE]`.
pub(crate) fn decode_stream<S>(bytes: S) -> ChunkStream
where
    S: Stream<Item = Result<Bytes>> + Send + 'static,
{
    let decoder = Decoder {
        events: Box::pin(http::sse_events(PROVIDER, bytes)),
        pending: VecDeque::new(),
        saw_finish: false,
        saw_tool_calls: false,
        ended: false,
    };
    Box::pin(futures::stream::unfold(decoder, |mut state| async move {
        loop {
            if let Some(chunk) = state.pending.pop_front() {
                return Some((Ok(chunk), state));
            }
            if state.ended {
                return None;
            }
            let event = match state.events.next().await {
                Some(Ok(event)) => event,
                Some(Err(error)) => {
                    state.ended = true;
                    return Some((Err(error), state));
                }
                None => {
                    state.ended = true;
                    if state.saw_finish {
                        return None;
                    }
                    let error = LlmError::Connection {
                        provider: PROVIDER,
                        message: "the stream ended before the answer finished".into(),
                    };
                    return Some((Err(error), state));
                }
            };
            let data = event.data.trim();
            if data.is_empty() {
                continue;
            }
            if data == "[DONE]" {
                state.ended = true;
                continue;
            }
            match decode_frame(data, &mut state.saw_tool_calls) {
                Ok(chunks) => {
                    state.saw_finish |= chunks
                        .iter()
                        .any(|c| matches!(c, StreamChunk::Finish { .. }));
                    state.pending.extend(chunks);
                }
                Err(error) => {
                    state.ended = true;
                    return Some((Err(error), state));
                }
            }
        }
    }))
}
