//! Retry layer: retries a failed call (through the balancer, so usually on
//! another backend) with exponential backoff and full jitter, until the
//! call succeeds, the input is rejected, or `embedding.max_wait_ms` has
//! passed since the call began.
//!
//! Heuristics:
//! - **What is retried**: everything but a rejection (400/413/422). Network
//!   errors, timeouts, 429 and 5xx are the textbook cases; a missing model
//!   (404), a wrong dimension or a garbled answer are faults of *one*
//!   backend, and another backend (or an operator) may fix them before the
//!   wait is over. A rejection is about the input: the caller isolates the
//!   bad input instead (poison isolation, in the pipeline).
//! - **Full jitter**: the n-th retry sleeps a uniform random time in
//!   `[0, min(retry_max, retry_initial · 2ⁿ)]`, so the workers of one or
//!   many instances retrying the same dead backends spread out instead of
//!   arriving in waves. A `Retry-After` from the last failure is a floor
//!   (capped at `retry_max`); the breaker also holds that backend back.
//! - **One deadline per call**: a call never takes longer than
//!   `max_wait`, whatever the retries, so the pipeline can store the batch as
//!   `pending` and move on; the backfill finishes the job later.
//! - **No waiting on known-dead backends**: when every backend's circuit is
//!   open (or it is refused), the call fails at once instead of sleeping
//!   until `max_wait`: the breakers already say nothing will answer soon,
//!   and the text is better stored now (as `pending`) than held in memory.
//!   When an open period ends, the next call is the trial.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::{EmbedError, Embedder, ModelInfo, TokenCounter};
use convstore_core::backoff::Backoff;
use convstore_telemetry::metrics as m;

/// The retry policy's settings.
#[derive(Debug, Clone, Copy)]
pub struct RetryConfig {
    pub initial: Duration,
    pub max: Duration,
    /// The longest one call may take, retries included.
    pub max_wait: Duration,
}

/// Whether retrying is pointless now (every circuit open).
pub type Hopeless = Arc<dyn Fn() -> bool + Send + Sync>;

pub struct RetryLayer {
    inner: Arc<dyn Embedder>,
    config: RetryConfig,
    hopeless: Option<Hopeless>,
}

impl RetryLayer {
    pub fn new(inner: Arc<dyn Embedder>, config: RetryConfig) -> Self {
        Self {
            inner,
            config,
            hopeless: None,
        }
    }

    /// Gives up at once, instead of backing off, whenever `hopeless` says
    /// so after a failure.
    pub fn give_up_when(mut self, hopeless: Hopeless) -> Self {
        self.hopeless = Some(hopeless);
        self
    }
}

#[async_trait]
impl Embedder for RetryLayer {
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
        let deadline = Instant::now() + self.config.max_wait;
        let mut backoff = Backoff::new(self.config.initial, self.config.max);
        loop {
            let attempt = tracing::info_span!(
                target: "convstore::trace",
                "embed.attempt",
                attempt = backoff.attempts() + 1,
                inputs = inputs.len()
            );
            let call = self.inner.embed(inputs).instrument(attempt);
            let error = match tokio::time::timeout_at(deadline, call).await {
                Ok(Ok(vectors)) => return Ok(vectors),
                Ok(Err(e)) if e.is_input_refusal() => return Err(e),
                Ok(Err(e)) => e,
                Err(_) => return Err(EmbedError::Timeout(self.config.max_wait)),
            };
            let retry_after = match &error {
                EmbedError::Transient { retry_after, .. } => *retry_after,
                _ => None,
            };
            if self.hopeless.as_ref().is_some_and(|h| h()) {
                tracing::debug!(error = %error, "Every backend's circuit is open; not waiting");
                return Err(error);
            }
            let delay = backoff.next_delay(retry_after);
            if Instant::now() + delay >= deadline {
                tracing::debug!(
                    error = %error,
                    attempts = backoff.attempts(),
                    inputs = inputs.len(),
                    "No backend embedded the texts within embedding.max_wait_ms"
                );
                return Err(error);
            }
            metrics::counter!(m::EMBED_RETRIES).increment(1);
            tracing::debug!(error = %error, attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64, "Embedding failed on every backend tried; retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Fails with the queued errors, then succeeds.
    struct Script {
        errors: Mutex<Vec<EmbedError>>,
        calls: Mutex<u32>,
    }

    #[async_trait]
    impl Embedder for Script {
        fn name(&self) -> &str {
            "script"
        }
        fn model(&self) -> &str {
            "m"
        }
        async fn probe(&self) -> Result<ModelInfo, EmbedError> {
            Err(EmbedError::Unreachable("no".into()))
        }
        async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
            *self.calls.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            match self.errors.lock().unwrap_or_else(|p| p.into_inner()).pop() {
                Some(e) => Err(e),
                None => Ok(inputs.iter().map(|_| vec![1.0]).collect()),
            }
        }
    }

    fn scripted(errors: Vec<EmbedError>, max_wait: Duration) -> (Arc<Script>, RetryLayer) {
        let script = Arc::new(Script {
            errors: Mutex::new(errors),
            calls: Mutex::new(0),
        });
        let layer = RetryLayer::new(
            script.clone(),
            RetryConfig {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(1),
                max_wait,
            },
        );
        (script, layer)
    }

    fn calls(s: &Script) -> u32 {
        *s.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[tokio::test(start_paused = true)]
    async fn retries_backend_faults_but_not_rejections() {
        let faults = vec![
            EmbedError::ModelUnavailable("404".into()),
            EmbedError::Timeout(Duration::from_secs(1)),
            EmbedError::Transient {
                status: 503,
                message: "busy".into(),
                retry_after: None,
            },
            EmbedError::Unreachable("refused".into()),
        ];
        let (script, layer) = scripted(faults, Duration::from_secs(60));
        assert!(layer.embed(&["a".into()]).await.is_ok());
        assert_eq!(calls(&script), 5);

        let (script, layer) = scripted(
            vec![EmbedError::Rejected {
                status: 400,
                message: "bad".into(),
            }],
            Duration::from_secs(60),
        );
        assert!(matches!(
            layer.embed(&["a".into()]).await,
            Err(EmbedError::Rejected { .. })
        ));
        assert_eq!(calls(&script), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_max_wait_and_honours_retry_after() {
        let forever: Vec<EmbedError> = (0..1000)
            .map(|_| EmbedError::Unreachable("down".into()))
            .collect();
        let (script, layer) = scripted(forever, Duration::from_secs(5));
        let started = Instant::now();
        assert!(matches!(
            layer.embed(&["a".into()]).await,
            Err(EmbedError::Unreachable(_))
        ));
        assert!(started.elapsed() <= Duration::from_secs(5));
        assert!(calls(&script) > 3, "{}", calls(&script));

        let (script, layer) = scripted(
            vec![EmbedError::Transient {
                status: 429,
                message: "later".into(),
                retry_after: Some(Duration::from_millis(800)),
            }],
            Duration::from_secs(60),
        );
        let started = Instant::now();
        assert!(layer.embed(&["a".into()]).await.is_ok());
        assert!(started.elapsed() >= Duration::from_millis(800));
        assert_eq!(calls(&script), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_once_when_hopeless() {
        let forever: Vec<EmbedError> = (0..10)
            .map(|_| EmbedError::Unreachable("down".into()))
            .collect();
        let (script, layer) = scripted(forever, Duration::from_secs(60));
        let layer = layer.give_up_when(Arc::new(|| true));
        let started = Instant::now();
        assert!(layer.embed(&["a".into()]).await.is_err());
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(calls(&script), 1);
    }
}
