//! Request-parsing helpers shared by the ingress codecs ([`super::openai_codec`] and
//! [`super::anthropic_codec`]): error constructors and small typed readers over JSON values.
//!
//! The codecs word some errors differently (OpenAI names the parameter in the message,
//! Anthropic puts it in front of the message when encoding the error), so the readers are
//! provided methods of [`FieldReader`], which each codec implements with its own wording.

use axum::http::StatusCode;
use serde_json::{Map, Value};

use super::error::ApiError;

pub(super) type Parsed<T> = Result<T, ApiError>;

/// The model name that means "the tenant's configured model".
pub(super) const DEFAULT_MODEL: &str = "default";

pub(super) fn bad_request(
    code: &'static str,
    param: impl Into<String>,
    message: impl Into<String>,
) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message).with_param(param)
}

/// Appends `value` as compact JSON. Serializing a string or a JSON value into memory cannot
/// fail: nothing here has non-string map keys or a writer that errs.
pub(super) fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    if let Err(error) = serde_json::to_writer(out, value) {
        tracing::error!(%error, "serializing a stream event");
    }
}

/// A JSON type name for error messages.
pub(super) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(super) fn invalid_value(param: &str, message: impl Into<String>) -> ApiError {
    bad_request("invalid_value", param, message)
}

/// The request body as a JSON object.
pub(super) fn parse_body(body: &[u8]) -> Parsed<Map<String, Value>> {
    let value: Value = meta_chat_llm::json_from_bytes(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_type",
            format!(
                "the request body must be a JSON object, got {}",
                kind(&other)
            ),
        )),
    }
}

/// `None` and JSON `null` both mean "absent".
pub(super) fn present(value: Option<&Value>) -> Option<&Value> {
    value.filter(|v| !v.is_null())
}

/// Small typed readers, worded by the implementing codec.
pub(super) trait FieldReader {
    /// `param` has the wrong JSON type.
    fn invalid_type(param: &str, expected: &str, got: &Value) -> ApiError;

    /// The required `param` is absent.
    fn missing(param: &str) -> ApiError;

    /// The message for a value of `param` that breaks `rule` (for example `must be …`).
    fn must(param: &str, rule: String) -> String;

    fn opt_str<'a>(value: Option<&'a Value>, param: &str) -> Parsed<Option<&'a str>> {
        match present(value) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(Self::invalid_type(param, "a string", other)),
        }
    }

    fn req_str<'a>(value: Option<&'a Value>, param: &str) -> Parsed<&'a str> {
        Self::opt_str(value, param)?.ok_or_else(|| Self::missing(param))
    }

    fn opt_bool(value: Option<&Value>, param: &str) -> Parsed<Option<bool>> {
        match present(value) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(Self::invalid_type(param, "a boolean", other)),
        }
    }

    fn opt_object<'a>(
        value: Option<&'a Value>,
        param: &str,
    ) -> Parsed<Option<&'a Map<String, Value>>> {
        match present(value) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(map)),
            Some(other) => Err(Self::invalid_type(param, "an object", other)),
        }
    }

    fn req_object<'a>(value: Option<&'a Value>, param: &str) -> Parsed<&'a Map<String, Value>> {
        Self::opt_object(value, param)?.ok_or_else(|| Self::missing(param))
    }

    fn opt_array<'a>(value: Option<&'a Value>, param: &str) -> Parsed<Option<&'a [Value]>> {
        match present(value) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(Self::invalid_type(param, "an array", other)),
        }
    }

    /// A number within `min..=max`.
    fn opt_ranged(value: Option<&Value>, param: &str, min: f64, max: f64) -> Parsed<Option<f32>> {
        match present(value) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if (min..=max).contains(&x) {
                    Ok(Some(x as f32))
                } else {
                    Err(invalid_value(
                        param,
                        Self::must(param, format!("must be between {min} and {max}, got {n}")),
                    ))
                }
            }
            Some(other) => Err(Self::invalid_type(param, "a number", other)),
        }
    }

    /// A positive integer that fits in `u32`.
    fn opt_positive_u32(value: Option<&Value>, param: &str) -> Parsed<Option<u32>> {
        match present(value) {
            None => Ok(None),
            Some(Value::Number(n)) if n.is_u64() || n.is_i64() => {
                match n.as_u64().and_then(|x| u32::try_from(x).ok()) {
                    Some(x) if x > 0 => Ok(Some(x)),
                    _ => Err(invalid_value(
                        param,
                        Self::must(
                            param,
                            format!(
                                "must be a positive integer of at most {}, got {n}",
                                u32::MAX
                            ),
                        ),
                    )),
                }
            }
            Some(other) => Err(Self::invalid_type(param, "an integer", other)),
        }
    }

    /// `metadata`: its `conversation_id` (trimmed; `None` when empty), the other entries kept
    /// in `extra` as `metadata`.
    fn metadata(value: Option<&Value>, extra: &mut Map<String, Value>) -> Parsed<Option<String>> {
        let Some(metadata) = Self::opt_object(value, "metadata")? else {
            return Ok(None);
        };
        let conversation_id =
            Self::opt_str(metadata.get("conversation_id"), "metadata.conversation_id")?
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned);
        let rest: Map<String, Value> = metadata
            .iter()
            .filter(|(key, _)| key.as_str() != "conversation_id")
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        if !rest.is_empty() {
            extra.insert("metadata".to_owned(), Value::Object(rest));
        }
        Ok(conversation_id)
    }
}
