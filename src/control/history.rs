//! The status page's memory: the last five minutes of every node, and each node's last health
//! check.
//!
//! A sampler task ticks once per second and reads what the request path already keeps (the
//! node's request and failure counters, the buckets of its `fulcrum_request_duration_seconds`
//! histogram): the request path does no extra work and takes no lock for it. Each node keeps
//! [`SAMPLES`] samples in a ring allocated once (56 bytes a sample, under 17 KB a node), so
//! memory is bounded by the number of nodes; a node that leaves its pool loses its history at
//! the next tick, and a node re-added under the same name starts a fresh one.
//!
//! Everything here is behind one mutex, taken once a second by the sampler, once per check by
//! the health checker and once per render by the status page: control-plane traffic only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::control::state_name;
use crate::datapath::proxy::Router;
use crate::model::pool::Node;

/// Samples kept per node: five minutes at one a second.
pub(crate) const SAMPLES: usize = 300;

/// How often the sampler reads the counters.
pub(crate) const TICK: Duration = Duration::from_secs(1);

/// The quantile the charts and the table show.
const QUANTILE: f64 = 0.99;

/// One reading of a node's counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    /// When it was taken.
    pub at: Instant,
    /// Requests ever sent to the node, at `at`.
    pub requests: u64,
    /// Requests the node ever failed, at `at`.
    pub failures: u64,
    /// p99 of the requests that ended since the previous sample, in seconds; `None` when none
    /// ended.
    pub p99: Option<f32>,
    /// The node's state word (`up`, `down`, `pending`, `draining`, `cooling`).
    pub state: &'static str,
}

/// A fixed ring of the newest [`SAMPLES`] samples: allocated once, never grows.
#[derive(Debug)]
pub(crate) struct Ring {
    slots: Vec<Sample>,
    /// Where the next sample goes once the ring is full.
    next: usize,
}

impl Ring {
    fn new() -> Self {
        Self {
            slots: Vec::with_capacity(SAMPLES),
            next: 0,
        }
    }

    fn push(&mut self, sample: Sample) {
        if self.slots.len() < SAMPLES {
            self.slots.push(sample);
        } else {
            self.slots[self.next] = sample;
            self.next = (self.next + 1) % SAMPLES;
        }
    }

    /// Oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Sample> {
        let (newer, older) = self.slots.split_at(self.next);
        older.iter().chain(newer)
    }

    /// How many samples it holds (at most [`SAMPLES`]).
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

/// The rates between two consecutive samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Point {
    /// When the interval ended.
    pub at: Instant,
    /// Requests per second sent to the node over the interval.
    pub requests: f64,
    /// Failures per second over the interval.
    pub failures: f64,
    /// p99 latency in seconds of the requests that ended in the interval.
    pub p99: Option<f32>,
    /// The node's state at the end of the interval.
    pub state: &'static str,
}

/// A node's last active health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Check {
    /// When it ended.
    pub at: SystemTime,
    /// Whether it passed.
    pub passed: bool,
    /// How long it took.
    pub took: Duration,
    /// Why it failed (`status 503`, `connect failed: ...`); empty when it passed.
    pub reason: String,
}

/// Everything remembered about one node.
#[derive(Debug)]
pub(crate) struct NodeHistory {
    /// The node this history is about: a node re-added under the same name is another one.
    node: Weak<Node>,
    /// The tick that last saw the node in its pool.
    seen: u64,
    /// The samples, oldest first.
    pub samples: Ring,
    /// The latency buckets at the newest sample, for the next one's p99.
    buckets: Vec<u64>,
    /// Its last health check, once there has been one.
    pub check: Option<Check>,
}

impl NodeHistory {
    fn new(node: &Arc<Node>) -> Self {
        Self {
            node: Arc::downgrade(node),
            seen: 0,
            samples: Ring::new(),
            buckets: Vec::new(),
            check: None,
        }
    }

    /// Takes one sample: the counters now, and the p99 of the requests that ended since the
    /// previous sample from the difference of the latency buckets (`bounds`, `buckets`).
    pub(crate) fn record(
        &mut self,
        at: Instant,
        (requests, failures): (u64, u64),
        (bounds, buckets): (&[f64], &[u64]),
        state: &'static str,
    ) {
        let p99 = if self.buckets.len() == buckets.len() {
            let delta: Vec<u64> = buckets
                .iter()
                .zip(&self.buckets)
                .map(|(now, before)| now.saturating_sub(*before))
                .collect();
            quantile(QUANTILE, bounds, &delta)
        } else {
            // The first sample: whatever ended before it did not end within one tick.
            None
        };
        self.buckets.clear();
        self.buckets.extend_from_slice(buckets);
        self.samples.push(Sample {
            at,
            requests,
            failures,
            p99: p99.map(|s| s as f32),
            state,
        });
    }

