//! Clearing what an earlier run left behind before a new server starts: a
//! stale `postmaster.pid`, a server or backends still running on our data
//! directory after convstore was killed, stale socket and socket-lock files.
//! Runs with the cluster lock held, so whatever it finds belongs to a
//! convstore that is gone.

use std::fs;
use std::io;
use std::path::Path;

use tracing::{debug, info, warn};

use super::layout::Layout;
use super::process::{FAST_SHUTDOWN_GRACE, IMMEDIATE_SHUTDOWN_GRACE, process_alive, terminate};
use super::{ManagedError, PORT, io_err};

/// Makes sure no server runs on our data directory and no stale lock or
/// socket file stops a new one from starting. Our lock is held, so any server
/// found was left by a convstore that is gone.
pub(super) fn clear_previous_server(layout: &Layout) -> Result<(), ManagedError> {
    let pid_file = layout.data_dir.join("postmaster.pid");
    let recorded = fs::read_to_string(&pid_file)
        .ok()
        .map(|text| parse_pid_file(&text));
    if let Some(Some(pid)) = recorded {
        if !process_alive(pid) {
            info!(
                pid,
                "Removing stale postmaster.pid left by a crash (that process is gone)"
            );
        } else if process_uses_dir(pid, &layout.data_dir) {
            warn!(
                pid,
                data_dir = %layout.data_dir.display(),
                "A PostgreSQL server left running by an earlier convstore is using the managed cluster; shutting it down"
            );
            if !terminate(pid, FAST_SHUTDOWN_GRACE) {
                return Err(ManagedError::OrphanAlive {
                    pid,
                    data_dir: layout.data_dir.clone(),
                });
            }
            info!(pid, "The earlier PostgreSQL server has stopped");
        } else {
            info!(
                pid,
                "Removing stale postmaster.pid: its pid now belongs to an unrelated process"
            );
        }
    } else if let Some(None) = recorded {
        info!("Removing an unreadable postmaster.pid");
    }

    // After a kill -9 of the postmaster itself, its backends linger until
    // they notice; a new server refuses to start while they hold the old
    // shared memory.
    let stragglers = processes_in_dir(&layout.data_dir);
    if !stragglers.is_empty() {
        warn!(
            pids = ?stragglers,
            "PostgreSQL processes of an earlier server are still running on the managed cluster; stopping them"
        );
        for pid in stragglers {
            if !terminate(pid, IMMEDIATE_SHUTDOWN_GRACE) {
                return Err(ManagedError::OrphanAlive {
                    pid,
                    data_dir: layout.data_dir.clone(),
                });
            }
        }
    }

    let socket = layout.socket_path();
    let socket_lock = socket.with_extension(format!("{PORT}.lock"));
    for stale in [pid_file, socket, socket_lock] {
        match fs::remove_file(&stale) {
            Ok(()) => debug!(path = %stale.display(), "Removed stale file"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove stale", &stale)(e)),
        }
    }
    Ok(())
}

/// The first line of `postmaster.pid` is the postmaster's pid (negative for
/// a single-user backend).
fn parse_pid_file(text: &str) -> Option<i32> {
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let pid = pid.checked_abs()?;
    (pid > 1).then_some(pid)
}

/// Whether process `pid` works in `data_dir`: PostgreSQL processes chdir
/// into the data directory; `-D <dir>` on the command line is the fallback
/// when we may not read its cwd.
fn process_uses_dir(pid: i32, data_dir: &Path) -> bool {
    if let Ok(cwd) = fs::read_link(format!("/proc/{pid}/cwd")) {
        return cwd == data_dir;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let target = data_dir.as_os_str().as_encoded_bytes();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(2)
        .any(|pair| pair[0] == b"-D" && pair[1] == target)
}

fn processes_in_dir(data_dir: &Path) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid > 1 && pid != me)
        .filter(|&pid| fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == data_dir))
        .filter(|&pid| process_alive(pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_parsing() {
        assert_eq!(parse_pid_file("1234\n/var/lib/x\n"), Some(1234));
        assert_eq!(parse_pid_file("-1234\n"), Some(1234));
        assert_eq!(parse_pid_file(""), None);
        assert_eq!(parse_pid_file("garbage\n"), None);
        assert_eq!(parse_pid_file("0\n"), None);
        assert_eq!(parse_pid_file("1\n"), None);
        assert_eq!(parse_pid_file(&format!("{}\n", i32::MIN)), None);
    }

    #[test]
    fn own_process_is_found_by_cwd() {
        let cwd = std::env::current_dir().expect("cwd");
        assert!(process_uses_dir(std::process::id() as i32, &cwd));
        assert!(!process_uses_dir(
            std::process::id() as i32,
            Path::new("/nonexistent")
        ));
    }
}
