//! The TOML config: serde types that mirror the file (unknown keys are errors), then `validate`
//! into the runtime [`Config`]. Every error names the file, line, column and key. No sockets here.

use crate::name::ServerName;
use crate::router::{Pattern, RouteTable};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

pub const DEFAULT_PATH: &str = "/etc/sniplex/sniplex.toml";
/// `sun_path` is 108 bytes on Linux, one of them the terminating NUL for filesystem paths.
const MAX_UNIX_PATH: usize = 107;

/// Where a backend lives. Host names are resolved at connect time, not at load time, so a
/// container that comes up later (or changes address) is found without a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAddr {
    Unix(PathBuf),
    /// Linux abstract socket name (without the leading NUL).
    Abstract(Vec<u8>),
    Tcp(SocketAddr),
    Host {
        host: String,
        port: u16,
    },
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            BackendAddr::Abstract(n) => write!(f, "unix:@{}", String::from_utf8_lossy(n)),
            BackendAddr::Tcp(a) => write!(f, "{a}"),
            BackendAddr::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl BackendAddr {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if let Some(name) = path.strip_prefix('@') {
                if name.is_empty() {
                    return Err("abstract socket name is empty".into());
                }
                if name.len() > MAX_UNIX_PATH {
                    return Err(format!(
                        "abstract socket name longer than {MAX_UNIX_PATH} bytes"
                    ));
                }
                return Ok(BackendAddr::Abstract(name.as_bytes().to_vec()));
            }
            if !path.starts_with('/') {
                return Err(format!(
                    "unix socket path {path:?} is relative; write an absolute path (unix:/run/...) or unix:@name for an abstract socket"
                ));
            }
            if path.len() > MAX_UNIX_PATH {
                return Err(format!(
                    "unix socket path longer than {MAX_UNIX_PATH} bytes"
                ));
            }
            return Ok(BackendAddr::Unix(PathBuf::from(path)));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err("port 0 is not a backend port".into());
            }
            return Ok(BackendAddr::Tcp(addr));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!(
                "{s:?} is not \"unix:/path\", \"unix:@name\", \"IP:PORT\", \"[IPv6]:PORT\" or \"HOST:PORT\""
            ));
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{port:?} is not a port number (1-65535)"))?;
        if host.contains(':') || host.starts_with('[') {
            return Err(format!(
                "{s:?}: an IPv6 address needs brackets, as in [fd00::5]:443"
            ));
        }
        let name = ServerName::parse(host.as_bytes())
            .map_err(|e| format!("{host:?} is neither an IP address nor a host name: {e}"))?;
        Ok(BackendAddr::Host {
            host: name.to_string(),
            port,
        })
    }
}

/// One entry of the SNI map, as the connection pipeline uses it.
#[derive(Debug, Clone)]
pub struct Route {
    /// The route key as configured (`"*.lab.example.org"`), or `fallback`. Used as the log and
    /// metric label, never the client's raw SNI.
    pub label: Arc<str>,
    /// Where connections go unless an ALPN entry matches.
    pub target: Target,
    /// `alpn."proto" = ...`, in config order. The first protocol the client offers that is
    /// listed here selects its target.
    pub alpn: Vec<(Vec<u8>, Target)>,
    pub access: Access,
    /// `quic = "IP:PORT"`: where this name's QUIC flows (UDP) go. None: no QUIC flows.
    pub quic: Option<BackendAddr>,
    pub metrics: crate::metrics::LazyRouteMetrics,
}

/// `allow` / `deny` of a route: who may reach it at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub allow: Vec<ipnet::IpNet>,
    pub deny: Vec<ipnet::IpNet>,
}

impl Access {
    /// Deny wins; a non-empty allow list admits only what it lists. IPv4-mapped IPv6 clients
    /// (IPv4 on a dual-stack socket) are matched as IPv4.
    pub fn permits(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// `[limits]`: caps against overload. Beyond each, new connections are closed at once and
/// counted; connections already open are unaffected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    /// Per client address; IPv6 addresses are grouped by /64 (one host usually owns a /64).
    pub max_connections_per_ip: usize,
    /// Connections still waiting for their ClientHello.
    pub max_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // 20,000 fits the usual fd limit with room (2 sockets per connection, 4 pipe fds while
        // busy); 256 per address lets a NAT of many users through; 4,096 pending hellos bound
        // what a slowloris can hold (64 KiB each at most).
        Limits {
            max_connections: 20_000,
            max_connections_per_ip: 256,
            max_handshakes: 4096,
        }
    }
}

impl Route {
    /// The target for a client's ALPN offers (in the client's order of preference).
    pub fn select(&self, offered: &[Vec<u8>]) -> &Target {
        offered
            .iter()
            .find_map(|p| self.alpn.iter().find(|(name, _)| name == p).map(|(_, t)| t))
            .unwrap_or(&self.target)
    }
}

/// What sniplex does with a connection once its route (and ALPN entry) is chosen.
#[derive(Debug, Clone)]
pub struct Target {
    pub upstream: Upstream,
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// Terminate TLS here and forward plaintext.
    pub terminate: Option<Arc<Terminate>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// Tried in order on connect failure (refused, timeout, missing socket file).
    Backends(Vec<BackendAddr>),
    /// The `[metrics] route`: sniplex answers `/metrics` itself after terminating TLS.
    Metrics,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::Backends(list) => {
                for (i, b) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    b.fmt(f)?;
                }
                Ok(())
            }
            Upstream::Metrics => f.write_str("(metrics)"),
        }
    }
}

/// `terminate = { cert, key, alpn }` or `terminate = { acme = true, alpn }`, loaded.
pub struct Terminate {
    /// Empty for ACME-managed certificates.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub alpn: Vec<Vec<u8>>,
    pub tls: Arc<rustls::ServerConfig>,
    /// `acme = true`: the name whose certificate the ACME manager keeps current.
    pub acme: Option<String>,
}

