//! Request packing layer: cuts a call into requests that fit the backend's
//! `max_batch_tokens` (the inputs' tokens summed), sends them together and
//! puts the vectors back in order.
//!
//! Heuristic: backends limit a request by tokens as well as by inputs
//! (OpenAI: 300k tokens per request; TEI and vLLM far less, set by their
//! operators), and a request over it fails whole. Inputs are counted with
//! the backend's own tokenizer when it has one (builtin, or a configured
//! `tokenizer`), else with the chunker's estimate, which errs high. Inputs
//! are packed greedily in order; an input over the limit goes alone, and
//! the backend judges it (a limit below one chunk is a configuration
//! mistake: set it at least to the model's context). The requests of one
//! call run at once: the in-flight limit below decides how many really do.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{EmbedError, Embedder, ModelInfo, TokenCounter};

pub struct PackLayer {
    inner: Arc<dyn Embedder>,
    max_batch_tokens: usize,
}

impl PackLayer {
    /// `max_batch_tokens` = 0: no limit.
    pub fn new(inner: Arc<dyn Embedder>, max_batch_tokens: usize) -> Self {
        Self {
            inner,
            max_batch_tokens,
        }
    }
}

/// What `text` costs this backend: its tokenizer's count, else the estimate.
pub(crate) fn tokens_of(counter: Option<&dyn TokenCounter>, text: &str) -> usize {
    match counter {
        Some(c) => c.count_tokens(text),
        None => convstore_core::chunker::estimate_tokens(text),
    }
}

/// Consecutive ranges of `costs` whose sums stay within `limit` (an item
/// over it alone).
fn pack(costs: &[usize], limit: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut sum = 0usize;
    for (i, &cost) in costs.iter().enumerate() {
        if i > start && sum.saturating_add(cost) > limit {
            ranges.push(start..i);
            start = i;
            sum = 0;
        }
        sum = sum.saturating_add(cost);
    }
    if start < costs.len() {
        ranges.push(start..costs.len());
    }
    ranges
}

#[async_trait]
impl Embedder for PackLayer {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn model(&self) -> &str {
        self.inner.model()
    }

    fn token_counter(&self) -> Option<Arc<dyn TokenCounter>> {
        self.inner.token_counter()
    }

    async fn probe(&self) -> Result<ModelInfo, EmbedError> {
        self.inner.probe().await
    }

    async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if self.max_batch_tokens == 0 || inputs.len() < 2 {
            return self.inner.embed(inputs).await;
        }
        let counter = self.inner.token_counter();
        let costs: Vec<usize> = inputs
            .iter()
            .map(|t| tokens_of(counter.as_deref(), t))
            .collect();
        let ranges = pack(&costs, self.max_batch_tokens);
        if ranges.len() == 1 {
            return self.inner.embed(inputs).await;
        }
        let results =
            futures::future::join_all(ranges.iter().map(|r| self.inner.embed(&inputs[r.clone()])))
                .await;
        let mut vectors = Vec::with_capacity(inputs.len());
        for result in results {
            vectors.extend(result?);
        }
        Ok(vectors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn packs_greedily_in_order() {
        assert_eq!(pack(&[3, 3, 3], 6), vec![0..2, 2..3]);
        assert_eq!(pack(&[10, 1, 1], 6), vec![0..1, 1..3]);
        assert_eq!(pack(&[1, 1, 10], 6), vec![0..2, 2..3]);
        assert_eq!(pack(&[], 6), Vec::<std::ops::Range<usize>>::new());
    }

    proptest! {
        /// Every item in exactly one range, in order; every range within
        /// the limit unless it is one item.
        #[test]
        fn ranges_cover_and_fit(costs in proptest::collection::vec(0usize..50, 0..40), limit in 1usize..100) {
            let ranges = pack(&costs, limit);
            let mut next = 0;
            for r in &ranges {
                prop_assert_eq!(r.start, next);
                prop_assert!(r.end > r.start);
                next = r.end;
                let sum: usize = costs[r.clone()].iter().sum();
                prop_assert!(sum <= limit || r.len() == 1, "{:?} sums {}", r, sum);
            }
            prop_assert_eq!(next, costs.len());
        }
    }
}
