//! `--database postgres://…`: the seed's `user_sessions` table, the durable catalog behind the
//! Redis session cache.
//!
//! The table is created when absent, exactly as the seed writes it (columns, types, defaults,
//! `idx_sessions_expiry`), and nothing is ever dropped or altered. A web node session maps onto
//! it as:
//! - `session_id`: the session id (32 hex digits);
//! - `user_id`: a session has no user yet, so it is a UUID derived from the session id alone
//!   (version 8, the first 16 bytes of SHA-256 over a fixed prefix and the id): stable for the
//!   session's life on every node, and it does not give the id (a bearer secret) away;
//! - `session_data`: `{"visits": N}` (other keys a row may carry are left as they are);
//! - `client_ip`, `user_agent`: who started the session (the balancer's `X-Forwarded-For`
//!   entry, else the peer);
//! - `expires_at`: the last visit plus the session TTL, as in Redis.
//!
//! One connection per node (tokio-postgres pipelines concurrent queries over it), its
//! statements prepared once per connect; a monitor pings it every second, reconnects when it
//! is gone (and makes sure of the table again), and keeps `/healthz` truthful. Expired rows are
//! deleted periodically in bounded batches (`FOR UPDATE SKIP LOCKED`, so nodes cleaning at once
//! do not queue behind each other).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use sha2::{Digest, Sha256};
use tokio::time::timeout;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::session_core::{ClientInfo, LinkHealth, LinkStatus, SESSION_TTL, SessionId};

/// One connect attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// One query before the caller gives up on it (the request falls back or answers 503).
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the monitor pings PostgreSQL (and so how soon a return is noticed).
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Rows one cleanup statement deletes at most: a short lock, a short transaction.
const CLEANUP_BATCH: i64 = 1000;
/// Batches one cleanup round runs at most; the rest waits for the next round.
const CLEANUP_ROUNDS: usize = 20;
/// Serializes `CREATE … IF NOT EXISTS` of nodes starting at once (two concurrent creates of
/// one table can fail on the catalog's unique index); an arbitrary constant ("fulc" "sess").
const SCHEMA_LOCK: i64 = 0x6675_6c63_7365_7373;
/// A version-8 user id is SHA-256 over this and the session id.
const USER_ID_PREFIX: &[u8] = b"fulcrum-webnode anonymous user\0";

/// The seed's schema, exactly; `IF NOT EXISTS` so an existing table (and its data) is kept.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS user_sessions (
    session_id VARCHAR(128) PRIMARY KEY,
    user_id UUID NOT NULL,
    session_data JSONB NOT NULL,
    client_ip INET,
    user_agent TEXT,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
    expires_at TIMESTAMP WITH TIME ZONE NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_sessions_expiry ON user_sessions(expires_at);
";

/// A visit of a live row: one more visit, a fresh expiry; no row when absent or expired.
const VISIT: &str = "
UPDATE user_sessions
   SET session_data = jsonb_set(session_data, '{visits}',
           to_jsonb(COALESCE((session_data->>'visits')::bigint, 0) + 1)),
       expires_at = now() + make_interval(secs => $2::float8)
 WHERE session_id = $1 AND expires_at > now()
RETURNING (session_data->>'visits')::bigint";

/// A visit Redis counted: the row takes the count unless it holds a higher one (two nodes'
/// writes may land out of order), and is created if it is missing (it was started while
/// PostgreSQL was away).
const WRITE_THROUGH: &str = "
INSERT INTO user_sessions (session_id, user_id, session_data, client_ip, user_agent, expires_at)
VALUES ($1, $2::text::uuid, jsonb_build_object('visits', $3::bigint), $4, $5,
        now() + make_interval(secs => $6::float8))
ON CONFLICT (session_id) DO UPDATE
   SET session_data = jsonb_set(user_sessions.session_data, '{visits}',
           to_jsonb(GREATEST(COALESCE((user_sessions.session_data->>'visits')::bigint, 0),
                             $3::bigint))),
       expires_at = GREATEST(user_sessions.expires_at, EXCLUDED.expires_at)";

/// A fresh session; nothing when the id is taken.
const CREATE: &str = "
INSERT INTO user_sessions (session_id, user_id, session_data, client_ip, user_agent, expires_at)
VALUES ($1, $2::text::uuid, jsonb_build_object('visits', 1), $3, $4,
        now() + make_interval(secs => $5::float8))
ON CONFLICT (session_id) DO NOTHING";

