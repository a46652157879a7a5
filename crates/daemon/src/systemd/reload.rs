//! SIGHUP (`systemctl reload convstore`): read the configuration again,
//! validate it, apply what can change while running, and say which changed
//! keys need a restart. An invalid file changes nothing: convstore keeps
//! running on the configuration it has and logs why.
//!
//! Live keys ([`LIVE_KEYS`], and every `retention.channels.*`): the log
//! filter, the request limits and queue policy of ingress, the batch size
//! and wait, the shutdown deadline, and `[retention]`.
//! Every other key (addresses, database, queue capacity, workers, model,
//! backends, …) needs a restart; a changed one is reported, not applied.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::Settings;
use crate::http::{IngressLimits, IngressState};
use crate::pipeline::batcher::BatchLimits;
use convstore_store::retention::RetentionPolicy;
use convstore_telemetry::logging;

/// Keys a reload applies to the running daemon.
pub const LIVE_KEYS: &[&str] = &[
    "log.level",
    "server.max_body_bytes",
    "server.body_timeout_ms",
    "server.max_messages",
    "server.max_batch_items",
    "queue.when_full",
    "queue.block_timeout_ms",
    "queue.retry_after_secs",
    "batch.max_size",
    "batch.max_wait_ms",
    "shutdown.timeout_ms",
    "retention.max_age",
    "retention.interval",
    "retention.tombstone_max_age",
];

/// Keys under these prefixes are live too: a map whose keys are data (a
/// channel name), not a fixed list.
pub const LIVE_PREFIXES: &[&str] = &["retention.channels."];

fn is_live(key: &str) -> bool {
    LIVE_KEYS.contains(&key) || LIVE_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Changed keys, sorted by whether a reload can apply them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub live: Vec<String>,
    pub need_restart: Vec<String>,
}

/// Compares two configurations key by key (dotted names; a list such as
/// `embedding.backends` is one key). A key added to `Settings` later needs
/// a restart until it is listed in [`LIVE_KEYS`] and applied.
pub fn changes(running: &Settings, new: &Settings) -> Changes {
    let old = flatten(running);
    let new = flatten(new);
    let mut out = Changes::default();
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for key in keys {
        if old.get(key) != new.get(key) {
            if is_live(key) {
                out.live.push(key.clone());
            } else {
                out.need_restart.push(key.clone());
            }
        }
    }
    out
}

/// `running` with the live keys taken from `new`: the configuration in
/// force after a reload.
pub fn merge_live(running: &Settings, new: &Settings) -> Settings {
    let mut merged = running.clone();
    merged.log.level = new.log.level.clone();
    merged.server.max_body_bytes = new.server.max_body_bytes;
    merged.server.body_timeout_ms = new.server.body_timeout_ms;
    merged.server.max_messages = new.server.max_messages;
    merged.server.max_batch_items = new.server.max_batch_items;
    merged.queue.when_full = new.queue.when_full;
    merged.queue.block_timeout_ms = new.queue.block_timeout_ms;
    merged.queue.retry_after_secs = new.queue.retry_after_secs;
    merged.batch = new.batch.clone();
    merged.shutdown = new.shutdown.clone();
    merged.retention = new.retention.clone();
    merged
}

fn flatten(settings: &Settings) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match toml::Value::try_from(settings) {
        Ok(value) => walk("", &value, &mut out),
        // Settings always serialise (check-config relies on it); if they
        // ever did not, every key would look unchanged: say so.
        Err(e) => {
            out.insert("(unserialisable)".into(), e.to_string());
        }
    }
    out
}

