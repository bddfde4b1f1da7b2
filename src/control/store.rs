//! The registry's shared store (`[registry] store = "postgres://..."`): the seed's
//! `server_nodes` table, through which every balancer configured with the same store serves the
//! same registered nodes.
//!
//! Writes: a registry call applies its change to this balancer's pool first (the same
//! [`Control::register`] / [`Control::deregister`] path as without a store, so every rule and
//! refusal is the same) and then writes the row; a write that fails undoes a new registration
//! and answers `UNAVAILABLE`, so a node never believes a registration the store lost. A write
//! that changes what other balancers should serve also sends `NOTIFY fulcrum_server_nodes`.
//!
//! Reads: one task per balancer holds one connection, `LISTEN`s on that channel and re-reads the
//! pool's live rows on every notification and at least every `store_poll_interval`, then
//! reconciles the pool through the same control path: a live row not yet here is registered
//! (pending until this balancer's own `rise` checks pass), a row that left the live window is
//! removed at once (the heartbeat expiry of a single balancer), a `DRAINING` row is drained. A
//! node is live while `node_status = 'ACTIVE' AND last_heartbeat_at > now() - 3 × heartbeat
//! interval`, the seed's own query.
//!
//! The connection's mutex serialises registry writes with reconcile passes, so a pass never
//! sees this balancer's node before its row is written and takes it out again. None of this is
//! on the request path: the pool changes it makes are published as `ArcSwap` snapshots.
//!
//! While the store is unreachable the pools keep their last known nodes (nothing expires),
//! registry calls answer `UNAVAILABLE`, and `fulcrum_registry_store_up` reads 0; the
//! connection is retried with backoff and the first pass after it returns reconciles.
//!
//! No TLS to the store: it is expected on a private network or loopback (the README says so).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use metrics::{Gauge, gauge};
use tokio::sync::{Mutex, Notify};
use tokio::time::MissedTickBehavior;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::base::config::backend;
use crate::base::config::{BackendConfig, RegistryConfig, StoreUrl};
use crate::base::error::ErrorChain;
use crate::base::metrics::REGISTRY_STORE_UP;
use crate::control::{Control, RegisterError, Registration, Removal};

/// The channel writes notify and every balancer listens on; the payload is the pool.
const CHANNEL: &str = "fulcrum_server_nodes";
/// Each statement, and the connection attempt: past this the store counts as unreachable for
/// that call (a registry call answers `UNAVAILABLE` well within a node's 2 s call timeout).
const QUERY_TIMEOUT: Duration = Duration::from_millis(1500);
/// Reconnection attempts start here and double up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The drain of a node another balancer decommissioned, unless its row leaves `DRAINING`
/// sooner: the seed's default drain (the drain asked for is not in the table).
const REMOTE_DRAIN: Duration = Duration::from_secs(30);
/// How often a decommission looks whether its node has finished draining here.
const DRAIN_POLL: Duration = Duration::from_millis(100);

/// The seed's `server_nodes` exactly (columns, types, defaults, `idx_active_nodes`), plus the
/// two columns a balancer needs and the seed leaves out: the node's `port` and its `pool`.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS server_nodes (
    node_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    hostname VARCHAR(255) UNIQUE NOT NULL,
    ip_address INET NOT NULL,
    node_status VARCHAR(50) DEFAULT 'ACTIVE',
    active_connections_count INT DEFAULT 0,
    last_heartbeat_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    port INTEGER NOT NULL,
    pool VARCHAR(128) NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_active_nodes ON server_nodes(node_status, last_heartbeat_at)
WHERE node_status = 'ACTIVE';
";

/// Upserts a node's row as `ACTIVE` with a fresh heartbeat, unless its `hostname` belongs to
/// another pool; notifies when other balancers would see a change (a new, moved, revived or
/// formerly expired node), not on a plain heartbeat. Returns (rows written, 0).
const UPSERT: &str = "
WITH before AS (
    SELECT 1 FROM server_nodes
    WHERE hostname = $1::text AND pool = $4::text AND node_status = 'ACTIVE'
      AND ip_address = $2::inet AND port = $3::int4
      AND last_heartbeat_at > now() - make_interval(secs => $6::float8)
), written AS (
    INSERT INTO server_nodes
        (hostname, ip_address, port, pool, node_status, active_connections_count, last_heartbeat_at)
    VALUES ($1::text, $2::inet, $3::int4, $4::text, 'ACTIVE', $5::int4, now())
    ON CONFLICT (hostname) DO UPDATE SET
        ip_address = EXCLUDED.ip_address, port = EXCLUDED.port, node_status = 'ACTIVE',
        active_connections_count = EXCLUDED.active_connections_count, last_heartbeat_at = now()
    WHERE server_nodes.pool = EXCLUDED.pool
    RETURNING 1
)
SELECT (SELECT count(*) FROM written),
       (SELECT count(*) FROM (SELECT pg_notify('fulcrum_server_nodes', $4::text)
            WHERE EXISTS (SELECT 1 FROM written) AND NOT EXISTS (SELECT 1 FROM before)) AS n)
