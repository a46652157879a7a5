//! `tracing` set-up from `[log]`, with a filter a configuration reload can
//! change (`log.level`) without restarting.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::{LogFormat, LogSettings};
use crate::traces::TelemetrySettings;

/// Replaces the installed filter; set by the `init` call that installed the
/// global subscriber.
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// Why a new `log.level` was not applied.
#[derive(Debug, thiserror::Error)]
pub enum LevelError {
    #[error("RUST_LOG is set and wins over log.level")]
    EnvWins,
    #[error("`{directive}` is not a tracing filter: {reason}")]
    Invalid { directive: String, reason: String },
    #[error("logging was not set up by this process")]
    NotInstalled,
    #[error("cannot replace the log filter: {0}")]
    Reload(String),
}

/// `RUST_LOG`, when set and not empty.
fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// Installs the global subscriber, without traces.
pub fn init(settings: &LogSettings) {
    // Without an endpoint there is no exporter to fail.
    let _ = init_with_traces(settings, &TelemetrySettings::default());
}

/// Installs the global subscriber: the log (`[log]`, its level reloadable)
/// and, when `[telemetry] otlp_endpoint` is set, the trace exporter
/// (`crate::traces`). `RUST_LOG`, when set, wins over `log.level` so an
/// operator can raise verbosity without editing config. A second call
/// (tests starting several servers) keeps the first subscriber.
///
/// One filter serves every layer: per-layer filters decide per thread,
/// and under a multi-threaded runtime they disabled spans at random. The
/// trace spans pass it whatever the log level (`with_trace_spans`).
pub fn init_with_traces(
    settings: &LogSettings,
    telemetry: &TelemetrySettings,
) -> Result<(), String> {
    let traces = crate::traces::layer(telemetry)?;
    let filter = rust_log()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(&settings.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(with_trace_spans(filter));
    // Colour only for a person at a terminal, never into journald or files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let log: Box<dyn Layer<_> + Send + Sync> = match settings.format {
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        ),
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi),
        ),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(log)
        .with(traces)
        .try_init()
        .is_ok();
    if installed {
        let _ = SET_FILTER.set(Box::new(move |f| {
            handle
                .reload(with_trace_spans(f))
                .map_err(|e| e.to_string())
        }));
    }
    Ok(())
}

/// `filter`, letting the spans that make traces through when traces are
/// on (they are few per batch; a request's only exist when traced).
fn with_trace_spans(filter: EnvFilter) -> EnvFilter {
    if !crate::traces::enabled() {
        return filter;
    }
    match crate::traces::SPAN_DIRECTIVE.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// Checks a `log.level` value without applying it.
pub fn parse_level(directive: &str) -> Result<EnvFilter, LevelError> {
    EnvFilter::try_new(directive).map_err(|e| LevelError::Invalid {
        directive: directive.to_string(),
        reason: e.to_string(),
    })
}

/// Applies a new `log.level` to the running subscriber.
pub fn set_level(directive: &str) -> Result<(), LevelError> {
    let filter = parse_level(directive)?;
    if rust_log().is_some() {
        return Err(LevelError::EnvWins);
    }
    let set = SET_FILTER.get().ok_or(LevelError::NotInstalled)?;
    set(filter).map_err(LevelError::Reload)
}
