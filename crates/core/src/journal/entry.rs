//! What one journal record holds: an accepted change (a conversation
//! posted, or turns appended to one), exactly as it will be applied (its
//! row id and acknowledgement stamp included, so a replay writes the same
//! row and applies the change once).
//!
//! JSON, with a version field: readable with standard tools when an
//! operator has to look inside a segment, and tolerant of fields added
//! later. Version 1 (before issue 16) held posts only, without a stamp;
//! such records are still read, stamped with their arrival time.

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::lifecycle::{Append, Change, Stamp, StampedChange};
use crate::model::{Conversation, Message};

/// The payload format written by this version.
const VERSION: u32 = 2;
/// The oldest format still read.
const OLDEST_READ: u32 = 1;

/// Written: borrows from the change.
#[derive(Serialize)]
struct EntryRef<'a> {
    v: u32,
    /// `post` or `append`.
    kind: &'static str,
    stamp: Stamp,
    id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<&'a str>,
    user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "<[Message]>::is_empty")]
    messages: &'a [Message],
    #[serde(skip_serializing_if = "Option::is_none")]
    transcript: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    created_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
}

/// Read back: owns its fields. Unknown fields are ignored (a later version
/// may add some that this one does not need).
#[derive(Deserialize)]
struct EntryOwned {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    stamp: Option<Stamp>,
    id: Uuid,
    #[serde(default)]
    client_id: Option<String>,
    user_id: String,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    transcript: Option<String>,
    #[serde(default)]
    summary: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    #[serde(default)]
    created_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
}

