//! The monitoring routes: `GET /v1/stats` (JSON snapshot), `GET /` (the
//! status page), `GET /metrics`, and the router of the separate metrics
//! listener (`metrics.listen`).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use convstore_telemetry::stats::LiveQueue;
use convstore_telemetry::{stats, ui};

use super::IngressState;
use super::error::ApiError;

/// Prometheus' text exposition format, version 0.0.4.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /v1/stats`: queue, rates, per-stage percentiles, cache, backends,
/// totals, bottleneck and health, from memory (no database round trip).
pub async fn get_stats(State(state): State<Arc<IngressState>>) -> Response {
    let queue = LiveQueue {
        depth: state.queue.len(),
        capacity: state.queue.capacity(),
        admission_limit: state.queue.admission_limit(),
        bytes: state.queue.bytes(),
        max_bytes: state.queue.max_bytes(),
        accepting: !state.is_shutting_down(),
        journal_writable: state
            .journal()
            .map(|j| j.failure().is_none() && j.unwritable().is_none()),
        oldest_age_seconds: crate::app::oldest_queued_age(&state.queue),
    };
    let snapshot = stats::global().snapshot(queue);
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(snapshot)).into_response()
}

/// `GET /`: the self-contained status page that polls `/v1/stats`.
pub async fn status_page() -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Html(ui::PAGE)).into_response()
}

/// `GET /metrics`: everything recorded, plus the process metrics.
pub async fn metrics(State(state): State<Arc<IngressState>>) -> Response {
    exposition(&state.metrics)
}

fn exposition(handle: &PrometheusHandle) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, EXPOSITION)],
        convstore_telemetry::recorder::render(handle),
    )
        .into_response()
}

/// The router of the separate metrics listener: `/metrics` only, so the
/// address can be opened to a Prometheus server without exposing the API.
pub fn metrics_router(handle: PrometheusHandle) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move { exposition(&handle) }
            }),
        )
        .fallback(|| async {
            ApiError::NotFound("this listener serves only GET /metrics".into()).into_response()
        })
}
