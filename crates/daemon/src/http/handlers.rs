//! The HTTP handlers. Each answers from memory, except reads and readiness,
//! which ask the store.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument as _;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use convstore_telemetry::events;
use convstore_telemetry::metrics as m;

use super::error::{ApiError, ErrorBody};
use super::intake::{Reached, Wait, WaitLevel, admit, parse_wait, wait_for};
use super::{IngressState, Transport};
use convstore_core::batch_body::split_items;
use convstore_core::lifecycle::Change;
use convstore_core::validate::{parse_batch_item, parse_conversation, row_id};
use convstore_telemetry::events::label;

type AppState = State<Arc<IngressState>>;

/// What an accepted conversation's request is answered.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Accepted {
    /// The caller's id, or the UUID assigned when it gave none.
    id: String,
    /// The level reached: `queued`, `durable` or `stored`.
    #[schema(example = "queued")]
    status: &'static str,
}

impl Accepted {
    pub(super) fn new(id: String, status: &'static str) -> Self {
        Self { id, status }
    }
}

/// `POST /v1/conversations`: one conversation → 202
/// `{"id","status":"queued"|"durable"}`, or 201 `{"id","status":"stored"}`
/// with `?wait=stored`.
#[utoipa::path(
    post,
    path = "/v1/conversations",
    tag = "ingest",
    params(WaitParams),
    request_body(content = convstore_core::validate::ConversationIn, content_type = "application/json"),
    responses(
        (status = 201, description = "Stored (`?wait=stored`)", body = Accepted),
        (status = 202, description = "Queued, or durable (`?wait=durable`)", body = Accepted),
        (status = 400, description = "Invalid JSON, field, or query parameter", body = super::error::ErrorEnvelope),
        (status = 401, description = "Bearer token missing or unknown", body = super::error::ErrorEnvelope),
        (status = 408, description = "The body did not arrive within `server.body_timeout_ms`", body = super::error::ErrorEnvelope),
        (status = 413, description = "Body or conversation too large", body = super::error::ErrorEnvelope),
        (status = 415, description = "Not application/json", body = super::error::ErrorEnvelope),
        (status = 429, description = "Queue or journal full, or rate limited; see Retry-After", body = super::error::ErrorEnvelope),
        (status = 500, description = "Accepted but refused by the database or lost (with id)", body = super::error::ErrorEnvelope),
        (status = 503, description = "Shutting down, the journal cannot write (`journal_unwritable`, disk full: see Retry-After) or is unusable, or request bodies hold `server.max_buffered_body_bytes` (`bodies_full`, see Retry-After)", body = super::error::ErrorEnvelope),
        (status = 504, description = "Accepted, but the wait ended first (with id): poll GET /v1/conversations/{id}", body = super::error::ErrorEnvelope),
    )
)]
pub async fn post_conversation(
    State(state): AppState,
    State(transport): State<Transport>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let span = request_span("conversation.post", &parts.headers);
    let result = accept_one(&state, transport, parts.uri.query(), &parts.headers, body)
        .instrument(span)
        .await;
    match &result {
        Ok(_) => {
            let accepted = state.hot_metrics.accepted_on(transport);
            accepted.conversation_requests.increment(1);
            accepted.conversations.increment(1);
        }
        Err(e) => {
            let (t, code) = (transport.as_str(), e.code());
            metrics::counter!(m::INGEST_REQUESTS, label::TRANSPORT => t, label::ENDPOINT => "conversations", label::OUTCOME => code)
                .increment(1);
            events::ingest(t, code, 1);
        }
    }
    match result {
        Ok((reached, accepted)) => (reached.status(), axum::Json(accepted)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The span of a request, continuing its `traceparent`; none when traces
/// are off (`convstore_telemetry::traces`).
pub(super) fn request_span(name: &'static str, headers: &HeaderMap) -> tracing::Span {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    convstore_telemetry::traces::request_span(name, header("traceparent"), header("tracestate"))
}

/// `?wait=` and `?timeout_ms=` (documentation only: parsed by [`parse_wait`]).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct WaitParams {
    /// `queued` (default), `durable` (journal fsynced; without a journal,
    /// as `stored`) or `stored` (committed in PostgreSQL).
    #[param(inline, value_type = Option<String>, pattern = "^(queued|durable|stored)$")]
    wait: Option<String>,
    /// How long to wait for that level (default `ack.timeout_ms`, at most
    /// `ack.max_timeout_ms`); past it, 504 with the id.
    #[param(minimum = 1)]
    timeout_ms: Option<u64>,
}

pub(super) fn wait_of(state: &IngressState, query: Option<&str>) -> Result<Wait, ApiError> {
    let limits = state.limits();
    parse_wait(
        query,
        limits.ack_timeout,
        limits.max_ack_timeout,
        // The stream's acknowledgement is this mode's fsynced journal.
        state.journal().is_some() || state.shared_intake().is_some(),
    )
}

async fn accept_one(
    state: &IngressState,
    _transport: Transport,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Reached, Accepted), ApiError> {
    refuse_if_shutting_down(state)?;
    let wait = wait_of(state, query)?;
    require_content_type(headers, false)?;
    let bytes = read_body(state, headers, body).await?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + wait.timeout;
    let conversation = parse_conversation(&bytes, state.limits().validation)?;
    // The conversation is parsed: from here the queue accounts its bytes.
    drop(bytes);
    let admitted = admit(state, Change::Post(conversation), wait.level).await?;
    state
        .hot_metrics
        .enqueue_seconds
        .record(started.elapsed().as_secs_f64());
    if wait.level == WaitLevel::Queued {
        // Nothing to wait for (the default): the id goes back as it is.
        let reached = Reached::Queued;
        return Ok((reached, Accepted::new(admitted.id, reached.as_str())));
    }
    let id = admitted.id.clone();
    let reached = wait_for(state, admitted, wait.level, deadline).await?;
    Ok((reached, Accepted::new(id, reached.as_str())))
}

fn refuse_if_shutting_down(state: &IngressState) -> Result<(), ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::Unavailable("convstore is shutting down".into()));
    }
    Ok(())
}

