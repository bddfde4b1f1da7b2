//! The configuration file: serde structs that mirror the TOML, and the validation that turns
//! them into a [`Config`] the rest of the balancer can trust.
//!
//! Every mistake is reported as `file:line:col: key: message`, and validation collects all of
//! them in one pass so an operator fixes a file in one read, not one error per run.

pub mod backend;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

/// HAProxy's ceiling too: large enough for any real ratio, small enough that the precomputed
/// round-robin sequence (sum of weights long) stays a few hundred KiB at 300 backends.
pub const MAX_WEIGHT: u32 = 256;

/// At most this many attempts per request, whatever `retries` says: the list of tried nodes
/// lives on the stack.
pub const MAX_ATTEMPTS: usize = 8;

/// The largest per-backend connection cap: far above what one web node serves, and far below
/// the in-flight counter's range, so a cap never wraps it.
pub const MAX_BACKEND_CONNECTIONS: u32 = 1_000_000;

/// The longest a request may wait in a pool's queue for room on a capped node.
pub const MAX_QUEUE_TIMEOUT: Duration = Duration::from_secs(3600);

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// How long a stop waits for in-flight requests before cutting them off (default 30s).
    pub shutdown_grace: Duration,
    /// `[[listeners]]`, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// `[admin]`; `None` serves no admin API.
    pub admin: Option<AdminConfig>,
    /// `[registry]`; `None` runs no registry.
    pub registry: Option<RegistryConfig>,
    /// `[pools.NAME]`, by name.
    pub pools: BTreeMap<String, PoolConfig>,
    /// `[[routes]]`, in file order; the first match wins.
    pub routes: Vec<RouteConfig>,
    /// Problems that do not stop fulcrum from running (an expired certificate): `check`
    /// prints them, `run` logs them.
    pub warnings: Vec<Diagnostic>,
}

/// `[[listeners]]`: one socket that accepts client traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// Unique among listeners; names the listener in logs, metrics and the admin API.
    pub name: String,
    /// The address to accept on; port 0 takes a free one.
    pub bind: SocketAddr,
    /// Time from accept to a complete request head (default 10s).
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may sit without a request (default 60s).
    pub idle_timeout: Duration,
    /// The largest request head accepted, 1 KiB to 1 MiB (default 65536).
    pub max_header_bytes: usize,
    /// Client connections open at once; more wait in the accept queue (default 100000).
    pub max_connections: usize,
    /// Peers whose `X-Forwarded-For` is believed (default none).
    pub trusted_proxies: Vec<IpNet>,
    /// The largest request body; past it the answer is 413 (default unset: no limit).
    pub max_body_bytes: Option<u64>,
    /// Adds an RFC 7239 `Forwarded` header toward backends (default false).
    pub forwarded: bool,
    /// Every connection must open with a PROXY protocol v1 or v2 header from a peer in
    /// `trusted_proxies`, whose client address it then is (default false).
    pub proxy_protocol: bool,
    /// TLS termination; `None` serves cleartext HTTP/1.1 and h2c.
    pub tls: Option<TlsConfig>,
    /// `access_log = { ... }`: one line per request; `None` (the default) logs nothing.
    pub access_log: Option<AccessLogConfig>,
    /// Keeps a sane client `X-Request-Id` or sets a generated one (default true); false passes
    /// the header through untouched.
    pub request_id: bool,
}

/// A listener's `access_log`: where its lines go and how they are written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccessLogConfig {
    /// `"-"` (standard output) or a file, appended to and reopened on `SIGUSR1`.
    pub path: AccessLogPath,
    /// One JSON object per line (the default), or nginx's `combined`.
    pub format: AccessLogFormat,
    /// Logs the path with its query string (default false: queries often carry tokens).
    pub include_query: bool,
}

/// Where an access log is written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AccessLogPath {
    /// `"-"`: standard output.
    Stdout,
    /// A file, created when absent and appended to.
    File(PathBuf),
}

/// A TLS listener's certificates. The files were loaded and checked (key matches certificate)
/// when the config was validated; the listener loads them again when it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// Served to clients that send no SNI name or one no `sni` entry claims.
    pub default: CertPaths,
    /// In file order; exact names win over wildcards (`*.example.com`, one label deep).
    pub sni: Vec<SniCert>,
    /// A client that has not completed its handshake by then is dropped.
    pub handshake_timeout: Duration,
}

