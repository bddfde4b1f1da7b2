//! The raw serde mirror of the file and the validation that turns it into a [`Config`]: every
//! rule, and the span of every mistake.
//!
//! This file holds the top level (listeners, admin, pools, routes) and the value rules every
//! section shares (durations, addresses, networks, bounded numbers, keywords, tokens);
//! `listener.rs`, `pool.rs`, `registry.rs` and `tls.rs` hold their sections.

mod listener;
mod pool;
mod registry;
mod tls;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
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
/// A TLS handshake's bound, a listener's and the registry's, unless a listener sets its own.
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

// ---- raw serde mirror of the top level -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    shutdown_grace: Option<Spanned<String>>,
    #[serde(default)]
    listeners: Vec<Spanned<listener::RawListener>>,
    admin: Option<Spanned<RawAdmin>>,
    registry: Option<Spanned<registry::RawRegistry>>,
    #[serde(default)]
    pools: BTreeMap<String, Spanned<pool::RawPool>>,
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    bind: Spanned<String>,
    token: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    host: Option<Spanned<String>>,
    path_prefix: Option<Spanned<String>>,
    pool: Spanned<String>,
}

// ---- diagnostics -----------------------------------------------------------------------------

struct Validator<'a> {
    file: &'a Path,
    text: &'a str,
    diagnostics: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn located(&self, span: Option<Range<usize>>, key: String, message: String) -> Diagnostic {
        let (line, column) = span.map_or((0, 0), |s| line_col(self.text, s.start));
        Diagnostic {
            file: self.file.to_owned(),
            line,
            column,
            key,
            message,
        }
    }

    fn error(
        &mut self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let diagnostic = self.located(span, key.into(), message.into());
        self.diagnostics.push(diagnostic);
    }

    /// A problem worth telling the operator that does not make the file invalid.
    fn warn(
        &mut self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let diagnostic = self.located(span, key.into(), message.into());
        self.warnings.push(diagnostic);
    }

    fn finish(&mut self) -> ConfigError {
        self.diagnostics.sort_by_key(|d| (d.line, d.column));
        ConfigError {
            diagnostics: std::mem::take(&mut self.diagnostics),
        }
    }

    /// `result` of a rule applied to the value at `span`: its error is reported there.
    fn checked<T, E: Display>(
        &mut self,
        span: Option<Range<usize>>,
        key: &str,
        result: Result<T, E>,
    ) -> Option<T> {
        result
            .map_err(|e| self.error(span, key, e.to_string()))
            .ok()
    }

    /// `rule` applied to an optional value (absent is the rule's to default); its error is
    /// reported at the value.
    fn optional<T: Copy, U, E: Display>(
        &mut self,
        value: &Option<Spanned<T>>,
        key: &str,
        rule: impl FnOnce(Option<T>) -> Result<U, E>,
    ) -> Option<U> {
        let span = value.as_ref().map(Spanned::span);
        self.checked(span, key, rule(value.as_ref().map(|v| *v.get_ref())))
    }
}

// ---- the value rules every section shares ----------------------------------------------------

impl Validator<'_> {
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
        let Some(d) = self.parse_duration(value, key) else {
            return default;
        };
        if d.is_zero() {
            self.error(Some(value.span()), key, "must be greater than zero");
            return default;
        }
        if d < MIN_DURATION || d > max {
            let message = format!(
                "must be between {} and {} (got `{}`)",
                short_duration(MIN_DURATION),
                short_duration(max),
                value.get_ref().trim()
            );
            self.error(Some(value.span()), key, message);
            return default;
        }
        d
    }

    /// A duration in `[MIN_DURATION, max]` that may be left out.
    fn optional_duration(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        max: Duration,
    ) -> Option<Duration> {
        value
            .as_ref()
            .map(|_| self.duration_up_to(value, key, Duration::ZERO, max))
    }

    /// Any duration humantime reads (`250ms`, `5s`, `1h 30m`), bounds aside.
    fn parse_duration(&mut self, value: &Spanned<String>, key: &str) -> Option<Duration> {
        let parsed = humantime::parse_duration(value.get_ref().trim()).map_err(|e| {
            format!(
                "`{}` is not a duration ({e}); write e.g. \"250ms\" or \"5s\"",
                value.get_ref()
            )
        });
        self.checked(Some(value.span()), key, parsed)
    }

    /// An `IP:port` to bind (any port, 0 too: the system picks one).
    fn socket_addr(&mut self, value: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        self.checked(Some(value.span()), key, parse_socket_addr(value.get_ref()))
    }

    /// Records a socket fulcrum binds: a second listener, the admin API or the registry on it
    /// is an error (`taken` says by whom). Port 0 is a new free port each time: no clash.
    fn claim_bind(
        &mut self,
        binds: &mut HashSet<SocketAddr>,
        bind: SocketAddr,
        value: &Spanned<String>,
        key: &str,
        taken: &str,
    ) {
        if bind.port() != 0 && !binds.insert(bind) {
            self.error(Some(value.span()), key, format!("{bind} {taken}"));
        }
    }

    /// A CIDR, or a bare IP address as the network of that one address.
    fn network(&mut self, value: &Spanned<String>, key: &str) -> Option<IpNet> {
        let text = value.get_ref().trim();
        let parsed = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("`{text}` is not a CIDR or IP address"));
        self.checked(Some(value.span()), key, parsed)
    }

    /// A count in `range`; outside it (or past the type) is an error naming the range.
    fn bounded<T, U>(
        &mut self,
        value: &Option<Spanned<T>>,
        key: &str,
        range: RangeInclusive<U>,
        default: U,
    ) -> U
    where
        T: Copy + TryInto<U>,
        U: Copy + PartialOrd + Display,
    {
        let in_range = |n: Option<T>| match n.map(TryInto::try_into) {
            None => Ok(default),
            Some(Ok(n)) if range.contains(&n) => Ok(n),
            Some(_) => Err(format!(
                "must be between {} and {}",
                range.start(),
                range.end()
            )),
        };
        self.optional(value, key, in_range).unwrap_or(default)
    }

    /// The keyword `value` spells, looked up by `find`; an unknown one is an error whose
    /// message `unknown` writes from it.
    fn keyword<T>(
        &mut self,
        value: &Option<Spanned<String>>,
        key: &str,
        find: impl FnOnce(&str) -> Option<T>,
        unknown: impl FnOnce(&str) -> String,
    ) -> Option<T> {
        let value = value.as_ref()?;
        let found = find(value.get_ref());
        if found.is_none() {
            self.error(Some(value.span()), key, unknown(value.get_ref()));
        }
        found
    }

    /// A file the config names. Blank is a mistake, not "no file"; spaces around the name are
    /// not part of it.
    fn file_path(&mut self, value: &Spanned<String>, key: String) -> Option<PathBuf> {
        let text = value.get_ref().trim();
        if text.is_empty() {
            self.error(Some(value.span()), key, "needs a file name");
            return None;
        }
        Some(PathBuf::from(text))
    }

    /// A reference to a pool (a route's, the registry's): it must exist.
    fn pool_named(
        &mut self,
        value: &Spanned<String>,
        key: &str,
        pools: &BTreeMap<String, PoolConfig>,
    ) {
        if !pools.contains_key(value.get_ref()) {
            let message = format!("no pool named `{}`", value.get_ref());
            self.error(Some(value.span()), key, message);
        }
    }

    /// A credential: empty is a mistake (a caller sending an empty one would pass).
    fn token(&mut self, value: &Spanned<String>, key: &str) -> String {
        if value.get_ref().is_empty() {
            self.error(
                Some(value.span()),
                key,
                "must not be empty (leave it out instead)",
            );
        }
        value.get_ref().clone()
    }
}

