//! The backfill's database side: claim a batch of `pending` chunks, let the
//! caller embed them, write what came of each, and bring the conversations'
//! `embedding_status` up to date, all in one transaction.
//!
//! Safe with several convstore instances on one database:
//! - chunks are claimed with `FOR UPDATE SKIP LOCKED`, so two instances
//!   never embed the same chunk, and a crashed instance's claim ends with
//!   its connection (nothing to clean up);
//! - a conversation's status is recomputed from its chunks after locking
//!   its row (in id order, so two instances cannot deadlock), in a statement
//!   that starts after the lock is granted and so sees what the other
//!   instance committed.
//!
//! What becomes of a claimed chunk:
//! - embedded → vector, `embedded`, `embedded_at`;
//! - rejected by the backend (the input is at fault) → `failed` with the
//!   reason: a dead letter, visible in the API and metrics, never claimed
//!   again;
//! - no backend answered in time → still `pending`, `embed_attempts + 1`,
//!   and not claimed again before `next_attempt_at` (exponential, capped):
//!   a chunk that keeps failing never blocks the others or spins;
//! - refused as too long → replaced by its pieces (each embedded, failed
//!   or pending), the conversation's later chunks moved up. Those later
//!   chunks are locked first with `SKIP LOCKED`: when another instance's
//!   round holds one, the split waits for a later round (deferred), so two
//!   rounds never move the same rows or wait for each other.
//!
//! Only chunks of the configured model are claimed: a vector is only ever
//! stored under the model that produced it.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pgvector::Vector;
use sqlx::Row;
use uuid::Uuid;

use super::{Store, StoreError};
use convstore_core::model::{ChunkVector, ContentHash, EmbeddedChunk};

use crate::write::{ChunkRow, unnest_chunks};

/// A chunk waiting for its vector, as claimed by a round.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingChunk {
    pub conversation_id: Uuid,
    /// The conversation's user (part of the chunk's key).
    pub user_id: String,
    pub seq: i32,
    pub content: String,
    pub content_hash: ContentHash,
    /// Earlier rounds that could not embed it.
    pub attempts: i32,
}

/// What the caller made of one claimed chunk.
#[derive(Debug, Clone)]
pub enum BackfillResult {
    Embedded(Arc<[f32]>),
    /// Rejected for good; the reason.
    Failed(String),
    /// Not embedded this time; try again later.
    Deferred,
    /// A backend refused it as too long: it becomes these consecutive
    /// pieces (every byte of it, in order; `seq` numbers them from 0),
    /// each with what became of it, and the conversation's later chunks
    /// move up to make room.
    Split(Vec<EmbeddedChunk>),
}

/// When a deferred chunk is tried again: `base · 2^attempts`, at most
/// `max`.
#[derive(Debug, Clone, Copy)]
pub struct DeferPolicy {
    pub base: Duration,
    pub max: Duration,
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackfillOutcome {
    pub claimed: usize,
    pub embedded: usize,
    pub failed: usize,
    pub deferred: usize,
    /// Chunks stored as pieces because a backend refused them as too long.
    pub split: usize,
    /// Conversations whose status was recomputed.
    pub conversations: usize,
}

/// What [`Store::redrive_failed`] put back to `pending`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Redriven {
    /// Chunks put back to `pending`.
    pub chunks: u64,
    /// Their conversations.
    pub conversations: u64,
}

/// Dead letters and waiting work, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EmbeddingBacklog {
    pub chunks_pending: u64,
    pub chunks_failed: u64,
    pub conversations_pending: u64,
    pub conversations_failed: u64,
}

const CLAIM: &str = "\
SELECT conversation_id, user_id, seq, content, content_hash, embed_attempts
FROM conversation_chunks
WHERE embedding_status = 'pending' AND model = $1
  AND (next_attempt_at IS NULL OR next_attempt_at <= now())
ORDER BY conversation_id, seq
LIMIT $2
FOR UPDATE SKIP LOCKED";

