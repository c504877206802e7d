//! Connection workers: with more than one thread, one OS thread per worker, each running its
//! own single-threaded tokio runtime, and every TCP listener accepted on by each of them.
//!
//! A connection stays on the worker that accepted it for its whole life: its two sockets are
//! in that worker's epoll and its task is woken by that thread only. tokio's multi-threaded
//! scheduler instead moves tasks between threads (work stealing, a shared inject queue, I/O
//! events handed from the thread that polled epoll to the one that runs the task), and on a
//! small machine those cross-thread wake-ups cost more than the second core gives (measured:
//! README "Performance"). This is the layout of nginx's and HAProxy's workers.
//!
//! Every worker holds a duplicate of each listening socket: whichever is free first accepts, so
//! a busy worker takes fewer new connections. (The other one sees a spurious wake-up: one
//! `accept` returning EAGAIN per connection per extra worker.)

use std::io;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Running worker threads and their runtimes' handles.
#[derive(Debug, Default)]
pub struct Workers {
    handles: Vec<Handle>,
    /// Dropping a sender tells its worker to stop; the receiver says when it has.
    threads: Vec<(oneshot::Sender<()>, oneshot::Receiver<()>)>,
}

impl Workers {
    /// Starts `n` workers (none for `n` < 2: everything then runs on the caller's runtime).
    pub fn start(n: usize) -> io::Result<Workers> {
        let mut w = Workers::default();
        if n < 2 {
            return Ok(w);
        }
        for i in 0..n {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<Handle>>();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let (done_tx, done_rx) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("sniplex-w{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(async {
                        let _ = stop_rx.await;
                    });
                    // Whatever is still spawned here is dropped with the runtime.
                    drop(runtime);
                    let _ = done_tx.send(());
                })?;
            // The worker is running (and named) once it has sent its handle.
            let handle = ready_rx
                .recv()
                .map_err(|_| io::Error::other("a worker thread died while starting"))??;
            w.handles.push(handle);
            w.threads.push((stop_tx, done_rx));
        }
        Ok(w)
    }

    /// Where accept loops go: every worker, or the caller's runtime when there are none.
    pub fn targets(&self) -> Vec<Handle> {
        if self.handles.is_empty() {
            vec![Handle::current()]
        } else {
            self.handles.clone()
        }
    }

    /// Stops every worker and waits until each has dropped its runtime.
    pub async fn stop(self) {
        let mut done = Vec::with_capacity(self.threads.len());
        for (stop, d) in self.threads {
            drop(stop);
            done.push(d);
        }
        for d in done {
            let _ = d.await;
        }
    }
}
