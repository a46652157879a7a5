//! The journal: durable intake. With `journal.enabled`, every accepted
//! conversation is appended to an on-disk log before it is acknowledged,
//! replayed after a crash, and deleted once stored.
//!
//! ```text
//! ingress ──append──► active segment ──(group commit: one fsync per
//!    │                 (page cache)      journal.fsync_interval_ms)──► durable
//!    └──► queue ──► … ──► committed in PostgreSQL ──settle──► segment deleted
//!                                                               once all settled
//! ```
//!
//! - [`record`]: the checksummed, length-prefixed record format and the
//!   scanner that reads it back past torn or corrupt bytes.
//! - [`entry`]: a conversation as a record's payload.
//! - [`segment`]: segment files.
//! - [`sync`]: the group-commit thread (fsync, directory sync, deletions).
//! - [`replay`]: at start-up, the records not yet stored go back on the queue.
//!
//! Disk full: a failed write or segment creation (ENOSPC, or any I/O
//! error) leaves no partial record, seals the active segment (so that it is
//! deleted once its records are stored: it may be what filled the disk) and
//! makes the journal *unwritable*: appends are refused at once, readiness
//! says why, and the sync thread probes for space after every deleted
//! segment and on a backoff timer, starting a new segment once there is
//! room. Nothing needs a restart, and [`Journal::open`] on a full disk opens
//! unwritable instead of failing, so the replay can free the space.
//!
//! Positions: every appended record gets a log sequence number (LSN);
//! [`Journal::wait_durable`] resolves once an fsync covered it. Each
//! segment counts its records not yet settled; a sealed segment at zero is
//! deleted by the sync thread. Replays are idempotent because a record
//! carries the conversation's row id.

pub use convstore_core::journal::{entry, record};

pub mod segment;
mod sync;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use convstore_core::backoff::Backoff;

use tokio::sync::watch;

use convstore_telemetry::metrics as m;

/// Where a record sits: its segment and its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    pub segment: u64,
    /// 0 for records read back at start-up (already on disk).
    pub lsn: u64,
}

/// `[journal]` as the journal needs it.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// Appends are refused (429) while live segments hold this much.
    pub max_bytes: u64,
    /// A new segment is started once the active one reaches this size.
    pub segment_bytes: u64,
    /// Group commit: at most one fsync per interval.
    pub fsync_interval: Duration,
}

/// Why an append was refused. Nothing of the record is left on disk in
/// any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum AppendError<E> {
    /// The live segments hold `journal.max_bytes`: back off (429).
    #[error("the journal is full ({bytes} of {max_bytes} bytes in use); retry later")]
    Full { bytes: u64, max_bytes: u64 },
    /// This record alone is larger than the journal may grow (413).
    #[error("a {record_bytes}-byte record cannot fit in journal.max_bytes ({max_bytes})")]
    TooLarge { record_bytes: u64, max_bytes: u64 },
    /// Shutting down.
    #[error("the journal is closed")]
    Closed,
    /// An fsync (or a cut after a failed write) failed earlier; appends
    /// stay refused until an operator has looked (restart).
    #[error("the journal is unusable after an I/O error: {0}")]
    Failed(String),
    /// The journal cannot write now (disk full, or another write error):
    /// nothing of the record is on disk; appends resume by themselves once
    /// a probe finds room (503 with `Retry-After`).
    #[error("the journal cannot write: {0}")]
    Unwritable(String),
    /// The caller's enqueue step refused; the record was taken back.
    #[error("refused after the journal write")]
    Enqueue(E),
}

/// Why a durable wait ended without durability.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DurableError {
    #[error("journal fsync failed: {0}")]
    Failed(String),
    #[error("the journal closed before the record was fsynced")]
    Closed,
}

#[derive(Debug)]
struct Segment {
    bytes: u64,
    /// Records not yet settled (stored, or refused for good).
    outstanding: u64,
    /// No more appends: the active segment is the only unsealed one.
    sealed: bool,
    /// Had corrupt bytes at replay: kept as `.damaged` instead of deleted.
    damaged: bool,
}

struct Active {
    id: u64,
    file: Arc<File>,
    len: u64,
}

/// The journal cannot write for now; see the module documentation.
struct Unwritable {
    /// What failed, with the directory and the OS error, for readiness.
    reason: String,
    since: Instant,
    /// Bytes a probe must be able to write before appends resume.
    needed: u64,
    /// The next probe without a signal (space freed by an operator).
    next_probe: Instant,
    backoff: Backoff,
}

