//! The shared intake's worker side (docs/SCALING.md): pulls changes from
//! the one durable consumer every instance shares and puts them on this
//! instance's queue, where the batcher and workers apply them exactly as
//! they apply local ones; each change is acknowledged to JetStream only
//! once its ticket settles, i.e. after the transaction that applied it
//! committed (or found it moot).
//!
//! Delivery is at least once: a change whose instance dies before the ack
//! comes again after `nats.ack_wait`, and one whose ack is lost comes again
//! too. Both are absorbed by the store: the same post finds its content
//! there (unchanged), an append finds its stamp already applied
//! (superseded).
//!
//! Order per conversation: a post or a delete needs none (the later stamp
//! wins in the store), but an append needs every earlier change of its
//! conversation applied first. The stream has one subject per
//! conversation, so before an append goes on the queue the feed asks the
//! stream for that conversation's earlier changes still waiting; if one is
//! held by another instance (or not pulled yet), the append waits here
//! (asking again, with progress acks) instead of being applied out of
//! order; it is not handed back, as each hand-back would count toward
//! `nats.max_deliver`.
//! Earlier changes this instance holds are ordered by the tickets, as
//! local ones are.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use convstore_core::lifecycle::{Change, StampedChange};
use convstore_nats::replies::RemoteOutcome;
use convstore_nats::{Pulled, SharedIntake};
use convstore_store::Store;
use convstore_store::dead_letters::DeadLetter;
use convstore_telemetry::metrics as m;

use super::batcher::BatchLimits;
use crate::queue::{BoundedQueue, PushError};
use crate::ticket::{InFlight, Outcome, Queued, Ticket};

/// How long a pull request stays open when nothing arrives (messages are
/// taken as they come; this only bounds an idle request).
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// When an append's earlier change is elsewhere: ask again after this,
/// doubling up to the second.
const ORDER_RETRY: Duration = Duration::from_millis(50);
const MAX_ORDER_RETRY: Duration = Duration::from_secs(1);
/// When this instance cannot take a change now (queue full, stopping).
const BUSY_RETRY: Duration = Duration::from_secs(1);
/// Earlier changes of one conversation looked up before an append; more
/// than this waiting is unusual, and the append simply comes back later.
const MAX_EARLIER: usize = 32;

/// Changes of each conversation this instance has pulled and not settled,
/// by stream sequence.
#[derive(Default)]
struct Held(Mutex<HashMap<String, BTreeSet<u64>>>);

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeSet<u64>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hold(&self, key: &str, sequence: u64) {
        self.lock()
            .entry(key.to_string())
            .or_default()
            .insert(sequence);
    }

    fn release(&self, key: &str, sequence: u64) {
        let mut held = self.lock();
        if let Some(set) = held.get_mut(key) {
            set.remove(&sequence);
            if set.is_empty() {
                held.remove(key);
            }
        }
    }

    fn holds_all(&self, key: &str, sequences: &[u64]) -> bool {
        let held = self.lock();
        let set = held.get(key);
        sequences
            .iter()
            .all(|s| set.is_some_and(|set| set.contains(s)))
    }
}

/// What the feed and its settle tasks share.
struct Feed {
    intake: Arc<SharedIntake>,
    queue: Arc<BoundedQueue<Queued>>,
    registry: Arc<InFlight>,
    store: Arc<Store>,
    held: Held,
    /// Makes holding, registering and queueing one step (`enqueue`).
    order: Mutex<()>,
    /// Pulled changes not yet acknowledged, terminated or handed back:
    /// at shutdown the feed waits for them, so the acks of what the drain
    /// stored go out before the process exits.
    unsettled: AtomicUsize,
    all_settled: Notify,
}

/// Counts one pulled change as unsettled until dropped.
struct Unsettled(Arc<Feed>);

impl Unsettled {
    fn new(feed: &Arc<Feed>) -> Self {
        feed.unsettled.fetch_add(1, Ordering::AcqRel);
        Self(feed.clone())
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if self.0.unsettled.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.all_settled.notify_waiters();
        }
    }
}

