//! TLS termination for plain-HTTP backends, PROXY protocol v1/v2 (parsed back with `ppp`), and
//! routing by ALPN.

mod common;

use common::*;
use rustls::AlertDescription;
use sniplex::proxy_protocol::{
    PP2_CLIENT_SSL, PP2_SUBTYPE_SSL_CIPHER, PP2_SUBTYPE_SSL_VERSION, PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY, PP2_TYPE_SSL,
};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET / over TLS to `name` through `addr`; returns (negotiated ALPN, body).
async fn https_get(
    addr: std::net::SocketAddr,
    name: &str,
    pki: &Pki,
    alpn: &[&[u8]],
) -> std::io::Result<(Option<Vec<u8>>, String)> {
    https_get_path(addr, name, "/page", pki, alpn).await
}

async fn https_get_path(
    addr: std::net::SocketAddr,
    name: &str,
    path: &str,
    pki: &Pki,
    alpn: &[&[u8]],
) -> std::io::Result<(Option<Vec<u8>>, String)> {
    let mut s = tls_connect(addr, name, pki.client_config(alpn)).await?;
    let negotiated = s.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Read one response (Content-Length framed), then close.
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= len {
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                return Ok((negotiated, body[..len].to_owned()));
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        String::from_utf8_lossy(&buf).into_owned(),
    ))
}

struct World {
    pki: Pki,
    dir: tempfile::TempDir,
}

fn world() -> World {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write_to(dir.path());
    World { pki, dir }
}

impl World {
    /// A plain-HTTP backend on a Unix socket in the world's directory.
    async fn http_backend(&self, id: &str, socket: &str) -> Backend {
        Backend::start_kind(
            id,
            Listen::Unix(self.dir.path().join(socket)),
            &self.pki,
            Speaks::Http,
            false,
        )
        .await
    }

