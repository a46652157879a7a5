//! Writing a batch: one transaction, conversations first, then the chunk
//! rows of the conversations that were actually new.
//!
//! Versions (issue 16, `convstore_core::lifecycle`): each conversation of
//! a batch is the version the pipeline folded from the stored one
//! ([`RowVersion::replaces`] names the stored version's stamp, `None` a
//! conversation not stored yet). Under the advisory locks of its client id
//! and user (`lifecycle`), the transaction checks that the stored version
//! is still that one and that no tombstone covers it: if another instance,
//! a delete or an erasure changed it since the fold, the conversation is
//! not written and comes back in [`WriteOutcome::stale`], for the pipeline
//! to fold again. A replaced version keeps its row (and id); of its chunk
//! rows, those with the same position, text, model and status stay as they
//! are (no index work), the rest are deleted and the new ones written.
//!
//! Idempotency: conversation rows are inserted with `ON CONFLICT DO
//! NOTHING ... RETURNING id`. The database's keys are `(user_id, id)` and
//! `(user_id, client_id)` (Citus-shaped, migration 0004); that a client id
//! is one conversation and a row id one row across users is kept here,
//! under the client id's exclusive lock: its stored row is read whatever
//! its user, a row id is checked against every user's rows before an
//! insert, and a version of another user moves the row (delete, insert,
//! same id) instead of updating `user_id`. So a retried batch, a journal
//! replay or a second instance writing the same client id stores one row; a new conversation whose client id is
//! stored meanwhile with the same content is a duplicate. Chunk rows are
//! written only for rows the batch inserted or replaced, at positions it
//! changed, so they never conflict and need no `ON CONFLICT` (which is what
//! lets them go through `COPY`).
//!
//! A skipped row is a duplicate only when its *client id* is stored: the
//! client id is the key. A row id held by another client id (a row an
//! older version keyed by a UUID-shaped client id, see
//! `convstore_core::validate::row_id`) is not this conversation, so it is
//! stored under a fresh row id in the same transaction ("relocated")
//! instead of being reported stored without a row.
//!
//! Chunk rows go in by [`WriteMethod`]:
//! - `Copy`: binary `COPY conversation_chunks FROM STDIN`, rows encoded by
//!   [`super::copy::CopyEncoder`];
//! - `Unnest`: one `INSERT ... SELECT FROM UNNEST($1::uuid[], ...)`.
//!
//! Measured (`benches/store_write.rs`, 768 dimensions, 128 chunk rows per
//! batch): with the HNSW index present both are bound by index maintenance
//! (~8–14 ms of server CPU per row with pgvector 0.6), and COPY was 1–10%
//! ahead in every run, with less client CPU; without the index they are
//! within a few percent. COPY is the default; UNNEST stays as a plain-SQL
//! fallback.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use pgvector::Vector;
use sqlx::postgres::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

use super::copy::{CopyEncodeError, CopyEncoder, VECTOR_MAX_DIMENSIONS};
use super::lifecycle::{KeyKind, delete_rows, lock_key, lock_keys, read_tombstones};
use super::{Store, StoreError};
use crate::settings::WriteMethod;
use convstore_core::lifecycle::{Tombstones, content_sha};
use convstore_core::model::{ContentHash, EmbeddingStatus, ReadyConversation};

/// What a batch write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// New conversation rows.
    pub conversations_inserted: usize,
    /// Conversations already stored (same id or client id), or repeated
    /// within the batch: nothing was written for them.
    pub duplicates: usize,
    /// Of `conversations_inserted`: stored under a fresh row id because
    /// the one derived from their client id belonged to another client id.
    pub relocated: usize,
    /// Chunk rows written, all statuses.
    pub chunks_inserted: usize,
    /// Of `chunks_inserted`: stored without a vector, for the backfill.
    pub chunks_pending: usize,
    /// Of `chunks_inserted`: stored as failed (dead letters).
    pub chunks_failed: usize,
    /// Stored versions replaced by the batch's (posts and appends).
    pub replaced: usize,
    /// Chunk rows of replaced versions left as they were.
    pub chunks_kept: usize,
    /// Chunk rows of replaced versions deleted (changed or gone).
    pub chunks_deleted: usize,
    /// Stored versions removed ([`Removal`]).
    pub removed: usize,
    /// Client ids not written because the stored version they were folded
    /// onto changed meanwhile (another writer, a delete, an erasure): fold
    /// them again and write them again.
    pub stale: Vec<String>,
}

/// Columns of a chunk row, in the order both write methods send them.
macro_rules! chunk_columns {
    () => {
        "conversation_id, seq, content, content_hash, model, \
         embedding, embedding_status, error, embedded_at, user_id"
    };
}
const CHUNK_FIELDS: usize = 10;

const COPY_CHUNKS: &str = concat!(
    "COPY conversation_chunks (",
    chunk_columns!(),
    ") FROM STDIN (FORMAT BINARY)"
);

