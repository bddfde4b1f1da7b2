//! The control plane: every change to a running balancer (reload, the admin API, the
//! registry) goes through [`Control`].
//!
//! Changes are serialized by one async mutex, far from the request path, and published with
//! `ArcSwap` stores: a request never waits for a change, and sees either the old pool or the new
//! one, never half of each. The effective config (the file plus what the API changed since) is
//! kept here, so each change is "edit the config, rebuild what it touches".

pub(crate) mod admin;
pub(crate) mod health;
pub(crate) mod history;
pub(crate) mod registry;
pub(crate) mod status;
pub(crate) mod store;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use metrics::{Counter, counter};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::base::certs::CertError;
use crate::base::config::backend::{self, BackendError, Roster};
use crate::base::config::{
    AccessLogConfig, BackendConfig, Config, ConfigError, ListenerConfig, Strategy,
};
use crate::base::error::ErrorChain;
use crate::base::metrics::CONFIG_RELOADS_TOTAL;
use crate::datapath::access_log::AccessLog;
use crate::datapath::listeners::{BoundListener, LogSlot, StartError};
use crate::datapath::proxy::Router;
use crate::datapath::server::Lifecycle;
use crate::datapath::tls::{CertSet, TlsTerminator};
use crate::model::pool::{Health, Node, Pool};

