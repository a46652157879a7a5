//! The conversations a run sends, serialised once up front so the load loop
//! only copies bytes.
//!
//! Every request carries a fresh client id, `bench-<run>-<n>`, unless
//! `--reuse-ids`: the daemon treats a repeated client id as an idempotent
//! replay and stores nothing, which would make a long run measure nothing
//! after the first pass through the data.
//!
//! With `--unique-text`, each request's last message (or transcript) also
//! ends with ` [bench <run>-<n>]`, so its chunks, their hashes and vectors
//! are new too: without it, a run longer than the data re-sends the same
//! texts, which the embedding cache answers and pgvector's HNSW index
//! stores as duplicates of existing elements, both cheaper than new data.

use std::io::Write as _;
use std::path::Path;

use anyhow::bail;
use bytes::Bytes;
use serde_json::Value;

/// Where the conversations came from, for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DataInfo {
    pub source: String,
    pub conversations: usize,
    pub mean_body_bytes: usize,
    pub reuse_ids: bool,
    pub unique_text: bool,
}

/// How bodies are made from the data.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyOptions<'a> {
    /// The `<run>` of `bench-<run>-<n>`.
    pub run_id: &'a str,
    /// Send each conversation's own id instead of a fresh one.
    pub reuse_ids: bool,
    /// Make each request's text unique.
    pub unique_text: bool,
}

/// One conversation, ready to send.
struct Item {
    /// The conversation as given (what `--reuse-ids` sends).
    whole: Bytes,
    /// Its other fields, serialised without `id` and without the opening
    /// brace: `"channel":…}`, or just `}` when `id` was the only field.
    rest: Bytes,
    /// Where in `rest` the unique text goes: just before the closing quote
    /// of the last message's content (or the transcript), if there is one.
    text_at: Option<usize>,
}

/// Marks the insertion point while serialising (nothing in it needs
/// escaping, so it is written as is); data that already holds it is refused.
const SENTINEL: &str = "@@convstore-bench-insertion-point@@";

/// Request bodies for a run.
pub struct Payloads {
    items: Vec<Item>,
    /// `{"id":"bench-<run>-` with `<run>` JSON-escaped.
    id_prefix: Vec<u8>,
    /// ` [bench <run>-`, JSON-escaped, without quotes.
    text_prefix: Vec<u8>,
    reuse_ids: bool,
    unique_text: bool,
    info: DataInfo,
}

/// How many conversations to generate when the shared sample is absent.
const GENERATED: usize = 4000;

impl Payloads {
    /// Reads `--data` (or the shared sample, or generated conversations).
    pub fn load(
        data: Option<&Path>,
        sample_format: bool,
        options: BodyOptions<'_>,
    ) -> anyhow::Result<Self> {
        let (values, source) = match data {
            Some(path) => (
                convstore_dataset::read_jsonl(path, sample_format)?,
                path.display().to_string(),
            ),
            None => {
                let source = match convstore_dataset::sample_path() {
                    Some(p) => format!("shared sample {}", p.display()),
                    None => "generated (no shared sample found)".to_string(),
                };
                (convstore_dataset::sample_or_generated(GENERATED)?, source)
            }
        };
        Self::from_values(values, source, options)
    }

