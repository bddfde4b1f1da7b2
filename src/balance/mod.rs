//! Backend selection. One enum, one file per strategy.
//!
//! A strategy's state is built with the snapshot it serves (see [`crate::pool`]) and a pick reads
//! it with atomics only. A pick returns an index into the snapshot's backends, or `None` when no
//! backend is routable, which the proxy answers with 503.
//!
//! Every strategy skips nodes that are not routable (down, pending, cooling off) and the nodes
//! a retry already tried, and scales the weight of a node inside its slow-start window.

mod ip_hash;
mod least_conn;
mod round_robin;
pub mod sticky;

pub use ip_hash::{IpHash, client_key};
pub use least_conn::LeastConnections;
pub use round_robin::RoundRobin;
pub use sticky::{CookieTarget, Sticky};

use std::time::Duration;

use crate::config::{StickyConfig, Strategy};
use crate::pool::Backend;

/// What one pick knows about the request and the attempts before it.
#[derive(Debug, Clone, Copy)]
pub struct Pick<'a> {
    /// Indices already tried by this request (retries never repeat a node).
    pub tried: &'a [usize],
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

#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    LeastConnections(LeastConnections),
    StickyCookie(Box<Sticky>),
    IpHash(IpHash),
}

impl Balancer {
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

    pub fn pick(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize> {
        match self {
            Balancer::RoundRobin(rr) => rr.pick(backends, pick.tried, pick.slow_start),
            Balancer::LeastConnections(lc) => lc.pick(backends, pick.tried, pick.slow_start),
            Balancer::StickyCookie(sticky) => sticky.pick(backends, pick),
            Balancer::IpHash(hash) => hash.pick(backends, pick),
        }
    }
}
