//! Forwarding both directions of a connection until both have ended, with half-close.
//!
//! The fast path is `splice(2)` socket -> pipe -> socket, driven by tokio readiness, with no
//! user-space buffer. A pipe is borrowed from a bounded pool only while bytes are in flight, so
//! idle connections hold no pipes (the per-user pipe budget is small). The copy path beside it
//! moves the same bytes through a user-space buffer, for streams that are not plain sockets.
//!
//! Each direction runs on its own until its source reaches EOF, then shuts down the write half of
//! its destination; the other direction keeps flowing. An error in either ends both.

use crate::backend::BackendStream;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
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
    /// Per direction, whatever costs least: splice when the source is a TCP socket (the kernel
    /// moves page references), read/write through a pooled buffer when the source is a Unix
    /// socket (its splice_read copies anyway and the pipe only adds work: measured ~30% more
    /// CPU per GiB than read/write, see README "Performance").
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
            BackendStream::Unix(s) => s.try_io(interest, f),
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
#[derive(Debug, Default)]
pub struct Counters {
    pub client_to_backend: AtomicU64,
    pub backend_to_client: AtomicU64,
    /// Milliseconds since `start` of the last byte moved in either direction.
    last_ms: AtomicU64,
    metrics: std::sync::OnceLock<(metrics::Counter, metrics::Counter)>,
    /// Set when the client (resp. backend) has sent EOF: that direction is finished.
    up_done: std::sync::atomic::AtomicBool,
    down_done: std::sync::atomic::AtomicBool,
}

impl Counters {
    /// Starts feeding `sniplex_bytes_total{route,direction}` for this connection.
    pub fn attach_metrics(&self, route: &str) {
        let c = |dir: &'static str| metrics::counter!(crate::metrics::BYTES_TOTAL, "route" => route.to_owned(), "direction" => dir);
        let _ = self
            .metrics
            .set((c("client_to_backend"), c("backend_to_client")));
    }

    pub fn add_up(&self, n: u64) {
        self.client_to_backend.fetch_add(n, Ordering::Relaxed);
        if let Some((up, _)) = self.metrics.get() {
            up.increment(n);
        }
    }

    fn add(&self, up: bool, n: u64) {
        if up {
            self.add_up(n);
        } else {
            self.backend_to_client.fetch_add(n, Ordering::Relaxed);
            if let Some((_, down)) = self.metrics.get() {
                down.increment(n);
            }
        }
    }

