//! Is the pipeline making progress? The answer gates the watchdog pings.
//!
//! "Progress" is any of:
//! - a batch finished (stored, or given up and reported);
//! - a backend or database call returned, whatever its outcome: workers
//!   retrying a backend that is down are alive and will catch up once it is
//!   back, and a restart would only lose the queue;
//! - nothing to do: the queue is empty and no batch is in flight.
//!
//! A worker stuck inside a call that never returns (a hung connection with
//! no timeout, a deadlock) shows none of these. After `stall_after` without
//! progress the pipeline counts as stalled: the watchdog pings stop and
//! systemd restarts convstore once `WatchdogSec` passes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Counters read from the running pipeline at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// Conversations waiting in the queue.
    pub queued: usize,
    /// Conversations taken off the queue and not finished.
    pub in_flight: usize,
    pub batches_done: u64,
    /// Conversations finished (stored, or given up).
    pub conversations_done: u64,
    /// Backend and database calls that returned.
    pub calls_done: u64,
}

impl Sample {
    /// Conversations accepted so far: finished, in flight or queued.
    pub fn accepted(&self) -> u64 {
        self.conversations_done
            .saturating_add(self.in_flight as u64)
            .saturating_add(self.queued as u64)
    }

    fn idle(&self) -> bool {
        self.queued == 0 && self.in_flight == 0
    }
}

/// What the last observation says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Nothing to do.
    Idle,
    /// Work is moving.
    Progressing,
    /// Work is waiting and nothing has moved for `for_`.
    Stalled { for_: Duration },
}

impl Health {
    /// Whether a watchdog ping is deserved.
    pub fn is_alive(self) -> bool {
        !matches!(self, Health::Stalled { .. })
    }
}

/// Follows the counters from one observation to the next.
#[derive(Debug)]
pub struct ProgressTracker {
    stall_after: Duration,
    last: Option<Sample>,
    last_progress: Instant,
    /// Samples of the last `RATE_WINDOW`, for rates.
    history: VecDeque<(Instant, Sample)>,
}

/// Rates are averaged over this long.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Conversations per second, accepted and finished.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub accepted_per_sec: f64,
    pub finished_per_sec: f64,
}

impl ProgressTracker {
    pub fn new(now: Instant, stall_after: Duration) -> Self {
        Self {
            stall_after,
            last: None,
            last_progress: now,
            history: VecDeque::new(),
        }
    }

    /// Records `sample`, taken at `now`, and says how the pipeline is doing.
    pub fn observe(&mut self, now: Instant, sample: Sample) -> Health {
        let moved = self.last.is_some_and(|last| {
            sample.batches_done != last.batches_done || sample.calls_done != last.calls_done
        });
        self.last = Some(sample);
        self.history.push_back((now, sample));
        while self
            .history
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > RATE_WINDOW)
        {
            self.history.pop_front();
        }
        if sample.idle() {
            self.last_progress = now;
            return Health::Idle;
        }
        if moved {
            self.last_progress = now;
            return Health::Progressing;
        }
        let quiet = now.saturating_duration_since(self.last_progress);
        if quiet >= self.stall_after {
            Health::Stalled { for_: quiet }
        } else {
            Health::Progressing
        }
    }

    /// Average rates over the samples of the last [`RATE_WINDOW`].
    pub fn rates(&self) -> Rates {
        let (Some((t0, first)), Some((t1, last))) = (self.history.front(), self.history.back())
        else {
            return Rates::default();
        };
        let secs = t1.saturating_duration_since(*t0).as_secs_f64();
        if secs <= 0.0 {
            return Rates::default();
        }
        Rates {
            accepted_per_sec: last.accepted().saturating_sub(first.accepted()) as f64 / secs,
            finished_per_sec: last
                .conversations_done
                .saturating_sub(first.conversations_done) as f64
                / secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(10);

    fn busy(batches: u64, calls: u64) -> Sample {
        Sample {
            queued: 5,
            in_flight: 3,
            batches_done: batches,
            conversations_done: batches * 3,
            calls_done: calls,
        }
    }

    #[test]
    fn idle_is_alive_however_long_it_lasts() {
        let t0 = Instant::now();
        let mut p = ProgressTracker::new(t0, STALL);
        for i in 0..100 {
            let h = p.observe(t0 + Duration::from_secs(i * 5), Sample::default());
            assert_eq!(h, Health::Idle);
        }
    }

    #[test]
    fn waiting_work_without_movement_stalls_after_the_limit() {
        let t0 = Instant::now();
        let mut p = ProgressTracker::new(t0, STALL);
        assert_eq!(p.observe(t0, busy(1, 1)), Health::Progressing);
        assert!(
            p.observe(t0 + Duration::from_secs(9), busy(1, 1))
                .is_alive()
        );
        let h = p.observe(t0 + Duration::from_secs(10), busy(1, 1));
        assert_eq!(
            h,
            Health::Stalled {
                for_: Duration::from_secs(10)
            }
        );
        assert!(!h.is_alive());
    }

    #[test]
    fn a_returning_call_or_a_finished_batch_is_progress() {
        let t0 = Instant::now();
        let mut p = ProgressTracker::new(t0, STALL);
        p.observe(t0, busy(1, 1));
        // Retries against a down backend: calls return, no batch finishes.
        for i in 1..=5 {
            let h = p.observe(t0 + Duration::from_secs(i * 8), busy(1, 1 + i));
            assert_eq!(h, Health::Progressing);
        }
        let h = p.observe(t0 + Duration::from_secs(48), busy(2, 6));
        assert_eq!(h, Health::Progressing);
        // Then nothing moves: stalled 10 s after the last movement.
        assert!(
            p.observe(t0 + Duration::from_secs(57), busy(2, 6))
                .is_alive()
        );
        assert!(
            !p.observe(t0 + Duration::from_secs(58), busy(2, 6))
                .is_alive()
        );
        // And it recovers as soon as something moves.
        assert!(
            p.observe(t0 + Duration::from_secs(70), busy(2, 7))
                .is_alive()
        );
    }

    #[test]
    fn rates_average_over_the_window() {
        let t0 = Instant::now();
        let mut p = ProgressTracker::new(t0, STALL);
        for i in 0..=20u64 {
            let s = Sample {
                queued: 10,
                in_flight: 0,
                batches_done: i,
                conversations_done: i * 100,
                calls_done: i,
            };
            p.observe(t0 + Duration::from_secs(i), s);
        }
        let r = p.rates();
        assert!((r.finished_per_sec - 100.0).abs() < 1e-9, "{r:?}");
        assert!((r.accepted_per_sec - 100.0).abs() < 1e-9, "{r:?}");
    }
}
