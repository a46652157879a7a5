//! Managed mode: a private PostgreSQL cluster under `state_dir/postgres`.
//!
//! When `database.url` is empty, convstore runs its own PostgreSQL server as a
//! child process so that `convstore serve` needs no set-up: no TCP port (the
//! server listens on a Unix socket in `state_dir/postgres/run` only), trust
//! authentication on that socket (its directory is mode 0700), superuser and
//! database both called `convstore`, and the `vector` extension created.
//!
//! Layout under `state_dir/postgres`:
//!
//! ```text
//! data/            the cluster (initdb on first start only)
//! run/             the Unix socket directory
//! postgres.log     PostgreSQL's stderr and initdb's output (rotated at start)
//! convstore.lock   held while a convstore process manages this cluster
//! ```
//!
//! Binaries, first match wins: `database.managed_bin_dir`; the installation
//! `pg_config --bindir` on `PATH` names, when it has pgvector; the portable
//! build `scripts/setup.sh` installs (`/usr/local/lib/convstore/pginstall`,
//! `$HOME/.local/lib/convstore/pginstall`).
//!
//! PostgreSQL refuses to run as root. When convstore is root, initdb and the
//! server run as `database.managed_user` (default `convstore` if that account
//! exists, else `nobody`), and the cluster directory belongs to that account.
//!
//! Crash recovery: a `postmaster.pid` whose process is gone is removed; a live
//! server on our data directory (left running when convstore was killed) is
//! shut down and replaced by our own child; a lock file prevents a second
//! convstore from doing that to a cluster another convstore is still using.
//! The server runs in its own process group so a terminal's Ctrl-C reaches
//! convstore only, which then drains its queue into the database before it
//! stops the cluster.
//!
//! This file holds the public face ([`ManagedCluster`], [`ManagedError`], the
//! connection URL); each job behind it has its own submodule:
//!
//! - `layout`: the paths under `state_dir/postgres`, creating them with the
//!   right permissions and taking the lock (the blocking first half of
//!   [`ManagedCluster::start`]).
//! - `binaries`: finding and vetting `initdb`/`postgres` with pgvector.
//! - `account`: the unprivileged account PostgreSQL runs as under root.
//! - `recovery`: clearing what a crashed or killed earlier run left behind.
//! - `initdb`: creating the cluster on first start.
//! - `process`: spawning the server with its settings, signalling and
//!   stopping it, and its log file.
//! - `bootstrap`: waiting until the server answers, then creating the
//!   database and the `vector` extension.

mod account;
mod binaries;
mod bootstrap;
mod initdb;
mod layout;
pub mod memory;
mod process;
mod recovery;

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio::process::Child;
use tracing::{info, warn};

use crate::settings::ManagedClusterSettings as Settings;

use binaries::MIN_MAJOR_VERSION;
use initdb::run_initdb;
use layout::{Layout, MAX_SOCKET_PATH, Plan};
use process::{process_alive, send_signal, spawn_postgres};
use recovery::clear_previous_server;

/// Superuser created by initdb; the role convstore connects as.
pub const SUPERUSER: &str = "convstore";
/// The database convstore's tables live in.
pub const DATABASE: &str = "convstore";
/// Only names the socket file (`.s.PGSQL.5432`); nothing listens on TCP.
const PORT: u16 = 5432;