    pub fn from_values(
        values: Vec<Value>,
        source: String,
        options: BodyOptions<'_>,
    ) -> anyhow::Result<Self> {
        if values.is_empty() {
            bail!("{source} holds no conversations");
        }
        let mut items = Vec::with_capacity(values.len());
        let mut total = 0usize;
        for (i, value) in values.into_iter().enumerate() {
            let Value::Object(mut map) = value else {
                bail!("conversation {} of {source} is not a JSON object", i + 1);
            };
            let whole = serde_json::to_vec(&map)?;
            map.remove("id");
            let marked = options.unique_text && mark_last_text(&mut map);
            let mut rest = serde_json::to_vec(&map)?;
            let text_at = if marked {
                let at = find_once(&rest, SENTINEL.as_bytes()).ok_or_else(|| {
                    anyhow::anyhow!(
                        "conversation {} of {source} contains {SENTINEL}: cannot use --unique-text",
                        i + 1
                    )
                })?;
                rest.drain(at..at + SENTINEL.len());
                Some(at - 1)
            } else {
                None
            };
            // `{}` → `}`, `{"a":1}` → `"a":1}`: the id goes in front.
            let rest = if map.is_empty() {
                Bytes::from_static(b"}")
            } else {
                Bytes::copy_from_slice(&rest[1..])
            };
            total += whole.len();
            items.push(Item {
                whole: Bytes::from(whole),
                rest,
                text_at,
            });
        }
        let info = DataInfo {
            source,
            conversations: items.len(),
            mean_body_bytes: total / items.len(),
            reuse_ids: options.reuse_ids,
            unique_text: options.unique_text,
        };
        Ok(Self {
            items,
            id_prefix: [
                b"{\"id\":\"".as_slice(),
                &escaped_inner(&format!("bench-{}-", options.run_id))?,
            ]
            .concat(),
            text_prefix: escaped_inner(&format!(" [bench {}-", options.run_id))?,
            reuse_ids: options.reuse_ids,
            unique_text: options.unique_text,
            info,
        })
    }

    pub fn info(&self) -> &DataInfo {
        &self.info
    }

    /// The body of request `n` (the n-th conversation, cycling).
    pub fn body(&self, n: u64) -> Bytes {
        let len = self.items.len() as u64;
        let item = &self.items[usize::try_from(n % len).unwrap_or(0)];
        if self.reuse_ids {
            return item.whole.clone();
        }
        let mut body = Vec::with_capacity(
            self.id_prefix.len() + self.text_prefix.len() + 48 + item.rest.len(),
        );
        body.extend_from_slice(&self.id_prefix);
        // Writing to a Vec cannot fail.
        let _ = write!(body, "{n}\"");
        if item.rest.as_ref() != b"}" {
            body.push(b',');
        }
        match item.text_at.filter(|_| self.unique_text) {
            Some(at) => {
                body.extend_from_slice(&item.rest[..at]);
                body.extend_from_slice(&self.text_prefix);
                let _ = write!(body, "{n}]");
                body.extend_from_slice(&item.rest[at..]);
            }
            None => body.extend_from_slice(&item.rest),
        }
        Bytes::from(body)
    }
}

/// Appends [`SENTINEL`] to the last message's content, or else to the
/// transcript; false when there is neither.
fn mark_last_text(map: &mut serde_json::Map<String, Value>) -> bool {
    let last_content = map
        .get_mut("messages")
        .and_then(Value::as_array_mut)
        .and_then(|m| m.last_mut())
        .and_then(|m| m.get_mut("content"));
    let target = match last_content {
        Some(v) => Some(v),
        None => map.get_mut("transcript"),
    };
    match target {
        Some(Value::String(text)) => {
            text.push_str(SENTINEL);
            true
        }
        _ => false,
    }
}

/// `text` as a JSON string body: escaped, without the quotes.
fn escaped_inner(text: &str) -> anyhow::Result<Vec<u8>> {
    let quoted = serde_json::to_vec(text)?;
    Ok(quoted[1..quoted.len() - 1].to_vec())
}

