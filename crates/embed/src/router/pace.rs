//! Pacing layer: keeps a hosted backend within its `requests_per_minute`
//! and `tokens_per_minute`, by waiting before a request rather than being
//! refused with 429 after it.
//!
//! Heuristic: one token bucket per limit, full at start, holding a
//! minute's allowance and refilled continuously, as the hosted APIs
//! count. A request takes its cost at once and waits until the bucket
//! would have held it (a reservation: requests go in arrival order, and a
//! request dearer than a whole minute waits for a full bucket, not
//! forever). The wait counts towards `embedding.max_wait_ms` (the retry
//! layer's deadline drops a call waiting too long) but not towards the
//! backend's own `timeout_ms`, which is about its answer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::pack::tokens_of;
use crate::{EmbedError, Embedder, ModelInfo, TokenCounter};
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;

/// The limits of one backend; 0 = none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PaceConfig {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u64,
}

impl PaceConfig {
    pub fn is_off(&self) -> bool {
        self.requests_per_minute == 0 && self.tokens_per_minute == 0
    }
}

/// A minute's allowance, refilled continuously.
#[derive(Debug)]
struct Bucket {
    per_minute: f64,
    /// (level, when it was that): the level may go below zero, by what
    /// reservations took ahead of the refill.
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(per_minute: f64) -> Self {
        Self {
            per_minute,
            state: Mutex::new((per_minute, Instant::now())),
        }
    }

    /// Takes `cost` now; how long to wait before using it. The debt is
    /// bounded (a minute's allowance), so a backlog of callers that gave
    /// up cannot push later ones ever further out.
    fn reserve(&self, cost: f64, now: Instant) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (level, at) = *state;
        let per_second = self.per_minute / 60.0;
        let refilled = (level + now.saturating_duration_since(at).as_secs_f64() * per_second)
            .min(self.per_minute);
        // A request dearer than the bucket takes a full bucket's worth:
        // the API counts it whole, but it can never wait for more.
        let level = (refilled - cost.min(self.per_minute)).max(-self.per_minute);
        *state = (level, now);
        if level >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-level / per_second)
        }
    }

    /// Gives back what a request reserved and never sent (its caller gave
    /// up while it waited).
    fn refund(&self, cost: f64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0 = (state.0 + cost.min(self.per_minute)).min(self.per_minute);
    }
}

/// What one request reserved; given back unless the request was sent.
struct Reservation<'a> {
    taken: Vec<(&'a Bucket, f64)>,
    sent: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.sent {
            for (bucket, cost) in &self.taken {
                bucket.refund(*cost);
            }
        }
    }
}

pub struct PaceLayer {
    inner: Arc<dyn Embedder>,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

impl PaceLayer {
    pub fn new(inner: Arc<dyn Embedder>, config: PaceConfig) -> Self {
        let bucket = |per_minute: f64| (per_minute > 0.0).then(|| Bucket::new(per_minute));
        Self {
            inner,
            requests: bucket(f64::from(config.requests_per_minute)),
            tokens: bucket(config.tokens_per_minute as f64),
        }
    }

    /// Reserves a request of `inputs`; how long it waits for its turn.
    fn reserve(&self, inputs: &[String], now: Instant) -> (Reservation<'_>, Duration) {
        let mut wait = Duration::ZERO;
        let mut taken = Vec::with_capacity(2);
        if let Some(requests) = &self.requests {
            wait = wait.max(requests.reserve(1.0, now));
            taken.push((requests, 1.0));
        }
        if let Some(tokens) = &self.tokens {
            let counter = self.inner.token_counter();
            let cost = inputs
                .iter()
                .map(|t| tokens_of(counter.as_deref(), t))
                .fold(0usize, usize::saturating_add) as f64;
            wait = wait.max(tokens.reserve(cost, now));
            taken.push((tokens, cost));
        }
        (Reservation { taken, sent: false }, wait)
    }
}

#[async_trait]
impl Embedder for PaceLayer {
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
        let (mut reservation, wait) = self.reserve(inputs, Instant::now());
        if !wait.is_zero() {
            metrics::histogram!(m::EMBED_PACING_WAIT_SECONDS, label::BACKEND => self.inner.name().to_string())
                .record(wait.as_secs_f64());
            // Dropped here (the caller's deadline), the reservation is
            // given back.
            tokio::time::sleep(wait).await;
        }
        reservation.sent = true;
        drop(reservation);
        self.inner.embed(inputs).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_a_minute_through_then_paces() {
        let start = Instant::now();
        let b = Bucket::new(60.0); // one per second
        for _ in 0..60 {
            assert_eq!(b.reserve(1.0, start), Duration::ZERO);
        }
        assert_eq!(b.reserve(1.0, start), Duration::from_secs(1));
        assert_eq!(b.reserve(1.0, start), Duration::from_secs(2));
        // Ten seconds later the two reservations are paid and 8 are back.
        let later = start + Duration::from_secs(10);
        for _ in 0..8 {
            assert_eq!(b.reserve(1.0, later), Duration::ZERO);
        }
        assert_eq!(b.reserve(1.0, later), Duration::from_secs(1));
    }

    #[test]
    fn a_request_given_up_is_given_back_and_debt_is_bounded() {
        let start = Instant::now();
        let b = Bucket::new(60.0);
        assert_eq!(b.reserve(60.0, start), Duration::ZERO);
        // Callers that give up while waiting leave no debt behind them.
        for _ in 0..100 {
            assert!(b.reserve(1.0, start) <= Duration::from_secs(1));
            b.refund(1.0);
        }
        // Callers that stay: the wait grows to a minute's worth, no more.
        for _ in 0..200 {
            assert!(b.reserve(1.0, start) <= Duration::from_secs(60));
        }
    }

    #[test]
    fn a_request_dearer_than_a_minute_waits_at_most_a_minute() {
        let start = Instant::now();
        let b = Bucket::new(600.0);
        assert_eq!(b.reserve(50_000.0, start), Duration::ZERO);
        assert_eq!(b.reserve(600.0, start), Duration::from_secs(60));
    }
}
