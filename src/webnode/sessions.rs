//! The session store behind `GET /session` and `POST /v1/sessions/verify`.
//!
//! - `memory`: a map in this process. Stateful on purpose: a user the balancer moves to another
//!   node is unknown there and starts over, which is what a sticky-versus-round-robin
//!   comparison measures.
//! - `redis://HOST:PORT` or `redis+cluster://H1:P1,H2:P2,…`: one counter key per session in
//!   Redis (one server, or a Redis Cluster whose slots spread the keys over its shards), so every
//!   node pointed at the same Redis continues any session. A Lua script increments and refreshes
//!   the expiry in one step, so two nodes serving one user at once never lose a visit.
//! - With `--database postgres://…` ([`super::session_db`]) Redis is the cache in front of the
//!   seed's `user_sessions` table: every write goes to both, a read that Redis cannot answer
//!   (flushed, restarted empty, or away) is answered by PostgreSQL and put back into Redis.
//!   Redis can be lost whole without losing a session; PostgreSQL away leaves Redis serving,
//!   and each session's durable row catches up on its next visit (the write is an upsert that
//!   only ever raises the count).
//!
//! Ids are 128 random bits written as 32 lowercase hex digits. A store only ever counts ids it
//! issued: an id it does not hold (never issued, expired, or from another node's memory) is
//! answered with a fresh id, so a client cannot pick its own session id (session fixation).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use super::session_core::SESSION_TTL;
use super::session_core::{ClientInfo, LinkHealth, LinkStatus, SessionId};
use super::session_db::{DbError, SessionDatabase, SessionDb};
use super::session_metrics::{LookupHistogram, Source};

/// At most this many sessions in memory (about 5 MB); past it the least recently used half
/// is forgotten, so a long load test cannot grow a node without bound.
pub const MEMORY_SESSION_CAP: usize = 100_000;
/// How often a node deletes expired `user_sessions` rows, unless told otherwise.
pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(60);
/// One Redis connect attempt. Loopback or LAN Redis answers in well under this; longer means
/// it is not there, and `/session` should say 503 quickly rather than hang the user.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// One Redis command, connect included, before the request is answered 503.
const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the monitor pings Redis for `/healthz`, and so how soon a node notices that
/// Redis came back while nobody asked for a session.
const REDIS_PING_INTERVAL: Duration = Duration::from_secs(1);
/// `--sessions` for a Redis Cluster: the seed nodes after it, comma-separated.
const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Counts one visit of an existing session and restarts its expiry; 0 when it does not exist
/// (INCR alone would create it, and the store must not adopt ids it never issued).
const VISIT_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  local visits = redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  return visits
end
return 0
";

/// Puts a count PostgreSQL answered back into Redis, unless Redis already holds a higher one
/// (another node counted a visit meanwhile): a refill never takes a visit back.
const REFILL_SCRIPT: &str = r"
local held = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local visits = tonumber(ARGV[1])
if visits > held then
  redis.call('SET', KEYS[1], visits, 'EX', ARGV[2])
  return visits
end
return held
";

