//! The journal against a real directory: appends, group commit, refusal,
//! retirement, crash and torn-tail recovery, and a property test of
//! replay over random histories.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

fn config(dir: &Path, max_bytes: u64, segment_bytes: u64) -> JournalConfig {
    JournalConfig {
        dir: dir.to_path_buf(),
        max_bytes,
        segment_bytes,
        fsync_interval: Duration::from_millis(1),
    }
}

fn ok(_: Position) -> Result<(), ()> {
    Ok(())
}

impl Journal {
    /// What `kill -9` leaves: no final retirement, no sealing; the sync
    /// thread stops.
    fn crash(&self) {
        {
            let mut state = self.shared.lock();
            state.to_retire.clear();
            state.closing = true;
        }
        self.shared.work.notify_one();
        if let Some(thread) = self.sync_thread.lock().unwrap().take() {
            thread.join().unwrap();
        }
    }

    fn active_segment(&self) -> (u64, u64) {
        let state = self.shared.lock();
        let a = state.active.as_ref().unwrap();
        (a.id, a.len)
    }
}

/// Bytes of the `*.seg` files in `dir`.
fn bytes_on_disk(dir: &Path) -> u64 {
    segment::list(dir)
        .unwrap()
        .into_iter()
        .map(|id| std::fs::metadata(segment::path_of(dir, id)).unwrap().len())
        .sum()
}

/// What [`recover_all`] finds: the journal, every payload, every damage.
type Recovered = (Journal, Vec<(Position, Vec<u8>)>, Vec<record::Damage>);

/// Every payload of every segment left in `dir`, via a fresh journal.
fn recover_all(dir: &Path) -> Recovered {
    let (journal, recovery) = Journal::open(config(dir, 1 << 30, 1 << 20)).unwrap();
    let mut out = Vec::new();
    let mut damage = Vec::new();
    for id in recovery.segments {
        let seg = journal.recover_segment(id).unwrap();
        for (pos, range) in &seg.records {
            out.push((*pos, seg.payload(range).to_vec()));
        }
        damage.extend(seg.damage.iter().copied());
    }
    (journal, out, damage)
}

#[tokio::test]
async fn appended_records_become_durable_and_read_back_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, recovery) = Journal::open(config(dir.path(), 1 << 20, 1 << 20)).unwrap();
    assert!(recovery.segments.is_empty());
    let mut last = 0;
    for i in 0..10 {
        let pos = journal
            .append(format!("record {i}").as_bytes(), ok)
            .unwrap();
        assert!(pos.lsn > last);
        last = pos.lsn;
    }
    tokio::time::timeout(Duration::from_secs(10), journal.wait_durable(last))
        .await
        .expect("group commit within 10 s")
        .unwrap();
    assert_eq!(journal.bytes(), bytes_on_disk(dir.path()));
    journal.crash();

    let (again, records, damage) = recover_all(dir.path());
    assert!(damage.is_empty());
    let payloads: Vec<String> = records
        .iter()
        .map(|(_, p)| String::from_utf8(p.clone()).unwrap())
        .collect();
    assert_eq!(
        payloads,
        (0..10).map(|i| format!("record {i}")).collect::<Vec<_>>()
    );
    assert_eq!(again.outstanding(), 10);
    for (pos, _) in records {
        again.settle(pos);
    }
    let report = again.close();
    assert_eq!(report, CloseReport::default());
    assert!(
        segment::list(dir.path()).unwrap().is_empty(),
        "all stored: nothing left"
    );
}

