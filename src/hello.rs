//! Pure ClientHello reader: raw bytes in, one of "need more", "not TLS / malformed / too large" or
//! "hello with SNI and ALPN" out. No I/O and no tokio, so it can be fuzzed and benchmarked alone.
//!
//! TLS record reassembly is done here (a hello may be fragmented over many records and arrive in
//! many TCP segments); tls-parser parses the reassembled handshake message body. The reader keeps
//! every byte it was fed, unchanged, so the caller can replay them to the backend.

use crate::name::{NameError, ServerName};
use tls_parser::{SNIType, TlsExtension};

/// Largest ClientHello handshake message accepted (4-byte header excluded). Post-quantum hellos
/// are ~1.8 KiB today and a hello with many PSK identities can reach ~10 KiB; 32 KiB leaves room
/// while bounding what one unauthenticated client can make us hold.
pub const MAX_HANDSHAKE_LEN: usize = 32 * 1024;
/// Largest number of raw bytes (record headers included) buffered before the hello is complete.
/// Bounds memory even when an attacker fragments into tiny records (5 bytes of header each).
pub const MAX_BUFFERED: usize = 64 * 1024;
/// RFC 8446 section 5.1: a TLSPlaintext fragment MUST NOT exceed 2^14 bytes.
pub const MAX_RECORD_LEN: usize = 1 << 14;

const CONTENT_HANDSHAKE: u8 = 22;
const TOO_MUCH: &str = "more than 64 KiB before the hello was complete";
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;

/// What the reader learned from a complete ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The first `host_name` entry of the server_name extension, normalised.
    pub sni: Option<ServerName>,
    /// Set when the client sent a server name that is not a valid DNS name (it is then treated as
    /// absent for routing; kept for the log line).
    pub bad_sni: Option<NameError>,
    /// ALPN protocol names in the client's order of preference.
    pub alpn: Vec<Vec<u8>>,
    /// `legacy_version` of the ClientHello body (0x0303 for TLS 1.2 and 1.3 clients).
    pub version: u16,
}

/// Why a connection is not a ClientHello we accept. Every variant is the client's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first bytes are not a TLS handshake record (HTTP, SSH, SSLv2-style hello, noise).
    #[error("not TLS: {0}")]
    NotTls(&'static str),
    /// It starts like TLS but breaks the record or ClientHello format.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// Larger than [`MAX_HANDSHAKE_LEN`], [`MAX_RECORD_LEN`] or [`MAX_BUFFERED`].
    #[error("ClientHello too large: {0}")]
    TooLarge(&'static str),
}

impl HelloError {
    /// Stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            HelloError::NotTls(_) => "not_tls",
            HelloError::Malformed(_) => "malformed",
            HelloError::TooLarge(_) => "too_large",
        }
    }

    /// Whether the peer spoke TLS far enough that a TLS alert is a meaningful answer.
    pub fn is_tls(&self) -> bool {
        !matches!(self, HelloError::NotTls(_))
    }
}

/// Incremental reader. Feed it bytes as they arrive; it never re-scans what it already parsed.
#[derive(Debug, Default)]
pub struct HelloReader {
    /// Every byte received so far, exactly as received.
    raw: Vec<u8>,
    /// Offset in `raw` of the first record not yet consumed.
    parsed: usize,
    /// Reassembled handshake-layer bytes (record payloads concatenated).
    msg: Vec<u8>,
}

