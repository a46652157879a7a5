//! Running under systemd, without systemd: the units checked by
//! `systemd-analyze`, and the daemon as a real process speaking the
//! service-manager protocols to this test: a `NOTIFY_SOCKET` the test binds
//! and reads (readiness, status, watchdog, stopping), listening sockets the
//! test passes as fds 3 and 4 (`LISTEN_FDS`/`LISTEN_PID`), and SIGHUP
//! reloads. A real managed PostgreSQL and the Ollama stand-in as a real
//! process, as in the other integration tests.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::cluster::require_setup;
use support::daemon::{
    BIN, Standin, Workspace, activated_serve, connect_db, spawn_activated, unused_port,
    wait_for_count,
};

const MODEL: &str = "all-minilm";
const DIMS: usize = 384;
const CONTEXT: usize = 512;
/// Long enough that a call to a hung stand-in never ends within a test.
const FOREVER_MS: u64 = 3_600_000;

/// The repository root (this crate is `crates/daemon`).
fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

// ---------------------------------------------------------------------------
// The units, the example configuration

fn systemd_analyze() -> Command {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "systemd-analyze is not installed; scripts/setup.sh installs it (apt-get install systemd)"
    );
    Command::new("systemd-analyze")
}

/// `systemd-analyze verify` checks that every ExecStart= program exists, so
/// it runs against a root holding the host's units (for the default
/// dependencies) plus ours and an executable at /usr/bin/convstore, as the
/// package installs them.
#[test]
fn units_pass_systemd_analyze_verify() {
    let root = tempfile::tempdir().expect("tempdir");
    let units = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    for host_dir in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
        if let Ok(entries) = std::fs::read_dir(host_dir) {
            for entry in entries.flatten() {
                let target = units.join(entry.file_name());
                if entry.path().is_file() && !target.exists() {
                    let _ = std::fs::copy(entry.path(), target);
                }
            }
        }
    }
    for unit in ["convstore.service", "convstore.socket"] {
        std::fs::copy(repo().join("systemd").join(unit), units.join(unit)).unwrap();
    }
    let bin = root.path().join("usr/bin/convstore");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::write(&bin, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let out = systemd_analyze()
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .args(["convstore.service", "convstore.socket"])
        .output()
        .expect("run systemd-analyze verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify exits 0 on warnings such as an unknown or unparsable setting:
    // any output at all is a failure.
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify: {}\n{text}",
        out.status
    );
}

#[test]
fn service_exposure_is_at_most_2() {
    let out = systemd_analyze()
        .args(["security", "--offline=true", "--no-pager"])
        .arg(repo().join("systemd/convstore.service"))
        .output()
        .expect("run systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for convstore.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in the output:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{text}");
}

/// systemd takes `Key=value # text` as part of the value: comments must
/// stand on their own lines.
#[test]
fn unit_files_have_no_trailing_comments() {
    for unit in ["convstore.service", "convstore.socket"] {
        let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with(';') || !line.contains('=') {
                continue;
            }
            assert!(
                !line.contains(" #") && !line.contains(" ;"),
                "{unit}:{}: comment on the same line as a setting: {line}",
                n + 1
            );
        }
    }
}

/// Keys differing from `Settings::default()` on purpose (the file says so
/// next to each): the paths systemd provides, and Ollama instead of the
/// builtin model on a service machine.
const EXAMPLE_DIFFERS: &[&str] = &[
    "state_dir",
    "server.unix_socket",
    "embedding.model",
    "embedding.dimensions",
    "embedding.backends",
];

fn flatten(
    prefix: &str,
    value: &toml::Value,
    out: &mut std::collections::BTreeMap<String, String>,
) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

