//! Admission by backlog seconds: the queue admits what the pipeline stores
//! in `queue.max_backlog_seconds`, not a fixed count.
//!
//! Intake is cheap and storage is not: a machine that acknowledges 10k
//! conversations a second and stores 200 would fill `queue.capacity` in a
//! second and then hold minutes of work (and up to `queue.max_bytes` of
//! memory) that every caller waiting for `stored` sits behind. So once a
//! second [`run`] measures how fast the pipeline stores *while it has work*
//! and sets the queue's admission limit ([`BoundedQueue::set_admission_limit`])
//! to that rate times the allowed backlog. Past it, intake answers 429 with
//! `Retry-After` (or blocks, `when_full = "block"`), exactly as for a full
//! queue: a refusal, never a loss.
//!
//! The estimate ([`StoreRate`]) only learns from seconds in which the
//! pipeline had more work than it could take, from start to end (at least
//! a full batch queued at both ends: every worker was busy), since a
//! pipeline that keeps up stores what arrives, not what it can. It is the
//! lower of two moving averages over intervals that end in a store: a
//! slow one that holds the limit steady, and a fast one that takes over
//! while the rate falls (a growing index slows every insert), so the
//! backlog admitted at yesterday's rate does not outlast the allowed
//! seconds. A database outage (nothing stored for a long while) freezes
//! both instead of dragging them to zero, and the queue keeps its room to
//! ride the outage out. The backlog the limit bounds is the queue plus
//! the batches already in the pipeline's hands (the workers', the one
//! waiting for a worker, the one the batcher is handing over): they are
//! stored before anything queued, so each of them is a conversation less
//! the queue may admit. Until it has measured anything the count bound
//! (`queue.capacity`) applies alone; the limit never falls below a floor
//! that keeps every worker fed with full batches. The estimate is kept
//! across restarts ([`saved`]), so a restarted daemon admits its
//! backlog's worth from the first request.

pub mod saved;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::queue::BoundedQueue;
use convstore_telemetry::metrics as m;
use saved::SavedRate;

/// How often the limit follows the rate.
pub const EVERY: Duration = Duration::from_secs(1);
/// An interval with work and no store that lasts longer than this is a
/// stall (database down, embedding backend gone), not a rate: dropped.
const STALL: Duration = Duration::from_secs(30);
/// Time constant of the slow moving average: a rise of the store rate
/// reaches the limit within a few of these, and one second's noise (a
/// checkpoint, batches committing in bursts) barely moves it.
const SMOOTHING: Duration = Duration::from_secs(10);
/// Time constant of the fast moving average, which bounds the estimate
/// while the rate falls. With the slow one alone the estimate lags a
/// falling rate by about its time constant times the fall per second:
/// from a fresh index, where the store rate halves within half a minute,
/// that admitted 13–14 s of work (p95 received → committed) for a 10 s
/// backlog; a simulation of the same fall gives 10.8 s with both.
const FALLING: Duration = Duration::from_secs(3);

/// The store rate the pipeline achieves while it has work, learnt from
/// successive observations of the stored-conversations total.
#[derive(Debug, Clone)]
pub struct StoreRate {
    /// The slow and the fast moving average, measured together.
    steady: Option<f64>,
    recent: Option<f64>,
    /// Stored total and time at the last observation.
    last: Option<(u64, Instant, bool)>,
    /// Busy time since the last store.
    busy: Duration,
    /// Busy past [`STALL`] without a store: the interval that ends at the
    /// next store is an outage's, not a rate's.
    stalled: bool,
}

impl Default for StoreRate {
    fn default() -> Self {
        Self::new()
    }
}

impl StoreRate {
    pub fn new() -> StoreRate {
        StoreRate {
            steady: None,
            recent: None,
            last: None,
            busy: Duration::ZERO,
            stalled: false,
        }
    }

    /// An estimate that starts from `per_second` (saved by an earlier run)
    /// and learns as [`StoreRate::new`]'s does.
    pub fn seeded(per_second: f64) -> StoreRate {
        StoreRate {
            steady: Some(per_second),
            recent: Some(per_second),
            ..StoreRate::new()
        }
    }