/// Pulls until `stop` (shutdown begins); what it pulled and did not
/// settle by then is handed back to the stream, or redelivered after
/// `nats.ack_wait` if the process dies first.
pub async fn run(
    intake: Arc<SharedIntake>,
    queue: Arc<BoundedQueue<Queued>>,
    registry: Arc<InFlight>,
    store: Arc<Store>,
    limits: Arc<BatchLimits>,
    stop: CancellationToken,
) {
    let feed = Arc::new(Feed {
        intake,
        queue,
        registry,
        store,
        held: Held::default(),
        order: Mutex::new(()),
        unsettled: AtomicUsize::new(0),
        all_settled: Notify::new(),
    });
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        // Pull no more than the queue has room for: the stream, not this
        // instance's memory, holds the backlog.
        let room = feed.queue.capacity().saturating_sub(feed.queue.len());
        let want = limits.max_size().min(room);
        if want == 0 {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(20)) => continue,
            }
        }
        let pulled = tokio::select! {
            () = stop.cancelled() => break,
            pulled = feed.intake.pull(want, PULL_EXPIRES) => pulled,
        };
        let mut pulled = match pulled {
            Ok(pulled) => {
                failures = 0;
                pulled
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let delay = Duration::from_millis(200 * u64::from(failures.min(25)));
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "Cannot pull from the shared intake; retrying");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => break,
                next = pulled.next() => next,
            };
            let Some(message) = next else { break };
            take(&feed, message).await;
        }
    }
    // The drain stores what this instance holds; the settle tasks then
    // acknowledge it (or hand it back). The app bounds this wait.
    loop {
        let settled = feed.all_settled.notified();
        tokio::pin!(settled);
        settled.as_mut().enable();
        if feed.unsettled.load(Ordering::Acquire) == 0 {
            break;
        }
        settled.await;
    }
    tracing::debug!("Shared intake feed stopped");
}

/// One pulled change onto the queue, with the task that settles it.
async fn take(feed: &Arc<Feed>, pulled: Pulled) {
    let sequence = pulled.sequence();
    let change = match pulled.change() {
        Ok(change) => change,
        Err(reason) => {
            tracing::error!(
                sequence,
                reason,
                "A message in the shared intake is not a change; terminating it and keeping it in dead_letters"
            );
            dead_letter(feed, &pulled, "", None, &format!("not a change: {reason}")).await;
            return;
        }
    };
    // Stamps of every instance pass through here: later local stamps are
    // later than what this instance has seen (a hybrid logical clock).
    crate::stamp::observe(change.stamp);
    let key = change.change.key();
    if matches!(change.change, Change::Append(_)) && !its_turn(feed, &key, sequence).await {
        // Held here (with progress) until its turn, never handed back:
        // each hand-back would count toward `nats.max_deliver`.
        metrics::counter!(m::NATS_DEFERRED).increment(1);
        let unsettled = Unsettled::new(feed);
        tokio::spawn(async move {
            wait_for_turn(unsettled.0.clone(), pulled, change, key, sequence).await;
            drop(unsettled);
        });
        return;
    }
    enqueue(feed, pulled, change, key, sequence).await;
}

/// Whether every earlier change of `key` still in the stream is one this
/// instance holds (and so orders by its tickets).
async fn its_turn(feed: &Feed, key: &str, sequence: u64) -> bool {
    match feed.intake.earlier(key, sequence, MAX_EARLIER).await {
        Ok(earlier) => feed.held.holds_all(key, &earlier),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot look up an append's earlier changes; asking again");
            false
        }
    }
}

/// An append whose conversation has an earlier change elsewhere: asks
/// again, backing off to once a second, until that change is applied and
/// acknowledged by whoever holds it; hands it back only when this instance
/// is stopping.
async fn wait_for_turn(
    feed: Arc<Feed>,
    pulled: Pulled,
    change: StampedChange,
    key: String,
    sequence: u64,
) {
    let progress_every = feed.intake.settings().ack_wait / 2;
    let mut last_progress = Instant::now();
    let mut delay = ORDER_RETRY;
    loop {
        tokio::time::sleep(delay).await;
        if feed.queue.is_closed() {
            pulled.defer(BUSY_RETRY).await;
            return;
        }
        if its_turn(&feed, &key, sequence).await {
            break;
        }
        delay = (delay * 2).min(MAX_ORDER_RETRY);
        if last_progress.elapsed() >= progress_every {
            pulled.progress().await;
            last_progress = Instant::now();
        }
    }
    enqueue(&feed, pulled, change, key, sequence).await;
}

