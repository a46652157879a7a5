//! Segment files on disk: names, creation, listing, retirement.
//!
//! `state_dir/journal/00000000000000000042.seg`: the number orders segments
//! (the active one has the highest); zero-padded so `ls` sorts them too.
//! A segment whose good records were replayed but which had corrupt bytes
//! is kept as `<name>.seg.damaged` for an operator to inspect, instead of
//! being deleted.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::record::SEGMENT_HEADER;

const EXTENSION: &str = "seg";
const DAMAGED_SUFFIX: &str = ".damaged";
/// The scratch file of a space probe (not a segment: `list` ignores it).
const PROBE: &str = "space-probe.tmp";
/// `EDQUOT`: a quota is a full disk for this user.
const EDQUOT: i32 = 122;

pub fn path_of(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.{EXTENSION}"))
}

/// The segment number in a file name like `00000000000000000042.seg`.
pub fn id_of(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".seg")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Creates the journal directory (mode 0700: it holds conversation text).
pub fn create_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Segment ids present in `dir`, ascending. Other files are left alone.
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(id) = entry.file_name().to_str().and_then(id_of) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Creates segment `id` with its header written; fails if it exists.
pub fn create(dir: &Path, id: u64) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path_of(dir, id))?;
    file.write_all(&SEGMENT_HEADER)?;
    Ok(file)
}

/// The disk (or this user's quota) is full: the one write error that
/// freeing space cures, so the one a start-up tolerates.
pub fn is_out_of_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(EDQUOT)
}

/// Removes segment `id` after its creation failed (a name, or a partial
/// header, on a full disk), so the next attempt can create it anew.
/// Best-effort: a leftover empty or partial-header segment reads back as
/// a harmless torn tail.
pub fn remove_partial(dir: &Path, id: u64) {
    let _ = fs::remove_file(path_of(dir, id));
}

/// Whether `bytes` can be written in `dir` now: writes them to a scratch
/// file and removes it. A probe, not a reservation: it keeps the journal
/// from declaring itself writable on a disk with a few bytes free.
pub fn probe_space(dir: &Path, bytes: u64) -> io::Result<()> {
    let path = dir.join(PROBE);
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        let block = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        while written < bytes {
            let n = (bytes - written).min(block.len() as u64) as usize;
            std::os::unix::fs::FileExt::write_all_at(&file, &block[..n], written)?;
            written += n as u64;
        }
        Ok(())
    })();
    remove_probe(dir);
    result
}

/// Removes a probe's scratch file (also one a crash left).
pub fn remove_probe(dir: &Path) {
    let _ = fs::remove_file(dir.join(PROBE));
}

/// fsync of the directory, so a created or removed file name is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes a fully stored segment, or keeps a damaged one under another
/// name for inspection.
pub fn retire(dir: &Path, id: u64, damaged: bool) -> io::Result<()> {
    let path = path_of(dir, id);
    if damaged {
        let mut kept = path.clone().into_os_string();
        kept.push(DAMAGED_SUFFIX);
        fs::rename(&path, kept)
    } else {
        match fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_strangers_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for id in [3u64, 1, 20] {
            create(dir.path(), id).unwrap();
        }
        fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        fs::write(dir.path().join("7.seg"), b"x").unwrap();
        assert_eq!(list(dir.path()).unwrap(), vec![1, 3, 20]);
        assert_eq!(id_of("00000000000000000042.seg"), Some(42));
        assert!(create(dir.path(), 3).is_err(), "never overwrite a segment");
        retire(dir.path(), 3, false).unwrap();
        retire(dir.path(), 20, true).unwrap();
        assert_eq!(list(dir.path()).unwrap(), vec![1]);
        assert!(dir.path().join("00000000000000000020.seg.damaged").exists());
    }
}
