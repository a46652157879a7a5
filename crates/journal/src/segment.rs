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
