//! One worker: takes a batch, chunks it, gets vectors (cache, then backend),
//! writes the batch in one transaction, and records what happened.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::{Mutex, mpsc};
use tracing::Instrument as _;

use convstore_core::lifecycle::{Applied, StampedChange, fold};
use convstore_core::model::{Conversation, EmbeddedChunk, ReadyConversation, RowVersion};
use convstore_store::Removal;
use convstore_store::lifecycle::FoldBase;
use convstore_telemetry::metrics as m;

use super::embedding::{Resolved, embed_chunks};
use super::{Batch, PipelineContext};
use crate::ticket::Outcome;
use convstore_core::backoff::Backoff;
use convstore_core::chunker::{Chunker, fit_exactly};
use convstore_core::model::ChunkVector;
use convstore_telemetry::events::{change, label};

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

async fn process(ctx: &PipelineContext, mut batch: Batch) {
    // The queue wait of every traced change ends here; the batch's span
    // continues the first and links to all (convstore_telemetry::traces).
    let traced: Vec<_> = batch
        .iter_mut()
        .filter_map(|q| q.ticket.dequeued())
        .collect();
    let span = convstore_telemetry::traces::batch_span(batch.len(), &traced);
    if !traced.is_empty() {
        for item in &mut batch {
            item.ticket.carried_by(&span);
        }
    }
    process_in(ctx, batch).instrument(span).await;
}

async fn process_in(ctx: &PipelineContext, batch: Batch) {
    // A change waits for the change of its conversation accepted before
    // it, when that one travels in an earlier batch: changes apply in the
    // order they were acknowledged. (Within this batch the fold orders
    // them; an earlier batch never waits for a later one, so this cannot
    // deadlock.)
    let seqs: HashSet<u64> = batch.iter().map(|q| q.ticket.seq()).collect();
    for item in &batch {
        if let Some(before) = item.ticket.after()
            && !seqs.contains(&before.seq)
        {
            before.clone().finished().await;
        }
    }
    let (changes, tickets): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(crate::ticket::Queued::into_parts)
        .unzip();
    let outcomes = apply(ctx, &changes).await;
    tracing::debug!(
        conversations = outcomes.len(),
        stored = outcomes.iter().filter(|o| **o == Outcome::Stored).count(),
        "Batch done"
    );
    // Aligned with the batch; a ticket without an outcome (cannot happen)
    // reports itself lost when dropped.
    for (ticket, outcome) in tickets.into_iter().zip(outcomes) {
        ticket.complete(outcome);
    }
}

/// The changes of one conversation in a batch, in acknowledgement order.
struct Group {
    /// Client id (or row id, for a conversation stored without one).
    key: String,
    changes: Vec<usize>,
}

