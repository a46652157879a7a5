//! Behind the queue: the batcher closes batches by size or time, a pool of
//! workers chunks, embeds and stores them, one transaction per batch.
//!
//! ```text
//! queue ──► batcher ──(channel of 1: the next batch forms while
//!                      the current ones are embedded)──► workers × N
//!                                                        chunk → cache → embed → store
//! ```

pub mod backfill;
pub mod batcher;
pub mod embedding;
pub mod shared;
pub mod worker;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::queue::BoundedQueue;
use convstore_embed::Embedder;
use convstore_embed::cache::EmbeddingCache;
use convstore_store::Store;

/// What every worker shares.
pub struct PipelineContext {
    /// The router over every configured backend (retries, fail-over and
    /// `embedding.max_wait_ms` happen inside it).
    pub embedder: Arc<dyn Embedder>,
    pub cache: Arc<EmbeddingCache>,
    /// `cache.shared`: look misses up in, and fill, the `embedding_cache`
    /// table (L2).
    pub shared_cache: bool,
    pub store: Arc<Store>,
    /// The model whose vectors are stored (cache key, chunk rows).
    pub model: Arc<str>,
    pub dimensions: usize,
    /// The model's context length in tokens, updated when a backend reports
    /// it; chunks are cut to fit it.
    pub context_tokens: Arc<AtomicUsize>,
    /// `chunking.max_tokens` (0 = the context length).
    pub max_chunk_tokens: usize,
    pub max_batch_inputs: usize,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub drain: Arc<DrainDeadline>,
    /// Conversations taken off the queue and not yet stored (or given up).
    pub in_flight: Arc<AtomicUsize>,
    /// Batches finished, for progress checks (watchdog, stats).
    pub batches_done: Arc<AtomicU64>,
    /// Conversations finished (stored, or given up), for rates.
    pub conversations_done: Arc<AtomicU64>,
    /// Backend and database calls that returned, whatever their outcome. A
    /// worker retrying a failing backend is alive; one stuck inside a call
    /// is not: the systemd watchdog tells them apart by this counter.
    pub calls_done: Arc<AtomicU64>,
}

/// The moment retry loops stop waiting for a backend or the database:
/// unset while running, set when shutdown begins.
#[derive(Debug, Default)]
pub struct DrainDeadline {
    deadline: OnceLock<Instant>,
    /// Wakes the calls waiting in [`DrainDeadline::wait_set`].
    was_set: tokio::sync::Notify,
}

impl DrainDeadline {
    pub fn set(&self, deadline: Instant) {
        if self.deadline.set(deadline).is_ok() {
            self.was_set.notify_waiters();
        }
    }

    pub fn get(&self) -> Option<Instant> {
        self.deadline.get().copied()
    }

    /// The deadline, once shutdown sets it.
    pub async fn wait_set(&self) -> Instant {
        loop {
            // Register before checking, so a `set` in between is not missed.
            let set = self.was_set.notified();
            tokio::pin!(set);
            set.as_mut().enable();
            if let Some(deadline) = self.get() {
                return deadline;
            }
            set.await;
        }
    }

    pub fn deadline_passed(&self) -> bool {
        self.get().is_some_and(|d| Instant::now() >= d)
    }

    /// Whether sleeping `delay` from now would end past the deadline.
    pub fn would_pass(&self, delay: Duration) -> bool {
        self.get().is_some_and(|d| Instant::now() + delay >= d)
    }
}

/// Batches for the workers: each conversation with its completion handle.
pub type Batch = Vec<crate::ticket::Queued>;

/// The running batcher and workers.
pub struct Pipeline {
    tasks: JoinSet<()>,
    ctx: Arc<PipelineContext>,
}

/// What was left when a drain hit its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    pub queued_left: usize,
    pub in_flight_left: usize,
    pub completed: bool,
}

impl Pipeline {
    /// Starts the batcher and `workers` workers on `queue`.
    pub fn start(
        ctx: Arc<PipelineContext>,
        queue: Arc<BoundedQueue<crate::ticket::Queued>>,
        workers: usize,
        batch_limits: Arc<batcher::BatchLimits>,
    ) -> Self {
        let mut tasks = JoinSet::new();
        // Capacity 1: one finished batch waits while all workers are busy,
        // so the next batch is formed while the current ones are embedded.
        let (tx, rx) = mpsc::channel::<Batch>(1);
        tasks.spawn(batcher::run(queue, tx, batch_limits, ctx.in_flight.clone()));
        let rx = Arc::new(Mutex::new(rx));
        for id in 0..workers {
            tasks.spawn(worker::run(id, ctx.clone(), rx.clone()));
        }
        Self { tasks, ctx }
    }

    pub fn context(&self) -> &Arc<PipelineContext> {
        &self.ctx
    }

    /// Waits for the batcher to empty the (closed) queue and the workers to
    /// store everything, until `deadline`. Retry loops give up at the
    /// deadline (texts without vectors are stored as pending); tasks still
    /// running after it are aborted and reported.
    pub async fn drain(
        mut self,
        queue: &BoundedQueue<crate::ticket::Queued>,
        deadline: Instant,
    ) -> DrainReport {
        // Leave a slice of the budget for the final writes after embedding
        // retries give up.
        let now = Instant::now();
        let budget = deadline.saturating_duration_since(now);
        self.ctx.drain.set(now + budget.mul_f64(0.8));
        let finished = tokio::time::timeout_at(deadline, async {
            while let Some(res) = self.tasks.join_next().await {
                if let Err(e) = res
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "A pipeline task panicked");
                }
            }
        })
        .await
        .is_ok();
        if !finished {
            self.tasks.abort_all();
        }
        DrainReport {
            queued_left: queue.len(),
            in_flight_left: self.ctx.in_flight.load(Ordering::Relaxed),
            completed: finished,
        }
    }
}