    /// The rates between consecutive samples, oldest first: one point fewer than samples.
    pub(crate) fn points(&self) -> Vec<Point> {
        let mut points = Vec::with_capacity(self.samples.len());
        let mut previous: Option<&Sample> = None;
        for sample in self.samples.iter() {
            if let Some(before) = previous {
                let secs = sample.at.saturating_duration_since(before.at).as_secs_f64();
                if secs > 0.0 {
                    points.push(Point {
                        at: sample.at,
                        requests: sample.requests.saturating_sub(before.requests) as f64 / secs,
                        failures: sample.failures.saturating_sub(before.failures) as f64 / secs,
                        p99: sample.p99,
                        state: sample.state,
                    });
                }
            }
            previous = Some(sample);
        }
        points
    }

    /// Requests and failures per second from the oldest sample of the last `window` to `now`
    /// (counters `current` read at `now`): what the table shows, current to the moment of the
    /// render. `None` until a sample at least `min` old exists.
    pub(crate) fn recent_rates(
        &self,
        now: Instant,
        current: (u64, u64),
        window: Duration,
        min: Duration,
    ) -> Option<(f64, f64)> {
        let from = self.samples.iter().find(|s| {
            let age = now.saturating_duration_since(s.at);
            age <= window && age >= min
        })?;
        let secs = now.saturating_duration_since(from.at).as_secs_f64();
        Some((
            current.0.saturating_sub(from.requests) as f64 / secs,
            current.1.saturating_sub(from.failures) as f64 / secs,
        ))
    }
}

/// What the control plane remembers for the status page, by (pool, node name).
#[derive(Debug, Default)]
pub(crate) struct History {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
pub(crate) struct Inner {
    /// The sampler's ticks so far.
    tick: u64,
    /// By pool name, then node name.
    nodes: HashMap<Arc<str>, HashMap<Arc<str>, NodeHistory>>,
}

impl Inner {
    /// The history of `node` in `pool`, fresh when the name now belongs to another node.
    fn entry(&mut self, pool: &Arc<str>, node: &Arc<Node>) -> &mut NodeHistory {
        let history = self
            .nodes
            .entry(pool.clone())
            .or_default()
            .entry(node.name.clone())
            .or_insert_with(|| NodeHistory::new(node));
        if !std::ptr::eq(history.node.as_ptr(), Arc::as_ptr(node)) {
            *history = NodeHistory::new(node);
        }
        history
    }

    /// The history of `node` of `pool`, if it has one and it is about this very node.
    pub(crate) fn node(&self, pool: &str, node: &Arc<Node>) -> Option<&NodeHistory> {
        self.nodes
            .get(pool)?
            .get(&node.name)
            .filter(|h| std::ptr::eq(h.node.as_ptr(), Arc::as_ptr(node)))
    }
}

impl History {
    /// The whole history, locked: for a render.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Samples every node of `router` at `now`; forgets the nodes no longer in it.
    pub(crate) fn sample(&self, router: &Router, now: Instant) {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let mut buckets = Vec::new();
        for pool in router.pools() {
            for backend in pool.snapshot().backends.iter() {
                let node = &backend.node;
                let latency = &node.metrics.latency;
                latency.read_into(&mut buckets);
                let history = inner.entry(&pool.name, node);
                history.seen = tick;
                history.record(
                    now,
                    (node.requests(), node.failures()),
                    (latency.bounds(), &buckets),
                    state_name(node),
                );
            }
        }
        inner.nodes.retain(|_, nodes| {
            nodes.retain(|_, history| history.seen == tick);
            !nodes.is_empty()
        });
    }

