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
//!   backend's reason, while the rest are embedded ("poison isolation");
//! - a refusal for length (the backend counts more tokens than the
//!   chunker's estimate: ids, code, another tokenizer) is never a failure:
//!   the text is cut in halves on sentence, then word boundaries
//!   ([`convstore_core::chunker::halves`]) and the halves embedded, again
//!   until each is taken; the text comes back [`Resolved::Split`] and is
//!   stored as those pieces. Only a single character a backend still
//!   refuses is marked `Failed`, and a text whose pieces are still refused
//!   below 32 bytes fails whole (no model's context is that small: the
//!   refusal was not about length). The router meanwhile lowers that
//!   backend's chunk budget, so later chunks fit the first time.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tracing::Instrument as _;

use convstore_core::model::{Chunk, ChunkVector, ContentHash, EmbeddedChunk, content_hash};
use convstore_embed::EmbedError;
use convstore_embed::cache::CacheKey;
use convstore_telemetry::events::{self, Tier};
use convstore_telemetry::metrics as m;

use super::{DrainDeadline, PipelineContext};

/// What the embedding stage made of one distinct text.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// The text as it is: a vector, a pending mark or a failure.
    Whole(ChunkVector),
    /// A backend refused the text as too long: it is stored as these
    /// consecutive pieces instead (every byte, in order; `seq` numbers
    /// them from 0), each with its own vector.
    Split(Vec<EmbeddedChunk>),
}

/// How one embedding attempt of a text ended.
#[derive(Debug, Clone)]
enum Attempt {
    Done(ChunkVector),
    /// Refused for its length; the backend's words.
    TooLong(String),
}

/// Resolves every distinct chunk text of a batch.
pub async fn embed_chunks<'a>(
    ctx: &PipelineContext,
    chunks: impl IntoIterator<Item = &'a Chunk>,
) -> HashMap<ContentHash, Resolved> {
    let texts: Vec<(ContentHash, &str)> = chunks
        .into_iter()
        .map(|c| (c.content_hash, c.content.as_str()))
        .collect();
    embed_texts(ctx, &texts).await
}

/// Resolves texts, keyed by content hash: to vectors (caches first, then
/// the embedder), pending marks or failures, or, for a text a backend
/// refuses as too long, to pieces that each resolve so.
pub async fn embed_texts(
    ctx: &PipelineContext,
    texts: &[(ContentHash, &str)],
) -> HashMap<ContentHash, Resolved> {
    let attempts = attempt_texts(ctx, texts).await;
    let mut resolved = HashMap::with_capacity(attempts.len());
    let mut too_long = Vec::new();
    for (hash, attempt) in attempts {
        match attempt {
            Attempt::Done(vector) => {
                resolved.insert(hash, Resolved::Whole(vector));
            }
            Attempt::TooLong(reason) => too_long.push((hash, reason)),
        }
    }
    if too_long.is_empty() {
        return resolved;
    }
    let by_hash: HashMap<ContentHash, &str> = texts.iter().copied().collect();
    let refused: Vec<(ContentHash, &str, String)> = too_long
        .into_iter()
        .filter_map(|(hash, reason)| by_hash.get(&hash).map(|text| (hash, *text, reason)))
        .collect();
    resolved.extend(split_until_taken(ctx, refused).await);
    resolved
}

/// The most halving rounds a refused text goes through: each round at
/// least halves every refused piece, so 64 rounds reach single characters
/// of any text that fits in memory.
const MAX_SPLIT_ROUNDS: usize = 64;

/// A refused piece shorter than this is not cut further: the text fails
/// whole (see [`split_until_taken`]).
const MIN_REFUSED_PIECE_BYTES: usize = 32;

/// One piece of a refused text, on its way to a vector.
struct Piece {
    content: String,
    hash: ContentHash,
    /// `None` while it waits for its first attempt.
    state: Option<Attempt>,
}

