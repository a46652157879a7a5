//! The conversation lifecycle in SQL: the stored versions a batch's changes
//! fold onto, tombstones, deleting a conversation and erasing a user
//! (docs/LIFECYCLE.md).
//!
//! Concurrency, with several instances on one database: every write of a
//! conversation takes a transaction-scoped advisory lock on its client id
//! (exclusive) and on its user (shared); a delete takes the conversation's
//! lock, an erasure its user's lock, exclusively. A delete or erasure
//! therefore never interleaves with a batch writing the same conversation
//! or user, and its tombstone is committed with (or before) the deletion:
//! a writer that folded its changes before the tombstone existed finds it
//! under the lock and folds again (`write::Stale`).

use std::collections::HashMap;

use sqlx::Row;
use sqlx::postgres::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

use super::{Store, StoreError};
use convstore_core::lifecycle::{Stamp, Tombstones, Version};
use convstore_core::model::{ContentHash, Conversation, Message, content_hash, content_hash_bytes};

/// Conversations deleted per transaction by an erasure: short locks.
const ERASE_BATCH: i64 = 500;

/// What kind of key a tombstone or lock is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum KeyKind {
    Conversation,
    User,
}

impl KeyKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Conversation => "conversation",
            Self::User => "user",
        }
    }
}

/// sha256 of a client id or user id: tombstones keep this, never the id.
pub(crate) fn key_sha(key: &str) -> Vec<u8> {
    content_hash(key).to_vec()
}

/// The advisory lock key of a client id or user id (64 bits of a hash of
/// kind and id; a collision only makes two writers wait for each other).
pub(crate) fn lock_key(kind: KeyKind, key: &str) -> i64 {
    let mut named = Vec::with_capacity(kind.as_str().len() + 1 + key.len());
    named.extend_from_slice(kind.as_str().as_bytes());
    named.push(0);
    named.extend_from_slice(key.as_bytes());
    let digest = content_hash_bytes(&named);
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// Takes the advisory locks of `keys`, in sorted order (so two writers of
/// overlapping sets wait rather than deadlock), until the transaction ends.
pub(crate) async fn lock_keys(
    conn: &mut PgConnection,
    mut keys: Vec<i64>,
    shared: bool,
) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    keys.sort_unstable();
    keys.dedup();
    let sql = if shared {
        "SELECT count(pg_advisory_xact_lock_shared(k)) FROM UNNEST($1::int8[]) AS t(k)"
    } else {
        "SELECT count(pg_advisory_xact_lock(k)) FROM UNNEST($1::int8[]) AS t(k)"
    };
    sqlx::query(sql).bind(&keys).execute(&mut *conn).await?;
    Ok(())
}

/// Tombstones of some conversations and users, by their ids.
#[derive(Debug, Clone, Default)]
pub struct TombstoneSet {
    pub conversations: HashMap<String, Stamp>,
    pub users: HashMap<String, Stamp>,
}

impl Tombstones for TombstoneSet {
    fn conversation(&self, client_id: &str) -> Option<Stamp> {
        self.conversations.get(client_id).copied()
    }
    fn user(&self, user_id: &str) -> Option<Stamp> {
        self.users.get(user_id).copied()
    }
}

/// The tombstones of these client ids and user ids.
pub(crate) async fn read_tombstones(
    conn: &mut PgConnection,
    client_ids: &[&str],
    user_ids: &[&str],
) -> Result<TombstoneSet, StoreError> {
    let mut by_sha: HashMap<(KeyKind, Vec<u8>), String> = HashMap::new();
    for k in client_ids {
        by_sha.insert((KeyKind::Conversation, key_sha(k)), (*k).to_string());
    }
    for u in user_ids {
        by_sha.insert((KeyKind::User, key_sha(u)), (*u).to_string());
    }
    let mut set = TombstoneSet::default();
    if by_sha.is_empty() {
        return Ok(set);
    }
    let conversation_shas: Vec<&[u8]> = by_sha
        .keys()
        .filter(|(kind, _)| *kind == KeyKind::Conversation)
        .map(|(_, sha)| sha.as_slice())
        .collect();
    let user_shas: Vec<&[u8]> = by_sha
        .keys()
        .filter(|(kind, _)| *kind == KeyKind::User)
        .map(|(_, sha)| sha.as_slice())
        .collect();
    let rows = sqlx::query(
        "SELECT kind, key_sha, stamp FROM tombstones \
         WHERE (kind = 'conversation' AND key_sha = ANY($1)) OR (kind = 'user' AND key_sha = ANY($2))",
    )
    .bind(&conversation_shas)
    .bind(&user_shas)
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let kind: String = row.try_get("kind")?;
        let sha: Vec<u8> = row.try_get("key_sha")?;
        let stamp: i64 = row.try_get("stamp")?;
        let kind = if kind == "user" {
            KeyKind::User
        } else {
            KeyKind::Conversation
        };
        if let Some(id) = by_sha.get(&(kind, sha)) {
            let map = match kind {
                KeyKind::User => &mut set.users,
                KeyKind::Conversation => &mut set.conversations,
            };
            map.insert(id.clone(), stamp);
        }
    }
    Ok(set)
}

