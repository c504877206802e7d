//! Forwarding both directions of a connection until both have ended, with half-close.
//!
//! The fast path is `splice(2)` socket -> pipe -> socket, driven by tokio readiness, with no
//! user-space buffer. A pipe is borrowed from a bounded pool only while bytes are in flight, so
//! idle connections hold no pipes (the per-user pipe budget is small). The copy path beside it
//! moves the same bytes through a user-space buffer, for streams that are not plain sockets.
//!
//! Each direction runs on its own until its source reaches EOF, then shuts down the write half of
//! its destination; the other direction keeps flowing. An error in either ends both.

use crate::backend::{BackendStream, UnixBackend};
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Pipe capacity requested with F_SETPIPE_SZ: large enough that one splice moves most of a
/// socket's receive queue, small enough that 256 busy pipes fit the default per-user budget
/// (fs.pipe-user-pages-soft = 64 MiB). If the kernel refuses, the default 64 KiB is used.
pub const PIPE_SIZE: usize = 256 * 1024;
/// Empty pipes kept for reuse; beyond this they are closed. Creating a pipe costs two syscalls
/// plus one for F_SETPIPE_SZ, so reuse matters for short connections, but idle pipes still
/// count against the per-user budget.
pub const PIPE_POOL_MAX: usize = 64;
/// Buffer per direction on the copy path.
pub const COPY_BUF: usize = 64 * 1024;
/// Most plaintext one TLS record carries (RFC 8446 section 5.1).
const TLS_RECORD_PLAINTEXT: usize = 16 * 1024;
/// Size of the pooled buffers the socket copy path borrows while bytes are in flight (a Unix
/// socket delivers at most its peer's send buffer, ~208 KiB by default, per read).
pub const POOLED_BUF: usize = 128 * 1024;
/// Idle buffers kept for reuse (8 MiB at most).
pub const BUF_POOL_MAX: usize = 64;

/// How bytes are moved once a backend is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardMode {
    /// Per direction, whatever costs least: from a TCP socket, read/write for small chunks and
    /// splice once bulk flows (the kernel moves page references); from a Unix socket,
    /// read/write through a pooled buffer (measured no cheaper by splice: README
    /// "Performance").
    #[default]
    Auto,
    /// splice(2) both ways, whatever the sockets.
    Splice,
    /// read/write both ways (tokio copy with a buffer per direction).
    Copy,
}

/// A pipe whose both ends are non-blocking.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let want = i32::try_from(PIPE_SIZE).unwrap_or(i32::MAX);
        let size = match nix::fcntl::fcntl(&w, FcntlArg::F_SETPIPE_SZ(want)) {
            Ok(n) => n,
            // EPERM past the per-user budget: keep whatever the kernel gave us.
            Err(_) => nix::fcntl::fcntl(&w, FcntlArg::F_GETPIPE_SZ)?,
        };
        Ok(Pipe {
            r,
            w,
            size: usize::try_from(size).unwrap_or(4096).max(4096),
        })
    }
}

/// Bounded pools of empty pipes and of copy buffers shared by all connections: a connection
/// holds one only while bytes are in flight, so idle connections hold neither.
#[derive(Debug, Default)]
pub struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    bufs: Mutex<Vec<Box<[u8]>>>,
}

impl PipePool {
    pub fn new() -> Self {
        Self::default()
    }

