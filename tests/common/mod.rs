//! Test harness: a throwaway PKI (rcgen), TLS backends on Unix, abstract and TCP sockets
//! (tokio-rustls), the router in-process or as the real binary, and rustls clients. Addresses
//! always come from the code (port 0, temp dirs); nothing waits on a sleep.
#![allow(dead_code)]

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use std::io::{self, BufRead};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

/// Upper bound for any single wait in a test: generous, since CI machines are small and busy.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A CA and one leaf certificate covering every name the tests use.
pub struct Pki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    pub leaf_pem: String,
    pub key_pem: String,
    leaf_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

pub const LEAF_NAMES: &[&str] = &[
    "git.test",
    "solo.test",
    "restart.test",
    "chat.test",
    "v6.test",
    "nobody.test",
    "down.test",
    "x.test",
    "slow.test",
    "lab.test",
    "blog.test",
    "metrics.test",
    "*.lab.test",
    "localhost",
    "127.0.0.1",
    "::1",
];

impl Pki {
    pub fn new() -> Pki {
        Self::with_alg(&rcgen::PKCS_ECDSA_P256_SHA256)
    }

    /// A CA and leaf whose keys use `alg` (RSA, ECDSA, Ed25519).
    pub fn with_alg(alg: &'static rcgen::SignatureAlgorithm) -> Pki {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sniplex test CA");
        let ca_key = rcgen::KeyPair::generate_for(alg).unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_params = rcgen::CertificateParams::new(
            LEAF_NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let leaf_key = rcgen::KeyPair::generate_for(alg).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            leaf_pem: leaf.pem(),
            key_pem: leaf_key.serialize_pem(),
            leaf_der: leaf.der().clone(),
            key_der: leaf_key.serialize_der(),
        }
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::try_from(self.key_der.clone()).unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![self.leaf_der.clone()], key)
                .unwrap(),
        )
    }

    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        // Every connection must be a full handshake with a full ClientHello.
        c.resumption = rustls::client::Resumption::disabled();
        Arc::new(c)
    }

    /// Writes ca.pem, cert.pem (leaf then CA: a full chain) and key.pem into `dir`.
    pub fn write_to(&self, dir: &Path) {
        std::fs::write(dir.join("ca.pem"), &self.ca_pem).unwrap();
        std::fs::write(
            dir.join("cert.pem"),
            format!("{}{}", self.leaf_pem, self.ca_pem),
        )
        .unwrap();
        std::fs::write(dir.join("key.pem"), &self.key_pem).unwrap();
    }

    /// A client config limited to one TLS version.
    pub fn client_config_version(
        &self,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.resumption = rustls::client::Resumption::disabled();
        Arc::new(c)
    }
}

/// Where a test backend listens.
pub enum Listen {
    Unix(PathBuf),
    Abstract(String),
    Tcp(SocketAddr),
}

/// What a backend saw on a connection, reported after the client's EOF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub backend: String,
    pub command: String,
    pub bytes: u64,
    pub sha: String,
}

/// A PROXY header as a backend parsed it (with the `ppp` crate, independently of sniplex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySeen {
    pub version: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// v2 TLVs as (type, value).
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

impl ProxySeen {
    pub fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }
}

/// What a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// TLS, then the command protocol described at [`Backend`].
    Tls,
    /// Plain HTTP/1.1: answers every request with `200` and the body `<id> <request line>`.
    Http,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

