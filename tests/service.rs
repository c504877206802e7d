//! Running as a service: socket activation (systemd-socket-activate and a hand-passed fd),
//! sd_notify, privilege drop, hot reload (also under load), Prometheus metrics, access log.

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn write(path: &Path, body: &str) {
    // Write-then-rename: a reload never sees a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn git_backend(dir: &Path, pki: &Pki) -> Backend {
    Backend::start("git", Listen::Unix(dir.join("git.sock")), pki).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_under_systemd_socket_activate() {
    let tool = "/usr/bin/systemd-socket-activate";
    if !Path::new(tool).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-socket-activate missing in CI"
        );
        eprintln!("skipped: {tool} not installed");
        return;
    }
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let git = git_backend(dir.path(), &pki).await;
    // `listen` names a port nobody may bind: socket activation must take precedence.
    let conf = dir.path().join("sniplex.toml");
    write(
        &conf,
        &format!(
            "listen = [\"192.0.2.1:1\"]\n[routes]\n\"git.test\" = \"{}\"\n",
            git.config_addr
        ),
    );
    let port = free_port();
    let mut cmd = Command::new(tool);
    cmd.args([
        "-l",
        &format!("127.0.0.1:{port}"),
        "--fdname=https",
        Binary::exe(),
        "run",
        "-c",
    ])
    .arg(&conf);
    // systemd-socket-activate starts the child on the first connection; it reports on stderr.
    let mut bin = Binary::start_cmd(cmd, 0);
    bin.wait_for(&format!("Listening on 127.0.0.1:{port}"));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(whoami(addr, "git.test", &pki).await.unwrap(), "git");
    let line = bin.wait_for("socket-activated");
    assert!(line.contains("[https]"), "{line}");
    assert_eq!(whoami(addr, "git.test", &pki).await.unwrap(), "git");
}

