//! `database.managed_shared_buffers = "auto"`: the managed cluster's
//! `shared_buffers` from the memory this process may use.
//!
//! At 768 dimensions the HNSW index takes ~4 KB a chunk, so 100k chunks
//! outgrow a fixed 256 MB, and every insert then copies graph pages in
//! from the OS cache (docs/PERFORMANCE.md "Managed PostgreSQL for HNSW
//! ingest" has the measurement). PostgreSQL's own advice is a quarter of
//! the machine's memory; a cgroup limit (a systemd `MemoryMax=`, a
//! container) counts as the machine. Bounded below by PostgreSQL's default
//! and above so that a big host does not hand most of a small daemon's
//! footprint to one cache.

use std::path::Path;

/// A quarter of the memory available.
const SHARE: u64 = 4;
const MIN_BYTES: u64 = 128 * 1024 * 1024;
const MAX_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// The value `shared_buffers` gets for `configured`: `configured` itself
/// unless it is `auto` (any case), else a size in MB from [`auto_bytes`].
pub fn shared_buffers(configured: &str) -> String {
    if configured.trim().eq_ignore_ascii_case("auto") {
        let bytes = auto_bytes(available_memory());
        format!("{}MB", bytes / (1024 * 1024))
    } else {
        configured.to_string()
    }
}

/// A quarter of `available` bytes within 128 MB and 2 GB; 128 MB when
/// the memory is unknown.
pub fn auto_bytes(available: Option<u64>) -> u64 {
    available.map_or(MIN_BYTES, |bytes| {
        (bytes / SHARE).clamp(MIN_BYTES, MAX_BYTES)
    })
}

/// The smaller of the machine's memory and this process's cgroup limit.
fn available_memory() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total(&text));
    let limit = cgroup_limit(Path::new("/proc/self/cgroup"), Path::new("/sys/fs/cgroup"));
    match (total, limit) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The cgroup v2 `memory.max` of this process (`None`: no limit, or no
/// cgroup v2).
fn cgroup_limit(self_cgroup: &Path, root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(self_cgroup).ok()?;
    // cgroup v2: a single line `0::/path`.
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let file = root.join(path.trim_start_matches('/')).join("memory.max");
    parse_memory_max(&std::fs::read_to_string(file).ok()?)
}

/// `memory.max`'s content: bytes, or `max` for no limit.
pub fn parse_memory_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn a_quarter_of_memory_within_bounds() {
        assert_eq!(auto_bytes(None), 128 * MIB);
        assert_eq!(auto_bytes(Some(256 * MIB)), 128 * MIB);
        assert_eq!(auto_bytes(Some(4 * 1024 * MIB)), 1024 * MIB);
        assert_eq!(auto_bytes(Some(24 * 1024 * MIB)), 2048 * MIB);
    }

    #[test]
    fn reads_meminfo_and_memory_max() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_576_000 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max("2147483648\n"), Some(2_147_483_648));
    }

    #[test]
    fn auto_gives_a_size_and_anything_else_passes_through() {
        let auto = shared_buffers("auto");
        let mb: u64 = auto
            .strip_suffix("MB")
            .expect("MB")
            .parse()
            .expect("number");
        assert!((128..=2048).contains(&mb), "{auto}");
        assert_eq!(shared_buffers("AUTO"), auto);
        assert_eq!(shared_buffers("512MB"), "512MB");
    }
}