impl fmt::Debug for Terminate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Terminate")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("acme", &self.acme)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub client_hello: Duration,
    pub connect: Duration,
    pub idle: Duration,
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            client_hello: Duration::from_secs(10),
            connect: Duration::from_secs(5),
            idle: Duration::from_secs(3600),
            shutdown: Duration::from_secs(30),
        }
    }
}

/// The validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: PathBuf,
    pub listen: Vec<SocketAddr>,
    pub routes: RouteTable<Arc<Route>>,
    pub timeouts: Timeouts,
    /// Drop privileges to this user after binding (when started as root).
    pub user: Option<String>,
    pub group: Option<String>,
    /// One info-level access log line per finished connection.
    pub log_connections: bool,
    pub metrics: Option<MetricsConfig>,
    pub limits: Limits,
    /// `[listener] accept_proxy_protocol`: every connection starts with a PROXY v1/v2 header
    /// from a load balancer in front; its source address is the client's.
    pub accept_proxy_protocol: bool,
    /// `[quic]`: UDP listeners for QUIC flows routed by SNI. None: no QUIC at all.
    pub quic: Option<QuicConfig>,
    /// `[acme]`: where certificates for `terminate = { acme = true }` routes come from.
    pub acme: Option<AcmeConfig>,
    /// The names of `acme = true` routes, sorted, without duplicates.
    pub acme_names: Vec<String>,
}

/// `[acme]`: an RFC 8555 directory, the account's contacts, and where state is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    pub directory: String,
    pub contact: Vec<String>,
    pub storage: PathBuf,
    /// Extra root (PEM) for the directory's HTTPS: a private or test CA.
    pub ca_bundle: Option<PathBuf>,
    /// Renew when less than this is left; default: a third of the certificate's lifetime.
    pub renew_before: Option<Duration>,
}

/// `[quic]`: where QUIC is accepted, how long a quiet flow is kept, and the bounds that keep
/// spoofed Initials from exhausting memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicConfig {
    /// UDP addresses to bind (ignored when systemd passes datagram sockets).
    pub listen: Vec<SocketAddr>,
    /// A flow with no datagram either way for this long is forgotten.
    pub idle: Duration,
    pub max_flows: usize,
    pub max_flows_per_ip: usize,
    /// Flows whose ClientHello is not whole yet (each holds at most 64 KiB of datagrams).
    pub max_pending: usize,
    pub max_pending_per_ip: usize,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            listen: Vec::new(),
            idle: Duration::from_secs(120),
            max_flows: 20_000,
            max_flows_per_ip: 256,
            max_pending: 1024,
            max_pending_per_ip: 16,
        }
    }
}

