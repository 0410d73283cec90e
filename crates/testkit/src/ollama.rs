//! Placeholder; replaced by the dialect's full fake.

use axum::extract::State;
use axum::http::StatusCode;

use crate::Shared;

pub(crate) async fn chat(State(_shared): State<Shared>) -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub(crate) async fn embed(State(_shared): State<Shared>) -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
pub(crate) async fn tags(State(_shared): State<Shared>) -> StatusCode {
    StatusCode::NOT_IMPLEMENTED
}