    fn get(&self) -> io::Result<Pipe> {
        let pooled = self.idle.lock().map(|mut v| v.pop()).unwrap_or(None);
        match pooled {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Returns a pipe that is known to be empty.
    fn put(&self, pipe: Pipe) {
        if let Ok(mut v) = self.idle.lock() {
            if v.len() < PIPE_POOL_MAX {
                v.push(pipe);
            }
        }
    }

    fn get_buf(&self) -> Box<[u8]> {
        let pooled = self.bufs.lock().map(|mut v| v.pop()).unwrap_or(None);
        pooled.unwrap_or_else(|| vec![0u8; POOLED_BUF].into_boxed_slice())
    }

    fn put_buf(&self, buf: Box<[u8]>) {
        if let Ok(mut v) = self.bufs.lock() {
            if v.len() < BUF_POOL_MAX {
                v.push(buf);
            }
        }
    }
}

/// A socket whose readiness tokio tracks, usable as a splice endpoint.
pub trait SpliceSocket: AsFd + Sync {
    /// Readiness by polling (`poll_read_ready` / `poll_write_ready`): the waiting future
    /// stores nothing but references, which keeps every open connection's task small.
    fn poll_ready_for(
        &self,
        cx: &mut std::task::Context<'_>,
        interest: Interest,
    ) -> std::task::Poll<io::Result<()>>;

    fn ready_for(
        &self,
        interest: Interest,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send {
        std::future::poll_fn(move |cx| self.poll_ready_for(cx, interest))
    }

    fn try_io_with<R>(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R>;
}

macro_rules! splice_socket {
    ($t:ty) => {
        impl SpliceSocket for $t {
            fn poll_ready_for(
                &self,
                cx: &mut std::task::Context<'_>,
                interest: Interest,
            ) -> std::task::Poll<io::Result<()>> {
                if interest.is_readable() {
                    self.poll_read_ready(cx)
                } else {
                    self.poll_write_ready(cx)
                }
            }
            fn try_io_with<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                self.try_io(interest, f)
            }
        }
    };
}
splice_socket!(TcpStream);
splice_socket!(UnixStream);

/// Readable as tokio sockets are; writable is assumed until a write finds the socket full
/// (see [`UnixBackend`] for why), and waited for through the write registration after that.
impl SpliceSocket for UnixBackend {
    fn poll_ready_for(
        &self,
        cx: &mut std::task::Context<'_>,
        interest: Interest,
    ) -> std::task::Poll<io::Result<()>> {
        if interest.is_readable() {
            self.reader().poll_read_ready(cx).map_ok(|_| ())
        } else {
            self.poll_write_ready(cx)
        }
    }

    fn try_io_with<R>(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        if interest.is_readable() {
            self.reader().try_io(Interest::READABLE, |_| f())
        } else {
            self.try_write_with(f)
        }
    }
}

impl AsFd for BackendStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            BackendStream::Tcp(s) => s.as_fd(),
            BackendStream::Unix(s) => s.as_fd(),
        }
    }
}

impl SpliceSocket for BackendStream {
    fn poll_ready_for(
        &self,
        cx: &mut std::task::Context<'_>,
        interest: Interest,
    ) -> std::task::Poll<io::Result<()>> {
        match self {
            BackendStream::Tcp(s) => s.poll_ready_for(cx, interest),
            BackendStream::Unix(s) => s.poll_ready_for(cx, interest),
        }
    }
    fn try_io_with<R>(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        match self {
            BackendStream::Tcp(s) => s.try_io(interest, f),
            BackendStream::Unix(s) => s.try_io_with(interest, f),
        }
    }
}

/// Which peer a forwarding error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
        }
    }
}

/// How forwarding ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached EOF.
    Done,
    /// No byte moved either way for the idle timeout.
    Idle,
    /// Shutdown deadline passed while the connection was still open.
    Cancelled,
    /// A read or write failed (reset, broken pipe); both sides are closed.
    Error(Side, io::Error),
}

/// Bytes moved, counted as they move (valid however forwarding ended). With metrics attached,
/// each chunk also lands in `sniplex_bytes_total` (an atomic add, no syscall).
#[derive(Debug)]
pub struct Counters {
    pub client_to_backend: AtomicU64,
    pub backend_to_client: AtomicU64,
    /// When the connection was accepted; `last_ms` counts from here.
    start: Instant,
    /// Milliseconds since `start` of the last byte moved in either direction.
    last_ms: AtomicU64,
    metrics: std::sync::OnceLock<std::sync::Arc<crate::metrics::RouteMetrics>>,
    /// Set when the client (resp. backend) has sent EOF: that direction is finished.
    up_done: std::sync::atomic::AtomicBool,
    down_done: std::sync::atomic::AtomicBool,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            client_to_backend: AtomicU64::new(0),
            backend_to_client: AtomicU64::new(0),
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            metrics: std::sync::OnceLock::new(),
            up_done: Default::default(),
            down_done: Default::default(),
        }
    }
}

impl Counters {
    /// Starts feeding the route's `sniplex_bytes_total{route,direction}`.
    pub fn attach_metrics(&self, route: &std::sync::Arc<crate::metrics::RouteMetrics>) {
        let _ = self.metrics.set(route.clone());
    }

    pub fn add_up(&self, n: u64) {
        self.client_to_backend.fetch_add(n, Ordering::Relaxed);
        if let Some(m) = self.metrics.get() {
            m.bytes_up.increment(n);
        }
    }

    fn add(&self, up: bool, n: u64) {
        if up {
            self.add_up(n);
        } else {
            self.backend_to_client.fetch_add(n, Ordering::Relaxed);
            if let Some(m) = self.metrics.get() {
                m.bytes_down.increment(n);
            }
        }
    }

    /// Records that a byte moved now.
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the connection was accepted.
    pub fn age(&self) -> Duration {
        self.start.elapsed()
    }

    /// When the last byte moved (or forwarding started).
    fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    pub fn up(&self) -> u64 {
        self.client_to_backend.load(Ordering::Relaxed)
    }

