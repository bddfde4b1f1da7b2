//! Active health checks: one task per node, supervised per pool.
//!
//! A node task sends `GET path` about every `interval` and feeds each verdict to a [`Counter`];
//! a transition is published by storing the node's health atomic, which is all the request path
//! reads. The counter is conservative: `fall` consecutive failures take a node out and `rise`
//! consecutive passes bring it back, so one slow check never flaps a node.
//!
//! Timing ([`next_start`], [`Jitter`]): the first check comes at a random offset within one
//! interval, so a large pool is not checked in lock-step, and each later one a jittered interval
//! (±10 %, as HAProxy's `spread-checks` and Envoy's `interval_jitter_percent` do) after the
//! previous one started, but never before it ended: `timeout` may exceed `interval`, and checks
//! of one node never overlap. A pool change (API, reload, registry) wakes the supervisor and the
//! node tasks, so a new node is checked at once and a reloaded interval applies at once.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rand::RngExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::base::config::HealthConfig;
use crate::base::error::root_cause;
use crate::control::history::History;
use crate::model::pool::{Backend, Health, Node, Pool};

/// Health answers larger than this are judged by status alone.
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// Each interval between two checks is stretched or shrunk by up to this share, so checks that
/// started together drift apart instead of hitting a backend in bursts.
const JITTER_PERCENT: u32 = 10;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Pass,
    Fail(String),
}

/// A node's consecutive-result counter: the whole up/down decision, as a pure state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Counter {
    up: bool,
    passes: u32,
    failures: u32,
}

impl Counter {
    pub(crate) fn new(up: bool) -> Self {
        Self {
            up,
            passes: 0,
            failures: 0,
        }
    }

    #[cfg(test)]
    pub(crate) fn is_up(&self) -> bool {
        self.up
    }

    /// Records one check; returns the new state when this check changed it.
    pub(crate) fn record(&mut self, passed: bool, rise: u32, fall: u32) -> Option<bool> {
        if passed {
            self.failures = 0;
            self.passes = self.passes.saturating_add(1);
            if !self.up && self.passes >= rise {
                self.up = true;
                return Some(true);
            }
        } else {
            self.passes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= fall {
                self.up = false;
                return Some(false);
            }
        }
        None
    }
}

/// The random parts of a node's check schedule.
#[derive(Debug)]
pub(crate) struct Jitter<R> {
    rng: R,
}

impl Jitter<rand::rngs::SmallRng> {
    /// Seeded once per node task from the thread-local generator, which itself cannot be held
    /// across an `await`. Not a secret: a fast non-cryptographic generator will do.
    pub(crate) fn from_os() -> Self {
        Self::new(rand::make_rng())
    }
}

impl<R: rand::Rng> Jitter<R> {
    pub(crate) fn new(rng: R) -> Self {
        Self { rng }
    }

    /// When a node's first check comes: anywhere within one interval.
    pub(crate) fn first_offset(&mut self, interval: Duration) -> Duration {
        interval.mul_f64(self.rng.random_range(0.0..1.0))
    }

    /// The time from one check's start to the next one's: `interval` ±10 %.
    pub(crate) fn interval(&mut self, interval: Duration) -> Duration {
        let spread = f64::from(JITTER_PERCENT) / 100.0;
        interval.mul_f64(self.rng.random_range(1.0 - spread..=1.0 + spread))
    }
}

/// When the check after one that ran from `started` to `ended` may start: one (jittered)
/// `interval` after the previous start, or when the previous check ended if that is later.
/// Checks of a node therefore never overlap, whatever `timeout` is.
pub(crate) fn next_start(started: Instant, ended: Instant, interval: Duration) -> Instant {
    (started + interval).max(ended)
}

/// The client checks go through: keep-alive, so a check reuses the node's connection.
type CheckClient = Client<HttpConnector, Empty<Bytes>>;

