//! Reading stored conversations back, for `GET /v1/conversations/{id}`,
//! `/v1/stats` and tests.
//!
//! The views are plain serialisable structs: the API returns them as JSON
//! as they are. Vectors are left out (768 floats per chunk help no reader);
//! a chunk's `embedding_status` says whether it has one.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use uuid::Uuid;

use super::{Store, StoreError};
use convstore_core::model::{EmbeddingStatus, Message};

/// A stored conversation with the status of each chunk.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct StoredConversation {
    pub id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub user_id: String,
    pub channel: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// The full text, as embedded.
    pub transcript: String,
    /// The messages as received; absent when the caller sent a transcript.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    pub metadata: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    pub stored_at: DateTime<Utc>,
    pub embedding_status: EmbeddingStatus,
    /// How many changes (the post, replacements, appends) made this
    /// version.
    pub versions: i32,
    /// When the last replacement or append was stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    pub chunks: Vec<StoredChunk>,
}

/// One chunk, without its vector.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct StoredChunk {
    pub seq: i32,
    pub content: String,
    pub model: String,
    pub embedding_status: EmbeddingStatus,
    /// Why a failed chunk failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedded_at: Option<DateTime<Utc>>,
}

/// Row counts: conversations, and chunks by embedding status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StoreCounts {
    pub conversations: u64,
    pub chunks: ChunkCounts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ChunkCounts {
    pub embedded: u64,
    pub pending: u64,
    pub failed: u64,
}

impl ChunkCounts {
    pub fn total(&self) -> u64 {
        self.embedded + self.pending + self.failed
    }
}

macro_rules! select_conversation {
    ($where:literal) => {
        concat!(
            "SELECT id, client_id, user_id, channel, summary, transcript, messages, metadata, \
             created_at, received_at, stored_at, embedding_status, versions, updated_at \
             FROM conversations WHERE ",
            $where
        )
    };
}

impl Store {
    /// How far embedding is behind: what waits for a vector, since when,
    /// and the share of chunks that have one. The pending counts use the
    /// partial indexes on the status; the coverage counts every chunk (one
    /// scan of the chunk table, every `PENDING_EVERY` of the daemon).
    pub async fn embedding_freshness(&self) -> Result<EmbeddingFreshness, StoreError> {
        #[allow(clippy::type_complexity)]
        let (conversations, chunks, total, embedded, failed, oldest): (
            i64,
            i64,
            i64,
            i64,
            i64,
            Option<f64>,
        ) = sqlx::query_as(
            "SELECT \
               (SELECT count(*) FROM conversations WHERE embedding_status = 'pending'), \
               (SELECT count(*) FROM conversation_chunks WHERE embedding_status = 'pending'), \
               c.total, c.embedded, c.failed, \
               (SELECT extract(epoch FROM now() - min(coalesce(updated_at, stored_at)))::float8 \
                  FROM conversations WHERE embedding_status = 'pending') \
             FROM (SELECT count(*) AS total, \
                          count(*) FILTER (WHERE embedding_status = 'embedded') AS embedded, \
                          count(*) FILTER (WHERE embedding_status = 'failed') AS failed \
                   FROM conversation_chunks) c",
        )
        .fetch_one(self.pool())
        .await
        .map_err(StoreError::from)?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(EmbeddingFreshness {
            conversations: count(conversations),
            chunks: count(chunks),
            total_chunks: count(total),
            embedded_chunks: count(embedded),
            failed_chunks: count(failed),
            oldest_pending_age_seconds: oldest.map(|s| s.max(0.0)),
        })
    }

