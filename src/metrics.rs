//! Metric names, their help text, the Prometheus recorder, and the per-node handles the request
//! path uses.
//!
//! Handles are resolved when a pool snapshot is built, so a request bumps atomics and never
//! formats a label or hashes a key on the hot path.

use std::sync::{Arc, OnceLock};

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::balance::sticky::Outcome;

pub const REQUESTS_TOTAL: &str = "fulcrum_requests_total";
pub const REQUEST_DURATION: &str = "fulcrum_request_duration_seconds";
pub const BACKEND_IN_FLIGHT: &str = "fulcrum_backend_in_flight";
pub const PROXY_ERRORS_TOTAL: &str = "fulcrum_proxy_errors_total";
pub const DOWNSTREAM_CONNECTIONS: &str = "fulcrum_downstream_connections";
pub const BACKEND_UP: &str = "fulcrum_backend_up";
pub const HEALTH_CHECKS_TOTAL: &str = "fulcrum_health_checks_total";
pub const BACKEND_TRANSITIONS_TOTAL: &str = "fulcrum_backend_transitions_total";
pub const RETRIES_TOTAL: &str = "fulcrum_retries_total";
pub const STICKY_TOTAL: &str = "fulcrum_sticky_total";
pub const TLS_HANDSHAKES_TOTAL: &str = "fulcrum_tls_handshakes_total";
pub const POOL_QUEUE_DEPTH: &str = "fulcrum_pool_queue_depth";

/// The `backend` label of answers fulcrum gives itself, and the `pool` label when no route matched.
pub const NONE: &str = "none";

/// Seconds; from a cache hit on loopback (100 µs) to the default response timeout (30 s).
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Installs the process-wide Prometheus recorder once and returns the handle that renders it.
///
/// Several balancers in one process (the tests do this) share it; their series differ by label.
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.to_owned()), DURATION_BUCKETS)
            .expect("bucket list is non-empty")
            .install_recorder()
            .expect("no other metrics recorder is installed in this process");
        describe();
        handle
    })
}

fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        "Responses sent to clients, by pool, backend and status code."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from receiving a request to the end of its response body."
    );
    describe_gauge!(
        BACKEND_IN_FLIGHT,
        "Requests in flight to a backend, counted until the response body ends."
    );
    describe_counter!(
        PROXY_ERRORS_TOTAL,
        "Requests fulcrum could not complete with a backend, by kind (connect, timeout, reset, no_backend, queue_timeout)."
    );
    describe_gauge!(
        DOWNSTREAM_CONNECTIONS,
        "Open client connections, by listener."
    );
    describe_counter!(
        STICKY_TOTAL,
        "Responses of sticky_cookie pools: hit (the cookie's node served), new (no valid cookie), rerouted (the cookie's node was down or gone)."
    );
    describe_gauge!(
        POOL_QUEUE_DEPTH,
        "Requests waiting in a pool's queue because every node they may use is at its max_connections."
    );
    describe_counter!(
        TLS_HANDSHAKES_TOTAL,
        "TLS handshakes on client connections, by listener and result (ok, error, timeout)."
    );
}

/// Why a request failed upstream: the `kind` label of `fulcrum_proxy_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Timeout,
    Reset,
    NoBackend,
    /// Waited `queue_timeout` for room on a capped node and got none.
    QueueTimeout,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::NoBackend => "no_backend",
            ErrorKind::QueueTimeout => "queue_timeout",
        }
    }
}

/// Status codes common enough to deserve a pre-resolved counter; others take the slow path.
const COMMON_CODES: [u16; 20] = [
    200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 408, 413, 429, 431, 500, 502, 503,
    504,
];

/// `fulcrum_requests_total` for one (pool, backend), one lazily created counter per status code.
#[derive(Debug)]
pub struct ResponseCounters {
    pool: Arc<str>,
    backend: Arc<str>,
    common: [OnceLock<Counter>; COMMON_CODES.len()],
}

impl ResponseCounters {
    pub fn new(pool: Arc<str>, backend: Arc<str>) -> Self {
        Self {
            pool,
            backend,
            common: Default::default(),
        }
    }

    pub fn record(&self, code: u16) {
        match COMMON_CODES.iter().position(|&c| c == code) {
            Some(i) => self.common[i]
                .get_or_init(|| self.counter(code))
                .increment(1),
            None => self.counter(code).increment(1),
        }
    }