pub use crate::base::certs::CertPaths;

/// `[[listeners.tls.sni]]`: a certificate for the names a client may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniCert {
    /// Lower-case DNS names; `*.example.com` matches exactly one extra label.
    pub names: Vec<String>,
    /// The certificate and key served for those names.
    pub paths: CertPaths,
}

/// `[admin]`: the HTTP admin API.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// The admin API's address; beyond loopback it needs `token`.
    pub bind: SocketAddr,
    /// Bearer token every admin call must carry; `None` on loopback only.
    pub token: Option<String>,
}

/// `[registry]`: the gRPC service web nodes register with.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryConfig {
    /// The registry's address; beyond loopback it needs a token or a client CA.
    pub bind: SocketAddr,
    /// The pool registered nodes join.
    pub pool: String,
    /// How often nodes are told to heartbeat, answered in whole seconds (default 5s).
    pub heartbeat_interval: Duration,
    /// Every call must carry gRPC metadata `authorization: Bearer TOKEN`.
    pub token: Option<Secret>,
    /// A registered address must fall in one of these.
    pub allowed_networks: Vec<IpNet>,
    /// Registered nodes the pool takes at most; a new one beyond is refused.
    pub max_nodes: usize,
    /// `[registry.tls]`; `None` serves cleartext h2c.
    pub tls: Option<RegistryTls>,
    /// `store`: the PostgreSQL database balancers share registrations through; `None` keeps
    /// them in this balancer alone.
    pub store: Option<StoreUrl>,
    /// `store_poll_interval`: how often the store is re-read when no notification came
    /// (default 1s).
    pub store_poll_interval: Duration,
}

/// `registry.store`: a `postgres://USER[:PASSWORD]@HOST:PORT/DB` URL. The password is a
/// credential: `Debug` and `Display` print the URL with it replaced by `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl(Secret);

impl StoreUrl {
    /// Wraps a URL already validated (`check` and `Config::parse` do that).
    pub fn new(url: impl Into<String>) -> Self {
        Self(Secret::new(url))
    }

    /// The URL itself, password included, to connect with; never to print.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL with its password, if any, replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(self.0.expose())
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({})", self.redacted())
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// `scheme://user:password@host/...` with the password replaced by `***`; a URL without
/// one comes back as it was.
pub fn redact_url(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    // The last `@` ends the user info: a password may itself hold an (unencoded) `@`.
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let Some(colon) = rest[..at].find(':') else {
        return url.to_owned();
    };
    format!("{}{}:***{}", &url[..start], &rest[..colon], &rest[at..])
}

impl RegistryConfig {
    /// Whether a caller must prove who it is (a token, or a certificate `client_ca` signed)
    /// before it may change the pool. A registry that does not may only listen on loopback.
    pub fn authenticates(&self) -> bool {
        self.token.is_some() || self.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
    }

    /// What is wrong with a registry that lets whoever reaches it change the pool: a bind
    /// beyond loopback with neither a token nor a client CA. `check`, `run` and `start` all
    /// refuse it.
    pub fn unauthenticated(&self) -> Option<String> {
        if self.bind.ip().is_loopback() || self.authenticates() {
            return None;
        }
        let hint = if self.tls.is_some() {
            " ([registry.tls] without client_ca encrypts, but lets anyone in)"
        } else {
            ""
        };
        Some(format!(
            "a non-loopback registry bind needs registry.token or [registry.tls] with client_ca{hint}: whoever reaches it can add backends to pool `{}`",
            self.pool
        ))
    }
}

/// `[registry.tls]`: the registry speaks TLS (ALPN `h2`), and with `client_ca` requires a
/// client certificate signed by one of its CAs.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryTls {
    /// The registry's certificate: `default` only, no SNI entries.
    pub certs: TlsConfig,
    /// PEM file of the CA certificates client certificates must chain to.
    pub client_ca: Option<PathBuf>,
}

/// `registry.max_nodes` when absent, and its ceiling: a registered node costs a health-check
/// task and an idle-connection queue, so the bound is what one balancer can check.
pub const DEFAULT_REGISTRY_MAX_NODES: usize = 1024;
/// `registry.max_nodes` may not exceed this.
pub const MAX_REGISTRY_MAX_NODES: usize = 100_000;

