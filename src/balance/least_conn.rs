//! Weighted least connections.
//!
//! The load of a node is `(in_flight + 1) / weight`: the `+ 1` makes an idle heavy node win over
//! an idle light one. The scan starts at a rotating offset so that, when several nodes tie (the
//! common case at low load), concurrent picks spread instead of herding onto the first.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::pool::Backend;

#[derive(Debug, Default)]
pub struct LeastConnections {
    cursor: AtomicUsize,
}

impl LeastConnections {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn pick(
        &self,
        backends: &[Backend],
        tried: &[usize],
        slow_start: Option<Duration>,
    ) -> Option<usize> {
        let len = backends.len();
        if len == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % len;
        // (index, in_flight + 1, weight) of the least loaded so far.
        let mut best: Option<(usize, u64, u64)> = None;
        for offset in 0..len {
            let index = if start + offset < len {
                start + offset
            } else {
                start + offset - len
            };
            let backend = &backends[index];
            if !backend.node.is_routable() || tried.contains(&index) {
                continue;
            }
            let load = u64::from(backend.node.in_flight()) + 1;
            // Permille of the weight: slow start scales it down while a node ramps up.
            let weight = u64::from(backend.weight) * backend.node.weight_permille(slow_start);
            // load / weight < best_load / best_weight, without division.
            if best
                .is_none_or(|(_, best_load, best_weight)| load * best_weight < best_load * weight)
            {
                best = Some((index, load, weight));
            }
        }
        best.map(|(index, _, _)| index)
    }
}
