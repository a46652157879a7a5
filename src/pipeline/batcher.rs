//! Turns the queue into batches: a batch closes at `batch.max_size`
//! conversations or `batch.max_wait_ms` after its first one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::model::Conversation;
use crate::queue::BoundedQueue;
use crate::telemetry::metrics as m;

use super::Batch;

/// Runs until the queue is closed and empty, then drops `tx` so the
/// workers finish once the last batch is taken.
pub async fn run(
    queue: Arc<BoundedQueue<Conversation>>,
    tx: mpsc::Sender<Batch>,
    max_size: usize,
    max_wait: Duration,
    in_flight: Arc<AtomicUsize>,
) {
    while let Some(batch) = queue.pop_batch(max_size, max_wait).await {
        in_flight.fetch_add(batch.len(), Ordering::Relaxed);
        metrics::gauge!(m::QUEUE_DEPTH).set(queue.len() as f64);
        metrics::gauge!(m::QUEUE_BYTES).set(queue.bytes() as f64);
        let wait = metrics::histogram!(m::QUEUE_WAIT_SECONDS);
        for c in &batch {
            wait.record(c.received_instant.elapsed().as_secs_f64());
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