/// How often a drain looks whether its node has finished its requests.
const DRAIN_POLL: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct Control {
    /// The file `reload` reads; `None` for a balancer started from a config in memory.
    path: Option<PathBuf>,
    router: Arc<ArcSwap<Router>>,
    shutdown: CancellationToken,
    state: Mutex<Applied>,
    /// The traffic listeners serving now. Read by `Running::addr` (sync), changed by reloads.
    listeners: std::sync::Mutex<Vec<LiveListener>>,
    /// The admin and registry sockets, as bound at start (they change only with a restart).
    services: std::sync::OnceLock<Vec<(&'static str, SocketAddr)>>,
    client_connections: Arc<AtomicU64>,
    lifecycle: Lifecycle,
    /// The worker threads besides the current one: each listener has a socket on each.
    workers: Vec<tokio::runtime::Handle>,
    reloads_ok: Counter,
    reloads_error: Counter,
    /// The status page's last five minutes and last checks, fed by a sampler and the checkers.
    history: Arc<history::History>,
}

#[derive(Debug)]
struct Applied {
    config: Config,
    /// Stops each pool's health checker when the pool goes away.
    checkers: HashMap<String, CancellationToken>,
    /// Nodes the registry added, by pool. Not in the file, so `apply` merges them into every
    /// config it publishes: a reload keeps them.
    registered: HashMap<String, Vec<BackendConfig>>,
}

/// Why an API change was refused; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload: this balancer was started from a config in memory")]
    NoFile,
    #[error("the new config is invalid; the running config stays")]
    Invalid(#[source] ConfigError),
    #[error("a certificate of the new config does not load; the running config stays")]
    Certificate(#[source] CertError),
    #[error("a new listener cannot start; the running config stays")]
    Listener(#[source] StartError),
    /// A bug, not a bad file: the reload task panicked. The task is gone, not the balancer, so
    /// the next `SIGHUP` or `POST /api/reload` runs as usual.
    #[error("the reload failed unexpectedly ({0}); the running config stays")]
    Panicked(String),
}

/// What `DELETE .../backends/NAME` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    Draining,
}

/// A backend as the admin API reads and writes it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    pub address: String,
    pub weight: Option<u32>,
    pub name: Option<String>,
    /// Wide, so that an absurd number is answered with the bound rather than a parse error.
    pub max_connections: Option<u64>,
}

impl BackendSpec {
    /// The backend this body describes, by the rules every backend follows.
    fn backend(&self) -> Result<BackendConfig, BackendError> {
        backend::backend(backend::Fields {
            address: &self.address,
            weight: self.weight.map(i128::from),
            name: self.name.as_deref(),
            max_connections: self.max_connections.map(i128::from),
        })
    }
}

impl From<BackendError> for ChangeError {
    /// The API's form of a broken backend rule: `field: what is wrong` (a `400`), or a clash
    /// with a backend the pool already holds (a `409`).
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::DuplicateName(name) => {
                ChangeError::Conflict(format!("a backend named `{name}` is already in the pool"))
            }
            BackendError::DuplicateAddress(address) => {
                ChangeError::Conflict(format!("a backend at {address} is already in the pool"))
            }
            e @ (BackendError::Address(_)
            | BackendError::PortZero
            | BackendError::Weight(_)
            | BackendError::EmptyName
            | BackendError::Name
            | BackendError::MaxConnections(_)) => {
                ChangeError::Invalid(format!("{}: {e}", e.field()))
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PoolView {
    pub strategy: &'static str,
    pub backends: Vec<BackendView>,
}

#[derive(Debug, Serialize)]
pub struct BackendView {
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    pub state: &'static str,
    pub in_flight: u32,
    pub requests: u64,
    /// Requests the node failed: refused, reset or timed out.
    pub failures: u64,
    /// The node's cap: its own, else the pool's `max_connections_per_backend`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// The admin API's word for a node's state; draining wins over everything, then health,
/// then the passive cool-off.
pub(crate) fn state_name(node: &Node) -> &'static str {
    if node.is_draining() {
        return "draining";
    }
    match node.health() {
        Health::Down => "down",
        Health::Pending => "pending",
        Health::Up if node.is_cooling() => "cooling",
        Health::Up => "up",
    }
}

impl Control {
    /// Takes over the router `start` built from `config` and starts its pools' checkers.
    pub fn new(
        config: Config,
        path: Option<PathBuf>,
        router: Arc<ArcSwap<Router>>,
        client_connections: Arc<AtomicU64>,
        lifecycle: Lifecycle,
        workers: Vec<tokio::runtime::Handle>,
    ) -> Self {
        let shutdown = lifecycle.shutdown.clone();
        let history = Arc::new(history::History::default());
        history::spawn_sampler(history.clone(), router.clone(), shutdown.child_token());
        tokio::spawn(crate::base::heap::trim_after_bursts(shutdown.child_token()));
        let mut checkers = HashMap::new();
        for pool in router.load().pools() {
            let stop = shutdown.child_token();
            health::spawn_checker(pool.clone(), history.clone(), stop.clone());
            checkers.insert(pool.name.to_string(), stop);
        }
        Self {
            path,
            router,
            shutdown,
            state: Mutex::new(Applied {
                config,
                checkers,
                registered: HashMap::new(),
            }),
            listeners: std::sync::Mutex::new(Vec::new()),
            services: std::sync::OnceLock::new(),
            client_connections,
            lifecycle,
            workers,
            reloads_ok: counter!(CONFIG_RELOADS_TOTAL, "result" => "ok"),
            reloads_error: counter!(CONFIG_RELOADS_TOTAL, "result" => "error"),
            history,
        }
    }

    /// Re-reads the config file and applies it; an invalid file changes nothing.
    ///
    /// Runs in a task of its own, so that even a bug that panics in there ends that task
    /// alone: the caller (the SIGHUP loop, an admin request) gets an error and carries on.
    pub async fn reload(self: &Arc<Self>) -> Result<(), ReloadError> {
        let this = self.clone();
        match tokio::spawn(async move { this.reload_file().await }).await {
            Ok(result) => result,
            Err(e) => {
                let message = match e.try_into_panic() {
                    Ok(panic) => panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".to_owned()),
                    Err(e) => e.to_string(),
                };
                Err(self.rejected(ReloadError::Panicked(message)))
            }
        }
    }

    async fn reload_file(&self) -> Result<(), ReloadError> {
        let Some(path) = &self.path else {
            self.reloads_error.increment(1);
            return Err(ReloadError::NoFile);
        };
        let config = match Config::load(path) {
            Ok(config) => config,
            Err(e) => {
                self.reloads_error.increment(1);
                warn!(file = %path.display(), errors = %e, "reload rejected; the running config stays");
                return Err(ReloadError::Invalid(e));
            }
        };
        let mut state = self.state.lock().await;
        // Everything that can fail happens before anything changes: new listeners are bound
        // and certificates loaded first, and a failure rejects the whole reload.
        let changes = match self.prepare_listeners(&config) {
            Ok(changes) => changes,
            Err(e) => return Err(self.rejected(e)),
        };
        if config.admin != state.config.admin || config.registry != state.config.registry {
            warn!("admin and registry changes take effect at the next restart");
        }
        self.switch_listeners(changes);
        for warning in &config.warnings {
            warn!("{warning}");
        }
        self.apply(&mut state, config);
        self.reloads_ok.increment(1);
        info!(file = %path.display(), "config reloaded");
        Ok(())
    }

    /// What a reload does to the traffic listeners, with everything that can fail done: new
    /// ones bound, kept ones' certificates loaded. Nothing serves differently yet.
    fn prepare_listeners(&self, config: &Config) -> Result<ListenerChanges, ReloadError> {
        let live = self.live_listeners();
        let mut changes = ListenerChanges::default();
        for listener in &config.listeners {
            let Some(current) = live.iter().find(|l| same_listener(&l.config, listener)) else {
                let bound =
                    crate::datapath::listeners::bind_listener(listener, 1 + self.workers.len())
                        .map_err(ReloadError::Listener)?;
                changes.added.push(bound);
                continue;
            };
            if settings_differ(&current.config, listener) {
                warn!(listener = %listener.name, "listener settings other than certificates and access_log change at the next restart");
            }
            if current.config.access_log != listener.access_log {
                let log = crate::datapath::listeners::open_access_log(listener)
                    .map_err(ReloadError::Listener)?;
                let config = listener.access_log.clone();
                changes.logs.push((current.access_log.clone(), log, config));
            }
            if let (Some(tls), Some(terminator)) = (&listener.tls, &current.tls) {
                let certs = CertSet::load(tls).map_err(ReloadError::Certificate)?;
                changes.kept.push((terminator.clone(), certs));
            }
        }
        changes.removed = live
            .iter()
            .filter(|l| !config.listeners.iter().any(|n| same_listener(&l.config, n)))
            .map(|l| l.config.name.clone())
            .collect();
        Ok(changes)
    }

    /// Puts prepared listener changes into effect: new certificates swapped in place, removed
    /// listeners stopped (their connections finish gracefully), new ones served.
    fn switch_listeners(&self, changes: ListenerChanges) {
        for (terminator, certs) in changes.kept {
            terminator.replace_certs(certs);
        }
        // Requests already running finish into the log they started with.
        for (slot, log, config) in changes.logs {
            slot.store(log);
            let mut live = self.live_listeners();
            if let Some(l) = live.iter_mut().find(|l| Arc::ptr_eq(&l.access_log, &slot)) {
                l.config.access_log = config;
            }
        }
        self.live_listeners().retain(|l| {
            let keep = !changes.removed.contains(&l.config.name);
            if !keep {
                info!(listener = %l.config.name, addr = %l.addr, "listener removed; its connections finish gracefully");
                l.stop.cancel();
                if l.tls.is_some() {
                    crate::base::metrics::remove_certificate_expiry(&l.config.name);
                }
            }
            keep
        });
        self.serve(changes.added);
    }

    /// Serves newly bound listeners, each stoppable on its own (a reload that drops it).
    pub(crate) fn serve(&self, bound: Vec<BoundListener>) {
        let mut live = self.live_listeners();
        for listener in bound {
            let stop = self.lifecycle.shutdown.child_token();
            let lifecycle = Lifecycle {
                shutdown: stop.clone(),
                ..self.lifecycle.clone()
            };
            let (config, tls) = (listener.config.clone(), listener.tls.clone());
            let access_log = listener.access_log.clone();
            let addr = crate::datapath::listeners::serve(
                listener,
                &self.router,
                &self.client_connections,
                lifecycle,
                &self.workers,
            );
            live.push(LiveListener {
                config,
                addr,
                tls,
                access_log,
                stop,
            });
        }
    }

    /// The traffic listeners serving now: name, address, and whether they speak TLS.
    pub(crate) fn listeners(&self) -> Vec<(String, SocketAddr, bool)> {
        self.live_listeners()
            .iter()
            .map(|l| (l.config.name.clone(), l.addr, l.tls.is_some()))
            .collect()
    }

    /// What the status page remembers: the last five minutes and each node's last check.
    pub(crate) fn history(&self) -> &history::History {
        &self.history
    }

    /// The address the listener `name` serves on now.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.live_listeners()
            .iter()
            .find(|l| l.config.name == name)
            .map(|l| l.addr)
    }

    /// Records the admin and registry addresses as bound, for [`Control::own_socket`].
    pub(crate) fn set_services(&self, admin: Option<SocketAddr>, registry: Option<SocketAddr>) {
        let services = [("admin API", admin), ("registry", registry)]
            .into_iter()
            .filter_map(|(name, addr)| Some((name, addr?)))
            .collect();
        // Set once, at start; a second call would describe the same sockets.
        let _ = self.services.set(services);
    }

    /// Which of fulcrum's own sockets a backend at `addr` would be, if any: a traffic listener
    /// serving now, the admin API or the registry. Traffic sent there comes back into fulcrum;
    /// the admin address would even serve the admin API to every client of the public
    /// listener. A wildcard bind (`0.0.0.0`, `[::]`) is reached at its port through every
    /// loopback address and every address of the machine's interfaces.
    ///
    /// The one rule for the registry (`PERMISSION_DENIED`) and the admin API (`400`).
    pub fn own_socket(&self, addr: SocketAddr) -> Option<String> {
        // Listed only when a wildcard bind has the port asked about, and then once.
        let mut interfaces: Option<Option<Vec<IpAddr>>> = None;
        let mut is_interface = |ip: IpAddr| match interfaces.get_or_insert_with(interface_ips) {
            Some(list) => list.contains(&ip),
            // Unknown: better to refuse a node than to let fulcrum's own port through.
            None => true,
        };
        let mut reached = |bind: SocketAddr| reaches(bind, addr, &mut is_interface);
        if let Some(listener) = self.live_listeners().iter().find(|l| reached(l.addr)) {
            return Some(format!(
                "listener `{}` ({})",
                listener.config.name, listener.addr
            ));
        }
        self.services
            .get()
            .into_iter()
            .flatten()
            .find(|(_, bind)| reached(*bind))
            .map(|(name, bind)| format!("{name} ({bind})"))
    }

    /// `own_socket` as an API refusal.
    fn refuse_own(&self, backend: &BackendConfig) -> Result<(), ChangeError> {
        match self.own_socket(backend.address) {
            Some(own) => Err(ChangeError::Invalid(own_message(backend.address, &own))),
            None => Ok(()),
        }
    }

    fn live_listeners(&self) -> std::sync::MutexGuard<'_, Vec<LiveListener>> {
        self.listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn rejected(&self, error: ReloadError) -> ReloadError {
        self.reloads_error.increment(1);
        warn!(error = %ErrorChain(&error), "reload rejected; the running config stays");
        error
    }

    /// Publishes `config`'s pools and routes. Pools that stay keep their nodes (by name, with
    /// health and counters); pools that arrive start with every node pending.
    fn apply(&self, state: &mut Applied, mut config: Config) {
        merge_registered(&mut state.registered, &mut config, |addr| {
            self.own_socket(addr)
        });
        let current = self.router.load();
        let mut pools = Vec::new();
        // Not one store: each kept pool publishes its new snapshot, then the routing table.
        // In between (no await, microseconds) a request routed by the old table may already
        // pick from a kept pool's new backends; it never sees half a pool, a new pool before
        // its route, or a route to a pool that is not built. The README says the same.
        for (name, pool_config) in &config.pools {
            let pool = match current.pool(name) {
                Some(pool) => {
                    pool.replace(pool_config);
                    pool.clone()
                }
                None => {
                    let pool = Arc::new(Pool::arriving(name, pool_config));
                    let stop = self.shutdown.child_token();
                    health::spawn_checker(pool.clone(), self.history.clone(), stop.clone());
                    state.checkers.insert(name.clone(), stop);
                    pool
                }
            };
            pools.push(pool);
        }
        self.router
            .store(Arc::new(Router::assemble(&config, pools)));
        for gone in current.pools() {
            if !config.pools.contains_key(&*gone.name) {
                gone.remove_metrics();
            }
        }
        state.checkers.retain(|name, stop| {
            let keep = config.pools.contains_key(name);
            if !keep {
                stop.cancel();
            }
            keep
        });
        state.config = config;
    }

    /// Rebuilds one pool from the effective config after an API change to its backends.
    #[expect(
        clippy::expect_used,
        reason = "pools in the effective config are routed: apply publishes both together"
    )]
    fn publish_pool(&self, state: &Applied, pool: &str) -> PoolView {
        let router = self.router.load();
        let live = router
            .pool(pool)
            .expect("pools in the effective config are routed");
        live.replace(&state.config.pools[pool]);
        view(live, state.config.pools[pool].strategy)
    }

    /// The routing table as published now.
    pub fn router(&self) -> arc_swap::Guard<Arc<Router>> {
        self.router.load()
    }

    pub async fn pools(&self) -> Vec<(String, PoolView)> {
        let state = self.state.lock().await;
        let router = self.router.load();
        router
            .pools()
            .iter()
            .map(|pool| {
                let strategy = state.config.pools[&*pool.name].strategy;
                (pool.name.to_string(), view(pool, strategy))
            })
            .collect()
    }

    /// `PUT`: the pool's whole backend list. Nodes that keep their name keep their state; the
    /// others arrive pending.
    pub async fn replace_backends(
        &self,
        pool: &str,
        specs: Vec<BackendSpec>,
    ) -> Result<PoolView, ChangeError> {
        let mut roster = Roster::default();
        let mut backends = Vec::with_capacity(specs.len());
        for spec in &specs {
            let backend = spec.backend()?;
            roster.take(&backend)?;
            backends.push(backend);
        }
        let mut state = self.state.lock().await;
        for backend in &backends {
            self.refuse_own(backend)?;
        }
        let config = pool_config(&mut state, pool)?;
        config.backends = backends;
        Ok(self.publish_pool(&state, pool))
    }

    /// `POST`: one more backend.
    pub async fn add_backend(
        &self,
        pool: &str,
        spec: BackendSpec,
    ) -> Result<PoolView, ChangeError> {
        let backend = spec.backend()?;
        let mut state = self.state.lock().await;
        self.refuse_own(&backend)?;
        let config = pool_config(&mut state, pool)?;
        Roster::of(&config.backends).take(&backend)?;
        config.backends.push(backend);
        Ok(self.publish_pool(&state, pool))
    }

    /// `DELETE`: removes a node now, or lets it drain first. Draining takes it out of new
    /// picks at once; it is removed when its last request ends (for a sticky pool, whose users
    /// may come back at any time, only when `drain` runs out), and at the latest after `drain`.
    #[expect(
        clippy::expect_used,
        reason = "pools in the effective config are routed, and its nodes are in the live pool"
    )]
    pub async fn remove_backend(
        self: &Arc<Self>,
        pool: &str,
        name: &str,
        drain: Duration,
    ) -> Result<(Removal, PoolView), ChangeError> {
        let mut state = self.state.lock().await;
        let config = pool_config(&mut state, pool)?;
        let Some(position) = config.backends.iter().position(|b| b.name == name) else {
            return Err(ChangeError::NotFound(format!(
                "no backend named `{name}` in pool `{pool}`"
            )));
        };
        if drain.is_zero() {
            config.backends.remove(position);
            info!(pool, backend = name, "backend removed");
            return Ok((Removal::Removed, self.publish_pool(&state, pool)));
        }
        let sticky = config.strategy == Strategy::StickyCookie;
        let router = self.router.load();
        let live = router
            .pool(pool)
            .expect("pools in the effective config are routed");
        let snapshot = live.snapshot();
        let node = snapshot
            .backends
            .iter()
            .find(|b| &*b.node.name == name)
            .map(|b| b.node.clone())
            .expect("the effective config and the live pool agree");
        node.start_draining();
        live.journal.record(
            &node.name,
            "draining",
            format!("for up to {}", humantime::format_duration(drain)),
        );
        info!(pool, backend = name, ?drain, "backend draining");
        let control = self.clone();
        let (pool_name, deadline) = (pool.to_owned(), Instant::now() + drain);
        tokio::spawn(async move {
            while Instant::now() < deadline && (sticky || node.in_flight() > 0) {
                tokio::select! {
                    () = tokio::time::sleep(DRAIN_POLL) => {}
                    () = control.shutdown.cancelled() => return,
                }
            }
            control.finish_drain(&pool_name, &node).await;
        });
        Ok((Removal::Draining, view(live, config.strategy)))
    }

    /// Removes a drained node, unless a later change already replaced or removed it.
    async fn finish_drain(&self, pool: &str, node: &Arc<Node>) {
        let mut state = self.state.lock().await;
        let router = self.router.load();
        let still_there = router.pool(pool).is_some_and(|live| {
            live.snapshot()
                .backends
                .iter()
                .any(|b| Arc::ptr_eq(&b.node, node))
        });
        let Ok(config) = pool_config(&mut state, pool) else {
            return;
        };
        if still_there {
            config.backends.retain(|b| *b.name != *node.name);
            self.publish_pool(&state, pool);
            info!(pool, backend = %node.name, in_flight = node.in_flight(), "drained backend removed");
        }
    }
}

