//! In-flight limit layer: at most `max_in_flight` calls at a backend at
//! once; further calls wait their turn here (first come, first served).
//!
//! Heuristic: Ollama computes one embedding request per model at a time
//! and queues the rest without limit (reference §7), so sending it more
//! than one or two concurrent requests only moves the queue into Ollama,
//! where a timeout no longer tells "slow" from "stuck". Keeping the queue
//! here keeps every request's timeout about the backend's own work, and
//! makes the number of calls waiting per backend (its *outstanding* count)
//! visible to the balancer, which prefers backends with fewer.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use tokio::sync::Semaphore;

use crate::{EmbedError, Embedder, ModelInfo, TokenCounter};
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;

/// A backend's load, as the balancer sees it.
#[derive(Debug)]
pub struct Load {
    backend: String,
    max_in_flight: usize,
    /// Calls waiting for a slot or running.
    outstanding: AtomicUsize,
    /// Calls running (holding a slot).
    running: AtomicUsize,
}

impl Load {
    pub fn new(backend: impl Into<String>, max_in_flight: usize) -> Self {
        let backend = backend.into();
        metrics::gauge!(m::BACKEND_IN_FLIGHT, label::BACKEND => backend.clone()).set(0.0);
        Self {
            backend,
            max_in_flight: max_in_flight.max(1),
            outstanding: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    fn set_gauge(&self, running: usize) {
        metrics::gauge!(m::BACKEND_IN_FLIGHT, label::BACKEND => self.backend.clone())
            .set(running as f64);
    }
}

/// Decrements a counter when dropped, so a cancelled call is uncounted too.
struct Count<'a> {
    counter: &'a AtomicUsize,
    after: Option<&'a Load>,
}

impl<'a> Count<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self {
            counter,
            after: None,
        }
    }

    fn with_gauge(counter: &'a AtomicUsize, load: &'a Load) -> Self {
        let now = counter.fetch_add(1, Ordering::Relaxed) + 1;
        load.set_gauge(now);
        Self {
            counter,
            after: Some(load),
        }
    }
}

impl Drop for Count<'_> {
    fn drop(&mut self) {
        let now = self
            .counter
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        if let Some(load) = self.after {
            load.set_gauge(now);
        }
    }
}

/// The layer.
pub struct LimitLayer {
    inner: Arc<dyn Embedder>,
    load: Arc<Load>,
    slots: Semaphore,
}

impl LimitLayer {
    pub fn new(inner: Arc<dyn Embedder>, load: Arc<Load>) -> Self {
        let slots = Semaphore::new(load.max_in_flight);
        Self { inner, load, slots }
    }
}

#[async_trait]
impl Embedder for LimitLayer {
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
        let _outstanding = Count::new(&self.load.outstanding);
        let _slot = self.slots.acquire().await.map_err(|_| {
            EmbedError::Unreachable(format!("backend `{}`: shutting down", self.inner.name()))
        })?;
        let _running = Count::with_gauge(&self.load.running, &self.load);
        self.inner.embed(inputs).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Holds every call until released; counts the most at once.
    struct Gate {
        open: tokio::sync::Notify,
        now: AtomicUsize,
        most: AtomicUsize,
    }

    #[async_trait]
    impl Embedder for Gate {
        fn name(&self) -> &str {
            "gate"
        }
        fn model(&self) -> &str {
            "m"
        }
        async fn probe(&self) -> Result<ModelInfo, EmbedError> {
            Err(EmbedError::Unreachable("no".into()))
        }
        async fn embed(&self, inputs: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            self.open.notified().await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(inputs.iter().map(|_| vec![1.0]).collect())
        }
    }

    #[tokio::test]
    async fn at_most_max_in_flight_and_outstanding_counts_waiters() {
        let gate = Arc::new(Gate {
            open: tokio::sync::Notify::new(),
            now: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
        });
        let load = Arc::new(Load::new("gate", 2));
        let layer = Arc::new(LimitLayer::new(gate.clone(), load.clone()));
        let mut calls = Vec::new();
        for _ in 0..5 {
            let layer = layer.clone();
            calls.push(tokio::spawn(async move {
                layer.embed(&["x".to_string()]).await
            }));
        }
        while load.outstanding() < 5 || gate.now.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(load.running(), 2);
        // Cancelling a waiter uncounts it.
        if let Some(last) = calls.pop() {
            last.abort();
        }
        while load.outstanding() != 4 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        while calls.iter().any(|c| !c.is_finished()) {
            gate.open.notify_waiters();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for c in calls {
            assert!(c.await.is_ok_and(|r| r.is_ok()));
        }
        assert_eq!(gate.most.load(Ordering::SeqCst), 2);
        assert_eq!((load.outstanding(), load.running()), (0, 0));
    }
}
