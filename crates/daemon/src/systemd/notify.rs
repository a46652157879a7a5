//! The `sd_notify(3)` messages convstore sends: start-up progress,
//! readiness, status, watchdog pings, reload and stop.
//!
//! Only `sd_notify::notify()` is used: the variants that unset
//! `NOTIFY_SOCKET` call `std::env::remove_var`, which is unsound once the
//! async runtime's threads run. Without `NOTIFY_SOCKET` (not under systemd)
//! every call is a no-op.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// Sends notifications to the service manager, when there is one.
#[derive(Debug, Clone, Copy)]
pub struct Notifier {
    enabled: bool,
}

/// A failed send is logged once: the service manager going away is not worth
/// a log line per tick.
static SEND_FAILURE_LOGGED: AtomicBool = AtomicBool::new(false);

impl Notifier {
    /// Reads `NOTIFY_SOCKET` once.
    pub fn from_env() -> Self {
        Self {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()),
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Self { enabled: false }
    }

    /// Whether a service manager listens (`NOTIFY_SOCKET` is set).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// `STATUS=`: one line shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        let line = one_line(status);
        self.send(&[NotifyState::Status(&line)]);
    }

    /// `READY=1` with a status line: start-up (or a reload) is complete.
    pub fn ready(&self, status: &str) {
        let line = one_line(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(&line)]);
    }

    /// `WATCHDOG=1`: the pipeline is making progress.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC` (as `Type=notify-reload` expects;
    /// older systemd ignores the timestamp); `ready` ends the reload.
    pub fn reloading(&self, status: &str) {
        let line = one_line(status);
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now, NotifyState::Status(&line)]),
            Err(e) => {
                tracing::debug!(error = %e, "Cannot read CLOCK_MONOTONIC for MONOTONIC_USEC");
                self.send(&[NotifyState::Reloading, NotifyState::Status(&line)]);
            }
        }
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self, status: &str) {
        let line = one_line(status);
        self.send(&[NotifyState::Stopping, NotifyState::Status(&line)]);
    }

    /// `EXTEND_TIMEOUT_USEC=`: the current phase (a long drain) needs at
    /// least `by` more; the service manager waits that long for the next
    /// message before its own timeout applies again.
    pub fn extend_timeout(&self, by: Duration) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            if !SEND_FAILURE_LOGGED.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "Cannot notify the service manager (NOTIFY_SOCKET); systemd will not see readiness or watchdog pings");
            }
        } else if SEND_FAILURE_LOGGED.load(Ordering::Relaxed) {
            SEND_FAILURE_LOGGED.store(false, Ordering::Relaxed);
        }
    }
}

/// A notification is newline-separated `KEY=value` lines: a status with a
/// newline would end its own line early.
fn one_line(status: &str) -> String {
    status
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_kept_on_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }

    #[test]
    fn disabled_notifier_sends_nothing_and_does_not_fail() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready("x");
        n.watchdog();
        n.extend_timeout(Duration::from_secs(u64::MAX / 2));
    }
}
