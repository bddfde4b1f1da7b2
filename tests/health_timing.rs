//! When health checks run: a `timeout` longer than the `interval` is accepted and checks of a
//! node never overlap (the next starts when the previous one ended), and a reload that
//! shortens the interval applies at once, also to nodes added afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fulcrum::pool::Health;
use http::Method;
use serde_json::json;
use support::admin_api::{ConfigFile, api};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A raw HTTP/1.1 backend that answers every request `{"status":"UP"}` after `delay_ms`, and
/// counts the requests it holds at once. A request whose client hangs up (a check that timed
/// out) stops counting when the connection closes.
struct Stalling {
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    in_flight: Arc<AtomicU64>,
    max_in_flight: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

async fn stalling(delay: Duration) -> Stalling {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = Stalling {
        addr: listener.local_addr().unwrap(),
        delay_ms: Arc::new(AtomicU64::new(delay.as_millis() as u64)),
        in_flight: Arc::default(),
        max_in_flight: Arc::default(),
        requests: Arc::default(),
    };
    let counters = (
        backend.delay_ms.clone(),
        backend.in_flight.clone(),
        backend.max_in_flight.clone(),
        backend.requests.clone(),
    );
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(stream, counters.clone()));
        }
    });
    backend
}

type Counters = (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
);

async fn serve(mut stream: TcpStream, (delay_ms, in_flight, max, requests): Counters) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        // One request head (checks and GETs have no body).
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.clear();
        requests.fetch_add(1, Ordering::SeqCst);
        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(now, Ordering::SeqCst);
        let delay = Duration::from_millis(delay_ms.load(Ordering::SeqCst));
        let hung_up = tokio::select! {
            () = tokio::time::sleep(delay) => false,
            read = stream.read(&mut chunk) => matches!(read, Ok(0) | Err(_)),
        };
        in_flight.fetch_sub(1, Ordering::SeqCst);
        if hung_up {
            return;
        }
        let body = br#"{"status":"UP"}"#;
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err() || stream.write_all(body).await.is_err()
        {
            return;
        }
    }
}

#[tokio::test]
async fn checks_slower_than_the_interval_never_overlap_and_the_node_stays_up() {
    let pool = "ht_overlap";
    let slow = stalling(Duration::from_millis(250)).await;
    let health = format!(
        "[pools.{pool}.health]\ninterval = \"100ms\"\ntimeout = \"300ms\"\nfall = 2\nrise = 2\n"
    );
    let running = balancer(&single_pool(
        pool,
        "round_robin",
        &[("slow", slow.addr, 1)],
        &health,
    ))
    .await;
    let checks =
        format!("fulcrum_health_checks_total{{pool=\"{pool}\",backend=\"slow\",result=\"pass\"}}");
    wait_until("a passing check", || async {
        series(&scrape(&running).await, &checks).is_some_and(|n| n >= 1.0)
    })
    .await;
    let (start, before) = (Instant::now(), slow.requests.load(Ordering::SeqCst));
    wait_until("six more checks", || async {
        slow.requests.load(Ordering::SeqCst) - before >= 6
    })
    .await;
    let during = slow.requests.load(Ordering::SeqCst) - before;
    let elapsed = start.elapsed();
    assert_eq!(
        slow.max_in_flight.load(Ordering::SeqCst),
        1,
        "two checks of one node were in flight at once"
    );
    // Each check takes 250 ms, so at most one starts per 250 ms (not one per 100 ms interval).
    let at_most = elapsed.as_millis() as u64 / 250 + 1;
    assert!(during <= at_most, "{during} checks in {elapsed:?}");
    assert_eq!(node(&running, "slow").health(), Health::Up);
    assert_eq!(
        series(
            &scrape(&running).await,
            &checks.replace("result=\"pass\"", "result=\"fail\"")
        ),
        Some(0.0),
        "a slow check within its timeout is a pass"
    );
    // And it serves: the request stalls like a check would, then arrives.
    let reply = get(&client(), &url(&running, "/")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), r#"{"status":"UP"}"#);
}

#[tokio::test]
async fn a_check_that_times_out_ends_before_the_next_one_starts() {
    let pool = "ht_timeout";
    let hanging = stalling(Duration::from_secs(30)).await;
    let health = format!(
        "[pools.{pool}.health]\ninterval = \"50ms\"\ntimeout = \"200ms\"\nfall = 3\nrise = 2\n"
    );
    let running = balancer(&single_pool(
        pool,
        "round_robin",
        &[("hanging", hanging.addr, 1)],
        &health,
    ))
    .await;
    let started = Instant::now();
    let down = node(&running, "hanging");
    wait_until("three timed-out checks take the node out", || async {
        down.health() == Health::Down
    })
    .await;
    // Three checks of 200 ms each, back to back: not three 50 ms intervals.
    assert!(
        started.elapsed() >= Duration::from_millis(550),
        "down after {:?}",
        started.elapsed()
    );
    // The checks go on while the node is down: watch two more time out.
    let at_down = hanging.requests.load(Ordering::SeqCst);
    wait_until("two more checks", || async {
        hanging.requests.load(Ordering::SeqCst) >= at_down + 2
    })
    .await;
    assert_eq!(
        hanging.max_in_flight.load(Ordering::SeqCst),
        1,
        "a check started while a timed-out one was still open"
    );
}

#[tokio::test]
async fn a_reloaded_short_interval_brings_a_node_added_later_up_in_a_few_intervals() {
    let pool = "ht_reload";
    let nodes = webnodes(2).await;
    let config = |interval: &str, timeout: &str| {
        single_pool(
            pool,
            "round_robin",
            &nodes_as_backends(&nodes[..1]),
            &format!(
                "[pools.{pool}.health]\ninterval = \"{interval}\"\ntimeout = \"{timeout}\"\nrise = 2\n"
            ),
        )
    };
    let file = ConfigFile::new("ht-reload", &config("5s", "1s"));
    let running = fulcrum::start_file(file.path()).await.unwrap();
    // Let the supervisor settle into its 5 s wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    file.write(&config("100ms", "80ms"));
    let (status, body) = api(&running, Method::POST, "/api/reload", None, None).await;
    assert_eq!(status, 200, "{body}");

    let added = Instant::now();
    let (status, body) = api(
        &running,
        Method::POST,
        &format!("/api/pools/{pool}/backends"),
        Some(json!({ "name": "web-2", "address": nodes[1].local_addr().to_string() })),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let web2 = node(&running, "web-2");
    wait_until("web-2 passes its rise checks", || async {
        web2.health() == Health::Up
    })
    .await;
    // First check within one interval, then one more: about 300 ms; never the old 5 s.
    assert!(
        added.elapsed() < Duration::from_millis(1500),
        "web-2 came up after {:?}",
        added.elapsed()
    );
}
