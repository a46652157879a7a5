//! Keeps the managed PostgreSQL cluster running: if its server exits while
//! convstore runs (killed, crashed, out of memory), it is started again,
//! with backoff, until it answers; the batch writers' retries and the
//! connection pool reconnect on their own once it is back.
//!
//! Why restart rather than stop: with the journal on nothing is lost
//! either way, but without an operator a dead database would keep
//! convstore unready forever. Meanwhile `/readyz` reports the database
//! unreachable, ingestion continues into the queue (and journal) until it
//! is full (then 429), and nothing accepted is dropped.
//!
//! A server that is alive but not answering (stopped with SIGSTOP, stuck
//! on I/O) is left alone: restarting it would not help and could lose
//! what it is in the middle of. Readiness says so; the writers wait.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::managed::ManagedCluster;
use crate::settings::ManagedClusterSettings as Settings;

const CHECK_EVERY: Duration = Duration::from_secs(1);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The cluster, shared by the watchdog and the code that stops it at exit.
pub type SharedCluster = Arc<Mutex<Option<ManagedCluster>>>;

/// Restarts the cluster whenever its server has exited, until `stop`.
pub async fn watch(cluster: SharedCluster, settings: Settings, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut guard = cluster.lock().await;
        let dead = guard.as_ref().is_some_and(|c| !c.is_running());
        if !dead {
            continue;
        }
        if let Some(old) = guard.take() {
            let pid = old.pid();
            tracing::error!(
                pid,
                log = %old.log_path().display(),
                "Managed PostgreSQL exited while convstore was running; restarting it (conversations wait in the queue meanwhile)"
            );
            // Reaps the dead child and releases the cluster lock file.
            if let Err(e) = old.stop().await {
                tracing::warn!(error = %e, "Could not reap the exited managed PostgreSQL");
            }
        }
        let mut delay = FIRST_RETRY;
        loop {
            match ManagedCluster::start(&settings).await {
                Ok(fresh) => {
                    tracing::info!(pid = fresh.pid(), "Managed PostgreSQL restarted");
                    *guard = Some(fresh);
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "Cannot restart managed PostgreSQL; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(MAX_RETRY);
                }
            }
        }
    }
}
