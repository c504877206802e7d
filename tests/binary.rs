//! The real `sniplex` binary: CLI contract, signals, drain, and what it holds while idle.

mod common;

use common::*;
use std::process::Command;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sniplex(args: &[&str]) -> std::process::Output {
    Command::new(Binary::exe()).args(args).output().unwrap()
}

#[test]
fn version_and_help() {
    let out = sniplex(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("sniplex {}", env!("CARGO_PKG_VERSION"))
    );
    let out = sniplex(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["run", "check", "--config", "--verbose", "--quiet"] {
        assert!(help.contains(word), "help lacks {word}: {help}");
    }
}

#[test]
fn check_accepts_the_shipped_example() {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/sniplex.toml");
    let out = sniplex(&["check", "-c", conf]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert_eq!(summary.lines().count(), 1, "{summary}");
    assert!(summary.contains("OK"), "{summary}");
}

#[test]
fn check_reports_file_line_column_and_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "listen = [\"127.0.0.1:8443\"]\n[routes]\n\"a.*.org\" = \"unix:/run/a.sock\"\n",
    )
    .unwrap();
    for args in [vec!["check", "-c"], vec!["run", "-c"], vec!["-c"]] {
        let mut a = args.clone();
        let p = path.to_str().unwrap();
        a.push(p);
        let out = sniplex(&a);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{p}:3:1: routes.\"a.*.org\": bad server name")),
            "{args:?}: {err}"
        );
    }
    let out = sniplex(&["check", "-c", "/nonexistent/sniplex.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/sniplex.toml"));
}

#[test]
fn default_config_path_is_etc_sniplex() {
    // Without -c the binary reads /etc/sniplex/sniplex.toml; on a test machine it is absent
    // (or, if present, must at least be named in the output).
    let out = sniplex(&["check"]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("/etc/sniplex/sniplex.toml"), "{all}");
}

fn write_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("sniplex.toml");
    std::fs::write(
        &path,
        format!("listen = [\"127.0.0.1:0\", \"[::1]:0\"]\n{body}"),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_drains_and_exits_0() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let git = Backend::start("git", Listen::Unix(dir.path().join("git.sock")), &pki).await;
    let conf = write_config(
        dir.path(),
        &format!("[routes]\n\"git.test\" = \"{}\"\n", git.config_addr),
    );
    let mut bin = Binary::start(&conf, 2);
    let addr = bin.addrs[0];
    assert_eq!(whoami(bin.addrs[1], "git.test", &pki).await.unwrap(), "git");

    let mut s = tls_connect(addr, "git.test", pki.client_config(&[]))
        .await
        .unwrap();
    s.write_all(b"ECHO\nping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();

    bin.signal(nix::sys::signal::Signal::SIGTERM);
    bin.wait_for("stopped accepting");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after SIGTERM"
    );
    // The open connection is untouched by the drain.
    s.write_all(b"pong").await.unwrap();
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    drop(s);
    let status = tokio::task::spawn_blocking(move || bin.wait_exit())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_closes_what_is_left_and_exits_0() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let git = Backend::start("git", Listen::Unix(dir.path().join("git.sock")), &pki).await;
    let conf = write_config(
        dir.path(),
        &format!(
            "[routes]\n\"git.test\" = \"{}\"\n[timeouts]\nshutdown = \"300ms\"\n",
            git.config_addr
        ),
    );
    let mut bin = Binary::start(&conf, 2);
    let mut s = tls_connect(bin.addrs[0], "git.test", pki.client_config(&[]))
        .await
        .unwrap();
    s.write_all(b"HOLD\n").await.unwrap();
    s.flush().await.unwrap();
    // Wait until the router has connected this client to the backend.
    let mut bin = tokio::task::spawn_blocking(move || {
        bin.signal(nix::sys::signal::Signal::SIGINT);
        bin.wait_for("drain deadline passed");
        bin
    })
    .await
    .unwrap();
    // The held connection is closed by the router: we see EOF or a reset, never a hang.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
        .await
        .expect("connection not closed");
    assert!(r.is_err() || rest.is_empty());
    let status = tokio::task::spawn_blocking(move || bin.wait_exit())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

fn pipe_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("pipe:"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_hold_no_pipes() {
    const N: usize = 300;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let git = Backend::start("git", Listen::Unix(dir.path().join("git.sock")), &pki).await;
    // All test clients come from 127.0.0.1: lift the per-address cap (256 by default).
    let conf = write_config(
        dir.path(),
        &format!(
            "[limits]\nmax_connections_per_ip = 1000\n[routes]\n\"git.test\" = \"{}\"\n",
            git.config_addr
        ),
    );
    let bin = Binary::start(&conf, 2);
    let config = pki.client_config(&[]);
    let mut open = Vec::new();
    for _ in 0..N {
        // Each connection moves bytes both ways (so it used pipes), then goes idle.
        let mut s = tls_connect(bin.addrs[0], "git.test", config.clone())
            .await
            .unwrap();
        s.write_all(b"ECHO\nhello").await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        open.push(s);
    }
    let pipes = pipe_fds(bin.child.id());
    // Only the bounded pool may hold pipes (2 fds each); busy pipes would be 4 fds per connection.
    assert!(
        pipes <= 2 * sniplex::splice::PIPE_POOL_MAX,
        "{pipes} pipe fds with {N} idle connections"
    );
    drop(open);
}

/// `--threads 3`: three worker threads, each with its own runtime and a duplicate of every
/// listening socket. Connections accepted by any of them are served, a reload reaches all of
/// them, and the drain waits for connections on every worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_serve_reload_and_drain() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let git = Backend::start("git", Listen::Unix(dir.path().join("git.sock")), &pki).await;
    let blog = Backend::start("blog", Listen::Unix(dir.path().join("blog.sock")), &pki).await;
    let conf = write_config(
        dir.path(),
        &format!("[routes]\n\"git.test\" = \"{}\"\n", git.config_addr),
    );
    let mut cmd = Command::new(Binary::exe());
    cmd.args(["run", "--threads", "3", "-c"]).arg(&conf);
    let mut bin = Binary::start_cmd(cmd, 2);
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", bin.child.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .collect();
    for w in ["sniplex-w0", "sniplex-w1", "sniplex-w2"] {
        assert!(threads.iter().any(|t| t == w), "no {w} in {threads:?}");
    }

    // Connections on both listeners, held open after one echo each.
    let config = pki.client_config(&[]);
    let mut open = Vec::new();
    for i in 0..40 {
        let mut s = tls_connect(bin.addrs[i % 2], "git.test", config.clone())
            .await
            .unwrap();
        s.write_all(b"ECHO\nx").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        open.push(s);
    }

    std::fs::write(
        &conf,
        format!(
            "listen = [\"127.0.0.1:0\", \"[::1]:0\"]\n[routes]\n\"git.test\" = \"{}\"\n",
            blog.config_addr
        ),
    )
    .unwrap();
    bin.signal(nix::sys::signal::Signal::SIGHUP);
    bin.wait_for("reloaded");
    for i in 0..10 {
        assert_eq!(
            whoami(bin.addrs[i % 2], "git.test", &pki).await.unwrap(),
            "blog"
        );
    }
    // The connections opened before the reload still reach the old backend.
    for s in &mut open {
        s.write_all(b"y").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");
    }

    bin.signal(nix::sys::signal::Signal::SIGTERM);
    bin.wait_for("stopped accepting");
    // Still open and served during the drain, on whichever worker holds each.
    for mut s in open {
        s.write_all(b"z").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"z");
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
    }
    let status = tokio::task::spawn_blocking(move || bin.wait_exit())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
