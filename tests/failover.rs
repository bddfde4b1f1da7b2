//! Failures clients must not see: a refused connection is retried on another node (body and
//! all), a refusing node cools off, and killing a node under steady load loses no request.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fulcrum::pool::Health;
use http::Request;
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::*;
use tokio::net::TcpStream;

const FAST_CHECKS: &str = "[pools.POOL.health]\ninterval = \"100ms\"\ntimeout = \"80ms\"\n";
/// Checks so rare they never run during the test: only passive protection acts.
const NO_CHECKS: &str = "[pools.POOL.health]\ninterval = \"1h\"\n";

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_node_with_its_body() {
    let dead = free_port().await;
    let nodes = webnodes(1).await;
    let backends = [("dead", dead, 1), ("web-1", nodes[0].local_addr(), 1)];
    let running = balancer(&single_pool(
        "fo_retry",
        "round_robin",
        &backends,
        &NO_CHECKS.replace("POOL", "fo_retry"),
    ))
    .await;

    // Round robin starts with `dead`: this POST meets the refusal first.
    let payload = vec![7u8; 256 * 1024];
    let req = Request::post(url(&running, "/echo"))
        .body(full(payload.clone()))
        .unwrap();
    let reply = send(&client(), req).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echo: Value = serde_json::from_slice(&reply.body).unwrap();
    let sha: String = Sha256::digest(&payload)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(echo["body_sha256"], sha, "the retried body arrived intact");

    // Cooling off: the next requests skip `dead` without trying it again.
    let client = client();
    for _ in 0..10 {
        assert_eq!(get(&client, &url(&running, "/")).await.served_by(), "web-1");
    }
    let dead_node = node(&running, "dead");
    assert!(dead_node.is_cooling());
    assert_eq!(
        dead_node.health(),
        Health::Up,
        "the checker, not a refusal, decides up and down"
    );

    let metrics = scrape(&running).await;
    assert_eq!(
        series(&metrics, "fulcrum_retries_total{pool=\"fo_retry\"}"),
        Some(1.0),
        "{metrics}"
    );
    let connect = "fulcrum_proxy_errors_total{pool=\"fo_retry\",backend=\"dead\",kind=\"connect\"}";
    assert_eq!(series(&metrics, connect), Some(1.0), "{metrics}");
    let answered = "fulcrum_requests_total{pool=\"fo_retry\",backend=\"web-1\",code=\"200\"}";
    assert_eq!(series(&metrics, answered), Some(11.0), "{metrics}");
}

#[tokio::test]
async fn a_retry_never_tries_the_same_node_twice() {
    let dead1 = free_port().await;
    let dead2 = free_port().await;
    let backends = [("dead-1", dead1, 1), ("dead-2", dead2, 1)];
    let running = balancer(&single_pool(
        "fo_twice",
        "round_robin",
        &backends,
        &NO_CHECKS.replace("POOL", "fo_twice"),
    ))
    .await;
    let reply = get(&client(), &url(&running, "/")).await;
    assert_eq!(reply.status, 502);
    let metrics = scrape(&running).await;
    assert_eq!(
        series(&metrics, "fulcrum_retries_total{pool=\"fo_twice\"}"),
        Some(1.0),
        "{metrics}"
    );
    for name in ["dead-1", "dead-2"] {
        let connect = format!(
            "fulcrum_proxy_errors_total{{pool=\"fo_twice\",backend=\"{name}\",kind=\"connect\"}}"
        );
        assert_eq!(series(&metrics, &connect), Some(1.0), "{metrics}");
    }
    // Both cool off; with nobody left the answer is an immediate 503.
    assert_eq!(get(&client(), &url(&running, "/")).await.status, 503);
}

/// A web node in its own process, so it can be killed like a crashed server.
async fn webnode_process(id: &str) -> (Process, SocketAddr) {
    let addr = free_port().await;
    let child = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["webnode", "--listen", &addr.to_string(), "--id", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the web node binary");
    let process = Process(child);
    wait_until("the web node process listens", || async {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;
    (process, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_three_nodes_under_steady_load_loses_no_request() {
    let nodes = webnodes(2).await;
    let (mut victim, victim_addr) = webnode_process("victim").await;
    let backends = [
        ("web-1", nodes[0].local_addr(), 1),
        ("web-2", nodes[1].local_addr(), 1),
        ("victim", victim_addr, 1),
    ];
    let running = balancer(&single_pool(
        "fo_kill",
        "round_robin",
        &backends,
        &FAST_CHECKS.replace("POOL", "fo_kill"),
    ))
    .await;
    let victim_node = node(&running, "victim");

    // 2,000 GETs from 20 keep-alive clients at a steady pace (~1,000/s in all).
    let done = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..20 {
        let (done, failures, target) = (done.clone(), failures.clone(), url(&running, "/"));
        workers.push(tokio::spawn(async move {
            let client = client();
            let mut next = Instant::now();
            for _ in 0..100 {
                next += Duration::from_millis(20);
                let ok = match client
                    .request(Request::get(&target).body(empty()).unwrap())
                    .await
                {
                    Ok(response) => {
                        response.status() == 200 && collect(response).await.status == 200
                    }
                    Err(_) => false,
                };
                if !ok {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep_until(next.into()).await;
            }
        }));
    }
    wait_until("a quarter of the load has run", || async {
        done.load(Ordering::SeqCst) >= 500
    })
    .await;
    victim.0.kill().expect("SIGKILL the victim");
    let killed_at = Instant::now();
    wait_until("the checker takes the victim out", || async {
        victim_node.health() == Health::Down
    })
    .await;
    let detected = killed_at.elapsed();
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), 2000);
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "clients saw errors while a node died"
    );
    // fall × interval + timeout = 380 ms, plus scheduling slack on a loaded machine.
    assert!(
        detected < Duration::from_secs(3),
        "detection took {detected:?}"
    );
}
