//! Balancer layer: sends a call to one backend chosen by the strategy
//! among those that can take it now, and fails over at once to another
//! when that one fails.
//!
//! Heuristics:
//! - **Who can take a call**: a backend whose breaker admits calls (not
//!   open, no `Retry-After` pending) and that was not refused (it answered
//!   with another dimension than configured). Health probes do not decide:
//!   a backend that fails its probe but embeds fine is still used, and one
//!   that stops embedding is caught by its breaker within a few calls.
//! - **Fail over at once, back off when all have failed**: within one call,
//!   each backend is tried at most once; a failure moves the call to the
//!   next pick immediately (the other backends are probably fine, and
//!   waiting would only add latency). When every candidate has failed, the
//!   call fails with the last error and the retry layer above backs off.
//! - A rejection (400) is returned at once: the input is at fault, and
//!   another backend would refuse it too. A refusal for length also
//!   teaches that backend a smaller chunk budget
//!   (`Backend::learn_from_length_refusal`), published to the chunker at
//!   once.

use std::sync::Arc;

use async_trait::async_trait;

use super::strategy::{Candidate, Strategy};
use super::{Backend, ChunkBudget};
use crate::{EmbedError, Embedder, ModelInfo, TokenCounter};
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;

pub struct Balancer {
    model: String,
    backends: Arc<[Arc<Backend>]>,
    strategy: Box<dyn Strategy>,
    budget: Arc<ChunkBudget>,
}

impl Balancer {
    pub(crate) fn new(
        model: String,
        backends: Arc<[Arc<Backend>]>,
        strategy: Box<dyn Strategy>,
        budget: Arc<ChunkBudget>,
    ) -> Self {
        Self {
            model,
            backends,
            strategy,
            budget,
        }
    }

    /// Backends not yet tried in this call that can take it now, in index
    /// order.
    fn candidates(&self, tried: &[bool]) -> Vec<Candidate> {
        self.backends
            .iter()
            .enumerate()
            .filter(|(i, b)| !tried[*i] && b.can_take_calls())
            .map(|(index, b)| Candidate {
                index,
                weight: b.weight,
                outstanding: b.load.outstanding(),
                latency: b.latency.get(),
            })
            .collect()
    }

    /// Why no backend can take a call, for the error message.
    fn why_none(&self) -> String {
        let reasons: Vec<String> = self
            .backends
            .iter()
            .map(|b| format!("{}: {}", b.name, b.unavailable_reason()))
            .collect();
        format!(
            "no embedding backend can take calls ({})",
            reasons.join("; ")
        )
    }
}

#[async_trait]
impl Embedder for Balancer {
    fn name(&self) -> &str {
        "router"
    }

    fn model(&self) -> &str {
        &self.model
    }

    /// All backends serve the same model: the first exact counter any
    /// of them has.
    fn token_counter(&self) -> Option<Arc<dyn TokenCounter>> {
        self.backends.iter().find_map(|b| b.client.token_counter())
    }

    /// The first backend that probes fine; else the first error.
    async fn probe(&self) -> Result<ModelInfo, EmbedError> {
        let mut first_error = None;
        for b in self.backends.iter() {
            match b.client.probe().await {
                Ok(info) => return Ok(info),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| EmbedError::Unreachable(self.why_none())))
    }

    async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut tried = vec![false; self.backends.len()];
        let mut last_error = None;
        loop {
            let candidates = self.candidates(&tried);
            if candidates.is_empty() {
                return Err(last_error.unwrap_or_else(|| EmbedError::Unreachable(self.why_none())));
            }
            let chosen = candidates[self.strategy.pick(&candidates).min(candidates.len() - 1)];
            tried[chosen.index] = true;
            let backend = &self.backends[chosen.index];
            match backend.stack.embed(inputs).await {
                Ok(vectors) => return Ok(vectors),
                Err(e @ EmbedError::TooLong { .. }) => {
                    backend.learn_from_length_refusal(inputs);
                    self.budget.publish(&self.backends);
                    return Err(e);
                }
                Err(e @ EmbedError::Rejected { .. }) => return Err(e),
                Err(e) => {
                    tracing::debug!(backend = %backend.name, error = %e, "Embedding call failed; trying another backend");
                    metrics::counter!(m::EMBED_FAILOVERS, label::BACKEND => backend.name.clone())
                        .increment(1);
                    last_error = Some(e);
                }
            }
        }
    }
}
