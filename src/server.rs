//! The accept loops, reload and shutdown. Accept on every listener and spawn one task per
//! connection; on reload swap the config atomically (and rebind `listen` when not
//! socket-activated); on shutdown stop accepting at once, drain for `timeouts.shutdown`, then
//! close what is left.

use crate::config::Config;
use crate::conn::{self, Shared};
use crate::metrics as m;
use crate::splice::{ForwardMode, PipePool};
use crate::systemd::{self, notify};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pause after an accept error that signals resource exhaustion (EMFILE, ENFILE, ENOBUFS,
/// ENOMEM): retrying at once would spin a core while nothing can succeed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// After the drain deadline, how long forced-closed connections get to finish their last step.
const FORCE_CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How often the systemd STATUS= line (live connection count) is refreshed.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Knobs that are not part of the config file.
#[derive(Debug, Default)]
pub struct Options {
    pub forward: ForwardMode,
    /// The listeners came from systemd: `listen` is ignored, also on reload.
    pub activated: bool,
    /// A bound metrics endpoint and the recorder handle to render.
    pub metrics: Option<(Option<m::MetricsListener>, PrometheusHandle)>,
    /// Bound (or inherited) UDP sockets for QUIC flows.
    pub quic: Vec<std::net::UdpSocket>,
    /// The UDP sockets came from systemd: `[quic] listen` is ignored, also on reload.
    pub quic_activated: bool,
    /// Connection worker threads (see [`crate::workers`]); below 2, connections run on the
    /// caller's runtime.
    pub workers: usize,
}

/// What the outside world can ask of a running server.
#[derive(Debug)]
pub enum Control {
    /// Re-read the config file; the reply (if asked for) is the new summary or the error.
    Reload(Option<oneshot::Sender<Result<String, String>>>),
    Shutdown,
}

/// The two kinds of listener a reload reconciles.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Tcp,
    Quic,
}

struct AcceptLoop {
    stop: CancellationToken,
    /// One per worker for a TCP listener; one for a QUIC listener.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Server {
    /// One QUIC listener task per UDP address.
    quic_loops: HashMap<SocketAddr, AcceptLoop>,
    quic_activated: bool,
    shared: Arc<Shared>,
    /// Tells the ACME manager that the config changed.
    acme_wake: Arc<tokio::sync::Notify>,
    connections: TaskTracker,
    loops: HashMap<SocketAddr, AcceptLoop>,
    activated: bool,
    /// Where TCP accept loops (and so connections) run.
    workers: Vec<tokio::runtime::Handle>,
}

