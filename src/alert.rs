//! TLS alerts sniplex sends before it closes a connection it will not forward. Pure.

/// Alert descriptions (RFC 8446 section 6) that sniplex has reasons to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Alert {
    /// A record or handshake message too large for us.
    RecordOverflow = 22,
    /// The ClientHello does not parse.
    DecodeError = 50,
    /// The backend could not be reached: our side's fault, not the client's.
    InternalError = 80,
    /// No route for the server name and no fallback.
    UnrecognizedName = 112,
}

impl Alert {
    /// A complete fatal alert record. The record version is 3.3, as TLS 1.3 requires for all
    /// records after the ClientHello and TLS 1.2 peers accept.
    pub fn record(self) -> [u8; 7] {
        const FATAL: u8 = 2;
        [21, 3, 3, 0, 2, FATAL, self as u8]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_bytes() {
        assert_eq!(Alert::UnrecognizedName.record(), [0x15, 3, 3, 0, 2, 2, 112]);
        assert_eq!(Alert::InternalError.record()[6], 80);
    }
}
