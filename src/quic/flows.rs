//! The QUIC flow engine: one task per UDP listener reads every datagram; a datagram of a known
//! flow is sent on that flow's connected upstream socket at once (never awaited, so one slow
//! flow cannot stall the others); a new client address must start with an Initial, whose
//! ClientHello is reassembled (`initial`) before a route is chosen. One task per flow carries
//! the backend's datagrams back and forgets the flow after `[quic] idle` of silence.
//!
//! Flows are found by client address and, when the address changed (NAT rebinding), by the
//! Destination Connection ID of the client's packet: the server's connection IDs are learned
//! from the backend's long-header replies.

use super::initial::{self, HelloAssembler, InitialError};
use crate::config::{BackendAddr, Config, QuicConfig, Route};
use crate::conn::Shared;
use crate::hello::ClientHello;
use crate::limits::ip_key;
use crate::lock;
use crate::metrics as m;
use quinn_udp::{EcnCodepoint, RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams held for one pending flow before its hello is whole (a post-quantum hello takes 2;
/// 0-RTT packets may follow it).
const MAX_PENDING_DATAGRAMS: usize = 16;
/// Bytes held for one pending flow: with `max_pending` = 1024, at most 24 MiB of datagrams (and
/// as much again of reassembled CRYPTO data) for all spoofed hellos together.
const MAX_PENDING_BYTES: usize = 24 * 1024;
/// How often pending hellos are checked against their deadline.
const SWEEP: Duration = Duration::from_millis(250);
/// CONNECTION_CLOSE answers per second at most (each is smaller than the Initial it answers).
const CLOSES_PER_SEC: u32 = 200;

thread_local! {
    /// One batch of receive buffers per worker thread (recvmmsg fills up to BATCH_SIZE, each
    /// possibly a GRO train of datagrams): no flow holds a buffer while idle.
    static BUFS: RefCell<Vec<Box<[u8]>>> = RefCell::new(
        (0..BATCH_SIZE).map(|_| vec![0u8; MAX_DATAGRAM].into_boxed_slice()).collect(),
    );
}

thread_local! {
    static TRAIN: RefCell<Train> = RefCell::new(Train::default());
}

/// A UDP socket with quinn-udp's state: recvmmsg and GRO in, GSO out, ECN marks kept both
/// ways (read from the arriving datagram, set on the forwarded one).
#[derive(Debug)]
struct Udp {
    sock: UdpSocket,
    state: UdpSocketState,
}

impl Udp {
    fn new(std: std::net::UdpSocket) -> io::Result<Udp> {
        let state = UdpSocketState::new((&std).into())?;
        Ok(Udp {
            sock: UdpSocket::from_std(std)?,
            state,
        })
    }

    /// Receives what is queued (one recvmmsg) and hands each buffer to `f` as (bytes, source,
    /// segment size, ECN). `Ok(false)`: nothing was queued.
    fn recv_batch(
        &self,
        mut f: impl FnMut(&[u8], SocketAddr, usize, Option<EcnCodepoint>),
    ) -> io::Result<bool> {
        BUFS.with(|cell| {
            let mut bufs = cell.borrow_mut();
            let mut meta = [RecvMeta::default(); BATCH_SIZE];
            let n = {
                // On the stack: no allocation per recvmmsg (BUFS holds BATCH_SIZE buffers).
                let mut it = bufs.iter_mut();
                let mut iovs: [IoSliceMut<'_>; BATCH_SIZE] = std::array::from_fn(|_| {
                    IoSliceMut::new(it.next().map(|b| &mut b[..]).unwrap_or_default())
                });
                match self.sock.try_io(Interest::READABLE, || {
                    self.state.recv((&self.sock).into(), &mut iovs, &mut meta)
                }) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(e),
                }
            };
            for (m, buf) in meta[..n].iter().zip(bufs.iter()) {
                let len = m.len.min(buf.len());
                f(&buf[..len], m.addr, m.stride.clamp(1, len.max(1)), m.ecn);
            }
            Ok(true)
        })
    }

    /// Sends `data` (datagrams of `stride` bytes, the last one possibly shorter) to `to`: one
    /// GSO sendmsg when the kernel can, else one per datagram. A full socket buffer drops, as
    /// the network would (QUIC recovers). Returns the datagrams sent.
    fn send(&self, to: SocketAddr, data: &[u8], stride: usize, ecn: Option<EcnCodepoint>) -> u64 {
        let segments = data.len().div_ceil(stride);
        let transmit = |contents: &[u8], segment_size| {
            let t = Transmit {
                destination: to,
                ecn,
                contents,
                segment_size,
                src_ip: None,
            };
            self.sock
                .try_io(Interest::WRITABLE, || {
                    self.state.try_send((&self.sock).into(), &t)
                })
                .is_ok()
        };
        if segments > 1 && self.state.max_gso_segments() >= segments && transmit(data, Some(stride))
        {
            return segments as u64;
        }
        data.chunks(stride).filter(|d| transmit(d, None)).count() as u64
    }
}

