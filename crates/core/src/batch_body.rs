//! Splitting a batch request's body into items: a JSON array, or NDJSON
//! (one conversation per line). Free of HTTP so the fuzz target can drive
//! it (`fuzz/`).
//!
//! The item count is checked as items arrive, never after: a 20 MB array
//! of `{}` parsed whole first took ~1.09 GB before its 1.3 million items
//! were counted and refused (issue 15). Parsing stops at the first item
//! past `max_items`.

use std::cell::Cell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};

use crate::error::InputError;
use crate::strict_json::StrictValue;

type Items = Vec<Result<serde_json::Value, InputError>>;

/// The batch's items as JSON values; an unparsable NDJSON line becomes that
/// item's error, while an unparsable JSON array fails the whole request.
pub fn split_items(bytes: &[u8], ndjson: bool, max_items: usize) -> Result<Items, InputError> {
    let too_many = || {
        InputError::PayloadTooLarge(format!(
            "more than {max_items} items; at most {max_items} per batch (server.max_batch_items)"
        ))
    };
    let items: Items = if ndjson {
        bytes
            .split(|&b| b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            // One past the limit is enough to refuse; parse no further.
            .take(max_items.saturating_add(1))
            .map(|line| {
                serde_json::from_slice::<StrictValue>(line)
                    .map(StrictValue::into_inner)
                    .map_err(|e| InputError::invalid_json(format!("line is not valid JSON: {e}")))
            })
            .collect()
    } else {
        let over = Cell::new(false);
        let mut parser = serde_json::Deserializer::from_slice(bytes);
        let parsed = BoundedArray {
            max_items,
            over: &over,
        }
        .deserialize(&mut parser)
        .and_then(|items| parser.end().map(|()| items));
        match parsed {
            Ok(items) => items,
            Err(_) if over.get() => return Err(too_many()),
            Err(e) => {
                return Err(InputError::invalid_json(format!(
                    "body must be a JSON array of conversations: {e}"
                )));
            }
        }
    };
    if items.is_empty() {
        return Err(InputError::BadRequest("the batch is empty".into()));
    }
    if items.len() > max_items {
        return Err(too_many());
    }
    Ok(items)
}

/// A JSON array of at most `max_items` strict values; one more sets `over`
/// and ends the parse.
struct BoundedArray<'a> {
    max_items: usize,
    over: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for BoundedArray<'_> {
    type Value = Items;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Items, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BoundedArray<'_> {
    type Value = Items;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of conversations")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items, A::Error> {
        // Grown as items arrive, not sized from the body.
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<StrictValue>()? {
            if items.len() == self.max_items {
                self.over.set(true);
                return Err(serde::de::Error::custom("too many items"));
            }
            // Strict: a duplicate key in any item is ambiguous (see strict_json).
            items.push(Ok(item.into_inner()));
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_array_is_refused_at_the_first_item_past_the_limit() {
        let body = format!("[{}]", vec!["{}"; 1_000_000].join(","));
        let e = split_items(body.as_bytes(), false, 3).unwrap_err();
        assert!(
            matches!(&e, InputError::PayloadTooLarge(m) if m.contains("at most 3")),
            "{e:?}"
        );
        // Broken JSON after the limit is not reached: the count answers.
        let e = split_items(b"[{},{},{},{},!!!", false, 3).unwrap_err();
        assert!(matches!(e, InputError::PayloadTooLarge(_)), "{e:?}");
    }

    #[test]
    fn arrays_within_the_limit_and_their_errors_are_as_before() {
        let items = split_items(br#"[{"a":1}, {"b":2}, {"c":3}]"#, false, 3).unwrap();
        assert_eq!(items.len(), 3);
        for bad in [&b"[{},"[..], b"{}", b"[{}] x", b"[{\"a\":1,\"a\":2}]"] {
            let e = split_items(bad, false, 3).unwrap_err();
            assert!(matches!(e, InputError::InvalidJson(_)), "{bad:?}: {e:?}");
        }
        assert!(matches!(
            split_items(b"[]", false, 3).unwrap_err(),
            InputError::BadRequest(_)
        ));
    }
}