/// Listeners are the same one across a reload when they bind the same address; several
/// listeners may ask for port 0 (any free port), and those are told apart by name.
fn same_listener(old: &ListenerConfig, new: &ListenerConfig) -> bool {
    old.bind == new.bind && (new.bind.port() != 0 || old.name == new.name)
}

/// A kept listener's settings changed in a way only a restart applies (certificate contents
/// reload in place, and the certificate paths may change too; the access log is swapped).
fn settings_differ(old: &ListenerConfig, new: &ListenerConfig) -> bool {
    let mut old = old.clone();
    if old.tls.is_some() && new.tls.is_some() {
        old.tls.clone_from(&new.tls);
    }
    old.access_log.clone_from(&new.access_log);
    old != *new
}

/// A reload's listener changes, prepared: kept listeners with their new certificates, new
/// listeners bound, and the names of those to stop.
#[derive(Default)]
struct ListenerChanges {
    kept: Vec<(Arc<TlsTerminator>, CertSet)>,
    /// Kept listeners whose `access_log` changed, with the new one opened.
    logs: Vec<(LogSlot, Option<Arc<AccessLog>>, Option<AccessLogConfig>)>,
    added: Vec<BoundListener>,
    removed: Vec<String>,
}

/// A traffic listener serving now.
#[derive(Debug)]
struct LiveListener {
    config: ListenerConfig,
    addr: SocketAddr,
    tls: Option<Arc<TlsTerminator>>,
    access_log: LogSlot,
    /// Stops this listener alone: no new connections, open ones finish gracefully.
    stop: CancellationToken,
}

