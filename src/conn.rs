//! One connection's pipeline: read ClientHello -> route (name, then ALPN) -> connect ->
//! (terminate TLS) -> PROXY header -> replay hello -> forward -> record the outcome. Every step
//! runs under a timeout; the end is one [`Outcome`], logged and counted once.

use crate::alert::Alert;
use crate::backend::{self, ConnectError};
use crate::config::{Config, Route, Target, Upstream};
use crate::hello::{ClientHello, HelloError, HelloReader};
use crate::metrics as m;
use crate::proxy_protocol;
use crate::splice::{self, Counters, End, ForwardMode, PipePool};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How long a refused client gets to read our alert and close before we close on it. Without
/// this, closing with unread input makes the kernel send RST, which can destroy the alert.
const ALERT_LINGER: Duration = Duration::from_secs(1);
/// Read size while waiting for the hello: most hellos arrive in one or two segments.
const HELLO_READ: usize = 4096;

/// State shared by every connection of a running server.
#[derive(Debug)]
pub struct Shared {
    pub config: arc_swap::ArcSwap<Config>,
    pub pipes: PipePool,
    pub forward: ForwardMode,
    /// Cancelled when the shutdown drain deadline passes: everything still open closes.
    pub force_close: CancellationToken,
    /// The recorder's handle, for serving `/metrics` on a TLS route.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub gate: Arc<crate::limits::Gate>,
}

/// Why a connection was not forwarded.
#[derive(Debug, thiserror::Error)]
pub enum Reject {
    #[error("{0}")]
    Hello(HelloError),
    #[error("no ClientHello within {0:?}")]
    HelloTimeout(Duration),
    #[error("client closed before sending a whole ClientHello")]
    ClientGone,
    #[error("client read failed: {0}")]
    ClientIo(std::io::Error),
    #[error("no route for this name and no fallback")]
    NoRoute,
    #[error("backend {backend}: {error}")]
    Backend {
        backend: String,
        error: ConnectError,
    },
    #[error("server shutting down")]
    Shutdown,
    #[error("{0}")]
    Handshake(crate::tls::HandshakeError),
    #[error("TLS handshake not complete within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("client address not allowed on this route")]
    Denied,
    #[error("bad PROXY header: {0}")]
    ProxyHeader(&'static str),
    #[error("over the limit ({})", .0.label())]
    Limit(crate::limits::Refused),
    #[error("no certificate for this name yet (its ACME order has not succeeded)")]
    NoCertificate,
}

impl Reject {
    /// Stable label for logs and metrics (`sniplex_rejected_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            Reject::Hello(e) => e.label(),
            Reject::HelloTimeout(_) => "timeout",
            Reject::ClientGone | Reject::ClientIo(_) => "client_gone",
            Reject::NoRoute => "no_route",
            Reject::Backend { .. } => "backend_error",
            Reject::Shutdown => "shutdown",
            Reject::Handshake(_) | Reject::HandshakeTimeout(_) => "handshake_error",
            Reject::Denied => "denied",
            Reject::ProxyHeader(_) => "bad_proxy_header",
            Reject::Limit(r) => r.label(),
            Reject::NoCertificate => "no_certificate",
        }
    }

    fn alert(&self) -> Option<Alert> {
        match self {
            Reject::Hello(HelloError::TooLarge(_)) => Some(Alert::RecordOverflow),
            Reject::Hello(e) if e.is_tls() => Some(Alert::DecodeError),
            // A denied client is told the name does not exist, as if there were no route.
            Reject::NoRoute | Reject::Denied => Some(Alert::UnrecognizedName),
            Reject::Backend { .. } | Reject::NoCertificate => Some(Alert::InternalError),
            _ => None,
        }
    }
}

/// What became of one connection.
#[derive(Debug)]
pub enum Outcome {
    Rejected(Reject),
    Forwarded(End),
    /// A tls-alpn-01 validation handshake from the ACME CA, answered by sniplex itself.
    AcmeChallenge(Result<(), crate::tls::HandshakeError>),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Rejected(r) => r.label(),
            Outcome::AcmeChallenge(Ok(())) => "acme_challenge",
            Outcome::AcmeChallenge(Err(_)) => "acme_challenge_error",
            Outcome::Forwarded(End::Done) => "ok",
            Outcome::Forwarded(End::Idle) => "idle_timeout",
            Outcome::Forwarded(End::Cancelled) => "shutdown",
            Outcome::Forwarded(End::Error(side, _)) => match side {
                splice::Side::Client => "client_error",
                splice::Side::Backend => "backend_error",
            },
        }
    }
}

