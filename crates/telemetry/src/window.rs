//! Rolling windows: counters and histograms over the last minute, for
//! `/v1/stats` (Prometheus keeps its own cumulative series; these answer
//! "what is happening now" without a Prometheus server).
//!
//! Time is cut into [`SLOTS`] slots of [`SLOT`] each. Writers add to the
//! current slot with one relaxed atomic add; a ticker ([`Slots::rotate`])
//! clears the oldest slot and makes it current every [`SLOT`]. A reader sums
//! the current slot and the ones before it, which covers the last 55 to 60
//! seconds. No locks on the write path, and nothing allocates.
//!
//! Histograms are log-linear: four buckets per power of two, so a
//! percentile is within about 12 % of the true value, over 1 µs to about an
//! hour, in 1 KiB per slot.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Length of one slot.
pub const SLOT: Duration = Duration::from_secs(5);
/// Slots kept: the window ([`SLOTS`]` - 1` slots, the current one
/// included) plus the one cleared at the next rotation.
pub const SLOTS: usize = 13;
/// Buckets per histogram slot.
pub const BUCKETS: usize = 128;
/// Sub-buckets per power of two.
const SUB_BITS: u32 = 2;
const SUB: usize = 1 << SUB_BITS;

/// Which slot is current, and when each slot began.
#[derive(Debug)]
pub struct Slots {
    current: AtomicUsize,
    starts: Mutex<[Option<Instant>; SLOTS]>,
}

impl Slots {
    pub fn new(now: Instant) -> Self {
        let mut starts = [None; SLOTS];
        starts[0] = Some(now);
        Self {
            current: AtomicUsize::new(0),
            starts: Mutex::new(starts),
        }
    }

    /// The slot writers add to now.
    #[inline]
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// Makes the next slot current, beginning at `now`, after `clear` has
    /// emptied it. Returns the new slot. Called by one ticker.
    pub fn rotate(&self, now: Instant, clear: impl FnOnce(usize)) -> usize {
        let mut starts = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        let next = (self.current() + 1) % SLOTS;
        clear(next);
        starts[next] = Some(now);
        self.current.store(next, Ordering::Release);
        next
    }

    /// The slots inside the window (current first) and the time the window
    /// covers up to `now`.
    pub fn window(&self, now: Instant) -> (Vec<usize>, Duration) {
        let starts = *self.starts.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current();
        let mut slots = Vec::with_capacity(SLOTS - 1);
        let mut oldest = now;
        for back in 0..SLOTS - 1 {
            let slot = (current + SLOTS - back) % SLOTS;
            match starts[slot] {
                Some(start) => {
                    slots.push(slot);
                    oldest = oldest.min(start);
                }
                None => break,
            }
        }
        (slots, now.saturating_duration_since(oldest))
    }
}

/// A counter: per-slot increments and a lifetime total.
#[derive(Debug)]
pub struct WindowCounter {
    slots: [AtomicU64; SLOTS],
    total: AtomicU64,
}

impl Default for WindowCounter {
    fn default() -> Self {
        Self {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            total: AtomicU64::new(0),
        }
    }
}

impl WindowCounter {
    #[inline]
    pub fn add(&self, slot: usize, n: u64) {
        self.slots[slot % SLOTS].fetch_add(n, Ordering::Relaxed);
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub fn clear(&self, slot: usize) {
        self.slots[slot % SLOTS].store(0, Ordering::Relaxed);
    }

    /// Sum over `slots`.
    pub fn sum(&self, slots: &[usize]) -> u64 {
        slots
            .iter()
            .map(|&s| self.slots[s % SLOTS].load(Ordering::Relaxed))
            .sum()
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

struct HistSlot {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    /// Sum of the scaled values, in thousandths (so sub-unit values count).
    sum_milli: AtomicU64,
    /// Largest scaled value, in thousandths.
    max_milli: AtomicU64,
}

impl Default for HistSlot {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_milli: AtomicU64::new(0),
            max_milli: AtomicU64::new(0),
        }
    }
}

/// A histogram of values multiplied by `scale` before bucketing (1e6 for
/// seconds, so buckets start at 1 µs; 1 for counts).
pub struct WindowHistogram {
    scale: f64,
    slots: Box<[HistSlot]>,
}

impl std::fmt::Debug for WindowHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowHistogram")
            .field("scale", &self.scale)
            .finish_non_exhaustive()
    }
}

