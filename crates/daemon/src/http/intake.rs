//! Admission and acknowledgement levels: a validated conversation gets its
//! completion handle ([`Ticket`]), goes into the journal (when on) and the
//! queue, and the request waits for the level it asked for:
//!
//! | `?wait=` | answered when | status |
//! |---|---|---|
//! | `queued` (default) | on the queue (and written to the journal when it is on) | 202 |
//! | `durable` | the journal record is fsynced; without a journal, as `stored` | 202 |
//! | `stored` | committed in PostgreSQL | 201 |
//!
//! A wait is bounded by `?timeout_ms=` (default `ack.timeout_ms`, at most
//! `ack.max_timeout_ms`); past it the answer is 504 with the id, and the
//! conversation carries on: the client polls `GET /v1/conversations/{id}`.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tokio::time::timeout_at;

use crate::config::WhenFull;
use crate::queue::PushError;
use crate::ticket::{Outcome, Queued, Ticket};
use convstore_core::lifecycle::{Change, StampedChange};
use convstore_journal::{AppendError, DurableError, entry};
use convstore_telemetry::metrics as m;

use super::IngressState;
use super::error::ApiError;
use convstore_telemetry::events::label;

/// How far a request waits before it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitLevel {
    Queued,
    Durable,
    Stored,
}

impl WaitLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Durable => "durable",
            Self::Stored => "stored",
        }
    }
}

/// A request's `?wait=` and `?timeout_ms=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub level: WaitLevel,
    pub timeout: Duration,
}

/// Parses the query string. Unknown parameters are refused: a misspelt
/// `?wiat=stored` silently acknowledging at `queued` would be a quiet
/// durability bug in the client. So is a repeated one: which of
/// `?wait=stored&wait=queued` the client meant is anyone's guess (the last
/// one used to win, acknowledging at `queued`).
pub fn parse_wait(
    query: Option<&str>,
    default_timeout: Duration,
    max_timeout: Duration,
    journal_on: bool,
) -> Result<Wait, ApiError> {
    let mut level = WaitLevel::Queued;
    let mut timeout = default_timeout;
    // The two parameters this route takes, each at most once; any other
    // key is refused below, so no list of keys seen is needed.
    let (mut seen_wait, mut seen_timeout) = (false, false);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let seen = match key {
            "wait" => &mut seen_wait,
            "timeout_ms" => &mut seen_timeout,
            _ => &mut false,
        };
        if std::mem::replace(seen, true) {
            return Err(ApiError::BadRequest(format!(
                "query parameter `{key}` is given twice; give it once"
            )));
        }
        match key {
            "wait" => {
                level = match value {
                    "queued" => WaitLevel::Queued,
                    "durable" => WaitLevel::Durable,
                    "stored" => WaitLevel::Stored,
                    other => {
                        return Err(ApiError::BadRequest(format!(
                            "wait=`{}` is not one of queued, durable, stored",
                            other.chars().take(40).collect::<String>()
                        )));
                    }
                }
            }
            "timeout_ms" => {
                let ms: u64 = value.parse().ok().filter(|ms| *ms > 0).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "timeout_ms=`{}` is not a positive whole number of milliseconds",
                        value.chars().take(40).collect::<String>()
                    ))
                })?;
                if Duration::from_millis(ms) > max_timeout {
                    return Err(ApiError::BadRequest(format!(
                        "timeout_ms={ms} is above ack.max_timeout_ms ({})",
                        max_timeout.as_millis()
                    )));
                }
                timeout = Duration::from_millis(ms);
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter `{}`; this route takes wait and timeout_ms",
                    other.chars().take(40).collect::<String>()
                )));
            }
        }
    }
    // Without a journal nothing is fsynced before the commit: the next
    // guarantee that survives a crash is the commit itself.
    if level == WaitLevel::Durable && !journal_on {
        level = WaitLevel::Stored;
    }
    Ok(Wait { level, timeout })
}

/// An accepted change, as far as the request still cares.
#[derive(Debug)]
pub struct Admitted {
    /// The id the caller knows: its own, or the UUID assigned when it gave none.
    pub id: String,
    /// The journal record's LSN, when journaled.
    pub lsn: Option<u64>,
    /// The outcome, when the request waits for `stored`.
    pub outcome: Option<oneshot::Receiver<Outcome>>,
}

