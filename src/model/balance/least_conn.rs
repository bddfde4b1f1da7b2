//! Weighted least connections.
//!
//! The load of a node is `in_flight / weight`, and the least loaded wins. Ties are the common
//! case at low load (every node idle), so who wins a tie decides the split there: the scan
//! starts at the next node of the pool's smooth weighted round-robin cycle and keeps the first
//! of the least loaded, so idle nodes share requests by weight, and concurrent picks spread
//! instead of herding onto one node. (Scoring `(in_flight + 1) / weight` instead, as the
//! textbook does, hands a weight-2 node every request while the pool is idle.)

use std::time::Duration;

use super::round_robin::{WeightedCycle, takes_turn};
use crate::model::node::{Backend, Node};

/// `least_connections`: the lowest in-flight count for its weight; ties go round in weighted
/// order, so an idle pool still spreads by weight.
#[derive(Debug)]
pub struct LeastConnections {
    /// Where each scan starts: one smooth weighted round-robin cycle of backend indices.
    starts: WeightedCycle,
}

impl LeastConnections {
    /// Builds the scan-start cycle from the backends' weights.
    pub fn new(backends: &[Backend]) -> Self {
        Self {
            starts: WeightedCycle::new(backends),
        }
    }

    /// The least loaded node that is routable, untried and has `room`.
    pub fn pick(
        &self,
        backends: &[Backend],
        tried: &[usize],
        slow_start: Option<Duration>,
        room: impl Fn(&Node) -> bool,
    ) -> Option<usize> {
        let len = backends.len();
        if len == 0 || self.starts.len() == 0 {
            return None;
        }
        // A node inside its slow-start window takes only its ramped share of the starts, so
        // idle ties do not hand it a full share before it is warm.
        let mut start = 0;
        for _ in 0..self.starts.len() {
            let turn;
            (turn, start) = self.starts.next();
            if takes_turn(&backends[start].node, slow_start, turn) {
                break;
            }
        }
        // (index, in_flight, weight) of the least loaded so far.
        let mut best: Option<(usize, u64, u64)> = None;
        for offset in 0..len {
            let index = if start + offset < len {
                start + offset
            } else {
                start + offset - len
            };
            let backend = &backends[index];
            if !backend.node.is_routable() || tried.contains(&index) || !room(&backend.node) {
                continue;
            }
            let load = u64::from(backend.node.in_flight());
            // Permille of the weight: slow start scales it down while a node ramps up.
            let weight = u64::from(backend.weight) * backend.node.weight_permille(slow_start);
            // load / weight < best_load / best_weight, without division; a tie keeps the
            // earlier node in the scan.
            if best
                .is_none_or(|(_, best_load, best_weight)| load * best_weight < best_load * weight)
            {
                best = Some((index, load, weight));
            }
        }
        best.map(|(index, _, _)| index)
    }
}
