//! `[[listeners]]`: each listener's name and bind (unique among fulcrum's sockets), its
//! connection limits, its trusted proxies (and whether they must send a PROXY protocol header),
//! its TLS, its access log and request ids.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{DEFAULT_HANDSHAKE_TIMEOUT, Validator, tls};
use crate::base::config::{
    AccessLogConfig, AccessLogFormat, AccessLogPath, ListenerConfig, TlsConfig,
};

/// Connections one listener may hold. The ceiling keeps the value within what a semaphore
/// and a listen backlog accept, and 10 M is the whole web tier of the design this serves.
const MAX_LISTENER_CONNECTIONS: usize = 10_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
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
    proxy_protocol: Option<Spanned<bool>>,
    tls: Option<Spanned<tls::RawTls>>,
    tls_handshake_timeout: Option<Spanned<String>>,
    access_log: Option<Spanned<RawAccessLog>>,
    request_id: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccessLog {
    path: Spanned<String>,
    format: Option<Spanned<String>>,
    #[serde(default)]
    include_query: bool,
}

/// A listener's bounds on each connection and on how many it holds.
struct Limits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: usize,
    max_connections: usize,
}

impl Validator<'_> {
    pub(super) fn listeners(
        &mut self,
        raw: &[Spanned<RawListener>],
        binds: &mut HashSet<SocketAddr>,
    ) -> Vec<ListenerConfig> {
        if raw.is_empty() {
            self.error(
                Some(0..0),
                "listeners",
                "at least one [[listeners]] is required",
            );
        }
        let mut names = HashSet::new();
        raw.iter()
            .enumerate()
            .filter_map(|(i, l)| self.listener(i, l.get_ref(), &mut names, binds))
            .collect()
    }

    fn listener(
        &mut self,
        index: usize,
        raw: &RawListener,
        names: &mut HashSet<String>,
        binds: &mut HashSet<SocketAddr>,
    ) -> Option<ListenerConfig> {
        let key = |field: &str| format!("listeners[{index}].{field}");
        let bind = self.socket_addr(&raw.bind, &key("bind"));
        let name = raw
            .name
            .as_ref()
            .map_or_else(|| raw.bind.get_ref().clone(), |n| n.get_ref().clone());
        if !names.insert(name.clone()) {
            let span = raw.name.as_ref().map_or(raw.bind.span(), |n| n.span());
            self.error(
                Some(span),
                key("name"),
                format!("duplicate listener name `{name}`"),
            );
        }
        if let Some(bind) = bind {
            let taken = "is bound by another listener";
            self.claim_bind(binds, bind, &raw.bind, &key("bind"), taken);
        }
        let tls = self.listener_tls(index, raw);
        let limits = self.listener_limits(index, raw);
        let trusted_proxies = raw
            .trusted_proxies
            .iter()
            .filter_map(|cidr| self.network(cidr, &key("trusted_proxies")))
            .collect();
        let proxy_protocol = self.proxy_protocol(index, raw);
        Some(ListenerConfig {
            name,
            bind: bind?,
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            max_header_bytes: limits.max_header_bytes,
            max_connections: limits.max_connections,
            trusted_proxies,
            max_body_bytes: raw.max_body_bytes.as_ref().map(|v| *v.get_ref()),
            forwarded: raw.forwarded,
            proxy_protocol,
            tls,
            access_log: raw
                .access_log
                .as_ref()
                .and_then(|log| self.access_log(index, log.get_ref())),
            request_id: raw.request_id.unwrap_or(true),
        })
    }

    /// `access_log = { path, format, include_query }`. A file's directory must exist: `check`
    /// says so rather than the first start.
    fn access_log(&mut self, index: usize, raw: &RawAccessLog) -> Option<AccessLogConfig> {
        let key = |field: &str| format!("listeners[{index}].access_log.{field}");
        let path = match raw.path.get_ref().trim() {
            "-" => Some(AccessLogPath::Stdout),
            _ => self
                .file_path(&raw.path, key("path"))
                .and_then(|file| self.log_directory(&raw.path, &key("path"), file)),
        };
        let format = match &raw.format {
            None => Some(AccessLogFormat::Json),
            format => self.keyword(format, &key("format"), AccessLogFormat::from_name, |f| {
                format!(
                    "unknown access log format `{f}`; expected {}",
                    AccessLogFormat::expected()
                )
            }),
        };
        Some(AccessLogConfig {
            path: path?,
            format: format?,
            include_query: raw.include_query,
        })
    }

    fn log_directory(
        &mut self,
        value: &Spanned<String>,
        key: &str,
        file: PathBuf,
    ) -> Option<AccessLogPath> {
        let dir = match file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if file.is_dir() {
            self.error(Some(value.span()), key, "is a directory, not a file");
            return None;
        }
        if !dir.is_dir() {
            let message = format!("directory `{}` does not exist", dir.display());
            self.error(Some(value.span()), key, message);
            return None;
        }
        Some(AccessLogPath::File(file))
    }

    /// `[listeners.tls]` with its handshake bound; a bound without TLS is only a warning.
    fn listener_tls(&mut self, index: usize, raw: &RawListener) -> Option<TlsConfig> {
        let key = format!("listeners[{index}].tls_handshake_timeout");
        let handshake_timeout =
            self.duration(&raw.tls_handshake_timeout, &key, DEFAULT_HANDSHAKE_TIMEOUT);
        match (&raw.tls, &raw.tls_handshake_timeout) {
            (Some(tls), _) => self.tls(index, tls.get_ref(), handshake_timeout),
            (None, Some(timeout)) => {
                self.warn(
                    Some(timeout.span()),
                    key,
                    "has no effect on a listener without [listeners.tls]",
                );
                None
            }
            (None, None) => None,
        }
    }

    /// `proxy_protocol = true` needs someone to trust: with no `trusted_proxies`, every
    /// connection would be refused.
    fn proxy_protocol(&mut self, index: usize, raw: &RawListener) -> bool {
        let Some(on) = raw.proxy_protocol.as_ref().filter(|on| *on.get_ref()) else {
            return false;
        };
        if raw.trusted_proxies.is_empty() {
            self.error(
                Some(on.span()),
                format!("listeners[{index}].proxy_protocol"),
                "needs `trusted_proxies` (the L4 proxies that send the header): \
                 with none, every connection would be refused",
            );
        }
        true
    }

    fn listener_limits(&mut self, index: usize, raw: &RawListener) -> Limits {
        let key = |field: &str| format!("listeners[{index}].{field}");
        Limits {
            header_read_timeout: self.duration(
                &raw.header_read_timeout,
                &key("header_read_timeout"),
                Duration::from_secs(10),
            ),
            idle_timeout: self.duration(
                &raw.idle_timeout,
                &key("idle_timeout"),
                Duration::from_secs(60),
            ),
            // Below 1 KiB a browser's ordinary cookies would be refused.
            max_header_bytes: self.bounded(
                &raw.max_header_bytes,
                &key("max_header_bytes"),
                1024..=1 << 20,
                65536,
            ),
            max_connections: self.bounded(
                &raw.max_connections,
                &key("max_connections"),
                1..=MAX_LISTENER_CONNECTIONS,
                100_000,
            ),
        }
    }
}