/// `registry.allowed_networks` when absent: any address (the contract's default), less the
/// rules that always hold (fulcrum's own sockets, unspecified and multicast addresses). An
/// operator narrows it to the web tier's networks; the README's Security section says why.
pub fn default_allowed_networks() -> Vec<IpNet> {
    // `0.0.0.0/0` and `::/0`: the networks' defaults.
    vec![
        IpNet::V4(ipnet::Ipv4Net::default()),
        IpNet::V6(ipnet::Ipv6Net::default()),
    ]
}

/// A credential from the config: compared and sent, never printed (`Debug` hides it, so a
/// logged config or struct does not leak it).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential read from the config or the environment.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The credential itself, to compare or send; never to print.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A config keyword enum: each variant and its spelling in the file in one table, which
/// `as_str` (the file's word in the admin API, the status page and `check`'s summary),
/// `from_name` (parsing) and `expected` (the "expected a, b or c" of an error) all read.
macro_rules! keywords {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        pub enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            /// Every variant, in the order the docs list them.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The word the config file uses.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The variant the config file calls `text`.
            pub fn from_name(text: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == text)
            }

            /// `a, b or c`: every word, for an error about an unknown one.
            pub fn expected() -> String {
                one_of(Self::ALL.iter().map(|v| v.as_str()))
            }
        }
    };
}

/// `a, b or c`.
fn one_of<'a>(words: impl ExactSizeIterator<Item = &'a str>) -> String {
    let last = words.len().saturating_sub(1);
    let mut out = String::new();
    for (i, word) in words.enumerate() {
        match i {
            0 => {}
            i if i == last => out.push_str(" or "),
            _ => out.push_str(", "),
        }
        out.push_str(word);
    }
    out
}

keywords! {
    /// How a pool picks a backend (one file each under `model/balance/`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Strategy {
        /// Each backend in turn, as often as its weight says.
        RoundRobin = "round_robin",
        /// The backend with the fewest requests in flight per unit of weight.
        LeastConnections = "least_connections",
        /// A cookie keeps each user on one backend; `[pools.NAME.sticky]` configures it.
        StickyCookie = "sticky_cookie",
        /// The client address picks the backend by weighted rendezvous hashing.
        IpHash = "ip_hash",
    }
}

/// `[pools.NAME.sticky]`: the cookie `sticky_cookie` sets and how it places new users.
#[derive(Debug, Clone, PartialEq)]
pub struct StickyConfig {
    /// The cookie's name (default `fulcrum_sticky`).
    pub cookie: String,
    /// Places users without a valid cookie: round robin or least connections.
    pub fallback: Strategy,
    /// HMAC key; `None` makes the node ids an unkeyed hash anyone can compute.
    pub secret: Option<String>,
    /// `Max-Age`, and the expiry inside the value (default unset: a session cookie).
    pub max_age: Option<Duration>,
    /// The cookie's `Path` (default `/`).
    pub path: String,
    /// The cookie's `Domain` (default unset: the request's host only).
    pub domain: Option<String>,
    /// Sets `HttpOnly` (default true).
    pub http_only: bool,
    /// The cookie's `SameSite` (default `Lax`).
    pub same_site: SameSite,
    /// `None`: `Secure` exactly on TLS listeners.
    pub secure: Option<bool>,
}

impl Default for StickyConfig {
    fn default() -> Self {
        Self {
            cookie: "fulcrum_sticky".to_owned(),
            fallback: Strategy::LeastConnections,
            secret: None,
            max_age: None,
            path: "/".to_owned(),
            domain: None,
            http_only: true,
            same_site: SameSite::Lax,
            secure: None,
        }
    }
}

impl StickyConfig {
    /// The strategies that can place a user without a cookie: they need nothing from the
    /// request (ip_hash would pin by address, sticky_cookie would ask itself).
    pub const FALLBACKS: &'static [Strategy] = &[Strategy::RoundRobin, Strategy::LeastConnections];
}

keywords! {
    /// The cookie's `SameSite` attribute; the file may write it in any case.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum SameSite {
        /// Sent on top-level navigations from other sites, not on their subrequests.
        Lax = "Lax",
        /// Sent only on requests from the same site.
        Strict = "Strict",
        /// Sent on every request; browsers require `Secure` with it.
        None = "None",
    }
}

