//! QUIC routing end to end: the real sniplex binary between aioquic HTTP/3 clients and aioquic
//! HTTP/3 servers (tests/quic/h3.py), over real UDP sockets on loopback.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const H3: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/quic/h3.py");

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// An aioquic HTTP/3 server on 127.0.0.1 answering "<name> <path>".
struct H3Server {
    child: Child,
    addr: SocketAddr,
}

impl H3Server {
    fn start(dir: &Path, name: &str) -> H3Server {
        let mut child = Command::new(python())
            .arg(H3)
            .arg("server")
            .arg("--cert")
            .arg(dir.join("cert.pem"))
            .arg("--key")
            .arg(dir.join("key.pem"))
            .args(["--name", name])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 with aioquic (pip install aioquic)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("h3 server did not start: {line:?}"));
        H3Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for H3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one aioquic client through `via` and returns its JSON report.
fn client(dir: &Path, via: SocketAddr, name: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg(H3)
        .arg("client")
        .args(["--connect", &via.to_string(), "--name", name])
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "client printed {stdout:?}; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

struct Setup {
    dir: tempfile::TempDir,
    sniplex: Binary,
    quic: SocketAddr,
    metrics: String,
    _servers: Vec<H3Server>,
}

fn setup(extra_config: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    Pki::new().write_to(dir.path());
    let alpha = H3Server::start(dir.path(), "alpha");
    let beta = H3Server::start(dir.path(), "beta");
    let config = format!(
        r#"
listen = ["127.0.0.1:0"]
log_connections = true

[timeouts]
client_hello = "2s"

[metrics]
listen = "127.0.0.1:0"

[quic]
listen = ["127.0.0.1:0"]
{extra_config}

[routes."git.test"]
backend = "127.0.0.1:1"
quic = "{}"

[routes."chat.test"]
backend = "127.0.0.1:1"
quic = "{}"

[routes."x.test"]
backend = "127.0.0.1:1"
"#,
        alpha.addr, beta.addr
    );
    let path: PathBuf = dir.path().join("sniplex.toml");
    std::fs::write(&path, config).unwrap();
    let mut sniplex = Binary::start(&path, 1);
    let quic: SocketAddr = sniplex.addr_of("listening for QUIC").parse().unwrap();
    let metrics = sniplex.addr_of("metrics endpoint");
    Setup {
        dir,
        sniplex,
        quic,
        metrics,
        _servers: vec![alpha, beta],
    }
}

async fn scrape(addr: &str) -> String {
    http_get(addr, "/metrics").await
}

/// The value of one exact series line (`name{labels}`), if present.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Scrapes until `pred` holds (the counters are updated by other tasks), with the deadline.
async fn scrape_until(addr: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let end = std::time::Instant::now() + DEADLINE;
    loop {
        let s = scrape(addr).await;
        if pred(&s) {
            return s;
        }
        assert!(std::time::Instant::now() < end, "never saw {what}:\n{s}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn http3_by_name_v2_split_hello_rebinding_and_unknown_names() {
    let s = setup("");
    let dir = s.dir.path();

    let a = client(dir, s.quic, "git.test", &["--path", "/a"]);
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!(a["bodies"][0], "alpha /a");
    let b = client(dir, s.quic, "chat.test", &["--path", "/b"]);
    assert_eq!(b["ok"], true, "{b}");
    assert_eq!(b["bodies"][0], "beta /b");

    let v2 = client(dir, s.quic, "git.test", &["--v2"]);
    assert_eq!(v2["ok"], true, "{v2}");
    assert_eq!(v2["version"], 0x6b33_43cf_u32, "{v2}");
    assert_eq!(v2["bodies"][0], "alpha /");

    // aioquic's quantum_readiness_test pads the hello past one datagram.
    let split = client(dir, s.quic, "chat.test", &["--quantum"]);
    assert_eq!(split["ok"], true, "{split}");
    assert_eq!(split["bodies"][0], "beta /");

    // The client moves to a new UDP port after its first request, keeping its connection IDs.
    let moved = client(dir, s.quic, "git.test", &["--rebind", "--requests", "3"]);
    assert_eq!(moved["ok"], true, "{moved}");
    assert_eq!(moved["bodies"].as_array().unwrap().len(), 3);
    assert_eq!(moved["rebound_to"].as_array().unwrap().len(), 1);

    // No route, and a route without `quic`: a server CONNECTION_CLOSE with CRYPTO_ERROR
    // unrecognized_name (0x170), which only sniplex sends; a timeout would carry no code.
    for name in ["nobody.test", "x.test"] {
        let r = client(dir, s.quic, name, &["--timeout", "20"]);
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["error_code"], 0x170, "{r}");
    }

    let m = scrape_until(&s.metrics, "the flows counted", |m| {
        value(m, r#"sniplex_rejected_total{reason="quic_no_route"}"#) == Some(2.0)
    })
    .await;
    // One flow per connection, the rebound one included (it was followed, not restarted).
    assert_eq!(
        value(&m, r#"sniplex_quic_flows_total{route="git.test"}"#),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        value(&m, r#"sniplex_quic_flows_total{route="chat.test"}"#),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        value(&m, r#"sniplex_rejected_total{reason="quic_no_flow"}"#),
        None,
        "{m}"
    );
    for dir in ["client_to_backend", "backend_to_client"] {
        let n = value(
            &m,
            &format!(r#"sniplex_quic_datagrams_total{{route="git.test",direction="{dir}"}}"#),
        )
        .unwrap_or(0.0);
        assert!(n >= 6.0, "{dir}: {n}\n{m}");
    }
    assert!(value(&m, "sniplex_quic_flows_active").is_some(), "{m}");
}

fn fixture(name: &str) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/quic")
            .join(name),
    )
    .unwrap();
    sniplex::quic::initial::split_fixture(&bytes)
}

#[tokio::test]
async fn floods_of_garbage_and_spoofed_initials_leave_a_real_client_served() {
    let s = setup("max_pending_per_ip = 16");
    let dir = s.dir.path();
    let attacker = UdpSocket::bind("127.0.0.2:0").unwrap();
    let whole = fixture("v1-app.example.org.bin").remove(0);

    // One of each kind first, each counted under its own reason.
    let mut short = whole.clone();
    short.truncate(1100);
    attacker.send_to(&short, s.quic).unwrap();
    let mut version = whole.clone();
    version[1..5].copy_from_slice(&[0x0a, 0x0a, 0x0a, 0x0a]);
    attacker.send_to(&version, s.quic).unwrap();
    let m = scrape_until(&s.metrics, "one of each", |m| {
        value(m, r#"sniplex_rejected_total{reason="quic_short_initial"}"#) == Some(1.0)
            && value(m, r#"sniplex_rejected_total{reason="quic_version"}"#) == Some(1.0)
    })
    .await;
    drop(m);

    // Spoofed first halves of split hellos, each from its own port: they would sit pending.
    let half = fixture("v1-split-app.example.org.bin").remove(0);
    let spoofers: Vec<UdpSocket> = (0..64)
        .map(|_| UdpSocket::bind("127.0.0.2:0").unwrap())
        .collect();
    for sock in &spoofers {
        sock.send_to(&half, s.quic).unwrap();
    }

    // Garbage, from a third address (on the spoofers' address it would meet the pending cap
    // before any decryption): short headers for no flow, Initials whose DCID does not match
    // their keys.
    let garbage = UdpSocket::bind("127.0.0.3:0").unwrap();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..3000u32 {
        let mut d = whole.clone();
        if i % 2 == 0 {
            d[0] = 0x40 | (rand() as u8 & 0x3f);
            d.truncate(40 + (rand() % 1300) as usize);
        } else {
            // Same structure, another DCID: the Initial keys differ, the AEAD open fails.
            let r = rand().to_be_bytes();
            d[6..14].copy_from_slice(&r);
        }
        let _ = garbage.send_to(&d, s.quic);
    }

    // A real client on another address is served while the pending ones wait.
    let ok = client(dir, s.quic, "git.test", &["--path", "/during"]);
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(ok["bodies"][0], "alpha /during");

    let m = scrape_until(&s.metrics, "the pending cap", |m| {
        value(m, r#"sniplex_rejected_total{reason="quic_limit_pending"}"#) == Some(48.0)
    })
    .await;
    assert!(value(&m, "sniplex_quic_pending").unwrap() <= 16.0, "{m}");
    assert!(
        value(&m, r#"sniplex_rejected_total{reason="quic_undecryptable"}"#).unwrap() > 0.0,
        "{m}"
    );
    assert!(
        value(&m, r#"sniplex_rejected_total{reason="quic_no_flow"}"#).unwrap() > 0.0,
        "{m}"
    );
    // The spoofed hellos never complete: they expire at the client_hello deadline (2 s here).
    let m = scrape_until(&s.metrics, "pending hellos expiring", |m| {
        value(m, r#"sniplex_rejected_total{reason="quic_hello_timeout"}"#) == Some(16.0)
    })
    .await;
    assert_eq!(value(&m, "sniplex_quic_pending"), Some(0.0), "{m}");
    // Nothing was ever sent back to the attacker: no route was reached, so no CONNECTION_CLOSE.
    let mut buf = [0u8; 2048];
    for sock in spoofers.iter().chain([&attacker, &garbage]) {
        sock.set_nonblocking(true).unwrap();
        assert!(sock.recv_from(&mut buf).is_err());
    }
    drop(s.sniplex);
}

/// systemd passes a stream and a datagram socket (ListenStream= + ListenDatagram=): QUIC is
/// served on the inherited UDP socket and `[quic] listen` is not bound.
#[tokio::test]
async fn inherited_datagram_socket_is_served() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    Pki::new().write_to(dir.path());
    let alpha = H3Server::start(dir.path(), "alpha");
    let conf = dir.path().join("sniplex.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = [\"192.0.2.1:1\"]\n[quic]\nlisten = [\"192.0.2.1:1\"]\n[routes.\"git.test\"]\nbackend = \"127.0.0.1:1\"\nquic = \"{}\"\n",
            alpha.addr
        ),
    )
    .unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let quic = udp.local_addr().unwrap();
    let (tfd, ufd) = (tcp.as_raw_fd(), udp.as_raw_fd());
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ exec {} run -c {}",
            Binary::exe(),
            conf.display()
        ))
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "tls:quic");
    // SAFETY: dup2 is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (from, to) in [(tfd, 3), (ufd, 4)] {
                if nix::libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut sniplex = Binary::start_cmd(cmd, 1);
    assert_eq!(
        sniplex
            .addr_of("listening for QUIC")
            .parse::<SocketAddr>()
            .unwrap(),
        quic
    );
    let r = client(dir.path(), quic, "git.test", &["--path", "/activated"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["bodies"][0], "alpha /activated");
}

/// `[quic] listen` follows the config on reload, as `listen` does for TCP.
#[tokio::test]
async fn reload_moves_the_quic_listener() {
    let mut s = setup("");
    let conf = s.dir.path().join("sniplex.toml");
    let old = s.quic;
    // A port that was free a moment ago (the reload would fail, and say so, if it were taken).
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&conf).unwrap().replace(
        "[quic]\nlisten = [\"127.0.0.1:0\"]",
        &format!("[quic]\nlisten = [\"127.0.0.1:{port}\"]"),
    );
    std::fs::write(&conf, text).unwrap();
    s.sniplex.signal(nix::sys::signal::Signal::SIGHUP);
    // The start's own "listening" line may still be unread: skip to the new address.
    let new = loop {
        let a = addr_in(&s.sniplex.next_matching("listening for QUIC"));
        if a.port() == port {
            break a;
        }
        assert_eq!(a, old, "an unexpected QUIC listener");
    };
    let line = s.sniplex.wait_for("no longer listening for QUIC");
    assert!(line.contains(&old.to_string()), "{line}");
    let r = client(s.dir.path(), new, "git.test", &["--path", "/moved"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["bodies"][0], "alpha /moved");
}
