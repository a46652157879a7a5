//! The embedding stage of a batch (and of a backfill round): each distinct
//! text is looked up in the L1 cache (memory), then in the L2 cache (the
//! shared `embedding_cache` table), and only the remaining misses go to the
//! embedder, which is the router over every configured backend
//! ([`convstore_embed::router`]). What comes back fills both caches.
//!
//! Misses are sent in groups of `embedding.max_batch_inputs`, all groups of
//! a batch at once, so one batch can keep several backends busy; the
//! router's in-flight limits decide how many calls really run.
//!
//! Failure handling, per group:
//! - the router retries and fails over by itself, for at most
//!   `embedding.max_wait_ms` (less when every circuit is open, or when the
//!   shutdown drain deadline comes first); if it still has no vectors, the
//!   texts come back `Pending` and are stored without vectors for the
//!   backfill, so a dead embedder never costs text or blocks the queue;
//! - a rejection (400) means one input is bad: the group is split in halves
//!   until the bad input stands alone and is marked `Failed` with the
//!   backend's reason, while the rest are embedded ("poison isolation").

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use convstore_core::model::{Chunk, ChunkVector, ContentHash};
use convstore_embed::EmbedError;
use convstore_embed::cache::CacheKey;
use convstore_telemetry::events::{self, Tier};
use convstore_telemetry::metrics as m;

use super::{DrainDeadline, PipelineContext};

/// Resolves every distinct chunk text of a batch to a vector, a pending
/// mark or a failure.
pub async fn embed_chunks<'a>(
    ctx: &PipelineContext,
    chunks: impl IntoIterator<Item = &'a Chunk>,
) -> HashMap<ContentHash, ChunkVector> {
    let texts: Vec<(ContentHash, &str)> = chunks
        .into_iter()
        .map(|c| (c.content_hash, c.content.as_str()))
        .collect();
    embed_texts(ctx, &texts).await
}

/// Resolves texts, keyed by content hash, to vectors (caches first, then
/// the embedder), pending marks or failures.
pub async fn embed_texts(
    ctx: &PipelineContext,
    texts: &[(ContentHash, &str)],
) -> HashMap<ContentHash, ChunkVector> {
    let mut seen = HashSet::new();
    let distinct: Vec<(ContentHash, &str)> = texts
        .iter()
        .filter(|(h, _)| seen.insert(*h))
        .copied()
        .collect();
    let mut outcomes = HashMap::with_capacity(distinct.len());

    // L1.
    let keys: Vec<CacheKey> = distinct
        .iter()
        .map(|(hash, _)| cache_key(ctx, *hash))
        .collect();
    let mut misses = Vec::new();
    for (text, hit) in distinct.iter().zip(ctx.cache.get_many(keys.iter())) {
        match hit {
            Some(vector) => {
                outcomes.insert(text.0, ChunkVector::Embedded(vector));
            }
            None => misses.push(*text),
        }
    }
    events::cache_lookups(Tier::L1, outcomes.len() as u64, misses.len() as u64);

    // L2.
    if ctx.shared_cache && !misses.is_empty() {
        misses = lookup_l2(ctx, misses, &mut outcomes).await;
    }

    // The embedder, every group at once.
    let groups = misses.chunks(ctx.max_batch_inputs.max(1));
    let results =
        futures::future::join_all(groups.clone().map(|group| embed_group(ctx, group))).await;
    let mut fresh: Vec<(ContentHash, Arc<[f32]>)> = Vec::new();
    for (group, results) in groups.zip(results) {
        for ((hash, _), outcome) in group.iter().zip(results) {
            if let ChunkVector::Embedded(v) = &outcome {
                fresh.push((*hash, v.clone()));
            }
            outcomes.insert(*hash, outcome);
        }
    }
    if !fresh.is_empty() {
        ctx.cache.insert_many(
            fresh
                .iter()
                .map(|(hash, v)| (cache_key(ctx, *hash), v.clone())),
        );
        if ctx.shared_cache {
            fill_l2(ctx, &fresh).await;
        }
    }
    metrics::gauge!(m::CACHE_ENTRIES).set(ctx.cache.len() as f64);
    outcomes
}

fn cache_key(ctx: &PipelineContext, hash: ContentHash) -> CacheKey {
    CacheKey {
        model: ctx.model.clone(),
        hash,
    }
}

