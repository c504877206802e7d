//! QUIC on UDP: route each flow by the SNI in its client Initial, without terminating it.
//!
//! `initial` is pure (packet protection, CRYPTO reassembly, the ClientHello via `hello`);
//! `flows` owns the sockets and the flow table.

pub mod flows;
pub mod initial;
