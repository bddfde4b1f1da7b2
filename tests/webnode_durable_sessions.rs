//! Durable web node sessions over real servers: the seed's `user_sessions` table in a real
//! PostgreSQL behind a real Redis (`--database`), sessions that survive Redis being flushed or
//! killed, the cleanup of expired rows, `/healthz`'s `databaseConnection`, the session lookup
//! histogram on the node's `/metrics`, and sessions in a real three-master Redis Cluster.
//!
//! PostgreSQL and Redis are started by the tests (see `support/postgres.rs` and
//! `support/redis_server.rs`); a missing one fails the test unless `FULCRUM_SKIP_POSTGRES=1` /
//! `FULCRUM_SKIP_REDIS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::time::Duration;

use fulcrum::webnode::{self, SessionBackend, SessionOptions, WebNode, WebNodeOptions};
use http::header::{COOKIE, SET_COOKIE};
use http::{Request, StatusCode};
use serde_json::Value;
use support::postgres::Postgres;
use support::redis_server::{RedisCluster, RedisServer};
use support::{client, empty, full, get, send, series, wait_until};

const KEY_PREFIX: &str = "fulcrum:session:";

fn sessions(redis: &str, database: Option<&str>) -> SessionOptions {
    let mut options = SessionOptions::new(redis.parse::<SessionBackend>().unwrap());
    if let Some(url) = database {
        options = options.with_database(url.parse().unwrap());
    }
    options
}

async fn node(id: &str, options: SessionOptions) -> WebNode {
    let opts = WebNodeOptions::new("127.0.0.1:0".parse().unwrap(), id);
    webnode::spawn_with_sessions(opts, options)
        .await
        .expect("web node starts")
}

async fn healthz(node: &WebNode) -> Value {
    let reply = get(&client(), &format!("http://{}/healthz", node.local_addr())).await;
    serde_json::from_slice(&reply.body).expect("healthz JSON")
}

/// Waits until `/healthz` says `database` for PostgreSQL and `redis` for Redis.
async fn wait_for_dependencies(node: &WebNode, database: &str, redis: &str) {
    wait_until(
        &format!("{} reports {database}/{redis}", node.id()),
        || async {
            let deps = healthz(node).await["dependencyStatus"].clone();
            deps["databaseConnection"] == database && deps["redisSessionCache"] == redis
        },
    )
    .await;
}