";

/// Moves a row from status `$4` to `$3` (only a live one when `$4` is `ACTIVE`) and notifies.
const SET_STATUS: &str = "
WITH changed AS (
    UPDATE server_nodes SET node_status = $3::text
    WHERE hostname = $1::text AND pool = $2::text AND node_status = $4::text
      AND ($4::text <> 'ACTIVE' OR last_heartbeat_at > now() - make_interval(secs => $5::float8))
    RETURNING 1
)
SELECT (SELECT count(*) FROM changed),
       (SELECT count(*) FROM (SELECT pg_notify('fulcrum_server_nodes', $2::text)
            WHERE EXISTS (SELECT 1 FROM changed)) AS n)
";

/// The pool's live rows, and the rows of the nodes this balancer holds (to see them leave).
const READ: &str = "
SELECT hostname::text, ip_address, port, node_status::text,
       (node_status = 'ACTIVE' AND last_heartbeat_at > now() - make_interval(secs => $2::float8))
FROM server_nodes
WHERE pool = $1::text
  AND ((node_status = 'ACTIVE' AND last_heartbeat_at > now() - make_interval(secs => $2::float8))
       OR hostname = ANY($3::text[]))
";

/// Why the store could not do what a registry call needed; the call answers `UNAVAILABLE`
/// (`OtherPool`: `ALREADY_EXISTS`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("the registry store is unreachable; retry later")]
    Down,
    #[error("the registry store did not answer within {QUERY_TIMEOUT:?}; retry later")]
    Timeout,
    #[error("the registry store failed the query; retry later")]
    Query(#[source] tokio_postgres::Error),
    #[error("server_id `{0}` is registered in another pool of the registry store")]
    OtherPool(String),
    #[error(
        "table server_nodes exists without fulcrum's columns `port INTEGER NOT NULL` and `pool VARCHAR(128) NOT NULL`; add them (fulcrum does not alter a table it did not create)"
    )]
    Schema,
}

/// Why a registry call through the store failed: this balancer refused the node, or the store
/// could not record it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SharedError {
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no registered node `{0}`")]
    NotFound(String),
}

/// The store of one balancer's registry; cheap to clone.
#[derive(Clone)]
pub(crate) struct Store(Arc<Shared>);

struct Shared {
    url: StoreUrl,
    pool: String,
    control: Arc<Control>,
    max_nodes: usize,
    /// 3 × the heartbeat interval: how recent a heartbeat keeps a node live.
    window: Duration,
    poll: Duration,
    /// The connection while the store is up. Held across a registry call's local change and
    /// its write, and across a reconcile pass.
    conn: Mutex<Option<Client>>,
    /// A notification arrived, or the connection came up: re-read now.
    wake: Notify,
    up: Gauge,
    /// The balancer is shutting down: the task and pending `DECOMMISSIONED` writes stop.
    stop: CancellationToken,
}

impl Store {
    /// The store of `config` (which has one), feeding `control`'s pool `config.pool`;
    /// `expiry` is the registry's 3 × heartbeat window.
    pub(crate) fn new(
        url: StoreUrl,
        config: &RegistryConfig,
        expiry: Duration,
        control: Arc<Control>,
    ) -> Self {
        let up = gauge!(REGISTRY_STORE_UP);
        up.set(0.0);
        Self(Arc::new(Shared {
            url,
            pool: config.pool.clone(),
            control,
            max_nodes: config.max_nodes,
            window: expiry,
            poll: config.store_poll_interval,
            conn: Mutex::new(None),
            wake: Notify::new(),
            up,
            stop: CancellationToken::new(),
        }))
    }

