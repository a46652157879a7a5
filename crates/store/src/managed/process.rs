//! The PostgreSQL processes themselves: spawning `postgres` (and the common
//! command set-up `initdb` shares: scrubbed environment, own process group,
//! the unprivileged account) with convstore's server settings, stopping it
//! with escalating signals, liveness checks that see through zombies, and
//! `postgres.log`, which both programs write to. Everything here touches
//! processes or their output; the steps that decide when to do so live in
//! the sibling modules.

use std::borrow::Cow;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tracing::{debug, info, warn};

use super::layout::Plan;
use super::{ManagedError, PORT, io_err};
use crate::settings::ManagedClusterSettings as Settings;

/// `postgres.log` is moved to `postgres.log.1` at start once it is this big.
const LOG_ROTATE_BYTES: u64 = 16 * 1024 * 1024;
/// Fast shutdown (SIGINT) rolls back open transactions and writes a
/// checkpoint; with a few hundred MB of dirty buffers that takes seconds.
pub(super) const FAST_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Immediate shutdown (SIGQUIT) skips the checkpoint (crash recovery at the
/// next start replays the WAL, nothing committed is lost).
pub(super) const IMMEDIATE_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Below this much `/dev/shm` (64 MB in a default container) parallel index
/// builds fail with "No space left on device"; use files in the data
/// directory for dynamic shared memory instead.
const MIN_DEV_SHM_BYTES: u64 = 1024 * 1024 * 1024;
const MAINTENANCE_WORK_MEM: &str = "256MB";

// ---------------------------------------------------------------------------
// Starting

pub(super) fn base_command(program: &Path, plan: &Plan) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(&plan.layout.cluster_dir)
        .stdin(Stdio::null())
        // Our own process group: a terminal's Ctrl-C must not reach
        // PostgreSQL while convstore still drains its queue into it.
        .process_group(0);
    for var in [
        "PGDATA",
        "PGPORT",
        "PGHOST",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
        // systemd's messages are for convstore: a PostgreSQL built with
        // systemd support would otherwise send its own READY=1.
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        cmd.env_remove(var);
    }
    if let Some(account) = &plan.run_as {
        cmd.uid(account.uid).gid(account.gid);
    }
    cmd
}

pub(super) fn log_stdio(file: &File, log: &Path) -> Result<(Stdio, Stdio), ManagedError> {
    let out = file
        .try_clone()
        .map_err(io_err("duplicate handle of", log))?;
    let err = file
        .try_clone()
        .map_err(io_err("duplicate handle of", log))?;
    Ok((Stdio::from(out), Stdio::from(err)))
}

/// `shared_buffers` is passed in resolved (`auto` reads the machine's
/// memory once, in [`spawn_postgres`], which also logs it).
fn server_args(plan: &Plan, settings: &Settings, shared_buffers: String) -> Vec<String> {
    let pool = settings.database.pool_size.get();
    let max_connections = pool.saturating_mul(2).saturating_add(10).max(20);
    // A list setting: quote the directory so spaces or commas survive.
    let socket_dirs = format!("\"{}\"", plan.layout.run_dir.display());
    let settings_list = [
        ("listen_addresses", String::new()),
        ("port", PORT.to_string()),
        ("unix_socket_directories", socket_dirs),
        ("unix_socket_permissions", "0700".into()),
        ("shared_buffers", shared_buffers),
        ("max_connections", max_connections.to_string()),
        ("maintenance_work_mem", MAINTENANCE_WORK_MEM.into()),
        ("autovacuum_work_mem", "64MB".into()),
        (
            "dynamic_shared_memory_type",
            plan.dynamic_shared_memory.into(),
        ),
        // No replication from a private cluster: minimal WAL makes bulk
        // loads cheaper. Back it up with pg_dump.
        ("wal_level", "minimal".into()),
        ("max_wal_senders", "0".into()),
        // Short OLTP queries: JIT compilation only adds latency.
        ("jit", "off".into()),
        ("cluster_name", "convstore".into()),
        ("logging_collector", "off".into()),
        ("log_destination", "stderr".into()),
    ];
    let mut args = vec!["-D".to_string(), plan.layout.data_dir.display().to_string()];
    // The operator's `database.managed_settings` come last: PostgreSQL
    // takes the last `-c` of a name, so they override ours.
    let operator = settings
        .database
        .managed_settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()));
    for (key, value) in settings_list.into_iter().chain(operator) {
        args.push("-c".into());
        args.push(format!("{key}={value}"));
    }
    args
}