/// What one `/session` visit found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Visit {
    pub id: SessionId,
    /// Visits of this session so far, this one included.
    pub visits: u64,
    /// The store did not know the id it was given (or none was given): `id` is freshly issued
    /// and `visits` is 1.
    pub new: bool,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum StoreError {
    #[error("the session store (redis at {addr}) is unreachable: {source}")]
    Redis {
        addr: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("the session store (redis at {addr}) did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("the session store's database failed too")]
    Database(#[source] DbError),
    #[error("no randomness for a session id")]
    Random(#[from] getrandom::Error),
    #[error("two freshly drawn session ids were both taken already")]
    IdsTaken,
}

impl StoreError {
    /// Whether a later try may work (the store is away), as opposed to a bug or bad luck.
    pub(super) fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Redis { .. } | StoreError::Timeout { .. } | StoreError::Database(_)
        )
    }
}

/// `--sessions`: where a node keeps its sessions.
#[derive(Clone, Default)]
pub enum SessionBackend {
    /// In this process: lost on restart, not shared with other nodes.
    #[default]
    Memory,
    /// The client `redis://...` parsed into. The URL may hold a password, so it is only ever
    /// shown as [`SessionBackend::describe`] does.
    Redis(redis::Client),
    /// `redis+cluster://H1:P1,H2:P2,…`: a Redis Cluster, found through these seed nodes.
    RedisCluster {
        /// The cluster client (it may hold a password: never shown).
        client: Box<ClusterClient>,
        /// The seed nodes as `HOST:PORT`, for logs.
        nodes: Vec<String>,
    },
}

impl fmt::Debug for SessionBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl SessionBackend {
    /// `memory`, `redis://...` or `redis+cluster://...`, as the command line shows it
    /// (credentials left out).
    pub fn describe(&self) -> String {
        match self {
            SessionBackend::Memory => "memory".to_owned(),
            SessionBackend::Redis(client) => {
                format!("redis://{}", client.get_connection_info().addr())
            }
            SessionBackend::RedisCluster { nodes, .. } => {
                format!("{CLUSTER_SCHEME}{}", nodes.join(","))
            }
        }
    }
}

impl FromStr for SessionBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "memory" {
            return Ok(SessionBackend::Memory);
        }
        if let Some(rest) = s.strip_prefix(CLUSTER_SCHEME) {
            return parse_cluster(rest);
        }
        if !s.starts_with("redis://") {
            return Err(format!(
                "`{s}` is neither `memory` nor a redis://HOST:PORT or \
                 redis+cluster://HOST:PORT,HOST:PORT,… URL"
            ));
        }
        redis::Client::open(s)
            .map(SessionBackend::Redis)
            .map_err(|_| format!("`{}` is not a usable Redis URL", redact(s)))
    }
}

/// `[USER:PASSWORD@]H1:P1,H2:P2,…` (after `redis+cluster://`): every seed node gets the same
/// credentials.
fn parse_cluster(rest: &str) -> Result<SessionBackend, String> {
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, rest),
    };
    let hosts = hosts.trim_end_matches('/');
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .collect();
    if nodes.is_empty() {
        return Err(format!(
            "`{CLUSTER_SCHEME}` needs at least one HOST:PORT (comma-separated seed nodes)"
        ));
    }
    let mut urls = Vec::with_capacity(nodes.len());
    for node in &nodes {
        if node.contains('/') || !node.contains(':') {
            return Err(format!(
                "`{node}` in `{CLUSTER_SCHEME}` is not a HOST:PORT seed node"
            ));
        }
        let url = match userinfo {
            Some(userinfo) => format!("redis://{userinfo}@{node}"),
            None => format!("redis://{node}"),
        };
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|_| format!("`{node}` in `{CLUSTER_SCHEME}` is not a usable Redis address"))?;
        urls.push(info);
    }
    let client = ClusterClient::builder(urls)
        // One try per command: a retry loop would hold the user's request (the store falls
        // back to PostgreSQL or answers 503 instead).
        .retries(0)
        .connection_timeout(REDIS_CONNECT_TIMEOUT)
        .response_timeout(REDIS_COMMAND_TIMEOUT)
        .build()
        .map_err(|e| format!("`{CLUSTER_SCHEME}{}` is not usable: {e}", nodes.join(",")))?;
    Ok(SessionBackend::RedisCluster {
        client: Box::new(client),
        nodes,
    })
}

/// A URL with anything between `//` and `@` left out, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Where a node keeps its sessions: the cache (`--sessions`) and, optionally, the durable
/// catalog behind it (`--database`).
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// `--sessions`: memory, one Redis or a Redis Cluster.
    pub backend: SessionBackend,
    /// `--database postgres://…`: the `user_sessions` table behind Redis (needs a Redis
    /// backend).
    pub database: Option<SessionDatabase>,
    /// How often expired `user_sessions` rows are deleted (default
    /// [`DEFAULT_CLEANUP_INTERVAL`]).
    pub cleanup_interval: Duration,
}

impl SessionOptions {
    /// Sessions in `backend` with no database.
    pub fn new(backend: SessionBackend) -> Self {
        SessionOptions {
            backend,
            database: None,
            cleanup_interval: DEFAULT_CLEANUP_INTERVAL,
        }
    }

    /// The same, with `user_sessions` in `database` behind the Redis cache.
    #[must_use]
    pub fn with_database(mut self, database: SessionDatabase) -> Self {
        self.database = Some(database);
        self
    }
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions::new(SessionBackend::Memory)
    }
}

