//! Metric names, their help text, and the per-node handles the request path uses. The
//! recorder that holds and renders the series is [`recorder`]'s module.
//!
//! Handles are resolved when a pool snapshot is built, so a request bumps atomics and never
//! formats a label or hashes a key on the hot path. A node's series leave the scrape when the
//! node leaves its pool ([`BackendMetrics::remove`], called by the swap that drops it), and a
//! pool's when a reload drops the pool ([`PoolMetrics::remove`]).

mod recorder;

use std::sync::{Arc, Once, OnceLock};

use metrics::{
    Counter, Gauge, Histogram, Key, Label, Unit, counter, describe_counter, describe_gauge,
    describe_histogram, gauge,
};

pub(crate) use recorder::{HistogramReader, Recorder, Scope};

pub(crate) const REQUESTS_TOTAL: &str = "fulcrum_requests_total";
pub(crate) const REQUEST_DURATION: &str = "fulcrum_request_duration_seconds";
pub(crate) const BACKEND_IN_FLIGHT: &str = "fulcrum_backend_in_flight";
pub(crate) const PROXY_ERRORS_TOTAL: &str = "fulcrum_proxy_errors_total";
pub(crate) const DOWNSTREAM_CONNECTIONS: &str = "fulcrum_downstream_connections";
pub(crate) const BACKEND_UP: &str = "fulcrum_backend_up";
pub(crate) const HEALTH_CHECKS_TOTAL: &str = "fulcrum_health_checks_total";
pub(crate) const BACKEND_TRANSITIONS_TOTAL: &str = "fulcrum_backend_transitions_total";
pub(crate) const RETRIES_TOTAL: &str = "fulcrum_retries_total";
pub(crate) const STICKY_TOTAL: &str = "fulcrum_sticky_total";
pub(crate) const TLS_HANDSHAKES_TOTAL: &str = "fulcrum_tls_handshakes_total";
pub(crate) const CONFIG_RELOADS_TOTAL: &str = "fulcrum_config_reloads_total";
pub(crate) const REGISTRY_EVENTS_TOTAL: &str = "fulcrum_registry_events_total";
pub(crate) const REGISTRY_STORE_UP: &str = "fulcrum_registry_store_up";
pub(crate) const CLIENT_ERRORS_TOTAL: &str = "fulcrum_client_errors_total";
pub(crate) const POOL_QUEUE_DEPTH: &str = "fulcrum_pool_queue_depth";
pub(crate) const TLS_CERTIFICATE_EXPIRY: &str = "fulcrum_tls_certificate_expiry_timestamp_seconds";
pub(crate) const PROXY_PROTOCOL_REFUSED_TOTAL: &str = "fulcrum_proxy_protocol_refused_total";
pub(crate) const ACCESS_LOG_DROPPED_TOTAL: &str = "fulcrum_access_log_dropped_total";

/// The `backend` label of answers fulcrum gives itself, and the `pool` label when no route matched.
pub(crate) const NONE: &str = "none";

/// Seconds; from a cache hit on loopback (100 µs) to the default response timeout (30 s).
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The process-wide recorder, installed as the `metrics` recorder on first use, with every
/// metric described.
///
/// Several balancers in one process (the tests do this) share it; their series differ by label.
pub(crate) fn recorder() -> &'static Recorder {
    static RECORDER: Recorder = Recorder::new(&[(REQUEST_DURATION, DURATION_BUCKETS)]);
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if metrics::set_global_recorder(&RECORDER).is_err() {
            // Nothing in fulcrum installs another one; if an embedder did, `/metrics` shows
            // only the series registered here directly.
            tracing::error!("another metrics recorder is installed; /metrics will miss series");
        }
        describe();
    });
    &RECORDER
}