/// Why a QUIC datagram did not start or join a flow (`sniplex_rejected_total{reason}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuicReject {
    #[error("{0}")]
    Initial(InitialError),
    #[error("short-header packet for no known flow")]
    NoFlow,
    #[error("no route with a QUIC backend for this name")]
    NoRoute,
    #[error("client address not allowed on this route")]
    Denied,
    #[error("ClientHello not whole within the client_hello timeout")]
    HelloTimeout,
    #[error("too many flows")]
    LimitFlows,
    #[error("too many flows from this address")]
    LimitPerIp,
    #[error("too many pending ClientHellos")]
    LimitPending,
    #[error("QUIC backend: {0}")]
    Backend(String),
}

impl QuicReject {
    pub fn label(&self) -> &'static str {
        match self {
            QuicReject::Initial(e) => e.label(),
            QuicReject::NoFlow => "quic_no_flow",
            QuicReject::NoRoute => "quic_no_route",
            QuicReject::Denied => "quic_denied",
            QuicReject::HelloTimeout => "quic_hello_timeout",
            QuicReject::LimitFlows => "quic_limit_flows",
            QuicReject::LimitPerIp => "quic_limit_per_ip",
            QuicReject::LimitPending => "quic_limit_pending",
            QuicReject::Backend(_) => "quic_backend_error",
        }
    }
}

/// Milliseconds on a process-wide clock, for "last datagram" stamps shared between tasks.
fn now_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

#[derive(Debug)]
struct Flow {
    upstream: Udp,
    /// Where the backend's datagrams go: the client's current address.
    client: Mutex<SocketAddr>,
    /// `now_ms` of the last datagram either way.
    last: AtomicU64,
    route: Arc<str>,
    sni: Option<String>,
    backend: SocketAddr,
    ip: IpAddr,
    to_backend: (AtomicU64, AtomicU64),
    to_client: (AtomicU64, AtomicU64),
    counters: (metrics::Counter, metrics::Counter),
    /// Server connection IDs indexed for this flow (removed with it).
    cids: Mutex<Vec<Box<[u8]>>>,
}

impl Flow {
    /// Counts `datagrams` sent towards the backend, `bytes` of them received.
    fn sent_up(&self, datagrams: u64, bytes: usize) {
        self.to_backend.0.fetch_add(datagrams, Ordering::Relaxed);
        self.to_backend.1.fetch_add(bytes as u64, Ordering::Relaxed);
        self.counters.0.increment(datagrams);
    }

    fn sent_down(&self, datagrams: u64, bytes: usize) {
        self.to_client.0.fetch_add(datagrams, Ordering::Relaxed);
        self.to_client.1.fetch_add(bytes as u64, Ordering::Relaxed);
        self.counters.1.increment(datagrams);
    }
}