impl From<SessionBackend> for SessionOptions {
    fn from(backend: SessionBackend) -> Self {
        SessionOptions::new(backend)
    }
}

/// Why a node's session options cannot work.
#[derive(Debug, thiserror::Error)]
pub(super) enum OptionsError {
    #[error(
        "--database keeps user_sessions behind the Redis session cache: \
         give --sessions redis://… or redis+cluster://… too"
    )]
    DatabaseWithoutRedis,
}

/// A node's session store: a cache (memory or Redis) and, behind Redis, the durable database.
pub(crate) struct Store {
    cache: Cache,
    db: Option<SessionDb>,
    lookups: Arc<LookupHistogram>,
}

enum Cache {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Store {
    /// Starts the store; with Redis (and the database) also the monitors that keep `/healthz`
    /// truthful, and the cleanup of expired rows, until `cancel`. Never waits for Redis or
    /// PostgreSQL: a node whose stores are down still serves everything else.
    pub(super) fn start(
        options: SessionOptions,
        node: &str,
        cancel: &CancellationToken,
    ) -> Result<Self, OptionsError> {
        let cache = match options.backend {
            SessionBackend::Memory => {
                if options.database.is_some() {
                    return Err(OptionsError::DatabaseWithoutRedis);
                }
                Cache::Memory(MemoryStore::new(MEMORY_SESSION_CAP))
            }
            SessionBackend::Redis(client) => {
                let addr = client.get_connection_info().addr().to_string();
                let source = RedisSource::Single(client);
                Cache::Redis(RedisStore::start(
                    source,
                    addr,
                    node.to_owned(),
                    cancel.clone(),
                ))
            }
            SessionBackend::RedisCluster { client, nodes } => {
                let addr = format!("{CLUSTER_SCHEME}{}", nodes.join(","));
                let source = RedisSource::Cluster(client);
                Cache::Redis(RedisStore::start(
                    source,
                    addr,
                    node.to_owned(),
                    cancel.clone(),
                ))
            }
        };
        let db = options
            .database
            .map(|db| SessionDb::start(db, node, options.cleanup_interval, cancel));
        let sources: &[Source] = match (&cache, &db) {
            (Cache::Memory(_), _) => &[Source::Memory],
            (Cache::Redis(_), None) => &[Source::Redis],
            (Cache::Redis(_), Some(_)) => &[Source::Redis, Source::Postgres],
        };
        Ok(Store {
            cache,
            db,
            lookups: Arc::new(LookupHistogram::new(sources)),
        })
    }

    /// The session lookup latencies, by the source that answered.
    pub(super) fn lookups(&self) -> &LookupHistogram {
        &self.lookups
    }

    /// Rows the cleanup deleted so far (0 without a database).
    pub(super) fn expired_deleted(&self) -> Option<u64> {
        self.db.as_ref().map(SessionDb::expired_deleted)
    }

    /// Counts a visit of `presented` (the id the client sent), or starts a new session when
    /// there is none or the store does not hold it.
    pub(super) async fn visit(
        &self,
        presented: Option<SessionId>,
        client: &ClientInfo,
    ) -> Result<Visit, StoreError> {
        let started = Instant::now();
        let redis = match &self.cache {
            Cache::Memory(memory) => {
                let visit = memory.visit(presented, started);
                if presented.is_some() {
                    self.lookups.observe(Source::Memory, started.elapsed());
                }
                return visit;
            }
            Cache::Redis(redis) => redis,
        };
        let Some(id) = presented else {
            return self.create(redis, client).await;
        };
        let cached = redis.visit(id).await;
        match (cached, &self.db) {
            (Ok(Some(visits)), db) => {
                self.lookups.observe(Source::Redis, started.elapsed());
                if let Some(db) = db
                    && let Err(err) = db.write_through(id, visits, client).await
                {
                    // Redis has the visit; the row catches up on the session's next visit.
                    debug!(error = %err, "user_sessions write-through failed");
                }
                return Ok(Visit {
                    id,
                    visits,
                    new: false,
                });
            }
            (Ok(None), None) => self.lookups.observe(Source::Redis, started.elapsed()),
            (Err(err), None) => return Err(err),
            (Ok(None), Some(db)) => match db.visit(id).await {
                Ok(found) => {
                    self.lookups.observe(Source::Postgres, started.elapsed());
                    if let Some(visits) = found {
                        redis.refill(id, visits, SESSION_TTL).await;
                        return Ok(Visit {
                            id,
                            visits,
                            new: false,
                        });
                    }
                }
                // Redis says the session is not there and PostgreSQL cannot be asked: most
                // such sessions simply expired, so a fresh one beats refusing the user.
                Err(err) => debug!(error = %err, "user_sessions lookup failed after a Redis miss"),
            },
            (Err(redis_err), Some(db)) => match db.visit(id).await {
                Ok(found) => {
                    self.lookups.observe(Source::Postgres, started.elapsed());
                    if let Some(visits) = found {
                        return Ok(Visit {
                            id,
                            visits,
                            new: false,
                        });
                    }
                }
                Err(_) => return Err(redis_err),
            },
        }
        self.create(redis, client).await
    }