fn walk(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                walk(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The file is invalid; nothing changed.
    Rejected { reason: String },
    /// The new configuration is in force for `changes.live`; the keys in
    /// `changes.need_restart` keep their old values until a restart.
    Applied {
        changes: Changes,
        /// Live keys that could not take effect, and why.
        notes: Vec<String>,
    },
}

impl Outcome {
    /// One line for the status (`systemctl status`) after the reload.
    pub fn summary(&self) -> String {
        match self {
            Outcome::Rejected { reason } => {
                format!("reload refused, still on the previous configuration: {reason}")
            }
            Outcome::Applied { changes, notes } => {
                let mut parts = Vec::new();
                if changes.live.is_empty() && changes.need_restart.is_empty() {
                    parts.push("reloaded: nothing changed".to_string());
                } else if !changes.live.is_empty() {
                    parts.push(format!("reloaded: {}", changes.live.join(", ")));
                }
                if !changes.need_restart.is_empty() {
                    parts.push(format!(
                        "restart needed for {}",
                        changes.need_restart.join(", ")
                    ));
                }
                parts.extend(notes.iter().cloned());
                parts.join("; ")
            }
        }
    }

    /// What the status line should keep saying until the next reload.
    pub fn lasting_note(&self) -> Option<String> {
        match self {
            Outcome::Applied { changes, notes }
                if changes.need_restart.is_empty() && notes.is_empty() =>
            {
                None
            }
            _ => Some(self.summary()),
        }
    }
}

/// Re-reads the configuration and applies its live keys.
pub struct Reloader {
    config_path: Option<PathBuf>,
    current: ArcSwap<Settings>,
    ingress: Arc<IngressState>,
    batch: Arc<BatchLimits>,
    retention: watch::Sender<RetentionPolicy>,
}

impl Reloader {
    pub fn new(
        config_path: Option<PathBuf>,
        running: Settings,
        ingress: Arc<IngressState>,
        batch: Arc<BatchLimits>,
        retention: watch::Sender<RetentionPolicy>,
    ) -> Self {
        Self {
            config_path,
            current: ArcSwap::from_pointee(running),
            ingress,
            batch,
            retention,
        }
    }

    /// The configuration in force.
    pub fn current(&self) -> Arc<Settings> {
        self.current.load_full()
    }

    /// Loads the file (and the environment) again, as at start-up.
    pub fn reload(&self) -> Outcome {
        let loaded = Settings::load(self.config_path.as_deref())
            .map_err(|e| e.to_string())
            .and_then(|s| {
                logging::parse_level(&s.log.level)
                    .map(|_| s)
                    .map_err(|e| format!("invalid value for `log.level`: {e}"))
            });
        match loaded {
            Ok(new) => self.apply(&new),
            Err(reason) => {
                tracing::error!(
                    config = %self.config_path.as_deref().map_or("(none)".into(), |p| p.display().to_string()),
                    reason = %reason,
                    "Configuration reload refused; still running on the previous configuration"
                );
                Outcome::Rejected { reason }
            }
        }
    }

    /// Applies the live keys of `new` (already validated).
    pub fn apply(&self, new: &Settings) -> Outcome {
        let running = self.current();
        let changes = changes(&running, new);
        let mut notes = Vec::new();
        // The log filter first, so the lines below already follow it.
        if changes.live.iter().any(|k| k == "log.level")
            && let Err(e) = logging::set_level(&new.log.level)
        {
            notes.push(format!("log.level not applied: {e}"));
        }
        let merged = merge_live(&running, new);
        self.ingress
            .set_limits(IngressLimits::from_settings(&merged));
        self.batch.set(
            merged.batch.max_size.get(),
            Duration::from_millis(merged.batch.max_wait_ms.get()),
        );
        // Validated with the rest of the file; the reaper is woken only
        // when the policy really changed.
        match merged.retention.policy() {
            Ok(policy) => {
                self.retention.send_if_modified(|running| {
                    let changed = *running != policy;
                    if changed {
                        *running = policy;
                    }
                    changed
                });
            }
            Err(e) => notes.push(format!("[retention] not applied: {}: {}", e.key, e.reason)),
        }
        self.current.store(Arc::new(merged));
        if changes.live.is_empty() && changes.need_restart.is_empty() {
            tracing::info!("Configuration reloaded; nothing changed");
        } else {
            tracing::info!(
                applied = %changes.live.join(", "),
                "Configuration reloaded"
            );
        }
        if !changes.need_restart.is_empty() {
            tracing::warn!(
                keys = %changes.need_restart.join(", "),
                "These changed keys take effect only after a restart (systemctl restart convstore); they keep their old values until then"
            );
        }
        for note in &notes {
            tracing::warn!("{note}");
        }
        Outcome::Applied { changes, notes }
    }
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};

    use super::*;
    use crate::config::WhenFull;

    fn every_live_key_changed(base: &Settings) -> Settings {
        let mut new = base.clone();
        new.log.level = "debug".into();
        new.server.max_body_bytes = NonZeroUsize::new(7).unwrap();
        new.server.body_timeout_ms = NonZeroU64::new(10).unwrap();
        new.server.max_messages = NonZeroUsize::new(8).unwrap();
        new.server.max_batch_items = NonZeroUsize::new(9).unwrap();
        new.queue.when_full = WhenFull::Block;
        new.queue.block_timeout_ms = NonZeroU64::new(11).unwrap();
        new.queue.retry_after_secs = NonZeroU32::new(12).unwrap();
        new.batch.max_size = NonZeroUsize::new(13).unwrap();
        new.batch.max_wait_ms = NonZeroU64::new(14).unwrap();
        new.shutdown.timeout_ms = NonZeroU64::new(15).unwrap();
        new.retention.max_age = "365d".into();
        new.retention.interval = "5m".into();
        new.retention.tombstone_max_age = "30d".into();
        new
    }

    #[test]
    fn live_keys_are_real_settings_and_all_are_merged() {
        let base = Settings::default();
        let new = every_live_key_changed(&base);
        let c = changes(&base, &new);
        let mut expected: Vec<String> = LIVE_KEYS.iter().map(|k| k.to_string()).collect();
        expected.sort();
        assert_eq!(c.live, expected, "LIVE_KEYS must name real keys");
        assert!(c.need_restart.is_empty());
        // merge_live copies every live key: nothing live is left to change.
        let merged = merge_live(&base, &new);
        assert_eq!(merged, new);
    }

    #[test]
    fn retention_channels_are_live_whatever_their_names() {
        let base = Settings::default();
        let mut new = base.clone();
        new.retention.channels.insert("web".into(), "30d".into());
        new.retention
            .channels
            .insert("support desk".into(), "".into());
        let c = changes(&base, &new);
        assert_eq!(
            c.live,
            vec!["retention.channels.support desk", "retention.channels.web"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        );
        assert!(c.need_restart.is_empty());
        assert_eq!(merge_live(&base, &new), new);
    }

    #[test]
    fn other_keys_need_a_restart_and_keep_their_old_value() {
        let base = Settings::default();
        let mut new = base.clone();
        new.pipeline.workers = NonZeroUsize::new(9).unwrap();
        new.server.http_addr = "127.0.0.1:1".into();
        new.embedding.backends[0].url = "http://127.0.0.1:2".into();
        new.queue.retry_after_secs = NonZeroU32::new(30).unwrap();
        let c = changes(&base, &new);
        assert_eq!(c.live, vec!["queue.retry_after_secs"]);
        assert_eq!(
            c.need_restart,
            vec!["embedding.backends", "pipeline.workers", "server.http_addr"]
        );
        let merged = merge_live(&base, &new);
        assert_eq!(merged.pipeline.workers, base.pipeline.workers);
        assert_eq!(merged.queue.retry_after_secs.get(), 30);
        // Still reported on the next reload: the running value differs.
        assert_eq!(changes(&merged, &new).need_restart.len(), 3);
    }

    #[test]
    fn summary_names_what_happened() {
        let applied = Outcome::Applied {
            changes: Changes {
                live: vec!["batch.max_size".into()],
                need_restart: vec!["pipeline.workers".into()],
            },
            notes: vec![],
        };
        assert_eq!(
            applied.summary(),
            "reloaded: batch.max_size; restart needed for pipeline.workers"
        );
        assert!(applied.lasting_note().is_some());
        let clean = Outcome::Applied {
            changes: Changes {
                live: vec!["batch.max_size".into()],
                need_restart: vec![],
            },
            notes: vec![],
        };
        assert_eq!(clean.lasting_note(), None);
        let refused = Outcome::Rejected {
            reason: "bad".into(),
        };
        assert!(refused.summary().contains("previous configuration: bad"));
    }
}