/// Probes ask for at least this much room, so that a disk with a few bytes
/// free does not flip the journal between writable and not on every append.
const MIN_PROBE_BYTES: u64 = 64 * 1024;
/// Backoff of the probes when nothing signals freed space.
const PROBE_INITIAL: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(2);

struct State {
    /// None while unwritable (and after close): appends need a segment the
    /// probe starts.
    active: Option<Active>,
    /// The id the next segment gets: segment ids only grow, also across
    /// segments deleted meanwhile.
    next_segment: u64,
    segments: BTreeMap<u64, Segment>,
    /// Bytes of every segment on disk (live ones and those about to go).
    total_bytes: u64,
    /// The LSN the next record gets; `next_lsn - 1` is the last written.
    next_lsn: u64,
    /// The LSN the last fsync snapshot covered.
    synced_lsn: u64,
    /// Sealed segments with data not yet fsynced.
    unsynced: Vec<Arc<File>>,
    /// A segment file was created: the directory needs an fsync.
    dir_dirty: bool,
    to_retire: Vec<u64>,
    closing: bool,
    failed: Option<String>,
    unwritable: Option<Unwritable>,
}

impl State {
    fn written_lsn(&self) -> u64 {
        self.next_lsn - 1
    }

    fn has_sync_work(&self) -> bool {
        self.written_lsn() > self.synced_lsn
            || self.dir_dirty
            || !self.unsynced.is_empty()
            || !self.to_retire.is_empty()
    }

    /// A probe is due now (never while closing: nothing is appended then).
    fn probe_due(&self, now: Instant) -> Option<Duration> {
        match &self.unwritable {
            Some(u) if !self.closing && self.failed.is_none() => {
                Some(u.next_probe.saturating_duration_since(now))
            }
            _ => None,
        }
    }

    /// Seals the active segment: no more appends to it, its data is
    /// fsynced by the next round and it is deleted once settled.
    fn seal_active(&mut self) {
        if let Some(active) = self.active.take() {
            self.unsynced.push(active.file);
            if let Some(seg) = self.segments.get_mut(&active.id) {
                seg.sealed = true;
            }
            self.retire_if_done(active.id);
        }
    }

    /// A write or a segment creation failed: appends are refused until a
    /// probe finds `needed` bytes of room. The active segment is sealed:
    /// if its own records filled the disk, deleting it once they are
    /// stored is what frees the space.
    fn become_unwritable(&mut self, dir: &Path, what: &str, error: &io::Error, needed: u64) {
        let reason = format!("{what} in {} failed: {error}", dir.display());
        self.seal_active();
        let needed = needed.max(MIN_PROBE_BYTES);
        match &mut self.unwritable {
            Some(u) => {
                u.reason = reason;
                u.needed = u.needed.max(needed);
            }
            None => {
                tracing::error!(
                    dir = %dir.display(),
                    error = %error,
                    "Journal cannot write ({what}); conversations are refused (503 with Retry-After) and /readyz reports it until there is room again; retrying when a stored segment is deleted and with backoff"
                );
                metrics::gauge!(m::JOURNAL_WRITABLE).set(0.0);
                let mut backoff = Backoff::new(PROBE_INITIAL, PROBE_MAX);
                let now = Instant::now();
                self.unwritable = Some(Unwritable {
                    reason,
                    since: now,
                    needed,
                    next_probe: now + backoff.next_delay(None),
                    backoff,
                });
            }
        }
    }

    /// Makes a freshly created segment (header written) the active one.
    fn install_active(&mut self, id: u64, file: File) {
        let header = record::SEGMENT_HEADER.len() as u64;
        self.segments.insert(
            id,
            Segment {
                bytes: header,
                outstanding: 0,
                sealed: false,
                damaged: false,
            },
        );
        self.total_bytes += header;
        self.next_segment = id + 1;
        self.active = Some(Active {
            id,
            file: Arc::new(file),
            len: header,
        });
    }

    /// Schedules segment `id` for deletion if it is sealed and settled.
    fn retire_if_done(&mut self, id: u64) -> bool {
        match self.segments.get(&id) {
            Some(seg) if seg.sealed && seg.outstanding == 0 && !self.to_retire.contains(&id) => {
                self.to_retire.push(id);
                true
            }
            _ => false,
        }
    }
}

/// The durable watermark published by the sync thread.
#[derive(Debug, Clone, Copy, Default)]
struct Durable {
    lsn: u64,
    failed: bool,
    closed: bool,
}