impl HelloReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes received so far, unchanged: what must be replayed to the backend.
    pub fn buffered(&self) -> &[u8] {
        &self.raw
    }

    /// Takes the bytes received so far (see [`buffered`](Self::buffered)).
    pub fn into_buffered(self) -> Vec<u8> {
        self.raw
    }

    /// How many bytes of [`buffered`](Self::buffered) are whole records read so far. Once the
    /// hello is complete this is where the records holding it end; anything after it is the
    /// client's next bytes.
    pub fn consumed(&self) -> usize {
        self.parsed
    }

    /// Appends `data` and advances. `Ok(None)` means the hello is not complete yet.
    ///
    /// The decision never depends on how the bytes were chunked: feeding a stream in one call
    /// or byte by byte gives the same result at the same byte.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<ClientHello>, HelloError> {
        self.raw.extend_from_slice(data);
        let r = self.advance()?;
        if r.is_none() && self.raw.len() > MAX_BUFFERED {
            // The incomplete record at the end already reaches past the limit.
            return Err(HelloError::TooLarge(TOO_MUCH));
        }
        Ok(r)
    }

    fn advance(&mut self) -> Result<Option<ClientHello>, HelloError> {
        loop {
            let rest = &self.raw[self.parsed..];
            let first = self.parsed == 0;
            check_record_prefix(rest, first)?;
            if rest.len() < RECORD_HEADER_LEN {
                return Ok(None);
            }
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            if len == 0 {
                // RFC 8446 5.1: zero-length handshake fragments MUST NOT be sent.
                return Err(HelloError::Malformed("zero-length handshake record"));
            }
            if len > MAX_RECORD_LEN {
                return Err(HelloError::TooLarge("record longer than 2^14 bytes"));
            }
            if self.parsed + RECORD_HEADER_LEN + len > MAX_BUFFERED {
                return Err(HelloError::TooLarge(TOO_MUCH));
            }
            // Reject early when the first handshake byte is visible, before the record is whole.
            if self.msg.is_empty() && rest.len() > RECORD_HEADER_LEN {
                check_handshake_type(rest[RECORD_HEADER_LEN])?;
            }
            if rest.len() < RECORD_HEADER_LEN + len {
                return Ok(None);
            }
            self.msg
                .extend_from_slice(&rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len]);
            self.parsed += RECORD_HEADER_LEN + len;

            if let Some(hello) = parse_handshake(&self.msg)? {
                return Ok(Some(hello));
            }
        }
    }
}

/// Reads a ClientHello from handshake-layer bytes (no TLS records around them), as QUIC carries
/// them in CRYPTO frames. `Ok(None)`: not complete yet. Bytes after the hello are ignored.
pub fn parse_handshake(msg: &[u8]) -> Result<Option<ClientHello>, HelloError> {
    let Some(&first) = msg.first() else {
        return Ok(None);
    };
    check_handshake_type(first)?;
    if msg.len() < HANDSHAKE_HEADER_LEN {
        return Ok(None);
    }
    let body_len = usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]);
    if body_len > MAX_HANDSHAKE_LEN {
        return Err(HelloError::TooLarge("handshake message longer than 32 KiB"));
    }
    match msg.get(HANDSHAKE_HEADER_LEN..HANDSHAKE_HEADER_LEN + body_len) {
        Some(body) => parse_body(body).map(Some),
        None => Ok(None),
    }
}

/// Convenience for whole buffers (fuzzing, benchmarks, tests).
pub fn read_client_hello(bytes: &[u8]) -> Result<Option<ClientHello>, HelloError> {
    HelloReader::new().feed(bytes)
}

/// Checks as much of a record header as is present, so non-TLS input is refused on its first byte.
fn check_record_prefix(rest: &[u8], first: bool) -> Result<(), HelloError> {
    let wrong = |why| {
        if first {
            HelloError::NotTls(why)
        } else {
            HelloError::Malformed(why)
        }
    };
    if let Some(&ct) = rest.first() {
        if ct != CONTENT_HANDSHAKE {
            return Err(wrong("record is not a handshake record"));
        }
    }
    if let Some(&major) = rest.get(1) {
        if major != 3 {
            return Err(wrong("record version is not 3.x"));
        }
    }
    if let Some(&minor) = rest.get(2) {
        if minor > 4 {
            return Err(wrong("record version is not 3.0-3.4"));
        }
    }
    Ok(())
}

