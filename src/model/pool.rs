//! Pools of backends and the state that outlives a swap.
//!
//! A [`Pool`] is one `ArcSwap<PoolState>`: the backend list, the strategy's precomputed state and
//! the upstream client, built together off the request path and published with one store. A
//! request loads the snapshot once and picks from it with atomics only. What must survive a swap
//! (health, in-flight counts, metric handles) lives in [`Node`], keyed by the backend's name, and
//! is carried over by [`Pool::replace`].
//!
//! Caps: a node with `max_connections` takes at most that many requests in flight. In a pool
//! with any capped node, a pick skips full nodes and reserves its place on the chosen one with
//! a compare-and-swap on the node's in-flight count (two racing picks cannot both take the last
//! place); a request with nowhere to go waits in the pool's FIFO queue (`pool/caps.rs`). A pool
//! without caps never looks at a cap or the queue: its picks and releases touch the same
//! atomics they did before caps existed.

mod caps;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{HeaderMap, header};

use crate::base::config::{BackendProtocol, HealthConfig, PoolConfig, Strategy};
use crate::base::metrics::PoolMetrics;
use crate::model::balance::{Balancer, CookieTarget, Pick, Sticky, client_key};
use crate::upstream::client::{UpstreamClient, upstream_client};

pub use crate::model::node::{Backend, Health, InFlight, Node};
pub use caps::{Placement, Slot, Target, Unplaced, WaitQueue, Wanted};

/// Per-pool settings the proxy path reads.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// How a request's node is chosen (default `round_robin`).
    pub strategy: Strategy,
    /// How requests reach the backends (default `http1`).
    pub backend_protocol: BackendProtocol,
    /// Longest wait for a backend to accept a connection (default 2 s).
    pub connect_timeout: Duration,
    /// Longest wait from the end of the request body to the response head (default 30 s).
    pub response_timeout: Duration,
    /// An upstream connection idle this long is closed (default 90 s).
    pub idle_pool_timeout: Duration,
    /// Extra attempts on other nodes for requests that never reached a backend.
    pub retries: u32,
    /// Ramp-up window for a node that just came up; `None` (the default): full weight at once.
    pub slow_start: Option<Duration>,
    /// How long a request waits for room when every node it may use is full.
    pub queue_timeout: Duration,
    /// How and how often its nodes are checked.
    pub health: HealthConfig,
}

/// Everything a request needs from a pool, published as one unit.
#[derive(Debug)]
pub struct PoolState {
    /// The pool's settings at the time of this snapshot.
    pub settings: PoolSettings,
    /// Its nodes, in snapshot order; picks return indices into this.
    pub backends: Box<[Backend]>,
    /// Set when the pool speaks h2c to its backends.
    pub h2c_client: Option<UpstreamClient>,
    /// HTTP/1.1 for `Upgrade` requests (WebSocket).
    pub upgrade_client: UpstreamClient,
    balancer: Balancer,
    /// Some node has a cap: picks reserve places and may wait in `queue`.
    capped: bool,
    queue: Arc<WaitQueue>,
}

impl PoolState {
    /// Chooses a routable backend for a request without affinity, or `None` when the pool has
    /// none (a 503).
    pub fn pick(&self) -> Option<&Backend> {
        let index = self
            .balancer
            .pick(&self.backends, &Pick::plain(self.settings.slow_start))?;
        Some(&self.backends[index])
    }

    /// Chooses a routable backend for `pick`'s request, other than those it already tried.
    /// Ignores caps; [`PoolState::place`] is what a request uses.
    pub fn pick_for(&self, pick: &Pick<'_>) -> Option<usize> {
        self.balancer.pick(&self.backends, pick)
    }

