//! The raw serde mirror of the file and the validation that turns it into a [`Config`]: every
//! rule, and the span of every mistake.

mod registry;
mod tls;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::*;

/// Validates `text` as if read from `file` (the name only labels errors).
pub(super) fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let mut ctx = Validator {
        file,
        text,
        diagnostics: Vec::new(),
        warnings: Vec::new(),
    };
    let raw: RawConfig = match toml::de::Deserializer::parse(text)
        .map_err(|e| (String::new(), e))
        .and_then(|de| {
            serde_path_to_error::deserialize(de).map_err(|e| (key_path(e.path()), e.into_inner()))
        }) {
        Ok(raw) => raw,
        Err((key, e)) => {
            ctx.error(e.span(), key, e.message().to_owned());
            return Err(ctx.finish());
        }
    };
    let mut config = ctx.validate(raw);
    if ctx.diagnostics.is_empty() {
        config.warnings = std::mem::take(&mut ctx.warnings);
        Ok(config)
    } else {
        Err(ctx.finish())
    }
}

/// No timer fulcrum runs is useful below a millisecond, and some divide their period (the idle
/// check runs four times per `idle_timeout`): a nanosecond value would make a zero period.
const MIN_DURATION: Duration = Duration::from_millis(1);
/// A day: past any real timeout, and far from overflowing `Instant + duration`.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Health `interval` and `timeout`: a check an hour apart is no longer watching the node.
const MAX_HEALTH_DURATION: Duration = Duration::from_secs(3600);
/// Browsers cap a cookie's lifetime at 400 days (RFC 6265bis); longer is never honoured.
const MAX_COOKIE_AGE: Duration = Duration::from_secs(400 * 24 * 3600);
/// Connections one listener may hold. The ceiling keeps the value within what a semaphore
/// and a listen backlog accept, and 10 M is the whole web tier of the design this serves.
const MAX_LISTENER_CONNECTIONS: u64 = 10_000_000;

/// A round bound the way an operator writes it: `1ms`, `24h`, `400d`.
fn short_duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        s if s >= 2 * 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

// ---- raw serde mirror of the file ------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    shutdown_grace: Option<Spanned<String>>,
    #[serde(default)]
    listeners: Vec<Spanned<RawListener>>,
    admin: Option<Spanned<RawAdmin>>,
    registry: Option<Spanned<registry::RawRegistry>>,
    #[serde(default)]
    pools: BTreeMap<String, Spanned<RawPool>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Option<Spanned<String>>,
    bind: Spanned<String>,
    header_read_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_header_bytes: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
    max_body_bytes: Option<Spanned<u64>>,
    #[serde(default)]
    forwarded: bool,
    tls: Option<Spanned<tls::RawTls>>,
    tls_handshake_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    bind: Spanned<String>,
    token: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    strategy: Option<Spanned<String>>,
    backend_protocol: Option<Spanned<String>>,
    slow_start: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    response_timeout: Option<Spanned<String>>,
    retries: Option<Spanned<u32>>,
    idle_pool_timeout: Option<Spanned<String>>,
    max_connections_per_backend: Option<Spanned<i64>>,
    queue_timeout: Option<Spanned<String>>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
    health: Option<Spanned<RawHealth>>,
    sticky: Option<Spanned<RawSticky>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<String>,
    weight: Option<Spanned<i64>>,
    name: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    fall: Option<Spanned<u32>>,
    rise: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSticky {
    cookie: Option<Spanned<String>>,
    fallback: Option<Spanned<String>>,
    secret: Option<Spanned<String>>,
    max_age: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    domain: Option<Spanned<String>>,
    http_only: Option<bool>,
    same_site: Option<Spanned<String>>,
    secure: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    pool: Spanned<String>,
}

// ---- validation ------------------------------------------------------------------------------