// The registry's entry points (src/registry.rs). Registered nodes live in the effective config
// like any other, and also in `Applied::registered`, which `apply` merges into each new config.

/// What [`Control::register`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// A new node, pending until it passes `rise` checks.
    Added,
    /// Already registered at this address: a heartbeat.
    Unchanged,
    /// Already registered; its address changed. Its name, counters and sticky users stay, but
    /// it is pending again until `rise` checks pass at the new address.
    Moved,
}

/// Why [`Control::register`] refused a node; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Change(#[from] ChangeError),
    #[error("{}", own_message(*address, owner))]
    OwnSocket { address: SocketAddr, owner: String },
    #[error("pool `{pool}` already has {max} registered nodes (registry.max_nodes)")]
    Full { pool: String, max: usize },
}

impl Control {
    /// Adds a registered node to `pool`, or confirms one already registered and follows its
    /// address. A name or address held by a node the registry did not add (the file's, the
    /// API's, or a decommissioned node still draining) is a conflict; one of fulcrum's own
    /// sockets is refused, and so is a new node beyond `max_nodes` registered ones.
    pub async fn register(
        &self,
        pool: &str,
        backend: BackendConfig,
        max_nodes: usize,
    ) -> Result<Registration, RegisterError> {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        // Under the lock: a reload that adds a listener cannot slip in between.
        if let Some(owner) = self.own_socket(backend.address) {
            return Err(RegisterError::OwnSocket {
                address: backend.address,
                owner,
            });
        }
        let config = state
            .config
            .pools
            .get_mut(pool)
            .ok_or_else(|| ChangeError::NotFound(format!("no pool named `{pool}`")))?;
        let registered = state.registered.entry(pool.to_owned()).or_default();
        let ours = registered.iter().position(|b| b.name == backend.name);
        let live = config.backends.iter().position(|b| b.name == backend.name);
        if live.is_some() && ours.is_none() {
            return Err(ChangeError::Conflict(format!(
                "a backend named `{}` is already in pool `{pool}` and was not registered (or is still draining)",
                backend.name
            ))
            .into());
        }
        if let Some(other) = config
            .backends
            .iter()
            .find(|b| b.address == backend.address && b.name != backend.name)
        {
            return Err(ChangeError::Conflict(format!(
                "{} is already in pool `{pool}` as `{}`",
                backend.address, other.name
            ))
            .into());
        }
        let outcome = match live {
            Some(i) if config.backends[i] == backend => return Ok(Registration::Unchanged),
            Some(i) => {
                config.backends[i] = backend.clone();
                Registration::Moved
            }
            None if registered.len() >= max_nodes => {
                return Err(RegisterError::Full {
                    pool: pool.to_owned(),
                    max: max_nodes,
                });
            }
            None => {
                config.backends.push(backend.clone());
                Registration::Added
            }
        };
        info!(pool, backend = %backend.name, address = %backend.address, ?outcome, "registered node");
        if outcome == Registration::Moved {
            self.unprove(pool, &backend, config.health.rise);
        }
        match ours {
            Some(i) => registered[i] = backend,
            None => registered.push(backend),
        }
        self.publish_pool(state, pool);
        Ok(outcome)
    }

