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

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write as _};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection};
use tokio::process::{Child, Command};
use tracing::{debug, info, warn};

use crate::config::Settings;

/// Superuser created by initdb; the role convstore connects as.
pub const SUPERUSER: &str = "convstore";
/// The database convstore's tables live in.
pub const DATABASE: &str = "convstore";
/// Only names the socket file (`.s.PGSQL.5432`); nothing listens on TCP.
const PORT: u16 = 5432;
/// `sizeof(sockaddr_un.sun_path)` on Linux, less the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Where `scripts/setup.sh` installs the portable build when run as root.
const SYSTEM_PORTABLE_DIR: &str = "/usr/local/lib/convstore/pginstall";
/// ... and, relative to `$HOME`, when run as a normal user.
const USER_PORTABLE_DIR: &str = ".local/lib/convstore/pginstall";
/// The account PostgreSQL runs as under root when `database.managed_user` is
/// empty and it exists; `setup.sh` creates it.
const DEFAULT_ACCOUNT: &str = "convstore";
const FALLBACK_ACCOUNT: &str = "nobody";
/// Oldest PostgreSQL convstore supports (DESIGN.md).
const MIN_MAJOR_VERSION: u32 = 14;
/// `postgres.log` is moved to `postgres.log.1` at start once it is this big.
const LOG_ROTATE_BYTES: u64 = 16 * 1024 * 1024;
/// Fast shutdown (SIGINT) rolls back open transactions and writes a
/// checkpoint; with a few hundred MB of dirty buffers that takes seconds.
const FAST_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Immediate shutdown (SIGQUIT) skips the checkpoint (crash recovery at the
/// next start replays the WAL, nothing committed is lost).
const IMMEDIATE_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
const KILL_GRACE: Duration = Duration::from_secs(5);
/// Below this much `/dev/shm` (64 MB in a default container) parallel index
/// builds fail with "No space left on device"; use files in the data
/// directory for dynamic shared memory instead.
const MIN_DEV_SHM_BYTES: u64 = 1024 * 1024 * 1024;
const MAINTENANCE_WORK_MEM: &str = "256MB";

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
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = self.pid;
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

    /// [`ManagedCluster::stop`] for synchronous contexts (test drop guards):
    /// blocks the calling thread for up to about `timeout` plus the SIGQUIT
    /// and SIGKILL grace periods. Not for async code.
    pub fn stop_blocking(&mut self, timeout: Duration) -> Result<(), ManagedError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = self.pid;
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

    async fn wait_ready_and_prepare(&mut self, timeout: Duration) -> Result<(), ManagedError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let admin = connect_options(&self.layout.run_dir, "postgres");
        let mut last_error = String::from("none yet");
        let mut conn = loop {
            if let Some(child) = self.child.as_mut() {
                match child.try_wait() {
                    Ok(None) => {}
                    Ok(Some(status)) => {
                        self.child = None;
                        return Err(ManagedError::Exited {
                            status: status.to_string(),
                            log: self.layout.log_path.clone(),
                            tail: log_tail(&self.layout.log_path),
                        });
                    }
                    Err(e) => {
                        return Err(io_err("wait for", &self.layout.data_dir)(e));
                    }
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ManagedError::StartTimeout {
                    timeout_ms: timeout.as_millis() as u64,
                    last_error,
                    log: self.layout.log_path.clone(),
                    tail: log_tail(&self.layout.log_path),
                });
            }
            match tokio::time::timeout(deadline - now, admin.connect()).await {
                Ok(Ok(conn)) => break conn,
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => last_error = "connection attempt timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };

        let log = self.layout.log_path.clone();
        let sql_err = |action: &'static str| {
            let log = log.clone();
            move |source| ManagedError::Sql {
                action,
                log,
                source,
            }
        };
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE)
                .fetch_one(&mut conn)
                .await
                .map_err(sql_err("looking up database convstore"))?;
        if !exists {
            info!("Creating database {DATABASE} in the managed cluster");
            sqlx::raw_sql("CREATE DATABASE convstore")
                .execute(&mut conn)
                .await
                .map_err(sql_err("CREATE DATABASE convstore"))?;
        }
        conn.close().await.ok();

        let mut conn = self
            .connect_options()
            .connect()
            .await
            .map_err(sql_err("connecting to database convstore"))?;
        sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS vector")
            .execute(&mut conn)
            .await
            .map_err(sql_err(
                "CREATE EXTENSION vector (is pgvector installed for these binaries?)",
            ))?;
        conn.close().await.ok();
        Ok(())
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

// ---------------------------------------------------------------------------
// Preparation (blocking)

#[derive(Debug, Clone)]
struct Layout {
    cluster_dir: PathBuf,
    data_dir: PathBuf,
    /// initdb writes here; renamed to `data_dir` once complete, so an
    /// interrupted initdb never leaves a half-made cluster behind.
    initdb_dir: PathBuf,
    run_dir: PathBuf,
    log_path: PathBuf,
    lock_path: PathBuf,
}

impl Layout {
    fn new(cluster_dir: PathBuf) -> Self {
        Self {
            data_dir: cluster_dir.join("data"),
            initdb_dir: cluster_dir.join("data.initdb"),
            run_dir: cluster_dir.join("run"),
            log_path: cluster_dir.join("postgres.log"),
            lock_path: cluster_dir.join("convstore.lock"),
            cluster_dir,
        }
    }

    fn socket_path(&self) -> PathBuf {
        self.run_dir.join(format!(".s.PGSQL.{PORT}"))
    }
}

/// An account PostgreSQL runs as when convstore is root.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Account {
    name: String,
    uid: u32,
    gid: u32,
}

