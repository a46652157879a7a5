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
use serde_json::value::RawValue;

use crate::error::InputError;

/// The batch's items, each its own text borrowed from the body, ready for
/// [`crate::validate::parse_batch_item`]. Nothing is copied: an item is
/// parsed once, straight into a conversation, as a single post is.
pub type Items<'a> = Vec<&'a [u8]>;

/// Splits a batch body into its items' texts. An NDJSON line that is not
/// JSON is left to its item's parse (and becomes that item's error); a JSON
/// array that is not JSON fails the whole request, as there is no telling
/// where its items begin.
pub fn split_items(bytes: &[u8], ndjson: bool, max_items: usize) -> Result<Items<'_>, InputError> {
    let too_many = || {
        InputError::PayloadTooLarge(format!(
            "more than {max_items} items; at most {max_items} per batch (server.max_batch_items)"
        ))
    };
    let items: Items = if ndjson {
        bytes
            .split(|&b| b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            // One past the limit is enough to refuse; look no further.
            .take(max_items.saturating_add(1))
            .collect()
    } else {
        let over = Cell::new(false);
        let bounded = BoundedArray {
            max_items,
            over: &over,
        };
        // UTF-8 checked once for the whole body (see `validate::parse_plain`);
        // a body that is not UTF-8 is scanned as bytes, for serde_json's error.
        let parsed = match std::str::from_utf8(bytes) {
            Ok(text) => whole_array(bounded, &mut serde_json::Deserializer::from_str(text)),
            Err(_) => whole_array(bounded, &mut serde_json::Deserializer::from_slice(bytes)),
        };
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

/// The array's items, with nothing but whitespace after it.
fn whole_array<'de, R: serde_json::de::Read<'de>>(
    bounded: BoundedArray<'_>,
    parser: &mut serde_json::Deserializer<R>,
) -> Result<Items<'de>, serde_json::Error> {
    let items = bounded.deserialize(&mut *parser)?;
    parser.end()?;
    Ok(items)
}

/// A JSON array of at most `max_items` values, each kept as its text; one
/// more sets `over` and ends the parse.
struct BoundedArray<'a> {
    max_items: usize,
    over: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for BoundedArray<'_> {
    type Value = Items<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Items<'de>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BoundedArray<'_> {
    type Value = Items<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of conversations")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items<'de>, A::Error> {
        // Grown as items arrive, not sized from the body.
        let mut items = Vec::new();
        // Each item is checked to be JSON here (so the array's shape is
        // known) but not built: its text is parsed once, later, into a
        // conversation.
        while let Some(item) = seq.next_element::<&'de RawValue>()? {
            if items.len() == self.max_items {
                self.over.set(true);
                return Err(serde::de::Error::custom("too many items"));
            }
            items.push(item.get().as_bytes());
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{Limits, parse_batch_item};

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
            let parsed: Vec<_> = items
                .iter()
                .map(|item| parse_batch_item(item, Limits::DEFAULT))
                .collect();
            assert!(parsed[0].is_ok() && parsed[2].is_ok(), "{parsed:?}");
            let err = parsed[1].as_ref().unwrap_err();
            assert_eq!(err.field(), Some("metadata.a.n[1]"), "{err:?}");
            assert!(err.message().contains("18446744073709551616123"), "{err:?}");
        }
    }

    /// Each item is its own text, exactly as sent: whitespace inside kept,
    /// around it dropped; an NDJSON line that is not JSON is still an item
    /// (its parse is its error), a JSON array's broken item fails the body.
    #[test]
    fn items_are_their_own_text() {
        let body = b" [ {\"a\": 1} ,\n{\"b\" :[2, 3]}\t, 4 ] ";
        let items = split_items(body, false, 3).unwrap();
        assert_eq!(items, [&b"{\"a\": 1}"[..], b"{\"b\" :[2, 3]}", b"4"]);
        let lines = split_items(b"{\"a\":1}\r\n\n  \nnot json\n{\"c\"", true, 3).unwrap();
        assert_eq!(lines, [&b"{\"a\":1}\r"[..], b"not json", b"{\"c\""]);
        // A duplicate key is its item's error, not the whole array's.
        let body = br#"[{"user_id":"u","user_id":"v","channel":"c","transcript":"x"},{"user_id":"u","channel":"c","transcript":"x"}]"#;
        let items = split_items(body, false, 3).unwrap();
        let err = parse_batch_item(items[0], Limits::DEFAULT).unwrap_err();
        assert_eq!(err.field(), Some("user_id"), "{err:?}");
        assert!(parse_batch_item(items[1], Limits::DEFAULT).is_ok());
    }

    #[test]
    fn arrays_within_the_limit_and_their_errors_are_as_before() {
        let items = split_items(br#"[{"a":1}, {"b":2}, {"c":3}]"#, false, 3).unwrap();
        assert_eq!(items.len(), 3);
        for bad in [&b"[{},"[..], b"{}", b"[{}] x", b"[{\"a\":}]", b"[\"\xff\"]"] {
            let e = split_items(bad, false, 3).unwrap_err();
            assert!(matches!(e, InputError::InvalidJson(_)), "{bad:?}: {e:?}");
        }
        assert!(matches!(
            split_items(b"[]", false, 3).unwrap_err(),
            InputError::BadRequest(_)
        ));
        assert!(matches!(
            split_items(b" \n\n", true, 3).unwrap_err(),
            InputError::BadRequest(_)
        ));
    }
}
