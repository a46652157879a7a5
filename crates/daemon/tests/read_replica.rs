//! `database.read_url`: searches go to a streaming replica, everything else
//! (a read after a `stored` acknowledgement included) to the primary.
//!
//! A real primary with `wal_level = replica` (the managed cluster's data
//! directory, started by hand with replication on: the managed mode keeps
//! WAL minimal) and a real hot standby made by `pg_basebackup -R`, both run
//! as the unprivileged account the managed cluster uses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::cluster::TestCluster;
use support::daemon::{Daemon, Standin, Workspace, connect_db};

const MODEL: &str = "replica-embed";
const DIMS: usize = 32;

/// The portable PostgreSQL `scripts/setup.sh` installs.
fn pg_bin(name: &str) -> PathBuf {
    let root = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/usr/local/lib/convstore/pginstall")
    } else {
        PathBuf::from(std::env::var("HOME").unwrap()).join(".local/lib/convstore/pginstall")
    };
    root.join("bin").join(name)
}

/// A PostgreSQL server process, stopped (fast shutdown) on drop.
struct Server {
    child: Option<Child>,
}

impl Server {
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGINT);
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A command run as the owner of `data` (PostgreSQL refuses root).
fn as_owner(program: &Path, owner: &std::fs::Metadata) -> Command {
    let mut cmd = Command::new(program);
    if unsafe { libc::geteuid() } == 0 {
        cmd.uid(owner.uid()).gid(owner.gid());
    }
    cmd.stdin(Stdio::null());
    cmd
}

fn owned_dir(path: &Path, owner: &std::fs::Metadata) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid())).unwrap();
}

fn start_server(
    data: &Path,
    run: &Path,
    port: u16,
    owner: &std::fs::Metadata,
    log: &Path,
) -> Server {
    let log_file = std::fs::File::create(log).unwrap();
    let child = as_owner(&pg_bin("postgres"), owner)
        .arg("-D")
        .arg(data)
        .args(["-c", "listen_addresses="])
        .args(["-c", &format!("port={port}")])
        .args(["-c", &format!("unix_socket_directories={}", run.display())])
        .args(["-c", "wal_level=replica", "-c", "max_wal_senders=4"])
        .args(["-c", "hot_standby=on", "-c", "shared_buffers=16MB"])
        .args(["-c", "dynamic_shared_memory_type=mmap"])
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let socket = run.join(format!(".s.PGSQL.{port}"));
    let started = Instant::now();
    while !socket.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "postgres on {port} did not start:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child: Some(child) }
}

fn url(run: &Path, port: u16) -> String {
    format!(
        "postgres://convstore@localhost:{port}/convstore?host={}&sslmode=disable",
        run.display()
    )
}

async fn search(http: &reqwest::Client, base: &str, query: &str) -> (u16, Value) {
    let resp = http
        .post(format!("{base}/v1/search"))
        .json(&json!({"query": query, "k": 5}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_go_to_the_replica_and_reads_after_stored_to_the_primary() {
    // initdb (and nothing else yet) by the managed cluster, then run by hand.
    let mut pg = TestCluster::start().await;
    let data = pg.cluster_dir().join("data");
    pg.stop().await;
    let owner = std::fs::metadata(&data).unwrap();
    let dir = pg.temp_path().to_path_buf();
    let (primary_run, replica_run, replica_data) = (
        dir.join("primary-run"),
        dir.join("replica-run"),
        dir.join("replica-data"),
    );
    for d in [&primary_run, &replica_run, &replica_data] {
        owned_dir(d, &owner);
    }
    let _primary = start_server(&data, &primary_run, 5432, &owner, &dir.join("primary.log"));
    let backup = as_owner(&pg_bin("pg_basebackup"), &owner)
        .arg("-D")
        .arg(&replica_data)
        .args(["-R", "-X", "stream", "-U", "convstore", "-p", "5432", "-h"])
        .arg(&primary_run)
        .output()
        .unwrap();
    assert!(
        backup.status.success(),
        "pg_basebackup: {}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let mut replica = start_server(
        &replica_data,
        &replica_run,
        5433,
        &owner,
        &dir.join("replica.log"),
    );
    let replica_pool = connect_db(&url(&replica_run, 5433)).await;
    let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&replica_pool)
        .await
        .unwrap();
    assert!(in_recovery, "the replica is a hot standby");

    let standin = Standin::start(MODEL, DIMS, 512, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        &format!(
            "[database]\nurl = \"{}\"\nread_url = \"{}\"\npool_size = 4\n",
            url(&primary_run, 5432),
            url(&replica_run, 5433)
        ),
    );
    let daemon = Daemon::start(&ws, &addr).await;
    assert!(
        daemon
            .log_text()
            .contains("Searches go to the read replica")
    );
    let http = reqwest::Client::new();
    let base = daemon.base_url();

    let resp = http
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(&json!({"id": "parcel-1", "user_id": "u1", "channel": "web",
                      "messages": [{"role": "user", "content": "where is my parcel ZX-4471?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    // Read after `stored`: the primary has it at once.
    let got = http
        .get(format!("{base}/v1/conversations/parcel-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);

    // The search, from the replica, finds it once the replica replayed it.
    let started = Instant::now();
    loop {
        let (status, body) = search(&http, &base, "where is my parcel ZX-4471?").await;
        assert_eq!(status, 200, "{body}");
        if body["results"].as_array().is_some_and(|r| !r.is_empty()) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the replica never had it: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replica_sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = 'convstore' AND pid <> pg_backend_pid() \
         AND backend_type = 'client backend'",
    )
    .fetch_one(&replica_pool)
    .await
    .unwrap();
    assert!(
        replica_sessions >= 1,
        "the daemon's searches hold sessions on the replica"
    );
    drop(replica_pool);

    // Without the replica: searches fail (503), storing and reading do not.
    replica.stop();
    let (status, body) = search(&http, &base, "parcel").await;
    assert_eq!(status, 503, "{body}");
    let resp = http
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(&json!({"id": "parcel-2", "user_id": "u1", "channel": "web",
                      "messages": [{"role": "user", "content": "a second parcel"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let got = http
        .get(format!("{base}/v1/conversations/parcel-2"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
}