#[derive(Debug, Clone)]
struct Binaries {
    bin_dir: PathBuf,
    initdb: PathBuf,
    postgres: PathBuf,
    /// e.g. `PostgreSQL 16.2`
    version: String,
    major: u32,
}

struct Plan {
    bins: Binaries,
    layout: Layout,
    run_as: Option<Account>,
    lock: File,
    dynamic_shared_memory: &'static str,
}

impl Plan {
    fn prepare(settings: &Settings) -> Result<Plan, ManagedError> {
        let db = &settings.database;
        let cluster_major =
            fs::read_to_string(settings.managed_cluster_dir().join("data/PG_VERSION"))
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

        let cluster_dir = create_dir_chain(&settings.managed_cluster_dir(), run_as.is_some())?;
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

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
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

/// Every parent of `cluster_dir` must grant `account` search permission.
fn check_traversable(cluster_dir: &Path, account: &Account) -> Result<(), ManagedError> {
    for dir in cluster_dir.ancestors().skip(1) {
        let meta = fs::metadata(dir).map_err(io_err("inspect", dir))?;
        if !may_search(meta.mode(), meta.uid(), meta.gid(), account) {
            return Err(ManagedError::NotTraversable {
                dir: dir.to_path_buf(),
                user: account.name.clone(),
                uid: account.uid,
            });
        }
    }
    Ok(())
}

/// POSIX permission check for search (x) on a directory. Supplementary
/// groups are not considered: std drops them when it switches uid.
fn may_search(mode: u32, owner: u32, group: u32, account: &Account) -> bool {
    if owner == account.uid {
        mode & 0o100 != 0
    } else if group == account.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// The cluster directory belongs to the PostgreSQL account. A data directory
/// owned by someone else (managed_user changed) is re-owned recursively.
fn take_ownership(layout: &Layout, account: &Account) -> Result<(), ManagedError> {
    let chown = |path: &Path| {
        std::os::unix::fs::lchown(path, Some(account.uid), Some(account.gid))
            .map_err(io_err("change owner of", path))
    };
    chown(&layout.cluster_dir)?;
    chown(&layout.run_dir)?;
    if layout.log_path.exists() {
        chown(&layout.log_path)?;
    }
    if let Ok(meta) = fs::symlink_metadata(&layout.data_dir)
        && (meta.uid() != account.uid || meta.gid() != account.gid)
    {
        warn!(
            data_dir = %layout.data_dir.display(),
            user = %account.name,
            "The managed cluster belongs to another account; changing its owner"
        );
        chown_recursive(&layout.data_dir, account)?;
    }
    Ok(())
}

fn chown_recursive(path: &Path, account: &Account) -> Result<(), ManagedError> {
    std::os::unix::fs::lchown(path, Some(account.uid), Some(account.gid))
        .map_err(io_err("change owner of", path))?;
    let meta = fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err("list", path))? {
            let entry = entry.map_err(io_err("list", path))?;
            chown_recursive(&entry.path(), account)?;
        }
    }
    Ok(())
}

fn resolve_account(configured: &str) -> Result<Account, ManagedError> {
    let lookup = |name: &str| {
        lookup_account(name).map_err(|e| ManagedError::Account {
            problem: format!("looking up account `{name}` failed: {e}"),
        })
    };
    let account = if configured.is_empty() {
        match lookup(DEFAULT_ACCOUNT)? {
            Some(account) => account,
            None => lookup(FALLBACK_ACCOUNT)?.ok_or_else(|| ManagedError::Account {
                problem: format!(
                    "neither `{DEFAULT_ACCOUNT}` nor `{FALLBACK_ACCOUNT}` exists (scripts/setup.sh creates `{DEFAULT_ACCOUNT}`)"
                ),
            })?,
        }
    } else {
        lookup(configured)?.ok_or_else(|| ManagedError::Account {
            problem: format!("database.managed_user = `{configured}` does not exist"),
        })?
    };
    if account.uid == 0 {
        return Err(ManagedError::Account {
            problem: format!("account `{}` has uid 0", account.name),
        });
    }
    info!(
        user = %account.name,
        uid = account.uid,
        gid = account.gid,
        "convstore runs as root: managed PostgreSQL will run as an unprivileged account"
    );
    Ok(account)
}

/// `getpwnam_r`; `Ok(None)` when there is no such account.
fn lookup_account(name: &str) -> io::Result<Option<Account>> {
    let c_name = CString::new(name).map_err(|_| io::Error::other("name contains a NUL byte"))?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: passwd is plain old data; an all-zero value is valid and
        // getpwnam_r overwrites it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: c_name is a
        // NUL-terminated string, pwd and result are live locals, and buf is
        // a writable buffer of buf.len() bytes that outlives the call (the
        // strings pwd points into are not used after buf changes).
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            let bigger = buf.len() * 2;
            buf.resize(bigger, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        return Ok(Some(Account {
            name: name.to_string(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }));
    }
}

fn rotate_log(log: &Path) -> Result<(), ManagedError> {
    if let Ok(meta) = fs::metadata(log)
        && meta.len() > LOG_ROTATE_BYTES
    {
        let old = log.with_extension("log.1");
        fs::rename(log, &old).map_err(io_err("rotate", log))?;
    }
    Ok(())
}

/// Appends a line to `postgres.log` so the operator sees where each start begins.
fn log_marker(log: &Path, what: &str) -> Result<File, ManagedError> {
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
fn log_tail(log: &Path) -> String {
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

/// `mmap` (files under the data directory) when `/dev/shm` is small or
/// missing, else the default `posix`.
fn dynamic_shared_memory_type() -> &'static str {
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
// Binaries

/// The binaries to use. Without `database.managed_bin_dir`, the first usable
/// candidate whose major version matches an existing cluster's wins (so
/// installing another PostgreSQL later does not strand the data), else the
/// first usable one.
fn locate_binaries(
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

fn check_data_version(data_dir: &Path, bins: &Binaries) -> Result<(), ManagedError> {
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

// ---------------------------------------------------------------------------
// What an earlier run left behind (blocking)

/// Makes sure no server runs on our data directory and no stale lock or
/// socket file stops a new one from starting. Our lock is held, so any server
/// found was left by a convstore that is gone.
fn clear_previous_server(layout: &Layout) -> Result<(), ManagedError> {
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

/// Sends `sig` to one process. Never to pid 0, 1 or a negative pid (which
/// would reach whole process groups).
fn send_signal(pid: i32, sig: i32) {
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
fn process_alive(pid: i32) -> bool {
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

/// SIGINT, then SIGQUIT, then SIGKILL, each followed by a wait; `first_grace`
/// for the first. True once the process is gone.
fn terminate(pid: i32, first_grace: Duration) -> bool {
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
// initdb and the server (async)

fn base_command(program: &Path, plan: &Plan) -> Command {
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

fn log_stdio(file: &File, log: &Path) -> Result<(Stdio, Stdio), ManagedError> {
    let out = file
        .try_clone()
        .map_err(io_err("duplicate handle of", log))?;
    let err = file
        .try_clone()
        .map_err(io_err("duplicate handle of", log))?;
    Ok((Stdio::from(out), Stdio::from(err)))
}

async fn run_initdb(plan: &Plan) -> Result<(), ManagedError> {
    let layout = &plan.layout;
    info!(
        data_dir = %layout.data_dir.display(),
        version = %plan.bins.version,
        user = plan.run_as.as_ref().map_or("(current user)", |a| a.name.as_str()),
        "Creating a new managed PostgreSQL cluster (initdb)"
    );
    let log = log_marker(&layout.log_path, "initdb")?;
    let (stdout, stderr) = log_stdio(&log, &layout.log_path)?;
    let mut cmd = base_command(&plan.bins.initdb, plan);
    cmd.arg("-D")
        .arg(&layout.initdb_dir)
        .args([
            "-U",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=reject",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-instructions",
        ])
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true);
    let status = cmd
        .status()
        .await
        .map_err(io_err("run", &plan.bins.initdb))?;
    if !status.success() {
        return Err(ManagedError::Initdb {
            status: status.to_string(),
            log: layout.log_path.clone(),
            tail: log_tail(&layout.log_path),
        });
    }
    fs::rename(&layout.initdb_dir, &layout.data_dir)
        .map_err(io_err("rename the new cluster to", &layout.data_dir))?;
    Ok(())
}

fn server_args(plan: &Plan, settings: &Settings) -> Vec<String> {
    let pool = settings.database.pool_size.get();
    let max_connections = pool.saturating_mul(2).saturating_add(10).max(20);
    // A list setting: quote the directory so spaces or commas survive.
    let socket_dirs = format!("\"{}\"", plan.layout.run_dir.display());
    let settings_list = [
        ("listen_addresses", String::new()),
        ("port", PORT.to_string()),
        ("unix_socket_directories", socket_dirs),
        ("unix_socket_permissions", "0700".into()),
        (
            "shared_buffers",
            settings.database.managed_shared_buffers.clone(),
        ),
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
    for (key, value) in settings_list {
        args.push("-c".into());
        args.push(format!("{key}={value}"));
    }
    args
}

fn spawn_postgres(plan: &Plan, settings: &Settings) -> Result<Child, ManagedError> {
    let layout = &plan.layout;
    let log = log_marker(&layout.log_path, "starting postgres")?;
    let (stdout, stderr) = log_stdio(&log, &layout.log_path)?;
    let mut cmd = base_command(&plan.bins.postgres, plan);
    cmd.args(server_args(plan, settings))
        .stdout(stdout)
        .stderr(stderr)
        // SIGKILL would skip the shutdown checkpoint and strand backends;
        // Drop sends SIGINT instead.
        .kill_on_drop(false);
    info!(
        bin_dir = %plan.bins.bin_dir.display(),
        version = %plan.bins.version,
        data_dir = %layout.data_dir.display(),
        user = plan.run_as.as_ref().map_or("(current user)", |a| a.name.as_str()),
        log = %layout.log_path.display(),
        "Starting managed PostgreSQL"
    );
    cmd.spawn().map_err(io_err("start", &plan.bins.postgres))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(uid: u32, gid: u32) -> Account {
        Account {
            name: "pg".into(),
            uid,
            gid,
        }
    }

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
    fn search_permission_follows_posix_precedence() {
        let pg = account(100, 200);
        assert!(may_search(0o700, 100, 0, &pg));
        assert!(
            !may_search(0o077, 100, 200, &pg),
            "owner bits decide for the owner"
        );
        assert!(may_search(0o710, 0, 200, &pg));
        assert!(
            !may_search(0o701, 0, 200, &pg),
            "group bits decide for the group"
        );
        assert!(may_search(0o711, 0, 0, &pg));
        assert!(!may_search(0o770, 0, 0, &pg));
    }

    #[test]
    fn socket_path_limit() {
        let short = Layout::new(PathBuf::from("/var/lib/convstore/postgres"));
        assert!(short.socket_path().as_os_str().len() <= MAX_SOCKET_PATH);
        let long = Layout::new(PathBuf::from(format!("/{}", "x".repeat(100))));
        assert!(long.socket_path().as_os_str().len() > MAX_SOCKET_PATH);
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

    #[test]
    fn own_process_is_found_by_cwd() {
        let cwd = std::env::current_dir().expect("cwd");
        assert!(process_uses_dir(std::process::id() as i32, &cwd));
        assert!(!process_uses_dir(
            std::process::id() as i32,
            Path::new("/nonexistent")
        ));
    }

    #[test]
    fn account_lookup() {
        let root = lookup_account("root")
            .expect("lookup")
            .expect("root exists");
        assert_eq!(root.uid, 0);
        assert_eq!(
            lookup_account("no-such-user-convstore-test").expect("lookup"),
            None
        );
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