const SET_EMBEDDED: &str = "\
UPDATE conversation_chunks c
SET embedding = u.e, embedding_status = 'embedded', embedded_at = now(),
    error = NULL, next_attempt_at = NULL
FROM UNNEST($1::uuid[], $2::int4[], $3::vector[], $4::text[]) AS u(id, seq, e, user_id)
WHERE c.user_id = u.user_id AND c.conversation_id = u.id AND c.seq = u.seq
  AND c.embedding_status = 'pending'";

const SET_FAILED: &str = "\
UPDATE conversation_chunks c
SET embedding_status = 'failed', error = u.reason, next_attempt_at = NULL
FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::text[]) AS u(id, seq, reason, user_id)
WHERE c.user_id = u.user_id AND c.conversation_id = u.id AND c.seq = u.seq
  AND c.embedding_status = 'pending'";

/// The delay doubles per attempt (the exponent is capped so the float
/// stays finite) and never passes the ceiling.
const SET_DEFERRED: &str = "\
UPDATE conversation_chunks c
SET embed_attempts = c.embed_attempts + 1,
    next_attempt_at = now() + least($3::float8 * power(2, least(c.embed_attempts, 40)), $4::float8)
                              * interval '1 second'
FROM UNNEST($1::uuid[], $2::int4[], $5::text[]) AS u(id, seq, user_id)
WHERE c.user_id = u.user_id AND c.conversation_id = u.id AND c.seq = u.seq
  AND c.embedding_status = 'pending'";

/// Seq numbers no chunk reaches (a conversation holds at most
/// `server.max_body_bytes` of text): the later chunks of a split pass
/// through this range so no statement ever meets two rows with one key
/// (the primary key is checked row by row, not deferred).
const SEQ_PARKING: i32 = 1 << 30;

const PARK_LATER_CHUNKS: &str = "\
UPDATE conversation_chunks SET seq = seq + $4
WHERE user_id = $1 AND conversation_id = $2 AND seq > $3";

const UNPARK_LATER_CHUNKS: &str = "\
UPDATE conversation_chunks SET seq = seq - $3 + $4
WHERE user_id = $1 AND conversation_id = $2 AND seq >= $3";

/// Locks the chunks a split would move, skipping those another instance
/// holds (its own backfill round): how many it got, and how many there are.
const LOCK_LATER_CHUNKS: &str = "\
SELECT (SELECT count(*) FROM (SELECT 1 FROM conversation_chunks
          WHERE user_id = $1 AND conversation_id = $2 AND seq > $3
          FOR UPDATE SKIP LOCKED) locked),
       (SELECT count(*) FROM conversation_chunks
          WHERE user_id = $1 AND conversation_id = $2 AND seq > $3)";

const DELETE_SPLIT_CHUNK: &str = "\
DELETE FROM conversation_chunks
WHERE user_id = $1 AND conversation_id = $2 AND seq = $3 AND embedding_status = 'pending'";

const LOCK_CONVERSATIONS: &str = "\
SELECT c.id FROM conversations c JOIN UNNEST($1::text[], $2::uuid[]) AS u(user_id, id)
  ON c.user_id = u.user_id AND c.id = u.id
ORDER BY c.id FOR UPDATE OF c";

/// The worst of the chunks' statuses, as at insert time.
const RECOMPUTE_STATUS: &str = "\
UPDATE conversations c
SET embedding_status = CASE
    WHEN EXISTS (SELECT 1 FROM conversation_chunks k
                 WHERE k.user_id = c.user_id AND k.conversation_id = c.id
                   AND k.embedding_status = 'pending') THEN 'pending'
    WHEN EXISTS (SELECT 1 FROM conversation_chunks k
                 WHERE k.user_id = c.user_id AND k.conversation_id = c.id
                   AND k.embedding_status = 'failed') THEN 'failed'
    ELSE 'embedded' END
FROM UNNEST($1::text[], $2::uuid[]) AS u(user_id, id)
WHERE c.user_id = u.user_id AND c.id = u.id";

