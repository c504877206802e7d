//! Normalised DNS server names, shared by the config (route keys) and the ClientHello reader (SNI).
//!
//! One rule for both sides: ASCII lowercase, one trailing dot dropped, RFC 1035 lengths. Pure: no I/O.

use std::fmt;

/// Longest DNS name in presentation form without the trailing dot (RFC 1035 section 2.3.4).
pub const MAX_NAME_LEN: usize = 253;
/// Longest single label (RFC 1035 section 2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// A server name as routes and SNI compare it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerName(Box<str>);

/// Why a byte string is not a usable server name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("empty label")]
    EmptyLabel,
    #[error("label longer than {MAX_LABEL_LEN} bytes")]
    LabelTooLong,
    #[error("invalid character {0:?} (allowed: letters, digits, '-', '_')")]
    BadChar(char),
    #[error("label starts or ends with '-'")]
    HyphenEdge,
}

impl ServerName {
    /// Parses and normalises a name. Underscores are accepted because real SNI carries them
    /// (service names, some internal hosts); everything else follows LDH rules.
    pub fn parse(raw: &[u8]) -> Result<Self, NameError> {
        let raw = raw.strip_suffix(b".").unwrap_or(raw);
        if raw.is_empty() {
            return Err(NameError::Empty);
        }
        if raw.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        for label in raw.split(|&b| b == b'.') {
            if label.is_empty() {
                return Err(NameError::EmptyLabel);
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(NameError::LabelTooLong);
            }
            if let Some(&b) = label
                .iter()
                .find(|&&b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
            {
                return Err(NameError::BadChar(char::from(b)));
            }
            if label.first() == Some(&b'-') || label.last() == Some(&b'-') {
                return Err(NameError::HyphenEdge);
            }
        }
        // Every byte was checked to be ASCII above, so this conversion cannot fail.
        let lower = raw.to_ascii_lowercase();
        let s = String::from_utf8(lower).map_err(|_| NameError::BadChar('?'))?;
        Ok(ServerName(s.into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name with its first label removed (`a.b.c` -> `b.c`), or `None` for a single label.
    pub fn parent(&self) -> Option<&str> {
        parent_of(&self.0)
    }
}

/// `a.b.c` -> `b.c`; `c` -> `None`.
pub fn parent_of(name: &str) -> Option<&str> {
    name.split_once('.').map(|(_, rest)| rest)
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_and_trailing_dot() {
        let n = ServerName::parse(b"Git.Example.ORG.").unwrap();
        assert_eq!(n.as_str(), "git.example.org");
        assert_eq!(n.parent(), Some("example.org"));
    }

    #[test]
    fn rejects_bad_names() {
        assert_eq!(ServerName::parse(b""), Err(NameError::Empty));
        assert_eq!(ServerName::parse(b"."), Err(NameError::Empty));
        assert_eq!(ServerName::parse(b"a..b"), Err(NameError::EmptyLabel));
        assert_eq!(ServerName::parse(b"a.b.."), Err(NameError::EmptyLabel));
        assert_eq!(ServerName::parse(b"a b"), Err(NameError::BadChar(' ')));
        assert_eq!(ServerName::parse(b"*.a"), Err(NameError::BadChar('*')));
        assert_eq!(ServerName::parse(b"-a.b"), Err(NameError::HyphenEdge));
        assert_eq!(
            ServerName::parse(b"a\xff"),
            Err(NameError::BadChar('\u{ff}'))
        );
        let long_label = vec![b'a'; 64];
        assert_eq!(ServerName::parse(&long_label), Err(NameError::LabelTooLong));
        let long = [b"a.".repeat(127), b"ab".to_vec()].concat();
        assert_eq!(long.len(), 256);
        assert_eq!(ServerName::parse(&long), Err(NameError::TooLong));
    }

    #[test]
    fn accepts_underscore_and_digits() {
        assert!(ServerName::parse(b"_xmpp.1host.example").is_ok());
    }
}