struct Shared {
    config: JournalConfig,
    state: Mutex<State>,
    /// Wakes the sync thread.
    work: Condvar,
    durable: watch::Sender<Durable>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before any
        // call that could panic, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The open journal. Cheap to clone; [`Journal::close`] ends it.
#[derive(Clone)]
pub struct Journal {
    shared: Arc<Shared>,
    sync_thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// Segments left by an earlier run, to be read back by [`replay`].
#[derive(Debug, Default)]
pub struct Recovery {
    pub segments: Vec<u64>,
}

/// One old segment read back: its verified records and its damage.
#[derive(Debug)]
pub struct RecoveredSegment {
    pub id: u64,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    /// Positions and payload ranges within `bytes`.
    pub records: Vec<(Position, std::ops::Range<usize>)>,
    pub damage: Vec<record::Damage>,
}

impl RecoveredSegment {
    pub fn payload(&self, range: &std::ops::Range<usize>) -> &[u8] {
        &self.bytes[range.clone()]
    }
}

/// What was left when the journal closed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloseReport {
    /// Records not stored: they are replayed at the next start.
    pub kept_records: u64,
    pub kept_segments: usize,
}

impl Journal {
    /// Opens (creating) the journal directory, starts a fresh active
    /// segment after any left by an earlier run, and starts the sync
    /// thread. The old segments are returned for [`replay`]; they count
    /// toward `max_bytes` until their records are stored.
    pub fn open(config: JournalConfig) -> io::Result<(Journal, Recovery)> {
        segment::create_dir(&config.dir)?;
        // A probe interrupted by a crash; it holds no records.
        segment::remove_probe(&config.dir);
        let old = segment::list(&config.dir)?;
        let mut segments = BTreeMap::new();
        let mut total_bytes = 0;
        for &id in &old {
            let bytes = std::fs::metadata(segment::path_of(&config.dir, id))?.len();
            total_bytes += bytes;
            segments.insert(
                id,
                Segment {
                    bytes,
                    outstanding: 0,
                    sealed: true,
                    damaged: false,
                },
            );
        }
        let active_id = old.last().map_or(1, |last| last + 1);
        let mut state = State {
            active: None,
            next_segment: active_id,
            segments,
            total_bytes,
            next_lsn: 1,
            synced_lsn: 0,
            unsynced: Vec::new(),
            dir_dirty: false,
            to_retire: Vec::new(),
            closing: false,
            failed: None,
            unwritable: None,
        };
        // On a full disk the new active segment cannot be created, but the
        // replay of the old ones (into PostgreSQL, elsewhere) deletes them
        // and frees the space: open unwritable rather than refuse to start,
        // and let the sync thread's probe create the segment then. Any
        // other error is a configuration problem the operator must see.
        match segment::create(&config.dir, active_id).and_then(|file| {
            segment::sync_dir(&config.dir)?;
            Ok(file)
        }) {
            Ok(file) => state.install_active(active_id, file),
            Err(e) if segment::is_out_of_space(&e) => {
                segment::remove_partial(&config.dir, active_id);
                state.become_unwritable(&config.dir, "creating a segment at start-up", &e, 0);
            }
            Err(e) => return Err(e),
        }
        let writable = state.unwritable.is_none();
        let total_bytes = state.total_bytes;
        let (durable, _) = watch::channel(Durable::default());
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(state),
            work: Condvar::new(),
            durable,
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("journal-sync".into())
                .spawn(move || sync::run(&shared))?
        };
        metrics::gauge!(m::JOURNAL_MAX_BYTES).set(shared.config.max_bytes as f64);
        metrics::gauge!(m::JOURNAL_BYTES).set(total_bytes as f64);
        metrics::gauge!(m::JOURNAL_WRITABLE).set(if writable { 1.0 } else { 0.0 });
        let journal = Journal {
            shared,
            sync_thread: Arc::new(Mutex::new(Some(thread))),
        };
        Ok((journal, Recovery { segments: old }))
    }

    pub fn dir(&self) -> &Path {
        &self.shared.config.dir
    }

    pub fn max_bytes(&self) -> u64 {
        self.shared.config.max_bytes
    }

    /// Bytes of the segments on disk.
    pub fn bytes(&self) -> u64 {
        self.shared.lock().total_bytes
    }

    /// Records appended or replayed and not yet settled.
    pub fn outstanding(&self) -> u64 {
        self.shared
            .lock()
            .segments
            .values()
            .map(|s| s.outstanding)
            .sum()
    }

    /// Why appends are refused for good (until a restart), if an fsync or
    /// a cut after a failed write failed.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }

    /// Why appends are refused for now, and since when, if the journal
    /// cannot write (disk full): it resumes by itself once there is room.
    pub fn unwritable(&self) -> Option<(String, Duration)> {
        self.shared
            .lock()
            .unwritable
            .as_ref()
            .map(|u| (u.reason.clone(), u.since.elapsed()))
    }

