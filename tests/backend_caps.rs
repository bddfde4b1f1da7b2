//! Per-backend connection caps: a node with `max_connections` never has more requests in flight
//! than that, whatever the clients do (HTTP/2 streams included); a request with nowhere to go
//! waits in the pool's FIFO queue for up to `queue_timeout`, then gets 503.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fulcrum::Running;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use support::*;
use tokio::net::TcpStream;

/// A pool whose backends each carry their own `max_connections` (none when `None`).
fn capped_pool(
    pool: &str,
    strategy: &str,
    backends: &[(&str, SocketAddr, Option<u32>)],
    extra: &str,
) -> String {
    let backends: Vec<String> = backends
        .iter()
        .map(|(name, addr, cap)| match cap {
            Some(cap) => {
                format!("{{ name = \"{name}\", address = \"{addr}\", max_connections = {cap} }}")
            }
            None => format!("{{ name = \"{name}\", address = \"{addr}\" }}"),
        })
        .collect();
    format!(
        r#"
shutdown_grace = "5s"
[[listeners]]
name = "http"
bind = "127.0.0.1:0"
[admin]
bind = "127.0.0.1:0"
[pools.{pool}]
strategy = "{strategy}"
backends = [{}]
{extra}
"#,
        backends.join(", ")
    )
}

/// Requests a backend is handling right now, and the most it ever handled at once.
#[derive(Default)]
struct Concurrency {
    now: AtomicUsize,
    max: AtomicUsize,
}

/// A backend that holds every request for `delay` and records how many it holds at once. The
/// web node counts connections, not requests in progress; this counts exactly what a cap
/// limits, at the backend, where it matters. Health checks answer at once and are not counted.
async fn counting_backend(delay: Duration) -> (Backend, Arc<Concurrency>) {
    let concurrency = Arc::new(Concurrency::default());
    let seen = concurrency.clone();
    let backend = backend(move |req| {
        let seen = seen.clone();
        async move {
            let health_check = req
                .headers()
                .get(http::header::USER_AGENT)
                .is_some_and(|ua| ua == "fulcrum-health");
            if !health_check {
                let now = seen.now.fetch_add(1, Ordering::SeqCst) + 1;
                seen.max.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                seen.now.fetch_sub(1, Ordering::SeqCst);
            }
            Response::new(full("ok\n"))
        }
    })
    .await;
    (backend, concurrency)
}

async fn queue_depth(running: &Running, pool: &str) -> Option<f64> {
    series(
        &scrape(running).await,
        &format!("fulcrum_pool_queue_depth{{pool=\"{pool}\"}}"),
    )
}

/// Sends `n` GETs at once, each on its own task, and returns their replies.
async fn concurrent_gets(target: &str, n: usize) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let target = target.to_owned();
            tokio::spawn(async move { get(&client(), &target).await })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.expect("request task"));
    }
    replies
}

#[tokio::test]
async fn six_slow_requests_through_a_cap_of_2_never_put_more_than_2_in_flight_and_all_succeed() {
    let (backend, concurrency) = counting_backend(Duration::from_millis(300)).await;
    let running = balancer(&capped_pool(
        "caps_six",
        "round_robin",
        &[("only", backend.addr, Some(2))],
        "",
    ))
    .await;
    let node = node(&running, "only");
    assert_eq!(node.cap(), Some(2));
    assert!(
        !node.idle.is_allocated(),
        "no idle slots before any request"
    );

    let started = Instant::now();
    let replies = concurrent_gets(&url(&running, "/"), 6).await;
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(backend.requests(), 6);
    assert_eq!(
        concurrency.max.load(Ordering::SeqCst),
        2,
        "the backend never held more than the cap, and the cap was used"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(850),
        "three rounds of two: {:?}",
        started.elapsed()
    );
    assert_eq!(node.in_flight(), 0);
    assert!(
        node.idle.len() <= 2 && node.idle.capacity() == 2,
        "idle connections are bounded by the cap: {} of {}",
        node.idle.len(),
        node.idle.capacity()
    );
}

