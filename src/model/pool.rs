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
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{HeaderMap, header};

use crate::base::clock::now_ms;
use crate::base::config::{BackendProtocol, HealthConfig, PoolConfig, Strategy};
use crate::base::metrics::{BackendMetrics, PoolMetrics};
use crate::model::balance::{Balancer, CookieTarget, Pick, Sticky, client_key};
use crate::upstream::IdleConns;
use crate::upstream::client::{UpstreamClient, upstream_client};

pub use caps::{Placement, Slot, Target, Unplaced, WaitQueue, Wanted};

/// What the health checker last concluded about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    Up = 0,
    Down = 1,
    /// Arrived after start: needs `rise` passing checks before its first request.
    Pending = 2,
}

/// Passive cool-off after a refused connection: 500 ms, doubling while the node keeps refusing,
/// at most 8 s. Short enough that a restarted node is retried soon; the checker stays the
/// authority on up and down.
const COOL_OFF_BASE_MS: u64 = 500;
const COOL_OFF_MAX_MS: u64 = 8_000;

/// Share of its weight a node gets at the start of its slow-start window, in permille.
const SLOW_START_FLOOR_PERMILLE: u64 = 100;

/// A backend's identity and the state that must survive pool swaps.
#[derive(Debug)]
pub struct Node {
    pub name: Arc<str>,
    health: AtomicU8,
    in_flight: AtomicU32,
    /// `max_connections`: the most requests in flight; 0 = uncapped. Read only by picks in a
    /// pool that has caps.
    cap: AtomicU32,
    requests: AtomicU64,
    /// `now_ms()` until which picks skip the node after refused connections; 0 = not cooling.
    cooling_until_ms: AtomicU64,
    refusals: AtomicU32,
    /// `now_ms()` when the node last became routable, while its slow start may last; 0 = full weight.
    ramp_from_ms: AtomicU64,
    /// Being removed: no new users, but requests in flight and sticky users are still served.
    draining: AtomicBool,
    /// Requests this node failed (refused, reset, timed out), for the status page.
    failures: AtomicU64,
    pub metrics: BackendMetrics,
    /// HTTP/1.1 connections waiting for the next request to this node.
    pub idle: IdleConns,
    /// The pool's queue: a release hands its place to the first request waiting for it.
    queue: Arc<WaitQueue>,
}