impl WindowHistogram {
    pub fn new(scale: f64) -> Self {
        Self {
            scale,
            slots: (0..SLOTS).map(|_| HistSlot::default()).collect(),
        }
    }

    /// For durations recorded in seconds: buckets from 1 µs.
    pub fn seconds() -> Self {
        Self::new(1e6)
    }

    #[inline]
    pub fn record(&self, slot: usize, value: f64) {
        let scaled = value * self.scale;
        let s = &self.slots[slot % SLOTS];
        s.buckets[bucket_index(scaled)].fetch_add(1, Ordering::Relaxed);
        s.count.fetch_add(1, Ordering::Relaxed);
        // NaN and negatives become 0; `as` saturates huge values.
        let milli = (scaled * 1000.0).round().max(0.0) as u64;
        s.sum_milli.fetch_add(milli, Ordering::Relaxed);
        s.max_milli.fetch_max(milli, Ordering::Relaxed);
    }

    pub fn clear(&self, slot: usize) {
        let s = &self.slots[slot % SLOTS];
        for b in &s.buckets {
            b.store(0, Ordering::Relaxed);
        }
        s.count.store(0, Ordering::Relaxed);
        s.sum_milli.store(0, Ordering::Relaxed);
        s.max_milli.store(0, Ordering::Relaxed);
    }

    /// The merged distribution over `slots`.
    pub fn summary(&self, slots: &[usize]) -> Summary {
        let mut buckets = [0u64; BUCKETS];
        let (mut count, mut sum_milli, mut max_milli) = (0u64, 0u64, 0u64);
        for &slot in slots {
            let s = &self.slots[slot % SLOTS];
            for (acc, b) in buckets.iter_mut().zip(&s.buckets) {
                *acc += b.load(Ordering::Relaxed);
            }
            count += s.count.load(Ordering::Relaxed);
            sum_milli = sum_milli.saturating_add(s.sum_milli.load(Ordering::Relaxed));
            max_milli = max_milli.max(s.max_milli.load(Ordering::Relaxed));
        }
        Summary {
            scale: self.scale,
            buckets,
            count,
            sum_milli,
            max_milli,
        }
    }
}

/// A merged histogram; values come back unscaled (seconds for durations).
#[derive(Debug, Clone)]
pub struct Summary {
    scale: f64,
    buckets: [u64; BUCKETS],
    pub count: u64,
    sum_milli: u64,
    max_milli: u64,
}

impl Summary {
    pub fn sum(&self) -> f64 {
        self.sum_milli as f64 / 1000.0 / self.scale
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum() / self.count as f64)
    }

    pub fn max(&self) -> Option<f64> {
        (self.count > 0).then(|| self.max_milli as f64 / 1000.0 / self.scale)
    }

    /// The `q`-quantile (0..=1), interpolated inside its bucket and never
    /// above the largest value seen.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * self.count as f64).ceil().max(1.0);
        let mut below = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (below + n) as f64 >= rank {
                let (lo, hi) = bucket_bounds(i);
                let within = (rank - below as f64) / n as f64;
                let scaled = lo + (hi - lo) * within;
                let max = self.max_milli as f64 / 1000.0;
                return Some(scaled.min(max) / self.scale);
            }
            below += n;
        }
        self.max()
    }
}

