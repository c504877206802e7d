//! End-to-end passthrough: a rustls client -> sniplex (in-process, real sockets) -> a rustls
//! backend on Unix, abstract and TCP sockets.

mod common;

use common::*;
use rustls::AlertDescription;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct World {
    pki: Pki,
    _dir: tempfile::TempDir,
    git: Backend,
    chat: Backend,
    lab: Backend,
    v6: Backend,
    fallback: Backend,
}

/// Four backends, one per kind of address, plus a fallback.
async fn world() -> World {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let git = Backend::start("git", Listen::Unix(dir.path().join("git.sock")), &pki).await;
    let abstract_name = format!("sniplex-test-{}-{}", std::process::id(), rand_suffix());
    let chat = Backend::start("chat", Listen::Abstract(abstract_name), &pki).await;
    let lab = Backend::start("lab", Listen::Tcp("127.0.0.1:0".parse().unwrap()), &pki).await;
    let v6 = Backend::start("v6", Listen::Tcp("[::1]:0".parse().unwrap()), &pki).await;
    let fallback = Backend::start("fallback", Listen::Unix(dir.path().join("fb.sock")), &pki).await;
    World {
        pki,
        _dir: dir,
        git,
        chat,
        lab,
        v6,
        fallback,
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish()
}

impl World {
    fn config(&self, with_fallback: bool, extra: &str) -> String {
        let mut c = format!(
            "[routes]\n\
             \"git.test\" = \"{}\"\n\
             \"Chat.Test.\" = \"{}\"\n\
             \"*.lab.test\" = \"{}\"\n\
             \"v6.test\" = {{ backend = \"{}\" }}\n\
             \"down.test\" = \"unix:{}/nobody-listens.sock\"\n",
            self.git.config_addr,
            self.chat.config_addr,
            self.lab.config_addr,
            self.v6.config_addr,
            self._dir.path().display(),
        );
        if with_fallback {
            c += &format!("[fallback]\nbackend = \"{}\"\n", self.fallback.config_addr);
        }
        // All test clients come from 127.0.0.1: lift the per-address cap (256 by default).
        c += "[limits]\nmax_connections_per_ip = 10000\n";
        c += extra;
        c
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_exact_and_wildcard_name_to_every_kind_of_backend() {
    let w = world().await;
    let r = Router::start(&w.config(false, "")).await;
    assert_eq!(whoami(r.addr, "git.test", &w.pki).await.unwrap(), "git");
    assert_eq!(whoami(r.addr, "chat.test", &w.pki).await.unwrap(), "chat");
    assert_eq!(whoami(r.addr, "a.lab.test", &w.pki).await.unwrap(), "lab");
    assert_eq!(
        whoami(r.addr, "other.lab.test", &w.pki).await.unwrap(),
        "lab"
    );
    assert_eq!(whoami(r.addr, "v6.test", &w.pki).await.unwrap(), "v6");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_and_ipv4_listeners_together() {
    let w = world().await;
    let r = Router::start_with(
        &w.config(false, ""),
        sniplex::Options::default(),
        &["127.0.0.1:0", "[::1]:0"],
    )
    .await;
    assert!(r.addrs[1].is_ipv6());
    for addr in &r.addrs {
        assert_eq!(whoami(*addr, "git.test", &w.pki).await.unwrap(), "git");
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_name_without_fallback_gets_alert_112() {
    let w = world().await;
    let r = Router::start(&w.config(false, "")).await;
    let e = whoami(r.addr, "nobody.test", &w.pki).await.unwrap_err();
    assert_eq!(
        alert_of(&e),
        Some(AlertDescription::UnrecognisedName),
        "{e}"
    );
    // No SNI at all (rustls omits it for an IP address) and no fallback: the same alert.
    let e = whoami(r.addr, "127.0.0.1", &w.pki).await.unwrap_err();
    assert_eq!(
        alert_of(&e),
        Some(AlertDescription::UnrecognisedName),
        "{e}"
    );
    // The wildcard does not cover its own suffix.
    let e = whoami(r.addr, "lab.test", &w.pki).await.unwrap_err();
    assert_eq!(
        alert_of(&e),
        Some(AlertDescription::UnrecognisedName),
        "{e}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_takes_unknown_names_and_hellos_without_sni() {
    let w = world().await;
    let r = Router::start(&w.config(true, "")).await;
    assert_eq!(
        whoami(r.addr, "nobody.test", &w.pki).await.unwrap(),
        "fallback"
    );
    assert_eq!(
        whoami(r.addr, "127.0.0.1", &w.pki).await.unwrap(),
        "fallback"
    );
    assert_eq!(whoami(r.addr, "git.test", &w.pki).await.unwrap(), "git");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_gets_alert_80_and_router_keeps_serving() {
    let w = world().await;
    let r = Router::start(&w.config(true, "")).await;
    let e = whoami(r.addr, "down.test", &w.pki).await.unwrap_err();
    assert_eq!(alert_of(&e), Some(AlertDescription::InternalError), "{e}");
    // A TCP backend that refuses.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let r2 = Router::start(&format!("[routes]\n\"x.test\" = \"127.0.0.1:{port}\"\n")).await;
    let e = whoami(r2.addr, "x.test", &w.pki).await.unwrap_err();
    assert_eq!(alert_of(&e), Some(AlertDescription::InternalError), "{e}");
    assert_eq!(whoami(r.addr, "git.test", &w.pki).await.unwrap(), "git");
    r.stop().await;
    r2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connect_timeout_gets_alert_80() {
    // A listener whose backlog is full never completes the connect: fill it, then route to it.
    let pki = Pki::new();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(0).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr.into());
        fillers.push(s);
    }
    let r = Router::start(&format!(
        "[routes]\n\"slow.test\" = \"{addr}\"\n[timeouts]\nconnect = \"300ms\"\n"
    ))
    .await;
    let e = whoami(r.addr, "slow.test", &pki).await.unwrap_err();
    assert_eq!(alert_of(&e), Some(AlertDescription::InternalError), "{e}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hello_one_byte_per_write() {
    let w = world().await;
    let r = Router::start(&w.config(false, "")).await;
    let tcp = TcpStream::connect(r.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut s = tls_connect_over(
        Chunked::new(tcp, 1, 4096),
        "git.test",
        w.pki.client_config(&[]),
    )
    .await
    .unwrap();
    s.write_all(b"ID\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "git\n");
    drop(s);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hello_split_over_three_records() {
    let mut w = world().await;
    let r = Router::start(&w.config(false, "")).await;
    let tcp = TcpStream::connect(r.addr).await.unwrap();
    let mut s = tls_connect_over(
        Refragment::new(tcp, 3),
        "git.test",
        w.pki.client_config(&[]),
    )
    .await
    .unwrap();
    s.write_all(b"SINK\nabc").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("3 "), "{out}");
    assert_eq!(w.git.next_seen().await.bytes, 3);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_kib_client_hello() {
    let w = world().await;
    let r = Router::start(&w.config(false, "")).await;
    // 40 ALPN names of 150 bytes: the hello is over 6 KiB, several TCP segments.
    let names: Vec<Vec<u8>> = (0..40)
        .map(|i| format!("{i:03}{}", "x".repeat(147)).into_bytes())
        .collect();
    let refs: Vec<&[u8]> = names.iter().map(|n| n.as_slice()).collect();
    let config = w.pki.client_config(&refs);
    // Check the premise: the hello really is that large.
    let mut probe = rustls::ClientConnection::new(config.clone(), server_name("git.test")).unwrap();
    let mut hello = Vec::new();
    while probe.wants_write() {
        probe.write_tls(&mut hello).unwrap();
    }
    assert!(
        hello.len() > 6 * 1024,
        "hello is only {} bytes",
        hello.len()
    );
    let mut s = tls_connect(r.addr, "git.test", config).await.unwrap();
    s.write_all(b"ID\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "git\n");
    drop(s);
    r.stop().await;
}

/// Sends `input`, then expects the router to close the connection promptly.
async fn expect_closed(addr: std::net::SocketAddr, input: &[u8]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(input).await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue, // an alert record, then EOF
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("router did not close the connection");
    if let Err(e) = r {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_http_and_sslv2_are_closed_and_router_keeps_serving() {
    let w = world().await;
    let r = Router::start(&w.config(true, "")).await;
    let inputs: [&[u8]; 5] = [
        b"GET / HTTP/1.1\r\nHost: git.test\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2p1\r\n",
        // SSLv2-compatible ClientHello header (RFC 5246 appendix E.2).
        b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10",
        &[0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02, 0x03],
        // Looks like TLS, claims a 1 MiB handshake message.
        &[0x16, 3, 1, 0, 4, 1, 0x10, 0, 0],
    ];
    for input in inputs {
        expect_closed(r.addr, input).await;
        assert_eq!(whoami(r.addr, "git.test", &w.pki).await.unwrap(), "git");
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_closed_after_client_hello_timeout_while_others_are_served() {
    let w = world().await;
    let r = Router::start(&w.config(false, "[timeouts]\nclient_hello = \"300ms\"\n")).await;
    let mut silent = TcpStream::connect(r.addr).await.unwrap();
    // A half-sent hello counts as silent too.
    let mut partial = TcpStream::connect(r.addr).await.unwrap();
    partial.write_all(&[0x16, 3, 1, 0, 200, 1]).await.unwrap();
    // Others are served while the two wait.
    assert_eq!(whoami(r.addr, "git.test", &w.pki).await.unwrap(), "git");
    let started = std::time::Instant::now();
    for s in [&mut silent, &mut partial] {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    // Closed by the timeout, not by something else earlier (a lower bound only).
    assert!(started.elapsed() >= Duration::from_millis(100));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_client_first() {
    let mut w = world().await;
    let r = Router::start(&w.config(false, "")).await;
    let mut s = tls_connect(r.addr, "git.test", w.pki.client_config(&[]))
        .await
        .unwrap();
    s.write_all(b"SINK\n").await.unwrap();
    write_pattern(&mut s, 100_000).await.unwrap();
    // Client closes its sending side; the backend still answers on the other direction.
    s.shutdown().await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, format!("100000 {}\n", pattern_sha(100_000)));
    assert_eq!(w.git.next_seen().await.bytes, 100_000);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_backend_first() {
    let mut w = world().await;
    let r = Router::start(&w.config(false, "")).await;
    let mut s = tls_connect(r.addr, "a.lab.test", w.pki.client_config(&[]))
        .await
        .unwrap();
    s.write_all(b"SOURCE 200000\n").await.unwrap();
    // The backend sends everything and closes its side: we see EOF...
    let (n, sha) = read_all_sha(&mut s).await.unwrap();
    assert_eq!((n, sha), (200_000, pattern_sha(200_000)));
    // ...and our direction still flows afterwards.
    write_pattern(&mut s, 300_000).await.unwrap();
    s.shutdown().await.unwrap();
    let seen = w.lab.next_seen().await;
    assert_eq!(seen.bytes, 300_000);
    assert_eq!(seen.sha, pattern_sha(300_000));
    r.stop().await;
}

async fn echo_64mib(mode: sniplex::splice::ForwardMode) {
    const N: u64 = 64 << 20;
    let mut w = world().await;
    let r = Router::start_with(
        &w.config(false, ""),
        sniplex::Options {
            forward: mode,
            ..Default::default()
        },
        &["127.0.0.1:0"],
    )
    .await;
    let s = tls_connect(r.addr, "git.test", w.pki.client_config(&[]))
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        wr.write_all(b"ECHO\n").await.unwrap();
        write_pattern(&mut wr, N).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    let (n, sha) = read_all_sha(&mut rd).await.unwrap();
    writer.await.unwrap();
    let expected = pattern_sha(N);
    assert_eq!((n, &sha), (N, &expected), "backend -> client");
    let seen = w.git.next_seen().await;
    assert_eq!((seen.bytes, &seen.sha), (N, &expected), "client -> backend");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_64_mib_each_way_splice() {
    echo_64mib(sniplex::splice::ForwardMode::Splice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_64_mib_each_way_copy() {
    echo_64mib(sniplex::splice::ForwardMode::Copy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_connections() {
    let w = world().await;
    let r = Router::start(&w.config(false, "")).await;
    let config = w.pki.client_config(&[]);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..500u64 {
        let config = config.clone();
        let addr = r.addr;
        tasks.spawn(async move {
            let name = ["git.test", "chat.test", "x.lab.test", "v6.test"][(i % 4) as usize];
            let s = tls_connect(addr, name, config).await?;
            let (mut rd, mut wr) = tokio::io::split(s);
            wr.write_all(b"ECHO\n").await?;
            let n = 1000 + i * 37;
            write_pattern(&mut wr, n).await?;
            wr.shutdown().await?;
            let got = read_all_sha(&mut rd).await?;
            assert_eq!(got, (n, pattern_sha(n)));
            Ok::<_, std::io::Error>(())
        });
    }
    let mut ok = 0;
    while let Some(res) = tasks.join_next().await {
        res.unwrap().unwrap();
        ok += 1;
    }
    assert_eq!(ok, 500);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_both_sides() {
    let mut w = world().await;
    let r = Router::start(&w.config(false, "[timeouts]\nidle = \"300ms\"\n")).await;
    let mut s = tls_connect(r.addr, "git.test", w.pki.client_config(&[]))
        .await
        .unwrap();
    s.write_all(b"HOLD\n").await.unwrap();
    // No bytes either way: the router closes both sides; the backend sees EOF...
    let seen = w.git.next_seen().await;
    assert_eq!(seen.command, "HOLD");
    // ...and so do we, without the backend's reply (the backend side was closed too).
    let mut buf = Vec::new();
    let res = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(res.is_err() || buf.is_empty(), "got {buf:?}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_open_connections_then_refuses_new_ones() {
    let w = world().await;
    let r = Router::start(&w.config(false, "")).await;
    let addr = r.addr;
    let mut s = tls_connect(addr, "git.test", w.pki.client_config(&[]))
        .await
        .unwrap();
    s.write_all(b"ECHO\nping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    let stopping = tokio::spawn(r.stop());
    // The open connection keeps working during the drain.
    s.write_all(b"pong").await.unwrap();
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener still open after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_64_mib_each_way_auto() {
    // The default: from the client's TCP socket, read/write for small chunks and splice once
    // bulk flows; pooled read/write from the Unix backend.
    echo_64mib(sniplex::splice::ForwardMode::Auto).await;
}