    /// A fresh session, written to Redis and to the database; one of the two is enough (the
    /// other catches up: Redis on the next lookup, the row on the next visit).
    async fn create(&self, redis: &RedisStore, client: &ClientInfo) -> Result<Visit, StoreError> {
        // A fresh id that somehow exists already is never reset to 1; 128 random bits make a
        // second draw the end of it.
        for _ in 0..2 {
            let id = SessionId::random()?;
            let cached = redis.create(id).await;
            if matches!(cached, Ok(false)) {
                continue;
            }
            let stored = match &self.db {
                Some(db) => Some(db.create(id, client).await),
                None => None,
            };
            match (cached, stored) {
                (Ok(_), None | Some(Ok(true) | Err(_))) | (Err(_), Some(Ok(true))) => {
                    return Ok(Visit {
                        id,
                        visits: 1,
                        new: true,
                    });
                }
                (_, Some(Ok(false))) => {}
                (Err(err), None | Some(Err(_))) => return Err(err),
            }
        }
        Err(StoreError::IdsTaken)
    }

    /// The visit count of `id`, without counting a visit; `None` when the store does not hold
    /// it.
    pub(super) async fn lookup(&self, id: SessionId) -> Result<Option<u64>, StoreError> {
        let started = Instant::now();
        let redis = match &self.cache {
            Cache::Memory(memory) => {
                let found = memory.lookup(id, started);
                self.lookups.observe(Source::Memory, started.elapsed());
                return Ok(found);
            }
            Cache::Redis(redis) => redis,
        };
        let cached = redis.get(id).await;
        let Some(db) = &self.db else {
            if cached.is_ok() {
                self.lookups.observe(Source::Redis, started.elapsed());
            }
            return cached;
        };
        if let Ok(Some(visits)) = cached {
            self.lookups.observe(Source::Redis, started.elapsed());
            return Ok(Some(visits));
        }
        match db.lookup(id).await {
            Ok(found) => {
                self.lookups.observe(Source::Postgres, started.elapsed());
                if let Some((visits, left)) = found
                    && cached.is_ok()
                {
                    redis.refill(id, visits, left).await;
                }
                Ok(found.map(|(visits, _)| visits))
            }
            // As for a visit: a Redis miss stands when PostgreSQL cannot be asked.
            Err(_) if cached.is_ok() => Ok(None),
            Err(err) => Err(StoreError::Database(err)),
        }
    }

    /// `dependencyStatus.redisSessionCache` in `/healthz`: `NOT_CONFIGURED` for the memory
    /// store, else whether the last exchange with Redis worked.
    pub(super) fn redis_status(&self) -> &'static str {
        match &self.cache {
            Cache::Memory(_) => "NOT_CONFIGURED",
            Cache::Redis(redis) => redis.status.get().as_str(),
        }
    }

    /// `dependencyStatus.databaseConnection` in `/healthz`: `NOT_CONFIGURED` without
    /// `--database`, else whether the last exchange with PostgreSQL worked.
    pub(super) fn database_status(&self) -> &'static str {
        self.db
            .as_ref()
            .map_or("NOT_CONFIGURED", |db| db.status().as_str())
    }
}

/// Two generations of sessions: a visit moves a session into `current`; when `current` is full
/// or a generation's time is up, `current` becomes `previous` and the old `previous` is
/// forgotten. O(1) per visit, at most `2 × cap/2` entries, and a session survives as long as it
/// is visited at least once a generation (idle ones go after one to two generations).
pub(crate) struct MemoryStore {
    // Not the balancer's hot path: one short critical section per visit, no await inside.
    inner: Mutex<Generations>,
}