/// Why the managed cluster could not be started or stopped. Each message says
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    #[error(
        "no PostgreSQL with pgvector found for managed mode ({searched}). Run scripts/setup.sh \
         to install the portable PostgreSQL, or set database.managed_bin_dir to a directory \
         holding initdb and postgres of an installation with pgvector, or set database.url to \
         use an existing PostgreSQL server"
    )]
    BinariesNotFound { searched: String },

    #[error(
        "database.managed_bin_dir = {dir}: {problem}. Point it at the bin directory of a \
         PostgreSQL >= {MIN_MAJOR_VERSION} installation with pgvector, or leave it empty to \
         use the one scripts/setup.sh installs"
    )]
    BadBinDir { dir: PathBuf, problem: String },

    #[error(
        "managed PostgreSQL cannot run as root and {problem}; set database.managed_user to an unprivileged account"
    )]
    Account { problem: String },

    #[error(
        "{dir} cannot be entered by user `{user}` (uid {uid}), which the managed PostgreSQL \
         runs as; allow it (for example `chmod o+x {dir}`), or keep state_dir and the \
         PostgreSQL binaries under directories that account can reach"
    )]
    NotTraversable {
        dir: PathBuf,
        user: String,
        uid: u32,
    },

    #[error(
        "the PostgreSQL socket path {path} is {len} bytes, more than the {MAX_SOCKET_PATH} a \
         Unix socket path may have; choose a shorter state_dir"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },

    #[error(
        "{dir} is in use by another convstore process (lock {lock} is held); stop it, or give \
         this one another state_dir"
    )]
    InUse { dir: PathBuf, lock: PathBuf },

    #[error(
        "the cluster in {data_dir} was created by PostgreSQL {data_version} but the binaries in \
         {bin_dir} are PostgreSQL {bin_version}; set database.managed_bin_dir to PostgreSQL \
         {data_version} binaries with pgvector, or dump the data with pg_dump, move {data_dir} \
         away and restore into a new cluster"
    )]
    VersionMismatch {
        data_dir: PathBuf,
        data_version: String,
        bin_dir: PathBuf,
        bin_version: String,
    },

    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "a PostgreSQL server (pid {pid}) left running on {data_dir} by an earlier convstore \
         did not stop; stop it by hand (kill {pid}) and start convstore again"
    )]
    OrphanAlive { pid: i32, data_dir: PathBuf },

    #[error("initdb failed ({status}); last lines of {log}:\n{tail}")]
    Initdb {
        status: String,
        log: PathBuf,
        tail: String,
    },

    #[error("managed PostgreSQL exited during start-up ({status}); last lines of {log}:\n{tail}")]
    Exited {
        status: String,
        log: PathBuf,
        tail: String,
    },

    #[error(
        "managed PostgreSQL did not accept connections within {timeout_ms} ms \
         (database.connect_timeout_ms; last error: {last_error}); last lines of {log}:\n{tail}"
    )]
    StartTimeout {
        timeout_ms: u64,
        last_error: String,
        log: PathBuf,
        tail: String,
    },

    #[error("managed PostgreSQL: {action} failed: {source}. See {log}")]
    Sql {
        action: &'static str,
        log: PathBuf,
        #[source]
        source: sqlx::Error,
    },

    #[error(
        "managed PostgreSQL (pid {pid}) did not exit even after SIGKILL; check it with \
         `ps -p {pid}`"
    )]
    StopTimeout { pid: u32 },

    #[error("managed PostgreSQL start-up task failed: {0}")]
    Task(String),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ManagedError + 'a {
    move |source| ManagedError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A running private PostgreSQL server, child of this process.
///
/// Stop it with [`ManagedCluster::stop`]. Dropping it without stopping sends
/// the server a fast-shutdown request and does not wait (best effort, so a
/// panicking test does not leak a server).
#[derive(Debug)]
pub struct ManagedCluster {
    /// `None` once stopped.
    child: Option<Child>,
    pid: u32,
    layout: Layout,
    bin_dir: PathBuf,
    version: String,
    /// Held for the cluster's lifetime (released by the kernel even on kill -9).
    _lock: File,
}

impl ManagedCluster {
    /// Starts the managed cluster for `settings`: finds the binaries, runs
    /// initdb on first use, clears what a crash left behind, starts the
    /// server, waits until it accepts connections (at most
    /// `database.connect_timeout_ms`), then creates database `convstore` and
    /// extension `vector` if missing.
    pub async fn start(settings: &Settings) -> Result<ManagedCluster, ManagedError> {
        let began = Instant::now();
        let owned = settings.clone();
        // Directory walks, chown, /proc scans and waiting for an orphaned
        // server are blocking work: keep them off the async workers.
        let plan = tokio::task::spawn_blocking(move || {
            let plan = Plan::prepare(&owned)?;
            clear_previous_server(&plan.layout)?;
            Ok::<_, ManagedError>(plan)
        })
        .await
        .map_err(|e| ManagedError::Task(e.to_string()))??;

        if !plan.layout.data_dir.join("PG_VERSION").is_file() {
            run_initdb(&plan).await?;
        }

        let child = spawn_postgres(&plan, settings)?;
        let pid = child.id().unwrap_or(0);
        let Plan {
            bins, layout, lock, ..
        } = plan;
        let mut cluster = ManagedCluster {
            child: Some(child),
            pid,
            layout,
            bin_dir: bins.bin_dir,
            version: bins.version,
            _lock: lock,
        };
        let timeout = Duration::from_millis(settings.database.connect_timeout_ms.get());
        if let Err(e) = cluster.wait_ready_and_prepare(timeout).await {
            if let Err(stop_err) = cluster.stop_inner().await {
                warn!(error = %stop_err, "Could not stop managed PostgreSQL after a failed start");
            }
            return Err(e);
        }
        info!(
            pid,
            version = %cluster.version,
            socket_dir = %cluster.layout.run_dir.display(),
            elapsed_ms = began.elapsed().as_millis() as u64,
            "Managed PostgreSQL is ready"
        );
        Ok(cluster)
    }

