//! What clients do to a conversation after posting it, and what a run of
//! such changes makes of the stored version (docs/LIFECYCLE.md).
//!
//! Every change is **stamped** when it is acknowledged (microseconds since
//! the epoch, strictly increasing per instance: the daemon's `stamp`
//! clock). [`fold`] is a pure function from the stored version, the
//! tombstones and the changes (in acknowledgement order) to the version to
//! store, with what each change came to. The pipeline, the journal replay
//! and the property test all use this one function, so what a sequence of
//! posts, appends, deletes and erasures leaves behind is decided in one
//! place:
//!
//! - a **post** whose content equals the stored content, or the content of
//!   the last post before later appends, is a retry and changes nothing;
//!   one stamped no later than the stored version is superseded (a later
//!   change is already there); any other post replaces the version whole;
//! - an **append** adds its messages at the end, skipping any whose
//!   `message_id` the conversation already holds; one stamped no later
//!   than the stored version was already applied (a journal replay);
//!   one with no conversation under it (deleted, erased, or refused) is
//!   discarded;
//! - a change stamped no later than a **tombstone** of its conversation or
//!   its user is discarded: what was deleted does not come back.

use std::collections::HashSet;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::model::{ContentHash, Conversation, Message};

/// When a change was acknowledged: microseconds since the Unix epoch, made
/// strictly increasing per instance.
pub type Stamp = i64;

/// Turns appended to a conversation by `POST /v1/conversations/{id}/messages`.
#[derive(Debug, Clone)]
pub struct Append {
    /// The row id of the conversation (from its client id).
    pub id: Uuid,
    pub client_id: String,
    /// The conversation's user when the append was accepted: an erasure of
    /// that user discards the append.
    pub user_id: String,
    pub messages: Vec<Message>,
    pub received_at: DateTime<Utc>,
    /// For end-to-end latency; monotonic.
    pub received_instant: Instant,
}

/// One change a client made, as the queue and the journal carry it.
#[derive(Debug, Clone)]
pub enum Change {
    /// A whole conversation: the first version, a retry, or a replacement.
    Post(Conversation),
    /// Turns added at the end.
    Append(Append),
}

impl Change {
    /// The row id the change is for.
    pub fn row_id(&self) -> Uuid {
        match self {
            Self::Post(c) => c.id,
            Self::Append(a) => a.id,
        }
    }

    /// The client id, when the caller gave one (an append always has one).
    pub fn client_id(&self) -> Option<&str> {
        match self {
            Self::Post(c) => c.client_id.as_deref(),
            Self::Append(a) => Some(&a.client_id),
        }
    }

    pub fn user_id(&self) -> &str {
        match self {
            Self::Post(c) => &c.user_id,
            Self::Append(a) => &a.user_id,
        }
    }

    /// The key a conversation's changes are ordered, folded and deleted
    /// by: its client id, else (a conversation stored without one) its row
    /// id.
    pub fn key(&self) -> String {
        self.client_id()
            .map_or_else(|| self.row_id().to_string(), str::to_string)
    }

    pub fn received_instant(&self) -> Instant {
        match self {
            Self::Post(c) => c.received_instant,
            Self::Append(a) => a.received_instant,
        }
    }

    /// Bytes the change holds in memory: the queue's byte bound.
    pub fn approx_bytes(&self) -> usize {
        match self {
            Self::Post(c) => c.approx_bytes(),
            Self::Append(a) => {
                std::mem::size_of::<Append>()
                    + crate::model::heap_messages(&a.messages)
                    + crate::model::heap_string(&a.client_id)
                    + crate::model::heap_string(&a.user_id)
            }
        }
    }
}

/// A change with its stamp.
#[derive(Debug, Clone)]
pub struct StampedChange {
    pub stamp: Stamp,
    pub change: Change,
}