/// Serialises the admission of changes to one conversation: stamping,
/// registering as the row's latest change, journaling and enqueueing
/// happen as one step per row, so the stamps, the journal and the queue
/// agree on the order of a conversation's changes. Striped by row id, so
/// different conversations rarely wait for each other; every section is
/// synchronous (microseconds) and never held across an await.
pub struct AdmissionOrder {
    stripes: Vec<std::sync::Mutex<()>>,
    /// The shared intake's: held across sending a change to the stream
    /// (an await), never across waiting for the stream's answer.
    shared_stripes: Vec<tokio::sync::Mutex<()>>,
}

impl AdmissionOrder {
    const STRIPES: usize = 64;

    pub fn new() -> Self {
        Self {
            stripes: (0..Self::STRIPES)
                .map(|_| std::sync::Mutex::new(()))
                .collect(),
            shared_stripes: (0..Self::STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    async fn lock_shared(&self, row_id: uuid::Uuid) -> tokio::sync::MutexGuard<'_, ()> {
        // The remainder is below STRIPES, the length of `shared_stripes`.
        #[allow(clippy::indexing_slicing)]
        let stripe = &self.shared_stripes[(row_id.as_u128() % Self::STRIPES as u128) as usize];
        stripe.lock().await
    }

    fn lock(&self, row_id: uuid::Uuid) -> std::sync::MutexGuard<'_, ()> {
        // The remainder is below STRIPES, the length of `stripes`.
        #[allow(clippy::indexing_slicing)]
        let stripe = &self.stripes[(row_id.as_u128() % Self::STRIPES as u128) as usize];
        // The sections hold no data: poison is harmless.
        stripe.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for AdmissionOrder {
    fn default() -> Self {
        Self::new()
    }
}

/// Stamps `change`, puts it in the journal (when on) and on the queue, with
/// its completion handle. Nothing is left behind when this fails: every
/// refusal cancels the ticket before the row's admission section ends,
/// which is a refusal the caller hears of, never a loss; while a blocking
/// admission waits for room it holds the bare change, no ticket.
// The queue hands a refused change back inside its error so a blocking
// admission can retry without cloning it; the error is moved, never
// copied, so its size costs nothing.
#[allow(clippy::result_large_err)]
pub async fn admit(
    state: &IngressState,
    change: Change,
    level: WaitLevel,
) -> Result<Admitted, ApiError> {
    if let Some(shared) = state.shared_intake() {
        return admit_shared(state, shared, change, level).await;
    }
    let id = change.key();
    let row_id = change.row_id();
    let bytes = change.approx_bytes();
    let limits = state.limits();
    let block = limits.when_full == WhenFull::Block;
    let deadline = tokio::time::Instant::now() + limits.block_timeout;
    let mut change = Some(change);
    loop {
        let attempt = {
            let _order = state.admission_order.lock(row_id);
            let Some(next) = change.take() else {
                return Err(ApiError::Internal("admission lost its change".into()));
            };
            let stamped = StampedChange {
                stamp: crate::stamp::next(),
                change: next,
            };
            let mut ticket = Ticket::for_change(&stamped, state.in_flight.clone());
            let outcome = (level == WaitLevel::Stored).then(|| ticket.subscribe());
            match enqueue(state, Queued::new(stamped, ticket), bytes) {
                Ok(lsn) => {
                    return Ok(Admitted { id, lsn, outcome });
                }
                Err(Refusal::Queue(PushError::Full(back)))
                    if block && tokio::time::Instant::now() < deadline =>
                {
                    let (stamped, ticket) = back.into_parts();
                    ticket.cancel();
                    change = Some(stamped.change);
                    None
                }
                Err(Refusal::Queue(e)) => Some(refused(state, e, bytes)),
                Err(Refusal::Journal(e)) => Some(e),
            }
        };
        match attempt {
            Some(error) => return Err(error),
            // `block`: wait for room (without the row's section) and try
            // again until the deadline.
            None => {
                state.queue.wait_for_room(bytes, deadline).await;
            }
        }
    }
}

/// The shared intake's admission: stamps `change` and publishes it to the
/// stream; answered once the stream acknowledged it (so `queued` and
/// `durable` both mean the stream has it).
async fn admit_shared(
    state: &IngressState,
    shared: &std::sync::Arc<convstore_nats::SharedIntake>,
    change: Change,
    level: WaitLevel,
) -> Result<Admitted, ApiError> {
    send_shared(state, shared, change, level)
        .await?
        .acknowledged(state)
        .await
}

/// A change sent to the shared intake, its acknowledgement to come: a
/// batch sends every item first and then waits for all the answers.
pub struct SentShared {
    id: String,
    pending: convstore_nats::PendingPublish,
    expected: Option<convstore_nats::replies::Expected>,
}

/// Stamps `change` and sends it to the stream. A conversation's changes
/// are sent in stamp order from this instance (the row's section is held
/// across the send, not the acknowledgement). With `stored`, the worker
/// that commits it, on whichever instance, sends the outcome back.
pub async fn send_shared(
    state: &IngressState,
    shared: &std::sync::Arc<convstore_nats::SharedIntake>,
    change: Change,
    level: WaitLevel,
) -> Result<SentShared, ApiError> {
    let id = change.key();
    let (reply, expected) = match level {
        WaitLevel::Stored => {
            let (subject, expected) = shared.replies().expect();
            (Some(subject), Some(expected))
        }
        _ => (None, None),
    };
    let _order = state.admission_order.lock_shared(change.row_id()).await;
    let stamped = StampedChange {
        stamp: crate::stamp::next(),
        change,
    };
    let pending = shared
        .send(
            &stamped,
            reply.as_deref(),
            convstore_telemetry::traces::current_traceparent().as_deref(),
        )
        .await
        .map_err(|e| shared_refused(state, e))?;
    Ok(SentShared {
        id,
        pending,
        expected,
    })
}

impl SentShared {
    /// Waits for the stream's acknowledgement.
    pub async fn acknowledged(self, state: &IngressState) -> Result<Admitted, ApiError> {
        let published = self
            .pending
            .acknowledged()
            .await
            .map_err(|e| shared_refused(state, e))?;
        tracing::trace!(
            id = self.id,
            sequence = published.sequence,
            "Published to the shared intake"
        );
        let outcome = self.expected.map(|expected| {
            let (tx, rx) = oneshot::channel();
            // Outlives the longest wait a request may ask for, so a
            // request times out (504) before its outcome's channel closes.
            let give_up = state.limits().max_ack_timeout + Duration::from_secs(1);
            tokio::spawn(async move {
                if let Ok(Some(remote)) = tokio::time::timeout(give_up, expected.outcome()).await {
                    let _ = tx.send(outcome_of_remote(remote));
                }
            });
            rx
        });
        Ok(Admitted {
            id: self.id,
            lsn: None,
            outcome,
        })
    }
}

fn outcome_of_remote(remote: convstore_nats::replies::RemoteOutcome) -> Outcome {
    use convstore_core::lifecycle::Discard;
    use convstore_nats::replies::RemoteOutcome;
    match remote {
        RemoteOutcome::Stored => Outcome::Stored,
        RemoteOutcome::Discarded { why } if why == Discard::NoConversation.as_str() => {
            Outcome::Discarded(Discard::NoConversation)
        }
        RemoteOutcome::Discarded { .. } => Outcome::Discarded(Discard::Deleted),
        RemoteOutcome::Rejected { reason } => Outcome::Rejected(reason),
    }
}

fn shared_refused(state: &IngressState, e: convstore_nats::PublishError) -> ApiError {
    use convstore_nats::PublishError;
    match e {
        PublishError::Full(_) => ApiError::QueueFull {
            retry_after_secs: state.limits().retry_after_secs,
        },
        PublishError::TooLarge(reason) => ApiError::PayloadTooLarge(reason),
        PublishError::Unavailable(reason) => ApiError::Unavailable(format!(
            "the shared intake (NATS JetStream) did not take the change: {reason}; it may or may not be there: send it again (the store finds a repeat unchanged)"
        )),
    }
}

/// Why [`enqueue`] did not take a change (its ticket already cancelled
/// unless the queue handed it back). The queue's refusal carries the change
/// back so a blocking admission can retry without cloning it; it is moved,
/// never copied, so its size costs nothing.
#[allow(clippy::large_enum_variant)]
enum Refusal {
    Queue(PushError<Queued>),
    Journal(ApiError),
}

/// Journals (when on) and enqueues one stamped change; its LSN.
#[allow(clippy::result_large_err)]
fn enqueue(state: &IngressState, item: Queued, bytes: usize) -> Result<Option<u64>, Refusal> {
    let Some(journal) = state.journal() else {
        return state
            .queue
            .try_push(item, bytes)
            .map(|()| None)
            .map_err(Refusal::Queue);
    };
    let payload = entry::encode(&item.change);
    let mut pending = Some(item);
    // The closure runs only once the record is written; on any refusal
    // before that the change stays in `pending`.
    let appended = journal.append(&payload, |position| {
        let Some(Queued { change, ticket }) = pending.take() else {
            return Err(None);
        };
        let journal = journal.clone();
        let ticket = ticket.with_release(move || journal.settle(position));
        state
            .queue
            .try_push(Queued::new(change, ticket), bytes)
            .map_err(Some)
    });
    match appended {
        Ok(position) => Ok(Some(position.lsn)),
        Err(AppendError::Enqueue(Some(e))) => Err(Refusal::Queue(e)),
        Err(AppendError::Enqueue(None)) => Err(Refusal::Journal(ApiError::Internal(
            "admission lost its change".into(),
        ))),
        Err(e) => {
            if let Some(item) = pending.take() {
                item.ticket.cancel();
            }
            Err(Refusal::Journal(journal_refused(state, e)))
        }
    }
}

/// The answer for a conversation the queue handed back; its ticket is
/// cancelled, not reported lost: the caller hears of the refusal.
fn refused(state: &IngressState, e: PushError<Queued>, bytes: usize) -> ApiError {
    let (item, error) = match e {
        PushError::Full(item) => (
            item,
            ApiError::QueueFull {
                retry_after_secs: state.limits().retry_after_secs,
            },
        ),
        PushError::TooLarge(item) => (
            item,
            ApiError::PayloadTooLarge(format!(
                "the conversation needs about {bytes} bytes of queue; queue.max_bytes is {}",
                state.queue.max_bytes()
            )),
        ),
        PushError::Closed(item) => (
            item,
            ApiError::Unavailable("convstore is shutting down".into()),
        ),
    };
    item.ticket.cancel();
    error
}

/// The answer for an append the journal refused before its enqueue step
/// ran (the caller still holds the conversation and cancels its ticket).
fn journal_refused<E>(state: &IngressState, e: AppendError<E>) -> ApiError {
    match e {
        AppendError::Full { .. } => ApiError::JournalFull {
            retry_after_secs: state.limits().retry_after_secs,
        },
        AppendError::TooLarge {
            record_bytes,
            max_bytes,
        } => ApiError::PayloadTooLarge(format!(
            "the conversation takes {record_bytes} bytes of journal; journal.max_bytes is {max_bytes}"
        )),
        AppendError::Closed => ApiError::Unavailable("convstore is shutting down".into()),
        AppendError::Failed(reason) => {
            ApiError::Unavailable(format!("the journal is unusable: {reason}"))
        }
        AppendError::Unwritable(reason) => ApiError::JournalUnwritable {
            reason,
            retry_after_secs: state.limits().retry_after_secs,
        },
        AppendError::Enqueue(_) => {
            ApiError::Internal("the queue's refusal reached the journal's answer".into())
        }
    }
}

/// What a wait reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    Queued,
    Durable,
    Stored,
}

impl Reached {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Durable => "durable",
            Self::Stored => "stored",
        }
    }

