//! After a conversation is posted: appending turns to it, deleting it, and
//! erasing a user (docs/LIFECYCLE.md).
//!
//! An append is a change like a post: stamped, journaled, queued and
//! acknowledged in microseconds, applied in acknowledgement order by the
//! pipeline. A delete and an erasure are answered only once PostgreSQL
//! has committed them, with their tombstone: `"deleted": true` means the
//! rows are gone and nothing acknowledged before can bring them back.

use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument as _;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use uuid::Uuid;

use convstore_core::lifecycle::{Append, Change, Discard, Stamp, erased_conversations};
use convstore_core::validate::{check_label, parse_append, row_id};
use convstore_telemetry::events::{self, label};
use convstore_telemetry::metrics as m;

use super::error::ApiError;
use super::handlers::{Accepted, read_body, require_content_type};
use super::intake::{admit, wait_for};
use super::{IngressState, Transport};
use crate::ticket::{Outcome, Queued};

type AppState = State<Arc<IngressState>>;

/// `POST /v1/conversations/{id}/messages`: `{"messages": [...]}` added at
/// the end of the conversation, in the order appends are acknowledged.
#[utoipa::path(
    post,
    path = "/v1/conversations/{id}/messages",
    tag = "ingest",
    params(
        ("id" = String, Path, description = "The conversation's id (yours, or the one assigned)"),
        super::handlers::WaitParams,
    ),
    request_body(content = convstore_core::validate::AppendIn, content_type = "application/json"),
    responses(
        (status = 201, description = "Applied (`?wait=stored`)", body = Accepted),
        (status = 202, description = "Queued, or durable (`?wait=durable`)", body = Accepted),
        (status = 400, description = "Invalid JSON, field, or query parameter", body = super::error::ErrorEnvelope),
        (status = 401, description = "Bearer token missing or unknown", body = super::error::ErrorEnvelope),
        (status = 404, description = "No conversation with this id was ever accepted (or it was deleted)", body = super::error::ErrorEnvelope),
        (status = 409, description = "`?wait=stored`: the conversation was deleted before the append was applied (`discarded`)", body = super::error::ErrorEnvelope),
        (status = 413, description = "Body too large", body = super::error::ErrorEnvelope),
        (status = 415, description = "Not application/json", body = super::error::ErrorEnvelope),
        (status = 429, description = "Queue or journal full, or rate limited; see Retry-After", body = super::error::ErrorEnvelope),
        (status = 503, description = "Shutting down, the journal cannot write, or the database is unreachable (the conversation could not be looked up)", body = super::error::ErrorEnvelope),
        (status = 504, description = "Accepted, but the wait ended first (with id)", body = super::error::ErrorEnvelope),
    )
)]
pub async fn append_messages(
    State(state): AppState,
    State(transport): State<Transport>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let span = super::handlers::request_span("messages.append", &parts.headers);
    let result = accept_append(&state, &id, parts.uri.query(), &parts.headers, body)
        .instrument(span)
        .await;
    match &result {
        Ok(_) => state
            .hot_metrics
            .accepted_on(transport)
            .append_requests
            .increment(1),
        Err(e) => metrics::counter!(m::INGEST_REQUESTS, label::TRANSPORT => transport.as_str(), label::ENDPOINT => "messages", label::OUTCOME => e.code())
            .increment(1),
    }
    match result {
        Ok((status, accepted)) => (status, axum::Json(accepted)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn accept_append(
    state: &IngressState,
    id: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(StatusCode, Accepted), ApiError> {
    if state.is_shutting_down() {
        return Err(ApiError::Unavailable("convstore is shutting down".into()));
    }
    let limits = state.limits();
    check_label("id", id, limits.validation.max_id_bytes)?;
    let wait = super::handlers::wait_of(state, query)?;
    require_content_type(headers, false)?;
    let bytes = read_body(state, headers, body).await?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + wait.timeout;
    let messages = parse_append(&bytes, limits.validation)?;
    drop(bytes);
    let Some(found) = conversation_of(state, id).await? else {
        return Err(ApiError::NotFound(format!(
            "no conversation with id `{id}` was accepted (or it was deleted); post it first"
        )));
    };
    // A conversation grows by appends no further than a post could make it:
    // every append re-chunks and rewrites it, so unbounded growth would be
    // unbounded work. (Checked against the stored version: changes still
    // in flight are not counted.)
    let max = limits.validation.max_messages;
    if found.stored_messages + messages.len() > max {
        return Err(ApiError::from(convstore_core::InputError::invalid_field(
            "messages",
            format!(
                "the conversation holds {} messages; {} more would pass server.max_messages ({max})",
                found.stored_messages,
                messages.len()
            ),
        )));
    }
    let (row, user_id) = (found.row, found.user_id);
    let change = Change::Append(Append {
        id: row,
        client_id: id.to_string(),
        user_id,
        messages,
        received_at: chrono::Utc::now(),
        received_instant: Instant::now(),
    });
    let admitted = admit(state, change, wait.level).await?;
    state
        .hot_metrics
        .enqueue_seconds
        .record(started.elapsed().as_secs_f64());
    let reached = wait_for(state, admitted, wait.level, deadline).await?;
    Ok((
        reached.status(),
        Accepted::new(id.to_string(), reached.as_str()),
    ))
}

/// The conversation an append is for.
struct Found {
    row: Uuid,
    user_id: String,
    /// Messages of its stored version (0 when not stored yet).
    stored_messages: usize,
}

/// The conversation `id` names: one in flight here (posted and not yet
/// stored), else the stored one; with the stored version's message count.
async fn conversation_of(state: &IngressState, id: &str) -> Result<Option<Found>, ApiError> {
    let mut in_flight = candidate_rows(id)
        .find_map(|row| state.in_flight.user_of(row).map(|user_id| (row, user_id)));
    // With the shared intake, "in flight" is also "in the stream", posted
    // through any instance; its stamp orders this append after it.
    if in_flight.is_none()
        && let Some(head) = stream_head(state, id).await?
    {
        crate::stamp::observe(head.stamp);
        in_flight = Some((head.row, head.user_id));
    }
    let stored = match state.store.stored_owner(id).await {
        Ok(stored) => stored,
        // In flight here: the append can be accepted without the count.
        Err(_) if in_flight.is_some() => None,
        Err(e) => return Err(e.into()),
    };
    let stored_messages = stored.as_ref().map_or(0, |(.., n)| *n);
    Ok(match (in_flight, stored) {
        (Some((row, user_id)), _) | (None, Some((row, user_id, _))) => Some(Found {
            row,
            user_id,
            stored_messages,
        }),
        (None, None) => None,
    })
}

/// The newest change of `id` still in the shared intake's stream, when
/// there is one (always `None` without a shared intake).
async fn stream_head(
    state: &IngressState,
    id: &str,
) -> Result<Option<convstore_nats::StreamHead>, ApiError> {
    let Some(shared) = state.shared_intake() else {
        return Ok(None);
    };
    shared
        .head(id)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the shared intake cannot be read: {e}")))
}

/// The row ids a conversation with key `id` may have: the hash of a
/// client id, or the UUID assigned to a conversation posted without one.
fn candidate_rows(id: &str) -> impl Iterator<Item = Uuid> {
    std::iter::once(row_id(id)).chain(Uuid::parse_str(id).ok())
}

/// The row a delete names when the conversation is not in flight here: a
/// UUID names a row stored without a client id (before ids were assigned
/// as keys); the store looks the client id up first either way.
fn unkeyed_row(id: &str) -> Uuid {
    Uuid::parse_str(id).unwrap_or_else(|_| row_id(id))
}

/// The answer to a delete.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Deleted {
    id: String,
    deleted: bool,
    /// Chunk rows (with their vectors) removed.
    chunks: u64,
    /// Changes still queued that were withdrawn.
    queued_changes: usize,
}

/// `DELETE /v1/conversations/{id}`: removes the conversation, its chunks
/// and vectors, and its changes still queued or journaled; a tombstone
/// keeps any change acknowledged before the delete from bringing it back.
#[utoipa::path(
    delete,
    path = "/v1/conversations/{id}",
    tag = "lifecycle",
    params(("id" = String, Path, description = "The conversation's id (yours, or the one assigned)")),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 401, description = "Bearer token missing or unknown", body = super::error::ErrorEnvelope),
        (status = 404, description = "Neither stored nor in flight", body = super::error::ErrorEnvelope),
        (status = 503, description = "The database is unreachable: nothing was deleted", body = super::error::ErrorEnvelope),
    )
)]
pub async fn delete_conversation(State(state): AppState, Path(id): Path<String>) -> Response {
    to_completion(async move { delete_one(&state, &id).await }).await
}