#[tokio::test]
async fn with_the_cap_full_a_request_gets_503_after_queue_timeout_counted_as_queue_timeout() {
    let nodes = webnodes(1).await;
    let running = balancer(&single_pool(
        "caps_timeout",
        "round_robin",
        &nodes_as_backends(&nodes),
        "max_connections_per_backend = 1\nqueue_timeout = \"200ms\"",
    ))
    .await;
    let node = node(&running, "web-1");
    let slow = tokio::spawn(get_owned(url(&running, "/slow?ms=1000")));
    wait_until("the slow request fills the cap", || async {
        node.in_flight() == 1
    })
    .await;

    let started = Instant::now();
    let reply = get(&client(), &url(&running, "/")).await;
    let waited = started.elapsed();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_millis(800),
        "answered at queue_timeout, not when the slow request ended: {waited:?}"
    );
    let metrics = scrape(&running).await;
    let errors =
        "fulcrum_proxy_errors_total{pool=\"caps_timeout\",backend=\"none\",kind=\"queue_timeout\"}";
    assert_eq!(series(&metrics, errors), Some(1.0), "{metrics}");
    let answered = "fulcrum_requests_total{pool=\"caps_timeout\",backend=\"none\",code=\"503\"}";
    assert_eq!(series(&metrics, answered), Some(1.0), "{metrics}");

    assert_eq!(
        slow.await.unwrap().status,
        200,
        "the request holding the place is unharmed"
    );
    assert_eq!(
        node.failures(),
        0,
        "a full queue is not the backend's failure"
    );
}