/// sha256 of what a post carries (everything but ids and arrival times), in
/// a canonical form: the same content posted twice has the same hash, and
/// a stored version read back hashes as it did when posted.
pub fn content_sha(c: &Conversation) -> ContentHash {
    #[derive(Serialize)]
    struct Content<'a> {
        user_id: &'a str,
        channel: &'a str,
        messages: &'a [Message],
        transcript: Option<&'a str>,
        summary: Option<&'a str>,
        /// serde_json's map is ordered by key: canonical.
        metadata: &'a serde_json::Value,
        created_at: Option<DateTime<Utc>>,
    }
    let content = Content {
        user_id: &c.user_id,
        channel: &c.channel,
        messages: &c.messages,
        transcript: c.transcript.as_deref(),
        summary: c.summary.as_deref(),
        metadata: &c.metadata,
        created_at: c.created_at,
    };
    // Plain strings, timestamps and a JSON value always serialise.
    let bytes = serde_json::to_vec(&content).unwrap_or_default();
    crate::model::content_hash_bytes(&bytes)
}

/// A conversation as stored, with its version bookkeeping.
#[derive(Debug, Clone)]
pub struct Version {
    pub conversation: Conversation,
    /// Stamp of the last change applied (0: written before stamps).
    pub stamp: Stamp,
    /// How many changes made it (1: as first posted).
    pub versions: i32,
    pub content_sha: ContentHash,
    /// Content hash of the last post, before any later appends.
    pub posted_sha: ContentHash,
}

impl Version {
    /// The version a first post makes.
    pub fn posted(conversation: Conversation, stamp: Stamp) -> Self {
        let sha = content_sha(&conversation);
        Self {
            conversation,
            stamp,
            versions: 1,
            content_sha: sha,
            posted_sha: sha,
        }
    }
}

/// Why a change was dropped instead of applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// Stamped no later than a delete of its conversation or an erasure
    /// of its user.
    Deleted,
    /// An append with no conversation under it: deleted, erased, or its
    /// post was refused.
    NoConversation,
}

impl Discard {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deleted => "deleted",
            Self::NoConversation => "no_conversation",
        }
    }
}

/// What one change came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The first version.
    Created,
    /// A post replaced the version.
    Replaced,
    /// An append added this many messages (0: all were already there).
    Appended(usize),
    /// A retry of content already stored: nothing changed.
    Unchanged,
    /// Stamped no later than the stored version: a later change (or this
    /// one, replayed) is already there.
    Superseded,
    Discarded(Discard),
}

impl Applied {
    /// Whether the change is in the stored version (or was made moot by a
    /// later one): what `?wait=stored` answers 201 for.
    pub fn is_stored(self) -> bool {
        !matches!(self, Self::Discarded(_))
    }
}

/// The latest delete of a conversation and erasures of users, as stamps.
pub trait Tombstones {
    /// The stamp of the latest delete of this conversation, if any.
    fn conversation(&self, client_id: &str) -> Option<Stamp>;
    /// The stamp of the latest erasure of this user, if any.
    fn user(&self, user_id: &str) -> Option<Stamp>;
}

/// No tombstones at all.
pub struct NoTombstones;

impl Tombstones for NoTombstones {
    fn conversation(&self, _: &str) -> Option<Stamp> {
        None
    }
    fn user(&self, _: &str) -> Option<Stamp> {
        None
    }
}

/// What [`fold`] made of a run of changes.
#[derive(Debug, Clone)]
pub struct Folded {
    /// The version to store; `None`: no conversation (never stored, or
    /// every change was discarded).
    pub version: Option<Version>,
    /// Whether `version` differs from the stored one (a write is needed).
    pub changed: bool,
    /// The stored version is gone and nothing replaces it: a delete or
    /// erasure found a version of these changes current (say, an erased
    /// user's replacement of another user's version), so the stored row
    /// must go.
    pub delete_stored: bool,
    /// Per change, in order.
    pub applied: Vec<Applied>,
}

/// Whether a change stamped `stamp` was acknowledged before a delete of its
/// conversation or an erasure of its user.
fn acknowledged_before_a_tombstone(t: &dyn Tombstones, change: &StampedChange) -> bool {
    change
        .change
        .client_id()
        .and_then(|k| t.conversation(k))
        .into_iter()
        .chain(t.user(change.change.user_id()))
        .any(|deleted| change.stamp <= deleted)
}