#[test]
fn example_config_lists_every_key_and_matches_the_defaults() {
    use convstore::config::Settings;
    let path = repo().join("packaging/convstore.toml");
    let text = std::fs::read_to_string(&path).unwrap();

    // Every key the code knows is in the file, and nothing else.
    let mut in_file = std::collections::BTreeMap::new();
    flatten(
        "",
        &toml::from_str(&text).expect("example is TOML"),
        &mut in_file,
    );
    let mut defaults = std::collections::BTreeMap::new();
    flatten(
        "",
        &toml::Value::try_from(Settings::default()).unwrap(),
        &mut defaults,
    );
    let file_keys: Vec<&String> = in_file.keys().collect();
    let default_keys: Vec<&String> = defaults.keys().collect();
    assert_eq!(
        file_keys, default_keys,
        "packaging/convstore.toml must list every key of src/config.rs"
    );

    // It loads, and every value is the default but the documented ones.
    let loaded = Settings::load_from(Some(&path), Vec::new()).expect("example loads");
    let mut effective = std::collections::BTreeMap::new();
    flatten("", &toml::Value::try_from(&loaded).unwrap(), &mut effective);
    for (key, value) in &defaults {
        if EXAMPLE_DIFFERS.contains(&key.as_str()) {
            continue;
        }
        assert_eq!(
            effective.get(key),
            Some(value),
            "packaging/convstore.toml: `{key}` is not the default; fix it or document the difference"
        );
    }
    assert_eq!(loaded.embedding.backends.len(), 1);
    assert_eq!(
        loaded.embedding.backends[0].kind,
        convstore::config::BackendKind::Ollama
    );

    // `check-config --print-default` prints exactly the file.
    let out = Command::new(BIN)
        .args(["check-config", "--print-default"])
        .env_remove("CONVSTORE_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
}

// ---------------------------------------------------------------------------
// The daemon as systemd runs it

/// A `NOTIFY_SOCKET` of our own: every line of every datagram, in order.
struct NotifySocket {
    path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut sink = sink.lock().unwrap();
                sink.extend(text.lines().map(str::to_owned));
            }
        });
        NotifySocket { path, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Index of the first line at or after `from` that `pred` accepts.
    async fn wait_for(&self, from: usize, limit: Duration, pred: impl Fn(&str) -> bool) -> usize {
        let started = Instant::now();
        loop {
            if let Some(i) = self
                .lines()
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| pred(l))
                .map(|(i, _)| i)
            {
                return i;
            }
            assert!(
                started.elapsed() < limit,
                "no matching notification within {limit:?}; got:\n{}",
                self.lines().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A `convstore serve` started the way systemd starts it.
struct Service {
    child: Option<Child>,
    log: PathBuf,
}

impl Service {
    /// Runs `convstore serve` as systemd starts it ([`activated_serve`]):
    /// `fds` become file descriptors 3, 4, … of the daemon.
    fn start(config: &Path, log: PathBuf, env: &[(&str, String)], fds: Vec<OwnedFd>) -> Service {
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = activated_serve(config);
        cmd.env_remove("CONVSTORE_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(log_file);
        Service {
            child: Some(spawn_activated(cmd, fds)),
            log,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    fn assert_running(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!("daemon exited ({status}); log:\n{}", self.log_text());
        }
    }

    async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "no exit within {limit:?} of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A configuration for these tests: the workspace's state and socket, a
/// stand-in backend whose calls may hang for good, and `extra` sections.
fn write_config(
    ws: &Workspace,
    standin_url: &str,
    http_addr: &str,
    socket: &Path,
    extra: &str,
) -> PathBuf {
    let path = ws.config_path();
    let toml = format!(
        r#"state_dir = "{state}"
{extra}

[server]
http_addr = "{http_addr}"
unix_socket = "{socket}"

[database]
managed_shared_buffers = "16MB"

[embedding]
model = "{MODEL}"
dimensions = {DIMS}
retry_initial_ms = 20
retry_max_ms = 500
max_wait_ms = {FOREVER_MS}

[[embedding.backends]]
name = "standin"
kind = "ollama"
url = "{standin_url}"
timeout_ms = {FOREVER_MS}
"#,
        state = ws.path().join("state").display(),
        socket = socket.display(),
    );
    std::fs::write(&path, toml).expect("write config");
    path
}

fn conversation(id: &str, text: &str) -> Value {
    json!({
        "id": id,
        "user_id": "u-1",
        "channel": "test",
        "messages": [{"role": "user", "content": text}],
    })
}

async fn post(http: &reqwest::Client, addr: &str, body: &Value) -> reqwest::Response {
    http.post(format!("http://{addr}/v1/conversations"))
        .json(body)
        .send()
        .await
        .expect("post conversation")
}

/// Polls `GET /readyz` until 200.
async fn wait_ready_http(addr: &str, service: &mut Service) {
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        service.assert_running();
        if http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not ready; log:\n{}",
            service.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// READY after start-up (with the backend warm), STATUS updates, WATCHDOG
/// while healthy, none while the pipeline is stuck, STOPPING on SIGTERM —
/// in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_readiness_status_watchdog_and_stopping_in_order() {
    require_setup();
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    // Passed as systemd passes a socket: bound here on a free port, so no
    // other process can take the port first.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap().to_string();
    let config = write_config(
        &ws,
        &standin.url(),
        &addr,
        &ws.socket(),
        "[shutdown]\ntimeout_ms = 5000\n\n[batch]\nmax_wait_ms = 5\n",
    );
    let notify = NotifySocket::bind(ws.path());
    let watchdog = Duration::from_secs(2);
    let mut service = Service::start(
        &config,
        ws.path().join("daemon.log"),
        &[
            ("NOTIFY_SOCKET", notify.path.display().to_string()),
            ("WATCHDOG_USEC", watchdog.as_micros().to_string()),
            ("RUST_LOG", "info,convstore=debug,sqlx=warn".into()),
        ],
        vec![OwnedFd::from(tcp)],
    );

    // READY=1 once start-up is over: listeners answer, the database too,
    // and the backend has embedded once (the warm-up).
    let ready = notify
        .wait_for(0, Duration::from_secs(120), |l| l == "READY=1")
        .await;
    let before: Vec<String> = notify.lines()[..ready].to_vec();
    assert!(
        before.iter().any(|l| l.starts_with("STATUS=Starting")),
        "start-up steps are reported: {before:?}"
    );
    assert!(
        !before.iter().any(|l| l == "WATCHDOG=1"),
        "no watchdog ping before READY: {before:?}"
    );
    let http = reqwest::Client::new();
    let readyz = http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(readyz.status(), 200, "listening and database up at READY");
    let stats = standin.stats().await;
    assert!(
        stats["calls"]["embed"].as_u64().unwrap_or(0) >= 1,
        "the backend was warmed up before READY: {stats}"
    );

    // Healthy: conversations are stored, status lines and pings flow.
    for i in 0..20 {
        let resp = post(
            &http,
            &addr,
            &conversation(
                &format!("healthy-{i}"),
                &format!("healthy conversation number {i}"),
            ),
        )
        .await;
        assert_eq!(resp.status(), 202);
    }
    let db = connect_db(&ws.database_url()).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations",
        20,
        Duration::from_secs(120),
    )
    .await;
    db.close().await;
    assert_eq!(stored, 20, "log:\n{}", service.log_text());
    let running = notify
        .wait_for(ready, Duration::from_secs(30), |l| {
            l.starts_with("STATUS=Running:")
        })
        .await;
    let mut ping = ready;
    for _ in 0..3 {
        ping = notify
            .wait_for(ping + 1, Duration::from_secs(30), |l| l == "WATCHDOG=1")
            .await;
    }

    // Stuck: the backend's next call never returns, a conversation waits.
    standin
        .set_faults(json!({"latency_per_request_ms": FOREVER_MS as f64}))
        .await;
    let fault_at = notify.lines().len();
    let resp = post(
        &http,
        &addr,
        &conversation("stuck", "a conversation nobody will embed in time"),
    )
    .await;
    assert_eq!(resp.status(), 202);
    let stalled = notify
        .wait_for(fault_at, Duration::from_secs(60), |l| {
            l.starts_with("STATUS=Stalled:")
        })
        .await;
    // Several watchdog intervals without a ping.
    tokio::time::sleep(watchdog * 3).await;
    service.assert_running();
    let after_stall: Vec<String> = notify.lines()[stalled..].to_vec();
    assert!(
        !after_stall.iter().any(|l| l == "WATCHDOG=1"),
        "no watchdog ping while stuck: {after_stall:?}"
    );
    assert!(
        after_stall
            .iter()
            .filter(|l| l.starts_with("STATUS=Stalled:"))
            .count()
            >= 2,
        "the status keeps saying it is stalled: {after_stall:?}"
    );

    // SIGTERM: STOPPING=1 with a timeout extension for the drain.
    let stop_at = notify.lines().len();
    let status = service.terminate(Duration::from_secs(60)).await;
    let stopping = notify
        .wait_for(stop_at, Duration::from_secs(5), |l| l == "STOPPING=1")
        .await;
    notify
        .wait_for(stopping, Duration::from_secs(5), |l| {
            l.starts_with("EXTEND_TIMEOUT_USEC=")
        })
        .await;
    assert!(
        ready < running && running < ping && ping < stalled && stalled < stopping,
        "order READY {ready} < STATUS {running} < WATCHDOG {ping} < stalled {stalled} < STOPPING {stopping}"
    );
    assert!(
        !notify.lines()[stalled..stopping]
            .iter()
            .any(|l| l == "WATCHDOG=1"),
        "no ping between the stall and STOPPING"
    );
    // Exit 0 means everything accepted was stored: the stuck conversation
    // too, without a vector, once the drain deadline gave up on the call.
    assert!(status.success(), "{status}; log:\n{}", service.log_text());
}

/// fds 3 (TCP) and 4 (Unix) passed with LISTEN_FDS=2 are served; the
/// configured addresses are not bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_on_the_passed_sockets() {
    require_setup();
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let configured_addr = format!("127.0.0.1:{}", unused_port());
    let configured_socket = ws.path().join("configured.sock");
    let config = write_config(
        &ws,
        &standin.url(),
        &configured_addr,
        &configured_socket,
        "",
    );

    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let passed_addr = tcp.local_addr().unwrap().to_string();
    let passed_socket = ws.path().join("passed.sock");
    let unix = UnixListener::bind(&passed_socket).unwrap();
    let notify = NotifySocket::bind(ws.path());
    let mut service = Service::start(
        &config,
        ws.path().join("daemon.log"),
        &[("NOTIFY_SOCKET", notify.path.display().to_string())],
        vec![OwnedFd::from(tcp), OwnedFd::from(unix)],
    );
    notify
        .wait_for(0, Duration::from_secs(120), |l| l == "READY=1")
        .await;
    wait_ready_http(&passed_addr, &mut service).await;

    // Over the passed TCP socket.
    let http = reqwest::Client::new();
    let resp = post(
        &http,
        &passed_addr,
        &conversation("over-tcp", "sent over the passed TCP socket"),
    )
    .await;
    assert_eq!(resp.status(), 202);
    // Over the passed Unix socket.
    let body = serde_json::to_vec(&conversation(
        "over-unix",
        "sent over the passed Unix socket",
    ))
    .unwrap();
    let mut stream = UnixStream::connect(&passed_socket).expect("connect to the passed socket");
    write!(
        stream,
        "POST /v1/conversations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(&body).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");

    // The configured addresses are left alone.
    assert!(
        std::net::TcpStream::connect(&configured_addr).is_err(),
        "server.http_addr must not be bound when systemd passed a TCP socket"
    );
    assert!(
        !configured_socket.exists(),
        "server.unix_socket must not be created"
    );
    let log = service.log_text();
    assert!(log.contains("passed by the service manager"), "{log}");

    let db = connect_db(&ws.database_url()).await;
    let stored = wait_for_count(
        &db,
        "SELECT count(*) FROM conversations WHERE client_id IN ('over-tcp', 'over-unix')",
        2,
        Duration::from_secs(60),
    )
    .await;
    db.close().await;
    assert_eq!(stored, 2, "log:\n{}", service.log_text());

    let status = service.terminate(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
    assert!(
        passed_socket.exists(),
        "the passed socket's file belongs to the service manager and stays"
    );
}

/// 429's Retry-After after filling the queue.
async fn retry_after_when_full(http: &reqwest::Client, addr: &str, tag: &str) -> String {
    for i in 0..50 {
        let resp = post(
            http,
            addr,
            &conversation(
                &format!("{tag}-{i}"),
                &format!("filling the queue, {tag} {i}"),
            ),
        )
        .await;
        if resp.status() == 429 {
            return resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(none)")
                .to_string();
        }
        assert_eq!(resp.status(), 202);
    }
    panic!("the queue never filled up");
}

/// SIGHUP: a changed valid file is applied (a 429's Retry-After, the log
/// level) and keys needing a restart are named; an invalid file changes
/// nothing and the daemon keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_config_and_keeps_the_old_one_on_an_invalid_one() {
    require_setup();
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap().to_string();
    let base = "[log]\nlevel = \"warn\"\n\n[queue]\ncapacity = 2\nretry_after_secs = 1\n\n\
                [batch]\nmax_size = 1\n\n[pipeline]\nworkers = 1\n\n[shutdown]\ntimeout_ms = 3000\n";
    let config = write_config(&ws, &standin.url(), &addr, &ws.socket(), base);
    let notify = NotifySocket::bind(ws.path());
    let mut service = Service::start(
        &config,
        ws.path().join("daemon.log"),
        &[("NOTIFY_SOCKET", notify.path.display().to_string())],
        vec![OwnedFd::from(tcp)],
    );
    service.assert_running();
    notify
        .wait_for(0, Duration::from_secs(120), |l| l == "READY=1")
        .await;
    wait_ready_http(&addr, &mut service).await;
    assert!(
        !service.log_text().contains("convstore is running"),
        "log.level = warn hides info lines"
    );

    // Hold the pipeline so the queue fills: every call hangs.
    standin
        .set_faults(json!({"latency_per_request_ms": FOREVER_MS as f64}))
        .await;
    let http = reqwest::Client::new();
    assert_eq!(retry_after_when_full(&http, &addr, "before").await, "1");

    // A valid change, through what ExecReload runs.
    let changed = base
        .replace("level = \"warn\"", "level = \"info\"")
        .replace("retry_after_secs = 1", "retry_after_secs = 7")
        .replace("workers = 1", "workers = 3");
    write_config(&ws, &standin.url(), &addr, &ws.socket(), &changed);
    let mark = notify.lines().len();
    let out = Command::new(BIN)
        .args(["reload", "--pid", &service.pid().to_string(), "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reloading = notify
        .wait_for(mark, Duration::from_secs(30), |l| l == "RELOADING=1")
        .await;
    assert!(
        notify.lines()[reloading..]
            .iter()
            .any(|l| l.starts_with("MONOTONIC_USEC=")),
        "RELOADING=1 comes with MONOTONIC_USEC"
    );
    let done = notify
        .wait_for(reloading, Duration::from_secs(30), |l| l == "READY=1")
        .await;
    let status_line = notify
        .wait_for(done, Duration::from_secs(5), |l| l.starts_with("STATUS="))
        .await;
    let status_text = &notify.lines()[status_line];
    assert!(
        status_text.contains("queue.retry_after_secs")
            && status_text.contains("restart needed for pipeline.workers"),
        "{status_text}"
    );
    assert_eq!(
        retry_after_when_full(&http, &addr, "after-valid").await,
        "7"
    );
    let log = service.log_text();
    assert!(
        log.contains("Configuration reloaded"),
        "an info line after the reload shows log.level changed live:\n{log}"
    );
    assert!(
        log.contains("pipeline.workers"),
        "the restart-only key is named:\n{log}"
    );

    // An invalid file: `convstore reload` refuses to signal, and a plain
    // SIGHUP leaves the daemon on its configuration.
    write_config(
        &ws,
        &standin.url(),
        &addr,
        &ws.socket(),
        &changed.replace("retry_after_secs = 7", "retry_after_secs = 0"),
    );
    let out = Command::new(BIN)
        .args(["reload", "--pid", &service.pid().to_string(), "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("queue.retry_after_secs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mark = notify.lines().len();
    service.signal(libc::SIGHUP);
    let reloading = notify
        .wait_for(mark, Duration::from_secs(30), |l| l == "RELOADING=1")
        .await;
    let done = notify
        .wait_for(reloading, Duration::from_secs(30), |l| l == "READY=1")
        .await;
    let status_line = notify
        .wait_for(done, Duration::from_secs(5), |l| l.starts_with("STATUS="))
        .await;
    assert!(
        notify.lines()[status_line].contains("reload refused"),
        "{}",
        notify.lines()[status_line]
    );
    service.assert_running();
    assert_eq!(
        retry_after_when_full(&http, &addr, "after-invalid").await,
        "7"
    );
    let log = service.log_text();
    assert!(
        log.contains("reload refused") && log.contains("retry_after_secs"),
        "the log says why:\n{log}"
    );

    service.terminate(Duration::from_secs(60)).await;
}