/// Serves `listeners` (already bound) until a [`Control::Shutdown`] arrives or `control` closes.
pub async fn run(
    config: Config,
    listeners: Vec<std::net::TcpListener>,
    options: Options,
    mut control: mpsc::UnboundedReceiver<Control>,
) -> io::Result<()> {
    let (metrics_listener, handle) = match options.metrics {
        Some((l, h)) => (l, Some(h)),
        None => (None, None),
    };
    let shared = Arc::new(Shared {
        config: arc_swap::ArcSwap::from_pointee(config),
        pipes: PipePool::new(),
        forward: options.forward,
        force_close: CancellationToken::new(),
        metrics: handle.clone(),
        gate: crate::limits::Gate::new(),
    });
    let acme_wake = Arc::new(tokio::sync::Notify::new());
    let acme_stop = CancellationToken::new();
    let acme_task = tokio::spawn(crate::acme::manage(
        shared.clone(),
        acme_wake.clone(),
        acme_stop.clone(),
    ));
    let workers = crate::workers::Workers::start(options.workers)?;
    let mut server = Server {
        workers: workers.targets(),
        quic_loops: HashMap::new(),
        quic_activated: options.quic_activated,
        acme_wake,
        shared: shared.clone(),
        connections: TaskTracker::new(),
        loops: HashMap::new(),
        activated: options.activated,
    };
    for l in listeners {
        server.start_loop(l)?;
    }
    for s in options.quic {
        server.start_quic(s)?;
    }
    let metrics_stop = CancellationToken::new();
    if let (Some(l), Some(h)) = (metrics_listener, handle) {
        let stop = metrics_stop.clone();
        tokio::spawn(async move {
            if let Err(e) = m::serve(l, h, stop).await {
                tracing::error!("metrics endpoint: {e}");
            }
        });
    }
    notify::ready(&server.status());

    let mut status = tokio::time::interval(STATUS_INTERVAL);
    let watchdog = systemd::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut last_status = String::new();
    loop {
        tokio::select! {
            c = control.recv() => match c {
                Some(Control::Reload(reply)) => {
                    let r = server.reload();
                    if let Some(tx) = reply {
                        let _ = tx.send(r);
                    }
                }
                Some(Control::Shutdown) | None => break,
            },
            _ = status.tick() => {
                let s = server.status();
                if s != last_status {
                    notify::status(&s);
                    last_status = s;
                }
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => notify::watchdog(),
        }
    }

    notify::stopping();
    // QUIC flows have no drain: their endpoints retransmit or time out on their own.
    for (_, l) in server.quic_loops.drain() {
        l.stop.cancel();
        for t in l.tasks {
            let _ = t.await;
        }
    }
    acme_stop.cancel();
    let _ = acme_task.await;
    server.shutdown().await;
    workers.stop().await;
    metrics_stop.cancel();
    Ok(())
}

impl Server {
    fn status(&self) -> String {
        format!("{} open connections", self.connections.len())
    }

    /// One accept loop per worker, each on its own duplicate of the listening socket (the
    /// socket closes when the last loop ends).
    fn start_loop(&mut self, l: std::net::TcpListener) -> io::Result<()> {
        l.set_nonblocking(true)?;
        let nodelay_inherited = crate::listener::tune(&l);
        let addr = l.local_addr()?;
        let mut sockets = Vec::with_capacity(self.workers.len());
        for _ in 1..self.workers.len() {
            sockets.push(l.try_clone()?);
        }
        sockets.push(l);
        tracing::info!(%addr, workers = self.workers.len(), "listening");
        let stop = CancellationToken::new();
        let tasks = self
            .workers
            .iter()
            .zip(sockets)
            .map(|(worker, l)| {
                let (shared, connections, stop) =
                    (self.shared.clone(), self.connections.clone(), stop.clone());
                // Registered inside the worker: its runtime polls the socket.
                worker.spawn(async move {
                    match TcpListener::from_std(l) {
                        Ok(l) => accept_loop(l, nodelay_inherited, shared, connections, stop).await,
                        Err(e) => tracing::error!(%addr, "cannot watch the listening socket: {e}"),
                    }
                })
            })
            .collect();
        self.loops.insert(addr, AcceptLoop { stop, tasks });
        Ok(())
    }

    /// Re-reads the config from its file. Valid: listeners are reconciled first (so a new
    /// address that cannot be bound fails the whole reload), then the config is swapped in.
    /// Invalid: nothing changes.
    fn reload(&mut self) -> Result<String, String> {
        notify::reloading();
        let path = self.shared.config.load().source.clone();
        let result = Config::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|new| {
                self.reconcile(Kind::Tcp, &new.listen)?;
                let quic = new.quic.as_ref().map_or(&[][..], |q| &q.listen[..]);
                self.reconcile(Kind::Quic, quic)?;
                let summary = new.summary();
                self.shared.config.store(Arc::new(new));
                self.acme_wake.notify_one();
                Ok(summary)
            });
        match &result {
            Ok(summary) => {
                metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "ok").increment(1);
                tracing::info!("reloaded: {summary}");
            }
            Err(e) => {
                metrics::counter!(m::CONFIG_RELOADS_TOTAL, "result" => "error").increment(1);
                tracing::error!("reload failed, keeping the running config: {e}");
            }
        }
        notify::ready(&self.status());
        result
    }

    fn start_quic(&mut self, s: std::net::UdpSocket) -> io::Result<()> {
        let addr = s.local_addr()?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(crate::quic::flows::serve(
            s,
            self.shared.clone(),
            stop.clone(),
        ));
        self.quic_loops.insert(
            addr,
            AcceptLoop {
                stop,
                tasks: vec![task],
            },
        );
        Ok(())
    }

    /// Brings one kind of listener in line with the new config: new addresses bound (a failure
    /// fails the reload), dropped ones closed (for QUIC their flows end). Nothing changes for
    /// sockets that came from systemd.
    fn reconcile(&mut self, kind: Kind, wanted: &[SocketAddr]) -> Result<(), String> {
        let (activated, loops) = match kind {
            Kind::Tcp => (self.activated, &self.loops),
            Kind::Quic => (self.quic_activated, &self.quic_loops),
        };
        if activated {
            return Ok(());
        }
        let current: Vec<SocketAddr> = loops.keys().copied().collect();
        let (to_bind, removed) = plan(&current, wanted);
        let e = |e: io::Error| e.to_string();
        match kind {
            Kind::Tcp => {
                for l in crate::listener::bind_all(&to_bind).map_err(e)? {
                    self.start_loop(l).map_err(e)?;
                }
            }
            Kind::Quic => {
                for s in crate::listener::bind_udp_all(&to_bind).map_err(e)? {
                    self.start_quic(s).map_err(e)?;
                }
            }
        }
        let loops = match kind {
            Kind::Tcp => &mut self.loops,
            Kind::Quic => &mut self.quic_loops,
        };
        for a in removed {
            if let Some(l) = loops.remove(&a) {
                match kind {
                    Kind::Tcp => tracing::info!(addr = %a, "no longer listening"),
                    Kind::Quic => tracing::info!(addr = %a, "no longer listening for QUIC"),
                }
                l.stop.cancel();
            }
        }
        Ok(())
    }

    async fn shutdown(self) {
        for l in self.loops.values() {
            l.stop.cancel();
        }
        for (_, l) in self.loops {
            // An accept loop returns only when stopped; a JoinError means it panicked (logged).
            for t in l.tasks {
                let _ = t.await;
            }
        }
        let connections = self.connections;
        connections.close();
        let drain = self.shared.config.load().timeouts.shutdown;
        tracing::info!(open = connections.len(), deadline = ?drain, "stopped accepting; draining");
        if tokio::time::timeout(drain, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = connections.len(),
                "drain deadline passed; closing remaining connections"
            );
            self.shared.force_close.cancel();
            let _ = tokio::time::timeout(FORCE_CLOSE_GRACE, connections.wait()).await;
        }
        tracing::info!("shutdown complete");
    }
}