    /// A node that moved has passed no check at its new address: pending again. Done before
    /// the snapshot with the new address is published, so a health checker that sees the new
    /// address also sees the node pending and counts `rise` passes from zero there.
    fn unprove(&self, pool: &str, backend: &BackendConfig, rise: u32) {
        let router = self.router.load();
        let Some(live) = router.pool(pool) else {
            return;
        };
        let snapshot = live.snapshot();
        if let Some(node) = snapshot
            .backends
            .iter()
            .find(|b| *b.node.name == *backend.name)
            .map(|b| &b.node)
        {
            node.set_health(Health::Pending);
            live.journal.record(
                &node.name,
                "moved",
                format!("to {}; pending {rise} checks", backend.address),
            );
        }
    }

    /// Forgets a registered node and removes it from `pool`: at once for a zero `drain`,
    /// otherwise drained like `DELETE ...?drain=`. `NotFound` when the registry did not add it.
    pub async fn deregister(
        self: &Arc<Self>,
        pool: &str,
        name: &str,
        drain: Duration,
    ) -> Result<Removal, ChangeError> {
        {
            let mut state = self.state.lock().await;
            let registered = state.registered.entry(pool.to_owned()).or_default();
            let Some(i) = registered.iter().position(|b| b.name == name) else {
                return Err(ChangeError::NotFound(format!(
                    "no registered node named `{name}` in pool `{pool}`"
                )));
            };
            registered.remove(i);
        }
        match self.remove_backend(pool, name, drain).await {
            Ok((removal, _)) => Ok(removal),
            // A reload or an API change in between already took it out: nothing left to drain.
            Err(ChangeError::NotFound(_)) => Ok(Removal::Removed),
            Err(e) => Err(e),
        }
    }
}

