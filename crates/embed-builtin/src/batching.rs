//! Chooses the inputs of the next model batch.
//!
//! A batch is padded to one width, so its cost (time and the attention's
//! memory) grows with `inputs × width`. Grouping inputs that pad to the
//! same width spends little on padding; the budget bounds each batch's
//! padded size, so many long inputs are cut into several batches rather
//! than one huge tensor.

/// The next batch out of `lengths` (pending inputs, oldest first): the
/// oldest input and the next oldest of the inputs padded to the same width
/// (`width_of`), at most `share` of them, within `max_batch_tokens` padded
/// tokens, their count rounded by `rows_of`. Inputs of other widths wait
/// for a batch of their own: on this machine 8 inputs of one width embed
/// faster per real token than 64 padded to the longest of a wide spread.
/// Indices into `lengths`, oldest first; never empty when `lengths` is not.
pub fn same_width(
    lengths: &[usize],
    width_of: impl Fn(usize) -> usize,
    share: usize,
    rows_of: impl Fn(usize) -> usize,
    max_batch_tokens: usize,
) -> Vec<usize> {
    let Some(&oldest) = lengths.first() else {
        return Vec::new();
    };
    let width = width_of(oldest).max(1);
    let fits = (max_batch_tokens / width).max(1);
    let mut batch: Vec<usize> = lengths
        .iter()
        .enumerate()
        .filter(|&(_, &len)| width_of(len) == width_of(oldest))
        .map(|(i, _)| i)
        .take(share.min(fits).max(1))
        .collect();
    batch.truncate(rows_of(batch.len()).max(1));
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_same_width_batch_starts_with_the_oldest_and_stays_within_bounds(
            lengths in proptest::collection::vec(1usize..257, 0..200),
            share in 1usize..300,
            budget in 1usize..5000,
        ) {
            let width_of = |len: usize| len.div_ceil(16) * 16;
            let rows_of = |n: usize| if n == 0 { 0 } else { 1 << n.ilog2() };
            let batch = same_width(&lengths, width_of, share, rows_of, budget);
            prop_assert_eq!(batch.is_empty(), lengths.is_empty());
            if let Some(&first) = batch.first() {
                prop_assert_eq!(first, 0);
                let width = width_of(lengths[0]);
                prop_assert!(batch.iter().all(|&i| width_of(lengths[i]) == width));
                prop_assert!(batch.windows(2).all(|w| w[0] < w[1]), "oldest first");
                prop_assert!(batch.len() <= share.max(1));
                prop_assert!(batch.len() == 1 || batch.len() * width <= budget);
                prop_assert!(batch.len().is_power_of_two());
            }
        }

    }
}