/// A live row's count and the seconds it has left.
const LOOKUP: &str = "
SELECT (session_data->>'visits')::bigint,
       EXTRACT(EPOCH FROM expires_at - now())::float8
  FROM user_sessions
 WHERE session_id = $1 AND expires_at > now()";

/// One bounded batch of expired rows, oldest first along `idx_sessions_expiry`.
const CLEANUP: &str = "
DELETE FROM user_sessions WHERE session_id IN (
    SELECT session_id FROM user_sessions
     WHERE expires_at < now()
     ORDER BY expires_at
     LIMIT $1
       FOR UPDATE SKIP LOCKED)";

/// Why a database exchange failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum DbError {
    #[error("not connected to PostgreSQL")]
    NotConnected,
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
    #[error("PostgreSQL: {}", with_causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
}

/// tokio-postgres keeps the cause ("connection refused", the server's message) out of its own
/// text; a log line without it says little. Neither holds the password.
fn with_causes(err: &tokio_postgres::Error) -> String {
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// `--database postgres://USER[:PASSWORD]@HOST:PORT/DB`: where `user_sessions` lives. The
/// password is only ever used to connect; [`SessionDatabase::describe`] leaves it out.
#[derive(Clone)]
pub struct SessionDatabase {
    config: tokio_postgres::Config,
    shown: String,
}

impl SessionDatabase {
    /// `postgres://USER@HOST:PORT/DB`, as logs may show it (no password, no options).
    pub fn describe(&self) -> &str {
        &self.shown
    }
}

impl fmt::Debug for SessionDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl FromStr for SessionDatabase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !(s.starts_with("postgres://") || s.starts_with("postgresql://")) {
            return Err("the database must be a postgres://USER@HOST:PORT/DB URL".to_owned());
        }
        // The parser's message may quote the URL, password and all: say only that it failed.
        let mut config: tokio_postgres::Config = s
            .parse()
            .map_err(|_| "the postgres:// URL does not parse".to_owned())?;
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("fulcrum-webnode");
        }
        let shown = describe(&config);
        Ok(SessionDatabase { config, shown })
    }
}

fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let db = config.get_dbname().unwrap_or_default();
    format!("postgres://{user}{}/{db}", hosts.join(","))
}

/// A live connection with its statements prepared.
struct Conn {
    client: Client,
    visit: Statement,
    write_through: Statement,
    create: Statement,
    lookup: Statement,
    cleanup: Statement,
}

/// The node's handle on `user_sessions`.
pub(super) struct SessionDb {
    conn: Arc<ArcSwapOption<Conn>>,
    status: Arc<LinkStatus>,
    deleted: Arc<AtomicU64>,
}

impl SessionDb {
    /// Starts the monitor (connect, schema, ping) and the cleanup, until `cancel`. Returns at
    /// once: queries fail fast with [`DbError::NotConnected`] until the first connect worked.
    pub(super) fn start(
        database: SessionDatabase,
        node: &str,
        cleanup_interval: Duration,
        cancel: &CancellationToken,
    ) -> Self {
        let db = SessionDb {
            conn: Arc::new(ArcSwapOption::empty()),
            status: Arc::new(LinkStatus::default()),
            deleted: Arc::new(AtomicU64::new(0)),
        };
        tokio::spawn(monitor(
            database,
            Arc::clone(&db.conn),
            Arc::clone(&db.status),
            node.to_owned(),
            cancel.clone(),
        ));
        tokio::spawn(cleanup(
            Arc::clone(&db.conn),
            Arc::clone(&db.deleted),
            node.to_owned(),
            cleanup_interval,
            cancel.clone(),
        ));
        db
    }

    pub(super) fn status(&self) -> LinkHealth {
        self.status.get()
    }

    pub(super) fn expired_deleted(&self) -> u64 {
        self.deleted.load(Ordering::Relaxed)
    }

    /// Counts a visit of a live row; `None` when there is none.
    pub(super) async fn visit(&self, id: SessionId) -> Result<Option<u64>, DbError> {
        let id = id.to_string();
        let ttl = SESSION_TTL.as_secs_f64();
        let c = self.connected()?;
        let row =
            self.settle(timeout(QUERY_TIMEOUT, c.client.query_opt(&c.visit, &[&id, &ttl])).await)?;
        Ok(row.map(|row| visits(row.get(0))))
    }

