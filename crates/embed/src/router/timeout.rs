//! Timeout layer: a call that has not answered within the backend's
//! `timeout_ms` fails with [`EmbedError::Timeout`] (retryable: the router
//! sends the work elsewhere and the breaker counts it).
//!
//! Heuristic: the HTTP clients already bound each request with the same
//! timeout; this layer makes the bound hold for any [`Embedder`] (an
//! in-process model has no socket to time out) and includes time spent in
//! layers below it. It sits inside the in-flight limit, so waiting for a
//! slot is not charged to the backend.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{EmbedError, Embedder, ModelInfo, TokenCounter};

pub struct TimeoutLayer {
    inner: Arc<dyn Embedder>,
    timeout: Duration,
}

impl TimeoutLayer {
    pub fn new(inner: Arc<dyn Embedder>, timeout: Duration) -> Self {
        Self { inner, timeout }
    }
}

#[async_trait]
impl Embedder for TimeoutLayer {
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
        tokio::time::timeout(self.timeout, self.inner.probe())
            .await
            .unwrap_or(Err(EmbedError::Timeout(self.timeout)))
    }

    async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        tokio::time::timeout(self.timeout, self.inner.embed(inputs))
            .await
            .unwrap_or(Err(EmbedError::Timeout(self.timeout)))
    }
}