fn check_handshake_type(t: u8) -> Result<(), HelloError> {
    if t == HANDSHAKE_CLIENT_HELLO {
        Ok(())
    } else {
        Err(HelloError::Malformed(
            "first handshake message is not a ClientHello",
        ))
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let (rest, ch) = tls_parser::parse_tls_handshake_client_hello(body)
        .map_err(|_| HelloError::Malformed("ClientHello body does not parse"))?;
    if !rest.is_empty() {
        return Err(HelloError::Malformed(
            "trailing bytes after ClientHello extensions",
        ));
    }
    let mut hello = ClientHello {
        sni: None,
        bad_sni: None,
        alpn: Vec::new(),
        version: ch.version.0,
    };
    let Some(mut exts) = ch.ext else {
        return Ok(hello);
    };
    // The extension list is framed here rather than with tls-parser's list parser, which stops
    // silently at the first extension it cannot parse and would then miss a later SNI.
    let (mut seen_sni, mut seen_alpn) = (false, false);
    while !exts.is_empty() {
        if exts.len() < 4 {
            return Err(HelloError::Malformed("truncated extension header"));
        }
        let ext_type = u16::from_be_bytes([exts[0], exts[1]]);
        let ext_len = usize::from(u16::from_be_bytes([exts[2], exts[3]]));
        let data = exts.get(4..4 + ext_len).ok_or(HelloError::Malformed(
            "extension longer than the extension block",
        ))?;
        exts = &exts[4 + ext_len..];
        match ext_type {
            EXT_SERVER_NAME => {
                if std::mem::replace(&mut seen_sni, true) {
                    return Err(HelloError::Malformed("duplicate server_name extension"));
                }
                parse_sni(data, &mut hello)?;
            }
            EXT_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(HelloError::Malformed("duplicate ALPN extension"));
                }
                hello.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(hello)
}

fn parse_sni(data: &[u8], hello: &mut ClientHello) -> Result<(), HelloError> {
    let list_len = data
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    if list_len != Some(data.len().wrapping_sub(2)) {
        return Err(HelloError::Malformed("server_name list length mismatch"));
    }
    let Ok((rest, TlsExtension::SNI(names))) = tls_parser::parse_tls_extension_sni_content(data)
    else {
        return Err(HelloError::Malformed(
            "server_name extension does not parse",
        ));
    };
    if !rest.is_empty() {
        return Err(HelloError::Malformed(
            "trailing bytes in server_name extension",
        ));
    }
    if let Some((_, name)) = names.iter().find(|(t, _)| *t == SNIType::HostName) {
        match ServerName::parse(name) {
            Ok(n) => hello.sni = Some(n),
            Err(e) => hello.bad_sni = Some(e),
        }
    }
    Ok(())
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let list_len = data
        .get(..2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    if list_len != Some(data.len().wrapping_sub(2)) {
        return Err(HelloError::Malformed("ALPN list length mismatch"));
    }
    match tls_parser::parse_tls_extension_alpn_content(data) {
        Ok((&[], TlsExtension::ALPN(protos))) => {
            if protos.iter().any(|p| p.is_empty()) {
                return Err(HelloError::Malformed("empty ALPN protocol name"));
            }
            Ok(protos.into_iter().map(<[u8]>::to_vec).collect())
        }
        _ => Err(HelloError::Malformed("ALPN extension does not parse")),
    }
}

/// Builders for ClientHello bytes, shared by unit tests, benchmarks and the fuzz corpus.
#[doc(hidden)]
pub mod testing {
    /// Builds a syntactically valid ClientHello record with the given SNI, ALPN list and
    /// `pad` bytes of padding extension, as one TLS record (or several if it exceeds 2^14).
    pub fn client_hello(sni: Option<&str>, alpn: &[&str], pad: usize) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let n = name.as_bytes();
            push_ext(&mut exts, 0, &{
                let mut d = Vec::new();
                d.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
                d.push(0);
                d.extend_from_slice(&(n.len() as u16).to_be_bytes());
                d.extend_from_slice(n);
                d
            });
        }
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for p in alpn {
                list.push(p.len() as u8);
                list.extend_from_slice(p.as_bytes());
            }
            let mut d = (list.len() as u16).to_be_bytes().to_vec();
            d.extend_from_slice(&list);
            push_ext(&mut exts, 16, &d);
        }
        // supported_versions: TLS 1.3, so the hello looks like a modern one.
        push_ext(&mut exts, 43, &[2, 3, 4]);
        if pad > 0 {
            push_ext(&mut exts, 21, &vec![0; pad]);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0x5a; 32]); // random
        body.push(32);
        body.extend_from_slice(&[0xa5; 32]); // legacy session id
        body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]); // two cipher suites
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![1];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        let parts = msg.len().div_ceil(super::MAX_RECORD_LEN);
        records(&msg, parts)
    }

    /// Frames handshake bytes as `parts` records of roughly equal size.
    pub fn records(msg: &[u8], parts: usize) -> Vec<u8> {
        let size = msg.len().div_ceil(parts.max(1)).max(1);
        let mut out = Vec::new();
        for chunk in msg.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// Takes the handshake payload out of a sequence of handshake records.
    pub fn payload(recs: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i + 5 <= recs.len() {
            let len = usize::from(u16::from_be_bytes([recs[i + 3], recs[i + 4]]));
            out.extend_from_slice(&recs[i + 5..(i + 5 + len).min(recs.len())]);
            i += 5 + len;
        }
        out
    }

    fn push_ext(exts: &mut Vec<u8>, t: u16, data: &[u8]) {
        exts.extend_from_slice(&t.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(data);
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn fixtures() -> Vec<(&'static str, Vec<u8>)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hello");
        let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
        for (name, sni) in [
            ("openssl.bin", "openssl.example"),
            ("curl.bin", "curl.example"),
            ("gnutls.bin", "gnutls.example"),
            ("rustls-pq.bin", "rustls.example"),
            // Synthetic, shaped like Chrome's: GREASE, X25519MLKEM768 key share, ECH-like ext.
            ("chrome-like-pq.bin", "chrome.example"),
        ] {
            let bytes = std::fs::read(format!("{dir}/{name}"))
                .unwrap_or_else(|e| panic!("fixture {name}: {e}"));
            out.push((sni, bytes));
        }
        assert_eq!(out.len(), 5, "every captured fixture must be present");
        out
    }

    #[test]
    fn captured_hellos_parse_at_the_end_and_only_at_the_end() {
        for (sni, bytes) in fixtures() {
            for cut in 0..bytes.len() {
                assert_eq!(
                    read_client_hello(&bytes[..cut]),
                    Ok(None),
                    "{sni}: prefix of {cut} bytes must need more"
                );
            }
            let hello = read_client_hello(&bytes).unwrap().unwrap();
            assert_eq!(hello.sni.as_ref().map(|n| n.as_str()), Some(sni));
        }
    }

    #[test]
    fn byte_at_a_time_and_refragmented() {
        for (sni, bytes) in fixtures() {
            let mut r = HelloReader::new();
            let mut got = None;
            for (i, b) in bytes.iter().enumerate() {
                let step = r.feed(std::slice::from_ref(b)).unwrap();
                if step.is_some() {
                    assert_eq!(i, bytes.len() - 1, "{sni}: completed early");
                    got = step;
                }
            }
            assert_eq!(got.unwrap().sni.unwrap().as_str(), sni);
            assert_eq!(r.buffered(), &bytes[..]);
            assert_eq!(r.consumed(), bytes.len());

            let three = records(&payload(&bytes), 3);
            let hello = read_client_hello(&three).unwrap().unwrap();
            assert_eq!(hello.sni.unwrap().as_str(), sni);
        }
    }

    #[test]
    fn sni_and_alpn_extracted_and_normalised() {
        let h = client_hello(Some("Git.Example.ORG."), &["h2", "http/1.1"], 0);
        let hello = read_client_hello(&h).unwrap().unwrap();
        assert_eq!(hello.sni.unwrap().as_str(), "git.example.org");
        assert_eq!(hello.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(hello.version, 0x0303);
    }

    #[test]
    fn no_sni_and_bad_sni() {
        let hello = read_client_hello(&client_hello(None, &[], 0))
            .unwrap()
            .unwrap();
        assert_eq!(hello.sni, None);
        assert_eq!(hello.bad_sni, None);
        let hello = read_client_hello(&client_hello(Some("a b"), &[], 0))
            .unwrap()
            .unwrap();
        assert_eq!(hello.sni, None);
        assert_eq!(hello.bad_sni, Some(NameError::BadChar(' ')));
    }

    #[test]
    fn large_hellos_accepted_up_to_the_limit() {
        let six_k = client_hello(Some("big.example"), &[], 6 * 1024);
        assert!(six_k.len() > 6 * 1024);
        assert!(read_client_hello(&six_k).unwrap().is_some());
        // 20 KiB spans two records (a record holds at most 2^14).
        let twenty_k = client_hello(Some("big.example"), &[], 20 * 1024);
        assert!(read_client_hello(&twenty_k).unwrap().is_some());
        let too_big = client_hello(Some("big.example"), &[], MAX_HANDSHAKE_LEN);
        assert_eq!(
            read_client_hello(&too_big).unwrap_err().label(),
            "too_large"
        );
    }

    #[test]
    fn too_large_is_refused_from_the_header_alone() {
        // Handshake header claims 1 MiB: refused once 4 handshake bytes are visible.
        let recs = [22, 3, 1, 0, 4, 1, 0x10, 0, 0];
        assert_eq!(
            read_client_hello(&recs),
            Err(HelloError::TooLarge("handshake message longer than 32 KiB"))
        );
        let rec = [22, 3, 1, 0x40, 0x01];
        assert_eq!(read_client_hello(&rec).unwrap_err().label(), "too_large");
    }

    #[test]
    fn non_tls_refused_on_first_bytes() {
        for input in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"\x80\x2e\x01\x03\x01", // SSLv2-style hello
            b"\x16\x02",
            b"\x16\x03\x09",
            b"\x17\x03\x03\x00\x10",
        ] {
            let e = read_client_hello(input).unwrap_err();
            assert_eq!(e.label(), "not_tls", "{input:?}");
            assert!(!e.is_tls());
        }
        // A single byte decides.
        assert!(read_client_hello(b"G").is_err());
    }

    #[test]
    fn malformed_tls_refused() {
        // Zero-length record.
        assert_eq!(
            read_client_hello(&[22, 3, 1, 0, 0]).unwrap_err().label(),
            "malformed"
        );
        // ServerHello instead of ClientHello, visible from the 6th byte.
        assert_eq!(
            read_client_hello(&[22, 3, 3, 0, 10, 2])
                .unwrap_err()
                .label(),
            "malformed"
        );
        // A complete message whose body is garbage.
        let mut msg = vec![1, 0, 0, 8];
        msg.extend_from_slice(&[0xff; 8]);
        assert_eq!(
            read_client_hello(&records(&msg, 1)).unwrap_err().label(),
            "malformed"
        );
        // An alert record between two fragments of the hello.
        let p = payload(&client_hello(Some("a.example"), &[], 0));
        let half = p.len() / 2;
        let mut evil = records(&p[..half], 1);
        evil.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
        evil.extend_from_slice(&records(&p[half..], 1));
        assert_eq!(read_client_hello(&evil).unwrap_err().label(), "malformed");
    }

    #[test]
    fn buffered_limit_holds_against_tiny_records() {
        // Claim a 30 KiB hello, then send it one byte per record: 6 raw bytes per payload byte.
        let mut r = HelloReader::new();
        let mut result = Ok(None);
        let mut msg = vec![1, 0, 0x78, 0];
        msg.extend_from_slice(&[0; 30 * 1024]);
        for b in &msg {
            result = r.feed(&[22, 3, 1, 0, 1, *b]);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result.unwrap_err().label(), "too_large");
        // At most one feed (here 6 bytes) past the limit is ever held.
        assert!(r.buffered().len() <= MAX_BUFFERED + 6);
    }

    #[test]
    fn truncated_extensions_are_malformed_not_panics() {
        let good = client_hello(Some("a.example"), &["h2"], 0);
        let body = &payload(&good)[4..];
        // Chop the body at every length and fix up the lengths: must never panic.
        for cut in 0..body.len() {
            let mut msg = vec![1];
            msg.extend_from_slice(&(cut as u32).to_be_bytes()[1..]);
            msg.extend_from_slice(&body[..cut]);
            let _ = read_client_hello(&records(&msg, 1));
        }
    }
}
