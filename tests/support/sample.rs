//! Random samples for property tests, and bounds that judge them.
//!
//! A sample is drawn from a generator seeded from the OS, so every run tries new inputs; the
//! seed is printed (and named in the helpers' failure messages) so a failure can be replayed
//! with `FULCRUM_TEST_SEED=SEED`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// How many standard deviations a count may stray before a test calls it wrong: about one
/// honest sample in 3.5 million falls outside, so a test judging a few dozen counts per run
/// does not flake, while a bias of a few percent over thousands of draws still shows.
pub const SIGMAS: f64 = 5.0;

/// A generator for `test`, seeded from `FULCRUM_TEST_SEED` or else from the OS; prints the seed.
pub fn rng(test: &str) -> (StdRng, u64) {
    let seed = match std::env::var("FULCRUM_TEST_SEED") {
        Ok(seed) => seed
            .parse()
            .unwrap_or_else(|_| panic!("FULCRUM_TEST_SEED={seed} is not a u64")),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: seed {seed} (FULCRUM_TEST_SEED={seed} replays this run)");
    (StdRng::seed_from_u64(seed), seed)
}

/// `n` distinct IPv4 addresses from anywhere in the address space, none of them in `except`.
pub fn distinct_v4(rng: &mut StdRng, n: usize, except: &[IpAddr]) -> Vec<IpAddr> {
    distinct(n, except, || {
        IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
    })
}

/// `n` distinct IPv6 addresses from anywhere in the address space, none of them in `except`.
pub fn distinct_v6(rng: &mut StdRng, n: usize, except: &[IpAddr]) -> Vec<IpAddr> {
    distinct(n, except, || {
        IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()))
    })
}

/// `n` distinct loopback addresses `127.a.b.c` (any of them can be bound as a source address
/// on Linux), with `c` in 1..=254, none of them in `except`.
pub fn distinct_loopback(rng: &mut StdRng, n: usize, except: &[IpAddr]) -> Vec<IpAddr> {
    distinct(n, except, || {
        IpAddr::V4(Ipv4Addr::new(
            127,
            rng.random(),
            rng.random(),
            rng.random_range(1..=254),
        ))
    })
}

fn distinct(n: usize, except: &[IpAddr], mut draw: impl FnMut() -> IpAddr) -> Vec<IpAddr> {
    let mut seen: HashSet<IpAddr> = except.iter().copied().collect();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let ip = draw();
        if seen.insert(ip) {
            out.push(ip);
        }
    }
    out
}

/// The widest distance from `n * p` that a Binomial(`n`, `p`) count may honestly fall at.
pub fn binomial_tolerance(n: usize, p: f64) -> f64 {
    SIGMAS * (n as f64 * p * (1.0 - p)).sqrt()
}

/// Asserts that `count` of `n` draws is a plausible Binomial(`n`, `p`) outcome.
pub fn assert_binomial(what: &str, count: usize, n: usize, p: f64, seed: u64) {
    let expected = n as f64 * p;
    let tolerance = binomial_tolerance(n, p);
    assert!(
        (count as f64 - expected).abs() <= tolerance,
        "{what}: {count} of {n}, expected {expected:.1} ± {tolerance:.1} ({SIGMAS} sigma) \
         [FULCRUM_TEST_SEED={seed}]"
    );
}