/// Applies a batch of changes: folds each conversation's changes onto its
/// stored version (`convstore_core::lifecycle::fold`), embeds and writes
/// the versions that changed in one transaction, and folds again whatever
/// the database says changed meanwhile. Returns each change's outcome, in
/// batch order.
async fn apply(ctx: &PipelineContext, changes: &[StampedChange]) -> Vec<Outcome> {
    let mut groups: Vec<Group> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for (i, change) in changes.iter().enumerate() {
        let key = change.change.key();
        match by_key.get(&key) {
            Some(g) => groups[*g].changes.push(i),
            None => {
                by_key.insert(key.clone(), groups.len());
                groups.push(Group {
                    key,
                    changes: vec![i],
                });
            }
        }
    }
    let mut outcomes: Vec<Option<Outcome>> = vec![None; changes.len()];
    let mut applied: Vec<Option<Applied>> = vec![None; changes.len()];
    let mut open: Vec<usize> = (0..groups.len()).collect();
    let mut backoff = Backoff::new(ctx.retry_initial, ctx.retry_max);
    // A conversation whose stored version changed under its write (another
    // instance, a delete, an erasure) is folded and written again, with
    // backoff, until it goes through: as with an unavailable database,
    // only the shutdown deadline ends the attempts (the journal keeps what
    // is left).
    while !open.is_empty() {
        let base = match read_base(ctx, &groups, &open, changes).await {
            Ok(base) => base,
            Err(reason) => {
                for g in &open {
                    for i in &groups[*g].changes {
                        outcomes[*i] = Some(Outcome::NotStored(reason.clone()));
                    }
                }
                break;
            }
        };
        let mut to_write: Vec<(usize, Conversation, RowVersion)> = Vec::new();
        let mut removals: Vec<(usize, Removal)> = Vec::new();
        let mut base = base;
        for g in &open {
            let group = &groups[*g];
            let stored = base.versions.remove(&group.key);
            let replaces = stored.as_ref().map(|v| v.stamp);
            let stored_user = stored.as_ref().map(|v| v.conversation.user_id.clone());
            let refs: Vec<&StampedChange> = group.changes.iter().map(|i| &changes[*i]).collect();
            let folded = fold(stored, &base.tombstones, &refs);
            for (i, a) in group.changes.iter().zip(&folded.applied) {
                applied[*i] = Some(*a);
            }
            match folded.version {
                Some(version) if folded.changed => {
                    let row = RowVersion {
                        stamp: version.stamp,
                        versions: version.versions,
                        content_sha: Some(version.content_sha),
                        posted_sha: Some(version.posted_sha),
                        replaces,
                    };
                    to_write.push((*g, version.conversation, row));
                }
                None if folded.delete_stored => {
                    if let (Some(replaces), Some(user_id)) = (replaces, stored_user) {
                        removals.push((
                            *g,
                            Removal {
                                client_id: group.key.clone(),
                                user_id,
                                replaces,
                            },
                        ));
                    }
                }
                _ => {
                    for i in &group.changes {
                        outcomes[*i] = Some(outcome_of(applied[*i]));
                    }
                }
            }
        }
        let mut finished: Vec<(usize, Outcome)> = Vec::new();
        let written_groups: Vec<usize> = to_write.iter().map(|(g, ..)| *g).collect();
        let (written, mut stale) = if to_write.is_empty() {
            (Vec::new(), HashSet::new())
        } else {
            embed_and_store(ctx, to_write.into_iter().map(|(_, c, v)| (c, v)).collect()).await
        };
        finished.extend(written_groups.into_iter().zip(written));
        if !removals.is_empty() {
            let (groups_removed, removals): (Vec<usize>, Vec<Removal>) =
                removals.into_iter().unzip();
            let outcome = remove_with_retry(ctx, &removals, &mut stale).await;
            finished.extend(groups_removed.into_iter().map(|g| (g, outcome.clone())));
        }
        let mut next = Vec::new();
        for (g, outcome) in finished {
            let group = &groups[g];
            if stale.contains(&group.key) {
                next.push(g);
                continue;
            }
            for i in &group.changes {
                outcomes[*i] = Some(match &outcome {
                    Outcome::Stored => outcome_of(applied[*i]),
                    other => other.clone(),
                });
            }
        }
        open = next;
        if !open.is_empty() && ctx.drain.deadline_passed() {
            for g in &open {
                for i in &groups[*g].changes {
                    outcomes[*i] = Some(Outcome::NotStored(
                        "its conversation kept changing under the write until the shutdown deadline"
                            .into(),
                    ));
                }
            }
            tracing::error!(
                conversations = open.len(),
                "Conversations kept changing under their writes until the shutdown deadline; their changes were NOT applied"
            );
            break;
        }
        if !open.is_empty() {
            tracing::debug!(
                conversations = open.len(),
                "Stored versions changed under the write; folding again"
            );
            tokio::time::sleep(backoff.next_delay(None)).await;
        }
    }
    record_changes(changes, &applied, &outcomes);
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::Lost))
        .collect()
}

/// A change the fold applied (or made moot) is stored once its version
/// is; a discarded one is not.
fn outcome_of(applied: Option<Applied>) -> Outcome {
    match applied {
        Some(Applied::Discarded(why)) => Outcome::Discarded(why),
        Some(_) => Outcome::Stored,
        None => Outcome::Lost,
    }
}

