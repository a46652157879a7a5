//! Logs and metrics: metric names, the Prometheus recorder, log set-up.

pub mod logging;
pub mod metrics;
