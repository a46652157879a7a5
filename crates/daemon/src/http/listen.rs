//! Binding the listeners: TCP, and a Unix socket whose stale file (left by a
//! crash) is replaced safely; or serving on sockets a service manager
//! passed in (socket activation), falling back to binding for each kind
//! (TCP, Unix) none was passed for.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener, UnixStream};

use crate::config::ServerSettings;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr} (server.http_addr): {source}")]
    Tcp { addr: String, source: io::Error },
    #[error("cannot listen on {} (server.unix_socket): {reason}", path.display())]
    Unix { path: PathBuf, reason: String },
    #[error("cannot serve on a socket passed by the service manager: {0}")]
    Inherited(io::Error),
}

/// Listening sockets handed over by a service manager (socket activation),
/// already non-blocking.
#[derive(Debug, Default)]
pub struct Inherited {
    pub tcp: Vec<std::net::TcpListener>,
    pub unix: Vec<std::os::unix::net::UnixListener>,
}

/// What convstore serves on.
#[derive(Debug, Default)]
pub struct Listeners {
    /// The API over HTTP.
    pub tcp: Vec<TcpListener>,
    /// The API over Unix sockets.
    pub unix: Vec<UnixListener>,
    /// `/metrics` alone (`metrics.listen`).
    pub metrics: Option<TcpListener>,
    /// The socket file convstore bound itself, removed at exit. `None` when
    /// the Unix socket came from the service manager, which owns its file.
    pub own_socket_file: Option<PathBuf>,
}

/// Serves on the `inherited` sockets; binds the configured address of a
/// kind (`server.http_addr`, `server.unix_socket`) only when no socket of
/// that kind was passed in, so the `.socket` unit decides what it covers.
pub async fn open(server: &ServerSettings, inherited: Inherited) -> Result<Listeners, ListenError> {
    let mut out = Listeners::default();
    for std_listener in inherited.tcp {
        let listener = TcpListener::from_std(std_listener).map_err(ListenError::Inherited)?;
        let addr = listener.local_addr().map_err(ListenError::Inherited)?;
        tracing::info!(addr = %addr, "Serving HTTP on a TCP socket passed by the service manager");
        if !server.http_addr.is_empty()
            && server.http_addr.parse::<std::net::SocketAddr>().ok() != Some(addr)
        {
            tracing::warn!(passed = %addr, configured = %server.http_addr, "server.http_addr differs from the socket the service manager passed; the configured address is not bound");
        }
        out.tcp.push(listener);
    }
    for std_listener in inherited.unix {
        let listener = UnixListener::from_std(std_listener).map_err(ListenError::Inherited)?;
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf));
        let shown = path
            .as_deref()
            .map_or_else(|| "(unnamed)".to_string(), |p| p.display().to_string());
        tracing::info!(path = %shown, "Serving HTTP on a Unix socket passed by the service manager");
        if !server.unix_socket.is_empty() && path.as_deref() != Some(Path::new(&server.unix_socket))
        {
            tracing::warn!(passed = %shown, configured = %server.unix_socket, "server.unix_socket differs from the socket the service manager passed; clients that read the configuration (convstore enqueue) will look in the wrong place: set server.unix_socket to the passed path");
        }
        out.unix.push(listener);
    }
    if out.tcp.is_empty() && !server.http_addr.is_empty() {
        out.tcp.push(bind_tcp(&server.http_addr).await?);
    }
    if out.unix.is_empty() && !server.unix_socket.is_empty() {
        let path = PathBuf::from(&server.unix_socket);
        let mode = server.socket_mode_bits().map_err(|e| ListenError::Unix {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        out.unix.push(bind_unix(&path, mode).await?);
        out.own_socket_file = Some(path);
    }
    Ok(out)
}

pub async fn bind_tcp(addr: &str) -> Result<TcpListener, ListenError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::Tcp {
            addr: addr.to_string(),
            source,
        })?;
    if let Ok(local) = listener.local_addr()
        && !local.ip().is_loopback()
    {
        tracing::warn!(addr = %local, "Listening on a non-loopback address: anyone who can reach it can write conversations");
    }
    Ok(listener)
}

/// Binds `path` with permission bits `mode`.
///
/// An existing file at `path` is removed only if it is a socket nobody
/// answers on (a crashed predecessor's); a live socket means another
/// instance is running, and a regular file is never deleted.
pub async fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ListenError> {
    let fail = |reason: String| ListenError::Unix {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| fail(format!("cannot create {}: {e}", parent.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => {
                return Err(fail(
                    "another process is listening on it (is convstore already running?)".into(),
                ));
            }
            Err(_) => {
                tracing::info!(path = %path.display(), "Removing stale socket file left by an earlier run");
                std::fs::remove_file(path)
                    .map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
            }
        },
        Ok(_) => {
            return Err(fail(
                "a file that is not a socket is in the way; remove it or choose another path"
                    .into(),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("cannot set mode {mode:o}: {e}")))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replaces_stale_socket_refuses_live_one_and_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let first = bind_unix(&path, 0o660).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(
            bind_unix(&path, 0o660).await.is_err(),
            "live socket must not be replaced"
        );
        drop(first); // the file stays behind, like after a crash
        assert!(path.exists());
        let _second = bind_unix(&path, 0o600)
            .await
            .expect("stale socket replaced");

        let file = dir.path().join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(bind_unix(&file, 0o660).await.is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[tokio::test]
    async fn passed_tcp_socket_replaces_the_configured_address_only() {
        let dir = tempfile::tempdir().unwrap();
        let passed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        passed.set_nonblocking(true).unwrap();
        let passed_addr = passed.local_addr().unwrap();
        let configured = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let configured_addr = configured.local_addr().unwrap();
        drop(configured);
        let server = ServerSettings {
            http_addr: configured_addr.to_string(),
            unix_socket: dir.path().join("api.sock").display().to_string(),
            ..ServerSettings::default()
        };
        let inherited = Inherited {
            tcp: vec![passed],
            unix: Vec::new(),
        };
        let opened = open(&server, inherited).await.unwrap();
        assert_eq!(opened.tcp.len(), 1);
        assert_eq!(opened.tcp[0].local_addr().unwrap(), passed_addr);
        assert!(
            std::net::TcpStream::connect(configured_addr).is_err(),
            "the configured TCP address is not bound"
        );
        // No Unix socket was passed: the configured one is bound, and owned.
        assert_eq!(opened.unix.len(), 1);
        assert_eq!(
            opened.own_socket_file.as_deref(),
            Some(dir.path().join("api.sock").as_path())
        );
    }
}