    /// Conversations stored per second while busy: the lower of the slow
    /// and the fast average, so a falling rate is followed within seconds
    /// and a rising one at the slow pace. `None` until measured.
    pub fn per_second(&self) -> Option<f64> {
        match (self.steady, self.recent) {
            (Some(steady), Some(recent)) => Some(steady.min(recent)),
            (steady, recent) => steady.or(recent),
        }
    }

    /// Records that `stored_total` conversations had been stored by `now`
    /// and whether the pipeline had more work waiting than it could take
    /// (`queued`).
    pub fn observe(&mut self, now: Instant, stored_total: u64, queued: bool) {
        let Some((before, then, was_queued)) = self.last.replace((stored_total, now, queued))
        else {
            return;
        };
        let elapsed = now.saturating_duration_since(then);
        if !(was_queued && queued) {
            // Idle for part of it: what was stored says nothing of capacity.
            self.busy = Duration::ZERO;
            self.stalled = false;
            return;
        }
        self.busy += elapsed;
        let stored = stored_total.saturating_sub(before);
        if stored == 0 {
            self.stalled |= self.busy > STALL;
            return;
        }
        if std::mem::take(&mut self.stalled) {
            self.busy = Duration::ZERO;
            return;
        }
        let busy = std::mem::take(&mut self.busy);
        let sample = stored as f64 / busy.as_secs_f64().max(1e-3);
        self.steady = Some(moving_average(self.steady, sample, busy, SMOOTHING));
        self.recent = Some(moving_average(self.recent, sample, busy, FALLING));
    }
}

/// `average` moved towards `sample`, measured over `over`, with time
/// constant `constant` (an interval as long as it moves it 63 % of the
/// way); the first sample is taken as it is.
fn moving_average(average: Option<f64>, sample: f64, over: Duration, constant: Duration) -> f64 {
    match average {
        Some(average) => {
            let weight = 1.0 - (-over.as_secs_f64() / constant.as_secs_f64()).exp();
            average + weight * (sample - average)
        }
        None => sample,
    }
}

/// What the queue admits for `rate` and `max_backlog` while `in_flight`
/// conversations are already in the pipeline's hands: the backlog's worth
/// of conversations less those, at least `floor`, at most `capacity` (also
/// without a rate yet, or with `max_backlog` zero: admission by count
/// only).
pub fn admission_limit(
    rate: Option<f64>,
    max_backlog: Duration,
    in_flight: usize,
    floor: usize,
    capacity: usize,
) -> usize {
    match rate {
        Some(per_second) if !max_backlog.is_zero() => {
            let items = (per_second * max_backlog.as_secs_f64()).ceil();
            // f64 → usize saturates; the clamp keeps it in range anyway.
            (items as usize)
                .saturating_sub(in_flight)
                .clamp(floor.min(capacity), capacity)
        }
        _ => capacity,
    }
}

/// How the queue's admission follows the store rate.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionSettings {
    /// `queue.max_backlog_seconds`.
    pub max_backlog: Duration,
    /// The limit's lower bound (full batches for every worker).
    pub floor: usize,
    /// The queue depth (a full batch) from which every worker counts as
    /// busy.
    pub busy_at: usize,
}

/// The estimate a started daemon begins with: the one `saved` by an
/// earlier run, if any, already applied to `queue`'s limit, so the first
/// request is admitted by it (call before intake opens).
pub fn resume<T>(
    queue: &BoundedQueue<T>,
    saved: &mut SavedRate,
    settings: AdmissionSettings,
) -> StoreRate {
    let Some(per_second) = saved.load() else {
        return StoreRate::new();
    };
    let rate = StoreRate::seeded(per_second);
    // Nothing is in the pipeline's hands before intake opens.
    apply(queue, &rate, 0, settings);
    tracing::info!(
        conversations_per_second = per_second,
        admission_limit = queue.admission_limit(),
        "Admitting by the store rate saved by the last run until it is measured again"
    );
    rate
}

