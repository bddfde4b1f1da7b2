//! A backend as the pool knows it across swaps: its identity ([`Node`], keyed by name, with
//! health, in-flight count, cool-off, slow start, cap and metric handles), its place in one
//! snapshot ([`Backend`]: address and weight), and the guard that counts a request against it
//! ([`InFlight`]). The strategies read these; the pool builds them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::uri::Authority;

use crate::base::clock::now_ms;
use crate::base::metrics::BackendMetrics;
use crate::upstream::IdleConns;

/// The requests waiting for room on a pool's capped nodes, as a node sees them: told when a
/// place frees up and when the node's state changes. The pool's wait queue implements it; the
/// node holds it as a trait object so that it does not need the pool to exist.
pub(crate) trait Waiters: Send + Sync + std::fmt::Debug {
    /// A place on `node` was just given back (its in-flight count already lowered).
    fn released(&self, node: &Arc<Node>);
    /// Something changed that waiting requests should look at again.
    fn nudge(&self);
}

/// What the health checker last concluded about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Passing its checks: routable unless cooling off or draining.
    Up = 0,
    /// Failing its checks: never picked.
    Down = 1,
    /// Arrived after start: needs `rise` passing checks before its first request.
    Pending = 2,
}

/// Passive cool-off after a refused connection: 500 ms, doubling while the node keeps refusing,
/// at most 8 s. Short enough that a restarted node is retried soon; the checker stays the
/// authority on up and down.
const COOL_OFF_BASE_MS: u64 = 500;
pub(in crate::model) const COOL_OFF_MAX_MS: u64 = 8_000;

/// Share of its weight a node gets at the start of its slow-start window, in permille.
const SLOW_START_FLOOR_PERMILLE: u64 = 100;

/// A backend's identity and the state that must survive pool swaps.
#[derive(Debug)]
pub struct Node {
    /// The backend's `name` (default: its address): what metrics, cookies and the status page
    /// know it by.
    pub name: Arc<str>,
    pub(in crate::model) health: AtomicU8,
    pub(in crate::model) in_flight: AtomicU32,
    /// `max_connections`: the most requests in flight; 0 = uncapped. Read only by picks in a
    /// pool that has caps.
    pub(in crate::model) cap: AtomicU32,
    pub(in crate::model) requests: AtomicU64,
    /// `now_ms()` until which picks skip the node after refused connections; 0 = not cooling.
    pub(in crate::model) cooling_until_ms: AtomicU64,
    pub(in crate::model) refusals: AtomicU32,
    /// `now_ms()` when the node last became routable, while its slow start may last; 0 = full weight.
    pub(in crate::model) ramp_from_ms: AtomicU64,
    /// Being removed: no new users, but requests in flight and sticky users are still served.
    pub(in crate::model) draining: AtomicBool,
    /// Requests this node failed (refused, reset, timed out), for the status page.
    pub(in crate::model) failures: AtomicU64,
    /// `systemMetrics.activeConnections` of the node's last `/healthz` answer, for the shared
    /// registry store's `active_connections_count`; 0 until a check read one.
    pub(in crate::model) reported_connections: AtomicU64,
    /// Its per-backend Prometheus series.
    pub metrics: BackendMetrics,
    /// HTTP/1.1 connections waiting for the next request to this node.
    pub idle: Arc<IdleConns>,
    /// The pool's queue: a release hands its place to the first request waiting for it.
    pub(in crate::model) queue: Arc<dyn Waiters>,
}

impl Node {
    pub(in crate::model) fn new(
        pool: &Arc<str>,
        name: Arc<str>,
        health: Health,
        queue: Arc<dyn Waiters>,
    ) -> Self {
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
            reported_connections: AtomicU64::new(0),
            idle: Arc::default(),
            queue,
        }
    }

    /// What the health checker last concluded.
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

    /// Being removed: takes no new users, still serves those it has.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stops new users; requests in flight and sticky users finish here.
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
    pub(in crate::model) fn try_reserve(&self) -> bool {
        let cap = self.cap.load(Ordering::Relaxed);
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (cap == 0 || n < cap).then_some(n + 1)
            })
            .is_ok()
    }

    pub(in crate::model) fn set_cap(&self, cap: Option<u32>) {
        self.cap.store(cap.unwrap_or(0), Ordering::Relaxed);
        self.idle.set_limit(cap);
    }

    /// Requests ever sent to this node.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The connections the node itself last reported open on its `/healthz`.
    pub fn reported_connections(&self) -> u64 {
        self.reported_connections.load(Ordering::Relaxed)
    }

    /// Records the `activeConnections` figure a health check just read.
    pub fn set_reported_connections(&self, connections: u64) {
        self.reported_connections
            .store(connections, Ordering::Relaxed);
    }

    /// Requests this node failed: a refused or reset connection, or no answer in time.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Counts a request this node failed, for the status page.
    pub fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Frees one place on this capped node and hands it to the first request that waits for
    /// it. SeqCst with the queue's length: this release either sees a waiter that has just
    /// joined the line, or that waiter's look after joining sees the place free. Never neither.
    pub(in crate::model) fn release_capped(self: &Arc<Self>) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.queue.released(self);
    }
}

/// One entry of a snapshot: where a node is and how much traffic it takes.
///
/// The weight lives here, not in [`Node`], so a weight change is a new snapshot that keeps the
/// node's health and counters.
#[derive(Debug)]
pub struct Backend {
    /// The node's identity and counters, shared by every snapshot that holds it.
    pub node: Arc<Node>,
    /// Where the backend listens.
    pub address: SocketAddr,
    /// Its share of the traffic relative to the others (default 1).
    pub weight: u32,
    /// The node's cap: its own `max_connections`, else the pool's `max_connections_per_backend`.
    pub max_connections: Option<u32>,
    /// `address` ready to put in an upstream URI without formatting per request.
    pub authority: Authority,
}

/// Counts a request against its node from pick until the response body ends or the client
/// goes away, which is what least connections must see for streaming responses, and what a
/// cap limits.
#[derive(Debug)]
pub struct InFlight {
    node: Arc<Node>,
    started: Instant,
    /// Took a reserved place below the cap: ending hands the place to a waiting request.
    capped: bool,
}

impl InFlight {
    /// A request to a node of a pool without caps.
    pub fn start(node: Arc<Node>, started: Instant) -> Self {
        node.in_flight.fetch_add(1, Ordering::Relaxed);
        Self::counted(node, started, false)
    }

    /// A request on a place already reserved below its node's cap (the pool's `Slot`, given
    /// up to this guard): ending it hands the place on.
    pub(in crate::model) fn reserved(node: Arc<Node>, started: Instant) -> Self {
        Self::counted(node, started, true)
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

    /// The node this request counts against.
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
            self.node.release_capped();
        } else {
            self.node.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