/// Runs the binary with `listener` as fd 3 and LISTEN_* set the way systemd does it.
fn spawn_with_fd(
    listener: &std::net::TcpListener,
    conf: &Path,
    extra_env: &[(&str, &str)],
) -> Binary {
    use std::os::fd::AsRawFd;
    let fd = listener.as_raw_fd();
    // LISTEN_PID must be the pid of the process that reads it: the shell execs sniplex, so
    // its $$ is sniplex's pid.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ exec {} run -c {}",
            Binary::exe(),
            conf.display()
        ))
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "tls");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    // SAFETY: dup2 is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Binary::start_cmd(cmd, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_an_fd_passed_like_systemd_and_reports_to_notify_socket() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let git = git_backend(dir.path(), &pki).await;
    let conf = dir.path().join("sniplex.toml");
    write(
        &conf,
        &format!(
            "listen = [\"192.0.2.1:1\"]\n[routes]\n\"git.test\" = \"{}\"\n",
            git.config_addr
        ),
    );
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(DEADLINE)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut bin = spawn_with_fd(
        &listener,
        &conf,
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    drop(listener);
    assert_eq!(bin.addrs, vec![addr]);
    let recv = move || {
        let mut buf = [0u8; 4096];
        let n = notify.recv(&mut buf).expect("no sd_notify message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.lines().any(|l| l == "READY=1"), "{first}");
    assert!(first.contains("STATUS="), "{first}");
    assert_eq!(whoami(addr, "git.test", &pki).await.unwrap(), "git");

    // Watchdog pings arrive (every WATCHDOG_USEC/2).
    let mut msgs = Vec::new();
    while !msgs.iter().any(|m: &String| m.contains("WATCHDOG=1")) {
        msgs.push(recv());
    }
    // Reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
    bin.signal(nix::sys::signal::Signal::SIGHUP);
    let mut m = recv();
    while !m.contains("RELOADING=1") {
        m = recv();
    }
    assert!(m.contains("MONOTONIC_USEC="), "{m}");
    let mut m = recv();
    while !m.contains("READY=1") {
        m = recv();
    }
    bin.signal(nix::sys::signal::Signal::SIGTERM);
    let mut m = recv();
    while !m.contains("STOPPING=1") {
        m = recv();
    }
    let status = tokio::task::spawn_blocking(move || bin.wait_exit())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_root_to_the_configured_user_after_binding() {
    if !nix::unistd::Uid::effective().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root; this test must run there"
        );
        eprintln!("skipped: needs root");
        return;
    }
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    // The unprivileged user must reach the backend socket (as with SupplementaryGroups=).
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let git = git_backend(dir.path(), &pki).await;
    std::fs::set_permissions(
        dir.path().join("git.sock"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let conf = dir.path().join("sniplex.toml");
    write(
        &conf,
        &format!(
            "listen = [\"127.0.0.1:0\"]\nuser = \"nobody\"\n[routes]\n\"git.test\" = \"{}\"\n",
            git.config_addr
        ),
    );
    let mut bin = Binary::start(&conf, 1);
    bin.wait_for("dropped privileges");
    let status = std::fs::read_to_string(format!("/proc/{}/status", bin.child.id())).unwrap();
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let uids: Vec<u32> = uid_line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(uids, vec![nobody; 4], "{uid_line}");
    let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
    assert!(!groups.split_whitespace().any(|g| g == "0"), "{groups}");
    assert_eq!(whoami(bin.addrs[0], "git.test", &pki).await.unwrap(), "git");
}

#[test]
fn user_without_root_is_a_clear_error() {
    if nix::unistd::Uid::effective().is_root() {
        // As root the drop succeeds; the non-root path is covered on developer machines.
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("sniplex.toml");
    write(&conf, "listen = [\"127.0.0.1:0\"]\nuser = \"nobody\"\n");
    let out = Command::new(Binary::exe())
        .args(["run", "-c"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running as root"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_routes_keeps_open_connections_and_survives_invalid_configs() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let a = Backend::start("a", Listen::Unix(dir.path().join("a.sock")), &pki).await;
    let b = Backend::start("b", Listen::Unix(dir.path().join("b.sock")), &pki).await;
    let conf = dir.path().join("sniplex.toml");
    write(
        &conf,
        &format!("[routes]\n\"git.test\" = \"{}\"\n", a.config_addr),
    );
    let r = Router::start_file(&conf).await;
    assert_eq!(whoami(r.addr, "git.test", &pki).await.unwrap(), "a");

    // An open connection through the old map.
    let mut open = tls_connect(r.addr, "git.test", pki.client_config(&[]))
        .await
        .unwrap();
    open.write_all(b"ECHO\none").await.unwrap();
    let mut buf = [0u8; 3];
    open.read_exact(&mut buf).await.unwrap();

    write(
        &conf,
        &format!(
            "[routes]\n\"git.test\" = \"{}\"\n\"x.test\" = \"{}\"\n",
            b.config_addr, a.config_addr
        ),
    );
    let summary = r.reload().await.unwrap();
    assert!(summary.contains("2 routes"), "{summary}");
    assert_eq!(whoami(r.addr, "git.test", &pki).await.unwrap(), "b");
    assert_eq!(whoami(r.addr, "x.test", &pki).await.unwrap(), "a");

    // Invalid: the error names the file, and the running config stays.
    write(&conf, "[routes]\n\"a.*.test\" = \"unix:/x\"\n");
    let err = r.reload().await.unwrap_err();
    assert!(err.contains(&format!("{}:2:1", conf.display())), "{err}");
    assert_eq!(whoami(r.addr, "git.test", &pki).await.unwrap(), "b");
    std::fs::remove_file(&conf).unwrap();
    assert!(r.reload().await.unwrap_err().contains("cannot read config"));
    assert_eq!(whoami(r.addr, "x.test", &pki).await.unwrap(), "a");

    // The connection opened before all this still works, still to backend a.
    open.write_all(b"two").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"two");
    drop(open);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_lose_nothing() {
    const CLIENTS: usize = 8;
    const STREAM: u64 = 256 * 1024;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let a = Backend::start("a", Listen::Unix(dir.path().join("a.sock")), &pki).await;
    let b = Backend::start("b", Listen::Unix(dir.path().join("b.sock")), &pki).await;
    let data = Backend::start("data", Listen::Unix(dir.path().join("data.sock")), &pki).await;
    let conf = dir.path().join("sniplex.toml");
    let valid = |probe: &str| {
        format!(
            "[routes]\n\"git.test\" = \"{}\"\n\"x.test\" = \"{probe}\"\n",
            data.config_addr
        )
    };
    write(&conf, &valid(&a.config_addr));
    let r = std::sync::Arc::new(Router::start_file(&conf).await);
    let stop = tokio_util::sync::CancellationToken::new();
    let config = pki.client_config(&[]);

    // Clients: each streams STREAM bytes through an echo and checks them, over and over.
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (addr, config, stop) = (r.addr, config.clone(), stop.clone());
        clients.spawn(async move {
            let mut done = 0u64;
            while !stop.is_cancelled() {
                let s = tls_connect(addr, "git.test", config.clone()).await?;
                let (mut rd, mut wr) = tokio::io::split(s);
                let w = tokio::spawn(async move {
                    wr.write_all(b"ECHO\n").await?;
                    write_pattern(&mut wr, STREAM).await?;
                    wr.shutdown().await
                });
                let got = read_all_sha(&mut rd).await?;
                w.await.unwrap()?;
                assert_eq!(got, (STREAM, pattern_sha(STREAM)));
                done += 1;
            }
            Ok::<u64, std::io::Error>(done)
        });
    }

    for i in 0..20 {
        if i % 4 == 3 {
            write(
                &conf,
                "[routes]\n\"x.test\" = { backend = \"unix:/x\", bogus = 1 }\n",
            );
            assert!(r.reload().await.is_err(), "reload {i} should fail");
        } else {
            let (target, id) = if i % 2 == 0 { (&b, "b") } else { (&a, "a") };
            write(&conf, &valid(&target.config_addr));
            r.reload()
                .await
                .unwrap_or_else(|e| panic!("reload {i}: {e}"));
            assert_eq!(
                whoami(r.addr, "x.test", &pki).await.unwrap(),
                id,
                "after reload {i}"
            );
        }
    }
    stop.cancel();
    let mut streams = 0;
    while let Some(res) = clients.join_next().await {
        streams += res
            .unwrap()
            .expect("a client connection failed during reloads");
    }
    assert!(
        streams >= CLIENTS as u64,
        "only {streams} streams completed"
    );
    std::sync::Arc::into_inner(r).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rebinds_changed_listen_addresses() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let git = git_backend(dir.path(), &pki).await;
    let conf = dir.path().join("sniplex.toml");
    let routes = format!("[routes]\n\"git.test\" = \"{}\"\n", git.config_addr);
    let (p1, p2) = (free_port(), free_port());
    write(&conf, &format!("listen = [\"127.0.0.1:{p1}\"]\n{routes}"));
    let mut bin = Binary::start(&conf, 1);
    let a1: std::net::SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
    let a2: std::net::SocketAddr = format!("127.0.0.1:{p2}").parse().unwrap();
    assert_eq!(bin.addrs, vec![a1]);
    write(&conf, &format!("listen = [\"127.0.0.1:{p2}\"]\n{routes}"));
    bin.signal(nix::sys::signal::Signal::SIGHUP);
    bin.wait_for(&format!("no longer listening addr={a1}"));
    assert_eq!(whoami(a2, "git.test", &pki).await.unwrap(), "git");
    assert!(
        tokio::net::TcpStream::connect(a1).await.is_err(),
        "old address still open"
    );
}

fn metric(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_traffic_exactly() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let git = git_backend(dir.path(), &pki).await;
    let conf = dir.path().join("sniplex.toml");
    write(
        &conf,
        &format!(
            "listen = [\"127.0.0.1:0\"]\nlog_connections = true\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [routes]\n\"git.test\" = \"{}\"\n\"down.test\" = \"unix:{}/none.sock\"\n\
             [routes.\"x.test\"]\nbackend = \"{}\"\ndeny = [\"127.0.0.0/8\"]\n\
             [routes.\"blog.test\"]\nbackend = \"{}\"\nterminate = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n",
            git.config_addr,
            dir.path().display(),
            git.config_addr,
            git.config_addr,
        ),
    );
    pki.write_to(dir.path());
    let mut bin = Binary::start(&conf, 1);
    let metrics_addr = bin.addr_of("metrics endpoint");
    let addr = bin.addrs[0];

    let (mut sent, mut received) = (0u64, 0u64);
    for _ in 0..3 {
        let tcp = Counting::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let (r, w) = (tcp.read.clone(), tcp.written.clone());
        let mut s = tls_connect_over(tcp, "git.test", pki.client_config(&[]))
            .await
            .unwrap();
        s.write_all(b"ID\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        s.shutdown().await.unwrap();
        drop(s);
        sent += w.load(std::sync::atomic::Ordering::Relaxed);
        received += r.load(std::sync::atomic::Ordering::Relaxed);
    }
    for _ in 0..2 {
        assert!(whoami(addr, "nobody.test", &pki).await.is_err());
    }
    assert!(whoami(addr, "down.test", &pki).await.is_err());
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let _ = raw.read_to_end(&mut Vec::new()).await;
    // Refused by `deny`: alert 112, counted as denied.
    let e = whoami(addr, "x.test", &pki).await.unwrap_err();
    assert_eq!(
        alert_of(&e),
        Some(rustls::AlertDescription::UnrecognisedName),
        "{e}"
    );
    // A terminated route whose handshake fails: a real hello, then garbage.
    let mut conn =
        rustls::ClientConnection::new(pki.client_config(&[]), server_name("blog.test")).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(&hello).await.unwrap();
    raw.write_all(&[23, 3, 3, 0, 4, 1, 2, 3, 4]).await.unwrap();
    let _ = raw.read_to_end(&mut Vec::new()).await;

    let expect = [
        (
            "sniplex_connections_total{route=\"git.test\",outcome=\"ok\"}",
            3.0,
        ),
        (
            "sniplex_connections_total{route=\"none\",outcome=\"no_route\"}",
            2.0,
        ),
        (
            "sniplex_connections_total{route=\"down.test\",outcome=\"backend_error\"}",
            1.0,
        ),
        (
            "sniplex_connections_total{route=\"none\",outcome=\"not_tls\"}",
            1.0,
        ),
        ("sniplex_rejected_total{reason=\"no_route\"}", 2.0),
        ("sniplex_rejected_total{reason=\"backend_error\"}", 1.0),
        ("sniplex_rejected_total{reason=\"not_tls\"}", 1.0),
        ("sniplex_connections_active{route=\"git.test\"}", 0.0),
        (
            "sniplex_bytes_total{route=\"git.test\",direction=\"client_to_backend\"}",
            sent as f64,
        ),
        (
            "sniplex_bytes_total{route=\"git.test\",direction=\"backend_to_client\"}",
            received as f64,
        ),
        (
            "sniplex_connections_total{route=\"x.test\",outcome=\"denied\"}",
            1.0,
        ),
        ("sniplex_rejected_total{reason=\"denied\"}", 1.0),
        (
            "sniplex_connections_total{route=\"blog.test\",outcome=\"handshake_error\"}",
            1.0,
        ),
        ("sniplex_rejected_total{reason=\"handshake_error\"}", 1.0),
        ("sniplex_client_hello_seconds_count", 8.0),
        (
            "sniplex_backend_connect_seconds_count{route=\"git.test\"}",
            3.0,
        ),
        ("sniplex_config_reloads_total{result=\"ok\"}", 0.0),
        (
            &format!(
                "sniplex_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        ),
    ];
    // A connection is counted when the router has closed it, a moment after the client saw EOF
    // (a refused one after its alert linger): scrape until every expected count is there, then
    // assert them all (bounded by DEADLINE).
    let end = std::time::Instant::now() + DEADLINE;
    let scrape = loop {
        let s = http_get(&metrics_addr, "/metrics").await;
        let all = expect
            .iter()
            .all(|(series, value)| metric(&s, series) == Some(*value));
        if all || std::time::Instant::now() > end {
            break s;
        }
        tokio::task::yield_now().await;
    };
    for (series, value) in &expect {
        assert_eq!(metric(&scrape, series), Some(*value), "{series}\n{scrape}");
    }
    // The client's raw SNI never becomes a label.
    assert!(!scrape.contains("nobody.test"), "{scrape}");

    bin.signal(nix::sys::signal::Signal::SIGHUP);
    bin.wait_for("reloaded");
    let s = http_get(&metrics_addr, "/metrics").await;
    assert_eq!(
        metric(&s, "sniplex_config_reloads_total{result=\"ok\"}"),
        Some(1.0),
        "{s}"
    );

    // promtool (Prometheus's own checker) accepts the exposition.
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .output_with(&s)
    {
        Some(out) => assert!(
            out.status.success(),
            "promtool: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        None => {
            assert!(std::env::var_os("CI").is_none(), "promtool missing in CI");
            eprintln!("skipped promtool: not installed");
        }
    }

    // The access log: one line per finished connection with every field.
    let log = bin.log.lock().unwrap().join("\n");
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" connection ") || l.ends_with(" connection"))
        .collect();
    let ok_line = access
        .iter()
        .find(|l| l.contains("route=\"git.test\"") && l.contains("outcome=\"ok\""))
        .unwrap_or_else(|| panic!("no access line:\n{log}"));
    for field in [
        "peer=127.0.0.1:",
        "sni=\"git.test\"",
        "backend=\"unix:",
        "up=",
        "down=",
        "ms=",
    ] {
        assert!(ok_line.contains(field), "{field} missing in {ok_line}");
    }
    assert!(access
        .iter()
        .any(|l| l.contains("outcome=\"no_route\"") && l.contains("sni=\"nobody.test\"")));
    // With the access log on, a rejection is logged once (by the access line).
    assert!(!log.contains("rejected: no route"), "{log}");
}

trait OutputWith {
    fn output_with(&mut self, stdin: &str) -> Option<std::process::Output>;
}

impl OutputWith for Command {
    fn output_with(&mut self, stdin: &str) -> Option<std::process::Output> {
        use std::io::Write;
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        child.stdin.take()?.write_all(stdin.as_bytes()).ok()?;
        child.wait_with_output().ok()
    }
}