    /// Records a health check of `node` in `pool` that ended now after `took`. `reason` is
    /// `None` for a pass.
    pub(crate) fn checked(
        &self,
        pool: &Arc<str>,
        node: &Arc<Node>,
        took: Duration,
        reason: Option<&str>,
    ) {
        let mut inner = self.lock();
        let nodes = inner.nodes.entry(pool.clone()).or_default();
        let history = nodes
            .entry(node.name.clone())
            .or_insert_with(|| NodeHistory::new(node));
        // A late verdict about a node since replaced under its name is not the newcomer's;
        // the sampler, which reads the pool, decides which node a name belongs to.
        if !std::ptr::eq(history.node.as_ptr(), Arc::as_ptr(node)) {
            return;
        }
        history.check = Some(Check {
            at: SystemTime::now(),
            passed: reason.is_none(),
            took,
            reason: reason.unwrap_or_default().to_owned(),
        });
    }
}

/// Samples every node of the router once per [`TICK`] until `shutdown`.
pub(crate) fn spawn_sampler(
    history: Arc<History>,
    router: Arc<ArcSwap<Router>>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(TICK);
        // A stalled runtime shows as a gap in the charts, not a burst of catch-up samples.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticks.tick() => history.sample(&router.load(), Instant::now()),
                () = shutdown.cancelled() => break,
            }
        }
    });
}

