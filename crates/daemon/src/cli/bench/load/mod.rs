//! The load engines: [`closed`] (each connection sends when answered) and
//! [`open`] (a fixed schedule, latency from the scheduled time). Both run
//! one task per connection, each recording into its own [`Recorder`];
//! the recorders are merged when the phase ends.

pub mod closed;
pub mod open;
mod pace;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::data::Payloads;
use super::histogram::Latencies;
use super::transport::{Conn, Outcome};

/// How many distinct failure messages a report keeps.
const FAILURE_SAMPLES: usize = 5;

/// Counters the progress bar reads while a phase runs.
#[derive(Debug, Default)]
pub struct Live {
    pub sent: AtomicU64,
    pub done: AtomicU64,
    /// 2xx answers.
    pub accepted: AtomicU64,
    /// 429 answers.
    pub rejected: AtomicU64,
    /// Other statuses, timeouts and connection failures.
    pub errors: AtomicU64,
}

impl Live {
    fn count(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Status(s) if (200..300).contains(s) => &self.accepted,
            Outcome::Status(429) => &self.rejected,
            _ => &self.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LiveSnapshot {
        LiveSnapshot {
            sent: self.sent.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveSnapshot {
    pub sent: u64,
    pub done: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub errors: u64,
}

/// Hands out request numbers: the `<n>` of `bench-<run>-<n>` and the index
/// into the data. Shared by every phase of a run, so ids never repeat.
#[derive(Debug, Default)]
pub struct Slots {
    next: AtomicU64,
}

impl Slots {
    /// The next request number.
    pub fn take(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// `n` consecutive numbers; returns the first.
    pub fn take_many(&self, n: u64) -> u64 {
        self.next.fetch_add(n, Ordering::Relaxed)
    }
}

/// What one phase's connections share.
#[derive(Clone)]
pub struct Shared {
    pub payloads: Arc<Payloads>,
    pub slots: Arc<Slots>,
    pub live: Arc<Live>,
    pub stop: tokio_util::sync::CancellationToken,
}

/// One connection's record of a phase.
#[derive(Clone, Default)]
pub struct Recorder {
    /// Completion minus intended send time (open loop) or send time (closed).
    pub latency: Latencies,
    /// Completion minus actual send time (differs from `latency` only in
    /// the open loop, by the time a request waited for a free connection).
    pub service: Latencies,
    pub statuses: BTreeMap<u16, u64>,
    pub timeouts: u64,
    pub failures: u64,
    pub failure_samples: Vec<String>,
    /// Scheduled requests dropped because the run was far past its end.
    pub unsent: u64,
    pub last_completion: Option<Instant>,
}

impl Recorder {
    fn record(&mut self, outcome: Outcome, latency: Duration, service: Duration, done: Instant) {
        match outcome {
            Outcome::Status(status) => *self.statuses.entry(status).or_default() += 1,
            Outcome::Timeout => self.timeouts += 1,
            Outcome::Failed(message) => {
                self.failures += 1;
                if self.failure_samples.len() < FAILURE_SAMPLES
                    && !self.failure_samples.contains(&message)
                {
                    self.failure_samples.push(message);
                }
            }
        }
        self.latency.record(latency);
        self.service.record(service);
        self.last_completion = Some(self.last_completion.map_or(done, |t| t.max(done)));
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.latency.merge(&other.latency);
        self.service.merge(&other.service);
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
        self.timeouts += other.timeouts;
        self.failures += other.failures;
        for m in &other.failure_samples {
            if self.failure_samples.len() < FAILURE_SAMPLES && !self.failure_samples.contains(m) {
                self.failure_samples.push(m.clone());
            }
        }
        self.unsent += other.unsent;
        self.last_completion = match (self.last_completion, other.last_completion) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// Requests answered with a 2xx.
    pub fn accepted(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests that got any answer or failed: everything sent.
    pub fn completed(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.timeouts + self.failures
    }
}

/// A finished phase.
pub struct PhaseResult {
    pub record: Recorder,
    /// From the first send (or scheduled send) to the last completion.
    pub elapsed: Duration,
}

/// Sends request `n` on `conn` and records it; `intended` is when it should
/// have gone out (the open loop's schedule; the send time in a closed loop).
async fn send_one(
    conn: &mut Conn,
    shared: &Shared,
    rec: &mut Recorder,
    n: u64,
    intended: Option<Instant>,
) {
    let body = shared.payloads.body(n);
    shared.live.sent.fetch_add(1, Ordering::Relaxed);
    let sent_at = Instant::now();
    let outcome = conn.post(body).await;
    let done = Instant::now();
    shared.live.count(&outcome);
    let service = done - sent_at;
    let latency = intended.map_or(service, |t| done.saturating_duration_since(t));
    rec.record(outcome, latency, service, done);
}

/// Joins the connection tasks of a phase: connections back, records merged.
async fn join(
    tasks: Vec<tokio::task::JoinHandle<(Conn, Recorder)>>,
    started: Instant,
) -> anyhow::Result<(Vec<Conn>, PhaseResult)> {
    let mut conns = Vec::with_capacity(tasks.len());
    let mut record = Recorder::default();
    for task in tasks {
        let (conn, rec) = task
            .await
            .map_err(|e| anyhow::anyhow!("a load task failed: {e}"))?;
        record.merge(&rec);
        conns.push(conn);
    }
    let elapsed = record
        .last_completion
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(started));
    Ok((conns, PhaseResult { record, elapsed }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_merge_adds_everything_up() {
        let now = Instant::now();
        let mut a = Recorder::default();
        a.record(
            Outcome::Status(202),
            Duration::from_micros(50),
            Duration::from_micros(40),
            now,
        );
        a.record(
            Outcome::Status(429),
            Duration::from_micros(60),
            Duration::from_micros(60),
            now,
        );
        let mut b = Recorder::default();
        b.record(
            Outcome::Timeout,
            Duration::from_secs(1),
            Duration::from_secs(1),
            now,
        );
        b.record(
            Outcome::Failed("reset".into()),
            Duration::from_micros(1),
            Duration::from_micros(1),
            now,
        );
        b.record(
            Outcome::Failed("reset".into()),
            Duration::from_micros(1),
            Duration::from_micros(1),
            now,
        );
        a.merge(&b);
        assert_eq!(a.completed(), 5);
        assert_eq!(a.accepted(), 1);
        assert_eq!(a.latency.len(), 5);
        assert_eq!(a.failure_samples, vec!["reset".to_string()]);
    }
}
