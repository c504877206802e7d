//! PROXY protocol v1 and v2 headers (HAProxy's proxy-protocol.txt), written to a backend before
//! any other byte so it learns the real client address. Pure: bytes out, no I/O.

use std::net::{IpAddr, SocketAddr};

/// Which header a route asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The 12-byte v2 signature.
pub const V2_SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
pub const PP2_TYPE_ALPN: u8 = 0x01;
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
pub const PP2_TYPE_SSL: u8 = 0x20;
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
pub const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
pub const PP2_CLIENT_SSL: u8 = 0x01;

/// Facts about the TLS session when sniplex terminated it (for PP2_TYPE_SSL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SslInfo {
    /// "TLSv1.3", "TLSv1.2" (the spelling OpenSSL and HAProxy use).
    pub version: String,
    /// IANA cipher suite name, e.g. "TLS_AES_128_GCM_SHA256".
    pub cipher: String,
}

/// What goes into a header besides the addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extra<'a> {
    /// The SNI (PP2_TYPE_AUTHORITY).
    pub authority: Option<&'a str>,
    /// The client's first ALPN offer in passthrough, the negotiated protocol when terminated.
    pub alpn: Option<&'a [u8]>,
    pub ssl: Option<SslInfo>,
}

/// An IPv4-mapped IPv6 address (a v4 client on a dual-stack socket) is written as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The two addresses in one family: IPv4 if both are IPv4, else both as IPv6.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (canonical(src), canonical(dst));
    match (s.ip(), d.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (s, d),
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
                IpAddr::V6(_) => a,
            };
            (v6(s), v6(d))
        }
    }
}

/// `PROXY TCP4 1.2.3.4 5.6.7.8 1234 443\r\n` (at most 107 bytes, as the spec requires).
pub fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (s, d) = same_family(src, dst);
    let proto = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    )
    .into_bytes()
}

/// A v2 PROXY command for a TCP stream, with the TLVs in `extra`.
pub fn v2(src: SocketAddr, dst: SocketAddr, extra: &Extra<'_>) -> Vec<u8> {
    let (s, d) = same_family(src, dst);
    let mut body = Vec::with_capacity(64);
    let family = match (s.ip(), d.ip()) {
        (IpAddr::V4(si), IpAddr::V4(di)) => {
            body.extend_from_slice(&si.octets());
            body.extend_from_slice(&di.octets());
            0x11 // AF_INET, STREAM
        }
        (IpAddr::V6(si), IpAddr::V6(di)) => {
            body.extend_from_slice(&si.octets());
            body.extend_from_slice(&di.octets());
            0x21 // AF_INET6, STREAM
        }
        // same_family() never returns mixed families.
        _ => 0x00,
    };
    body.extend_from_slice(&s.port().to_be_bytes());
    body.extend_from_slice(&d.port().to_be_bytes());
    if let Some(alpn) = extra.alpn {
        tlv(&mut body, PP2_TYPE_ALPN, alpn);
    }
    if let Some(authority) = extra.authority {
        tlv(&mut body, PP2_TYPE_AUTHORITY, authority.as_bytes());
    }
    if let Some(ssl) = &extra.ssl {
        let mut v = vec![PP2_CLIENT_SSL];
        // verify: 0, as HAProxy sends when no client certificate is involved (X509_V_OK).
        v.extend_from_slice(&0u32.to_be_bytes());
        tlv(&mut v, PP2_SUBTYPE_SSL_VERSION, ssl.version.as_bytes());
        tlv(&mut v, PP2_SUBTYPE_SSL_CIPHER, ssl.cipher.as_bytes());
        tlv(&mut body, PP2_TYPE_SSL, &v);
    }
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY command
    out.push(family);
    // Bounded: SNI <= 253, ALPN <= 255, the SSL TLV a few dozen bytes.
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(value.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(&value[..value.len().min(u16::MAX as usize)]);
}

pub fn header(version: Version, src: SocketAddr, dst: SocketAddr, extra: &Extra<'_>) -> Vec<u8> {
    match version {
        Version::V1 => v1(src, dst),
        Version::V2 => v2(src, dst, extra),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_ipv4_ipv6_and_mapped() {
        assert_eq!(
            v1(sa("192.0.2.1:5678"), sa("198.51.100.2:443")),
            b"PROXY TCP4 192.0.2.1 198.51.100.2 5678 443\r\n"
        );
        assert_eq!(
            v1(sa("[2001:db8::1]:5678"), sa("[2001:db8::2]:443")),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 5678 443\r\n"
        );
        assert_eq!(
            v1(sa("[::ffff:192.0.2.1]:1"), sa("[::ffff:192.0.2.2]:443")),
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 443\r\n"
        );
        let longest = v1(
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        );
        assert_eq!(longest.len(), 104);
    }

    #[test]
    fn v2_ipv4_byte_for_byte() {
        let h = v2(
            sa("192.0.2.1:5678"),
            sa("198.51.100.2:443"),
            &Extra::default(),
        );
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 2, 0x16, 0x2e, 0x01, 0xbb,
        ]);
        assert_eq!(h, want);
    }

    #[test]
    fn v2_ipv6_with_tlvs() {
        let extra = Extra {
            authority: Some("git.example.org"),
            alpn: Some(b"h2"),
            ssl: Some(SslInfo {
                version: "TLSv1.3".into(),
                cipher: "TLS_AES_128_GCM_SHA256".into(),
            }),
        };
        let h = v2(sa("[2001:db8::1]:1"), sa("[2001:db8::2]:443"), &extra);
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x21);
        let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
        assert_eq!(h.len(), 16 + len);
        let tlvs = &h[16 + 36..];
        assert_eq!(&tlvs[..5], &[PP2_TYPE_ALPN, 0, 2, b'h', b'2']);
        assert_eq!(&tlvs[5..8], &[PP2_TYPE_AUTHORITY, 0, 15]);
        assert_eq!(&tlvs[8..23], b"git.example.org");
        assert_eq!(tlvs[23], PP2_TYPE_SSL);
        let ssl_len = usize::from(u16::from_be_bytes([tlvs[24], tlvs[25]]));
        let ssl = &tlvs[26..26 + ssl_len];
        assert_eq!(&ssl[..5], &[PP2_CLIENT_SSL, 0, 0, 0, 0]);
        assert_eq!(&ssl[5..8], &[PP2_SUBTYPE_SSL_VERSION, 0, 7]);
        assert_eq!(&ssl[8..15], b"TLSv1.3");
        assert_eq!(ssl[15], PP2_SUBTYPE_SSL_CIPHER);
        assert_eq!(tlvs.len(), 26 + ssl_len);
    }

    #[test]
    fn mixed_families_become_ipv6() {
        let h = v2(
            sa("192.0.2.1:1"),
            sa("[2001:db8::2]:443"),
            &Extra::default(),
        );
        assert_eq!(h[13], 0x21);
        assert_eq!(
            &h[16..32],
            &"::ffff:192.0.2.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
    }
}