#[derive(Debug, Default)]
struct Table {
    by_addr: HashMap<SocketAddr, Arc<Flow>>,
    by_cid: HashMap<Box<[u8]>, Arc<Flow>>,
    /// Lengths of the server connection IDs seen, to try on a short header from a new address.
    cid_lens: BTreeSet<usize>,
    per_ip: HashMap<IpAddr, usize>,
    flows: usize,
}

impl Table {
    fn by_cid(&self, datagram: &[u8]) -> Option<Arc<Flow>> {
        if initial::is_long_header(datagram) {
            let h = initial::parse_long_header(datagram).ok()?;
            return self.by_cid.get(h.dcid).cloned();
        }
        self.cid_lens.iter().find_map(|&n| {
            datagram
                .get(1..1 + n)
                .and_then(|c| self.by_cid.get(c))
                .cloned()
        })
    }

    fn remove(&mut self, flow: &Arc<Flow>) {
        let client = *lock(&flow.client);
        if self
            .by_addr
            .get(&client)
            .is_some_and(|f| Arc::ptr_eq(f, flow))
        {
            self.by_addr.remove(&client);
        }
        for cid in lock(&flow.cids).iter() {
            if self.by_cid.get(cid).is_some_and(|f| Arc::ptr_eq(f, flow)) {
                self.by_cid.remove(cid);
            }
        }
        if let Some(n) = self.per_ip.get_mut(&flow.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&flow.ip);
            }
        }
        self.flows -= 1;
    }
}

#[derive(Debug)]
struct Pending {
    hello: HelloAssembler,
    datagrams: Vec<Box<[u8]>>,
    bytes: usize,
    deadline: Instant,
    /// The hello is whole and the upstream socket is being set up.
    starting: bool,
}

/// A finished upstream setup, sent back to the listener loop.
struct Ready {
    client: SocketAddr,
    /// The connected upstream socket and the address it is connected to.
    result: Result<(Udp, SocketAddr), QuicReject>,
    route: Arc<Route>,
    sni: Option<String>,
}

struct Engine {
    socket: Arc<Udp>,
    shared: Arc<Shared>,
    table: Arc<Mutex<Table>>,
    pending: HashMap<SocketAddr, Pending>,
    pending_per_ip: HashMap<IpAddr, usize>,
    ready_tx: mpsc::UnboundedSender<Ready>,
    tasks: TaskTracker,
    stop: CancellationToken,
    epoch: Instant,
    closes: (Instant, u32),
    last_log: Option<Instant>,
    /// Last value written to the pending gauge.
    pending_shown: usize,
}

/// Serves one UDP listener until `stop`. Flows still open are forgotten when it returns.
pub async fn serve(socket: std::net::UdpSocket, shared: Arc<Shared>, stop: CancellationToken) {
    let socket = match Udp::new(socket) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!("QUIC listener: {e}");
            return;
        }
    };
    if let Ok(addr) = socket.sock.local_addr() {
        tracing::info!(%addr, "listening for QUIC");
    }
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut e = Engine {
        socket,
        shared,
        table: Arc::default(),
        pending: HashMap::new(),
        pending_per_ip: HashMap::new(),
        ready_tx,
        tasks: TaskTracker::new(),
        stop: stop.child_token(),
        epoch: Instant::now(),
        closes: (Instant::now(), 0),
        last_log: None,
        pending_shown: 0,
    };
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(r) = ready_rx.recv() => e.started(r),
            r = e.socket.sock.readable() => {
                if let Err(err) = r {
                    tracing::error!("QUIC listener: {err}");
                    break;
                }
                e.drain();
            }
            _ = sweep.tick() => e.sweep(),
        }
        if e.pending.len() != e.pending_shown {
            metrics::gauge!(m::QUIC_PENDING)
                .increment(e.pending.len() as f64 - e.pending_shown as f64);
            e.pending_shown = e.pending.len();
        }
    }
    metrics::gauge!(m::QUIC_PENDING).decrement(e.pending_shown as f64);
    e.stop.cancel();
    e.tasks.close();
    e.tasks.wait().await;
}

