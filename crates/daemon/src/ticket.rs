//! Completion handles: every accepted conversation carries a [`Ticket`]
//! from ingress to the commit, like Vector's finalizers. Whoever finishes
//! with the conversation completes the ticket with an [`Outcome`]; a ticket
//! dropped without one (a bug, an aborted task) reports [`Outcome::Lost`]
//! from its `Drop`, so a lost conversation cannot go unnoticed: the waiter
//! of `?wait=stored` hears of it, a metric counts it, and the log says so.
//!
//! The ticket also
//! - keeps the conversation in the [`InFlight`] registry, which answers
//!   `GET /v1/conversations/{id}` with `queued` until the commit, and knows
//!   the conversation an append is for before it is stored;
//! - orders the changes of one conversation: each ticket holds the
//!   completion of the change accepted before it for the same row
//!   ([`Ticket::after`]), which a worker awaits before it applies its own,
//!   so changes apply in the order they were acknowledged whatever batch
//!   or worker carries them;
//! - releases its journal record once the change needs no replay (stored,
//!   discarded, or refused by the database for good) and never otherwise.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use convstore_core::lifecycle::{Discard, StampedChange};
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;
use convstore_telemetry::traces::{Carried, Link};

/// How a conversation's trip through the pipeline ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed in PostgreSQL (or found already there: same id).
    Stored,
    /// Not applied, for good: stamped before a delete or erasure, or an
    /// append whose conversation is gone.
    Discarded(Discard),
    /// The database refused it for good (a value it cannot hold).
    Rejected(String),
    /// Given up at the shutdown deadline (the database was unreachable);
    /// still in the journal when the journal is on.
    NotStored(String),
    /// The ticket was dropped without an outcome.
    Lost,
}

impl Outcome {
    /// The `outcome` of the change's `ack` span.
    fn as_str(&self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Discarded(_) => "discarded",
            Self::Rejected(_) => "rejected",
            Self::NotStored(_) => "not_stored",
            Self::Lost => "lost",
        }
    }

    /// Whether the journal record can go: nothing a replay could fix.
    fn releases_journal(&self) -> bool {
        matches!(self, Self::Stored | Self::Discarded(_) | Self::Rejected(_))
    }
}

/// Changes accepted and not yet finished, by row id: the in-flight view of
/// `GET /v1/conversations/{id}`, the conversation an append is for, and
/// the last change of each row (the next one waits for it).
#[derive(Debug, Default)]
pub struct InFlight {
    ids: Mutex<HashMap<Uuid, Entry>>,
    /// Admission order, for telling changes of one batch apart.
    next_seq: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    /// Changes of this row in flight.
    count: u32,
    /// The user of the latest post (an append inherits it).
    user_id: String,
    /// The latest change accepted, which the next one waits for.
    tail: Option<Predecessor>,
}

/// The change accepted just before another one of the same row: its
/// admission number and a receiver that closes when it finishes.
#[derive(Debug, Clone)]
pub struct Predecessor {
    pub seq: u64,
    done: watch::Receiver<()>,
}

impl Predecessor {
    /// Waits until that change finished (stored, discarded, refused,
    /// cancelled or lost: whatever it was, it no longer runs).
    pub async fn finished(mut self) {
        while self.done.changed().await.is_ok() {}
    }
}

impl InFlight {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Entry>> {
        // Each critical section is one map update: poison is harmless.
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a change of `id`; returns its admission number, the
    /// change before it, and its own completion sender.
    fn add(
        &self,
        id: Uuid,
        user_id: Option<&str>,
    ) -> (u64, Option<Predecessor>, watch::Sender<()>) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = watch::channel(());
        let mut ids = self.lock();
        let entry = ids.entry(id).or_insert_with(|| Entry {
            count: 0,
            user_id: user_id.unwrap_or_default().to_string(),
            tail: None,
        });
        entry.count += 1;
        if let Some(user) = user_id {
            user.clone_into(&mut entry.user_id);
        }
        let after = entry.tail.replace(Predecessor { seq, done: rx });
        (seq, after, done)
    }

    fn remove(&self, id: Uuid, seq: u64, after: Option<&Predecessor>) {
        let mut ids = self.lock();
        if let Some(entry) = ids.get_mut(&id) {
            // A change taken back before it was accepted leaves the chain
            // as it was: the next one waits for the one before it.
            if entry.tail.as_ref().is_some_and(|t| t.seq == seq) {
                entry.tail = after.cloned();
            }
            entry.count -= 1;
            if entry.count == 0 {
                ids.remove(&id);
            }
        }
    }