    /// Appends one record with `payload`, then runs `enqueue` with its
    /// position, both under the journal's lock: if `enqueue` refuses (the
    /// queue is full), the record is cut off the file again and the error
    /// handed back, so a refused conversation is never replayed. The write
    /// reaches the page cache; [`Journal::wait_durable`] waits for the fsync.
    pub fn append<E>(
        &self,
        payload: &[u8],
        enqueue: impl FnOnce(Position) -> Result<(), E>,
    ) -> Result<Position, AppendError<E>> {
        let bytes = record::encode(payload);
        let len = bytes.len() as u64;
        let config = &self.shared.config;
        if payload.len() > record::MAX_PAYLOAD_BYTES
            || len + record::SEGMENT_HEADER.len() as u64 > config.max_bytes
        {
            return Err(AppendError::TooLarge {
                record_bytes: len,
                max_bytes: config.max_bytes,
            });
        }
        let mut state = self.shared.lock();
        if let Some(reason) = &state.failed {
            return Err(AppendError::Failed(reason.clone()));
        }
        if state.closing {
            return Err(AppendError::Closed);
        }
        // Refused without touching the disk: the sync thread's probe finds
        // out when writing works again, not every request.
        if let Some(u) = &state.unwritable {
            return Err(AppendError::Unwritable(u.reason.clone()));
        }
        if state.total_bytes + len > config.max_bytes {
            return Err(AppendError::Full {
                bytes: state.total_bytes,
                max_bytes: config.max_bytes,
            });
        }
        let needs_rotation = state
            .active
            .as_ref()
            .is_some_and(|a| a.len >= config.segment_bytes);
        if needs_rotation && let Err(e) = self.rotate(&mut state) {
            state.become_unwritable(&config.dir, "creating a new segment", &e, len);
            let reason = unwritable_reason(&state);
            drop(state);
            self.shared.work.notify_one();
            return Err(AppendError::Unwritable(reason));
        }
        let Some(active) = state.active.as_ref() else {
            return Err(AppendError::Closed);
        };
        let (id, offset, file) = (active.id, active.len, active.file.clone());
        if let Err(e) = file.write_all_at(&bytes, offset) {
            if !cut_back(&mut state, &file, offset, &e) {
                let reason = state.failed.clone().unwrap_or_default();
                return Err(AppendError::Failed(reason));
            }
            let what = format!("writing a {len}-byte record to segment {id}");
            state.become_unwritable(&config.dir, &what, &e, len);
            let reason = unwritable_reason(&state);
            drop(state);
            self.shared.work.notify_one();
            return Err(AppendError::Unwritable(reason));
        }
        let position = Position {
            segment: id,
            lsn: state.next_lsn,
        };
        if let Err(refused) = enqueue(position) {
            if let Err(e) = file.set_len(offset) {
                // The record stays in the file: it would be replayed
                // although it was refused. Stop taking appends.
                let reason =
                    format!("cannot cut a refused record off segment {id} at offset {offset}: {e}");
                tracing::error!(error = %e, segment = id, offset, "Cannot cut a refused record off the journal; the journal stops taking conversations");
                metrics::gauge!(m::JOURNAL_WRITABLE).set(0.0);
                state.failed = Some(reason);
            }
            return Err(AppendError::Enqueue(refused));
        }
        state.next_lsn += 1;
        state.total_bytes += len;
        if let Some(active) = state.active.as_mut() {
            active.len += len;
        }
        if let Some(seg) = state.segments.get_mut(&id) {
            seg.bytes += len;
            seg.outstanding += 1;
        }
        drop(state);
        self.shared.work.notify_one();
        Ok(position)
    }

    /// Seals the active segment and starts the next one. On failure the
    /// active segment stays as it was (the caller seals it as it turns the
    /// journal unwritable).
    fn rotate(&self, state: &mut State) -> io::Result<()> {
        let dir = &self.shared.config.dir;
        let next = state.next_segment;
        let file = match segment::create(dir, next) {
            Ok(file) => file,
            Err(e) => {
                segment::remove_partial(dir, next);
                return Err(e);
            }
        };
        state.seal_active();
        state.install_active(next, file);
        state.dir_dirty = true;
        Ok(())
    }

