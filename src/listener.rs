//! Binding the configured listen addresses. (Inherited, socket-activated sockets come in here too
//! once systemd support lands; this is the only module that creates listening sockets.)

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, TcpListener};

/// Accept backlog: large enough to absorb a burst of new connections on a busy port 443.
pub const BACKLOG: i32 = 4096;

/// Binds every address. `[::]:PORT` is IPv6-only when `0.0.0.0:PORT` is also listed (so both can
/// be bound), and dual-stack when it stands alone, so `listen = ["[::]:443"]` serves IPv4 too.
pub fn bind_all(addrs: &[SocketAddr]) -> io::Result<Vec<TcpListener>> {
    addrs
        .iter()
        .map(|addr| {
            let v4_too = addrs
                .iter()
                .any(|a| a.is_ipv4() && a.port() == addr.port() && a.ip().is_unspecified());
            bind(*addr, v4_too)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
        })
        .collect()
}

fn bind(addr: SocketAddr, v6_only: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(v6_only)?;
    }
    // Restarts must not wait for TIME_WAIT sockets of the previous process.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}
