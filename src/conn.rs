//! One connection's pipeline: read ClientHello -> route -> connect -> replay hello -> forward ->
//! record the outcome. Every step runs under a timeout; the end is one [`Outcome`], logged once.

use crate::alert::Alert;
use crate::backend::{self, ConnectError};
use crate::config::{Config, Route};
use crate::hello::{ClientHello, HelloError, HelloReader};
use crate::metrics as m;
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
        }
    }

    fn alert(&self) -> Option<Alert> {
        match self {
            Reject::Hello(HelloError::TooLarge(_)) => Some(Alert::RecordOverflow),
            Reject::Hello(e) if e.is_tls() => Some(Alert::DecodeError),
            Reject::NoRoute => Some(Alert::UnrecognizedName),
            Reject::Backend { .. } => Some(Alert::InternalError),
            _ => None,
        }
    }
}

/// What became of one connection.
#[derive(Debug)]
pub enum Outcome {
    Rejected(Reject),
    Forwarded(End),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Rejected(r) => r.label(),
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

/// Runs the whole pipeline for one accepted connection and logs its outcome.
pub async fn handle(mut client: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let started = Instant::now();
    // Taken once: a reload during this connection does not change its route or timeouts.
    let config = shared.config.load_full();
    let counters = Counters::default();
    let mut hello_info: Option<ClientHello> = None;
    let mut route: Option<Arc<Route>> = None;
    let outcome = pipeline(
        &mut client,
        &config,
        &shared,
        &counters,
        &mut hello_info,
        &mut route,
    )
    .await;

    let sni = hello_info
        .as_ref()
        .and_then(|h| h.sni.as_ref())
        .map_or("-", |n| n.as_str());
    let route_label = route.as_ref().map_or(m::NO_ROUTE, |r| &r.label);
    let backend = route.as_ref().map(|r| r.backend.to_string());
    let backend = backend.as_deref().unwrap_or("-");
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
        Outcome::Forwarded(_) => String::new(),
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
        Outcome::Rejected(r @ (Reject::NoRoute | Reject::Backend { .. })) => {
            tracing::warn!(%peer, sni, route = route_label, reason = r.label(), "rejected: {r}");
        }
        Outcome::Rejected(r) => {
            let bad_sni = hello_info.as_ref().and_then(|h| h.bad_sni.clone());
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
    client: &mut TcpStream,
    config: &Config,
    shared: &Shared,
    counters: &Counters,
    hello_out: &mut Option<ClientHello>,
    route_out: &mut Option<Arc<Route>>,
) -> Outcome {
    let cancel = &shared.force_close;
    let t = &config.timeouts;

    // 1. ClientHello, complete, within the deadline.
    let mut reader = HelloReader::new();
    let hello_started = Instant::now();
    let hello = tokio::select! {
        r = tokio::time::timeout(t.client_hello, read_hello(client, &mut reader)) => match r {
            Ok(Ok(h)) => h,
            Ok(Err(rej)) => return reject(client, rej).await,
            Err(_) => return reject(client, Reject::HelloTimeout(t.client_hello)).await,
        },
        _ = cancel.cancelled() => return Outcome::Rejected(Reject::Shutdown),
    };

    metrics::histogram!(m::CLIENT_HELLO_SECONDS).record(hello_started.elapsed().as_secs_f64());

    // 2. Route.
    let Some(route) = config.routes.route(hello.sni.as_ref()).cloned() else {
        *hello_out = Some(hello);
        return reject(client, Reject::NoRoute).await;
    };
    *hello_out = Some(hello);
    *route_out = Some(route.clone());
    let _active = ActiveGuard::new(&route.label);
    counters.attach_metrics(&route.label);

    // 3. Connect, and replay the hello bytes exactly as received.
    let connect_started = Instant::now();
    let connected = async {
        let mut b = backend::connect(&route.backend, t.connect).await?;
        tokio::time::timeout(t.connect, b.write_all(reader.buffered()))
            .await
            .map_err(|_| ConnectError::Timeout(t.connect))??;
        Ok::<_, ConnectError>(b)
    };
    let mut backend = tokio::select! {
        r = connected => match r {
            Ok(b) => b,
            Err(error) => {
                let backend = route.backend.to_string();
                return reject(client, Reject::Backend { backend, error }).await;
            }
        },
        _ = cancel.cancelled() => return Outcome::Rejected(Reject::Shutdown),
    };
    metrics::histogram!(m::BACKEND_CONNECT_SECONDS, "route" => route.label.to_string())
        .record(connect_started.elapsed().as_secs_f64());
    counters.add_up(reader.buffered().len() as u64);
    drop(reader);

    // 4. Forward both ways until both end.
    let end = splice::forward(
        client,
        &mut backend,
        shared.forward,
        &shared.pipes,
        t.idle,
        cancel,
        counters,
    )
    .await;
    Outcome::Forwarded(end)
}

async fn read_hello(
    client: &mut TcpStream,
    reader: &mut HelloReader,
) -> Result<ClientHello, Reject> {
    let mut buf = [0u8; HELLO_READ];
    loop {
        let n = client.read(&mut buf).await.map_err(Reject::ClientIo)?;
        if n == 0 {
            return Err(Reject::ClientGone);
        }
        if let Some(hello) = reader.feed(&buf[..n]).map_err(Reject::Hello)? {
            return Ok(hello);
        }
    }
}

/// Sends the alert that fits `why` (if any), closes gracefully, and returns the outcome.
async fn reject(client: &mut TcpStream, why: Reject) -> Outcome {
    if let Some(alert) = why.alert() {
        let _ = tokio::time::timeout(ALERT_LINGER, async {
            client.write_all(&alert.record()).await?;
            client.shutdown().await?;
            // Drain until the client closes so our close does not turn into a RST.
            let mut sink = [0u8; 1024];
            while client.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    }
    Outcome::Rejected(why)
}
