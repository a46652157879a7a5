//! Running under systemd (see `systemd/convstore.service` and docs/SYSTEMD.md):
//! readiness, status and watchdog notifications, socket activation, and
//! reloading the configuration on SIGHUP.
//!
//! Everything here is inert outside systemd: without `NOTIFY_SOCKET` no
//! notification is sent, without `LISTEN_FDS` the configured addresses are
//! bound, and SIGHUP still reloads.

pub mod activation;
pub mod notify;
pub mod progress;
pub mod reload;
pub mod supervisor;