/// Looks `misses` up in the shared cache; records hits in `outcomes` and
/// L1; returns what is still missing. A database error counts as all
/// misses: the cache only saves work.
async fn lookup_l2<'a>(
    ctx: &PipelineContext,
    misses: Vec<(ContentHash, &'a str)>,
    outcomes: &mut HashMap<ContentHash, ChunkVector>,
) -> Vec<(ContentHash, &'a str)> {
    let hashes: Vec<ContentHash> = misses.iter().map(|(h, _)| *h).collect();
    let found = match ctx.store.cache_lookup(&ctx.model, &hashes).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, texts = misses.len(), "Shared embedding cache lookup failed; embedding the texts instead");
            HashMap::new()
        }
    };
    let mut still = Vec::with_capacity(misses.len() - found.len().min(misses.len()));
    let mut hits = Vec::with_capacity(found.len());
    for (hash, text) in misses {
        match found.get(&hash) {
            // A vector of another length (the model was swapped under the
            // same name) is not used.
            Some(v) if v.len() == ctx.dimensions => {
                let v: Arc<[f32]> = Arc::from(v.as_slice());
                hits.push((cache_key(ctx, hash), v.clone()));
                outcomes.insert(hash, ChunkVector::Embedded(v));
            }
            _ => still.push((hash, text)),
        }
    }
    events::cache_lookups(Tier::L2, hits.len() as u64, still.len() as u64);
    ctx.cache.insert_many(hits);
    still
}

async fn fill_l2(ctx: &PipelineContext, fresh: &[(ContentHash, Arc<[f32]>)]) {
    let entries: Vec<(ContentHash, &[f32])> = fresh.iter().map(|(h, v)| (*h, &v[..])).collect();
    if let Err(e) = ctx.store.cache_fill(&ctx.model, &entries).await {
        tracing::warn!(error = %e, vectors = entries.len(), "Cannot fill the shared embedding cache; the vectors are stored all the same");
    }
}

/// Embeds one group of texts, isolating rejected inputs by halving.
async fn embed_group(ctx: &PipelineContext, group: &[(ContentHash, &str)]) -> Vec<ChunkVector> {
    let mut outcomes: Vec<Option<ChunkVector>> = vec![None; group.len()];
    // Ranges still to embed; a rejected range is replaced by its halves.
    let mut work = vec![(0, group.len())];
    while let Some((start, end)) = work.pop() {
        let texts: Vec<String> = group[start..end]
            .iter()
            // With the model's document prefix (nomic-embed-text:
            // `search_document: `); stored content and cache keys stay
            // without it (convstore_embed::prefix).
            .map(|(_, text)| convstore_embed::prefix::document(&ctx.model, text).into_owned())
            .collect();
        let result = until_drain(&ctx.drain, ctx.embedder.embed(&texts)).await;
        ctx.calls_done.fetch_add(1, Ordering::Relaxed);
        match result {
            Some(Ok(vectors)) if vectors.len() == texts.len() => {
                for (slot, v) in outcomes[start..end].iter_mut().zip(vectors) {
                    *slot = Some(ChunkVector::Embedded(Arc::from(v)));
                }
            }
            Some(Ok(vectors)) => {
                // Every backend checks its answer's count where the
                // vectors enter (convstore_embed::answer); this is a bug,
                // not a backend.
                tracing::error!(
                    asked = texts.len(),
                    got = vectors.len(),
                    "Embedder answered the wrong number of vectors; storing the texts as pending"
                );
                outcomes[start..end].fill(Some(ChunkVector::Pending));
            }
            Some(Err(EmbedError::Rejected { status, message })) if end - start == 1 => {
                let reason = format!("HTTP {status}: {message}");
                tracing::warn!(
                    content_hash = hex::encode(group[start].0),
                    reason = %reason,
                    "Backend rejected a chunk; storing it as failed"
                );
                outcomes[start] = Some(ChunkVector::Failed(reason));
            }
            Some(Err(EmbedError::Rejected { .. })) => {
                let mid = start + (end - start) / 2;
                work.push((mid, end));
                work.push((start, mid));
            }
            Some(Err(e)) => {
                tracing::warn!(
                    error = %e,
                    texts = end - start,
                    "No embedding backend answered in time; storing the texts as pending for the backfill"
                );
                outcomes[start..end].fill(Some(ChunkVector::Pending));
            }
            None => {
                tracing::warn!(
                    texts = end - start,
                    "Shutdown drain deadline reached while embedding; storing the texts as pending"
                );
                outcomes[start..end].fill(Some(ChunkVector::Pending));
            }
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(ChunkVector::Pending))
        .collect()
}

/// `fut`'s output, or `None` if the shutdown drain deadline (set while it
/// runs, or before) passes first.
pub(crate) async fn until_drain<F: Future>(drain: &DrainDeadline, fut: F) -> Option<F::Output> {
    tokio::pin!(fut);
    let deadline = tokio::select! {
        out = &mut fut => return Some(out),
        deadline = drain.wait_set() => deadline,
    };
    tokio::time::timeout_at(deadline, &mut fut).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn until_drain_stops_at_a_deadline_set_later() {
        let drain = Arc::new(DrainDeadline::default());
        let setter = drain.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            setter.set(tokio::time::Instant::now() + Duration::from_secs(2));
        });
        let started = tokio::time::Instant::now();
        let out = until_drain(&drain, tokio::time::sleep(Duration::from_secs(60))).await;
        assert!(out.is_none());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
            "{waited:?}"
        );

        // A future that is ready wins, even past the deadline.
        assert_eq!(until_drain(&drain, async { 7 }).await, Some(7));
        let fresh = DrainDeadline::default();
        assert_eq!(until_drain(&fresh, async { 7 }).await, Some(7));
    }
}