/// `[metrics]`: where the Prometheus endpoint is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: Option<MetricsAddr>,
    /// Also serve `/metrics` on the TLS listeners under this name (a terminated route).
    pub route: Option<ServerName>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "{a}"),
            MetricsAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&src, path)
    }

    pub fn parse(src: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(src).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            ConfigError::at(path, src, span.clone(), key_at(src, span), e.message())
        })?;
        raw.validate(src, path)
    }

    /// One line for `sniplex check`.
    pub fn summary(&self) -> String {
        let listen: Vec<String> = self.listen.iter().map(|a| a.to_string()).collect();
        format!(
            "{}: OK: {} route{}, fallback {}, listen {}",
            self.source.display(),
            self.routes.len(),
            if self.routes.len() == 1 { "" } else { "s" },
            match self.routes.fallback() {
                Some(r) => r.target.upstream.to_string(),
                None => "none".into(),
            },
            listen.join(" "),
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
}

impl ConfigError {
    fn at(path: &Path, src: &str, span: Range<usize>, key: String, message: &str) -> Self {
        let (line, column) = line_col(src, span.start);
        ConfigError::Invalid {
            path: path.to_owned(),
            line,
            column,
            key: if key.is_empty() {
                "(top level)".into()
            } else {
                key
            },
            message: message.trim_end().to_owned(),
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Best-effort dotted key for a serde error span: the enclosing `[table]` header plus the key
/// on the error's line (the span itself when it is a key, else the key before the nearest `=`).
fn key_at(src: &str, span: Range<usize>) -> String {
    let start = span.start.min(src.len());
    let before = src.get(..start).unwrap_or("");
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let mut header = String::new();
    for line in before[..line_start].lines() {
        let t = line.trim();
        if t.starts_with('[') {
            header = t.trim_matches(|c| c == '[' || c == ']').trim().to_owned();
        }
    }
    let spanned = src.get(span.clone()).unwrap_or("").trim();
    let after = src.get(span.end.min(src.len())..).unwrap_or("");
    let line_before = &before[line_start..];
    let is_key = after.trim_start().starts_with('=') && !spanned.is_empty();
    let mut parts: Vec<String> = Vec::new();
    if !header.is_empty() {
        parts.push(header);
    }
    // An inline table: the key that owns the `{`.
    if let Some(brace) = line_before.find('{') {
        if let Some(k) = key_before_eq(&line_before[..brace]) {
            parts.push(k);
        }
    }
    let own = if is_key {
        Some(spanned.to_owned())
    } else {
        key_before_eq(line_before)
    };
    if let Some(k) = own {
        if parts.last() != Some(&k) {
            parts.push(k);
        }
    }
    parts.join(".")
}

fn key_before_eq(text: &str) -> Option<String> {
    let eq = text.rfind('=')?;
    let t = text[..eq].trim_end();
    let start = t
        .rfind(|c: char| c == '{' || c == ',' || c.is_whitespace() && !t.ends_with('"'))
        .map_or(0, |i| i + 1);
    let k = t[start..].trim();
    (!k.is_empty()).then(|| k.to_owned())
}

// ---- the file's shape ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<Vec<Spanned<String>>>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    #[serde(default)]
    log_connections: bool,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    routes: BTreeMap<Spanned<String>, Spanned<RawRoute>>,
    fallback: Option<Spanned<RawRoute>>,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    listener: RawListener,
    quic: Option<Spanned<RawQuic>>,
    acme: Option<Spanned<RawAcme>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuic {
    listen: Option<Spanned<Vec<Spanned<String>>>>,
    idle: Option<Spanned<HumanDuration>>,
    max_flows: Option<Spanned<u64>>,
    max_flows_per_ip: Option<Spanned<u64>>,
    max_pending: Option<Spanned<u64>>,
    max_pending_per_ip: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<Spanned<u64>>,
    max_connections_per_ip: Option<Spanned<u64>>,
    max_handshakes: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawListener {
    #[serde(default)]
    accept_proxy_protocol: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteTable {
    backend: Option<Spanned<OneOrMany>>,
    proxy_protocol: Option<Spanned<String>>,
    terminate: Option<Spanned<RawTerminate>>,
    #[serde(default)]
    alpn: BTreeMap<Spanned<String>, Spanned<RawRoute>>,
    allow: Option<Spanned<Vec<Spanned<String>>>>,
    deny: Option<Spanned<Vec<Spanned<String>>>>,
    quic: Option<Spanned<String>>,
}

/// `backend = "a"` or `backend = ["a", "b"]`.
struct OneOrMany(Vec<Spanned<String>>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a backend address or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![Spanned::new(0..0, s.to_owned())]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut v = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<String>>()? {
                    v.push(item);
                }
                Ok(OneOrMany(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTerminate {
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    #[serde(default)]
    acme: bool,
    alpn: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcme {
    directory: Spanned<String>,
    #[serde(default)]
    contact: Vec<Spanned<String>>,
    storage: Spanned<String>,
    ca_bundle: Option<Spanned<String>>,
    renew_before: Option<Spanned<HumanDuration>>,
}

/// A route value: a backend string, or a table (later features add keys to the table). A
/// hand-written visitor instead of `#[serde(untagged)]` keeps serde's precise errors (unknown
/// field, wrong type) for the table form.
struct RawRoute(RawRouteTable);

impl<'de> Deserialize<'de> for RawRoute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawRoute;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a backend string, a list of them, or a table with `backend`")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RawRoute, E> {
                // No span here: `build_route` points at the enclosing Spanned<RawRoute>.
                Ok(RawRoute(RawRouteTable {
                    backend: Some(Spanned::new(
                        0..0,
                        OneOrMany(vec![Spanned::new(0..0, s.to_owned())]),
                    )),
                    proxy_protocol: None,
                    terminate: None,
                    alpn: BTreeMap::new(),
                    allow: None,
                    deny: None,
                    quic: None,
                }))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawRoute, A::Error> {
                // `"name" = ["unix:/a.sock", "unix:/b.sock"]`: a failover list.
                let mut v = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<String>>()? {
                    v.push(item);
                }
                Ok(RawRoute(RawRouteTable {
                    backend: Some(Spanned::new(0..0, OneOrMany(v))),
                    proxy_protocol: None,
                    terminate: None,
                    alpn: BTreeMap::new(),
                    allow: None,
                    deny: None,
                    quic: None,
                }))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawRoute, A::Error> {
                RawRouteTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawRoute)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
    route: Option<Spanned<String>>,
}

/// A humantime duration ("10s", "1h 30m").
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        humantime_serde::deserialize(d).map(HumanDuration)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    client_hello: Option<Spanned<HumanDuration>>,
    connect: Option<Spanned<HumanDuration>>,
    idle: Option<Spanned<HumanDuration>>,
    shutdown: Option<Spanned<HumanDuration>>,
}

impl RawConfig {
    fn validate(self, src: &str, path: &Path) -> Result<Config, ConfigError> {
        let err = |span: Range<usize>, key: String, msg: String| {
            ConfigError::at(path, src, span, key, &msg)
        };

        let listen = match self.listen {
            None => vec![SocketAddr::from(([0u16; 8], 443))],
            Some(list) => {
                if list.get_ref().is_empty() {
                    return Err(err(
                        list.span(),
                        "listen".into(),
                        "needs at least one address".into(),
                    ));
                }
                parse_addrs(list.get_ref(), "listen").map_err(|(sp, k, m)| err(sp, k, m))?
            }
        };

        let metrics = match self.metrics {
            None => None,
            Some(m) => {
                let listen = match m.listen {
                    None => None,
                    Some(l) => Some(
                        parse_metrics_addr(l.get_ref())
                            .map_err(|msg| err(l.span(), "metrics.listen".into(), msg))?,
                    ),
                };
                let route = match m.route {
                    None => None,
                    Some(r) => Some(ServerName::parse(r.get_ref().as_bytes()).map_err(|e| {
                        err(
                            r.span(),
                            "metrics.route".into(),
                            format!("bad server name: {e}"),
                        )
                    })?),
                };
                if listen.is_none() && route.is_none() {
                    return Err(err(
                        0..0,
                        "metrics".into(),
                        "needs `listen` or `route`".into(),
                    ));
                }
                Some(MetricsConfig { listen, route })
            }
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let ctx = RouteCtx {
            base,
            metrics_route: metrics.as_ref().and_then(|m| m.route.as_ref()),
            quic: self.quic.is_some(),
            acme: self.acme.is_some(),
        };

        let mut routes = RouteTable::new();
        let mut acme_names = std::collections::BTreeSet::new();
        let mut note_acme = |r: &Route| {
            let targets = std::iter::once(&r.target).chain(r.alpn.iter().map(|(_, t)| t));
            for t in targets {
                if let Some(n) = t.terminate.as_ref().and_then(|t| t.acme.clone()) {
                    acme_names.insert(n);
                }
            }
        };
        for (key, value) in self.routes {
            let key_label = format!("routes.{:?}", key.get_ref());
            let pattern = Pattern::parse(key.get_ref()).map_err(|e| {
                err(
                    key.span(),
                    key_label.clone(),
                    format!("bad server name: {e}"),
                )
            })?;
            let value_span = value.span();
            let table = value.into_inner().0;
            let route = build_route(&ctx, key.get_ref().as_str(), table, value_span, &key_label)
                .map_err(|(span, k, m)| err(span, k, m))?;
            note_acme(&route);
            routes
                .insert(pattern, Arc::new(route))
                .map_err(|e| err(key.span(), key_label, e.to_string()))?;
        }
        if let Some(fb) = self.fallback {
            let span = fb.span();
            let route = build_route(&ctx, "fallback", fb.into_inner().0, span, "fallback")
                .map_err(|(span, k, m)| err(span, k, m))?;
            routes.set_fallback(Some(Arc::new(route)));
        }

        let mut timeouts = Timeouts::default();
        let t = self.timeouts;
        for (name, value, slot, allow_zero) in [
            (
                "client_hello",
                t.client_hello,
                &mut timeouts.client_hello,
                false,
            ),
            ("connect", t.connect, &mut timeouts.connect, false),
            ("idle", t.idle, &mut timeouts.idle, false),
            ("shutdown", t.shutdown, &mut timeouts.shutdown, true),
        ] {
            if let Some(v) = value {
                if v.get_ref().0.is_zero() && !allow_zero {
                    return Err(err(
                        v.span(),
                        format!("timeouts.{name}"),
                        "must be more than zero".into(),
                    ));
                }
                *slot = v.get_ref().0;
            }
        }

        for (key, v) in [("user", &self.user), ("group", &self.group)] {
            if let Some(v) = v {
                if v.get_ref().is_empty() {
                    return Err(err(v.span(), key.into(), "must not be empty".into()));
                }
            }
        }

        let mut limits = Limits::default();
        let l = self.limits;
        for (name, value, slot) in [
            (
                "max_connections",
                l.max_connections,
                &mut limits.max_connections,
            ),
            (
                "max_connections_per_ip",
                l.max_connections_per_ip,
                &mut limits.max_connections_per_ip,
            ),
            (
                "max_handshakes",
                l.max_handshakes,
                &mut limits.max_handshakes,
            ),
        ] {
            set_count(value, &format!("limits.{name}"), slot)
                .map_err(|(sp, k, m)| err(sp, k, m))?;
        }

        let quic = match self.quic {
            None => None,
            Some(q) => {
                let q = q.into_inner();
                let mut out = QuicConfig::default();
                if let Some(list) = q.listen {
                    out.listen = parse_addrs(list.get_ref(), "quic.listen")
                        .map_err(|(sp, k, m)| err(sp, k, m))?;
                }
                if let Some(v) = q.idle {
                    if v.get_ref().0.is_zero() {
                        return Err(err(
                            v.span(),
                            "quic.idle".into(),
                            "must be more than zero".into(),
                        ));
                    }
                    out.idle = v.get_ref().0;
                }
                for (name, value, slot) in [
                    ("max_flows", q.max_flows, &mut out.max_flows),
                    (
                        "max_flows_per_ip",
                        q.max_flows_per_ip,
                        &mut out.max_flows_per_ip,
                    ),
                    ("max_pending", q.max_pending, &mut out.max_pending),
                    (
                        "max_pending_per_ip",
                        q.max_pending_per_ip,
                        &mut out.max_pending_per_ip,
                    ),
                ] {
                    set_count(value, &format!("quic.{name}"), slot)
                        .map_err(|(sp, k, m)| err(sp, k, m))?;
                }
                Some(out)
            }
        };

        let acme = match self.acme {
            None => None,
            Some(a) => {
                let a = a.into_inner();
                let d = a.directory.get_ref();
                if !d.starts_with("https://") {
                    return Err(err(
                        a.directory.span(),
                        "acme.directory".into(),
                        format!("{d:?} must be an https:// URL (RFC 8555 section 6.1)"),
                    ));
                }
                if a.storage.get_ref().is_empty() {
                    return Err(err(
                        a.storage.span(),
                        "acme.storage".into(),
                        "must not be empty".into(),
                    ));
                }
                for (i, c) in a.contact.iter().enumerate() {
                    if !c.get_ref().contains(':') {
                        return Err(err(
                            c.span(),
                            format!("acme.contact[{i}]"),
                            format!(
                                "{:?} is not a URI (\"mailto:admin@example.org\")",
                                c.get_ref()
                            ),
                        ));
                    }
                }
                Some(AcmeConfig {
                    directory: d.clone(),
                    contact: a.contact.into_iter().map(Spanned::into_inner).collect(),
                    storage: base.join(a.storage.get_ref()),
                    ca_bundle: a.ca_bundle.map(|c| base.join(c.get_ref())),
                    renew_before: a.renew_before.map(|r| r.get_ref().0),
                })
            }
        };
        let mut acme_names: Vec<String> = acme_names.into_iter().collect();
        acme_names.sort();

        Ok(Config {
            acme,
            acme_names,
            quic,
            source: path.to_owned(),
            limits,
            accept_proxy_protocol: self.listener.accept_proxy_protocol,
            listen,
            routes,
            timeouts,
            user: self.user.map(Spanned::into_inner),
            group: self.group.map(Spanned::into_inner),
            log_connections: self.log_connections,
            metrics,
        })
    }
}

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if !path.starts_with('/') || path.len() > MAX_UNIX_PATH {
            return Err(format!(
                "{path:?} must be an absolute path of at most {MAX_UNIX_PATH} bytes"
            ));
        }
        return Ok(MetricsAddr::Unix(PathBuf::from(path)));
    }
    s.parse()
        .map(MetricsAddr::Tcp)
        .map_err(|_| format!("{s:?} is not \"IP:PORT\" or \"unix:/path\""))
}

type SpannedError = (Range<usize>, String, String);

/// A list of `IP:PORT` listen addresses (`key` is `listen` or `quic.listen`), without repeats.
fn parse_addrs(list: &[Spanned<String>], key: &str) -> Result<Vec<SocketAddr>, SpannedError> {
    let mut out = Vec::new();
    for (i, a) in list.iter().enumerate() {
        let addr: SocketAddr = a.get_ref().parse().map_err(|_| {
            (
                a.span(),
                format!("{key}[{i}]"),
                format!(
                    "{:?} is not an IP:PORT address (IPv6 in brackets: \"[::]:443\")",
                    a.get_ref()
                ),
            )
        })?;
        if out.contains(&addr) {
            return Err((
                a.span(),
                format!("{key}[{i}]"),
                format!("{addr} is listed twice"),
            ));
        }
        out.push(addr);
    }
    Ok(out)
}

/// A count limit, when given: at least 1.
fn set_count(value: Option<Spanned<u64>>, key: &str, slot: &mut usize) -> Result<(), SpannedError> {
    if let Some(v) = value {
        if *v.get_ref() == 0 {
            return Err((v.span(), key.to_owned(), "must be at least 1".into()));
        }
        *slot = usize::try_from(*v.get_ref()).unwrap_or(usize::MAX);
    }
    Ok(())
}

/// Context for turning raw route tables into routes.
struct RouteCtx<'a> {
    /// Relative certificate paths are relative to the config file's directory.
    base: &'a Path,
    metrics_route: Option<&'a ServerName>,
    /// A `[quic]` table exists (routes may only name QUIC backends then).
    quic: bool,
    /// An `[acme]` table exists (routes may only use `terminate = { acme = true }` then).
    acme: bool,
}

fn build_route(
    ctx: &RouteCtx<'_>,
    label: &str,
    table: RawRouteTable,
    value_span: Range<usize>,
    key: &str,
) -> Result<Route, SpannedError> {
    let is_metrics = ctx.metrics_route.is_some_and(|m| m.as_str() == label);
    // The name an ACME certificate would be ordered for: exact route keys only.
    let exact = match Pattern::parse(label) {
        Ok(Pattern::Exact(n)) if label != "fallback" => Some(n.as_str().to_owned()),
        _ => None,
    };
    let mut alpn = Vec::new();
    for (proto, entry) in &table.alpn {
        let k = format!("{key}.alpn.{:?}", proto.get_ref());
        if proto.get_ref().is_empty() || proto.get_ref().len() > 255 {
            return Err((
                proto.span(),
                k,
                "ALPN protocol names are 1 to 255 bytes".into(),
            ));
        }
        let inner = &entry.get_ref().0;
        if !inner.alpn.is_empty() {
            return Err((
                entry.span(),
                k,
                "an ALPN entry cannot have ALPN entries of its own".into(),
            ));
        }
        alpn.push((proto.get_ref().as_bytes().to_vec(), entry.span(), k));
    }
    let mut entries: Vec<(Vec<u8>, Target)> = Vec::new();
    let RawRouteTable {
        backend,
        proxy_protocol,
        terminate,
        alpn: raw_alpn,
        allow,
        deny,
        quic,
    } = table;
    let quic = match quic {
        None => None,
        Some(q) if !ctx.quic => {
            return Err((
                q.span(),
                format!("{key}.quic"),
                "needs a [quic] table (with `listen`, or datagram sockets from systemd)".into(),
            ))
        }
        Some(q) => Some(
            parse_quic_backend(q.get_ref()).map_err(|m| (q.span(), format!("{key}.quic"), m))?,
        ),
    };
    let access = Access {
        allow: parse_nets(allow, &format!("{key}.allow"))?,
        deny: parse_nets(deny, &format!("{key}.deny"))?,
    };
    let target = build_target(
        ctx,
        backend,
        proxy_protocol,
        terminate,
        value_span,
        TargetKey {
            key,
            is_metrics,
            exact: exact.as_deref(),
        },
    )?;
    for ((proto, span, k), (_, entry)) in alpn.into_iter().zip(raw_alpn) {
        let RawRouteTable {
            backend,
            proxy_protocol,
            terminate,
            allow,
            deny,
            quic: entry_quic,
            ..
        } = entry.into_inner().0;
        if let Some(q) = entry_quic {
            return Err((
                q.span(),
                format!("{k}.quic"),
                "quic belongs to the route, not to an ALPN entry".into(),
            ));
        }
        if let Some(a) = allow.as_ref().or(deny.as_ref()) {
            return Err((
                a.span(),
                format!("{k}.allow"),
                "allow/deny belong to the route, not to an ALPN entry".into(),
            ));
        }
        entries.push((
            proto,
            build_target(
                ctx,
                backend,
                proxy_protocol,
                terminate,
                span,
                TargetKey {
                    key: &k,
                    is_metrics: false,
                    exact: exact.as_deref(),
                },
            )?,
        ));
    }
    Ok(Route {
        label: label.into(),
        target,
        alpn: entries,
        access,
        quic,
        metrics: Default::default(),
    })
}

/// A UDP backend: `IP:PORT` or `host:PORT` (resolved when a flow starts). Unix sockets carry
/// no UDP flows here.
fn parse_quic_backend(s: &str) -> Result<BackendAddr, String> {
    match BackendAddr::parse(s)? {
        BackendAddr::Unix(_) | BackendAddr::Abstract(_) => Err(format!(
            "{s:?}: QUIC backends are UDP addresses (\"IP:PORT\" or \"host:PORT\")"
        )),
        a => Ok(a),
    }
}

fn parse_nets(
    list: Option<Spanned<Vec<Spanned<String>>>>,
    key: &str,
) -> Result<Vec<ipnet::IpNet>, SpannedError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    list.into_inner()
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let s = n.get_ref();
            s.parse::<ipnet::IpNet>()
                .map(|net| net.trunc())
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| (n.span(), format!("{key}[{i}]"), format!("{s:?} is not an address or a CIDR network such as \"192.0.2.0/24\" or \"2001:db8::/32\"")))
        })
        .collect()
}

/// Which target is being built: its dotted key for errors, whether it is the metrics route,
/// and the exact server name of its route (None for wildcards and the fallback).
struct TargetKey<'a> {
    key: &'a str,
    is_metrics: bool,
    exact: Option<&'a str>,
}

fn build_target(
    ctx: &RouteCtx<'_>,
    backend: Option<Spanned<OneOrMany>>,
    proxy_protocol: Option<Spanned<String>>,
    terminate: Option<Spanned<RawTerminate>>,
    value_span: Range<usize>,
    which: TargetKey<'_>,
) -> Result<Target, SpannedError> {
    let TargetKey {
        key,
        is_metrics,
        exact,
    } = which;
    let proxy_protocol = match proxy_protocol {
        None => None,
        Some(p) => Some(match p.get_ref().as_str() {
            "v1" => crate::proxy_protocol::Version::V1,
            "v2" => crate::proxy_protocol::Version::V2,
            other => {
                return Err((
                    p.span(),
                    format!("{key}.proxy_protocol"),
                    format!("{other:?} is not \"v1\" or \"v2\""),
                ))
            }
        }),
    };
    let terminate = match terminate {
        None => None,
        Some(t) => {
            let span = t.span();
            let t = t.into_inner();
            let alpn: Vec<Vec<u8>> = match &t.alpn {
                None => vec![b"http/1.1".to_vec()],
                Some(list) => {
                    if list.get_ref().iter().any(|p| p.is_empty() || p.len() > 255) {
                        return Err((
                            list.span(),
                            format!("{key}.terminate.alpn"),
                            "ALPN protocol names are 1 to 255 bytes".into(),
                        ));
                    }
                    list.get_ref()
                        .iter()
                        .map(|p| p.as_bytes().to_vec())
                        .collect()
                }
            };
            let tk = format!("{key}.terminate");
            let resolve = |p: &Spanned<String>| ctx.base.join(p.get_ref());
            match (t.acme, &t.cert, &t.key) {
                (true, None, None) => {
                    if !ctx.acme {
                        return Err((span, format!("{tk}.acme"), "needs an [acme] table".into()));
                    }
                    let Some(name) = exact else {
                        return Err((
                            span,
                            format!("{tk}.acme"),
                            "ACME (tls-alpn-01) certificates are for exact names: not wildcards or the fallback".into(),
                        ));
                    };
                    let tls = crate::acme::server_config(name, &alpn).map_err(|m| (span, tk, m))?;
                    Some(Arc::new(Terminate {
                        cert: PathBuf::new(),
                        key: PathBuf::new(),
                        alpn,
                        tls,
                        acme: Some(name.to_owned()),
                    }))
                }
                (true, _, _) => {
                    return Err((
                        span,
                        tk,
                        "`acme = true` replaces `cert` and `key`: give one or the other".into(),
                    ))
                }
                (false, Some(c), Some(k)) => {
                    let (cert, key_path) = (resolve(c), resolve(k));
                    let tls = crate::tls::server_config(&cert, &key_path, &alpn)
                        .map_err(|m| (span, tk, m))?;
                    Some(Arc::new(Terminate {
                        cert,
                        key: key_path,
                        alpn,
                        tls,
                        acme: None,
                    }))
                }
                (false, _, _) => {
                    return Err((span, tk, "needs `cert` and `key` (or `acme = true`)".into()))
                }
            }
        }
    };
    let upstream = match backend {
        Some(list) => {
            let list_span = list.span();
            let items = list.into_inner().0;
            if items.is_empty() {
                return Err((
                    list_span,
                    format!("{key}.backend"),
                    "an empty list: name at least one backend".into(),
                ));
            }
            let many = items.len() > 1;
            let mut out = Vec::new();
            for (i, b) in items.iter().enumerate() {
                // A bare-string route carries no span of its own: point at the whole value instead.
                let span = if b.span() != (0..0) {
                    b.span()
                } else if list_span != (0..0) {
                    list_span.clone()
                } else {
                    value_span.clone()
                };
                let k = if many {
                    format!("{key}.backend[{i}]")
                } else {
                    format!("{key}.backend")
                };
                out.push(BackendAddr::parse(b.get_ref()).map_err(|m| (span, k, m))?);
            }
            Upstream::Backends(out)
        }
        None if is_metrics => {
            if terminate.is_none() {
                return Err((value_span, format!("{key}.terminate"), "the [metrics] route must terminate TLS (terminate = { cert = ..., key = ... })".into()));
            }
            Upstream::Metrics
        }
        None => {
            return Err((
                value_span,
                format!("{key}.backend"),
                "missing: every route needs a backend".into(),
            ))
        }
    };
    if upstream == Upstream::Metrics && proxy_protocol.is_some() {
        return Err((
            value_span,
            format!("{key}.proxy_protocol"),
            "the [metrics] route has no backend to send it to".into(),
        ));
    }
    Ok(Target {
        upstream,
        proxy_protocol,
        terminate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/sniplex/test.toml"))
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(
            r#"
listen = ["[::]:443", "0.0.0.0:443"]
[routes]
"git.example.org"   = "unix:/run/gitea/tls.sock"
"chat.example.org"  = "unix:@xmpp"
"*.lab.example.org" = "172.17.0.5:443"
"wiki.example.org"  = "wiki.internal:8443"
"old.example.org"   = { backend = "[fd00::5]:443" }
[fallback]
backend = "unix:/run/default.sock"
[timeouts]
client_hello = "10s"
connect = "5s"
idle = "1h"
shutdown = "30s"
"#,
        )
        .unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.routes.len(), 5);
        let get = |n: &str| {
            c.routes
                .lookup_name(&ServerName::parse(n.as_bytes()).unwrap())
                .map(|r| match &r.target.upstream {
                    Upstream::Backends(b) => (r.label.to_string(), b[0].clone()),
                    Upstream::Metrics => panic!("not a backend"),
                })
        };
        assert_eq!(
            get("git.example.org"),
            Some((
                "git.example.org".into(),
                BackendAddr::Unix("/run/gitea/tls.sock".into())
            ))
        );
        assert_eq!(
            get("chat.example.org").unwrap().1,
            BackendAddr::Abstract(b"xmpp".to_vec())
        );
        assert_eq!(
            get("a.lab.example.org"),
            Some((
                "*.lab.example.org".into(),
                BackendAddr::Tcp("172.17.0.5:443".parse().unwrap())
            ))
        );
        assert_eq!(
            get("wiki.example.org").unwrap().1,
            BackendAddr::Host {
                host: "wiki.internal".into(),
                port: 8443
            }
        );
        assert_eq!(
            get("old.example.org").unwrap().1,
            BackendAddr::Tcp("[fd00::5]:443".parse().unwrap())
        );
        assert_eq!(c.routes.fallback().unwrap().label.as_ref(), "fallback");
        assert_eq!(c.timeouts, Timeouts::default());
        assert!(c.summary().contains("5 routes"));
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.listen, vec!["[::]:443".parse().unwrap()]);
        assert!(c.routes.is_empty());
        assert_eq!(c.timeouts, Timeouts::default());
    }

    #[test]
    fn unknown_keys_are_errors_with_location() {
        let e = err("listen = [\"127.0.0.1:1\"]\nbogus = 1\n");
        assert!(
            e.starts_with("/etc/sniplex/test.toml:2:1: bogus: unknown field `bogus`"),
            "{e}"
        );
        let e = err("[timeouts]\nconnect = \"1s\"\nconect = \"2s\"\n");
        assert!(
            e.starts_with("/etc/sniplex/test.toml:3:1: timeouts.conect: unknown field"),
            "{e}"
        );
        let e = err("[routes]\n\"a.example\" = { backend = \"10.0.0.1:1\", weight = 3 }\n");
        assert!(
            e.contains(":2:") && e.contains("weight") && e.contains("unknown field"),
            "{e}"
        );
        let e = err("[routes.\"a.example\"]\nbackend = \"10.0.0.1:1\"\nbakend = 1\n");
        assert!(
            e.contains(":3:1: routes.\"a.example\".bakend: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn type_errors_name_the_key() {
        let e = err("[timeouts]\nidle = \"forever\"\n");
        assert!(
            e.starts_with("/etc/sniplex/test.toml:2:8: timeouts.idle:"),
            "{e}"
        );
        let e = err("listen = 443\n");
        assert!(e.starts_with("/etc/sniplex/test.toml:1:10: listen:"), "{e}");
        let e = err("[routes]\n\"a.example\" = 5\n");
        assert!(e.contains(":2:15: routes.\"a.example\":"), "{e}");
    }

    #[test]
    fn validation_errors_point_at_the_value() {
        let e = err("[routes]\n\"a.example\" = \"unix:run/a.sock\"\n");
        assert!(e.starts_with("/etc/sniplex/test.toml:2:15: routes.\"a.example\".backend: unix socket path \"run/a.sock\" is relative"), "{e}");
        let e = err("[routes]\n\"a.*.org\" = \"unix:/a\"\n");
        assert!(
            e.starts_with("/etc/sniplex/test.toml:2:1: routes.\"a.*.org\": bad server name"),
            "{e}"
        );
        let e = err("[routes]\n\"A.example\" = \"unix:/a\"\n\"a.example.\" = \"unix:/b\"\n");
        assert!(e.contains("duplicate route a.example"), "{e}");
        let e = err("listen = [\"127.0.0.1:1\", \"localhost:443\"]\n");
        assert!(
            e.starts_with(
                "/etc/sniplex/test.toml:1:26: listen[1]: \"localhost:443\" is not an IP:PORT"
            ),
            "{e}"
        );
        let e = err("[routes]\n\"a.example\" = \"fd00::5:443\"\n");
        assert!(e.contains("needs brackets"), "{e}");
        let e = err("[routes]\n\"a.example\" = { backend = \"host:0\" }\n");
        assert!(
            e.contains(":2:27: routes.\"a.example\".backend:") && e.contains("port"),
            "{e}"
        );
        let e = err("[fallback]\nbackend = \"unix:\"\n");
        assert!(e.contains(":2:11: fallback.backend:"), "{e}");
        let e = err("[timeouts]\nconnect = \"0s\"\n");
        assert!(
            e.contains(":2:11: timeouts.connect: must be more than zero"),
            "{e}"
        );
        let e = err("listen = []\n");
        assert!(e.contains("listen: needs at least one address"), "{e}");
    }

    #[test]
    fn syntax_errors_have_a_location() {
        let e = err("[routes]\n\"a.example\" = \"unix:/a\n");
        assert!(e.starts_with("/etc/sniplex/test.toml:2:"), "{e}");
    }

    #[test]
    fn backend_addresses() {
        assert!(BackendAddr::parse("unix:@").is_err());
        assert!(BackendAddr::parse(&format!("unix:/{}", "a".repeat(120))).is_err());
        assert!(BackendAddr::parse("127.0.0.1").is_err());
        assert!(BackendAddr::parse("127.0.0.1:0").is_err());
        assert!(BackendAddr::parse("bad host:1").is_err());
        assert_eq!(
            BackendAddr::parse("[::1]:8443").unwrap(),
            BackendAddr::Tcp("[::1]:8443".parse().unwrap())
        );
    }

    #[test]
    fn quic_section_and_route_keys() {
        let c = parse(
            r#"
[quic]
listen = ["127.0.0.1:8443", "[::1]:8443"]
idle = "30s"
max_pending_per_ip = 4

[routes."app.example.org"]
backend = "unix:/run/app/tls.sock"
quic = "127.0.0.1:9443"

[routes."box.example.org"]
backend = "unix:/run/box.sock"
quic = "box.containers:443"

[fallback]
backend = "127.0.0.1:1"
quic = "[::1]:9444"
"#,
        )
        .unwrap();
        let q = c.quic.as_ref().unwrap();
        assert_eq!(q.listen.len(), 2);
        assert_eq!(q.idle, Duration::from_secs(30));
        assert_eq!(q.max_pending_per_ip, 4);
        assert_eq!(q.max_flows, QuicConfig::default().max_flows);
        let route = |n: &str| {
            c.routes
                .route(Some(&ServerName::parse(n.as_bytes()).unwrap()))
                .unwrap()
                .clone()
        };
        assert_eq!(
            route("app.example.org").quic,
            Some(BackendAddr::Tcp("127.0.0.1:9443".parse().unwrap()))
        );
        assert_eq!(
            route("box.example.org").quic,
            Some(BackendAddr::Host {
                host: "box.containers".into(),
                port: 443
            })
        );
        assert_eq!(route("other.example.org").label.as_ref(), "fallback");
        assert!(route("other.example.org").quic.is_some());

        let e = err("[routes.\"a.example\"]\nbackend = \"127.0.0.1:1\"\nquic = \"127.0.0.1:2\"\n");
        assert!(
            e.contains("test.toml:3:8: routes.\"a.example\".quic: needs a [quic] table"),
            "{e}"
        );
        let e = err(
            "[quic]\n[routes.\"a.example\"]\nbackend = \"127.0.0.1:1\"\nquic = \"unix:/x.sock\"\n",
        );
        assert!(
            e.contains(
                "test.toml:4:8: routes.\"a.example\".quic: \"unix:/x.sock\": QUIC backends are UDP"
            ),
            "{e}"
        );
        let e = err("[quic]\nlisten = [\"nope\"]\n");
        assert!(e.contains("test.toml:2:11: quic.listen[0]"), "{e}");
        let e = err("[quic]\nidle = \"0s\"\n");
        assert!(
            e.contains("test.toml:2:8: quic.idle: must be more than zero"),
            "{e}"
        );
        let e = err("[quic]\nmax_flows = 0\n");
        assert!(
            e.contains("test.toml:2:13: quic.max_flows: must be at least 1"),
            "{e}"
        );
        let e = err("[quic]\nlisen = []\n");
        assert!(e.contains("test.toml:2:1: quic.lisen"), "{e}");
        let e = err("[routes.\"a.example\"]\nbackend = \"127.0.0.1:1\"\n[routes.\"a.example\".alpn.h3]\nbackend = \"127.0.0.1:2\"\nquic = \"127.0.0.1:3\"\n");
        assert!(e.contains("quic belongs to the route"), "{e}");
    }

    #[test]
    fn acme_section_and_routes() {
        let c = parse(
            r#"
[acme]
directory = "https://acme.example/dir"
contact = ["mailto:admin@example.org"]
storage = "acme"
renew_before = "30d"

[routes."blog.example.org"]
backend = "unix:/run/blog.sock"
terminate = { acme = true }

[routes."mixed.example.org"]
backend = "unix:/run/mixed.sock"
[routes."mixed.example.org".alpn."http/1.1"]
backend = "unix:/run/mixed-http.sock"
terminate = { acme = true, alpn = ["http/1.1"] }
"#,
        )
        .unwrap();
        let a = c.acme.as_ref().unwrap();
        assert_eq!(a.storage, Path::new("/etc/sniplex/acme"));
        assert_eq!(a.renew_before, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(c.acme_names, vec!["blog.example.org", "mixed.example.org"]);

        let route = "[routes.\"a.example\"]\nbackend = \"127.0.0.1:1\"\n";
        let acme = "[acme]\ndirectory = \"https://x/dir\"\nstorage = \"/s\"\n";
        let e = err(&format!("{route}terminate = {{ acme = true }}\n"));
        assert!(
            e.contains(
                "test.toml:3:13: routes.\"a.example\".terminate.acme: needs an [acme] table"
            ),
            "{e}"
        );
        let e = err(&format!("{acme}[routes.\"*.example\"]\nbackend = \"127.0.0.1:1\"\nterminate = {{ acme = true }}\n"));
        assert!(e.contains("are for exact names"), "{e}");
        let e = err(&format!(
            "{acme}[fallback]\nbackend = \"127.0.0.1:1\"\nterminate = {{ acme = true }}\n"
        ));
        assert!(e.contains("fallback.terminate.acme"), "{e}");
        let e = err(&format!(
            "{acme}{route}terminate = {{ acme = true, cert = \"c.pem\", key = \"k.pem\" }}\n"
        ));
        assert!(e.contains("replaces `cert` and `key`"), "{e}");
        let e = err(&format!("{route}terminate = {{ cert = \"c.pem\" }}\n"));
        assert!(e.contains("needs `cert` and `key`"), "{e}");
        let e = err("[acme]\ndirectory = \"http://x/dir\"\nstorage = \"/s\"\n");
        assert!(
            e.contains("test.toml:2:13: acme.directory: \"http://x/dir\" must be an https:// URL"),
            "{e}"
        );
        let e =
            err("[acme]\ndirectory = \"https://x/dir\"\nstorage = \"/s\"\ncontact = [\"admin\"]\n");
        assert!(e.contains("test.toml:4:12: acme.contact[0]"), "{e}");
        let e = err("[acme]\ndirectory = \"https://x/dir\"\n");
        assert!(e.contains("storage"), "{e}");
    }
}
