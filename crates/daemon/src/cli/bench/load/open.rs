//! Open loop: requests leave on a fixed schedule (`rate` per second),
//! whatever the answers do, and each one's latency counts from when it was
//! *scheduled*, not from when a connection was free to send it. A daemon
//! that stalls for 100 ms therefore shows 100 ms of latency on every request
//! that fell due during the stall, as its callers would see it, instead of
//! one slow request (the "coordinated omission" a closed loop suffers).
//!
//! A pacer thread (see [`super::pace`]) releases request numbers at their
//! scheduled times into a queue; the connection tasks take them in order.
//! When every connection is busy, due requests wait in the queue and the
//! wait is part of their latency. Requests still queued `drain_limit` after
//! the schedule's end are not sent but counted as `unsent`: the rate was
//! not sustained, and waiting for them would only make the run longer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, mpsc};

use super::pace::{sleep_until, tighten_timer_slack};
use super::{PhaseResult, Recorder, Shared, join, send_one};
use crate::cli::bench::transport::Conn;

/// Lead time between planning the schedule and its first request, so the
/// connection tasks are already waiting when it falls due.
const LEAD: Duration = Duration::from_millis(2);

/// How many requests a schedule of `rate` per second over `duration` holds:
/// those scheduled strictly before its end (`ceil(rate × seconds)`).
pub fn schedule_len(rate: f64, duration: Duration, count: Option<u64>) -> u64 {
    let n = (rate * duration.as_secs_f64()).ceil();
    // Saturating float → int: a huge product means "as many as fit".
    let n = if n >= u64::MAX as f64 {
        u64::MAX
    } else {
        n as u64
    };
    count.map_or(n, |c| n.min(c)).max(1)
}

/// Runs one schedule of `rate` requests per second for `duration` (or
/// `count` requests, if fewer).
pub async fn run(
    conns: Vec<Conn>,
    shared: &Shared,
    rate: f64,
    duration: Duration,
    count: Option<u64>,
    drain_limit: Duration,
) -> anyhow::Result<(Vec<Conn>, PhaseResult)> {
    let total = schedule_len(rate, duration, count);
    let first = shared.slots.take_many(total);
    let start = Instant::now() + LEAD;
    let drain_deadline = start + duration + drain_limit;
    let (tx, rx) = mpsc::unbounded_channel::<(u64, Instant)>();

    let stop = shared.stop.clone();
    let pacer = std::thread::Builder::new()
        .name("bench-pacer".into())
        .spawn(move || {
            tighten_timer_slack();
            for i in 0..total {
                let intended = start + Duration::from_secs_f64(i as f64 / rate);
                if !sleep_until(intended, || stop.is_cancelled()) {
                    break;
                }
                if tx.send((first + i, intended)).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot start the pacing thread: {e}"))?;

    let rx = Arc::new(Mutex::new(rx));
    let tasks = conns
        .into_iter()
        .map(|mut conn| {
            let shared = shared.clone();
            let rx = rx.clone();
            tokio::spawn(async move {
                let mut rec = Recorder::default();
                loop {
                    let next = rx.lock().await.recv().await;
                    let Some((n, intended)) = next else { break };
                    if shared.stop.is_cancelled() || Instant::now() > drain_deadline {
                        rec.unsent += 1;
                        continue;
                    }
                    send_one(&mut conn, &shared, &mut rec, n, Some(intended)).await;
                }
                (conn, rec)
            })
        })
        .collect();
    let result = join(tasks, start).await;
    // The pacer has finished: the queue only closes when it drops `tx`.
    let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_holds_rate_times_duration_requests() {
        assert_eq!(schedule_len(500.0, Duration::from_secs(2), None), 1000);
        assert_eq!(schedule_len(3.0, Duration::from_millis(500), None), 2);
        assert_eq!(schedule_len(1000.0, Duration::from_secs(10), Some(10)), 10);
        assert_eq!(schedule_len(0.01, Duration::from_secs(1), None), 1);
        assert_eq!(
            schedule_len(1e7, Duration::from_secs(7 * 24 * 3600), None),
            6_048_000_000_000
        );
    }
}
