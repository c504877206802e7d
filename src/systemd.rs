//! systemd integration: socket activation (inherited listening sockets) and sd_notify state
//! (READY, RELOADING, STOPPING, STATUS, WATCHDOG). The only module that adopts raw fds.

use std::io;
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

/// Sockets handed over by the service manager.
#[derive(Debug, Default)]
pub struct Activated {
    pub tcp: Vec<(TcpListener, String)>,
    /// Datagram sockets (for QUIC); kept so they are not silently lost.
    pub udp: Vec<(std::net::UdpSocket, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("socket activation: {0}")]
    Env(io::Error),
    #[error("socket activation: fd {fd} ({name}): {why}")]
    BadFd {
        fd: RawFd,
        name: String,
        why: String,
    },
}

/// Takes the sockets passed with `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`, if they are meant
/// for this process, and clears the variables so children do not inherit them. Call it before
/// any thread is started (environment changes are not thread-safe).
pub fn take_activated() -> Result<Option<Activated>, ActivationError> {
    let fds: Vec<(RawFd, String)> = sd_notify::listen_fds_with_names()
        .map_err(ActivationError::Env)?
        .collect();
    // SAFETY: called from main before the runtime or any other thread exists.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    if fds.is_empty() {
        return Ok(None);
    }
    let mut out = Activated::default();
    for (fd, name) in fds {
        let bad = |why: String| ActivationError::BadFd {
            fd,
            name: name.clone(),
            why,
        };
        // SAFETY: LISTEN_PID named this process, so systemd passed us fds 3..3+LISTEN_FDS and
        // nothing else in the process owns them; each is adopted exactly once, here.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let ty =
            getsockopt(&owned, sockopt::SockType).map_err(|e| bad(format!("not a socket: {e}")))?;
        let addr: SockaddrStorage = getsockname(fd).map_err(|e| bad(e.to_string()))?;
        let inet = matches!(
            addr.family(),
            Some(AddressFamily::Inet | AddressFamily::Inet6)
        );
        if !inet {
            return Err(bad(
                "only IPv4/IPv6 sockets are supported (ListenStream=PORT or ADDR:PORT)".into(),
            ));
        }
        match ty {
            SockType::Stream => {
                let listening = getsockopt(&owned, sockopt::AcceptConn).unwrap_or(false);
                if !listening {
                    return Err(bad(
                        "stream socket is not listening (Accept=no is required)".into(),
                    ));
                }
                let l = TcpListener::from(owned);
                // Inherited fds are blocking; tokio needs non-blocking ones.
                l.set_nonblocking(true).map_err(|e| bad(e.to_string()))?;
                out.tcp.push((l, name));
            }
            SockType::Datagram => {
                let u = std::net::UdpSocket::from(owned);
                u.set_nonblocking(true).map_err(|e| bad(e.to_string()))?;
                out.udp.push((u, name));
            }
            other => return Err(bad(format!("unsupported socket type {other:?}"))),
        }
    }
    Ok(Some(out))
}

/// sd_notify wrappers. Each is a no-op without `NOTIFY_SOCKET`; failures are logged, never fatal.
pub mod notify {
    use sd_notify::NotifyState;

    fn send(states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!("sd_notify: {e}");
        }
    }

    pub fn ready(status: &str) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// RELOADING=1 with MONOTONIC_USEC, as Type=notify-reload requires (systemd 253+).
    pub fn reloading() {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping() {
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    pub fn status(status: &str) {
        send(&[NotifyState::Status(status)]);
    }

    pub fn watchdog() {
        send(&[NotifyState::Watchdog]);
    }
}

/// Watchdog ping interval: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) recommends.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .map(|d| d / 2)
        .filter(|d| !d.is_zero())
}
