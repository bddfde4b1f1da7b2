//! The seed's registry: `codesprintpro.scalability.registry.v1.ServerRegistryService` over
//! gRPC on `[registry] bind` (proto in `proto/registry.proto`).
//!
//! Web nodes announce themselves with `ReportActive` (the first call registers, later ones are
//! heartbeats), and leave with `ReportDecommission` (drained like `DELETE ...?drain=`). A node
//! silent for three heartbeat intervals is removed by the reaper. The registry owns only the
//! heartbeat ledger; every pool change goes through [`Control::register`] and
//! [`Control::deregister`], so registered nodes arrive pending and survive reloads.
//!
//! Whoever reaches this listener can point the balancer's traffic anywhere, so it is a trust
//! boundary: with `token`, a call without `authorization: Bearer TOKEN` is `UNAUTHENTICATED`
//! before the service sees it; with `[registry.tls]` and `client_ca`, a client without a
//! certificate from that CA never completes the handshake. An address outside
//! `allowed_networks` or at one of fulcrum's own sockets is `PERMISSION_DENIED`, a node beyond
//! `max_nodes` is `RESOURCE_EXHAUSTED`; none of them changes anything.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use metrics::{Counter, counter};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tonic::codegen::Service as _;
use tonic::service::Interceptor;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::base::config::backend::{self, MAX_NAME_LEN};
use crate::base::config::{BackendConfig, RegistryConfig};
use crate::base::metrics::REGISTRY_EVENTS_TOTAL;
use crate::control::store::{SharedError, Store, StoreError};
use crate::control::{ChangeError, Control, RegisterError, Registration, Removal};
use crate::datapath::server::{self, ConnLimits, Lifecycle};
use crate::datapath::tls::TlsTerminator;

use crate::base::proto::server_registry_service_server::{
    ServerRegistryService, ServerRegistryServiceServer,
};
use crate::base::proto::{
    ReportActiveRequest, ReportActiveResponse, ReportDecommissionRequest,
    ReportDecommissionResponse,
};

/// `graceful_drain_timeout_seconds` left empty: the seed's default.
pub(crate) const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// Longer drains are cut to this; a day is past any real drain, and the cap keeps
/// `Instant + drain` far from overflowing.
const MAX_DRAIN_SECS: u64 = 86_400;
/// Heartbeats a node may miss before it is removed.
const MISSED_HEARTBEATS: u32 = 3;

/// The registry service; cheap to clone (one `Arc`).
#[derive(Clone)]
pub(crate) struct Registry(Arc<Inner>);

struct Inner {
    control: Arc<Control>,
    pool: String,
    /// `Bearer TOKEN`, the whole `authorization` value a call must carry.
    bearer: Option<Arc<[u8]>>,
    allowed_networks: Vec<IpNet>,
    max_nodes: usize,
    /// What `ReportActive` answers: the configured interval in whole seconds, at least 1.
    interval_secs: i32,
    /// Silence after which a node is removed.
    expiry: Duration,
    /// Last `ReportActive` per registered id. Held across the control call, so one node's
    /// register, decommission and expiry never interleave (calls are rare; no request waits).
    seen: Mutex<HashMap<String, Instant>>,
    /// `[registry] store`: registrations shared with every balancer on the same database,
    /// which then decides liveness (the reaper and `seen` are unused).
    store: Option<Store>,
    events: Events,
}

struct Events {
    register: Counter,
    heartbeat: Counter,
    expired: Counter,
    decommission: Counter,
    refused: Counter,
}

/// The peer of a registry call, for the log line of a refusal.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

impl Registry {
    pub(crate) fn new(config: &RegistryConfig, control: Arc<Control>) -> Self {
        let event = |name: &'static str| counter!(REGISTRY_EVENTS_TOTAL, "event" => name);
        let whole = config
            .heartbeat_interval
            .as_secs()
            .clamp(1, i32::MAX as u64);
        // Nodes heartbeat at the answered interval, so expiry is measured against whichever is
        // longer: a "500ms" config answers 1 s and must not expire nodes after 1.5 s.
        let interval = config.heartbeat_interval.max(Duration::from_secs(whole));
        let expiry = interval.saturating_mul(MISSED_HEARTBEATS);
        let store = config
            .store
            .clone()
            .map(|url| Store::new(url, config, expiry, control.clone()));
        Self(Arc::new(Inner {
            control,
            store,
            pool: config.pool.clone(),
            bearer: config
                .token
                .as_ref()
                .map(|t| Arc::from(format!("Bearer {}", t.expose()).into_bytes())),
            allowed_networks: config.allowed_networks.clone(),
            max_nodes: config.max_nodes,
            interval_secs: i32::try_from(whole).unwrap_or(i32::MAX),
            expiry,
            seen: Mutex::new(HashMap::new()),
            events: Events {
                register: event("register"),
                heartbeat: event("heartbeat"),
                expired: event("expired"),
                decommission: event("decommission"),
                refused: event("refused"),
            },
        }))
    }