    /// 201 once stored (a row exists), 202 before.
    pub fn status(self) -> axum::http::StatusCode {
        match self {
            Self::Stored => axum::http::StatusCode::CREATED,
            _ => axum::http::StatusCode::ACCEPTED,
        }
    }
}

/// Waits until `admitted` reaches `level` or `deadline` passes.
pub async fn wait_for(
    state: &IngressState,
    admitted: Admitted,
    level: WaitLevel,
    deadline: tokio::time::Instant,
) -> Result<Reached, ApiError> {
    let started = Instant::now();
    let result = match level {
        WaitLevel::Queued => return Ok(Reached::Queued),
        // The stream acknowledged it before the admission returned.
        WaitLevel::Durable if state.shared_intake().is_some() => return Ok(Reached::Durable),
        WaitLevel::Durable => match (state.journal(), admitted.lsn) {
            (Some(journal), Some(lsn)) => {
                match timeout_at(deadline, journal.wait_durable(lsn)).await {
                    Ok(Ok(())) => Ok(Reached::Durable),
                    Ok(Err(DurableError::Failed(reason))) => Err(unfinished(
                        &admitted.id,
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "journal_failed",
                        format!(
                            "the journal fsync failed ({reason}); the conversation is queued in memory but not durable"
                        ),
                    )),
                    Ok(Err(DurableError::Closed)) => Err(unfinished(
                        &admitted.id,
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "unavailable",
                        "convstore shut down before the journal record was fsynced".into(),
                    )),
                    Err(_) => Err(timed_out(&admitted.id, level)),
                }
            }
            // Not journaled (cannot happen: parse_wait turns durable into
            // stored without a journal); the commit is durable too.
            _ => Box::pin(wait_stored(admitted, deadline)).await,
        },
        WaitLevel::Stored => wait_stored(admitted, deadline).await,
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.code(),
    };
    metrics::histogram!(m::ACK_WAIT_SECONDS, label::LEVEL => level.as_str(), label::OUTCOME => outcome)
        .record(started.elapsed().as_secs_f64());
    result
}

