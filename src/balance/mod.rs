//! Backend selection. One enum, one file per strategy.
//!
//! A strategy's state is built with the snapshot it serves (see [`crate::pool`]) and a pick reads
//! it with atomics only. A pick returns an index into the snapshot's backends, or `None` when no
//! backend is routable, which the proxy answers with 503.
//!
//! Every strategy skips nodes that are not routable (down, pending, cooling off) and the nodes
//! a retry already tried, and scales the weight of a node inside its slow-start window.

mod least_conn;
mod round_robin;

pub use least_conn::LeastConnections;
pub use round_robin::RoundRobin;

use std::time::Duration;

use crate::config::Strategy;
use crate::pool::Backend;

#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    LeastConnections(LeastConnections),
}

impl Balancer {
    pub fn new(strategy: Strategy, backends: &[Backend]) -> Self {
        match strategy {
            Strategy::RoundRobin => Balancer::RoundRobin(RoundRobin::new(backends)),
            Strategy::LeastConnections => Balancer::LeastConnections(LeastConnections::new()),
        }
    }

    pub fn pick(
        &self,
        backends: &[Backend],
        tried: &[usize],
        slow_start: Option<Duration>,
    ) -> Option<usize> {
        match self {
            Balancer::RoundRobin(rr) => rr.pick(backends, tried, slow_start),
            Balancer::LeastConnections(lc) => lc.pick(backends, tried, slow_start),
        }
    }
}
