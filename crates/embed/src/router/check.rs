//! Answer check layer: a backend's answer is used only if it has one
//! vector per input, each of `embedding.dimensions` finite numbers.
//!
//! Heuristic: a wrong answer is a backend fault, not an input fault, so it
//! is a retryable failure (another backend gets the work, the breaker
//! counts it) rather than a rejection. A wrong *dimension* means the
//! backend serves another model than configured: the vectors must never
//! reach the index, where they would be unsearchable garbage.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{EmbedError, Embedder, ModelInfo, TokenCounter};

pub struct CheckLayer {
    inner: Arc<dyn Embedder>,
    dimensions: usize,
}

impl CheckLayer {
    pub fn new(inner: Arc<dyn Embedder>, dimensions: usize) -> Self {
        Self { inner, dimensions }
    }
}

/// Checks an answer to `inputs` texts against `dimensions`.
pub fn check_answer(
    backend: &str,
    vectors: &[Vec<f32>],
    inputs: usize,
    dimensions: usize,
) -> Result<(), EmbedError> {
    if vectors.len() != inputs {
        return Err(EmbedError::Protocol(format!(
            "backend `{backend}` returned {} vectors for {inputs} inputs",
            vectors.len()
        )));
    }
    if let Some(bad) = vectors.iter().find(|v| v.len() != dimensions) {
        return Err(EmbedError::DimensionMismatch {
            expected: dimensions,
            got: bad.len(),
        });
    }
    if vectors.iter().flatten().any(|x| !x.is_finite()) {
        return Err(EmbedError::Protocol(format!(
            "backend `{backend}` returned a vector with NaN or infinite values"
        )));
    }
    Ok(())
}

#[async_trait]
impl Embedder for CheckLayer {
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
        let vectors = self.inner.embed(inputs).await?;
        check_answer(self.inner.name(), &vectors, inputs.len(), self.dimensions)?;
        Ok(vectors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_dimension_and_finiteness() {
        assert!(check_answer("b", &[vec![1.0, 0.0]], 1, 2).is_ok());
        assert!(matches!(
            check_answer("b", &[vec![1.0, 0.0]], 2, 2),
            Err(EmbedError::Protocol(_))
        ));
        assert!(matches!(
            check_answer("b", &[vec![1.0]], 1, 2),
            Err(EmbedError::DimensionMismatch {
                expected: 2,
                got: 1
            })
        ));
        assert!(matches!(
            check_answer("b", &[vec![f32::NAN, 0.0]], 1, 2),
            Err(EmbedError::Protocol(_))
        ));
    }
}