    /// A sqlx connection URL for database `convstore` over the Unix socket,
    /// e.g. `postgres://convstore@localhost:5432/convstore?host=/var/lib/convstore/postgres/run&sslmode=disable`
    /// (the directory percent-encoded where needed).
    pub fn url(&self) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost:{PORT}/{DATABASE}?host={}&sslmode=disable",
            percent_encode(&self.layout.run_dir.to_string_lossy())
        )
    }

    /// The same target as [`ManagedCluster::url`], as options.
    pub fn connect_options(&self) -> PgConnectOptions {
        connect_options(&self.layout.run_dir, DATABASE)
    }

    /// Whether the server process is still running (for readiness checks).
    /// Our child stays a zombie until we reap it (only `stop` does), so its
    /// pid cannot be reused meanwhile and a dead server reads as not running.
    pub fn is_running(&self) -> bool {
        self.child.is_some() && process_alive(self.pid as i32)
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `PostgreSQL 16.2`-style version of the binaries in use.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    pub fn data_dir(&self) -> &Path {
        &self.layout.data_dir
    }

    /// The directory holding the Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.layout.run_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.layout.log_path
    }

    /// Fast shutdown (SIGINT: open sessions are rolled back, a checkpoint is
    /// written), escalating to SIGQUIT then SIGKILL if the server does not
    /// exit within its grace period.
    pub async fn stop(mut self) -> Result<(), ManagedError> {
        self.stop_inner().await
    }

    async fn stop_inner(&mut self) -> Result<(), ManagedError> {
        let Some(child) = self.child.take() else {
            return Ok(());
        };
        process::stop_server(child, self.pid).await
    }

    /// [`ManagedCluster::stop`] for synchronous contexts (test drop guards):
    /// blocks the calling thread for up to about `timeout` plus the SIGQUIT
    /// and SIGKILL grace periods. Not for async code.
    pub fn stop_blocking(&mut self, timeout: Duration) -> Result<(), ManagedError> {
        let Some(child) = self.child.take() else {
            return Ok(());
        };
        process::stop_server_blocking(child, self.pid, timeout)
    }
}

impl Drop for ManagedCluster {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // `id()` is None once the child has been reaped, so a recycled
            // pid is never signalled.
            if let (Ok(None), Some(pid)) = (child.try_wait(), child.id()) {
                warn!(
                    pid,
                    "Managed PostgreSQL dropped without stop(); requesting fast shutdown"
                );
                send_signal(pid as i32, libc::SIGINT);
            }
        }
    }
}

fn connect_options(run_dir: &Path, database: &str) -> PgConnectOptions {
    PgConnectOptions::new_without_pgpass()
        .socket(run_dir)
        .port(PORT)
        .username(SUPERUSER)
        .database(database)
        .ssl_mode(PgSslMode::Disable)
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `/`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_is_accepted_by_sqlx_and_points_at_the_socket() {
        let run_dir = Path::new("/var/lib/conv store/postgres/run");
        let url = format!(
            "postgres://{SUPERUSER}@localhost:{PORT}/{DATABASE}?host={}&sslmode=disable",
            percent_encode(&run_dir.to_string_lossy())
        );
        let opts: PgConnectOptions = url.parse().expect("sqlx parses the URL");
        assert_eq!(opts.get_socket(), Some(&run_dir.to_path_buf()));
        assert_eq!(opts.get_port(), PORT);
        assert_eq!(opts.get_username(), SUPERUSER);
        assert_eq!(opts.get_database(), Some(DATABASE));
        assert!(matches!(opts.get_ssl_mode(), PgSslMode::Disable));
    }

    #[test]
    fn percent_encoding_keeps_slashes_and_unreserved() {
        assert_eq!(percent_encode("/a-b_c.d~e/f"), "/a-b_c.d~e/f");
        assert_eq!(percent_encode("/a b&c=d%"), "/a%20b%26c%3Dd%25");
        assert_eq!(percent_encode("/é"), "/%C3%A9");
    }
}
