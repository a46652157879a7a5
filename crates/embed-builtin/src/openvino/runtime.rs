//! Finding and loading the OpenVINO runtime at run time.
//!
//! convstore builds and runs without OpenVINO: the `openvino` crate is
//! linked with `runtime-linking`, so nothing of OpenVINO is needed at build
//! time, and its C API is opened with `dlopen` when a builtin backend asks
//! for it. `scripts/setup.sh` installs the pinned runtime from the PyPI
//! wheel `openvino` beside the managed PostgreSQL; the libraries find each
//! other (and the CPU plugin) through their `$ORIGIN` rpath.

use std::path::{Path, PathBuf};

/// Where `scripts/setup.sh` installs the runtime when run as root...
pub const SYSTEM_RUNTIME_DIR: &str = "/usr/local/lib/convstore/openvino";
/// ... and, relative to `$HOME`, as a normal user.
pub const USER_RUNTIME_DIR: &str = ".local/lib/convstore/openvino";

/// The C API library's name prefix; the wheel ships only versioned names
/// (`libopenvino_c.so.2641` for 2026.4.1), no unversioned link.
const C_API_PREFIX: &str = "libopenvino_c.so";

/// The places searched for the runtime when `openvino_dir` is not set:
/// `state_dir/openvino`, then setup.sh's system and user places.
pub fn default_runtime_dirs(state_dir: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![
        state_dir.join("openvino"),
        PathBuf::from(SYSTEM_RUNTIME_DIR),
    ];
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        dirs.push(PathBuf::from(home).join(USER_RUNTIME_DIR));
    }
    dirs
}

/// The C API library in `dir`: the exact `libopenvino_c.so` when present,
/// else the versioned one with the highest version.
pub fn c_api_in(dir: &Path) -> Option<PathBuf> {
    let exact = dir.join(C_API_PREFIX);
    if exact.is_file() {
        return Some(exact);
    }
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{C_API_PREFIX}.")))
        })
        .max()
}

/// The C API library to load: in `configured` when set (an error if it is
/// not there), else in the first default place that has one. `Err` says
/// every place searched.
pub fn locate(configured: &str, state_dir: &Path) -> Result<PathBuf, String> {
    if !configured.is_empty() {
        let dir = Path::new(configured);
        return c_api_in(dir).ok_or_else(|| {
            format!(
                "openvino_dir {} holds no {C_API_PREFIX}.*; run scripts/setup.sh, which \
                 installs the runtime, or point openvino_dir at a directory of OpenVINO's \
                 libraries",
                dir.display()
            )
        });
    }
    let dirs = default_runtime_dirs(state_dir);
    if let Some(found) = dirs.iter().find_map(|d| c_api_in(d)) {
        return Ok(found);
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(format!(
        "the OpenVINO runtime is not installed (searched {}); scripts/setup.sh installs it \
         on x86_64",
        searched.join(", ")
    ))
}

/// Opens the C API library once per process. Later calls with any path
/// are no-ops: the `openvino` crate keeps one library for the process.
pub fn load(library: &Path) -> Result<(), String> {
    openvino_sys::library::load_from(library)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_versioned_library_is_chosen() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "libopenvino_c.so.2541",
            "libopenvino_c.so.2641",
            "libopenvino.so.2641",
        ] {
            std::fs::write(dir.path().join(name), b"").expect("write");
        }
        assert_eq!(
            c_api_in(dir.path()),
            Some(dir.path().join("libopenvino_c.so.2641"))
        );
        let error = locate(
            &dir.path().join("nothing").display().to_string(),
            dir.path(),
        )
        .expect_err("an empty configured directory is an error");
        assert!(error.contains("openvino_dir"), "{error}");
    }
}