impl Control {
    /// The names of the nodes the registry added to `pool` and has not removed.
    pub(crate) async fn registered(&self, pool: &str) -> Vec<String> {
        let state = self.state.lock().await;
        state
            .registered
            .get(pool)
            .map(|nodes| nodes.iter().map(|b| b.name.clone()).collect())
            .unwrap_or_default()
    }
}

/// Adds the registered nodes to the pools of a config about to be applied. The file wins a
/// clash of name or address, and a listener the reload added wins over a node at its address:
/// that registration is dropped (its next heartbeat is refused).
fn merge_registered(
    registered: &mut HashMap<String, Vec<BackendConfig>>,
    config: &mut Config,
    own_socket: impl Fn(SocketAddr) -> Option<String>,
) {
    for (pool, nodes) in registered.iter_mut() {
        let Some(pool_config) = config.pools.get_mut(pool) else {
            continue;
        };
        nodes.retain(|node| {
            let clash = pool_config
                .backends
                .iter()
                .any(|b| b.name == node.name || b.address == node.address);
            if clash {
                warn!(pool = %pool, backend = %node.name, address = %node.address,
                    "the config file now has this name or address; the registration is dropped");
                return false;
            }
            if let Some(owner) = own_socket(node.address) {
                warn!(pool = %pool, backend = %node.name, address = %node.address, %owner,
                    "a registered node is now at one of fulcrum's own sockets; the registration is dropped");
                return false;
            }
            pool_config.backends.push(node.clone());
            true
        });
    }
}