/// The position of `needle` in `haystack` if it occurs exactly once.
fn find_once(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let mut found = haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i);
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// A run id from the clock: short, and different for runs a millisecond apart.
pub fn default_run_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{millis:x}-{:x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn payloads(values: Vec<Value>, reuse: bool) -> Payloads {
        let options = BodyOptions {
            run_id: "r\"1",
            reuse_ids: reuse,
            unique_text: false,
        };
        Payloads::from_values(values, "test".into(), options).unwrap()
    }

    fn unique(values: Vec<Value>) -> Payloads {
        let options = BodyOptions {
            run_id: "r\"1",
            reuse_ids: false,
            unique_text: true,
        };
        Payloads::from_values(values, "test".into(), options).unwrap()
    }

    #[test]
    fn unique_text_ends_the_last_message_or_the_transcript() {
        let p = unique(vec![
            json!({"id": "a", "user_id": "u", "channel": "c", "metadata": {"k": "v"},
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo \"x\""}]}),
            json!({"user_id": "u", "channel": "c", "transcript": "t"}),
            json!({"user_id": "u", "channel": "c"}),
        ]);
        let body: Value = serde_json::from_slice(&p.body(3)).unwrap();
        assert_eq!(body["messages"][0]["content"], "hi");
        assert_eq!(body["messages"][1]["content"], "yo \"x\" [bench r\"1-3]");
        assert_eq!(body["metadata"], json!({"k": "v"}));
        assert_eq!(body["id"], "bench-r\"1-3");
        let body: Value = serde_json::from_slice(&p.body(4)).unwrap();
        assert_eq!(body["transcript"], "t [bench r\"1-4]");
        let body: Value = serde_json::from_slice(&p.body(5)).unwrap();
        assert_eq!(
            body,
            json!({"id": "bench-r\"1-5", "user_id": "u", "channel": "c"})
        );
    }

    #[test]
    fn data_holding_the_marker_is_refused_for_unique_text() {
        let options = BodyOptions {
            run_id: "r",
            reuse_ids: false,
            unique_text: true,
        };
        let data =
            vec![json!({"user_id": "u", "channel": "c", "summary": SENTINEL, "transcript": "t"})];
        assert!(Payloads::from_values(data, "f".into(), options).is_err());
    }

    #[test]
    fn fresh_ids_replace_the_given_one_and_keep_every_other_field() {
        let p = payloads(
            vec![
                json!({"id": "orig", "user_id": "u", "channel": "c", "messages": [{"role": "user", "content": "hi"}]}),
                json!({"user_id": "u2", "channel": "c2", "transcript": "t"}),
            ],
            false,
        );
        for n in [0u64, 1, 2, 12345] {
            let body: Value = serde_json::from_slice(&p.body(n)).expect("valid JSON");
            assert_eq!(body["id"], format!("bench-r\"1-{n}"), "escaped run id");
            let expected_user = if n % 2 == 0 { "u" } else { "u2" };
            assert_eq!(body["user_id"], expected_user);
            assert_eq!(body.as_object().unwrap().len(), 4);
        }
    }

    #[test]
    fn an_id_only_object_still_makes_valid_json() {
        let p = payloads(vec![json!({"id": "x"})], false);
        let body: Value = serde_json::from_slice(&p.body(7)).unwrap();
        assert_eq!(body, json!({"id": "bench-r\"1-7"}));
    }

    #[test]
    fn reuse_ids_sends_the_conversation_as_given() {
        let p = payloads(vec![json!({"id": "orig", "user_id": "u"})], true);
        let body: Value = serde_json::from_slice(&p.body(3)).unwrap();
        assert_eq!(body, json!({"id": "orig", "user_id": "u"}));
    }

    #[test]
    fn empty_data_and_non_objects_are_refused() {
        let options = BodyOptions {
            run_id: "r",
            ..BodyOptions::default()
        };
        assert!(Payloads::from_values(vec![], "f".into(), options).is_err());
        let err = Payloads::from_values(vec![json!([1])], "f".into(), options)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("conversation 1 of f"), "{err}");
    }

    #[test]
    fn the_default_data_passes_the_daemons_validation() {
        let options = BodyOptions {
            run_id: "t",
            reuse_ids: false,
            unique_text: true,
        };
        let p = Payloads::load(None, false, options).unwrap();
        for n in 0..50 {
            convstore_core::validate::parse_conversation(
                &p.body(n),
                convstore_core::validate::Limits::DEFAULT,
            )
            .unwrap_or_else(|e| panic!("body {n}: {e:?}"));
        }
    }
}