pub(super) fn spawn_postgres(plan: &Plan, settings: &Settings) -> Result<Child, ManagedError> {
    let layout = &plan.layout;
    let log = log_marker(&layout.log_path, "starting postgres")?;
    let (stdout, stderr) = log_stdio(&log, &layout.log_path)?;
    let shared_buffers = super::memory::shared_buffers(&settings.database.managed_shared_buffers);
    let mut cmd = base_command(&plan.bins.postgres, plan);
    cmd.args(server_args(plan, settings, shared_buffers.clone()))
        .stdout(stdout)
        .stderr(stderr)
        // SIGKILL would skip the shutdown checkpoint and strand backends;
        // Drop sends SIGINT instead.
        .kill_on_drop(false);
    let glibc_tunables = glibc_tunables(
        &settings.database.managed_glibc_tunables,
        std::env::var_os("GLIBC_TUNABLES"),
    );
    if let Some(tunables) = &glibc_tunables {
        cmd.env("GLIBC_TUNABLES", tunables);
    }
    if settings.nice > 0 {
        let nice = libc::c_int::from(settings.nice);
        // SAFETY: runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: setpriority is one, and
        // nothing is allocated. Lowering one's own priority needs no
        // privilege; a failure is ignored (PostgreSQL then runs at the
        // daemon's priority, as before).
        unsafe {
            cmd.pre_exec(move || {
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                Ok(())
            });
        }
    }
    let tunables_shown = glibc_tunables
        .as_deref()
        .map_or(Cow::Borrowed("(inherited)"), OsStr::to_string_lossy);
    info!(
        bin_dir = %plan.bins.bin_dir.display(),
        version = %plan.bins.version,
        data_dir = %layout.data_dir.display(),
        user = plan.run_as.as_ref().map_or("(current user)", |a| a.name.as_str()),
        log = %layout.log_path.display(),
        nice = settings.nice,
        %shared_buffers,
        glibc_tunables = %tunables_shown,
        "Starting managed PostgreSQL"
    );
    cmd.spawn().map_err(io_err("start", &plan.bins.postgres))
}

/// The `GLIBC_TUNABLES` PostgreSQL starts with: `database.managed_glibc_tunables`
/// followed by what convstore itself was started with, so an operator's
/// own value for a name wins (glibc applies the pairs in order). `None`:
/// nothing configured, the inherited environment stays as it is.
fn glibc_tunables(configured: &str, inherited: Option<OsString>) -> Option<OsString> {
    if configured.is_empty() {
        return None;
    }
    let mut tunables = OsString::from(configured);
    if let Some(inherited) = inherited.filter(|v| !v.is_empty()) {
        tunables.push(":");
        tunables.push(inherited);
    }
    Some(tunables)
}

/// `mmap` (files under the data directory) when `/dev/shm` is small or
/// missing, else the default `posix`.
pub(super) fn dynamic_shared_memory_type() -> &'static str {
    let path = c"/dev/shm";
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: path is NUL-terminated and stat is a live, writable local.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    let size = (stat.f_blocks as u64).saturating_mul(stat.f_frsize as u64);
    if rc != 0 || size < MIN_DEV_SHM_BYTES {
        debug!(
            dev_shm_bytes = size,
            "Small or missing /dev/shm: dynamic shared memory in files"
        );
        "mmap"
    } else {
        "posix"
    }
}

// ---------------------------------------------------------------------------
// Stopping and signals

/// [`ManagedCluster::stop`](super::ManagedCluster::stop) for the server
/// `child` (pid `pid`): SIGINT, then SIGQUIT, then SIGKILL, each with its
/// grace period.
pub(super) async fn stop_server(mut child: Child, pid: u32) -> Result<(), ManagedError> {
    if let Ok(Some(status)) = child.try_wait() {
        warn!(pid, %status, "Managed PostgreSQL had already exited");
        return Ok(());
    }
    info!(pid, "Stopping managed PostgreSQL (fast shutdown)");
    let steps: [(Option<i32>, Duration); 3] = [
        (Some(libc::SIGINT), FAST_SHUTDOWN_GRACE),
        (Some(libc::SIGQUIT), IMMEDIATE_SHUTDOWN_GRACE),
        (None, KILL_GRACE),
    ];
    for (signal, grace) in steps {
        match signal {
            Some(sig) => send_signal(pid as i32, sig),
            None => {
                if let Err(e) = child.start_kill() {
                    debug!(pid, error = %e, "SIGKILL failed");
                }
            }
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(status)) => {
                log_stopped(pid, status, signal);
                return Ok(());
            }
            Ok(Err(e)) => {
                // The child cannot be waited for (already reaped
                // elsewhere); nothing more can be done with it.
                warn!(pid, error = %e, "Cannot wait for managed PostgreSQL");
                return Ok(());
            }
            Err(_) => warn!(
                pid,
                grace_ms = grace.as_millis() as u64,
                signal = signal_name(signal),
                "Managed PostgreSQL did not stop in time; escalating"
            ),
        }
    }
    Err(ManagedError::StopTimeout { pid })
}

/// [`ManagedCluster::stop_blocking`](super::ManagedCluster::stop_blocking)
/// for the server `child`: the same escalation, polling from this thread.
pub(super) fn stop_server_blocking(
    mut child: Child,
    pid: u32,
    timeout: Duration,
) -> Result<(), ManagedError> {
    let steps = [
        (libc::SIGINT, timeout),
        (libc::SIGQUIT, IMMEDIATE_SHUTDOWN_GRACE),
        (libc::SIGKILL, KILL_GRACE),
    ];
    for (sig, grace) in steps {
        match child.try_wait() {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return Ok(()),
        }
        send_signal(pid as i32, sig);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Ok(Some(status)) => {
                    log_stopped(pid, status, Some(sig));
                    return Ok(());
                }
                Err(_) => return Ok(()),
            }
        }
    }
    Err(ManagedError::StopTimeout { pid })
}