/// Whether a connection to `addr` would reach a socket bound to `bind`. A wildcard bind
/// accepts on every local address of either family (a `[::]` socket is dual-stack unless
/// told otherwise); `is_interface` says whether an address belongs to this machine.
/// IPv4-mapped IPv6 addresses are the IPv4 address they carry.
fn reaches(
    bind: SocketAddr,
    addr: SocketAddr,
    is_interface: &mut impl FnMut(IpAddr) -> bool,
) -> bool {
    if bind.port() != addr.port() {
        return false;
    }
    let (bind_ip, ip) = (bind.ip().to_canonical(), addr.ip().to_canonical());
    if bind_ip.is_unspecified() {
        ip.is_loopback() || is_interface(ip)
    } else {
        bind_ip == ip
    }
}

/// The machine's interface addresses now (they change with DHCP, VPNs, containers), or `None`
/// when they cannot be listed.
fn interface_ips() -> Option<Vec<IpAddr>> {
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => Some(interfaces.iter().map(|i| i.ip().to_canonical()).collect()),
        Err(e) => {
            warn!(error = %e, "cannot list this machine's addresses; every address at a wildcard-bound port counts as fulcrum's own");
            None
        }
    }
}

fn own_message(address: SocketAddr, owner: &str) -> String {
    format!(
        "{address} is fulcrum's own {owner}: a backend there would send traffic back into fulcrum"
    )
}