async fn write_tombstone(
    conn: &mut PgConnection,
    kind: KeyKind,
    key: &str,
    stamp: Stamp,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO tombstones (kind, key_sha, stamp) VALUES ($1, $2, $3) \
         ON CONFLICT (kind, key_sha) DO UPDATE \
         SET stamp = greatest(tombstones.stamp, EXCLUDED.stamp), created_at = now()",
    )
    .bind(kind.as_str())
    .bind(key_sha(key))
    .bind(stamp)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Deletes these conversation rows, given by their key `(user_id, id)`,
/// and their chunk rows; returns how many conversations went and the
/// content hash of every chunk that went (the chunks are deleted first,
/// explicitly, rather than by the cascade, so their hashes come back).
pub(crate) async fn delete_rows(
    conn: &mut PgConnection,
    keys: &[(String, Uuid)],
) -> Result<(u64, Vec<ContentHash>), StoreError> {
    let users: Vec<&str> = keys.iter().map(|(u, _)| u.as_str()).collect();
    let ids: Vec<Uuid> = keys.iter().map(|(_, id)| *id).collect();
    let hashes: Vec<Vec<u8>> = sqlx::query_scalar(
        "DELETE FROM conversation_chunks AS k \
         USING UNNEST($1::text[], $2::uuid[]) AS d(user_id, id) \
         WHERE k.user_id = d.user_id AND k.conversation_id = d.id RETURNING k.content_hash",
    )
    .bind(&users)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let rows = sqlx::query(
        "DELETE FROM conversations AS c USING UNNEST($1::text[], $2::uuid[]) AS d(user_id, id) \
         WHERE c.user_id = d.user_id AND c.id = d.id",
    )
    .bind(&users)
    .bind(&ids)
    .execute(&mut *conn)
    .await?;
    let hashes = hashes
        .into_iter()
        .filter_map(|h| <ContentHash>::try_from(h.as_slice()).ok())
        .collect();
    Ok((rows.rows_affected(), hashes))
}

/// What deleting one conversation removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeletedConversation {
    /// Whether a stored row was removed.
    pub row: bool,
    pub chunks: u64,
}

/// What erasing a user removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErasedUser {
    pub conversations: u64,
    pub chunks: u64,
    /// `embedding_cache` rows of the erased chunks' texts.
    pub cache_entries: u64,
    /// The erased chunks' content hashes, distinct: what the in-memory
    /// cache evicts.
    pub chunk_hashes: Vec<ContentHash>,
}

/// The stored versions and tombstones a batch's changes fold onto.
#[derive(Debug, Clone, Default)]
pub struct FoldBase {
    /// By client id.
    pub versions: HashMap<String, Version>,
    pub tombstones: TombstoneSet,
}

