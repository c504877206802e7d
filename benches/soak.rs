//! Soak: mixed load against the real sniplex binary for N minutes — passthrough and terminated
//! routes, tiny and large transfers, clients that abort, a backend that keeps restarting, a reload
//! every two seconds (every fourth one invalid). At the end it asserts zero unexpected failures,
//! every completed transfer checksum-correct, and no growth in file descriptors or RSS beyond
//! the stated bounds. The last line prints the totals.
//!
//! cargo bench --bench soak -- [--minutes N | --seconds N] [--clients N]

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Growth allowed between the warm-up sample and the end: descriptors of the metrics/log
/// plumbing may differ by a few; RSS may grow by allocator caching, not by leaks.
const FD_GROWTH_BOUND: i64 = 8;
const RSS_GROWTH_BOUND_KIB: i64 = 32 * 1024;

#[derive(Default)]
struct Totals {
    connections: AtomicU64,
    bytes: AtomicU64,
    aborted: AtomicU64,
    failures: AtomicU64,
    /// Failed attempts on the restarting backend's route that overlapped one of its restarts
    /// (a connection queued in a listener that dies is lost, through any proxy).
    casualties: AtomicU64,
    /// Incremented at every restart transition of backend b.
    epoch: AtomicU64,
}

fn arg(name: &str) -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn proc_stat(pid: u32) -> (i64, i64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as i64)
        .unwrap_or(-1);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(-1);
    (fds, rss)
}

/// A tiny xorshift: the load mix must vary, not be cryptographic.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn main() {
    // `cargo bench` passes --bench; accept and ignore it.
    let duration = match (arg("--seconds"), arg("--minutes")) {
        (Some(s), _) => Duration::from_secs(s),
        (None, m) => Duration::from_secs(60 * m.unwrap_or(5)),
    };
    let clients = arg("--clients").unwrap_or(16);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ok = rt.block_on(soak(duration, clients as usize));
    std::process::exit(if ok { 0 } else { 1 });
}

async fn soak(duration: Duration, clients: usize) -> bool {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write_to(dir.path());
    let a = Backend::start("a", Listen::Unix(dir.path().join("a.sock")), &pki).await;
    let b_path = dir.path().join("b.sock");
    let http = Backend::start_kind(
        "blog",
        Listen::Unix(dir.path().join("http.sock")),
        &pki,
        Speaks::Http,
        false,
    )
    .await;
    let conf = dir.path().join("sniplex.toml");
    let config = |primary: &str, secondary: &str| {
        format!(
            "listen = [\"127.0.0.1:0\"]\n[limits]\nmax_connections_per_ip = 100000\n\
             [routes]\n\"git.test\" = \"{}\"\n\"restart.test\" = [\"{primary}\", \"{secondary}\"]\n\
             [routes.\"blog.test\"]\nbackend = \"{}\"\nterminate = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n",
            a.config_addr, http.config_addr
        )
    };
    let b_addr = format!("unix:{}", b_path.display());
    std::fs::write(&conf, config(&b_addr, &a.config_addr)).unwrap();
    let exe = std::env::var("SNIPLEX").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sniplex").to_owned());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["run", "-q", "-c"]).arg(&conf);
    let mut bin = Binary::start_cmd(cmd, 0);
    // -q hides the "listening" line; learn the port from /proc instead.
    let addr = loop {
        if let Some(a) = listening_port(bin.child.id()) {
            break a;
        }
        tokio::task::yield_now().await;
    };
    let pid = bin.child.id();
    let totals = Arc::new(Totals::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let client_config = pki.client_config(&[]);

    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (totals, stop, cfg) = (totals.clone(), stop.clone(), client_config.clone());
        tasks.spawn(async move {
            let mut rng = Rng(0x9e3779b97f4a7c15 ^ (c as u64 + 1));
            while !stop.is_cancelled() {
                let kind = rng.next() % 10;
                let epoch = totals.epoch.load(Ordering::SeqCst);
                let r = match kind {
                    0..=2 => echo(addr, &cfg, "git.test", 1 + rng.next() % 4096).await,
                    3..=4 => echo(addr, &cfg, "restart.test", 1 + rng.next() % 4096).await,
                    5 => echo(addr, &cfg, "git.test", (1 << 20) + rng.next() % (7 << 20)).await,
                    6..=7 => terminated_get(addr, &cfg).await,
                    _ => {
                        abort_midway(addr, &cfg).await;
                        totals.aborted.fetch_add(1, Ordering::Relaxed);
                        totals.connections.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                totals.connections.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(n) => {
                        totals.bytes.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(_)
                        if (3..=4).contains(&kind)
                            && totals.epoch.load(Ordering::SeqCst) != epoch =>
                    {
                        totals.casualties.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        totals.failures.fetch_add(1, Ordering::Relaxed);
                        eprintln!("soak: FAILURE: {e}");
                    }
                }
            }
        });
    }

    // Warm up, then take the baseline.
    let started = Instant::now();
    let warmup = (duration / 10).min(Duration::from_secs(10));
    tokio::time::sleep(warmup).await;
    let (fd0, rss0) = proc_stat(pid);

    // The churn: reloads and a restarting backend, until the time is up.
    let mut b: Option<Backend> =
        Some(Backend::start("b", Listen::Unix(b_path.clone()), &pki).await);
    let mut tick = 0u64;
    let (mut reloads, mut bad_reloads, mut restarts) = (0u64, 0u64, 0u64);
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tick += 1;
        if tick % 4 == 0 {
            if tick % 16 == 0 {
                std::fs::write(
                    &conf,
                    "[routes]\n\"git.test\" = { backend = \"unix:/x\", bogus = true }\n",
                )
                .unwrap();
                bad_reloads += 1;
            } else if tick % 8 == 0 {
                std::fs::write(&conf, config(&a.config_addr, &b_addr)).unwrap();
            } else {
                std::fs::write(&conf, config(&b_addr, &a.config_addr)).unwrap();
            }
            bin.signal(nix::sys::signal::Signal::SIGHUP);
            reloads += 1;
        }
        if tick % 6 == 0 {
            // The backend dies (socket file gone) and comes back on the same path.
            totals.epoch.fetch_add(1, Ordering::SeqCst);
            b = None;
            let _ = std::fs::remove_file(&b_path);
            restarts += 1;
        } else if b.is_none() {
            b = Some(Backend::start("b", Listen::Unix(b_path.clone()), &pki).await);
            totals.epoch.fetch_add(1, Ordering::SeqCst);
        }
    }
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    drop(b);
    // Let the router close what the clients just closed: wait until its connection count is 0.
    let settle = Instant::now();
    let (mut fd1, mut rss1) = proc_stat(pid);
    while fd1 > fd0 && settle.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (fd1, rss1) = proc_stat(pid);
    }
    let failures = totals.failures.load(Ordering::Relaxed);
    let mut ok = failures == 0;
    if fd1 - fd0 > FD_GROWTH_BOUND {
        eprintln!("soak: FAILURE: fds grew from {fd0} to {fd1} (bound +{FD_GROWTH_BOUND})");
        ok = false;
    }
    if rss1 - rss0 > RSS_GROWTH_BOUND_KIB {
        eprintln!("soak: FAILURE: RSS grew from {rss0} KiB to {rss1} KiB (bound +{RSS_GROWTH_BOUND_KIB} KiB)");
        ok = false;
    }
    if bin.child.try_wait().ok().flatten().is_some() {
        eprintln!("soak: FAILURE: sniplex exited");
        ok = false;
    }
    println!(
        "soak: {} in {:?}: connections={} bytes={} aborted={} failures={} restart_casualties={} reloads={} (invalid {}) backend_restarts={} fds {}->{} rss_kib {}->{}",
        if ok { "PASS" } else { "FAIL" },
        started.elapsed(),
        totals.connections.load(Ordering::Relaxed),
        totals.bytes.load(Ordering::Relaxed),
        totals.aborted.load(Ordering::Relaxed),
        failures,
        totals.casualties.load(Ordering::Relaxed),
        reloads,
        bad_reloads,
        restarts,
        fd0,
        fd1,
        rss0,
        rss1
    );
    ok
}