    /// Which of these conversations, given as (row id, client id), are
    /// stored, with the stamp of the stored version (the journal's
    /// start-up replay settles a change the stored version already holds
    /// without applying it again); answered by row id.
    ///
    /// A conversation with a client id is stored when its client id is:
    /// the key, not the row id, which another client id may hold (see
    /// `write`). One without a client id is stored when its row id is.
    pub async fn stored_ids(
        &self,
        conversations: &[(Uuid, Option<&str>)],
    ) -> Result<HashMap<Uuid, i64>, StoreError> {
        let (ids, client_ids): (Vec<Uuid>, Vec<Option<&str>>) =
            conversations.iter().copied().unzip();
        let rows: Vec<(Uuid, Option<i64>)> = sqlx::query_as(
            "SELECT k.id, CASE WHEN k.client_id IS NULL \
               THEN (SELECT c.version_stamp FROM conversations c WHERE c.id = k.id) \
               ELSE (SELECT c.version_stamp FROM conversations c WHERE c.client_id = k.client_id) END \
             FROM UNNEST($1::uuid[], $2::text[]) AS k(id, client_id)",
        )
        .bind(&ids)
        .bind(&client_ids)
        .fetch_all(self.pool())
        .await
        .map_err(StoreError::from)?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, stamp)| stamp.map(|s| (id, s)))
            .collect())
    }

    /// The conversation with this row id, or `None`.
    pub async fn get_conversation(
        &self,
        id: Uuid,
    ) -> Result<Option<StoredConversation>, StoreError> {
        let row = sqlx::query(select_conversation!("id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        self.with_chunks(row).await
    }

    /// The conversation stored under this client id (idempotency key), or
    /// `None`.
    pub async fn get_conversation_by_client_id(
        &self,
        client_id: &str,
    ) -> Result<Option<StoredConversation>, StoreError> {
        let row = sqlx::query(select_conversation!("client_id = $1"))
            .bind(client_id)
            .fetch_optional(&self.pool)
            .await?;
        self.with_chunks(row).await
    }

    /// Exact counts. Each is a scan of its table (PostgreSQL keeps no row
    /// count): fine for tests and an occasional `/v1/stats`, not for a
    /// per-request path on millions of rows.
    pub async fn counts(&self) -> Result<StoreCounts, StoreError> {
        let conversations: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
            .fetch_one(&self.pool)
            .await?;
        let rows = sqlx::query(
            "SELECT embedding_status, count(*) AS n FROM conversation_chunks \
             GROUP BY embedding_status",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut chunks = ChunkCounts::default();
        for row in rows {
            let status: String = row.try_get("embedding_status")?;
            let n = u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0);
            match parse_status(&status)? {
                EmbeddingStatus::Embedded => chunks.embedded = n,
                EmbeddingStatus::Pending => chunks.pending = n,
                EmbeddingStatus::Failed => chunks.failed = n,
            }
        }
        Ok(StoreCounts {
            conversations: u64::try_from(conversations).unwrap_or(0),
            chunks,
        })
    }

    async fn with_chunks(
        &self,
        row: Option<PgRow>,
    ) -> Result<Option<StoredConversation>, StoreError> {
        let Some(row) = row else {
            return Ok(None);
        };
        let mut conversation = conversation_from_row(&row)?;
        let rows = sqlx::query(
            "SELECT seq, content, model, embedding_status, error, embedded_at \
             FROM conversation_chunks WHERE user_id = $1 AND conversation_id = $2 ORDER BY seq",
        )
        .bind(&conversation.user_id)
        .bind(conversation.id)
        .fetch_all(&self.pool)
        .await?;
        conversation.chunks = rows.iter().map(chunk_from_row).collect::<Result<_, _>>()?;
        Ok(Some(conversation))
    }
}

fn conversation_from_row(row: &PgRow) -> Result<StoredConversation, StoreError> {
    let messages: Option<Json<Vec<Message>>> = row.try_get("messages")?;
    let status: String = row.try_get("embedding_status")?;
    Ok(StoredConversation {
        id: row.try_get("id")?,
        client_id: row.try_get("client_id")?,
        user_id: row.try_get("user_id")?,
        channel: row.try_get("channel")?,
        summary: row.try_get("summary")?,
        transcript: row.try_get("transcript")?,
        messages: messages.map(|m| m.0),
        metadata: row.try_get("metadata")?,
        created_at: row.try_get("created_at")?,
        received_at: row.try_get("received_at")?,
        stored_at: row.try_get("stored_at")?,
        embedding_status: parse_status(&status)?,
        versions: row.try_get("versions")?,
        updated_at: row.try_get("updated_at")?,
        chunks: Vec::new(),
    })
}

fn chunk_from_row(row: &PgRow) -> Result<StoredChunk, StoreError> {
    let status: String = row.try_get("embedding_status")?;
    Ok(StoredChunk {
        seq: row.try_get("seq")?,
        content: row.try_get("content")?,
        model: row.try_get("model")?,
        embedding_status: parse_status(&status)?,
        error: row.try_get("error")?,
        embedded_at: row.try_get("embedded_at")?,
    })
}

/// The table's CHECK constraint allows exactly these three.
fn parse_status(text: &str) -> Result<EmbeddingStatus, StoreError> {
    match text {
        "embedded" => Ok(EmbeddingStatus::Embedded),
        "pending" => Ok(EmbeddingStatus::Pending),
        "failed" => Ok(EmbeddingStatus::Failed),
        other => Err(StoreError::Schema(format!(
            "unknown embedding_status `{other}` in the database (written by a newer convstore?)"
        ))),
    }
}

/// What [`Store::embedding_freshness`] found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmbeddingFreshness {
    /// Conversations with a chunk waiting for a vector.
    pub conversations: u64,
    /// Chunks waiting for a vector.
    pub chunks: u64,
    pub total_chunks: u64,
    pub embedded_chunks: u64,
    /// Chunks a backend refused for good (dead letters; `convstore
    /// redrive` puts them back).
    pub failed_chunks: u64,
    /// Since the oldest waiting conversation was stored (or last changed);
    /// `None` when nothing waits.
    pub oldest_pending_age_seconds: Option<f64>,
}

impl EmbeddingFreshness {
    /// Embedded chunks / all chunks (1 with none stored).
    pub fn coverage(&self) -> f64 {
        if self.total_chunks == 0 {
            1.0
        } else {
            self.embedded_chunks as f64 / self.total_chunks as f64
        }
    }
}