/// What is known about a connection so far, for its one log line and its metrics.
#[derive(Debug)]
struct Trace {
    /// The client: the TCP peer, or the source of the PROXY header on such a listener.
    peer: SocketAddr,
    /// From the ClientHello (the rest of it is not kept: an open connection holds this).
    sni: Option<crate::name::ServerName>,
    bad_sni: Option<crate::name::NameError>,
    route: Option<Arc<Route>>,
    backend: Option<String>,
    counters: Counters,
}

impl Trace {
    /// Nothing known yet but the peer; the connection's clock starts now.
    fn new(peer: SocketAddr) -> Trace {
        Trace {
            peer,
            sni: None,
            bad_sni: None,
            route: None,
            backend: None,
            counters: Counters::default(),
        }
    }
}

/// The slots a connection was admitted with (see [`crate::limits`]).
#[derive(Debug)]
pub struct Admission {
    pub open: crate::limits::OpenSlot,
    /// Given back as soon as the ClientHello is complete.
    pub handshake: Option<crate::limits::HandshakeSlot>,
    /// Taken at accept, or after the PROXY header when the listener expects one.
    pub ip: Option<crate::limits::IpSlot>,
}

/// Runs the whole pipeline for one accepted connection and logs its outcome.
pub fn handle(
    client: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    admission: Admission,
) -> impl std::future::Future<Output = ()> + Send {
    // An async fn keeps its arguments for its whole life beside whatever its body moves them
    // into; one boxed argument, unpacked and freed on the first poll, keeps every open
    // connection's task ~110 bytes smaller.
    run(Box::new(Accepted {
        client,
        peer,
        shared,
        admission,
    }))
}

struct Accepted {
    client: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    admission: Admission,
}

async fn run(accepted: Box<Accepted>) {
    let Accepted {
        client,
        peer,
        shared,
        mut admission,
    } = {
        // Moved out in a block of its own, so that the box is freed here and not when the
        // connection ends.
        let accepted = accepted;
        *accepted
    };
    let mut trace = Trace::new(peer);
    // Taken once: a reload during this connection does not change its route or timeouts.
    let config = shared.config.load_full();
    // Everything up to forwarding runs boxed, and its state is freed when it returns: what an
    // open connection holds for its whole life is this frame (the trace, the two sockets) and
    // the forwarding future, in the task's one allocation.
    let next = Box::pin(pipeline(
        client,
        &config,
        &shared,
        &mut trace,
        &mut admission,
    ))
    .await;
    let outcome = match next {
        Err(outcome) => outcome,
        Ok(mut p) => {
            let limits = splice::Limits {
                idle: config.timeouts.idle,
                cancel: &shared.force_close,
            };
            let forwarding = splice::forward(
                &mut p.client,
                &mut p.backend,
                shared.forward,
                &shared.pipes,
                limits,
                &trace.counters,
            );
            let end = forwarding.await;
            drop(p);
            Outcome::Forwarded(end)
        }
    };
    drop(admission);
    let peer = trace.peer;

    let sni = trace.sni.as_ref().map_or("-", |n| n.as_str());
    let route_label = trace.route.as_ref().map_or(m::NO_ROUTE, |r| &r.label);
    let backend = trace.backend.as_deref().unwrap_or("-");
    let counters = &trace.counters;
    let elapsed = counters.age();
    let outcome_label = outcome.label();
    match &trace.route {
        Some(r) => r.metrics.get(&r.label).count_connection(&r.label, outcome_label),
        None => metrics::counter!(m::CONNECTIONS_TOTAL, "route" => m::NO_ROUTE, "outcome" => outcome_label)
            .increment(1),
    }
    if let Outcome::Rejected(r) = &outcome {
        metrics::counter!(m::REJECTED_TOTAL, "reason" => r.label()).increment(1);
    }
    let error = match &outcome {
        Outcome::Forwarded(End::Error(side, e)) => format!("{}: {e}", side.label()),
        Outcome::Rejected(r) => r.to_string(),
        Outcome::AcmeChallenge(Err(e)) => e.to_string(),
        Outcome::Forwarded(_) | Outcome::AcmeChallenge(Ok(())) => String::new(),
    };
    if config.log_connections {
        tracing::info!(
            target: "sniplex::access",
            %peer, sni, route = route_label, backend,
            up = counters.up(), down = counters.down(),
            ms = elapsed.as_millis() as u64, outcome = outcome_label, error,
            "connection"
        );
    }
    match &outcome {
        _ if config.log_connections => {}
        Outcome::AcmeChallenge(r) => {
            tracing::info!(%peer, sni, ok = r.is_ok(), error, "answered an ACME tls-alpn-01 validation");
        }
        Outcome::Rejected(
            r @ (Reject::NoRoute
            | Reject::Backend { .. }
            | Reject::Handshake(_)
            | Reject::NoCertificate),
        ) => {
            tracing::warn!(%peer, sni, route = route_label, reason = r.label(), "rejected: {r}");
        }
        Outcome::Rejected(r) => {
            let bad_sni = trace.bad_sni.clone();
            tracing::info!(%peer, sni, ?bad_sni, reason = r.label(), "rejected: {r}");
        }
        Outcome::Forwarded(_) => {
            tracing::debug!(
                %peer, sni, route = route_label, backend,
                up = counters.up(), down = counters.down(),
                ms = elapsed.as_millis() as u64, outcome = outcome_label, error,
                "connection closed"
            );
        }
    }
}

