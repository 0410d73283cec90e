//! The Anthropic SSE stream: `message_start`, content blocks (`content_block_start`,
//! `content_block_delta`, `content_block_stop`), `message_delta`, `message_stop`, with
//! `ping` keep-alives and `error` events in between.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::Value;

use super::{PROVIDER, WireError, WireUsage, classify, finish_reason};
use crate::error::{LlmError, Result};
use crate::http;
use crate::provider::ChunkStream;
use crate::types::{StreamChunk, Usage};

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: u32,
        content_block: StartBlock,
    },
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaBody,
        usage: Option<WireUsage>,
    },
    MessageStop,
    Ping,
    Error {
        error: WireError,
    },
    /// Event types added after this adapter was written are skipped, as the API asks.
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize)]
struct StartMessage {
    id: Option<String>,
    model: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    /// Thinking, signatures, citations: not part of the unified message.
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
struct MessageDeltaBody {
    stop_reason: Option<String>,
}

/// A tool-use block in progress.
struct ToolBlock {
    /// Its position among the tool calls, which is what the unified stream counts.
    index: u32,
    /// The `input` the start event carried, sent at the block's end if no JSON fragments
    /// followed (some compatible servers give the whole input up front).
    initial_input: Value,
    saw_fragments: bool,
}

#[derive(Default)]
struct State {
    tools: BTreeMap<u32, ToolBlock>,
    usage: WireUsage,
    saw_finish: bool,
}

impl State {
    fn usage(&self) -> Usage {
        self.usage.unified()
    }

    /// Later usage reports are cumulative: each field present replaces the earlier one.
    fn merge_usage(&mut self, usage: WireUsage) {
        let fields = [
            (&mut self.usage.input_tokens, usage.input_tokens),
            (&mut self.usage.output_tokens, usage.output_tokens),
            (
                &mut self.usage.cache_creation_input_tokens,
                usage.cache_creation_input_tokens,
            ),
            (
                &mut self.usage.cache_read_input_tokens,
                usage.cache_read_input_tokens,
            ),
        ];
        for (slot, value) in fields {
            if value.is_some() {
                *slot = value;
            }
        }
    }

    /// What one event means for the unified stream. `Ok(None)` is `message_stop`.
    fn apply(&mut self, event: Event) -> Result<Option<Vec<StreamChunk>>> {
        let mut chunks = Vec::new();
        match event {
            Event::MessageStart { message } => {
                tracing::debug!(
                    provider = %PROVIDER,
                    id = message.id.as_deref().unwrap_or(""),
                    model = message.model.as_deref().unwrap_or(""),
                    "stream started"
                );
                if let Some(usage) = message.usage {
                    self.merge_usage(usage);
                }
            }
            Event::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                StartBlock::Text { text } => {
                    if !text.is_empty() {
                        chunks.push(StreamChunk::TextDelta { text });
                    }
                }
                StartBlock::ToolUse { id, name, input } => {
                    let tool_index = u32::try_from(self.tools.len()).unwrap_or(u32::MAX);
                    self.tools.insert(
                        index,
                        ToolBlock {
                            index: tool_index,
                            initial_input: input,
                            saw_fragments: false,
                        },
                    );
                    chunks.push(StreamChunk::ToolCallDelta {
                        index: tool_index,
                        id: Some(id),
                        name: Some(name),
                        arguments: String::new(),
                    });
                }
                StartBlock::Other => {}
            },
            Event::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } => {
                    if !text.is_empty() {
                        chunks.push(StreamChunk::TextDelta { text });
                    }
                }
                BlockDelta::InputJsonDelta { partial_json } => {
                    let Some(tool) = self.tools.get_mut(&index) else {
                        return Err(LlmError::malformed(
                            PROVIDER,
                            format!("input_json_delta for block {index}, which is no tool_use"),
                        ));
                    };
                    if !partial_json.is_empty() {
                        tool.saw_fragments = true;
                        chunks.push(StreamChunk::ToolCallDelta {
                            index: tool.index,
                            id: None,
                            name: None,
                            arguments: partial_json,
                        });
                    }
                }
                BlockDelta::Other => {}
            },
            Event::ContentBlockStop { index } => {
                if let Some(tool) = self.tools.get_mut(&index) {
                    let input = std::mem::take(&mut tool.initial_input);
                    let has_input = input.as_object().is_some_and(|o| !o.is_empty());
                    if !tool.saw_fragments && has_input {
                        chunks.push(StreamChunk::ToolCallDelta {
                            index: tool.index,
                            id: None,
                            name: None,
                            arguments: input.to_string(),
                        });
                    }
                }
            }
            Event::MessageDelta { delta, usage } => {
                if let Some(usage) = usage {
                    self.merge_usage(usage);
                }
                if let Some(reason) = delta.stop_reason {
                    self.saw_finish = true;
                    chunks.push(StreamChunk::Finish {
                        reason: finish_reason(Some(reason.as_str()), !self.tools.is_empty()),
                    });
                }
            }
            Event::MessageStop => return Ok(None),
            Event::Ping | Event::Unknown => {}
            Event::Error { error } => {
                let message = error
                    .message
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| "error event in the stream".into());
                let status = match error.kind.as_deref() {
                    Some("overloaded_error") => 529,
                    _ => 500,
                };
                return Err(classify(status, error.kind, message, None));
            }
        }
        Ok(Some(chunks))
    }
}

