//! Managed mode against real PostgreSQL processes: initdb, restart, crash
//! leftovers, an orphaned server, refusal of a second manager, clean stop.
//!
//! Needs the portable PostgreSQL; `scripts/setup.sh` is run first (quick
//! when it is already installed).
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/cluster.rs"]
mod cluster;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cluster::{TestCluster, postgres_processes_in, postmaster_pid, require_setup, test_settings};
use convstore_store::managed::{ManagedCluster, ManagedError};
use sqlx::{Connection, PgConnection};

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

fn pid_gone(pid: u32) -> bool {
    // Gone, or a zombie waiting for a parent that is not us.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count_initdb_runs(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches("---- convstore: initdb")
        .count()
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

async fn insert_marker(url: &str, value: &str) {
    let mut conn = connect(url).await;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS marker (v text)")
        .execute(&mut conn)
        .await
        .expect("create table");
    sqlx::query("INSERT INTO marker (v) VALUES ($1)")
        .bind(value)
        .execute(&mut conn)
        .await
        .expect("insert");
}

async fn markers(url: &str) -> Vec<String> {
    let mut conn = connect(url).await;
    sqlx::query_scalar("SELECT v FROM marker ORDER BY v")
        .fetch_all(&mut conn)
        .await
        .expect("select markers")
}

#[tokio::test]
async fn first_start_initialises_the_cluster_with_pgvector() {
    let mut tc = TestCluster::start().await;
    let data_dir = tc.cluster().data_dir().to_path_buf();
    assert!(data_dir.join("PG_VERSION").is_file());
    assert_eq!(count_initdb_runs(tc.cluster().log_path()), 1);
    assert!(tc.cluster_mut().is_running());
    assert!(
        tc.url()
            .contains(&format!("host={}", tc.cluster().socket_dir().display())),
        "{}",
        tc.url()
    );

    let mut conn = connect(&tc.url()).await;
    let (user, db): (String, String) =
        sqlx::query_as("SELECT current_user::text, current_database()::text")
            .fetch_one(&mut conn)
            .await
            .expect("identity");
    assert_eq!((user.as_str(), db.as_str()), ("convstore", "convstore"));
    let vector: String =
        sqlx::query_scalar("SELECT extversion::text FROM pg_extension WHERE extname = 'vector'")
            .fetch_one(&mut conn)
            .await
            .expect("vector extension is installed");
    assert!(vector.starts_with("0."), "pgvector {vector}");
    let distance: f64 = sqlx::query_scalar("SELECT '[1,0]'::vector <=> '[0,1]'::vector")
        .fetch_one(&mut conn)
        .await
        .expect("cosine distance");
    assert!((distance - 1.0).abs() < 1e-9);
    let listen: String = sqlx::query_scalar("SHOW listen_addresses")
        .fetch_one(&mut conn)
        .await
        .expect("listen_addresses");
    assert_eq!(listen, "", "no TCP listener");
    conn.close().await.ok();

    let pid = tc.cluster().pid();
    if running_as_root() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let uid_line = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .expect("Uid line");
        assert!(
            uid_line.split_whitespace().skip(1).all(|uid| uid != "0"),
            "postgres must not run as root: {uid_line}"
        );
        use std::os::unix::fs::MetadataExt;
        assert_ne!(std::fs::metadata(&data_dir).expect("data dir").uid(), 0);
    }

    tc.stop().await;
    assert!(pid_gone(pid), "postmaster {pid} still running after stop");
    assert_eq!(
        postgres_processes_in(&data_dir),
        Vec::<u32>::new(),
        "no PostgreSQL process may survive stop"
    );
    assert!(!data_dir.join("postmaster.pid").exists());
}