    /// Writes the count Redis answered through to the row (creating it when missing).
    pub(super) async fn write_through(
        &self,
        id: SessionId,
        count: u64,
        client: &ClientInfo,
    ) -> Result<(), DbError> {
        let user = user_id(id);
        let id = id.to_string();
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        let ttl = SESSION_TTL.as_secs_f64();
        let agent = client.user_agent.as_deref();
        let c = self.connected()?;
        let params: [&(dyn ToSql + Sync); 6] = [&id, &user, &count, &client.ip, &agent, &ttl];
        self.settle(timeout(QUERY_TIMEOUT, c.client.execute(&c.write_through, &params)).await)?;
        Ok(())
    }

    /// A fresh row at one visit; `false` when the id is taken.
    pub(super) async fn create(&self, id: SessionId, client: &ClientInfo) -> Result<bool, DbError> {
        let user = user_id(id);
        let id = id.to_string();
        let ttl = SESSION_TTL.as_secs_f64();
        let agent = client.user_agent.as_deref();
        let c = self.connected()?;
        let params: [&(dyn ToSql + Sync); 5] = [&id, &user, &client.ip, &agent, &ttl];
        let rows =
            self.settle(timeout(QUERY_TIMEOUT, c.client.execute(&c.create, &params)).await)?;
        Ok(rows == 1)
    }

    /// A live row's count and the time it has left, without counting a visit.
    pub(super) async fn lookup(&self, id: SessionId) -> Result<Option<(u64, Duration)>, DbError> {
        let id = id.to_string();
        let c = self.connected()?;
        let row =
            self.settle(timeout(QUERY_TIMEOUT, c.client.query_opt(&c.lookup, &[&id])).await)?;
        Ok(row.map(|row| {
            let left: f64 = row.get(1);
            (
                visits(row.get(0)),
                Duration::try_from_secs_f64(left).unwrap_or(Duration::ZERO),
            )
        }))
    }

    /// The live connection, or [`DbError::NotConnected`] at once while there is none.
    fn connected(&self) -> Result<Arc<Conn>, DbError> {
        self.conn.load_full().ok_or(DbError::NotConnected)
    }

    /// One exchange's outcome, bounded by [`QUERY_TIMEOUT`]; records whether PostgreSQL
    /// answered.
    fn settle<T>(
        &self,
        outcome: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, DbError> {
        match outcome {
            Ok(Ok(value)) => {
                self.status.set(LinkHealth::Connected);
                Ok(value)
            }
            Ok(Err(err)) => {
                // An SQL error means PostgreSQL is there; a closed connection means it is not.
                if err.is_closed() {
                    self.status.set(LinkHealth::Disconnected);
                }
                Err(DbError::Postgres(err))
            }
            Err(_) => {
                self.status.set(LinkHealth::Disconnected);
                Err(DbError::Timeout(QUERY_TIMEOUT))
            }
        }
    }
}

/// `session_data->>'visits'` as a count (a row someone edited by hand may lack it).
fn visits(raw: Option<i64>) -> u64 {
    raw.and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
}

/// The `user_id` of an anonymous session: a version-8 UUID from SHA-256 over a fixed prefix
/// and the id, as `8-4-4-4-12` hex.
pub(super) fn user_id(id: SessionId) -> String {
    let mut hasher = Sha256::new();
    hasher.update(USER_ID_PREFIX);
    hasher.update(id.to_string().as_bytes());
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80; // version 8
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 9562 variant
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Connects, makes sure of the table, prepares the statements.
async fn connect(database: &SessionDatabase, node: &str) -> Result<Conn, DbError> {
    let (mut client, connection) = timeout(CONNECT_TIMEOUT, database.config.connect(NoTls))
        .await
        .map_err(|_| DbError::Timeout(CONNECT_TIMEOUT))??;
    // The connection task ends when the server goes away; the client then reports closed and
    // the monitor connects anew.
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            debug!(error = %err, "PostgreSQL connection ended");
        }
    });
    let setup = async {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
            .await?;
        let absent: bool = tx
            .query_one("SELECT to_regclass('user_sessions') IS NULL", &[])
            .await?
            .get(0);
        tx.batch_execute(SCHEMA).await?;
        tx.commit().await?;
        Ok::<bool, tokio_postgres::Error>(absent)
    };
    let created = timeout(QUERY_TIMEOUT * 5, setup)
        .await
        .map_err(|_| DbError::Timeout(QUERY_TIMEOUT * 5))??;
    if created {
        info!(id = %node, database = %database.describe(),
            "created the user_sessions table and idx_sessions_expiry");
    }
    let prepare = async {
        Ok::<_, tokio_postgres::Error>((
            client.prepare(VISIT).await?,
            client.prepare(WRITE_THROUGH).await?,
            client.prepare(CREATE).await?,
            client.prepare(LOOKUP).await?,
            client.prepare(CLEANUP).await?,
        ))
    };
    let (visit, write_through, create, lookup, cleanup) = timeout(QUERY_TIMEOUT * 5, prepare)
        .await
        .map_err(|_| DbError::Timeout(QUERY_TIMEOUT * 5))??;
    Ok(Conn {
        client,
        visit,
        write_through,
        create,
        lookup,
        cleanup,
    })
}

