//! The types every stage shares: a validated conversation, its chunks, and
//! what the store receives once the chunks are embedded.

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Who wrote a message: `system`, `user`, `assistant` or `tool`.
// An enum, not the text the client sent: four words need no allocation
// per message, and a queued message is smaller by the string (about 50
// bytes with the allocator's share). Serialised as the lower-case word,
// so the journal, the stored `messages` and the API are as they were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// Every role, in the order error messages list them.
    pub const ALL: [Role; 4] = [Role::System, Role::User, Role::Assistant, Role::Tool];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    /// The role a client's word names, exactly (lower case).
    pub fn from_word(word: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == word)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One message of a conversation, as validated by ingress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Message {
    pub role: Role,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<DateTime<Utc>>,
    /// The caller's id for this message: an append that carries a message
    /// id the conversation already holds does not add it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

/// A conversation that passed validation and was given its id.
///
/// Either `messages` is non-empty, or the caller sent a free-form
/// `transcript` (then `messages` is empty).
#[derive(Debug, Clone)]
pub struct Conversation {
    /// The row id. UUIDv7 when the caller gave no id; derived from the
    /// caller's id otherwise, so a retry maps to the same row.
    pub id: Uuid,
    /// The caller's id (idempotency key), if any.
    pub client_id: Option<String>,
    pub user_id: String,
    pub channel: String,
    pub messages: Vec<Message>,
    pub transcript: Option<String>,
    pub summary: Option<String>,
    /// Always a JSON object.
    pub metadata: serde_json::Value,
    pub created_at: Option<DateTime<Utc>>,
    pub received_at: DateTime<Utc>,
    /// For end-to-end latency (received → committed); monotonic.
    pub received_instant: Instant,
}

impl Conversation {
    /// Bytes this conversation holds in memory: the queue's byte bound.
    ///
    /// Counted from capacities and the real layouts, plus the allocator's
    /// own overhead per allocation, so that `queue.max_bytes` bounds
    /// memory rather than text: counting text alone let 256 MiB of queue
    /// hold 648 MB (issue 15). `tests/memory_bounds.rs` checks the count
    /// against what the allocator hands out.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + heap_messages(&self.messages)
            + self.transcript.as_ref().map_or(0, heap_string)
            + self.summary.as_ref().map_or(0, heap_string)
            + self.client_id.as_ref().map_or(0, heap_string)
            + heap_string(&self.user_id)
            + heap_string(&self.channel)
            + heap_json(&self.metadata)
    }

    /// The whole conversation as one text, one `role: content` line per message.
    pub fn full_text(&self) -> String {
        match &self.transcript {
            Some(t) => t.clone(),
            None => {
                let mut out = String::new();
                for m in &self.messages {
                    out.push_str(m.role.as_str());
                    out.push_str(": ");
                    out.push_str(&m.content);
                    out.push('\n');
                }
                out
            }
        }
    }
}

/// What the allocator adds to each allocation (glibc: an 8-byte header,
/// sizes rounded up to 16).
const ALLOCATION_OVERHEAD: usize = 16;

fn allocation(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else {
        bytes + ALLOCATION_OVERHEAD
    }
}

pub(crate) fn heap_string(s: &String) -> usize {
    allocation(s.capacity())
}

/// Heap bytes under a message list: the array and each message's strings.
pub(crate) fn heap_messages(messages: &Vec<Message>) -> usize {
    allocation(messages.capacity() * std::mem::size_of::<Message>())
        + messages
            .iter()
            .map(|m| heap_string(&m.content) + m.message_id.as_ref().map_or(0, heap_string))
            .sum::<usize>()
}

/// One node of the `BTreeMap<String, Value>` behind a JSON object: 11 keys,
/// 11 values, and (in internal nodes) 12 child pointers, plus bookkeeping.
const JSON_OBJECT_NODE_BYTES: usize = 11
    * (std::mem::size_of::<String>() + std::mem::size_of::<serde_json::Value>())
    + 12 * std::mem::size_of::<usize>()
    + 16;

/// Heap bytes under a JSON value (the value itself lives in its parent).
fn heap_json(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => 0,
        serde_json::Value::String(s) => heap_string(s),
        serde_json::Value::Array(items) => {
            allocation(items.capacity() * std::mem::size_of::<serde_json::Value>())
                + items.iter().map(heap_json).sum::<usize>()
        }
        serde_json::Value::Object(map) => {
            map.len().div_ceil(11) * allocation(JSON_OBJECT_NODE_BYTES)
                + map
                    .iter()
                    .map(|(k, v)| heap_string(k) + heap_json(v))
                    .sum::<usize>()
        }
    }
}

