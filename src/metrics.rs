//! Prometheus metrics: names, help texts and recording helpers, plus the small HTTP endpoint
//! that serves the scrape. The recorder is process-global (installed once by `main`); without it
//! every recording call is a no-op, so the library works the same in tests.
//!
//! Labels never carry client-controlled strings: `route` is a configured route key (or
//! `fallback`, or `none` before routing), `reason`/`outcome` are fixed labels.

use crate::config::MetricsAddr;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

pub const CONNECTIONS_TOTAL: &str = "sniplex_connections_total";
pub const CONNECTIONS_ACTIVE: &str = "sniplex_connections_active";
pub const BYTES_TOTAL: &str = "sniplex_bytes_total";
pub const CLIENT_HELLO_SECONDS: &str = "sniplex_client_hello_seconds";
pub const BACKEND_CONNECT_SECONDS: &str = "sniplex_backend_connect_seconds";
pub const REJECTED_TOTAL: &str = "sniplex_rejected_total";
pub const CONFIG_RELOADS_TOTAL: &str = "sniplex_config_reloads_total";
pub const BUILD_INFO: &str = "sniplex_build_info";
pub const ACCEPT_ERRORS_TOTAL: &str = "sniplex_accept_errors_total";
pub const ACME_ORDERS_TOTAL: &str = "sniplex_acme_orders_total";
pub const CERTIFICATE_EXPIRY_SECONDS: &str = "sniplex_certificate_expiry_seconds";
pub const QUIC_FLOWS_ACTIVE: &str = "sniplex_quic_flows_active";
pub const QUIC_PENDING: &str = "sniplex_quic_pending";
pub const QUIC_FLOWS_TOTAL: &str = "sniplex_quic_flows_total";
pub const QUIC_DATAGRAMS_TOTAL: &str = "sniplex_quic_datagrams_total";

/// Route label before a route is known.
pub const NO_ROUTE: &str = "none";

/// Outcomes of a forwarded connection (`sniplex_connections_total{outcome}`), whose counters
/// each route keeps a handle to.
const FORWARDED_OUTCOMES: [&str; 5] = [
    "ok",
    "idle_timeout",
    "shutdown",
    "client_error",
    "backend_error",
];

/// One route's metric handles. A connection updates them directly: no registry lookup (a hash
/// and a lock) and no label string allocated per connection.
#[derive(Debug)]
pub struct RouteMetrics {
    pub bytes_up: metrics::Counter,
    pub bytes_down: metrics::Counter,
    pub active: metrics::Gauge,
    pub connect_seconds: metrics::Histogram,
    forwarded: [metrics::Counter; FORWARDED_OUTCOMES.len()],
}

impl RouteMetrics {
    fn new(route: &str) -> Self {
        let bytes = |dir: &'static str| metrics::counter!(BYTES_TOTAL, "route" => route.to_owned(), "direction" => dir);
        RouteMetrics {
            bytes_up: bytes("client_to_backend"),
            bytes_down: bytes("backend_to_client"),
            active: metrics::gauge!(CONNECTIONS_ACTIVE, "route" => route.to_owned()),
            connect_seconds: metrics::histogram!(BACKEND_CONNECT_SECONDS, "route" => route.to_owned()),
            forwarded: FORWARDED_OUTCOMES.map(|outcome| {
                metrics::counter!(CONNECTIONS_TOTAL, "route" => route.to_owned(), "outcome" => outcome)
            }),
        }
    }

    /// `sniplex_connections_total{route, outcome}`.
    pub fn count_connection(&self, route: &str, outcome: &'static str) {
        match FORWARDED_OUTCOMES.iter().position(|o| *o == outcome) {
            Some(i) => self.forwarded[i].increment(1),
            None => metrics::counter!(CONNECTIONS_TOTAL, "route" => route.to_owned(), "outcome" => outcome)
                .increment(1),
        }
    }
}

/// A route's [`RouteMetrics`], registered on its first connection (not when the config is
/// read: `check` and the first load run before the recorder is installed, and handles taken then
/// would be no-ops for good).
#[derive(Debug, Clone, Default)]
pub struct LazyRouteMetrics(std::sync::OnceLock<std::sync::Arc<RouteMetrics>>);

impl LazyRouteMetrics {
    pub fn get(&self, route: &str) -> &std::sync::Arc<RouteMetrics> {
        self.0
            .get_or_init(|| std::sync::Arc::new(RouteMetrics::new(route)))
    }
}

/// Latency buckets (seconds) for hello and connect times: 100 us to 10 s.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Largest request head the endpoint reads; scrapers send a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A scraper that has not sent its request by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often histogram buckets are compacted (the exporter needs periodic upkeep).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the process-wide recorder and describes every metric.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)?
        .install_recorder()?;
    describe();
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => "ok").absolute(0);
    metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => "error").absolute(0);
    Ok(handle)
}