fn log_stopped(pid: u32, status: ExitStatus, signal: Option<i32>) {
    if signal == Some(libc::SIGINT) && status.success() {
        info!(pid, "Managed PostgreSQL stopped");
    } else {
        warn!(pid, %status, after = signal_name(signal), "Managed PostgreSQL stopped");
    }
}

fn signal_name(signal: Option<i32>) -> &'static str {
    match signal {
        Some(libc::SIGINT) => "SIGINT",
        Some(libc::SIGQUIT) => "SIGQUIT",
        Some(libc::SIGTERM) => "SIGTERM",
        Some(_) | None => "SIGKILL",
    }
}

/// Sends `sig` to one process. Never to pid 0, 1 or a negative pid (which
/// would reach whole process groups).
pub(super) fn send_signal(pid: i32, sig: i32) {
    if pid <= 1 {
        return;
    }
    // SAFETY: kill has no memory-safety preconditions; pid > 1 so the signal
    // targets exactly one process, never a group or init.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        debug!(pid, sig, error = %io::Error::last_os_error(), "kill failed");
    }
}

/// Alive and not a zombie. A zombie has exited; it only waits for its parent
/// to collect the status (a killed test harness, an init that never reaps).
pub(super) fn process_alive(pid: i32) -> bool {
    if pid <= 1 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and can be
    // signalled; pid > 1 targets one process.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ..." where comm may contain spaces and parentheses.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z" || state == "X")
}

/// SIGINT, then SIGQUIT, then SIGKILL, each followed by a wait; `first_grace`
/// for the first. True once the process is gone.
pub(super) fn terminate(pid: i32, first_grace: Duration) -> bool {
    let steps = [
        (libc::SIGINT, first_grace),
        (libc::SIGQUIT, IMMEDIATE_SHUTDOWN_GRACE),
        (libc::SIGKILL, KILL_GRACE),
    ];
    for (sig, grace) in steps {
        if !process_alive(pid) {
            return true;
        }
        send_signal(pid, sig);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !process_alive(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        warn!(
            pid,
            signal = signal_name(Some(sig)),
            "Process did not exit in time; escalating"
        );
    }
    !process_alive(pid)
}

// ---------------------------------------------------------------------------
// postgres.log

pub(super) fn rotate_log(log: &Path) -> Result<(), ManagedError> {
    if let Ok(meta) = fs::metadata(log)
        && meta.len() > LOG_ROTATE_BYTES
    {
        let old = log.with_extension("log.1");
        fs::rename(log, &old).map_err(io_err("rotate", log))?;
    }
    Ok(())
}

/// Appends a line to `postgres.log` so the operator sees where each start begins.
pub(super) fn log_marker(log: &Path, what: &str) -> Result<File, ManagedError> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(io_err("open", log))?;
    let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC");
    writeln!(file, "---- convstore: {what} at {now} ----").map_err(io_err("write", log))?;
    Ok(file)
}

/// The last lines of `postgres.log`, for error messages.
pub(super) fn log_tail(log: &Path) -> String {
    const MAX_BYTES: u64 = 4096;
    const MAX_LINES: usize = 20;
    let Ok(mut file) = File::open(log) else {
        return format!("(cannot read {})", log.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(MAX_BYTES);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return format!("(cannot read {})", log.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    // Drop a partial first line when we started mid-file.
    let skip = usize::from(start > 0 && lines.len() > 1);
    let from = lines.len().saturating_sub(MAX_LINES).max(skip);
    lines[from..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_tunables_are_ours_then_the_inherited_ones() {
        let ours = crate::settings::DEFAULT_MANAGED_GLIBC_TUNABLES;
        assert_eq!(glibc_tunables(ours, None), Some(OsString::from(ours)));
        assert_eq!(
            glibc_tunables(ours, Some(OsString::new())),
            Some(OsString::from(ours))
        );
        assert_eq!(
            glibc_tunables(ours, Some("glibc.malloc.top_pad=0".into())),
            Some(OsString::from(format!("{ours}:glibc.malloc.top_pad=0")))
        );
        // Nothing configured: the environment is passed on untouched.
        assert_eq!(
            glibc_tunables("", Some("glibc.malloc.top_pad=0".into())),
            None
        );
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("postgres.log");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        fs::write(&log, text).expect("write");
        let tail = log_tail(&log);
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), 20);
        assert_eq!(lines[19], "line 999");
        assert_eq!(lines[0], "line 980");
        assert!(log_tail(&dir.path().join("missing")).contains("cannot read"));
    }

    #[test]
    fn zombie_and_liveness_checks() {
        assert!(process_alive(std::process::id() as i32));
        assert!(!process_alive(0));
        assert!(!process_alive(1), "init is never treated as ours");
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id() as i32;
        // Not yet reaped: a zombie, which counts as gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_zombie(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!process_alive(pid));
        child.wait().expect("reap");
        assert!(!process_alive(pid));
    }
}