    /// Reads what the strategy needs from a request: the client address for `ip_hash`, the
    /// cookie for `sticky_cookie`, nothing for the others.
    /// Both are read lazily: round robin and least connections pay nothing for them.
    pub fn affinity(
        &self,
        headers: &HeaderMap,
        client_ip: impl FnOnce() -> IpAddr,
    ) -> (u64, CookieTarget) {
        match &self.balancer {
            Balancer::IpHash(_) => (client_key(client_ip()), CookieTarget::Absent),
            Balancer::StickyCookie(sticky) => {
                (0, sticky.target(headers.get_all(header::COOKIE).iter()))
            }
            Balancer::RoundRobin(_) | Balancer::LeastConnections(_) => (0, CookieTarget::Absent),
        }
    }

    /// The sticky-cookie balancer, when that is the pool's strategy, to set and read its cookie.
    pub fn sticky(&self) -> Option<&Sticky> {
        match &self.balancer {
            Balancer::StickyCookie(sticky) => Some(sticky),
            _ => None,
        }
    }
}

/// A named pool: its current [`PoolState`], swapped whole on reload, and what outlives swaps.
#[derive(Debug)]
pub struct Pool {
    /// The pool's name in the config (`[pools.NAME]`).
    pub name: Arc<str>,
    /// Its per-pool Prometheus series.
    pub metrics: PoolMetrics,
    /// Recent state changes of its nodes, for the status page.
    pub journal: Journal,
    /// Woken by every [`Pool::replace`]: the health checker starts new nodes and adopts new
    /// check settings at once instead of at its next tick.
    pub changed: tokio::sync::Notify,
    state: ArcSwap<PoolState>,
}

/// How many state changes a pool remembers for the status page.
const JOURNAL_LEN: usize = 50;

/// A node's change of state, as the status page lists it.
#[derive(Debug, Clone)]
pub struct Event {
    /// When it happened.
    pub at: SystemTime,
    /// The node's name.
    pub backend: Arc<str>,
    /// `up`, `down`, `added`, `draining`, `removed`.
    pub what: &'static str,
    /// Why, or what changed (empty when nothing to add).
    pub detail: String,
}

/// The last [`JOURNAL_LEN`] events of a pool. Written by the checker and the control plane,
/// read by the status page; never touched on the request path, so a mutex is fine.
#[derive(Debug, Default)]
pub struct Journal(Mutex<VecDeque<Event>>);

impl Journal {
    /// Adds an event, dropping the oldest past [`JOURNAL_LEN`].
    pub fn record(&self, backend: &Arc<str>, what: &'static str, detail: impl Into<String>) {
        let mut events = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if events.len() == JOURNAL_LEN {
            events.pop_front();
        }
        events.push_back(Event {
            at: SystemTime::now(),
            backend: backend.clone(),
            what,
            detail: detail.into(),
        });
    }

    /// Newest first.
    pub fn recent(&self) -> Vec<Event> {
        let events = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        events.iter().rev().cloned().collect()
    }
}

impl Pool {
    /// A pool of the config the process starts with: its nodes are trusted at once.
    pub fn new(name: &str, config: &PoolConfig) -> Self {
        Self::with_health(name, config, Health::Up)
    }

    /// A pool that appears later (a reload): its nodes need `rise` passing checks first.
    pub fn arriving(name: &str, config: &PoolConfig) -> Self {
        Self::with_health(name, config, Health::Pending)
    }

    fn with_health(name: &str, config: &PoolConfig, health: Health) -> Self {
        let name: Arc<str> = Arc::from(name);
        let metrics = PoolMetrics::new(&name);
        let queue = Arc::new(WaitQueue::new(metrics.queue_depth.clone()));
        let state = build_state(&name, config, &HashMap::new(), None, health, &queue);
        Self {
            metrics,
            journal: Journal::default(),
            changed: tokio::sync::Notify::new(),
            name,
            state: ArcSwap::from_pointee(state),
        }
    }

    /// The current snapshot; a request holds it until its response is sent.
    pub fn snapshot(&self) -> Arc<PoolState> {
        self.state.load_full()
    }