/// Starts checking every node of `pool` until `shutdown`. A node that joins the pool gets its
/// task as soon as the pool changes; a node's task ends when it leaves the pool. Each check's
/// result goes to `history` for the status page.
pub(crate) fn spawn_checker(pool: Arc<Pool>, history: Arc<History>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tasks: HashMap<Arc<str>, CancellationToken> = HashMap::new();
        loop {
            // Registered before the snapshot is read, so a change published in between is
            // not missed.
            let mut changed = pin!(pool.changed.notified());
            changed.as_mut().enable();
            let snapshot = pool.snapshot();
            tasks.retain(|name, token| {
                let present = snapshot.backends.iter().any(|b| &b.node.name == name);
                if !present {
                    token.cancel();
                }
                present
            });
            for backend in snapshot.backends.iter() {
                if !tasks.contains_key(&backend.node.name) {
                    let token = shutdown.child_token();
                    tasks.insert(backend.node.name.clone(), token.clone());
                    tokio::spawn(check_node(
                        pool.clone(),
                        backend.node.name.clone(),
                        history.clone(),
                        token,
                    ));
                }
            }
            // Changes wake it; the timer, at the current interval, is only a safety net.
            tokio::select! {
                () = tokio::time::sleep(snapshot.settings.health.interval) => {}
                () = changed => {}
                () = shutdown.cancelled() => break,
            }
        }
    });
}

async fn check_node(
    pool: Arc<Pool>,
    name: Arc<str>,
    history: Arc<History>,
    stop: CancellationToken,
) {
    let mut plan = CheckPlan::new(pool.snapshot().settings.health.clone());
    loop {
        let mut changed = pin!(pool.changed.notified());
        changed.as_mut().enable();
        let snapshot = pool.snapshot();
        plan.follow(&snapshot.settings.health);
        if Instant::now() < plan.next {
            tokio::select! {
                () = tokio::time::sleep_until(plan.next) => {}
                () = changed => continue,
                () = stop.cancelled() => return,
            }
        }
        if stop.is_cancelled() {
            return;
        }
        let started = Instant::now();
        // Absent for now (a swap in progress): the supervisor ends this task if it stays away,
        // and must not find it gone if the name comes straight back.
        let Some(backend) = snapshot.backends.iter().find(|b| b.node.name == name) else {
            plan.next = started + plan.jitter.interval(plan.settings.interval);
            continue;
        };
        // Nothing else visits a quiet pool's idle upstream connections: close the stale ones.
        backend
            .node
            .idle
            .expire(snapshot.settings.idle_pool_timeout);
        let verdict = tokio::select! {
            verdict = check(&plan.client, backend, &plan.settings) => verdict,
            () = stop.cancelled() => return,
        };
        // The node moved while it was being checked: the verdict is about the old address.
        if pool
            .snapshot()
            .backends
            .iter()
            .find(|b| b.node.name == name)
            .is_none_or(|b| b.address != backend.address)
        {
            plan.next = Instant::now();
            continue;
        }
        let reason = match &verdict {
            Verdict::Pass => None,
            Verdict::Fail(reason) => Some(reason.as_str()),
        };
        history.checked(&pool.name, &backend.node, started.elapsed(), reason);
        plan.record(&pool, backend, &verdict);
        plan.done(started);
    }
}

/// One node's checking: the settings and client in use, when the next check is due, and the
/// streak of results that decides up and down.
struct CheckPlan {
    settings: HealthConfig,
    client: CheckClient,
    jitter: Jitter<rand::rngs::SmallRng>,
    next: Instant,
    /// Start and end of the last check, from which a changed interval re-plans the next one.
    last: Option<(Instant, Instant)>,
    /// The streak, and the node and address it is about.
    streak: Option<(Counter, Arc<Node>, SocketAddr)>,
}

impl CheckPlan {
    fn new(settings: HealthConfig) -> Self {
        let mut jitter = Jitter::from_os();
        Self {
            client: check_client(&settings),
            next: Instant::now() + jitter.first_offset(settings.interval),
            jitter,
            settings,
            last: None,
            streak: None,
        }
    }

    /// A reload changed the checks: adopt the new interval, timeout and path now, not after a
    /// wait of the old interval.
    fn follow(&mut self, settings: &HealthConfig) {
        if *settings == self.settings {
            return;
        }
        self.settings = settings.clone();
        self.client = check_client(settings);
        let interval = settings.interval;
        self.next = match self.last {
            Some((started, ended)) => next_start(started, ended, self.jitter.interval(interval)),
            None => self
                .next
                .min(Instant::now() + self.jitter.first_offset(interval)),
        };
    }

