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
#[derive(Debug, Default)]
struct Trace {
    /// The client: the TCP peer, or the source of the PROXY header on such a listener.
    peer: Option<SocketAddr>,
    hello: Option<ClientHello>,
    route: Option<Arc<Route>>,
    backend: Option<String>,
    counters: Counters,
}

/// Runs the whole pipeline for one accepted connection and logs its outcome.
/// The slots a connection was admitted with (see [`crate::limits`]).
#[derive(Debug)]
pub struct Admission {
    pub open: crate::limits::OpenSlot,
    /// Given back as soon as the ClientHello is complete.
    pub handshake: Option<crate::limits::HandshakeSlot>,
    /// Taken at accept, or after the PROXY header when the listener expects one.
    pub ip: Option<crate::limits::IpSlot>,
}

pub async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut admission: Admission,
) {
    let started = Instant::now();
    // Taken once: a reload during this connection does not change its route or timeouts.
    let config = shared.config.load_full();
    let mut trace = Trace {
        peer: Some(peer),
        ..Trace::default()
    };
    let outcome = pipeline(client, &config, &shared, &mut trace, &mut admission).await;
    drop(admission);
    let peer = trace.peer.unwrap_or(peer);

    let sni = trace
        .hello
        .as_ref()
        .and_then(|h| h.sni.as_ref())
        .map_or("-", |n| n.as_str());
    let route_label = trace.route.as_ref().map_or(m::NO_ROUTE, |r| &r.label);
    let backend = trace.backend.as_deref().unwrap_or("-");
    let counters = &trace.counters;
    let elapsed = started.elapsed();
    let outcome_label = outcome.label();
    metrics::counter!(m::CONNECTIONS_TOTAL, "route" => route_label.to_owned(), "outcome" => outcome_label)
        .increment(1);
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
            let bad_sni = trace.hello.as_ref().and_then(|h| h.bad_sni.clone());
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
struct ActiveGuard(metrics::Gauge);

impl ActiveGuard {
    fn new(route: &str) -> Self {
        let g = metrics::gauge!(m::CONNECTIONS_ACTIVE, "route" => route.to_owned());
        g.increment(1.0);
        ActiveGuard(g)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

async fn pipeline(
    mut client: TcpStream,
    config: &Config,
    shared: &Shared,
    trace: &mut Trace,
    admission: &mut Admission,
) -> Outcome {
    let cancel = &shared.force_close;
    let t = &config.timeouts;
    // The accept-time peer; replaced by the PROXY header's source on such a listener.
    let Some(mut peer) = trace.peer else {
        return Outcome::Rejected(Reject::ClientGone);
    };
    let limits = splice::Limits {
        idle: t.idle,
        cancel,
    };

    // 1. ClientHello, complete, within the deadline (a PROXY header from a load balancer in
    //    front, if expected, comes first and counts against the same deadline). Boxed, like
    //    every phase but forwarding: a task is sized by its largest state, and only the
    //    forwarding state lives long.
    let mut reader = HelloReader::new();
    let hello_started = Instant::now();
    let hello = match Box::pin(hello_phase(
        &mut client,
        &mut reader,
        &mut peer,
        config,
        shared,
        trace,
        admission,
    ))
    .await
    {
        Ok(h) => h,
        Err(outcome) => return outcome,
    };
    metrics::histogram!(m::CLIENT_HELLO_SECONDS).record(hello_started.elapsed().as_secs_f64());
    admission.handshake = None;

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
                trace.hello = Some(hello);
                return Box::pin(acme_challenge(client, reader, answer, t, cancel)).await;
            }
        }
    }

    // 2. Route by name, then by the client's ALPN offers; the route's allow/deny decides
    //    whether this client may see it at all (if not, the name "does not exist").
    let route = config.routes.route(hello.sni.as_ref()).cloned();
    let hello = trace.hello.insert(hello);
    let Some(route) = route else {
        return reject(&mut client, Reject::NoRoute).await;
    };
    if !route.access.permits(peer.ip()) {
        trace.route = Some(route.clone());
        return reject(&mut client, Reject::Denied).await;
    }
    let target: &Target = route.select(&hello.alpn);
    trace.route = Some(route.clone());
    trace.backend = Some(target.upstream.to_string());
    let _active = ActiveGuard::new(&route.label);
    trace.counters.attach_metrics(&route.label);
    let counters = &trace.counters;

    // An ACME route before its first certificate: refused cleanly, without a backend connect.
    if let Some(name) = target.terminate.as_ref().and_then(|t| t.acme.as_deref()) {
        if crate::acme::store().cert(name).is_none() {
            return reject(&mut client, Reject::NoCertificate).await;
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
                        metrics::histogram!(m::BACKEND_CONNECT_SECONDS, "route" => route.label.to_string())
                            .record(connect_started.elapsed().as_secs_f64());
                        if addrs.len() > 1 {
                            trace.backend = Some(addrs[i].to_string());
                        }
                        Some(b)
                    }
                    Err((i, error)) => {
                        let backend = addrs[i].to_string();
                        return reject(&mut client, Reject::Backend { backend, error }).await;
                    }
                },
                _ = cancel.cancelled() => return Outcome::Rejected(Reject::Shutdown),
            }
        }
    };
    // Only a PROXY header needs our own address: no getsockname otherwise.
    let local = match target.proxy_protocol {
        Some(_) => client.local_addr().unwrap_or(peer),
        None => peer,
    };
    let sni = hello.sni.as_ref().map(|n| n.as_str().to_owned());

    // 4a. Terminated: finish the handshake here, then copy plaintext. Boxed: its state (a
    //     whole TLS session) must not size the task of every passthrough connection.
    if let Some(term) = &target.terminate {
        let ctx = Terminated {
            term,
            target,
            peer,
            local,
            sni: sni.as_deref(),
            limits,
            counters,
        };
        return Box::pin(terminated(client, reader, backend, ctx, shared, t)).await;
    }

    // 4b. Passthrough: PROXY header and the hello exactly as received, in one write.
    let Some(mut backend) = backend.take() else {
        // Validation guarantees the metrics route terminates; refuse rather than guess.
        return reject(&mut client, Reject::NoRoute).await;
    };
    let mut first = match target.proxy_protocol {
        Some(version) => {
            let extra = proxy_protocol::Extra {
                authority: sni.as_deref(),
                alpn: hello.alpn.first().map(|p| p.as_slice()),
                ssl: None,
            };
            proxy_protocol::header(version, peer, local, &extra)
        }
        None => Vec::new(),
    };
    let hello_len = reader.buffered().len();
    first.extend_from_slice(reader.buffered());
    drop(reader);
    match tokio::time::timeout(t.connect, backend.write_all(&first)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Outcome::Forwarded(End::Error(splice::Side::Backend, e)),
        Err(_) => {
            let error = ConnectError::Timeout(t.connect);
            let backend = target.upstream.to_string();
            return reject(&mut client, Reject::Backend { backend, error }).await;
        }
    }
    // The PROXY header is ours, not the client's: only the client's bytes are counted.
    counters.add_up(hello_len as u64);
    let end = Box::pin(splice::forward(
        &mut client,
        &mut backend,
        shared.forward,
        &shared.pipes,
        limits,
        counters,
    ))
    .await;
    Outcome::Forwarded(end)
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
            r = tokio::time::timeout_at(deadline, read_proxy_header(client)) => match r {
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
        trace.peer = Some(*peer);
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
        client.readable().await.map_err(Reject::ClientIo)?;
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
