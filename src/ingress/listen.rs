//! Binding the listeners: TCP, and a Unix socket whose stale file (left by a
//! crash) is replaced safely.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener, UnixStream};

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr} (server.http_addr): {source}")]
    Tcp { addr: String, source: io::Error },
    #[error("cannot listen on {} (server.unix_socket): {reason}", path.display())]
    Unix { path: PathBuf, reason: String },
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
}
