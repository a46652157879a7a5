//! The daemon as a real child process, configured in a private temp
//! directory (state, managed cluster, socket), the Ollama stand-in on a
//! loopback port, plus clients.

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use convstore::cli::client::{Client, Endpoint};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub const BIN: &str = env!("CARGO_BIN_EXE_convstore");

/// `convstore serve --config CONFIG` through `sh`, which exports
/// `LISTEN_PID` and `WATCHDOG_PID` as its own pid and then execs the daemon
/// (same pid), as systemd sets them for the process it starts.
pub fn activated_serve(config: &Path) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"export LISTEN_PID=$$ WATCHDOG_PID=$$; exec "$0" serve --config "$1""#)
        .arg(BIN)
        .arg(config)
        .env_remove("LISTEN_FDS");
    cmd
}

/// Spawns `cmd` with `fds` as its descriptors 3, 4, … and `LISTEN_FDS` set
/// to their number (none: no `LISTEN_FDS`), then closes our copies.
pub fn spawn_activated(mut cmd: Command, fds: Vec<OwnedFd>) -> Child {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // Above any number the child uses before exec, so the dup2s below
    // cannot overwrite a source not yet moved.
    let high: Vec<i32> = fds
        .iter()
        .map(|fd| {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own; the result is
            // checked and closed below.
            let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
            assert!(n >= 100, "dup: {}", std::io::Error::last_os_error());
            n
        })
        .collect();
    if !high.is_empty() {
        cmd.env("LISTEN_FDS", high.len().to_string());
        let moves = high.clone();
        // SAFETY: only dup2(2), which is async-signal-safe, runs between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in moves.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    let child = cmd.spawn().expect("spawn convstore serve");
    for fd in high {
        // SAFETY: our own duplicate from above, closed once.
        unsafe { libc::close(fd) };
    }
    drop(fds);
    child
}

/// The embedding-server stand-in (`tools/standin`), serving on a loopback
/// port from its own thread and runtime in this test process: to the daemon
/// it is a server at an address, as Ollama is. Dropping it stops it at once
/// (requests in flight are cut off, as when the process was killed).
pub struct Standin {
    pub addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Standin {
    /// Starts a stand-in on a free port with extra `convstore-standin`
    /// arguments (`--latency-ms 15`, `--down`, `--poison X`...).
    pub fn start(model: &str, dims: usize, context: usize, extra: &[&str]) -> Standin {
        use clap::Parser as _;
        let (dims, context) = (dims.to_string(), context.to_string());
        let mut argv = vec![
            "convstore-standin",
            "--model",
            model,
            "--dimensions",
            &dims,
            "--context-length",
            &context,
        ];
        argv.extend_from_slice(extra);
        let args = convstore_standin::cli::StandinArgs::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("stand-in arguments {argv:?}: {e}"));
        let config = args.config().expect("stand-in configuration");
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("stand-in runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind the stand-in");
                let _ = addr_tx.send(listener.local_addr().expect("stand-in address"));
                let standin = convstore_standin::Standin::new(config);
                tokio::select! {
                    served = standin.serve(listener, std::future::pending()) => {
                        served.expect("stand-in serve");
                    }
                    _ = stop_rx => {}
                }
            });
            // Connections still open are dropped, not drained.
            runtime.shutdown_background();
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("stand-in address")
            .to_string();
        Standin {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `POST /_standin/faults` with `update`.
    pub async fn set_faults(&self, update: Value) {
        let resp = reqwest::Client::new()
            .post(format!("{}/_standin/faults", self.url()))
            .json(&update)
            .send()
            .await
            .expect("standin faults");
        assert!(
            resp.status().is_success(),
            "faults update refused: {}",
            resp.text().await.unwrap_or_default()
        );
    }

    /// `GET /_standin/stats`.
    pub async fn stats(&self) -> Value {
        get_json(format!("{}/_standin/stats", self.url())).await
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A private directory for one daemon: state, managed cluster, socket, logs.
/// Traversable by the unprivileged account PostgreSQL runs as under root.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    /// The daemon's HTTP listener, bound on port 0 by [`Workspace::bind_http`]
    /// and handed to the next [`Daemon::spawn`] (no bind-then-release race).
    http: std::sync::Mutex<Option<std::net::TcpListener>>,
}

impl Workspace {
    pub fn new() -> Workspace {
        let dir = tempfile::Builder::new()
            .prefix("convstore-test-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Workspace {
            dir,
            http: std::sync::Mutex::new(None),
        }
    }

    /// Binds the daemon's HTTP listener on a free loopback port and returns
    /// its address, for `server.http_addr`. The listener itself is passed
    /// to the daemon [`Daemon::spawn`] starts (socket activation), which
    /// therefore serves on exactly this socket.
    pub fn bind_http(&self) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the HTTP listener");
        let addr = listener.local_addr().expect("listener address").to_string();
        *self.http.lock().unwrap() = Some(listener);
        addr
    }

    /// The listener for `addr`: the one [`Workspace::bind_http`] bound, or,
    /// for a daemon started again on the same address (after a crash or a
    /// stop closed it), the address bound anew.
    fn http_listener(&self, addr: &str) -> std::net::TcpListener {
        let kept = self.http.lock().unwrap().take();
        match kept {
            Some(l) if l.local_addr().ok().map(|a| a.to_string()).as_deref() == Some(addr) => l,
            _ => std::net::TcpListener::bind(addr)
                .unwrap_or_else(|e| panic!("bind {addr} again for the restarted daemon: {e}")),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.path().join("convstore.sock")
    }

    pub fn config_path(&self) -> PathBuf {
        self.path().join("convstore.toml")
    }

    /// The managed cluster's postmaster, while its `postmaster.pid` says it
    /// runs: the file is there and its first line names a live `postgres`.
    pub fn running_postmaster(&self) -> Option<i32> {
        let pid = super::cluster::postmaster_pid(&self.path().join("state/postgres/data"))?;
        let pid = i32::try_from(pid).ok()?;
        // A pid the file names may have been reused since.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains("postgres")
            .then_some(pid)
    }

    /// URL of the managed cluster's database (over its Unix socket).
    pub fn database_url(&self) -> String {
        format!(
            "postgres://convstore@localhost/convstore?host={}",
            self.path().join("state/postgres/run").display()
        )
    }

    /// Writes a config with no `[embedding]` section (the zero-set-up
    /// default: the builtin model) and this workspace's paths and a free
    /// TCP port, then `extra` TOML; returns the HTTP address.
    pub fn write_default_config(&self, extra: &str) -> String {
        let http_addr = self.bind_http();
        std::fs::write(
            self.config_path(),
            format!(
                "state_dir = \"{}\"\n\n[server]\nhttp_addr = \"{http_addr}\"\nunix_socket = \"{}\"\n\n{extra}\n",
                self.path().join("state").display(),
                self.socket().display()
            ),
        )
        .expect("write config");
        http_addr
    }

    /// Writes the config: this workspace's paths, a free TCP port, the
    /// given backend, then `extra` TOML (sections the test cares about).
    pub fn write_config(&self, standin_url: &str, model: &str, dims: usize, extra: &str) -> String {
        let http_addr = self.bind_http();
        let toml = format!(
            r#"state_dir = "{state}"

[server]
http_addr = "{http_addr}"
unix_socket = "{socket}"

[embedding]
model = "{model}"
dimensions = {dims}
retry_initial_ms = 20
retry_max_ms = 500

[[embedding.backends]]
name = "standin"
kind = "ollama"
url = "{standin_url}"
timeout_ms = 10000

{extra}
"#,
            state = self.path().join("state").display(),
            socket = self.socket().display(),
        );
        std::fs::write(self.config_path(), toml).expect("write config");
        http_addr
    }
}

/// A running `convstore serve`.
pub struct Daemon {
    child: Option<Child>,
    pub http_addr: String,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon on the workspace's config and waits for /readyz.
    pub async fn start(ws: &Workspace, http_addr: &str) -> Daemon {
        Self::start_with_env(ws, http_addr, &[]).await
    }

    /// [`Daemon::start`] with `CONVSTORE_*` overrides in the environment.
    pub async fn start_with_env(ws: &Workspace, http_addr: &str, env: &[(&str, &str)]) -> Daemon {
        let mut daemon = Self::spawn(ws, http_addr, env);
        daemon.wait_ready(Duration::from_secs(90)).await;
        daemon
    }

    /// Starts the daemon without waiting for it to be ready, serving HTTP
    /// on the workspace's listener for `http_addr`, passed the way systemd
    /// passes sockets ([`spawn_activated`]). Our copy is closed once the
    /// daemon has it, so a stopped daemon refuses connections.
    pub fn spawn(ws: &Workspace, http_addr: &str, env: &[(&str, &str)]) -> Daemon {
        let log = ws.path().join(format!("daemon-{}.log", now_millis()));
        let log_file = std::fs::File::create(&log).expect("log file");
        let listener = ws.http_listener(http_addr);
        let mut cmd = activated_serve(&ws.config_path());
        let partitions = super::cluster::test_partitions();
        if partitions > 0 {
            cmd.env("CONVSTORE_DATABASE__PARTITIONS", partitions.to_string());
        }
        cmd.env("RUST_LOG", "info,convstore=debug,sqlx=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = spawn_activated(cmd, vec![OwnedFd::from(listener)]);
        Daemon {
            child: Some(child),
            http_addr: http_addr.to_string(),
            socket: ws.socket(),
            log,
        }
    }

    /// Sends SIGKILL and reaps the process: what a crash leaves behind
    /// (the managed PostgreSQL keeps running as an orphan).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until `/readyz` answers 200; panics (with the log) if the
    /// process exits or `limit` passes.
    pub async fn wait_ready(&mut self, limit: Duration) {
        if let Err(why) = self.try_wait_ready(limit).await {
            panic!("{why}");
        }
    }

    /// Waits until `/readyz` answers 200; `Err` (with the log) if the
    /// process exits or `limit` passes, for tests that start again.
    pub async fn try_wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        let client = reqwest::Client::new();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!(
                    "daemon exited during start-up ({status}); log:\n{}",
                    self.log_text()
                ));
            }
            if let Ok(resp) = client
                .get(format!("http://{}/readyz", self.http_addr))
                .send()
                .await
                && resp.status().is_success()
            {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(format!(
                    "daemon not ready after {limit:?}; log:\n{}",
                    self.log_text()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// `GET /v1/stats`, as JSON.
    pub async fn stats(&self) -> Value {
        get_json(format!("{}/v1/stats", self.base_url())).await
    }

    pub fn unix_client(&self) -> Client {
        Client::new(Endpoint::Unix(self.socket.clone()))
    }

    /// Waits for a daemon expected to give up on its own (a refused
    /// start-up); panics with the log if it is still running after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "daemon still running after {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_ref().expect("daemon already stopped");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        self.wait_exit(limit)
    }
}

/// A daemon that was killed (a test that failed, a crash test) cannot stop
/// its managed cluster: stop it here, so no cluster outlives its test and
/// its deleted directory.
impl Drop for Workspace {
    fn drop(&mut self) {
        let Some(pid) = self.running_postmaster() else {
            return;
        };
        // SAFETY: kill(2) on the postmaster's pid, checked just above;
        // SIGQUIT is PostgreSQL's immediate shutdown. No memory is involved.
        unsafe {
            libc::kill(pid, libc::SIGQUIT);
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) && self.running_postmaster().is_some() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: as in `terminate`.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(20) {
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

pub async fn connect_db(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .expect("connect to the daemon's database")
}

/// Polls `query` (a single bigint) until it returns `expected` or `limit` passes.
pub async fn wait_for_count(
    pool: &PgPool,
    query: &'static str,
    expected: i64,
    limit: Duration,
) -> i64 {
    let started = Instant::now();
    loop {
        let n: i64 = sqlx::query_scalar(query)
            .fetch_one(pool)
            .await
            .expect("count query");
        if n == expected || started.elapsed() > limit {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A loopback port nothing listens on now, for an address that must stay
/// unbound (the daemon is expected not to bind it) or that the daemon binds
/// itself and cannot be handed (`metrics.listen`). Another process could
/// take it before it is used: everything the daemon serves the API on is
/// bound by the test instead ([`Workspace::bind_http`]).
pub fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn now_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// A pgvector value as `embedding::text` prints it (`[1,2.5,...]`).
pub fn parse_vector(text: &str) -> Vec<f32> {
    text.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|x| x.parse().expect("vector element"))
        .collect()
}

/// `GET url`, its body as JSON; panics (the test's failure) otherwise.
pub async fn get_json(url: String) -> Value {
    reqwest::get(&url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}
