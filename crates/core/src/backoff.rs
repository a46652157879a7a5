//! Exponential backoff with full jitter.
//!
//! Heuristic: the n-th retry sleeps a uniform random time in
//! `[0, min(max, initial · 2ⁿ)]` ("full jitter"), so many workers retrying
//! the same dead backend or database spread out instead of arriving in
//! waves. A server's `Retry-After` is a floor, capped at the maximum delay:
//! we never come back sooner than asked, nor wait longer than configured.
//!
//! Shared by the database writes of the pipeline's workers and by the
//! embedding router's retry layer.

use std::time::Duration;

use rand::RngExt;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The delay before the next retry; grows with every call.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let jittered =
            Duration::from_secs_f64(rand::rng().random_range(0.0..=ceiling.as_secs_f64()));
        match retry_after {
            Some(floor) => jittered.max(floor.min(self.max)),
            None => jittered,
        }
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_growing_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for n in 0..10u32 {
            let ceiling = Duration::from_millis(100 * 2u64.pow(n)).min(Duration::from_secs(1));
            assert!(b.next_delay(None) <= ceiling);
        }
        assert_eq!(b.attempts(), 10);
        // A Retry-After above the ceiling is capped at it.
        assert!(b.next_delay(Some(Duration::from_secs(9))) == Duration::from_secs(1));
    }

    #[test]
    fn retry_after_is_a_floor() {
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_secs(1));
        assert!(b.next_delay(Some(Duration::from_millis(700))) >= Duration::from_millis(700));
    }
}
