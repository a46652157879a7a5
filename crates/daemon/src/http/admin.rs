//! Operator actions under `/v1/admin/` (the `admin` scope).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use convstore_telemetry::metrics as m;

use super::IngressState;
use super::error::ApiError;

/// The answer to a redrive.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Redriven {
    /// Chunks put back from `failed` to `pending`.
    chunks: u64,
    /// Their conversations.
    conversations: u64,
}

/// `POST /v1/admin/redrive`: every chunk marked `failed` (a backend
/// refused it, or its attempts ran out) goes back to `pending`, its
/// attempts and error cleared; the backfill embeds it again as soon as a
/// backend is ready. Safe to repeat.
#[utoipa::path(
    post,
    path = "/v1/admin/redrive",
    tag = "admin",
    responses(
        (status = 200, description = "Failed chunks put back to pending", body = Redriven),
        (status = 401, description = "Bearer token missing or unknown", body = super::error::ErrorEnvelope),
        (status = 503, description = "The database is unreachable: nothing changed", body = super::error::ErrorEnvelope),
    )
)]
pub async fn redrive(State(state): State<Arc<IngressState>>) -> Response {
    // On its own task: a client that hangs up does not cancel it midway
    // (it is one statement, but the answer should match what happened).
    let store = state.store.clone();
    let done = tokio::spawn(async move { store.redrive_failed().await }).await;
    match done {
        Ok(Ok(r)) => {
            metrics::counter!(m::CHUNKS_REDRIVEN).increment(r.chunks);
            tracing::info!(
                chunks = r.chunks,
                conversations = r.conversations,
                "Re-drove failed chunks: pending again, for the backfill"
            );
            axum::Json(Redriven {
                chunks: r.chunks,
                conversations: r.conversations,
            })
            .into_response()
        }
        Ok(Err(e)) => ApiError::from(e).into_response(),
        Err(e) => ApiError::Internal(format!("the redrive failed: {e}")).into_response(),
    }
}
