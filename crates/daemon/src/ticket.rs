//! Completion handles: every accepted conversation carries a [`Ticket`]
//! from ingress to the commit, like Vector's finalizers. Whoever finishes
//! with the conversation completes the ticket with an [`Outcome`]; a ticket
//! dropped without one (a bug, an aborted task) reports [`Outcome::Lost`]
//! from its `Drop`, so a lost conversation cannot go unnoticed: the waiter
//! of `?wait=stored` hears of it, a metric counts it, and the log says so.
//!
//! The ticket also
//! - keeps the conversation in the [`InFlight`] registry, which answers
//!   `GET /v1/conversations/{id}` with `queued` until the commit;
//! - releases its journal record once the conversation needs no replay
//!   (stored, or refused by the database for good) and never otherwise.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use uuid::Uuid;

use convstore_core::model::Conversation;
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;

/// How a conversation's trip through the pipeline ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed in PostgreSQL (or found already there: same id).
    Stored,
    /// The database refused it for good (a value it cannot hold).
    Rejected(String),
    /// Given up at the shutdown deadline (the database was unreachable);
    /// still in the journal when the journal is on.
    NotStored(String),
    /// The ticket was dropped without an outcome.
    Lost,
}

impl Outcome {
    /// Whether the journal record can go: nothing a replay could fix.
    fn releases_journal(&self) -> bool {
        matches!(self, Self::Stored | Self::Rejected(_))
    }
}

/// Conversations accepted and not yet finished, by row id: the in-flight
/// view of `GET /v1/conversations/{id}`. Counted, since the same client id
/// can be in flight twice.
#[derive(Debug, Default)]
pub struct InFlight {
    ids: Mutex<HashMap<Uuid, u32>>,
}

impl InFlight {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, u32>> {
        // Each critical section is one map update: poison is harmless.
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, id: Uuid) {
        *self.lock().entry(id).or_insert(0) += 1;
    }

    fn remove(&self, id: Uuid) {
        let mut ids = self.lock();
        if let Some(n) = ids.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                ids.remove(&id);
            }
        }
    }

    /// Whether a conversation with this row id is accepted and not stored.
    pub fn contains(&self, id: Uuid) -> bool {
        self.lock().contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

type Release = Box<dyn FnOnce() + Send + Sync>;

/// The completion handle of one accepted conversation.
pub struct Ticket {
    id: Uuid,
    registry: Arc<InFlight>,
    waiter: Option<oneshot::Sender<Outcome>>,
    release: Option<Release>,
    done: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("id", &self.id)
            .field("journaled", &self.release.is_some())
            .field("waited_for", &self.waiter.is_some())
            .finish()
    }
}

impl Ticket {
    /// A ticket for conversation `id`, registered as in flight.
    pub fn new(id: Uuid, registry: Arc<InFlight>) -> Self {
        registry.add(id);
        Self {
            id,
            registry,
            waiter: None,
            release: None,
            done: false,
        }
    }

    /// Runs `release` once the conversation needs no replay.
    pub fn with_release(mut self, release: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.release = Some(Box::new(release));
        self
    }

    /// A receiver of the outcome (`?wait=stored`). One per ticket.
    pub fn subscribe(&mut self) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.waiter = Some(tx);
        rx
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn is_journaled(&self) -> bool {
        self.release.is_some()
    }

    /// Reports how the conversation's trip ended.
    pub fn complete(mut self, outcome: Outcome) {
        self.finish(outcome);
    }

    /// The conversation was refused before it was accepted (queue or
    /// journal full, shutting down, a journal error, a blocking wait that
    /// ran out, a request dropped while waiting for room): the caller hears
    /// of the refusal, or has gone, so nothing is lost and nothing is
    /// counted as lost. Nobody waits for it; a journal record, if one was
    /// written, was taken back (or, for a replayed record, stays for the
    /// next start): the release is not run.
    pub fn cancel(mut self) {
        self.done = true;
        self.registry.remove(self.id);
        self.release = None;
        self.waiter = None;
    }

