//! Binding the configured listen addresses: TCP for `listen`, UDP for `[quic] listen`. This is
//! the only module that creates listening sockets (inherited ones come from `systemd`).

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};

/// Accept backlog: large enough to absorb a burst of new connections on a busy port 443.
pub const BACKLOG: i32 = 4096;

/// Binds every address. `[::]:PORT` is IPv6-only when `0.0.0.0:PORT` is also listed (so both can
/// be bound), and dual-stack when it stands alone, so `listen = ["[::]:443"]` serves IPv4 too.
pub fn bind_all(addrs: &[SocketAddr]) -> io::Result<Vec<TcpListener>> {
    each(addrs, "", bind_tcp)
}

/// The same for UDP (QUIC) sockets, with the same IPv6 rule.
pub fn bind_udp_all(addrs: &[SocketAddr]) -> io::Result<Vec<UdpSocket>> {
    each(addrs, "UDP ", bind_udp)
}

fn each<T>(
    addrs: &[SocketAddr],
    what: &str,
    bind: impl Fn(SocketAddr, bool) -> io::Result<T>,
) -> io::Result<Vec<T>> {
    addrs
        .iter()
        .map(|addr| {
            let v4_too = addrs
                .iter()
                .any(|a| a.is_ipv4() && a.port() == addr.port() && a.ip().is_unspecified());
            bind(*addr, v4_too).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on {what}{addr}: {e}"))
            })
        })
        .collect()
}

fn bind_udp(addr: SocketAddr, v6_only: bool) -> io::Result<UdpSocket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.cloexec(),
        Some(Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(v6_only)?;
    }
    s.set_nonblocking(true)?;
    // Best effort (capped by net.core.rmem_max/wmem_max): room for bursts while the loop is busy.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn bind_tcp(addr: SocketAddr, v6_only: bool) -> io::Result<TcpListener> {
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

/// Options set once on a listening socket (bound or inherited) that every accepted socket
/// inherits, instead of one syscall per connection. Returns whether TCP_NODELAY is now
/// inherited: if not, the caller sets it on each accepted socket.
pub fn tune(l: &TcpListener) -> bool {
    // What sniplex writes itself (alerts, a terminated session's handshake flights) is small
    // and must not wait for Nagle. Linux copies the listener's TCP_NODELAY to accepted sockets.
    socket2::SockRef::from(l).set_tcp_nodelay(true).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TCP_NODELAY set once on the listener reaches every accepted socket (no per-connection
    /// setsockopt).
    #[test]
    fn accepted_sockets_inherit_nodelay() {
        let l = bind_all(&["127.0.0.1:0".parse().unwrap()])
            .unwrap()
            .remove(0);
        assert!(tune(&l));
        l.set_nonblocking(false).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, _) = l.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
