//! What systemd sees of the running daemon: the phase (starting, running,
//! reloading, stopping), a status line with queue depth and rates, watchdog
//! pings while the pipeline makes progress, and timeout extensions while a
//! long drain runs.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::notify::Notifier;
use super::progress::{Health, ProgressTracker, Sample};

/// The status line is refreshed at least this often.
const STATUS_EVERY: Duration = Duration::from_secs(5);
/// Without a watchdog, the status line still says when work stopped moving.
const STALL_WITHOUT_WATCHDOG: Duration = Duration::from_secs(60);
/// Time after the drain for stopping listeners and the managed cluster
/// (its fast shutdown may take 30 s, then 5 s immediate, 5 s kill).
const AFTER_DRAIN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Running,
    Reloading,
    Draining { deadline: Instant },
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Appended to the running status until the next reload: what the last
    /// reload could not do.
    note: Option<String>,
}

/// The daemon's side of the service-manager conversation.
#[derive(Debug)]
pub struct Supervisor {
    notifier: Notifier,
    watchdog: Option<Duration>,
    state: Mutex<State>,
}

impl Supervisor {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Arc<Self> {
        let notifier = Notifier::from_env();
        let watchdog = if notifier.is_enabled() {
            sd_notify::watchdog_enabled().filter(|w| !w.is_zero())
        } else {
            None
        };
        Self::new(notifier, watchdog)
    }

    pub fn new(notifier: Notifier, watchdog: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            notifier,
            watchdog,
            state: Mutex::new(State {
                phase: Phase::Starting,
                note: None,
            }),
        })
    }

    /// `WatchdogSec`, when systemd asked for pings.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A start-up step, shown while the service is activating.
    pub fn starting(&self, step: &str) {
        self.notifier.status(&format!("Starting: {step}"));
    }

    /// `READY=1`: listeners bound, database answering, backend warm.
    pub fn ready(&self, status: &str) {
        self.state().phase = Phase::Running;
        self.notifier.ready(status);
    }

    /// `RELOADING=1`: a SIGHUP reload begins.
    pub fn reloading(&self) {
        self.state().phase = Phase::Reloading;
        self.notifier.reloading("Reloading the configuration");
    }

    /// `READY=1` again: the reload is over. `note` (a failure, or keys that
    /// need a restart) stays in the status line until the next reload.
    pub fn reloaded(&self, summary: &str, note: Option<String>) {
        {
            let mut state = self.state();
            state.phase = Phase::Running;
            state.note = note;
        }
        self.notifier.ready(summary);
    }

    /// `STOPPING=1`, and time for the drain that ends at `deadline`.
    pub fn stopping(&self, deadline: Instant, queued: usize) {
        self.state().phase = Phase::Draining { deadline };
        self.notifier
            .stopping(&format!("Stopping: draining {queued} queued conversations"));
        self.notifier
            .extend_timeout(deadline.saturating_duration_since(Instant::now()) + AFTER_DRAIN);
    }

    /// A status line outside the periodic ones (e.g. the last shutdown steps).
    pub fn status(&self, status: &str) {
        self.notifier.status(status);
    }

    /// Status, watchdog pings and timeout extensions until `stop`. Reads the
    /// pipeline through `sample` once per tick: half the watchdog interval
    /// (as sd_watchdog_enabled(3) advises), at most [`STATUS_EVERY`].
    pub async fn run(self: Arc<Self>, sample: impl Fn() -> Sample, stop: CancellationToken) {
        if !self.notifier.is_enabled() {
            return;
        }
        let tick_every = self
            .watchdog
            .map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
        let stall_after = self.watchdog.unwrap_or(STALL_WITHOUT_WATCHDOG);
        let mut tracker = ProgressTracker::new(Instant::now(), stall_after);
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_status = String::new();
        let mut was_stalled = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let s = sample();
            let health = tracker.observe(now, s);
            let (phase, note) = {
                let state = self.state();
                (state.phase, state.note.clone())
            };
            match health {
                Health::Stalled { for_ } if !was_stalled => {
                    was_stalled = true;
                    tracing::error!(
                        stalled_secs = for_.as_secs(),
                        queued = s.queued,
                        in_flight = s.in_flight,
                        watchdog = self.watchdog.is_some(),
                        "Pipeline stalled: no batch finished and no backend or database call returned; withholding watchdog pings so systemd restarts convstore"
                    );
                }
                Health::Idle | Health::Progressing if was_stalled => {
                    was_stalled = false;
                    tracing::info!("Pipeline moving again; watchdog pings resume");
                }
                _ => {}
            }
            if self.watchdog.is_some() && health.is_alive() && phase != Phase::Starting {
                self.notifier.watchdog();
            }
            let status = match phase {
                Phase::Starting | Phase::Reloading => None,
                Phase::Running => Some(running_status(&tracker, s, health, note.as_deref())),
                Phase::Draining { deadline } => {
                    let left = deadline.saturating_duration_since(now);
                    self.notifier
                        .extend_timeout(left + tick_every * 2 + AFTER_DRAIN);
                    Some(format!(
                        "Stopping: draining {} queued and {} in flight, {} s to the deadline",
                        s.queued,
                        s.in_flight,
                        left.as_secs()
                    ))
                }
            };
            if let Some(status) = status
                && status != last_status
            {
                self.notifier.status(&status);
                last_status = status;
            }
        }
    }
}

fn running_status(
    tracker: &ProgressTracker,
    s: Sample,
    health: Health,
    note: Option<&str>,
) -> String {
    let mut line = match health {
        Health::Stalled { for_ } => format!(
            "Stalled: no pipeline progress for {} s with {} queued and {} in flight; watchdog pings withheld",
            for_.as_secs(),
            s.queued,
            s.in_flight
        ),
        Health::Idle | Health::Progressing => {
            let r = tracker.rates();
            format!(
                "Running: {} queued, {} in flight; {:.1}/s accepted, {:.1}/s done (10 s average)",
                s.queued, s.in_flight, r.accepted_per_sec, r.finished_per_sec
            )
        }
    };
    if let Some(note) = note {
        line.push_str("; ");
        line.push_str(note);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_status_names_depth_rates_and_the_note() {
        let now = Instant::now();
        let mut t = ProgressTracker::new(now, Duration::from_secs(5));
        let s = Sample {
            queued: 7,
            in_flight: 2,
            ..Sample::default()
        };
        let h = t.observe(now, s);
        let line = running_status(&t, s, h, Some("restart needed for pipeline.workers"));
        assert!(
            line.starts_with("Running: 7 queued, 2 in flight;"),
            "{line}"
        );
        assert!(
            line.ends_with("; restart needed for pipeline.workers"),
            "{line}"
        );
        let h = t.observe(now + Duration::from_secs(6), s);
        let line = running_status(&t, s, h, None);
        assert!(
            line.starts_with("Stalled: no pipeline progress for 6 s"),
            "{line}"
        );
    }
}