/// One `GET /session` with `session=ID` when given: (session id, visits, new).
async fn visit(node: &WebNode, cookie: Option<&str>) -> (String, u64, bool) {
    let mut req = Request::get(format!("http://{}/session", node.local_addr()))
        .header("user-agent", "durable-sessions-test/1")
        .header("x-forwarded-for", "198.51.100.7");
    if let Some(id) = cookie {
        req = req.header(COOKIE, format!("session={id}"));
    }
    let reply = send(&client(), req.body(empty()).unwrap()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let json: Value = serde_json::from_slice(&reply.body).unwrap();
    let new = json["new"].as_bool().unwrap();
    assert_eq!(new, reply.headers.contains_key(SET_COOKIE));
    (
        json["session"].as_str().unwrap().to_owned(),
        json["visits"].as_u64().unwrap(),
        new,
    )
}

/// Continues `id` on `node`, asserting that it was not lost: the count goes on from `before`.
async fn continue_session(node: &WebNode, id: &str, before: u64) -> u64 {
    let (seen, visits, new) = visit(node, Some(id)).await;
    assert!(
        !new,
        "{} lost session {id} (had {before} visits)",
        node.id()
    );
    assert_eq!(seen, id);
    assert_eq!(visits, before + 1, "{} continued {id}", node.id());
    visits
}

async fn verify(node: &WebNode, token: &str) -> Value {
    let body = serde_json::json!({ "sessionToken": token }).to_string();
    let req = Request::post(format!("http://{}/v1/sessions/verify", node.local_addr()))
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap();
    let reply = send(&client(), req).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    serde_json::from_slice(&reply.body).unwrap()
}

async fn metrics(node: &WebNode) -> String {
    let reply = get(&client(), &format!("http://{}/metrics", node.local_addr())).await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.text()
}

/// `webnode_session_lookup_seconds_count{source=...}` of `node`.
async fn lookups(node: &WebNode, source: &str) -> u64 {
    let scrape = metrics(node).await;
    let name = format!("webnode_session_lookup_seconds_count{{source=\"{source}\"}}");
    series(&scrape, &name).unwrap_or_else(|| panic!("{name} in\n{scrape}")) as u64
}

/// The row's visit count in PostgreSQL, `None` when there is no row.
fn row_visits(pg: &Postgres, id: &str) -> Option<u64> {
    let out = pg.psql(&format!(
        "SELECT session_data->>'visits' FROM user_sessions WHERE session_id = '{id}'"
    ));
    (!out.is_empty()).then(|| out.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_sessions_is_created_with_the_seeds_exact_schema_and_keeps_rows_it_finds() {
    let Some(pg) = Postgres::start() else { return };
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // Trust authentication ignores the password; it is there to show it never comes back.
    let url = format!(
        "postgres://postgres:hunter2-secret@127.0.0.1:{}/postgres",
        pg.port
    );
    let a = node(
        "web-a",
        sessions(&format!("redis://127.0.0.1:{}", redis.port), Some(&url)),
    )
    .await;
    wait_for_dependencies(&a, "CONNECTED", "CONNECTED").await;

    let columns = pg.psql(
        "SELECT column_name, data_type, coalesce(character_maximum_length::text, ''), \
                is_nullable, coalesce(column_default, '') \
           FROM information_schema.columns \
          WHERE table_name = 'user_sessions' ORDER BY ordinal_position",
    );
    assert_eq!(
        columns.lines().collect::<Vec<_>>(),
        [
            "session_id|character varying|128|NO|",
            "user_id|uuid||NO|",
            "session_data|jsonb||NO|",
            "client_ip|inet||YES|",
            "user_agent|text||YES|",
            "created_at|timestamp with time zone||YES|CURRENT_TIMESTAMP",
            "expires_at|timestamp with time zone||NO|",
        ]
    );
    let indexes = pg.psql(
        "SELECT indexname, indexdef FROM pg_indexes \
          WHERE tablename = 'user_sessions' ORDER BY indexname",
    );
    assert_eq!(
        indexes.lines().collect::<Vec<_>>(),
        [
            "idx_sessions_expiry|CREATE INDEX idx_sessions_expiry ON public.user_sessions \
             USING btree (expires_at)",
            "user_sessions_pkey|CREATE UNIQUE INDEX user_sessions_pkey ON public.user_sessions \
             USING btree (session_id)",
        ]
    );
    let primary = pg.psql(
        "SELECT a.attname FROM pg_index i \
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
          WHERE i.indrelid = 'user_sessions'::regclass AND i.indisprimary",
    );
    assert_eq!(primary, "session_id");

    // A session maps onto one row: its id, a stable derived user id, the visit count, the
    // client the balancer saw, the agent, an expiry half an hour out.
    let (id, _, new) = visit(&a, None).await;
    assert!(new);
    continue_session(&a, &id, 1).await;
    let row = pg.psql(&format!(
        "SELECT user_id, session_data, host(client_ip), user_agent, \
                created_at <= now(), \
                expires_at BETWEEN now() + interval '29 minutes' AND now() + interval '31 minutes' \
           FROM user_sessions WHERE session_id = '{id}'"
    ));
    let fields: Vec<&str> = row.split('|').collect();
    assert_eq!(fields.len(), 6, "{row}");
    assert_eq!(
        &fields[1..],
        [
            r#"{"visits": 2}"#,
            "198.51.100.7",
            "durable-sessions-test/1",
            "t",
            "t"
        ]
    );
    let user = fields[0];
    assert_eq!(&user[14..15], "8", "a version-8 UUID: {user}");

    // A second node on the same database finds the table (and the row) and keeps them; a row
    // someone else wrote is left as it is.
    pg.psql(
        "INSERT INTO user_sessions (session_id, user_id, session_data, expires_at) \
         VALUES ('not-ours', gen_random_uuid(), '{\"cart\": [1, 2]}', now() + interval '1 day')",
    );
    let b = node(
        "web-b",
        sessions(&format!("redis://127.0.0.1:{}", redis.port), Some(&url)),
    )
    .await;
    wait_for_dependencies(&b, "CONNECTED", "CONNECTED").await;
    continue_session(&b, &id, 2).await;
    let same_user = pg.psql(&format!(
        "SELECT user_id FROM user_sessions WHERE session_id = '{id}'"
    ));
    assert_eq!(
        same_user, user,
        "the user id is stable across nodes and visits"
    );
    assert_eq!(
        pg.psql("SELECT session_data FROM user_sessions WHERE session_id = 'not-ours'"),
        r#"{"cart": [1, 2]}"#
    );
    assert_eq!(pg.psql("SELECT count(*) FROM user_sessions"), "2");

    // The password reaches neither /healthz nor /metrics.
    for node in [&a, &b] {
        let health = healthz(node).await.to_string();
        assert!(!health.contains("hunter2"), "{health}");
        assert!(!metrics(node).await.contains("hunter2"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_survives_redis_flushall_and_a_killed_redis_without_losing_a_visit() {
    let Some(pg) = Postgres::start() else { return };
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let port = redis.port;
    let redis_url = format!("redis://127.0.0.1:{port}");
    let one = node("web-1", sessions(&redis_url, Some(&pg.url()))).await;
    let two = node("web-2", sessions(&redis_url, Some(&pg.url()))).await;
    for n in [&one, &two] {
        wait_for_dependencies(n, "CONNECTED", "CONNECTED").await;
    }

    let (id, mut visits, new) = visit(&one, None).await;
    assert!(new && visits == 1);
    visits = continue_session(&two, &id, visits).await;
    visits = continue_session(&one, &id, visits).await;
    assert_eq!(
        row_visits(&pg, &id),
        Some(visits),
        "every write reaches PostgreSQL"
    );
    let key = format!("{KEY_PREFIX}{id}");

    // Redis forgets everything: node 2 finds the session in PostgreSQL and puts it back.
    assert_eq!(redis.command(&["FLUSHALL"]), "OK");
    assert_eq!(redis.command(&["EXISTS", &key]), "0");
    visits = continue_session(&two, &id, visits).await;
    assert_eq!(
        redis.command(&["GET", &key]),
        visits.to_string(),
        "Redis refilled"
    );
    let ttl: u64 = redis.command(&["TTL", &key]).parse().unwrap();
    assert!(
        (1700..=1800).contains(&ttl),
        "refilled with the session's expiry: {ttl}"
    );
    visits = continue_session(&one, &id, visits).await;
    assert_eq!(row_visits(&pg, &id), Some(visits));

    // Redis is killed: sessions carry on from PostgreSQL, and a new one can start.
    drop(redis);
    visits = continue_session(&one, &id, visits).await;
    visits = continue_session(&two, &id, visits).await;
    let (during, during_visits, during_new) = visit(&two, None).await;
    assert!(during_new && during_visits == 1);
    wait_for_dependencies(&one, "CONNECTED", "DISCONNECTED").await;
    visits = continue_session(&one, &id, visits).await;
    assert_eq!(continue_session(&one, &during, 1).await, 2);

    // A fresh, empty Redis on the same port: nothing is lost, and Redis fills up again.
    let fresh = RedisServer::start_on(port).expect("a fresh redis on the same port");
    wait_for_dependencies(&one, "CONNECTED", "CONNECTED").await;
    wait_for_dependencies(&two, "CONNECTED", "CONNECTED").await;
    visits = continue_session(&two, &id, visits).await;
    visits = continue_session(&one, &id, visits).await;
    assert_eq!(continue_session(&two, &during, 2).await, 3);
    assert_eq!(fresh.command(&["GET", &key]), visits.to_string());
    assert_eq!(
        fresh.command(&["GET", &format!("{KEY_PREFIX}{during}")]),
        "3"
    );
    assert_eq!(row_visits(&pg, &id), Some(visits));
    assert_eq!(visits, 10, "one count per visit, none lost");
    assert!(verify(&one, &id).await["valid"].as_bool().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lookup_histogram_counts_each_lookup_under_the_store_that_answered() {
    let Some(pg) = Postgres::start() else { return };
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let redis_url = format!("redis://127.0.0.1:{}", redis.port);
    let n = node("web-h", sessions(&redis_url, Some(&pg.url()))).await;
    wait_for_dependencies(&n, "CONNECTED", "CONNECTED").await;
    assert_eq!(
        (lookups(&n, "redis").await, lookups(&n, "postgres").await),
        (0, 0)
    );

    let (id, _, _) = visit(&n, None).await; // a new session is not a lookup
    continue_session(&n, &id, 1).await; // redis
    assert!(verify(&n, &id).await["valid"].as_bool().unwrap()); // redis
    assert_eq!(
        (lookups(&n, "redis").await, lookups(&n, "postgres").await),
        (2, 0)
    );

    redis.command(&["FLUSHALL"]);
    assert!(verify(&n, &id).await["valid"].as_bool().unwrap()); // postgres, refills
    continue_session(&n, &id, 2).await; // redis again
    redis.command(&["FLUSHALL"]);
    continue_session(&n, &id, 3).await; // postgres
    assert_eq!(
        (lookups(&n, "redis").await, lookups(&n, "postgres").await),
        (3, 2)
    );

    let scrape = metrics(&n).await;
    assert!(
        scrape.contains("# TYPE webnode_session_lookup_seconds histogram"),
        "{scrape}"
    );
    let inf = series(
        &scrape,
        "webnode_session_lookup_seconds_bucket{source=\"postgres\",le=\"+Inf\"}",
    );
    assert_eq!(inf, Some(2.0));
    assert!(!scrape.contains("source=\"memory\""), "{scrape}");

    // A memory node counts its own lookups under `memory`.
    let m = node("web-m", SessionOptions::new(SessionBackend::Memory)).await;
    let (mid, _, _) = visit(&m, None).await;
    continue_session(&m, &mid, 1).await;
    assert_eq!(lookups(&m, "memory").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_deleted_by_the_periodic_cleanup() {
    let Some(pg) = Postgres::start() else { return };
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut options = sessions(
        &format!("redis://127.0.0.1:{}", redis.port),
        Some(&pg.url()),
    );
    options.cleanup_interval = Duration::from_millis(200);
    let n = node("web-c", options).await;
    wait_for_dependencies(&n, "CONNECTED", "CONNECTED").await;

    let expired = "0000000000000000000000000000dead";
    let live = "0000000000000000000000000000beef";
    pg.psql(&format!(
        "INSERT INTO user_sessions (session_id, user_id, session_data, expires_at) VALUES \
         ('{expired}', gen_random_uuid(), '{{\"visits\": 4}}', now() - interval '1 minute'), \
         ('{live}', gen_random_uuid(), '{{\"visits\": 9}}', now() + interval '10 minutes')"
    ));
    wait_until("the expired row is deleted", || async {
        pg.psql(&format!(
            "SELECT count(*) FROM user_sessions WHERE session_id = '{expired}'"
        )) == "0"
    })
    .await;
    let scrape = metrics(&n).await;
    assert!(
        series(&scrape, "webnode_session_expired_deleted_total").unwrap() >= 1.0,
        "{scrape}"
    );
    // The live row stays, and it is a session the node continues (from PostgreSQL).
    assert_eq!(row_visits(&pg, live), Some(9));
    assert_eq!(verify(&n, live).await["visits"], 9);
    continue_session(&n, live, 9).await;
    // An expired row is never served, even before the cleanup reaches it.
    pg.psql(&format!(
        "INSERT INTO user_sessions (session_id, user_id, session_data, expires_at) VALUES \
         ('{expired}', gen_random_uuid(), '{{\"visits\": 4}}', now() - interval '1 second')"
    ));
    assert_eq!(verify(&n, expired).await["valid"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_the_database_going_away_and_coming_back_while_sessions_carry_on() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let n = node(
        "web-d",
        sessions(
            &format!("redis://127.0.0.1:{}", redis.port),
            Some(&pg.url()),
        ),
    )
    .await;
    wait_for_dependencies(&n, "CONNECTED", "CONNECTED").await;
    let (id, _, _) = visit(&n, None).await;

    pg.stop();
    wait_for_dependencies(&n, "DISCONNECTED", "CONNECTED").await;
    assert_eq!(
        healthz(&n).await["status"],
        "UP",
        "a database outage is not the node's"
    );
    // Redis carries the sessions meanwhile, old and new.
    continue_session(&n, &id, 1).await;
    continue_session(&n, &id, 2).await;
    let (during, _, new) = visit(&n, None).await;
    assert!(new);

    pg.restart();
    wait_for_dependencies(&n, "CONNECTED", "CONNECTED").await;
    // Each session's row catches up on its next visit.
    continue_session(&n, &id, 3).await;
    continue_session(&n, &during, 1).await;
    assert_eq!(row_visits(&pg, &id), Some(4));
    assert_eq!(row_visits(&pg, &during), Some(2));
    // And from here on losing Redis loses nothing.
    redis.command(&["FLUSHALL"]);
    continue_session(&n, &id, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_needs_a_redis_cache_in_front() {
    let options = SessionOptions::new(SessionBackend::Memory)
        .with_database("postgres://postgres@127.0.0.1:1/postgres".parse().unwrap());
    let opts = WebNodeOptions::new("127.0.0.1:0".parse().unwrap(), "web-x");
    let err = webnode::spawn_with_sessions(opts, options)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("--sessions redis://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_backs_sessions_shared_by_two_nodes_across_its_three_shards() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let url = cluster.url();
    let backend = |url: &str| SessionOptions::new(url.parse::<SessionBackend>().unwrap());
    assert_eq!(
        format!("{:?}", url.parse::<SessionBackend>().unwrap()),
        url,
        "described as given"
    );
    let one = node("web-1", backend(&url)).await;
    let two = node("web-2", backend(&url)).await;
    for n in [&one, &two] {
        wait_for_dependencies(n, "NOT_CONFIGURED", "CONNECTED").await;
    }

    let mut ids = Vec::new();
    for _ in 0..30 {
        let (id, visits, new) = visit(&one, None).await;
        assert!(new && visits == 1);
        ids.push(id);
    }
    for id in &ids {
        continue_session(&two, id, 1).await;
        continue_session(&one, id, 2).await;
        assert_eq!(verify(&two, id).await["visits"], 3);
    }
    let counts = cluster.key_counts();
    assert_eq!(counts.iter().sum::<u64>(), 30, "{counts:?}");
    assert!(
        counts.iter().all(|&keys| keys > 0),
        "the keys spread over all three shards: {counts:?}"
    );
    assert!(lookups(&one, "redis").await >= 30);
}
