//! The fuzz harness for request parsing and validation, shared by the
//! cargo-fuzz target (`fuzz/fuzz_targets/parse_validate.rs`) and the
//! property tests, so both exercise the same checks.
//!
//! [`check`] takes arbitrary bytes: the first byte picks the route shape
//! (one conversation, a JSON-array batch, an NDJSON batch), the rest is the
//! body. Parsing may refuse anything; it must never panic, and whatever it
//! accepts must be storable — the promise validation makes so that an
//! acknowledged conversation can always be written:
//!
//! - no NUL anywhere (PostgreSQL `text` and `jsonb` cannot hold it);
//! - every bound of [`Limits`] holds;
//! - exactly one of messages and transcript, known roles only;
//! - metadata is an object within the depth and size bounds;
//! - timestamps between 1970 and a day from now;
//! - the journal entry round-trips exactly, never contains the record
//!   magic's 0xFF, and reads back through the record scanner.
//!
//! A violated promise panics, which is what the fuzzer looks for.

use chrono::{DateTime, Utc};

use crate::batch_body::split_items;
use crate::journal::{entry, record};
use crate::model::Conversation;
use crate::validate::{Limits, parse_batch_item, parse_conversation};

/// Small limits, so that random inputs reach every bound.
pub const FUZZ_LIMITS: Limits = Limits {
    max_messages: 16,
    max_content_bytes: 512,
    max_metadata_bytes: 256,
    max_metadata_depth: 4,
    max_id_bytes: 32,
    max_label_bytes: 32,
};

/// Parses `data` as the route its first byte picks; panics if something
/// accepted breaks a promise (see the module docs).
pub fn check(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(c) = parse_conversation(body, FUZZ_LIMITS) {
                check_accepted(&c, &FUZZ_LIMITS);
            }
        }
        shape => {
            let Ok(items) = split_items(body, shape == 2, 64) else {
                return;
            };
            assert!(items.len() <= 64, "more items than max_items passed");
            for item in items {
                if let Ok(c) = parse_batch_item(item, FUZZ_LIMITS) {
                    check_accepted(&c, &FUZZ_LIMITS);
                }
            }
        }
    }
}

/// The promises of an accepted conversation.
pub fn check_accepted(c: &Conversation, limits: &Limits) {
    let label = |name: &str, s: &str, max: usize| {
        assert!(!s.trim().is_empty(), "{name} accepted empty");
        assert!(s.len() <= max, "{name} over its limit: {} bytes", s.len());
        assert!(
            !s.chars().any(char::is_control),
            "{name} has a control character"
        );
    };
    label("user_id", &c.user_id, limits.max_label_bytes);
    label("channel", &c.channel, limits.max_label_bytes);
    // An assigned id (no id sent) is the row's UUID, not the caller's text.
    if let Some(id) = c.client_id.as_ref().filter(|id| **id != c.id.to_string()) {
        label("id", id, limits.max_id_bytes);
    }
    let text = |name: &str, s: &str| {
        assert!(!s.contains('\0'), "{name} holds a NUL");
        assert!(
            s.len() <= limits.max_content_bytes,
            "{name} over max_content_bytes"
        );
    };
    match (&c.transcript, c.messages.is_empty()) {
        (Some(t), true) => {
            assert!(!t.trim().is_empty(), "empty transcript accepted");
            text("transcript", t);
        }
        (None, false) => {
            assert!(c.messages.len() <= limits.max_messages, "too many messages");
            // A message's role is a `Role`: only the four can be accepted.
            for m in &c.messages {
                assert!(!m.content.trim().is_empty(), "empty content accepted");
                text("content", &m.content);
                if let Some(ts) = m.ts {
                    check_time(ts);
                }
            }
        }
        _ => panic!("accepted with both or neither of messages and transcript"),
    }
    if let Some(s) = &c.summary {
        text("summary", s);
    }
    if let Some(ts) = c.created_at {
        check_time(ts);
    }
    assert!(c.metadata.is_object(), "metadata is not an object");
    check_json(&c.metadata, 0, limits.max_metadata_depth);
    let size = serde_json::to_vec(&c.metadata)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    assert!(
        size <= limits.max_metadata_bytes,
        "metadata over its size limit"
    );

    // The journal keeps it exactly, and the record reads back.
    let stamped = crate::lifecycle::StampedChange {
        stamp: c.received_at.timestamp_micros(),
        change: crate::lifecycle::Change::Post(c.clone()),
    };
    let payload = entry::encode(&stamped);
    assert!(!payload.contains(&0xFF), "journal payload contains 0xFF");
    let back = match entry::decode(&payload) {
        Ok(crate::lifecycle::StampedChange {
            change: crate::lifecycle::Change::Post(back),
            ..
        }) => back,
        Ok(other) => panic!("journal entry decodes as another change: {other:?}"),
        Err(e) => panic!("journal entry does not decode: {e}"),
    };
    assert!(
        back.id == c.id
            && back.client_id == c.client_id
            && back.user_id == c.user_id
            && back.channel == c.channel
            && back.messages == c.messages
            && back.transcript == c.transcript
            && back.summary == c.summary
            && back.metadata == c.metadata
            && back.created_at == c.created_at
            && back.received_at == c.received_at,
        "journal round trip changed the conversation"
    );
    let mut segment = record::SEGMENT_HEADER.to_vec();
    record::encode_into(&payload, &mut segment);
    let scan = record::scan(&segment);
    assert!(scan.damage.is_empty(), "a fresh record reads as damaged");
    assert_eq!(scan.records.len(), 1);
    assert_eq!(scan.records[0].payload, payload.as_slice());
}

