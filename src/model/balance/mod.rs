//! Backend selection. One enum, one file per strategy.
//!
//! A strategy's state is built with the snapshot it serves (see [`crate::model::pool`]) and a pick reads
//! it with atomics only. A pick returns an index into the snapshot's backends, or `None` when no
//! backend is routable, which the proxy answers with 503.
//!
//! Every strategy skips nodes that are not routable (down, pending, cooling off) and the nodes
//! a retry already tried, and scales the weight of a node inside its slow-start window.
//!
//! In a pool with capped nodes ([`Balancer::pick_capped`]) the strategies also skip full nodes,
//! except where the request is bound to one: a sticky user's node, an `ip_hash` client's node.
//! Then the pick names that node and the request waits for it (see [`crate::model::pool`]). An
//! uncapped pool's pick passes a `room` test that is always true, which the compiler removes:
//! it costs what it did before caps existed.

mod ip_hash;
mod least_conn;
mod round_robin;
pub mod sticky;

pub use ip_hash::{IpHash, client_key};
pub use least_conn::LeastConnections;
pub use round_robin::RoundRobin;
pub use sticky::{CookieTarget, Sticky};

use std::time::Duration;

use crate::base::config::{StickyConfig, Strategy};
use crate::model::node::{Backend, Node};

/// What one pick knows about the request and the attempts before it.
#[derive(Debug, Clone, Copy)]
pub struct Pick<'a> {
    /// Indices already tried by this request (retries never repeat a node).
    pub tried: &'a [usize],
    /// The pool's `slow_start`: a node that just came up gets a share of its weight that grows
    /// over this window; `None` (the default): full weight at once.
    pub slow_start: Option<Duration>,
    /// `ip_hash`: the client's [`client_key`].
    pub client: u64,
    /// `sticky_cookie`: the node the request's cookie names.
    pub cookie: CookieTarget,
}

impl Pick<'_> {
    /// A pick with no request affinity, as round robin and least connections see every request.
    pub fn plain(slow_start: Option<Duration>) -> Pick<'static> {
        Pick {
            tried: &[],
            slow_start,
            client: 0,
            cookie: CookieTarget::Absent,
        }
    }
}

/// A pick in a pool with capped nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CappedPick {
    /// A node with room (at the time of the pick: reserve it before use).
    Free(usize),
    /// The node the request is bound to (its sticky cookie, its client address), full or not.
    Bound(usize),
    /// Every node the request may use is full.
    AllFull,
    /// No node the request may use is routable: a 503 at once.
    Nowhere,
}

/// The pool's strategy, with the state it keeps between picks; rebuilt with every snapshot.
#[derive(Debug)]
pub enum Balancer {
    /// `round_robin` (the default): smooth weighted rotation.
    RoundRobin(RoundRobin),
    /// `least_connections`: the node with the fewest requests in flight for its weight.
    LeastConnections(LeastConnections),
    /// `sticky_cookie`: the cookie's node, else the fallback strategy for new users.
    StickyCookie(Box<Sticky>),
    /// `ip_hash`: the client address picks the node, the same one on every instance.
    IpHash(IpHash),
}

impl Balancer {
    /// The balancer for `strategy` over this snapshot's `backends`; `sticky` is read only by
    /// `sticky_cookie`.
    pub fn new(strategy: Strategy, sticky: &StickyConfig, backends: &[Backend]) -> Self {
        match strategy {
            Strategy::RoundRobin => Balancer::RoundRobin(RoundRobin::new(backends)),
            Strategy::LeastConnections => {
                Balancer::LeastConnections(LeastConnections::new(backends))
            }
            Strategy::StickyCookie => {
                Balancer::StickyCookie(Box::new(Sticky::new(sticky, backends)))
            }
            Strategy::IpHash => Balancer::IpHash(IpHash::new(backends)),
        }
    }

    /// A pick that ignores caps: what an uncapped pool does.
    pub fn pick(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize> {
        let room = |_: &Node| true;
        match self {
            Balancer::RoundRobin(rr) => rr.pick(backends, pick.tried, pick.slow_start, room),
            Balancer::LeastConnections(lc) => lc.pick(backends, pick.tried, pick.slow_start, room),
            Balancer::StickyCookie(sticky) => sticky.pick(backends, pick),
            Balancer::IpHash(hash) => hash.pick(backends, pick),
        }
    }

    /// A pick that skips full nodes, or names the one the request is bound to.
    pub fn pick_capped(&self, backends: &[Backend], pick: &Pick<'_>) -> CappedPick {
        let room = Node::has_room;
        let free = match self {
            Balancer::RoundRobin(rr) => rr.pick(backends, pick.tried, pick.slow_start, room),
            Balancer::LeastConnections(lc) => lc.pick(backends, pick.tried, pick.slow_start, room),
            Balancer::StickyCookie(sticky) => return sticky.pick_capped(backends, pick),
            Balancer::IpHash(hash) => {
                return hash
                    .pick(backends, pick)
                    .map_or(CappedPick::Nowhere, CappedPick::Bound);
            }
        };
        match free {
            Some(index) => CappedPick::Free(index),
            None if (0..backends.len())
                .any(|i| backends[i].node.is_routable() && !pick.tried.contains(&i)) =>
            {
                CappedPick::AllFull
            }
            None => CappedPick::Nowhere,
        }
    }
}