/// Keeps `sniplex_connections_active{route}` right however the connection ends.
struct ActiveGuard(Arc<m::RouteMetrics>);

impl ActiveGuard {
    fn new(route: &Arc<m::RouteMetrics>) -> Self {
        route.active.increment(1.0);
        ActiveGuard(route.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.decrement(1.0);
    }
}

/// A passthrough connection ready to forward: the hello has been replayed to the backend.
struct Passthrough {
    client: TcpStream,
    backend: backend::BackendStream,
    _active: ActiveGuard,
}

/// Everything before forwarding: hello, route, connect, replay. A connection that ends here
/// (rejected, terminated, an ACME validation) comes back as its outcome.
async fn pipeline(
    mut client: TcpStream,
    config: &Config,
    shared: &Shared,
    trace: &mut Trace,
    admission: &mut Admission,
) -> Result<Passthrough, Outcome> {
    // 1. ClientHello, complete, within the deadline (a PROXY header from a load balancer in
    //    front, if expected, comes first and counts against the same deadline). Then the rest,
    //    boxed: a client still sending its hello (or never finishing it, slowloris) holds only
    //    the task and this future, and a task is sized by its largest state: only the
    //    forwarding state lives long.
    let mut reader = HelloReader::new();
    let mut peer = trace.peer;
    let hello_started = Instant::now();
    let hello = hello_phase(
        &mut client,
        &mut reader,
        &mut peer,
        config,
        shared,
        trace,
        admission,
    )
    .await?;
    metrics::histogram!(m::CLIENT_HELLO_SECONDS).record(hello_started.elapsed().as_secs_f64());
    admission.handshake = None;
    Box::pin(route_and_connect(
        client, reader, hello, config, shared, trace,
    ))
    .await
}

/// Route, connect, replay the hello (or terminate, or answer an ACME validation).
async fn route_and_connect(
    mut client: TcpStream,
    reader: HelloReader,
    hello: ClientHello,
    config: &Config,
    shared: &Shared,
    trace: &mut Trace,
) -> Result<Passthrough, Outcome> {
    let cancel = &shared.force_close;
    let t = &config.timeouts;
    // The client: the TCP peer, or the PROXY header's source on such a listener.
    let peer = trace.peer;
    let limits = splice::Limits {
        idle: t.idle,
        cancel,
    };

    // 1b. A tls-alpn-01 validation for a name sniplex is ordering is answered here, whatever
    //     the name's route is; it never reaches a backend. (RFC 8737: the CA offers exactly
    //     one protocol, acme-tls/1.)
    if let [only] = hello.alpn.as_slice() {
        if only.as_slice() == crate::acme::ACME_TLS_ALPN {
            let answer = hello
                .sni
                .as_ref()
                .and_then(|n| crate::acme::store().challenge(n.as_str()));
            if let Some(answer) = answer {
                trace.sni = hello.sni;
                return Err(Box::pin(acme_challenge(client, reader, answer, t, cancel)).await);
            }
        }
    }

    // 2. Route by name, then by the client's ALPN offers; the route's allow/deny decides
    //    whether this client may see it at all (if not, the name "does not exist").
    trace.sni = hello.sni;
    trace.bad_sni = hello.bad_sni;
    let alpn = hello.alpn;
    let route = config.routes.route(trace.sni.as_ref()).cloned();
    let Some(route) = route else {
        return Err(reject(&mut client, Reject::NoRoute).await);
    };
    if !route.access.permits(peer.ip()) {
        trace.route = Some(route.clone());
        return Err(reject(&mut client, Reject::Denied).await);
    }
    let target: &Target = route.select(&alpn);
    trace.route = Some(route.clone());
    trace.backend = Some(target.upstream.to_string());
    let route_metrics = route.metrics.get(&route.label);
    let active = ActiveGuard::new(route_metrics);
    trace.counters.attach_metrics(route_metrics);
    let counters = &trace.counters;

    // An ACME route before its first certificate: refused cleanly, without a backend connect.
    if let Some(name) = target.terminate.as_ref().and_then(|t| t.acme.as_deref()) {
        if crate::acme::store().cert(name).is_none() {
            return Err(reject(&mut client, Reject::NoCertificate).await);
        }
    }

    // 3. Connect first, so an unreachable backend gets alert 80 in both modes.
    let mut backend = match &target.upstream {
        Upstream::Metrics => None,
        Upstream::Backends(addrs) => {
            let connect_started = Instant::now();
            tokio::select! {
                r = Box::pin(backend::connect_first(addrs, t.connect)) => match r {
                    Ok((b, i)) => {
                        route_metrics
                            .connect_seconds
                            .record(connect_started.elapsed().as_secs_f64());
                        if addrs.len() > 1 {
                            trace.backend = Some(addrs[i].to_string());
                        }
                        Some(b)
                    }
                    Err((i, error)) => {
                        let backend = addrs[i].to_string();
                        return Err(reject(&mut client, Reject::Backend { backend, error }).await);
                    }
                },
                _ = cancel.cancelled() => return Err(Outcome::Rejected(Reject::Shutdown)),
            }
        }
    };
    // Only a PROXY header needs our own address: no getsockname otherwise.
    let local = match target.proxy_protocol {
        Some(_) => client.local_addr().unwrap_or(peer),
        None => peer,
    };
    let sni = trace.sni.as_ref().map(|n| n.as_str());

    // 4a. Terminated: finish the handshake here, then copy plaintext. Boxed: its state (a
    //     whole TLS session) must not size the task of every passthrough connection.
    if let Some(term) = &target.terminate {
        let ctx = Terminated {
            term,
            target,
            peer,
            local,
            sni,
            limits,
            counters,
        };
        return Err(Box::pin(terminated(client, reader, backend, ctx, shared, t)).await);
    }

    // 4b. Passthrough: PROXY header and the hello exactly as received, in one write.
    let Some(backend) = backend.take() else {
        // Validation guarantees the metrics route terminates; refuse rather than guess.
        return Err(reject(&mut client, Reject::NoRoute).await);
    };
    // Without a PROXY header the reader's buffer is written as it is (no copy).
    let hello_len = reader.buffered().len();
    let first = match target.proxy_protocol {
        Some(version) => {
            let extra = proxy_protocol::Extra {
                authority: sni,
                alpn: alpn.first().map(|p| p.as_slice()),
                ssl: None,
            };
            let mut first = proxy_protocol::header(version, peer, local, &extra);
            first.extend_from_slice(reader.buffered());
            first
        }
        None => reader.into_buffered(),
    };
    let written = tokio::time::timeout(t.connect, splice::write_all_to(&backend, &first)).await;
    drop(first);
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Outcome::Forwarded(End::Error(splice::Side::Backend, e))),
        Err(_) => {
            let error = ConnectError::Timeout(t.connect);
            let backend = target.upstream.to_string();
            return Err(reject(&mut client, Reject::Backend { backend, error }).await);
        }
    }
    // The PROXY header is ours, not the client's: only the client's bytes are counted.
    counters.add_up(hello_len as u64);
    Ok(Passthrough {
        client,
        backend,
        _active: active,
    })
}