impl Node {
    fn new(pool: &Arc<str>, name: Arc<str>, health: Health, queue: Arc<WaitQueue>) -> Self {
        let metrics = BackendMetrics::new(pool, &name);
        metrics.up.set(if health == Health::Up { 1.0 } else { 0.0 });
        Self {
            metrics,
            name,
            health: AtomicU8::new(health as u8),
            in_flight: AtomicU32::new(0),
            cap: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            cooling_until_ms: AtomicU64::new(0),
            refusals: AtomicU32::new(0),
            ramp_from_ms: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            idle: IdleConns::default(),
            queue,
        }
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            0 => Health::Up,
            1 => Health::Down,
            _ => Health::Pending,
        }
    }

    /// Records the checker's verdict; a node coming up starts its slow-start ramp.
    pub fn set_health(&self, health: Health) {
        let previous = self.health.swap(health as u8, Ordering::Relaxed);
        if health == Health::Up && previous != Health::Up as u8 {
            self.ramp_from_ms.store(now_ms(), Ordering::Relaxed);
            self.cooling_until_ms.store(0, Ordering::Relaxed);
            self.refusals.store(0, Ordering::Relaxed);
        }
        if previous != health as u8 {
            // Requests waiting for room may now have a node to go to, or none at all.
            self.queue.nudge();
        }
        self.metrics
            .up
            .set(if health == Health::Up { 1.0 } else { 0.0 });
    }

    /// May take new users.
    pub fn is_routable(&self) -> bool {
        self.serves_existing_users() && !self.is_draining()
    }

    /// May keep serving users already bound to it (sticky cookies): routable, or draining
    /// while still up.
    pub fn serves_existing_users(&self) -> bool {
        self.health() == Health::Up && !self.is_cooling()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        // Requests waiting for it as a new user's node must look elsewhere.
        self.queue.nudge();
    }

    /// In a passive cool-off after refusing connections.
    pub fn is_cooling(&self) -> bool {
        let until = self.cooling_until_ms.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// A connection to the node was refused: skip it for a while, longer each time in a row.
    pub fn refused(&self) -> Duration {
        let streak = self.refusals.fetch_add(1, Ordering::Relaxed).min(16);
        let cool_off = (COOL_OFF_BASE_MS << streak).min(COOL_OFF_MAX_MS);
        self.cooling_until_ms
            .store(now_ms() + cool_off, Ordering::Relaxed);
        // A sticky user or ip_hash client waiting for this node goes elsewhere now.
        self.queue.nudge();
        Duration::from_millis(cool_off)
    }

    /// The node answered: any refusal streak is over. Loads first so the common case writes
    /// nothing to a cache line other cores read.
    pub fn answered(&self) {
        if self.refusals.load(Ordering::Relaxed) != 0 {
            self.refusals.store(0, Ordering::Relaxed);
            self.cooling_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// The share of its weight the node may take now, in permille: ramps linearly from 10 %
    /// to 100 % over `slow_start` after the node came (back) up.
    pub fn weight_permille(&self, slow_start: Option<Duration>) -> u64 {
        let Some(window) = slow_start else {
            return 1000;
        };
        let from = self.ramp_from_ms.load(Ordering::Relaxed);
        if from == 0 {
            return 1000;
        }
        let window_ms = window.as_millis().max(1) as u64;
        let elapsed = now_ms().saturating_sub(from);
        if elapsed >= window_ms {
            self.ramp_from_ms.store(0, Ordering::Relaxed);
            return 1000;
        }
        SLOW_START_FLOOR_PERMILLE + (1000 - SLOW_START_FLOOR_PERMILLE) * elapsed / window_ms
    }

    /// Requests sent to this node whose response body has not ended yet.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// `max_connections`, if the node has one.
    pub fn cap(&self) -> Option<u32> {
        Some(self.cap.load(Ordering::Relaxed)).filter(|&cap| cap != 0)
    }

    /// Below its cap (or uncapped): a pick in a capped pool may choose it.
    pub fn has_room(&self) -> bool {
        let cap = self.cap.load(Ordering::Relaxed);
        cap == 0 || self.in_flight.load(Ordering::Relaxed) < cap
    }

    /// Takes one place below the cap, or fails when the node is full. SeqCst, with the queue's
    /// length, so a release and a request that is just starting to wait cannot miss each
    /// other (see [`queue`]).
    fn try_reserve(&self) -> bool {
        let cap = self.cap.load(Ordering::Relaxed);
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (cap == 0 || n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    fn set_cap(&self, cap: Option<u32>) {
        self.cap.store(cap.unwrap_or(0), Ordering::Relaxed);
        self.idle.set_limit(cap);
    }

    /// Requests ever sent to this node.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests this node failed: a refused or reset connection, or no answer in time.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// One entry of a snapshot: where a node is and how much traffic it takes.
///
/// The weight lives here, not in [`Node`], so a weight change is a new snapshot that keeps the
/// node's health and counters.
#[derive(Debug)]
pub struct Backend {
    pub node: Arc<Node>,
    pub address: SocketAddr,
    pub weight: u32,
    /// The node's cap: its own `max_connections`, else the pool's `max_connections_per_backend`.
    pub max_connections: Option<u32>,
    /// `address` ready to put in an upstream URI without formatting per request.
    pub authority: Authority,
}

/// Per-pool settings the proxy path reads.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub strategy: Strategy,
    pub backend_protocol: BackendProtocol,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_pool_timeout: Duration,
    /// Extra attempts on other nodes for requests that never reached a backend.
    pub retries: u32,
    pub slow_start: Option<Duration>,
    /// How long a request waits for room when every node it may use is full.
    pub queue_timeout: Duration,
    pub health: HealthConfig,
}

/// Everything a request needs from a pool, published as one unit.
#[derive(Debug)]
pub struct PoolState {
    pub settings: PoolSettings,
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

    pub fn sticky(&self) -> Option<&Sticky> {
        match &self.balancer {
            Balancer::StickyCookie(sticky) => Some(sticky),
            _ => None,
        }
    }
}

#[derive(Debug)]
pub struct Pool {
    pub name: Arc<str>,
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
    pub at: SystemTime,
    pub backend: Arc<str>,
    /// `up`, `down`, `added`, `draining`, `removed`.
    pub what: &'static str,
    pub detail: String,
}

/// The last [`JOURNAL_LEN`] events of a pool. Written by the checker and the control plane,
/// read by the status page; never touched on the request path, so a mutex is fine.
#[derive(Debug, Default)]
pub struct Journal(Mutex<VecDeque<Event>>);

impl Journal {
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
        queue.nudge();
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

/// Counts a request against its node from pick until the response body ends or the client
/// goes away, which is what least connections must see for streaming responses, and what a
/// cap limits.
#[derive(Debug)]
pub struct InFlight {
    node: Arc<Node>,
    started: Instant,
    /// Took its place with [`Slot::take`]: ending hands the place to a waiting request.
    capped: bool,
}

impl InFlight {
    /// A request to a node of a pool without caps.
    pub fn start(node: Arc<Node>, started: Instant) -> Self {
        node.in_flight.fetch_add(1, Ordering::Relaxed);
        Self::counted(node, started, false)
    }

    /// A request on a place reserved below its node's cap.
    fn reserved(slot: Slot, started: Instant) -> Self {
        Self::counted(slot.into_node(), started, true)
    }

    fn counted(node: Arc<Node>, started: Instant, capped: bool) -> Self {
        node.requests.fetch_add(1, Ordering::Relaxed);
        node.metrics.in_flight.increment(1.0);
        Self {
            node,
            started,
            capped,
        }
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.node.metrics.in_flight.decrement(1.0);
        self.node.metrics.duration.record(self.started.elapsed());
        // A request of a snapshot from before the pool had caps ends without looking at the
        // queue; the waiters of the new snapshot are served by the next capped release.
        if self.capped {
            caps::release(&self.node);
        } else {
            self.node.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::config::BackendConfig;

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
