//! Backends: connecting to a Unix, abstract or TCP address (host names resolved now, at connect
//! time) and the resulting stream type the forwarders work on.

use crate::config::BackendAddr;
use crate::splice::SpliceSocket;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

#[derive(Debug)]
pub enum BackendStream {
    Tcp(TcpStream),
    Unix(UnixBackend),
}

/// A connected Unix stream socket, watched for readability only until a write finds it full.
///
/// A Unix socket reports itself writable again every time its peer reads what was written to
/// it (the kernel's unix_write_space), and an edge-triggered registration that includes
/// EPOLLOUT turns each of those into an event-loop wake-up: one for every chunk sniplex hands
/// to the backend (the replayed hello, each client flight, each request), for nothing. tokio's
/// `UnixStream` always registers both directions, so the socket is registered here through
/// [`AsyncFd`] with read interest only. Writes are tried directly; the first one that finds the
/// socket full registers a duplicate of the descriptor for write interest, used from then on.
#[derive(Debug)]
pub struct UnixBackend {
    read: AsyncFd<std::os::unix::net::UnixStream>,
    /// `None` until a write finds the socket full. Boxed: this is part of what every open
    /// connection holds, and is rarely needed.
    write: std::sync::Mutex<Option<Box<WriteWait>>>,
}

/// How a [`UnixBackend`] whose socket was found full waits until it can be written again.
#[derive(Debug)]
enum WriteWait {
    /// A duplicate of the descriptor, registered for write interest; kept from then on.
    Registered(AsyncFd<OwnedFd>),
    /// No descriptor was free for the duplicate (EMFILE/ENFILE): the write is retried after a
    /// pause, and the registration with it, so the connection lives on until descriptors free up.
    Backoff(std::pin::Pin<Box<tokio::time::Sleep>>),
}

/// Pause between write attempts while no descriptor is free for a write registration.
const WRITE_BACKOFF: Duration = Duration::from_millis(10);

impl UnixBackend {
    /// Takes a connected, non-blocking socket.
    pub fn new(s: std::os::unix::net::UnixStream) -> io::Result<UnixBackend> {
        // SAFETY: `s` owns its descriptor, which stays open and is the same for as long as the
        // AsyncFd owns `s` (it is closed only when `s` drops, after the deregistration).
        let read = unsafe { AsyncFd::register_with_interest(s, Interest::READABLE) };
        Ok(UnixBackend {
            read: read.map_err(io::Error::from)?,
            write: std::sync::Mutex::new(None),
        })
    }

    pub(crate) fn reader(&self) -> &AsyncFd<std::os::unix::net::UnixStream> {
        &self.read
    }

    /// The descriptor registered for write interest, if a write has found the socket full.
    pub fn write_registration(&self) -> Option<std::os::fd::RawFd> {
        match crate::lock(&self.write).as_deref() {
            Some(WriteWait::Registered(w)) => Some(std::os::fd::AsRawFd::as_raw_fd(w)),
            _ => None,
        }
    }

    /// Ready to try a write: at once until the socket has been found full, then when the
    /// write registration says so (or the backoff pause has passed).
    pub(crate) fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut wait = crate::lock(&self.write);
        match wait.as_deref_mut() {
            None => Poll::Ready(Ok(())),
            Some(WriteWait::Registered(w)) => w.poll_write_ready(cx).map_ok(|_| ()),
            Some(WriteWait::Backoff(pause)) => pause.as_mut().poll(cx).map(Ok),
        }
    }

    /// Runs one write `f`. An EAGAIN clears the registration's readiness, or, before there is
    /// one, creates it.
    pub(crate) fn try_write_with<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        let mut wait = crate::lock(&self.write);
        if let Some(WriteWait::Registered(w)) = wait.as_deref() {
            return w.try_io(Interest::WRITABLE, |_| f());
        }
        let r = f();
        if matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            let backing_off = matches!(wait.as_deref(), Some(WriteWait::Backoff(_)));
            *wait = Some(Box::new(match self.register_writer() {
                Ok(w) => {
                    tracing::debug!("backend socket full: watching it for writability");
                    WriteWait::Registered(w)
                }
                Err(e) if crate::splice::is_fd_exhaustion(&e) => {
                    if !backing_off {
                        tracing::warn!(
                            "backend socket full and no file descriptor free to wait on it: \
                             retrying writes every {WRITE_BACKOFF:?} ({e})"
                        );
                    }
                    WriteWait::Backoff(Box::pin(tokio::time::sleep(WRITE_BACKOFF)))
                }
                Err(e) => return Err(e),
            }));
        }
        r
    }

    /// A duplicate of the socket, registered for write interest only.
    fn register_writer(&self) -> io::Result<AsyncFd<OwnedFd>> {
        let dup = self.read.get_ref().as_fd().try_clone_to_owned()?;
        // SAFETY: as in `new`: `dup` owns its descriptor for the AsyncFd's whole life.
        let w = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) };
        w.map_err(io::Error::from)
    }
}

impl AsFd for UnixBackend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.get_ref().as_fd()
    }
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
fn unix(path: &std::path::Path) -> io::Result<UnixBackend> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let addr = SockAddr::unix(path)?;
    let s = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    s.connect(&addr)?;
    UnixBackend::new(OwnedFd::from(s).into())
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
            BackendStream::Unix(s) => s.poll_read_with(cx, buf),
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
            BackendStream::Unix(s) => s.poll_write_with(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            // Nothing is buffered: every write went to the socket.
            BackendStream::Unix(_) => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Unix(s) => Poll::Ready(
                nix::sys::socket::shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(&s.as_fd()),
                    nix::sys::socket::Shutdown::Write,
                )
                .map_err(io::Error::from),
            ),
        }
    }
}

impl UnixBackend {
    /// `AsyncRead` in terms of [`SpliceSocket`]: wait for readiness, read, and on EAGAIN (which
    /// clears the readiness) wait again.
    fn poll_read_with(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.poll_ready_for(cx, Interest::READABLE))?;
            let unfilled = buf.initialize_unfilled();
            match self.try_io_with(Interest::READABLE, || {
                nix::unistd::read(self.as_fd(), unfilled).map_err(io::Error::from)
            }) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// `AsyncWrite` the same way (writes are tried before any readiness is known).
    fn poll_write_with(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.poll_ready_for(cx, Interest::WRITABLE))?;
            match self.try_io_with(Interest::WRITABLE, || {
                nix::unistd::write(self.as_fd(), buf).map_err(io::Error::from)
            }) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}
