//! A property test of the conversation lifecycle (issue 16): random
//! sequences of posts, appends, replacements, deletes and erasures,
//! applied the way the daemon applies them (stamped at acknowledgement,
//! queued, folded in batches of random size that may run long after later
//! deletes and erasures, replayed from the journal after crashes at random
//! points, some queued changes withdrawn by the delete and some met by the
//! tombstone at write time), must leave exactly what a plain sequential
//! model of the API says: each operation applied at once, in the order it
//! was acknowledged.
// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use chrono::Utc;
use proptest::prelude::*;
use uuid::Uuid;

use convstore_core::lifecycle::{
    Append, Change, Stamp, StampedChange, Tombstones, Version, erased_conversations, fold,
};
use convstore_core::model::{Conversation, Message, Role};

#[derive(Debug, Clone)]
enum Op {
    Post {
        id: u8,
        user: u8,
        text: u8,
        turns: u8,
    },
    Append {
        id: u8,
        turns: Vec<(u8, Option<u8>)>,
    },
    Delete {
        id: u8,
    },
    Erase {
        user: u8,
    },
    /// The worker takes the next `n` queued changes as one batch.
    Apply {
        n: u8,
    },
    /// kill -9: changes applied but not yet settled in the journal are
    /// replayed, in order.
    Crash {
        unsettled: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0u8..2, 0u8..3, 1u8..3)
            .prop_map(|(id, user, text, turns)| Op::Post { id, user, text, turns }),
        4 => (0u8..3, proptest::collection::vec((0u8..4, proptest::option::of(0u8..3)), 1..3))
            .prop_map(|(id, turns)| Op::Append { id, turns }),
        1 => (0u8..3).prop_map(|id| Op::Delete { id }),
        1 => (0u8..2).prop_map(|user| Op::Erase { user }),
        3 => (1u8..4).prop_map(|n| Op::Apply { n }),
        1 => (0u8..4).prop_map(|unsettled| Op::Crash { unsettled }),
    ]
}

fn message(text: String, id: Option<u8>) -> Message {
    Message {
        role: Role::User,
        content: text,
        ts: None,
        message_id: id.map(|i| format!("m{i}")),
    }
}

fn key(id: u8) -> String {
    format!("c{id}")
}

fn user(u: u8) -> String {
    format!("u{u}")
}

fn post_messages(text: u8, turns: u8) -> Vec<Message> {
    (0..turns)
        .map(|t| message(format!("post {text} turn {t}"), None))
        .collect()
}

fn append_messages(turns: &[(u8, Option<u8>)]) -> Vec<Message> {
    turns
        .iter()
        .map(|(t, id)| message(format!("appended {t}"), *id))
        .collect()
}

/// The API as a client reads it: each operation applied at once.
#[derive(Default)]
struct Model {
    /// By client id: (user, messages, messages of the last post).
    conversations: BTreeMap<String, (String, Vec<Message>, Vec<Message>)>,
}

impl Model {
    fn post(&mut self, id: &str, user: &str, messages: Vec<Message>) {
        if let Some((u, current, posted)) = self.conversations.get(id)
            && u == user
            && (*current == messages || *posted == messages)
        {
            return;
        }
        self.conversations.insert(
            id.to_string(),
            (user.to_string(), messages.clone(), messages),
        );
    }

    /// The user an append is accepted for; `None`: 404.
    fn append(&mut self, id: &str, messages: &[Message]) -> Option<String> {
        let (user, current, _) = self.conversations.get_mut(id)?;
        for m in messages {
            let known = m
                .message_id
                .as_ref()
                .is_some_and(|mid| current.iter().any(|c| c.message_id.as_ref() == Some(mid)));
            if !known {
                current.push(m.clone());
            }
        }
        Some(user.clone())
    }
}

#[derive(Default)]
struct Stones {
    conversations: HashMap<String, Stamp>,
    users: HashMap<String, Stamp>,
}

impl Tombstones for Stones {
    fn conversation(&self, client_id: &str) -> Option<Stamp> {
        self.conversations.get(client_id).copied()
    }
    fn user(&self, user_id: &str) -> Option<Stamp> {
        self.users.get(user_id).copied()
    }
}

/// The daemon's way: a FIFO queue of stamped changes, batches folded onto
/// the stored versions, tombstones, a journal of unsettled changes.
#[derive(Default)]
struct Daemon {
    clock: Stamp,
    queue: Vec<StampedChange>,
    stored: HashMap<String, Version>,
    stones: Stones,
    /// Applied, not yet settled: what a crash replays.
    unsettled: Vec<StampedChange>,
}

impl Daemon {
    fn stamp(&mut self) -> Stamp {
        self.clock += 1;
        self.clock
    }

    fn apply(&mut self, batch: &[StampedChange]) {
        let mut order: Vec<String> = Vec::new();
        let mut groups: HashMap<String, Vec<&StampedChange>> = HashMap::new();
        for c in batch {
            let k = c.change.client_id().unwrap().to_string();
            if !groups.contains_key(&k) {
                order.push(k.clone());
            }
            groups.entry(k).or_default().push(c);
        }
        for k in order {
            let folded = fold(self.stored.get(&k).cloned(), &self.stones, &groups[&k]);
            if folded.delete_stored {
                self.stored.remove(&k);
            }
            if folded.changed
                && let Some(v) = folded.version
            {
                self.stored.insert(k, v);
            }
        }
    }