const BACKLOG: &str = "\
SELECT
  (SELECT count(*) FROM conversation_chunks WHERE embedding_status = 'pending'),
  (SELECT count(*) FROM conversation_chunks WHERE embedding_status = 'failed'),
  (SELECT count(*) FROM conversations WHERE embedding_status = 'pending'),
  (SELECT count(*) FROM conversations WHERE embedding_status = 'failed')";

/// What became of a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    Done,
    /// The chunk is no longer pending (a newer version replaced it).
    Gone,
    /// Another instance holds a later chunk of the conversation (its own
    /// round): moving it would wait for, or race with, that round. Tried
    /// again later.
    Busy,
}

/// Replaces the pending chunk `seq` of a conversation by `pieces`, moving
/// its later chunks up by `pieces.len() - 1`.
async fn split_chunk(
    tx: &mut sqlx::PgConnection,
    model: &str,
    dims: Option<usize>,
    id: Uuid,
    user: &str,
    seq: i32,
    pieces: &[EmbeddedChunk],
) -> Result<Split, StoreError> {
    let Some(extra) = pieces
        .len()
        .checked_sub(1)
        .and_then(|n| i32::try_from(n).ok())
        .filter(|n| seq.checked_add(*n).is_some_and(|last| last < SEQ_PARKING))
    else {
        return Ok(Split::Gone);
    };
    if extra > 0 {
        let (locked, later): (i64, i64) = sqlx::query_as(LOCK_LATER_CHUNKS)
            .bind(user)
            .bind(id)
            .bind(seq)
            .fetch_one(&mut *tx)
            .await?;
        if locked < later {
            return Ok(Split::Busy);
        }
    }
    let deleted = sqlx::query(DELETE_SPLIT_CHUNK)
        .bind(user)
        .bind(id)
        .bind(seq)
        .execute(&mut *tx)
        .await?;
    if deleted.rows_affected() == 0 {
        return Ok(Split::Gone);
    }
    if extra > 0 {
        sqlx::query(PARK_LATER_CHUNKS)
            .bind(user)
            .bind(id)
            .bind(seq)
            .bind(SEQ_PARKING)
            .execute(&mut *tx)
            .await?;
        sqlx::query(UNPARK_LATER_CHUNKS)
            .bind(user)
            .bind(id)
            .bind(SEQ_PARKING)
            .bind(extra)
            .execute(&mut *tx)
            .await?;
    }
    // As for whole chunks: a vector the column cannot hold makes the
    // piece a dead letter, and a reason loses its NUL bytes, so one piece
    // can never fail the round (and have it claimed again, for ever).
    let pieces: Vec<EmbeddedChunk> = pieces
        .iter()
        .map(|p| {
            let vector = match &p.vector {
                ChunkVector::Embedded(v) if dims.is_some_and(|d| d != v.len()) => {
                    ChunkVector::Failed(format!(
                        "vector has {} dimensions, the column holds {}",
                        v.len(),
                        dims.unwrap_or(0)
                    ))
                }
                ChunkVector::Failed(reason) => ChunkVector::Failed(reason.replace('\0', "")),
                other => other.clone(),
            };
            EmbeddedChunk {
                chunk: p.chunk.clone(),
                vector,
            }
        })
        .collect();
    let now = chrono::Utc::now();
    let rows: Vec<ChunkRow<'_>> = pieces
        .iter()
        .zip(seq..)
        .map(|(p, seq)| ChunkRow {
            conversation_id: id,
            user_id: user,
            seq,
            content: &p.chunk.content,
            content_hash: &p.chunk.content_hash,
            model,
            embedding: p.vector.vector(),
            status: p.vector.status(),
            error: p.vector.error(),
            embedded_at: p.vector.vector().is_some().then_some(now),
        })
        .collect();
    unnest_chunks(&mut *tx, &rows).await?;
    Ok(Split::Done)
}

