//! `tracing` set-up from `[log]`, with a filter a configuration reload can
//! change (`log.level`) without restarting.

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

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

/// Installs the global subscriber. `RUST_LOG`, when set, wins over
/// `log.level` so an operator can raise verbosity without editing config.
pub fn init(settings: &LogSettings) {
    let filter = rust_log()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_new(&settings.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into journald or files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // The reloadable filter goes last: its handle's type names the
    // finished subscriber. A second init (tests starting several servers)
    // is harmless: keep the first.
    match settings.format {
        LogFormat::Json => {
            let builder = builder
                .json()
                .with_env_filter(filter)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                let _ = SET_FILTER.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
        }
        LogFormat::Text => {
            let builder = builder.with_env_filter(filter).with_filter_reloading();
            let handle = builder.reload_handle();
            if builder.try_init().is_ok() {
                let _ = SET_FILTER.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
        }
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