    pub fn down(&self) -> u64 {
        self.backend_to_client.load(Ordering::Relaxed)
    }
}

impl Dir<'_> {
    /// Marks this direction as ended; returns whether the other one had ended already.
    fn finished(&self) -> bool {
        let (mine, other) = if self.up {
            (&self.counters.up_done, &self.counters.down_done)
        } else {
            (&self.counters.down_done, &self.counters.up_done)
        };
        mine.store(true, Ordering::Relaxed);
        other.load(Ordering::Relaxed)
    }

    /// A write to a peer that already sent its EOF failed because it has closed completely:
    /// a normal end (the peer had nothing more to say and is not listening), not an error.
    fn peer_left(&self, e: &io::Error) -> bool {
        let reverse = if self.up {
            &self.counters.down_done
        } else {
            &self.counters.up_done
        };
        reverse.load(Ordering::Relaxed)
            && matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            )
    }
}

/// One direction of a connection, as seen by its forwarding loop.
#[derive(Clone, Copy)]
struct Dir<'a> {
    /// Client to backend.
    up: bool,
    counters: &'a Counters,
}

impl Dir<'_> {
    /// Side blamed for read errors.
    fn src(&self) -> Side {
        if self.up {
            Side::Client
        } else {
            Side::Backend
        }
    }

    /// Side blamed for write errors.
    fn dst(&self) -> Side {
        if self.up {
            Side::Backend
        } else {
            Side::Client
        }
    }
}

fn shutdown_write(fd: BorrowedFd<'_>) {
    // ENOTCONN when the peer is already gone is fine: there is nobody left to tell.
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
}

/// How one direction of a socket pair moves its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// socket -> pipe -> socket.
    Splice,
    /// read/write through a pooled buffer.
    Copy,
    /// Copy until one read fills the whole buffer, then splice for good. A TLS handshake's
    /// flights and most requests are a few KiB: read + write moves them in two syscalls, where
    /// splice needs three (in, out, and a last one to see EAGAIN: a short splice does not mean
    /// the source is drained, a short read does). A full buffer means bulk is flowing, and from
    /// a TCP source splice moves page references instead of copying.
    CopyThenSplice,
}

/// What one direction holds while bytes are in flight: a pipe, or a buffer with the number of
/// bytes in it. Borrowed from the pool when the source turns readable, given back when it is
/// drained, so an idle direction holds neither.
enum Chunk {
    Pipe(Pipe),
    /// `once`: a splice direction that could not get a pipe (out of file descriptors) moves one
    /// read through the buffer, then tries for a pipe again.
    Buf {
        buf: Box<[u8]>,
        once: bool,
    },
}

impl Chunk {
    /// Moves what src has into the chunk (it is empty). `WouldBlock` clears src's readiness:
    /// for a pipe that is right because it is empty; a buffer read that comes back short clears
    /// it at once (see [`read_draining`]).
    fn fill<S: SpliceSocket>(&mut self, src: &S) -> io::Result<usize> {
        match self {
            Chunk::Pipe(pipe) => src.try_io_with(Interest::READABLE, || {
                nix::fcntl::splice(src.as_fd(), None, &pipe.w, None, pipe.size, SPLICE_FLAGS)
                    .map_err(io::Error::from)
            }),
            Chunk::Buf { buf, .. } => read_draining(src, buf),
        }
    }

    /// Writes the last `left` of the `n` bytes filled to dst. `WouldBlock` means dst is full.
    fn drain<D: SpliceSocket>(&self, dst: &D, n: usize, left: usize) -> io::Result<usize> {
        dst.try_io_with(Interest::WRITABLE, || match self {
            Chunk::Pipe(pipe) => {
                nix::fcntl::splice(&pipe.r, None, dst.as_fd(), None, left, SPLICE_FLAGS)
                    .map_err(io::Error::from)
            }
            Chunk::Buf { buf, .. } => {
                nix::unistd::write(dst.as_fd(), &buf[n - left..n]).map_err(io::Error::from)
            }
        })
    }

    /// Back to the pool. Only an empty pipe may be reused: one with bytes left in it (a failed
    /// write) is closed instead.
    fn give_back(self, pool: &PipePool, empty: bool) {
        match self {
            Chunk::Pipe(pipe) if empty => pool.put(pipe),
            Chunk::Pipe(_) => {}
            Chunk::Buf { buf, .. } => pool.put_buf(buf),
        }
    }
}

const SPLICE_FLAGS: SpliceFFlags =
    SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// Moves bytes src -> dst until src's EOF, then half-closes dst. One flat loop (no nested
