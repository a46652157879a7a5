//! Splitting a batch request's body into items: a JSON array, or NDJSON
//! (one conversation per line). Free of HTTP so the fuzz target can drive
//! it (`fuzz/`).

use crate::error::InputError;
use crate::strict_json::StrictValue;

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
                serde_json::from_slice::<StrictValue>(line)
                    .map(StrictValue::into_inner)
                    .map_err(|e| InputError::invalid_json(format!("line is not valid JSON: {e}")))
            })
            .collect()
    } else {
        // Strict: a duplicate key in any item is ambiguous (see strict_json).
        let values: Vec<StrictValue> = serde_json::from_slice(bytes).map_err(|e| {
            InputError::invalid_json(format!("body must be a JSON array of conversations: {e}"))
        })?;
        values.into_iter().map(|v| Ok(v.into_inner())).collect()
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
