//! Turns the queue into batches: a batch closes at `batch.max_size`
//! conversations or `batch.max_wait_ms` after its first one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::queue::BoundedQueue;
use convstore_telemetry::metrics as m;

use super::Batch;

/// `batch.max_size` and `batch.max_wait_ms`, changeable while running (a
/// configuration reload); the next batch uses the new values.
#[derive(Debug)]
pub struct BatchLimits {
    max_size: AtomicUsize,
    max_wait_ms: AtomicU64,
}

impl BatchLimits {
    pub fn new(max_size: usize, max_wait: Duration) -> Self {
        let limits = Self {
            max_size: AtomicUsize::new(1),
            max_wait_ms: AtomicU64::new(1),
        };
        limits.set(max_size, max_wait);
        limits
    }

    /// Zero would stall the batcher; it is raised to 1.
    pub fn set(&self, max_size: usize, max_wait: Duration) {
        self.max_size.store(max_size.max(1), Ordering::Relaxed);
        let ms = u64::try_from(max_wait.as_millis()).unwrap_or(u64::MAX);
        self.max_wait_ms.store(ms.max(1), Ordering::Relaxed);
    }

    pub fn max_size(&self) -> usize {
        self.max_size.load(Ordering::Relaxed)
    }

    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms.load(Ordering::Relaxed))
    }
}

/// Runs until the queue is closed and empty, then drops `tx` so the
/// workers finish once the last batch is taken.
pub async fn run(
    queue: Arc<BoundedQueue<crate::ticket::Queued>>,
    tx: mpsc::Sender<Batch>,
    limits: Arc<BatchLimits>,
    in_flight: Arc<AtomicUsize>,
) {
    while let Some(batch) = queue.pop_batch(limits.max_size(), limits.max_wait()).await {
        in_flight.fetch_add(batch.len(), Ordering::Relaxed);
        metrics::gauge!(m::QUEUE_DEPTH).set(queue.len() as f64);
        metrics::gauge!(m::QUEUE_BYTES).set(queue.bytes() as f64);
        let wait = metrics::histogram!(m::QUEUE_WAIT_SECONDS);
        for c in &batch {
            wait.record(c.change.change.received_instant().elapsed().as_secs_f64());
        }
        metrics::histogram!(m::BATCH_CONVERSATIONS).record(batch.len() as f64);
        if let Err(mpsc::error::SendError(lost)) = tx.send(batch).await {
            // Only if every worker has stopped, i.e. the drain was aborted.
            in_flight.fetch_sub(lost.len(), Ordering::Relaxed);
            tracing::error!(
                conversations = lost.len(),
                "Workers stopped before the queue was empty; these conversations were not stored"
            );
            return;
        }
    }
    tracing::debug!("Queue closed and empty; batcher done");
}