fn record_changes(
    changes: &[StampedChange],
    applied: &[Option<Applied>],
    outcomes: &[Option<Outcome>],
) {
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    let mut appended = 0u64;
    let e2e = metrics::histogram!(m::END_TO_END_SECONDS);
    for ((change, applied), outcome) in changes.iter().zip(applied).zip(outcomes) {
        if !matches!(outcome, Some(Outcome::Stored | Outcome::Discarded(_))) {
            continue;
        }
        // Every change that is in the store (a retry or replay included:
        // its content is there) or never will be, once.
        if matches!(outcome, Some(Outcome::Stored)) {
            e2e.record(change.change.received_instant().elapsed().as_secs_f64());
        }
        let name = match applied {
            Some(Applied::Created) => change::CREATED,
            Some(Applied::Replaced) => change::REPLACED,
            Some(Applied::Appended(n)) => {
                appended += *n as u64;
                change::APPENDED
            }
            Some(Applied::Unchanged) => change::UNCHANGED,
            Some(Applied::Superseded) => change::SUPERSEDED,
            Some(Applied::Discarded(_)) => change::DISCARDED,
            None => continue,
        };
        *counts.entry(name).or_default() += 1;
    }
    // Retries and replays of what is stored: the duplicates the store's
    // idempotency used to count (they no longer reach it).
    let duplicates = counts.get(change::UNCHANGED).copied().unwrap_or(0)
        + counts.get(change::SUPERSEDED).copied().unwrap_or(0);
    metrics::counter!(m::CONVERSATIONS_DUPLICATE).increment(duplicates);
    for (name, n) in counts {
        metrics::counter!(m::CONVERSATION_CHANGES, label::OUTCOME => name).increment(n);
    }
    metrics::counter!(m::MESSAGES_APPENDED).increment(appended);
}

/// The stored versions and tombstones the open groups fold onto, retried
/// while the database is unavailable (until the shutdown deadline).
async fn read_base(
    ctx: &PipelineContext,
    groups: &[Group],
    open: &[usize],
    changes: &[StampedChange],
) -> Result<FoldBase, String> {
    let client_ids: Vec<&str> = open.iter().map(|g| groups[*g].key.as_str()).collect();
    let mut users: Vec<&str> = open
        .iter()
        .flat_map(|g| groups[*g].changes.iter())
        .map(|i| changes[*i].change.user_id())
        .collect();
    users.sort_unstable();
    users.dedup();
    match with_database_retry(ctx, "Reading stored versions", || {
        ctx.store.fold_base(&client_ids, &users)
    })
    .await
    {
        Ok(base) => Ok(base),
        Err(e) if e.is_retryable() => {
            metrics::counter!(m::CONVERSATIONS_FAILED, label::REASON => "database_unavailable")
                .increment(open.len() as u64);
            tracing::error!(error = %e, conversations = open.len(), "Database unavailable until the shutdown deadline; these accepted changes were NOT stored");
            Err(format!("database unavailable: {e}"))
        }
        Err(e) => {
            tracing::error!(error = %e, "Cannot read the stored versions of a batch; its changes were NOT stored");
            Err(e.to_string())
        }
    }
}

/// Runs a database call until it answers, retrying with backoff while the
/// database is unavailable, until the shutdown deadline; the last error
/// otherwise.
async fn with_database_retry<T, F, Fut>(
    ctx: &PipelineContext,
    what: &str,
    mut call: F,
) -> Result<T, convstore_store::StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, convstore_store::StoreError>>,
{
    let mut backoff = Backoff::new(ctx.retry_initial, ctx.retry_max);
    loop {
        match call().await {
            Err(e) if e.is_retryable() => {
                let delay = backoff.next_delay(None);
                if ctx.drain.deadline_passed() || ctx.drain.would_pass(delay) {
                    return Err(e);
                }
                metrics::counter!(m::STORE_RETRIES).increment(1);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
            }
            answer => return answer,
        }
    }
}

/// Removes stored versions a delete or erasure made moot, retrying while
/// the database is unavailable; stale ones are added to `stale`.
async fn remove_with_retry(
    ctx: &PipelineContext,
    removals: &[Removal],
    stale: &mut HashSet<String>,
) -> Outcome {
    match with_database_retry(ctx, "Removing moot stored versions", || {
        ctx.store.write_versions(&[], removals)
    })
    .await
    {
        Ok(outcome) => {
            if outcome.removed > 0 {
                tracing::info!(
                    removed = outcome.removed,
                    "Removed stored versions that a delete or erasure made moot"
                );
            }
            stale.extend(outcome.stale);
            Outcome::Stored
        }
        Err(e) => {
            tracing::error!(error = %e, "Cannot remove stored versions a delete or erasure made moot; the journal keeps their changes");
            Outcome::NotStored(e.to_string())
        }
    }
}