/// `application/json` always; `application/x-ndjson` where `ndjson_ok`.
/// Returns whether the body is NDJSON.
pub(super) fn require_content_type(headers: &HeaderMap, ndjson_ok: bool) -> Result<bool, ApiError> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = value.split(';').next().unwrap_or("").trim();
    // Compared without case, in place: lower-casing a copy was an
    // allocation on every request.
    let is = |name: &str| mime.eq_ignore_ascii_case(name);
    if is("application/json") {
        return Ok(false);
    }
    if ndjson_ok
        && [
            "application/x-ndjson",
            "application/jsonl",
            "application/jsonlines",
        ]
        .into_iter()
        .any(is)
    {
        return Ok(true);
    }
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

/// The request body, read within the body deadline and budget
/// ([`super::body`]).
pub(super) async fn read_body(
    state: &IngressState,
    headers: &HeaderMap,
    body: Body,
) -> Result<super::body::ReadBody, ApiError> {
    let limits = state.limits();
    let body_limits = super::body::BodyLimits {
        max_body_bytes: limits.max_body_bytes,
        timeout: limits.body_timeout,
        retry_after_secs: limits.retry_after_secs,
    };
    super::body::read(&state.body_budget, body_limits, headers, body).await
}

/// One item's result in a batch answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ItemResult {
    /// Position in the request, from 0.
    index: usize,
    /// Present when the item was accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    /// `queued`, `durable`, `stored`; `rejected` (never accepted: see
    /// `error`); `unfinished` (accepted, but the wait ended first: see
    /// `error`, poll by `id`).
    #[schema(example = "queued")]
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<super::error::ErrorBody>)]
    error: Option<ErrorBody>,
}

/// The answer to a batch.
#[derive(Serialize, utoipa::ToSchema)]
pub struct BatchResponse {
    accepted: usize,
    rejected: usize,
    results: Vec<ItemResult>,
}