/// The TCP port a process listens on (from /proc/net/tcp and its socket inodes).
fn listening_port(pid: u32) -> Option<std::net::SocketAddr> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|t| {
            t.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
            let port = u16::from_str_radix(f[1].split(':').nth(1)?, 16).ok()?;
            return Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    None
}

async fn echo(
    addr: std::net::SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    name: &str,
    n: u64,
) -> std::io::Result<u64> {
    let s = tls_connect(addr, name, cfg.clone()).await?;
    let (mut rd, mut wr) = tokio::io::split(s);
    let w = tokio::spawn(async move {
        wr.write_all(b"ECHO\n").await?;
        write_pattern(&mut wr, n).await?;
        wr.shutdown().await
    });
    let got = read_all_sha(&mut rd).await?;
    w.await.map_err(std::io::Error::other)??;
    if got != (n, pattern_sha(n)) {
        return Err(std::io::Error::other(format!(
            "echo of {n} bytes came back as {} bytes, wrong checksum",
            got.0
        )));
    }
    Ok(2 * n)
}

async fn terminated_get(
    addr: std::net::SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> std::io::Result<u64> {
    let mut s = tls_connect(addr, "blog.test", cfg.clone()).await?;
    s.write_all(b"GET /soak HTTP/1.1\r\nHost: blog.test\r\n\r\n")
        .await?;
    let want = "blog GET /soak HTTP/1.1\n";
    let expect = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{want}",
        want.len()
    );
    let mut buf = vec![0u8; expect.len()];
    s.read_exact(&mut buf).await?;
    if buf != expect.as_bytes() {
        return Err(std::io::Error::other(format!(
            "terminated route answered {:?}",
            String::from_utf8_lossy(&buf)
        )));
    }
    Ok(buf.len() as u64)
}

async fn abort_midway(addr: std::net::SocketAddr, cfg: &Arc<rustls::ClientConfig>) {
    if let Ok(mut s) = tls_connect(addr, "git.test", cfg.clone()).await {
        let _ = s.write_all(b"ECHO\n").await;
        let _ = write_pattern(&mut s, 100_000).await;
        // Dropped without reading or closing cleanly.
    }
}