/// sha256 of a chunk's text as sent to the model: the cache key (with the model).
pub type ContentHash = [u8; 32];

pub fn content_hash(text: &str) -> ContentHash {
    content_hash_bytes(text.as_bytes())
}

/// sha256 of `bytes`.
pub fn content_hash_bytes(bytes: &[u8]) -> ContentHash {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(&digest);
    out
}

/// A piece of a conversation small enough for the model's context.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// Position in the conversation, from 0.
    pub seq: i32,
    pub content: String,
    pub content_hash: ContentHash,
}

/// Where a chunk's vector stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EmbeddingStatus {
    Embedded,
    /// Stored without a vector; a backend will embed it later.
    Pending,
    /// A backend rejected it for good; `error` says why. Never retried.
    Failed,
}

impl EmbeddingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Pending => "pending",
            Self::Failed => "failed",
        }
    }
}

/// What the embedding stage made of one chunk. The row's
/// `embedding_status`, `embedding` and `error` all follow from it, so a
/// status that disagrees with its vector cannot be built.
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkVector {
    /// The model's vector (checked finite and of the model's length by the
    /// embedding router, where it entered).
    Embedded(std::sync::Arc<[f32]>),
    /// No backend could embed it in time: stored without a vector, for the
    /// backfill.
    Pending,
    /// A backend refused this input for good; why.
    Failed(String),
}

impl ChunkVector {
    pub fn status(&self) -> EmbeddingStatus {
        match self {
            Self::Embedded(_) => EmbeddingStatus::Embedded,
            Self::Pending => EmbeddingStatus::Pending,
            Self::Failed(_) => EmbeddingStatus::Failed,
        }
    }

    /// The vector, for `Embedded`.
    pub fn vector(&self) -> Option<&[f32]> {
        match self {
            Self::Embedded(v) => Some(v),
            _ => None,
        }
    }

    /// Why it failed, for `Failed`.
    pub fn error(&self) -> Option<&str> {
        match self {
            Self::Failed(reason) => Some(reason),
            _ => None,
        }
    }
}

/// A chunk with what the embedding stage made of it.
#[derive(Debug, Clone)]
pub struct EmbeddedChunk {
    pub chunk: Chunk,
    pub vector: ChunkVector,
}

/// A conversation ready to be written: every chunk has been through embedding.
#[derive(Debug, Clone)]
pub struct ReadyConversation {
    pub conversation: Conversation,
    pub chunks: Vec<EmbeddedChunk>,
    /// The model whose vectors these are.
    pub model: String,
    /// Which version of the conversation this is (`crate::lifecycle`).
    pub version: RowVersion,
}

/// The version bookkeeping of a row to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowVersion {
    /// Stamp of the last change folded into it (0: unstamped).
    pub stamp: i64,
    /// How many changes made it.
    pub versions: i32,
    /// Of the content; computed by the store when absent.
    pub content_sha: Option<ContentHash>,
    /// Of the last post's content; the content's when absent.
    pub posted_sha: Option<ContentHash>,
    /// The stamp of the stored version this one replaces; `None`: the
    /// conversation is not stored yet (a new row).
    pub replaces: Option<i64>,
}

impl Default for RowVersion {
    fn default() -> Self {
        Self {
            stamp: 0,
            versions: 1,
            content_sha: None,
            posted_sha: None,
            replaces: None,
        }
    }
}

impl ReadyConversation {
    /// The conversation-level status: the worst of its chunks'.
    pub fn embedding_status(&self) -> EmbeddingStatus {
        if self.chunks.iter().any(|c| c.vector == ChunkVector::Pending) {
            EmbeddingStatus::Pending
        } else if self
            .chunks
            .iter()
            .any(|c| matches!(c.vector, ChunkVector::Failed(_)))
        {
            EmbeddingStatus::Failed
        } else {
            EmbeddingStatus::Embedded
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A role travels as the client's own word (journal, stored
    /// `messages`, API) and only the exact lower-case word names it.
    #[test]
    fn a_role_is_its_word() {
        for role in Role::ALL {
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{}\"", role.as_str()));
            assert_eq!(serde_json::from_str::<Role>(&json).unwrap(), role);
            assert_eq!(Role::from_word(role.as_str()), Some(role));
            assert_eq!(role.to_string(), role.as_str());
        }
        for word in ["User", "USER", " user", "wizard", ""] {
            assert_eq!(Role::from_word(word), None, "{word:?}");
        }
        assert!(serde_json::from_str::<Role>("\"wizard\"").is_err());
    }
}
