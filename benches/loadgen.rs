//! Load generator for benches/compare.sh (a plain binary, `harness = false`):
//!
//!   loadgen conns   --addr IP:PORT --name SNI --ca PEM --secs S [--workers W] [--path P]
//!       full TLS handshake (no resumption) + one small request per connection; prints
//!       `conns=N secs=S rate=R`
//!   loadgen raw     --addr IP:PORT --name SNI --ca PEM --secs S [--workers W]
//!       proxy-bound connections: one real ClientHello for SNI, made once by rustls, is
//!       replayed on every connection, and whatever the backend answers is read to EOF (the
//!       benchmark routes it to a plain-HTTP backend, which answers 400 and closes). The
//!       client and backend do almost nothing, so the proxy sets the pace; prints like `conns`
//!   loadgen latency --addr IP:PORT --base IP:PORT --name SNI --ca PEM --samples N
//!       paired samples of connect + handshake + first response byte, `addr` then `base`,
//!       one at a time; prints `p50_us=.. p99_us=..` of (addr - base) and both medians
//!   loadgen idle    --addr IP:PORT --name SNI --ca PEM --count N
//!       opens N TLS connections and keeps them idle; prints `ready N`, exits when stdin closes
//!   loadgen silent  --addr IP:PORT --name SNI --ca PEM --count N [--trickle]
//!       opens N TCP connections that never send a whole ClientHello (slowloris), while one
//!       legitimate TLS client keeps making requests; waits until the router has closed every
//!       silent one; prints `opened N closed N legit_ok K legit_failed F secs S`

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn req(args: &[String], name: &str) -> String {
    arg(args, name).unwrap_or_else(|| panic!("missing {name}"))
}

fn client_config(ca: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca file") {
        roots.add(c.expect("ca pem")).expect("ca cert");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.resumption = rustls::client::Resumption::disabled();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

async fn one_request(
    addr: SocketAddr,
    name: &ServerName<'static>,
    cfg: &Arc<rustls::ClientConfig>,
    path: &str,
) -> std::io::Result<Duration> {
    let start = Instant::now();
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut s = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name.clone(), tcp)
        .await?;
    let host = match name {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        _ => "localhost".into(),
    };
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = [0u8; 16384];
    let n = s.read(&mut buf).await?;
    let first = start.elapsed();
    if n == 0 || !buf.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("no 200 response"));
    }
    while s.read(&mut buf).await? > 0 {}
    Ok(first)
}

/// The ClientHello rustls sends for `name`, as bytes on the wire.
fn client_hello(cfg: &Arc<rustls::ClientConfig>, name: &ServerName<'static>) -> Vec<u8> {
    let mut c = rustls::ClientConnection::new(cfg.clone(), name.clone()).expect("client");
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).expect("hello");
    }
    out
}

/// One proxy-bound connection: the hello out, the backend's answer in, to EOF.
async fn one_raw(addr: SocketAddr, hello: &[u8]) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(hello).await?;
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        match tcp.read(&mut buf).await? {
            0 => break,
            n => total += n,
        }
    }
    if total == 0 {
        return Err(std::io::Error::other("no answer"));
    }
    Ok(())
}