keywords! {
    /// How a pool talks to its backends.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub enum BackendProtocol {
        /// Pooled keep-alive HTTP/1.1 connections (the default).
        #[default]
        Http1 = "http1",
        /// Cleartext HTTP/2 with prior knowledge: requests multiplexed over one connection per
        /// backend. `Upgrade` requests (WebSocket) still go over HTTP/1.1.
        H2c = "h2c",
    }
}

keywords! {
    /// The line format of an access log.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum AccessLogFormat {
        /// One JSON object per line, with the fields the README lists.
        Json = "json",
        /// nginx's and Apache's `combined` format, which GoAccess and friends read.
        Combined = "combined",
    }
}

/// `[pools.NAME]`: backends and how requests are spread over them.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// How a backend is picked (default `round_robin`).
    pub strategy: Strategy,
    /// How the pool talks to its backends (default `http1`).
    pub backend_protocol: BackendProtocol,
    /// A node that comes back ramps from 10 % to full weight over this (default unset: at once).
    pub slow_start: Option<Duration>,
    /// Time to open a connection to a backend (default 2s).
    pub connect_timeout: Duration,
    /// Time from the end of the request body to the response head (default 30s).
    pub response_timeout: Duration,
    /// Other nodes tried after a refused connection, at most 7 (default 2).
    pub retries: u32,
    /// How long an idle keep-alive backend connection is kept (default 90s).
    pub idle_pool_timeout: Duration,
    /// The cap of backends that set none themselves; `None`: uncapped.
    pub max_connections_per_backend: Option<u32>,
    /// How long a request waits for room when every node it may use is at its cap; zero
    /// answers 503 at once.
    pub queue_timeout: Duration,
    /// The file's backends, in file order.
    pub backends: Vec<BackendConfig>,
    /// `[pools.NAME.health]`: the active checks.
    pub health: HealthConfig,
    /// `[pools.NAME.sticky]`: read by `sticky_cookie`.
    pub sticky: StickyConfig,
}

/// One backend of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// The node's identity: stable across address changes, used in metrics and sticky ids.
    pub name: String,
    /// Where the node listens.
    pub address: SocketAddr,
    /// Its share of new requests, 1..=[`MAX_WEIGHT`] (default 1).
    pub weight: u32,
    /// The most requests in flight to this node; `None` takes the pool's
    /// `max_connections_per_backend`.
    pub max_connections: Option<u32>,
}

impl PoolConfig {
    /// The cap of `backend` in this pool: its own, else the pool's default; `None`: uncapped.
    pub fn cap_of(&self, backend: &BackendConfig) -> Option<u32> {
        backend.max_connections.or(self.max_connections_per_backend)
    }
}

/// `[pools.NAME.health]`: how the checker decides a node is up.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Checked with `GET`; a 2xx passes unless a JSON `status` says otherwise (default `/healthz`).
    pub path: String,
    /// Time between checks of one node, jittered ±10 % (default 5s).
    pub interval: Duration,
    /// Time one check may take (default 1s, or the interval if shorter).
    pub timeout: Duration,
    /// Consecutive failures that take a node out (default 3).
    pub fall: u32,
    /// Consecutive passes that bring it back (default 3).
    pub rise: u32,
}

/// `[[routes]]`: which requests go to which pool.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Lower-cased, without a port.
    pub host: Option<String>,
    /// Matches paths starting with these bytes; `None` matches any path.
    pub path_prefix: Option<String>,
    /// The pool matching requests go to.
    pub pool: String,
}

/// All the problems found in one config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// Every problem, in file order.
    pub diagnostics: Vec<Diagnostic>,
}