/// Completes the CA's validation handshake with the challenge certificate, then closes.
async fn acme_challenge(
    client: TcpStream,
    reader: HelloReader,
    answer: Arc<rustls::ServerConfig>,
    t: &crate::config::Timeouts,
    cancel: &CancellationToken,
) -> Outcome {
    let (hello_records, after) = reader.buffered().split_at(reader.consumed());
    let handshake = crate::tls::accept(client, hello_records, after, answer);
    tokio::select! {
        r = tokio::time::timeout(t.client_hello, handshake) => match r {
            Ok(Ok(mut tls)) => {
                let _ = tokio::time::timeout(t.client_hello, tls.shutdown()).await;
                Outcome::AcmeChallenge(Ok(()))
            }
            Ok(Err(e)) => Outcome::AcmeChallenge(Err(e)),
            Err(_) => Outcome::Rejected(Reject::HandshakeTimeout(t.client_hello)),
        },
        _ = cancel.cancelled() => Outcome::Rejected(Reject::Shutdown),
    }
}

/// What the terminated path needs from the pipeline.
struct Terminated<'a> {
    term: &'a crate::config::Terminate,
    target: &'a Target,
    peer: SocketAddr,
    local: SocketAddr,
    sni: Option<&'a str>,
    limits: splice::Limits<'a>,
    counters: &'a Counters,
}

