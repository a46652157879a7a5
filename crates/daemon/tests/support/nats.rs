//! Real `nats-server` processes for the shared-intake tests: one node, or
//! a three-node JetStream cluster, on loopback ports, with their storage
//! in a temp directory; killed on drop.
//!
//! The binary: `CONVSTORE_NATS_SERVER`, else where `scripts/setup.sh
//! --tests` installs it (`/usr/local/lib/convstore/nats-server` as root,
//! `~/.local/lib/convstore/nats-server` otherwise), else `nats-server` on
//! the PATH.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::unused_port;

pub fn nats_server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("CONVSTORE_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let installed = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/usr/local/lib/convstore/nats-server")
    } else {
        PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".local/lib/convstore/nats-server")
    };
    if installed.exists() {
        installed
    } else {
        PathBuf::from("nats-server")
    }
}

/// One `nats-server` with JetStream.
pub struct NatsNode {
    child: Option<Child>,
    pub name: String,
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl NatsNode {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: what a crash of the broker leaves behind.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill9();
        self.child = Some(spawn(&self.config, &self.log));
        wait_listening(self.port, &self.log);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn spawn(config: &Path, log: &Path) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("nats log file");
    let binary = nats_server_binary();
    Command::new(&binary)
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}); scripts/setup.sh --tests installs nats-server",
                binary.display()
            )
        })
}

fn wait_listening(port: u16, log: &Path) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "nats-server did not listen on {port}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One node (`cluster` = None) or a member of a cluster, configured in a
/// file: JetStream with an explicit fsync policy (docs/SCALING.md) and an
/// explicit storage limit. Left to its default, JetStream offers 75 % of the
/// disk's free space and refuses a stream reserving more (`nats.max_bytes`,
/// 1 GiB): a test machine with little free disk would fail for a reason
/// that has nothing to do with convstore. The streams here hold kilobytes.
fn node(dir: &Path, name: &str, port: u16, cluster: Option<(u16, &[u16])>) -> NatsNode {
    let store = dir.join(format!("{name}-js"));
    std::fs::create_dir_all(&store).expect("nats storage dir");
    let mut config = format!(
        "server_name: {name}\nlisten: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n  max_file_store: 16G\n  sync_interval: always\n}}\n",
        store.display()
    );
    if let Some((cluster_port, routes)) = cluster {
        let routes: Vec<String> = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        config.push_str(&format!(
            "cluster {{\n  name: convstore-test\n  listen: 127.0.0.1:{cluster_port}\n  routes: [{}]\n}}\n",
            routes.join(", ")
        ));
    }
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, config).expect("nats config");
    let log = dir.join(format!("{name}.log"));
    NatsNode {
        child: Some(spawn(&path, &log)),
        name: name.to_string(),
        port,
        config: path,
        log,
    }
}

/// A single node.
pub struct NatsServer {
    pub node: NatsNode,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = node(dir.path(), "n1", unused_port(), None);
        wait_listening(node.port, &node.log);
        NatsServer { node, _dir: dir }
    }

    pub fn url(&self) -> String {
        self.node.url()
    }
}

/// Three nodes in one JetStream cluster.
pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    pub fn start() -> NatsCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let client_ports: Vec<u16> = (0..3).map(|_| unused_port()).collect();
        let cluster_ports: Vec<u16> = (0..3).map(|_| unused_port()).collect();
        let nodes: Vec<NatsNode> = (0..3)
            .map(|i| {
                node(
                    dir.path(),
                    &format!("n{}", i + 1),
                    client_ports[i],
                    Some((cluster_ports[i], &cluster_ports)),
                )
            })
            .collect();
        for n in &nodes {
            wait_listening(n.port, &n.log);
        }
        NatsCluster { nodes, _dir: dir }
    }

    /// Every node's URL, comma-separated (`nats.url`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node_named(&mut self, name: &str) -> Option<&mut NatsNode> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }
}