    /// Counts a verdict and publishes the transition it completes, if any. A node removed and
    /// re-added under the same name is a new node (pending), and a node that moved has proven
    /// nothing at its new address: neither inherits the old streak.
    fn record(&mut self, pool: &Pool, backend: &Backend, verdict: &Verdict) {
        let node = &backend.node;
        let same = self
            .streak
            .as_ref()
            .is_some_and(|(_, current, at)| Arc::ptr_eq(current, node) && *at == backend.address);
        if !same {
            let counter = Counter::new(node.health() == Health::Up);
            self.streak = Some((counter, node.clone(), backend.address));
        }
        let Some((counter, _, _)) = self.streak.as_mut() else {
            return;
        };
        let passed = *verdict == Verdict::Pass;
        if passed {
            node.metrics.checks_passed.increment(1);
        } else {
            node.metrics.checks_failed.increment(1);
        }
        let (rise, fall) = (self.settings.rise, self.settings.fall);
        if let Some(up) = counter.record(passed, rise, fall) {
            transition(pool, backend, up, verdict, &self.settings);
        }
    }

    /// The check that began at `started` has ended: the next one is due one jittered interval
    /// after that start, and never before this end.
    fn done(&mut self, started: Instant) {
        let ended = Instant::now();
        self.last = Some((started, ended));
        self.next = next_start(started, ended, self.jitter.interval(self.settings.interval));
    }
}

fn transition(
    pool: &Pool,
    backend: &Backend,
    up: bool,
    verdict: &Verdict,
    settings: &HealthConfig,
) {
    let node = &backend.node;
    if up {
        pool.journal
            .record(&node.name, "up", format!("{} checks passed", settings.rise));
    } else {
        pool.journal.record(&node.name, "down", verdict.to_string());
    }
    let pool = &*pool.name;
    if up {
        node.set_health(Health::Up);
        node.metrics.went_up.increment(1);
        info!(pool, backend = %node.name, address = %backend.address, to = "up", passes = settings.rise, "backend is up");
    } else {
        node.set_health(Health::Down);
        node.metrics.went_down.increment(1);
        warn!(pool, backend = %node.name, address = %backend.address, to = "down", failures = settings.fall, reason = %verdict, "backend is down");
    }
}

fn check_client(settings: &HealthConfig) -> CheckClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(settings.timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_max_idle_per_host(1)
        // Idle longer than two intervals means checks stopped; don't keep the socket.
        .pool_idle_timeout(settings.interval * 2 + Duration::from_secs(1))
        .build(connector)
}

/// One check: 2xx, and when the body is JSON with a `status` field, `"UP"`.
async fn check(client: &CheckClient, backend: &Backend, settings: &HealthConfig) -> Verdict {
    let uri = format!("http://{}{}", backend.address, settings.path);
    let request = match Request::get(uri)
        .header(header::HOST, backend.authority.as_str())
        .header(header::USER_AGENT, "fulcrum-health")
        .body(Empty::new())
    {
        Ok(request) => request,
        Err(e) => return Verdict::Fail(format!("bad check request: {e}")),
    };
    let exchange = async {
        let response = client.request(request).await.map_err(|e| {
            if e.is_connect() {
                format!("connect failed: {}", root_cause(&e))
            } else {
                format!("request failed: {}", root_cause(&e))
            }
        })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_HEALTH_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok::<_, String>((status, body))
    };
    match tokio::time::timeout(settings.timeout, exchange).await {
        Err(_) => Verdict::Fail(format!("no answer within {:?}", settings.timeout)),
        Ok(Err(reason)) => Verdict::Fail(reason),
        Ok(Ok((status, body))) => {
            if let Some(connections) = reported_connections(&body) {
                backend.node.set_reported_connections(connections);
            }
            judge(status, &body)
        }
    }
}

/// The seed's `systemMetrics.activeConnections`, when the answer is its health schema.
fn reported_connections(body: &[u8]) -> Option<u64> {
    let json = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    json.get("systemMetrics")?
        .get("activeConnections")?
        .as_u64()
}