/// Bucket of a scaled value: 0 for [0, 1), then four per power of two.
#[inline]
pub fn bucket_index(scaled: f64) -> usize {
    if scaled.is_nan() || scaled < 1.0 {
        return 0;
    }
    let bits = scaled.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as usize - 1023;
    let sub = ((bits >> (52 - SUB_BITS)) & (SUB as u64 - 1)) as usize;
    (1 + exponent * SUB + sub).min(BUCKETS - 1)
}

/// Lower and upper bound (scaled) of bucket `i`.
pub fn bucket_bounds(i: usize) -> (f64, f64) {
    if i == 0 {
        return (0.0, 1.0);
    }
    let exponent = ((i - 1) / SUB) as i32;
    let sub = ((i - 1) % SUB) as f64;
    let base = 2f64.powi(exponent);
    (
        base * (1.0 + sub / SUB as f64),
        base * (1.0 + (sub + 1.0) / SUB as f64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_contain_their_values() {
        for v in [1.0, 1.3, 2.0, 3.9, 17.0, 1000.0, 123_456.7, 3.5e9] {
            let i = bucket_index(v);
            let (lo, hi) = bucket_bounds(i);
            assert!(lo <= v && v < hi, "{v} not in bucket {i} [{lo}, {hi})");
        }
        assert_eq!(bucket_index(0.5), 0);
        assert_eq!(bucket_index(-3.0), 0);
        assert_eq!(bucket_index(f64::NAN), 0);
        assert_eq!(bucket_index(f64::INFINITY), BUCKETS - 1);
        assert_eq!(bucket_index(1e300), BUCKETS - 1);
    }

    #[test]
    fn quantiles_are_within_a_bucket_of_the_truth() {
        let h = WindowHistogram::seconds();
        // 1..=1000 ms, uniformly.
        for ms in 1..=1000 {
            h.record(0, ms as f64 / 1000.0);
        }
        let s = h.summary(&[0]);
        assert_eq!(s.count, 1000);
        for (q, truth) in [(0.5, 0.5), (0.95, 0.95), (0.99, 0.99)] {
            let got = s.quantile(q).unwrap();
            assert!(
                (got - truth).abs() / truth < 0.13,
                "q{q}: got {got}, truth {truth}"
            );
        }
        assert!((s.mean().unwrap() - 0.5005).abs() < 1e-6);
        assert!((s.max().unwrap() - 1.0).abs() < 1e-9);
        assert!(s.quantile(1.0).unwrap() <= 1.0);
    }

    #[test]
    fn empty_summary_has_no_numbers() {
        let s = WindowHistogram::seconds().summary(&[0, 1, 2]);
        assert_eq!(s.count, 0);
        assert!(s.quantile(0.5).is_none() && s.mean().is_none() && s.max().is_none());
    }

    #[test]
    fn rotation_drops_the_oldest_slot_only() {
        let t0 = Instant::now();
        let slots = Slots::new(t0);
        let c = WindowCounter::default();
        c.add(slots.current(), 7);
        let (w, covered) = slots.window(t0 + Duration::from_secs(2));
        assert_eq!(c.sum(&w), 7);
        assert_eq!(covered, Duration::from_secs(2));
        // Rotate through a whole window: the 7 is still inside after
        // SLOTS - 2 rotations, gone after SLOTS - 1.
        for i in 1..SLOTS {
            let now = t0 + SLOT * i as u32;
            slots.rotate(now, |s| c.clear(s));
            c.add(slots.current(), 1);
            let (w, _) = slots.window(now);
            let expect = if i < SLOTS - 1 {
                7 + i as u64
            } else {
                i as u64
            };
            assert_eq!(c.sum(&w), expect, "after {i} rotations");
        }
        assert_eq!(c.total(), 7 + (SLOTS as u64 - 1));
        let now = t0 + SLOT * SLOTS as u32;
        let (w, covered) = slots.window(now);
        assert_eq!(w.len(), SLOTS - 1);
        assert_eq!(covered, SLOT * (SLOTS as u32 - 1));
    }
}
