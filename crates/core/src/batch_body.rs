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
use crate::strict_json::{PathStep, StrictValue, may_hold_wide_integer, wide_integers};

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
                let value = serde_json::from_slice::<StrictValue>(line)
                    .map(StrictValue::into_inner)
                    .map_err(|e| {
                        InputError::invalid_json(format!("line is not valid JSON: {e}"))
                    })?;
                // The line is the item: its paths start at the item's root.
                if may_hold_wide_integer(&value)
                    && let Some(wide) = wide_integers(line).first()
                {
                    return Err(InputError::invalid_field(&wide.field(0), wide.reason()));
                }
                Ok(value)
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
        let values = match parsed {
            Ok(values) => values,
            Err(_) if over.get() => return Err(too_many()),
            Err(e) => {
                return Err(InputError::invalid_json(format!(
                    "body must be a JSON array of conversations: {e}"
                )));
            }
        };
        // One scan of the body finds them all; each is its item's error,
        // named from the item's root (`metadata.n`, not `[3].metadata.n`).
        let wide = if values.iter().any(may_hold_wide_integer) {
            wide_integers(bytes)
        } else {
            Vec::new()
        };
        values
            .into_iter()
            .enumerate()
            .map(|(i, value)| {
                match wide
                    .iter()
                    .find(|w| w.path.first() == Some(&PathStep::Index(i)))
                {
                    Some(w) => Err(InputError::invalid_field(&w.field(1), w.reason())),
                    None => Ok(value),
                }
            })
            .collect()
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
    type Value = Vec<serde_json::Value>;

    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Vec<serde_json::Value>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BoundedArray<'_> {
    type Value = Vec<serde_json::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of conversations")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<serde_json::Value>, A::Error> {
        // Grown as items arrive, not sized from the body.
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<StrictValue>()? {
            if items.len() == self.max_items {
                self.over.set(true);
                return Err(serde::de::Error::custom("too many items"));
            }
            // Strict: a duplicate key in any item is ambiguous (see strict_json).
            items.push(item.into_inner());
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

    /// An integer beyond i64/u64 is its item's error, naming the field from
    /// the item's root; the other items are unaffected.
    #[test]
    fn a_wide_integer_refuses_its_item_naming_the_field() {
        let item = |meta: &str| {
            format!(r#"{{"user_id":"u","channel":"c","transcript":"x","metadata":{meta}}}"#)
        };
        let ok = item(r#"{"n":1e30}"#);
        let wide = item(r#"{"a":{"n":[0,18446744073709551616123]}}"#);
        for (body, ndjson) in [
            (format!("[{ok},{wide},{ok}]"), false),
            (format!("{ok}\n{wide}\n{ok}\n"), true),
        ] {
            let items = split_items(body.as_bytes(), ndjson, 10).unwrap();
            assert!(items[0].is_ok() && items[2].is_ok(), "{items:?}");
            let err = items[1].as_ref().unwrap_err();
            assert_eq!(err.field(), Some("metadata.a.n[1]"), "{err:?}");
            assert!(err.message().contains("18446744073709551616123"), "{err:?}");
        }
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