/// The pass rule of the contract, on an answer already received.
pub(crate) fn judge(status: StatusCode, body: &[u8]) -> Verdict {
    if !status.is_success() {
        return Verdict::Fail(format!("status {}", status.as_u16()));
    }
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body)
        && let Some(reported) = json.get("status")
    {
        return match reported.as_str() {
            Some("UP") => Verdict::Pass,
            Some(other) => Verdict::Fail(format!("reports status {other}")),
            None => Verdict::Fail(format!("reports status {reported}")),
        };
    }
    Verdict::Pass
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Pass => f.write_str("pass"),
            Verdict::Fail(reason) => f.write_str(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_failures_take_a_node_out_and_three_passes_bring_it_back() {
        let mut c = Counter::new(true);
        assert_eq!(c.record(false, 3, 3), None);
        assert_eq!(c.record(false, 3, 3), None);
        assert_eq!(c.record(false, 3, 3), Some(false));
        assert_eq!(c.record(false, 3, 3), None, "already down");
        assert_eq!(c.record(true, 3, 3), None);
        assert_eq!(c.record(true, 3, 3), None);
        assert_eq!(c.record(true, 3, 3), Some(true));
    }

    #[test]
    fn alternating_results_never_flap() {
        let mut c = Counter::new(true);
        for i in 0..100 {
            assert_eq!(c.record(i % 2 == 0, 3, 3), None);
        }
        assert!(c.is_up());
        let mut c = Counter::new(false);
        for i in 0..100 {
            assert_eq!(
                c.record(i % 3 != 0, 3, 3),
                None,
                "two passes then a failure never rise"
            );
        }
        assert!(!c.is_up());
    }

    #[test]
    fn a_pending_node_needs_rise_passes() {
        let mut c = Counter::new(false);
        assert_eq!(c.record(true, 2, 3), None);
        assert_eq!(c.record(true, 2, 3), Some(true));
    }

    #[test]
    fn the_next_check_waits_for_the_interval_and_for_the_previous_one_to_end() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // A quick check: one interval after it started.
        assert_eq!(next_start(t0, t0 + ms(20), ms(100)), t0 + ms(100));
        // A check slower than the interval: straight after it ended, never during it.
        assert_eq!(next_start(t0, t0 + ms(300), ms(100)), t0 + ms(300));
        assert_eq!(next_start(t0, t0 + ms(100), ms(100)), t0 + ms(100));
    }

    #[test]
    fn every_interval_is_jittered_within_ten_percent_and_the_first_check_within_one() {
        let interval = Duration::from_millis(1000);
        let mut jitter = Jitter::from_os();
        let delays: Vec<Duration> = (0..1000).map(|_| jitter.interval(interval)).collect();
        for delay in &delays {
            assert!(
                (Duration::from_millis(900)..=Duration::from_millis(1100)).contains(delay),
                "{delay:?}"
            );
        }
        let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        assert!(
            *max - *min > Duration::from_millis(150),
            "the spread uses most of ±10 %, not a constant: {min:?}..{max:?}"
        );
        let offsets: Vec<Duration> = (0..1000).map(|_| jitter.first_offset(interval)).collect();
        assert!(offsets.iter().all(|o| *o < interval));
        assert!(
            offsets.iter().any(|o| *o < interval / 4)
                && offsets.iter().any(|o| *o > interval * 3 / 4),
            "first checks spread over the whole interval"
        );
    }

    #[test]
    fn judge_reads_status_and_the_seed_body() {
        assert_eq!(judge(StatusCode::OK, b"ok"), Verdict::Pass);
        assert_eq!(judge(StatusCode::NO_CONTENT, b""), Verdict::Pass);
        assert_eq!(
            judge(StatusCode::OK, br#"{"status":"UP","x":1}"#),
            Verdict::Pass
        );
        assert_eq!(
            judge(StatusCode::OK, br#"{"other":"field"}"#),
            Verdict::Pass
        );
        assert!(
            matches!(judge(StatusCode::OK, br#"{"status":"DOWN"}"#), Verdict::Fail(r) if r.contains("DOWN"))
        );
        assert!(matches!(
            judge(StatusCode::OK, br#"{"status":"DRAINING"}"#),
            Verdict::Fail(_)
        ));
        assert!(matches!(
            judge(StatusCode::OK, br#"{"status":false}"#),
            Verdict::Fail(_)
        ));
        assert!(
            matches!(judge(StatusCode::INTERNAL_SERVER_ERROR, b"{\"status\":\"UP\"}"), Verdict::Fail(r) if r == "status 500")
        );
    }
}
