//! Nanoseconds per backend pick, for each strategy at 3, 30 and 300 backends, from one thread
//! and from two threads picking from the same snapshot at once.
//!
//! A pick is the only balancing work on the request path, so this is the cost the strategy adds
//! to every request. The two-thread cases show what sharing the snapshot's atomics (the round
//! robin cursor, least connections' rotating start) costs when both cores pick: their time is
//! the slower thread's wall time divided by its picks.
//!
//! Run with `cargo bench --bench pick`; it takes about a minute and a half.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a bench setup that fails should stop

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use fulcrum::balance::{Pick, client_key};
use fulcrum::config::{BackendConfig, BackendProtocol, HealthConfig, PoolConfig, Strategy};
use fulcrum::pool::{InFlight, Pool, PoolState};

const SIZES: [usize; 3] = [3, 30, 300];
const STRATEGIES: [Strategy; 3] = [
    Strategy::RoundRobin,
    Strategy::LeastConnections,
    Strategy::IpHash,
];
const THREADS: usize = 2;

fn pool_config(strategy: Strategy, backends: usize) -> PoolConfig {
    PoolConfig {
        strategy,
        backend_protocol: BackendProtocol::Http1,
        slow_start: None,
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(30),
        retries: 2,
        idle_pool_timeout: Duration::from_secs(90),
        max_connections_per_backend: None,
        queue_timeout: Duration::from_secs(5),
        backends: (0..backends)
            .map(|i| BackendConfig {
                name: format!("node-{i}"),
                address: SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)),
                // Weights 1, 2, 3, 4 repeating: round robin's cycle is 2.5x the node count and
                // interleaves heavy and light nodes, as a real mixed fleet would.
                weight: (i % 4) as u32 + 1,
                max_connections: None,
            })
            .collect(),
        health: HealthConfig {
            path: "/healthz".to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            fall: 3,
            rise: 3,
        },
        sticky: Default::default(),
    }
}

/// One pick as a request would make it: ip_hash gets a different client each time.
fn pick_once(snapshot: &PoolState, client: u64) -> Option<usize> {
    snapshot.pick_for(&Pick {
        client: client_key(IpAddr::from((client as u32).to_be_bytes())),
        ..Pick::plain(None)
    })
}

/// Requests "in flight" on every third node (0 to 3 each), so least connections compares real,
/// unequal loads instead of scanning a pool of ties. Dropping the guards ends them.
fn hold_load(snapshot: &PoolState) -> Vec<InFlight> {
    let now = Instant::now();
    snapshot
        .backends
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 0)
        .flat_map(|(i, b)| (0..i % 4).map(move |_| InFlight::start(b.node.clone(), now)))
        .collect()
}

/// Each of `THREADS` threads does `iters` picks once all are ready; the slowest one's wall time
/// is the answer, so contention is charged in full.
fn contended_picks(snapshot: &PoolState, iters: u64) -> Duration {
    let start_line = Barrier::new(THREADS);
    thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                scope.spawn(|| {
                    start_line.wait();
                    let started = Instant::now();
                    for client in 0..iters {
                        black_box(pick_once(snapshot, client));
                    }
                    started.elapsed()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("picking thread panicked"))
            .max()
            .unwrap_or_default()
    })
}

fn bench_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for strategy in STRATEGIES {
        for size in SIZES {
            let pool = Pool::new("bench", &pool_config(strategy, size));
            let snapshot: Arc<PoolState> = pool.snapshot();
            let _load = match strategy {
                Strategy::LeastConnections => hold_load(&snapshot),
                _ => Vec::new(),
            };
            let name = format!("{}/{size}", strategy.as_str());
            let mut client = 0;
            group.bench_function(&name, |b| {
                b.iter(|| {
                    client += 1;
                    black_box(pick_once(&snapshot, client))
                })
            });
            group.bench_function(format!("{name}/{THREADS}threads"), |b| {
                b.iter_custom(|iters| contended_picks(&snapshot, iters))
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // About 2.5 s per case, 18 cases: the whole run stays near a minute.
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(20);
    targets = bench_pick
}
criterion_main!(benches);