/// Runs a deletion on its own task and answers 200 with its result: a
/// client that hangs up does not stop it half-way (an erasure of many
/// conversations takes a while; the withdrawal of queued changes follows
/// the commit).
async fn to_completion<T: Serialize + Send + 'static>(
    deletion: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Response {
    match tokio::spawn(deletion).await {
        Ok(Ok(done)) => (StatusCode::OK, axum::Json(done)).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::Internal(format!("the deletion failed: {e}")).into_response(),
    }
}

async fn delete_one(state: &IngressState, id: &str) -> Result<Deleted, ApiError> {
    check_label("id", id, state.limits().validation.max_id_bytes)?;
    let mut in_flight = candidate_rows(id).find(|row| state.in_flight.contains(*row));
    if in_flight.is_none() {
        in_flight = stream_head(state, id).await?.map(|head| {
            // The delete is later than the change it found.
            crate::stamp::observe(head.stamp);
            head.row
        });
    }
    let row = in_flight.unwrap_or_else(|| unkeyed_row(id));
    let stamp = crate::stamp::next();
    let Some(deleted) = state
        .store
        .delete_conversation(id, row, stamp, in_flight.is_some())
        .await?
    else {
        return Err(ApiError::NotFound(format!(
            "no conversation with id `{id}`"
        )));
    };
    let withdrawn = withdraw(state, stamp, |change| change.key() == id);
    if deleted.row {
        events::conversations_deleted(events::deletion::API, 1);
    }
    tracing::info!(
        id,
        chunks = deleted.chunks,
        queued_changes = withdrawn,
        "Deleted a conversation"
    );
    Ok(Deleted {
        id: id.to_string(),
        deleted: true,
        chunks: deleted.chunks,
        queued_changes: withdrawn,
    })
}

