//! The file descriptor limit, checked against what the listeners may hold.
//!
//! Each listener serves up to `server.max_connections` connections; with
//! too few descriptors a flood of connections takes the ones the database
//! pool and the journal need (issue 15). So at start convstore raises its
//! soft `RLIMIT_NOFILE` to the hard limit (as Go and nginx's
//! `worker_rlimit_nofile` do: the soft default of 1024 is a relic of
//! `select(2)`, which convstore does not use) and warns when even that is
//! short.

/// Descriptors kept for everything but client connections: the database
/// pool, the journal's segments, backend connections, the managed
/// cluster's sockets, logs.
pub const RESERVED_FDS: u64 = 1024;

/// Raises the soft limit to the hard one; warns when `listeners` ×
/// `max_connections` + [`RESERVED_FDS`] does not fit. Returns the soft
/// limit in force, or `None` when it cannot be read.
pub fn raise_and_check(listeners: usize, max_connections: usize) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "Cannot read the file descriptor limit (RLIMIT_NOFILE)");
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(
                from = limit.rlim_cur,
                to = raised.rlim_cur,
                "Raised the soft file descriptor limit to the hard limit"
            );
            limit = raised;
        }
    }
    let needed = (listeners as u64)
        .saturating_mul(max_connections as u64)
        .saturating_add(RESERVED_FDS);
    if limit.rlim_cur < needed {
        tracing::warn!(
            limit = limit.rlim_cur,
            needed,
            listeners,
            max_connections,
            "The file descriptor limit is below listeners × server.max_connections + {RESERVED_FDS}: a flood of connections could leave none for the database and the journal. Raise LimitNOFILE (systemd) or ulimit -n, or lower server.max_connections"
        );
    }
    Some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let soft = raise_and_check(1, 1).expect("readable");
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(soft, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
