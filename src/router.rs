//! Immutable SNI route table: exact names, then the longest matching `*.suffix` wildcard, then
//! the fallback. Pure and generic over the route value so it can be tested and benchmarked alone.
//!
//! A lookup costs one hash probe for the exact name plus at most one per label for wildcards, so
//! it does not grow with the number of routes.

use crate::name::{parent_of, ServerName};
use std::collections::HashMap;

/// A route key as written in the config: an exact name or `*.` followed by a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    Exact(ServerName),
    /// Matches any name strictly below the suffix (`*.example.org` matches `a.example.org` and
    /// `a.b.example.org`, not `example.org`).
    Wildcard(ServerName),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("'*' is only allowed as the whole first label, as in \"*.example.org\"")]
    MisplacedWildcard,
    #[error("{0}")]
    Name(#[from] crate::name::NameError),
}

impl Pattern {
    pub fn parse(key: &str) -> Result<Self, PatternError> {
        match key.strip_prefix("*.") {
            Some(rest) => {
                if rest.contains('*') {
                    return Err(PatternError::MisplacedWildcard);
                }
                Ok(Pattern::Wildcard(ServerName::parse(rest.as_bytes())?))
            }
            None if key.contains('*') => Err(PatternError::MisplacedWildcard),
            None => Ok(Pattern::Exact(ServerName::parse(key.as_bytes())?)),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(n) => write!(f, "{n}"),
            Pattern::Wildcard(n) => write!(f, "*.{n}"),
        }
    }
}

/// Error from [`RouteTableBuilder::insert`]: two keys that normalise to the same pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("duplicate route {0} (names compare case-insensitively, ignoring a trailing dot)")]
pub struct DuplicateRoute(pub String);

#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    exact: HashMap<Box<str>, T>,
    wildcard: HashMap<Box<str>, T>,
    fallback: Option<T>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            fallback: None,
        }
    }
}

impl<T> RouteTable<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, pattern: Pattern, value: T) -> Result<(), DuplicateRoute> {
        let (map, name) = match &pattern {
            Pattern::Exact(n) => (&mut self.exact, n),
            Pattern::Wildcard(n) => (&mut self.wildcard, n),
        };
        if map.contains_key(name.as_str()) {
            return Err(DuplicateRoute(pattern.to_string()));
        }
        map.insert(name.as_str().into(), value);
        Ok(())
    }

    pub fn set_fallback(&mut self, value: Option<T>) {
        self.fallback = value;
    }

    pub fn fallback(&self) -> Option<&T> {
        self.fallback.as_ref()
    }

    /// Number of exact and wildcard routes (the fallback not counted).
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Exact name, else longest wildcard suffix, else `None` (the fallback is not consulted).
    pub fn lookup_name(&self, name: &ServerName) -> Option<&T> {
        if let Some(v) = self.exact.get(name.as_str()) {
            return Some(v);
        }
        let mut suffix = name.parent();
        while let Some(s) = suffix {
            if let Some(v) = self.wildcard.get(s) {
                return Some(v);
            }
            suffix = parent_of(s);
        }
        None
    }

    /// The route for a connection: by name when there is one, else the fallback.
    pub fn route(&self, sni: Option<&ServerName>) -> Option<&T> {
        sni.and_then(|n| self.lookup_name(n))
            .or(self.fallback.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServerName {
        ServerName::parse(s.as_bytes()).unwrap()
    }

    fn table() -> RouteTable<&'static str> {
        let mut t = RouteTable::new();
        for (k, v) in [
            ("git.example.org", "git"),
            ("*.example.org", "wild"),
            ("*.lab.example.org", "lab"),
            ("x.lab.example.org", "x"),
        ] {
            t.insert(Pattern::parse(k).unwrap(), v).unwrap();
        }
        t
    }

    #[test]
    fn exact_beats_wildcard_and_longest_suffix_wins() {
        let t = table();
        assert_eq!(t.lookup_name(&name("git.example.org")), Some(&"git"));
        assert_eq!(t.lookup_name(&name("GIT.example.org.")), Some(&"git"));
        assert_eq!(t.lookup_name(&name("blog.example.org")), Some(&"wild"));
        assert_eq!(t.lookup_name(&name("a.b.example.org")), Some(&"wild"));
        assert_eq!(t.lookup_name(&name("y.lab.example.org")), Some(&"lab"));
        assert_eq!(t.lookup_name(&name("z.y.lab.example.org")), Some(&"lab"));
        assert_eq!(t.lookup_name(&name("x.lab.example.org")), Some(&"x"));
        assert_eq!(t.lookup_name(&name("lab.example.org")), Some(&"wild"));
    }

    #[test]
    fn wildcard_does_not_match_its_own_suffix() {
        let t = table();
        assert_eq!(t.lookup_name(&name("example.org")), None);
        assert_eq!(t.lookup_name(&name("org")), None);
        assert_eq!(t.lookup_name(&name("example.com")), None);
    }

    #[test]
    fn fallback_only_when_no_match() {
        let mut t = table();
        assert_eq!(t.route(None), None);
        t.set_fallback(Some("fb"));
        assert_eq!(t.route(None), Some(&"fb"));
        assert_eq!(t.route(Some(&name("nothing.test"))), Some(&"fb"));
        assert_eq!(t.route(Some(&name("git.example.org"))), Some(&"git"));
    }

    #[test]
    fn duplicates_after_normalisation_are_rejected() {
        let mut t = table();
        let e = t
            .insert(Pattern::parse("Git.Example.org.").unwrap(), "dup")
            .unwrap_err();
        assert_eq!(e.0, "git.example.org");
        assert!(t
            .insert(Pattern::parse("*.EXAMPLE.org").unwrap(), "dup")
            .is_err());
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn malformed_patterns() {
        assert_eq!(
            Pattern::parse("a.*.org"),
            Err(PatternError::MisplacedWildcard)
        );
        assert_eq!(
            Pattern::parse("*a.org"),
            Err(PatternError::MisplacedWildcard)
        );
        assert_eq!(
            Pattern::parse("*.*.org"),
            Err(PatternError::MisplacedWildcard)
        );
        assert_eq!(Pattern::parse("*"), Err(PatternError::MisplacedWildcard));
        assert!(matches!(Pattern::parse("*."), Err(PatternError::Name(_))));
        assert!(matches!(
            Pattern::parse("a..org"),
            Err(PatternError::Name(_))
        ));
    }
}