/// Keeps a connection up until `cancel`: pings it every [`PING_INTERVAL`], connects anew when
/// it is gone, and logs each change of state once.
async fn monitor(
    database: SessionDatabase,
    conn: Arc<ArcSwapOption<Conn>>,
    status: Arc<LinkStatus>,
    node: String,
    cancel: CancellationToken,
) {
    let mut ticks = tokio::time::interval(PING_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut logged: Option<LinkHealth> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let current = conn.load_full();
        let alive = match &current {
            Some(c) if !c.client.is_closed() => {
                matches!(
                    timeout(QUERY_TIMEOUT, c.client.simple_query("SELECT 1")).await,
                    Ok(Ok(_))
                )
            }
            _ => false,
        };
        let now = if alive {
            LinkHealth::Connected
        } else {
            // Queries fail fast while there is no connection, instead of each waiting out a
            // timeout on a dead one.
            conn.store(None);
            match connect(&database, &node).await {
                Ok(fresh) => {
                    conn.store(Some(Arc::new(fresh)));
                    LinkHealth::Connected
                }
                Err(err) => {
                    if logged != Some(LinkHealth::Disconnected) {
                        warn!(id = %node, database = %database.describe(), error = %err,
                            "session database unreachable; sessions live in Redis only until it is back");
                    }
                    LinkHealth::Disconnected
                }
            }
        };
        if now == LinkHealth::Connected && logged != Some(LinkHealth::Connected) {
            info!(id = %node, database = %database.describe(), "session database connected");
        }
        logged = Some(now);
        status.set(now);
    }
}

/// Deletes expired rows every `interval` until `cancel`, at most [`CLEANUP_ROUNDS`] batches of
/// [`CLEANUP_BATCH`] a round.
async fn cleanup(
    conn: Arc<ArcSwapOption<Conn>>,
    deleted: Arc<AtomicU64>,
    node: String,
    interval: Duration,
    cancel: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(c) = conn.load_full() else { continue };
        let mut round = 0;
        for _ in 0..CLEANUP_ROUNDS {
            match timeout(
                QUERY_TIMEOUT * 5,
                c.client.execute(&c.cleanup, &[&CLEANUP_BATCH]),
            )
            .await
            {
                Ok(Ok(rows)) => {
                    round += rows;
                    deleted.fetch_add(rows, Ordering::Relaxed);
                    if rows < CLEANUP_BATCH.unsigned_abs() {
                        break;
                    }
                }
                Ok(Err(err)) => {
                    debug!(id = %node, error = %err, "user_sessions cleanup failed");
                    break;
                }
                Err(_) => break,
            }
        }
        if round > 0 {
            info!(id = %node, deleted = round, "deleted expired user_sessions rows");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_stable_version_8_uuids_per_session() {
        let id = SessionId::parse("0123456789abcdef0123456789abcdef").unwrap();
        let user = user_id(id);
        assert_eq!(user, user_id(id));
        assert_eq!(user.len(), 36);
        let groups: Vec<&str> = user.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(groups[2].starts_with('8'), "{user}");
        assert!(matches!(&groups[3][..1], "8" | "9" | "a" | "b"), "{user}");
        let other = SessionId::parse("0123456789abcdef0123456789abcdee").unwrap();
        assert_ne!(user_id(other), user);
        assert!(!user.replace('-', "").contains("0123456789abcdef"));
    }

    #[test]
    fn database_urls_never_show_their_password() {
        let db: SessionDatabase = "postgres://app:hunter2@db.example:5433/sessions"
            .parse()
            .unwrap();
        assert_eq!(db.describe(), "postgres://app@db.example:5433/sessions");
        assert!(!format!("{db:?}").contains("hunter2"));
        for bad in ["", "redis://x", "postgres://app:hunter2@host:notaport/db"] {
            let err = bad.parse::<SessionDatabase>().unwrap_err();
            assert!(!err.contains("hunter2"), "{err}");
        }
    }
}