/// Chunks, embeds and writes the versions; returns each one's outcome (in
/// order) and the keys the store found stale.
async fn embed_and_store(
    ctx: &PipelineContext,
    batch: Vec<(Conversation, RowVersion)>,
) -> (Vec<Outcome>, HashSet<String>) {
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
    tracing::info_span!(target: "convstore::trace", "chunk", conversations = batch.len()).in_scope(
        || {
            for (c, version) in batch {
                let mut chunks = chunker.chunk(&c);
                if let Some(counter) = counter.as_deref() {
                    chunks = fit_exactly(chunks, counter);
                }
                chunked.push((c, version, chunks));
            }
        },
    );
    let chunk_count: usize = chunked.iter().map(|(.., ch)| ch.len()).sum();
    metrics::histogram!(m::BATCH_CHUNKS).record(chunk_count as f64);

    let embedding = Instant::now();
    let outcomes = embed_chunks(ctx, chunked.iter().flat_map(|(.., ch)| ch.iter()))
        .instrument(tracing::info_span!(target: "convstore::trace", "embed", chunks = chunk_count))
        .await;
    metrics::histogram!(m::EMBED_BATCH_SECONDS).record(embedding.elapsed().as_secs_f64());
    let ready: Vec<ReadyConversation> = chunked
        .into_iter()
        .map(|(conversation, version, chunks)| ReadyConversation {
            chunks: attach(chunks, &outcomes),
            conversation,
            model: ctx.model.to_string(),
            version,
        })
        .collect();
    let mut stale = HashSet::new();
    let span = tracing::info_span!(target: "convstore::trace", "store.transaction", conversations = ready.len());
    let outcomes = store_with_retry(ctx, ready, &mut stale)
        .instrument(span)
        .await;
    (outcomes, stale)
}

/// A conversation's chunks with what the embedding stage made of them; a
/// chunk a backend refused as too long becomes its pieces, and the chunks
/// are numbered again.
fn attach(
    chunks: Vec<convstore_core::model::Chunk>,
    outcomes: &HashMap<convstore_core::model::ContentHash, Resolved>,
) -> Vec<EmbeddedChunk> {
    let mut out = Vec::with_capacity(chunks.len());
    let mut split = false;
    for chunk in chunks {
        match outcomes.get(&chunk.content_hash) {
            Some(Resolved::Whole(vector)) => out.push(EmbeddedChunk {
                chunk,
                vector: vector.clone(),
            }),
            Some(Resolved::Split(pieces)) => {
                split = true;
                out.extend(pieces.iter().cloned());
            }
            None => out.push(EmbeddedChunk {
                chunk,
                vector: ChunkVector::Pending,
            }),
        }
    }
    if split {
        for (i, c) in out.iter_mut().enumerate() {
            c.chunk.seq = i32::try_from(i).unwrap_or(i32::MAX);
        }
    }
    out
}

/// Writes the batch in one transaction, retrying while the database is
/// unavailable. A batch the database refuses is retried one conversation at
/// a time, so one bad row cannot hold back the others. Returns each
/// conversation's outcome, in batch order.
async fn store_with_retry(
    ctx: &PipelineContext,
    ready: Vec<ReadyConversation>,
    stale: &mut HashSet<String>,
) -> Vec<Outcome> {
    let mut backoff = Backoff::new(ctx.retry_initial, ctx.retry_max);
    loop {
        let started = Instant::now();
        let written = ctx.store.write_batch(&ready).await;
        ctx.calls_done.fetch_add(1, Ordering::Relaxed);
        match written {
            Ok(outcome) => {
                let elapsed = started.elapsed().as_secs_f64();
                metrics::histogram!(m::STORE_SECONDS).record(elapsed);
                record_stored(&outcome);
                stale.extend(outcome.stale);
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
                    outcomes.extend(Box::pin(store_with_retry(ctx, vec![one], stale)).await);
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

fn record_stored(outcome: &convstore_store::WriteOutcome) {
    if outcome.chunks_kept > 0 || outcome.chunks_deleted > 0 {
        tracing::debug!(
            replaced = outcome.replaced,
            chunks_kept = outcome.chunks_kept,
            chunks_deleted = outcome.chunks_deleted,
            "Replaced stored versions"
        );
    }
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
    // Last: a reader that sees these conversations settled (`convstore
    // bench` waits for that) then sees their chunks counted too.
    metrics::counter!(m::CONVERSATIONS_DUPLICATE).increment(outcome.duplicates as u64);
    metrics::counter!(m::CONVERSATIONS_STORED).increment(outcome.conversations_inserted as u64);
}