struct Generations {
    current: HashMap<SessionId, u64>,
    previous: HashMap<SessionId, u64>,
    started: Instant,
    per_generation: usize,
}

impl MemoryStore {
    pub(crate) fn new(cap: usize) -> Self {
        MemoryStore {
            inner: Mutex::new(Generations {
                current: HashMap::new(),
                previous: HashMap::new(),
                started: Instant::now(),
                per_generation: (cap / 2).max(1),
            }),
        }
    }

    fn generations(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn visit(
        &self,
        presented: Option<SessionId>,
        now: Instant,
    ) -> Result<Visit, StoreError> {
        let mut g = self.generations();
        g.age(now);
        if let Some(id) = presented {
            if let Some(visits) = g.current.get_mut(&id) {
                *visits += 1;
                return Ok(Visit {
                    id,
                    visits: *visits,
                    new: false,
                });
            }
            if let Some(visits) = g.previous.remove(&id) {
                g.insert(id, visits + 1, now);
                return Ok(Visit {
                    id,
                    visits: visits + 1,
                    new: false,
                });
            }
        }
        // getrandom does not block once the kernel's pool is seeded, which it is long before a
        // web node answers; holding the lock over it costs about a microsecond.
        let fresh = SessionId::random()?;
        g.insert(fresh, 1, now);
        Ok(Visit {
            id: fresh,
            visits: 1,
            new: true,
        })
    }

    pub(crate) fn lookup(&self, id: SessionId, now: Instant) -> Option<u64> {
        let mut g = self.generations();
        g.age(now);
        g.current.get(&id).or_else(|| g.previous.get(&id)).copied()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let g = self.generations();
        g.current.len() + g.previous.len()
    }
}

impl Generations {
    /// A generation lasts one TTL: an idle session is forgotten after one to two TTLs.
    fn age(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.started);
        if age >= 2 * SESSION_TTL {
            self.current.clear();
            self.previous.clear();
            self.started = now;
        } else if age >= SESSION_TTL {
            self.rotate(now);
        }
    }

    fn insert(&mut self, id: SessionId, visits: u64, now: Instant) {
        if self.current.len() >= self.per_generation {
            self.rotate(now);
        }
        self.current.insert(id, visits);
    }

    fn rotate(&mut self, now: Instant) {
        self.previous = std::mem::take(&mut self.current);
        self.started = now;
    }
}

/// How to reach Redis: one server or a cluster.
enum RedisSource {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
}

impl RedisSource {
    /// A connection that connects on first use, tries once per command (a retry loop would
    /// hold the user's request), and bounds both the connect and each answer.
    #[expect(
        clippy::expect_used,
        reason = "a lazy manager without pub/sub options is always built"
    )]
    fn connect_lazily(&self) -> RedisConn {
        match self {
            RedisSource::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_number_of_retries(0)
                    .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
                    .set_response_timeout(Some(REDIS_COMMAND_TIMEOUT));
                // Only fails for options this config never sets (resubscription without a push
                // sender).
                RedisConn::Single(
                    ConnectionManager::new_lazy_with_config(client.clone(), config)
                        .expect("a lazy manager without pub/sub options is always built"),
                )
            }
            RedisSource::Cluster(client) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(REDIS_CONNECT_TIMEOUT)
                    .set_response_timeout(REDIS_COMMAND_TIMEOUT);
                // Connects to the seed nodes and reads the slot map in the background; the
                // first command waits for it (bounded by the command timeout).
                RedisConn::Cluster(client.get_pending_async_connection_with_config(config))
            }
        }
    }
}

/// One Redis or a cluster behind one interface: the cluster connection routes each command to
/// the shard that holds its key's slot (a session's script has a single key, so it runs on one
/// shard).
#[derive(Clone)]
enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(conn) => conn.get_db(),
            RedisConn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Sessions in Redis. The connection is swapped for a fresh one whenever the monitor's ping
/// fails, so whatever state a failed connect left it in, Redis coming back is noticed within
/// one ping interval.
pub(crate) struct RedisStore {
    conn: Arc<ArcSwap<RedisConn>>,
    status: Arc<LinkStatus>,
    addr: String,
    visit_script: redis::Script,
    refill_script: redis::Script,
}