    /// Whether a change of this row id is accepted and not finished.
    pub fn contains(&self, id: Uuid) -> bool {
        self.lock().contains_key(&id)
    }

    /// The user of the conversation with this row id, while a change of it
    /// is in flight.
    pub fn user_of(&self, id: Uuid) -> Option<String> {
        self.lock().get(&id).map(|e| e.user_id.clone())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

type Release = Box<dyn FnOnce() + Send + Sync>;

/// The completion handle of one accepted change.
pub struct Ticket {
    id: Uuid,
    seq: u64,
    registry: Arc<InFlight>,
    /// The change of the same row accepted before this one, if in flight.
    after: Option<Predecessor>,
    /// Closed when this ticket finishes, releasing the change after it.
    _finished: watch::Sender<()>,
    waiter: Option<oneshot::Sender<Outcome>>,
    release: Option<Release>,
    done: bool,
    /// The change's trace, when traced (`convstore_telemetry::traces`).
    trace: Option<Carried>,
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
    /// A ticket for a change of row `id`, registered as in flight (and as
    /// the row's latest change). `user_id`: the conversation's user as of
    /// this change.
    pub fn new(id: Uuid, user_id: Option<&str>, registry: Arc<InFlight>) -> Self {
        let (seq, after, finished) = registry.add(id, user_id);
        Self {
            id,
            seq,
            registry,
            after,
            _finished: finished,
            waiter: None,
            release: None,
            done: false,
            trace: Carried::enqueued(),
        }
    }

    /// A ticket for `change`.
    /// An append carries the user of its conversation, so the registry
    /// knows it even when the append is the only change in flight.
    pub fn for_change(change: &StampedChange, registry: Arc<InFlight>) -> Self {
        Self::new(
            change.change.row_id(),
            Some(change.change.user_id()),
            registry,
        )
    }

    /// Admission number: later changes have larger ones.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The change of the same row to wait for before applying this one.
    pub fn after(&self) -> Option<&Predecessor> {
        self.after.as_ref()
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

    /// Goes on with the trace of the request that sent the change (pulled
    /// from the shared intake's stream, with its `traceparent`).
    pub fn continue_trace(&mut self, traceparent: &str) {
        if self.trace.is_none() {
            self.trace = Carried::continued(traceparent);
        }
    }

    /// A batch took the change: its queue wait ends; the trace context a
    /// batch links to, when it is traced.
    pub fn dequeued(&mut self) -> Option<Link> {
        self.trace.as_mut().map(Carried::dequeued)
    }

    /// The batch that carries it, for the ack's link.
    pub fn carried_by(&mut self, batch: &tracing::Span) {
        if let Some(trace) = &mut self.trace {
            trace.carried_by(batch);
        }
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
        self.registry.remove(self.id, self.seq, self.after.as_ref());
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
        self.registry.remove(self.id, self.seq, None);
        if outcome.releases_journal()
            && let Some(release) = self.release.take()
        {
            release();
        }
        if let Some(trace) = self.trace.take() {
            trace.acked(outcome.as_str());
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

/// A queue item: the change and its ticket.
#[derive(Debug)]
pub struct Queued {
    pub change: StampedChange,
    pub ticket: Ticket,
}

impl Queued {
    pub fn new(change: StampedChange, ticket: Ticket) -> Self {
        Self { change, ticket }
    }

    pub fn into_parts(self) -> (StampedChange, Ticket) {
        (self.change, self.ticket)
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
        let mut ticket = Ticket::new(id(1), None, registry.clone());
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
        let mut ticket = Ticket::new(id(2), None, registry.clone()).with_release(move || {
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
            let ticket = Ticket::new(id(3), None, InFlight::new()).with_release(move || {
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
            let mut ticket = Ticket::new(id(5), None, registry.clone()).with_release(move || {
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
            lost_counted(|| drop(Ticket::new(id(6), None, registry.clone()))),
            1
        );
    }

    #[test]
    fn the_same_id_twice_stays_in_flight_until_both_finish() {
        let registry = InFlight::new();
        let a = Ticket::new(id(4), None, registry.clone());
        let b = Ticket::new(id(4), None, registry.clone());
        a.complete(Outcome::Stored);
        assert!(registry.contains(id(4)));
        b.complete(Outcome::Stored);
        assert!(!registry.contains(id(4)));
    }
}