fn pool_config<'a>(
    state: &'a mut Applied,
    pool: &str,
) -> Result<&'a mut crate::base::config::PoolConfig, ChangeError> {
    state
        .config
        .pools
        .get_mut(pool)
        .ok_or_else(|| ChangeError::NotFound(format!("no pool named `{pool}`")))
}

fn view(pool: &Pool, strategy: Strategy) -> PoolView {
    PoolView {
        strategy: strategy.as_str(),
        backends: pool
            .snapshot()
            .backends
            .iter()
            .map(|b| BackendView {
                name: b.node.name.to_string(),
                address: b.address,
                weight: b.weight,
                state: state_name(&b.node),
                in_flight: b.node.in_flight(),
                requests: b.node.requests(),
                failures: b.node.failures(),
                max_connections: b.max_connections,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reached(bind: &str, addr: &str, interfaces: &[&str]) -> bool {
        let interfaces: Vec<IpAddr> = interfaces.iter().map(|i| i.parse().unwrap()).collect();
        reaches(bind.parse().unwrap(), addr.parse().unwrap(), &mut |ip| {
            interfaces.contains(&ip)
        })
    }

    #[test]
    fn a_socket_is_reached_at_its_own_address_and_a_wildcard_at_every_local_one() {
        assert!(reached("127.0.0.1:9090", "127.0.0.1:9090", &[]));
        assert!(reached("127.0.0.1:9090", "[::ffff:127.0.0.1]:9090", &[]));
        assert!(!reached("127.0.0.1:9090", "127.0.0.1:9091", &[]));
        assert!(!reached("127.0.0.1:9090", "127.0.0.2:9090", &[]));
        assert!(!reached("[::1]:9090", "127.0.0.1:9090", &[]));
        for wildcard in ["0.0.0.0:8080", "[::]:8080"] {
            for local in [
                "127.0.0.1:8080",
                "127.9.9.9:8080",
                "[::1]:8080",
                "192.0.2.2:8080",
                "[fd00::2]:8080",
                "[::ffff:192.0.2.2]:8080",
            ] {
                assert!(
                    reached(wildcard, local, &["192.0.2.2", "fd00::2"]),
                    "{wildcard} {local}"
                );
            }
            assert!(!reached(wildcard, "192.0.2.3:8080", &["192.0.2.2"]));
            assert!(!reached(wildcard, "127.0.0.1:8081", &[]));
        }
    }
}