#[tokio::test]
async fn operator_settings_reach_the_server_and_override_convstores() {
    let tc = TestCluster::start_with(|s| {
        s.database.managed_settings = [("max_wal_size", "3GB"), ("jit", "on")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    })
    .await;
    let mut conn = connect(&tc.url()).await;
    for (name, expected) in [
        ("max_wal_size", "3GB"),
        // convstore turns JIT off; the operator's value wins.
        ("jit", "on"),
        // Untouched settings keep convstore's value.
        ("wal_level", "minimal"),
    ] {
        let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
            .fetch_one(&mut conn)
            .await
            .expect(name);
        assert_eq!(value, expected, "{name}");
    }
    conn.close().await.ok();
}

/// `GLIBC_TUNABLES` as process `pid` was started with it (`None`: unset),
/// read from `/proc/<pid>/environ`.
fn glibc_tunables_of(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    environ
        .split(|b| *b == 0)
        .find_map(|var| var.strip_prefix(b"GLIBC_TUNABLES="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[tokio::test]
async fn postgres_starts_with_the_configured_malloc_tunables() {
    use convstore_store::settings::DEFAULT_MANAGED_GLIBC_TUNABLES;
    let inherited = std::env::var("GLIBC_TUNABLES")
        .ok()
        .filter(|v| !v.is_empty());

    let mut tc = TestCluster::start().await;
    let expected = match &inherited {
        Some(theirs) => format!("{DEFAULT_MANAGED_GLIBC_TUNABLES}:{theirs}"),
        None => DEFAULT_MANAGED_GLIBC_TUNABLES.to_string(),
    };
    let seen = glibc_tunables_of(tc.cluster().pid()).expect("GLIBC_TUNABLES is set");
    // Debian 12's glibc (2.36) writes a NUL over the first `:` of the
    // original string as it parses it (a `sleep` started with both pairs
    // shows only the first in /proc), so the first pair may be all that is
    // left to see; both still apply (`ld.so --list-tunables`).
    assert!(
        seen == expected || expected.starts_with(&format!("{seen}:")),
        "postgres started with GLIBC_TUNABLES={seen:?}, expected {expected:?}"
    );
    tc.stop().await;

    // "" leaves the environment as convstore got it.
    let mut tc =
        TestCluster::start_with(|s| s.database.managed_glibc_tunables = String::new()).await;
    assert_eq!(glibc_tunables_of(tc.cluster().pid()), inherited);
    tc.stop().await;
}

#[tokio::test]
async fn restart_reuses_the_data() {
    let mut tc = TestCluster::start().await;
    insert_marker(&tc.url(), "before restart").await;
    let first_pid = tc.cluster().pid();
    tc.restart().await;
    assert_ne!(tc.cluster().pid(), first_pid);
    assert_eq!(markers(&tc.url()).await, vec!["before restart".to_string()]);
    assert_eq!(
        count_initdb_runs(tc.cluster().log_path()),
        1,
        "initdb runs on the first start only"
    );
}

#[tokio::test]
async fn stale_pid_file_of_a_dead_process_is_removed() {
    let mut tc = TestCluster::start().await;
    insert_marker(&tc.url(), "kept").await;
    let data_dir = tc.cluster().data_dir().to_path_buf();
    tc.stop().await;

    let mut gone = Command::new("true").spawn().expect("spawn true");
    let dead_pid = gone.id();
    gone.wait().expect("reap");
    std::fs::write(
        data_dir.join("postmaster.pid"),
        format!(
            "{dead_pid}\n{}\n1700000000\n5432\n/nonexistent\n\n",
            data_dir.display()
        ),
    )
    .expect("write stale postmaster.pid");

    tc.start_again().await;
    assert_eq!(
        postmaster_pid(&data_dir),
        Some(tc.cluster().pid()),
        "the new server wrote its own postmaster.pid"
    );
    assert_eq!(markers(&tc.url()).await, vec!["kept".to_string()]);
}

#[tokio::test]
async fn stale_pid_file_naming_an_unrelated_live_process_is_removed_and_it_survives() {
    let mut tc = TestCluster::start().await;
    let data_dir = tc.cluster().data_dir().to_path_buf();
    tc.stop().await;

    let mut unrelated = Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep");
    std::fs::write(
        data_dir.join("postmaster.pid"),
        format!("{}\n{}\n", unrelated.id(), data_dir.display()),
    )
    .expect("write postmaster.pid");

    tc.start_again().await;
    let still_running = unrelated.try_wait().expect("try_wait").is_none();
    unrelated.kill().ok();
    unrelated.wait().ok();
    assert!(
        still_running,
        "an unrelated process must never be signalled"
    );
    assert_eq!(postmaster_pid(&data_dir), Some(tc.cluster().pid()));
}

#[tokio::test]
async fn server_killed_with_sigkill_is_recovered() {
    let mut tc = TestCluster::start().await;
    insert_marker(&tc.url(), "committed").await;
    let pid = tc.cluster().pid();
    // SAFETY: kill has no memory-safety preconditions; pid is our child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tc.cluster_mut().is_running() {
        assert!(Instant::now() < deadline, "postmaster survived SIGKILL");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tc.stop().await; // already exited: nothing to do
    tc.start_again().await;
    assert_eq!(markers(&tc.url()).await, vec!["committed".to_string()]);
}

/// Not a test on its own: run by `orphaned_server_is_replaced` in a child
/// process, which starts a cluster and exits without stopping it, as a
/// convstore killed with SIGKILL would.
#[tokio::test]
async fn orphan_helper_process() {
    let Some(state_dir) = std::env::var_os("CONVSTORE_TEST_ORPHAN_STATE_DIR") else {
        return;
    };
    let settings = test_settings(Path::new(&state_dir));
    let cluster = ManagedCluster::start(&settings.managed_cluster())
        .await
        .expect("helper starts the cluster");
    insert_marker(&cluster.url(), "from the dead process").await;
    std::process::exit(0);
}

#[tokio::test]
async fn orphaned_server_is_replaced() {
    require_setup();
    let dir = cluster::traversable_tempdir();
    let state_dir = dir.path().join("state");
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "orphan_helper_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("CONVSTORE_TEST_ORPHAN_STATE_DIR", &state_dir)
        .output()
        .expect("run helper");
    assert!(
        out.status.success(),
        "helper failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let settings = test_settings(&state_dir);
    let data_dir = settings
        .managed_cluster_dir()
        .join("data")
        .canonicalize()
        .expect("data dir");
    let orphan = postmaster_pid(&data_dir).expect("orphan's postmaster.pid");
    assert!(
        !pid_gone(orphan),
        "the orphan server should still be running"
    );

    let cluster = cluster::start_cluster(&settings).await;
    let new_pid = cluster.pid();
    let url = cluster.url();
    let check = async {
        assert_ne!(new_pid, orphan);
        assert!(pid_gone(orphan), "the orphan server was not stopped");
        assert_eq!(
            markers(&url).await,
            vec!["from the dead process".to_string()]
        );
        assert_eq!(
            postgres_processes_in(&data_dir)
                .into_iter()
                .filter(|pid| *pid == orphan)
                .count(),
            0
        );
    };
    check.await;
    cluster.stop().await.expect("stop");
    wait_until(
        "no PostgreSQL runs on the data dir",
        Duration::from_secs(10),
        || postgres_processes_in(&data_dir).is_empty(),
    );
}

#[tokio::test]
async fn dropping_without_stop_shuts_the_server_down() {
    require_setup();
    let dir = cluster::traversable_tempdir();
    let settings = test_settings(&dir.path().join("state"));
    let cluster = cluster::start_cluster(&settings).await;
    let pid = cluster.pid();
    let data_dir = cluster.data_dir().to_path_buf();
    drop(cluster);
    wait_until(
        "the dropped cluster's server exits",
        Duration::from_secs(30),
        || pid_gone(pid) && postgres_processes_in(&data_dir).is_empty(),
    );
}

#[tokio::test]
async fn a_second_manager_of_the_same_cluster_is_refused() {
    let mut tc = TestCluster::start().await;
    let err = ManagedCluster::start(&tc.settings().managed_cluster())
        .await
        .expect_err("second start on the same state_dir must fail");
    assert!(matches!(err, ManagedError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("another convstore"), "{err}");
    assert!(
        tc.cluster_mut().is_running(),
        "the first server is untouched"
    );
    let mut conn = connect(&tc.url()).await;
    sqlx::raw_sql("SELECT 1")
        .execute(&mut conn)
        .await
        .expect("first server still answers");
}

#[tokio::test]
async fn too_long_socket_path_is_refused_clearly() {
    require_setup();
    let dir = cluster::traversable_tempdir();
    let settings = test_settings(&dir.path().join("s".repeat(100)));
    let err = ManagedCluster::start(&settings.managed_cluster())
        .await
        .expect_err("socket path is too long");
    assert!(
        matches!(err, ManagedError::SocketPathTooLong { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("shorter state_dir"), "{err}");
}

#[tokio::test]
async fn untraversable_parent_is_named() {
    if !running_as_root() {
        eprintln!("skipped: only meaningful as root");
        return;
    }
    require_setup();
    let dir = cluster::traversable_tempdir();
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).expect("mkdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let settings = test_settings(&closed.join("state"));
    let err = ManagedCluster::start(&settings.managed_cluster())
        .await
        .expect_err("PostgreSQL's account cannot enter the directory");
    assert!(matches!(err, ManagedError::NotTraversable { .. }), "{err}");
    assert!(
        err.to_string().contains(&*closed.to_string_lossy()),
        "the message names the directory: {err}"
    );
}

#[tokio::test]
async fn bad_managed_bin_dir_says_what_is_wrong() {
    let dir = cluster::traversable_tempdir();
    let mut settings = test_settings(&dir.path().join("state"));
    settings.database.managed_bin_dir = dir.path().display().to_string();
    let err = ManagedCluster::start(&settings.managed_cluster())
        .await
        .expect_err("no binaries there");
    assert!(matches!(err, ManagedError::BadBinDir { .. }), "{err}");
    assert!(err.to_string().contains("initdb"), "{err}");
}

/// `convstore migrate` (ExecStartPre, or by hand before an upgrade) on a
/// state directory with no cluster yet: it creates the cluster, applies the
/// schema, registers the configured model, says so, and leaves no
/// PostgreSQL running; a second run changes nothing and succeeds.
#[tokio::test]
async fn convstore_migrate_prepares_the_database_and_stops_its_cluster() {
    require_setup();
    let dir = cluster::traversable_tempdir();
    let state = dir.path().join("state");
    let config = dir.path().join("convstore.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n\n[database]\nmanaged_shared_buffers = \"16MB\"\n\n\
             [embedding]\nmodel = \"migrate-test-model\"\ndimensions = 8\n\n\
             [[embedding.backends]]\nname = \"unused\"\nkind = \"ollama\"\nurl = \"http://127.0.0.1:9\"\n",
            state.display()
        ),
    )
    .expect("write config");
    let settings = test_settings(&state);
    let data_dir = settings.managed_cluster_dir().join("data");
    for run in 1..=2 {
        let out = Command::new(env!("CARGO_BIN_EXE_convstore"))
            .args(["migrate", "--config"])
            .arg(&config)
            .env_remove("CONVSTORE_CONFIG")
            .output()
            .expect("run convstore migrate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "run {run}: {:?}\n{stderr}",
            out.status
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "migrations applied",
            "run {run}"
        );
        assert_eq!(
            postgres_processes_in(&data_dir),
            Vec::<u32>::new(),
            "run {run}: migrate left PostgreSQL running"
        );
        assert!(!data_dir.join("postmaster.pid").exists(), "run {run}");
    }
    let cluster = cluster::start_cluster(&settings).await;
    let mut conn = connect(&cluster.url()).await;
    let model: (String, i32) =
        sqlx::query_as("SELECT model, dimensions FROM embedding_models WHERE role = 'current'")
            .fetch_one(&mut conn)
            .await
            .expect("the configured model is registered");
    assert_eq!(model, ("migrate-test-model".to_string(), 8));
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class WHERE relname IN ('conversations', 'conversation_chunks')",
    )
    .fetch_one(&mut conn)
    .await
    .expect("tables");
    assert_eq!(tables, 2);
    conn.close().await.ok();
    cluster.stop().await.expect("stop");
}