struct Validator<'a> {
    file: &'a Path,
    text: &'a str,
    diagnostics: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn error(
        &mut self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let (line, column) = span.map_or((0, 0), |s| line_col(self.text, s.start));
        self.diagnostics.push(Diagnostic {
            file: self.file.to_owned(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }

    /// A problem worth telling the operator that does not make the file invalid.
    fn warn(
        &mut self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let (line, column) = span.map_or((0, 0), |s| line_col(self.text, s.start));
        self.warnings.push(Diagnostic {
            file: self.file.to_owned(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        });
    }

    fn finish(&mut self) -> ConfigError {
        self.diagnostics.sort_by_key(|d| (d.line, d.column));
        ConfigError {
            diagnostics: std::mem::take(&mut self.diagnostics),
        }
    }

    /// A duration in `[MIN_DURATION, MAX_DURATION]`.
    fn duration(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        self.duration_up_to(value, key, default, MAX_DURATION)
    }

    /// A duration in `[MIN_DURATION, max]`; out of range is an error naming the key.
    fn duration_up_to(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
        max: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        match humantime::parse_duration(value.get_ref().trim()) {
            Ok(d) if d.is_zero() => {
                self.error(Some(value.span()), key, "must be greater than zero");
                default
            }
            Ok(d) if d < MIN_DURATION || d > max => {
                self.error(
                    Some(value.span()),
                    key,
                    format!(
                        "must be between {} and {} (got `{}`)",
                        short_duration(MIN_DURATION),
                        short_duration(max),
                        value.get_ref().trim()
                    ),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(
                    Some(value.span()),
                    key,
                    format!(
                        "`{}` is not a duration ({e}); write e.g. \"250ms\" or \"5s\"",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    /// A per-backend connection cap: 1 to [`MAX_BACKEND_CONNECTIONS`]; absent is no cap.
    fn connection_cap(&mut self, value: &Option<Spanned<i64>>, key: &str) -> Option<u32> {
        let value = value.as_ref()?;
        match u32::try_from(*value.get_ref()) {
            Ok(cap) if (1..=MAX_BACKEND_CONNECTIONS).contains(&cap) => Some(cap),
            _ => {
                self.error(
                    Some(value.span()),
                    key,
                    format!(
                        "must be between 1 and {MAX_BACKEND_CONNECTIONS} (got {}); leave it out for no cap",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// `queue_timeout`: zero (answer 503 at once when every node is full) up to
    /// [`MAX_QUEUE_TIMEOUT`].
    fn queue_timeout(&mut self, value: &Option<Spanned<String>>, key: &str) -> Duration {
        const DEFAULT: Duration = Duration::from_secs(5);
        let Some(value) = value else { return DEFAULT };
        match humantime::parse_duration(value.get_ref().trim()) {
            Ok(d) if d <= MAX_QUEUE_TIMEOUT => d,
            Ok(_) => {
                self.error(Some(value.span()), key, "must be at most 1h");
                DEFAULT
            }
            Err(e) => {
                self.error(
                    Some(value.span()),
                    key,
                    format!(
                        "`{}` is not a duration ({e}); write e.g. \"250ms\" or \"5s\"",
                        value.get_ref()
                    ),
                );
                DEFAULT
            }
        }
    }

    fn socket_addr(&mut self, value: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        match value.get_ref().parse::<SocketAddr>() {
            Ok(addr) if addr.port() == 0 && key.ends_with("address") => {
                self.error(Some(value.span()), key, "port 0 is not a backend port");
                None
            }
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(
                    Some(value.span()),
                    key,
                    format!("`{}` is not an IP:port address (e.g. \"127.0.0.1:8080\" or \"[::1]:8080\")", value.get_ref()),
                );
                None
            }
        }
    }

    /// A CIDR, or a bare IP address as the network of that one address.
    fn network(&mut self, value: &Spanned<String>, key: &str) -> Option<IpNet> {
        let text = value.get_ref().trim();
        let parsed = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        if parsed.is_err() {
            self.error(
                Some(value.span()),
                key,
                format!("`{text}` is not a CIDR or IP address"),
            );
        }
        parsed.ok()
    }

    fn validate(&mut self, raw: RawConfig) -> Config {
        let shutdown_grace = self.duration(
            &raw.shutdown_grace,
            "shutdown_grace",
            Duration::from_secs(30),
        );

        if raw.listeners.is_empty() {
            self.error(
                Some(0..0),
                "listeners",
                "at least one [[listeners]] is required",
            );
        }
        let mut listener_names = HashSet::new();
        let mut binds = HashSet::new();
        let mut listeners = Vec::new();
        for (i, l) in raw.listeners.iter().enumerate() {
            if let Some(listener) = self.listener(i, l, &mut listener_names, &mut binds) {
                listeners.push(listener);
            }
        }

        let admin = raw.admin.as_ref().and_then(|a| {
            let a = a.get_ref();
            let bind = self.socket_addr(&a.bind, "admin.bind")?;
            let token = a.token.as_ref().map(|t| t.get_ref().clone());
            if let Some(t) = &a.token
                && t.get_ref().is_empty()
            {
                self.error(Some(t.span()), "admin.token", "must not be empty (leave it out instead)");
            }
            if !bind.ip().is_loopback() && token.is_none() {
                self.error(
                    Some(a.bind.span()),
                    "admin.bind",
                    "a non-loopback admin bind needs admin.token: the admin API can change the pools",
                );
            }
            if !binds.insert(bind) {
                self.error(Some(a.bind.span()), "admin.bind", format!("{bind} is already used by a listener"));
            }
            Some(AdminConfig { bind, token })
        });

        let mut pools = BTreeMap::new();
        if raw.pools.is_empty() {
            self.error(None, "pools", "at least one [pools.NAME] is required");
        }
        for (name, pool) in &raw.pools {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                self.error(
                    Some(pool.span()),
                    format!("pools.{name}"),
                    "a pool name may use only letters, digits, `-`, `_` and `.` (it appears in URLs and metrics)",
                );
            }
            let pool_config = self.pool(name, pool.get_ref());
            pools.insert(name.clone(), pool_config);
        }

        let registry = raw
            .registry
            .as_ref()
            .and_then(|r| self.registry(r.get_ref(), &raw.pools, &mut binds));

        let mut routes = Vec::new();
        for (i, route) in raw.routes.iter().enumerate() {
            let route = route.get_ref();
            let key = |field: &str| format!("routes[{i}].{field}");
            if !pools.contains_key(route.pool.get_ref()) {
                self.error(
                    Some(route.pool.span()),
                    key("pool"),
                    format!("no pool named `{}`", route.pool.get_ref()),
                );
            }
            if let Some(prefix) = &route.path_prefix
                && !prefix.get_ref().starts_with('/')
            {
                self.error(
                    Some(prefix.span()),
                    key("path_prefix"),
                    "must start with `/`",
                );
            }
            let host = route.host.as_ref().map(|h| {
                let host = h.get_ref().trim().to_ascii_lowercase();
                if host.is_empty() || host.contains('/') {
                    self.error(
                        Some(h.span()),
                        key("host"),
                        format!("`{}` is not a host name", h.get_ref()),
                    );
                }
                strip_port(&host).to_owned()
            });
            routes.push(RouteConfig {
                host,
                path_prefix: route.path_prefix.as_ref().map(|p| p.get_ref().clone()),
                pool: route.pool.get_ref().clone(),
            });
        }
        if routes.is_empty() && pools.len() > 1 {
            self.error(
                Some(0..0),
                "routes",
                "several pools need [[routes]] saying which traffic goes where",
            );
        }

        Config {
            shutdown_grace,
            listeners,
            admin,
            registry,
            pools,
            routes,
            warnings: Vec::new(),
        }
    }

    fn listener(
        &mut self,
        index: usize,
        spanned: &Spanned<RawListener>,
        names: &mut HashSet<String>,
        binds: &mut HashSet<SocketAddr>,
    ) -> Option<ListenerConfig> {
        let l = spanned.get_ref();
        let key = |field: &str| format!("listeners[{index}].{field}");
        let bind = self.socket_addr(&l.bind, &key("bind"));
        let name = l
            .name
            .as_ref()
            .map_or_else(|| l.bind.get_ref().clone(), |n| n.get_ref().clone());
        if !names.insert(name.clone()) {
            let span = l.name.as_ref().map_or(l.bind.span(), |n| n.span());
            self.error(
                Some(span),
                key("name"),
                format!("duplicate listener name `{name}`"),
            );
        }
        if let Some(bind) = bind
            && bind.port() != 0
            && !binds.insert(bind)
        {
            self.error(
                Some(l.bind.span()),
                key("bind"),
                format!("{bind} is bound by another listener"),
            );
        }
        let handshake_timeout = self.duration(
            &l.tls_handshake_timeout,
            &key("tls_handshake_timeout"),
            Duration::from_secs(10),
        );
        let tls = match (&l.tls, &l.tls_handshake_timeout) {
            (Some(tls), _) => self.tls(index, tls.get_ref(), handshake_timeout),
            (None, Some(timeout)) => {
                self.warn(
                    Some(timeout.span()),
                    key("tls_handshake_timeout"),
                    "has no effect on a listener without [listeners.tls]",
                );
                None
            }
            (None, None) => None,
        };
        let header_read_timeout = self.duration(
            &l.header_read_timeout,
            &key("header_read_timeout"),
            Duration::from_secs(10),
        );
        let idle_timeout = self.duration(
            &l.idle_timeout,
            &key("idle_timeout"),
            Duration::from_secs(60),
        );
        let max_header_bytes = match &l.max_header_bytes {
            None => 65536,
            // Below this a browser's ordinary cookies would be refused.
            Some(v) if !(1024..=1 << 20).contains(v.get_ref()) => {
                self.error(
                    Some(v.span()),
                    key("max_header_bytes"),
                    "must be between 1024 and 1048576",
                );
                65536
            }
            Some(v) => *v.get_ref() as usize,
        };
        let max_connections = match &l.max_connections {
            None => 100_000,
            Some(v) if !(1..=MAX_LISTENER_CONNECTIONS).contains(v.get_ref()) => {
                self.error(
                    Some(v.span()),
                    key("max_connections"),
                    format!("must be between 1 and {MAX_LISTENER_CONNECTIONS}"),
                );
                100_000
            }
            Some(v) => *v.get_ref() as usize,
        };
        let trusted_proxies = l
            .trusted_proxies
            .iter()
            .filter_map(|cidr| self.network(cidr, &key("trusted_proxies")))
            .collect();
        let max_body_bytes = l.max_body_bytes.as_ref().map(|v| *v.get_ref());
        Some(ListenerConfig {
            name,
            bind: bind?,
            header_read_timeout,
            idle_timeout,
            max_header_bytes,
            max_connections,
            trusted_proxies,
            max_body_bytes,
            forwarded: l.forwarded,
            tls,
        })
    }

    fn pool(&mut self, name: &str, raw: &RawPool) -> PoolConfig {
        let key = |field: &str| format!("pools.{name}.{field}");
        let strategy = match &raw.strategy {
            None => Strategy::RoundRobin,
            Some(s) => match s.get_ref().as_str() {
                "round_robin" => Strategy::RoundRobin,
                "least_connections" => Strategy::LeastConnections,
                "sticky_cookie" => Strategy::StickyCookie,
                "ip_hash" => Strategy::IpHash,
                other => {
                    self.error(
                        Some(s.span()),
                        key("strategy"),
                        format!("unknown strategy `{other}`; expected round_robin, least_connections, sticky_cookie or ip_hash"),
                    );
                    Strategy::RoundRobin
                }
            },
        };
        let backend_protocol = match raw.backend_protocol.as_ref() {
            None => BackendProtocol::Http1,
            Some(p) => match p.get_ref().as_str() {
                "http1" => BackendProtocol::Http1,
                "h2c" => BackendProtocol::H2c,
                other => {
                    self.error(
                        Some(p.span()),
                        key("backend_protocol"),
                        format!("unknown backend protocol `{other}`; expected http1 or h2c"),
                    );
                    BackendProtocol::Http1
                }
            },
        };
        let slow_start = raw
            .slow_start
            .as_ref()
            .map(|_| self.duration(&raw.slow_start, &key("slow_start"), Duration::ZERO));
        let connect_timeout = self.duration(
            &raw.connect_timeout,
            &key("connect_timeout"),
            Duration::from_secs(2),
        );
        let response_timeout = self.duration(
            &raw.response_timeout,
            &key("response_timeout"),
            Duration::from_secs(30),
        );
        let idle_pool_timeout = self.duration(
            &raw.idle_pool_timeout,
            &key("idle_pool_timeout"),
            Duration::from_secs(90),
        );
        let retries = match &raw.retries {
            None => 2,
            Some(r) if *r.get_ref() as usize >= MAX_ATTEMPTS => {
                self.error(
                    Some(r.span()),
                    key("retries"),
                    format!("must be at most {}", MAX_ATTEMPTS - 1),
                );
                2
            }
            Some(r) => *r.get_ref(),
        };
        let max_connections_per_backend = self.connection_cap(
            &raw.max_connections_per_backend,
            &key("max_connections_per_backend"),
        );
        let queue_timeout = self.queue_timeout(&raw.queue_timeout, &key("queue_timeout"));

        let mut backends = Vec::new();
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for (i, b) in raw.backends.iter().enumerate() {
            let b = b.get_ref();
            let bkey = |field: &str| format!("pools.{name}.backends[{i}].{field}");
            let address = self.socket_addr(&b.address, &bkey("address"));
            let weight = match &b.weight {
                None => 1,
                Some(w) if (1..=i64::from(MAX_WEIGHT)).contains(w.get_ref()) => *w.get_ref() as u32,
                Some(w) => {
                    self.error(
                        Some(w.span()),
                        bkey("weight"),
                        format!("must be between 1 and {MAX_WEIGHT} (got {})", w.get_ref()),
                    );
                    1
                }
            };
            let max_connections = self.connection_cap(&b.max_connections, &bkey("max_connections"));
            let node_name = b
                .name
                .as_ref()
                .map_or_else(|| b.address.get_ref().clone(), |n| n.get_ref().clone());
            if node_name.is_empty() {
                let span = b.name.as_ref().map(|n| n.span());
                self.error(span, bkey("name"), "must not be empty");
            }
            if !names.insert(node_name.clone()) && (b.name.is_some() || address.is_none()) {
                let span = b.name.as_ref().map_or(b.address.span(), |n| n.span());
                self.error(
                    Some(span),
                    bkey("name"),
                    format!("duplicate backend `{node_name}` in pool `{name}`"),
                );
            }
            if let Some(address) = address {
                if !addresses.insert(address) {
                    self.error(
                        Some(b.address.span()),
                        bkey("address"),
                        format!("duplicate backend address {address} in pool `{name}`"),
                    );
                }
                backends.push(BackendConfig {
                    name: node_name,
                    address,
                    weight,
                    max_connections,
                });
            }
        }

        let health = self.health(name, raw.health.as_ref());
        let sticky = self.sticky(name, raw.sticky.as_ref());
        if strategy == Strategy::StickyCookie
            && sticky.secret.is_none()
            && let Some(s) = &raw.strategy
        {
            self.warn(
                Some(s.span()),
                key("strategy"),
                format!("sticky cookies without pools.{name}.sticky.secret are an unkeyed hash anyone can forge to pick a node; set the same secret on every balancer"),
            );
        }
        PoolConfig {
            strategy,
            backend_protocol,
            slow_start,
            connect_timeout,
            response_timeout,
            retries,
            idle_pool_timeout,
            max_connections_per_backend,
            queue_timeout,
            backends,
            health,
            sticky,
        }
    }

    fn sticky(&mut self, pool: &str, raw: Option<&Spanned<RawSticky>>) -> StickyConfig {
        let key = |field: &str| format!("pools.{pool}.sticky.{field}");
        let mut sticky = StickyConfig::default();
        let Some(raw) = raw.map(Spanned::get_ref) else {
            return sticky;
        };
        if let Some(cookie) = &raw.cookie {
            // RFC 6265 cookie-name is an RFC 9110 token.
            if cookie.get_ref().is_empty() || !cookie.get_ref().bytes().all(is_token_byte) {
                self.error(
                    Some(cookie.span()),
                    key("cookie"),
                    "must be a cookie name: letters, digits and !#$%&'*+-.^_`|~",
                );
            }
            sticky.cookie = cookie.get_ref().clone();
        }
        if let Some(fallback) = &raw.fallback {
            sticky.fallback = match fallback.get_ref().as_str() {
                "round_robin" => Strategy::RoundRobin,
                "least_connections" => Strategy::LeastConnections,
                other => {
                    self.error(
                        Some(fallback.span()),
                        key("fallback"),
                        format!("`{other}` cannot place new users; expected round_robin or least_connections"),
                    );
                    sticky.fallback
                }
            };
        }
        if let Some(secret) = &raw.secret {
            if secret.get_ref().is_empty() {
                self.error(
                    Some(secret.span()),
                    key("secret"),
                    "must not be empty (leave it out for unkeyed, forgeable cookies)",
                );
            }
            sticky.secret = Some(secret.get_ref().clone());
        }
        sticky.max_age = raw.max_age.as_ref().map(|_| {
            self.duration_up_to(
                &raw.max_age,
                &key("max_age"),
                Duration::from_secs(3600),
                MAX_COOKIE_AGE,
            )
        });
        for (field, value) in [("path", &raw.path), ("domain", &raw.domain)] {
            if let Some(value) = value
                && !value.get_ref().bytes().all(is_attribute_byte)
            {
                self.error(
                    Some(value.span()),
                    key(field),
                    "must not contain `;`, spaces or control characters",
                );
            }
        }
        if let Some(path) = &raw.path {
            sticky.path = path.get_ref().clone();
        }
        sticky.domain = raw.domain.as_ref().map(|d| d.get_ref().clone());
        sticky.http_only = raw.http_only.unwrap_or(true);
        sticky.secure = raw.secure;
        if let Some(same_site) = &raw.same_site {
            sticky.same_site = match same_site.get_ref().to_ascii_lowercase().as_str() {
                "lax" => SameSite::Lax,
                "strict" => SameSite::Strict,
                "none" => SameSite::None,
                _ => {
                    self.error(
                        Some(same_site.span()),
                        key("same_site"),
                        "expected Lax, Strict or None",
                    );
                    SameSite::Lax
                }
            };
            // Browsers drop a SameSite=None cookie that is not also Secure.
            if sticky.same_site == SameSite::None && sticky.secure == Some(false) {
                self.error(
                    Some(same_site.span()),
                    key("same_site"),
                    "SameSite=None needs secure (browsers reject it otherwise)",
                );
            }
        }
        sticky
    }

    fn health(&mut self, pool: &str, raw: Option<&Spanned<RawHealth>>) -> HealthConfig {
        let key = |field: &str| format!("pools.{pool}.health.{field}");
        let mut health = HealthConfig {
            path: "/healthz".to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            fall: 3,
            rise: 3,
        };
        let Some(raw) = raw.map(Spanned::get_ref) else {
            return health;
        };
        if let Some(path) = &raw.path {
            if !path.get_ref().starts_with('/') {
                self.error(Some(path.span()), key("path"), "must start with `/`");
            }
            health.path = path.get_ref().clone();
        }
        health.interval = self.duration_up_to(
            &raw.interval,
            &key("interval"),
            health.interval,
            MAX_HEALTH_DURATION,
        );
        // A short interval brings the default timeout down with it. A timeout set longer than
        // the interval is fine: checks of one node never overlap (src/health.rs).
        health.timeout = self.duration_up_to(
            &raw.timeout,
            &key("timeout"),
            health.timeout.min(health.interval),
            MAX_HEALTH_DURATION,
        );
        for (value, field, slot) in [
            (&raw.fall, "fall", &mut health.fall),
            (&raw.rise, "rise", &mut health.rise),
        ] {
            if let Some(v) = value {
                if *v.get_ref() == 0 {
                    self.error(Some(v.span()), key(field), "must be at least 1");
                } else {
                    *slot = *v.get_ref();
                }
            }
        }
        health
    }
}

/// `listeners[0].bind` from serde's path, leaving out the steps `toml::Spanned` adds.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut key = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                if name.starts_with("$__serde_spanned") {
                    continue;
                }
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
            }
            Segment::Unknown => {}
        }
    }
    key
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What may appear in a Set-Cookie attribute value (RFC 6265 §4.1.1 `av-octet`, minus space).
fn is_attribute_byte(b: u8) -> bool {
    b.is_ascii_graphic() && b != b';'
}

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}
