//! Logs, metrics and traces: metric names, the Prometheus recorder, log
//! set-up, the OTLP trace exporter and its spans (`traces`), and what
//! operators watch: `/v1/stats` (rolling windows fed by a
//! recorder layer, health verdict, bottleneck), process metrics, the
//! status page.

pub mod events;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod recorder;
pub mod settings;
pub mod stats;
pub mod tap;
pub mod traces;
pub mod ui;
pub mod window;