    /// Publishes a new backend list and settings. Nodes whose name is unchanged keep their
    /// health, counters and metric handles; requests in flight finish on the old snapshot.
    pub fn replace(&self, config: &PoolConfig) {
        let current = self.state.load();
        let nodes: HashMap<Arc<str>, Arc<Node>> = current
            .backends
            .iter()
            .map(|b| (b.node.name.clone(), b.node.clone()))
            .collect();
        let reusable_client = (current.settings.connect_timeout == config.connect_timeout
            && current.settings.idle_pool_timeout == config.idle_pool_timeout
            && current.settings.backend_protocol == config.backend_protocol)
            .then(|| (current.h2c_client.clone(), current.upgrade_client.clone()));
        // Newcomers must prove themselves with `rise` passing checks first.
        let queue = current.queue.clone();
        let next = build_state(
            &self.name,
            config,
            &nodes,
            reusable_client,
            Health::Pending,
            &queue,
        );
        for backend in next.backends.iter() {
            if !nodes.contains_key(&backend.node.name) {
                let detail = format!(
                    "at {}; pending {} checks",
                    backend.address, config.health.rise
                );
                self.journal.record(&backend.node.name, "added", detail);
            }
        }
        let left: Vec<&Arc<Node>> = nodes
            .values()
            .filter(|node| !next.backends.iter().any(|b| b.node.name == node.name))
            .collect();
        self.state.store(Arc::new(next));
        // Here, not in `Node`'s `Drop`: requests in flight hold the old node for a while, and
        // a node of the same name may arrive meanwhile with series of its own.
        for node in left {
            node.metrics.remove();
            self.journal.record(&node.name, "removed", "");
        }
        self.changed.notify_waiters();
        // Waiting requests look again: caps may have changed, nodes come or gone.
        queue.wake_all();
    }

    /// Takes the series of the pool and of all its nodes out of the scrape: a reload dropped
    /// the pool.
    pub fn remove_metrics(&self) {
        let snapshot = self.snapshot();
        self.metrics
            .remove(snapshot.backends.iter().map(|b| &b.node.metrics));
    }
}