    /// Serves gRPC (HTTP/2 prior knowledge, or over `tls`) on `listener` with the same accept
    /// loop, limits and graceful drain as the other listeners, and starts the reaper; both stop
    /// on `shutdown`. Every call passes the token check first.
    pub(crate) fn spawn(
        self,
        listener: TcpListener,
        tls: Option<Arc<TlsTerminator>>,
        lifecycle: Lifecycle,
    ) {
        match &self.0.store {
            Some(store) => store.spawn(lifecycle.shutdown.clone()),
            None => {
                tokio::spawn(self.clone().reap(lifecycle.shutdown.clone()));
            }
        }
        let auth = Auth(self.0.clone());
        let grpc = ServerRegistryServiceServer::with_interceptor(self, auth);
        let limits = ConnLimits {
            // A node's channel carries one call per heartbeat; minutes of quiet is a gone node.
            idle_timeout: Duration::from_secs(300),
            ..server::SERVICE_LIMITS
        };
        server::spawn_accept_loop(
            vec![server::AcceptSocket::Here(listener)],
            Arc::from("registry"),
            limits,
            tls,
            move |peer, _conn| {
                let grpc = grpc.clone();
                hyper::service::service_fn(move |mut req: http::Request<_>| {
                    let mut grpc = grpc.clone();
                    req.extensions_mut().insert(Peer(peer));
                    // The generated service is always ready and its error type is Infallible.
                    async move { grpc.call(req).await }
                })
            },
            Arc::new(std::sync::atomic::AtomicU64::new(0)),
            lifecycle,
        );
    }

    /// Removes nodes silent for `expiry`. Checks four times per interval, so a node goes at
    /// most a quarter interval after its third missed heartbeat.
    async fn reap(self, shutdown: CancellationToken) {
        let inner = &self.0;
        let period = (inner.expiry / (MISSED_HEARTBEATS * 4)).max(Duration::from_millis(50));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let mut seen = inner.seen.lock().await;
            let expired: Vec<String> = seen
                .iter()
                .filter(|(_, last)| last.elapsed() >= inner.expiry)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                seen.remove(&id);
                inner.events.expired.increment(1);
                warn!(pool = %inner.pool, backend = %id, silent_for = ?inner.expiry,
                    "registered node missed {MISSED_HEARTBEATS} heartbeats; removing it");
                // NotFound: an API change already took it out of the pool, which is the goal.
                let _ = inner
                    .control
                    .deregister(&inner.pool, &id, Duration::ZERO)
                    .await;
            }
        }
    }
}

#[tonic::async_trait]
impl ServerRegistryService for Registry {
    async fn report_active(
        &self,
        request: Request<ReportActiveRequest>,
    ) -> Result<Response<ReportActiveResponse>, Status> {
        let inner = &self.0;
        let peer = request.extensions().get::<Peer>().copied();
        let request = request.into_inner();
        let backend = backend(&request)?;
        let ip = backend.address.ip();
        if !inner.allowed_networks.iter().any(|net| net.contains(&ip)) {
            return Err(inner.refuse(
                peer,
                Some(&request.server_id),
                Status::permission_denied(format!("{ip} is outside registry.allowed_networks")),
            ));
        }
        let outcome = match &inner.store {
            Some(store) => match store.report_active(backend).await {
                Ok(outcome) => outcome,
                Err(SharedError::Register(e)) => {
                    return Err(inner.refused(peer, &request.server_id, e));
                }
                Err(SharedError::Store(e)) => return Err(store_status(&inner.pool, &e)),
                Err(e @ SharedError::NotFound(_)) => return Err(Status::not_found(e.to_string())),
            },
            None => {
                let mut seen = inner.seen.lock().await;
                let outcome = inner
                    .control
                    .register(&inner.pool, backend, inner.max_nodes)
                    .await
                    .map_err(|e| inner.refused(peer, &request.server_id, e))?;
                seen.insert(request.server_id.clone(), Instant::now());
                outcome
            }
        };
        match outcome {
            Registration::Added => inner.events.register.increment(1),
            Registration::Unchanged | Registration::Moved => inner.events.heartbeat.increment(1),
        }
        // `Control::register` logs a change itself; a heartbeat is not worth an info line.
        debug!(pool = %inner.pool, backend = %request.server_id, ?outcome,
            bootstrap_timestamp_ms = request.bootstrap_timestamp_ms, "node reported active");
        Ok(Response::new(ReportActiveResponse {
            is_registered: true,
            heartbeat_interval_seconds: inner.interval_secs,
        }))
    }

