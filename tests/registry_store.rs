//! Several balancers, one registry: two `fulcrum::start`s with the same `[registry] store` on a
//! real PostgreSQL serve the same registered nodes, each after its own `rise` checks; a
//! decommission through one drains on both; a node silent for three heartbeats leaves both; a
//! store URL's password is never printed; and `webnode --register A,B` moves past a registry
//! that is away. The store's outage is `registry_store_outage.rs` (its gauge is per process).
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::postgres::Postgres;
use support::registry::*;
use support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_registered_through_one_balancer_is_served_by_the_other_after_its_own_rise() {
    let Some(pg) = Postgres::start() else { return };
    let nodes = webnodes(1).await;
    let pool = "store_pair";
    let a = store_balancer(pool, "round_robin", &pg.url(), "5s").await;
    let b = store_balancer(pool, "round_robin", &pg.url(), "5s").await;
    store_ready(&a).await;
    store_ready(&b).await;

    // The seed's table and index, exactly, plus the two documented columns.
    let columns = pg.psql(
        "SELECT column_name, data_type, coalesce(character_maximum_length::text, ''), is_nullable, coalesce(column_default, '')
         FROM information_schema.columns WHERE table_name = 'server_nodes' ORDER BY ordinal_position",
    );
    assert_eq!(
        columns.lines().collect::<Vec<_>>(),
        [
            "node_id|uuid||NO|gen_random_uuid()",
            "hostname|character varying|255|NO|",
            "ip_address|inet||NO|",
            "node_status|character varying|50|YES|'ACTIVE'::character varying",
            "active_connections_count|integer||YES|0",
            "last_heartbeat_at|timestamp with time zone||YES|CURRENT_TIMESTAMP",
            "created_at|timestamp with time zone||YES|CURRENT_TIMESTAMP",
            "port|integer||NO|",
            "pool|character varying|128|NO|",
        ]
    );
    let constraints = pg.psql(
        "SELECT constraint_type || ':' || string_agg(column_name, ',')
         FROM information_schema.table_constraints JOIN information_schema.key_column_usage USING (constraint_name, table_name)
         WHERE table_name = 'server_nodes' GROUP BY constraint_type ORDER BY 1",
    );
    assert_eq!(constraints, "PRIMARY KEY:node_id\nUNIQUE:hostname");
    assert_eq!(
        pg.psql("SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_active_nodes'"),
        "CREATE INDEX idx_active_nodes ON public.server_nodes USING btree (node_status, last_heartbeat_at) WHERE ((node_status)::text = 'ACTIVE'::text)"
    );

    let mut registry_a = registry_client(&a).await;
    let registered = Instant::now();
    registry_a
        .report_active(active("shared-1", nodes[0].local_addr()))
        .await
        .expect("registered through A");
    let first_seen_on_b = loop {
        if let Some(state) = state_of(&b, pool, "shared-1").await {
            break Some(state);
        }
        assert!(registered.elapsed() < DEADLINE, "B never lists the node");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let listed_after = registered.elapsed();
    assert!(
        listed_after < Duration::from_secs(1),
        "listed by B within the 1 s poll interval (NOTIFY makes it sooner): {listed_after:?}"
    );
    assert_eq!(
        first_seen_on_b.as_deref(),
        Some("pending"),
        "B waits for its own rise checks"
    );
    wait_until("B's own checks bring the node up", || async {
        state_of(&b, pool, "shared-1").await.as_deref() == Some("up")
    })
    .await;
    assert_eq!(served_by(&b).await, "web-1", "B routes to the node");
    let row = pg.psql(
        "SELECT host(ip_address), port, pool, node_status FROM server_nodes WHERE hostname = 'shared-1'",
    );
    assert_eq!(
        row,
        format!("127.0.0.1|{}|{pool}|ACTIVE", nodes[0].local_addr().port())
    );
    // A heartbeat through A writes the node's own /healthz figure back.
    wait_until("the heartbeat carries activeConnections", || async {
        registry_a
            .clone()
            .report_active(active("shared-1", nodes[0].local_addr()))
            .await
            .unwrap();
        pg.psql("SELECT active_connections_count FROM server_nodes WHERE hostname = 'shared-1'")
            .parse::<i64>()
            .unwrap()
            >= 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommission_through_b_drains_the_node_on_a_and_ends_decommissioned() {
    let Some(pg) = Postgres::start() else { return };
    let nodes = webnodes(1).await;
    let pool = "store_drain";
    // Sticky pools drain until the drain runs out, so the draining state is visible.
    let a = store_balancer(pool, "sticky_cookie", &pg.url(), "5s").await;
    let b = store_balancer(pool, "sticky_cookie", &pg.url(), "5s").await;
    store_ready(&a).await;
    store_ready(&b).await;
    let mut registry_a = registry_client(&a).await;
    registry_a
        .report_active(active("leaving", nodes[0].local_addr()))
        .await
        .unwrap();
    for running in [&a, &b] {
        wait_until("both balancers serve the node", || async {
            state_of(running, pool, "leaving").await.as_deref() == Some("up")
        })
        .await;
    }

    let mut registry_b = registry_client(&b).await;
    let asked = Instant::now();
    registry_b
        .report_decommission(decommission("leaving", "2"))
        .await
        .expect("decommissioned through B");
    assert_eq!(
        pg.psql("SELECT node_status FROM server_nodes WHERE hostname = 'leaving'"),
        "DRAINING"
    );
    wait_until("A drains the node too", || async {
        state_of(&a, pool, "leaving").await.as_deref() == Some("draining")
    })
    .await;
    wait_until("the drain ends on both balancers", || async {
        state_of(&a, pool, "leaving").await.is_none()
            && state_of(&b, pool, "leaving").await.is_none()
    })
    .await;
    let ended = asked.elapsed();
    assert!(
        ended >= Duration::from_millis(1900),
        "the 2 s drain was honoured on A: {ended:?}"
    );
    wait_until("the row ends DECOMMISSIONED", || async {
        pg.psql("SELECT node_status FROM server_nodes WHERE hostname = 'leaving'")
            == "DECOMMISSIONED"
    })
    .await;
    let again = registry_b
        .report_decommission(decommission("leaving", "0"))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_silent_for_three_heartbeats_leaves_every_balancer() {
    let Some(pg) = Postgres::start() else { return };
    let nodes = webnodes(1).await;
    let pool = "store_expiry";
    let a = store_balancer(pool, "round_robin", &pg.url(), "1s").await;
    let b = store_balancer(pool, "round_robin", &pg.url(), "1s").await;
    store_ready(&a).await;
    store_ready(&b).await;
    let mut registry_a = registry_client(&a).await;
    registry_a
        .report_active(active("silent", nodes[0].local_addr()))
        .await
        .unwrap();
    let last_heartbeat = Instant::now();
    wait_until("B lists the node", || async {
        state_of(&b, pool, "silent").await.is_some()
    })
    .await;
    wait_until("the silent node leaves both balancers", || async {
        state_of(&a, pool, "silent").await.is_none() && state_of(&b, pool, "silent").await.is_none()
    })
    .await;
    let gone_after = last_heartbeat.elapsed();
    assert!(
        gone_after >= Duration::from_millis(2900),
        "not before 3 × 1 s without a heartbeat: {gone_after:?}"
    );
    assert_eq!(
        pg.psql("SELECT node_status FROM server_nodes WHERE hostname = 'silent'"),
        "ACTIVE",
        "expiry is the seed's query over the row, not a rewrite of it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_password_never_reaches_check_output_or_logs() {
    let dir = std::env::temp_dir().join(format!("fulcrum-store-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fulcrum.toml");
    // Nothing listens on the store's port: the balancer logs its reconnection attempts.
    let port = free_port().await.port();
    std::fs::write(
        &path,
        format!(
            "[[listeners]]\nbind = \"127.0.0.1:0\"\n[pools.web]\nbackends = []\n[registry]\nbind = \"127.0.0.1:0\"\npool = \"web\"\nstore = \"postgres://fulcrum:hunter2-pw@127.0.0.1:{port}/registry\"\n"
        ),
    )
    .unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{printed}");
    assert!(
        printed.contains(&format!("postgres://fulcrum:***@127.0.0.1:{port}/registry")),
        "{printed}"
    );
    assert!(!printed.contains("hunter2"), "{printed}");

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[listeners]]\nbind = \"127.0.0.1:0\"\n[pools.web]\nbackends = []\n[registry]\nbind = \"127.0.0.1:0\"\npool = \"web\"\nstore = \"postgres://fulcrum:hunter2-pw@127.0.0.1/\"\n",
    )
    .unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["check", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&check.stderr).into_owned();
    assert!(!check.status.success());
    assert!(
        printed.contains("bad.toml:8:9: registry.store: expected postgres://USER@HOST:PORT/DB (got `postgres://fulcrum:***@127.0.0.1/`)"),
        "{printed}"
    );
    assert!(!printed.contains("hunter2"), "{printed}");

    let log = dir.join("run.log");
    let child = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["run", "-c"])
        .arg(&path)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("run.err")).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _process = Process(child);
    let read_logs = || {
        std::fs::read_to_string(&log).unwrap_or_default()
            + &std::fs::read_to_string(dir.join("run.err")).unwrap_or_default()
    };
    wait_until("the balancer logs a failed store connection", || async {
        read_logs().matches("registry store unreachable").count() >= 2
    })
    .await;
    let logs = read_logs();
    assert!(logs.contains("postgres://fulcrum:***@127.0.0.1"), "{logs}");
    assert!(!logs.contains("hunter2"), "{logs}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webnode_registers_through_the_next_url_when_the_first_is_away() {
    let nodes = webnodes(1).await;
    let pool = "multi_url";
    let running = balancer(&registry_config(
        pool,
        &[("web-1", nodes[0].local_addr(), 1)],
        "1s",
        "",
    ))
    .await;
    let dead = free_port().await;
    let live = running.registry_addr().unwrap();
    let listen = free_port().await;
    let child = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args([
            "webnode",
            "--listen",
            &listen.to_string(),
            "--id",
            "multi",
            "--register",
            &format!("http://{dead},http://{live}"),
            "--drain-timeout",
            "5s",
            "--drain-grace",
            "0s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the web node binary");
    let mut process = Process(child);
    wait_until("the node is registered through the second URL", || async {
        state_of(&running, pool, "multi").await.as_deref() == Some("up")
    })
    .await;
    // Through a heartbeat or two: it stays, heartbeating through the registry that answered.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        state_of(&running, pool, "multi").await.as_deref(),
        Some("up")
    );

    let pid = process.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_until(
        "the node decommissioned through the live registry leaves",
        || async { state_of(&running, pool, "multi").await.is_none() },
    )
    .await;
    let deadline = Instant::now() + DEADLINE;
    while process.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the web node exits");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_fulcrum_did_not_write_are_left_alone() {
    let Some(pg) = Postgres::start() else { return };
    let nodes = webnodes(1).await;
    let pool = "store_foreign";
    let a = store_balancer(pool, "round_robin", &pg.url(), "5s").await;
    store_ready(&a).await;
    pg.psql(
        "INSERT INTO server_nodes (hostname, ip_address, port, pool, last_heartbeat_at)
         VALUES ('foreign', '10.9.9.9', 8080, 'another_pool', now() + interval '1 hour')",
    );
    let before = pg.psql("SELECT server_nodes::text FROM server_nodes WHERE hostname = 'foreign'");
    let mut registry = registry_client(&a).await;
    let taken = registry
        .report_active(active("foreign", nodes[0].local_addr()))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    assert!(state_of(&a, pool, "foreign").await.is_none());
    let refused = registry
        .report_decommission(decommission("foreign", "0"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    // Through a few store reads: a row of another pool is never served, nor rewritten.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(state_of(&a, pool, "foreign").await.is_none());
    assert_eq!(
        pg.psql("SELECT server_nodes::text FROM server_nodes WHERE hostname = 'foreign'"),
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_table_without_fulcrums_columns_is_reported_not_altered() {
    let Some(pg) = Postgres::start() else { return };
    let nodes = webnodes(1).await;
    pg.psql(
        "CREATE TABLE server_nodes (
            node_id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
            hostname VARCHAR(255) UNIQUE NOT NULL,
            ip_address INET NOT NULL,
            node_status VARCHAR(50) DEFAULT 'ACTIVE',
            active_connections_count INT DEFAULT 0,
            last_heartbeat_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP,
            created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP
        )",
    );
    let pool = "store_seed_only";
    let a = store_balancer(pool, "round_robin", &pg.url(), "5s").await;
    let mut registry = registry_client(&a).await;
    let refused = registry
        .report_active(active("web-1", nodes[0].local_addr()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(
        pg.psql(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'server_nodes'"
        ),
        "7",
        "the table is not altered"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM server_nodes"), "0");
    // The operator adds the two columns: the balancer, still retrying, takes the store.
    pg.psql("ALTER TABLE server_nodes ADD COLUMN port INTEGER NOT NULL, ADD COLUMN pool VARCHAR(128) NOT NULL");
    wait_until(
        "a registration goes through once the columns exist",
        || async {
            registry
                .clone()
                .report_active(active("web-1", nodes[0].local_addr()))
                .await
                .is_ok()
        },
    )
    .await;
    assert_eq!(
        pg.psql("SELECT hostname, pool FROM server_nodes"),
        format!("web-1|{pool}")
    );
}