/// Whether a delete or erasure stamped in `[version.stamp, until)` found
/// `version` current, and so deleted it.
fn deleted_before(t: &dyn Tombstones, version: &Version, until: Option<Stamp>) -> bool {
    version
        .conversation
        .client_id
        .as_deref()
        .and_then(|k| t.conversation(k))
        .into_iter()
        .chain(t.user(&version.conversation.user_id))
        .any(|deleted| version.stamp <= deleted && until.is_none_or(|u| deleted < u))
}

/// Applies `changes` (one conversation's, in acknowledgement order) to the
/// `stored` version, as if each change, delete and erasure had happened
/// one after the other at its stamp: a version is gone from the moment a
/// delete of its conversation or an erasure of *its* user is stamped while
/// it is current, whether it is the stored version (an erasure deletes rows
/// in batches after its tombstone commits) or one made by these changes.
/// Only the latest tombstone of each key is known; it deletes whatever was
/// current when it was stamped, which is all the final state needs.
pub fn fold(
    stored: Option<Version>,
    tombstones: &dyn Tombstones,
    changes: &[&StampedChange],
) -> Folded {
    let stored_stamp = stored.as_ref().map(|v| v.stamp);
    let had_stored = stored.is_some();
    let mut state = stored;
    let mut applied = Vec::with_capacity(changes.len());
    for sc in changes {
        let stamp = sc.stamp;
        state = state.filter(|v| !deleted_before(tombstones, v, Some(stamp)));
        let outcome = match (&sc.change, state.as_mut()) {
            (Change::Post(c), None) => {
                state = Some(Version::posted(c.clone(), stamp));
                Applied::Created
            }
            (Change::Post(c), Some(v)) => {
                let sha = content_sha(c);
                if sha == v.content_sha || sha == v.posted_sha {
                    Applied::Unchanged
                } else if stamp <= v.stamp {
                    Applied::Superseded
                } else {
                    let row_id = v.conversation.id;
                    let versions = v.versions.saturating_add(1);
                    *v = Version::posted(c.clone(), stamp);
                    // The row keeps its id (a relocated row's id is not the
                    // hash of its client id).
                    v.conversation.id = row_id;
                    v.versions = versions;
                    Applied::Replaced
                }
            }
            (Change::Append(_), None) => Applied::Discarded(Discard::NoConversation),
            (Change::Append(a), Some(v)) => {
                if stamp <= v.stamp {
                    Applied::Superseded
                } else {
                    let added = append_messages(&mut v.conversation, &a.messages);
                    if added > 0 {
                        v.versions = v.versions.saturating_add(1);
                        v.content_sha = content_sha(&v.conversation);
                        v.stamp = stamp;
                    }
                    Applied::Appended(added)
                }
            }
        };
        // What a later tombstone deletes was still applied in order (it
        // decides what the state was when the tombstone came), but it is
        // not stored: its caller hears it was discarded.
        applied.push(if acknowledged_before_a_tombstone(tombstones, sc) {
            Applied::Discarded(Discard::Deleted)
        } else {
            outcome
        });
    }
    state = state.filter(|v| !deleted_before(tombstones, v, None));
    // Only retries, replays and appends of messages already there: the
    // stored version stands, nothing to write.
    let changed = state.as_ref().map(|v| v.stamp) != stored_stamp && state.is_some();
    Folded {
        delete_stored: had_stored && state.is_none(),
        version: state,
        changed,
        applied,
    }
}

/// Of these queued changes, the keys of the conversations an erasure of
/// `user_id` stamped `stamp` deletes: those whose last change stamped
/// before it was that user's (a post by them, or an append to a
/// conversation that was theirs). Every change of such a conversation
/// stamped before the erasure is moot, whoever made it: a version another
/// user posted earlier was replaced by the erased user's. A conversation
/// whose last change was someone else's is not the erased user's any more;
/// their earlier changes are discarded by the tombstone when folded.
pub fn erased_conversations<'a>(
    queued: impl IntoIterator<Item = &'a StampedChange>,
    user_id: &str,
    stamp: Stamp,
) -> HashSet<String> {
    let mut last_user: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
    for change in queued {
        if change.stamp <= stamp {
            last_user.insert(change.change.key(), change.change.user_id());
        }
    }
    last_user
        .into_iter()
        .filter(|(_, user)| *user == user_id)
        .map(|(key, _)| key)
        .collect()
}