impl Store {
    /// The stored versions of these client ids and the tombstones of these
    /// client ids and users: what the pipeline folds a batch's changes onto.
    pub async fn fold_base(
        &self,
        client_ids: &[&str],
        user_ids: &[&str],
    ) -> Result<FoldBase, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let tombstones = read_tombstones(&mut conn, client_ids, user_ids).await?;
        let mut versions = HashMap::new();
        if !client_ids.is_empty() {
            let rows = sqlx::query(
                "SELECT id, client_id, user_id, channel, summary, transcript, messages, metadata, \
                        created_at, received_at, version_stamp, versions, content_sha, posted_sha \
                 FROM conversations WHERE client_id = ANY($1)",
            )
            .bind(client_ids)
            .fetch_all(&mut *conn)
            .await?;
            for row in rows {
                let version = version_from_row(&row)?;
                if let Some(k) = version.conversation.client_id.clone() {
                    versions.insert(k, version);
                }
            }
        }
        Ok(FoldBase {
            versions,
            tombstones,
        })
    }

    /// The row id, user and message count of the conversation stored
    /// under `client_id`.
    pub async fn stored_owner(
        &self,
        client_id: &str,
    ) -> Result<Option<(Uuid, String, usize)>, StoreError> {
        let row: Option<(Uuid, String, i32)> = sqlx::query_as(
            "SELECT id, user_id, coalesce(jsonb_array_length(messages), 0) \
             FROM conversations WHERE client_id = $1",
        )
        .bind(client_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id, user, n)| (id, user, usize::try_from(n).unwrap_or(0))))
    }

    /// Deletes the conversation stored under `client_id` (or, for a row
    /// written without one, under `row_id`) with its chunks, and leaves a
    /// tombstone stamped `stamp` so that no change acknowledged before it
    /// is ever stored. The tombstone is written when a row was deleted, or
    /// when `known` says the conversation is queued somewhere; otherwise
    /// nothing is written and `Ok(None)` says the id is unknown.
    pub async fn delete_conversation(
        &self,
        client_id: &str,
        row_id: Uuid,
        stamp: Stamp,
        known: bool,
    ) -> Result<Option<DeletedConversation>, StoreError> {
        let mut tx = self.pool.begin().await?;
        lock_keys(
            &mut tx,
            vec![lock_key(KeyKind::Conversation, client_id)],
            false,
        )
        .await?;
        let key: Option<(String, Uuid)> = sqlx::query_as(
            "SELECT user_id, id FROM conversations WHERE client_id = $1 \
             UNION ALL SELECT user_id, id FROM conversations WHERE id = $2 AND client_id IS NULL \
             LIMIT 1",
        )
        .bind(client_id)
        .bind(row_id)
        .fetch_optional(&mut *tx)
        .await?;
        let mut deleted = DeletedConversation::default();
        if let Some(key) = key {
            let (_, hashes) = delete_rows(&mut tx, &[key]).await?;
            deleted = DeletedConversation {
                row: true,
                chunks: hashes.len() as u64,
            };
        } else if !known {
            return Ok(None);
        }
        write_tombstone(&mut tx, KeyKind::Conversation, client_id, stamp).await?;
        tx.commit().await?;
        Ok(Some(deleted))
    }

    /// Erases everything stored of `user_id` up to `stamp` (a conversation
    /// the user posts after the erasure is theirs to keep): its conversations, their
    /// chunks and vectors, and the `embedding_cache` rows of those chunks'
    /// texts. The tombstone (stamped `stamp`) commits first, so no change
    /// of this user acknowledged before it is stored from then on; the rows
    /// then go in batches of [`ERASE_BATCH`] conversations, each its own
    /// short transaction under the user's lock.
    pub async fn erase_user(&self, user_id: &str, stamp: Stamp) -> Result<ErasedUser, StoreError> {
        let user_lock = lock_key(KeyKind::User, user_id);
        {
            let mut tx = self.pool.begin().await?;
            lock_keys(&mut tx, vec![user_lock], false).await?;
            write_tombstone(&mut tx, KeyKind::User, user_id, stamp).await?;
            // The shared intake's dead letters hold the user's text too.
            sqlx::query("DELETE FROM dead_letters WHERE user_id = $1")
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        let mut erased = ErasedUser::default();
        loop {
            let mut tx = self.pool.begin().await?;
            lock_keys(&mut tx, vec![user_lock], false).await?;
            let ids: Vec<Uuid> = sqlx::query_scalar(
                "SELECT id FROM conversations WHERE user_id = $1 AND version_stamp <= $2 \
                 LIMIT $3 FOR UPDATE",
            )
            .bind(user_id)
            .bind(stamp)
            .bind(ERASE_BATCH)
            .fetch_all(&mut *tx)
            .await?;
            if ids.is_empty() {
                break;
            }
            let keys: Vec<(String, Uuid)> = ids
                .into_iter()
                .map(|id| (user_id.to_string(), id))
                .collect();
            let (rows, mut hashes) = delete_rows(&mut tx, &keys).await?;
            erased.conversations += rows;
            erased.chunks += hashes.len() as u64;
            hashes.sort_unstable();
            hashes.dedup();
            // Every model's entry for these texts: the cache is keyed by
            // model and hash, and the text is the personal data.
            let distinct: Vec<&[u8]> = hashes.iter().map(|h| h.as_slice()).collect();
            let cache = sqlx::query("DELETE FROM embedding_cache WHERE content_hash = ANY($1)")
                .bind(&distinct)
                .execute(&mut *tx)
                .await?;
            erased.cache_entries += cache.rows_affected();
            tx.commit().await?;
            erased.chunk_hashes.extend(hashes);
        }
        erased.chunk_hashes.sort_unstable();
        erased.chunk_hashes.dedup();
        Ok(erased)
    }
}

fn sha_of(value: Option<Vec<u8>>) -> Option<ContentHash> {
    value.and_then(|v| <ContentHash>::try_from(v.as_slice()).ok())
}

fn version_from_row(row: &sqlx::postgres::PgRow) -> Result<Version, StoreError> {
    let messages: Option<Json<Vec<Message>>> = row.try_get("messages")?;
    let messages = messages.map(|m| m.0).unwrap_or_default();
    let transcript: String = row.try_get("transcript")?;
    let conversation = Conversation {
        id: row.try_get("id")?,
        client_id: row.try_get("client_id")?,
        user_id: row.try_get("user_id")?,
        channel: row.try_get("channel")?,
        // A row holds its messages, or (sent as a transcript) only the text.
        transcript: messages.is_empty().then_some(transcript),
        messages,
        summary: row.try_get("summary")?,
        metadata: row.try_get("metadata")?,
        created_at: row.try_get("created_at")?,
        received_at: row.try_get("received_at")?,
        received_instant: std::time::Instant::now(),
    };
    // Rows written before versions have no hashes: the content decides.
    let content_sha = sha_of(row.try_get("content_sha")?)
        .unwrap_or_else(|| convstore_core::lifecycle::content_sha(&conversation));
    let posted_sha = sha_of(row.try_get("posted_sha")?).unwrap_or(content_sha);
    Ok(Version {
        conversation,
        stamp: row.try_get("version_stamp")?,
        versions: row.try_get("versions")?,
        content_sha,
        posted_sha,
    })
}