// ---- the top level ---------------------------------------------------------------------------

impl Validator<'_> {
    fn validate(&mut self, raw: RawConfig) -> Config {
        let shutdown_grace = self.duration(
            &raw.shutdown_grace,
            "shutdown_grace",
            Duration::from_secs(30),
        );
        // Every socket fulcrum binds, so that no two of them claim one.
        let mut binds = HashSet::new();
        let listeners = self.listeners(&raw.listeners, &mut binds);
        let admin = raw
            .admin
            .as_ref()
            .and_then(|a| self.admin(a.get_ref(), &mut binds));
        let pools = self.pools(&raw.pools);
        let registry = raw
            .registry
            .as_ref()
            .and_then(|r| self.registry(r.get_ref(), &pools, &mut binds));
        let routes = self.routes(&raw.routes, &pools);
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

    fn admin(&mut self, raw: &RawAdmin, binds: &mut HashSet<SocketAddr>) -> Option<AdminConfig> {
        let bind = self.socket_addr(&raw.bind, "admin.bind")?;
        let token = raw.token.as_ref().map(|t| self.token(t, "admin.token"));
        if !bind.ip().is_loopback() && token.is_none() {
            self.error(
                Some(raw.bind.span()),
                "admin.bind",
                "a non-loopback admin bind needs admin.token: the admin API can change the pools",
            );
        }
        self.claim_bind(
            binds,
            bind,
            &raw.bind,
            "admin.bind",
            "is already used by a listener",
        );
        Some(AdminConfig { bind, token })
    }

    fn pools(
        &mut self,
        raw: &BTreeMap<String, Spanned<pool::RawPool>>,
    ) -> BTreeMap<String, PoolConfig> {
        if raw.is_empty() {
            self.error(None, "pools", "at least one [pools.NAME] is required");
        }
        let mut pools = BTreeMap::new();
        for (name, pool) in raw {
            if !is_pool_name(name) {
                self.error(
                    Some(pool.span()),
                    format!("pools.{name}"),
                    "a pool name may use only letters, digits, `-`, `_` and `.` (it appears in URLs and metrics)",
                );
            }
            pools.insert(name.clone(), self.pool(name, pool.get_ref()));
        }
        pools
    }

    fn routes(
        &mut self,
        raw: &[Spanned<RawRoute>],
        pools: &BTreeMap<String, PoolConfig>,
    ) -> Vec<RouteConfig> {
        let routes: Vec<RouteConfig> = raw
            .iter()
            .enumerate()
            .map(|(i, route)| self.route(i, route.get_ref(), pools))
            .collect();
        if routes.is_empty() && pools.len() > 1 {
            self.error(
                Some(0..0),
                "routes",
                "several pools need [[routes]] saying which traffic goes where",
            );
        }
        routes
    }

    fn route(
        &mut self,
        index: usize,
        route: &RawRoute,
        pools: &BTreeMap<String, PoolConfig>,
    ) -> RouteConfig {
        let key = |field: &str| format!("routes[{index}].{field}");
        self.pool_named(&route.pool, &key("pool"), pools);
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
        RouteConfig {
            host,
            path_prefix: route.path_prefix.as_ref().map(|p| p.get_ref().clone()),
            pool: route.pool.get_ref().clone(),
        }
    }
}

/// A pool name appears in URLs (`/api/pools/NAME`) and metric labels.
fn is_pool_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
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

/// 1-based line and column (in characters) of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}
