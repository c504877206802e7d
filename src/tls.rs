//! TLS termination: loading a route's certificate chain and key into a rustls config (errors
//! name the file), and finishing a handshake whose ClientHello was already read by the router.
//! The crypto provider is aws-lc-rs, passed explicitly (post-quantum X25519MLKEM768 preferred).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::Acceptor;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the server config for a terminated route. `alpn` is what sniplex will negotiate:
/// a client that offers ALPN but none of these gets the `no_application_protocol` alert.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[Vec<u8>],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {}", cert.display(), pem_error(e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {}", cert.display(), pem_error(e)))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: {}", key.display(), pem_error(e)))?;
    let certified = certified_key(chain, key_der).map_err(|e| match e {
        KeyError::Mismatch(e) => {
            format!("{} does not match {}: {e}", key.display(), cert.display())
        }
        KeyError::Other(e) => format!("{} / {}: {e}", cert.display(), key.display()),
    })?;
    let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(certified));
    with_tickets(config_with(resolver, alpn)?)
}

/// Why a chain and a key do not make a usable certified key.
#[derive(Debug)]
pub enum KeyError {
    /// The key is not the certificate's.
    Mismatch(rustls::Error),
    Other(rustls::Error),
}

/// A chain and its private key, checked to belong together: `from_der` tolerates "unknown"
/// consistency, but a key we can check and that does not match must fail at load, not at the
/// first handshake.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::sign::CertifiedKey, KeyError> {
    let certified =
        rustls::sign::CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => KeyError::Mismatch(e),
            e => KeyError::Other(e),
        })?;
    match certified.keys_match() {
        Err(e @ rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(KeyError::Mismatch(e))
        }
        _ => Ok(certified),
    }
}

/// The server config every terminated route uses (TLS 1.3 and 1.2, aws-lc-rs, no client
/// auth), with certificates from `resolver` and `alpn` to negotiate.
pub fn config_with(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    alpn: &[Vec<u8>],
) -> Result<rustls::ServerConfig, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

/// Adds stateless session tickets (what routes serving clients use).
pub fn with_tickets(mut config: rustls::ServerConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => {
            "no PEM item of the expected kind (certificate or private key)".into()
        }
        other => format!("not valid PEM: {other:?}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("ClientHello rejected by TLS: {0}")]
    Hello(rustls::Error),
}

/// A stream that first yields bytes already read from it.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.pos < me.prefix.len() {
            let n = (me.prefix.len() - me.pos).min(buf.remaining());
            buf.put_slice(&me.prefix[me.pos..me.pos + n]);
            me.pos += n;
            if me.pos == me.prefix.len() {
                me.prefix = Vec::new();
                me.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The client side of a terminated connection.
pub type ClientTls = TlsStream<Prefixed<TcpStream>>;

/// Completes the handshake on `client`, feeding rustls the `hello` records already read (no
/// second read, no re-parse by us). `after` is whatever the client sent after its hello in the
/// same reads: it is handed to rustls as if it came from the socket now, so it is processed
/// at once rather than after the client's next bytes.
pub async fn accept(
    mut client: TcpStream,
    hello: &[u8],
    after: &[u8],
    config: Arc<rustls::ServerConfig>,
) -> Result<ClientTls, HandshakeError> {
    let mut acceptor = Acceptor::default();
    let mut rest = hello;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(HandshakeError::Tls(e)),
        }
    }
    let accepted = match acceptor.accept() {
        Ok(Some(a)) => a,
        // The router only calls this with a complete hello.
        Ok(None) => {
            return Err(HandshakeError::Tls(io::Error::new(
                io::ErrorKind::InvalidData,
                "incomplete ClientHello",
            )))
        }
        Err((e, mut alert)) => {
            let mut out = Vec::new();
            let _ = alert.write(&mut out);
            let _ = client.write_all(&out).await;
            return Err(HandshakeError::Hello(e));
        }
    };
    let client = Prefixed {
        prefix: after.to_vec(),
        pos: 0,
        inner: client,
    };
    tokio_rustls::StartHandshake::from_parts(accepted, client)
        .into_stream(config)
        .await
        .map_err(HandshakeError::Tls)
}

/// Version and cipher names for the PROXY v2 SSL TLV.
pub fn session_info(conn: &rustls::ServerConnection) -> crate::proxy_protocol::SslInfo {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(v) => format!("{v:?}"),
        None => "unknown".to_owned(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("unknown")
        .to_owned();
    crate::proxy_protocol::SslInfo { version, cipher }
}
