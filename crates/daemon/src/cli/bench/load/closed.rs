//! Closed loop: every connection sends its next request as soon as the last
//! one is answered. Measures the latency a fixed number of callers sees and
//! the most the daemon (and this client) can push through; a slow answer
//! delays the next request, so it says nothing about stalls under a fixed
//! arrival rate (use the open loop for that).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{PhaseResult, Recorder, Shared, join, send_one};
use crate::cli::bench::transport::Conn;

/// Runs until `duration` has passed or `count` requests were sent.
pub async fn run(
    conns: Vec<Conn>,
    shared: &Shared,
    duration: Duration,
    count: Option<u64>,
) -> anyhow::Result<(Vec<Conn>, PhaseResult)> {
    let started = Instant::now();
    let deadline = started + duration;
    let issued = Arc::new(AtomicU64::new(0));
    let limit = count.unwrap_or(u64::MAX);
    let tasks = conns
        .into_iter()
        .map(|mut conn| {
            let shared = shared.clone();
            let issued = issued.clone();
            tokio::spawn(async move {
                let mut rec = Recorder::default();
                while Instant::now() < deadline && !shared.stop.is_cancelled() {
                    if issued.fetch_add(1, Ordering::Relaxed) >= limit {
                        break;
                    }
                    let n = shared.slots.take();
                    send_one(&mut conn, &shared, &mut rec, n, None).await;
                }
                (conn, rec)
            })
        })
        .collect();
    join(tasks, started).await
}
