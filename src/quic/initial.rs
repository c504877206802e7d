//! Pure QUIC Initial handling: long-header parsing, Initial packet protection (RFC 9001 section 5,
//! RFC 9369 for v2), CRYPTO frame reassembly up to a whole ClientHello, and the one packet
//! sniplex ever builds itself: a server Initial carrying CONNECTION_CLOSE. No I/O, no tokio.
//!
//! Datagrams are never modified: decryption works on a scratch copy, so the caller forwards the
//! client's bytes exactly as they arrived.

use crate::hello::{self, ClientHello, HelloError, MAX_HANDSHAKE_LEN};
use rustls::quic::{Keys, Version};
use std::collections::BTreeMap;

/// RFC 9000 section 14.1: a client's datagrams carrying Initial packets are at least this long.
pub const MIN_INITIAL_DATAGRAM: usize = 1200;
pub const VERSION_1: u32 = 0x0000_0001;
/// RFC 9369.
pub const VERSION_2: u32 = 0x6b33_43cf;
/// RFC 9000 section 17.2: connection IDs are at most 20 bytes in versions 1 and 2.
pub const MAX_CID_LEN: usize = 20;
/// CONNECTION_CLOSE error code for TLS alert 112 (unrecognized_name): 0x100 + alert.
pub const CRYPTO_ERROR_UNRECOGNIZED_NAME: u64 = 0x100 + 112;
/// The most CRYPTO bytes (hello plus header) one pending flow may make us hold.
const MAX_CRYPTO: u64 = (MAX_HANDSHAKE_LEN + 4) as u64;
/// Bounds the work an attacker can cause with overlapping tiny CRYPTO frames.
const MAX_CHUNKS: usize = 256;
const AEAD_TAG_LEN: usize = 16;
const HP_SAMPLE_LEN: usize = 16;

/// Why a datagram does not start or continue a QUIC flow. Every variant is the sender's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitialError {
    #[error("not a long-header QUIC packet")]
    NotLongHeader,
    #[error("unsupported QUIC version {0:#010x}")]
    UnknownVersion(u32),
    #[error("first packet is not an Initial")]
    NotInitial,
    #[error("Initial in a datagram of {0} bytes (at least 1200 required)")]
    ShortDatagram(usize),
    #[error("malformed QUIC packet: {0}")]
    Malformed(&'static str),
    #[error("Initial packet does not decrypt")]
    Undecryptable,
    #[error("QUIC ClientHello: {0}")]
    Hello(HelloError),
    #[error("QUIC ClientHello larger than 32 KiB or too fragmented")]
    TooLarge,
}

impl InitialError {
    /// Stable label for logs and `sniplex_rejected_total{reason}`.
    pub fn label(&self) -> &'static str {
        match self {
            InitialError::NotLongHeader | InitialError::NotInitial => "quic_not_initial",
            InitialError::UnknownVersion(_) => "quic_version",
            InitialError::ShortDatagram(_) => "quic_short_initial",
            InitialError::Malformed(_) => "quic_malformed",
            InitialError::Undecryptable => "quic_undecryptable",
            InitialError::Hello(_) => "quic_bad_hello",
            InitialError::TooLarge => "quic_too_large",
        }
    }
}

/// Long-header packet types, by meaning (their wire bits differ between v1 and v2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
}

/// The invariant and version-specific parts of one long-header packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongHeader<'a> {
    pub version: u32,
    pub ty: PacketType,
    pub dcid: &'a [u8],
    pub scid: &'a [u8],
    /// Initial only: the token.
    pub token: &'a [u8],
    /// Offset of the packet number (start of the protected part) in the packet.
    pub pn_offset: usize,
    /// Length of this packet in the datagram (coalesced packets follow it).
    pub packet_len: usize,
}

/// Whether the first byte says "long header" (RFC 8999: the high bit).
pub fn is_long_header(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & 0x80 != 0)
}

/// Reads a QUIC variable-length integer (RFC 9000 section 16).
pub fn read_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(..len)?;
    let mut v = u64::from(first & 0x3f);
    for b in &bytes[1..] {
        v = v << 8 | u64::from(*b);
    }
    Some((v, len))
}