    async fn report_decommission(
        &self,
        request: Request<ReportDecommissionRequest>,
    ) -> Result<Response<ReportDecommissionResponse>, Status> {
        let inner = &self.0;
        let request = request.into_inner();
        // The contract checks the timeout before the id.
        let drain = drain_timeout(&request.graceful_drain_timeout_seconds)?;
        if let Some(store) = &inner.store {
            let removal = match store.decommission(&request.server_id, drain).await {
                Ok(removal) => removal,
                Err(e @ SharedError::NotFound(_)) => return Err(Status::not_found(e.to_string())),
                Err(SharedError::Store(e)) => return Err(store_status(&inner.pool, &e)),
                Err(SharedError::Register(e)) => return Err(Status::internal(e.to_string())),
            };
            return Ok(inner.decommissioned(&request.server_id, drain, removal));
        }
        let mut seen = inner.seen.lock().await;
        if !seen.contains_key(&request.server_id) {
            return Err(Status::not_found(format!(
                "no registered node `{}`",
                request.server_id
            )));
        }
        let removal = inner
            .control
            .deregister(&inner.pool, &request.server_id, drain)
            .await
            .map_err(status)?;
        seen.remove(&request.server_id);
        Ok(inner.decommissioned(&request.server_id, drain, removal))
    }
}

impl Inner {
    /// Counts and logs an accepted decommission; its answer.
    fn decommissioned(
        &self,
        id: &str,
        drain: Duration,
        removal: Removal,
    ) -> Response<ReportDecommissionResponse> {
        self.events.decommission.increment(1);
        let removal = match removal {
            Removal::Removed => "removed",
            Removal::Draining => "draining",
        };
        info!(pool = %self.pool, backend = %id, ?drain, removal, "node decommissioned");
        Response::new(ReportDecommissionResponse {
            is_decommission_started: true,
        })
    }

    /// The status of a node this balancer refused; a refusal by policy is counted and logged.
    fn refused(&self, peer: Option<Peer>, id: &str, e: RegisterError) -> Status {
        match e {
            RegisterError::Change(e) => status(e),
            e @ RegisterError::OwnSocket { .. } => {
                self.refuse(peer, Some(id), Status::permission_denied(e.to_string()))
            }
            e @ RegisterError::Full { .. } => {
                self.refuse(peer, Some(id), Status::resource_exhausted(e.to_string()))
            }
        }
    }

    /// Counts and logs a refused call; returns its status.
    fn refuse(&self, peer: Option<Peer>, id: Option<&str>, status: Status) -> Status {
        self.events.refused.increment(1);
        warn!(pool = %self.pool, backend = id, peer = ?peer.map(|p| p.0), code = ?status.code(),
            reason = status.message(), "registry call refused");
        status
    }
}

/// The token check, run on every call before the service sees it. Without a token configured
/// it lets everything through (the config only allows that on loopback, or with mTLS).
#[derive(Clone)]
struct Auth(Arc<Inner>);

impl Interceptor for Auth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(bearer) = &self.0.bearer else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        // Constant time, so how long a refusal takes says nothing of how close a guess was.
        if given.is_some_and(|given| bool::from(given.ct_eq(&bearer[..]))) {
            return Ok(request);
        }
        let peer = request.extensions().get::<Peer>().copied();
        Err(self.0.refuse(
            peer,
            None,
            Status::unauthenticated(
                "a valid bearer token is required (metadata `authorization: Bearer TOKEN`)",
            ),
        ))
    }
}