    /// Starts the task that connects, listens and reconciles until `shutdown`.
    pub(crate) fn spawn(&self, shutdown: CancellationToken) {
        let stop = self.0.stop.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            stop.cancel();
        });
        tokio::spawn(self.clone().run(self.0.stop.clone()));
    }

    /// `ReportActive` through the store: registered here, then upserted.
    pub(crate) async fn report_active(
        &self,
        backend: BackendConfig,
    ) -> Result<Registration, SharedError> {
        let shared = &self.0;
        let conn = shared.conn.lock().await;
        let client = ready(&conn)?;
        let name = backend.name.clone();
        let outcome = shared
            .control
            .register(&shared.pool, backend.clone(), shared.max_nodes)
            .await?;
        if let Err(e) = self.upsert(client, &backend).await {
            if outcome == Registration::Added {
                // Not in the store, so not served: the node learns it failed and retries.
                let _ = shared
                    .control
                    .deregister(&shared.pool, &name, Duration::ZERO)
                    .await;
            }
            return Err(e.into());
        }
        Ok(outcome)
    }

    async fn upsert(&self, client: &Client, backend: &BackendConfig) -> Result<(), StoreError> {
        let shared = &self.0;
        let connections = shared
            .control
            .router()
            .pool(&shared.pool)
            .and_then(|pool| {
                pool.snapshot()
                    .backends
                    .iter()
                    .find(|b| *b.node.name == *backend.name)
                    .map(|b| b.node.reported_connections())
            })
            .unwrap_or(0);
        let connections = i32::try_from(connections).unwrap_or(i32::MAX);
        let port = i32::from(backend.address.port());
        let ip = backend.address.ip();
        let window = shared.window.as_secs_f64();
        let row = timed(client.query_one(
            UPSERT,
            &[
                &backend.name as &(dyn ToSql + Sync),
                &ip,
                &port,
                &shared.pool,
                &connections,
                &window,
            ],
        ))
        .await?;
        let written: i64 = row.try_get(0).map_err(StoreError::Query)?;
        if written == 0 {
            return Err(StoreError::OtherPool(backend.name.clone()));
        }
        Ok(())
    }

    /// `ReportDecommission` through the store: the live row becomes `DRAINING` (every
    /// balancer drains the node), this balancer drains it, and when that drain ends the row
    /// becomes `DECOMMISSIONED`. `NotFound` when the store has no live row of that name.
    pub(crate) async fn decommission(
        &self,
        name: &str,
        drain: Duration,
    ) -> Result<Removal, SharedError> {
        let shared = &self.0;
        let conn = shared.conn.lock().await;
        let client = ready(&conn)?;
        if !self.set_status(client, name, "DRAINING", "ACTIVE").await? {
            return Err(SharedError::NotFound(name.to_owned()));
        }
        let removal = match shared.control.deregister(&shared.pool, name, drain).await {
            Ok(removal) => removal,
            // Not picked up here yet: other balancers drain it; this one has nothing to wait
            // for but the drain asked for.
            Err(_) => Removal::Removed,
        };
        drop(conn);
        let store = self.clone();
        let (name, absent) = (name.to_owned(), removal == Removal::Removed);
        tokio::spawn(async move { store.decommissioned(name, drain, absent).await });
        Ok(removal)
    }

    /// Whether the row `name` went from `from` to `to`.
    async fn set_status(
        &self,
        client: &Client,
        name: &str,
        to: &str,
        from: &str,
    ) -> Result<bool, StoreError> {
        let shared = &self.0;
        let window = shared.window.as_secs_f64();
        let row = timed(client.query_one(
            SET_STATUS,
            &[
                &name as &(dyn ToSql + Sync),
                &shared.pool,
                &to,
                &from,
                &window,
            ],
        ))
        .await?;
        let changed: i64 = row.try_get(0).map_err(StoreError::Query)?;
        Ok(changed > 0)
    }

    /// Waits for this balancer's drain of `name` to end (for the drain asked for when the node
    /// was never here, so other balancers' drains are not cut short), then writes
    /// `DECOMMISSIONED`, retrying while the store is away.
    async fn decommissioned(self, name: String, drain: Duration, absent: bool) {
        let shared = &self.0;
        let pause = |wait: Duration| async move {
            tokio::select! {
                () = tokio::time::sleep(wait) => true,
                () = shared.stop.cancelled() => false,
            }
        };
        if absent {
            if !pause(drain).await {
                return;
            }
        } else {
            while is_draining(&shared.control, &shared.pool, &name) {
                if !pause(DRAIN_POLL).await {
                    return;
                }
            }
        }
        let mut backoff = FIRST_BACKOFF;
        loop {
            let outcome = {
                let conn = shared.conn.lock().await;
                match ready(&conn) {
                    Ok(client) => {
                        self.set_status(client, &name, "DECOMMISSIONED", "DRAINING")
                            .await
                    }
                    Err(e) => Err(e),
                }
            };
            match outcome {
                Ok(_) => {
                    info!(pool = %shared.pool, backend = %name, "drain ended; node DECOMMISSIONED in the registry store");
                    return;
                }
                Err(e) => {
                    debug!(pool = %shared.pool, backend = %name, error = %ErrorChain(&e), "cannot mark the node DECOMMISSIONED yet");
                    if !pause(backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Connects, listens and reconciles; reconnects with backoff whenever the connection goes.
    async fn run(self, shutdown: CancellationToken) {
        let shared = &self.0;
        let mut state = Reconcile::default();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let lost = CancellationToken::new();
            match self.connect(lost.clone()).await {
                Ok(client) => {
                    backoff = FIRST_BACKOFF;
                    *shared.conn.lock().await = Some(client);
                    shared.up.set(1.0);
                    info!(store = %shared.url, pool = %shared.pool, "registry store connected");
                    self.serve(&mut state, &lost, &shutdown).await;
                    *shared.conn.lock().await = None;
                    shared.up.set(0.0);
                    if shutdown.is_cancelled() {
                        return;
                    }
                    warn!(store = %shared.url, "registry store connection lost; routing keeps the last known nodes, registry calls answer UNAVAILABLE until it is back");
                }
                Err(e) => {
                    warn!(store = %shared.url, error = %ErrorChain(&e), retry_in = ?backoff, "registry store unreachable");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Reconciles on every notification and poll tick until the connection is `lost`.
    async fn serve(
        &self,
        state: &mut Reconcile,
        lost: &CancellationToken,
        shutdown: &CancellationToken,
    ) {
        let shared = &self.0;
        let mut ticker = tokio::time::interval(shared.poll);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            if let Err(e) = self.reconcile(state).await {
                warn!(store = %shared.url, error = %ErrorChain(&e), "registry store read failed");
                if matches!(e, StoreError::Timeout) {
                    // A store that stopped answering: start over on a new connection.
                    return;
                }
            }
            tokio::select! {
                _ = ticker.tick() => {}
                () = shared.wake.notified() => {}
                () = lost.cancelled() => return,
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// A connection with the schema in place and `LISTEN` on; `lost` is cancelled when it ends.
    async fn connect(&self, lost: CancellationToken) -> Result<Client, StoreError> {
        let shared = self.0.clone();
        let mut config: tokio_postgres::Config =
            shared.url.expose().parse().map_err(StoreError::Query)?;
        config
            .application_name("fulcrum")
            .connect_timeout(QUERY_TIMEOUT)
            .keepalives_idle(Duration::from_secs(10));
        let (mut client, mut connection) = timed(config.connect(NoTls)).await?;
        let driver = shared.clone();
        tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) if n.payload() == driver.pool => {
                        driver.wake.notify_one();
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        debug!(error = %ErrorChain(&e), "registry store connection ended");
                        break;
                    }
                    None => break,
                }
            }
            lost.cancel();
        });
        ensure_schema(&mut client).await?;
        timed(client.batch_execute(&format!("LISTEN {CHANNEL}"))).await?;
        Ok(client)
    }

    /// One pass: reads the pool's rows and brings this balancer's pool in line with them.
    async fn reconcile(&self, state: &mut Reconcile) -> Result<(), StoreError> {
        let shared = &self.0;
        let (control, pool) = (&shared.control, shared.pool.as_str());
        let conn = shared.conn.lock().await;
        let client = ready(&conn)?;
        let registered = control.registered(pool).await;
        let mut known: Vec<String> = registered.clone();
        known.extend(state.remote_drains.iter().cloned());
        let window = shared.window.as_secs_f64();
        let rows =
            timed(client.query(READ, &[&pool as &(dyn ToSql + Sync), &window, &known])).await?;
        let mut live = Vec::new();
        let mut status = HashMap::new();
        for row in &rows {
            let name: String = row.try_get(0).map_err(StoreError::Query)?;
            let ip: IpAddr = row.try_get(1).map_err(StoreError::Query)?;
            let port: i32 = row.try_get(2).map_err(StoreError::Query)?;
            let node_status: Option<String> = row.try_get(3).map_err(StoreError::Query)?;
            let is_live: Option<bool> = row.try_get(4).map_err(StoreError::Query)?;
            if is_live == Some(true) {
                live.push((name.clone(), ip, port));
            }
            status.insert(name, node_status.unwrap_or_default());
        }

        // Drains another balancer started end when its row leaves DRAINING, or by themselves.
        state.remote_drains.retain(|name| {
            let still = is_draining(control, pool, name);
            still && status.get(name).is_some_and(|s| s == "DRAINING")
        });
        let live_names: HashSet<&str> = live.iter().map(|(n, _, _)| n.as_str()).collect();
        for name in &registered {
            if live_names.contains(name.as_str()) {
                continue;
            }
            if status.get(name).is_some_and(|s| s == "DRAINING") {
                info!(pool, backend = %name, "decommissioned through another balancer; draining");
                let _ = control.deregister(pool, name, REMOTE_DRAIN).await;
                state.remote_drains.insert(name.clone());
            } else {
                info!(pool, backend = %name, status = status.get(name).map_or("absent", String::as_str),
                    "registered node left the store's live set; removing it");
                let _ = control.deregister(pool, name, Duration::ZERO).await;
            }
        }
        // Forget refusals of rows gone, so a row that comes back and is refused is logged again.
        state
            .refused
            .retain(|name| live_names.contains(name.as_str()));
        // Rows whose drain ended elsewhere while still draining here: end it here too.
        for name in known.iter().filter(|n| !registered.contains(n)) {
            if !state.remote_drains.contains(name) && is_draining(control, pool, name) {
                let _ = control.remove_backend(pool, name, Duration::ZERO).await;
            }
        }
        for (name, ip, port) in live {
            if state.remote_drains.contains(&name) {
                continue;
            }
            let Some(backend) = row_backend(&name, ip, port) else {
                if state.refused.insert(name.clone()) {
                    warn!(pool, backend = %name, %ip, port, "store row is not a usable backend; skipped");
                }
                continue;
            };
            match control.register(pool, backend, shared.max_nodes).await {
                Ok(_) => {
                    state.refused.remove(&name);
                }
                Err(e) => {
                    if state.refused.insert(name.clone()) {
                        warn!(pool, backend = %name, error = %e, "store row not served by this balancer");
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a reconcile pass remembers between passes.
#[derive(Default)]
struct Reconcile {
    /// Nodes this balancer drains because another one decommissioned them.
    remote_drains: HashSet<String>,
    /// Rows refused here (logged once, until they are accepted).
    refused: HashSet<String>,
}

/// The open connection, or `Down`.
fn ready(conn: &Option<Client>) -> Result<&Client, StoreError> {
    match conn.as_ref() {
        Some(client) if !client.is_closed() => Ok(client),
        _ => Err(StoreError::Down),
    }
}

/// A store operation bounded by `QUERY_TIMEOUT`.
async fn timed<T>(
    operation: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(QUERY_TIMEOUT, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) if e.is_closed() => Err(StoreError::Down),
        Ok(Err(e)) => Err(StoreError::Query(e)),
        Err(_) => Err(StoreError::Timeout),
    }
}

/// Creates `server_nodes` and `idx_active_nodes` when absent, saying so; one balancer at a
/// time (an advisory lock), as two `CREATE ... IF NOT EXISTS` racing can fail each other.
async fn ensure_schema(client: &mut Client) -> Result<(), StoreError> {
    let tx = timed(client.transaction()).await?;
    timed(tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('fulcrum server_nodes'))",
        &[],
    ))
    .await?;
    let exists = |name: &'static str| {
        let tx = &tx;
        async move {
            let row =
                timed(tx.query_one("SELECT to_regclass($1::text) IS NOT NULL", &[&name])).await?;
            row.try_get::<_, bool>(0).map_err(StoreError::Query)
        }
    };
    let (table, index) = (
        exists("server_nodes").await?,
        exists("idx_active_nodes").await?,
    );
    if table {
        let row = timed(tx.query_one(
            "SELECT count(*) FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = 'server_nodes'
               AND column_name IN ('port', 'pool')",
            &[],
        ))
        .await?;
        if row.try_get::<_, i64>(0).map_err(StoreError::Query)? < 2 {
            return Err(StoreError::Schema);
        }
    }
    timed(tx.batch_execute(SCHEMA)).await?;
    timed(tx.commit()).await?;
    if !table {
        info!("registry store: created table server_nodes (the seed's schema plus port and pool)");
    }
    if !index {
        info!("registry store: created index idx_active_nodes");
    }
    Ok(())
}

/// The backend a live row describes, by the rules every registered node follows.
fn row_backend(name: &str, ip: IpAddr, port: i32) -> Option<BackendConfig> {
    backend::name(name).ok()?;
    let port = u16::try_from(port).ok()?;
    let address = backend::port(SocketAddr::new(ip.to_canonical(), port)).ok()?;
    Some(BackendConfig {
        name: name.to_owned(),
        address,
        weight: 1,
        max_connections: None,
    })
}

/// Whether `name` is in `pool` here and draining.
fn is_draining(control: &Control, pool: &str, name: &str) -> bool {
    control.router().pool(pool).is_some_and(|live| {
        live.snapshot()
            .backends
            .iter()
            .any(|b| *b.node.name == *name && b.node.is_draining())
    })
}