/// Moves `queue`'s admission limit with the store rate until `stop`,
/// starting from `rate` ([`resume`]) and saving it as it moves and when
/// stopped. `stored_total` reads the lifetime count of conversations the
/// pipeline finished, `in_flight` how many it has taken from the queue and
/// not finished yet.
pub async fn run<T: Send + 'static>(
    queue: Arc<BoundedQueue<T>>,
    stored_total: impl Fn() -> u64 + Send + 'static,
    in_flight: impl Fn() -> usize + Send + 'static,
    settings: AdmissionSettings,
    mut rate: StoreRate,
    mut saved: SavedRate,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                if let Some(r) = rate.per_second() {
                    saved.save(r, Instant::now(), true);
                }
                return;
            }
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        rate.observe(now, stored_total(), queue.len() >= settings.busy_at.max(1));
        apply(&queue, &rate, in_flight(), settings);
        if let Some(r) = rate.per_second() {
            saved.save(r, now, false);
        }
    }
}

/// Sets `queue`'s limit for `rate` with `in_flight` conversations in the
/// pipeline's hands, and the gauges that show both.
fn apply<T>(
    queue: &BoundedQueue<T>,
    rate: &StoreRate,
    in_flight: usize,
    settings: AdmissionSettings,
) {
    let limit = admission_limit(
        rate.per_second(),
        settings.max_backlog,
        in_flight,
        settings.floor,
        queue.capacity(),
    );
    queue.set_admission_limit(limit);
    metrics::gauge!(m::QUEUE_ADMISSION_LIMIT).set(queue.admission_limit() as f64);
    if let Some(r) = rate.per_second() {
        metrics::gauge!(m::QUEUE_STORE_RATE).set(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn learns_the_rate_only_while_the_pipeline_has_work() {
        let t0 = Instant::now();
        let mut rate = StoreRate::new();
        rate.observe(t0, 0, true);
        assert_eq!(rate.per_second(), None, "one observation is no rate");
        // Busy: 200 a second for 20 s.
        for s in 1..=20 {
            rate.observe(at(t0, s), 200 * s, true);
        }
        let busy = rate.per_second().expect("measured");
        assert!((busy - 200.0).abs() < 1e-6, "{busy}");
        // Idle (queue empty): a trickle of 5 a second teaches nothing.
        for s in 21..=80 {
            rate.observe(at(t0, s), 4_000 + 5 * (s - 20), false);
        }
        assert_eq!(rate.per_second(), Some(busy));
    }

    #[test]
    fn a_slow_pipeline_is_measured_between_its_commits() {
        let t0 = Instant::now();
        let mut rate = StoreRate::new();
        // One batch of 64 every 8 s, the queue never empty: 8 a second.
        let mut stored = 0;
        for s in 0..=64 {
            if s > 0 && s % 8 == 0 {
                stored += 64;
            }
            rate.observe(at(t0, s), stored, true);
        }
        let r = rate.per_second().expect("measured");
        assert!((r - 8.0).abs() < 1e-6, "{r}");
    }

    #[test]
    fn a_stall_freezes_the_estimate_instead_of_dragging_it_to_zero() {
        let t0 = Instant::now();
        let mut rate = StoreRate::new();
        for s in 0..=10 {
            rate.observe(at(t0, s), 100 * s, true);
        }
        let before = rate.per_second().expect("measured");
        // The database is down for five minutes with work queued.
        for s in 11..=310 {
            rate.observe(at(t0, s), 1_000, true);
        }
        assert_eq!(rate.per_second(), Some(before));
        // It comes back: the first store after the stall is not averaged
        // over the outage, the next ones are measured again.
        rate.observe(at(t0, 311), 1_100, true);
        assert_eq!(rate.per_second(), Some(before));
        rate.observe(at(t0, 312), 1_150, true);
        let after = rate.per_second().expect("measured");
        assert!(after < before && after > 50.0, "{after}");
    }

    #[test]
    fn a_change_of_rate_reaches_the_estimate_within_a_few_time_constants() {
        let t0 = Instant::now();
        let mut rate = StoreRate::new();
        let mut stored = 0;
        for s in 0..=30 {
            rate.observe(at(t0, s), stored, true);
            stored += 1_000;
        }
        for s in 31..=90 {
            rate.observe(at(t0, s), stored, true);
            stored += 100;
        }
        let r = rate.per_second().expect("measured");
        assert!((r - 100.0).abs() < 100.0 * 0.05, "{r}");
    }

    #[test]
    fn a_falling_rate_is_followed_within_seconds_so_the_backlog_stays_near_its_bound() {
        // A fresh index: the store rate falls from 900 to 450 a second
        // over 30 s as every insert gets dearer, then holds. The pipeline
        // holds six batches of 64 throughout (four workers', one waiting,
        // one being handed over), as the defaults do when saturated.
        let in_flight = 6 * 64;
        let t0 = Instant::now();
        let mut rate = StoreRate::new();
        let mut stored = 0;
        let mut worst_backlog: f64 = 0.0;
        rate.observe(t0, stored, true);
        for s in 1..=60 {
            let actual = 900u64.saturating_sub(15 * s).max(450);
            stored += actual;
            rate.observe(at(t0, s), stored, true);
            let limit = admission_limit(
                rate.per_second(),
                Duration::from_secs(10),
                in_flight,
                1,
                1_000_000,
            );
            // How long the admitted queue, behind what the pipeline
            // holds, takes to store at the true rate.
            worst_backlog = worst_backlog.max((limit + in_flight) as f64 / actual as f64);
        }
        // The slow average alone admits ~13 s here; leaving the pipeline's
        // batches out of the count, ~11.7 s.
        assert!(
            worst_backlog < 11.0,
            "admitted {worst_backlog:.1} s of work for 10 s"
        );
        let r = rate.per_second().expect("measured");
        assert!((r - 450.0).abs() < 450.0 * 0.01, "{r}");
    }

    #[test]
    fn a_rising_rate_is_followed_at_the_slow_pace() {
        let t0 = Instant::now();
        let mut rate = StoreRate::new();
        let mut stored = 0;
        rate.observe(t0, stored, true);
        for s in 1..=60 {
            stored += 450;
            rate.observe(at(t0, s), stored, true);
        }
        // Twice as fast from here on: after 3 s the fast average is past
        // 730 a second, the estimate still below 600.
        for s in 61..=63 {
            stored += 900;
            rate.observe(at(t0, s), stored, true);
        }
        let r = rate.per_second().expect("measured");
        assert!(r > 500.0 && r < 600.0, "{r}");
    }

    #[test]
    fn the_limit_is_the_backlog_at_the_rate_within_floor_and_capacity() {
        let ten = Duration::from_secs(10);
        assert_eq!(admission_limit(None, ten, 0, 512, 10_000), 10_000);
        assert_eq!(admission_limit(Some(300.0), ten, 0, 512, 10_000), 3_000);
        assert_eq!(admission_limit(Some(20.0), ten, 0, 512, 10_000), 512);
        assert_eq!(admission_limit(Some(5_000.0), ten, 0, 512, 10_000), 10_000);
        assert_eq!(
            admission_limit(Some(300.0), Duration::ZERO, 0, 512, 10_000),
            10_000
        );
        // A floor above the capacity cannot raise the limit past it.
        assert_eq!(admission_limit(Some(1.0), ten, 0, 512, 100), 100);
        assert_eq!(admission_limit(Some(f64::INFINITY), ten, 0, 512, 100), 100);
    }

    #[test]
    fn what_the_pipeline_holds_counts_against_the_backlog() {
        let ten = Duration::from_secs(10);
        // 3,000 conversations are 10 s at 300 a second; 384 of them are
        // already in the workers' hands.
        assert_eq!(admission_limit(Some(300.0), ten, 384, 512, 10_000), 2_616);
        // Never below the floor, which keeps the workers fed ...
        assert_eq!(admission_limit(Some(60.0), ten, 384, 512, 10_000), 512);
        assert_eq!(admission_limit(Some(60.0), ten, 5_000, 512, 10_000), 512);
        // ... and no count of it matters without a rate.
        assert_eq!(admission_limit(None, ten, 384, 512, 10_000), 10_000);
        assert_eq!(
            admission_limit(Some(5_000.0), ten, 384, 512, 10_000),
            10_000
        );
    }
}