/// `POST /v1/conversations/batch`: a JSON array or NDJSON; every item is
/// validated and queued on its own, with a result per item. When any item
/// was accepted: 201 (`?wait=stored`, all stored), 202 (queued or durable),
/// or the status of the first wait that ended early (504, 503, 500). When
/// none was: the status of the first failure (400, 429…).
#[utoipa::path(
    post,
    path = "/v1/conversations/batch",
    tag = "ingest",
    params(WaitParams),
    request_body(
        description = "A JSON array of conversations, or NDJSON (one per line)",
        content(
            (Vec<convstore_core::validate::ConversationIn> = "application/json"),
            (String = "application/x-ndjson"),
        )
    ),
    responses(
        (status = 201, description = "Every item stored (`?wait=stored`)", body = BatchResponse),
        (status = 202, description = "Items accepted; per-item results", body = BatchResponse),
        (status = 400, description = "Invalid body or every item invalid", body = BatchResponse),
        (status = 401, description = "Bearer token missing or unknown", body = super::error::ErrorEnvelope),
        (status = 408, description = "The body did not arrive within `server.body_timeout_ms`", body = super::error::ErrorEnvelope),
        (status = 413, description = "Body or item count too large", body = super::error::ErrorEnvelope),
        (status = 415, description = "Not JSON or NDJSON", body = super::error::ErrorEnvelope),
        (status = 429, description = "Queue or journal full, or rate limited; see Retry-After", body = BatchResponse),
        (status = 500, description = "An accepted item was refused by the database or lost", body = BatchResponse),
        (status = 503, description = "Shutting down, the journal cannot write (`journal_unwritable`: see Retry-After), or request bodies hold `server.max_buffered_body_bytes` (`bodies_full`, see Retry-After)", body = super::error::ErrorEnvelope),
        (status = 504, description = "Accepted, but a wait ended first: poll by id", body = BatchResponse),
    )
)]
pub async fn post_batch(
    State(state): AppState,
    State(transport): State<Transport>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let span = request_span("conversations.batch", &parts.headers);
    let result = accept_batch(&state, parts.uri.query(), &parts.headers, body)
        .instrument(span)
        .await;
    let (response, accepted, rejected, outcome) = match result {
        Ok(batch) => {
            let BatchOutcome {
                response: resp,
                first_error,
                wait_failure,
                reached,
            } = batch;
            let accepted = resp.accepted;
            let rejected = resp.rejected;
            let status = match (&wait_failure, accepted) {
                (Some(e), _) => e.status(),
                (None, 0) => first_error
                    .as_ref()
                    .map_or(StatusCode::BAD_REQUEST, ApiError::status),
                (None, _) => reached.status(),
            };
            let outcome = if rejected == 0 {
                "accepted"
            } else if accepted > 0 {
                "partial"
            } else {
                first_error.as_ref().map_or("invalid_field", ApiError::code)
            };
            let mut response = (status, axum::Json(resp)).into_response();
            if let Some(secs) = first_error.as_ref().and_then(ApiError::retry_after)
                && status == StatusCode::TOO_MANY_REQUESTS
            {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, secs.into());
            }
            (response, accepted, rejected, outcome)
        }
        Err(e) => {
            let outcome = e.code();
            (e.into_response(), 0, 0, outcome)
        }
    };
    let t = transport.as_str();
    metrics::counter!(m::INGEST_REQUESTS, label::TRANSPORT => t, label::ENDPOINT => "batch", label::OUTCOME => outcome).increment(1);
    state
        .hot_metrics
        .accepted_on(transport)
        .conversations
        .increment(accepted as u64);
    events::ingest(t, events::outcome::REJECTED, rejected as u64);
    response
}

struct BatchOutcome {
    response: BatchResponse,
    first_error: Option<ApiError>,
    /// The first accepted item whose wait ended early.
    wait_failure: Option<ApiError>,
    reached: Reached,
}