const UNNEST_CHUNKS: &str = concat!(
    "INSERT INTO conversation_chunks (",
    chunk_columns!(),
    ") SELECT * FROM UNNEST($1::uuid[], $2::int4[], $3::text[], $4::bytea[], $5::text[], \
     $6::vector[], $7::text[], $8::text[], $9::timestamptz[], $10::text[])"
);

/// Flush the COPY buffer to the server at this size, so encoding overlaps
/// the server's work and memory stays bounded for large batches.
const COPY_FLUSH_BYTES: usize = 1 << 20;

const INSERT_CONVERSATIONS: &str = "\
INSERT INTO conversations
    (id, client_id, user_id, channel, summary, transcript, messages, metadata,
     created_at, received_at, embedding_status,
     version_stamp, versions, content_sha, posted_sha)
SELECT * FROM UNNEST(
    $1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::jsonb[], $8::jsonb[], $9::timestamptz[], $10::timestamptz[], $11::text[],
    $12::int8[], $13::int4[], $14::bytea[], $15::bytea[])
ON CONFLICT DO NOTHING
RETURNING id";

/// A replaced version keeps its row, its id and its arrival time. By
/// `(user_id, id)`, the key: a version of another user is a move
/// ([`WritePlan::moves`]), never an update of the distribution column.
const UPDATE_CONVERSATIONS: &str = "\
UPDATE conversations AS c SET
    user_id = u.user_id, channel = u.channel, summary = u.summary,
    transcript = u.transcript, messages = u.messages, metadata = u.metadata,
    created_at = u.created_at, embedding_status = u.embedding_status,
    version_stamp = u.version_stamp, versions = u.versions,
    content_sha = u.content_sha, posted_sha = u.posted_sha, updated_at = now()
FROM UNNEST(
    $1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
    $7::jsonb[], $8::jsonb[], $9::timestamptz[], $10::timestamptz[], $11::text[],
    $12::int8[], $13::int4[], $14::bytea[], $15::bytea[])
    AS u(id, client_id, user_id, channel, summary, transcript, messages, metadata,
         created_at, received_at, embedding_status,
         version_stamp, versions, content_sha, posted_sha)
WHERE c.user_id = u.user_id AND c.id = u.id";

impl Store {
    /// Writes a batch in one transaction and reports what was new.
    ///
    /// Every conversation is checked before the database is touched; the
    /// first that cannot be stored fails the call with
    /// [`StoreError::InvalidConversation`] naming it, so the caller can
    /// drop it and write the rest. Nothing is written on any error.
    pub async fn write_batch(
        &self,
        batch: &[ReadyConversation],
    ) -> Result<WriteOutcome, StoreError> {
        self.write_versions(batch, &[]).await
    }

