//! Micro-benchmarks of the two pure hot paths (divan): the ClientHello reader on real hellos, and
//! route lookup as the table grows. `cargo bench --bench micro`.
//!
//! The lookup must stay flat from 10 to 100,000 routes: one hash probe for the exact name plus
//! one per label for wildcards.

use sniplex::hello::{read_client_hello, testing, HelloReader};
use sniplex::name::ServerName;
use sniplex::router::{Pattern, RouteTable};
use std::hint::black_box;

fn main() {
    divan::main();
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/hello/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

mod hello {
    use super::*;

    #[divan::bench]
    fn openssl_517_bytes(b: divan::Bencher) {
        // curl's hello: OpenSSL 3 with padding to 517 bytes.
        let h = fixture("curl.bin");
        assert_eq!(h.len(), 517);
        b.bench(|| read_client_hello(black_box(&h)).unwrap().unwrap());
    }

    /// Baseline: tls-parser alone on the same bytes (one record, no reassembly, no SNI
    /// normalisation): what the reader costs on top of the library it builds on.
    #[divan::bench]
    fn baseline_tls_parser_only_517_bytes(b: divan::Bencher) {
        let h = fixture("curl.bin");
        b.bench(|| tls_parser::parse_tls_plaintext(black_box(&h)).unwrap());
    }

    #[divan::bench]
    fn post_quantum_chrome_like(b: divan::Bencher) {
        let h = fixture("chrome-like-pq.bin");
        b.bench(|| read_client_hello(black_box(&h)).unwrap().unwrap());
    }

    #[divan::bench]
    fn post_quantum_rustls(b: divan::Bencher) {
        let h = fixture("rustls-pq.bin");
        b.bench(|| read_client_hello(black_box(&h)).unwrap().unwrap());
    }

    #[divan::bench]
    fn split_over_3_records(b: divan::Bencher) {
        let h = testing::records(&testing::payload(&fixture("curl.bin")), 3);
        b.bench(|| read_client_hello(black_box(&h)).unwrap().unwrap());
    }

    #[divan::bench]
    fn post_quantum_in_two_segments(b: divan::Bencher) {
        // The common case on the wire: the hello arrives in two reads.
        let h = fixture("chrome-like-pq.bin");
        let (first, second) = h.split_at(1448);
        b.bench(|| {
            let mut r = HelloReader::new();
            assert!(r.feed(black_box(first)).unwrap().is_none());
            r.feed(black_box(second)).unwrap().unwrap()
        });
    }
}

mod route {
    use super::*;

    const SIZES: &[usize] = &[10, 1_000, 100_000];

    fn table(n: usize) -> RouteTable<u32> {
        let mut t = RouteTable::new();
        for i in 0..n {
            t.insert(
                Pattern::parse(&format!("svc{i}.example.org")).unwrap(),
                i as u32,
            )
            .unwrap();
            t.insert(
                Pattern::parse(&format!("*.tenant{i}.example.net")).unwrap(),
                i as u32,
            )
            .unwrap();
        }
        t
    }

    #[divan::bench(args = SIZES)]
    fn exact(b: divan::Bencher, n: usize) {
        let t = table(n);
        let name = ServerName::parse(format!("svc{}.example.org", n / 2).as_bytes()).unwrap();
        b.bench(|| t.lookup_name(black_box(&name)).unwrap());
    }

    /// Baseline: one lookup in a plain `HashMap<String, u32>` of the same size.
    #[divan::bench(args = SIZES)]
    fn baseline_hashmap(b: divan::Bencher, n: usize) {
        let m: std::collections::HashMap<String, u32> = (0..n)
            .map(|i| (format!("svc{i}.example.org"), i as u32))
            .collect();
        let key = format!("svc{}.example.org", n / 2);
        b.bench(|| *m.get(black_box(key.as_str())).unwrap());
    }

    #[divan::bench(args = SIZES)]
    fn wildcard(b: divan::Bencher, n: usize) {
        let t = table(n);
        let name =
            ServerName::parse(format!("a.b.tenant{}.example.net", n / 2).as_bytes()).unwrap();
        b.bench(|| t.lookup_name(black_box(&name)).unwrap());
    }

    #[divan::bench(args = SIZES)]
    fn miss(b: divan::Bencher, n: usize) {
        let t = table(n);
        let name = ServerName::parse(b"nothing.here.example.com").unwrap();
        b.bench(|| t.lookup_name(black_box(&name)).is_none());
    }

    #[divan::bench]
    fn normalise_sni() -> ServerName {
        ServerName::parse(black_box(b"Git.Example.ORG.")).unwrap()
    }
}

/// The QUIC Initial path: what a real client's first datagram costs (key derivation, header
/// protection, AEAD open, CRYPTO reassembly, hello parse), and what a spoofed one costs before
/// it is dropped. Baseline: the key derivation alone, which no Initial reader can avoid.
mod quic {
    use sniplex::quic::initial::{split_fixture, HelloAssembler, InitialError};
    use std::hint::black_box;

    fn datagrams(name: &str) -> Vec<Vec<u8>> {
        split_fixture(
            &std::fs::read(format!(
                "{}/tests/fixtures/quic/{name}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap(),
        )
    }

    #[divan::bench]
    fn aioquic_initial_v1(b: divan::Bencher) {
        let d = datagrams("v1-app.example.org.bin").remove(0);
        b.bench(|| HelloAssembler::start(black_box(&d)).unwrap().1.unwrap());
    }

    #[divan::bench]
    fn post_quantum_over_two_datagrams(b: divan::Bencher) {
        let d = datagrams("v1-split-app.example.org.bin");
        b.bench(|| {
            let (mut a, none) = HelloAssembler::start(black_box(&d[0])).unwrap();
            assert!(none.is_none());
            a.feed(black_box(&d[1])).unwrap().unwrap()
        });
    }

    /// A spoofed Initial: right shape, keys that do not open it.
    #[divan::bench]
    fn bogus_initial_dropped(b: divan::Bencher) {
        let mut d = datagrams("v1-app.example.org.bin").remove(0);
        d[6] ^= 0xff;
        b.bench(|| {
            assert_eq!(
                HelloAssembler::start(black_box(&d)).unwrap_err(),
                InitialError::Undecryptable
            )
        });
    }

    /// Garbage that is not even a long header: refused on its first byte.
    #[divan::bench]
    fn garbage_dropped(b: divan::Bencher) {
        let d = vec![0x41u8; 1200];
        b.bench(|| HelloAssembler::start(black_box(&d)).unwrap_err());
    }

    #[divan::bench]
    fn baseline_initial_key_derivation_only(b: divan::Bencher) {
        let suite = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
            .tls13()
            .unwrap();
        let quic = suite.quic.unwrap();
        let dcid = [7u8; 8];
        b.bench(|| {
            rustls::quic::Keys::initial(
                rustls::quic::Version::V1,
                suite,
                quic,
                black_box(&dcid),
                rustls::Side::Server,
            )
        });
    }
}
