//! The process's own resource use, read from `/proc/self` at scrape time
//! (memory, CPU, file descriptors, threads), rendered as Prometheus text.
//!
//! Read when asked rather than sampled into gauges: a scrape then sees the
//! value of that moment, and nothing runs between scrapes. CPU time is a
//! fractional counter, which the `metrics` facade (integer counters)
//! cannot express, so these lines are written here.

use std::fmt::Write as _;
use std::sync::OnceLock;

use super::metrics as m;

/// One reading of `/proc/self`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessSample {
    pub rss_bytes: u64,
    pub virtual_bytes: u64,
    /// User + system CPU time.
    pub cpu_seconds: f64,
    pub open_fds: u64,
    /// The soft `RLIMIT_NOFILE`.
    pub max_fds: Option<u64>,
    pub threads: u64,
    /// Unix time the process started.
    pub start_time_seconds: Option<f64>,
}

/// Reads `/proc/self`; `None` where there is no procfs.
pub fn sample() -> Option<ProcessSample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields = parse_stat(&stat)?;
    let ticks = clock_ticks();
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        // The directory handle itself is one of the entries.
        .map(|n| n.saturating_sub(1))
        .unwrap_or(0);
    Some(ProcessSample {
        rss_bytes: fields.rss_pages * page_size(),
        virtual_bytes: fields.vsize,
        cpu_seconds: (fields.utime + fields.stime) as f64 / ticks,
        open_fds,
        max_fds: max_fds(),
        threads: fields.threads,
        start_time_seconds: boot_time().map(|boot| boot + fields.starttime as f64 / ticks),
    })
}

/// The fields of `/proc/self/stat` used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatFields {
    utime: u64,
    stime: u64,
    threads: u64,
    starttime: u64,
    vsize: u64,
    rss_pages: u64,
}

/// `/proc/[pid]/stat`: the command name (field 2) is in parentheses and
/// may contain spaces and parentheses, so split after the last `)`.
fn parse_stat(stat: &str) -> Option<StatFields> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields from 3 (state) on; proc(5) numbers them from 1.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    Some(StatFields {
        utime: field(14)?,
        stime: field(15)?,
        threads: field(20)?,
        starttime: field(22)?,
        vsize: field(23)?,
        rss_pages: field(24)?,
    })
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    })
}

fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if p > 0 { p as u64 } else { 4096 }
    })
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Boot time (Unix seconds) from `/proc/stat`, read once.
fn boot_time() -> Option<f64> {
    static BOOT: OnceLock<Option<f64>> = OnceLock::new();
    *BOOT.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        stat.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    })
}

/// Appends the process metrics to `out` in the Prometheus text format.
pub fn render(out: &mut String) {
    let Some(p) = sample() else { return };
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
        out.push('\n');
    };
    metric(
        m::PROCESS_CPU_SECONDS,
        "counter",
        "User and system CPU time spent by convstore, in seconds.",
        p.cpu_seconds,
    );
    metric(
        m::PROCESS_RESIDENT_MEMORY_BYTES,
        "gauge",
        "Resident memory size of convstore, in bytes.",
        p.rss_bytes as f64,
    );
    metric(
        m::PROCESS_VIRTUAL_MEMORY_BYTES,
        "gauge",
        "Virtual memory size of convstore, in bytes.",
        p.virtual_bytes as f64,
    );
    metric(
        m::PROCESS_OPEN_FDS,
        "gauge",
        "Open file descriptors (sockets, database connections, files).",
        p.open_fds as f64,
    );
    if let Some(max) = p.max_fds {
        metric(
            m::PROCESS_MAX_FDS,
            "gauge",
            "The soft limit on open file descriptors.",
            max as f64,
        );
    }
    metric(
        m::PROCESS_THREADS,
        "gauge",
        "Operating-system threads of convstore.",
        p.threads as f64,
    );
    if let Some(start) = p.start_time_seconds {
        metric(
            m::PROCESS_START_TIME_SECONDS,
            "gauge",
            "Start time of convstore since the Unix epoch, in seconds.",
            start,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        // Fields 3..=24 after a command name with spaces and parentheses.
        let line = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 50 0 0 20 0 9 0 12345 987654321 2048 18446744073709551615";
        let f = parse_stat(line).unwrap();
        assert_eq!(f.utime, 250);
        assert_eq!(f.stime, 50);
        assert_eq!(f.threads, 9);
        assert_eq!(f.starttime, 12345);
        assert_eq!(f.vsize, 987_654_321);
        assert_eq!(f.rss_pages, 2048);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn reads_this_process() {
        let p = sample().expect("procfs on Linux");
        assert!(p.rss_bytes > 1 << 20, "{p:?}");
        assert!(p.threads >= 1 && p.open_fds >= 3, "{p:?}");
        // This test process has run for a moment at least.
        assert!(p.cpu_seconds >= 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = p.start_time_seconds.unwrap();
        assert!(start <= now + 1.0 && start > now - 86_400.0 * 365.0);
        let mut text = String::new();
        render(&mut text);
        assert!(text.contains("# TYPE convstore_process_cpu_seconds_total counter"));
        assert!(text.contains("convstore_process_resident_memory_bytes "));
    }
}
