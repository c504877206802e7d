//! Hostile input, overload and faults: limits, slowloris, fd exhaustion, access control, a
//! PROXY-protocol listener, backend failover and misbehaving backends.

mod common;

use common::*;
use rustls::AlertDescription;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn connect_from(src: &str, addr: SocketAddr) -> TcpStream {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .unwrap();
    sock.bind(SocketAddr::new(src.parse().unwrap(), 0)).unwrap();
    let s = sock.connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s
}

async fn whoami_from(
    src: &str,
    addr: SocketAddr,
    name: &str,
    pki: &Pki,
) -> std::io::Result<String> {
    let tcp = connect_from(src, addr).await;
    let mut s = tls_connect_over(tcp, name, pki.client_config(&[])).await?;
    s.write_all(b"ID\n").await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out.trim().to_owned())
}

/// The router closes this connection without a word: EOF (or a reset) comes promptly.
async fn expect_dropped(mut s: TcpStream) {
    let mut buf = [0u8; 16];
    match tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("connection left open")
    {
        Ok(0) => {}
        Ok(n) => panic!("got {n} bytes from a refused connection"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

/// Retries `f` until it succeeds (a slot is given back a moment after the client closes).
async fn eventually<F, Fut, T>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<T>>,
{
    let end = std::time::Instant::now() + DEADLINE;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() > end => panic!("never succeeded: {e}"),
            Err(_) => tokio::task::yield_now().await,
        }
    }
}

struct World {
    pki: Pki,
    dir: tempfile::TempDir,
    git: Backend,
}

async fn world() -> World {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let git = Backend::start("git", Listen::Unix(dir.path().join("git.sock")), &pki).await;
    World { pki, dir, git }
}

async fn held(addr: SocketAddr, w: &World) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut s = tls_connect(addr, "git.test", w.pki.client_config(&[]))
        .await
        .unwrap();
    s.write_all(b"ECHO\nx").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_closes_new_ones_and_spares_open_ones() {
    let w = world().await;
    let r = Router::start(&format!(
        "[limits]\nmax_connections = 3\n[routes]\n\"git.test\" = \"{}\"\n",
        w.git.config_addr
    ))
    .await;
    let mut open = vec![
        held(r.addr, &w).await,
        held(r.addr, &w).await,
        held(r.addr, &w).await,
    ];
    expect_dropped(TcpStream::connect(r.addr).await.unwrap()).await;
    // The open ones are unaffected.
    for s in &mut open {
        s.write_all(b"y").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");
    }
    open.pop();
    assert_eq!(
        eventually(|| whoami(r.addr, "git.test", &w.pki)).await,
        "git"
    );
    drop(open);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_limit_counts_each_client_address() {
    let w = world().await;
    let r = Router::start(&format!(
        "[limits]\nmax_connections_per_ip = 2\n[routes]\n\"git.test\" = \"{}\"\n",
        w.git.config_addr
    ))
    .await;
    let a1 = tls_connect_over(
        connect_from("127.0.0.1", r.addr).await,
        "git.test",
        w.pki.client_config(&[]),
    )
    .await
    .unwrap();
    let a2 = tls_connect_over(
        connect_from("127.0.0.1", r.addr).await,
        "git.test",
        w.pki.client_config(&[]),
    )
    .await
    .unwrap();
    expect_dropped(connect_from("127.0.0.1", r.addr).await).await;
    // Another address is not affected by the first one's count.
    assert_eq!(
        whoami_from("127.0.0.2", r.addr, "git.test", &w.pki)
            .await
            .unwrap(),
        "git"
    );
    drop((a1, a2));
    assert_eq!(
        eventually(|| whoami_from("127.0.0.1", r.addr, "git.test", &w.pki)).await,
        "git"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_handshakes_bounds_clients_that_have_not_sent_a_hello() {
    let w = world().await;
    let r = Router::start(&format!(
        "[limits]\nmax_handshakes = 2\nmax_connections_per_ip = 100\n[routes]\n\"git.test\" = \"{}\"\n",
        w.git.config_addr
    ))
    .await;
    // A connection that finished its hello no longer counts.
    let done = held(r.addr, &w).await;
    let silent = [
        TcpStream::connect(r.addr).await.unwrap(),
        TcpStream::connect(r.addr).await.unwrap(),
    ];
    // Both slots are taken by silent clients: the next connection is closed at once.
    let mut third = None;
    for _ in 0..100 {
        // The silent ones are admitted asynchronously: wait until the third is refused.
        let s = TcpStream::connect(r.addr).await.unwrap();
        let mut buf = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(200), s.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                third = Some(());
                break;
            }
            _ => continue,
        }
    }
    assert!(third.is_some(), "a third pending handshake was admitted");
    drop(silent);
    assert_eq!(
        eventually(|| whoami(r.addr, "git.test", &w.pki)).await,
        "git"
    );
    drop(done);
    r.stop().await;
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_closed_by_the_hello_timeout_while_others_are_served() {
    const N: usize = 500;
    let w = world().await;
    let conf = w.dir.path().join("sniplex.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = [\"127.0.0.1:0\"]\n[limits]\nmax_connections_per_ip = 10000\n[timeouts]\nclient_hello = \"1s\"\n[routes]\n\"git.test\" = \"{}\"\n",
            w.git.config_addr
        ),
    )
    .unwrap();
    let bin = Binary::start(&conf, 1);
    let pid = bin.child.id();
    let addr = bin.addrs[0];
    assert_eq!(whoami(addr, "git.test", &w.pki).await.unwrap(), "git");
    let rss_before = rss_kib(pid);
    let mut silent = Vec::new();
    for i in 0..N {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Half of them trickle the first bytes of a record and then stall.
        if i % 2 == 0 {
            s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        }
        silent.push(s);
    }
    // Served throughout.
    for _ in 0..5 {
        assert_eq!(whoami(addr, "git.test", &w.pki).await.unwrap(), "git");
    }
    let rss_during = rss_kib(pid);
    let per_conn = (rss_during.saturating_sub(rss_before)) * 1024 / N as u64;
    assert!(
        per_conn < 16 * 1024,
        "{per_conn} bytes of RSS per silent connection"
    );
    // Every one of them is closed by the deadline.
    for s in silent {
        expect_dropped(s).await;
    }
    assert_eq!(whoami(addr, "git.test", &w.pki).await.unwrap(), "git");
    eprintln!("RSS before {rss_before} KiB, with {N} silent {rss_during} KiB ({per_conn} B each)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_backs_off_keeps_open_connections_and_recovers() {
    use std::os::unix::process::CommandExt;
    const LIMIT: u64 = 64;
    let w = world().await;
    let conf = w.dir.path().join("sniplex.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = [\"127.0.0.1:0\"]\n[metrics]\nlisten = \"127.0.0.1:0\"\n[limits]\nmax_connections_per_ip = 10000\n[timeouts]\nclient_hello = \"30s\"\n[routes]\n\"git.test\" = \"{}\"\n",
            w.git.config_addr
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(Binary::exe());
    cmd.args(["run", "-c"]).arg(&conf);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, LIMIT, LIMIT)
                .map_err(std::io::Error::from)
        });
    }
    let mut bin = Binary::start_cmd(cmd, 1);
    let metrics_addr = bin.addr_of("metrics endpoint");
    let pid = bin.child.id();
    let addr = bin.addrs[0];
    // One healthy connection first: it must keep streaming through the exhaustion.
    let mut healthy = held(addr, &w).await;
    // Exhaust: silent connections until the process has no descriptor left.
    let mut flood = Vec::new();
    while fd_count(pid) < LIMIT as usize && flood.len() < 200 {
        flood.push(TcpStream::connect(addr).await.unwrap());
        tokio::task::yield_now().await;
    }
    for _ in 0..50 {
        flood.push(TcpStream::connect(addr).await.unwrap());
    }
    bin.wait_for("backing off");
    for i in 0..20u8 {
        healthy.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        healthy.read_exact(&mut b).await.unwrap();
        assert_eq!(b[0], i);
    }
    // Let the exhaustion last a while, measured by the router's own log, not by a timer here.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        healthy.write_all(b"z").await.unwrap();
        let mut b = [0u8; 1];
        healthy.read_exact(&mut b).await.unwrap();
    }
    // More than every buffer on the way holds, echoed back: writes to the backend find its
    // socket full while no descriptor is free to register for writability, and must still
    // all go through (retried after a pause).
    const BIG: usize = 16 << 20;
    let (mut rd, mut wr) = tokio::io::split(healthy);
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        for _ in 0..BIG / chunk.len() {
            wr.write_all(&chunk).await?;
        }
        // The TLS session may still hold the last records.
        wr.flush().await?;
        Ok::<_, std::io::Error>(wr)
    });
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while got < BIG {
        let n = match tokio::time::timeout(DEADLINE, rd.read(&mut buf)).await {
            Ok(r) => r.unwrap(),
            Err(_) => panic!(
                "transfer stalled after {got} bytes; log: {:#?}",
                bin.log.lock().unwrap()
            ),
        };
        assert!(n > 0, "connection closed after {got} bytes");
        assert!(buf[..n].iter().all(|&b| b == 7), "bytes changed on the way");
        got += n;
    }
    let healthy = rd.unsplit(writer.await.unwrap().unwrap());
    bin.wait_for("no file descriptor free to wait on it");
    drop(flood);
    // Recovered: new clients are served again.
    assert_eq!(eventually(|| whoami(addr, "git.test", &w.pki)).await, "git");
    let scrape = eventually(|| async {
        let s = tokio::time::timeout(Duration::from_secs(2), http_get(&metrics_addr, "/metrics"))
            .await
            .map_err(|_| std::io::Error::other("scrape timed out"))?;
        Ok::<_, std::io::Error>(s)
    })
    .await;
    let errors: f64 = scrape
        .lines()
        .find(|l| l.starts_with("sniplex_accept_errors_total{kind=\"exhausted\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    // With a 100 ms back-off a second of exhaustion costs about ten failed accepts per
    // listener; a spinning loop would have counted hundreds of thousands.
    assert!(
        (1.0..1000.0).contains(&errors),
        "{errors} exhausted accepts"
    );
    drop(healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_refuse_as_if_the_name_did_not_exist() {
    let w = world().await;
    let other = Backend::start("fb", Listen::Unix(w.dir.path().join("fb.sock")), &w.pki).await;
    let r = Router::start_with(
        &format!(
            "[routes.\"git.test\"]\nbackend = \"{g}\"\nallow = [\"127.0.0.0/30\", \"::1\"]\ndeny = [\"127.0.0.2\"]\n\
             [routes.\"x.test\"]\nbackend = \"{g}\"\ndeny = [\"::/0\"]\n\
             [fallback]\nbackend = \"{f}\"\nallow = [\"127.0.0.1/32\"]\n",
            g = w.git.config_addr,
            f = other.config_addr
        ),
        sniplex::Options::default(),
        &["127.0.0.1:0", "[::1]:0"],
    )
    .await;
    let (v4, v6) = (r.addrs[0], r.addrs[1]);
    assert_eq!(
        whoami_from("127.0.0.1", v4, "git.test", &w.pki)
            .await
            .unwrap(),
        "git"
    );
    assert_eq!(
        whoami_from("127.0.0.3", v4, "git.test", &w.pki)
            .await
            .unwrap(),
        "git"
    );
    assert_eq!(
        whoami_from("::1", v6, "git.test", &w.pki).await.unwrap(),
        "git"
    );
    for (src, addr, name) in [
        ("127.0.0.2", v4, "git.test"),
        ("127.0.0.9", v4, "git.test"),
        ("::1", v6, "x.test"),
    ] {
        let e = whoami_from(src, addr, name, &w.pki).await.unwrap_err();
        assert_eq!(
            alert_of(&e),
            Some(AlertDescription::UnrecognisedName),
            "{src} {name}: {e}"
        );
    }
    // x.test denies only IPv6.
    assert_eq!(
        whoami_from("127.0.0.1", v4, "x.test", &w.pki)
            .await
            .unwrap(),
        "git"
    );
    // The fallback has its own list.
    assert_eq!(
        whoami_from("127.0.0.1", v4, "127.0.0.1", &w.pki)
            .await
            .unwrap(),
        "fb"
    );
    let e = whoami_from("127.0.0.5", v4, "127.0.0.1", &w.pki)
        .await
        .unwrap_err();
    assert_eq!(
        alert_of(&e),
        Some(AlertDescription::UnrecognisedName),
        "{e}"
    );
    r.stop().await;
}

fn v2_header(src: SocketAddr, dst: SocketAddr, local: bool) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let cmd = if local {
        Command::Local
    } else {
        Command::Proxy
    };
    Builder::with_addresses(Version::Two | cmd, Protocol::Stream, (src, dst))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_listener_takes_the_client_address_from_the_header() {
    let w = world().await;
    let r = Router::start(&format!(
        "[listener]\naccept_proxy_protocol = true\n[limits]\nmax_connections_per_ip = 1\n\
         [routes.\"git.test\"]\nbackend = \"{}\"\ndeny = [\"203.0.113.0/24\"]\n",
        w.git.config_addr
    ))
    .await;
    let via = |header: Vec<u8>| {
        let (addr, config) = (r.addr, w.pki.client_config(&[]));
        async move {
            let mut tcp = TcpStream::connect(addr).await?;
            tcp.write_all(&header).await?;
            let mut s = tls_connect_over(tcp, "git.test", config).await?;
            s.write_all(b"ID\n").await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out.trim().to_owned())
        }
    };
    let lb: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    assert_eq!(via(v2_header(client, lb, false)).await.unwrap(), "git");
    assert_eq!(
        via(b"PROXY TCP4 198.51.100.8 127.0.0.1 5000 443\r\n".to_vec())
            .await
            .unwrap(),
        "git"
    );
    assert_eq!(
        via(b"PROXY TCP6 2001:db8::1 ::1 5000 443\r\n".to_vec())
            .await
            .unwrap(),
        "git"
    );
    // A LOCAL header (the balancer's health check) stands for the balancer itself.
    assert_eq!(via(v2_header(client, lb, true)).await.unwrap(), "git");
    // deny applies to the address in the header, not to the balancer.
    let e = via(v2_header("203.0.113.9:1".parse().unwrap(), lb, false))
        .await
        .unwrap_err();
    assert_eq!(
        alert_of(&e),
        Some(AlertDescription::UnrecognisedName),
        "{e}"
    );
    // So does the per-address cap: one connection per client address behind the balancer.
    let held_tcp = {
        let mut tcp = TcpStream::connect(r.addr).await.unwrap();
        tcp.write_all(&v2_header("198.51.100.50:1".parse().unwrap(), lb, false))
            .await
            .unwrap();
        let mut s = tls_connect_over(tcp, "git.test", w.pki.client_config(&[]))
            .await
            .unwrap();
        s.write_all(b"ECHO\na").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        s
    };
    assert!(
        via(v2_header("198.51.100.50:2".parse().unwrap(), lb, false))
            .await
            .is_err()
    );
    assert_eq!(
        via(v2_header("198.51.100.51:2".parse().unwrap(), lb, false))
            .await
            .unwrap(),
        "git"
    );
    drop(held_tcp);
    // Without a header (a plain TLS client), or with garbage: closed.
    assert!(whoami(r.addr, "git.test", &w.pki).await.is_err());
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(b"PROXY GARBAGE\r\n").await.unwrap();
    expect_dropped(s).await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_tries_backends_in_order_and_finds_a_restarted_one() {
    let w = world().await;
    let dead_tcp = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let missing = w.dir.path().join("missing.sock");
    let b_path = w.dir.path().join("b.sock");
    let b = Backend::start("b", Listen::Unix(b_path.clone()), &w.pki).await;
    let r = Router::start(&format!(
        "[timeouts]\nconnect = \"1s\"\n[routes]\n\"git.test\" = [\"unix:{}\", \"{dead_tcp}\", \"{}\"]\n\"solo.test\" = \"{}\"\n",
        missing.display(),
        b.config_addr,
        b.config_addr
    ))
    .await;
    // A bare list as the route value is the same as `backend = [...]`.
    assert_eq!(whoami(r.addr, "git.test", &w.pki).await.unwrap(), "b");
    // The backend goes away (socket file deleted)...
    drop(b);
    std::fs::remove_file(&b_path).unwrap();
    let e = whoami(r.addr, "solo.test", &w.pki).await.unwrap_err();
    assert_eq!(alert_of(&e), Some(AlertDescription::InternalError), "{e}");
    // ...and comes back on the same path: reached again without a reload.
    let _b2 = Backend::start("b2", Listen::Unix(b_path), &w.pki).await;
    assert_eq!(whoami(r.addr, "solo.test", &w.pki).await.unwrap(), "b2");
    assert_eq!(whoami(r.addr, "git.test", &w.pki).await.unwrap(), "b2");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_stream_closes_the_client_side() {
    let w = world().await;
    let path = w.dir.path().join("dies.sock");
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    // Accepts, sends part of a response, then dies (the socket closes with data unread).
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&[0x16, 3, 3, 0, 10, 2]).await;
            drop(s);
        }
    });
    let r = Router::start(&format!(
        "[routes]\n\"git.test\" = \"unix:{}\"\n",
        path.display()
    ))
    .await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    s.write_all(&sniplex::hello::testing::client_hello(
        Some("git.test"),
        &[],
        0,
    ))
    .await
    .unwrap();
    let mut got = Vec::new();
    let res = tokio::time::timeout(DEADLINE, s.read_to_end(&mut got))
        .await
        .expect("client side left hanging");
    assert!(res.is_err() || got == [0x16, 3, 3, 0, 10, 2], "{got:?}");
    drop(s);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_never_reads_holds_flow_control() {
    let w = world().await;
    let path = w.dir.path().join("stuck.sock");
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<tokio::net::UnixStream>(1);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            // Keep it open, never read.
            let _ = tx.send(s).await;
        }
    });
    let conf = w.dir.path().join("sniplex.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = [\"127.0.0.1:0\"]\n[routes]\n\"git.test\" = \"unix:{}\"\n",
            path.display()
        ),
    )
    .unwrap();
    let bin = Binary::start(&conf, 1);
    let rss_before = rss_kib(bin.child.id());
    let mut s = TcpStream::connect(bin.addrs[0]).await.unwrap();
    s.write_all(&sniplex::hello::testing::client_hello(
        Some("git.test"),
        &[],
        0,
    ))
    .await
    .unwrap();
    let _held = tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    // Write until the path is full: every buffer on the way (our socket, sniplex's socket and
    // pipe, the backend socket) fills, then writes stop being accepted.
    let chunk = vec![0x42u8; 64 * 1024];
    let mut written = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), s.write(&chunk)).await {
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => break, // blocked: flow control holds
        }
        assert!(
            written < 256 << 20,
            "256 MiB accepted by a backend that never reads"
        );
    }
    let rss_after = rss_kib(bin.child.id());
    assert!(written < 64 << 20, "{written} bytes in flight");
    // sniplex itself buffers nothing in user space on the splice path.
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    eprintln!("accepted {written} bytes before blocking; RSS {rss_before} -> {rss_after} KiB");
}
