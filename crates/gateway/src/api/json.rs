//! JSON request bodies that fail in the API's error envelope, never in axum's plain-text
//! rejections: a body over `MAX_BODY_BYTES` is 413 `request_too_large`, malformed JSON is 400
//! `invalid_json`, and well-formed JSON of the wrong shape is 422 `invalid_field` with `param`
//! naming the field (`name`, `settings.llm`, …).
//!
//! Use [`JsonBody`] as the last extractor of a handler, or [`RawBody`] and [`parse_json`] when
//! the handler must check something (such as who may touch a tenant) before looking at the
//! body.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::error::Category;

use super::error::ApiError;

/// The raw request body, read within the body limit.
#[derive(Debug, Clone)]
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(request, state)
            .await
            .map(Self)
            .map_err(body_rejection)
    }
}

impl RawBody {
    /// Parses the body as JSON into `T` (see [`parse_json`]).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        parse_json(&self.0)
    }
}

/// A JSON request body parsed into `T`; failures answer in the error envelope.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(request, state).await?;
        parse_json(&bytes).map(Self)
    }
}

/// Parses `bytes` as JSON into `T`. The `Content-Type` is not checked, so `curl -d` works.
///
/// Errors: 400 `invalid_json` for bytes that are not JSON (or JSON that is not an object where
/// one is expected); 422 `invalid_field` naming the field for a wrong type, a missing field or
/// an unknown one. Messages quote no string values from the body, which could be secrets.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Text that is UTF-8 is read as text: serde_json reading bytes checks each string on
    // its own, which costs more than one pass over the body. Other bytes are read as bytes,
    // for serde_json's own error (with its line and column).
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_with(serde_json::Deserializer::from_str(text)),
        Err(_) => parse_with(serde_json::Deserializer::from_slice(bytes)),
    }
}

fn parse_with<'de, R, T>(mut deserializer: serde_json::Deserializer<R>) -> Result<T, ApiError>
where
    R: serde_json::de::Read<'de>,
    T: DeserializeOwned,
{
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        json_error(&path, &error.into_inner())
    })?;
    deserializer.end().map_err(|error| json_error("", &error))?;
    Ok(value)
}

fn json_error(path: &str, error: &serde_json::Error) -> ApiError {
    match error.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!(
                "the request body is not valid JSON (line {}, column {})",
                error.line(),
                error.column()
            ),
        ),
        Category::Data => data_error(path, error),
    }
}

/// A well-formed body of the wrong shape: name the field and say what was expected.
fn data_error(path: &str, error: &serde_json::Error) -> ApiError {
    let message = scrub(&error.to_string());
    let at_root = path.is_empty() || path == ".";
    // The path of an unknown field ends with the field; that of a missing one is its parent.
    let param = match quoted_field(&message, "missing field `")
        .or_else(|| quoted_field(&message, "unknown field `"))
    {
        Some(field) if at_root => Some(field.to_owned()),
        Some(field) if path == field || path.ends_with(&format!(".{field}")) => {
            Some(path.to_owned())
        }
        Some(field) => Some(format!("{path}.{field}")),
        None if at_root => None,
        None => Some(path.to_owned()),
    };
    match param {
        Some(param) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("{param}: {message}"),
        )
        .with_param(param),
        None => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the request body must be a JSON object",
        ),
    }
}

/// The name in ``missing field `name` ``-style messages.
fn quoted_field<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = &message[message.find(prefix)? + prefix.len()..];
    rest.split('`').next()
}

/// serde_json quotes a mistyped string value (`invalid type: string "sk-…", expected u64`);
/// keep the type, drop the value, so no secret sent in the wrong place is echoed. Also drops
/// the ` at line 1 column 14` suffix.
pub fn scrub(message: &str) -> String {
    let Some(start) = message.find("string \"") else {
        return strip_position(message).to_owned();
    };
    let value_start = start + "string \"".len();
    let rest = &message[value_start..];
    // The value ends at the last `", ` (the value itself may contain quotes).
    let end = rest.rfind("\", ").unwrap_or(rest.len());
    let tail = rest.get(end + 1..).unwrap_or("");
    format!("{}string{}", &message[..start], strip_position(tail))
}

/// Drops serde_json's ` at line 1 column 14` suffix: positions are noise next to `param`.
fn strip_position(message: &str) -> &str {
    message
        .rfind(" at line ")
        .map_or(message, |i| &message[..i])
}

/// Maps axum's body rejections: over the limit is 413 in the envelope, anything else 400.
fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            "the request body is larger than MAX_BODY_BYTES allows",
        )
    } else {
        tracing::debug!(error = %rejection.body_text(), "could not read the request body");
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the request body could not be read",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        #[serde(default)]
        limits: Option<Limits>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Limits {
        per_minute: u64,
    }

    fn err(body: &str) -> ApiError {
        parse_json::<Body>(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn syntax_errors_are_400() {
        for body in [
            "",
            "{",
            "{\"name\": }",
            "nope",
            "{\"name\": \"a\"} trailing",
        ] {
            let e = err(body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.code, "invalid_json", "{body}");
        }
    }

    #[test]
    fn bodies_that_are_not_utf8_are_400_with_their_position() {
        // Invalid UTF-8 inside a string, and a well-formed body around it.
        let bytes = b"{\"name\": \"caf\xe9\"}";
        let e = parse_json::<Body>(bytes).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.code, "invalid_json");
        assert!(e.message.contains("line 1, column"), "{}", e.message);
        // The same body in UTF-8 parses.
        let body: Body = parse_json("{\"name\": \"caf\u{e9}\"}".as_bytes()).unwrap();
        assert_eq!(body.name, "caf\u{e9}");
    }

    #[test]
    fn wrong_shapes_name_the_field() {
        for (body, param) in [
            (r#"{"name": 5}"#, "name"),
            (r#"{}"#, "name"),
            (r#"{"name": "a", "extra": 1}"#, "extra"),
            (
                r#"{"name": "a", "limits": {"per_minute": "x"}}"#,
                "limits.per_minute",
            ),
            (r#"{"name": "a", "limits": {}}"#, "limits.per_minute"),
            (
                r#"{"name": "a", "limits": {"per_minute": 1, "b": 2}}"#,
                "limits.b",
            ),
        ] {
            let e = err(body);
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
        assert_eq!(err("[]").code, "invalid_json");
    }

    #[test]
    fn mistyped_strings_are_not_echoed() {
        let e = err(r#"{"name": "a", "limits": {"per_minute": "sk-secret\", 1"}}"#);
        assert!(!e.message.contains("sk-secret"), "{}", e.message);
        assert!(e.message.contains("expected u64"), "{}", e.message);
        let e = err(r#"{"name": "a", "limits": {"per_minute": "sk-secret"}}"#);
        assert!(!e.message.contains("sk-secret"), "{}", e.message);
    }

    #[test]
    fn good_bodies_parse() {
        let body: Body = parse_json(br#"{"name": "a", "limits": {"per_minute": 3}}"#).unwrap();
        assert_eq!(body.name, "a");
    }
}
