//! The embedding stage of a batch: cache first, then the backend for the
//! misses, each distinct text sent once.
//!
//! Failure handling, per group of texts sent together:
//! - retryable errors (backend down, timeout, 429/5xx) and operator errors
//!   (model missing, wrong dimension) are retried with backoff until the
//!   drain deadline; after it the texts are stored as `pending`, so a dead
//!   embedder never costs text;
//! - a rejection (400) means one input is bad: the group is split in halves
//!   until the bad input stands alone and is marked `failed` with the
//!   backend's reason, while the rest are embedded ("poison isolation").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::embed::EmbedError;
use crate::embed::cache::CacheKey;
use crate::model::{Chunk, ContentHash};
use crate::telemetry::metrics as m;

use super::PipelineContext;
use super::retry::Backoff;

/// What became of one distinct chunk text.
#[derive(Debug, Clone)]
pub enum VectorOutcome {
    Embedded(Arc<[f32]>),
    /// No backend could embed it before the drain deadline.
    Pending,
    /// A backend rejected it for good; the reason.
    Failed(String),
}

/// Resolves every distinct chunk text of a batch to a vector, a pending
/// mark or a failure, filling the cache with what the backend returned.
pub async fn embed_chunks<'a>(
    ctx: &PipelineContext,
    chunks: impl IntoIterator<Item = &'a Chunk>,
) -> HashMap<ContentHash, VectorOutcome> {
    let mut distinct: Vec<&Chunk> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for chunk in chunks {
        if seen.insert(chunk.content_hash) {
            distinct.push(chunk);
        }
    }
    let keys: Vec<CacheKey> = distinct
        .iter()
        .map(|c| CacheKey {
            model: ctx.model.clone(),
            hash: c.content_hash,
        })
        .collect();
    let cached = ctx.cache.get_many(keys.iter());

    let mut outcomes = HashMap::with_capacity(distinct.len());
    let mut misses: Vec<&Chunk> = Vec::new();
    for (chunk, hit) in distinct.iter().zip(cached) {
        match hit {
            Some(vector) => {
                outcomes.insert(chunk.content_hash, VectorOutcome::Embedded(vector));
            }
            None => misses.push(chunk),
        }
    }
    let hits = distinct.len() - misses.len();
    metrics::counter!(m::CACHE_HITS, "tier" => "l1").increment(hits as u64);
    metrics::counter!(m::CACHE_MISSES, "tier" => "l1").increment(misses.len() as u64);

    for group in misses.chunks(ctx.max_batch_inputs) {
        let results = embed_group(ctx, group).await;
        let mut fresh = Vec::new();
        for (chunk, outcome) in group.iter().zip(results) {
            if let VectorOutcome::Embedded(v) = &outcome {
                fresh.push((
                    CacheKey {
                        model: ctx.model.clone(),
                        hash: chunk.content_hash,
                    },
                    v.clone(),
                ));
            }
            outcomes.insert(chunk.content_hash, outcome);
        }
        ctx.cache.insert_many(fresh);
    }
    metrics::gauge!(m::CACHE_ENTRIES).set(ctx.cache.len() as f64);
    outcomes
}