#[test]
fn a_refused_enqueue_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(config(dir.path(), 1 << 20, 1 << 20)).unwrap();
    journal.append(b"kept", ok).unwrap();
    let before = journal.bytes();
    let refused = journal.append(b"refused by the queue", |_| Err("full"));
    assert!(matches!(refused, Err(AppendError::Enqueue("full"))));
    assert_eq!(journal.bytes(), before);
    journal.append(b"after", ok).unwrap();
    journal.crash();
    let (_again, records, damage) = recover_all(dir.path());
    assert!(damage.is_empty(), "{damage:?}");
    let payloads: Vec<&[u8]> = records.iter().map(|(_, p)| p.as_slice()).collect();
    assert_eq!(payloads, vec![&b"kept"[..], b"after"]);
}

#[test]
fn full_and_too_large_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(config(dir.path(), 200, 1 << 20)).unwrap();
    let payload = [b'x'; 60];
    journal.append(&payload, ok).unwrap();
    journal.append(&payload, ok).unwrap();
    match journal.append(&payload, ok) {
        Err(AppendError::Full { bytes, max_bytes }) => {
            assert_eq!(max_bytes, 200);
            assert!(bytes + 72 > 200);
        }
        other => panic!("expected Full, got {other:?}"),
    }
    assert!(matches!(
        journal.append(&[b'y'; 500], ok),
        Err(AppendError::TooLarge { .. })
    ));
}

#[test]
fn settled_segments_are_deleted_and_space_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    // Tiny segments: every record rotates.
    let (journal, _) = Journal::open(config(dir.path(), 10_000, 64)).unwrap();
    let positions: Vec<Position> = (0..20)
        .map(|i| journal.append(format!("{i:060}").as_bytes(), ok).unwrap())
        .collect();
    assert!(segment::list(dir.path()).unwrap().len() >= 10);
    let full = journal.bytes();
    for p in &positions[..19] {
        journal.settle(*p);
    }
    // The sync thread deletes a segment's file, then takes its bytes off
    // the count: wait for both, or the count is read between the two.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while segment::list(dir.path()).unwrap().len() > 1
        || journal.bytes() != bytes_on_disk(dir.path())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "segments not retired: {} on disk, {} bytes counted, {} on disk",
            segment::list(dir.path()).unwrap().len(),
            journal.bytes(),
            bytes_on_disk(dir.path())
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(journal.bytes() < full);
    // The last record's segment is the active one: kept at close.
    let report = journal.close();
    assert_eq!(report.kept_records, 1);
    let (_again, records, _) = recover_all(dir.path());
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].1, format!("{:060}", 19).into_bytes());
}

#[test]
fn torn_tail_is_reported_and_good_records_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(config(dir.path(), 1 << 20, 1 << 20)).unwrap();
    for i in 0..5 {
        journal
            .append(format!("record {i}").as_bytes(), ok)
            .unwrap();
    }
    let (id, len) = journal.active_segment();
    journal.crash();
    let path = segment::path_of(dir.path(), id);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len - 4).unwrap();
    // And a flipped byte in the second record.
    let mut bytes = std::fs::read(&path).unwrap();
    let second = 16 + record::encoded_len(8) + record::RECORD_HEADER_BYTES + 2;
    bytes[second] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let (again, records, damage) = recover_all(dir.path());
    let payloads: Vec<String> = records
        .iter()
        .map(|(_, p)| String::from_utf8(p.clone()).unwrap())
        .collect();
    assert_eq!(payloads, vec!["record 0", "record 2", "record 3"]);
    let kinds: Vec<_> = damage.iter().map(|d| d.kind).collect();
    assert_eq!(
        kinds,
        vec![record::DamageKind::Corrupt, record::DamageKind::TornTail]
    );
    // New appends go to a new segment, never after the damage.
    let pos = again.append(b"new", ok).unwrap();
    assert!(pos.segment > id);
    for (p, _) in records {
        again.settle(p);
    }
    again.close();
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().any(|n| n.ends_with(".seg.damaged")),
        "the corrupt segment is kept for inspection: {left:?}"
    );
}

