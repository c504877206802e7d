//! The accept loops and shutdown: accept on every listener, spawn one task per connection, and on
//! shutdown stop accepting at once, drain for `timeouts.shutdown`, then close what is left.

use crate::config::Config;
use crate::conn::{self, Shared};
use crate::splice::{ForwardMode, PipePool};
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pause after an accept error that signals resource exhaustion (EMFILE, ENFILE, ENOBUFS,
/// ENOMEM): retrying at once would spin a core while nothing can succeed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// After the drain deadline, how long forced-closed connections get to finish their last step.
const FORCE_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Knobs that are not part of the config file.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub forward: ForwardMode,
}

/// Serves `listeners` (already bound, non-blocking) until `shutdown` resolves, then drains.
pub async fn run(
    config: Config,
    listeners: Vec<std::net::TcpListener>,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let shared = Arc::new(Shared {
        config: arc_swap::ArcSwap::from_pointee(config),
        pipes: PipePool::new(),
        forward: options.forward,
        force_close: CancellationToken::new(),
    });
    let stop_accepting = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut accept_loops = Vec::new();
    for l in listeners {
        l.set_nonblocking(true)?;
        let l = TcpListener::from_std(l)?;
        tracing::info!(addr = %l.local_addr()?, "listening");
        accept_loops.push(tokio::spawn(accept_loop(
            l,
            shared.clone(),
            connections.clone(),
            stop_accepting.clone(),
        )));
    }

    shutdown.await;
    stop_accepting.cancel();
    for h in accept_loops {
        // An accept loop never fails; a JoinError would mean it panicked, which is logged by tokio.
        let _ = h.await;
    }
    connections.close();
    let drain = shared.config.load().timeouts.shutdown;
    tracing::info!(open = connections.len(), deadline = ?drain, "stopped accepting; draining");
    if tokio::time::timeout(drain, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "drain deadline passed; closing remaining connections"
        );
        shared.force_close.cancel();
        let _ = tokio::time::timeout(FORCE_CLOSE_GRACE, connections.wait()).await;
    }
    tracing::info!("shutdown complete");
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    let mut last_warn: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                // The hello and the alerts are small writes that must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                connections.spawn(conn::handle(stream, peer, shared.clone()));
            }
            Err(e) if is_exhaustion(&e) => {
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
            Err(e) => tracing::debug!("accept: {e}"),
        }
    }
    // Dropping the listener here closes the socket: new connections are refused from now on.
}

fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

mod libc_errno {
    pub const EMFILE: i32 = nix::errno::Errno::EMFILE as i32;
    pub const ENFILE: i32 = nix::errno::Errno::ENFILE as i32;
    pub const ENOBUFS: i32 = nix::errno::Errno::ENOBUFS as i32;
    pub const ENOMEM: i32 = nix::errno::Errno::ENOMEM as i32;
}
