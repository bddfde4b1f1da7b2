//! `[registry]` and `[registry.tls]`: where the registry listens, who may call it (a token, a
//! client certificate, or loopback only), which addresses it accepts and how many nodes.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::{DEFAULT_HANDSHAKE_TIMEOUT, Validator};
use crate::base::config::{
    DEFAULT_REGISTRY_MAX_NODES, MAX_REGISTRY_MAX_NODES, PoolConfig, RegistryConfig, RegistryTls,
    Secret, StoreUrl, TlsConfig, default_allowed_networks, redact_url,
};

/// `registry.store_poll_interval` when absent.
const DEFAULT_STORE_POLL_INTERVAL: Duration = Duration::from_secs(1);

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
    store: Option<Spanned<String>>,
    store_poll_interval: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistryTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    client_ca: Option<Spanned<String>>,
}

impl Validator<'_> {
    pub(super) fn registry(
        &mut self,
        raw: &RawRegistry,
        pools: &BTreeMap<String, PoolConfig>,
        binds: &mut HashSet<SocketAddr>,
    ) -> Option<RegistryConfig> {
        let bind = self.socket_addr(&raw.bind, "registry.bind");
        if let Some(bind) = bind {
            let taken = "is already used by a listener or the admin API";
            self.claim_bind(binds, bind, &raw.bind, "registry.bind", taken);
        }
        self.pool_named(&raw.pool, "registry.pool", pools);
        // Fields are checked in the order written, so `bind` comes last: a bad bind does not
        // hide the other fields' mistakes.
        let config = RegistryConfig {
            pool: raw.pool.get_ref().clone(),
            heartbeat_interval: self.duration(
                &raw.heartbeat_interval,
                "registry.heartbeat_interval",
                Duration::from_secs(5),
            ),
            token: raw.token.as_ref().map(|t| self.registry_token(t)),
            allowed_networks: self.allowed_networks(raw.allowed_networks.as_ref()),
            max_nodes: self.bounded(
                &raw.max_nodes,
                "registry.max_nodes",
                1..=MAX_REGISTRY_MAX_NODES,
                DEFAULT_REGISTRY_MAX_NODES,
            ),
            tls: raw
                .tls
                .as_ref()
                .and_then(|t| self.registry_tls(t.get_ref())),
            store: raw.store.as_ref().and_then(|url| self.store_url(url)),
            store_poll_interval: self.duration(
                &raw.store_poll_interval,
                "registry.store_poll_interval",
                DEFAULT_STORE_POLL_INTERVAL,
            ),
            bind: bind?,
        };
        if let Some(message) = config.unauthenticated() {
            self.error(Some(raw.bind.span()), "registry.bind", message);
        }
        Some(config)
    }

    /// `registry.store`: a `postgres://` URL with a user, a host and a database. Every
    /// message shows the URL with its password redacted.
    fn store_url(&mut self, value: &Spanned<String>) -> Option<StoreUrl> {
        let url = value.get_ref().trim();
        let shown = redact_url(url);
        let fail = |this: &mut Self, why: String| {
            this.error(
                Some(value.span()),
                "registry.store",
                format!("expected postgres://USER@HOST:PORT/DB (got `{shown}`): {why}"),
            );
            None
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return fail(
                self,
                "the scheme must be postgres:// or postgresql://".to_owned(),
            );
        }
        let parsed = match url.parse::<tokio_postgres::Config>() {
            Ok(parsed) => parsed,
            Err(e) => return fail(self, e.to_string()),
        };
        if parsed.get_user().is_none_or(str::is_empty) {
            return fail(self, "the URL names no user".to_owned());
        }
        if parsed.get_hosts().is_empty() {
            return fail(self, "the URL names no host".to_owned());
        }
        if parsed.get_dbname().is_none_or(str::is_empty) {
            return fail(self, "the URL names no database".to_owned());
        }
        Some(StoreUrl::new(url))
    }

    fn registry_token(&mut self, value: &Spanned<String>) -> Secret {
        let token = self.token(value, "registry.token");
        // It travels as an HTTP/2 header value, where anything else is refused or mangled on
        // the way.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            self.error(
                Some(value.span()),
                "registry.token",
                "must be printable ASCII without spaces",
            );
        }
        Secret::new(token)
    }

    fn allowed_networks(&mut self, raw: Option<&Spanned<Vec<Spanned<String>>>>) -> Vec<IpNet> {
        let Some(list) = raw else {
            return default_allowed_networks();
        };
        if list.get_ref().is_empty() {
            self.error(
                Some(list.span()),
                "registry.allowed_networks",
                "must list at least one network (leave it out to allow any address)",
            );
        }
        list.get_ref()
            .iter()
            .filter_map(|n| self.network(n, "registry.allowed_networks"))
            .collect()
    }

    fn registry_tls(&mut self, raw: &RawRegistryTls) -> Option<RegistryTls> {
        let client_ca = raw.client_ca.as_ref().and_then(|ca| {
            let path = self.file_path(ca, "registry.tls.client_ca".to_owned())?;
            if let Err(e) = crate::base::certs::client_verifier(&path) {
                self.error(Some(ca.span()), "registry.tls.client_ca", e.to_string());
            }
            Some(path)
        });
        let default = self.cert_pair("registry.tls", &raw.cert, &raw.key, &[])?;
        Some(RegistryTls {
            certs: TlsConfig {
                default,
                sni: Vec::new(),
                handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            },
            client_ca,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use crate::base::config::{
        Config, ConfigError, DEFAULT_REGISTRY_MAX_NODES, Secret, default_allowed_networks,
    };

    fn parse(registry: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[[listeners]]\nbind = \"127.0.0.1:0\"\n[pools.web]\nbackends = []\n[registry]\npool = \"web\"\n{registry}"
        );
        Config::parse(Path::new("test.toml"), &text)
    }

    fn errors(registry: &str) -> String {
        parse(registry).unwrap_err().to_string()
    }

    #[test]
    fn a_loopback_registry_needs_no_auth_and_gets_the_defaults() {
        let config = parse("bind = \"127.0.0.1:9091\"\n").unwrap();
        let registry = config.registry.unwrap();
        assert_eq!(registry.token, None);
        assert_eq!(registry.allowed_networks, default_allowed_networks());
        assert_eq!(registry.max_nodes, DEFAULT_REGISTRY_MAX_NODES);
        assert!(registry.tls.is_none());
        let allowed = |ip: &str| {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            registry.allowed_networks.iter().any(|n| n.contains(&ip))
        };
        // The contract's default is any address; the rules that always hold (own sockets,
        // unspecified, multicast) are the registry's, not the networks'.
        for ip in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "fd00::2",
            "8.8.8.8",
            "2001:db8::1",
        ] {
            assert!(allowed(ip), "{ip}");
        }
    }

    #[test]
    fn a_registry_beyond_loopback_needs_a_token_or_a_client_ca() {
        for bind in ["0.0.0.0:9091", "[::]:9091", "10.0.0.5:9091"] {
            let err = errors(&format!("bind = \"{bind}\"\n"));
            assert!(
                err.contains("test.toml:7:8: registry.bind: a non-loopback registry bind needs registry.token"),
                "{bind}: {err}"
            );
        }
        let config = parse("bind = \"0.0.0.0:9091\"\ntoken = \"t0k3n\"\n").unwrap();
        assert_eq!(config.registry.unwrap().token, Some(Secret::new("t0k3n")));
    }

    #[test]
    fn registry_keys_are_bounded_and_all_mistakes_reported() {
        let err = errors(
            "bind = \"127.0.0.1:9091\"\ntoken = \"two words\"\nallowed_networks = [\"10.0.0.0/8\", \"nope\"]\nmax_nodes = 0\n",
        );
        for expected in [
            "registry.token: must be printable ASCII without spaces",
            "registry.allowed_networks: `nope` is not a CIDR or IP address",
            "registry.max_nodes: must be between 1 and 100000",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        }
        for bad in [
            "max_nodes = 100001",
            "max_nodes = -1",
            "token = \"\"",
            "allowed_networks = []",
        ] {
            assert!(
                parse(&format!("bind = \"127.0.0.1:9091\"\n{bad}\n")).is_err(),
                "{bad} accepted"
            );
        }
        let ok = parse("bind = \"127.0.0.1:9091\"\nallowed_networks = [\"10.0.0.0/8\", \"192.0.2.7\"]\nmax_nodes = 100000\n")
            .unwrap()
            .registry
            .unwrap();
        assert_eq!(ok.allowed_networks.len(), 2);
        assert_eq!(ok.max_nodes, 100_000);
        let err = errors(
            "bind = \"127.0.0.1:9091\"\n[registry.tls]\ncert = \"/nonexistent.crt\"\nkey = \"/nonexistent.key\"\nclient_ca = \"/nonexistent-ca.crt\"\nsni = []\n",
        );
        assert!(err.contains("registry.tls.sni"), "{err}");
        let err = errors(
            "bind = \"127.0.0.1:9091\"\n[registry.tls]\ncert = \"/nonexistent.crt\"\nkey = \"/nonexistent.key\"\nclient_ca = \"/nonexistent-ca.crt\"\n",
        );
        for expected in [
            "registry.tls.cert: cannot read certificate file `/nonexistent.crt`",
            "registry.tls.client_ca: cannot read certificate file `/nonexistent-ca.crt`",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        }
    }

    #[test]
    fn a_store_url_is_checked_and_its_password_never_shows() {
        let config = parse(
            "bind = \"127.0.0.1:9091\"\nstore = \"postgres://fulcrum:s3cr3t-pw@127.0.0.1:5432/registry\"\nstore_poll_interval = \"250ms\"\n",
        )
        .unwrap();
        let registry = config.registry.unwrap();
        let store = registry.store.as_ref().unwrap();
        assert_eq!(
            store.redacted(),
            "postgres://fulcrum:***@127.0.0.1:5432/registry"
        );
        assert_eq!(registry.store_poll_interval, Duration::from_millis(250));
        assert!(!format!("{registry:?}").contains("s3cr3t"));
        let defaults = parse("bind = \"127.0.0.1:9091\"\n")
            .unwrap()
            .registry
            .unwrap();
        assert_eq!(defaults.store, None);
        assert_eq!(defaults.store_poll_interval, Duration::from_secs(1));

        let err = errors(
            "bind = \"127.0.0.1:9091\"\nstore = \"mysql://u:hunter2@h:1/db\"\nstore_poll_interval = \"0s\"\n",
        );
        assert!(
            err.contains("test.toml:8:9: registry.store: expected postgres://USER@HOST:PORT/DB (got `mysql://u:***@h:1/db`)"),
            "{err}"
        );
        assert!(err.contains("registry.store_poll_interval"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        for bad in [
            "postgres://u:hunter2@127.0.0.1:99999/db",
            "postgres://u:hunter2@127.0.0.1:5432",
            "postgres://127.0.0.1:5432/db",
        ] {
            let err = errors(&format!("bind = \"127.0.0.1:9091\"\nstore = \"{bad}\"\n"));
            assert!(err.contains("registry.store:"), "{bad}: {err}");
            assert!(!err.contains("hunter2"), "{bad}: {err}");
        }
    }

    #[test]
    fn redaction_keeps_everything_but_the_password() {
        use crate::base::config::redact_url;
        assert_eq!(redact_url("postgres://u@h:1/d"), "postgres://u@h:1/d");
        assert_eq!(redact_url("postgres://u:p@h:1/d"), "postgres://u:***@h:1/d");
        assert_eq!(redact_url("postgres://u:p@ss@h/d"), "postgres://u:***@h/d");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let config = parse("bind = \"127.0.0.1:9091\"\ntoken = \"hunter2-registry\"\n").unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("Secret(..)"), "{debug}");
    }
}