fn describe() {
    describe_counter!(
        CONNECTIONS_TOTAL,
        "Finished connections by route and outcome."
    );
    describe_gauge!(
        CONNECTIONS_ACTIVE,
        "Open connections by route (from routing to close)."
    );
    describe_counter!(
        BYTES_TOTAL,
        Unit::Bytes,
        "Bytes forwarded by route and direction."
    );
    describe_histogram!(
        CLIENT_HELLO_SECONDS,
        Unit::Seconds,
        "Time from accept to a complete ClientHello."
    );
    describe_histogram!(
        BACKEND_CONNECT_SECONDS,
        Unit::Seconds,
        "Backend connect time by route."
    );
    describe_counter!(
        REJECTED_TOTAL,
        "Connections (and QUIC datagrams or flows, reasons quic_*) refused before forwarding, by reason."
    );
    describe_counter!(ACME_ORDERS_TOTAL, "ACME certificate orders, by result.");
    describe_gauge!(
        CERTIFICATE_EXPIRY_SECONDS,
        Unit::Seconds,
        "notAfter of the certificate an ACME route serves, as a Unix timestamp."
    );
    describe_gauge!(QUIC_FLOWS_ACTIVE, "QUIC flows being forwarded.");
    describe_gauge!(
        QUIC_PENDING,
        "QUIC flows waiting for the rest of their ClientHello."
    );
    describe_counter!(QUIC_FLOWS_TOTAL, "QUIC flows started, by route.");
    describe_counter!(
        QUIC_DATAGRAMS_TOTAL,
        "QUIC datagrams forwarded by route and direction."
    );
    describe_counter!(CONFIG_RELOADS_TOTAL, "Config reloads by result.");
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
    describe_counter!(ACCEPT_ERRORS_TOTAL, "accept(2) errors, by kind.");
}

/// A bound metrics endpoint.
#[derive(Debug)]
pub enum MetricsListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl MetricsListener {
    /// The bound address, for the log (a configured port 0 shows the real port).
    pub fn local_addr(&self) -> String {
        match self {
            MetricsListener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string()),
            MetricsListener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }
}

/// Binds the endpoint (before privileges are dropped, so a low port works). A stale Unix
/// socket file from a previous run is replaced.
pub fn bind(addr: &MetricsAddr) -> io::Result<MetricsListener> {
    let ctx =
        |e: io::Error| io::Error::new(e.kind(), format!("metrics: cannot listen on {addr}: {e}"));
    match addr {
        MetricsAddr::Tcp(a) => {
            let l = std::net::TcpListener::bind(a).map_err(ctx)?;
            l.set_nonblocking(true).map_err(ctx)?;
            Ok(MetricsListener::Tcp(l))
        }
        MetricsAddr::Unix(p) => {
            if std::os::unix::net::UnixStream::connect(p).is_err() {
                let _ = std::fs::remove_file(p);
            }
            let l = std::os::unix::net::UnixListener::bind(p).map_err(ctx)?;
            l.set_nonblocking(true).map_err(ctx)?;
            Ok(MetricsListener::Unix(l))
        }
    }
}

/// Serves `GET /metrics` until `stop` is cancelled.
pub async fn serve(
    listener: MetricsListener,
    handle: PrometheusHandle,
    stop: CancellationToken,
) -> io::Result<()> {
    enum L {
        Tcp(TcpListener),
        Unix(UnixListener),
    }
    let l = match listener {
        MetricsListener::Tcp(l) => L::Tcp(TcpListener::from_std(l)?),
        MetricsListener::Unix(l) => L::Unix(UnixListener::from_std(l)?),
    };
    let mut upkeep = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = upkeep.tick() => handle.run_upkeep(),
            r = async {
                match &l {
                    L::Tcp(l) => l.accept().await.map(|(s, _)| tokio::spawn(answer(s, handle.clone()))),
                    L::Unix(l) => l.accept().await.map(|(s, _)| tokio::spawn(answer(s, handle.clone()))),
                }
            } => if let Err(e) = r {
                tracing::debug!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
        }
    }
}

async fn answer<S: tokio::io::AsyncRead + AsyncWrite + Unpin>(mut s: S, handle: PrometheusHandle) {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
                return Err(io::Error::from(io::ErrorKind::InvalidData));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let response = http_response(&head, &handle);
    let _ = s.write_all(&response).await;
    let _ = s.shutdown().await;
}

/// The whole HTTP/1.1 response for a request head: the scrape for `GET /metrics`.
pub fn http_response(head: &[u8], handle: &PrometheusHandle) -> Vec<u8> {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let (status, ctype, body) = match (method, path) {
        (b"GET" | b"HEAD", b"/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        (b"GET" | b"HEAD", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != b"HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}
