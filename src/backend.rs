//! Backends: connecting to a Unix, abstract or TCP address (host names resolved now, at connect
//! time) and the resulting stream type the forwarders work on.

use crate::config::BackendAddr;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

#[derive(Debug)]
pub enum BackendStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Why no connection to the backend could be made. Always "backend" fault for metrics.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot resolve: {0}")]
    Resolve(io::Error),
    #[error("name resolved to no address")]
    NoAddress,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ConnectError {
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::Timeout(_) => "connect_timeout",
            ConnectError::Resolve(_) | ConnectError::NoAddress => "resolve_failed",
            ConnectError::Io(e) if e.kind() == io::ErrorKind::ConnectionRefused => "refused",
            ConnectError::Io(e) if e.kind() == io::ErrorKind::NotFound => "no_socket",
            ConnectError::Io(_) => "connect_failed",
        }
    }
}

/// Connects within `timeout` (resolution included). Several resolved addresses are tried in
/// order; the last error is reported.
pub async fn connect(addr: &BackendAddr, timeout: Duration) -> Result<BackendStream, ConnectError> {
    match tokio::time::timeout(timeout, connect_inner(addr)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}

/// Tries each backend in order until one connects (each with its own `timeout`). Returns the
/// stream and the index of the backend that answered, or the last error.
pub async fn connect_first(
    addrs: &[BackendAddr],
    timeout: Duration,
) -> Result<(BackendStream, usize), (usize, ConnectError)> {
    let mut last = (0, ConnectError::NoAddress);
    for (i, a) in addrs.iter().enumerate() {
        match connect(a, timeout).await {
            Ok(s) => return Ok((s, i)),
            Err(e) => {
                if i + 1 < addrs.len() {
                    tracing::debug!(backend = %a, "connect failed, trying the next backend: {e}");
                }
                last = (i, e);
            }
        }
    }
    Err(last)
}

async fn connect_inner(addr: &BackendAddr) -> Result<BackendStream, ConnectError> {
    match addr {
        BackendAddr::Unix(path) => Ok(BackendStream::Unix(unix(path)?)),
        BackendAddr::Abstract(name) => {
            // A leading NUL names the Linux abstract namespace.
            let mut p = Vec::with_capacity(name.len() + 1);
            p.push(0);
            p.extend_from_slice(name);
            let path: std::ffi::OsString = std::os::unix::ffi::OsStringExt::from_vec(p);
            Ok(BackendStream::Unix(unix(std::path::Path::new(&path))?))
        }
        BackendAddr::Tcp(sa) => Ok(BackendStream::Tcp(tcp(*sa).await?)),
        BackendAddr::Host { host, port } => {
            let addrs = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(ConnectError::Resolve)?;
            let mut last = ConnectError::NoAddress;
            for sa in addrs {
                match tcp(sa).await {
                    Ok(s) => return Ok(BackendStream::Tcp(s)),
                    Err(e) => last = ConnectError::Io(e),
                }
            }
            Err(last)
        }
    }
}

/// A Unix stream connect completes or fails at once (EAGAIN when the listener's backlog is
/// full, ECONNREFUSED, ENOENT): there is never a connect in progress. So no wait for
/// writability and no SO_ERROR query afterwards, which tokio's `UnixStream::connect` does for
/// every connection (one event-loop round trip and one syscall).
fn unix(path: &std::path::Path) -> io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let addr = SockAddr::unix(path)?;
    let s = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    s.connect(&addr)?;
    UnixStream::from_std(std::os::fd::OwnedFd::from(s).into())
}

async fn tcp(sa: std::net::SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(sa).await?;
    // The hello and small handshake flights must not wait for Nagle.
    s.set_nodelay(true)?;
    Ok(s)
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
