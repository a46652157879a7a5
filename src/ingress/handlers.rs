//! The HTTP handlers. Each answers from memory, except reads and readiness,
//! which ask the store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use serde_json::json;

use crate::config::WhenFull;
use crate::model::Conversation;
use crate::queue::PushError;
use crate::telemetry::metrics as m;

use super::error::{ApiError, ErrorBody};
use super::validate::{conversation_from_value, parse_conversation};
use super::{IngressState, Transport};

type AppState = State<Arc<IngressState>>;

#[derive(Serialize)]
struct Accepted {
    id: String,
    status: &'static str,
}

/// `POST /v1/conversations`: one conversation → 202 `{"id","status":"queued"}`.
pub async fn post_conversation(
    State(state): AppState,
    Extension(transport): Extension<Transport>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = accept_one(&state, transport, &headers, body).await;
    let outcome = match &result {
        Ok(_) => "accepted",
        Err(e) => e.code(),
    };
    metrics::counter!(m::INGEST_REQUESTS, "transport" => transport.as_str(), "endpoint" => "conversations", "outcome" => outcome)
        .increment(1);
    metrics::counter!(m::INGEST_CONVERSATIONS, "transport" => transport.as_str(), "outcome" => outcome).increment(1);
    match result {
        Ok(accepted) => (StatusCode::ACCEPTED, axum::Json(accepted)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn accept_one(
    state: &IngressState,
    _transport: Transport,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, ApiError> {
    refuse_if_shutting_down(state)?;
    require_content_type(headers, false)?;
    let bytes = read_body(state, headers, body).await?;
    let started = Instant::now();
    let conversation = parse_conversation(&bytes, state.limits)?;
    let accepted = Accepted {
        id: response_id(&conversation),
        status: "queued",
    };
    enqueue(state, conversation).await?;
    metrics::histogram!(m::ENQUEUE_SECONDS).record(started.elapsed().as_secs_f64());
    Ok(accepted)
}

/// The id the caller knows: its own when it gave one.
fn response_id(conversation: &Conversation) -> String {
    match &conversation.client_id {
        Some(cid) => cid.clone(),
        None => conversation.id.to_string(),
    }
}

async fn enqueue(state: &IngressState, conversation: Conversation) -> Result<(), ApiError> {
    let bytes = conversation.approx_bytes();
    let pushed = match state.when_full {
        WhenFull::Reject => state.queue.try_push(conversation, bytes),
        WhenFull::Block => {
            state
                .queue
                .push_timeout(conversation, bytes, state.block_timeout)
                .await
        }
    };
    match pushed {
        Ok(()) => Ok(()),
        Err(PushError::Full(_)) => Err(ApiError::QueueFull {
            retry_after_secs: state.retry_after_secs,
        }),
        Err(PushError::TooLarge(_)) => Err(ApiError::PayloadTooLarge(format!(
            "the conversation needs about {bytes} bytes of queue; queue.max_bytes is {}",
            state.queue.max_bytes()
        ))),
        Err(PushError::Closed(_)) => {
            Err(ApiError::Unavailable("convstore is shutting down".into()))
        }
    }
}

fn refuse_if_shutting_down(state: &IngressState) -> Result<(), ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::Unavailable("convstore is shutting down".into()));
    }
    Ok(())
}

/// `application/json` always; `application/x-ndjson` where `ndjson_ok`.
/// Returns whether the body is NDJSON.
fn require_content_type(headers: &HeaderMap, ndjson_ok: bool) -> Result<bool, ApiError> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(false),
        "application/x-ndjson" | "application/jsonl" | "application/jsonlines" if ndjson_ok => {
            Ok(true)
        }
        _ => {
            let accepted = if ndjson_ok {
                "application/json or application/x-ndjson"
            } else {
                "application/json"
            };
            let got = if value.is_empty() { "none" } else { value };
            Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type must be {accepted}; got {got}"
            )))
        }
    }
}