/// futures): its state is part of what every open connection holds.
async fn pump<S: SpliceSocket, D: SpliceSocket>(
    src: &S,
    dst: &D,
    pool: &PipePool,
    d: Dir<'_>,
    mut via: Via,
) -> Result<(), (Side, io::Error)> {
    loop {
        src.ready_for(Interest::READABLE)
            .await
            .map_err(|e| (d.src(), e))?;
        let mut chunk = match via {
            Via::Copy | Via::CopyThenSplice => Chunk::Buf {
                buf: pool.get_buf(),
                once: false,
            },
            Via::Splice => match pool.get() {
                Ok(p) => Chunk::Pipe(p),
                // Out of file descriptors: no pipe to be had, but the connection must live
                // on. This chunk goes through a buffer instead.
                Err(e) if is_fd_exhaustion(&e) => Chunk::Buf {
                    buf: pool.get_buf(),
                    once: true,
                },
                Err(e) => return Err((d.src(), e)),
            },
        };
        // Ok(true): this direction is over. Ok(false): src is drained for now.
        let (r, empty) = 'chunk: loop {
            let n = match chunk.fill(src) {
                Ok(0) => {
                    // When the other direction has ended too, both sockets are closed as soon
                    // as this returns, and a close sends the same FIN (nothing is left unread:
                    // both sources were read to their EOF).
                    if !d.finished() {
                        shutdown_write(dst.as_fd());
                    }
                    break (Ok(true), true);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break (Ok(false), true),
                Err(e) => break (Err((d.src(), e)), true),
            };
            d.counters.add(d.up, n as u64);
            d.counters.touch();
            let mut left = n;
            while left > 0 {
                if let Err(e) = dst.ready_for(Interest::WRITABLE).await {
                    break 'chunk (Err((d.dst(), e)), false);
                }
                match chunk.drain(dst, n, left) {
                    Ok(0) => break 'chunk (Err((d.dst(), io::ErrorKind::WriteZero.into())), false),
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if d.peer_left(&e) => break 'chunk (Ok(true), false),
                    Err(e) => break 'chunk (Err((d.dst(), e)), false),
                }
            }
            d.counters.touch();
            if via == Via::CopyThenSplice
                && matches!(&chunk, Chunk::Buf { buf, .. } if n == buf.len())
            {
                // Bulk: the next chunk is a pipe (src is still readable, so at once).
                via = Via::Splice;
                break (Ok(false), true);
            }
            if matches!(chunk, Chunk::Buf { once: true, .. }) {
                break (Ok(false), true);
            }
        };
        chunk.give_back(pool, empty);
        if r? {
            return Ok(());
        }
    }
}

pub(crate) fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == nix::errno::Errno::EMFILE as i32 || c == nix::errno::Errno::ENFILE as i32)
}

