//! Active health checks are conservative: exactly `fall` consecutive failures take a node out,
//! exactly `rise` consecutive passes bring it back, alternating results change nothing, and a
//! "DOWN" body or a hanging check counts as a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fulcrum::Running;
use fulcrum::pool::Health;
use http::Response;
use support::*;

const FAST_CHECKS: &str =
    "[pools.POOL.health]\ninterval = \"100ms\"\ntimeout = \"80ms\"\nfall = 3\nrise = 3\n";

fn fast_checks(pool: &str) -> String {
    FAST_CHECKS.replace("POOL", pool)
}

/// A backend whose `/healthz` status the test sets; counts the checks it answered.
struct Controlled {
    backend: Backend,
    status: Arc<AtomicU16>,
    checks: Arc<AtomicU64>,
}

async fn controlled(name: &'static str) -> Controlled {
    let status = Arc::new(AtomicU16::new(200));
    let checks = Arc::new(AtomicU64::new(0));
    let (s, c) = (status.clone(), checks.clone());
    let backend = backend(move |req| {
        let (s, c) = (s.clone(), c.clone());
        async move {
            if req.uri().path() == "/healthz" {
                c.fetch_add(1, Ordering::SeqCst);
                let code = s.load(Ordering::SeqCst);
                return Response::builder()
                    .status(code)
                    .body(full("health"))
                    .unwrap();
            }
            Response::builder()
                .header("x-served-by", name)
                .body(full("ok"))
                .unwrap()
        }
    })
    .await;
    Controlled {
        backend,
        status,
        checks,
    }
}

async fn checks(running: &Running, pool: &str, backend: &str, result: &str) -> f64 {
    let key = format!(
        "fulcrum_health_checks_total{{pool=\"{pool}\",backend=\"{backend}\",result=\"{result}\"}}"
    );
    series(&scrape(running).await, &key).unwrap_or(0.0)
}

#[tokio::test]
async fn a_failing_node_leaves_at_exactly_the_third_failure_and_returns_at_the_third_pass() {
    let a = controlled("a").await;
    let b = controlled("b").await;
    let running = balancer(&single_pool(
        "hc_exact",
        "round_robin",
        &[("a", a.backend.addr, 1), ("b", b.backend.addr, 1)],
        &fast_checks("hc_exact"),
    ))
    .await;
    let a_node = node(&running, "a");
    wait_until("the first passing check", || async {
        checks(&running, "hc_exact", "a", "pass").await >= 1.0
    })
    .await;

    a.status.store(500, Ordering::SeqCst);
    wait_until("two failed checks", || async {
        checks(&running, "hc_exact", "a", "fail").await >= 2.0
    })
    .await;
    assert_eq!(
        a_node.health(),
        Health::Up,
        "two failures must not take a node out"
    );
    // Still routable: it keeps its share of traffic.
    let client = client();
    let mut served_by_a = 0;
    for _ in 0..4 {
        if get(&client, &url(&running, "/")).await.served_by() == "a" {
            served_by_a += 1;
        }
    }
    assert!(served_by_a > 0, "a node with 2 failures got no traffic");

    wait_until("the third failure takes it out", || async {
        a_node.health() == Health::Down
    })
    .await;
    assert_eq!(
        checks(&running, "hc_exact", "a", "fail").await,
        3.0,
        "down at exactly the third failure"
    );
    for _ in 0..20 {
        assert_eq!(get(&client, &url(&running, "/")).await.served_by(), "b");
    }

    a.status.store(200, Ordering::SeqCst);
    let passes_before = checks(&running, "hc_exact", "a", "pass").await;
    wait_until("two passes", || async {
        checks(&running, "hc_exact", "a", "pass").await >= passes_before + 2.0
    })
    .await;
    assert_eq!(
        a_node.health(),
        Health::Down,
        "two passes must not bring it back"
    );
    wait_until("the third pass brings it back", || async {
        a_node.health() == Health::Up
    })
    .await;
    assert_eq!(
        checks(&running, "hc_exact", "a", "pass").await,
        passes_before + 3.0
    );

    let metrics = scrape(&running).await;
    let transitions = |to: &str| {
        series(
            &metrics,
            &format!(
                "fulcrum_backend_transitions_total{{pool=\"hc_exact\",backend=\"a\",to=\"{to}\"}}"
            ),
        )
    };
    assert_eq!(transitions("down"), Some(1.0), "{metrics}");
    assert_eq!(transitions("up"), Some(1.0), "{metrics}");
    assert_eq!(
        series(
            &metrics,
            "fulcrum_backend_up{pool=\"hc_exact\",backend=\"a\"}"
        ),
        Some(1.0)
    );
    assert!(a.checks.load(Ordering::SeqCst) >= 7);
}

