//! Where the managed cluster lives on disk and getting it ready before any
//! process runs: the paths under `state_dir/postgres` ([`Layout`]), creating
//! them with the right modes, the socket-path length limit, and the lock file
//! that keeps a second convstore away. [`Plan::prepare`] is the blocking first
//! half of `ManagedCluster::start`; it also settles the binaries and the
//! account, which the other steps then read from the [`Plan`].

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::warn;

use super::account::{
    Account, check_traversable, resolve_account, running_as_root, take_ownership,
};
use super::binaries::{Binaries, check_data_version, locate_binaries};
use super::process::{dynamic_shared_memory_type, rotate_log};
use super::{ManagedError, PORT, io_err};
use crate::settings::ManagedClusterSettings as Settings;

/// `sizeof(sockaddr_un.sun_path)` on Linux, less the terminating NUL.
pub(super) const MAX_SOCKET_PATH: usize = 107;

/// The paths of one managed cluster (see the `managed` module docs).
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub(super) cluster_dir: PathBuf,
    pub(super) data_dir: PathBuf,
    /// initdb writes here; renamed to `data_dir` once complete, so an
    /// interrupted initdb never leaves a half-made cluster behind.
    pub(super) initdb_dir: PathBuf,
    pub(super) run_dir: PathBuf,
    pub(super) log_path: PathBuf,
    lock_path: PathBuf,
}

impl Layout {
    pub(super) fn new(cluster_dir: PathBuf) -> Self {
        Self {
            data_dir: cluster_dir.join("data"),
            initdb_dir: cluster_dir.join("data.initdb"),
            run_dir: cluster_dir.join("run"),
            log_path: cluster_dir.join("postgres.log"),
            lock_path: cluster_dir.join("convstore.lock"),
            cluster_dir,
        }
    }

    pub(super) fn socket_path(&self) -> PathBuf {
        self.run_dir.join(format!(".s.PGSQL.{PORT}"))
    }
}

/// What [`Plan::prepare`] settled before any process runs: the binaries, the
/// directories, the account to run as, and the held lock.
pub(super) struct Plan {
    pub(super) bins: Binaries,
    pub(super) layout: Layout,
    pub(super) run_as: Option<Account>,
    pub(super) lock: File,
    pub(super) dynamic_shared_memory: &'static str,
}

impl Plan {
    pub(super) fn prepare(settings: &Settings) -> Result<Plan, ManagedError> {
        let db = &settings.database;
        let cluster_major =
            fs::read_to_string(settings.cluster_dir.clone().join("data/PG_VERSION"))
                .ok()
                .and_then(|v| v.trim().parse().ok());
        let bins = locate_binaries(&db.managed_bin_dir, cluster_major)?;
        let run_as = if running_as_root() {
            Some(resolve_account(&db.managed_user)?)
        } else {
            if !db.managed_user.is_empty() {
                warn!(
                    managed_user = %db.managed_user,
                    "database.managed_user is ignored: convstore is not root, so PostgreSQL runs as the current user"
                );
            }
            None
        };

        let cluster_dir = create_dir_chain(&settings.cluster_dir.clone(), run_as.is_some())?;
        let layout = Layout::new(cluster_dir);
        let socket = layout.socket_path();
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(ManagedError::SocketPathTooLong { path: socket, len });
        }
        if let Some(account) = &run_as {
            check_traversable(&layout.cluster_dir, account)?;
            // The account must also reach the binaries (and, beside them,
            // their lib and share directories).
            let bin_dir = bins
                .bin_dir
                .canonicalize()
                .map_err(io_err("resolve", &bins.bin_dir))?;
            check_traversable(&bin_dir.join("postgres"), account)?;
        }

        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&layout.lock_path)
            .map_err(io_err("open lock file", &layout.lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(ManagedError::InUse {
                    dir: layout.cluster_dir.clone(),
                    lock: layout.lock_path.clone(),
                });
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(io_err("lock", &layout.lock_path)(e));
            }
        }

        for dir in [&layout.cluster_dir, &layout.run_dir] {
            if !dir.is_dir() {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(dir)
                    .map_err(io_err("create directory", dir))?;
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err("set permissions of", dir))?;
        }
        rotate_log(&layout.log_path)?;
        if layout.initdb_dir.exists() {
            warn!(dir = %layout.initdb_dir.display(), "Removing the remains of an interrupted initdb");
            fs::remove_dir_all(&layout.initdb_dir).map_err(io_err("remove", &layout.initdb_dir))?;
        }
        check_data_version(&layout.data_dir, &bins)?;
        if let Some(account) = &run_as {
            take_ownership(&layout, account)?;
        }

        Ok(Plan {
            bins,
            layout,
            run_as,
            lock,
            dynamic_shared_memory: dynamic_shared_memory_type(),
        })
    }
}

/// Creates `path` and any missing parents and returns it canonicalised.
/// Directories created here as root get mode 0711 so the unprivileged
/// PostgreSQL account can pass through them (and list nothing).
fn create_dir_chain(path: &Path, as_root: bool) -> Result<PathBuf, ManagedError> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(io_err("find the current directory for", path))?
            .join(path)
    };
    let missing: Vec<&Path> = absolute.ancestors().take_while(|p| !p.exists()).collect();
    for dir in missing.iter().rev() {
        match fs::DirBuilder::new().mode(0o755).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create directory", dir)(e)),
        }
        if as_root && *dir != absolute.as_path() {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o711))
                .map_err(io_err("set permissions of", dir))?;
        }
    }
    absolute
        .canonicalize()
        .map_err(io_err("resolve", &absolute))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_limit() {
        let short = Layout::new(PathBuf::from("/var/lib/convstore/postgres"));
        assert!(short.socket_path().as_os_str().len() <= MAX_SOCKET_PATH);
        let long = Layout::new(PathBuf::from(format!("/{}", "x".repeat(100))));
        assert!(long.socket_path().as_os_str().len() > MAX_SOCKET_PATH);
    }
}