/// The answer to an erasure.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Erased {
    user_id: String,
    erased: bool,
    /// Stored conversations removed.
    conversations: u64,
    /// Chunk rows (with their vectors) removed.
    chunks: u64,
    /// Rows of the shared embedding cache (L2) removed, and entries of the
    /// in-memory one (L1) evicted.
    cache_entries: u64,
    /// Changes still queued that were withdrawn.
    queued_changes: usize,
}

/// `DELETE /v1/users/{user_id}`: erases everything of the user, stored,
/// queued or journaled, including the cached vectors of their texts; a
/// tombstone keeps anything acknowledged before from coming back.
#[utoipa::path(
    delete,
    path = "/v1/users/{user_id}",
    tag = "lifecycle",
    params(("user_id" = String, Path, description = "The user whose data goes")),
    responses(
        (status = 200, description = "Erased, with counts", body = Erased),
        (status = 401, description = "Bearer token missing or unknown", body = super::error::ErrorEnvelope),
        (status = 503, description = "The database is unreachable; call again (an erasure is safe to repeat)", body = super::error::ErrorEnvelope),
    )
)]
pub async fn erase_user(State(state): AppState, Path(user_id): Path<String>) -> Response {
    to_completion(async move { erase(&state, &user_id).await }).await
}

async fn erase(state: &IngressState, user_id: &str) -> Result<Erased, ApiError> {
    check_label(
        "user_id",
        user_id,
        state.limits().validation.max_label_bytes,
    )?;
    let stamp = crate::stamp::next();
    let mut erased = state.store.erase_user(user_id, stamp).await?;
    // Conversations whose last queued change was this user's are theirs,
    // whoever posted the stored version: they go whole, with a tombstone.
    let theirs = state
        .queue
        .inspect(|queued| erased_conversations(queued.map(|q| &q.change), user_id, stamp));
    for key in &theirs {
        if let Some(d) = state
            .store
            .delete_conversation(key, unkeyed_row(key), stamp, true)
            .await?
        {
            erased.chunks += d.chunks;
            erased.conversations += u64::from(d.row);
        }
    }
    let withdrawn = withdraw(state, stamp, |change| theirs.contains(&change.key()));
    let evicted = state
        .cache()
        .map_or(0, |cache| cache.remove_hashes(&erased.chunk_hashes));
    events::conversations_deleted(events::deletion::ERASE, erased.conversations);
    tracing::info!(
        conversations = erased.conversations,
        chunks = erased.chunks,
        cache_entries = erased.cache_entries + evicted as u64,
        queued_changes = withdrawn,
        "Erased a user"
    );
    Ok(Erased {
        user_id: user_id.to_string(),
        erased: true,
        conversations: erased.conversations,
        chunks: erased.chunks,
        cache_entries: erased.cache_entries + evicted as u64,
        queued_changes: withdrawn,
    })
}

/// Takes the queued changes `covers` selects and that were acknowledged
/// before `stamp` out of the queue; their tickets finish as discarded
/// (releasing their journal records). Changes already with a worker are
/// discarded there, by the tombstone.
fn withdraw(state: &IngressState, stamp: Stamp, covers: impl Fn(&Change) -> bool) -> usize {
    let withdrawn: Vec<Queued> = state
        .queue
        .remove_where(|q| q.change.stamp <= stamp && covers(&q.change.change));
    let n = withdrawn.len();
    for item in withdrawn {
        item.ticket.complete(Outcome::Discarded(Discard::Deleted));
    }
    if n > 0 {
        metrics::counter!(m::CONVERSATION_CHANGES, label::OUTCOME => "discarded")
            .increment(n as u64);
    }
    n
}