    fn counter(&self, code: u16) -> Counter {
        counter!(REQUESTS_TOTAL, "pool" => self.pool.to_string(), "backend" => self.backend.to_string(), "code" => code.to_string())
    }
}

/// Handles for one node of one pool.
#[derive(Debug)]
pub struct BackendMetrics {
    pub responses: ResponseCounters,
    pub duration: Histogram,
    pub in_flight: Gauge,
    pub up: Gauge,
    pub checks_passed: Counter,
    pub checks_failed: Counter,
    pub went_up: Counter,
    pub went_down: Counter,
    connect_errors: Counter,
    timeout_errors: Counter,
    reset_errors: Counter,
}

impl BackendMetrics {
    pub fn new(pool: &Arc<str>, backend: &Arc<str>) -> Self {
        let labels = [("pool", pool.to_string()), ("backend", backend.to_string())];
        let error = |kind: ErrorKind| counter!(PROXY_ERRORS_TOTAL, "pool" => pool.to_string(), "backend" => backend.to_string(), "kind" => kind.as_str());
        Self {
            responses: ResponseCounters::new(pool.clone(), backend.clone()),
            duration: histogram!(REQUEST_DURATION, &labels),
            in_flight: gauge!(BACKEND_IN_FLIGHT, &labels),
            up: gauge!(BACKEND_UP, &labels),
            checks_passed: counter!(HEALTH_CHECKS_TOTAL, "pool" => pool.to_string(), "backend" => backend.to_string(), "result" => "pass"),
            checks_failed: counter!(HEALTH_CHECKS_TOTAL, "pool" => pool.to_string(), "backend" => backend.to_string(), "result" => "fail"),
            went_up: counter!(BACKEND_TRANSITIONS_TOTAL, "pool" => pool.to_string(), "backend" => backend.to_string(), "to" => "up"),
            went_down: counter!(BACKEND_TRANSITIONS_TOTAL, "pool" => pool.to_string(), "backend" => backend.to_string(), "to" => "down"),
            connect_errors: error(ErrorKind::Connect),
            timeout_errors: error(ErrorKind::Timeout),
            reset_errors: error(ErrorKind::Reset),
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        match kind {
            ErrorKind::Connect => self.connect_errors.increment(1),
            ErrorKind::Timeout => self.timeout_errors.increment(1),
            ErrorKind::Reset => self.reset_errors.increment(1),
            // Pool-wide kinds: no node was picked, so none is to blame.
            ErrorKind::NoBackend | ErrorKind::QueueTimeout => {}
        }
    }
}

/// Handles for answers a pool gives without a backend (`backend="none"`).
#[derive(Debug)]
pub struct PoolMetrics {
    pool: Arc<str>,
    pub responses: ResponseCounters,
    pub no_backend: Counter,
    pub queue_timeouts: Counter,
    /// Requests waiting for room on a capped node.
    pub queue_depth: Gauge,
    pub retries: Counter,
    /// Created on first use, so only sticky pools export the series.
    sticky: [OnceLock<Counter>; 3],
}

impl PoolMetrics {
    pub fn new(pool: &Arc<str>) -> Self {
        let none: Arc<str> = Arc::from(NONE);
        Self {
            pool: pool.clone(),
            responses: ResponseCounters::new(pool.clone(), none),
            no_backend: counter!(PROXY_ERRORS_TOTAL, "pool" => pool.to_string(), "backend" => NONE, "kind" => ErrorKind::NoBackend.as_str()),
            queue_timeouts: counter!(PROXY_ERRORS_TOTAL, "pool" => pool.to_string(), "backend" => NONE, "kind" => ErrorKind::QueueTimeout.as_str()),
            queue_depth: gauge!(POOL_QUEUE_DEPTH, "pool" => pool.to_string()),
            retries: counter!(RETRIES_TOTAL, "pool" => pool.to_string()),
            sticky: Default::default(),
        }
    }

    pub fn sticky(&self, outcome: Outcome) -> &Counter {
        self.sticky[outcome as usize].get_or_init(|| {
            counter!(STICKY_TOTAL, "pool" => self.pool.to_string(), "outcome" => outcome.as_str())
        })
    }
}