#[expect(clippy::expect_used, reason = "a socket address is a valid authority")]
fn build_state(
    pool: &Arc<str>,
    config: &PoolConfig,
    existing: &HashMap<Arc<str>, Arc<Node>>,
    clients: Option<(Option<UpstreamClient>, UpstreamClient)>,
    newcomer_health: Health,
    queue: &Arc<WaitQueue>,
) -> PoolState {
    let backends: Box<[Backend]> = config
        .backends
        .iter()
        .map(|b| {
            let node = existing.get(b.name.as_str()).cloned().unwrap_or_else(|| {
                Arc::new(Node::new(
                    pool,
                    Arc::from(b.name.as_str()),
                    newcomer_health,
                    queue.clone(),
                ))
            });
            let max_connections = config.cap_of(b);
            node.set_cap(max_connections);
            Backend {
                node,
                address: b.address,
                weight: b.weight,
                max_connections,
                authority: Authority::try_from(b.address.to_string())
                    .expect("a socket address is a valid authority"),
            }
        })
        .collect();
    let settings = PoolSettings {
        strategy: config.strategy,
        backend_protocol: config.backend_protocol,
        connect_timeout: config.connect_timeout,
        response_timeout: config.response_timeout,
        idle_pool_timeout: config.idle_pool_timeout,
        retries: config.retries,
        slow_start: config.slow_start,
        queue_timeout: config.queue_timeout,
        health: config.health.clone(),
    };
    let (h2c_client, upgrade_client) = clients.unwrap_or_else(|| {
        let h2c = (settings.backend_protocol == BackendProtocol::H2c).then(|| {
            upstream_client(
                settings.connect_timeout,
                settings.idle_pool_timeout,
                BackendProtocol::H2c,
            )
        });
        (
            h2c,
            upstream_client(
                settings.connect_timeout,
                settings.idle_pool_timeout,
                BackendProtocol::Http1,
            ),
        )
    });
    PoolState {
        balancer: Balancer::new(config.strategy, &config.sticky, &backends),
        h2c_client,
        upgrade_client,
        settings,
        capped: backends.iter().any(|b| b.max_connections.is_some()),
        queue: queue.clone(),
        backends,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::config::BackendConfig;
    use crate::model::node::COOL_OFF_MAX_MS;
    use std::net::SocketAddr;
    use std::time::Instant;

    fn pool_config(backends: &[(&str, u16, u32)]) -> PoolConfig {
        PoolConfig {
            strategy: Strategy::RoundRobin,
            backend_protocol: BackendProtocol::Http1,
            slow_start: None,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(30),
            retries: 2,
            idle_pool_timeout: Duration::from_secs(90),
            max_connections_per_backend: None,
            queue_timeout: Duration::from_secs(5),
            backends: backends
                .iter()
                .map(|&(name, port, weight)| BackendConfig {
                    name: name.to_owned(),
                    address: SocketAddr::from(([127, 0, 0, 1], port)),
                    weight,
                    max_connections: None,
                })
                .collect(),
            health: HealthConfig {
                path: "/healthz".into(),
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(1),
                fall: 3,
                rise: 3,
            },
            sticky: Default::default(),
        }
    }

    #[test]
    fn refusals_cool_a_node_off_longer_each_time_until_it_answers() {
        let pool = Pool::new("cool-test", &pool_config(&[("a", 1, 1)]));
        let node = pool.snapshot().backends[0].node.clone();
        assert!(node.is_routable());
        assert_eq!(node.refused(), Duration::from_millis(500));
        assert!(node.is_cooling() && !node.is_routable());
        assert_eq!(node.refused(), Duration::from_millis(1000));
        assert_eq!(node.refused(), Duration::from_millis(2000));
        for _ in 0..10 {
            node.refused();
        }
        assert_eq!(node.refused(), Duration::from_millis(COOL_OFF_MAX_MS));
        node.answered();
        assert!(node.is_routable());
        assert_eq!(
            node.refused(),
            Duration::from_millis(500),
            "the streak starts over"
        );
    }

    #[test]
    fn slow_start_ramps_from_a_tenth_to_full_weight() {
        let pool = Pool::new("ramp-test", &pool_config(&[("a", 1, 1)]));
        let node = pool.snapshot().backends[0].node.clone();
        let window = Some(Duration::from_millis(1000));
        assert_eq!(
            node.weight_permille(window),
            1000,
            "config nodes start at full weight"
        );
        node.set_health(Health::Down);
        node.set_health(Health::Up);
        let early = node.weight_permille(window);
        assert!((100..500).contains(&early), "{early}");
        assert_eq!(node.weight_permille(None), 1000, "no slow_start, no ramp");
        std::thread::sleep(Duration::from_millis(300));
        let middle = node.weight_permille(window);
        assert!(middle > early && middle < 1000, "{early} then {middle}");
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(node.weight_permille(window), 1000);
    }

    #[tokio::test]
    async fn replace_keeps_state_of_unchanged_names() {
        let pool = Pool::new("replace-test", &pool_config(&[("a", 1, 1), ("b", 2, 1)]));
        let a = pool.snapshot().backends[0].node.clone();
        a.set_health(Health::Down);
        let guard = InFlight::start(a.clone(), Instant::now());

        // `a` moves and changes weight; `b` leaves; `c` arrives.
        pool.replace(&pool_config(&[("a", 11, 5), ("c", 3, 1)]));
        let snapshot = pool.snapshot();
        let names: Vec<_> = snapshot
            .backends
            .iter()
            .map(|b| b.node.name.to_string())
            .collect();
        assert_eq!(names, ["a", "c"]);
        assert!(
            Arc::ptr_eq(&snapshot.backends[0].node, &a),
            "same identity, same node"
        );
        assert_eq!(snapshot.backends[0].weight, 5);
        assert_eq!(snapshot.backends[0].node.health(), Health::Down);
        assert_eq!(snapshot.backends[0].node.in_flight(), 1);
        drop(guard);
        assert_eq!(a.in_flight(), 0);
        assert_eq!(
            snapshot.backends[1].node.health(),
            Health::Pending,
            "a newcomer waits for rise"
        );
    }
}
