//! Splitting a batch request's body into items: a JSON array, or NDJSON
//! (one conversation per line). Free of HTTP so the fuzz target can drive
//! it (`fuzz/`).

use crate::error::InputError;
use crate::strict_json::{PathStep, StrictValue, may_hold_wide_integer, wide_integers};

/// The batch's items as JSON values; an unparsable NDJSON line becomes that
/// item's error, while an unparsable JSON array fails the whole request.
pub fn split_items(
    bytes: &[u8],
    ndjson: bool,
    max_items: usize,
) -> Result<Vec<Result<serde_json::Value, InputError>>, InputError> {
    let items: Vec<Result<serde_json::Value, InputError>> = if ndjson {
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
        // Strict: a duplicate key in any item is ambiguous (see strict_json).
        let values: Vec<StrictValue> = serde_json::from_slice(bytes).map_err(|e| {
            InputError::invalid_json(format!("body must be a JSON array of conversations: {e}"))
        })?;
        let values: Vec<serde_json::Value> =
            values.into_iter().map(StrictValue::into_inner).collect();
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
        return Err(InputError::PayloadTooLarge(format!(
            "{} items; at most {max_items} per batch (server.max_batch_items)",
            items.len()
        )));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