#[tokio::test]
async fn alternating_pass_and_fail_never_takes_a_node_out() {
    let flip = Arc::new(AtomicBool::new(false));
    let f = flip.clone();
    let flapping = backend(move |_req| {
        let f = f.clone();
        async move {
            let fail = f.fetch_xor(true, Ordering::SeqCst);
            let code = if fail { 500 } else { 200 };
            Response::builder().status(code).body(full("flap")).unwrap()
        }
    })
    .await;
    let running = balancer(&single_pool(
        "hc_flap",
        "round_robin",
        &[("flap", flapping.addr, 1)],
        &fast_checks("hc_flap"),
    ))
    .await;
    let n = node(&running, "flap");
    let started = Instant::now();
    while checks(&running, "hc_flap", "flap", "fail").await < 8.0 {
        assert_eq!(
            n.health(),
            Health::Up,
            "flapped after {:?}",
            started.elapsed()
        );
        assert!(started.elapsed() < DEADLINE, "checks are not running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(checks(&running, "hc_flap", "flap", "pass").await >= 7.0);
    assert_eq!(n.health(), Health::Up);
}

#[tokio::test]
async fn status_down_in_a_200_body_is_a_failure() {
    let nodes = webnodes(2).await;
    let running = balancer(&single_pool(
        "hc_body",
        "round_robin",
        &nodes_as_backends(&nodes),
        &fast_checks("hc_body"),
    ))
    .await;
    let req = node_control(&nodes[0], "/admin/health", r#"{"status":"DOWN"}"#);
    assert_eq!(send(&client(), req).await.status, 200);
    let web1 = node(&running, "web-1");
    wait_until("DOWN in the body takes the node out", || async {
        web1.health() == Health::Down
    })
    .await;
    let client = client();
    for _ in 0..10 {
        assert_eq!(get(&client, &url(&running, "/")).await.served_by(), "web-2");
    }
}

#[tokio::test]
async fn a_hanging_check_is_a_failure_at_the_timeout() {
    let nodes = webnodes(2).await;
    let running = balancer(&single_pool(
        "hc_hang",
        "round_robin",
        &nodes_as_backends(&nodes),
        &fast_checks("hc_hang"),
    ))
    .await;
    let web1 = node(&running, "web-1");
    wait_until("a first pass", || async {
        checks(&running, "hc_hang", "web-1", "pass").await >= 1.0
    })
    .await;
    // A 10 s "GC pause": the node accepts connections but answers nothing.
    let started = Instant::now();
    assert_eq!(
        send(
            &client(),
            node_control(&nodes[0], "/admin/pause?ms=10000", "")
        )
        .await
        .status,
        200
    );
    wait_until("hung checks take the node out", || async {
        web1.health() == Health::Down
    })
    .await;
    // fall × interval + timeout = 380 ms; allow for scheduling on a busy machine.
    let detected = started.elapsed();
    assert!(detected < Duration::from_secs(2), "took {detected:?}");
}

#[tokio::test]
async fn with_every_node_down_the_answer_is_503_in_under_100ms() {
    let nodes = webnodes(2).await;
    let running = balancer(&single_pool(
        "hc_all_down",
        "least_connections",
        &nodes_as_backends(&nodes),
        &fast_checks("hc_all_down"),
    ))
    .await;
    for n in &nodes {
        send(
            &client(),
            node_control(n, "/admin/health", r#"{"status":"DOWN"}"#),
        )
        .await;
    }
    let all = [node(&running, "web-1"), node(&running, "web-2")];
    wait_until("both nodes are down", || async {
        all.iter().all(|n| n.health() == Health::Down)
    })
    .await;
    let client = client();
    let mut times = Vec::new();
    for _ in 0..21 {
        let started = Instant::now();
        assert_eq!(get(&client, &url(&running, "/")).await.status, 503);
        times.push(started.elapsed());
    }
    times.sort();
    assert!(
        times[10] < Duration::from_millis(100),
        "median {:?}",
        times[10]
    );
    assert!(
        times[20] < Duration::from_secs(1),
        "slowest {:?}",
        times[20]
    );
}

#[tokio::test]
async fn a_node_added_later_waits_for_rise_passes() {
    let a = controlled("a").await;
    let late = controlled("late").await;
    let toml = single_pool(
        "hc_late",
        "round_robin",
        &[("a", a.backend.addr, 1)],
        &fast_checks("hc_late"),
    );
    let running = balancer(&toml).await;
    let with_late = single_pool(
        "hc_late",
        "round_robin",
        &[("a", a.backend.addr, 1), ("late", late.backend.addr, 1)],
        &fast_checks("hc_late"),
    );
    let config =
        fulcrum::config::Config::parse(std::path::Path::new("t.toml"), &with_late).unwrap();
    running.router().pools()[0].replace(&config.pools["hc_late"]);
    let late_node = node(&running, "late");
    assert_eq!(late_node.health(), Health::Pending);
    let client = client();
    for _ in 0..10 {
        assert_eq!(
            get(&client, &url(&running, "/")).await.served_by(),
            "a",
            "pending node got traffic"
        );
    }
    wait_until("three passes bring the newcomer in", || async {
        late_node.health() == Health::Up
    })
    .await;
    assert!(late.checks.load(Ordering::SeqCst) >= 3);
    let mut served = Vec::new();
    for _ in 0..4 {
        served.push(get(&client, &url(&running, "/")).await.served_by());
    }
    assert!(served.iter().any(|s| s == "late"), "{served:?}");
}