/// Onto the queue, with the task that settles it. Holding the sequence,
/// registering the ticket and queueing happen as one step, so a later
/// change of the conversation that sees this one held also finds it
/// registered before itself.
async fn enqueue(
    feed: &Arc<Feed>,
    pulled: Pulled,
    change: StampedChange,
    key: String,
    sequence: u64,
) {
    let bytes = change.change.approx_bytes();
    let queued = {
        let _order = feed.order.lock().unwrap_or_else(|p| p.into_inner());
        feed.held.hold(&key, sequence);
        let mut ticket = Ticket::for_change(&change, feed.registry.clone());
        if let Some(traceparent) = pulled.traceparent() {
            ticket.continue_trace(&traceparent);
        }
        let outcome = ticket.subscribe();
        match feed.queue.try_push(Queued::new(change, ticket), bytes) {
            Ok(()) => Some(outcome),
            Err(refused) => {
                let (PushError::Full(item) | PushError::TooLarge(item) | PushError::Closed(item)) =
                    refused;
                item.ticket.cancel();
                feed.held.release(&key, sequence);
                None
            }
        }
    };
    match queued {
        Some(outcome) => {
            let unsettled = Unsettled::new(feed);
            tokio::spawn(async move {
                settle(unsettled.0.clone(), pulled, key, sequence, outcome).await;
                drop(unsettled);
            });
        }
        None => pulled.defer(BUSY_RETRY).await,
    }
}

/// Waits for the change's outcome (telling JetStream the work goes on
/// meanwhile), then acknowledges, terminates or hands it back.
async fn settle(
    feed: Arc<Feed>,
    pulled: Pulled,
    key: String,
    sequence: u64,
    mut outcome: oneshot::Receiver<Outcome>,
) {
    let progress_every = feed.intake.settings().ack_wait / 2;
    let outcome = loop {
        tokio::select! {
            outcome = &mut outcome => break outcome.unwrap_or(Outcome::Lost),
            () = tokio::time::sleep(progress_every) => pulled.progress().await,
        }
    };
    feed.held.release(&key, sequence);
    let remote = match outcome {
        Outcome::Stored => {
            pulled.ack().await;
            Some(RemoteOutcome::Stored)
        }
        Outcome::Discarded(why) => {
            pulled.ack().await;
            Some(RemoteOutcome::Discarded {
                why: why.as_str().to_string(),
            })
        }
        Outcome::Rejected(reason) => {
            let user = pulled
                .change()
                .map(|c| c.change.user_id().to_string())
                .unwrap_or_default();
            dead_letter(&feed, &pulled, &user, Some(&key), &reason).await;
            Some(RemoteOutcome::Rejected { reason })
        }
        // Shutdown deadline, or a ticket dropped: not applied here, so
        // someone else (or this instance after its restart) applies it.
        Outcome::NotStored(_) | Outcome::Lost => {
            pulled.defer(BUSY_RETRY).await;
            None
        }
    };
    if let (Some(remote), Some(reply)) = (remote, pulled.reply_to()) {
        feed.intake.reply(&reply, &remote).await;
    }
}

/// Keeps `pulled` in `dead_letters` and terminates it in the stream; if
/// the row cannot be written, the change is handed back instead (never
/// terminated without its record).
async fn dead_letter(feed: &Feed, pulled: &Pulled, user_id: &str, key: Option<&str>, reason: &str) {
    let letter = DeadLetter {
        user_id,
        conversation_key: key,
        stream: &feed.intake.settings().stream,
        stream_sequence: pulled.sequence(),
        deliveries: pulled.delivered(),
        payload: pulled.payload(),
        reason,
    };
    match feed.store.record_dead_letter(&letter).await {
        Ok(()) => pulled.terminate().await,
        Err(e) => {
            tracing::error!(error = %e, sequence = pulled.sequence(), "Cannot record a dead letter; the change comes back later");
            pulled.defer(BUSY_RETRY).await;
        }
    }
}

/// Samples the shared consumer's state and the dead letters into the
/// gauges every few seconds (`convstore_nats_consumer_pending`,
/// `_ack_pending`, `convstore_nats_up`, `convstore_dead_letters`).
pub async fn sample(intake: Arc<SharedIntake>, store: Arc<Store>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        match tokio::time::timeout(Duration::from_secs(2), intake.consumer_state()).await {
            Ok(Ok(state)) => {
                metrics::gauge!(m::NATS_CONSUMER_PENDING).set(state.pending as f64);
                metrics::gauge!(m::NATS_CONSUMER_ACK_PENDING).set(state.ack_pending as f64);
                metrics::gauge!(m::NATS_UP).set(1.0);
            }
            _ => metrics::gauge!(m::NATS_UP).set(0.0),
        }
        if let Ok(n) = store.dead_letter_count().await {
            metrics::gauge!(m::DEAD_LETTERS).set(n as f64);
        }
    }
}