impl Engine {
    fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.shared.config.load()
    }

    /// Reads every datagram that is queued now, without awaiting between them.
    fn drain(&mut self) {
        let socket = self.socket.clone();
        // Bounded so a flood cannot starve the other branches (ready flows, the sweep).
        for _ in 0..16 {
            match socket.recv_batch(|d, src, stride, ecn| self.batch(d, src, stride, ecn)) {
                Ok(true) => {}
                Ok(false) => return,
                // ICMP errors surface here on some kernels; they concern one peer.
                Err(e) => tracing::debug!("QUIC recv: {e}"),
            }
        }
    }

    /// One received buffer: a datagram, or a GRO train of datagrams of `stride` bytes from the
    /// same source. A known flow gets the whole train in one (GSO) send.
    fn batch(&mut self, d: &[u8], src: SocketAddr, stride: usize, ecn: Option<EcnCodepoint>) {
        let first = &d[..stride.min(d.len())];
        if let Some(flow) = self.known(first, src) {
            flow.last.store(now_ms(self.epoch), Ordering::Relaxed);
            let n = flow.upstream.send(flow.backend, d, stride, ecn);
            flow.sent_up(n, d.len());
            return;
        }
        for seg in d.chunks(stride) {
            self.datagram(seg, src);
        }
    }

    /// The flow `src` belongs to, by address or (when its address changed) by connection ID.
    fn known(&self, d: &[u8], src: SocketAddr) -> Option<Arc<Flow>> {
        let mut t = lock(&self.table);
        if let Some(f) = t.by_addr.get(&src) {
            return Some(f.clone());
        }
        let f = t.by_cid(d)?;
        // NAT rebinding, or migration keeping its connection ID: follow the client.
        let old = std::mem::replace(&mut *lock(&f.client), src);
        if t.by_addr.get(&old).is_some_and(|x| Arc::ptr_eq(x, &f)) {
            t.by_addr.remove(&old);
        }
        t.by_addr.insert(src, f.clone());
        tracing::debug!(%old, new = %src, route = %f.route, "QUIC flow moved");
        Some(f)
    }

    /// A datagram from an address with no flow: part of a pending hello, or a new flow.
    fn datagram(&mut self, d: &[u8], src: SocketAddr) {
        if let Some(p) = self.pending.get_mut(&src) {
            if p.datagrams.len() >= MAX_PENDING_DATAGRAMS || p.bytes + d.len() > MAX_PENDING_BYTES {
                self.fail_pending(src, QuicReject::Initial(InitialError::TooLarge));
                return;
            }
            p.datagrams.push(d.into());
            p.bytes += d.len();
            if p.starting {
                return;
            }
            match p.hello.feed(d) {
                Ok(None) => {}
                Ok(Some(hello)) => self.route(src, hello),
                Err(e) => self.fail_pending(src, QuicReject::Initial(e)),
            }
            return;
        }
        self.new_flow(d, src);
    }

    fn new_flow(&mut self, d: &[u8], src: SocketAddr) {
        if !initial::is_long_header(d) {
            return self.reject(src, QuicReject::NoFlow, None);
        }
        let config = self.config();
        let Some(q) = config.quic.as_ref() else {
            return self.reject(src, QuicReject::NoRoute, None);
        };
        let ip = ip_key(src.ip());
        let (max_pending, max_pending_ip) = (q.max_pending, q.max_pending_per_ip);
        let hello_timeout = config.timeouts.client_hello;
        drop(config);
        if self.pending.len() >= max_pending {
            return self.reject(src, QuicReject::LimitPending, None);
        }
        if self.pending_per_ip.get(&ip).copied().unwrap_or(0) >= max_pending_ip {
            return self.reject(src, QuicReject::LimitPending, None);
        }
        match HelloAssembler::start(d) {
            Err(e) => self.reject(src, QuicReject::Initial(e), None),
            Ok((hello, done)) => {
                *self.pending_per_ip.entry(ip).or_default() += 1;
                self.pending.insert(
                    src,
                    Pending {
                        hello,
                        datagrams: vec![d.into()],
                        bytes: d.len(),
                        deadline: Instant::now() + hello_timeout,
                        starting: false,
                    },
                );
                if let Some(h) = done {
                    self.route(src, h);
                }
            }
        }
    }

    /// The hello is whole: pick the route and start setting up the upstream socket.
    fn route(&mut self, src: SocketAddr, hello: ClientHello) {
        let config = self.config();
        let route = config.routes.route(hello.sni.as_ref()).cloned();
        let Some((route, addr)) = route.and_then(|r| r.quic.clone().map(|a| (r, a))) else {
            return self.fail_pending(src, QuicReject::NoRoute);
        };
        if !route.access.permits(src.ip()) {
            return self.fail_pending(src, QuicReject::Denied);
        }
        let Some(q) = config.quic.as_ref() else {
            return self.fail_pending(src, QuicReject::NoRoute);
        };
        let ip = ip_key(src.ip());
        {
            let t = lock(&self.table);
            if t.flows >= q.max_flows {
                drop(t);
                return self.fail_pending(src, QuicReject::LimitFlows);
            }
            if t.per_ip.get(&ip).copied().unwrap_or(0) >= q.max_flows_per_ip {
                drop(t);
                return self.fail_pending(src, QuicReject::LimitPerIp);
            }
        }
        if let Some(p) = self.pending.get_mut(&src) {
            p.starting = true;
        }
        let tx = self.ready_tx.clone();
        let sni = hello.sni.map(|n| n.as_str().to_owned());
        let timeout = config.timeouts.connect;
        self.tasks.spawn(async move {
            let result = match tokio::time::timeout(timeout, upstream(&addr)).await {
                Ok(r) => r.map_err(|e| QuicReject::Backend(format!("{addr}: {e}"))),
                Err(_) => Err(QuicReject::Backend(format!("{addr}: resolving timed out"))),
            };
            let _ = tx.send(Ready {
                client: src,
                result,
                route,
                sni,
            });
        });
    }

    /// An upstream socket is ready (or failed): the flow begins with every buffered datagram.
    fn started(&mut self, r: Ready) {
        let Some(p) = self.pending.remove(&r.client) else {
            return;
        };
        self.forget_pending_ip(r.client);
        let (upstream, backend) = match r.result {
            Ok(s) => s,
            Err(e) => return self.reject(r.client, e, Some(&p.hello)),
        };
        let label = r.route.label.clone();
        let c = |dir: &'static str| metrics::counter!(m::QUIC_DATAGRAMS_TOTAL, "route" => label.to_string(), "direction" => dir);
        let flow = Arc::new(Flow {
            upstream,
            client: Mutex::new(r.client),
            last: AtomicU64::new(now_ms(self.epoch)),
            route: r.route.label.clone(),
            sni: r.sni,
            backend,
            ip: ip_key(r.client.ip()),
            to_backend: (AtomicU64::new(0), AtomicU64::new(0)),
            to_client: (AtomicU64::new(0), AtomicU64::new(0)),
            counters: (c("client_to_backend"), c("backend_to_client")),
            cids: Mutex::new(Vec::new()),
        });
        for d in &p.datagrams {
            let n = flow.upstream.send(flow.backend, d, d.len().max(1), None);
            flow.sent_up(n, d.len());
        }
        {
            let mut t = lock(&self.table);
            t.by_addr.insert(r.client, flow.clone());
            *t.per_ip.entry(flow.ip).or_default() += 1;
            t.flows += 1;
        }
        metrics::gauge!(m::QUIC_FLOWS_ACTIVE).increment(1.0);
        metrics::counter!(m::QUIC_FLOWS_TOTAL, "route" => label.to_string()).increment(1);
        tracing::debug!(client = %r.client, route = %label, %backend, "QUIC flow started");
        let config = self.config();
        let idle = config
            .quic
            .as_ref()
            .map_or(QuicConfig::default().idle, |q| q.idle);
        let log = config.log_connections;
        drop(config);
        self.tasks.spawn(backend_to_client(
            flow,
            self.socket.clone(),
            self.table.clone(),
            self.epoch,
            idle,
            self.stop.clone(),
            log,
        ));
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        let expired: Vec<SocketAddr> = self
            .pending
            .iter()
            .filter(|(_, p)| !p.starting && p.deadline <= now)
            .map(|(a, _)| *a)
            .collect();
        for a in expired {
            self.fail_pending(a, QuicReject::HelloTimeout);
        }
    }

    fn forget_pending_ip(&mut self, src: SocketAddr) {
        let ip = ip_key(src.ip());
        if let Some(n) = self.pending_per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.pending_per_ip.remove(&ip);
            }
        }
    }

    fn fail_pending(&mut self, src: SocketAddr, why: QuicReject) {
        if let Some(p) = self.pending.remove(&src) {
            self.forget_pending_ip(src);
            self.reject(src, why, Some(&p.hello));
        }
    }

    /// Counts and logs (at most once a second) a refused datagram or flow; a client whose
    /// name has no QUIC route is told so with CONNECTION_CLOSE (unrecognized_name).
    fn reject(&mut self, src: SocketAddr, why: QuicReject, hello: Option<&HelloAssembler>) {
        metrics::counter!(m::REJECTED_TOTAL, "reason" => why.label()).increment(1);
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            tracing::info!(client = %src, reason = why.label(), "QUIC: {why} (logged at most once a second)");
            self.last_log = Some(Instant::now());
        }
        let close = matches!(why, QuicReject::NoRoute | QuicReject::Denied);
        if let (true, Some(h)) = (close, hello) {
            if self.closes.0.elapsed() >= Duration::from_secs(1) {
                self.closes = (Instant::now(), 0);
            }
            if self.closes.1 < CLOSES_PER_SEC {
                self.closes.1 += 1;
                let pkt = h.connection_close(initial::CRYPTO_ERROR_UNRECOGNIZED_NAME, "no route");
                if !pkt.is_empty() {
                    self.socket.send(src, &pkt, pkt.len(), None);
                }
            }
        }
    }
}