async fn terminated(
    client: TcpStream,
    reader: HelloReader,
    backend: Option<backend::BackendStream>,
    c: Terminated<'_>,
    shared: &Shared,
    t: &crate::config::Timeouts,
) -> Outcome {
    let cancel = &shared.force_close;
    let (hello_records, after) = reader.buffered().split_at(reader.consumed());
    let handshake = crate::tls::accept(client, hello_records, after, c.term.tls.clone());
    let mut tls = tokio::select! {
        r = tokio::time::timeout(t.client_hello, handshake) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Outcome::Rejected(Reject::Handshake(e)),
            Err(_) => return Outcome::Rejected(Reject::HandshakeTimeout(t.client_hello)),
        },
        _ = cancel.cancelled() => return Outcome::Rejected(Reject::Shutdown),
    };
    drop(reader);
    let Some(mut backend) = backend else {
        return Outcome::Forwarded(serve_metrics(&mut tls, shared, t.client_hello).await);
    };
    if let Some(version) = c.target.proxy_protocol {
        let conn = tls.get_ref().1;
        let extra = proxy_protocol::Extra {
            authority: c.sni,
            alpn: conn.alpn_protocol(),
            ssl: Some(crate::tls::session_info(conn)),
        };
        let header = proxy_protocol::header(version, c.peer, c.local, &extra);
        let written = tokio::time::timeout(t.connect, backend.write_all(&header)).await;
        let written = written.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "backend did not take the PROXY header",
            ))
        });
        if let Err(e) = written {
            return Outcome::Forwarded(End::Error(splice::Side::Backend, e));
        }
    }
    let end =
        splice::forward_terminated(&mut tls, &backend, &shared.pipes, c.limits, c.counters).await;
    Outcome::Forwarded(end)
}