    /// [`Store::write_batch`], and in the same transaction the removal of
    /// stored versions a delete or erasure made moot (each checked as the
    /// versions are: a removal whose stored version changed meanwhile is
    /// stale).
    pub async fn write_versions(
        &self,
        batch: &[ReadyConversation],
        removals: &[Removal],
    ) -> Result<WriteOutcome, StoreError> {
        let unique = dedupe(batch);
        for ready in &unique {
            check_conversation(ready, self.dimensions()).map_err(|reason| {
                StoreError::InvalidConversation {
                    id: ready.conversation.id,
                    reason,
                }
            })?;
        }
        let mut outcome = WriteOutcome {
            duplicates: batch.len() - unique.len(),
            ..WriteOutcome::default()
        };
        if unique.is_empty() && removals.is_empty() {
            return Ok(outcome);
        }

        let mut tx = self.pool.begin().await?;
        let plan = plan_writes(&mut tx, unique, removals).await?;
        outcome.duplicates += plan.duplicates;
        outcome.stale = plan.stale;
        if !plan.removals.is_empty() {
            let (rows, chunks) = delete_rows(&mut tx, &plan.removals).await?;
            outcome.removed = usize::try_from(rows).unwrap_or(usize::MAX);
            outcome.chunks_deleted += chunks.len();
        }
        let mut updates = plan.updates;
        if !plan.moves.is_empty() {
            // A version of another user: the row and its chunks go from
            // the old user's partition (shard) and come back, same row id,
            // under the new user; the update below then stamps it as any
            // replaced version. Its chunks are all written again.
            let old: Vec<(String, Uuid)> = plan
                .moves
                .iter()
                .map(|(old_user, id, _)| (old_user.clone(), *id))
                .collect();
            let (_, chunks) = delete_rows(&mut tx, &old).await?;
            outcome.chunks_deleted += chunks.len();
            let moved: Vec<(Uuid, &ReadyConversation)> =
                plan.moves.iter().map(|(_, id, r)| (*id, *r)).collect();
            insert_conversations(&mut tx, &moved).await?;
            updates.extend(moved);
        }
        // A row id is one row, whoever's: a new conversation whose row id
        // another client id holds (in any user's rows) is stored under a
        // fresh one; one without a client id whose row id is stored is a
        // retry.
        let held = stored_row_ids(&mut tx, &plan.inserts).await?;
        let mut relocating = HashSet::new();
        let mut keyed: Vec<(Uuid, &ReadyConversation)> = Vec::with_capacity(plan.inserts.len());
        for ready in &plan.inserts {
            let id = ready.conversation.id;
            match (held.contains(&id), ready.conversation.client_id.is_some()) {
                (false, _) => keyed.push((id, *ready)),
                (true, true) => {
                    let fresh = Uuid::now_v7();
                    relocating.insert(fresh);
                    keyed.push((fresh, *ready));
                }
                (true, false) => {}
            }
        }
        let inserted = insert_conversations(&mut tx, &keyed).await?;
        for (row_id, ready) in &keyed {
            if relocating.contains(row_id) && inserted.contains(row_id) {
                tracing::warn!(
                    client_id = ready.conversation.client_id.as_deref().unwrap_or_default(),
                    taken = %ready.conversation.id,
                    stored_as = %row_id,
                    "A conversation's row id belonged to another client id; stored it under a fresh row id"
                );
                outcome.relocated += 1;
            }
        }
        let (mut new, skipped): (Vec<_>, Vec<_>) = keyed
            .into_iter()
            .partition(|(row_id, _)| inserted.contains(row_id));
        let homeless = row_id_held_by_another(&mut tx, &skipped).await?;
        if !homeless.is_empty() {
            let fresh: Vec<(Uuid, &ReadyConversation)> =
                homeless.iter().map(|r| (Uuid::now_v7(), *r)).collect();
            let again = insert_conversations(&mut tx, &fresh).await?;
            for (row_id, ready) in fresh {
                // Not inserted now means a concurrent writer stored this
                // client id meanwhile: a duplicate after all.
                if again.contains(&row_id) {
                    tracing::warn!(
                        client_id = ready.conversation.client_id.as_deref().unwrap_or_default(),
                        taken = %ready.conversation.id,
                        stored_as = %row_id,
                        "A conversation's row id belonged to another client id; stored it under a fresh row id"
                    );
                    outcome.relocated += 1;
                    new.push((row_id, ready));
                }
            }
        }
        outcome.duplicates += plan.inserts.len() - new.len();
        outcome.conversations_inserted = new.len();
        let kept = if updates.is_empty() {
            HashSet::new()
        } else {
            update_conversations(&mut tx, &updates).await?;
            outcome.replaced = updates.len();
            let diff = diff_chunks(&mut tx, &updates).await?;
            outcome.chunks_kept = diff.kept.len();
            outcome.chunks_deleted += diff.deleted;
            diff.kept
        };
        new.extend(updates.iter().copied());

        let now = Utc::now();
        let rows: Vec<ChunkRow<'_>> = new
            .iter()
            .flat_map(|(row_id, r)| chunk_rows(r, *row_id, now))
            .filter(|row| !kept.contains(&(row.conversation_id, row.seq)))
            .collect();
        for row in &rows {
            match row.status {
                EmbeddingStatus::Embedded => {}
                EmbeddingStatus::Pending => outcome.chunks_pending += 1,
                EmbeddingStatus::Failed => outcome.chunks_failed += 1,
            }
        }
        if !rows.is_empty() {
            outcome.chunks_inserted = match self.write_method {
                WriteMethod::Copy => copy_chunks(&mut tx, &rows).await?,
                WriteMethod::Unnest => unnest_chunks(&mut tx, &rows).await?,
            };
        }
        tx.commit().await?;
        tracing::debug!(
            conversations = outcome.conversations_inserted,
            replaced = outcome.replaced,
            stale = outcome.stale.len(),
            duplicates = outcome.duplicates,
            chunks = outcome.chunks_inserted,
            method = ?self.write_method,
            "Stored a batch"
        );
        Ok(outcome)
    }
}

/// The batch without repeated ids (first one wins) and without repeated
/// client ids: repeats would be duplicates anyway, and dropping them here
/// keeps their chunk rows from being sent twice.
///
/// Sorted by id: two instances writing overlapping batches (a redelivered
/// stream, a journal replay) then take the unique-index locks in the same
/// order and wait for each other instead of deadlocking.
fn dedupe(batch: &[ReadyConversation]) -> Vec<&ReadyConversation> {
    let mut ids = HashSet::with_capacity(batch.len());
    let mut client_ids = HashSet::new();
    let mut unique: Vec<&ReadyConversation> = batch
        .iter()
        .filter(|r| {
            let c = &r.conversation;
            ids.insert(c.id) && c.client_id.as_deref().is_none_or(|k| client_ids.insert(k))
        })
        .collect();
    unique.sort_by_key(|r| r.conversation.id);
    unique
}

