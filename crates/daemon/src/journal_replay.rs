//! Start-up replay: the records an earlier run left in the journal go back
//! on the queue, unless PostgreSQL already has them.
//!
//! Runs after the pipeline started (it drains what replay queues) and
//! before the listeners open, one segment at a time so memory stays
//! bounded by one segment plus the queue. A record already stored (its row
//! id is in `conversations`) is settled at once instead of being embedded
//! again; the rest get tickets whose release settles their record. Damage
//! found by the scanner is reported and skipped; the good records around
//! it are replayed.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::queue::{BoundedQueue, PushError};
use crate::ticket::{InFlight, Queued, Ticket};
use convstore_core::lifecycle::StampedChange;
use convstore_journal::record::DamageKind;
use convstore_journal::{Journal, Recovery, entry};
use convstore_store::{Store, StoreError};
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;

/// Ids looked up in PostgreSQL per query.
const LOOKUP_CHUNK: usize = 512;

/// What the replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub segments: usize,
    /// Put back on the queue.
    pub queued: u64,
    /// Already in PostgreSQL: settled without work.
    pub already_stored: u64,
    /// Verified by checksum but not a conversation this version reads.
    pub undecodable: u64,
    /// Bytes skipped as damaged (torn tail or corrupt).
    pub damaged_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read journal segment {id}: {source}")]
    Read { id: u64, source: std::io::Error },
    #[error("cannot check which journaled conversations are stored: {0}")]
    Database(#[from] StoreError),
    #[error("the queue closed during the journal replay")]
    QueueClosed,
}

/// Replays every segment of `recovery` into `queue`.
pub async fn replay(
    journal: &Journal,
    recovery: Recovery,
    store: &Store,
    queue: &BoundedQueue<Queued>,
    registry: &Arc<InFlight>,
) -> Result<ReplayReport, ReplayError> {
    let mut report = ReplayReport::default();
    for id in recovery.segments {
        let segment = {
            let journal = journal.clone();
            tokio::task::spawn_blocking(move || journal.recover_segment(id))
                .await
                .map_err(|e| ReplayError::Read {
                    id,
                    source: std::io::Error::other(e.to_string()),
                })?
                .map_err(|source| ReplayError::Read { id, source })?
        };
        report.segments += 1;
        for damage in &segment.damage {
            report.damaged_bytes += damage.len;
            metrics::counter!(m::JOURNAL_DAMAGED_BYTES, label::KIND => damage.kind.as_str())
                .increment(damage.len);
            match damage.kind {
                DamageKind::TornTail => tracing::warn!(
                    segment = %segment.path.display(),
                    offset = damage.offset,
                    bytes = damage.len,
                    "Journal segment ends in a torn record (a write cut short by a crash); it was never acknowledged as durable and is skipped"
                ),
                DamageKind::Corrupt | DamageKind::BadHeader => tracing::error!(
                    segment = %segment.path.display(),
                    offset = damage.offset,
                    bytes = damage.len,
                    kind = damage.kind.as_str(),
                    "Journal segment has bytes that fail their checksum; they are skipped (the conversation in them, if any, is lost), the good records around them are replayed, and the segment is kept as .damaged afterwards"
                ),
            }
        }
        let mut decoded: Vec<(convstore_journal::Position, StampedChange)> =
            Vec::with_capacity(segment.records.len());
        for (position, range) in &segment.records {
            match entry::decode(segment.payload(range)) {
                Ok(c) => decoded.push((*position, c)),
                Err(e) => {
                    report.undecodable += 1;
                    metrics::counter!(m::JOURNAL_REPLAYED, label::OUTCOME => "undecodable")
                        .increment(1);
                    tracing::error!(segment = %segment.path.display(), offset = range.start, error = %e, "Journal record passed its checksum but cannot be read; skipped");
                    journal.settle(*position);
                }
            }
        }
        drop(segment);
        for chunk in chunked(decoded, LOOKUP_CHUNK) {
            let keys: Vec<(Uuid, Option<&str>)> = chunk
                .iter()
                .map(|(_, c)| (c.change.row_id(), c.change.client_id()))
                .collect();
            let stored = store.stored_ids(&keys).await?;
            drop(keys);
            for (position, change) in chunk {
                // New changes are stamped after every replayed one, even if
                // the clock went back across the restart.
                crate::stamp::observe(change.stamp);
                // The stored version holds this change (or a later one):
                // nothing to apply. A deleted conversation has no row: its
                // changes are queued and discarded by its tombstone.
                if stored
                    .get(&change.change.row_id())
                    .is_some_and(|stamp| *stamp >= change.stamp)
                {
                    report.already_stored += 1;
                    journal.settle(position);
                    continue;
                }
                let journal = journal.clone();
                let ticket = Ticket::for_change(&change, registry.clone())
                    .with_release(move || journal.settle(position));
                push_waiting(queue, Queued::new(change, ticket)).await?;
                report.queued += 1;
            }
        }
    }
    metrics::counter!(m::JOURNAL_REPLAYED, label::OUTCOME => "queued").increment(report.queued);
    metrics::counter!(m::JOURNAL_REPLAYED, label::OUTCOME => "already_stored")
        .increment(report.already_stored);
    Ok(report)
}

fn chunked<T>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        out.push(items.by_ref().take(size).collect());
    }
    out
}

/// Pushes, waiting for room as long as it takes: the pipeline is running
/// and drains the queue. The byte count is capped at the queue's bound: a
/// record journaled under a larger `queue.max_bytes` than today's still
/// fits (alone), rather than being dropped.
async fn push_waiting(queue: &BoundedQueue<Queued>, item: Queued) -> Result<(), ReplayError> {
    let bytes = item.change.change.approx_bytes().min(queue.max_bytes());
    let mut item = item;
    loop {
        match queue
            .push_timeout(item, bytes, Duration::from_secs(1))
            .await
        {
            Ok(()) => return Ok(()),
            Err(PushError::Full(back) | PushError::TooLarge(back)) => item = back,
            // Shutting down during the replay: the record stays in the
            // journal for the next start. Cancelled, not dropped: a dropped
            // ticket would report it lost.
            Err(PushError::Closed(back)) => {
                back.ticket.cancel();
                return Err(ReplayError::QueueClosed);
            }
        }
    }
}