/// The HELP text of every metric fulcrum exports: one line each, next to nothing else, so a
/// scrape passes `promtool check metrics`.
fn describe() {
    describe_counter!(
        ACCESS_LOG_DROPPED_TOTAL,
        "Access log lines dropped because the log's writer was behind (its queue was full)."
    );
    describe_counter!(
        REQUESTS_TOTAL,
        "Responses sent to clients, by pool, backend and status code (backend \"none\" for answers fulcrum gave itself)."
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
    describe_gauge!(
        BACKEND_UP,
        "1 while the health checker routes to the backend, 0 while it is down or pending its first rise passes."
    );
    describe_counter!(
        HEALTH_CHECKS_TOTAL,
        "Active health checks of a backend, by result (pass, fail)."
    );
    describe_counter!(
        BACKEND_TRANSITIONS_TOTAL,
        "Health transitions of a backend, by the state it went to (up, down)."
    );
    describe_counter!(
        RETRIES_TOTAL,
        "Attempts on another backend after one failed a request it never answered (a refused connection, or a reset of a request safe to repeat)."
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
        CLIENT_ERRORS_TOTAL,
        "Requests that failed by the client's doing, by listener and kind (malformed, too_large, aborted, timeout); never counted against a backend."
    );
    describe_counter!(
        PROXY_PROTOCOL_REFUSED_TOTAL,
        "Connections a proxy_protocol listener closed unanswered, by listener and reason (untrusted: the peer is not in trusted_proxies; missing: no PROXY header; malformed: an invalid, oversized or cut-short header; timeout: no complete header within header_read_timeout)."
    );
    describe_counter!(
        TLS_HANDSHAKES_TOTAL,
        "TLS handshakes on client connections, by listener and result (ok, error, timeout)."
    );
    describe_gauge!(
        TLS_CERTIFICATE_EXPIRY,
        Unit::Seconds,
        "When each certificate a listener serves expires (its notAfter, Unix seconds), by listener and name (the first DNS name, else the subject CN)."
    );
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "Config reloads (SIGHUP or POST /api/reload), by result: ok, or error (the running config stays)."
    );
    describe_counter!(
        REGISTRY_EVENTS_TOTAL,
        "Registry events, by event: register (a node joined), heartbeat (a known node reported active), expired (removed after 3 missed heartbeats), decommission (a node asked to leave), refused (no valid token, an address not allowed, or max_nodes reached)."
    );
    describe_gauge!(
        REGISTRY_STORE_UP,
        "1 while the registry's shared PostgreSQL store (registry.store) is connected, 0 while it is unreachable (routing keeps the last known nodes; registry calls answer UNAVAILABLE)."
    );
}

/// Publishes the `notAfter` of every certificate `listener` serves now (`certs`: name, Unix
/// seconds) and takes the listener's series of certificates it no longer serves out of the
/// scrape. Two certificates with one name show the earlier expiry: the one to renew first.
pub(crate) fn set_certificate_expiry<'a>(
    listener: &str,
    certs: impl IntoIterator<Item = (&'a str, i64)>,
) {
    let mut earliest: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
    for (name, not_after) in certs {
        let at = earliest.entry(name).or_insert(not_after);
        *at = (*at).min(not_after);
    }
    recorder().remove_series_of(TLS_CERTIFICATE_EXPIRY, |labels| {
        labels.get("listener") == Some(listener)
            && labels
                .get("name")
                .is_none_or(|name| !earliest.contains_key(name))
    });
    for (name, not_after) in earliest {
        // Unix seconds stay exact in an f64 for the next 285 million years.
        gauge!(TLS_CERTIFICATE_EXPIRY, "listener" => listener.to_owned(), "name" => name.to_owned())
            .set(not_after as f64);
    }
}

/// Takes every certificate expiry series of `listener` out of the scrape: a reload removed it.
pub(crate) fn remove_certificate_expiry(listener: &str) {
    recorder().remove_series_of(TLS_CERTIFICATE_EXPIRY, |labels| {
        labels.get("listener") == Some(listener)
    });
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

/// How a client broke its request: the `kind` label of `fulcrum_client_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientErrorKind {
    /// Framing the server cannot parse: a bad head, a bad chunk, an HTTP/2 protocol error.
    Malformed,
    /// A head or body past the listener's limits.
    TooLarge,
    /// The client went away (or reset its stream) before its request was complete.
    Aborted,
    /// The client stopped sending its head or body for longer than the listener allows.
    Timeout,
}

impl ClientErrorKind {
    pub const ALL: [ClientErrorKind; 4] = [
        ClientErrorKind::Malformed,
        ClientErrorKind::TooLarge,
        ClientErrorKind::Aborted,
        ClientErrorKind::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientErrorKind::Malformed => "malformed",
            ClientErrorKind::TooLarge => "too_large",
            ClientErrorKind::Aborted => "aborted",
            ClientErrorKind::Timeout => "timeout",
        }
    }
}

