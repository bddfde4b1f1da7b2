//! `[pools.NAME]`: the strategy, timeouts and caps, the backends (by the rules of
//! [`crate::base::config::backend`], every mistake located), `[pools.NAME.health]` and
//! `[pools.NAME.sticky]`.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{MAX_DURATION, Validator, short_duration};
use crate::base::config::backend::{self, Roster};
use crate::base::config::{
    BackendConfig, BackendProtocol, HealthConfig, MAX_ATTEMPTS, MAX_QUEUE_TIMEOUT, PoolConfig,
    SameSite, StickyConfig, Strategy, one_of,
};

/// Health `interval` and `timeout`: a check an hour apart is no longer watching the node.
const MAX_HEALTH_DURATION: Duration = Duration::from_secs(3600);
/// Browsers cap a cookie's lifetime at 400 days (RFC 6265bis); longer is never honoured.
const MAX_COOKIE_AGE: Duration = Duration::from_secs(400 * 24 * 3600);
const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_RETRIES: u32 = 2;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
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

/// A pool's timeouts, each defaulted and bounded.
struct Timeouts {
    slow_start: Option<Duration>,
    connect: Duration,
    response: Duration,
    idle_pool: Duration,
    queue: Duration,
}

impl Validator<'_> {
    pub(super) fn pool(&mut self, name: &str, raw: &RawPool) -> PoolConfig {
        let key = |field: &str| format!("pools.{name}.{field}");
        let strategy = self.strategy(&raw.strategy, &key("strategy"));
        let backend_protocol =
            self.backend_protocol(&raw.backend_protocol, &key("backend_protocol"));
        let timeouts = self.pool_timeouts(name, raw);
        let retries = self.retries(&raw.retries, &key("retries"));
        let max_connections_per_backend = self
            .optional(
                &raw.max_connections_per_backend,
                &key("max_connections_per_backend"),
                |cap| backend::max_connections(cap.map(i128::from)),
            )
            .flatten();
        let backends = self.backends(name, &raw.backends);
        let health = self.health(name, raw.health.as_ref());
        let sticky = self.sticky(name, raw.sticky.as_ref());
        if strategy == Strategy::StickyCookie && sticky.secret.is_none() {
            self.warn_forgeable_cookies(name, raw.strategy.as_ref());
        }
        PoolConfig {
            strategy,
            backend_protocol,
            slow_start: timeouts.slow_start,
            connect_timeout: timeouts.connect,
            response_timeout: timeouts.response,
            retries,
            idle_pool_timeout: timeouts.idle_pool,
            max_connections_per_backend,
            queue_timeout: timeouts.queue,
            backends,
            health,
            sticky,
        }
    }

    fn strategy(&mut self, value: &Option<Spanned<String>>, key: &str) -> Strategy {
        let unknown = |other: &str| {
            let expected = Strategy::expected();
            format!("unknown strategy `{other}`; expected {expected}")
        };
        self.keyword(value, key, Strategy::from_name, unknown)
            .unwrap_or(Strategy::RoundRobin)
    }

    fn backend_protocol(&mut self, value: &Option<Spanned<String>>, key: &str) -> BackendProtocol {
        let unknown = |other: &str| {
            let expected = BackendProtocol::expected();
            format!("unknown backend protocol `{other}`; expected {expected}")
        };
        self.keyword(value, key, BackendProtocol::from_name, unknown)
            .unwrap_or_default()
    }

    /// Sticky cookies without a secret: valid, but a client can write itself a cookie for
    /// any node. Said at the `strategy` that asked for them.
    fn warn_forgeable_cookies(&mut self, pool: &str, strategy: Option<&Spanned<String>>) {
        if let Some(value) = strategy {
            self.warn(
                Some(value.span()),
                format!("pools.{pool}.strategy"),
                format!("sticky cookies without pools.{pool}.sticky.secret are an unkeyed hash anyone can forge to pick a node; set the same secret on every balancer"),
            );
        }
    }

    fn pool_timeouts(&mut self, pool: &str, raw: &RawPool) -> Timeouts {
        let key = |field: &str| format!("pools.{pool}.{field}");
        Timeouts {
            slow_start: self.optional_duration(&raw.slow_start, &key("slow_start"), MAX_DURATION),
            connect: self.duration(
                &raw.connect_timeout,
                &key("connect_timeout"),
                Duration::from_secs(2),
            ),
            response: self.duration(
                &raw.response_timeout,
                &key("response_timeout"),
                Duration::from_secs(30),
            ),
            idle_pool: self.duration(
                &raw.idle_pool_timeout,
                &key("idle_pool_timeout"),
                Duration::from_secs(90),
            ),
            queue: self.queue_timeout(&raw.queue_timeout, &key("queue_timeout")),
        }
    }

    /// `queue_timeout`: zero (answer 503 at once when every node is full) up to
    /// [`MAX_QUEUE_TIMEOUT`].
    fn queue_timeout(&mut self, value: &Option<Spanned<String>>, key: &str) -> Duration {
        let Some(value) = value else {
            return DEFAULT_QUEUE_TIMEOUT;
        };
        match self.parse_duration(value, key) {
            Some(d) if d <= MAX_QUEUE_TIMEOUT => d,
            Some(_) => {
                let message = format!("must be at most {}", short_duration(MAX_QUEUE_TIMEOUT));
                self.error(Some(value.span()), key, message);
                DEFAULT_QUEUE_TIMEOUT
            }
            None => DEFAULT_QUEUE_TIMEOUT,
        }
    }

    /// `retries`: the attempts they add up to (one more) are bounded by [`MAX_ATTEMPTS`].
    fn retries(&mut self, value: &Option<Spanned<u32>>, key: &str) -> u32 {
        match value {
            None => DEFAULT_RETRIES,
            Some(r) if *r.get_ref() as usize >= MAX_ATTEMPTS => {
                let message = format!("must be at most {}", MAX_ATTEMPTS - 1);
                self.error(Some(r.span()), key, message);
                DEFAULT_RETRIES
            }
            Some(r) => *r.get_ref(),
        }
    }

    fn backends(&mut self, pool: &str, raw: &[Spanned<RawBackend>]) -> Vec<BackendConfig> {
        let mut roster = Roster::default();
        raw.iter()
            .enumerate()
            .filter_map(|(i, b)| self.backend(pool, i, b.get_ref(), &mut roster))
            .collect()
    }

    /// One backend of the file, with every broken rule reported at its field; `None` when
    /// its address is unusable.
    fn backend(
        &mut self,
        pool: &str,
        index: usize,
        raw: &RawBackend,
        roster: &mut Roster,
    ) -> Option<BackendConfig> {
        let key = |field: &str| format!("pools.{pool}.backends[{index}].{field}");
        let address_span = Some(raw.address.span());
        let address = self.checked(
            address_span.clone(),
            &key("address"),
            backend::address(raw.address.get_ref()),
        );
        let weight = self
            .optional(&raw.weight, &key("weight"), |w| {
                backend::weight(w.map(i128::from))
            })
            .unwrap_or(1);
        let max_connections = self
            .optional(&raw.max_connections, &key("max_connections"), |cap| {
                backend::max_connections(cap.map(i128::from))
            })
            .flatten();
        let given_name = raw.name.as_ref().map(|n| n.get_ref().as_str());
        let name = backend::name_or_address(given_name, raw.address.get_ref());
        // An unnamed backend is named by its address text, whose mistakes are the address's.
        let name_span = raw
            .name
            .as_ref()
            .map(Spanned::span)
            .or(address_span.clone());
        if given_name.is_some() {
            self.checked(name_span.clone(), &key("name"), backend::name(&name));
        }

        let in_pool = |e: backend::BackendError| format!("{e} in pool `{pool}`");
        let name_taken = roster.take_name(&name).map_err(in_pool);
        let address_taken = address.map(|a| roster.take_address(a).map_err(in_pool));
        // An unnamed backend is named by its address text: when its address is taken, so is
        // its name, and the one mistake is said once, at the address.
        if raw.name.is_some() || !matches!(address_taken, Some(Err(_))) {
            self.checked(name_span, &key("name"), name_taken);
        }
        if let Some(taken) = address_taken {
            self.checked(address_span, &key("address"), taken);
        }
        let address = address?;
        Some(BackendConfig {
            name,
            address,
            weight,
            max_connections,
        })
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
        // the interval is fine: checks of one node never overlap (src/control/health.rs).
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
        let placing =
            |name: &str| Strategy::from_name(name).filter(|s| StickyConfig::FALLBACKS.contains(s));
        let cannot_place = |other: &str| {
            let expected = one_of(StickyConfig::FALLBACKS.iter().map(|s| s.as_str()));
            format!("`{other}` cannot place new users; expected {expected}")
        };
        sticky.fallback = self
            .keyword(&raw.fallback, &key("fallback"), placing, cannot_place)
            .unwrap_or(sticky.fallback);
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
        sticky.max_age = self.optional_duration(&raw.max_age, &key("max_age"), MAX_COOKIE_AGE);
        self.cookie_attributes(pool, raw, &mut sticky);
        sticky
    }

    /// The `Set-Cookie` attributes: `Path`, `Domain`, `HttpOnly`, `Secure`, `SameSite`.
    fn cookie_attributes(&mut self, pool: &str, raw: &RawSticky, sticky: &mut StickyConfig) {
        let key = |field: &str| format!("pools.{pool}.sticky.{field}");
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
        let any_case = |text: &str| {
            SameSite::ALL
                .iter()
                .copied()
                .find(|s| s.as_str().eq_ignore_ascii_case(text))
        };
        let expected = |_: &str| format!("expected {}", SameSite::expected());
        sticky.same_site = self
            .keyword(&raw.same_site, &key("same_site"), any_case, expected)
            .unwrap_or(SameSite::Lax);
        // Browsers drop a SameSite=None cookie that is not also Secure.
        if let Some(same_site) = &raw.same_site
            && sticky.same_site == SameSite::None
            && sticky.secure == Some(false)
        {
            self.error(
                Some(same_site.span()),
                key("same_site"),
                "SameSite=None needs secure (browsers reject it otherwise)",
            );
        }
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What may appear in a Set-Cookie attribute value (RFC 6265 §4.1.1 `av-octet`, minus space).
fn is_attribute_byte(b: u8) -> bool {
    b.is_ascii_graphic() && b != b';'
}