fn push_varint(out: &mut Vec<u8>, v: u64) {
    match v {
        0..=0x3f => out.push(v as u8),
        0x40..=0x3fff => out.extend_from_slice(&(v as u16 | 0x4000).to_be_bytes()),
        0x4000..=0x3fff_ffff => out.extend_from_slice(&(v as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

fn packet_type(version: u32, first: u8) -> PacketType {
    let bits = (first >> 4) & 0x03;
    match (version == VERSION_2, bits) {
        (false, 0) | (true, 1) => PacketType::Initial,
        (false, 1) | (true, 2) => PacketType::ZeroRtt,
        (false, 2) | (true, 3) => PacketType::Handshake,
        _ => PacketType::Retry,
    }
}

fn type_bits(version: u32, ty: PacketType) -> u8 {
    let v1 = match ty {
        PacketType::Initial => 0,
        PacketType::ZeroRtt => 1,
        PacketType::Handshake => 2,
        PacketType::Retry => 3,
    };
    if version == VERSION_2 {
        (v1 + 1) & 0x03
    } else {
        v1
    }
}

fn rustls_version(version: u32) -> Option<Version> {
    match version {
        VERSION_1 => Some(Version::V1),
        VERSION_2 => Some(Version::V2),
        _ => None,
    }
}

/// Parses the long header at the start of `pkt`. Versions other than 1 and 2 are
/// [`InitialError::UnknownVersion`] (their layout beyond the invariants is unknown).
pub fn parse_long_header(pkt: &[u8]) -> Result<LongHeader<'_>, InitialError> {
    let first = *pkt.first().ok_or(InitialError::NotLongHeader)?;
    if first & 0x80 == 0 {
        return Err(InitialError::NotLongHeader);
    }
    let short = InitialError::Malformed("truncated long header");
    let version = u32::from_be_bytes(
        pkt.get(1..5)
            .ok_or(short.clone())?
            .try_into()
            .map_err(|_| short.clone())?,
    );
    if rustls_version(version).is_none() {
        return Err(InitialError::UnknownVersion(version));
    }
    if first & 0x40 == 0 {
        return Err(InitialError::Malformed("fixed bit is zero"));
    }
    let mut at = 5;
    let cid = |at: &mut usize| -> Result<&[u8], InitialError> {
        let len = usize::from(*pkt.get(*at).ok_or(short.clone())?);
        if len > MAX_CID_LEN {
            return Err(InitialError::Malformed(
                "connection ID longer than 20 bytes",
            ));
        }
        let c = pkt.get(*at + 1..*at + 1 + len).ok_or(short.clone())?;
        *at += 1 + len;
        Ok(c)
    };
    let dcid = cid(&mut at)?;
    let scid = cid(&mut at)?;
    let ty = packet_type(version, first);
    if ty == PacketType::Retry {
        return Ok(LongHeader {
            version,
            ty,
            dcid,
            scid,
            token: &[],
            pn_offset: pkt.len(),
            packet_len: pkt.len(),
        });
    }
    let mut token: &[u8] = &[];
    if ty == PacketType::Initial {
        let (tlen, n) = read_varint(&pkt[at..]).ok_or(short.clone())?;
        at += n;
        let tlen = usize::try_from(tlen).map_err(|_| short.clone())?;
        token = pkt.get(at..at.saturating_add(tlen)).ok_or(short.clone())?;
        at += tlen;
    }
    let (len, n) = read_varint(&pkt[at..]).ok_or(short.clone())?;
    at += n;
    let len = usize::try_from(len).map_err(|_| short.clone())?;
    if pkt.len() - at < len {
        return Err(InitialError::Malformed(
            "Length field runs past the datagram",
        ));
    }
    Ok(LongHeader {
        version,
        ty,
        dcid,
        scid,
        token,
        pn_offset: at,
        packet_len: at + len,
    })
}

/// The server's connection ID from a backend's long-header reply (its Source Connection ID),
/// so short-header packets addressed to it can be matched after the client's address changes.
pub fn server_cid(datagram: &[u8]) -> Option<&[u8]> {
    let h = parse_long_header(datagram).ok()?;
    (!h.scid.is_empty() && h.ty != PacketType::Retry).then_some(h.scid)
}

/// RFC 9000 appendix A.3.
fn decode_packet_number(largest: Option<u64>, truncated: u64, pn_len: usize) -> u64 {
    let expected = largest.map_or(0, |l| l + 1);
    let win = 1u64 << (pn_len * 8);
    let hwin = win / 2;
    let mask = win - 1;
    let candidate = (expected & !mask) | truncated;
    if candidate + hwin <= expected && candidate < (1 << 62) - win {
        candidate + win
    } else if candidate > expected + hwin && candidate >= win {
        candidate - win
    } else {
        candidate
    }
}

/// A client's Initial handshake in progress: the keys from its first Destination Connection ID
/// and the CRYPTO stream so far. Feed it each datagram of the flow until the hello is whole.
pub struct HelloAssembler {
    version: u32,
    /// The client's original Destination Connection ID (keys are derived from it).
    odcid: Vec<u8>,
    /// The client's Source Connection ID (where a server Initial is addressed).
    scid: Vec<u8>,
    keys: Keys,
    largest_pn: Option<u64>,
    chunks: BTreeMap<u64, Vec<u8>>,
    stored: usize,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for HelloAssembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HelloAssembler")
            .field("version", &self.version)
            .field("odcid", &self.odcid)
            .field("chunks", &self.chunks.len())
            .finish_non_exhaustive()
    }
}

/// The cipher suite every QUIC Initial uses (RFC 9001 section 5.2).
fn initial_keys(version: Version, dcid: &[u8]) -> Keys {
    let suite = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let (Some(tls13), Some(quic)) = (suite.tls13(), suite.tls13().and_then(|s| s.quic)) else {
        // TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite with QUIC support in every rustls build
        // with the aws-lc-rs provider; nothing a peer sends can change that.
        unreachable!("aws-lc-rs provides TLS13_AES_128_GCM_SHA256 for QUIC")
    };
    Keys::initial(version, tls13, quic, dcid, rustls::Side::Server)
}

impl HelloAssembler {
    /// Checks that `datagram` can start a flow (a v1/v2 Initial, in a datagram of at least 1200
    /// bytes) and feeds it. Costs one key derivation and one AEAD open at most.
    pub fn start(datagram: &[u8]) -> Result<(Self, Option<ClientHello>), InitialError> {
        let h = parse_long_header(datagram)?;
        if h.ty != PacketType::Initial {
            return Err(InitialError::NotInitial);
        }
        if datagram.len() < MIN_INITIAL_DATAGRAM {
            return Err(InitialError::ShortDatagram(datagram.len()));
        }
        if h.dcid.len() < 8 {
            // RFC 9000 section 7.2: a client's first Destination Connection ID is at least 8 bytes.
            return Err(InitialError::Malformed(
                "first Destination Connection ID shorter than 8 bytes",
            ));
        }
        let version = rustls_version(h.version).ok_or(InitialError::UnknownVersion(h.version))?;
        let mut a = HelloAssembler {
            version: h.version,
            odcid: h.dcid.to_vec(),
            scid: h.scid.to_vec(),
            keys: initial_keys(version, h.dcid),
            largest_pn: None,
            chunks: BTreeMap::new(),
            stored: 0,
            scratch: Vec::new(),
        };
        let hello = a.feed(datagram)?;
        Ok((a, hello))
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn original_dcid(&self) -> &[u8] {
        &self.odcid
    }

    /// Feeds one more datagram of the flow. Initial packets of this flow are decrypted and their
    /// CRYPTO frames stored; other coalesced packets are skipped. `Ok(None)`: not whole yet.
    pub fn feed(&mut self, datagram: &[u8]) -> Result<Option<ClientHello>, InitialError> {
        let mut rest = datagram;
        let mut decrypted_any = false;
        while is_long_header(rest) {
            let h = parse_long_header(rest)?;
            if h.version != self.version {
                return Err(InitialError::Malformed("version changed within a flow"));
            }
            if h.ty == PacketType::Retry {
                return Err(InitialError::Malformed("client sent a Retry packet"));
            }
            let len = h.packet_len;
            if h.ty == PacketType::Initial && h.dcid == self.odcid.as_slice() {
                self.open_initial(&rest[..len], h.pn_offset)?;
                decrypted_any = true;
            }
            rest = &rest[len..];
        }
        if !decrypted_any {
            return Ok(None);
        }
        self.try_hello()
    }

    fn open_initial(&mut self, pkt: &[u8], pn_offset: usize) -> Result<(), InitialError> {
        let sample = pkt
            .get(pn_offset + 4..pn_offset + 4 + HP_SAMPLE_LEN)
            .ok_or(InitialError::Malformed(
                "Initial too short for a header protection sample",
            ))?;
        let mut first = pkt[0];
        let mut pn = [0u8; 4];
        pn.copy_from_slice(&pkt[pn_offset..pn_offset + 4]);
        self.keys
            .remote
            .header
            .decrypt_in_place(sample, &mut first, &mut pn)
            .map_err(|_| InitialError::Undecryptable)?;
        if first & 0x0c != 0 {
            // Reserved bits must be zero after removing protection (RFC 9000 section 17.2).
            return Err(InitialError::Undecryptable);
        }
        let pn_len = usize::from(first & 0x03) + 1;
        let truncated = pn[..pn_len]
            .iter()
            .fold(0u64, |a, b| a << 8 | u64::from(*b));
        let number = decode_packet_number(self.largest_pn, truncated, pn_len);
        let header_len = pn_offset + pn_len;
        if pkt.len() < header_len + AEAD_TAG_LEN {
            return Err(InitialError::Malformed("Initial shorter than its AEAD tag"));
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(pkt);
        self.scratch[0] = first;
        self.scratch[pn_offset..header_len].copy_from_slice(&pn[..pn_len]);
        let (header, payload) = self.scratch.split_at_mut(header_len);
        let plain = self
            .keys
            .remote
            .packet
            .decrypt_in_place(number, header, payload)
            .map_err(|_| InitialError::Undecryptable)?;
        self.largest_pn = Some(self.largest_pn.map_or(number, |l| l.max(number)));
        let frames = plain.to_vec();
        self.read_frames(&frames)
    }

    fn read_frames(&mut self, mut p: &[u8]) -> Result<(), InitialError> {
        let bad = InitialError::Malformed("truncated frame in Initial");
        while let Some(&ty) = p.first() {
            match ty {
                0x00 | 0x01 => p = &p[1..], // PADDING, PING
                0x02 | 0x03 => {
                    // ACK: largest, delay, range count, first range, ranges, [ECN counts].
                    let mut at = 1;
                    let field = |at: &mut usize| -> Result<u64, InitialError> {
                        let (v, n) = read_varint(&p[*at..]).ok_or(bad.clone())?;
                        *at += n;
                        Ok(v)
                    };
                    field(&mut at)?;
                    field(&mut at)?;
                    let count = field(&mut at)?;
                    field(&mut at)?;
                    if count > 256 {
                        return Err(InitialError::Malformed("ACK frame with too many ranges"));
                    }
                    for _ in 0..count * 2 {
                        field(&mut at)?;
                    }
                    if ty == 0x03 {
                        for _ in 0..3 {
                            field(&mut at)?;
                        }
                    }
                    p = &p[at..];
                }
                0x06 => {
                    let (offset, n1) = read_varint(&p[1..]).ok_or(bad.clone())?;
                    let (len, n2) = read_varint(&p[1 + n1..]).ok_or(bad.clone())?;
                    let start = 1 + n1 + n2;
                    let len = usize::try_from(len).map_err(|_| bad.clone())?;
                    let data = p.get(start..start.saturating_add(len)).ok_or(bad.clone())?;
                    self.store(offset, data)?;
                    p = &p[start + len..];
                }
                0x1c => {
                    // The client gave up; nothing to route.
                    return Err(InitialError::Malformed(
                        "CONNECTION_CLOSE before the hello was whole",
                    ));
                }
                _ => {
                    return Err(InitialError::Malformed(
                        "frame type not allowed in an Initial",
                    ))
                }
            }
        }
        Ok(())
    }

    fn store(&mut self, offset: u64, data: &[u8]) -> Result<(), InitialError> {
        if data.is_empty() {
            return Ok(());
        }
        if offset.saturating_add(data.len() as u64) > MAX_CRYPTO || self.chunks.len() >= MAX_CHUNKS
        {
            return Err(InitialError::TooLarge);
        }
        let keep = self
            .chunks
            .get(&offset)
            .is_none_or(|old| old.len() < data.len());
        if keep {
            let old = self
                .chunks
                .insert(offset, data.to_vec())
                .map_or(0, |o| o.len());
            self.stored = self.stored + data.len() - old;
            if self.stored as u64 > 2 * MAX_CRYPTO {
                return Err(InitialError::TooLarge);
            }
        }
        Ok(())
    }

    /// The contiguous CRYPTO stream from offset 0, parsed as far as it goes.
    fn try_hello(&self) -> Result<Option<ClientHello>, InitialError> {
        let mut msg: Vec<u8> = Vec::new();
        for (&off, data) in &self.chunks {
            let end = msg.len() as u64;
            if off > end {
                break;
            }
            let skip = (end - off) as usize;
            if skip < data.len() {
                msg.extend_from_slice(&data[skip..]);
            }
        }
        hello::parse_handshake(&msg).map_err(InitialError::Hello)
    }

    /// A server Initial carrying CONNECTION_CLOSE with `error` (a CRYPTO_ERROR code such as
    /// [`CRYPTO_ERROR_UNRECOGNIZED_NAME`]), addressed to this client: it fails at once instead
    /// of retransmitting until its timeout. About 60 bytes, always less than the client sent.
    pub fn connection_close(&self, error: u64, reason: &str) -> Vec<u8> {
        const PN_LEN: usize = 1;
        let mut payload = vec![0x1c];
        push_varint(&mut payload, error);
        push_varint(&mut payload, 0x06); // the frame type that caused it: CRYPTO
        let reason = &reason.as_bytes()[..reason.len().min(64)];
        push_varint(&mut payload, reason.len() as u64);
        payload.extend_from_slice(reason);
        // The header protection sample needs 4 + 16 bytes after the packet number's start.
        while PN_LEN + payload.len() + AEAD_TAG_LEN < 4 + HP_SAMPLE_LEN {
            payload.push(0);
        }
        let mut pkt =
            vec![0xc0 | type_bits(self.version, PacketType::Initial) << 4 | (PN_LEN as u8 - 1)];
        pkt.extend_from_slice(&self.version.to_be_bytes());
        pkt.push(self.scid.len() as u8);
        pkt.extend_from_slice(&self.scid);
        // Our Source Connection ID: the client's original DCID is as good as any, and unique.
        pkt.push(self.odcid.len() as u8);
        pkt.extend_from_slice(&self.odcid);
        push_varint(&mut pkt, 0); // no token
        let length = (PN_LEN + payload.len() + AEAD_TAG_LEN) as u64;
        // Always the 2-byte form, so the header length does not depend on the value.
        pkt.extend_from_slice(&(length as u16 | 0x4000).to_be_bytes());
        let pn_offset = pkt.len();
        pkt.push(0); // packet number 0
        let Ok(tag) = self
            .keys
            .local
            .packet
            .encrypt_in_place(0, &pkt[..], &mut payload)
        else {
            return Vec::new();
        };
        pkt.extend_from_slice(&payload);
        pkt.extend_from_slice(tag.as_ref());
        let mut sample = [0u8; HP_SAMPLE_LEN];
        sample.copy_from_slice(&pkt[pn_offset + 4..pn_offset + 4 + HP_SAMPLE_LEN]);
        let (head, tail) = pkt.split_at_mut(pn_offset);
        if self
            .keys
            .local
            .header
            .encrypt_in_place(&sample, &mut head[0], &mut tail[..PN_LEN])
            .is_err()
        {
            return Vec::new();
        }
        pkt
    }
}

/// Reads a fixture file of `<u16 length><datagram>` records (tests, benchmarks, fuzz seeds).
#[doc(hidden)]
pub fn split_fixture(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while bytes.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
        let end = (2 + len).min(bytes.len());
        out.push(bytes[2..end].to_vec());
        bytes = &bytes[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hello::testing;

    const V1: &[u8] = include_bytes!("../../tests/fixtures/quic/v1-app.example.org.bin");
    const V2: &[u8] = include_bytes!("../../tests/fixtures/quic/v2-app.example.org.bin");
    const SPLIT: &[u8] = include_bytes!("../../tests/fixtures/quic/v1-split-app.example.org.bin");

    fn empty(version: u32) -> HelloAssembler {
        HelloAssembler {
            version,
            odcid: vec![7; 8],
            scid: vec![9; 8],
            keys: initial_keys(rustls_version(version).unwrap(), &[7; 8]),
            largest_pn: None,
            chunks: BTreeMap::new(),
            stored: 0,
            scratch: Vec::new(),
        }
    }

    #[test]
    fn varints() {
        for v in [0u64, 63, 64, 16383, 16384, 1 << 30, (1 << 62) - 1] {
            let mut b = Vec::new();
            push_varint(&mut b, v);
            assert_eq!(read_varint(&b), Some((v, b.len())));
        }
        assert_eq!(read_varint(&[0x40]), None);
    }

    #[test]
    fn packet_number_decoding_follows_rfc9000_a3() {
        assert_eq!(
            decode_packet_number(Some(0xa82f30ea), 0x9b32, 2),
            0xa82f9b32
        );
        assert_eq!(decode_packet_number(None, 0, 1), 0);
        assert_eq!(decode_packet_number(Some(3), 4, 1), 4);
    }

    #[test]
    fn type_bits_round_trip_for_both_versions() {
        for v in [VERSION_1, VERSION_2] {
            for t in [
                PacketType::Initial,
                PacketType::ZeroRtt,
                PacketType::Handshake,
                PacketType::Retry,
            ] {
                assert_eq!(packet_type(v, 0xc0 | type_bits(v, t) << 4), t);
            }
        }
    }

    #[test]
    fn aioquic_initials_v1_and_v2_decrypt_to_their_hello() {
        for (fixture, version) in [(V1, VERSION_1), (V2, VERSION_2)] {
            let d = split_fixture(fixture);
            assert_eq!(d.len(), 1);
            let (a, hello) = HelloAssembler::start(&d[0]).unwrap();
            assert_eq!(a.version(), version);
            let hello = hello.expect("one datagram holds the hello");
            assert_eq!(hello.sni.unwrap().as_str(), "app.example.org");
            assert_eq!(hello.alpn, vec![b"h3".to_vec()]);
        }
    }

    #[test]
    fn a_hello_over_two_datagrams_completes_in_either_order() {
        let d = split_fixture(SPLIT);
        assert_eq!(d.len(), 2);
        for (a, b) in [(&d[0], &d[1]), (&d[1], &d[0])] {
            let (mut asm, first) = HelloAssembler::start(a).unwrap();
            assert_eq!(first, None);
            let hello = asm.feed(b).unwrap().expect("whole after both");
            assert_eq!(hello.sni.unwrap().as_str(), "app.example.org");
            // A retransmission of either changes nothing.
            assert!(asm.feed(a).unwrap().is_some());
        }
    }

    #[test]
    fn damaged_short_and_foreign_datagrams_are_refused() {
        let d = split_fixture(V1).remove(0);
        let h = parse_long_header(&d).unwrap();
        let mut flipped = d.clone();
        flipped[h.packet_len - 1] ^= 1; // in the AEAD tag
        assert_eq!(
            HelloAssembler::start(&flipped).unwrap_err(),
            InitialError::Undecryptable
        );
        let mut flipped = d.clone();
        flipped[h.pn_offset + 30] ^= 1;
        assert_eq!(
            HelloAssembler::start(&flipped).unwrap_err(),
            InitialError::Undecryptable
        );
        assert_eq!(
            HelloAssembler::start(&d[..1199]).unwrap_err(),
            InitialError::ShortDatagram(1199)
        );
        let mut other = d.clone();
        other[1..5].copy_from_slice(&0x1a2a_3a4au32.to_be_bytes());
        assert_eq!(
            HelloAssembler::start(&other).unwrap_err(),
            InitialError::UnknownVersion(0x1a2a_3a4a)
        );
        let mut short = d.clone();
        short[0] &= 0x7f;
        assert_eq!(
            HelloAssembler::start(&short).unwrap_err(),
            InitialError::NotLongHeader
        );
        assert_eq!(
            HelloAssembler::start(&[]).unwrap_err(),
            InitialError::NotLongHeader
        );
        for n in 0..d.len().min(64) {
            // Any truncation is an error, never a panic.
            assert!(HelloAssembler::start(&d[..n]).is_err());
        }
    }

    #[test]
    fn crypto_frames_reassemble_out_of_order_with_overlaps() {
        let msg = testing::payload(&testing::client_hello(Some("a.example"), &["h3"], 300));
        let mut a = empty(VERSION_1);
        a.store(100, &msg[100..]).unwrap();
        assert_eq!(a.try_hello().unwrap(), None);
        a.store(0, &msg[..60]).unwrap();
        assert_eq!(a.try_hello().unwrap(), None);
        a.store(50, &msg[50..120]).unwrap();
        let hello = a.try_hello().unwrap().expect("whole");
        assert_eq!(hello.sni.unwrap().as_str(), "a.example");
    }

    #[test]
    fn crypto_beyond_the_bound_is_refused() {
        let mut a = empty(VERSION_1);
        assert_eq!(a.store(MAX_CRYPTO, &[1]), Err(InitialError::TooLarge));
        for i in 0..MAX_CHUNKS as u64 {
            a.store(i * 2, &[1]).unwrap();
        }
        assert_eq!(a.store(10_000, &[1]), Err(InitialError::TooLarge));
    }

    #[test]
    fn connection_close_opens_with_the_client_keys() {
        for version in [VERSION_1, VERSION_2] {
            let a = empty(version);
            let pkt = a.connection_close(CRYPTO_ERROR_UNRECOGNIZED_NAME, "no route");
            assert!(pkt.len() < 100, "{}", pkt.len());
            let h = parse_long_header(&pkt).unwrap();
            assert_eq!((h.ty, h.version), (PacketType::Initial, version));
            assert_eq!((h.dcid, h.scid), (&[9u8; 8][..], &[7u8; 8][..]));
            assert_eq!(h.packet_len, pkt.len());
            // The client derives the same keys from the DCID it chose and opens the packet.
            let client = Keys::initial(
                rustls_version(version).unwrap(),
                rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
                    .tls13()
                    .unwrap(),
                rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
                    .tls13()
                    .unwrap()
                    .quic
                    .unwrap(),
                &[7; 8],
                rustls::Side::Client,
            );
            let mut p = pkt.clone();
            let sample: Vec<u8> = p[h.pn_offset + 4..h.pn_offset + 20].to_vec();
            let (head, tail) = p.split_at_mut(h.pn_offset);
            client
                .remote
                .header
                .decrypt_in_place(&sample, &mut head[0], &mut tail[..4])
                .unwrap();
            assert_eq!(p[0] & 0x03, 0, "1-byte packet number");
            let (header, payload) = p.split_at_mut(h.pn_offset + 1);
            let plain = client
                .remote
                .packet
                .decrypt_in_place(0, header, payload)
                .unwrap();
            assert_eq!(plain[0], 0x1c);
            assert_eq!(read_varint(&plain[1..]), Some((0x170, 2)));
        }
    }
}