enum AnyListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl AnyListener {
    async fn accept(&self) -> io::Result<Box<dyn Io>> {
        Ok(match self {
            AnyListener::Unix(l) => Box::new(l.accept().await?.0),
            AnyListener::Tcp(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// A test backend. With [`Speaks::Tls`], per connection, after the handshake, the client's
/// first line is a command:
/// - `ID`: reply with the backend's id line, then close.
/// - `ECHO`: echo every byte until EOF, then half-close.
/// - `SINK`: read until EOF, reply `<bytes> <sha256>`, close.
/// - `SOURCE <n>`: send n pattern bytes and half-close; then read until EOF and report it.
/// - `HOLD`: read until EOF, reply `bye`, close.
///
/// Every connection's incoming byte count and hash are also reported on `seen`; with
/// `proxy = true` the backend first reads a PROXY header and reports it on `proxies`.
pub struct Backend {
    pub id: String,
    /// The address as sniplex's config writes it.
    pub config_addr: String,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    pub proxies: mpsc::UnboundedReceiver<ProxySeen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(id: &str, listen: Listen, pki: &Pki) -> Backend {
        Self::start_kind(id, listen, pki, Speaks::Tls, false).await
    }

    pub async fn start_kind(
        id: &str,
        listen: Listen,
        pki: &Pki,
        speaks: Speaks,
        proxy: bool,
    ) -> Backend {
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let (tx, seen) = mpsc::unbounded_channel();
        let (ptx, proxies) = mpsc::unbounded_channel();
        let (config_addr, listener) = match listen {
            Listen::Unix(path) => (
                format!("unix:{}", path.display()),
                AnyListener::Unix(UnixListener::bind(&path).unwrap()),
            ),
            Listen::Abstract(name) => (
                format!("unix:@{name}"),
                AnyListener::Unix(UnixListener::bind(format!("\0{name}")).unwrap()),
            ),
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr).await.unwrap();
                (l.local_addr().unwrap().to_string(), AnyListener::Tcp(l))
            }
        };
        let id_owned = id.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let Ok(mut s) = listener.accept().await else {
                    continue;
                };
                let (acceptor, id, tx, ptx) =
                    (acceptor.clone(), id_owned.clone(), tx.clone(), ptx.clone());
                tokio::spawn(async move {
                    if proxy {
                        match read_proxy_header(&mut s).await {
                            Some(p) => {
                                let _ = ptx.send(p);
                            }
                            None => return,
                        }
                    }
                    match speaks {
                        Speaks::Tls => {
                            if let Ok(tls) = acceptor.accept(s).await {
                                serve(tls, id, tx).await;
                            }
                        }
                        Speaks::Http => serve_http(s, id).await,
                    }
                });
            }
        });
        Backend {
            id: id.to_owned(),
            config_addr,
            seen,
            proxies,
            task,
        }
    }

    pub async fn next_seen(&mut self) -> Seen {
        tokio::time::timeout(DEADLINE, self.seen.recv())
            .await
            .expect("backend reported nothing")
            .expect("backend gone")
    }

    pub async fn next_proxy(&mut self) -> ProxySeen {
        tokio::time::timeout(DEADLINE, self.proxies.recv())
            .await
            .expect("backend saw no PROXY header")
            .expect("backend gone")
    }
}

/// Reads exactly one PROXY header (v1 or v2) and parses it with `ppp`.
async fn read_proxy_header<S: AsyncRead + Unpin>(s: &mut S) -> Option<ProxySeen> {
    let mut buf = vec![0u8; 16];
    s.read_exact(&mut buf[..5]).await.ok()?;
    if &buf[..5] == b"PROXY" {
        let mut line = buf[..5].to_vec();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\r\n") && line.len() < 108 {
            s.read_exact(&mut b).await.ok()?;
            line.push(b[0]);
        }
        let text = std::str::from_utf8(&line).ok()?;
        let h = ppp::v1::Header::try_from(text).ok()?;
        let (src, dst) = match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => (
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            ),
            ppp::v1::Addresses::Tcp6(a) => (
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            ),
            ppp::v1::Addresses::Unknown => return None,
        };
        return Some(ProxySeen {
            version: 1,
            src,
            dst,
            tlvs: Vec::new(),
        });
    }
    s.read_exact(&mut buf[5..16]).await.ok()?;
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    buf.resize(16 + len, 0);
    s.read_exact(&mut buf[16..]).await.ok()?;
    let h = ppp::v2::Header::try_from(buf.as_slice()).ok()?;
    assert_eq!(h.command, ppp::v2::Command::Proxy);
    assert_eq!(h.protocol, ppp::v2::Protocol::Stream);
    let (src, dst) = match h.addresses {
        ppp::v2::Addresses::IPv4(a) => (
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ),
        ppp::v2::Addresses::IPv6(a) => (
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ),
        _ => return None,
    };
    let tlvs = h
        .tlvs()
        .map(|t| t.map(|t| (t.kind, t.value.to_vec())))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some(ProxySeen {
        version: 2,
        src,
        dst,
        tlvs,
    })
}

