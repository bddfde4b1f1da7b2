//! Client address onto nodes by weighted rendezvous hashing.
//!
//! Every node scores every client with a hash of (node, client); the best score among the
//! routable nodes wins. Taking a node away only moves the clients it was winning, and adding one
//! moves only the clients it now wins, about 1/(N+1) of them. Health changes need no rebuild:
//! an unroutable node is skipped at pick time, so the checker never has to touch this state.
//! Maglev would make a pick O(1), but its table must be rebuilt (and disrupts more than the dead
//! node's clients) whenever the routable set changes; at the pool sizes a web tier has, a scan of
//! a few ns per node is cheaper than that bookkeeping (see `benches/pick.rs`).
//!
//! The hash is fixed (SHA-256 of the name for the node, a 64-bit finalizer for the mix), so every
//! instance and every restart maps a client to the same node.

use std::net::IpAddr;

use sha2::{Digest, Sha256};

use super::Pick;
use crate::model::node::Backend;

/// `ip_hash`: weighted rendezvous hashing of the client address, so a node's removal moves
/// only its own clients.
#[derive(Debug)]
pub struct IpHash {
    /// One per backend, in snapshot order: the node's name hashed.
    seeds: Box<[u64]>,
    /// All weights equal: compare raw hashes and skip the logarithm.
    uniform: bool,
}

impl IpHash {
    /// Hashes each backend's name once per snapshot.
    pub fn new(backends: &[Backend]) -> Self {
        Self {
            seeds: backends.iter().map(|b| node_seed(&b.node.name)).collect(),
            uniform: backends.windows(2).all(|w| w[0].weight == w[1].weight),
        }
    }

    /// The routable, untried node with the highest weighted score for `pick.client`, or `None`.
    pub fn pick(&self, backends: &[Backend], pick: &Pick<'_>) -> Option<usize> {
        let candidates = backends
            .iter()
            .enumerate()
            .filter(|(i, b)| b.node.is_routable() && !pick.tried.contains(i));
        if self.uniform && pick.slow_start.is_none() {
            return candidates
                .max_by_key(|(i, _)| mix(self.seeds[*i] ^ pick.client))
                .map(|(i, _)| i);
        }
        // Weighted rendezvous: the node with the smallest -ln(u) / weight wins, which gives each
        // node a share proportional to its weight (Schindelhauer and Schomaker, 2005).
        let mut best: Option<(usize, f64)> = None;
        for (i, backend) in candidates {
            let weight =
                f64::from(backend.weight) * backend.node.weight_permille(pick.slow_start) as f64;
            let score = -unit_interval(mix(self.seeds[i] ^ pick.client)).ln() / weight;
            if best.is_none_or(|(_, best_score)| score < best_score) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }
}

/// The 64-bit key of a client address. An IPv4-mapped IPv6 address is the IPv4 client it is.
pub fn client_key(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => mix(u64::from(u32::from(v4))),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            mix((bits >> 64) as u64 ^ mix(bits as u64))
        }
    }
}

#[expect(clippy::expect_used, reason = "a SHA-256 digest has 32 bytes")]
fn node_seed(name: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(b"fulcrum ip_hash node v1\0")
        .chain_update(name.as_bytes())
        .finalize();
    u64::from_be_bytes(
        digest[..8]
            .try_into()
            .expect("a SHA-256 digest has 32 bytes"),
    )
}

/// MurmurHash3's 64-bit finalizer: every input bit flips about half the output bits.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Maps a hash into (0, 1), never 0, so its logarithm is finite.
fn unit_interval(hash: u64) -> f64 {
    ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}
