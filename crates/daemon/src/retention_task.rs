//! The retention reaper: every `retention.interval`, deletes the
//! conversations past `retention.max_age` (or their channel's override)
//! and the tombstones past `retention.tombstone_max_age`
//! ([`Store::reap`]: bounded batches, each its own short transaction, one
//! reaper at a time across instances).
//!
//! The first run comes soon after start ([`FIRST_RUN_AFTER`], or the
//! interval if shorter), not a whole interval later: a daemon restarted
//! often would otherwise never reap. A database error ends the run (logged,
//! counted as `failed`); the next interval tries again, and what was
//! deleted before the error stays deleted. A reload (SIGHUP) hands over a
//! new policy through the watch channel; the next run follows it soon
//! after.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use convstore_store::Store;
use convstore_store::retention::RetentionPolicy;
use convstore_telemetry::events::{self, deletion, label, retention_run};
use convstore_telemetry::metrics as m;

/// Rows one batch deletes: its locks (and its cascade to the chunks) last
/// one short statement, while a backlog of millions still goes at a few
/// thousand rows a second.
pub const BATCH_SIZE: u32 = 500;

/// The first run after start, or after a reload changed the policy, comes
/// this long after it (or after `retention.interval`, if shorter).
pub const FIRST_RUN_AFTER: Duration = Duration::from_secs(10);

/// What one run deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunReport {
    pub conversations: u64,
    pub tombstones: u64,
}

/// Runs until `stop`, following the policy `policy` holds.
pub async fn run(
    store: Arc<Store>,
    mut policy: watch::Receiver<RetentionPolicy>,
    stop: CancellationToken,
) {
    let soon = |interval: Duration| Instant::now() + interval.min(FIRST_RUN_AFTER);
    let mut next = soon(policy.borrow_and_update().interval);
    // Once the sender is gone (no reloads any more) the policy is final.
    let mut reloadable = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = policy.changed(), if reloadable => {
                if changed.is_err() {
                    reloadable = false;
                    continue;
                }
                next = soon(policy.borrow_and_update().interval);
            }
            _ = tokio::time::sleep_until(next) => {
                let current = policy.borrow_and_update().clone();
                run_once(&store, &current, &stop).await;
                next = Instant::now() + current.interval;
            }
        }
    }
}

/// One run: every target of `policy` at this moment, until done, an error,
/// another instance reaping, or `stop`.
pub async fn run_once(
    store: &Store,
    policy: &RetentionPolicy,
    stop: &CancellationToken,
) -> RunReport {
    let targets = policy.targets(chrono::Utc::now());
    let mut report = RunReport::default();
    if targets.is_empty() {
        return report;
    }
    let started = std::time::Instant::now();
    let mut outcome = retention_run::OK;
    for target in &targets {
        let conversations = target.is_conversations();
        let on_batch = |n: u64| {
            if conversations {
                events::conversations_deleted(deletion::RETENTION, n);
                report.conversations += n;
            } else {
                metrics::counter!(m::TOMBSTONES_DROPPED).increment(n);
                report.tombstones += n;
            }
        };
        let result = tokio::select! {
            _ = stop.cancelled() => None,
            result = store.reap(target, BATCH_SIZE, on_batch) => Some(result),
        };
        match result {
            // Shutting down: what committed is counted; the run is not.
            None => {
                log_report(report, started);
                return report;
            }
            Some(Ok(true)) => {}
            Some(Ok(false)) => {
                tracing::debug!("Another instance is reaping; leaving the run to it");
                outcome = retention_run::BUSY;
                break;
            }
            Some(Err(e)) => {
                tracing::warn!(
                    error = %e,
                    "Retention run failed; trying again next interval (retention.interval)"
                );
                outcome = retention_run::FAILED;
                break;
            }
        }
    }
    metrics::counter!(m::RETENTION_RUNS, label::OUTCOME => outcome).increment(1);
    log_report(report, started);
    report
}

fn log_report(report: RunReport, started: std::time::Instant) {
    if report.conversations > 0 || report.tombstones > 0 {
        tracing::info!(
            conversations = report.conversations,
            tombstones = report.tombstones,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Retention removed expired conversations and tombstones"
        );
    } else {
        tracing::debug!("Retention run: nothing expired");
    }
}