#[tokio::test]
async fn durable_waiters_hear_of_close() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(config(dir.path(), 1 << 20, 1 << 20)).unwrap();
    let pos = journal.append(b"x", ok).unwrap();
    journal.wait_durable(pos.lsn).await.unwrap();
    journal.close();
    assert!(matches!(
        journal.wait_durable(pos.lsn + 1).await,
        Err(DurableError::Closed)
    ));
    assert!(matches!(journal.append(b"y", ok), Err(AppendError::Closed)));
}

#[derive(Debug, Clone)]
enum Op {
    Append(u8),
    /// Store the n-th unsettled record (modulo their count).
    Store(usize),
    Durable,
    /// Kill, cut up to this many non-durable bytes off the newest
    /// segment, restart and replay.
    Crash(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..80).prop_map(Op::Append),
        4 => (0usize..1000).prop_map(Op::Store),
        1 => Just(Op::Durable),
        1 => (0u16..300).prop_map(Op::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Over any history of appends, commits, fsyncs and crashes (with the
    /// non-durable tail of the newest segment cut anywhere), replaying with
    /// the "already stored" filter ends with every durable record stored
    /// exactly once, never stores a record twice, and the journal's byte
    /// count matches the files.
    #[test]
    fn replay_stores_every_durable_record_once(ops in proptest::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), 1 << 30, 256);
        let (mut journal, _) = Journal::open(cfg.clone()).unwrap();
        let mut next_id = 0u32;
        // The "database": id -> times inserted.
        let mut db: HashMap<u32, u32> = HashMap::new();
        // In the journal and not stored: (position, id).
        let mut unsettled: Vec<(Position, u32)> = Vec::new();
        let mut durable: HashSet<u32> = HashSet::new();
        let mut appended: Vec<u32> = Vec::new();
        // File length of the newest segment covered by the last fsync wait.
        let mut durable_len: HashMap<u64, u64> = HashMap::new();
        for op in ops {
            match op {
                Op::Append(n) => {
                    let id = next_id;
                    next_id += 1;
                    let payload = format!("{id}:{}", "x".repeat(n as usize));
                    let pos = journal.append(payload.as_bytes(), ok).unwrap();
                    unsettled.push((pos, id));
                    appended.push(id);
                }
                Op::Store(i) if !unsettled.is_empty() => {
                    let (pos, id) = unsettled.remove(i % unsettled.len());
                    *db.entry(id).or_default() += 1;
                    journal.settle(pos);
                }
                Op::Store(_) => {}
                Op::Durable => {
                    let lsn = journal.shared.lock().written_lsn();
                    rt.block_on(journal.wait_durable(lsn)).unwrap();
                    durable.extend(appended.iter().copied());
                    let (id, len) = journal.active_segment();
                    durable_len.insert(id, len);
                }
                Op::Crash(cut) => {
                    let (active, len) = journal.active_segment();
                    journal.crash();
                    let floor = durable_len.get(&active).copied().unwrap_or(16).max(16);
                    let new_len = len.saturating_sub(u64::from(cut)).max(floor);
                    let f = std::fs::OpenOptions::new().write(true).open(segment::path_of(dir.path(), active)).unwrap();
                    f.set_len(new_len).unwrap();
                    let (again, recovery) = Journal::open(cfg.clone()).unwrap();
                    journal = again;
                    unsettled.clear();
                    appended.retain(|id| durable.contains(id));
                    for seg_id in recovery.segments {
                        let seg = journal.recover_segment(seg_id).unwrap();
                        for (pos, range) in &seg.records {
                            let text = std::str::from_utf8(seg.payload(range)).unwrap();
                            let id: u32 = text.split(':').next().unwrap().parse().unwrap();
                            if db.contains_key(&id) {
                                journal.settle(*pos);
                            } else {
                                unsettled.push((*pos, id));
                                if !appended.contains(&id) { appended.push(id); }
                            }
                        }
                    }
                    // Every durable record not stored is back.
                    let back: HashSet<u32> = unsettled.iter().map(|(_, id)| *id).collect();
                    for id in &durable {
                        prop_assert!(db.contains_key(id) || back.contains(id), "durable record {id} lost");
                    }
                }
            }
        }
        // Store everything left, then close: the directory empties.
        for (pos, id) in unsettled.drain(..) {
            *db.entry(id).or_default() += 1;
            journal.settle(pos);
        }
        for id in &durable {
            prop_assert!(db.contains_key(id), "durable record {id} never stored");
        }
        for (id, n) in &db {
            prop_assert_eq!(*n, 1, "record {} stored {} times", id, n);
        }
        let report = journal.close();
        prop_assert_eq!(report.kept_records, 0);
        prop_assert!(segment::list(dir.path()).unwrap().is_empty());
    }
}

