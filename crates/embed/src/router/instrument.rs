//! Instrumentation layer: per-backend metrics (requests and inputs by
//! outcome, latency) and the latency estimate the `latency` strategy uses.
//!
//! Heuristic for the estimate: an exponentially weighted moving average of
//! call durations with weight 0.3 for the newest sample (about the last
//! five calls matter), so a backend that slows down is noticed within a few
//! calls but one slow call does not swing it. A failed call counts as at
//! least twice the current estimate: a backend that fails fast must not look
//! fast.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tracing::Instrument as _;

use crate::{EmbedError, Embedder, ModelInfo, TokenCounter};

/// Weight of the newest sample.
const ALPHA: f64 = 0.3;

/// A backend's latency estimate, in seconds; `None` until its first call.
#[derive(Debug, Default)]
pub struct Ewma {
    value: Mutex<Option<f64>>,
}

impl Ewma {
    pub fn get(&self) -> Option<f64> {
        *self.value.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn observe(&self, sample: Duration, failed: bool) {
        let mut value = self.value.lock().unwrap_or_else(|p| p.into_inner());
        let mut sample = sample.as_secs_f64();
        if failed {
            sample = sample.max(value.unwrap_or(0.0) * 2.0);
        }
        *value = Some(match *value {
            None => sample,
            Some(old) => old + ALPHA * (sample - old),
        });
    }
}

/// The outcome label of a call.
pub fn outcome_label<T>(result: &Result<T, EmbedError>) -> &'static str {
    match result {
        Ok(_) => convstore_telemetry::events::outcome::OK,
        Err(EmbedError::Unreachable(_)) => "unreachable",
        Err(EmbedError::Timeout(_)) => "timeout",
        Err(EmbedError::Transient { .. }) => "transient",
        Err(EmbedError::Rejected { .. }) => "rejected",
        Err(EmbedError::TooLong { .. }) => "too_long",
        Err(EmbedError::ModelUnavailable(_)) => "model_unavailable",
        Err(EmbedError::Protocol(_)) => "protocol_error",
        Err(EmbedError::DimensionMismatch { .. }) => "dimension_mismatch",
    }
}

pub struct InstrumentLayer {
    inner: Arc<dyn Embedder>,
    latency: Arc<Ewma>,
}

impl InstrumentLayer {
    pub fn new(inner: Arc<dyn Embedder>, latency: Arc<Ewma>) -> Self {
        Self { inner, latency }
    }
}

#[async_trait]
impl Embedder for InstrumentLayer {
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
        let started = Instant::now();
        let span = tracing::info_span!(
            target: "convstore::trace",
            "embed.request",
            backend = self.inner.name(),
            inputs = inputs.len()
        );
        let result = self.inner.embed(inputs).instrument(span).await;
        let elapsed = started.elapsed();
        let backend = self.inner.name().to_string();
        let outcome = outcome_label(&result);
        // A rejection is an answer about the input, fast or slow: it says
        // nothing about the backend's speed.
        if !result.as_ref().is_err_and(EmbedError::is_input_refusal) {
            self.latency.observe(elapsed, result.is_err());
        }
        convstore_telemetry::events::embed_request(
            &backend,
            outcome,
            inputs.len() as u64,
            elapsed.as_secs_f64(),
        );
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_follows_and_failures_count_double() {
        let e = Ewma::default();
        assert_eq!(e.get(), None);
        e.observe(Duration::from_millis(100), false);
        assert_eq!(e.get(), Some(0.1));
        e.observe(Duration::from_millis(200), false);
        let v = e.get().unwrap_or(0.0);
        assert!((v - 0.13).abs() < 1e-9, "{v}");
        // A 1 ms failure counts as 2 × 0.13 s.
        e.observe(Duration::from_millis(1), true);
        let after = e.get().unwrap_or(0.0);
        assert!((after - (0.13 + 0.3 * 0.13)).abs() < 1e-9, "{after}");
    }
}