/// Why a verified record's payload is not a change.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not a journal entry: {0}")]
    Json(#[from] serde_json::Error),
    #[error("journal entry version {0} is newer than this convstore understands")]
    Version(u32),
    #[error("journal entry is not complete: {0}")]
    Incomplete(&'static str),
}

/// The payload for `change`.
pub fn encode(change: &StampedChange) -> Vec<u8> {
    let entry = match &change.change {
        Change::Post(c) => EntryRef {
            v: VERSION,
            kind: "post",
            stamp: change.stamp,
            id: c.id,
            client_id: c.client_id.as_deref(),
            user_id: &c.user_id,
            channel: Some(&c.channel),
            messages: &c.messages,
            transcript: c.transcript.as_deref(),
            summary: c.summary.as_deref(),
            metadata: Some(&c.metadata),
            created_at: c.created_at,
            received_at: c.received_at,
        },
        Change::Append(a) => EntryRef {
            v: VERSION,
            kind: "append",
            stamp: change.stamp,
            id: a.id,
            client_id: Some(&a.client_id),
            user_id: &a.user_id,
            channel: None,
            messages: &a.messages,
            transcript: None,
            summary: None,
            metadata: None,
            created_at: None,
            received_at: a.received_at,
        },
    };
    // Serialising plain strings, numbers and a JSON value cannot fail.
    serde_json::to_vec(&entry).unwrap_or_default()
}

/// The change in `payload`. `received_instant` is now: the time it spent
/// in the journal before a restart is not pipeline latency.
pub fn decode(payload: &[u8]) -> Result<StampedChange, DecodeError> {
    // The version first: a newer layout must be refused as newer, not
    // reported as a malformed entry.
    #[derive(Deserialize)]
    struct VersionOnly {
        v: u32,
    }
    let version: VersionOnly = serde_json::from_slice(payload)?;
    if !(OLDEST_READ..=VERSION).contains(&version.v) {
        return Err(DecodeError::Version(version.v));
    }
    let entry: EntryOwned = serde_json::from_slice(payload)?;
    let stamp = entry
        .stamp
        .unwrap_or_else(|| entry.received_at.timestamp_micros());
    let change = match entry.kind.as_deref() {
        None | Some("post") => Change::Post(Conversation {
            id: entry.id,
            client_id: entry.client_id,
            user_id: entry.user_id,
            channel: entry
                .channel
                .ok_or(DecodeError::Incomplete("a post without channel"))?,
            messages: entry.messages,
            transcript: entry.transcript,
            summary: entry.summary,
            metadata: entry
                .metadata
                .ok_or(DecodeError::Incomplete("a post without metadata"))?,
            created_at: entry.created_at,
            received_at: entry.received_at,
            received_instant: Instant::now(),
        }),
        Some("append") => Change::Append(Append {
            id: entry.id,
            client_id: entry
                .client_id
                .ok_or(DecodeError::Incomplete("an append without client_id"))?,
            user_id: entry.user_id,
            messages: entry.messages,
            received_at: entry.received_at,
            received_instant: Instant::now(),
        }),
        Some(_) => return Err(DecodeError::Incomplete("an unknown kind of change")),
    };
    Ok(StampedChange { stamp, change })
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
            proptest::sample::select(crate::model::Role::ALL.to_vec()),
            text,
            proptest::option::of(ts.clone()),
        )
            .prop_map(|(role, content, ts)| Message {
                role,
                content,
                ts,
                message_id: None,
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

    pub(crate) fn post(c: &Conversation, stamp: Stamp) -> StampedChange {
        StampedChange {
            stamp,
            change: Change::Post(c.clone()),
        }
    }

    pub(crate) fn posted(change: &StampedChange) -> &Conversation {
        match &change.change {
            Change::Post(c) => c,
            Change::Append(_) => panic!("not a post: {change:?}"),
        }
    }

    proptest! {
        #[test]
        fn post_round_trips(c in arb_conversation(), stamp in any::<i64>()) {
            let payload = encode(&post(&c, stamp));
            // The scanner's resynchronisation relies on this.
            prop_assert!(!payload.contains(&0xFF));
            let back = decode(&payload).unwrap();
            prop_assert_eq!(back.stamp, stamp);
            prop_assert!(same(&c, posted(&back)), "{c:?} != {back:?}");
        }

        #[test]
        fn append_round_trips(c in arb_conversation(), stamp in any::<i64>()) {
            let append = Append {
                id: c.id,
                client_id: c.client_id.clone().unwrap_or_else(|| "k".into()),
                user_id: c.user_id.clone(),
                messages: c.messages.clone(),
                received_at: c.received_at,
                received_instant: Instant::now(),
            };
            let change = StampedChange { stamp, change: Change::Append(append.clone()) };
            let payload = encode(&change);
            prop_assert!(!payload.contains(&0xFF));
            let back = decode(&payload).unwrap();
            prop_assert_eq!(back.stamp, stamp);
            let Change::Append(a) = back.change else { panic!("not an append") };
            prop_assert_eq!(
                (a.id, a.client_id, a.user_id, a.messages, a.received_at),
                (append.id, append.client_id, append.user_id, append.messages, append.received_at)
            );
        }
    }

    #[test]
    fn newer_version_is_refused_not_misread() {
        let c = parse_one();
        let mut value: serde_json::Value = serde_json::from_slice(&encode(&post(&c, 1))).unwrap();
        value["v"] = 3.into();
        let err = decode(&serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert!(matches!(err, DecodeError::Version(3)));
    }

    #[test]
    fn version_1_records_are_posts_stamped_by_arrival() {
        let payload = br#"{"v":1,"id":"00000000-0000-0000-0000-000000000001","client_id":"c-1","user_id":"u","channel":"web","messages":[{"role":"user","content":"hi"}],"metadata":{},"received_at":"2024-05-01T10:00:00.000001Z"}"#;
        let back = decode(payload).unwrap();
        assert_eq!(back.stamp, 1_714_557_600_000_001);
        assert_eq!(posted(&back).client_id.as_deref(), Some("c-1"));
    }

    fn parse_one() -> Conversation {
        Conversation {
            id: Uuid::from_u128(1),
            client_id: Some("c-1".into()),
            user_id: "u".into(),
            channel: "web".into(),
            messages: vec![Message {
                role: crate::model::Role::User,
                content: "hi".into(),
                ts: None,
                message_id: None,
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