/// What the database would refuse, found before it is asked: NUL bytes
/// (text and jsonb cannot hold them), vectors that do not fit the column,
/// repeated chunk positions.
fn check_conversation(ready: &ReadyConversation, dims: Option<usize>) -> Result<(), String> {
    let c = &ready.conversation;
    let texts = [
        ("user_id", Some(c.user_id.as_str())),
        ("channel", Some(c.channel.as_str())),
        ("client_id", c.client_id.as_deref()),
        ("summary", c.summary.as_deref()),
        ("transcript", c.transcript.as_deref()),
        ("model", Some(ready.model.as_str())),
    ];
    for (field, text) in texts {
        if text.is_some_and(|t| t.contains('\0')) {
            return Err(format!("{field} contains a NUL byte"));
        }
    }
    for (i, m) in c.messages.iter().enumerate() {
        if m.content.contains('\0') {
            return Err(format!("messages[{i}] contains a NUL byte"));
        }
    }
    if !c.metadata.is_object() {
        return Err("metadata is not a JSON object".into());
    }
    if json_has_nul(&c.metadata) {
        return Err("metadata contains a NUL byte".into());
    }
    let mut seqs = HashSet::with_capacity(ready.chunks.len());
    for chunk in &ready.chunks {
        let seq = chunk.chunk.seq;
        if seq < 0 || !seqs.insert(seq) {
            return Err(format!("chunk seq {seq} is negative or repeated"));
        }
        if chunk.chunk.content.contains('\0')
            || chunk.vector.error().is_some_and(|e| e.contains('\0'))
        {
            return Err(format!("chunk {seq} contains a NUL byte"));
        }
        if let Some(v) = chunk.vector.vector() {
            check_vector(v, dims).map_err(|reason| format!("chunk {seq}: {reason}"))?
        }
    }
    Ok(())
}

/// Only what PostgreSQL would refuse, so one conversation fails instead of
/// the whole batch's COPY and transaction: a length other than the
/// column's, or outside pgvector's 1..=16,000, and NaN or infinity (pgvector
/// refuses them). Whether a vector is a usable embedding (not zero, the
/// configured dimension) is checked once, where it entered the process
/// (`convstore_embed::answer::check_vectors`); this is the database's
/// defence for any caller of `write_batch`, which cannot assume its vectors
/// came through there (the store does not depend on the embed crate), and
/// costs one pass over floats about to be encoded anyway.
fn check_vector(v: &[f32], dims: Option<usize>) -> Result<(), String> {
    if let Some(dims) = dims
        && v.len() != dims
    {
        return Err(format!(
            "vector has {} dimensions, the column holds {dims}",
            v.len()
        ));
    }
    if v.is_empty() || v.len() > VECTOR_MAX_DIMENSIONS {
        return Err(format!("vector has {} dimensions", v.len()));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err("vector holds NaN or infinity".into());
    }
    Ok(())
}

fn json_has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(json_has_nul),
        serde_json::Value::Object(map) => {
            map.iter().any(|(k, v)| k.contains('\0') || json_has_nul(v))
        }
        _ => false,
    }
}

/// A stored version to remove: a delete or erasure made it moot while
/// changes of it were in flight (`convstore_core::lifecycle::Folded::delete_stored`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub client_id: String,
    /// The stored version's user (its lock is taken like a writer's).
    pub user_id: String,
    /// The stored version's stamp, as folded.
    pub replaces: i64,
}