#[tokio::test]
async fn queue_depth_counts_the_waiting_requests_and_returns_to_0() {
    let nodes = webnodes(1).await;
    let running = balancer(&single_pool(
        "caps_depth",
        "round_robin",
        &nodes_as_backends(&nodes),
        "max_connections_per_backend = 1",
    ))
    .await;
    let node = node(&running, "web-1");
    assert_eq!(queue_depth(&running, "caps_depth").await, Some(0.0));
    let slow = tokio::spawn(get_owned(url(&running, "/slow?ms=800")));
    wait_until("the slow request fills the cap", || async {
        node.in_flight() == 1
    })
    .await;
    let waiting: Vec<_> = (0..2)
        .map(|_| tokio::spawn(get_owned(url(&running, "/"))))
        .collect();
    wait_until("both requests wait in the queue", || async {
        queue_depth(&running, "caps_depth").await == Some(2.0)
    })
    .await;
    for request in waiting {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(queue_depth(&running, "caps_depth").await, Some(0.0));
}

#[tokio::test]
async fn when_one_capped_node_is_full_new_requests_go_to_the_other_instead_of_waiting() {
    let nodes = webnodes(2).await;
    let running = balancer(&single_pool(
        "caps_spill",
        "round_robin",
        &nodes_as_backends(&nodes),
        "max_connections_per_backend = 1",
    ))
    .await;
    let slow = tokio::spawn(get_owned(url(&running, "/slow?ms=1500")));
    let (web1, web2) = (node(&running, "web-1"), node(&running, "web-2"));
    wait_until("the slow request fills one node", || async {
        web1.in_flight() + web2.in_flight() == 1
    })
    .await;
    let free = if web1.in_flight() == 1 {
        "web-2"
    } else {
        "web-1"
    };

    for _ in 0..6 {
        let started = Instant::now();
        let reply = get(&client(), &url(&running, "/")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.served_by(), free, "the full node is skipped");
        assert!(
            started.elapsed() < Duration::from_millis(700),
            "served at once, not queued: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(slow.await.unwrap().status, 200);
}

#[tokio::test]
async fn a_sticky_user_whose_node_is_full_waits_for_it_instead_of_being_rerouted() {
    let nodes = webnodes(2).await;
    let running = balancer(&single_pool(
        "caps_sticky",
        "sticky_cookie",
        &nodes_as_backends(&nodes),
        "max_connections_per_backend = 1\n[pools.caps_sticky.sticky]\nsecret = \"s3cret\"",
    ))
    .await;
    let first = get(&client(), &url(&running, "/")).await;
    let home = first.served_by();
    let cookie = first.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let with_cookie = |path: &str| {
        Request::get(url(&running, path))
            .header("cookie", cookie.clone())
            .body(empty())
            .unwrap()
    };

    // The user's own slow request fills their node.
    let slow_request = with_cookie("/slow?ms=800");
    let slow = tokio::spawn(async move { send(&client(), slow_request).await });
    let home_node = node(&running, &home);
    wait_until("the slow request fills the user's node", || async {
        home_node.in_flight() == 1
    })
    .await;
    let slow_started = Instant::now();

    // A new user is placed on the other node at once.
    let stranger = get(&client(), &url(&running, "/")).await;
    assert_eq!(stranger.status, 200);
    assert_ne!(
        stranger.served_by(),
        home,
        "a new user goes to the node with room"
    );

    let reply = send(&client(), with_cookie("/")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.served_by(), home, "served by their own node");
    assert!(
        reply.headers.get("set-cookie").is_none(),
        "the cookie stands"
    );
    assert!(
        slow_started.elapsed() >= Duration::from_millis(500),
        "it waited for the slow request to end: {:?}",
        slow_started.elapsed()
    );
    assert_eq!(slow.await.unwrap().served_by(), home);
    let metrics = scrape(&running).await;
    let rerouted = "fulcrum_sticky_total{pool=\"caps_sticky\",outcome=\"rerouted\"}";
    assert_eq!(series(&metrics, rerouted), None, "{metrics}");
}

#[tokio::test]
async fn an_ip_hash_client_whose_node_is_full_waits_for_that_node() {
    let nodes = webnodes(2).await;
    let running = balancer(&single_pool(
        "caps_hash",
        "ip_hash",
        &nodes_as_backends(&nodes),
        "max_connections_per_backend = 1",
    ))
    .await;
    // Every request of this test comes from 127.0.0.1: one client, one node.
    let home = get(&client(), &url(&running, "/")).await.served_by();
    let home_node = node(&running, &home);
    let slow = tokio::spawn(get_owned(url(&running, "/slow?ms=800")));
    wait_until("the slow request fills the client's node", || async {
        home_node.in_flight() == 1
    })
    .await;
    let slow_started = Instant::now();

    let reply = get(&client(), &url(&running, "/")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.served_by(), home, "the hashed node, not the idle one");
    assert!(
        slow_started.elapsed() >= Duration::from_millis(500),
        "it waited for the slow request to end: {:?}",
        slow_started.elapsed()
    );
    assert_eq!(slow.await.unwrap().served_by(), home);
}

/// One HTTP/2 connection to the balancer's cleartext listener (prior knowledge).
async fn h2_connection(running: &Running) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(running.addr("http").unwrap())
        .await
        .unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    sender
}

#[tokio::test]
async fn eight_http2_streams_on_one_connection_stay_within_a_cap_of_2() {
    let (backend, concurrency) = counting_backend(Duration::from_millis(200)).await;
    let running = balancer(&capped_pool(
        "caps_h2",
        "least_connections",
        &[("only", backend.addr, Some(2))],
        "",
    ))
    .await;
    let sender = h2_connection(&running).await;
    let target = url(&running, "/");
    let streams: Vec<_> = (0..8)
        .map(|_| {
            let mut sender = sender.clone();
            let request = Request::get(&target).body(Full::new(Bytes::new())).unwrap();
            tokio::spawn(async move {
                let response = sender.send_request(request).await.expect("a response");
                collect(response).await
            })
        })
        .collect();
    for stream in streams {
        let reply = tokio::time::timeout(DEADLINE, stream)
            .await
            .expect("within the deadline")
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(backend.requests(), 8);
    assert_eq!(
        concurrency.max.load(Ordering::SeqCst),
        2,
        "8 streams of one connection never held more than 2 backend requests"
    );
}

#[tokio::test]
async fn a_client_that_leaves_the_queue_does_not_hold_up_the_next_one() {
    let nodes = webnodes(1).await;
    let running = balancer(&single_pool(
        "caps_leave",
        "round_robin",
        &nodes_as_backends(&nodes),
        "max_connections_per_backend = 1\nqueue_timeout = \"5s\"",
    ))
    .await;
    let node = node(&running, "web-1");
    let slow = tokio::spawn(get_owned(url(&running, "/slow?ms=700")));
    wait_until("the slow request fills the cap", || async {
        node.in_flight() == 1
    })
    .await;

    // The first in line is an HTTP/2 stream its client will reset.
    let mut sender = h2_connection(&running).await;
    let request = Request::get(url(&running, "/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let leaving = tokio::spawn(async move { sender.send_request(request).await.map(drop) });
    let depth = |want: f64| {
        let running = &running;
        async move { queue_depth(running, "caps_leave").await == Some(want) }
    };
    wait_until("the leaving request waits", || depth(1.0)).await;
    let next = tokio::spawn(get_owned(url(&running, "/")));
    wait_until("the next request waits behind it", || depth(2.0)).await;
    let next_started = Instant::now();

    leaving.abort();
    wait_until("the reset stream left the line", || depth(1.0)).await;

    let reply = next.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        next_started.elapsed() < Duration::from_millis(2500),
        "served when the slow request ended, not at queue_timeout: {:?}",
        next_started.elapsed()
    );
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(queue_depth(&running, "caps_leave").await, Some(0.0));
    assert_eq!(node.in_flight(), 0);
}

async fn api(
    running: &Running,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let admin = running.admin_addr().expect("admin listener");
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .header("content-type", "application/json");
    let body = body.map_or_else(empty, |value| full(value.to_string()));
    let reply = send(&client(), request.body(body).unwrap()).await;
    let value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.status, value)
}

fn backend_named<'a>(pool: &'a Value, name: &str) -> &'a Value {
    pool["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no backends in {pool}"))
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name} in {pool}"))
}

