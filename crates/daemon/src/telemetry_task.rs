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
//! Every [`PENDING_EVERY`], asks the database how far embedding is behind:
//! the rows still waiting for a vector (partial indexes on that status),
//! since when, and the share of chunks embedded (one count of the chunk
//! table).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use convstore_store::Store;
use convstore_telemetry::metrics as m;
use convstore_telemetry::stats::{PendingCounts, PipelineProbe, Stats, TICK};

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
    let query = store.embedding_freshness();
    match tokio::time::timeout(Duration::from_secs(5), query).await {
        Ok(Ok(f)) => {
            metrics::gauge!(m::CONVERSATIONS_PENDING_EMBEDDING).set(f.conversations as f64);
            metrics::gauge!(m::CHUNKS_PENDING_EMBEDDING).set(f.chunks as f64);
            metrics::gauge!(m::PENDING_OLDEST_AGE_SECONDS)
                .set(f.oldest_pending_age_seconds.unwrap_or(0.0));
            metrics::gauge!(m::EMBEDDING_COVERAGE).set(f.coverage());
            stats.set_pending(
                PendingCounts {
                    conversations: f.conversations,
                    chunks: f.chunks,
                    oldest_age_seconds: f.oldest_pending_age_seconds,
                    coverage: Some(f.coverage()),
                    failed_chunks: Some(f.failed_chunks),
                },
                Instant::now(),
            );
        }
        // The database being away is reported by /readyz and the store's
        // own retries; the gauges keep their last value.
        Ok(Err(e)) => tracing::debug!(error = %e, "Cannot sample the embedding backlog"),
        Err(_) => tracing::debug!("Sampling the embedding backlog took over 5 s"),
    }
}
