//! One worker: takes a batch, chunks it, gets vectors (cache, then backend),
//! writes the batch in one transaction, and records what happened.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::{Mutex, mpsc};

use convstore_core::model::{EmbeddedChunk, ReadyConversation};
use convstore_telemetry::metrics as m;

use super::embedding::embed_chunks;
use super::{Batch, PipelineContext};
use crate::ticket::Outcome;
use convstore_core::backoff::Backoff;
use convstore_core::chunker::{Chunker, fit_exactly};
use convstore_core::model::ChunkVector;
use convstore_telemetry::events::label;

pub async fn run(id: usize, ctx: Arc<PipelineContext>, rx: Arc<Mutex<mpsc::Receiver<Batch>>>) {
    loop {
        // Hold the lock only while waiting for the next batch.
        let batch = { rx.lock().await.recv().await };
        let Some(batch) = batch else { break };
        let count = batch.len();
        process(&ctx, batch).await;
        ctx.conversations_done
            .fetch_add(count as u64, Ordering::Relaxed);
        ctx.in_flight.fetch_sub(count, Ordering::Relaxed);
        ctx.batches_done.fetch_add(1, Ordering::Relaxed);
    }
    tracing::debug!(worker = id, "Worker done");
}

async fn process(ctx: &PipelineContext, batch: Batch) {
    let (conversations, tickets): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(crate::ticket::Queued::into_parts)
        .unzip();
    let outcomes = embed_and_store(ctx, conversations).await;
    // Aligned with the batch; a ticket without an outcome (cannot happen)
    // reports itself lost when dropped.
    for (ticket, outcome) in tickets.into_iter().zip(outcomes) {
        ticket.complete(outcome);
    }
}

async fn embed_and_store(
    ctx: &PipelineContext,
    batch: Vec<convstore_core::model::Conversation>,
) -> Vec<Outcome> {
    // Room for the model's document prefix, added on the way to the model.
    let prefix_tokens = convstore_core::chunker::estimate_tokens(
        convstore_embed::prefix::prefixes(&ctx.model).document,
    );
    let chunker = Chunker::new(
        ctx.context_tokens
            .load(Ordering::Relaxed)
            .saturating_sub(prefix_tokens),
        ctx.max_chunk_tokens,
    );
    // A backend with the model's tokenizer in process (builtin) checks
    // the estimate's chunks exactly, so none is refused as too long.
    let counter = ctx.embedder.token_counter();
    let mut chunked = Vec::with_capacity(batch.len());
    for c in batch {
        let mut chunks = chunker.chunk(&c);
        if let Some(counter) = counter.as_deref() {
            chunks = fit_exactly(chunks, counter);
        }
        chunked.push((c, chunks));
    }
    let chunk_count: usize = chunked.iter().map(|(_, ch)| ch.len()).sum();
    metrics::histogram!(m::BATCH_CHUNKS).record(chunk_count as f64);

    let embedding = Instant::now();
    let outcomes = embed_chunks(ctx, chunked.iter().flat_map(|(_, ch)| ch.iter())).await;
    metrics::histogram!(m::EMBED_BATCH_SECONDS).record(embedding.elapsed().as_secs_f64());
    let ready: Vec<ReadyConversation> = chunked
        .into_iter()
        .map(|(conversation, chunks)| ReadyConversation {
            chunks: chunks
                .into_iter()
                .map(|chunk| attach(chunk, &outcomes))
                .collect(),
            conversation,
            model: ctx.model.to_string(),
        })
        .collect();
    store_with_retry(ctx, ready).await
}

fn attach(
    chunk: convstore_core::model::Chunk,
    outcomes: &HashMap<convstore_core::model::ContentHash, ChunkVector>,
) -> EmbeddedChunk {
    let vector = outcomes
        .get(&chunk.content_hash)
        .cloned()
        .unwrap_or(ChunkVector::Pending);
    EmbeddedChunk { chunk, vector }
}

/// Writes the batch in one transaction, retrying while the database is
/// unavailable. A batch the database refuses is retried one conversation at
/// a time, so one bad row cannot hold back the others. Returns each
/// conversation's outcome, in batch order.
async fn store_with_retry(ctx: &PipelineContext, ready: Vec<ReadyConversation>) -> Vec<Outcome> {
    let mut backoff = Backoff::new(ctx.retry_initial, ctx.retry_max);
    loop {
        let started = Instant::now();
        let written = ctx.store.write_batch(&ready).await;
        ctx.calls_done.fetch_add(1, Ordering::Relaxed);
        match written {
            Ok(outcome) => {
                let elapsed = started.elapsed().as_secs_f64();
                metrics::histogram!(m::STORE_SECONDS).record(elapsed);
                record_stored(&ready, &outcome);
                return vec![Outcome::Stored; ready.len()];
            }
            Err(e) if e.is_retryable() => {
                metrics::counter!(m::STORE_RETRIES).increment(1);
                let delay = backoff.next_delay(None);
                if ctx.drain.deadline_passed() || ctx.drain.would_pass(delay) {
                    let ids: Vec<String> = ready
                        .iter()
                        .map(|r| r.conversation.id.to_string())
                        .collect();
                    tracing::error!(
                        error = %e,
                        conversations = ready.len(),
                        ids = ?ids,
                        "Database unavailable until the shutdown deadline; these accepted conversations were NOT stored"
                    );
                    metrics::counter!(m::CONVERSATIONS_FAILED, label::REASON => "database_unavailable")
                        .increment(ready.len() as u64);
                    return vec![
                        Outcome::NotStored(format!("database unavailable: {e}"));
                        ready.len()
                    ];
                }
                tracing::warn!(error = %e, attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64, "Database write failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(e) if ready.len() > 1 => {
                tracing::warn!(error = %e, conversations = ready.len(), "Database refused a batch; writing its conversations one by one");
                let mut outcomes = Vec::with_capacity(ready.len());
                for one in ready {
                    outcomes.extend(Box::pin(store_with_retry(ctx, vec![one])).await);
                }
                return outcomes;
            }
            Err(e) => {
                let id = ready
                    .first()
                    .map(|r| r.conversation.id.to_string())
                    .unwrap_or_default();
                tracing::error!(error = %e, id = %id, "Database refused a conversation; it was NOT stored");
                metrics::counter!(m::CONVERSATIONS_FAILED, label::REASON => "rejected_by_database")
                    .increment(1);
                return vec![Outcome::Rejected(e.to_string())];
            }
        }
    }
}

fn record_stored(ready: &[ReadyConversation], outcome: &convstore_store::WriteOutcome) {
    metrics::counter!(m::CONVERSATIONS_STORED).increment(outcome.conversations_inserted as u64);
    metrics::counter!(m::CONVERSATIONS_DUPLICATE).increment(outcome.duplicates as u64);
    metrics::counter!(m::STORE_ROWS, label::TABLE => "conversations")
        .increment(outcome.conversations_inserted as u64);
    metrics::counter!(m::STORE_ROWS, label::TABLE => "conversation_chunks")
        .increment(outcome.chunks_inserted as u64);
    let embedded = outcome
        .chunks_inserted
        .saturating_sub(outcome.chunks_pending + outcome.chunks_failed);
    convstore_telemetry::events::chunks_stored(
        embedded as u64,
        outcome.chunks_pending as u64,
        outcome.chunks_failed as u64,
    );
    let e2e = metrics::histogram!(m::END_TO_END_SECONDS);
    for r in ready {
        e2e.record(r.conversation.received_instant.elapsed().as_secs_f64());
    }
}
