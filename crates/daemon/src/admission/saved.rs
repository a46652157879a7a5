//! The store rate estimate kept across restarts, in
//! `state_dir/store-rate.json`.
//!
//! Until a started daemon has measured its store rate the queue admits up
//! to `queue.capacity`: a flood in the first second (clients retrying all
//! at once after a restart) would fill it with many times the allowed
//! backlog. So the estimate is written down while it moves and at
//! shutdown, and a daemon started with the same model starts from it
//! instead; the first busy seconds correct it as before.
//!
//! The file is a hint, not state: a missing, unreadable or foreign one
//! (another model) means no estimate, and a failed write loses nothing.
//! It is replaced by rename, so a crash leaves the old or the new one.
//! It is read only if it is a regular file of at most [`MAX_BYTES`], so
//! whatever else lies at its path cannot hold up start-up (a FIFO would
//! block the open) or fill memory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The file under `state_dir`.
pub const FILE_NAME: &str = "store-rate.json";
/// Written at most this often while the estimate moves.
const EVERY: Duration = Duration::from_secs(10);
/// A change smaller than this share of the saved rate is not written.
const CHANGE: f64 = 0.05;
/// A saved estimate is a model's name and a number: tens of bytes for any
/// real model name, so a larger file is not one (a name of kilobytes would
/// only cost the hint).
const MAX_BYTES: u64 = 4096;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Saved {
    /// The embedding model it was measured with: another model (a builtin
    /// one on the CPU, a remote one) stores at another rate.
    model: String,
    conversations_per_second: f64,
}

/// Reads and writes one daemon's saved estimate.
#[derive(Debug)]
pub struct SavedRate {
    path: PathBuf,
    model: String,
    /// The rate last written (or read) and when.
    last: Option<(f64, Instant)>,
    /// A failed write is logged once, not every ten seconds.
    warned: bool,
}

impl SavedRate {
    pub fn new(state_dir: &Path, model: &str) -> SavedRate {
        SavedRate {
            path: state_dir.join(FILE_NAME),
            model: model.to_owned(),
            last: None,
            warned: false,
        }
    }

    /// The saved rate for this model, if there is a usable one.
    pub fn load(&mut self) -> Option<f64> {
        let text = match read_hint(&self.path) {
            Ok(Some(text)) => text,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "Cannot read the saved store rate; admitting by queue.capacity until the rate is measured");
                return None;
            }
        };
        let saved: Saved = match serde_json::from_slice(&text) {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "Ignoring a malformed saved store rate");
                return None;
            }
        };
        let rate = saved.conversations_per_second;
        if saved.model != self.model || !rate.is_finite() || rate <= 0.0 {
            return None;
        }
        self.last = Some((rate, Instant::now()));
        Some(rate)
    }

    /// Writes `rate` if it moved by more than [`CHANGE`] since the last
    /// write and that was [`EVERY`] ago, or at once with `now_or_never`
    /// (shutdown) if it moved at all.
    pub fn save(&mut self, rate: f64, now: Instant, now_or_never: bool) {
        if let Some((saved, at)) = self.last {
            let moved = (rate - saved).abs();
            let due = if now_or_never {
                moved > 0.0
            } else {
                moved > saved * CHANGE && now.saturating_duration_since(at) >= EVERY
            };
            if !due {
                return;
            }
        }
        match self.write(rate) {
            Ok(()) => {
                self.last = Some((rate, now));
                self.warned = false;
            }
            Err(e) if !std::mem::replace(&mut self.warned, true) => {
                tracing::warn!(path = %self.path.display(), error = %e, "Cannot save the store rate; a restart will admit by queue.capacity until it is measured again");
            }
            Err(_) => {}
        }
    }

    fn write(&self, rate: f64) -> std::io::Result<()> {
        let saved = Saved {
            model: self.model.clone(),
            conversations_per_second: rate,
        };
        let text = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
        // The state directory is ours; with an external database and no
        // journal nothing else may have created it.
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let partial = self.path.with_extension("json.partial");
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, &self.path)
    }
}

/// The file at `path` if it is a regular one of at most [`MAX_BYTES`];
/// `None` if there is none.
fn read_hint(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_BYTES + 1)
        .read_to_end(&mut text)?;
    if text.len() as u64 > MAX_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_BYTES} bytes, so not a saved rate"
        )));
    }
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_rate_is_read_back_by_the_same_model_only() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut saved = SavedRate::new(dir.path(), "nomic-embed-text");
        assert_eq!(saved.load(), None, "nothing saved yet");
        saved.save(512.5, t0, false);
        assert_eq!(
            SavedRate::new(dir.path(), "nomic-embed-text").load(),
            Some(512.5)
        );
        assert_eq!(SavedRate::new(dir.path(), "all-minilm").load(), None);
    }

    #[test]
    fn a_malformed_or_meaningless_file_is_no_estimate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        for text in [
            "",
            "{",
            "[1, 2]",
            r#"{"model": "m", "conversations_per_second": -3}"#,
            r#"{"model": "m", "conversations_per_second": 0}"#,
            r#"{"model": "m", "conversations_per_second": "fast"}"#,
            r#"{"model": "m"}"#,
        ] {
            std::fs::write(&path, text).unwrap();
            assert_eq!(SavedRate::new(dir.path(), "m").load(), None, "{text:?}");
        }
    }

    #[test]
    fn only_a_small_regular_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        // A directory in its place.
        std::fs::create_dir(&path).unwrap();
        assert_eq!(SavedRate::new(dir.path(), "m").load(), None);
        std::fs::remove_dir(&path).unwrap();
        // A valid estimate padded past the bound.
        let padded = format!(
            r#"{{"model": "m", "conversations_per_second": 300{}}}"#,
            " ".repeat(MAX_BYTES as usize)
        );
        std::fs::write(&path, padded).unwrap();
        assert_eq!(SavedRate::new(dir.path(), "m").load(), None);
        // A FIFO, whose open would block until a writer came.
        std::fs::remove_file(&path).unwrap();
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo(3) reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        assert_eq!(SavedRate::new(dir.path(), "m").load(), None);
        // Within the bound, the same estimate is read.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, r#"{"model": "m", "conversations_per_second": 300}"#).unwrap();
        assert_eq!(SavedRate::new(dir.path(), "m").load(), Some(300.0));
    }

    #[test]
    fn small_or_frequent_changes_are_not_written_but_shutdown_writes_any() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let read = || SavedRate::new(dir.path(), "m").load();
        let mut saved = SavedRate::new(dir.path(), "m");
        saved.save(100.0, t0, false);
        // Within 5 %: not written, however late.
        saved.save(104.0, t0 + Duration::from_secs(60), false);
        assert_eq!(read(), Some(100.0));
        // More than 5 % but within 10 s of the last write: not yet.
        saved.save(150.0, t0 + Duration::from_secs(5), false);
        assert_eq!(read(), Some(100.0));
        saved.save(150.0, t0 + Duration::from_secs(11), false);
        assert_eq!(read(), Some(150.0));
        // Shutdown writes what it has.
        saved.save(151.0, t0 + Duration::from_secs(12), true);
        assert_eq!(read(), Some(151.0));
    }

    #[test]
    fn a_state_dir_that_cannot_be_written_loses_nothing_but_the_hint() {
        let dir = tempfile::tempdir().unwrap();
        // A "state directory" under a regular file cannot be created.
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let mut saved = SavedRate::new(&file.join("state"), "m");
        saved.save(100.0, Instant::now(), true);
        assert!(saved.warned);
        assert_eq!(saved.load(), None);
    }
}