#[tokio::test]
async fn the_admin_api_takes_max_connections_and_reports_each_nodes_cap() {
    let nodes = webnodes(3).await;
    let running = balancer(&capped_pool(
        "caps_api",
        "round_robin",
        &[
            ("own", nodes[0].local_addr(), Some(7)),
            ("default", nodes[1].local_addr(), None),
        ],
        "",
    ))
    .await;
    let (status, body) = api(&running, Method::GET, "/api/pools", None).await;
    assert_eq!(status, 200);
    let pool = &body["pools"]["caps_api"];
    assert_eq!(backend_named(pool, "own")["max_connections"], 7);
    assert!(
        backend_named(pool, "default")
            .get("max_connections")
            .is_none(),
        "an uncapped node has no max_connections: {pool}"
    );

    let added = json!({"address": nodes[2].local_addr().to_string(), "name": "added", "max_connections": 3});
    let (status, pool) = api(
        &running,
        Method::POST,
        "/api/pools/caps_api/backends",
        Some(added),
    )
    .await;
    assert_eq!(status, 200, "{pool}");
    assert_eq!(backend_named(&pool, "added")["max_connections"], 3);
    let (_, body) = api(&running, Method::GET, "/api/pools", None).await;
    assert_eq!(
        backend_named(&body["pools"]["caps_api"], "added")["max_connections"],
        3
    );
    assert_eq!(node(&running, "added").cap(), Some(3));

    for bad in [0, 1_000_001, u64::MAX] {
        let spec = json!({"address": "127.0.0.1:1", "name": "bad", "max_connections": bad});
        let (status, body) = api(
            &running,
            Method::POST,
            "/api/pools/caps_api/backends",
            Some(spec),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("max_connections"),
            "{body}"
        );
    }
}

async fn get_owned(target: String) -> Reply {
    get(&client(), &target).await
}