fn check_time(ts: DateTime<Utc>) {
    assert!(
        ts >= DateTime::<Utc>::UNIX_EPOCH,
        "timestamp before 1970 accepted"
    );
    assert!(
        ts <= Utc::now() + chrono::Duration::days(1) + chrono::Duration::minutes(5),
        "timestamp in the far future accepted"
    );
}

fn check_json(value: &serde_json::Value, depth: usize, max_depth: usize) {
    assert!(depth <= max_depth, "metadata deeper than allowed");
    match value {
        serde_json::Value::String(s) => assert!(!s.contains('\0'), "NUL in metadata"),
        serde_json::Value::Array(items) => {
            items
                .iter()
                .for_each(|v| check_json(v, depth + 1, max_depth));
        }
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                assert!(!k.contains('\0'), "NUL in a metadata key");
                check_json(v, depth + 1, max_depth);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Inputs that reach each promise; also the fuzzer's seed corpus
    /// (`fuzz/corpus/parse_validate`, written by `scripts/fuzz.sh`).
    pub(crate) fn seeds() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let bodies: &[&str] = &[
            r#"{"id":"c1","user_id":"u","channel":"web","messages":[{"role":"user","content":"hi","ts":"2024-05-01T10:00:00Z"}],"metadata":{"a":{"b":[1,2,"x"]}},"summary":"s","created_at":"2024-05-01T10:00:00+02:00"}"#,
            r#"{"user_id":"u","channel":"c","transcript":"hello there"}"#,
            r#"{"user_id":"u","channel":"c","messages":[{"role":"user","content":"a\u0000b"}]}"#,
            r#"{"user_id":"u","channel":"c","transcript":"x","metadata":{"k":1,"k":2}}"#,
            r#"{"user_id":"u","user_id":"v","channel":"c","transcript":"x"}"#,
            r#"{"user_id":"u","channel":"c","transcript":"x","created_at":"9999-12-31T23:59:59Z"}"#,
            r#"{"user_id":"u","channel":"c","transcript":"\ud800"}"#,
            r#"{"user_id":"u","channel":"c","transcript":"x","metadata":{"a":{"b":{"c":{"d":{"e":1}}}}}}"#,
        ];
        for b in bodies {
            for mode in 0u8..3 {
                let mut v = vec![mode];
                match mode {
                    0 => v.extend_from_slice(b.as_bytes()),
                    1 => v.extend_from_slice(format!("[{b},{b}]").as_bytes()),
                    _ => v.extend_from_slice(format!("{b}\n{b}\n").as_bytes()),
                }
                out.push(v);
            }
        }
        out.push(b"\x00\xff\xfe{".to_vec());
        out.push([&[0u8][..], "[".repeat(5000).as_bytes()].concat());
        out
    }

    #[test]
    fn seeds_keep_every_promise() {
        for seed in seeds() {
            check(&seed);
        }
    }

    #[test]
    fn valid_seed_is_accepted() {
        let c = parse_conversation(&seeds()[0][1..], FUZZ_LIMITS).expect("valid seed");
        check_accepted(&c, &FUZZ_LIMITS);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_keep_every_promise(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            check(&data);
        }

        /// Valid seeds with bytes overwritten: near-valid JSON reaches the
        /// validation rules much more often than random bytes do.
        #[test]
        fn mutated_seeds_keep_every_promise(
            which in 0usize..24,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let seeds = seeds();
            let mut data = seeds[which % seeds.len()].clone();
            for (at, byte) in edits {
                let i = at.index(data.len());
                data[i] = byte;
            }
            check(&data);
        }
    }
}