/// `read(2)` on a stream socket whose readiness tokio tracks. A short read (0 < n < buf.len())
/// means the receive queue was emptied, so readiness is cleared right away (reported to tokio as
/// WouldBlock, with the bytes kept) instead of with a second read that would return EAGAIN.
/// tokio clears readiness only if no new event arrived meanwhile, so nothing is missed. (Not
/// valid for splice: a splice can stop short because the pipe ran out of slots.)
pub fn read_draining<S: SpliceSocket>(s: &S, buf: &mut [u8]) -> io::Result<usize> {
    let want = buf.len();
    let mut short = None;
    let r = s.try_io_with(Interest::READABLE, || {
        let n = nix::unistd::read(s.as_fd(), &mut *buf).map_err(io::Error::from)?;
        if n > 0 && n < want {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, short) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (r, _) => r,
    }
}

/// Writes all of `buf` to a socket whose readiness tokio tracks. The first write is tried before
/// asking for readiness: tokio knows none for a socket it has not yet seen in an event (a
/// backend just connected), and waiting for one costs an event-loop round trip per connection.
/// Only an EAGAIN (or a short write) makes it wait.
pub async fn write_all_to<D: SpliceSocket>(dst: &D, buf: &[u8]) -> io::Result<()> {
    let write = |off: usize| nix::unistd::write(dst.as_fd(), &buf[off..]).map_err(io::Error::from);
    let mut off = 0;
    let mut wait = false;
    while off < buf.len() {
        let r = if wait {
            dst.ready_for(Interest::WRITABLE).await?;
            dst.try_io_with(Interest::WRITABLE, || write(off))
        } else {
            write(off)
        };
        match r {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => {
                off += m;
                // Short: the socket's buffer is full for now.
                wait = off < buf.len();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait = true,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`write_all_to`] for a forwarding direction. Returns true when the peer has left (see
/// [`Dir::peer_left`]): the direction is over, normally.
async fn write_all_sock<D: SpliceSocket>(
    dst: &D,
    buf: &[u8],
    d: &Dir<'_>,
) -> Result<bool, (Side, io::Error)> {
    match write_all_to(dst, buf).await {
        Ok(()) => Ok(false),
        Err(e) if d.peer_left(&e) => Ok(true),
        Err(e) => Err((d.dst(), e)),
    }
}

/// Moves bytes src -> dst through a user-space buffer until src's EOF, then half-closes dst.
async fn copy_dir<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    src: &mut R,
    dst: &mut W,
    d: Dir<'_>,
) -> Result<(), (Side, io::Error)> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = src.read(&mut buf).await.map_err(|e| (d.src(), e))?;
        if n == 0 {
            d.finished();
            // The peer may already be gone; its EOF is all we had to deliver.
            let _ = dst.shutdown().await;
            return Ok(());
        }
        d.counters.add(d.up, n as u64);
        d.counters.touch();
        match dst.write_all(&buf[..n]).await {
            Ok(()) => {}
            Err(e) if d.peer_left(&e) => return Ok(()),
            Err(e) => return Err((d.dst(), e)),
        }
        d.counters.touch();
    }
}

/// Moves bytes from a plain socket into a stream (a TLS session) through a buffer borrowed from
/// the pool only while the socket has data; at the socket's EOF, shuts the stream down.
async fn sock_to_stream<S: SpliceSocket, W: AsyncWrite + Unpin>(
    src: &S,
    dst: &mut W,
    pool: &PipePool,
    d: Dir<'_>,
) -> Result<(), (Side, io::Error)> {
    loop {
        src.ready_for(Interest::READABLE)
            .await
            .map_err(|e| (d.src(), e))?;
        let mut buf = pool.get_buf();
        let r = async {
            loop {
                let n = match read_draining(src, &mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Nothing more to read for now: push out what the stream may still
                        // hold before waiting. A TLS session keeps records it could not write
                        // to a full socket; without a flush, a backend that sends its last
                        // bytes and keeps the connection open (keep-alive) leaves them there.
                        return match dst.flush().await {
                            Ok(()) => Ok(false),
                            Err(e) if d.peer_left(&e) => Ok(true),
                            Err(e) => Err((d.dst(), e)),
                        };
                    }
                    Err(e) => return Err((d.src(), e)),
                };
                if n == 0 {
                    d.finished();
                    let _ = dst.shutdown().await;
                    return Ok(true);
                }
                d.counters.add(d.up, n as u64);
                d.counters.touch();
                match dst.write_all(&buf[..n]).await {
                    Ok(()) => {}
                    Err(e) if d.peer_left(&e) => return Ok(true),
                    Err(e) => return Err((d.dst(), e)),
                }
                d.counters.touch();
            }
        }
        .await;
        pool.put_buf(buf);
        if r? {
            return Ok(());
        }
    }
}

/// Moves bytes from a stream (a TLS session) into a plain socket until the stream's EOF, then
/// half-closes the socket. The buffer is one TLS record's worth of plaintext (16 KiB): the
/// stream gives no readiness to wait on before borrowing a buffer, so this one stays small.
async fn stream_to_sock<R: AsyncRead + Unpin, D: SpliceSocket>(
    src: &mut R,
    dst: &D,
    d: Dir<'_>,
) -> Result<(), (Side, io::Error)> {
    let mut buf = vec![0u8; TLS_RECORD_PLAINTEXT];
    loop {
        let n = src.read(&mut buf).await.map_err(|e| (d.src(), e))?;
        if n == 0 {
            d.finished();
            shutdown_write(dst.as_fd());
            return Ok(());
        }
        d.counters.add(d.up, n as u64);
        d.counters.touch();
        if write_all_sock(dst, &buf[..n], &d).await? {
            return Ok(());
        }
        d.counters.touch();
    }
}

/// Forwarding for a terminated connection: plaintext between the client's TLS session and the
/// backend socket. An idle connection holds one 16 KiB buffer (the TLS side) and no pooled one.
pub async fn forward_terminated<C>(
    client: &mut C,
    backend: &BackendStream,
    pool: &PipePool,
    limits: Limits<'_>,
    counters: &Counters,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (up, down) = dirs(counters);
    let (mut cr, mut cw) = tokio::io::split(client);
    let up_f = stream_to_sock(&mut cr, backend, up);
    let down_f = sock_to_stream(backend, &mut cw, pool, down);
    Drive::new(up_f, down_f, counters, limits).await
}

/// Limits shared by both forwarding paths.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    pub idle: Duration,
    pub cancel: &'a CancellationToken,
}