    /// The journal replay: a change the stored version already holds is
    /// settled, the others are applied again in order.
    fn replay(&mut self, changes: Vec<StampedChange>) {
        let todo: Vec<StampedChange> = changes
            .into_iter()
            .filter(|c| {
                self.stored
                    .get(c.change.client_id().unwrap())
                    .is_none_or(|v| v.stamp < c.stamp)
            })
            .collect();
        self.apply(&todo);
    }
}

fn run(
    ops: &[Op],
    withdraw: &[bool],
) -> (BTreeMap<String, Vec<String>>, BTreeMap<String, Vec<String>>) {
    let mut model = Model::default();
    let mut daemon = Daemon::default();
    let mut withdraw = withdraw.iter().cycle();
    for op in ops {
        match op {
            Op::Post {
                id,
                user: u,
                text,
                turns,
            } => {
                let messages = post_messages(*text, *turns);
                model.post(&key(*id), &user(*u), messages.clone());
                let stamp = daemon.stamp();
                daemon.queue.push(StampedChange {
                    stamp,
                    change: Change::Post(Conversation {
                        id: Uuid::from_u128(u128::from(*id)),
                        client_id: Some(key(*id)),
                        user_id: user(*u),
                        channel: "web".into(),
                        messages,
                        transcript: None,
                        summary: None,
                        metadata: serde_json::json!({}),
                        created_at: None,
                        received_at: Utc::now(),
                        received_instant: Instant::now(),
                    }),
                });
            }
            Op::Append { id, turns } => {
                let messages = append_messages(turns);
                // Refused (404) when the conversation is not known.
                let Some(owner) = model.append(&key(*id), &messages) else {
                    continue;
                };
                let stamp = daemon.stamp();
                daemon.queue.push(StampedChange {
                    stamp,
                    change: Change::Append(Append {
                        id: Uuid::from_u128(u128::from(*id)),
                        client_id: key(*id),
                        user_id: owner,
                        messages,
                        received_at: Utc::now(),
                        received_instant: Instant::now(),
                    }),
                });
            }
            Op::Delete { id } => {
                model.conversations.remove(&key(*id));
                let stamp = daemon.stamp();
                daemon.stored.remove(&key(*id));
                daemon.stones.conversations.insert(key(*id), stamp);
                // Queued changes are withdrawn, or (still with a worker)
                // met by the tombstone: both must come to the same.
                if *withdraw.next().unwrap_or(&true) {
                    daemon
                        .queue
                        .retain(|c| !(c.change.client_id() == Some(&key(*id)) && c.stamp <= stamp));
                }
            }
            Op::Erase { user: u } => {
                model
                    .conversations
                    .retain(|_, (owner, ..)| *owner != user(*u));
                let stamp = daemon.stamp();
                daemon
                    .stored
                    .retain(|_, v| !(v.conversation.user_id == user(*u) && v.stamp <= stamp));
                daemon.stones.users.insert(user(*u), stamp);
                if *withdraw.next().unwrap_or(&true) {
                    // What the erasure withdraws from the queue, it deletes
                    // from the store too (the stored version was replaced
                    // by the erased user's, only not written yet).
                    let erased = erased_conversations(&daemon.queue, &user(*u), stamp);
                    daemon
                        .queue
                        .retain(|c| !(c.stamp <= stamp && erased.contains(&c.change.key())));
                    for k in erased {
                        daemon.stored.remove(&k);
                        daemon.stones.conversations.insert(k, stamp);
                    }
                }
            }
            Op::Apply { n } => {
                let n = usize::from(*n).min(daemon.queue.len());
                let batch: Vec<StampedChange> = daemon.queue.drain(..n).collect();
                daemon.apply(&batch);
                daemon.unsettled.extend(batch);
            }
            Op::Crash { unsettled } => {
                // The last `unsettled` applied changes were not settled
                // yet, and the queue was journaled: both are replayed.
                let keep = daemon
                    .unsettled
                    .len()
                    .saturating_sub(usize::from(*unsettled));
                let mut replayed: Vec<StampedChange> = daemon.unsettled.split_off(keep);
                replayed.append(&mut daemon.queue);
                daemon.unsettled.clear();
                daemon.replay(replayed);
            }
        }
    }
    // Drain.
    let rest: Vec<StampedChange> = daemon.queue.drain(..).collect();
    daemon.apply(&rest);

    let expected = model
        .conversations
        .into_iter()
        .map(|(k, (_, messages, _))| (k, messages.into_iter().map(|m| m.content).collect()))
        .collect();
    let got = daemon
        .stored
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                v.conversation
                    .messages
                    .into_iter()
                    .map(|m| m.content)
                    .collect(),
            )
        })
        .collect();
    (expected, got)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_daemon_ends_where_the_sequential_model_does(
        ops in proptest::collection::vec(op(), 1..40),
        withdraw in proptest::collection::vec(any::<bool>(), 1..8),
    ) {
        let (expected, got) = run(&ops, &withdraw);
        prop_assert_eq!(expected, got, "ops: {:?}", ops);
    }
}

#[test]
fn a_change_queued_before_a_delete_never_comes_back() {
    // post, (not applied), delete without withdrawing, apply, crash-replay.
    let ops = [
        Op::Post {
            id: 0,
            user: 0,
            text: 0,
            turns: 1,
        },
        Op::Append {
            id: 0,
            turns: vec![(1, None)],
        },
        Op::Delete { id: 0 },
        Op::Apply { n: 3 },
        Op::Crash { unsettled: 3 },
    ];
    let (expected, got) = run(&ops, &[false]);
    assert!(expected.is_empty());
    assert_eq!(expected, got);
}
