//! The group-commit thread: one fsync covers every record written since
//! the last one, at most once per `journal.fsync_interval_ms`; then the
//! durable watermark moves and the waiters of `?wait=durable` are answered.
//! It also syncs the directory after a segment was created and retires
//! settled segments, keeping file-system work off the async workers.
//!
//! A failed fsync is not retried: after one, Linux may have dropped the
//! dirty pages it could not write, so a second fsync "succeeding" proves
//! nothing (PostgreSQL's fsync lesson, 2018). The journal refuses appends
//! from then on and readiness says why.
//!
//! While the journal is unwritable (a write failed: disk full), this thread
//! also probes for room: at once after it deleted a segment (space freed by
//! the pipeline storing records), and on a backoff timer (space freed by
//! someone else), never in a hot loop. A successful probe starts a new
//! active segment and appends resume.

use std::sync::Arc;
use std::time::Instant;

use super::{Durable, Shared, segment};
use convstore_telemetry::metrics as m;

pub(super) fn run(shared: &Shared) {
    let interval = shared.config.fsync_interval;
    let mut last_sync: Option<Instant> = None;
    loop {
        let mut state = shared.lock();
        loop {
            if state.has_sync_work() || state.closing {
                break;
            }
            match state.probe_due(Instant::now()) {
                Some(wait) if wait.is_zero() => break,
                Some(wait) => {
                    state = shared
                        .work
                        .wait_timeout(state, wait)
                        .map(|(s, _)| s)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
                None => state = shared.work.wait(state).unwrap_or_else(|p| p.into_inner()),
            }
        }
        if state.closing && !state.has_sync_work() {
            break;
        }
        if !state.has_sync_work() {
            drop(state);
            probe(shared);
            continue;
        }
        // Pace the fsyncs: what arrives meanwhile shares the next one.
        if let Some(last) = last_sync {
            let since = last.elapsed();
            if since < interval && !state.closing {
                drop(state);
                std::thread::sleep(interval - since);
                state = shared.lock();
            }
        }
        let lsn = state.written_lsn();
        let mut files: Vec<Arc<std::fs::File>> = std::mem::take(&mut state.unsynced);
        if let Some(active) = &state.active
            && lsn > state.synced_lsn
        {
            files.push(active.file.clone());
        }
        let dir_dirty = std::mem::take(&mut state.dir_dirty);
        let retire = std::mem::take(&mut state.to_retire);
        state.synced_lsn = lsn;
        let already_failed = state.failed.is_some();
        drop(state);

        let started = Instant::now();
        let mut failure = None;
        if !already_failed {
            for file in &files {
                if let Err(e) = file.sync_data() {
                    failure = Some(format!("fsync of a journal segment failed: {e}"));
                    break;
                }
            }
            if failure.is_none()
                && dir_dirty
                && let Err(e) = segment::sync_dir(&shared.config.dir)
            {
                failure = Some(format!("fsync of the journal directory failed: {e}"));
            }
        }
        last_sync = Some(Instant::now());
        if !files.is_empty() {
            metrics::histogram!(m::JOURNAL_FSYNC_SECONDS).record(started.elapsed().as_secs_f64());
        }
        match failure {
            Some(reason) => {
                tracing::error!(reason = %reason, "Journal fsync failed: the journal refuses new conversations until convstore is restarted; records written so far are replayed then");
                metrics::gauge!(m::JOURNAL_WRITABLE).set(0.0);
                shared.lock().failed = Some(reason);
                shared.durable.send_modify(|d| d.failed = true);
            }
            None if !already_failed => {
                shared.durable.send_if_modified(|d: &mut Durable| {
                    if d.lsn < lsn {
                        d.lsn = lsn;
                        true
                    } else {
                        false
                    }
                });
            }
            None => {}
        }

        for id in retire {
            let damaged = shared.lock().segments.get(&id).is_some_and(|s| s.damaged);
            match segment::retire(&shared.config.dir, id, damaged) {
                Ok(()) => {
                    let mut state = shared.lock();
                    if let Some(seg) = state.segments.remove(&id) {
                        state.total_bytes = state.total_bytes.saturating_sub(seg.bytes);
                    }
                    // Space came back: probe now rather than at the timer.
                    if let Some(u) = state.unwritable.as_mut() {
                        u.next_probe = Instant::now();
                    }
                    if damaged {
                        tracing::warn!(
                            segment = id,
                            "Journal segment with damaged bytes fully replayed; kept as .damaged for inspection (safe to delete)"
                        );
                    }
                }
                Err(e) => {
                    // It stays counted; its records are stored, so a
                    // replay would only find them present.
                    tracing::warn!(segment = id, error = %e, "Cannot delete a fully stored journal segment");
                }
            }
        }
        metrics::gauge!(m::JOURNAL_BYTES).set(shared.lock().total_bytes as f64);
    }
    shared.durable.send_modify(|d| d.closed = true);
}

/// One probe while unwritable: is there room for the record that failed?
/// If so, start a new active segment and take appends again; if not, wait
/// for the next freed segment or the backoff. The file-system work runs
/// without the lock, so requests are refused meanwhile, not blocked.
fn probe(shared: &Shared) {
    let (needed, id) = {
        let state = shared.lock();
        match &state.unwritable {
            Some(u) => (u.needed, state.next_segment),
            None => return,
        }
    };
    let dir = &shared.config.dir;
    let created = segment::probe_space(dir, needed)
        .and_then(|()| segment::create(dir, id))
        .inspect_err(|_| segment::remove_partial(dir, id));
    let mut state = shared.lock();
    match created {
        Ok(file) if state.closing || state.failed.is_some() => {
            // Closed (or broken) meanwhile: the new segment holds nothing.
            drop(file);
            drop(state);
            segment::remove_partial(dir, id);
        }
        Ok(file) => {
            state.install_active(id, file);
            state.dir_dirty = true;
            if let Some(u) = state.unwritable.take() {
                tracing::info!(
                    dir = %dir.display(),
                    segment = id,
                    unwritable_ms = u.since.elapsed().as_millis() as u64,
                    "Journal writable again: conversations are accepted"
                );
            }
            metrics::gauge!(m::JOURNAL_WRITABLE).set(1.0);
        }
        Err(e) => {
            if let Some(u) = state.unwritable.as_mut() {
                u.reason = format!(
                    "no room for {needed} bytes in {} ({e}); retrying when space is freed",
                    dir.display()
                );
                u.next_probe = Instant::now() + u.backoff.next_delay(None);
                tracing::debug!(error = %e, needed, "Journal still cannot write");
            }
        }
    }
}
