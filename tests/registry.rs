//! The seed registry over real gRPC: nodes that register, heartbeat, miss heartbeats, are
//! decommissioned and survive reloads, and a `fulcrum webnode --register` process that joins a
//! balancer and leaves it under load without a failed request.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Request;
use serde_json::Value;
use support::registry::*;
use support::*;
use tonic::Code;

/// A single-pool balancer config with a registry on an ephemeral port feeding that pool.
fn with_registry(
    pool: &str,
    backends: &[(&str, SocketAddr, u32)],
    heartbeat_interval: &str,
) -> String {
    registry_config(pool, backends, heartbeat_interval, "")
}

#[tokio::test]
async fn report_active_twice_is_one_pending_node_that_rises_and_bad_reports_are_refused() {
    let nodes = webnodes(2).await;
    let pool = "reg_twice";
    let running = balancer(&with_registry(
        pool,
        &[("web-1", nodes[0].local_addr(), 1)],
        "5s",
    ))
    .await;
    let mut registry = registry_client(&running).await;

    let first = registry
        .report_active(active("reg-a", nodes[1].local_addr()))
        .await
        .expect("registered")
        .into_inner();
    assert!(first.is_registered);
    assert_eq!(first.heartbeat_interval_seconds, 5);
    assert_eq!(
        state_of(&running, pool, "reg-a").await.as_deref(),
        Some("pending"),
        "a registered node waits for rise passes"
    );
    let second = registry
        .report_active(active("reg-a", nodes[1].local_addr()))
        .await
        .expect("a heartbeat")
        .into_inner();
    assert!(second.is_registered);
    let names: Vec<String> = listed(&running, pool)
        .await
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    assert_eq!(names, ["web-1", "reg-a"], "one node, not two");
    wait_until("the registered node passes its checks", || async {
        state_of(&running, pool, "reg-a").await.as_deref() == Some("up")
    })
    .await;
    let client = client();
    let served: Vec<String> = {
        let mut served = Vec::new();
        for _ in 0..4 {
            served.push(get(&client, &url(&running, "/")).await.served_by());
        }
        served
    };
    // The web node answers with its own id (web-2), whatever name it registered under.
    let from_registered = served.iter().filter(|s| *s == nodes[1].id()).count();
    assert_eq!(from_registered, 2, "{served:?}");

    // The file's node keeps its name and address; bad addresses are refused.
    let taken = registry
        .report_active(active("web-1", nodes[1].local_addr()))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    let squatter = registry
        .report_active(active("reg-x", nodes[0].local_addr()))
        .await
        .unwrap_err();
    assert_eq!(squatter.code(), Code::AlreadyExists, "{squatter:?}");
    for (ip, port) in [("not-an-ip", 80), ("127.0.0.1", 0), ("127.0.0.1", 70_000)] {
        let mut bad = active("reg-bad", nodes[1].local_addr());
        bad.ip_address = ip.into();
        bad.port = port;
        let err = registry.report_active(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{ip}:{port}: {err:?}");
    }
    assert_eq!(listed(&running, pool).await.len(), 2, "nothing was added");

    let metrics = scrape(&running).await;
    assert!(
        metrics.contains("# HELP fulcrum_registry_events_total"),
        "{metrics}"
    );
    assert!(
        series(
            &metrics,
            "fulcrum_registry_events_total{event=\"register\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_node_missing_three_heartbeats_is_removed_and_heartbeats_keep_it() {
    let nodes = webnodes(2).await;
    let pool = "reg_expiry";
    let running = balancer(&with_registry(pool, &[], "1s")).await;
    let mut registry = registry_client(&running).await;

    // `kept` heartbeats every second for 4 s: longer than 3 intervals, and it stays.
    let reply = registry
        .report_active(active("kept", nodes[0].local_addr()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.heartbeat_interval_seconds, 1);
    registry
        .report_active(active("silent", nodes[1].local_addr()))
        .await
        .unwrap();
    let silent_since = Instant::now();
    let mut gone_after = None;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        registry
            .report_active(active("kept", nodes[0].local_addr()))
            .await
            .unwrap();
        if gone_after.is_none() && state_of(&running, pool, "silent").await.is_none() {
            gone_after = Some(silent_since.elapsed());
        }
    }
    assert!(
        state_of(&running, pool, "kept").await.is_some(),
        "heartbeats keep a node"
    );
    if gone_after.is_none() {
        wait_until("the silent node is removed", || async {
            state_of(&running, pool, "silent").await.is_none()
        })
        .await;
        gone_after = Some(silent_since.elapsed());
    }
    let gone_after = gone_after.unwrap();
    // 3 × 1 s of silence, found by a reaper that looks every 250 ms (plus polling slack).
    assert!(
        gone_after >= Duration::from_millis(2900) && gone_after < Duration::from_millis(4500),
        "removed after {gone_after:?}"
    );
    // Forgotten by the registry too: a decommission now finds nothing.
    let err = registry
        .report_decommission(decommission("silent", "5"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let metrics = scrape(&running).await;
    assert!(
        series(&metrics, "fulcrum_registry_events_total{event=\"expired\"}")
            .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn decommission_checks_the_timeout_before_the_id_and_zero_removes_at_once() {
    let nodes = webnodes(1).await;
    let pool = "reg_decom";
    let running = balancer(&with_registry(pool, &[], "5s")).await;
    let mut registry = registry_client(&running).await;

    for drain in ["abc", "-1", "1.5", "5s", " 5"] {
        let err = registry
            .report_decommission(decommission("nobody", drain))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{drain:?} for an unknown id"
        );
    }
    let err = registry
        .report_decommission(decommission("nobody", "5"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    registry
        .report_active(active("reg-d", nodes[0].local_addr()))
        .await
        .unwrap();
    let err = registry
        .report_decommission(decommission("reg-d", "abc"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        state_of(&running, pool, "reg-d").await.is_some(),
        "a refused decommission changes nothing"
    );
    let reply = registry
        .report_decommission(decommission("reg-d", "0"))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.is_decommission_started);
    assert_eq!(
        state_of(&running, pool, "reg-d").await,
        None,
        "drain 0 removes at once"
    );
    let err = registry
        .report_decommission(decommission("reg-d", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "already gone");
    // A node may come back under its name once it is gone.
    registry
        .report_active(active("reg-d", nodes[0].local_addr()))
        .await
        .unwrap();
    assert_eq!(
        state_of(&running, pool, "reg-d").await.as_deref(),
        Some("pending")
    );

    // Shutdown closes the registry's connections gracefully, the client's still open.
    let started = Instant::now();
    assert_eq!(running.shutdown().await, 0, "no connection was cut off");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let refused = registry
        .report_active(active("reg-d", nodes[0].local_addr()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
}

/// A config file of its own for a balancer that reloads.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("fulcrum-{name}-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn a_registered_node_survives_a_reload_with_its_health() {
    let nodes = webnodes(2).await;
    let pool = "reg_reload";
    let text = with_registry(pool, &[("web-1", nodes[0].local_addr(), 1)], "5s");
    let file = ConfigFile::new("registry-reload", &text);
    let running = fulcrum::start_file(file.path()).await.unwrap();
    let mut registry = registry_client(&running).await;
    registry
        .report_active(active("reg-r", nodes[1].local_addr()))
        .await
        .unwrap();
    wait_until("the registered node is up", || async {
        state_of(&running, pool, "reg-r").await.as_deref() == Some("up")
    })
    .await;

    // The file changes web-1's weight; the reload must apply that and keep reg-r as it was.
    std::fs::write(file.path(), text.replace("weight = 1", "weight = 2")).unwrap();
    let admin = running.admin_addr().unwrap();
    let reply = send(
        &client(),
        Request::post(format!("http://{admin}/api/reload"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let pools = get(&client(), &format!("http://{admin}/api/pools")).await;
    let body: Value = serde_json::from_slice(&pools.body).unwrap();
    assert_eq!(
        body["pools"][pool]["backends"][0]["weight"], 2,
        "the reload applied: {body}"
    );
    assert_eq!(
        listed(&running, pool).await,
        [
            (
                "web-1".to_owned(),
                nodes[0].local_addr().to_string(),
                "up".to_owned()
            ),
            (
                "reg-r".to_owned(),
                nodes[1].local_addr().to_string(),
                "up".to_owned()
            ),
        ],
        "the registered node stayed, up, at its address"
    );
    // And it is still the registry's: a heartbeat is not a conflict, a decommission works.
    registry
        .report_active(active("reg-r", nodes[1].local_addr()))
        .await
        .expect("still registered after the reload");
    registry
        .report_decommission(decommission("reg-r", "0"))
        .await
        .expect("decommissioned");
    assert_eq!(state_of(&running, pool, "reg-r").await, None);
}

/// Waits (up to `DEADLINE`) for a child process to exit on its own.
async fn exited(process: &mut Process) -> std::process::ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = process.0.try_wait().expect("wait on the web node") {
            return status;
        }
        assert!(Instant::now() < deadline, "the web node did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webnode_with_register_joins_serves_and_leaves_on_sigterm_without_a_failed_request() {
    let nodes = webnodes(1).await;
    let pool = "reg_e2e";
    let running = balancer(&with_registry(
        pool,
        &[("web-1", nodes[0].local_addr(), 1)],
        "1s",
    ))
    .await;
    let registry = running.registry_addr().unwrap();
    let listen = free_port().await;
    let child = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args([
            "webnode",
            "--listen",
            &listen.to_string(),
            "--id",
            "reg-e2e",
            "--register",
            &format!("http://{registry}"),
            "--drain-timeout",
            "5s",
            "--drain-grace",
            "1s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the web node binary");
    let mut process = Process(child);

    wait_until("the registered web node is up in the pool", || async {
        state_of(&running, pool, "reg-e2e").await.as_deref() == Some("up")
    })
    .await;
    assert_eq!(
        listed(&running, pool).await[1].1,
        listen.to_string(),
        "registered at its listen address"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let from_node = Arc::new(AtomicU64::new(0));
    let load = steady_load(
        url(&running, "/"),
        8,
        stop.clone(),
        Some(("reg-e2e", from_node.clone())),
    );
    wait_until("the registered node serves traffic", || async {
        from_node.load(Ordering::Relaxed) >= 50
    })
    .await;
    // Through at least one heartbeat, so the node is heartbeating, not just registered.
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let pid = process.0.id().to_string();
    let term = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(term.success());
    let signalled = Instant::now();
    wait_until("the decommissioned node leaves the pool", || async {
        state_of(&running, pool, "reg-e2e").await.is_none()
    })
    .await;
    let left_after = signalled.elapsed();
    // Expiry could not remove it this soon: its last heartbeat was at most 1 s before the
    // signal and expiry takes 3 s of silence. So this is the decommission at work.
    assert!(
        left_after < Duration::from_millis(1500),
        "left {left_after:?} after SIGTERM"
    );
    let status = exited(&mut process).await;
    // Keep the load going a little after the exit: nothing may still be routed to the node.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let from_node_total = from_node.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let (done, failed) = load.await.unwrap();
    assert!(status.success(), "the web node exited with {status}");
    assert_eq!(failed, 0, "{failed} of {done} requests failed");
    assert!(done > 200, "the load ran ({done} requests)");
    assert!(from_node_total >= 50, "the node served {from_node_total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webnode_serves_while_its_registry_is_away_and_registers_when_it_comes() {
    let pool = "reg_late";
    let registry = free_port().await;
    let listen = free_port().await;
    let child = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args([
            "webnode",
            "--listen",
            &listen.to_string(),
            "--id",
            "reg-late",
            "--register",
            &format!("http://{registry}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the web node binary");
    let mut process = Process(child);
    wait_until("the web node listens", || async {
        tokio::net::TcpStream::connect(listen).await.is_ok()
    })
    .await;
    // A few refused reports later, the node still answers.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let reply = get(&client(), &format!("http://{listen}/")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.served_by(), "reg-late");

    let config = with_registry(pool, &[], "1s").replace(
        "bind = \"127.0.0.1:0\"\npool",
        &format!("bind = \"{registry}\"\npool"),
    );
    let running = balancer(&config).await;
    assert_eq!(running.registry_addr(), Some(registry));
    wait_until("the node registers once the registry is up", || async {
        state_of(&running, pool, "reg-late").await.as_deref() == Some("up")
    })
    .await;
    assert_eq!(
        get(&client(), &url(&running, "/")).await.served_by(),
        "reg-late"
    );

    let pid = process.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = exited(&mut process).await;
    assert!(status.success(), "the web node exited with {status}");
    assert_eq!(state_of(&running, pool, "reg-late").await, None);
}

#[tokio::test]
async fn a_registry_bind_failure_fails_the_whole_start() {
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let text = with_registry("reg_bind", &[], "1s").replace(
        "bind = \"127.0.0.1:0\"\npool",
        &format!("bind = \"{addr}\"\npool"),
    );
    let config = fulcrum::config::Config::parse(Path::new("test.toml"), &text).unwrap();
    match fulcrum::start(&config).await {
        Err(fulcrum::StartError::Bind { name, addr: at, .. }) => {
            assert_eq!((name.as_str(), at), ("registry", addr));
        }
        other => panic!("expected a bind error for the registry, got {other:?}"),
    }
}