/// Cuts each refused text in halves, embeds the halves (all refused texts
/// of the batch together), cuts again what is refused again, until every
/// piece is taken; a lone character still refused is `Failed`.
async fn split_until_taken(
    ctx: &PipelineContext,
    refused: Vec<(ContentHash, &str, String)>,
) -> Vec<(ContentHash, Resolved)> {
    let mut texts: Vec<RefusedText> = refused
        .into_iter()
        .map(|(hash, text, reason)| {
            tracing::debug!(
                content_hash = hex::encode(hash),
                chars = text.chars().count(),
                reason = %reason,
                "Backend refused a chunk as too long; embedding it in pieces"
            );
            RefusedText {
                hash,
                pieces: vec![Piece {
                    content: text.to_string(),
                    hash,
                    state: Some(Attempt::TooLong(reason)),
                }],
                failed_whole: None,
            }
        })
        .collect();
    for _round in 0..MAX_SPLIT_ROUNDS {
        let mut cut_any = false;
        for text in texts.iter_mut().filter(|t| t.failed_whole.is_none()) {
            let mut next = Vec::with_capacity(text.pieces.len() + 1);
            for piece in text.pieces.drain(..) {
                let Some(Attempt::TooLong(reason)) = &piece.state else {
                    next.push(piece);
                    continue;
                };
                if piece.content.len() < MIN_REFUSED_PIECE_BYTES {
                    // No model's context is this small: the refusal is not
                    // about length after all. The chunk fails whole rather
                    // than as a heap of one-character rows.
                    text.failed_whole = Some(format!(
                        "refused as too long even in pieces of {} bytes: {reason}",
                        piece.content.len()
                    ));
                    break;
                }
                match convstore_core::chunker::halves(&piece.content) {
                    Some(halves) => {
                        cut_any = true;
                        next.extend(halves.into_iter().map(|h| Piece {
                            hash: content_hash(h),
                            content: h.to_string(),
                            state: None,
                        }));
                    }
                    None => {
                        let reason = format!("a single character refused as too long: {reason}");
                        next.push(Piece {
                            state: Some(Attempt::Done(ChunkVector::Failed(reason))),
                            ..piece
                        });
                    }
                }
            }
            text.pieces = next;
        }
        if !cut_any {
            break;
        }
        // Embed every fresh piece.
        let fresh: Vec<(ContentHash, &str)> = texts
            .iter()
            .filter(|t| t.failed_whole.is_none())
            .flat_map(|t| t.pieces.iter())
            .filter(|p| p.state.is_none())
            .map(|p| (p.hash, p.content.as_str()))
            .collect();
        let attempts = attempt_texts(ctx, &fresh).await;
        for text in &mut texts {
            for piece in text.pieces.iter_mut() {
                if piece.state.is_none() {
                    piece.state = attempts.get(&piece.hash).cloned();
                }
            }
        }
    }
    metrics::counter!(m::CHUNKS_SPLIT_ON_REFUSAL)
        .increment(texts.iter().filter(|t| t.failed_whole.is_none()).count() as u64);
    texts
        .into_iter()
        .map(|text| {
            if let Some(reason) = text.failed_whole {
                return (text.hash, Resolved::Whole(ChunkVector::Failed(reason)));
            }
            let pieces = text
                .pieces
                .into_iter()
                .enumerate()
                .map(|(i, p)| EmbeddedChunk {
                    chunk: Chunk {
                        seq: i32::try_from(i).unwrap_or(i32::MAX),
                        content: p.content,
                        content_hash: p.hash,
                    },
                    vector: match p.state {
                        Some(Attempt::Done(vector)) => vector,
                        // Rounds ran out (unreachable for real text):
                        // stored for the backfill, which splits again.
                        Some(Attempt::TooLong(_)) | None => ChunkVector::Pending,
                    },
                })
                .collect();
            (text.hash, Resolved::Split(pieces))
        })
        .collect()
}

/// A text a backend refused as too long, and what became of its pieces.
struct RefusedText {
    hash: ContentHash,
    pieces: Vec<Piece>,
    /// Refused even in tiny pieces: it fails whole, with this reason.
    failed_whole: Option<String>,
}

/// One pass over distinct texts: L1, L2, then the embedder.
async fn attempt_texts(
    ctx: &PipelineContext,
    texts: &[(ContentHash, &str)],
) -> HashMap<ContentHash, Attempt> {
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
    let l1 = tracing::info_span!(target: "convstore::trace", "cache.lookup", tier = "l1", texts = keys.len());
    let hits = l1.in_scope(|| ctx.cache.get_many(keys.iter()));
    for (text, hit) in distinct.iter().zip(hits) {
        match hit {
            Some(vector) => {
                outcomes.insert(text.0, Attempt::Done(ChunkVector::Embedded(vector)));
            }
            None => misses.push(*text),
        }
    }
    events::cache_lookups(Tier::L1, outcomes.len() as u64, misses.len() as u64);

    // L2.
    if ctx.shared_cache && !misses.is_empty() {
        let texts = misses.len();
        misses = lookup_l2(ctx, misses, &mut outcomes)
            .instrument(
                tracing::info_span!(target: "convstore::trace", "cache.lookup", tier = "l2", texts),
            )
            .await;
    }

    // The embedder, every group at once.
    let groups = misses.chunks(ctx.max_batch_inputs.max(1));
    let results =
        futures::future::join_all(groups.clone().map(|group| embed_group(ctx, group))).await;
    let mut fresh: Vec<(ContentHash, Arc<[f32]>)> = Vec::new();
    for (group, results) in groups.zip(results) {
        for ((hash, _), outcome) in group.iter().zip(results) {
            if let Attempt::Done(ChunkVector::Embedded(v)) = &outcome {
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
    outcomes: &mut HashMap<ContentHash, Attempt>,
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
                outcomes.insert(hash, Attempt::Done(ChunkVector::Embedded(v)));
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

/// Embeds one group of texts, isolating rejected and too long inputs by
/// halving the group.
async fn embed_group(ctx: &PipelineContext, group: &[(ContentHash, &str)]) -> Vec<Attempt> {
    let mut outcomes: Vec<Option<Attempt>> = vec![None; group.len()];
    let done = |v: ChunkVector| Some(Attempt::Done(v));
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
                    *slot = done(ChunkVector::Embedded(Arc::from(v)));
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
                outcomes[start..end].fill(done(ChunkVector::Pending));
            }
            Some(Err(EmbedError::Rejected { status, message })) if end - start == 1 => {
                let reason = format!("HTTP {status}: {message}");
                tracing::warn!(
                    content_hash = hex::encode(group[start].0),
                    reason = %reason,
                    "Backend rejected a chunk; storing it as failed"
                );
                outcomes[start] = done(ChunkVector::Failed(reason));
            }
            Some(Err(EmbedError::TooLong { status, message })) if end - start == 1 => {
                outcomes[start] = Some(Attempt::TooLong(format!("HTTP {status}: {message}")));
            }
            Some(Err(EmbedError::Rejected { .. } | EmbedError::TooLong { .. })) => {
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
                outcomes[start..end].fill(done(ChunkVector::Pending));
            }
            None => {
                tracing::warn!(
                    texts = end - start,
                    "Shutdown drain deadline reached while embedding; storing the texts as pending"
                );
                outcomes[start..end].fill(done(ChunkVector::Pending));
            }
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Attempt::Done(ChunkVector::Pending)))
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
