//! `[registry]` and `[registry.tls]`: where the registry listens, who may call it (a token, a
//! client certificate, or loopback only), which addresses it accepts and how many nodes.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{RawPool, Validator};
use crate::config::{
    DEFAULT_REGISTRY_MAX_NODES, MAX_REGISTRY_MAX_NODES, RegistryConfig, RegistryTls, Secret,
    TlsConfig, default_allowed_networks,
};
use crate::tls;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegistry {
    bind: Spanned<String>,
    pool: Spanned<String>,
    heartbeat_interval: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    allowed_networks: Option<Spanned<Vec<Spanned<String>>>>,
    max_nodes: Option<Spanned<i64>>,
    tls: Option<Spanned<RawRegistryTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistryTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    client_ca: Option<Spanned<String>>,
}

/// A registry TLS handshake gets as long as a listener's default.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Validator<'_> {
    pub(super) fn registry(
        &mut self,
        raw: &RawRegistry,
        pools: &BTreeMap<String, Spanned<RawPool>>,
        binds: &mut HashSet<SocketAddr>,
    ) -> Option<RegistryConfig> {
        let bind = self.socket_addr(&raw.bind, "registry.bind");
        if let Some(bind) = bind
            && bind.port() != 0
            && !binds.insert(bind)
        {
            self.error(
                Some(raw.bind.span()),
                "registry.bind",
                format!("{bind} is already used by a listener or the admin API"),
            );
        }
        if !pools.contains_key(raw.pool.get_ref()) {
            self.error(
                Some(raw.pool.span()),
                "registry.pool",
                format!("no pool named `{}`", raw.pool.get_ref()),
            );
        }
        let heartbeat_interval = self.duration(
            &raw.heartbeat_interval,
            "registry.heartbeat_interval",
            Duration::from_secs(5),
        );
        let token = raw.token.as_ref().map(|t| {
            let text = t.get_ref();
            if text.is_empty() {
                self.error(
                    Some(t.span()),
                    "registry.token",
                    "must not be empty (leave it out instead)",
                );
            } else if !text.bytes().all(|b| b.is_ascii_graphic()) {
                // It travels as an HTTP/2 header value, where anything else is refused or
                // mangled on the way.
                self.error(
                    Some(t.span()),
                    "registry.token",
                    "must be printable ASCII without spaces",
                );
            }
            Secret::new(text.clone())
        });
        let allowed_networks = match &raw.allowed_networks {
            None => default_allowed_networks(),
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.error(
                        Some(list.span()),
                        "registry.allowed_networks",
                        "must list at least one network (leave it out for loopback and the private ranges)",
                    );
                }
                list.get_ref()
                    .iter()
                    .filter_map(|n| self.network(n, "registry.allowed_networks"))
                    .collect()
            }
        };
        let max_nodes = match &raw.max_nodes {
            None => DEFAULT_REGISTRY_MAX_NODES,
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(n) if (1..=MAX_REGISTRY_MAX_NODES).contains(&n) => n,
                _ => {
                    self.error(
                        Some(n.span()),
                        "registry.max_nodes",
                        format!("must be between 1 and {MAX_REGISTRY_MAX_NODES}"),
                    );
                    DEFAULT_REGISTRY_MAX_NODES
                }
            },
        };
        let tls = raw
            .tls
            .as_ref()
            .and_then(|t| self.registry_tls(t.get_ref()));
        let config = RegistryConfig {
            bind: bind?,
            pool: raw.pool.get_ref().clone(),
            heartbeat_interval,
            token,
            allowed_networks,
            max_nodes,
            tls,
        };
        if let Some(message) = config.unauthenticated() {
            self.error(Some(raw.bind.span()), "registry.bind", message);
        }
        Some(config)
    }

    fn registry_tls(&mut self, raw: &RawRegistryTls) -> Option<RegistryTls> {
        let client_ca = raw.client_ca.as_ref().and_then(|ca| {
            let path = PathBuf::from(ca.get_ref().trim());
            if path.as_os_str().is_empty() {
                self.error(
                    Some(ca.span()),
                    "registry.tls.client_ca",
                    "needs a file name",
                );
                return None;
            }
            if let Err(e) = tls::client_verifier(&path) {
                self.error(Some(ca.span()), "registry.tls.client_ca", e.to_string());
            }
            Some(path)
        });
        let default = self.cert_pair("registry.tls", &raw.cert, &raw.key, &[])?;
        Some(RegistryTls {
            certs: TlsConfig {
                default,
                sni: Vec::new(),
                handshake_timeout: HANDSHAKE_TIMEOUT,
            },
            client_ca,
        })
    }
}