impl RedisStore {
    fn start(source: RedisSource, addr: String, node: String, cancel: CancellationToken) -> Self {
        let conn = Arc::new(ArcSwap::from_pointee(source.connect_lazily()));
        let status = Arc::new(LinkStatus::default());
        tokio::spawn(monitor(
            source,
            Arc::clone(&conn),
            Arc::clone(&status),
            node,
            addr.clone(),
            cancel,
        ));
        RedisStore {
            conn,
            status,
            addr,
            visit_script: redis::Script::new(VISIT_SCRIPT),
            refill_script: redis::Script::new(REFILL_SCRIPT),
        }
    }

    /// Counts a visit of `id` and restarts its expiry; `None` when Redis does not hold it.
    async fn visit(&self, id: SessionId) -> Result<Option<u64>, StoreError> {
        let mut invocation = self.visit_script.prepare_invoke();
        invocation.key(id.key()).arg(SESSION_TTL.as_secs());
        let visits: u64 = self
            .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await?;
        Ok((visits > 0).then_some(visits))
    }

    /// Starts `id` at one visit; `false` when the id is taken already (NX).
    async fn create(&self, id: SessionId) -> Result<bool, StoreError> {
        let mut set = redis::cmd("SET");
        set.arg(id.key())
            .arg(1)
            .arg("EX")
            .arg(SESSION_TTL.as_secs())
            .arg("NX");
        let created: Option<String> = self
            .run(|mut conn| async move { set.query_async(&mut conn).await })
            .await?;
        Ok(created.is_some())
    }

    async fn get(&self, id: SessionId) -> Result<Option<u64>, StoreError> {
        let mut get = redis::cmd("GET");
        get.arg(id.key());
        self.run(|mut conn| async move { get.query_async(&mut conn).await })
            .await
    }

    /// Puts a count the database answered back into Redis for `left` (at least a second).
    /// Best effort: a Redis that cannot take it is asked again on the next lookup.
    async fn refill(&self, id: SessionId, visits: u64, left: Duration) {
        let mut invocation = self.refill_script.prepare_invoke();
        invocation
            .key(id.key())
            .arg(visits)
            .arg(left.as_secs().max(1));
        let refilled: Result<u64, _> = self
            .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await;
        if let Err(err) = refilled {
            debug!(error = %err, "refilling Redis from user_sessions failed");
        }
    }

    /// Runs one exchange on the current connection, bounded by [`REDIS_COMMAND_TIMEOUT`], and
    /// records whether Redis answered.
    async fn run<T, F, Fut>(&self, exchange: F) -> Result<T, StoreError>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = RedisConn::clone(&self.conn.load());
        match tokio::time::timeout(REDIS_COMMAND_TIMEOUT, exchange(conn)).await {
            Ok(Ok(value)) => {
                self.status.set(LinkHealth::Connected);
                Ok(value)
            }
            Ok(Err(source)) => {
                // A server error (wrong type, script error) means Redis is there.
                if source.is_io_error() || source.is_timeout() || source.is_connection_dropped() {
                    self.status.set(LinkHealth::Disconnected);
                }
                Err(StoreError::Redis {
                    addr: self.addr.clone(),
                    source,
                })
            }
            Err(_) => {
                self.status.set(LinkHealth::Disconnected);
                Err(StoreError::Timeout {
                    addr: self.addr.clone(),
                    timeout: REDIS_COMMAND_TIMEOUT,
                })
            }
        }
    }
}

