//! Start-up and shutdown wiring of the journal: open it from the settings,
//! replay what an earlier run left into the queue.

use std::sync::Arc;
use std::time::Duration;

use convstore_journal::{Journal, JournalConfig, Recovery};
use convstore_store::Store;

use crate::journal_replay;
use crate::queue::BoundedQueue;
use crate::ticket::{InFlight, Queued};

/// `[journal]` resolved against `state_dir`.
pub fn config_from(settings: &crate::config::Settings) -> JournalConfig {
    JournalConfig {
        dir: settings.state_dir.join("journal"),
        max_bytes: settings.journal.max_bytes.get(),
        segment_bytes: settings.journal.segment_bytes.get(),
        fsync_interval: Duration::from_millis(settings.journal.fsync_interval_ms.get()),
    }
}

/// Opens the journal when `journal.enabled`; the recovery lists what an
/// earlier run left.
pub fn open_from_settings(
    settings: &crate::config::Settings,
) -> anyhow::Result<Option<(Journal, Recovery)>> {
    if !settings.journal.enabled {
        return Ok(None);
    }
    let config = config_from(settings);
    let dir = config.dir.clone();
    let (journal, recovery) = Journal::open(config).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the journal in {} (journal.enabled): {e}; check that the directory is writable, or set journal.enabled = false",
            dir.display()
        )
    })?;
    tracing::info!(
        dir = %dir.display(),
        segments_to_replay = recovery.segments.len(),
        bytes = journal.bytes(),
        max_bytes = journal.max_bytes(),
        "Journal open"
    );
    Ok(Some((journal, recovery)))
}

/// [`replay::replay`], logged.
pub async fn replay_at_start(
    journal: &Journal,
    recovery: Recovery,
    store: &Store,
    queue: &BoundedQueue<Queued>,
    registry: &Arc<InFlight>,
) -> anyhow::Result<()> {
    if recovery.segments.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let report = journal_replay::replay(journal, recovery, store, queue, registry)
        .await
        .map_err(|e| anyhow::anyhow!("journal replay failed: {e}"))?;
    tracing::info!(
        segments = report.segments,
        requeued = report.queued,
        already_stored = report.already_stored,
        undecodable = report.undecodable,
        damaged_bytes = report.damaged_bytes,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Journal replayed: conversations accepted before the last stop and not stored are queued again"
    );
    Ok(())
}