async fn accept_batch(
    state: &IngressState,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<BatchOutcome, ApiError> {
    refuse_if_shutting_down(state)?;
    let wait = wait_of(state, query)?;
    let ndjson = require_content_type(headers, true)?;
    let bytes = read_body(state, headers, body).await?;
    let deadline = tokio::time::Instant::now() + wait.timeout;
    let limits = state.limits();
    let items = split_items(&bytes, ndjson, limits.max_batch_items)?;
    let outcomes = match state.shared_intake() {
        Some(shared) => admit_items_shared(state, shared, items, wait.level).await,
        None => admit_items(state, items, wait.level).await,
    };
    let mut results = Vec::with_capacity(outcomes.len());
    let mut admitted = Vec::new();
    let mut first_error = None;
    let (mut accepted, mut rejected) = (0, 0);
    for (index, (outcome, took)) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(item) => {
                state.hot_metrics.enqueue_seconds.record(took.as_secs_f64());
                accepted += 1;
                results.push(ItemResult {
                    index,
                    id: Some(item.id.clone()),
                    status: "queued",
                    error: None,
                });
                admitted.push((results.len() - 1, item));
            }
            Err(e) => {
                rejected += 1;
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
    let (reached, wait_failure) = wait_batch(state, admitted, wait, deadline, &mut results).await;
    Ok(BatchOutcome {
        response: BatchResponse {
            accepted,
            rejected,
            results,
        },
        first_error,
        wait_failure,
        reached,
    })
}

/// Each item's admission and how long it took, in order.
type ItemOutcomes = Vec<(
    Result<super::intake::Admitted, ApiError>,
    std::time::Duration,
)>;

/// Admits a batch's items one after the other. A full queue rejects the
/// rest of the batch without trying each item, keeping the order of what
/// was accepted a prefix of what was sent.
async fn admit_items(
    state: &IngressState,
    items: convstore_core::batch_body::Items<'_>,
    level: WaitLevel,
) -> ItemOutcomes {
    let limits = state.limits();
    let mut outcomes = Vec::with_capacity(items.len());
    let mut queue_full: Option<ApiError> = None;
    for item in items {
        let started = Instant::now();
        let outcome = match &queue_full {
            Some(full) => Err(full.clone()),
            None => match parse_batch_item(item, limits.validation) {
                Ok(conversation) => admit(state, Change::Post(conversation), level).await,
                Err(e) => Err(e.into()),
            },
        };
        if let Err(
            e @ (ApiError::QueueFull { .. }
            | ApiError::JournalFull { .. }
            | ApiError::JournalUnwritable { .. }
            | ApiError::Unavailable(_)),
        ) = &outcome
        {
            queue_full = Some(e.clone());
        }
        outcomes.push((outcome, started.elapsed()));
    }
    outcomes
}

/// Admits a batch's items through the shared intake: every item is sent
/// to the stream in order, then all the acknowledgements are awaited
/// together (one round trip for the batch, not one per item). Each item
/// gets the stream's own answer: with a full stream, an item may be
/// refused while a later one, sent after room was made, is accepted.
async fn admit_items_shared(
    state: &IngressState,
    shared: &std::sync::Arc<convstore_nats::SharedIntake>,
    items: convstore_core::batch_body::Items<'_>,
    level: WaitLevel,
) -> ItemOutcomes {
    let limits = state.limits();
    let started = Instant::now();
    let mut sent = Vec::with_capacity(items.len());
    for item in items {
        sent.push(match parse_batch_item(item, limits.validation) {
            Ok(conversation) => {
                super::intake::send_shared(state, shared, Change::Post(conversation), level).await
            }
            Err(e) => Err(e.into()),
        });
    }
    futures::future::join_all(sent.into_iter().map(|sent| async move {
        let outcome = match sent {
            Ok(sent) => sent.acknowledged(state).await,
            Err(e) => Err(e),
        };
        (outcome, started.elapsed())
    }))
    .await
}

/// Waits for every accepted item of a batch to reach the level asked for,
/// all against one deadline, and writes each item's status.
async fn wait_batch(
    state: &IngressState,
    admitted: Vec<(usize, super::intake::Admitted)>,
    wait: Wait,
    deadline: tokio::time::Instant,
    results: &mut [ItemResult],
) -> (Reached, Option<ApiError>) {
    let level_reached = match wait.level {
        WaitLevel::Queued => return (Reached::Queued, None),
        WaitLevel::Durable => Reached::Durable,
        WaitLevel::Stored => Reached::Stored,
    };
    // Durable: the highest LSN covers the others (one fsync covers all
    // written before it).
    let waits: Vec<_> = if wait.level == WaitLevel::Durable {
        let last = admitted
            .iter()
            .max_by_key(|(_, a)| a.lsn)
            .map(|(_, a)| a.lsn);
        let slots: Vec<usize> = admitted.iter().map(|(slot, _)| *slot).collect();
        let probe = admitted.into_iter().find(|(_, a)| a.lsn == last.flatten());
        match probe {
            None => return (level_reached, None),
            Some((_, probe)) => {
                let result = wait_for(state, probe, wait.level, deadline).await;
                slots
                    .into_iter()
                    .map(|slot| (slot, result.clone()))
                    .collect()
            }
        }
    } else {
        let slots: Vec<usize> = admitted.iter().map(|(slot, _)| *slot).collect();
        let outcomes = futures::future::join_all(
            admitted
                .into_iter()
                .map(|(_, a)| wait_for(state, a, wait.level, deadline)),
        )
        .await;
        slots.into_iter().zip(outcomes).collect()
    };
    let mut first_failure = None;
    for (slot, result) in waits {
        let Some(item) = results.get_mut(slot) else {
            continue;
        };
        match result {
            Ok(reached) => item.status = reached.as_str(),
            Err(e) => {
                // The batch-wide answer names this item; each item's own
                // error carries its id.
                let e = match (e, &item.id) {
                    (
                        ApiError::Unfinished {
                            status,
                            code,
                            message,
                            ..
                        },
                        Some(id),
                    ) => ApiError::Unfinished {
                        id: id.clone(),
                        status,
                        code,
                        message,
                    },
                    (e, _) => e,
                };
                item.status = "unfinished";
                item.error = Some(e.body());
                first_failure.get_or_insert(e);
            }
        }
    }
    (level_reached, first_failure)
}

/// A conversation accepted and not yet stored.
#[derive(Serialize, utoipa::ToSchema)]
pub struct InFlightView {
    /// The id as asked for.
    id: String,
    /// The row id it will be stored under.
    row_id: uuid::Uuid,
    /// Always `queued`.
    #[schema(example = "queued")]
    status: &'static str,
}

/// A stored conversation: `status` is `stored`, the rest is the row with
/// its chunks.
#[derive(Serialize, utoipa::ToSchema)]
pub struct StoredView {
    status: &'static str,
    /// A change of it (an append, a new version) is accepted and not yet
    /// stored: this is the version before it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    changes_in_flight: bool,
    #[serde(flatten)]
    conversation: convstore_store::StoredConversation,
}

/// `GET /v1/conversations/{id}`: by row id (UUID) or by the caller's id.
/// Once stored, the row with `"status":"stored"` and each chunk's
/// `embedding_status` (with `"changes_in_flight": true` while a newer
/// change of it is accepted and not yet stored); before, while in flight,
/// `{"id","row_id","status":"queued"}`; else 404.
#[utoipa::path(
    get,
    path = "/v1/conversations/{id}",
    tag = "read",
    params(("id" = String, Path, description = "The caller's id, or the row UUID")),
    responses(
        (status = 200, description = "Stored (`status: stored`, with chunks) or in flight (`status: queued`)", body = ConversationView),
        (status = 401, description = "Bearer token missing or unknown", body = super::error::ErrorEnvelope),
        (status = 404, description = "Neither in flight nor stored", body = super::error::ErrorEnvelope),
        (status = 503, description = "The database is unreachable", body = super::error::ErrorEnvelope),
    )
)]
pub async fn get_conversation(State(state): AppState, Path(id): Path<String>) -> Response {
    // An id ingest would refuse (too long, control characters, NUL, which
    // PostgreSQL text cannot even hold) names nothing stored: say why.
    if let Err(e) =
        convstore_core::validate::check_label("id", &id, state.limits().validation.max_id_bytes)
    {
        return ApiError::from(e).into_response();
    }
    // A conversation leaves the in-flight registry only after its commit,
    // so it is always found in one place or the other. By client id, or
    // for a UUID, by the row id of a conversation sent without one.
    let in_flight = std::iter::once(row_id(&id))
        .chain(uuid::Uuid::parse_str(&id).ok())
        .find(|row| state.in_flight.contains(*row));
    let found = find_stored(&state.store, &id).await;
    match (found, in_flight) {
        (Ok(Some(conversation)), in_flight) => {
            let view = StoredView {
                status: "stored",
                changes_in_flight: in_flight.is_some(),
                conversation,
            };
            (StatusCode::OK, axum::Json(view)).into_response()
        }
        // Not stored yet (or the database cannot say): the queued view.
        (Ok(None) | Err(_), Some(row)) => {
            let view = InFlightView {
                id,
                row_id: row,
                status: "queued",
            };
            (StatusCode::OK, axum::Json(view)).into_response()
        }
        (Ok(None), None) => {
            ApiError::NotFound(format!("no conversation with id `{id}`")).into_response()
        }
        (Err(e), None) => ApiError::from(e).into_response(),
    }
}

