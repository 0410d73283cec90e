//! Dashboard pages (see [`super`]).

use axum::Router;

use crate::api::AppState;

/// This module's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
}
