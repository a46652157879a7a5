//! Groups inputs into model batches by a token budget.
//!
//! A batch is padded to its longest input, so its cost (time and the
//! attention's memory) grows with `inputs × longest`. Sorting by length
//! first keeps short inputs together and long ones together, so little is
//! spent on padding; the budget bounds each batch's padded size, so one
//! call with many long inputs is cut into several batches rather than one
//! huge tensor.

/// Indices of `lengths` grouped into batches whose padded size
/// (`inputs × longest`) stays within `max_batch_tokens`; an input longer
/// than the budget gets a batch of its own. Every index appears exactly once.
pub fn plan(lengths: &[usize], max_batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Ascending order: the newest input is the batch's longest.
        let padded = (current.len() + 1) * lengths[i].max(1);
        if !current.is_empty() && padded > max_batch_tokens {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn short_inputs_share_a_batch_long_ones_are_split() {
        assert_eq!(plan(&[10, 12, 11], 1000), vec![vec![0, 2, 1]]);
        assert_eq!(plan(&[200, 200, 200], 400), vec![vec![0, 1], vec![2]]);
        assert_eq!(plan(&[500, 3], 100), vec![vec![1], vec![0]]);
        assert!(plan(&[], 100).is_empty());
    }

    proptest! {
        #[test]
        fn every_input_once_and_within_budget(
            lengths in proptest::collection::vec(1usize..300, 0..100),
            budget in 1usize..5000,
        ) {
            let batches = plan(&lengths, budget);
            let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
            for batch in &batches {
                prop_assert!(!batch.is_empty());
                let longest = batch.iter().map(|&i| lengths[i]).max().unwrap_or(0);
                prop_assert!(batch.len() == 1 || batch.len() * longest <= budget);
            }
        }
    }
}