/// What the batch does to each of its conversations, decided under the
/// locks.
struct WritePlan<'a> {
    inserts: Vec<&'a ReadyConversation>,
    /// (user, row id) of stored versions to remove.
    removals: Vec<(String, Uuid)>,
    /// (stored row id, the new version), same user.
    updates: Vec<(Uuid, &'a ReadyConversation)>,
    /// (stored user, stored row id, the new version) of versions that
    /// belong to another user than the stored one: `user_id` is the
    /// distribution column, so the row moves (delete, insert) rather than
    /// being updated in place.
    moves: Vec<(String, Uuid, &'a ReadyConversation)>,
    duplicates: usize,
    stale: Vec<String>,
}

/// The stored row of a client id, as far as the write needs it.
struct CurrentRow {
    id: Uuid,
    user_id: String,
    stamp: i64,
    content_sha: Option<Vec<u8>>,
    posted_sha: Option<Vec<u8>>,
}

/// Takes the locks of the batch's users (shared) and client ids
/// (exclusive), reads their stored versions and tombstones, and sorts each
/// conversation into insert, update, duplicate or stale, and each removal
/// into remove or stale.
async fn plan_writes<'a>(
    conn: &mut PgConnection,
    unique: Vec<&'a ReadyConversation>,
    removals: &[Removal],
) -> Result<WritePlan<'a>, StoreError> {
    let users: Vec<&str> = unique
        .iter()
        .map(|r| r.conversation.user_id.as_str())
        .chain(removals.iter().map(|r| r.user_id.as_str()))
        .collect();
    let client_ids: Vec<&str> = unique
        .iter()
        .filter_map(|r| r.conversation.client_id.as_deref())
        .chain(removals.iter().map(|r| r.client_id.as_str()))
        .collect();
    // Users first, then conversations, in every writer: one lock order.
    lock_keys(
        conn,
        users.iter().map(|u| lock_key(KeyKind::User, u)).collect(),
        true,
    )
    .await?;
    lock_keys(
        conn,
        client_ids
            .iter()
            .map(|k| lock_key(KeyKind::Conversation, k))
            .collect(),
        false,
    )
    .await?;
    let mut current: HashMap<String, CurrentRow> = HashMap::new();
    if !client_ids.is_empty() {
        let rows = sqlx::query(
            "SELECT id, client_id, user_id, version_stamp, content_sha, posted_sha \
             FROM conversations WHERE client_id = ANY($1) FOR UPDATE",
        )
        .bind(&client_ids)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            use sqlx::Row;
            let client_id: String = row.try_get("client_id")?;
            current.insert(
                client_id,
                CurrentRow {
                    id: row.try_get("id")?,
                    user_id: row.try_get("user_id")?,
                    stamp: row.try_get("version_stamp")?,
                    content_sha: row.try_get("content_sha")?,
                    posted_sha: row.try_get("posted_sha")?,
                },
            );
        }
    }
    let tombstones = read_tombstones(conn, &client_ids, &users).await?;
    let mut plan = WritePlan {
        inserts: Vec::new(),
        removals: Vec::new(),
        updates: Vec::new(),
        moves: Vec::new(),
        duplicates: 0,
        stale: Vec::new(),
    };
    for ready in unique {
        let c = &ready.conversation;
        let v = &ready.version;
        let buried = c
            .client_id
            .as_deref()
            .and_then(|k| tombstones.conversation(k))
            .into_iter()
            .chain(tombstones.user(&c.user_id))
            .any(|deleted| v.stamp <= deleted);
        let Some(client_id) = c.client_id.as_deref() else {
            if buried {
                plan.stale.push(c.id.to_string());
            } else {
                plan.inserts.push(ready);
            }
            continue;
        };
        match (current.get(client_id), v.replaces) {
            _ if buried => plan.stale.push(client_id.to_string()),
            (None, None) => plan.inserts.push(ready),
            (Some(row), Some(stamp)) if row.stamp == stamp && row.user_id == c.user_id => {
                plan.updates.push((row.id, ready))
            }
            (Some(row), Some(stamp)) if row.stamp == stamp => {
                plan.moves.push((row.user_id.clone(), row.id, ready))
            }
            (Some(row), None) if is_retry(ready, row) => plan.duplicates += 1,
            _ => plan.stale.push(client_id.to_string()),
        }
    }
    for removal in removals {
        match current.get(&removal.client_id) {
            Some(row) if row.stamp == removal.replaces => {
                plan.removals.push((row.user_id.clone(), row.id))
            }
            // Already gone (the delete or erasure took it): done.
            None => {}
            Some(_) => plan.stale.push(removal.client_id.clone()),
        }
    }
    Ok(plan)
}

/// A new conversation whose client id is stored with the same content (or
/// by a version before content hashes): the same client id twice stores
/// one row.
fn is_retry(ready: &ReadyConversation, row: &CurrentRow) -> bool {
    let Some(stored) = row.content_sha.as_deref() else {
        return true;
    };
    let (sha, _) = version_shas(ready);
    stored == sha.as_slice() || row.posted_sha.as_deref() == Some(sha.as_slice())
}

fn version_shas(ready: &ReadyConversation) -> (ContentHash, ContentHash) {
    let sha = ready
        .version
        .content_sha
        .unwrap_or_else(|| content_sha(&ready.conversation));
    (sha, ready.version.posted_sha.unwrap_or(sha))
}

/// What [`diff_chunks`] found.
struct ChunkDiff {
    /// (row id, seq) of chunk rows left as they are.
    kept: HashSet<(Uuid, i32)>,
    deleted: usize,
}