    fn path(&self, f: &str) -> String {
        self.dir.path().join(f).display().to_string()
    }
    fn terminate(&self, alpn: Option<&str>) -> String {
        let alpn = alpn.map(|a| format!(", alpn = {a}")).unwrap_or_default();
        format!(
            "{{ cert = \"{}\", key = \"{}\"{alpn} }}",
            self.path("cert.pem"),
            self.path("key.pem")
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_route_reaches_plain_http_backend_and_passthrough_keeps_working() {
    let w = world();
    let blog = w.http_backend("blog", "blog.sock").await;
    let lab = w.http_backend("lab", "lab.sock").await;
    let git = Backend::start("git", Listen::Unix(w.dir.path().join("git.sock")), &w.pki).await;
    let r = Router::start(&format!(
        "[routes]\n\"git.test\" = \"{}\"\n\
         [routes.\"blog.test\"]\nbackend = \"{}\"\nterminate = {}\n\
         [routes.\"*.lab.test\"]\nbackend = \"{}\"\nterminate = {}\n",
        git.config_addr,
        blog.config_addr,
        w.terminate(None),
        lab.config_addr,
        w.terminate(None),
    ))
    .await;
    let (alpn, body) = https_get(r.addr, "blog.test", &w.pki, &[]).await.unwrap();
    assert_eq!(body, "blog GET /page HTTP/1.1\n");
    assert_eq!(alpn, None);
    // The wildcard route terminates with the wildcard certificate.
    let (_, body) = https_get(r.addr, "x.lab.test", &w.pki, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(body, "lab GET /page HTTP/1.1\n");
    // Passthrough beside it is untouched.
    assert_eq!(whoami(r.addr, "git.test", &w.pki).await.unwrap(), "git");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_alpn_is_negotiated_as_configured() {
    let w = world();
    let blog = w.http_backend("blog", "blog.sock").await;
    let r = Router::start(&format!(
        "[routes.\"blog.test\"]\nbackend = \"{b}\"\nterminate = {}\n\
         [routes.\"x.test\"]\nbackend = \"{b}\"\nterminate = {}\n",
        w.terminate(Some("[\"h2\", \"http/1.1\"]")),
        w.terminate(None),
        b = blog.config_addr,
    ))
    .await;
    let (alpn, _) = https_get(r.addr, "blog.test", &w.pki, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (alpn, _) = https_get(r.addr, "blog.test", &w.pki, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    // Default is http/1.1 only: a client that insists on h2 is refused, not given h2.
    let (alpn, _) = https_get(r.addr, "x.test", &w.pki, &[b"http/1.1", b"h2"])
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let e = https_get(r.addr, "x.test", &w.pki, &[b"h2"])
        .await
        .unwrap_err();
    assert_eq!(
        alert_of(&e),
        Some(AlertDescription::NoApplicationProtocol),
        "{e}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_aborting_mid_handshake_leaves_router_serving() {
    let w = world();
    let blog = w.http_backend("blog", "blog.sock").await;
    let r = Router::start(&format!(
        "[routes.\"blog.test\"]\nbackend = \"{}\"\nterminate = {}\n",
        blog.config_addr,
        w.terminate(None)
    ))
    .await;
    // A real ClientHello, then the client vanishes before finishing the handshake.
    for _ in 0..5 {
        let mut conn =
            rustls::ClientConnection::new(w.pki.client_config(&[]), server_name("blog.test"))
                .unwrap();
        let mut hello = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut hello).unwrap();
        }
        let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
        s.write_all(&hello).await.unwrap();
        let mut first = [0u8; 5];
        s.read_exact(&mut first).await.unwrap();
        assert_eq!(first[0], 22, "ServerHello expected");
        drop(s);
    }
    // Garbage after a valid hello: the handshake fails, only for that client.
    let mut conn =
        rustls::ClientConnection::new(w.pki.client_config(&[]), server_name("blog.test")).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    let mut s = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    s.write_all(&hello).await.unwrap();
    s.write_all(&[23, 3, 3, 0, 4, 1, 2, 3, 4]).await.unwrap();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut Vec::new()))
        .await
        .expect("not closed");
    let (_, body) = https_get(r.addr, "blog.test", &w.pki, &[]).await.unwrap();
    assert!(body.starts_with("blog "));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_route_with_backend_down_gets_alert_80() {
    let w = world();
    let r = Router::start(&format!(
        "[routes.\"blog.test\"]\nbackend = \"unix:{}\"\nterminate = {}\n",
        w.path("none.sock"),
        w.terminate(None)
    ))
    .await;
    let e = https_get(r.addr, "blog.test", &w.pki, &[])
        .await
        .unwrap_err();
    assert_eq!(alert_of(&e), Some(AlertDescription::InternalError), "{e}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_transfer_is_exact_both_ways_with_half_close() {
    // A TLS "backend" would not do: the backend behind a terminated route sees plaintext. An
    // echo over a Unix socket, driven in the test.
    let w = world();
    let path = w.dir.path().join("echo.sock");
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut wr) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    let r = Router::start(&format!(
        "[routes.\"blog.test\"]\nbackend = \"unix:{}\"\nterminate = {}\n",
        path.display(),
        w.terminate(None)
    ))
    .await;
    const N: u64 = 8 << 20;
    let s = tls_connect(r.addr, "blog.test", w.pki.client_config(&[]))
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        write_pattern(&mut wr, N).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    assert_eq!(read_all_sha(&mut rd).await.unwrap(), (N, pattern_sha(N)));
    writer.await.unwrap();
    r.stop().await;
}

#[test]
fn bad_certificate_paths_and_mismatched_keys_fail_check_naming_the_file() {
    let w = world();
    let conf = w.dir.path().join("sniplex.toml");
    let check = |body: &str| {
        std::fs::write(&conf, body).unwrap();
        let out = std::process::Command::new(Binary::exe())
            .args(["check", "-c"])
            .arg(&conf)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{body}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = w.path("missing.pem");
    let err = check(&format!(
        "[routes.\"blog.test\"]\nbackend = \"unix:/run/b.sock\"\nterminate = {{ cert = \"{missing}\", key = \"{}\" }}\n",
        w.path("key.pem")
    ));
    assert!(
        err.contains(&format!("{}:3:", conf.display()))
            && err.contains("routes.\"blog.test\".terminate")
            && err.contains(&missing),
        "{err}"
    );
    // A key that does not belong to the certificate.
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(w.dir.path().join("other.pem"), other.serialize_pem()).unwrap();
    let err = check(&format!(
        "[routes.\"blog.test\"]\nbackend = \"unix:/run/b.sock\"\nterminate = {{ cert = \"{}\", key = \"{}\" }}\n",
        w.path("cert.pem"),
        w.path("other.pem")
    ));
    assert!(
        err.contains("other.pem") && err.contains("does not match"),
        "{err}"
    );
    // A key file with no key in it.
    let err = check(&format!(
        "[routes.\"blog.test\"]\nbackend = \"unix:/run/b.sock\"\nterminate = {{ cert = \"{}\", key = \"{}\" }}\n",
        w.path("cert.pem"),
        w.path("cert.pem")
    ));
    assert!(
        err.contains("cert.pem") && err.contains("private key"),
        "{err}"
    );
    // Relative paths are relative to the config file: this one is valid.
    std::fs::write(&conf, "[routes.\"blog.test\"]\nbackend = \"unix:/run/b.sock\"\nterminate = { cert = \"cert.pem\", key = \"key.pem\" }\n").unwrap();
    let out = std::process::Command::new(Binary::exe())
        .args(["check", "-c"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ssl_subtlvs(v: &[u8]) -> (u8, u32, Vec<(u8, Vec<u8>)>) {
    let client = v[0];
    let verify = u32::from_be_bytes([v[1], v[2], v[3], v[4]]);
    let mut rest = &v[5..];
    let mut subs = Vec::new();
    while rest.len() >= 3 {
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        subs.push((rest[0], rest[3..3 + len].to_vec()));
        rest = &rest[3 + len..];
    }
    assert!(rest.is_empty());
    (client, verify, subs)
}

async fn proxy_case(listen: &str, version: &str) {
    let w = world();
    let mut tls_backend = Backend::start_kind(
        "tls",
        Listen::Unix(w.dir.path().join("tls.sock")),
        &w.pki,
        Speaks::Tls,
        true,
    )
    .await;
    let mut http_backend = Backend::start_kind(
        "http",
        Listen::Unix(w.dir.path().join("http.sock")),
        &w.pki,
        Speaks::Http,
        true,
    )
    .await;
    let r = Router::start_with(
        &format!(
            "[routes.\"git.test\"]\nbackend = \"{}\"\nproxy_protocol = \"{version}\"\n\
             [routes.\"blog.test\"]\nbackend = \"{}\"\nproxy_protocol = \"{version}\"\nterminate = {}\n",
            tls_backend.config_addr,
            http_backend.config_addr,
            w.terminate(Some("[\"h2\", \"http/1.1\"]"))
        ),
        sniplex::Options::default(),
        &[listen],
    )
    .await;

    // Passthrough: the backend still does the TLS handshake itself after the header.
    let tcp = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let client_addr = tcp.local_addr().unwrap();
    let mut s = tls_connect_over(tcp, "git.test", w.pki.client_config(&[b"x-first", b"h2"]))
        .await
        .unwrap();
    s.write_all(b"ID\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "tls\n");
    drop(s);
    let p = tls_backend.next_proxy().await;
    assert_eq!(p.src, client_addr, "{p:?}");
    assert_eq!(p.dst, r.addr, "{p:?}");
    if version == "v2" {
        assert_eq!(p.version, 2);
        assert_eq!(p.tlv(PP2_TYPE_AUTHORITY), Some(&b"git.test"[..]));
        assert_eq!(
            p.tlv(PP2_TYPE_ALPN),
            Some(&b"x-first"[..]),
            "the client's first offer"
        );
        assert_eq!(p.tlv(PP2_TYPE_SSL), None, "not terminated");
    } else {
        assert_eq!((p.version, p.tlvs.len()), (1, 0));
    }

    // Terminated: header first, then plaintext HTTP.
    let tcp = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let client_addr = tcp.local_addr().unwrap();
    let mut s = tls_connect_over(tcp, "blog.test", w.pki.client_config(&[b"h2"]))
        .await
        .unwrap();
    let suite = s
        .get_ref()
        .1
        .negotiated_cipher_suite()
        .unwrap()
        .suite()
        .as_str()
        .unwrap()
        .to_owned();
    s.write_all(b"GET / HTTP/1.1\r\nHost: blog.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    let p = http_backend.next_proxy().await;
    assert_eq!((p.src, p.dst), (client_addr, r.addr), "{p:?}");
    if version == "v2" {
        assert_eq!(p.tlv(PP2_TYPE_AUTHORITY), Some(&b"blog.test"[..]));
        assert_eq!(
            p.tlv(PP2_TYPE_ALPN),
            Some(&b"h2"[..]),
            "the negotiated protocol"
        );
        let (client, verify, subs) = ssl_subtlvs(p.tlv(PP2_TYPE_SSL).expect("SSL TLV"));
        assert_eq!((client, verify), (PP2_CLIENT_SSL, 0));
        assert_eq!(subs[0], (PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3".to_vec()));
        assert_eq!(subs[1], (PP2_SUBTYPE_SSL_CIPHER, suite.into_bytes()));
    }
    drop(s);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v1_ipv4() {
    proxy_case("127.0.0.1:0", "v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v1_ipv6() {
    proxy_case("[::1]:0", "v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_ipv4() {
    proxy_case("127.0.0.1:0", "v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_v2_ipv6() {
    proxy_case("[::1]:0", "v2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_alpn_within_a_name() {
    let w = world();
    let https = Backend::start(
        "https",
        Listen::Unix(w.dir.path().join("https.sock")),
        &w.pki,
    )
    .await;
    let c2s = Backend::start("c2s", Listen::Unix(w.dir.path().join("c2s.sock")), &w.pki).await;
    let mut s2s = Backend::start_kind(
        "s2s",
        Listen::Unix(w.dir.path().join("s2s.sock")),
        &w.pki,
        Speaks::Tls,
        true,
    )
    .await;
    let fb = Backend::start(
        "fb-xmpp",
        Listen::Unix(w.dir.path().join("fb.sock")),
        &w.pki,
    )
    .await;
    let fb2 = Backend::start("fb", Listen::Unix(w.dir.path().join("fb2.sock")), &w.pki).await;
    let r = Router::start(&format!(
        "[routes.\"chat.test\"]\nbackend = \"{}\"\n\
         alpn.\"xmpp-client\" = \"{}\"\n\
         alpn.\"xmpp-server\" = {{ backend = \"{}\", proxy_protocol = \"v2\" }}\n\
         [fallback]\nbackend = \"{}\"\nalpn.\"xmpp-client\" = \"{}\"\n",
        https.config_addr, c2s.config_addr, s2s.config_addr, fb2.config_addr, fb.config_addr
    ))
    .await;
    let id = |name: &'static str, alpn: &'static [&'static [u8]]| {
        let (addr, config) = (r.addr, w.pki.client_config(alpn));
        async move {
            let mut s = tls_connect(addr, name, config).await.unwrap();
            s.write_all(b"ID\n").await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out.trim().to_owned()
        }
    };
    assert_eq!(id("chat.test", &[]).await, "https");
    assert_eq!(id("chat.test", &[b"h2", b"http/1.1"]).await, "https");
    assert_eq!(id("chat.test", &[b"xmpp-client"]).await, "c2s");
    // The first offer that is listed wins, in the client's order.
    assert_eq!(
        id("chat.test", &[b"h2", b"xmpp-server", b"xmpp-client"]).await,
        "s2s"
    );
    assert_eq!(s2s.next_proxy().await.tlv(PP2_TYPE_ALPN), Some(&b"h2"[..]));
    assert_eq!(
        id("chat.test", &[b"xmpp-client", b"xmpp-server"]).await,
        "c2s"
    );
    // The fallback takes the same keys.
    assert_eq!(id("127.0.0.1", &[b"xmpp-client"]).await, "fb-xmpp");
    assert_eq!(id("127.0.0.1", &[]).await, "fb");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_served_on_a_terminated_route_of_the_tls_port() {
    let w = world();
    let conf = w.dir.path().join("sniplex.toml");
    std::fs::write(
        &conf,
        format!("listen = [\"127.0.0.1:0\"]\n[metrics]\nroute = \"metrics.test\"\n[routes.\"metrics.test\"]\nterminate = {}\n", w.terminate(None)),
    )
    .unwrap();
    let bin = Binary::start(Path::new(&conf), 1);
    let (_, body) = https_get_path(bin.addrs[0], "metrics.test", "/metrics", &w.pki, &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(body.contains("sniplex_build_info"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_ecdsa_and_ed25519_chains_over_tls_1_2_and_1_3() {
    for (label, alg) in [
        ("rsa", &rcgen::PKCS_RSA_SHA256),
        ("ecdsa-p256", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("ecdsa-p384", &rcgen::PKCS_ECDSA_P384_SHA384),
        ("ed25519", &rcgen::PKCS_ED25519),
    ] {
        let pki = Pki::with_alg(alg);
        let dir = tempfile::tempdir().unwrap();
        pki.write_to(dir.path());
        let blog = Backend::start_kind(
            "blog",
            Listen::Unix(dir.path().join("b.sock")),
            &pki,
            Speaks::Http,
            false,
        )
        .await;
        let r = Router::start(&format!(
            "[routes.\"blog.test\"]\nbackend = \"{}\"\nterminate = {{ cert = \"{d}/cert.pem\", key = \"{d}/key.pem\" }}\n",
            blog.config_addr,
            d = dir.path().display()
        ))
        .await;
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let mut s = tls_connect(r.addr, "blog.test", pki.client_config_version(version))
                .await
                .unwrap_or_else(|e| panic!("{label} {version:?}: {e}"));
            assert_eq!(
                s.get_ref().1.protocol_version(),
                Some(version.version),
                "{label}"
            );
            s.write_all(b"GET / HTTP/1.1\r\nHost: blog.test\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"HTTP/1.1 200", "{label} {version:?}");
        }
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_re_read_on_reload() {
    let (old, new) = (Pki::new(), Pki::new());
    let dir = tempfile::tempdir().unwrap();
    old.write_to(dir.path());
    let blog = Backend::start_kind(
        "blog",
        Listen::Unix(dir.path().join("b.sock")),
        &old,
        Speaks::Http,
        false,
    )
    .await;
    let conf = dir.path().join("sniplex.toml");
    std::fs::write(
        &conf,
        format!("[routes.\"blog.test\"]\nbackend = \"{}\"\nterminate = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n", blog.config_addr),
    )
    .unwrap();
    let r = Router::start_file(&conf).await;
    assert!(https_get(r.addr, "blog.test", &old, &[]).await.is_ok());
    // New files on disk: served only after the reload.
    new.write_to(dir.path());
    assert!(https_get(r.addr, "blog.test", &new, &[]).await.is_err());
    r.reload().await.unwrap();
    assert!(https_get(r.addr, "blog.test", &new, &[]).await.is_ok());
    assert!(https_get(r.addr, "blog.test", &old, &[]).await.is_err());
    // A broken key on disk: the reload fails and the running certificate stays.
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    assert!(r.reload().await.unwrap_err().contains("key.pem"));
    assert!(https_get(r.addr, "blog.test", &new, &[]).await.is_ok());
    r.stop().await;
}

/// A backend that answers with a large body and keeps its connection open (HTTP keep-alive):
/// every byte must reach the client although no EOF ever pushes the TLS session's buffered
/// records out. End to end only: whether sniplex's last write leaves records buffered depends on
/// socket timing, so this may pass even without the flush; the deterministic reproduction is
/// `splice::size_tests::buffered_stream_is_flushed_when_the_source_goes_quiet`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_response_without_backend_eof_is_flushed_whole() {
    let w = world();
    let path = w.dir.path().join("keepalive.sock");
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    const N: u64 = 6 << 20;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut req = [0u8; 64];
        let _ = s.read(&mut req).await.unwrap();
        write_pattern(&mut s, N).await.unwrap();
        // Keep the connection open until the client has everything.
        let _ = done_rx.await;
    });
    let r = Router::start(&format!(
        "[routes.\"blog.test\"]\nbackend = \"unix:{}\"\nterminate = {}\n",
        path.display(),
        w.terminate(None)
    ))
    .await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(r.addr).await.unwrap();
    let mut s = tls_connect_over(tcp, "blog.test", w.pki.client_config(&[]))
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut got = vec![0u8; N as usize];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut got))
        .await
        .expect("the last records never arrived")
        .unwrap();
    let mut want = vec![0u8; N as usize];
    pattern(0, &mut want);
    assert!(got == want, "the body differs");
    let _ = done_tx.send(());
    drop(s);
    r.stop().await;
}