/// The `q` quantile of a histogram with upper `bounds` and per-bucket `counts` (one more than
/// bounds: the last counts values above every bound), interpolated linearly within its bucket
/// as Prometheus' `histogram_quantile` does. `None` when the histogram is empty; the highest
/// bound when the quantile lies above it.
pub(crate) fn quantile(q: f64, bounds: &[f64], counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &count) in counts.iter().enumerate() {
        let through = below + count;
        if count > 0 && through as f64 >= rank {
            let Some(&upper) = bounds.get(i) else {
                return bounds.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            let share = (rank - below as f64) / count as f64;
            return Some(lower + (upper - lower) * share);
        }
        below = through;
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.001, 0.01, 0.1];

    fn history() -> NodeHistory {
        NodeHistory {
            node: Weak::new(),
            seen: 0,
            samples: Ring::new(),
            buckets: Vec::new(),
            check: None,
        }
    }

    #[test]
    fn rates_are_counter_deltas_over_the_time_between_samples() {
        let start = Instant::now();
        let mut node = history();
        let at = |ms: u64| start + Duration::from_millis(ms);
        node.record(at(0), (100, 7), (BOUNDS, &[5, 0, 0, 0]), "up");
        node.record(at(1000), (130, 7), (BOUNDS, &[5, 30, 0, 0]), "up");
        // A tick that came late: 40 requests over 2 s are 20 per second.
        node.record(at(3000), (170, 11), (BOUNDS, &[5, 30, 40, 0]), "down");
        let points = node.points();
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].requests, 30.0);
        assert_eq!(points[0].failures, 0.0);
        assert_eq!(points[1].requests, 20.0);
        assert_eq!(points[1].failures, 2.0);
        assert_eq!(points[1].state, "down");
        // The first sample has no interval; the second's 30 requests all took 1–10 ms, the
        // third's 10–100 ms: each p99 is interpolated within its own bucket.
        let p99s: Vec<Option<f32>> = node.samples.iter().map(|s| s.p99).collect();
        assert_eq!(p99s[0], None);
        assert!((p99s[1].unwrap() - 0.00991).abs() < 1e-6, "{p99s:?}");
        assert!((p99s[2].unwrap() - 0.0991).abs() < 1e-6, "{p99s:?}");
        // A counter that went backwards (never, but) reads as zero, not a wrap.
        node.record(at(4000), (10, 0), (BOUNDS, &[0, 0, 0, 0]), "up");
        assert_eq!(node.points()[2].requests, 0.0);
    }

    #[test]
    fn the_ring_keeps_the_newest_300_samples_in_order_and_never_grows() {
        let start = Instant::now();
        let mut node = history();
        for i in 0..1000u64 {
            node.record(
                start + Duration::from_secs(i),
                (i * 10, 0),
                (BOUNDS, &[0, 0, 0, 0]),
                "up",
            );
        }
        assert_eq!(node.samples.len(), SAMPLES);
        assert_eq!(node.samples.slots.capacity(), SAMPLES);
        // What the module's memory figure rests on.
        assert!(size_of::<Sample>() <= 56, "{}", size_of::<Sample>());
        let kept: Vec<u64> = node.samples.iter().map(|s| s.requests / 10).collect();
        assert_eq!(kept, (700..1000).collect::<Vec<_>>());
        assert_eq!(node.samples.iter().last().unwrap().requests, 9990);
        let points = node.points();
        assert_eq!(points.len(), SAMPLES - 1);
        assert!(points.iter().all(|p| p.requests == 10.0));
    }

    #[test]
    fn recent_rates_run_from_the_oldest_sample_in_the_window_to_now() {
        let start = Instant::now();
        let mut node = history();
        for i in 0..20u64 {
            node.record(
                start + Duration::from_secs(i),
                (i * 5, i),
                (BOUNDS, &[0, 0, 0, 0]),
                "up",
            );
        }
        let now = start + Duration::from_millis(19_500);
        let window = Duration::from_secs(10);
        let min = Duration::from_millis(500);
        // From the sample at 10 s (count 50, 10) to now (count 100, 19): 50 and 9 over 9.5 s.
        let (requests, failures) = node.recent_rates(now, (100, 19), window, min).unwrap();
        assert!((requests - 50.0 / 9.5).abs() < 1e-9, "{requests}");
        assert!((failures - 9.0 / 9.5).abs() < 1e-9, "{failures}");
        let fresh = history();
        assert_eq!(fresh.recent_rates(now, (1, 1), window, min), None);
    }

    fn router(backends: &[&str]) -> Router {
        let backends: Vec<String> = backends
            .iter()
            .enumerate()
            .map(|(i, name)| format!("{{ name = \"{name}\", address = \"127.0.0.1:{}\" }}", 9 + i))
            .collect();
        let toml = format!(
            "[[listeners]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n[pools.sampled]\nbackends = [{}]\n",
            backends.join(", ")
        );
        let config =
            crate::base::config::Config::parse(std::path::Path::new("t.toml"), &toml).unwrap();
        Router::new(&config)
    }

    #[tokio::test]
    async fn the_sampler_reads_the_nodes_counters_and_forgets_nodes_that_left() {
        let history = History::default();
        let router = router(&["a", "b"]);
        let pool = router.pools()[0].clone();
        let node = |name: &str| {
            pool.snapshot()
                .backends
                .iter()
                .find(|b| &*b.node.name == name)
                .map(|b| b.node.clone())
                .unwrap()
        };
        let (a, b) = (node("a"), node("b"));
        let start = Instant::now();
        history.sample(&router, start);
        // 30 requests to `a` that end at once, the way the request path counts them.
        for _ in 0..30 {
            drop(crate::model::pool::InFlight::start(
                a.clone(),
                Instant::now(),
            ));
        }
        a.failed();
        history.sample(&router, start + Duration::from_secs(2));
        history.checked(&pool.name, &b, Duration::from_millis(3), Some("status 503"));
        {
            let inner = history.lock();
            let points = inner.node("sampled", &a).unwrap().points();
            assert_eq!(points.len(), 1);
            assert_eq!((points[0].requests, points[0].failures), (15.0, 0.5));
            // Each took well under the first bucket's 100 µs.
            assert!(points[0].p99.unwrap() <= 0.0001, "{points:?}");
            let b_history = inner.node("sampled", &b).unwrap();
            assert_eq!(b_history.points()[0].requests, 0.0);
            assert_eq!(b_history.points()[0].p99, None);
            let check = b_history.check.as_ref().unwrap();
            assert!(!check.passed && check.reason == "status 503");
        }
        // `b` leaves the pool: its history goes at the next tick; `a` keeps its own.
        let without_b = router_config_without_b();
        pool.replace(&without_b.pools["sampled"]);
        history.sample(&router, start + Duration::from_secs(3));
        let inner = history.lock();
        assert!(inner.node("sampled", &b).is_none());
        assert_eq!(inner.nodes["sampled"].len(), 1);
        assert_eq!(inner.node("sampled", &a).unwrap().samples.len(), 3);
    }

    fn router_config_without_b() -> crate::base::config::Config {
        let toml = "[[listeners]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n[pools.sampled]\nbackends = [{ name = \"a\", address = \"127.0.0.1:9\" }]\n";
        crate::base::config::Config::parse(std::path::Path::new("t.toml"), toml).unwrap()
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_as_prometheus_does() {
        assert_eq!(quantile(0.99, BOUNDS, &[0, 0, 0, 0]), None);
        assert_eq!(quantile(0.5, BOUNDS, &[10, 0, 0, 0]), Some(0.0005));
        assert_eq!(quantile(0.99, BOUNDS, &[0, 0, 0, 3]), Some(0.1));
        let p = quantile(0.99, BOUNDS, &[50, 50, 0, 0]).unwrap();
        assert!((p - (0.001 + 0.009 * 0.98)).abs() < 1e-12, "{p}");
    }
}
