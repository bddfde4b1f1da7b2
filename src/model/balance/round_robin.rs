//! Smooth weighted round robin, precomputed.
//!
//! nginx's smooth algorithm spreads a heavy node's turns through the cycle (weights 5:1:1 give
//! `a a b a c a a`, not `a a a a a b c`). Running it once per snapshot and storing the cycle turns
//! a pick into one `fetch_add` and an index, and makes the guarantee exact under concurrency:
//! over any window of sum(weights) consecutive picks, every node gets exactly its weight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::model::node::{Backend, Node};

/// `round_robin`: a precomputed smooth weighted cycle, walked by one atomic cursor so picks
/// never lock.
#[derive(Debug)]
pub struct RoundRobin {
    cycle: WeightedCycle,
}

/// One full smooth weighted cycle of backend indices (each appears `weight / gcd` times) and
/// the atomic cursor that walks it: round robin's order, and least connections' scan starts.
#[derive(Debug)]
pub(crate) struct WeightedCycle {
    cycle: Box<[u32]>,
    cursor: AtomicUsize,
}

impl WeightedCycle {
    /// Builds the cycle from the backends' weights.
    pub(crate) fn new(backends: &[Backend]) -> Self {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        Self {
            cycle: smooth_cycle(&weights).into_boxed_slice(),
            cursor: AtomicUsize::new(0),
        }
    }

    /// Turns in one cycle.
    pub(crate) fn len(&self) -> usize {
        self.cycle.len()
    }

    /// Takes the next turn: its number and the backend index it names. Call only on a
    /// non-empty cycle.
    pub(crate) fn next(&self) -> (usize, usize) {
        let turn = self.cursor.fetch_add(1, Ordering::Relaxed);
        (turn, self.cycle[turn % self.cycle.len()] as usize)
    }
}

/// Whether `node` takes turn `turn`: always at full weight; inside its slow-start window only
/// its ramped share of turns, scattered through the cycle.
pub(crate) fn takes_turn(node: &Node, slow_start: Option<Duration>, turn: usize) -> bool {
    let permille = node.weight_permille(slow_start);
    permille >= 1000 || scramble(turn) % 1000 < permille
}

impl RoundRobin {
    /// Builds the cycle from the backends' weights.
    pub fn new(backends: &[Backend]) -> Self {
        Self {
            cycle: WeightedCycle::new(backends),
        }
    }

    /// The next node in the cycle that is routable, untried and has `room`.
    pub fn pick(
        &self,
        backends: &[Backend],
        tried: &[usize],
        slow_start: Option<Duration>,
        room: impl Fn(&Node) -> bool,
    ) -> Option<usize> {
        let len = self.cycle.len();
        // A node ramping up after slow start takes only some of its turns; if every candidate
        // declined, the first of them still beats a 503.
        let mut declined = None;
        // Skipping an unroutable (or full) node by taking the next turn hands its share to the
        // others in their relative order.
        for _ in 0..len {
            let (turn, index) = self.cycle.next();
            let node = &backends[index].node;
            if !node.is_routable() || tried.contains(&index) || !room(node) {
                continue;
            }
            if !takes_turn(node, slow_start, turn) {
                declined.get_or_insert(index);
                continue;
            }
            return Some(index);
        }
        // Concurrent picks interleave on the cursor, so `len` turns need not have visited every
        // node: before concluding nothing is routable, look at each one.
        declined.or_else(|| {
            (0..backends.len()).find(|index| {
                let node = &backends[*index].node;
                node.is_routable() && !tried.contains(index) && room(node)
            })
        })
    }
}

/// Spreads consecutive turn numbers over 0..u64::MAX (a Fibonacci hash), so a ramping node's
/// accepted turns are scattered through the cycle without a random number generator.
fn scramble(turn: usize) -> u64 {
    (turn as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20
}

/// One cycle of smooth weighted round robin over `weights`, reduced by their gcd.
pub(crate) fn smooth_cycle(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / divisor)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best as u32);
    }
    cycle
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycle_is_smooth_and_exact() {
        assert_eq!(smooth_cycle(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_cycle(&[1, 1, 1]), [0, 1, 2]);
        // Reduced by the gcd: 2:4:6 is 1:2:3.
        assert_eq!(smooth_cycle(&[2, 4, 6]).len(), 6);
        assert!(smooth_cycle(&[]).is_empty());
    }

    #[test]
    fn every_window_of_sum_weights_is_exact() {
        let weights = [1, 2, 3, 7];
        let cycle = smooth_cycle(&weights);
        let total = cycle.len();
        for start in 0..total {
            let mut counts = [0u32; 4];
            for k in 0..total {
                counts[cycle[(start + k) % total] as usize] += 1;
            }
            assert_eq!(counts, weights, "window starting at {start}");
        }
    }
}