    /// Resolves once the record at `lsn` (and everything before it) has
    /// been fsynced.
    pub async fn wait_durable(&self, lsn: u64) -> Result<(), DurableError> {
        let mut rx = self.shared.durable.subscribe();
        let seen = rx
            .wait_for(|d| d.lsn >= lsn || d.failed || d.closed)
            .await
            .map(|d| *d)
            .unwrap_or(Durable {
                closed: true,
                ..Durable::default()
            });
        if seen.lsn >= lsn {
            Ok(())
        } else if seen.failed {
            Err(DurableError::Failed(self.failure().unwrap_or_default()))
        } else {
            Err(DurableError::Closed)
        }
    }

    /// The record at `position` is stored (or refused by the database for
    /// good): it needs no replay. Its segment goes once all its records
    /// are settled and it is no longer the active one.
    pub fn settle(&self, position: Position) {
        let mut state = self.shared.lock();
        let Some(seg) = state.segments.get_mut(&position.segment) else {
            tracing::debug!(
                segment = position.segment,
                "Settled a record of a segment already retired"
            );
            return;
        };
        seg.outstanding = seg.outstanding.saturating_sub(1);
        if state.retire_if_done(position.segment) {
            drop(state);
            self.shared.work.notify_one();
        }
    }

    /// Reads old segment `id` back and counts its verified records as
    /// outstanding, so the segment stays until they are settled.
    pub fn recover_segment(&self, id: u64) -> io::Result<RecoveredSegment> {
        let path = segment::path_of(&self.shared.config.dir, id);
        let bytes = std::fs::read(&path)?;
        let scan = record::scan(&bytes);
        let base = bytes.as_ptr() as usize;
        let records: Vec<(Position, std::ops::Range<usize>)> = scan
            .records
            .iter()
            .map(|r| {
                let start = r.payload.as_ptr() as usize - base;
                (
                    Position {
                        segment: id,
                        lsn: 0,
                    },
                    start..start + r.payload.len(),
                )
            })
            .collect();
        let damage = scan.damage.clone();
        let damaged = damage
            .iter()
            .any(|d| d.kind != record::DamageKind::TornTail);
        {
            let mut state = self.shared.lock();
            if let Some(seg) = state.segments.get_mut(&id) {
                seg.outstanding += records.len() as u64;
                seg.damaged |= damaged;
            }
            state.retire_if_done(id);
        }
        self.shared.work.notify_one();
        Ok(RecoveredSegment {
            id,
            path,
            bytes,
            records,
            damage,
        })
    }

    /// Stops appends, fsyncs what was written, deletes every segment whose
    /// records are all stored (the active one included) and stops the
    /// sync thread. Records not stored stay on disk for the next start.
    pub fn close(&self) -> CloseReport {
        {
            let mut state = self.shared.lock();
            state.closing = true;
            state.seal_active();
            let ids: Vec<u64> = state.segments.keys().copied().collect();
            for id in ids {
                state.retire_if_done(id);
            }
        }
        self.shared.work.notify_one();
        let thread = self
            .sync_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!("The journal sync thread panicked");
        }
        let state = self.shared.lock();
        let kept: Vec<&Segment> = state
            .segments
            .values()
            .filter(|s| s.outstanding > 0)
            .collect();
        CloseReport {
            kept_records: kept.iter().map(|s| s.outstanding).sum(),
            kept_segments: kept.len(),
        }
    }
}

/// Closes the journal after the drain and says what stays for next time.
pub async fn close_at_exit(journal: Journal) {
    let report = tokio::task::spawn_blocking(move || journal.close())
        .await
        .unwrap_or_default();
    if report.kept_records > 0 {
        tracing::warn!(
            records = report.kept_records,
            segments = report.kept_segments,
            "Journal closed with conversations not stored; they are replayed at the next start"
        );
    } else {
        tracing::info!("Journal closed: everything in it was stored");
    }
}

/// After a failed write: cut the partial record off, so that no torn
/// record sits before later good ones; true when that worked. If even
/// that fails the journal stops taking conversations for good (until a
/// restart): the disk is evidently in worse trouble than being full.
fn cut_back(state: &mut State, file: &File, offset: u64, error: &io::Error) -> bool {
    tracing::warn!(error = %error, offset, "Journal write failed; the conversation is refused (503)");
    match file.set_len(offset) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "Cannot cut a partial record off the journal; the journal stops taking conversations until convstore is restarted");
            metrics::gauge!(m::JOURNAL_WRITABLE).set(0.0);
            state.failed = Some(format!(
                "write failed ({error}) and truncation failed ({e})"
            ));
            false
        }
    }
}

/// Why the journal is unwritable, as readiness says it.
fn unwritable_reason(state: &State) -> String {
    state.unwritable.as_ref().map_or_else(
        || "the journal cannot write".to_string(),
        |u| u.reason.clone(),
    )
}

#[cfg(test)]
mod tests;
