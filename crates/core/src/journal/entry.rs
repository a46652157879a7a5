//! What one journal record holds: an accepted conversation, exactly as it
//! will be stored (its row id included, so a replay writes the same row).
//!
//! JSON, with a version field: readable with standard tools when an
//! operator has to look inside a segment, and tolerant of fields added
//! later. Encoding a conversation costs microseconds, small next to the
//! write itself.

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::{Conversation, Message};

/// The payload format written by this version.
const VERSION: u32 = 1;

/// Written: borrows from the conversation.
#[derive(Serialize)]
struct EntryRef<'a> {
    v: u32,
    id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    user_id: &'a str,
    channel: &'a str,
    #[serde(skip_serializing_if = "<[Message]>::is_empty")]
    messages: &'a [Message],
    #[serde(skip_serializing_if = "Option::is_none")]
    transcript: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<&'a str>,
    metadata: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
}

/// Read back: owns its fields. Unknown fields are ignored (a later version
/// may add some that this one does not need).
#[derive(Deserialize)]
struct EntryOwned {
    id: Uuid,
    #[serde(default)]
    client_id: Option<String>,
    user_id: String,
    channel: String,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    transcript: Option<String>,
    #[serde(default)]
    summary: Option<String>,
    metadata: serde_json::Value,
    #[serde(default)]
    created_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
}

/// Why a verified record's payload is not a conversation.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not a journal entry: {0}")]
    Json(#[from] serde_json::Error),
    #[error("journal entry version {0} is newer than this convstore understands")]
    Version(u32),
}

/// The payload for `conversation`.
pub fn encode(conversation: &Conversation) -> Vec<u8> {
    let entry = EntryRef {
        v: VERSION,
        id: conversation.id,
        client_id: conversation.client_id.as_deref(),
        user_id: &conversation.user_id,
        channel: &conversation.channel,
        messages: &conversation.messages,
        transcript: conversation.transcript.as_deref(),
        summary: conversation.summary.as_deref(),
        metadata: &conversation.metadata,
        created_at: conversation.created_at,
        received_at: conversation.received_at,
    };
    // Serialising plain strings, numbers and a JSON value cannot fail.
    serde_json::to_vec(&entry).unwrap_or_default()
}

/// The conversation in `payload`. `received_instant` is now: the time it
/// spent in the journal before a restart is not pipeline latency.
pub fn decode(payload: &[u8]) -> Result<Conversation, DecodeError> {
    // The version first: a newer layout must be refused as newer, not
    // reported as a malformed entry.
    #[derive(Deserialize)]
    struct VersionOnly {
        v: u32,
    }
    let version: VersionOnly = serde_json::from_slice(payload)?;
    if version.v != VERSION {
        return Err(DecodeError::Version(version.v));
    }
    let entry: EntryOwned = serde_json::from_slice(payload)?;
    Ok(Conversation {
        id: entry.id,
        client_id: entry.client_id,
        user_id: entry.user_id,
        channel: entry.channel,
        messages: entry.messages,
        transcript: entry.transcript,
        summary: entry.summary,
        metadata: entry.metadata,
        created_at: entry.created_at,
        received_at: entry.received_at,
        received_instant: Instant::now(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Conversations as validation produces them: any text without NUL,
    /// timestamps to the microsecond (what PostgreSQL keeps).
    pub(crate) fn arb_conversation() -> impl Strategy<Value = Conversation> {
        let text = "[^\u{0}]{1,40}";
        let ts = (0i64..4_000_000_000_000_000).prop_map(|us| {
            DateTime::<Utc>::from_timestamp_micros(us).unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
        });
        let message = (
            prop_oneof![
                Just("user"),
                Just("assistant"),
                Just("system"),
                Just("tool")
            ],
            text,
            proptest::option::of(ts.clone()),
        )
            .prop_map(|(role, content, ts)| Message {
                role: role.to_string(),
                content,
                ts,
            });
        let metadata = proptest::collection::btree_map("[a-z]{1,5}", "[^\u{0}]{0,10}", 0..4)
            .prop_map(|m| serde_json::json!(m));
        (
            any::<u128>(),
            proptest::option::of("[^\u{0}]{1,20}"),
            text,
            text,
            prop_oneof![
                proptest::collection::vec(message, 1..5).prop_map(|m| (m, None)),
                text.prop_map(|t| (Vec::new(), Some(t))),
            ],
            proptest::option::of(text),
            metadata,
            proptest::option::of(ts.clone()),
            ts,
        )
            .prop_map(
                |(
                    id,
                    client_id,
                    user_id,
                    channel,
                    (messages, transcript),
                    summary,
                    metadata,
                    created_at,
                    received_at,
                )| {
                    Conversation {
                        id: Uuid::from_u128(id),
                        client_id,
                        user_id,
                        channel,
                        messages,
                        transcript,
                        summary,
                        metadata,
                        created_at,
                        received_at,
                        received_instant: Instant::now(),
                    }
                },
            )
    }

    pub(crate) fn same(a: &Conversation, b: &Conversation) -> bool {
        a.id == b.id
            && a.client_id == b.client_id
            && a.user_id == b.user_id
            && a.channel == b.channel
            && a.messages == b.messages
            && a.transcript == b.transcript
            && a.summary == b.summary
            && a.metadata == b.metadata
            && a.created_at == b.created_at
            && a.received_at == b.received_at
    }

    proptest! {
        #[test]
        fn conversation_round_trips(c in arb_conversation()) {
            let payload = encode(&c);
            // The scanner's resynchronisation relies on this.
            prop_assert!(!payload.contains(&0xFF));
            let back = decode(&payload).unwrap();
            prop_assert!(same(&c, &back), "{c:?} != {back:?}");
        }
    }

    #[test]
    fn newer_version_is_refused_not_misread() {
        let c = parse_one();
        let mut value: serde_json::Value = serde_json::from_slice(&encode(&c)).unwrap();
        value["v"] = 2.into();
        let err = decode(&serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert!(matches!(err, DecodeError::Version(2)));
    }

    fn parse_one() -> Conversation {
        Conversation {
            id: Uuid::from_u128(1),
            client_id: Some("c-1".into()),
            user_id: "u".into(),
            channel: "web".into(),
            messages: vec![Message {
                role: "user".into(),
                content: "hi".into(),
                ts: None,
            }],
            transcript: None,
            summary: None,
            metadata: serde_json::json!({}),
            created_at: None,
            received_at: Utc::now(),
            received_instant: Instant::now(),
        }
    }
}