/// What to bind and what to close to go from `current` to `wanted`. A configured port 0 means
/// "any free port": it never matches a bound address, so such listeners are left as they are
/// rather than rebound on every reload.
fn plan(current: &[SocketAddr], wanted: &[SocketAddr]) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let is_current = |a: &SocketAddr| a.port() == 0 || current.contains(a);
    let to_bind = wanted.iter().copied().filter(|a| !is_current(a)).collect();
    let removed = current
        .iter()
        .copied()
        .filter(|a| {
            !wanted.contains(a) && !wanted.iter().any(|w| w.port() == 0 && w.ip() == a.ip())
        })
        .collect();
    (to_bind, removed)
}

async fn accept_loop(
    listener: TcpListener,
    nodelay_inherited: bool,
    shared: Arc<Shared>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    let mut last_warn: Option<tokio::time::Instant> = None;
    let mut last_refusal: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let config = shared.config.load();
                let admitted = shared
                    .gate
                    .admit(&config.limits)
                    .and_then(|(open, handshake)| {
                        // Behind a load balancer the real client is only known after its PROXY
                        // header; the per-address cap is applied then.
                        let ip = match config.accept_proxy_protocol {
                            true => None,
                            false => Some(shared.gate.admit_ip(peer.ip(), &config.limits)?),
                        };
                        Ok(conn::Admission {
                            open,
                            handshake: Some(handshake),
                            ip,
                        })
                    });
                match admitted {
                    Ok(admission) => {
                        if !nodelay_inherited {
                            // See `listener::tune`: normally set once on the listener.
                            let _ = stream.set_nodelay(true);
                        }
                        connections.spawn(conn::handle(stream, peer, shared.clone(), admission));
                    }
                    Err(refused) => {
                        // Closed at once: a refused client costs no task and no buffer.
                        drop(stream);
                        metrics::counter!(m::REJECTED_TOTAL, "reason" => refused.label())
                            .increment(1);
                        metrics::counter!(m::CONNECTIONS_TOTAL, "route" => m::NO_ROUTE, "outcome" => refused.label())
                            .increment(1);
                        if last_refusal.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                            tracing::warn!(%peer, reason = refused.label(), "refused a connection (logged at most once a second)");
                            last_refusal = Some(tokio::time::Instant::now());
                        }
                    }
                }
            }
            Err(e) if is_exhaustion(&e) => {
                metrics::counter!(m::ACCEPT_ERRORS_TOTAL, "kind" => "exhausted").increment(1);
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    tracing::warn!("accept: {e}; backing off (existing connections unaffected)");
                    last_warn = Some(tokio::time::Instant::now());
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
            // ECONNABORTED, EPROTO, EPERM (firewall) and friends concern one connection only.
            Err(e) => {
                metrics::counter!(m::ACCEPT_ERRORS_TOTAL, "kind" => "other").increment(1);
                tracing::debug!("accept: {e}");
            }
        }
    }
    // Dropping the listener here closes the socket: new connections are refused from now on.
}

fn is_exhaustion(e: &io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|c| {
        [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
            .iter()
            .any(|&x| x as i32 == c)
    })
}
