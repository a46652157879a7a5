//! Finding the PostgreSQL binaries managed mode runs, and vetting them:
//! `initdb` and `postgres` runnable, a supported version, pgvector installed,
//! and the same major version as an existing cluster. Kept apart because the
//! search order and its error messages are what an operator meets first when
//! managed mode cannot start.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::ManagedError;

/// Where `scripts/setup.sh` installs the portable build when run as root.
const SYSTEM_PORTABLE_DIR: &str = "/usr/local/lib/convstore/pginstall";
/// ... and, relative to `$HOME`, when run as a normal user.
const USER_PORTABLE_DIR: &str = ".local/lib/convstore/pginstall";
/// Oldest PostgreSQL convstore supports (DESIGN.md).
pub(super) const MIN_MAJOR_VERSION: u32 = 14;

/// A usable PostgreSQL installation: where it is and which version.
#[derive(Debug, Clone)]
pub(super) struct Binaries {
    pub(super) bin_dir: PathBuf,
    pub(super) initdb: PathBuf,
    pub(super) postgres: PathBuf,
    /// e.g. `PostgreSQL 16.2`
    pub(super) version: String,
    major: u32,
}

/// The binaries to use. Without `database.managed_bin_dir`, the first usable
/// candidate whose major version matches an existing cluster's wins (so
/// installing another PostgreSQL later does not strand the data), else the
/// first usable one.
pub(super) fn locate_binaries(
    managed_bin_dir: &str,
    cluster_major: Option<u32>,
) -> Result<Binaries, ManagedError> {
    if !managed_bin_dir.is_empty() {
        let dir = PathBuf::from(managed_bin_dir);
        return inspect_bin_dir(&dir).map_err(|problem| ManagedError::BadBinDir { dir, problem });
    }
    let mut searched = Vec::new();
    let mut candidates = Vec::new();
    match system_bin_dir() {
        Some(dir) => candidates.push((format!("pg_config on PATH names {}", dir.display()), dir)),
        None => searched.push("no pg_config on PATH".to_string()),
    }
    for install in portable_dirs() {
        let dir = install.join("bin");
        if dir.exists() {
            candidates.push((install.display().to_string(), dir));
        } else {
            searched.push(format!("{}: not installed", install.display()));
        }
    }
    let mut usable = Vec::new();
    for (label, dir) in candidates {
        match inspect_bin_dir(&dir) {
            Ok(bins) if cluster_major.is_none_or(|major| major == bins.major) => return Ok(bins),
            Ok(bins) => usable.push(bins),
            Err(problem) => searched.push(format!("{label}: {problem}")),
        }
    }
    usable
        .into_iter()
        .next()
        .ok_or_else(|| ManagedError::BinariesNotFound {
            searched: searched.join("; "),
        })
}

fn portable_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(SYSTEM_PORTABLE_DIR)];
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        dirs.push(PathBuf::from(home).join(USER_PORTABLE_DIR));
    }
    dirs
}

fn system_bin_dir() -> Option<PathBuf> {
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Checks a bin directory: initdb and postgres present and runnable, a
/// supported version, and pgvector in its share directory.
fn inspect_bin_dir(dir: &Path) -> Result<Binaries, String> {
    let initdb = dir.join("initdb");
    let postgres = dir.join("postgres");
    for exe in [&initdb, &postgres] {
        match fs::metadata(exe) {
            Ok(meta) if meta.is_file() && meta.mode() & 0o111 != 0 => {}
            Ok(_) => return Err(format!("{} is not an executable file", exe.display())),
            Err(_) => return Err(format!("no {}", exe.display())),
        }
    }
    // Running both catches a missing shared library (initdb links libpq).
    let mut text = String::new();
    for exe in [&postgres, &initdb] {
        let out = std::process::Command::new(exe)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} --version failed: {}",
                exe.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if text.is_empty() {
            text = String::from_utf8_lossy(&out.stdout).into_owned();
        }
    }
    let (version, major) = parse_version(&text)
        .ok_or_else(|| format!("cannot read the version in `{}`", text.trim()))?;
    if major < MIN_MAJOR_VERSION {
        return Err(format!(
            "{version} is too old (convstore needs PostgreSQL {MIN_MAJOR_VERSION} or newer)"
        ));
    }
    let candidates = share_dir_candidates(dir, major);
    let has_vector = candidates
        .iter()
        .any(|share| share.join("extension/vector.control").is_file());
    if !has_vector {
        let looked: Vec<String> = candidates
            .iter()
            .map(|s| s.join("extension/vector.control").display().to_string())
            .collect();
        return Err(format!("no pgvector ({} missing)", looked.join(", ")));
    }
    Ok(Binaries {
        bin_dir: dir.to_path_buf(),
        initdb,
        postgres,
        version,
        major,
    })
}

/// Where an installation's `share` directory may be: what its own pg_config
/// says, then the relocatable layout, then Debian's.
fn share_dir_candidates(bin_dir: &Path, major: u32) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let pg_config = bin_dir.join("pg_config");
    if pg_config.is_file()
        && let Ok(out) = std::process::Command::new(&pg_config)
            .arg("--sharedir")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        && out.status.success()
    {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dir.is_empty() {
            dirs.push(PathBuf::from(dir));
        }
    }
    if let Some(prefix) = bin_dir.parent() {
        dirs.push(prefix.join("share/postgresql"));
        dirs.push(prefix.join("share"));
    }
    dirs.push(PathBuf::from(format!("/usr/share/postgresql/{major}")));
    dirs.dedup();
    dirs
}

/// `postgres (PostgreSQL) 16.2` → (`PostgreSQL 16.2`, 16).
fn parse_version(text: &str) -> Option<(String, u32)> {
    let rest = text.trim().rsplit(") ").next()?.trim();
    let number = rest.split_whitespace().next()?;
    let digits: String = number.chars().take_while(char::is_ascii_digit).collect();
    let major = digits.parse().ok()?;
    Some((format!("PostgreSQL {number}"), major))
}

pub(super) fn check_data_version(data_dir: &Path, bins: &Binaries) -> Result<(), ManagedError> {
    let Ok(text) = fs::read_to_string(data_dir.join("PG_VERSION")) else {
        return Ok(());
    };
    let data_version = text.trim().to_string();
    if data_version != bins.major.to_string() {
        return Err(ManagedError::VersionMismatch {
            data_dir: data_dir.to_path_buf(),
            data_version,
            bin_dir: bins.bin_dir.clone(),
            bin_version: bins.version.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parsing() {
        assert_eq!(
            parse_version("postgres (PostgreSQL) 16.2\n"),
            Some(("PostgreSQL 16.2".into(), 16))
        );
        assert_eq!(
            parse_version("postgres (PostgreSQL) 15.6 (Debian 15.6-0+deb12u1)\n"),
            Some(("PostgreSQL 15.6".into(), 15))
        );
        assert_eq!(
            parse_version("postgres (PostgreSQL) 17beta1"),
            Some(("PostgreSQL 17beta1".into(), 17))
        );
        assert_eq!(parse_version("nonsense"), None);
    }

    #[test]
    fn bad_bin_dir_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = locate_binaries(&dir.path().to_string_lossy(), None).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ManagedError::BadBinDir { .. }), "{text}");
        assert!(text.contains("initdb"), "{text}");
        assert!(text.contains("database.managed_bin_dir"), "{text}");
    }
}