/// One problem, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The config file, as given.
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no place in the file (it could not be read).
    pub line: usize,
    /// 1-based; 0 with `line`.
    pub column: usize,
    /// The dotted key at fault (`pools.web.backends[0].weight`); empty for the whole file.
    pub key: String,
    /// What is wrong, for the operator.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            diagnostics: vec![Diagnostic {
                file: path.to_owned(),
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read config: {e}"),
            }],
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text` as if read from `file` (the name only labels errors).
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        validate::parse(file, text)
    }

    /// The pool a single-pool config sends everything to when it has no routes.
    pub fn default_pool(&self) -> Option<&str> {
        if self.routes.is_empty() && self.pools.len() == 1 {
            self.pools.keys().next().map(String::as_str)
        } else {
            None
        }
    }
}

/// `text` is not an `IP:port` address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an IP:port address (e.g. \"127.0.0.1:8080\" or \"[::1]:8080\")")]
pub struct NotAnAddress(pub String);

/// An `IP:port` socket address: a listener's, the admin API's or the registry's bind, or a
/// backend's address (which [`backend::address`] also keeps off port 0).
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, NotAnAddress> {
    text.parse().map_err(|_| NotAnAddress(text.to_owned()))
}

/// `example.com:8080` -> `example.com`; `[::1]:80` -> `[::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    const MINIMAL: &str = r#"
[[listeners]]
bind = "127.0.0.1:0"

[pools.web]
backends = [{ address = "127.0.0.1:9001" }, { address = "127.0.0.1:9002", weight = 2, name = "b" }]
"#;

    #[test]
    fn minimal_config_gets_contract_defaults() {
        let config = parse(MINIMAL).unwrap();
        let l = &config.listeners[0];
        assert_eq!(l.header_read_timeout, Duration::from_secs(10));
        assert_eq!(l.idle_timeout, Duration::from_secs(60));
        assert_eq!(l.max_header_bytes, 65536);
        let pool = &config.pools["web"];
        assert_eq!(pool.strategy, Strategy::RoundRobin);
        assert_eq!(pool.connect_timeout, Duration::from_secs(2));
        assert_eq!(pool.retries, 2);
        assert_eq!(pool.backends[0].name, "127.0.0.1:9001");
        assert_eq!(pool.backends[1].weight, 2);
        assert_eq!((pool.health.fall, pool.health.rise), (3, 3));
        assert_eq!(config.default_pool(), Some("web"));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let err = parse("[[listeners]]\nbind = \"127.0.0.1:0\"\nbnd = 1\n").unwrap_err();
        let d = &err.diagnostics[0];
        assert_eq!((d.line, d.column), (3, 1), "{err}");
        assert!(d.message.contains("bnd"), "{err}");
        assert_eq!(d.key, "listeners[0].bnd", "{err}");

        let err = parse(&format!(
            "{MINIMAL}\n[pools.web.health]\nintervl = \"1s\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.diagnostics[0].key, "pools.web.health.intervl", "{err}");
    }

    #[test]
    fn health_timeout_follows_a_short_interval_and_may_exceed_a_set_one() {
        let ok = parse(&format!(
            "{MINIMAL}\n[pools.web.health]\ninterval = \"500ms\"\n"
        ))
        .unwrap();
        assert_eq!(ok.pools["web"].health.timeout, Duration::from_millis(500));
        // HAProxy, Envoy and Traefik accept this; checks of a node simply never overlap.
        let long = parse(&format!(
            "{MINIMAL}\n[pools.web.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n"
        ))
        .unwrap();
        assert_eq!(long.pools["web"].health.interval, Duration::from_secs(1));
        assert_eq!(long.pools["web"].health.timeout, Duration::from_secs(2));
    }

    #[test]
    fn health_interval_and_timeout_stay_between_a_millisecond_and_an_hour() {
        let text =
            format!("{MINIMAL}\n[pools.web.health]\ninterval = \"2h\"\ntimeout = \"500us\"\n");
        let err = parse(&text).unwrap_err();
        let found = |key: &str| {
            err.diagnostics
                .iter()
                .find(|d| d.key == key)
                .unwrap_or_else(|| panic!("no diagnostic for {key} in:\n{err}"))
        };
        let interval = found("pools.web.health.interval");
        assert_eq!(interval.message, "must be between 1ms and 1h (got `2h`)");
        assert_eq!((interval.line, interval.column), (9, 12), "{err}");
        let timeout = found("pools.web.health.timeout");
        assert_eq!(timeout.message, "must be between 1ms and 1h (got `500us`)");
        assert_eq!((timeout.line, timeout.column), (10, 11), "{err}");
        for edge in ["interval = \"1ms\"\ntimeout = \"1h\"", "interval = \"1h\""] {
            parse(&format!("{MINIMAL}\n[pools.web.health]\n{edge}\n")).unwrap();
        }
    }

    #[test]
    fn all_validation_errors_are_reported_at_once() {
        let text = r#"
[[listeners]]
bind = "nope"

[pools.web]
strategy = "fastest"
backends = [{ address = "127.0.0.1:1", weight = 0 }, { address = "127.0.0.1:1" }]

[[routes]]
pool = "missing"
"#;
        let err = parse(text).unwrap_err().to_string();
        for expected in [
            "test.toml:3:8: listeners[0].bind:",
            "test.toml:6:12: pools.web.strategy: unknown strategy",
            "pools.web.backends[0].weight: must be between 1 and 256",
            "pools.web.backends[1].address: duplicate backend address",
            "test.toml:10:8: routes[0].pool: no pool named `missing`",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        }
    }

    #[test]
    fn sticky_table_is_validated_and_a_missing_secret_warns() {
        let sticky = |table: &str| {
            format!("{MINIMAL}strategy = \"sticky_cookie\"\n[pools.web.sticky]\n{table}")
        };
        let config = parse(&sticky("max_age = \"30m\"\nsame_site = \"strict\"\n")).unwrap();
        let s = &config.pools["web"].sticky;
        assert_eq!(s.cookie, "fulcrum_sticky");
        assert_eq!(s.fallback, Strategy::LeastConnections);
        assert_eq!(s.max_age, Some(Duration::from_secs(1800)));
        assert_eq!(s.same_site, SameSite::Strict);
        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        assert!(
            config.warnings[0]
                .to_string()
                .contains("pools.web.strategy: sticky cookies without pools.web.sticky.secret")
        );

        let keyed = parse(&sticky("secret = \"k\"\n")).unwrap();
        assert!(keyed.warnings.is_empty());

        let err = parse(&sticky(
            "cookie = \"a b\"\nfallback = \"ip_hash\"\npath = \"/x;y\"\nsame_site = \"None\"\nsecure = false\n",
        ))
        .unwrap_err()
        .to_string();
        for expected in [
            "pools.web.sticky.cookie: must be a cookie name",
            "pools.web.sticky.fallback: `ip_hash` cannot place new users",
            "pools.web.sticky.path: must not contain",
            "pools.web.sticky.same_site: SameSite=None needs secure",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        }
    }

    #[test]
    fn non_loopback_admin_needs_a_token() {
        let text = format!("{MINIMAL}\n[admin]\nbind = \"0.0.0.0:9090\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("admin.bind: a non-loopback admin bind needs admin.token"),
            "{err}"
        );
        let ok = format!("{MINIMAL}\n[admin]\nbind = \"0.0.0.0:9090\"\ntoken = \"s3cret\"\n");
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn backend_protocol_is_http1_unless_h2c_is_asked_for() {
        assert_eq!(
            parse(MINIMAL).unwrap().pools["web"].backend_protocol,
            BackendProtocol::Http1
        );
        let h2c = parse(&format!("{MINIMAL}backend_protocol = \"h2c\"\n")).unwrap();
        assert_eq!(h2c.pools["web"].backend_protocol, BackendProtocol::H2c);
        let err = parse(&format!("{MINIMAL}backend_protocol = \"h3\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pools.web.backend_protocol: unknown backend protocol `h3`"),
            "{err}"
        );
    }

    #[test]
    fn a_handshake_timeout_without_tls_is_a_warning() {
        let text = MINIMAL.replace(
            "bind = \"127.0.0.1:0\"",
            "bind = \"127.0.0.1:0\"\ntls_handshake_timeout = \"5s\"",
        );
        let config = parse(&text).unwrap();
        assert!(config.listeners[0].tls.is_none());
        let warning = config.warnings[0].to_string();
        assert!(
            warning.contains("listeners[0].tls_handshake_timeout: has no effect"),
            "{warning}"
        );
    }

    #[test]
    fn connection_caps_default_to_the_pools_and_are_bounded() {
        let ok = parse(&format!(
            "{MINIMAL}max_connections_per_backend = 50\nqueue_timeout = \"250ms\"\n"
        ))
        .unwrap();
        let pool = &ok.pools["web"];
        assert_eq!(pool.queue_timeout, Duration::from_millis(250));
        assert_eq!(pool.cap_of(&pool.backends[0]), Some(50));
        let own =
            parse(&MINIMAL.replace("name = \"b\"", "name = \"b\", max_connections = 2")).unwrap();
        let pool = &own.pools["web"];
        assert_eq!(pool.cap_of(&pool.backends[0]), None, "uncapped by default");
        assert_eq!(pool.cap_of(&pool.backends[1]), Some(2));
        assert_eq!(pool.queue_timeout, Duration::from_secs(5));
        let zero = parse(&format!("{MINIMAL}queue_timeout = \"0s\"\n")).unwrap();
        assert_eq!(
            zero.pools["web"].queue_timeout,
            Duration::ZERO,
            "0: 503 at once"
        );

        let err = parse(&format!(
            "{}max_connections_per_backend = 1000001\nqueue_timeout = \"2h\"\n",
            MINIMAL.replace("name = \"b\"", "name = \"b\", max_connections = 0")
        ))
        .unwrap_err()
        .to_string();
        for expected in [
            "test.toml:6:117: pools.web.backends[1].max_connections: must be between 1 and 1000000 (got 0)",
            "test.toml:7:31: pools.web.max_connections_per_backend: must be between 1 and 1000000",
            "test.toml:8:17: pools.web.queue_timeout: must be at most 1h",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        }
        let err = parse(&format!("{MINIMAL}queue_timeout = \"soon\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pools.web.queue_timeout: `soon` is not a duration"),
            "{err}"
        );
    }

    #[test]
    fn every_keyword_reads_back_as_itself_and_errors_list_them_all() {
        for &s in Strategy::ALL {
            assert_eq!(Strategy::from_name(s.as_str()), Some(s));
        }
        for &p in BackendProtocol::ALL {
            assert_eq!(BackendProtocol::from_name(p.as_str()), Some(p));
        }
        for &s in SameSite::ALL {
            assert_eq!(SameSite::from_name(s.as_str()), Some(s));
        }
        assert_eq!(Strategy::from_name("Round_Robin"), None, "the file's case");
        assert_eq!(
            Strategy::expected(),
            "round_robin, least_connections, sticky_cookie or ip_hash"
        );
        assert_eq!(BackendProtocol::expected(), "http1 or h2c");
        assert_eq!(one_of(["only"].into_iter()), "only");
        assert_eq!(one_of([].into_iter()), "");
    }

    #[test]
    fn access_log_is_off_unless_asked_for_and_every_mistake_is_named() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.listeners[0].access_log, None);
        assert!(
            config.listeners[0].request_id,
            "request ids are on by default"
        );
        let with = |table: &str| {
            MINIMAL.replace(
                "bind = \"127.0.0.1:0\"",
                &format!("bind = \"127.0.0.1:0\"\n{table}"),
            )
        };
        let on = parse(&with("access_log = { path = \"-\" }\nrequest_id = false")).unwrap();
        let l = &on.listeners[0];
        assert_eq!(
            l.access_log,
            Some(AccessLogConfig {
                path: AccessLogPath::Stdout,
                format: AccessLogFormat::Json,
                include_query: false,
            })
        );
        assert!(!l.request_id);
        let dir = std::env::temp_dir();
        let file = dir.join("fulcrum-config-test.log");
        let text = format!(
            "access_log = {{ path = \"{}\", format = \"combined\", include_query = true }}",
            file.display()
        );
        let log = parse(&with(&text)).unwrap().listeners[0].access_log.clone();
        assert_eq!(
            log,
            Some(AccessLogConfig {
                path: AccessLogPath::File(file),
                format: AccessLogFormat::Combined,
                include_query: true,
            })
        );

        for (table, expected) in [
            (
                "access_log = { path = \"-\", format = \"clf\" }",
                "test.toml:4:37: listeners[0].access_log.format: unknown access log format `clf`; expected json or combined",
            ),
            (
                "access_log = { path = \"/no/such/dir/a.log\" }",
                "test.toml:4:23: listeners[0].access_log.path: directory `/no/such/dir` does not exist",
            ),
            (
                "access_log = { path = \" \" }",
                "listeners[0].access_log.path: needs a file name",
            ),
            (
                "access_log = { path = \"-\", rotate = true }",
                "listeners[0].access_log.rotate",
            ),
            ("access_log = { format = \"json\" }", "path"),
        ] {
            let err = parse(&with(table)).unwrap_err().to_string();
            assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        }
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(validate::line_col("ab\ncdé\nx", 8), (3, 1));
        assert_eq!(validate::line_col("ab\ncdé", 5), (2, 3));
    }

    #[test]
    fn strip_port_handles_ipv6() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}