/// Parses one event's data. The `type` field names the event; the `event:` line is only a
/// fallback for servers that leave `type` out. Data that does not read as an event directly
/// (no `type`, or not an event at all) goes through a JSON tree, which takes the name from
/// the `event:` line and words the error.
fn parse_event(event: &http::SseEvent) -> Result<Event> {
    if let Ok(parsed) = serde_json::from_str::<Event>(&event.data) {
        return Ok(parsed);
    }
    let mut value: Value = http::parse_json_str(PROVIDER, &event.data)?;
    if let Value::Object(object) = &mut value
        && !object.contains_key("type")
        && !event.event.is_empty()
        && event.event != "message"
    {
        object.insert("type".into(), Value::String(event.event.clone()));
    }
    serde_json::from_value(value).map_err(|e| {
        LlmError::malformed(
            PROVIDER,
            format!("{e} in the `{}` event {}", event.event, event.data),
        )
    })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<http::SseEvent>> + Send + 'static>>;

struct Decoder {
    events: EventStream,
    state: State,
    pending: VecDeque<StreamChunk>,
    ended: bool,
}

/// Decodes an Anthropic SSE byte stream, up to `message_stop`. The usage arrives in two
/// halves (input in `message_start`, output in `message_delta`) and is emitted once, at
/// `message_stop`, after the finish reason.
pub(crate) fn decode_stream<S>(bytes: S) -> ChunkStream
where
    S: Stream<Item = Result<Bytes>> + Send + 'static,
{
    let decoder = Decoder {
        events: Box::pin(http::sse_events(PROVIDER, bytes)),
        state: State::default(),
        pending: VecDeque::new(),
        ended: false,
    };
    Box::pin(futures::stream::unfold(decoder, |mut d| async move {
        loop {
            if let Some(chunk) = d.pending.pop_front() {
                return Some((Ok(chunk), d));
            }
            if d.ended {
                return None;
            }
            let event = match d.events.next().await {
                Some(Ok(event)) => event,
                Some(Err(error)) => {
                    d.ended = true;
                    return Some((Err(error), d));
                }
                None => {
                    d.ended = true;
                    // A stream that gave its finish reason lost only `message_stop`; the
                    // answer is complete, so keep it.
                    if d.state.saw_finish {
                        let usage = d.state.usage();
                        return Some((Ok(StreamChunk::Usage { usage }), d));
                    }
                    let error = LlmError::Connection {
                        provider: PROVIDER,
                        message: "the stream ended before the answer finished".into(),
                    };
                    return Some((Err(error), d));
                }
            };
            if event.data.trim().is_empty() {
                continue;
            }
            match parse_event(&event).and_then(|event| d.state.apply(event)) {
                Ok(Some(chunks)) => d.pending.extend(chunks),
                Ok(None) => {
                    d.ended = true;
                    let usage = d.state.usage();
                    d.pending.push_back(StreamChunk::Usage { usage });
                }
                Err(error) => {
                    d.ended = true;
                    return Some((Err(error), d));
                }
            }
        }
    }))
}
