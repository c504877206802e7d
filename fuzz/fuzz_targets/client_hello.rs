//! Fuzz target for the ClientHello reader. The first input byte picks a chunk size; the rest is
//! fed in chunks of that size. Whatever arrives: no panic, the same decision as a one-shot read,
//! and the bytes kept for replay are exactly the bytes fed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sniplex::hello::{read_client_hello, HelloReader};

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first).max(1);
    let whole = read_client_hello(input);
    let mut reader = HelloReader::new();
    let mut fed = 0;
    let mut chunked = Ok(None);
    for piece in input.chunks(chunk) {
        fed += piece.len();
        chunked = reader.feed(piece);
        if !matches!(chunked, Ok(None)) {
            break;
        }
    }
    assert_eq!(whole, chunked, "decision depends on chunking");
    assert_eq!(reader.buffered(), &input[..fed]);
    if let Ok(Some(hello)) = &chunked {
        assert!(reader.consumed() <= fed);
        if let Some(sni) = &hello.sni {
            assert!(!sni.as_str().is_empty() && sni.as_str().len() <= 253);
            assert_eq!(sni.as_str(), sni.as_str().to_ascii_lowercase());
        }
    }
});