async fn read_body(
    state: &IngressState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    let limit = state.max_body_bytes;
    let too_large =
        || ApiError::PayloadTooLarge(format!("body over server.max_body_bytes ({limit} bytes)"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(ApiError::BadRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

#[derive(Serialize)]
struct ItemResult {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody>,
}

#[derive(Serialize)]
struct BatchResponse {
    accepted: usize,
    rejected: usize,
    results: Vec<ItemResult>,
}

/// `POST /v1/conversations/batch`: a JSON array or NDJSON; every item is
/// validated and queued on its own, with a result per item. 202 when any
/// item was accepted; otherwise the status of the first failure (400, 429…).
pub async fn post_batch(
    State(state): AppState,
    Extension(transport): Extension<Transport>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = accept_batch(&state, &headers, body).await;
    let (response, accepted, rejected, outcome) = match result {
        Ok((resp, first_error)) => {
            let accepted = resp.accepted;
            let rejected = resp.rejected;
            let status = if accepted > 0 {
                StatusCode::ACCEPTED
            } else {
                first_error
                    .as_ref()
                    .map_or(StatusCode::BAD_REQUEST, ApiError::status)
            };
            let outcome = if rejected == 0 {
                "accepted"
            } else if accepted > 0 {
                "partial"
            } else {
                first_error.as_ref().map_or("invalid_field", ApiError::code)
            };
            let mut response = (status, axum::Json(resp)).into_response();
            if let Some(ApiError::QueueFull { retry_after_secs }) =
                first_error.filter(|e| matches!(e, ApiError::QueueFull { .. }))
            {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, retry_after_secs.into());
            }
            (response, accepted, rejected, outcome)
        }
        Err(e) => {
            let outcome = e.code();
            (e.into_response(), 0, 0, outcome)
        }
    };
    let t = transport.as_str();
    metrics::counter!(m::INGEST_REQUESTS, "transport" => t, "endpoint" => "batch", "outcome" => outcome).increment(1);
    metrics::counter!(m::INGEST_CONVERSATIONS, "transport" => t, "outcome" => "accepted")
        .increment(accepted as u64);
    metrics::counter!(m::INGEST_CONVERSATIONS, "transport" => t, "outcome" => "rejected")
        .increment(rejected as u64);
    response
}

async fn accept_batch(
    state: &IngressState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(BatchResponse, Option<ApiError>), ApiError> {
    refuse_if_shutting_down(state)?;
    let ndjson = require_content_type(headers, true)?;
    let bytes = read_body(state, headers, body).await?;
    let items = split_items(&bytes, ndjson, state.max_batch_items)?;
    let mut results = Vec::with_capacity(items.len());
    let mut first_error = None;
    let (mut accepted, mut rejected) = (0, 0);
    // A full queue rejects the rest of the batch without trying each item,
    // keeping the order of what was accepted a prefix of what was sent.
    let mut queue_full: Option<ApiError> = None;
    for (index, item) in items.into_iter().enumerate() {
        let started = Instant::now();
        let outcome = match (item, &queue_full) {
            (_, Some(full)) => Err(full.clone()),
            (Err(e), None) => Err(e),
            (Ok(value), None) => match conversation_from_value(value, state.limits) {
                Ok(conversation) => {
                    let id = response_id(&conversation);
                    enqueue(state, conversation).await.map(|()| id)
                }
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok(id) => {
                metrics::histogram!(m::ENQUEUE_SECONDS).record(started.elapsed().as_secs_f64());
                accepted += 1;
                results.push(ItemResult {
                    index,
                    id: Some(id),
                    status: "queued",
                    error: None,
                });
            }
            Err(e) => {
                rejected += 1;
                if matches!(e, ApiError::QueueFull { .. } | ApiError::Unavailable(_)) {
                    queue_full = Some(e.clone());
                }
                results.push(ItemResult {
                    index,
                    id: None,
                    status: "rejected",
                    error: Some(e.body()),
                });
                first_error.get_or_insert(e);
            }
        }
    }
    Ok((
        BatchResponse {
            accepted,
            rejected,
            results,
        },
        first_error,
    ))
}

/// The batch's items as JSON values; an unparsable NDJSON line becomes that
/// item's error, while an unparsable JSON array fails the whole request.
fn split_items(
    bytes: &[u8],
    ndjson: bool,
    max_items: usize,
) -> Result<Vec<Result<serde_json::Value, ApiError>>, ApiError> {
    let items: Vec<Result<serde_json::Value, ApiError>> = if ndjson {
        bytes
            .split(|&b| b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(|line| {
                serde_json::from_slice(line)
                    .map_err(|e| ApiError::invalid_json(format!("line is not valid JSON: {e}")))
            })
            .collect()
    } else {
        let values: Vec<serde_json::Value> = serde_json::from_slice(bytes).map_err(|e| {
            ApiError::invalid_json(format!("body must be a JSON array of conversations: {e}"))
        })?;
        values.into_iter().map(Ok).collect()
    };
    if items.is_empty() {
        return Err(ApiError::BadRequest("the batch is empty".into()));
    }
    if items.len() > max_items {
        return Err(ApiError::PayloadTooLarge(format!(
            "{} items; at most {max_items} per batch (server.max_batch_items)",
            items.len()
        )));
    }
    Ok(items)
}

/// `GET /v1/conversations/{id}`: by row id (UUID) or by the caller's id.
pub async fn get_conversation(State(state): AppState, Path(id): Path<String>) -> Response {
    let found = match uuid::Uuid::parse_str(&id) {
        Ok(uuid) => state.store.get_conversation(uuid).await,
        Err(_) => state.store.get_conversation_by_client_id(&id).await,
    };
    match found {
        Ok(Some(view)) => (StatusCode::OK, axum::Json(view)).into_response(),
        Ok(None) => {
            ApiError::NotFound(format!("no stored conversation with id `{id}`")).into_response()
        }
        Err(e) => ApiError::Unavailable(format!("database unavailable: {e}")).into_response(),
    }
}

/// `GET /healthz`: the process is alive and serving.
pub async fn healthz() -> Response {
    (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
}

/// Fraction of the queue above which the daemon reports not ready, so load
/// balancers steer traffic away before clients see 429s.
const SATURATED: f64 = 0.9;

/// `GET /readyz`: 200 when the database answers, the queue is not
/// saturated and the daemon is not shutting down; 503 with the reasons otherwise.
pub async fn readyz(State(state): AppState) -> Response {
    let mut reasons = Vec::new();
    if state.is_shutting_down() {
        reasons.push("shutting down".to_string());
    }
    let depth = state.queue.len();
    let capacity = state.queue.capacity();
    if depth as f64 >= capacity as f64 * SATURATED {
        reasons.push(format!("queue saturated ({depth}/{capacity})"));
    }
    let database = match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => {
            reasons.push(format!("database: {e}"));
            "unreachable".to_string()
        }
        Err(_) => {
            reasons.push("database: no answer within 2 s".to_string());
            "timeout".to_string()
        }
    };
    let ready = reasons.is_empty();
    metrics::gauge!(m::READY).set(if ready { 1.0 } else { 0.0 });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "reasons": reasons,
        "queue": {"depth": depth, "capacity": capacity},
        "database": database,
    });
    (status, axum::Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text exposition format.
pub async fn metrics(State(state): AppState) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn not_found() -> Response {
    ApiError::NotFound("no such route; see README.md for the API".into()).into_response()
}