/// Deletes the chunk rows of replaced versions that the new version does
/// not hold as they are (same position, text, model and status), and says
/// which stay.
async fn diff_chunks(
    conn: &mut PgConnection,
    updates: &[(Uuid, &ReadyConversation)],
) -> Result<ChunkDiff, StoreError> {
    use sqlx::Row;
    let users: Vec<&str> = updates
        .iter()
        .map(|(_, r)| r.conversation.user_id.as_str())
        .collect();
    let ids: Vec<Uuid> = updates.iter().map(|(id, _)| *id).collect();
    let mut wanted: HashMap<(Uuid, i32), (&[u8], &str, &str)> = HashMap::new();
    for (id, ready) in updates {
        for chunk in &ready.chunks {
            wanted.insert(
                (*id, chunk.chunk.seq),
                (
                    chunk.chunk.content_hash.as_slice(),
                    ready.model.as_str(),
                    chunk.vector.status().as_str(),
                ),
            );
        }
    }
    let rows = sqlx::query(
        "SELECT k.conversation_id, k.seq, k.user_id, k.content_hash, k.model, k.embedding_status \
         FROM conversation_chunks AS k JOIN UNNEST($1::text[], $2::uuid[]) AS d(user_id, id) \
           ON k.user_id = d.user_id AND k.conversation_id = d.id",
    )
    .bind(&users)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut kept = HashSet::new();
    let (mut gone_users, mut gone_ids, mut gone_seqs) = (Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        let key: (Uuid, i32) = (row.try_get("conversation_id")?, row.try_get("seq")?);
        let hash: Vec<u8> = row.try_get("content_hash")?;
        let model: String = row.try_get("model")?;
        let status: String = row.try_get("embedding_status")?;
        let user: String = row.try_get("user_id")?;
        let same = wanted
            .get(&key)
            .is_some_and(|(h, m, s)| *h == hash.as_slice() && *m == model && *s == status);
        if same {
            kept.insert(key);
        } else {
            gone_users.push(user);
            gone_ids.push(key.0);
            gone_seqs.push(key.1);
        }
    }
    if !gone_ids.is_empty() {
        sqlx::query(
            "DELETE FROM conversation_chunks AS c \
             USING UNNEST($1::text[], $2::uuid[], $3::int4[]) AS d(user_id, id, seq) \
             WHERE c.user_id = d.user_id AND c.conversation_id = d.id AND c.seq = d.seq",
        )
        .bind(&gone_users)
        .bind(&gone_ids)
        .bind(&gone_seqs)
        .execute(&mut *conn)
        .await?;
    }
    Ok(ChunkDiff {
        kept,
        deleted: gone_ids.len(),
    })
}

/// Which of these conversations' row ids are stored, in any user's rows
/// (the key is `(user_id, id)`; a row id is kept one row by the writer).
async fn stored_row_ids(
    conn: &mut PgConnection,
    inserts: &[&ReadyConversation],
) -> Result<HashSet<Uuid>, StoreError> {
    if inserts.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<Uuid> = inserts.iter().map(|r| r.conversation.id).collect();
    let held: Vec<Uuid> =
        sqlx::query_scalar("SELECT DISTINCT id FROM conversations WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
    Ok(held.into_iter().collect())
}

/// Of the conversations the insert skipped, those whose client id is not
/// stored: their row id is held by a different conversation, so they are
/// not duplicates and must still be written. A conversation without a
/// client id has a fresh UUIDv7 row id and is skipped only as a retry.
async fn row_id_held_by_another<'a>(
    conn: &mut PgConnection,
    skipped: &[(Uuid, &'a ReadyConversation)],
) -> Result<Vec<&'a ReadyConversation>, StoreError> {
    let keyed: Vec<(&str, &'a ReadyConversation)> = skipped
        .iter()
        .filter_map(|(_, r)| r.conversation.client_id.as_deref().map(|k| (k, *r)))
        .collect();
    if keyed.is_empty() {
        return Ok(Vec::new());
    }
    let client_ids: Vec<&str> = keyed.iter().map(|(k, _)| *k).collect();
    let stored: HashSet<String> =
        sqlx::query_scalar("SELECT client_id FROM conversations WHERE client_id = ANY($1)")
            .bind(&client_ids)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
    Ok(keyed
        .into_iter()
        .filter(|(k, _)| !stored.contains(*k))
        .map(|(_, r)| r)
        .collect())
}

/// Inserts the conversation rows, each under the row id paired with it;
/// returns the row ids that were new.
async fn insert_conversations(
    conn: &mut PgConnection,
    batch: &[(Uuid, &ReadyConversation)],
) -> Result<HashSet<Uuid>, StoreError> {
    let inserted: Vec<Uuid> = bind_conversations(sqlx::query_scalar(INSERT_CONVERSATIONS), batch)
        .fetch_all(&mut *conn)
        .await?;
    Ok(inserted.into_iter().collect())
}

/// Replaces the stored versions, each in the row paired with it.
async fn update_conversations(
    conn: &mut PgConnection,
    batch: &[(Uuid, &ReadyConversation)],
) -> Result<(), StoreError> {
    bind_conversations(sqlx::query(UPDATE_CONVERSATIONS), batch)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Something the fifteen conversation columns can be bound to, in order.
trait BindColumns<'q>: Sized {
    fn bind_column<T>(self, value: T) -> Self
    where
        T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send;
}

impl<'q> BindColumns<'q> for sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn bind_column<T>(self, value: T) -> Self
    where
        T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
    {
        self.bind(value)
    }
}

impl<'q, O> BindColumns<'q>
    for sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>
{
    fn bind_column<T>(self, value: T) -> Self
    where
        T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
    {
        self.bind(value)
    }
}

fn bind_conversations<'q, Q: BindColumns<'q>>(
    query: Q,
    batch: &'q [(Uuid, &'q ReadyConversation)],
) -> Q {
    let n = batch.len();
    let mut ids = Vec::with_capacity(n);
    let mut client_ids = Vec::with_capacity(n);
    let mut user_ids = Vec::with_capacity(n);
    let mut channels = Vec::with_capacity(n);
    let mut summaries = Vec::with_capacity(n);
    let mut transcripts = Vec::with_capacity(n);
    let mut messages = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut received = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut stamps = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    let mut content_shas = Vec::with_capacity(n);
    let mut posted_shas = Vec::with_capacity(n);
    for (row_id, ready) in batch {
        let c = &ready.conversation;
        let (content, posted) = version_shas(ready);
        stamps.push(ready.version.stamp);
        versions.push(ready.version.versions);
        content_shas.push(content.to_vec());
        posted_shas.push(posted.to_vec());
        ids.push(*row_id);
        client_ids.push(c.client_id.as_deref());
        user_ids.push(c.user_id.as_str());
        channels.push(c.channel.as_str());
        summaries.push(c.summary.as_deref());
        transcripts.push(c.full_text());
        messages.push((!c.messages.is_empty()).then_some(Json(&c.messages)));
        metadata.push(Json(&c.metadata));
        created.push(c.created_at);
        received.push(c.received_at);
        statuses.push(ready.embedding_status().as_str());
    }
    query
        .bind_column(ids)
        .bind_column(client_ids)
        .bind_column(user_ids)
        .bind_column(channels)
        .bind_column(summaries)
        .bind_column(transcripts)
        .bind_column(messages)
        .bind_column(metadata)
        .bind_column(created)
        .bind_column(received)
        .bind_column(statuses)
        .bind_column(stamps)
        .bind_column(versions)
        .bind_column(content_shas)
        .bind_column(posted_shas)
}