/// The two directions of a connection whose forwarding starts now.
fn dirs(counters: &Counters) -> (Dir<'_>, Dir<'_>) {
    counters.touch();
    (
        Dir { up: true, counters },
        Dir {
            up: false,
            counters,
        },
    )
}

pin_project_lite::pin_project! {
    /// Both directions of a connection, run until both have ended or one fails, no byte has
    /// moved for the idle timeout, or the shutdown deadline passes. Written by hand rather than
    /// as a join inside a select: its state is what every open connection holds for its whole
    /// life, and this is that state with nothing added (two directions, one timer, one wait for
    /// cancellation).
    pub struct Drive<'a, U, D> {
        #[pin]
        up: U,
        #[pin]
        down: D,
        #[pin]
        idle: tokio::time::Sleep,
        #[pin]
        cancelled: tokio_util::sync::WaitForCancellationFuture<'a>,
        counters: &'a Counters,
        idle_after: Duration,
        up_open: bool,
        down_open: bool,
    }
}

impl<'a, U, D> Drive<'a, U, D> {
    fn new(up: U, down: D, counters: &'a Counters, limits: Limits<'a>) -> Self {
        Drive {
            up,
            down,
            idle: tokio::time::sleep(limits.idle),
            cancelled: limits.cancel.cancelled(),
            counters,
            idle_after: limits.idle,
            up_open: true,
            down_open: true,
        }
    }
}

impl<U, D> std::future::Future for Drive<'_, U, D>
where
    U: std::future::Future<Output = DirResult>,
    D: std::future::Future<Output = DirResult>,
{
    type Output = End;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<End> {
        let mut this = self.project();
        // A finished direction is never polled again.
        if *this.up_open {
            if let Poll::Ready(r) = this.up.poll(cx) {
                if let Err((side, e)) = r {
                    return Poll::Ready(End::Error(side, e));
                }
                *this.up_open = false;
            }
        }
        if *this.down_open {
            if let Poll::Ready(r) = this.down.poll(cx) {
                if let Err((side, e)) = r {
                    return Poll::Ready(End::Error(side, e));
                }
                *this.down_open = false;
            }
        }
        if !*this.up_open && !*this.down_open {
            return Poll::Ready(End::Done);
        }
        if this.cancelled.poll(cx).is_ready() {
            return Poll::Ready(End::Cancelled);
        }
        // One timer, re-armed to the last byte's time + idle whenever it fires early.
        while this.idle.as_mut().poll(cx).is_ready() {
            let deadline = this.counters.last_activity() + *this.idle_after;
            if Instant::now() >= deadline {
                return Poll::Ready(End::Idle);
            }
            this.idle.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

type DirResult = Result<(), (Side, io::Error)>;

pin_project_lite::pin_project! {
    /// What [`forward`] returns: the splice path inline (it is what open connections hold), the
    /// copy path boxed.
    #[project = ForwardProj]
    pub enum Forward<'a, U, D> {
        Splice {
            #[pin]
            drive: Drive<'a, U, D>,
        },
        Copy {
            boxed: std::pin::Pin<Box<dyn std::future::Future<Output = End> + Send + 'a>>,
        },
    }
}

impl<U, D> std::future::Future for Forward<'_, U, D>
where
    U: std::future::Future<Output = DirResult>,
    D: std::future::Future<Output = DirResult>,
{
    type Output = End;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<End> {
        match self.project() {
            ForwardProj::Splice { drive } => drive.poll(cx),
            ForwardProj::Copy { boxed } => boxed.as_mut().poll(cx),
        }
    }
}

/// Forwards between a client socket and a backend socket until both directions end, the idle
/// timeout fires or `cancel` is triggered: by splice, or through a buffer in `Copy` mode.
pub fn forward<'a>(
    client: &'a mut TcpStream,
    backend: &'a mut BackendStream,
    mode: ForwardMode,
    pool: &'a PipePool,
    limits: Limits<'a>,
    counters: &'a Counters,
) -> impl std::future::Future<Output = End> + Send + 'a {
    if mode == ForwardMode::Copy {
        // Boxed so that its (larger) state does not size the splice path's future.
        return Forward::Copy {
            boxed: Box::pin(forward_copy(client, backend, limits, counters)),
        };
    }
    let (up, down) = dirs(counters);
    let (c, b) = (&*client, &*backend);
    // Auto: see [`ForwardMode::Auto`]; the client is always a TCP socket.
    let (up_via, down_via) = match (mode, b) {
        (ForwardMode::Auto, BackendStream::Unix(_)) => (Via::CopyThenSplice, Via::Copy),
        (ForwardMode::Auto, BackendStream::Tcp(_)) => (Via::CopyThenSplice, Via::CopyThenSplice),
        _ => (Via::Splice, Via::Splice),
    };
    Forward::Splice {
        drive: Drive::new(
            pump(c, b, pool, up, up_via),
            pump(b, c, pool, down, down_via),
            counters,
            limits,
        ),
    }
}