/// A small tmpfs for a disk-full test, unmounted (lazily) when dropped.
/// `None`, with the reason printed, where mounting is not allowed (not
/// root, or no CAP_SYS_ADMIN in a container).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { dir }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs (needs root): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Appends 4 KiB records until the disk is full; their positions.
fn fill(journal: &Journal) -> (Vec<Position>, String) {
    let mut positions = Vec::new();
    for i in 0..10_000 {
        match journal.append(format!("{i:04096}").as_bytes(), ok) {
            Ok(p) => positions.push(p),
            Err(AppendError::Unwritable(reason)) => return (positions, reason),
            Err(other) => panic!("expected Unwritable, got {other:?}"),
        }
    }
    panic!("the disk never filled");
}

fn wait_writable(journal: &Journal) -> Duration {
    let started = std::time::Instant::now();
    while journal.unwritable().is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still unwritable: {:?}",
            journal.unwritable()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

/// Disk full with the journal's own active segment (larger than the disk):
/// appends are refused with the reason, no partial record is left, and
/// once the records are stored the journal frees the segment and writes
/// again without a restart; then a crash on a full disk: the journal opens
/// anyway, and replaying frees the space.
#[test]
fn a_full_disk_is_refused_then_recovered_without_and_across_a_restart() {
    let Some(disk) = SmallDisk::mount("512k") else {
        return;
    };
    let dir = disk.path().join("journal");
    let cfg = config(&dir, 1 << 30, 1 << 30);
    let (journal, _) = Journal::open(cfg.clone()).unwrap();
    let (positions, reason) = fill(&journal);
    assert!(positions.len() > 10, "{}", positions.len());
    assert!(
        reason.contains("os error 28") && reason.contains(&dir.display().to_string()),
        "{reason}"
    );
    assert!(journal.unwritable().is_some());
    assert!(matches!(
        journal.append(b"x", ok),
        Err(AppendError::Unwritable(_))
    ));
    // Only whole records on disk: the failed one was cut off.
    for id in segment::list(&dir).unwrap() {
        let bytes = std::fs::read(segment::path_of(&dir, id)).unwrap();
        assert!(record::scan(&bytes).damage.is_empty(), "segment {id}");
    }

    // The pipeline stores them: the segment goes, appends resume.
    for p in &positions {
        journal.settle(*p);
    }
    wait_writable(&journal);
    journal.append(b"after", ok).unwrap();

    // Full again, then a crash: the next open cannot create a segment.
    let (more, _) = fill(&journal);
    journal.crash();
    let (again, recovery) = Journal::open(cfg.clone()).expect("opens on a full disk");
    assert!(again.unwritable().is_some(), "no room for a new segment");
    let mut replayed = 0;
    for id in recovery.segments {
        let seg = again.recover_segment(id).unwrap();
        assert!(seg.damage.is_empty(), "segment {id}: {:?}", seg.damage);
        for (p, _) in &seg.records {
            replayed += 1;
            again.settle(*p);
        }
    }
    assert_eq!(replayed, more.len() + 1, "`after` and the second fill");
    wait_writable(&again);
    again.append(b"after the restart", ok).unwrap();
    again.close();
}