/// Pings Redis every [`REDIS_PING_INTERVAL`] until `cancel`; logs each change of state once.
async fn monitor(
    source: RedisSource,
    conn: Arc<ArcSwap<RedisConn>>,
    status: Arc<LinkStatus>,
    node: String,
    addr: String,
    cancel: CancellationToken,
) {
    let mut ticks = tokio::time::interval(REDIS_PING_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut logged: Option<LinkHealth> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let mut current = RedisConn::clone(&conn.load());
        let ping = redis::cmd("PING");
        let result = tokio::time::timeout(
            REDIS_COMMAND_TIMEOUT,
            ping.query_async::<String>(&mut current),
        )
        .await;
        let now = match result {
            Ok(Ok(_)) => LinkHealth::Connected,
            Ok(Err(err)) => {
                if logged != Some(LinkHealth::Disconnected) {
                    warn!(id = %node, redis = %addr, error = %err,
                        "session cache unreachable; sessions come from the database, or answer 503 without one");
                }
                LinkHealth::Disconnected
            }
            Err(_) => {
                if logged != Some(LinkHealth::Disconnected) {
                    warn!(id = %node, redis = %addr, timeout = ?REDIS_COMMAND_TIMEOUT,
                        "session cache did not answer a ping; sessions come from the database, or answer 503 without one");
                }
                LinkHealth::Disconnected
            }
        };
        if now == LinkHealth::Disconnected {
            // A fresh connection: whatever the failure left behind, the next use connects anew.
            conn.store(Arc::new(source.connect_lazily()));
        } else if logged != Some(LinkHealth::Connected) {
            info!(id = %node, redis = %addr, "session cache connected");
        }
        logged = Some(now);
        status.set(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_counts_known_ids_and_reissues_unknown_ones() {
        let store = MemoryStore::new(100);
        let now = Instant::now();
        let first = store.visit(None, now).unwrap();
        assert_eq!((first.visits, first.new), (1, true));
        let second = store.visit(Some(first.id), now).unwrap();
        assert_eq!(
            second,
            Visit {
                visits: 2,
                new: false,
                ..first
            }
        );
        assert_eq!(store.lookup(first.id, now), Some(2));

        let stranger = SessionId::random().unwrap();
        let reset = store.visit(Some(stranger), now).unwrap();
        assert_eq!((reset.visits, reset.new), (1, true));
        assert_ne!(reset.id, stranger, "a client-chosen id is never adopted");
        assert_eq!(store.lookup(stranger, now), None);
    }

    #[test]
    fn memory_stays_within_its_cap_and_keeps_recently_used_sessions() {
        let store = MemoryStore::new(10);
        let now = Instant::now();
        let kept = store.visit(None, now).unwrap().id;
        for _ in 0..100 {
            store.visit(None, now).unwrap();
            // Visited all along: it moves into each new generation.
            store.visit(Some(kept), now).unwrap();
            assert!(store.len() <= 10, "{} sessions", store.len());
        }
        assert_eq!(store.lookup(kept, now), Some(101));
    }

    #[test]
    fn memory_forgets_idle_sessions_after_one_to_two_ttls() {
        let store = MemoryStore::new(100);
        let t0 = Instant::now();
        let idle = store.visit(None, t0).unwrap().id;
        let busy = store.visit(None, t0).unwrap().id;
        let half = SESSION_TTL / 2;
        for step in 1..=5 {
            store.visit(Some(busy), t0 + half * step).unwrap();
        }
        // 2.5 TTLs later: the busy one lives on, the idle one is gone.
        let later = t0 + half * 5;
        assert_eq!(store.lookup(busy, later), Some(6));
        assert_eq!(store.lookup(idle, later), None);
        // Nothing at all for two TTLs: everything is gone.
        assert_eq!(store.lookup(busy, later + 2 * SESSION_TTL), None);
    }

    #[test]
    fn backends_parse_from_the_command_line() {
        assert!(matches!(
            "memory".parse::<SessionBackend>(),
            Ok(SessionBackend::Memory)
        ));
        let redis: SessionBackend = "redis://:secret@127.0.0.1:6390".parse().unwrap();
        assert_eq!(redis.describe(), "redis://127.0.0.1:6390");
        let cluster: SessionBackend = "redis+cluster://:secret@127.0.0.1:7001,127.0.0.1:7002/"
            .parse()
            .unwrap();
        assert_eq!(
            cluster.describe(),
            "redis+cluster://127.0.0.1:7001,127.0.0.1:7002"
        );
        for bad in [
            "redis+cluster://",
            "redis+cluster://127.0.0.1",
            "redis+cluster://:secret@127.0.0.1:7001/db",
        ] {
            let err = bad.parse::<SessionBackend>().unwrap_err();
            assert!(!err.contains("secret"), "{bad}: {err}");
        }
        for bad in ["", "Memory", "http://127.0.0.1:6379", "127.0.0.1:6379"] {
            let err = bad.parse::<SessionBackend>().unwrap_err();
            assert!(err.contains("neither `memory` nor"), "{bad}: {err}");
        }
    }
}
