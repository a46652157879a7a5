//! Latency recording: an HdrHistogram per connection (no locks on the hot
//! path), merged when the run ends.
//!
//! Values are nanoseconds with 3 significant digits (0.1 % resolution) from
//! 1 ns to an hour, so a microsecond ack and a ten-second stall land in the
//! same histogram without losing either.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

const HIGHEST_NANOS: u64 = 3_600_000_000_000;

#[derive(Clone)]
pub struct Latencies {
    hist: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    pub fn new() -> Self {
        // Constant bounds (1 <= low, high >= 2 * low, sigfig <= 5): the
        // only inputs that can make creation fail are not used here.
        #[allow(clippy::expect_used, reason = "constant, valid bounds")]
        let hist = Histogram::new_with_bounds(1, HIGHEST_NANOS, 3)
            .expect("constant histogram bounds are valid");
        Self { hist }
    }

    pub fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.hist.saturating_record(nanos.max(1));
    }

    pub fn merge(&mut self, other: &Latencies) {
        // Same bounds on both sides, so addition cannot run out of range;
        // if it somehow did, the values beyond the range are what is lost.
        let _ = self.hist.add(&other.hist);
    }

    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// The value at quantile `q` (0..=1); zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.hist.is_empty() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.hist.value_at_quantile(q))
    }

    pub fn summary(&self) -> LatencySummary {
        if self.hist.is_empty() {
            return LatencySummary::default();
        }
        let us = |nanos: u64| nanos as f64 / 1000.0;
        LatencySummary {
            count: self.hist.len(),
            min_us: us(self.hist.min()),
            mean_us: self.hist.mean() / 1000.0,
            p50_us: us(self.hist.value_at_quantile(0.50)),
            p90_us: us(self.hist.value_at_quantile(0.90)),
            p95_us: us(self.hist.value_at_quantile(0.95)),
            p99_us: us(self.hist.value_at_quantile(0.99)),
            p999_us: us(self.hist.value_at_quantile(0.999)),
            max_us: us(self.hist.max()),
        }
    }
}

/// Percentiles in microseconds (the report's unit: acks take µs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p95_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ordered_and_within_resolution() {
        let mut a = Latencies::new();
        let mut b = Latencies::new();
        for i in 1..=1000u64 {
            let target = if i % 2 == 0 { &mut a } else { &mut b };
            target.record(Duration::from_micros(i));
        }
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_us - 500.0).abs() <= 1.0, "{s:?}");
        assert!((s.p99_us - 990.0).abs() <= 1.0, "{s:?}");
        assert!((s.max_us - 1000.0).abs() <= 1.0, "{s:?}");
        let ordered = [
            s.min_us, s.p50_us, s.p90_us, s.p95_us, s.p99_us, s.p999_us, s.max_us,
        ];
        assert!(ordered.windows(2).all(|w| w[0] <= w[1]), "{s:?}");
    }

    #[test]
    fn stalls_of_seconds_fit_beside_microseconds() {
        let mut h = Latencies::new();
        h.record(Duration::from_nanos(0));
        h.record(Duration::from_secs(30));
        assert_eq!(h.len(), 2);
        assert!(h.summary().max_us >= 29_000_000.0);
        assert_eq!(Latencies::new().summary(), LatencySummary::default());
    }
}
