//! The session store behind `GET /session` and `POST /v1/sessions/verify`.
//!
//! - `memory`: a map in this process. Stateful on purpose: a user the balancer moves to another
//!   node is unknown there and starts over, which is what a sticky-versus-round-robin
//!   comparison measures.
//! - `redis://HOST:PORT`: one counter key per session in Redis, so every node pointed at the same
//!   Redis continues any session. A Lua script increments and refreshes the expiry in one step,
//!   so two nodes serving one user at once never lose a visit.
//!
//! Ids are 128 random bits written as 32 lowercase hex digits. A store only ever counts ids it
//! issued: an id it does not hold (never issued, expired, or from another node's memory) is
//! answered with a fresh id, so a client cannot pick its own session id (session fixation).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long an untouched session lives in Redis; every visit starts it again.
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 60);
/// At most this many sessions in memory (about 5 MB); past it the least recently used half
/// is forgotten, so a long load test cannot grow a node without bound.
pub const MEMORY_SESSION_CAP: usize = 100_000;
/// One Redis connect attempt. Loopback or LAN Redis answers in well under this; longer means
/// it is not there, and `/session` should say 503 quickly rather than hang the user.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// One Redis command, connect included, before the request is answered 503.
const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the monitor pings Redis for `/healthz`, and so how soon a node notices that
/// Redis came back while nobody asked for a session.
const REDIS_PING_INTERVAL: Duration = Duration::from_secs(1);
/// Keys live under this prefix, so a shared Redis can hold other things too.
const KEY_PREFIX: &str = "fulcrum:session:";

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

/// A session id: 128 random bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct SessionId(u128);