/// The node a `ReportActive` describes; weight 1, named by its `server_id`. The name and port
/// follow the rules of every backend; the IP is the registry's own field, and an address no
/// balancer can connect to is refused here.
fn backend(request: &ReportActiveRequest) -> Result<BackendConfig, Status> {
    backend::name(&request.server_id).map_err(|_| {
        Status::invalid_argument(format!(
            "server_id must be 1 to {MAX_NAME_LEN} bytes without control characters"
        ))
    })?;
    let ip: IpAddr = request.ip_address.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "ip_address `{}` is not an IP address",
            request.ip_address
        ))
    })?;
    // `::ffff:10.0.0.1` is 10.0.0.1 for the network and own-socket rules and for connecting.
    let ip = ip.to_canonical();
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(Status::invalid_argument(format!(
            "ip_address {ip} is not an address a balancer can connect to"
        )));
    }
    let address = u16::try_from(request.port)
        .ok()
        .and_then(|port| backend::port(SocketAddr::new(ip, port)).ok())
        .ok_or_else(|| {
            Status::invalid_argument(format!("port {} is not in 1..=65535", request.port))
        })?;
    Ok(BackendConfig {
        name: request.server_id.clone(),
        address,
        weight: 1,
        // The pool's max_connections_per_backend applies.
        max_connections: None,
    })
}

/// `graceful_drain_timeout_seconds`: empty for the default, else ASCII digits only (no sign,
/// no spaces, no unit); numbers past a day are cut to a day.
pub(crate) fn drain_timeout(text: &str) -> Result<Duration, Status> {
    if text.is_empty() {
        return Ok(DEFAULT_DRAIN);
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Status::invalid_argument(format!(
            "graceful_drain_timeout_seconds `{text}` must be empty or a non-negative whole number of seconds"
        )));
    }
    // All digits, so the only parse failure is overflow: far past the cap anyway.
    let secs = text.parse::<u64>().unwrap_or(u64::MAX).min(MAX_DRAIN_SECS);
    Ok(Duration::from_secs(secs))
}

/// A store failure as the caller sees it: `UNAVAILABLE` (retry later), except a name another
/// pool holds. The log line carries the source chain (never the store URL or its password).
fn store_status(pool: &str, e: &StoreError) -> Status {
    warn!(pool, error = %crate::base::error::ErrorChain(e), "registry call failed on the store");
    match e {
        StoreError::OtherPool(_) => Status::already_exists(e.to_string()),
        StoreError::Down | StoreError::Timeout | StoreError::Query(_) | StoreError::Schema => {
            Status::unavailable(e.to_string())
        }
    }
}

fn status(e: ChangeError) -> Status {
    match e {
        ChangeError::Invalid(m) => Status::invalid_argument(m),
        ChangeError::NotFound(m) => Status::failed_precondition(m),
        ChangeError::Conflict(m) => Status::already_exists(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn drain_timeout_accepts_empty_and_whole_numbers_only() {
        assert_eq!(drain_timeout("").unwrap(), DEFAULT_DRAIN);
        assert_eq!(drain_timeout("0").unwrap(), Duration::ZERO);
        assert_eq!(drain_timeout("45").unwrap(), Duration::from_secs(45));
        assert_eq!(
            drain_timeout("99999999999999999999999").unwrap(),
            Duration::from_secs(MAX_DRAIN_SECS)
        );
        for bad in ["abc", "-1", "+5", " 5", "5s", "1.5", "٣"] {
            assert_eq!(
                drain_timeout(bad).unwrap_err().code(),
                Code::InvalidArgument,
                "{bad:?}"
            );
        }
    }

    fn active(id: &str, ip: &str, port: i32) -> ReportActiveRequest {
        ReportActiveRequest {
            server_id: id.into(),
            ip_address: ip.into(),
            port,
            bootstrap_timestamp_ms: 0,
        }
    }

    #[test]
    fn report_active_needs_an_id_a_connectable_ip_and_a_port() {
        let ok = backend(&active("web-9", "127.0.0.1", 9009)).unwrap();
        assert_eq!(
            (ok.name.as_str(), ok.address, ok.weight),
            ("web-9", "127.0.0.1:9009".parse().unwrap(), 1)
        );
        assert!(backend(&active("v6", "::1", 80)).is_ok());
        for bad in [
            active("", "127.0.0.1", 1),
            active("a\nb", "127.0.0.1", 1),
            active(&"x".repeat(256), "127.0.0.1", 1),
            active("a", "localhost", 1),
            active("a", "0.0.0.0", 1),
            active("a", "127.0.0.1", 0),
            active("a", "127.0.0.1", -1),
            active("a", "127.0.0.1", 65_536),
        ] {
            assert_eq!(
                backend(&bad).unwrap_err().code(),
                Code::InvalidArgument,
                "{bad:?}"
            );
        }
    }
}
