//! The common Chat Completions request read straight into typed fields, without a JSON
//! tree: text messages (`system`, `developer`, `user`, `assistant` without tool calls,
//! `tool`), `model`, the token limits, `temperature`, `top_p`, `stop`, `stream` and
//! `stream_options`. Anything else — tools, content parts, `metadata`, fields the gateway
//! passes through, a value out of range or of the wrong type, a repeated field, invalid
//! JSON — makes [`parse`] give up, and the request is read by the tree parser, which
//! handles every shape and words the errors. Whenever [`parse`] succeeds its result is
//! the tree parser's (checked by a property test against generated requests).

use std::borrow::Cow;

use meta_chat_llm::types::{CompletionRequest, Extra, Message};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::ChatCompletionsRequest;
use crate::api::codec_util::DEFAULT_MODEL;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    messages: Vec<WireMessage<'a>>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(borrow, default)]
    stop: Option<Stop<'a>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

/// One message. Fields the tree parser reads but this one does not are declared so that a
/// message carrying them (not `null`) gives up; other fields are ignored by both.
#[derive(Deserialize)]
struct WireMessage<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_call_id: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<IgnoredAny>,
    #[serde(default)]
    function_call: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The request, when it has the common shape; `None` sends it to the tree parser.
pub(super) fn parse(body: &[u8]) -> Option<ChatCompletionsRequest> {
    // A body that does not parse (not UTF-8 included) goes to the tree parser, which reports it.
    let wire: Request<'_> = meta_chat_llm::json_from_bytes(body).ok()?;
    if wire.messages.is_empty() {
        return None;
    }
    let messages = wire
        .messages
        .into_iter()
        .map(message)
        .collect::<Option<Vec<_>>>()?;
    let positive = |n: Option<u32>| match n {
        Some(0) => None,
        other => Some(other),
    };
    let max_completion_tokens = positive(wire.max_completion_tokens)?;
    let max_tokens = positive(wire.max_tokens)?;
    let ranged = |x: Option<f64>, max: f64| match x {
        Some(x) if !(0.0..=max).contains(&x) => None,
        other => Some(other.map(|x| x as f32)),
    };
    let temperature = ranged(wire.temperature, 2.0)?;
    let top_p = ranged(wire.top_p, 1.0)?;
    let stop = match wire.stop {
        None => Vec::new(),
        Some(Stop::One(one)) => vec![one.into_owned()],
        Some(Stop::Many(many)) => many.into_iter().map(Cow::into_owned).collect(),
    };
    Some(ChatCompletionsRequest {
        model: wire
            .model
            .filter(|m| !m.is_empty() && m != DEFAULT_MODEL)
            .map(Cow::into_owned),
        stream: wire.stream.unwrap_or(false),
        include_usage: wire
            .stream_options
            .and_then(|options| options.include_usage)
            .unwrap_or(false),
        request: CompletionRequest {
            model: None,
            messages,
            tools: Vec::new(),
            tool_choice: None,
            temperature,
            max_tokens: max_completion_tokens.or(max_tokens),
            top_p,
            stop,
            extra: Extra::default(),
        },
        conversation_id: None,
    })
}

fn message(wire: WireMessage<'_>) -> Option<Message> {
    if wire.tool_calls.is_some() || wire.function_call.is_some() {
        return None;
    }
    let content = wire.content.map(Cow::into_owned);
    Some(match wire.role.as_ref() {
        "system" | "developer" => Message::System { content: content? },
        "user" => Message::User { content: content? },
        "assistant" => Message::Assistant {
            content: content.unwrap_or_default(),
            tool_calls: Vec::new(),
        },
        "tool" => Message::Tool {
            tool_call_id: wire.tool_call_id?.into_owned(),
            content: content?,
        },
        _ => return None,
    })
}
