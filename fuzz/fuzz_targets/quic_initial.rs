//! Datagrams for one QUIC flow (`<u16 length><datagram>` records): the Initial reader must
//! never panic, whatever the packets say, and never hold more than its bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sniplex::quic::initial::{self, HelloAssembler};

fuzz_target!(|data: &[u8]| {
    let datagrams = initial::split_fixture(data);
    let Some((first, rest)) = datagrams.split_first() else {
        return;
    };
    for d in &datagrams {
        let _ = initial::server_cid(d);
    }
    if let Ok((mut a, _)) = HelloAssembler::start(first) {
        for d in rest {
            if a.feed(d).is_err() {
                break;
            }
        }
        let close = a.connection_close(initial::CRYPTO_ERROR_UNRECOGNIZED_NAME, "no route");
        assert!(close.len() < initial::MIN_INITIAL_DATAGRAM);
    }
});
