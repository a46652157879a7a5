//! The telemetry task: keeps the windows rolling, the Prometheus recorder
//! trimmed, and the gauges that are sampled rather than recorded fresh.
//!
//! Every [`TICK`]:
//! - starts a new `/v1/stats` window slot;
//! - runs the Prometheus recorder's upkeep, which folds recorded histogram
//!   samples into their buckets (without it they pile up in memory until
//!   the next scrape, and a daemon nobody scrapes would grow forever);
//! - samples pipeline in-flight.
//!
//! Every [`PENDING_EVERY`], counts the rows still waiting for a vector
//! (one indexed query: both tables have a partial index on that status).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use convstore_store::Store;
use convstore_telemetry::metrics as m;
use convstore_telemetry::stats::{PipelineProbe, Stats, TICK};

/// How often the database is asked how much waits for an embedding.
pub const PENDING_EVERY: Duration = Duration::from_secs(10);

/// Runs until `stop` is cancelled.
pub async fn run(
    stats: Arc<Stats>,
    handle: PrometheusHandle,
    store: Option<Arc<Store>>,
    pipeline: Option<PipelineProbe>,
    stop: CancellationToken,
) {
    if let Some(p) = &pipeline {
        metrics::gauge!(m::PIPELINE_WORKERS).set(p.workers as f64);
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick fires at once; the window's first slot began at start.
    tick.tick().await;
    let mut last_pending: Option<Instant> = None;
    loop {
        if let Some(store) = &store
            && last_pending.is_none_or(|at| at.elapsed() >= PENDING_EVERY)
        {
            last_pending = Some(Instant::now());
            sample_pending(&stats, store).await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        stats.tick(Instant::now());
        handle.run_upkeep();
        if let Some(p) = &pipeline {
            metrics::gauge!(m::PIPELINE_IN_FLIGHT).set(p.in_flight.load(Ordering::Relaxed) as f64);
        }
    }
}

async fn sample_pending(stats: &Stats, store: &Store) {
    let query = store.pending_counts();
    match tokio::time::timeout(Duration::from_secs(5), query).await {
        Ok(Ok((conversations, chunks))) => {
            metrics::gauge!(m::CONVERSATIONS_PENDING_EMBEDDING).set(conversations as f64);
            metrics::gauge!(m::CHUNKS_PENDING_EMBEDDING).set(chunks as f64);
            stats.set_pending(conversations, chunks, Instant::now());
        }
        // The database being away is reported by /readyz and the store's
        // own retries; the gauge keeps its last value.
        Ok(Err(e)) => tracing::debug!(error = %e, "Cannot count pending embeddings"),
        Err(_) => tracing::debug!("Counting pending embeddings took over 5 s"),
    }
}