async fn wait_stored(
    admitted: Admitted,
    deadline: tokio::time::Instant,
) -> Result<Reached, ApiError> {
    let id = admitted.id;
    let Some(rx) = admitted.outcome else {
        return Err(ApiError::Internal(format!(
            "no completion handle to wait on for `{id}`"
        )));
    };
    match timeout_at(deadline, rx).await {
        Err(_) => Err(timed_out(&id, WaitLevel::Stored)),
        Ok(Ok(Outcome::Stored)) => Ok(Reached::Stored),
        Ok(Ok(Outcome::Discarded(why))) => Err(unfinished(
            &id,
            axum::http::StatusCode::CONFLICT,
            "discarded",
            match why {
                convstore_core::lifecycle::Discard::Deleted => "not stored: the conversation (or its user) was deleted after this change was accepted".into(),
                convstore_core::lifecycle::Discard::NoConversation => "not stored: the conversation this appends to is gone (deleted, erased, or its post was refused)".into(),
            },
        )),
        Ok(Ok(Outcome::Rejected(reason))) => Err(unfinished(
            &id,
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "rejected_by_database",
            format!("PostgreSQL refused the conversation: {reason}"),
        )),
        Ok(Ok(Outcome::NotStored(reason))) => Err(unfinished(
            &id,
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "not_stored",
            format!("not stored before shutdown ({reason}); with the journal on it is stored after the restart"),
        )),
        Ok(Ok(Outcome::Lost) | Err(_)) => Err(unfinished(
            &id,
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "lost",
            "the conversation left the pipeline without being stored (see the log); with the journal on it is stored after the restart".into(),
        )),
    }
}