impl Store {
    /// One backfill round: claims up to `limit` pending chunks of `model`
    /// that are due, hands them to `embed` (which answers one result per
    /// chunk, in order), and writes the results. The chunks stay locked
    /// while `embed` runs, so it should be bounded in time.
    ///
    /// If `embed` answers the wrong number of results, nothing is written
    /// and the chunks stay as they were.
    pub async fn backfill_round<F, Fut>(
        &self,
        model: &str,
        limit: usize,
        defer: DeferPolicy,
        embed: F,
    ) -> Result<BackfillOutcome, StoreError>
    where
        F: FnOnce(Vec<PendingChunk>) -> Fut,
        Fut: Future<Output = Vec<BackfillResult>>,
    {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(CLAIM)
            .bind(model)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
        let mut chunks = Vec::with_capacity(rows.len());
        for row in rows {
            let hash: Vec<u8> = row.try_get("content_hash")?;
            let Ok(content_hash) = ContentHash::try_from(hash.as_slice()) else {
                continue; // The CHECK constraint makes this unreachable.
            };
            chunks.push(PendingChunk {
                conversation_id: row.try_get("conversation_id")?,
                user_id: row.try_get("user_id")?,
                seq: row.try_get("seq")?,
                content: row.try_get("content")?,
                content_hash,
                attempts: row.try_get("embed_attempts")?,
            });
        }
        let mut outcome = BackfillOutcome {
            claimed: chunks.len(),
            ..BackfillOutcome::default()
        };
        if chunks.is_empty() {
            tx.commit().await?;
            return Ok(outcome);
        }
        let keys: Vec<(Uuid, i32, String)> = chunks
            .iter()
            .map(|c| (c.conversation_id, c.seq, c.user_id.clone()))
            .collect();
        let results = embed(chunks).await;
        if results.len() != keys.len() {
            tx.rollback().await?;
            return Err(StoreError::Schema(format!(
                "backfill: {} results for {} chunks (a bug); nothing written",
                results.len(),
                keys.len()
            )));
        }

        let dims = self.dimensions();
        let mut embedded = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut failed = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut deferred = (Vec::new(), Vec::new(), Vec::new());
        let mut splits = Vec::new();
        // (row id, user): in row id order, the order rows are locked in.
        let mut touched = BTreeSet::new();
        for ((id, seq, user), result) in keys.into_iter().zip(results) {
            match result {
                BackfillResult::Embedded(v) if dims.is_none_or(|d| d == v.len()) => {
                    embedded.0.push(id);
                    embedded.1.push(seq);
                    embedded.2.push(Vector::from(v.to_vec()));
                    embedded.3.push(user.clone());
                    touched.insert((id, user));
                }
                BackfillResult::Embedded(v) => {
                    failed.0.push(id);
                    failed.1.push(seq);
                    failed.2.push(format!(
                        "vector has {} dimensions, the column holds {}",
                        v.len(),
                        dims.unwrap_or(0)
                    ));
                    failed.3.push(user.clone());
                    touched.insert((id, user));
                }
                BackfillResult::Failed(reason) => {
                    failed.0.push(id);
                    failed.1.push(seq);
                    failed.2.push(reason.replace('\0', ""));
                    failed.3.push(user.clone());
                    touched.insert((id, user));
                }
                BackfillResult::Deferred => {
                    deferred.0.push(id);
                    deferred.1.push(seq);
                    deferred.2.push(user);
                }
                BackfillResult::Split(pieces) => {
                    touched.insert((id, user.clone()));
                    splits.push((id, user, seq, pieces));
                }
            }
        }
        if !embedded.0.is_empty() {
            let done = sqlx::query(SET_EMBEDDED)
                .bind(&embedded.0)
                .bind(&embedded.1)
                .bind(&embedded.2)
                .bind(&embedded.3)
                .execute(&mut *tx)
                .await?;
            outcome.embedded = usize::try_from(done.rows_affected()).unwrap_or(0);
        }
        if !failed.0.is_empty() {
            let done = sqlx::query(SET_FAILED)
                .bind(&failed.0)
                .bind(&failed.1)
                .bind(&failed.2)
                .bind(&failed.3)
                .execute(&mut *tx)
                .await?;
            outcome.failed = usize::try_from(done.rows_affected()).unwrap_or(0);
        }
        if !deferred.0.is_empty() {
            let done = sqlx::query(SET_DEFERRED)
                .bind(&deferred.0)
                .bind(&deferred.1)
                .bind(defer.base.as_secs_f64())
                .bind(defer.max.as_secs_f64())
                .bind(&deferred.2)
                .execute(&mut *tx)
                .await?;
            outcome.deferred = usize::try_from(done.rows_affected()).unwrap_or(0);
        }
        // After the updates above, which address chunks by their seq as
        // claimed; from a conversation's last split to its first, so
        // moving later chunks never moves one still to be split.
        splits.sort_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)).reverse());
        let mut busy = (Vec::new(), Vec::new(), Vec::new());
        for (id, user, seq, pieces) in &splits {
            match split_chunk(&mut tx, model, dims, *id, user, *seq, pieces).await? {
                Split::Done => outcome.split += 1,
                Split::Gone => {}
                Split::Busy => {
                    busy.0.push(*id);
                    busy.1.push(*seq);
                    busy.2.push(user.clone());
                }
            }
        }
        if !busy.0.is_empty() {
            let done = sqlx::query(SET_DEFERRED)
                .bind(&busy.0)
                .bind(&busy.1)
                .bind(defer.base.as_secs_f64())
                .bind(defer.max.as_secs_f64())
                .bind(&busy.2)
                .execute(&mut *tx)
                .await?;
            outcome.deferred += usize::try_from(done.rows_affected()).unwrap_or(0);
        }
        if !touched.is_empty() {
            let (ids, users): (Vec<Uuid>, Vec<String>) = touched.into_iter().unzip();
            sqlx::query(LOCK_CONVERSATIONS)
                .bind(&users)
                .bind(&ids)
                .fetch_all(&mut *tx)
                .await?;
            let done = sqlx::query(RECOMPUTE_STATUS)
                .bind(&users)
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            outcome.conversations = usize::try_from(done.rows_affected()).unwrap_or(0);
        }
        tx.commit().await?;
        Ok(outcome)
    }

    /// Puts every chunk marked `failed` back to `pending`, its attempts
    /// and error cleared, and its conversation with it: the backfill embeds
    /// them again (`convstore redrive`, `POST /v1/admin/redrive`). One
    /// statement, so a chunk is re-driven once whoever else runs it.
    pub async fn redrive_failed(&self) -> Result<Redriven, StoreError> {
        let (chunks, conversations): (i64, i64) = sqlx::query_as(
            "WITH c AS ( \
               UPDATE conversation_chunks \
                  SET embedding_status = 'pending', error = NULL, \
                      embed_attempts = 0, next_attempt_at = NULL \
                WHERE embedding_status = 'failed' \
                RETURNING user_id, conversation_id), \
             u AS ( \
               UPDATE conversations v SET embedding_status = 'pending' \
                 FROM (SELECT DISTINCT user_id, conversation_id FROM c) d \
                WHERE v.user_id = d.user_id AND v.id = d.conversation_id \
                RETURNING 1) \
             SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM u)",
        )
        .fetch_one(&self.pool)
        .await?;
        let n = |x: i64| u64::try_from(x).unwrap_or(0);
        Ok(Redriven {
            chunks: n(chunks),
            conversations: n(conversations),
        })
    }

    /// Chunks and conversations waiting for a vector or dead-lettered.
    /// Four counts over partial indexes: cheap while the backlog is small.
    pub async fn embedding_backlog(&self) -> Result<EmbeddingBacklog, StoreError> {
        let (chunks_pending, chunks_failed, conversations_pending, conversations_failed): (
            i64,
            i64,
            i64,
            i64,
        ) = sqlx::query_as(BACKLOG).fetch_one(&self.pool).await?;
        let n = |x: i64| u64::try_from(x).unwrap_or(0);
        Ok(EmbeddingBacklog {
            chunks_pending: n(chunks_pending),
            chunks_failed: n(chunks_failed),
            conversations_pending: n(conversations_pending),
            conversations_failed: n(conversations_failed),
        })
    }
}