/// A connected UDP socket to the route's QUIC backend (host names resolved now).
async fn upstream(addr: &BackendAddr) -> io::Result<(Udp, SocketAddr)> {
    let target = match addr {
        BackendAddr::Tcp(a) => *a,
        BackendAddr::Host { host, port } => tokio::net::lookup_host((host.as_str(), *port))
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?,
        BackendAddr::Unix(_) | BackendAddr::Abstract(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a UDP address",
            ))
        }
    };
    let local: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let s = std::net::UdpSocket::bind(local)?;
    s.connect(target)?;
    Ok((Udp::new(s)?, target))
}

/// Carries the backend's datagrams to the client's current address until the flow is idle.
async fn backend_to_client(
    flow: Arc<Flow>,
    socket: Arc<Udp>,
    table: Arc<Mutex<Table>>,
    epoch: Instant,
    idle: Duration,
    stop: CancellationToken,
    log: bool,
) {
    let started = Instant::now();
    let idle_ms = idle.as_millis() as u64;
    let deadline = |last: u64| epoch + Duration::from_millis(last + idle_ms);
    // One timer for the flow's life, re-armed only when it fires: datagrams just stamp `last`.
    let mut armed_for = flow.last.load(Ordering::Relaxed);
    let timer = tokio::time::sleep_until(deadline(armed_for));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = flow.upstream.sock.readable() => {
                if r.is_err() {
                    break;
                }
                pump(&flow, &socket, &table, epoch);
            }
            _ = &mut timer => {
                let last = flow.last.load(Ordering::Relaxed);
                if last == armed_for {
                    break;
                }
                armed_for = last;
                timer.as_mut().reset(deadline(last));
            }
        }
    }
    lock(&table).remove(&flow);
    metrics::gauge!(m::QUIC_FLOWS_ACTIVE).decrement(1.0);
    let client = *lock(&flow.client);
    if log {
        tracing::info!(
            client = %client,
            sni = flow.sni.as_deref().unwrap_or("-"),
            route = %flow.route,
            backend = %flow.backend,
            datagrams_up = flow.to_backend.0.load(Ordering::Relaxed),
            bytes_up = flow.to_backend.1.load(Ordering::Relaxed),
            datagrams_down = flow.to_client.0.load(Ordering::Relaxed),
            bytes_down = flow.to_client.1.load(Ordering::Relaxed),
            duration = ?started.elapsed(),
            "QUIC flow ended"
        );
    }
}