/// One `conversation_chunks` row, borrowed from the batch.
pub(crate) struct ChunkRow<'a> {
    pub(crate) conversation_id: Uuid,
    /// The conversation's user: the distribution column, in every key.
    pub(crate) user_id: &'a str,
    pub(crate) seq: i32,
    pub(crate) content: &'a str,
    pub(crate) content_hash: &'a [u8],
    pub(crate) model: &'a str,
    pub(crate) embedding: Option<&'a [f32]>,
    pub(crate) status: EmbeddingStatus,
    pub(crate) error: Option<&'a str>,
    pub(crate) embedded_at: Option<DateTime<Utc>>,
}

fn chunk_rows(
    ready: &ReadyConversation,
    row_id: Uuid,
    now: DateTime<Utc>,
) -> impl Iterator<Item = ChunkRow<'_>> {
    ready.chunks.iter().map(move |c| ChunkRow {
        conversation_id: row_id,
        user_id: &ready.conversation.user_id,
        seq: c.chunk.seq,
        content: &c.chunk.content,
        content_hash: &c.chunk.content_hash,
        model: &ready.model,
        embedding: c.vector.vector(),
        status: c.vector.status(),
        error: c.vector.error(),
        embedded_at: c.vector.vector().is_some().then_some(now),
    })
}

