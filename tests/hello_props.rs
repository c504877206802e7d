//! Property tests of the ClientHello reader: for any valid hello, any framing into TLS records
//! and any split into TCP reads, the reader returns the same SNI and ALPN, completes exactly
//! at the last byte, and keeps exactly the bytes it was given.

use proptest::prelude::*;
use sniplex::hello::{read_client_hello, testing, HelloReader};

/// Frames `msg` into records of the given sizes (cycled), each at least 1 byte.
fn frame(msg: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut k = 0;
    while i < msg.len() {
        let n = sizes[k % sizes.len()].clamp(1, 16384).min(msg.len() - i);
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&msg[i..i + n]);
        i += n;
        k += 1;
    }
    out
}

/// Feeds `raw` in chunks of the given sizes (cycled); returns the result and the byte count
/// at which the reader decided.
fn feed_chunked(
    raw: &[u8],
    chunks: &[usize],
) -> (
    Result<Option<sniplex::hello::ClientHello>, sniplex::hello::HelloError>,
    usize,
    Vec<u8>,
) {
    let mut r = HelloReader::new();
    let mut fed = 0;
    let mut k = 0;
    while fed < raw.len() {
        let n = chunks[k % chunks.len()].max(1).min(raw.len() - fed);
        let res = r.feed(&raw[fed..fed + n]);
        fed += n;
        k += 1;
        if !matches!(res, Ok(None)) {
            return (res, fed, r.buffered().to_vec());
        }
    }
    (Ok(None), fed, r.buffered().to_vec())
}

fn dns_name() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z][a-z0-9-]{0,14}[a-z0-9](\\.[a-z][a-z0-9]{0,10}){0,4}")
        .unwrap()
}

fn alpn_list() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(
        proptest::string::string_regex("[a-z0-9/.-]{1,24}").unwrap(),
        0..6,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_framing_and_chunking_gives_the_same_answer(
        sni in proptest::option::of(dns_name()),
        alpn in alpn_list(),
        pad in 0usize..6000,
        records in proptest::collection::vec(1usize..3000, 1..8),
        chunks in proptest::collection::vec(1usize..2000, 1..8),
    ) {
        let alpn_refs: Vec<&str> = alpn.iter().map(|s| s.as_str()).collect();
        let one = testing::client_hello(sni.as_deref(), &alpn_refs, pad);
        let msg = testing::payload(&one);
        let raw = frame(&msg, &records);
        let (res, at, kept) = feed_chunked(&raw, &chunks);
        let hello = res.expect("valid hello rejected").expect("valid hello incomplete");
        prop_assert_eq!(at, raw.len(), "decided before the last byte");
        prop_assert_eq!(&kept, &raw, "the bytes to replay differ from the bytes received");
        prop_assert_eq!(hello.sni.as_ref().map(|n| n.as_str().to_owned()), sni.clone());
        let want: Vec<Vec<u8>> = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        prop_assert_eq!(&hello.alpn, &want);
        // And the one-shot answer is the same.
        prop_assert_eq!(read_client_hello(&raw).unwrap().unwrap(), hello);
    }

    #[test]
    fn captured_hellos_survive_any_split(
        which in 0usize..4,
        records in proptest::collection::vec(1usize..700, 1..6),
        chunks in proptest::collection::vec(1usize..900, 1..6),
    ) {
        let (file, sni) = [
            ("openssl.bin", "openssl.example"),
            ("curl.bin", "curl.example"),
            ("gnutls.bin", "gnutls.example"),
            ("rustls-pq.bin", "rustls.example"),
        ][which];
        let bytes = std::fs::read(format!("{}/tests/fixtures/hello/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let raw = frame(&testing::payload(&bytes), &records);
        let (res, at, kept) = feed_chunked(&raw, &chunks);
        let hello = res.unwrap().unwrap();
        prop_assert_eq!(at, raw.len());
        prop_assert_eq!(kept, raw);
        let got = hello.sni.unwrap();
        prop_assert_eq!(got.as_str(), sni);
    }

    #[test]
    fn arbitrary_bytes_get_the_same_decision_however_they_are_chunked(
        data in proptest::collection::vec(any::<u8>(), 0..4000),
        prefix_tls in any::<bool>(),
        chunks in proptest::collection::vec(1usize..500, 1..6),
    ) {
        let mut raw = if prefix_tls { vec![22, 3, 1] } else { Vec::new() };
        raw.extend_from_slice(&data);
        let whole = read_client_hello(&raw);
        let (chunked, _, _) = feed_chunked(&raw, &chunks);
        prop_assert_eq!(whole, chunked);
    }
}
