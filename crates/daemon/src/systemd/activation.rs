//! Socket activation: listening sockets the service manager passes in
//! (`LISTEN_FDS`, `LISTEN_PID`; `sd_listen_fds(3)`).
//!
//! systemd (`convstore.socket`) or any other manager binds the addresses and
//! hands the sockets over as file descriptors 3, 4, …; connections that
//! arrive while convstore restarts wait in the socket's backlog instead of
//! being refused. Each passed socket is recognised by its address family:
//! `AF_INET`/`AF_INET6` streams are served as the HTTP listener, `AF_UNIX`
//! streams as the Unix socket.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Socket, Type};

use crate::http::listen::Inherited;

/// The descriptors are taken at most once per process: a second
/// `OwnedFd` for the same number would close it twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// A passed descriptor convstore cannot serve on.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("cannot read the sockets passed by the service manager (LISTEN_FDS): {0}")]
    Env(io::Error),
    #[error(
        "file descriptor {fd} passed by the service manager is not a listening stream socket ({reason}); \
         convstore.socket must use ListenStream= only"
    )]
    Unusable { fd: i32, reason: String },
}

/// The listening sockets passed to this process, or none when `LISTEN_PID`
/// names another process or `LISTEN_FDS` is unset. Only the first call
/// returns them.
pub fn take_listeners() -> Result<Inherited, ActivationError> {
    let fds = sd_notify::listen_fds().map_err(ActivationError::Env)?;
    let mut inherited = Inherited::default();
    if fds.len() == 0 || TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(inherited);
    }
    for fd in fds {
        // SAFETY: sd_listen_fds(3): the service manager passed descriptors
        // LISTEN_FDS_START.. to this very process (listen_fds checked
        // LISTEN_PID) and nothing else in convstore uses them; TAKEN makes
        // this the only place that takes ownership, once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        classify(fd, Socket::from(owned), &mut inherited)?;
    }
    Ok(inherited)
}

fn classify(fd: i32, socket: Socket, into: &mut Inherited) -> Result<(), ActivationError> {
    let unusable = |reason: String| ActivationError::Unusable { fd, reason };
    let kind = socket
        .r#type()
        .map_err(|e| unusable(format!("not a socket: {e}")))?;
    if kind != Type::STREAM {
        return Err(unusable(format!("socket type {kind:?}, not a stream")));
    }
    if !socket
        .is_listener()
        .map_err(|e| unusable(format!("cannot query SO_ACCEPTCONN: {e}")))?
    {
        return Err(unusable("not listening".into()));
    }
    let domain = socket
        .domain()
        .map_err(|e| unusable(format!("cannot query its domain: {e}")))?;
    // tokio needs non-blocking sockets; systemd passes blocking ones.
    socket
        .set_nonblocking(true)
        .map_err(|e| unusable(format!("cannot make it non-blocking: {e}")))?;
    if domain == Domain::IPV4 || domain == Domain::IPV6 {
        into.tcp.push(socket.into());
    } else if domain == Domain::UNIX {
        into.unix.push(socket.into());
    } else {
        return Err(unusable(format!("address family {domain:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listening(domain: Domain, addr: &socket2::SockAddr) -> Socket {
        let s = Socket::new(domain, Type::STREAM, None).unwrap();
        s.bind(addr).unwrap();
        s.listen(8).unwrap();
        s
    }

    #[test]
    fn sorts_tcp_and_unix_listeners() {
        let dir = tempfile::tempdir().unwrap();
        let mut into = Inherited::default();
        let tcp = listening(
            Domain::IPV4,
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        );
        classify(3, tcp, &mut into).unwrap();
        let unix = listening(
            Domain::UNIX,
            &socket2::SockAddr::unix(dir.path().join("s")).unwrap(),
        );
        classify(4, unix, &mut into).unwrap();
        assert_eq!(into.tcp.len(), 1);
        assert_eq!(into.unix.len(), 1);
    }

    #[test]
    fn refuses_datagram_and_unlistened_sockets() {
        let mut into = Inherited::default();
        let udp = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        let err = classify(3, udp, &mut into).unwrap_err().to_string();
        assert!(err.contains("not a stream"), "{err}");
        let idle = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let err = classify(4, idle, &mut into).unwrap_err().to_string();
        assert!(err.contains("not listening"), "{err}");
        assert!(into.tcp.is_empty() && into.unix.is_empty());
    }
}