/// `fulcrum_client_errors_total` for one listener, resolved when the listener starts.
#[derive(Debug)]
pub struct ClientErrors {
    counters: [Counter; ClientErrorKind::ALL.len()],
}

impl ClientErrors {
    pub fn new(listener: &str) -> Self {
        Self {
            counters: ClientErrorKind::ALL.map(|kind| {
                counter!(CLIENT_ERRORS_TOTAL, "listener" => listener.to_owned(), "kind" => kind.as_str())
            }),
        }
    }

    pub fn count(&self, kind: ClientErrorKind) {
        self.counters[kind as usize].increment(1);
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
    /// Counters are made on first use, possibly after the node left: see [`Scope`].
    scope: Scope,
}

impl ResponseCounters {
    pub fn new(pool: Arc<str>, backend: Arc<str>) -> Self {
        Self {
            pool,
            backend,
            common: Default::default(),
            scope: Scope::default(),
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
        let labels = vec![
            Label::new("pool", self.pool.to_string()),
            Label::new("backend", self.backend.to_string()),
            Label::new("code", code.to_string()),
        ];
        recorder().counter_in(&self.scope, &Key::from_parts(REQUESTS_TOTAL, labels))
    }
}

/// Handles for one node of one pool.
#[derive(Debug)]
pub struct BackendMetrics {
    pub responses: ResponseCounters,
    pub duration: Histogram,
    /// Reads `duration`'s buckets: the status page's p99 per node.
    pub(crate) latency: HistogramReader,
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
        let (duration, latency) = recorder().histogram_with_reader(&Key::from_parts(
            REQUEST_DURATION,
            labels
                .iter()
                .map(|(k, v)| Label::new(*k, v.clone()))
                .collect::<Vec<_>>(),
        ));
        let error = |kind: ErrorKind| counter!(PROXY_ERRORS_TOTAL, "pool" => pool.to_string(), "backend" => backend.to_string(), "kind" => kind.as_str());
        Self {
            responses: ResponseCounters::new(pool.clone(), backend.clone()),
            duration,
            latency,
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

    /// Takes every series of this node (its `pool` and `backend` labels) out of the scrape.
    ///
    /// Called by the swap that publishes a snapshot without the node, never from `Drop`: a
    /// request in flight may hold the old node past the arrival of a new node of the same
    /// name, and dropping it then must not remove the newcomer's series. The handles stay
    /// usable by such requests; they count on series nobody renders.
    pub fn remove(&self) {
        let (pool, backend) = (&*self.responses.pool, &*self.responses.backend);
        recorder().remove_series(&[&self.responses.scope], |labels| {
            labels.get("pool") == Some(pool) && labels.get("backend") == Some(backend)
        });
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
    sticky_scope: Scope,
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
            sticky_scope: Scope::default(),
        }
    }

    pub fn sticky(&self, outcome: Outcome) -> &Counter {
        self.sticky[outcome as usize].get_or_init(|| {
            let labels = vec![
                Label::new("pool", self.pool.to_string()),
                Label::new("outcome", outcome.as_str()),
            ];
            recorder().counter_in(&self.sticky_scope, &Key::from_parts(STICKY_TOTAL, labels))
        })
    }

    /// Takes every series of the pool out of the scrape, its nodes' (`nodes`) included: a
    /// reload dropped the pool. Like [`BackendMetrics::remove`], called where the pool is
    /// dropped from the routing table, never from `Drop`.
    pub fn remove<'a>(&self, nodes: impl IntoIterator<Item = &'a BackendMetrics>) {
        let mut scopes = vec![&self.responses.scope, &self.sticky_scope];
        scopes.extend(nodes.into_iter().map(|node| &node.responses.scope));
        let pool = &*self.pool;
        recorder().remove_series(&scopes, |labels| labels.get("pool") == Some(pool));
    }
}

/// How a response relates to the request's cookie, the `outcome` label of
/// `fulcrum_sticky_total`. The sticky strategy decides it; it is defined here because it is a
/// label before it is a strategy's concern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The cookie's node served the request.
    Hit = 0,
    /// No usable cookie: the fallback placed the user.
    New = 1,
    /// The cookie's node is gone or did not serve: another node took the user.
    Rerouted = 2,
}

impl Outcome {
    /// The `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::New => "new",
            Outcome::Rerouted => "rerouted",
        }
    }
}
