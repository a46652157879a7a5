//! The backfill task: embeds the chunks that were stored `pending` because
//! no backend could embed them in time, once a backend is healthy again.
//!
//! Each round claims up to `backfill.batch_size` due pending chunks
//! ([`Store::backfill_round`]: `FOR UPDATE SKIP LOCKED`, so any number of
//! instances can run it on one database), embeds them through the same
//! stage as new batches (L1, L2, router, poison isolation), and writes
//! vectors, dead letters and deferrals in one transaction.
//!
//! Pacing heuristic: a round runs only while at least one backend is ready
//! (up, circuit not open), so a backlog does not hammer backends that are
//! known to be down; after a full round the next starts at once (there is
//! probably more); after an empty, partial or wholly deferred round, or an
//! error, the task waits `backfill.interval_ms`. New batches share the
//! backends with the backfill; the backfill takes one batch's worth of
//! capacity at a time, so new conversations keep flowing while it works.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::BackfillSettings;
use convstore_embed::router::Router;
use convstore_store::backfill::{BackfillOutcome, BackfillResult, DeferPolicy, PendingChunk};
use convstore_telemetry::metrics as m;

use super::PipelineContext;
use super::embedding::{Resolved, embed_texts};
use convstore_core::model::ChunkVector;
use convstore_telemetry::events::label;

/// How often the dead-letter and backlog counts are sampled.
const BACKLOG_EVERY: Duration = Duration::from_secs(10);

/// The backfill's settings.
#[derive(Debug, Clone, Copy)]
pub struct BackfillConfig {
    pub batch_size: usize,
    pub interval: Duration,
    pub defer: DeferPolicy,
}

impl BackfillConfig {
    pub fn from_settings(settings: &BackfillSettings) -> Self {
        let interval = Duration::from_millis(settings.interval_ms.get());
        Self {
            batch_size: settings.batch_size.get(),
            interval,
            defer: DeferPolicy {
                base: interval,
                max: Duration::from_millis(settings.max_defer_ms.get()).max(interval),
            },
        }
    }
}

/// Runs rounds until `stop`.
pub async fn run(
    ctx: Arc<PipelineContext>,
    router: Arc<Router>,
    config: BackfillConfig,
    stop: CancellationToken,
) {
    for outcome in ["embedded", "failed", "deferred", "split"] {
        metrics::counter!(m::BACKFILL_CHUNKS, label::OUTCOME => outcome).absolute(0);
    }
    let mut sampled: Option<Instant> = None;
    let mut since_sample = BackfillOutcome::default();
    loop {
        if sampled.is_none_or(|at| at.elapsed() >= BACKLOG_EVERY) {
            sampled = Some(Instant::now());
            sample_backlog(&ctx, &mut since_sample).await;
        }
        let more = if router.ready_backends() == 0 {
            false
        } else {
            let round =
                ctx.store
                    .backfill_round(&ctx.model, config.batch_size, config.defer, |chunks| {
                        embed_claimed(&ctx, chunks)
                    });
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                result = round => result,
            };
            match result {
                Ok(outcome) => {
                    record(&outcome, &mut since_sample);
                    outcome.claimed == config.batch_size && outcome.deferred < outcome.claimed
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Backfill round failed; retrying later");
                    false
                }
            }
        };
        if !more {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(config.interval) => {}
            }
        }
    }
}

/// The stage's verdict for each claimed chunk, in order.
async fn embed_claimed(ctx: &PipelineContext, chunks: Vec<PendingChunk>) -> Vec<BackfillResult> {
    let texts: Vec<_> = chunks
        .iter()
        .map(|c| (c.content_hash, c.content.as_str()))
        .collect();
    let outcomes: HashMap<_, _> = embed_texts(ctx, &texts).await;
    chunks
        .iter()
        .map(|c| match outcomes.get(&c.content_hash) {
            Some(Resolved::Whole(ChunkVector::Embedded(v))) => BackfillResult::Embedded(v.clone()),
            Some(Resolved::Whole(ChunkVector::Failed(reason))) => {
                BackfillResult::Failed(reason.clone())
            }
            Some(Resolved::Split(pieces)) => BackfillResult::Split(pieces.clone()),
            Some(Resolved::Whole(ChunkVector::Pending)) | None => BackfillResult::Deferred,
        })
        .collect()
}

fn record(outcome: &BackfillOutcome, total: &mut BackfillOutcome) {
    if outcome.claimed == 0 {
        return;
    }
    for (label, n) in [
        ("embedded", outcome.embedded),
        ("failed", outcome.failed),
        ("deferred", outcome.deferred),
        ("split", outcome.split),
    ] {
        metrics::counter!(m::BACKFILL_CHUNKS, label::OUTCOME => label).increment(n as u64);
    }
    tracing::debug!(
        claimed = outcome.claimed,
        embedded = outcome.embedded,
        failed = outcome.failed,
        deferred = outcome.deferred,
        split = outcome.split,
        "Backfill round done"
    );
    total.claimed += outcome.claimed;
    total.embedded += outcome.embedded;
    total.failed += outcome.failed;
    total.deferred += outcome.deferred;
    total.split += outcome.split;
    total.conversations += outcome.conversations;
}

/// Dead-letter gauges, and one progress line when the backfill did work
/// since the last sample.
async fn sample_backlog(ctx: &PipelineContext, since: &mut BackfillOutcome) {
    let backlog = match ctx.store.embedding_backlog().await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(error = %e, "Cannot count the embedding backlog");
            return;
        }
    };
    metrics::gauge!(m::CHUNKS_FAILED_EMBEDDING).set(backlog.chunks_failed as f64);
    metrics::gauge!(m::CONVERSATIONS_FAILED_EMBEDDING).set(backlog.conversations_failed as f64);
    if since.claimed > 0 {
        tracing::info!(
            embedded = since.embedded,
            failed = since.failed,
            deferred = since.deferred,
            chunks_pending = backlog.chunks_pending,
            conversations_pending = backlog.conversations_pending,
            "Backfill progress"
        );
        *since = BackfillOutcome::default();
    }
}