    fn touch(&self, start: Instant) {
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub fn up(&self) -> u64 {
        self.client_to_backend.load(Ordering::Relaxed)
    }

    pub fn down(&self) -> u64 {
        self.backend_to_client.load(Ordering::Relaxed)
    }
}

impl Dir<'_> {
    fn finished(&self) {
        let flag = if self.up {
            &self.counters.up_done
        } else {
            &self.counters.down_done
        };
        flag.store(true, Ordering::Relaxed);
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

struct Dir<'a> {
    /// Client to backend.
    up: bool,
    counters: &'a Counters,
    start: Instant,
    /// Side blamed for read errors; the other side is blamed for write errors.
    src: Side,
    dst: Side,
}

fn shutdown_write(fd: BorrowedFd<'_>) {
    // ENOTCONN when the peer is already gone is fine: there is nobody left to tell.
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
}

/// Moves bytes src -> dst with splice until src's EOF, then half-closes dst.
async fn splice_dir<S: SpliceSocket, D: SpliceSocket>(
    src: &S,
    dst: &D,
    pool: &PipePool,
    d: Dir<'_>,
) -> Result<(), (Side, io::Error)> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        src.ready_for(Interest::READABLE)
            .await
            .map_err(|e| (d.src, e))?;
        let pipe = match pool.get() {
            Ok(p) => p,
            // Out of file descriptors: no pipe to be had, but the connection must live on. This
            // chunk goes through a buffer instead; the next one tries for a pipe again.
            Err(e) if is_fd_exhaustion(&e) => {
                // Boxed: a rare path must not grow every connection.
                if Box::pin(copy_chunk(src, dst, pool, &d)).await? {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err((d.src, e)),
        };
        // The pipe is empty here, so EAGAIN from this splice means the socket is drained and
        // clearing the socket's read readiness is correct.
        loop {
            let n = match src.try_io_with(Interest::READABLE, || {
                nix::fcntl::splice(src.as_fd(), None, &pipe.w, None, pipe.size, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(0) => {
                    pool.put(pipe);
                    d.finished();
                    shutdown_write(dst.as_fd());
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pool.put(pipe);
                    break;
                }
                Err(e) => {
                    pool.put(pipe);
                    return Err((d.src, e));
                }
            };
            d.counters.add(d.up, n as u64);
            d.counters.touch(d.start);
            // The pipe holds n bytes here, so EAGAIN means the destination socket is full.
            let mut left = n;
            while left > 0 {
                dst.ready_for(Interest::WRITABLE)
                    .await
                    .map_err(|e| (d.dst, e))?;
                match dst.try_io_with(Interest::WRITABLE, || {
                    nix::fcntl::splice(&pipe.r, None, dst.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                }) {
                    Ok(0) => return Err((d.dst, io::ErrorKind::WriteZero.into())),
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // A pipe with bytes left in it is dropped here, never pooled.
                    Err(e) if d.peer_left(&e) => return Ok(()),
                    Err(e) => return Err((d.dst, e)),
                }
            }
            d.counters.touch(d.start);
        }
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
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

/// Moves one chunk src -> dst with read/write through a pooled buffer (the splice path's
/// fallback when no pipe can be created). Returns true at src's EOF, after half-closing dst.
async fn copy_chunk<S: SpliceSocket, D: SpliceSocket>(
    src: &S,
    dst: &D,
    pool: &PipePool,
    d: &Dir<'_>,
) -> Result<bool, (Side, io::Error)> {
    let mut buf = pool.get_buf();
    let r = copy_while_readable(src, dst, &mut buf, d, true).await;
    pool.put_buf(buf);
    r
}

/// Writes all of `buf` to a socket whose readiness tokio tracks. Returns true when the peer has
/// left (see [`Dir::peer_left`]): the direction is over, normally.
async fn write_all_sock<D: SpliceSocket>(
    dst: &D,
    buf: &[u8],
    d: &Dir<'_>,
) -> Result<bool, (Side, io::Error)> {
    let mut off = 0;
    while off < buf.len() {
        dst.ready_for(Interest::WRITABLE)
            .await
            .map_err(|e| (d.dst, e))?;
        match dst.try_io_with(Interest::WRITABLE, || {
            nix::unistd::write(dst.as_fd(), &buf[off..]).map_err(io::Error::from)
        }) {
            Ok(m) => off += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if d.peer_left(&e) => return Ok(true),
            Err(e) => return Err((d.dst, e)),
        }
    }
    Ok(false)
}

/// Reads from src and writes everything to dst until src would block (or, with `once`, after
/// one read). Returns true at src's EOF, after half-closing dst.
async fn copy_while_readable<S: SpliceSocket, D: SpliceSocket>(
    src: &S,
    dst: &D,
    buf: &mut [u8],
    d: &Dir<'_>,
    once: bool,
) -> Result<bool, (Side, io::Error)> {
    loop {
        let n = match read_draining(src, buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err((d.src, e)),
        };
        if n == 0 {
            d.finished();
            shutdown_write(dst.as_fd());
            return Ok(true);
        }
        d.counters.add(d.up, n as u64);
        d.counters.touch(d.start);
        if write_all_sock(dst, &buf[..n], d).await? {
            return Ok(true);
        }
        d.counters.touch(d.start);
        if once {
            return Ok(false);
        }
    }
}

/// Moves bytes src -> dst with read/write through a buffer borrowed from the pool only while
/// src has data, until src's EOF; then half-closes dst.
async fn copy_sock_dir<S: SpliceSocket, D: SpliceSocket>(
    src: &S,
    dst: &D,
    pool: &PipePool,
    d: Dir<'_>,
) -> Result<(), (Side, io::Error)> {
    loop {
        src.ready_for(Interest::READABLE)
            .await
            .map_err(|e| (d.src, e))?;
        let mut buf = pool.get_buf();
        let r = copy_while_readable(src, dst, &mut buf, &d, false).await;
        pool.put_buf(buf);
        if r? {
            return Ok(());
        }
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
        let n = src.read(&mut buf).await.map_err(|e| (d.src, e))?;
        if n == 0 {
            d.finished();
            // The peer may already be gone; its EOF is all we had to deliver.
            let _ = dst.shutdown().await;
            return Ok(());
        }
        d.counters.add(d.up, n as u64);
        d.counters.touch(d.start);
        match dst.write_all(&buf[..n]).await {
            Ok(()) => {}
            Err(e) if d.peer_left(&e) => return Ok(()),
            Err(e) => return Err((d.dst, e)),
        }
        d.counters.touch(d.start);
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
            .map_err(|e| (d.src, e))?;
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
                            Err(e) => Err((d.dst, e)),
                        };
                    }
                    Err(e) => return Err((d.src, e)),
                };
                if n == 0 {
                    d.finished();
                    let _ = dst.shutdown().await;
                    return Ok(true);
                }
                d.counters.add(d.up, n as u64);
                d.counters.touch(d.start);
                match dst.write_all(&buf[..n]).await {
                    Ok(()) => {}
                    Err(e) if d.peer_left(&e) => return Ok(true),
                    Err(e) => return Err((d.dst, e)),
                }
                d.counters.touch(d.start);
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
        let n = src.read(&mut buf).await.map_err(|e| (d.src, e))?;
        if n == 0 {
            d.finished();
            shutdown_write(dst.as_fd());
            return Ok(());
        }
        d.counters.add(d.up, n as u64);
        d.counters.touch(d.start);
        if write_all_sock(dst, &buf[..n], &d).await? {
            return Ok(());
        }
        d.counters.touch(d.start);
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
    let start = Instant::now();
    let (up, down) = dirs(counters, start);
    let (mut cr, mut cw) = tokio::io::split(client);
    let both = async {
        tokio::try_join!(
            stream_to_sock(&mut cr, backend, up),
            sock_to_stream(backend, &mut cw, pool, down)
        )
    };
    tokio::pin!(both);
    drive(both, counters, start, limits).await
}

/// Resolves when no byte has moved for `idle`.
async fn idle_watch(counters: &Counters, start: Instant, idle: Duration) {
    loop {
        let last = start + Duration::from_millis(counters.last_ms.load(Ordering::Relaxed));
        let deadline = last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Limits shared by both forwarding paths.
#[derive(Debug, Clone, Copy)]
pub struct Limits<'a> {
    pub idle: Duration,
    pub cancel: &'a CancellationToken,
}

fn dirs(counters: &Counters, start: Instant) -> (Dir<'_>, Dir<'_>) {
    counters.touch(start);
    let up = Dir {
        up: true,
        counters,
        start,
        src: Side::Client,
        dst: Side::Backend,
    };
    let down = Dir {
        up: false,
        counters,
        start,
        src: Side::Backend,
        dst: Side::Client,
    };
    (up, down)
}

/// Runs both directions against the idle timeout and the shutdown deadline. Takes the
/// directions pinned in the caller's frame: a future moved into another future is stored twice,
/// and this one is what every open connection holds for its whole life.
async fn drive(
    both: std::pin::Pin<
        &mut impl std::future::Future<Output = Result<((), ()), (Side, io::Error)>>,
    >,
    counters: &Counters,
    start: Instant,
    limits: Limits<'_>,
) -> End {
    tokio::select! {
        r = both => match r {
            Ok(_) => End::Done,
            Err((side, e)) => End::Error(side, e),
        },
        _ = idle_watch(counters, start, limits.idle) => End::Idle,
        _ = limits.cancel.cancelled() => End::Cancelled,
    }
}

/// Forwards between a client socket and a backend socket until both directions end, the idle
/// timeout fires or `cancel` is triggered: by splice, or through a buffer in `Copy` mode.
pub async fn forward(
    client: &mut TcpStream,
    backend: &mut BackendStream,
    mode: ForwardMode,
    pool: &PipePool,
    limits: Limits<'_>,
    counters: &Counters,
) -> End {
    if mode == ForwardMode::Copy {
        // Boxed so that its (larger) state does not size the splice path's future.
        return Box::pin(forward_copy(client, backend, limits, counters)).await;
    }
    let start = Instant::now();
    let (up, down) = dirs(counters, start);
    let (c, b) = (&*client, &*backend);
    let copy_down = mode == ForwardMode::Auto && matches!(b, BackendStream::Unix(_));
    let both = async {
        tokio::try_join!(splice_dir(c, b, pool, up), async {
            if copy_down {
                copy_sock_dir(b, c, pool, down).await
            } else {
                splice_dir(b, c, pool, down).await
            }
        })
    };
    tokio::pin!(both);
    drive(both, counters, start, limits).await
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
    let start = Instant::now();
    let (up, down) = dirs(counters, start);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut br, mut bw) = tokio::io::split(backend);
    let both = async {
        tokio::try_join!(
            copy_dir(&mut cr, &mut bw, up),
            copy_dir(&mut br, &mut cw, down)
        )
    };
    tokio::pin!(both);
    drive(both, counters, start, limits).await
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
        let start = Instant::now();
        let (_, down) = dirs(&counters, start);
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
        let start = Instant::now();
        let (up, down) = dirs(&counters, start);
        let f1 = splice_dir(&a, &b, &pool, up);
        let f2 = copy_sock_dir(&b, &a, &pool, down);
        let cancel = CancellationToken::new();
        let f3 = idle_watch(&counters, start, Duration::from_secs(1));
        let f4 = cancel.cancelled();
        let f5 = a.ready_for(Interest::READABLE);
        let std_c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        std_c.set_nonblocking(true).unwrap();
        let mut c = TcpStream::from_std(std_c).unwrap();
        let mut bs = BackendStream::Unix(b2);
        let limits = Limits {
            idle: Duration::from_secs(1),
            cancel: &cancel,
        };
        let f6 = forward(&mut c, &mut bs, ForwardMode::Auto, &pool, limits, &counters);
        eprintln!("forward {}", std::mem::size_of_val(&f6));
        assert!(
            std::mem::size_of_val(&f6) <= 1536,
            "forward future is {} bytes",
            std::mem::size_of_val(&f6)
        );
        assert!(
            std::mem::size_of_val(&f5) <= 32,
            "readiness future is {} bytes",
            std::mem::size_of_val(&f5)
        );
        eprintln!(
            "splice_dir {} copy_sock_dir {} idle_watch {} cancelled {} ready_for {}",
            std::mem::size_of_val(&f1),
            std::mem::size_of_val(&f2),
            std::mem::size_of_val(&f3),
            std::mem::size_of_val(&f4),
            std::mem::size_of_val(&f5)
        );
    }
}