/// A minimal HTTP/1.1 server: one response per request, until the client closes.
async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(s: S, id: String) {
    let (r, mut w) = tokio::io::split(s);
    let mut r = BufReader::new(r);
    loop {
        let mut request_line = String::new();
        if r.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
        }
        let body = format!("{id} {}\n", request_line.trim());
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if w.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    tls: S,
    id: String,
    tx: mpsc::UnboundedSender<Seen>,
) {
    let (r, mut w) = tokio::io::split(tls);
    let mut r = BufReader::new(r);
    let mut line = String::new();
    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
        return;
    }
    let cmd = line.trim().to_owned();
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let verb = cmd.split_whitespace().next().unwrap_or("");
    match verb {
        "ID" => {
            let _ = w.write_all(format!("{id}\n").as_bytes()).await;
            let _ = w.shutdown().await;
        }
        "ECHO" => loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = w.shutdown().await;
                    break;
                }
                Ok(n) => n,
            };
            hasher.update(&buf[..n]);
            bytes += n as u64;
            // Flushed: the TLS session keeps records it could not write to a full socket, and
            // a client waiting for its echo before sending more would wait for ever.
            if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err() {
                break;
            }
        },
        "SINK" | "HOLD" | "SOURCE" => {
            if verb == "SOURCE" {
                let n: u64 = cmd
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                if write_pattern(&mut w, n).await.is_err() {
                    return;
                }
                let _ = w.shutdown().await;
            }
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        hasher.update(&buf[..n]);
                        bytes += n as u64;
                    }
                }
            }
            let sha = hex(&hasher.clone().finalize());
            if verb == "SINK" {
                let _ = w.write_all(format!("{bytes} {sha}\n").as_bytes()).await;
            } else if verb == "HOLD" {
                let _ = w.write_all(b"bye\n").await;
            }
            let _ = w.shutdown().await;
        }
        _ => {}
    }
    let _ = tx.send(Seen {
        backend: id,
        command: cmd,
        bytes,
        sha: hex(&hasher.finalize()),
    });
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Deterministic test data: byte i of the stream is a function of i.
pub fn pattern(offset: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        let x = offset + i as u64;
        *b = (x ^ (x >> 8) ^ (x >> 16)).wrapping_mul(31) as u8;
    }
}

pub fn pattern_sha(n: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < n {
        let k = (n - off).min(buf.len() as u64) as usize;
        pattern(off, &mut buf[..k]);
        h.update(&buf[..k]);
        off += k as u64;
    }
    hex(&h.finalize())
}

pub async fn write_pattern<W: AsyncWrite + Unpin>(w: &mut W, n: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < n {
        let k = (n - off).min(buf.len() as u64) as usize;
        pattern(off, &mut buf[..k]);
        w.write_all(&buf[..k]).await?;
        off += k as u64;
    }
    Ok(())
}

/// Reads to EOF, returning the byte count and SHA-256.
pub async fn read_all_sha<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            return Ok((n, hex(&h.finalize())));
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

/// Server name for a client: a DNS name, or an IP (then rustls sends no SNI at all).
pub fn server_name(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_owned()).unwrap()
}

/// A TLS connection through `addr` to whatever backend `name` routes to.
pub async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tokio::time::timeout(
        DEADLINE,
        tokio_rustls::TlsConnector::from(config).connect(server_name(name), tcp),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
}