/// The stored conversation `id` names: the one with that client id, else,
/// for a UUID, the row with that id (conversations sent without an id are
/// known by their row id). The client id comes first: it is the key, and a
/// UUID-shaped client id is not the row id of its conversation.
async fn find_stored(
    store: &convstore_store::Store,
    id: &str,
) -> Result<Option<convstore_store::StoredConversation>, convstore_store::StoreError> {
    if let Some(found) = store.get_conversation_by_client_id(id).await? {
        return Ok(Some(found));
    }
    match uuid::Uuid::parse_str(id) {
        Ok(uuid) => store.get_conversation(uuid).await,
        Err(_) => Ok(None),
    }
}

/// `GET /healthz`: the process is alive and serving.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    security(()),
    responses((status = 200, description = "Alive", body = Object, example = json!({"status": "ok"})))
)]
pub async fn healthz() -> Response {
    (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
}

/// Fraction of the queue above which the daemon reports not ready, so load
/// balancers steer traffic away before clients see 429s.
const SATURATED: f64 = 0.9;

/// `GET /readyz`: 200 when the database answers, the queue is not
/// saturated, at least one embedding backend is ready (up, circuit not
/// open), the journal (when on) can write and is not nearly full, and the
/// daemon is not shutting down; 503 with the reasons otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    security(()),
    responses(
        (status = 200, description = "Ready", body = Object),
        (status = 503, description = "Not ready; `reasons` says why", body = Object),
    )
)]
pub async fn readyz(State(state): AppState) -> Response {
    let mut reasons = Vec::new();
    if state.is_shutting_down() {
        reasons.push("shutting down".to_string());
    }
    // Against what the queue admits now, not its capacity: under the
    // backlog limit (`queue.max_backlog_seconds`) a queue refuses long
    // before it is full by count.
    let depth = state.queue.len();
    let admits = state.queue.admission_limit();
    let capacity = state.queue.capacity();
    if depth as f64 >= admits as f64 * SATURATED {
        reasons.push(if admits < capacity {
            format!("queue saturated ({depth}/{admits} admitted at the measured store rate; capacity {capacity})")
        } else {
            format!("queue saturated ({depth}/{capacity})")
        });
    }
    let journal = state.journal().map(|journal| {
        let (bytes, max_bytes) = (journal.bytes(), journal.max_bytes());
        let failure = journal.failure();
        if let Some(reason) = &failure {
            reasons.push(format!("journal: {reason}"));
        }
        let unwritable = journal.unwritable();
        if let Some((reason, since)) = &unwritable {
            reasons.push(format!(
                "journal cannot write for {} s: {reason}",
                since.as_secs()
            ));
        }
        if bytes as f64 >= max_bytes as f64 * SATURATED {
            reasons.push(format!("journal nearly full ({bytes}/{max_bytes} bytes)"));
        }
        json!({"bytes": bytes, "max_bytes": max_bytes, "failed": failure,
               "writable": failure.is_none() && unwritable.is_none(),
               "unwritable": unwritable.map(|(reason, _)| reason)})
    });
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
    let backends = state.router().map(|router| {
        let ready = router.ready_backends();
        metrics::gauge!(m::BACKENDS_READY).set(ready as f64);
        if ready == 0 {
            reasons.push(format!(
                "no embedding backend ready (0/{}; see /v1/stats)",
                router.backend_count()
            ));
        }
        json!({"ready": ready, "total": router.backend_count()})
    });
    let shared_intake = match state.shared_intake() {
        None => None,
        Some(shared) => {
            let answer =
                tokio::time::timeout(Duration::from_secs(2), shared.consumer_state()).await;
            let up = matches!(answer, Ok(Ok(_)));
            metrics::gauge!(m::NATS_UP).set(if up { 1.0 } else { 0.0 });
            Some(match answer {
                Ok(Ok(consumer)) => {
                    json!({"status": "ok", "pending": consumer.pending, "ack_pending": consumer.ack_pending})
                }
                Ok(Err(e)) => {
                    reasons.push(format!("shared intake: {e}"));
                    json!({"status": "unreachable"})
                }
                Err(_) => {
                    reasons.push("shared intake: the stream did not answer within 2 s".into());
                    json!({"status": "timeout"})
                }
            })
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
        "queue": {"depth": depth, "capacity": capacity, "admission_limit": admits},
        "database": database,
        "journal": journal,
        "backends": backends,
        "shared_intake": shared_intake,
    });
    (status, axum::Json(body)).into_response()
}

pub async fn not_found() -> Response {
    ApiError::NotFound("no such route; see README.md for the API".into()).into_response()
}

/// `GET /v1/conversations/{id}`: stored, or still in flight.
#[derive(utoipa::ToSchema)]
#[serde(untagged)]
// Only its schema is used; no value of it is ever built.
#[allow(dead_code, clippy::large_enum_variant)]
pub enum ConversationView {
    Stored(StoredView),
    InFlight(InFlightView),
}