/// Runs `one` from `workers` tasks until `secs` have passed; prints the count and the rate.
fn closed_loop<F, Fut>(rt: &tokio::runtime::Runtime, secs: f64, workers: usize, one: F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send,
{
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    rt.block_on(async {
        let deadline = start + Duration::from_secs_f64(secs);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (one, done, failed) = (one.clone(), done.clone(), failed.clone());
            set.spawn(async move {
                while Instant::now() < deadline {
                    match one().await {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        while set.join_next().await.is_some() {}
    });
    let el = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "conns={n} failed={} secs={el:.3} rate={:.1}",
        failed.load(Ordering::Relaxed),
        n as f64 / el
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mode = args.get(1).cloned().unwrap_or_default();
    let addr: SocketAddr = req(&args, "--addr").parse().unwrap();
    let name = ServerName::try_from(req(&args, "--name")).unwrap();
    let cfg = client_config(&req(&args, "--ca"));
    match mode.as_str() {
        "conns" => {
            let secs: f64 = req(&args, "--secs").parse().unwrap();
            let workers: usize = arg(&args, "--workers").map_or(8, |w| w.parse().unwrap());
            let path = Arc::new(arg(&args, "--path").unwrap_or_else(|| "/small".into()));
            let name = Arc::new(name);
            closed_loop(&rt, secs, workers, move || {
                let (name, cfg, path) = (name.clone(), cfg.clone(), path.clone());
                async move { one_request(addr, &name, &cfg, &path).await.map(|_| ()) }
            });
        }
        "raw" => {
            let secs: f64 = req(&args, "--secs").parse().unwrap();
            let workers: usize = arg(&args, "--workers").map_or(8, |w| w.parse().unwrap());
            let hello: Arc<[u8]> = client_hello(&cfg, &name).into();
            closed_loop(&rt, secs, workers, move || {
                let hello = hello.clone();
                async move { one_raw(addr, &hello).await }
            });
        }
        "latency" => {
            let base: SocketAddr = req(&args, "--base").parse().unwrap();
            let samples: usize = req(&args, "--samples").parse().unwrap();
            let (mut diffs, mut a_all, mut b_all) = (Vec::new(), Vec::new(), Vec::new());
            rt.block_on(async {
                for _ in 0..samples {
                    let a = one_request(addr, &name, &cfg, "/small")
                        .await
                        .expect("proxy request");
                    let b = one_request(base, &name, &cfg, "/small")
                        .await
                        .expect("direct request");
                    diffs.push(a.as_secs_f64() * 1e6 - b.as_secs_f64() * 1e6);
                    a_all.push(a.as_secs_f64() * 1e6);
                    b_all.push(b.as_secs_f64() * 1e6);
                }
            });
            let pct = |v: &mut Vec<f64>, p: f64| {
                v.sort_by(|x, y| x.partial_cmp(y).unwrap());
                v[((v.len() - 1) as f64 * p).round() as usize]
            };
            println!(
                "p50_us={:.1} p99_us={:.1} proxy_p50_us={:.1} direct_p50_us={:.1}",
                pct(&mut diffs, 0.5),
                pct(&mut diffs, 0.99),
                pct(&mut a_all, 0.5),
                pct(&mut b_all, 0.5)
            );
        }
        "idle" => {
            let count: usize = req(&args, "--count").parse().unwrap();
            rt.block_on(async {
                let mut held = Vec::with_capacity(count);
                for i in 0..count {
                    let tcp = TcpStream::connect(addr)
                        .await
                        .unwrap_or_else(|e| panic!("connect {i}: {e}"));
                    let s = tokio_rustls::TlsConnector::from(cfg.clone())
                        .connect(name.clone(), tcp)
                        .await
                        .unwrap_or_else(|e| panic!("handshake {i}: {e}"));
                    held.push(s);
                }
                println!("ready {}", held.len());
                let mut sink = Vec::new();
                let _ = tokio::io::stdin().read_to_end(&mut sink).await;
                drop(held);
            });
        }
        "silent" => {
            let count: usize = req(&args, "--count").parse().unwrap();
            let trickle = args.iter().any(|a| a == "--trickle");
            rt.block_on(async {
                let start = Instant::now();
                let mut silent = Vec::with_capacity(count);
                for i in 0..count {
                    let mut s = TcpStream::connect(addr)
                        .await
                        .unwrap_or_else(|e| panic!("connect {i}: {e}"));
                    if trickle && i % 2 == 0 {
                        // The first bytes of a record, then nothing.
                        s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
                    }
                    silent.push(s);
                }
                println!("opened {count} in {:.1}s", start.elapsed().as_secs_f64());
                let closed = Arc::new(AtomicU64::new(0));
                let mut waits = tokio::task::JoinSet::new();
                for mut s in silent {
                    let closed = closed.clone();
                    waits.spawn(async move {
                        let mut b = [0u8; 16];
                        if matches!(s.read(&mut b).await, Ok(0) | Err(_)) {
                            closed.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
                let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
                let legit = {
                    let (ok, failed, name, cfg) =
                        (ok.clone(), failed.clone(), name.clone(), cfg.clone());
                    tokio::spawn(async move {
                        loop {
                            match one_request(addr, &name, &cfg, "/small").await {
                                Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                            };
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    })
                };
                while waits.join_next().await.is_some() {}
                legit.abort();
                println!(
                    "opened {count} closed {} legit_ok {} legit_failed {} secs {:.1}",
                    closed.load(Ordering::Relaxed),
                    ok.load(Ordering::Relaxed),
                    failed.load(Ordering::Relaxed),
                    start.elapsed().as_secs_f64()
                );
            });
        }
        other => panic!("unknown mode {other:?}"),
    }
}