/// Answers one HTTP request for `/metrics` on a terminated connection.
async fn serve_metrics<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    shared: &Shared,
    timeout: Duration,
) -> End {
    let Some(handle) = &shared.metrics else {
        let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        let _ = s.shutdown().await;
        return End::Done;
    };
    let mut head = Vec::new();
    let read = tokio::time::timeout(timeout, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await?;
            if n == 0 || head.len() + n > 8192 {
                return Err(std::io::Error::from(std::io::ErrorKind::InvalidData));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await;
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return End::Error(splice::Side::Client, e),
        Err(_) => return End::Idle,
    }
    let response = crate::metrics::http_response(&head, handle);
    if let Err(e) = s.write_all(&response).await {
        return End::Error(splice::Side::Client, e);
    }
    let _ = s.shutdown().await;
    End::Done
}

/// Reads the PROXY header (if the listener expects one) and the whole ClientHello.
async fn hello_phase(
    client: &mut TcpStream,
    reader: &mut HelloReader,
    peer: &mut SocketAddr,
    config: &Config,
    shared: &Shared,
    trace: &mut Trace,
    admission: &mut Admission,
) -> Result<ClientHello, Outcome> {
    let cancel = &shared.force_close;
    let t = &config.timeouts;
    let deadline = tokio::time::Instant::now() + t.client_hello;
    if config.accept_proxy_protocol {
        let header = tokio::select! {
            r = tokio::time::timeout_at(deadline, Box::pin(read_proxy_header(client))) => match r {
                Ok(r) => r,
                Err(_) => return Err(reject(client, Reject::HelloTimeout(t.client_hello)).await),
            },
            _ = cancel.cancelled() => return Err(Outcome::Rejected(Reject::Shutdown)),
        };
        let (source, rest) = match header {
            Ok(h) => h,
            Err(rej) => return Err(reject(client, rej).await),
        };
        if let Some(src) = source {
            *peer = src;
        }
        trace.peer = *peer;
        match shared.gate.admit_ip(peer.ip(), &config.limits) {
            Ok(slot) => admission.ip = Some(slot),
            Err(refused) => return Err(Outcome::Rejected(Reject::Limit(refused))),
        }
        match reader.feed(&rest) {
            Ok(Some(h)) => return Ok(h),
            Ok(None) => {}
            Err(e) => return Err(reject(client, Reject::Hello(e)).await),
        }
    }
    tokio::select! {
        r = tokio::time::timeout_at(deadline, read_hello(client, reader)) => match r {
            Ok(Ok(h)) => Ok(h),
            Ok(Err(rej)) => Err(reject(client, rej).await),
            Err(_) => Err(reject(client, Reject::HelloTimeout(t.client_hello)).await),
        },
        _ = cancel.cancelled() => Err(Outcome::Rejected(Reject::Shutdown)),
    }
}

/// Longest PROXY header accepted: v1 is at most 107 bytes; v2 with TLVs is bounded here.
const MAX_PROXY_HEADER: usize = 1024;

/// Reads a PROXY v1/v2 header. Returns the source address it names (`None` for v2 LOCAL and
/// v1 UNKNOWN, the load balancer's own health checks) and the bytes read past it.
async fn read_proxy_header(
    client: &mut TcpStream,
) -> Result<(Option<SocketAddr>, Vec<u8>), Reject> {
    use ppp::PartialResult;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = client.read(&mut chunk).await.map_err(Reject::ClientIo)?;
        if n == 0 {
            return Err(Reject::ClientGone);
        }
        buf.extend_from_slice(&chunk[..n]);
        let parsed = ppp::HeaderResult::parse(&buf);
        if parsed.is_incomplete() {
            if buf.len() > MAX_PROXY_HEADER {
                return Err(Reject::ProxyHeader("longer than 1 KiB"));
            }
            continue;
        }
        let (source, used) = match parsed {
            ppp::HeaderResult::V1(Ok(h)) => {
                let used = buf
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .map_or(buf.len(), |i| i + 2);
                let src = match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Unknown => None,
                };
                (src, used)
            }
            ppp::HeaderResult::V2(Ok(h)) => {
                let src = match (h.command, h.addresses) {
                    (ppp::v2::Command::Local, _) => None,
                    (_, ppp::v2::Addresses::IPv4(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    (_, ppp::v2::Addresses::IPv6(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    _ => None,
                };
                (src, h.len())
            }
            ppp::HeaderResult::V1(Err(_)) | ppp::HeaderResult::V2(Err(_)) => {
                return Err(Reject::ProxyHeader("missing or malformed"))
            }
        };
        return Ok((source, buf.split_off(used.min(buf.len()))));
    }
}

async fn read_hello(
    client: &mut TcpStream,
    reader: &mut HelloReader,
) -> Result<ClientHello, Reject> {
    loop {
        // Polled readiness: the future is two references, where `readable()` keeps a
        // 150-byte waiter node in every connection that is still sending its hello.
        std::future::poll_fn(|cx| client.poll_read_ready(cx))
            .await
            .map_err(Reject::ClientIo)?;
        // Allocated only once bytes are waiting, and on the heap: a silent client (slowloris)
        // then holds no buffer at all, and the task stays small.
        let mut buf = vec![0u8; HELLO_READ];
        let n = match splice::read_draining(&*client, &mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Reject::ClientIo(e)),
        };
        if n == 0 {
            return Err(Reject::ClientGone);
        }
        if let Some(hello) = reader.feed(&buf[..n]).map_err(Reject::Hello)? {
            return Ok(hello);
        }
    }
}

/// Sends the alert that fits `why` (if any), closes gracefully, and returns the outcome.
fn reject(
    client: &mut TcpStream,
    why: Reject,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + '_>> {
    // Boxed: see `hello_phase`.
    Box::pin(async move {
        if let Some(alert) = why.alert() {
            let _ = tokio::time::timeout(ALERT_LINGER, async {
                client.write_all(&alert.record()).await?;
                client.shutdown().await?;
                // Drain until the client closes so our close does not turn into a RST.
                let mut sink = vec![0u8; 1024];
                while client.read(&mut sink).await? > 0 {}
                Ok::<_, std::io::Error>(())
            })
            .await;
        }
        Outcome::Rejected(why)
    })
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// The task of every open connection is sized by `handle`'s largest state, which is the
    /// forwarding one: keep it from growing back (RSS per idle connection, README
    /// "Performance"). Everything before forwarding is boxed and freed when it returns.
    #[tokio::test]
    async fn connection_task_stays_small() {
        let config = Config::parse(
            "listen = [\"127.0.0.1:0\"]\n[routes]\n\"a.test\" = \"127.0.0.1:1\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let gate = crate::limits::Gate::new();
        let (open, handshake) = gate.admit(&config.limits).unwrap();
        let shared = Arc::new(Shared {
            config: arc_swap::ArcSwap::from_pointee(config),
            pipes: PipePool::new(),
            forward: ForwardMode::Auto,
            force_close: CancellationToken::new(),
            metrics: None,
            gate,
        });
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = l.local_addr().unwrap();
        let c = std::net::TcpStream::connect(peer).unwrap();
        c.set_nonblocking(true).unwrap();
        let client = TcpStream::from_std(c).unwrap();
        let admission = Admission {
            open,
            handshake: Some(handshake),
            ip: None,
        };
        // A client still sending its hello (or never finishing it: slowloris) also holds the
        // pipeline's box, with the hello phase inside it.
        let config = shared.config.load_full();
        let mut trace = Trace::new(peer);
        let mut slots = Admission {
            open: crate::limits::Gate::new().admit(&config.limits).unwrap().0,
            handshake: None,
            ip: None,
        };
        let c2 = std::net::TcpStream::connect(peer).unwrap();
        c2.set_nonblocking(true).unwrap();
        let mut c2 = TcpStream::from_std(c2).unwrap();
        let (mut reader, mut p2) = (HelloReader::new(), peer);
        let h = hello_phase(
            &mut c2,
            &mut reader,
            &mut p2,
            &config,
            &shared,
            &mut trace,
            &mut slots,
        );
        let hello_size = std::mem::size_of_val(&h);
        drop(h);
        let p = pipeline(c2, &config, &shared, &mut trace, &mut slots);
        let pipeline_size = std::mem::size_of_val(&p);
        drop(p);
        eprintln!("hello_phase {hello_size} pipeline {pipeline_size}");
        assert!(
            hello_size <= 768,
            "hello phase future is {hello_size} bytes"
        );
        assert!(
            pipeline_size <= 1024,
            "pipeline future is {pipeline_size} bytes"
        );
        let f = handle(client, peer, shared, admission);
        let size = std::mem::size_of_val(&f);
        eprintln!("handle {size}");
        // With tokio's task header and trailer this is a 1 KiB allocation (measured with
        // valgrind's massif, see README "Performance"). At 976 bytes the task moved to the next
        // allocation class: 1.84 KiB of RSS per idle connection instead of 1.61
        // (`benches/compare.sh --only idle`), so the bound is the size measured to fit.
        assert!(size <= 928, "connection future is {size} bytes");
    }
}
