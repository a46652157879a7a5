//! A hermetic managed PostgreSQL cluster for tests: a fresh temp directory,
//! the same `ManagedCluster` the daemon uses, stopped and removed on drop
//! (also when the test panics).
//!
//! Include it with `mod support;` (when `support/mod.rs` declares
//! `pub mod cluster;`) or `#[path = "support/cluster.rs"] mod cluster;`.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use convstore::config::Settings;
use convstore_store::managed::{ManagedCluster, ManagedError};

/// Checks once per test binary that what the managed cluster and the
/// builtin model need is installed (`scripts/setup.sh --check`: installs
/// nothing). Panics with what is missing and the command that installs it.
pub fn require_setup() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let result = DONE.get_or_init(|| {
        let script = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/setup.sh"
        ));
        let out = Command::new("bash")
            .arg(script)
            .arg("--check")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed ({}):\n{}{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Test logs on `RUST_LOG` (e.g. `RUST_LOG=convstore=debug`), shown by the
/// test harness for failing tests.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A temp directory PostgreSQL can use even when the tests run as root (the
/// server then runs as an unprivileged account, which must be able to
/// traverse it).
pub fn traversable_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("convstore-test-")
        .tempdir()
        .expect("create temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    dir
}

/// `CONVSTORE_TEST_PARTITIONS=N` runs the storage and search tests on
/// tables hash-partitioned by `user_id` into N partitions
/// (`database.partitions`; `scripts/test.sh` runs them again with 8).
/// Unset or 0: plain tables. Stores the tests open themselves take it
/// through `Store::with_partitions`, daemons through
/// `CONVSTORE_DATABASE__PARTITIONS` ([`super::daemon::Daemon::spawn`]).
pub fn test_partitions() -> u32 {
    match std::env::var("CONVSTORE_TEST_PARTITIONS") {
        Ok(text) if !text.trim().is_empty() => text
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("CONVSTORE_TEST_PARTITIONS={text}: {e}")),
        _ => 0,
    }
}

/// Settings for a small test cluster under `state_dir`.
pub fn test_settings(state_dir: &Path) -> Settings {
    let mut settings = Settings {
        state_dir: state_dir.to_path_buf(),
        ..Settings::default()
    };
    settings.database.url = String::new();
    settings.database.managed_shared_buffers = "16MB".into();
    settings.database.pool_size = std::num::NonZeroU32::new(4).expect("non-zero");
    settings.database.connect_timeout_ms = std::num::NonZeroU64::new(60_000).expect("non-zero");
    settings.database.partitions = test_partitions();
    settings
}

/// A running managed cluster in its own temp directory.
pub struct TestCluster {
    cluster: Option<ManagedCluster>,
    settings: Settings,
    // Dropped after `cluster` is stopped (see Drop).
    dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts a cluster in a fresh temp directory.
    pub async fn start() -> TestCluster {
        Self::start_with(|_| {}).await
    }

    /// Like [`TestCluster::start`], after `adjust` has edited the settings.
    pub async fn start_with(adjust: impl FnOnce(&mut Settings)) -> TestCluster {
        init_tracing();
        require_setup();
        let dir = traversable_tempdir();
        let mut settings = test_settings(&dir.path().join("state"));
        adjust(&mut settings);
        let cluster = start_cluster(&settings).await;
        TestCluster {
            cluster: Some(cluster),
            settings,
            dir,
        }
    }

    /// sqlx URL of database `convstore` over the cluster's Unix socket.
    pub fn url(&self) -> String {
        self.cluster().url()
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn state_dir(&self) -> &Path {
        &self.settings.state_dir
    }

    /// `<temp>/state/postgres`
    pub fn cluster_dir(&self) -> PathBuf {
        self.settings.managed_cluster_dir()
    }

    pub fn temp_path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cluster(&self) -> &ManagedCluster {
        self.cluster.as_ref().expect("cluster is running")
    }

    pub fn cluster_mut(&mut self) -> &mut ManagedCluster {
        self.cluster.as_mut().expect("cluster is running")
    }

    /// Stops the server (the directory stays until drop).
    pub async fn stop(&mut self) {
        if let Some(cluster) = self.cluster.take() {
            cluster.stop().await.expect("stop managed cluster");
        }
    }

    /// Stops the server if it runs, then starts it again on the same data.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.cluster = Some(start_cluster(&self.settings).await);
    }

    /// Starts the server again after [`TestCluster::stop`] or after the
    /// test meddled with the directory.
    pub async fn start_again(&mut self) {
        assert!(self.cluster.is_none(), "cluster is already running");
        self.cluster = Some(start_cluster(&self.settings).await);
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(mut cluster) = self.cluster.take() {
            // Synchronous: the temp directory must outlive the server.
            if let Err(e) = cluster.stop_blocking(Duration::from_secs(20)) {
                eprintln!("test cluster did not stop: {e}");
            }
        }
    }
}

/// `ManagedCluster::start`, with the setup script's hint turned into a
/// panic message that says what is missing.
pub async fn start_cluster(settings: &Settings) -> ManagedCluster {
    match ManagedCluster::start(&settings.managed_cluster()).await {
        Ok(cluster) => cluster,
        Err(e @ ManagedError::BinariesNotFound { .. }) => {
            panic!("managed PostgreSQL is not installed (scripts/setup.sh installs it): {e}")
        }
        Err(e) => panic!("managed cluster did not start: {e}"),
    }
}

/// The pid on the first line of the cluster's `postmaster.pid`, if the
/// file is there (it may name a process that has since gone).
pub fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Live processes whose working directory is `data_dir`: every PostgreSQL
/// process of a cluster chdirs into its data directory.
pub fn postgres_processes_in(data_dir: &Path) -> Vec<u32> {
    let Ok(target) = data_dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == target))
        .collect()
}