fn timed_out(id: &str, level: WaitLevel) -> ApiError {
    unfinished(
        id,
        axum::http::StatusCode::GATEWAY_TIMEOUT,
        "wait_timeout",
        format!(
            "accepted, but not {} within the wait; it is still in flight: poll GET /v1/conversations/{id}",
            level.as_str()
        ),
    )
}

fn unfinished(
    id: &str,
    status: axum::http::StatusCode,
    code: &'static str,
    message: String,
) -> ApiError {
    ApiError::Unfinished {
        id: id.to_string(),
        status,
        code,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(30);
    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn wait_levels_parse() {
        let w = parse_wait(None, T, MAX, true).unwrap();
        assert_eq!((w.level, w.timeout), (WaitLevel::Queued, T));
        let w = parse_wait(Some("wait=durable&timeout_ms=250"), T, MAX, true).unwrap();
        assert_eq!(
            (w.level, w.timeout),
            (WaitLevel::Durable, Duration::from_millis(250))
        );
        assert_eq!(
            parse_wait(Some("wait=stored"), T, MAX, true).unwrap().level,
            WaitLevel::Stored
        );
    }

    #[test]
    fn durable_without_journal_waits_for_the_commit() {
        assert_eq!(
            parse_wait(Some("wait=durable"), T, MAX, false)
                .unwrap()
                .level,
            WaitLevel::Stored
        );
    }

    #[test]
    fn bad_parameters_are_refused() {
        for q in [
            "wait=soon",
            "wiat=stored",
            "timeout_ms=0",
            "timeout_ms=-1",
            "timeout_ms=abc",
            "timeout_ms=300001",
        ] {
            assert!(parse_wait(Some(q), T, MAX, true).is_err(), "{q}");
        }
    }

    /// `?wait=stored&wait=queued` used to answer at `queued` (the last won).
    #[test]
    fn repeated_parameters_are_refused_by_name() {
        for (q, name) in [
            ("wait=stored&wait=queued", "`wait`"),
            ("wait=stored&wait=stored", "`wait`"),
            ("timeout_ms=5&wait=stored&timeout_ms=10", "`timeout_ms`"),
            ("wait=queued&wait", "`wait`"),
        ] {
            let e = parse_wait(Some(q), T, MAX, true).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST, "{q}");
            assert!(
                e.message().contains(name) && e.message().contains("given twice"),
                "{q}: {e:?}"
            );
        }
    }
}