/// Embeds one group of texts, isolating rejected inputs by halving.
async fn embed_group(ctx: &PipelineContext, group: &[&Chunk]) -> Vec<VectorOutcome> {
    let mut outcomes: Vec<Option<VectorOutcome>> = vec![None; group.len()];
    // Ranges still to embed; a rejected range is replaced by its halves.
    let mut work = vec![(0, group.len())];
    while let Some((start, end)) = work.pop() {
        let texts: Vec<String> = group[start..end]
            .iter()
            .map(|c| c.content.clone())
            .collect();
        match embed_with_retry(ctx, &texts).await {
            Ok(vectors) => {
                for (slot, v) in outcomes[start..end].iter_mut().zip(vectors) {
                    *slot = Some(VectorOutcome::Embedded(Arc::from(v)));
                }
            }
            Err(GroupFailure::Rejected(reason)) if end - start == 1 => {
                tracing::warn!(
                    backend = ctx.embedder.name(),
                    content_hash = hex::encode(group[start].content_hash),
                    reason = %reason,
                    "Backend rejected a chunk; storing it as failed"
                );
                outcomes[start] = Some(VectorOutcome::Failed(reason));
            }
            Err(GroupFailure::Rejected(_)) => {
                let mid = start + (end - start) / 2;
                work.push((mid, end));
                work.push((start, mid));
            }
            Err(GroupFailure::GaveUp) => {
                for slot in &mut outcomes[start..end] {
                    *slot = Some(VectorOutcome::Pending);
                }
            }
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(VectorOutcome::Pending))
        .collect()
}

enum GroupFailure {
    /// The backend refused the inputs (one of them is bad).
    Rejected(String),
    /// Retried until the drain deadline without success.
    GaveUp,
}

/// Calls the backend until it answers, it rejects the inputs, or the drain
/// deadline passes.
async fn embed_with_retry(
    ctx: &PipelineContext,
    texts: &[String],
) -> Result<Vec<Vec<f32>>, GroupFailure> {
    let backend = ctx.embedder.name().to_string();
    let mut backoff = Backoff::new(ctx.retry_initial, ctx.retry_max);
    loop {
        let started = Instant::now();
        let result = ctx.embedder.embed(texts).await.and_then(|vectors| {
            check_vectors(&vectors, texts.len(), ctx.dimensions)?;
            Ok(vectors)
        });
        metrics::histogram!(m::EMBED_SECONDS, "backend" => backend.clone())
            .record(started.elapsed().as_secs_f64());
        let outcome = outcome_label(&result);
        metrics::counter!(m::EMBED_REQUESTS, "backend" => backend.clone(), "outcome" => outcome)
            .increment(1);
        metrics::counter!(m::EMBED_INPUTS, "backend" => backend.clone(), "outcome" => outcome)
            .increment(texts.len() as u64);
        let error = match result {
            Ok(vectors) => {
                metrics::gauge!(m::BACKEND_UP, "backend" => backend.clone()).set(1.0);
                return Ok(vectors);
            }
            Err(EmbedError::Rejected { message, status }) => {
                return Err(GroupFailure::Rejected(format!("HTTP {status}: {message}")));
            }
            Err(e) => e,
        };
        metrics::gauge!(m::BACKEND_UP, "backend" => backend.clone()).set(0.0);
        let retry_after = match &error {
            EmbedError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        };
        let delay = backoff.next_delay(retry_after);
        if ctx.drain.deadline_passed() || ctx.drain.would_pass(delay) {
            tracing::warn!(
                backend = %backend,
                error = %error,
                texts = texts.len(),
                "No backend could embed before the drain deadline; storing as pending"
            );
            return Err(GroupFailure::GaveUp);
        }
        if error.is_retryable() {
            tracing::warn!(backend = %backend, error = %error, attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64, "Embedding failed; retrying");
        } else {
            tracing::error!(backend = %backend, error = %error, attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64, "Embedding backend needs operator attention; retrying");
        }
        tokio::time::sleep(delay).await;
    }
}

fn check_vectors(
    vectors: &[Vec<f32>],
    expected_count: usize,
    dims: usize,
) -> Result<(), EmbedError> {
    if vectors.len() != expected_count {
        return Err(EmbedError::Protocol(format!(
            "asked for {expected_count} embeddings, got {}",
            vectors.len()
        )));
    }
    if let Some(bad) = vectors.iter().find(|v| v.len() != dims) {
        return Err(EmbedError::DimensionMismatch {
            expected: dims,
            got: bad.len(),
        });
    }
    if vectors.iter().flatten().any(|x| !x.is_finite()) {
        return Err(EmbedError::Protocol("embedding contains NaN or Inf".into()));
    }
    Ok(())
}

fn outcome_label<T>(result: &Result<T, EmbedError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(EmbedError::Unreachable(_)) => "unreachable",
        Err(EmbedError::Timeout(_)) => "timeout",
        Err(EmbedError::Transient { .. }) => "transient",
        Err(EmbedError::Rejected { .. }) => "rejected",
        Err(EmbedError::ModelUnavailable(_)) => "model_unavailable",
        Err(EmbedError::Protocol(_)) => "protocol_error",
        Err(EmbedError::DimensionMismatch { .. }) => "dimension_mismatch",
    }
}