impl SessionId {
    pub(super) fn random() -> Result<Self, StoreError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(StoreError::Random)?;
        Ok(SessionId(u128::from_le_bytes(bytes)))
    }

    /// Exactly 32 lowercase hex digits, as [`SessionId`]s are written; anything else is `None`.
    pub(super) fn parse(text: &str) -> Option<Self> {
        // from_str_radix alone would also take a leading '+' and upper case.
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if text.len() != 32 || !text.bytes().all(hex) {
            return None;
        }
        u128::from_str_radix(text, 16).ok().map(SessionId)
    }

    fn key(self) -> String {
        format!("{KEY_PREFIX}{self}")
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

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
    #[error("no randomness for a session id")]
    Random(#[source] getrandom::Error),
    #[error("two freshly drawn session ids were both taken already")]
    IdsTaken,
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
}

impl fmt::Debug for SessionBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl SessionBackend {
    /// `memory` or `redis://...`, as the command line shows it (credentials left out).
    pub fn describe(&self) -> String {
        match self {
            SessionBackend::Memory => "memory".to_owned(),
            SessionBackend::Redis(client) => {
                format!("redis://{}", client.get_connection_info().addr())
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
        if !s.starts_with("redis://") {
            return Err(format!(
                "`{s}` is neither `memory` nor a redis://HOST:PORT URL"
            ));
        }
        redis::Client::open(s)
            .map(SessionBackend::Redis)
            .map_err(|e| format!("`{s}` is not a usable Redis URL: {e}"))
    }
}

/// A node's session store.
pub(crate) enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Store {
    /// Starts the store; with Redis also the monitor that keeps `/healthz` truthful, until
    /// `cancel`. Never waits for Redis: a node whose Redis is down still serves everything
    /// else, and answers 503 on sessions until Redis is back.
    pub(crate) fn start(backend: SessionBackend, node: &str, cancel: CancellationToken) -> Self {
        match backend {
            SessionBackend::Memory => Store::Memory(MemoryStore::new(MEMORY_SESSION_CAP)),
            SessionBackend::Redis(client) => {
                Store::Redis(RedisStore::start(client, node.to_owned(), cancel))
            }
        }
    }

    /// Counts a visit of `presented` (the id the client sent), or starts a new session when
    /// there is none or the store does not hold it.
    pub(crate) async fn visit(&self, presented: Option<SessionId>) -> Result<Visit, StoreError> {
        match self {
            Store::Memory(memory) => memory.visit(presented, Instant::now()),
            Store::Redis(redis) => redis.visit(presented).await,
        }
    }

    /// The visit count of `id`, without counting a visit; `None` when the store does not hold
    /// it.
    pub(crate) async fn lookup(&self, id: SessionId) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Memory(memory) => Ok(memory.lookup(id, Instant::now())),
            Store::Redis(redis) => redis.lookup(id).await,
        }
    }

    /// `dependencyStatus.redisSessionCache` in `/healthz`: `NOT_CONFIGURED` for the memory
    /// store, else whether the last exchange with Redis worked.
    pub(crate) fn redis_status(&self) -> &'static str {
        match self {
            Store::Memory(_) => "NOT_CONFIGURED",
            Store::Redis(redis) => redis.status.get().as_str(),
        }
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

/// Sessions in Redis. The connection manager is swapped for a fresh one whenever the monitor's
/// ping fails, so whatever state a failed connect left it in, Redis coming back is noticed
/// within one ping interval.
pub(crate) struct RedisStore {
    conn: Arc<ArcSwap<ConnectionManager>>,
    status: Arc<RedisStatus>,
    addr: String,
    visit_script: redis::Script,
}

impl RedisStore {
    fn start(client: redis::Client, node: String, cancel: CancellationToken) -> Self {
        let addr = client.get_connection_info().addr().to_string();
        let conn = Arc::new(ArcSwap::from_pointee(lazy_manager(&client)));
        let status = Arc::new(RedisStatus::default());
        tokio::spawn(monitor(
            client,
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
        }
    }

    async fn visit(&self, presented: Option<SessionId>) -> Result<Visit, StoreError> {
        let ttl = SESSION_TTL.as_secs();
        if let Some(id) = presented {
            let mut invocation = self.visit_script.prepare_invoke();
            invocation.key(id.key()).arg(ttl);
            let visits: u64 = self
                .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
                .await?;
            if visits > 0 {
                return Ok(Visit {
                    id,
                    visits,
                    new: false,
                });
            }
        }
        // NX: a fresh id that somehow exists already is never reset to 1; 128 random bits make
        // a second draw the end of it.
        for _ in 0..2 {
            let id = SessionId::random()?;
            let mut set = redis::cmd("SET");
            set.arg(id.key()).arg(1).arg("EX").arg(ttl).arg("NX");
            let created: Option<String> = self
                .run(|mut conn| async move { set.query_async(&mut conn).await })
                .await?;
            if created.is_some() {
                return Ok(Visit {
                    id,
                    visits: 1,
                    new: true,
                });
            }
        }
        Err(StoreError::IdsTaken)
    }

    async fn lookup(&self, id: SessionId) -> Result<Option<u64>, StoreError> {
        let mut get = redis::cmd("GET");
        get.arg(id.key());
        self.run(|mut conn| async move { get.query_async(&mut conn).await })
            .await
    }

    /// Runs one exchange on the current connection, bounded by [`REDIS_COMMAND_TIMEOUT`], and
    /// records whether Redis answered.
    async fn run<T, F, Fut>(&self, exchange: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = ConnectionManager::clone(&self.conn.load());
        match tokio::time::timeout(REDIS_COMMAND_TIMEOUT, exchange(conn)).await {
            Ok(Ok(value)) => {
                self.status.set(RedisHealth::Connected);
                Ok(value)
            }
            Ok(Err(source)) => {
                // A server error (wrong type, script error) means Redis is there.
                if source.is_io_error() || source.is_timeout() || source.is_connection_dropped() {
                    self.status.set(RedisHealth::Disconnected);
                }
                Err(StoreError::Redis {
                    addr: self.addr.clone(),
                    source,
                })
            }
            Err(_) => {
                self.status.set(RedisHealth::Disconnected);
                Err(StoreError::Timeout {
                    addr: self.addr.clone(),
                    timeout: REDIS_COMMAND_TIMEOUT,
                })
            }
        }
    }
}

/// A manager that connects on first use, tries once per command (a retry loop would hold the
/// user's request), and bounds both the connect and each answer.
#[expect(
    clippy::expect_used,
    reason = "a lazy manager without pub/sub options is always built"
)]
fn lazy_manager(client: &redis::Client) -> ConnectionManager {
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
        .set_response_timeout(Some(REDIS_COMMAND_TIMEOUT));
    // Only fails for options this config never sets (resubscription without a push sender).
    ConnectionManager::new_lazy_with_config(client.clone(), config)
        .expect("a lazy manager without pub/sub options is always built")
}

/// Pings Redis every [`REDIS_PING_INTERVAL`] until `cancel`; logs each change of state once.
async fn monitor(
    client: redis::Client,
    conn: Arc<ArcSwap<ConnectionManager>>,
    status: Arc<RedisStatus>,
    node: String,
    addr: String,
    cancel: CancellationToken,
) {
    let mut ticks = tokio::time::interval(REDIS_PING_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut logged: Option<RedisHealth> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let mut manager = ConnectionManager::clone(&conn.load());
        let ping = redis::cmd("PING");
        let result = tokio::time::timeout(
            REDIS_COMMAND_TIMEOUT,
            ping.query_async::<String>(&mut manager),
        )
        .await;
        let now = match result {
            Ok(Ok(_)) => RedisHealth::Connected,
            Ok(Err(err)) => {
                if logged != Some(RedisHealth::Disconnected) {
                    warn!(id = %node, redis = %addr, error = %err,
                        "session store unreachable; /session answers 503 until it is back");
                }
                RedisHealth::Disconnected
            }
            Err(_) => {
                if logged != Some(RedisHealth::Disconnected) {
                    warn!(id = %node, redis = %addr, timeout = ?REDIS_COMMAND_TIMEOUT,
                        "session store did not answer a ping; /session answers 503 until it does");
                }
                RedisHealth::Disconnected
            }
        };
        if now == RedisHealth::Disconnected {
            // A fresh manager: whatever the failure left behind, the next use connects anew.
            conn.store(Arc::new(lazy_manager(&client)));
        } else if logged != Some(RedisHealth::Connected) {
            info!(id = %node, redis = %addr, "session store connected");
        }
        logged = Some(now);
        status.set(now);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum RedisHealth {
    Disconnected = 0,
    Connected = 1,
}

impl RedisHealth {
    fn as_str(self) -> &'static str {
        match self {
            RedisHealth::Disconnected => "DISCONNECTED",
            RedisHealth::Connected => "CONNECTED",
        }
    }
}

/// Whether the last exchange with Redis worked; `DISCONNECTED` until one has.
#[derive(Debug, Default)]
struct RedisStatus(AtomicU8);

impl RedisStatus {
    fn get(&self) -> RedisHealth {
        if self.0.load(Ordering::Acquire) == RedisHealth::Connected as u8 {
            RedisHealth::Connected
        } else {
            RedisHealth::Disconnected
        }
    }

    fn set(&self, health: RedisHealth) {
        self.0.store(health as u8, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_as_32_lowercase_hex_digits_and_nothing_else_parses() {
        let id = SessionId::random().unwrap();
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(SessionId::parse(&text), Some(id));
        assert_ne!(SessionId::random().unwrap(), id);
        assert_eq!(
            SessionId::parse("0000000000000000000000000000000a").map(|i| i.0),
            Some(10)
        );
        for bad in [
            "",
            "abc",
            "0000000000000000000000000000000A",
            "+000000000000000000000000000000a",
            "0000000000000000000000000000000g",
            "0000000000000000000000000000000a0",
            "ſ000000000000000000000000000000",
        ] {
            assert_eq!(SessionId::parse(bad), None, "{bad:?}");
        }
    }

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
        for bad in ["", "Memory", "http://127.0.0.1:6379", "127.0.0.1:6379"] {
            let err = bad.parse::<SessionBackend>().unwrap_err();
            assert!(err.contains("neither `memory` nor"), "{bad}: {err}");
        }
    }
}