fn pump(flow: &Arc<Flow>, socket: &Udp, table: &Mutex<Table>, epoch: Instant) {
    TRAIN.with(|train| {
        let mut train = train.borrow_mut();
        for _ in 0..16 {
            let to = *lock(&flow.client);
            let r = flow.upstream.recv_batch(|d, _, stride, ecn| {
                for seg in d.chunks(stride) {
                    if let Some(cid) = initial::server_cid(seg) {
                        learn(flow, table, cid);
                    }
                }
                // Datagrams are counted when they leave (a train may leave later, in a flush);
                // bytes when they arrive.
                flow.sent_down(train.push(socket, to, d, stride, ecn), d.len());
            });
            flow.sent_down(train.flush(socket), 0);
            flow.last.store(now_ms(epoch), Ordering::Relaxed);
            match r {
                Ok(true) => {}
                Ok(false) => return,
                // ECONNREFUSED: the backend is not (yet) listening; the client will retry.
                Err(_) => {}
            }
        }
    })
}

/// Consecutive datagrams of one size for one destination, copied into one buffer so they leave
/// in one GSO sendmsg: recvmmsg hands them over one per buffer when the sender did not use GSO
/// itself (most QUIC servers on loopback, and GRO does not merge them).
#[derive(Debug, Default)]
struct Train {
    buf: Vec<u8>,
    stride: usize,
    count: usize,
    to: Option<SocketAddr>,
    ecn: Option<EcnCodepoint>,
    /// The last datagram was shorter than `stride`: nothing may follow it in this train.
    closed: bool,
}