/// Same, over a transport adapter (to shape how the ClientHello is sent).
pub async fn tls_connect_over<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<S>> {
    tokio::time::timeout(
        DEADLINE,
        tokio_rustls::TlsConnector::from(config).connect(server_name(name), io),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
}

/// Asks the backend behind `name` for its id.
pub async fn whoami(addr: SocketAddr, name: &str, pki: &Pki) -> io::Result<String> {
    let mut s = tls_connect(addr, name, pki.client_config(&[])).await?;
    s.write_all(b"ID\n").await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out.trim().to_owned())
}

/// The TLS alert a failed handshake ended with, if that is how it failed.
pub fn alert_of(e: &io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// Writes at most `chunk` bytes per write for the first `limit` bytes (each becomes its own
/// TCP segment with TCP_NODELAY), then passes writes through.
pub struct Chunked<S> {
    pub inner: S,
    pub chunk: usize,
    pub limit: usize,
    written: usize,
}

impl<S> Chunked<S> {
    pub fn new(inner: S, chunk: usize, limit: usize) -> Self {
        Chunked {
            inner,
            chunk,
            limit,
            written: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Chunked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Chunked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let n = if me.written < me.limit {
            buf.len().min(me.chunk)
        } else {
            buf.len()
        };
        let r = Pin::new(&mut me.inner).poll_write(cx, &buf[..n]);
        if let Poll::Ready(Ok(k)) = r {
            me.written += k;
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Re-frames the first TLS record written through it (the ClientHello) as `parts` records.
pub struct Refragment<S> {
    pub inner: S,
    parts: usize,
    acc: Vec<u8>,
    out: Vec<u8>,
    done: bool,
}

impl<S> Refragment<S> {
    pub fn new(inner: S, parts: usize) -> Self {
        Refragment {
            inner,
            parts,
            acc: Vec::new(),
            out: Vec::new(),
            done: false,
        }
    }
}

impl<S: AsyncWrite + Unpin> Refragment<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
            self.out.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Refragment<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Refragment<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        std::task::ready!(me.poll_drain(cx))?;
        if me.done {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        }
        me.acc.extend_from_slice(buf);
        if me.acc.len() >= 5 {
            let len = 5 + usize::from(u16::from_be_bytes([me.acc[3], me.acc[4]]));
            if me.acc.len() >= len {
                let payload = me.acc[5..len].to_vec();
                me.out = sniplex::hello::testing::records(&payload, me.parts);
                me.out.extend_from_slice(&me.acc[len..]);
                me.done = true;
            }
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        std::task::ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        std::task::ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

/// The router running in this process on 127.0.0.1:0 (and optionally [::1]:0).
pub struct Router {
    pub addr: SocketAddr,
    pub addrs: Vec<SocketAddr>,
    control: tokio::sync::mpsc::UnboundedSender<sniplex::Control>,
    task: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

impl Router {
    pub async fn start(config_toml: &str) -> Router {
        Self::start_with(config_toml, sniplex::Options::default(), &["127.0.0.1:0"]).await
    }

    pub async fn start_with(
        config_toml: &str,
        options: sniplex::Options,
        listen: &[&str],
    ) -> Router {
        let config = sniplex::Config::parse(config_toml, Path::new("test.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        Self::start_config(config, options, listen).await
    }

    /// Starts on a config file, so that [`Router::reload`] can re-read it.
    pub async fn start_file(path: &Path) -> Router {
        let config = sniplex::Config::load(path).unwrap_or_else(|e| panic!("{e}"));
        Self::start_config(config, sniplex::Options::default(), &["127.0.0.1:0"]).await
    }

    pub async fn start_config(
        config: sniplex::Config,
        mut options: sniplex::Options,
        listen: &[&str],
    ) -> Router {
        // The listeners are handed in, as systemd would: `listen` in the config is not bound.
        options.activated = true;
        let listeners: Vec<std::net::TcpListener> = listen
            .iter()
            .map(|a| std::net::TcpListener::bind(a).unwrap())
            .collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let (control, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(sniplex::run(config, listeners, options, rx));
        Router {
            addr: addrs[0],
            addrs,
            control,
            task: Some(task),
        }
    }

    /// Asks for a reload and returns its result (the new summary, or the error).
    pub async fn reload(&self) -> Result<String, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.control
            .send(sniplex::Control::Reload(Some(tx)))
            .unwrap();
        tokio::time::timeout(DEADLINE, rx).await.unwrap().unwrap()
    }

    /// Triggers shutdown and waits for the drain to finish.
    pub async fn stop(mut self) {
        let _ = self.control.send(sniplex::Control::Shutdown);
        if let Some(t) = self.task.take() {
            tokio::time::timeout(DEADLINE, t)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The real `sniplex` binary, with its stderr collected line by line.
pub struct Binary {
    pub child: std::process::Child,
    pub addrs: Vec<SocketAddr>,
    pub log: Arc<Mutex<Vec<String>>>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Binary {
    pub fn exe() -> &'static str {
        env!("CARGO_BIN_EXE_sniplex")
    }

    /// Starts `sniplex run -c config` and waits for its `listening` lines (one per listener).
    pub fn start(config: &Path, listeners: usize) -> Binary {
        let mut cmd = std::process::Command::new(Self::exe());
        cmd.args(["run", "-c"]).arg(config);
        Self::start_cmd(cmd, listeners)
    }

    /// Starts a prepared command (the binary, or a wrapper that execs it).
    pub fn start_cmd(mut cmd: std::process::Command, listeners: usize) -> Binary {
        let mut child = cmd
            .env("RUST_LOG", "sniplex=debug")
            .stderr(std::process::Stdio::piped())
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in io::BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[sniplex] {line}");
                log2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut b = Binary {
            child,
            addrs: Vec::new(),
            log,
            lines,
        };
        while b.addrs.len() < listeners {
            let line = b.next_matching("listening");
            b.addrs.push(addr_in(&line));
        }
        b
    }

    /// The `addr=` of the first stderr line containing `needle`.
    pub fn addr_of(&mut self, needle: &str) -> String {
        let line = self.wait_for(needle);
        line.split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned()
    }

    /// A stderr line containing `needle`, already logged or the next one to come (panics at the
    /// deadline).
    pub fn wait_for(&mut self, needle: &str) -> String {
        let seen = self
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(needle))
            .cloned();
        match seen {
            Some(l) => l,
            None => self.next_matching(needle),
        }
    }

    /// The next stderr line (not yet consumed here) containing `needle`.
    pub fn next_matching(&mut self, needle: &str) -> String {
        let end = std::time::Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "sniplex never logged {needle:?}; log: {:#?}",
                    self.log.lock().unwrap()
                ),
            }
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits for the process to exit, with the test deadline.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let end = std::time::Instant::now() + DEADLINE;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(std::time::Instant::now() < end, "sniplex did not exit");
            // The exit is observed by polling the child; a waitpid with timeout is not in std.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Parses `addr=IP:PORT` out of a log line.
pub fn addr_in(line: &str) -> SocketAddr {
    line.split("addr=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// A free TCP port on 127.0.0.1, for tools that cannot bind port 0 themselves (the port is
/// closed again before use, so another process could take it: callers retry on EADDRINUSE).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Counts the bytes that cross a stream at the TCP level (TLS records included).
pub struct Counting<S> {
    pub inner: S,
    pub read: Arc<std::sync::atomic::AtomicU64>,
    pub written: Arc<std::sync::atomic::AtomicU64>,
}

impl<S> Counting<S> {
    pub fn new(inner: S) -> Self {
        Counting {
            inner,
            read: Default::default(),
            written: Default::default(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut me.inner).poll_read(cx, buf);
        me.read.fetch_add(
            (buf.filled().len() - before) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            me.written
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A plain HTTP GET over a fresh connection; returns the body of a 200 response.
pub async fn http_get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