    fn finish(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        // Out of the registry before the waiter hears: a client answered
        // 201 that reads the conversation back must find it stored.
        self.registry.remove(self.id);
        if outcome.releases_journal()
            && let Some(release) = self.release.take()
        {
            release();
        }
        if let Some(waiter) = self.waiter.take() {
            // The waiter may have given up (timeout): fine.
            let _ = waiter.send(outcome);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        metrics::counter!(m::CONVERSATIONS_FAILED, label::REASON => "lost").increment(1);
        report_lost(self.id, self.release.is_some());
        self.finish(Outcome::Lost);
    }
}

/// Seconds (since the epoch) of the last "lost" log line: one line per
/// second at most, with a count, so an aborted drain of thousands of
/// conversations does not flood the log.
static LAST_LOST_LOG: AtomicU64 = AtomicU64::new(0);
static LOST_SINCE_LOG: AtomicU64 = AtomicU64::new(0);

fn report_lost(id: Uuid, journaled: bool) {
    let lost = LOST_SINCE_LOG.fetch_add(1, Ordering::Relaxed) + 1;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_LOST_LOG.load(Ordering::Relaxed);
    if now > last
        && LAST_LOST_LOG
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        LOST_SINCE_LOG.fetch_sub(lost, Ordering::Relaxed);
        // Only what the ticket knows: whether a journal record holds this
        // conversation. Whether the journal is on is not the question (and a
        // ticket cannot tell): a refusal before the journal write is a
        // cancellation, never reported here.
        if journaled {
            tracing::error!(id = %id, count = lost, "Accepted conversations left the pipeline without being stored; they stay in the journal and are replayed at the next start");
        } else {
            tracing::error!(id = %id, count = lost, "Accepted conversations left the pipeline without being stored and are LOST: no journal record holds them");
        }
    }
}

/// A queue item: the conversation and its ticket.
#[derive(Debug)]
pub struct Queued {
    pub conversation: Conversation,
    pub ticket: Ticket,
}

impl Queued {
    pub fn new(conversation: Conversation, ticket: Ticket) -> Self {
        Self {
            conversation,
            ticket,
        }
    }

    pub fn into_parts(self) -> (Conversation, Ticket) {
        (self.conversation, self.ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[tokio::test]
    async fn completed_ticket_tells_the_waiter_and_leaves_the_registry() {
        let registry = InFlight::new();
        let mut ticket = Ticket::new(id(1), registry.clone());
        let rx = ticket.subscribe();
        assert!(registry.contains(id(1)));
        ticket.complete(Outcome::Stored);
        assert!(!registry.contains(id(1)));
        assert_eq!(rx.await.unwrap(), Outcome::Stored);
    }

    #[tokio::test]
    async fn dropped_ticket_reports_lost_and_keeps_its_journal_record() {
        let registry = InFlight::new();
        let released = Arc::new(AtomicUsize::new(0));
        let r = released.clone();
        let mut ticket = Ticket::new(id(2), registry.clone()).with_release(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        let rx = ticket.subscribe();
        drop(ticket);
        assert_eq!(rx.await.unwrap(), Outcome::Lost);
        assert_eq!(
            released.load(Ordering::SeqCst),
            0,
            "a lost one must be replayed"
        );
        assert!(registry.is_empty());
    }

    #[test]
    fn only_final_outcomes_release_the_journal_record() {
        for (outcome, releases) in [
            (Outcome::Stored, true),
            (Outcome::Rejected("bad".into()), true),
            (Outcome::NotStored("db down".into()), false),
            (Outcome::Lost, false),
        ] {
            let released = Arc::new(AtomicUsize::new(0));
            let r = released.clone();
            let ticket = Ticket::new(id(3), InFlight::new()).with_release(move || {
                r.fetch_add(1, Ordering::SeqCst);
            });
            ticket.complete(outcome.clone());
            assert_eq!(
                released.load(Ordering::SeqCst),
                usize::from(releases),
                "{outcome:?}"
            );
        }
    }

    /// `convstore_conversations_failed_total{reason="lost"}` recorded while
    /// `f` runs (on this thread).
    fn lost_counted(f: impl FnOnce()) -> u64 {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, f);
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| {
                key.key().name() == m::CONVERSATIONS_FAILED
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "reason" && l.value() == "lost")
            })
            .map(|(.., value)| match value {
                DebugValue::Counter(n) => n,
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn a_cancelled_ticket_is_a_refusal_not_a_loss() {
        let registry = InFlight::new();
        let released = Arc::new(AtomicUsize::new(0));
        let r = released.clone();
        let lost = lost_counted(|| {
            let mut ticket = Ticket::new(id(5), registry.clone()).with_release(move || {
                r.fetch_add(1, Ordering::SeqCst);
            });
            let mut rx = ticket.subscribe();
            ticket.cancel();
            // The waiter hears nothing: the request answers the refusal.
            assert!(rx.try_recv().is_err());
        });
        assert_eq!(lost, 0);
        assert!(registry.is_empty());
        assert_eq!(released.load(Ordering::SeqCst), 0);
        // A dropped one is a loss, counted.
        assert_eq!(
            lost_counted(|| drop(Ticket::new(id(6), registry.clone()))),
            1
        );
    }

    #[test]
    fn the_same_id_twice_stays_in_flight_until_both_finish() {
        let registry = InFlight::new();
        let a = Ticket::new(id(4), registry.clone());
        let b = Ticket::new(id(4), registry.clone());
        a.complete(Outcome::Stored);
        assert!(registry.contains(id(4)));
        b.complete(Outcome::Stored);
        assert!(!registry.contains(id(4)));
    }
}