impl Train {
    /// Adds `d` (one datagram, or a GRO train of `stride`-byte datagrams). Returns how many
    /// datagrams left in sends this call had to make (flushing an earlier train).
    fn push(
        &mut self,
        udp: &Udp,
        to: SocketAddr,
        d: &[u8],
        stride: usize,
        ecn: Option<EcnCodepoint>,
    ) -> u64 {
        let max = udp.state.max_gso_segments();
        if d.len() > stride || max <= 1 {
            return self.flush(udp) + udp.send(to, d, stride, ecn);
        }
        let fits = self.count > 0
            && self.to == Some(to)
            && self.ecn == ecn
            && !self.closed
            && d.len() <= self.stride
            && self.count < max
            && self.buf.len() + d.len() <= MAX_DATAGRAM;
        let mut sent = 0;
        if self.count > 0 && !fits {
            sent = self.flush(udp);
        }
        if self.count == 0 {
            self.stride = d.len();
            self.to = Some(to);
            self.ecn = ecn;
        }
        self.closed = d.len() < self.stride;
        self.buf.extend_from_slice(d);
        self.count += 1;
        sent
    }

    fn flush(&mut self, udp: &Udp) -> u64 {
        let Some(to) = self.to.take() else {
            return 0;
        };
        let n = udp.send(to, &self.buf, self.stride.max(1), self.ecn);
        self.buf.clear();
        self.count = 0;
        self.closed = false;
        n
    }
}

fn learn(flow: &Arc<Flow>, table: &Mutex<Table>, cid: &[u8]) {
    let mut cids = lock(&flow.cids);
    if cids.iter().any(|c| &c[..] == cid) || cids.len() >= 8 {
        return;
    }
    cids.push(cid.into());
    let mut t = lock(table);
    t.cid_lens.insert(cid.len());
    t.by_cid.entry(cid.into()).or_insert_with(|| flow.clone());
}
