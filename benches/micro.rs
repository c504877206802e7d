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