/// Adds `messages` at the end of `c`, skipping those whose message id `c`
/// (or an earlier one of `messages`) already holds; returns how many were
/// added. A conversation stored as a transcript gets them as
/// `role: content` lines.
fn append_messages(c: &mut Conversation, messages: &[Message]) -> usize {
    let mut ids: HashSet<String> = c
        .messages
        .iter()
        .filter_map(|m| m.message_id.clone())
        .collect();
    let fresh: Vec<&Message> = messages
        .iter()
        .filter(|m| {
            m.message_id
                .as_ref()
                .is_none_or(|id| ids.insert(id.clone()))
        })
        .collect();
    match &mut c.transcript {
        Some(transcript) => {
            for m in &fresh {
                if !transcript.is_empty() && !transcript.ends_with('\n') {
                    transcript.push('\n');
                }
                transcript.push_str(m.role.as_str());
                transcript.push_str(": ");
                transcript.push_str(&m.content);
                transcript.push('\n');
            }
        }
        None => c.messages.extend(fresh.iter().map(|m| (*m).clone())),
    }
    fresh.len()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::Role;

    fn message(content: &str, id: Option<&str>) -> Message {
        Message {
            role: Role::User,
            content: content.into(),
            ts: None,
            message_id: id.map(str::to_string),
        }
    }

    fn post(stamp: Stamp, user: &str, contents: &[&str]) -> StampedChange {
        StampedChange {
            stamp,
            change: Change::Post(Conversation {
                id: Uuid::from_u128(1),
                client_id: Some("c1".into()),
                user_id: user.into(),
                channel: "web".into(),
                messages: contents.iter().map(|c| message(c, None)).collect(),
                transcript: None,
                summary: None,
                metadata: serde_json::json!({"k": 1}),
                created_at: None,
                received_at: Utc::now(),
                received_instant: Instant::now(),
            }),
        }
    }

    fn append(stamp: Stamp, user: &str, messages: Vec<Message>) -> StampedChange {
        StampedChange {
            stamp,
            change: Change::Append(Append {
                id: Uuid::from_u128(1),
                client_id: "c1".into(),
                user_id: user.into(),
                messages,
                received_at: Utc::now(),
                received_instant: Instant::now(),
            }),
        }
    }

    fn contents(f: &Folded) -> Vec<String> {
        f.version
            .as_ref()
            .map(|v| {
                v.conversation
                    .messages
                    .iter()
                    .map(|m| m.content.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    struct Stones(HashMap<String, Stamp>, HashMap<String, Stamp>);
    impl Tombstones for Stones {
        fn conversation(&self, k: &str) -> Option<Stamp> {
            self.0.get(k).copied()
        }
        fn user(&self, u: &str) -> Option<Stamp> {
            self.1.get(u).copied()
        }
    }

    #[test]
    fn a_post_then_appends_in_order() {
        let changes = [
            post(10, "u", &["a"]),
            append(11, "u", vec![message("b", None)]),
            append(12, "u", vec![message("c", None)]),
        ];
        let refs: Vec<&StampedChange> = changes.iter().collect();
        let f = fold(None, &NoTombstones, &refs);
        assert_eq!(contents(&f), ["a", "b", "c"]);
        assert!(f.changed);
        assert_eq!(
            f.applied,
            [Applied::Created, Applied::Appended(1), Applied::Appended(1)]
        );
        let v = f.version.unwrap();
        assert_eq!((v.stamp, v.versions), (12, 3));
        assert_eq!(v.content_sha, content_sha(&v.conversation));
        assert_ne!(v.content_sha, v.posted_sha);
    }

    #[test]
    fn a_retry_changes_nothing_even_after_appends() {
        let first = fold(None, &NoTombstones, &[&post(10, "u", &["a"])]);
        let grown = fold(
            first.version,
            &NoTombstones,
            &[&append(11, "u", vec![message("b", None)])],
        );
        let retry = fold(
            grown.version.clone(),
            &NoTombstones,
            &[&post(12, "u", &["a"])],
        );
        assert_eq!(retry.applied, [Applied::Unchanged]);
        assert!(!retry.changed);
        assert_eq!(contents(&retry), ["a", "b"]);
        // Different content replaces, keeping the row id.
        let edited = fold(grown.version, &NoTombstones, &[&post(13, "u", &["A"])]);
        assert_eq!(edited.applied, [Applied::Replaced]);
        assert_eq!(contents(&edited), ["A"]);
        assert_eq!(edited.version.unwrap().versions, 3);
    }

    #[test]
    fn message_ids_are_not_added_twice() {
        let base = fold(None, &NoTombstones, &[&post(1, "u", &["a"])]).version;
        let f = fold(
            base,
            &NoTombstones,
            &[
                &append(
                    2,
                    "u",
                    vec![message("b", Some("m1")), message("b", Some("m1"))],
                ),
                &append(
                    3,
                    "u",
                    vec![message("b", Some("m1")), message("c", Some("m2"))],
                ),
            ],
        );
        assert_eq!(contents(&f), ["a", "b", "c"]);
        assert_eq!(f.applied, [Applied::Appended(1), Applied::Appended(1)]);
    }

    #[test]
    fn replays_and_late_changes_do_not_apply_twice() {
        let stored = fold(
            None,
            &NoTombstones,
            &[
                &post(10, "u", &["a"]),
                &append(20, "u", vec![message("b", None)]),
            ],
        )
        .version;
        // The journal replays the append after it was stored.
        let again = fold(
            stored.clone(),
            &NoTombstones,
            &[&append(20, "u", vec![message("b", None)])],
        );
        assert_eq!(again.applied, [Applied::Superseded]);
        assert!(!again.changed);
        // A post stamped before the stored version does not roll it back.
        let late = fold(stored, &NoTombstones, &[&post(15, "u", &["z"])]);
        assert_eq!(late.applied, [Applied::Superseded]);
        assert_eq!(contents(&late), ["a", "b"]);
    }

    #[test]
    fn tombstones_discard_what_was_acknowledged_before_them() {
        let stones = Stones(
            HashMap::from([("c1".to_string(), 15)]),
            HashMap::from([("gone".to_string(), 30)]),
        );
        let f = fold(
            None,
            &stones,
            &[
                &post(10, "u", &["a"]),
                &append(12, "u", vec![message("b", None)]),
                &post(16, "u", &["fresh"]),
                &append(17, "u", vec![message("more", None)]),
            ],
        );
        assert_eq!(
            f.applied,
            [
                Applied::Discarded(Discard::Deleted),
                Applied::Discarded(Discard::Deleted),
                Applied::Created,
                Applied::Appended(1)
            ]
        );
        assert_eq!(contents(&f), ["fresh", "more"]);
        // An erased user's stored version is gone, and appends to it too.
        let stored = fold(None, &NoTombstones, &[&post(20, "gone", &["secret"])]).version;
        let f = fold(
            stored,
            &stones,
            &[&append(40, "gone", vec![message("x", None)])],
        );
        assert_eq!(f.applied, [Applied::Discarded(Discard::NoConversation)]);
        assert!(f.version.is_none());
    }

    #[test]
    fn appends_to_a_transcript_become_lines() {
        let mut c = match post(1, "u", &["a"]).change {
            Change::Post(c) => c,
            Change::Append(_) => unreachable!(),
        };
        c.messages.clear();
        c.transcript = Some("user: a".into());
        let f = fold(
            Some(Version::posted(c, 1)),
            &NoTombstones,
            &[&append(2, "u", vec![message("b", None)])],
        );
        assert_eq!(
            f.version.unwrap().conversation.transcript.as_deref(),
            Some("user: a\nuser: b\n")
        );
    }
}