/// The copy path, for any pair of streams (a terminated TLS stream cannot be spliced).
pub async fn forward_copy<C, B>(
    client: &mut C,
    backend: &mut B,
    limits: Limits<'_>,
    counters: &Counters,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (up, down) = dirs(counters);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = tokio::io::split(backend);
    let up_f = copy_dir(&mut cr, &mut bw, up);
    let down_f = copy_dir(&mut br, &mut cw, down);
    Drive::new(up_f, down_f, counters, limits).await
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// A stream that holds written bytes until it is flushed (as a TLS session does when its
    /// socket is full) must still deliver everything when the source goes quiet without EOF.
    #[tokio::test]
    async fn buffered_stream_is_flushed_when_the_source_goes_quiet() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (src, mut feeder) = UnixStream::pair().unwrap();
        let (out, mut reader) = UnixStream::pair().unwrap();
        let pool = PipePool::new();
        let counters = Counters::default();
        let (_, down) = dirs(&counters);
        let mut dst = tokio::io::BufWriter::with_capacity(64 * 1024, out);
        let task = async { sock_to_stream(&src, &mut dst, &pool, down).await };
        let check = async {
            feeder.write_all(&[7u8; 1000]).await.unwrap();
            let mut got = [0u8; 1000];
            tokio::time::timeout(Duration::from_secs(10), reader.read_exact(&mut got))
                .await
                .expect("bytes stayed in the stream's buffer")
                .unwrap();
            assert_eq!(got, [7u8; 1000]);
        };
        tokio::select! {
            r = task => panic!("forwarding ended early: {r:?}"),
            _ = check => {}
        }
    }

    /// Pipes returned to the pool: how a test sees whether a direction spliced.
    fn pooled_pipes(pool: &PipePool) -> usize {
        pool.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Runs one CopyThenSplice direction over Unix socket pairs: `prefill` bytes are queued
    /// before it starts, `rest` follow, then EOF. Returns the bytes that came out and the
    /// pipes the pool holds afterwards.
    async fn copy_then_splice(prefill: usize, rest: usize) -> (Vec<u8>, usize) {
        use std::io::Write;
        use tokio::io::AsyncReadExt;
        let (feeder, src) = std::os::unix::net::UnixStream::pair().unwrap();
        let (dst, out) = UnixStream::pair().unwrap();
        // Room for the prefill in the socket before the direction reads anything.
        socket2::SockRef::from(&feeder)
            .set_send_buffer_size(1 << 20)
            .unwrap();
        let data: Vec<u8> = (0..prefill + rest).map(|i| (i % 251) as u8).collect();
        let mut feeder = feeder;
        feeder.write_all(&data[..prefill]).unwrap();
        src.set_nonblocking(true).unwrap();
        let src = UnixStream::from_std(src).unwrap();
        let pool = PipePool::new();
        let counters = Counters::default();
        let (up, _) = dirs(&counters);
        let tail = data[prefill..].to_vec();
        let feed = std::thread::spawn(move || {
            feeder.write_all(&tail).unwrap();
        });
        let mut out = out;
        let mut got = Vec::new();
        let (r, _) = tokio::join!(
            pump(&src, &dst, &pool, up, Via::CopyThenSplice),
            out.read_to_end(&mut got)
        );
        r.unwrap();
        feed.join().unwrap();
        assert_eq!(got, data, "bytes changed on the way");
        (got, pooled_pipes(&pool))
    }

    /// Small chunks (a handshake, a request) are read and written: no pipe is ever taken.
    #[tokio::test]
    async fn small_chunks_are_copied_without_a_pipe() {
        let (got, pipes) = copy_then_splice(1000, 0).await;
        assert_eq!(got.len(), 1000);
        assert_eq!(pipes, 0, "a pipe was used for 1000 bytes");
    }

    /// A read that fills the whole buffer means bulk: the rest goes through a pipe.
    #[tokio::test]
    async fn bulk_switches_to_splice() {
        let (got, pipes) = copy_then_splice(POOLED_BUF + 4096, 4 << 20).await;
        assert_eq!(got.len(), POOLED_BUF + 4096 + (4 << 20));
        assert_eq!(pipes, 1, "bulk never switched to splice");
    }

    /// The epoll event masks `fd` is registered with, from /proc/self/fdinfo of every epoll
    /// descriptor of this process.
    fn epoll_masks(fd: i32) -> Vec<u32> {
        let mut masks = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            for line in info.lines().filter(|l| l.starts_with("tfd:")) {
                let mut it = line.split_whitespace();
                let tfd = it.nth(1).and_then(|v| v.parse::<i32>().ok());
                let events = it.nth(1).and_then(|v| u32::from_str_radix(v, 16).ok());
                if let (Some(t), Some(ev)) = (tfd, events) {
                    if t == fd {
                        masks.push(ev);
                    }
                }
            }
        }
        masks
    }

    const EPOLLOUT: u32 = 0x4;

    /// A Unix backend is watched for readability only (its peer reading would otherwise wake
    /// the event loop each time); the first write that finds it full adds a write
    /// registration, and the bytes still all arrive.
    #[tokio::test]
    async fn unix_backend_is_watched_for_writability_only_once_full() {
        use std::future::Future;
        use std::io::Read;
        let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let fd = ours.as_raw_fd();
        let backend = UnixBackend::new(ours).unwrap();
        // (Other tests run in parallel, each with its own epoll: count every entry.)
        let masks = epoll_masks(fd);
        assert!(!masks.is_empty(), "fd {fd} is not registered");
        assert!(
            masks.iter().all(|m| m & EPOLLOUT == 0),
            "registered for EPOLLOUT: {masks:x?}"
        );
        assert!(backend.write_registration().is_none());

        // More than the socket holds: the first poll writes what fits, then must wait.
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 253) as u8).collect();
        let mut f = std::pin::pin!(write_all_to(&backend, &data));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            f.as_mut().poll(&mut cx).is_pending(),
            "8 MiB fit in the socket"
        );
        let w = backend
            .write_registration()
            .expect("no write registration after a full write");
        let wmasks = epoll_masks(w);
        assert!(
            wmasks.iter().any(|m| m & EPOLLOUT != 0),
            "write registration lacks EPOLLOUT: {wmasks:x?}"
        );

        let len = data.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; len];
            peer.read_exact(&mut got).unwrap();
            got
        });
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("write never completed")
            .unwrap();
        assert!(reader.join().unwrap() == data, "bytes changed on the way");
    }

    /// The hello replay to a backend just connected is written at once: tokio has seen no
    /// event for the socket yet, and waiting for one would cost an event-loop round trip.
    #[tokio::test]
    async fn first_write_does_not_wait_for_readiness() {
        use tokio::io::AsyncReadExt;
        // As a backend is connected: a std socket handed to tokio, which then knows no
        // readiness for it (tokio's own pair() and accept() assume some).
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let (a, mut b) = (
            UnixStream::from_std(a).unwrap(),
            UnixStream::from_std(b).unwrap(),
        );
        let msg = [5u8; 1500];
        use std::future::Future;
        let mut f = std::pin::pin!(write_all_to(&a, &msg));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(
            matches!(f.as_mut().poll(&mut cx), Poll::Ready(Ok(()))),
            "the first write waited"
        );
        let mut got = [0u8; 1500];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
    }

    /// The forwarding future is what every open connection holds for its whole life (RSS per
    /// idle connection): keep it from growing back (nested readiness futures, futures moved
    /// into other futures and stored twice, rare paths inlined).
    #[tokio::test]
    async fn forwarding_future_stays_small() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_a2, b2) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pool = PipePool::new();
        let counters = Counters::default();
        let (up, down) = dirs(&counters);
        let f1 = pump(&a, &b, &pool, up, Via::Splice);
        let f2 = pump(&b, &a, &pool, down, Via::Copy);
        let cancel = CancellationToken::new();
        let f5 = a.ready_for(Interest::READABLE);
        let std_c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        std_c.set_nonblocking(true).unwrap();
        let mut c = TcpStream::from_std(std_c).unwrap();
        let mut bs = BackendStream::Unix(UnixBackend::new(b2.into_std().unwrap()).unwrap());
        let limits = Limits {
            idle: Duration::from_secs(1),
            cancel: &cancel,
        };
        let f6 = forward(&mut c, &mut bs, ForwardMode::Auto, &pool, limits, &counters);
        eprintln!("forward {}", std::mem::size_of_val(&f6));
        assert!(
            std::mem::size_of_val(&f6) <= 576,
            "forward future is {} bytes",
            std::mem::size_of_val(&f6)
        );
        assert!(
            std::mem::size_of_val(&f5) <= 32,
            "readiness future is {} bytes",
            std::mem::size_of_val(&f5)
        );
        eprintln!(
            "pump {} {} ready_for {}",
            std::mem::size_of_val(&f1),
            std::mem::size_of_val(&f2),
            std::mem::size_of_val(&f5)
        );
    }
}