/// Binary COPY of the chunk rows; returns the rows the server counted.
async fn copy_chunks(conn: &mut PgConnection, rows: &[ChunkRow<'_>]) -> Result<usize, StoreError> {
    let mut copy = conn.copy_in_raw(COPY_CHUNKS).await?;
    let mut enc = CopyEncoder::with_capacity(COPY_FLUSH_BYTES + 64 * 1024);
    for row in rows {
        if let Err(e) = encode_chunk_row(&mut enc, row) {
            // Checked before the transaction began, so this is a bug; end
            // the COPY cleanly so the connection stays usable.
            copy.abort(format!("conversation {}: {e}", row.conversation_id))
                .await?;
            return Err(StoreError::InvalidConversation {
                id: row.conversation_id,
                reason: e.to_string(),
            });
        }
        if enc.len() >= COPY_FLUSH_BYTES {
            copy.send(enc.take()).await?;
        }
    }
    match enc.finish() {
        Ok(tail) => {
            copy.send(tail).await?;
        }
        Err(e) => {
            copy.abort(e.to_string()).await?;
            return Err(StoreError::Database(sqlx::Error::Encode(Box::new(e))));
        }
    }
    let written = copy.finish().await?;
    Ok(usize::try_from(written).unwrap_or(usize::MAX))
}

fn encode_chunk_row(enc: &mut CopyEncoder, row: &ChunkRow<'_>) -> Result<(), CopyEncodeError> {
    enc.begin_row(CHUNK_FIELDS)?;
    enc.uuid(&row.conversation_id);
    enc.int4(row.seq);
    enc.text(row.content)?;
    enc.bytea(row.content_hash)?;
    enc.text(row.model)?;
    match row.embedding {
        Some(v) => enc.vector(v)?,
        None => enc.null(),
    }
    enc.text(row.status.as_str())?;
    match row.error {
        Some(e) => enc.text(e)?,
        None => enc.null(),
    }
    match row.embedded_at {
        Some(t) => enc.timestamptz(t)?,
        None => enc.null(),
    }
    enc.text(row.user_id)?;
    Ok(())
}

/// The chunk rows as one `INSERT ... SELECT FROM UNNEST(arrays)`.
pub(crate) async fn unnest_chunks(
    conn: &mut PgConnection,
    rows: &[ChunkRow<'_>],
) -> Result<usize, StoreError> {
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut seqs = Vec::with_capacity(n);
    let mut contents = Vec::with_capacity(n);
    let mut hashes = Vec::with_capacity(n);
    let mut models = Vec::with_capacity(n);
    let mut embeddings: Vec<Option<Vector>> = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut embedded_at = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    for row in rows {
        ids.push(row.conversation_id);
        seqs.push(row.seq);
        contents.push(row.content);
        hashes.push(row.content_hash);
        models.push(row.model);
        embeddings.push(row.embedding.map(|v| Vector::from(v.to_vec())));
        statuses.push(row.status.as_str());
        errors.push(row.error);
        embedded_at.push(row.embedded_at);
        users.push(row.user_id);
    }
    let result = sqlx::query(UNNEST_CHUNKS)
        .bind(&ids)
        .bind(&seqs)
        .bind(&contents)
        .bind(&hashes)
        .bind(&models)
        .bind(&embeddings)
        .bind(&statuses)
        .bind(&errors)
        .bind(&embedded_at)
        .bind(&users)
        .execute(&mut *conn)
        .await?;
    Ok(usize::try_from(result.rows_affected()).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use convstore_core::model::{Chunk, ChunkVector, Conversation, EmbeddedChunk, content_hash};

    fn ready(id: u128, client_id: Option<&str>, chunks: Vec<EmbeddedChunk>) -> ReadyConversation {
        ReadyConversation {
            conversation: Conversation {
                id: Uuid::from_u128(id),
                client_id: client_id.map(str::to_string),
                user_id: "u".into(),
                channel: "c".into(),
                messages: Vec::new(),
                transcript: Some("t".into()),
                summary: None,
                metadata: serde_json::json!({}),
                created_at: None,
                received_at: Utc::now(),
                received_instant: Instant::now(),
            },
            chunks,
            model: "m".into(),
            version: convstore_core::model::RowVersion::default(),
        }
    }

    fn chunk(seq: i32, vector: ChunkVector) -> EmbeddedChunk {
        EmbeddedChunk {
            chunk: Chunk {
                seq,
                content: "x".into(),
                content_hash: content_hash("x"),
            },
            vector,
        }
    }

    #[test]
    fn dedupe_keeps_first_by_id_and_client_id_in_id_order() {
        let batch = vec![
            ready(4, None, vec![]),
            ready(1, Some("a"), vec![]),
            ready(1, Some("a"), vec![]),
            ready(2, Some("a"), vec![]),
            ready(3, None, vec![]),
        ];
        let ids: Vec<u128> = dedupe(&batch)
            .iter()
            .map(|r| r.conversation.id.as_u128())
            .collect();
        assert_eq!(ids, vec![1, 3, 4]);
    }

    #[test]
    fn check_finds_what_postgres_would_refuse() {
        let ok = ready(
            1,
            None,
            vec![chunk(0, ChunkVector::Embedded(Arc::from(vec![1.0, 0.0])))],
        );
        assert_eq!(check_conversation(&ok, Some(2)), Ok(()));
        assert!(check_conversation(&ok, Some(3)).is_err());

        let nan = ready(
            1,
            None,
            vec![chunk(0, ChunkVector::Embedded(Arc::from(vec![f32::NAN])))],
        );
        assert!(check_conversation(&nan, None).is_err());

        // "Embedded without a vector" (and a vector on a pending chunk)
        // can no longer be built: `ChunkVector` carries the vector.

        let repeated = ready(
            1,
            None,
            vec![
                chunk(0, ChunkVector::Pending),
                chunk(0, ChunkVector::Pending),
            ],
        );
        assert!(check_conversation(&repeated, None).is_err());

        let mut nul = ready(1, None, vec![]);
        nul.conversation.metadata = serde_json::json!({"k": "a\u{0}b"});
        assert!(check_conversation(&nul, None).is_err());
    }

    #[test]
    fn chunk_row_encodes_ten_fields() {
        let r = ready(7, None, vec![chunk(0, ChunkVector::Pending)]);
        let mut enc = CopyEncoder::new();
        for row in chunk_rows(&r, r.conversation.id, Utc::now()) {
            encode_chunk_row(&mut enc, &row).expect("encodes");
        }
        assert!(enc.finish().is_ok());
    }
}
