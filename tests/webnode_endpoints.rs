//! Every `fulcrum webnode` endpoint over real loopback sockets: one fresh HTTP/1.1 connection per
//! request (so connection counts are predictable), nodes on `127.0.0.1:0`, no mocks.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fulcrum::webnode::{self, WebNode, WebNodeOptions};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(10);
const ADMIN_TOKEN: &str = "drill-token";

async fn node(id: &str) -> WebNode {
    let opts = WebNodeOptions::new("127.0.0.1:0".parse().expect("loopback address"), id)
        .with_admin_token(ADMIN_TOKEN);
    webnode::spawn(opts).await.expect("spawn web node")
}

/// Sends one request on a new HTTP/1.1 connection; the connection closes with the response.
async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Response<Incoming> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(body)).expect("request");
    sender.send_request(req).await.expect("response")
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("utf-8 body")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// Sends and reads the whole answer, checking the header every answer must carry.
async fn fetch(addr: SocketAddr, method: Method, path: &str, body: &'static [u8]) -> Reply {
    let resp = send(addr, method, path, &[], Bytes::from_static(body)).await;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    assert!(
        parts.headers.get("x-served-by").is_some(),
        "{path} answered without x-served-by"
    );
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    fetch(addr, Method::GET, path, b"").await
}

/// A control request (`POST /admin/...`) with the node's admin token.
async fn control(addr: SocketAddr, path: &str, body: &'static [u8]) -> Reply {
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let resp = send(
        addr,
        Method::POST,
        path,
        &[("authorization", &bearer)],
        Bytes::from_static(body),
    )
    .await;
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

/// Polls `/healthz` until `pred` holds on its JSON, or fails at the deadline.
async fn healthz_until(addr: SocketAddr, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let json = get(addr, "/healthz").await.json();
        if pred(&json) {
            return json;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {json}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn active_connections(json: &Value) -> u64 {
    json["systemMetrics"]["activeConnections"]
        .as_u64()
        .expect("activeConnections is a whole number")
}

#[tokio::test]
async fn root_answers_with_the_node_id() {
    let node = node("web-1").await;
    assert_ne!(node.local_addr().port(), 0);
    assert_eq!(node.id(), "web-1");
    let reply = get(node.local_addr(), "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-served-by"], "web-1");
    assert_eq!(reply.headers["content-type"], "text/plain");
    assert_eq!(reply.text(), "served by web-1\n");
    assert!(node.requests() >= 1);
    node.shutdown().await;
}

#[tokio::test]
async fn healthz_reports_the_seed_schema_and_counts_open_connections() {
    let node = node("web-h").await;
    let addr = node.local_addr();
    let reply = get(addr, "/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "application/json");
    let json = reply.json();
    let keys = |v: &Value| {
        v.as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&json).len(), 4, "{json}");
    assert_eq!(json["instanceId"], "web-h");
    assert_eq!(json["status"], "UP");
    let metrics = &json["systemMetrics"];
    assert_eq!(keys(metrics).len(), 3, "{json}");
    assert!(
        metrics["cpuUtilizationPercent"]
            .as_f64()
            .is_some_and(|c| c >= 0.0)
    );
    assert!(metrics["freeMemoryBytes"].is_u64());
    if cfg!(target_os = "linux") {
        assert!(metrics["freeMemoryBytes"].as_u64() > Some(0));
    }
    // The asking connection itself is open while it is answered.
    assert!(active_connections(&json) >= 1, "{json}");
    assert_eq!(
        json["dependencyStatus"],
        serde_json::json!({"databaseConnection": "NOT_CONFIGURED", "redisSessionCache": "NOT_CONFIGURED"})
    );

    // An idle open connection counts too, and stops counting once closed.
    let idle = TcpStream::connect(addr).await.expect("connect");
    healthz_until(addr, "the idle connection to count", |j| {
        active_connections(j) >= 2
    })
    .await;
    drop(idle);
    healthz_until(addr, "only the asking connection to count", |j| {
        active_connections(j) == 1
    })
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn admin_health_flips_what_healthz_answers() {
    let node = node("web-d").await;
    let addr = node.local_addr();
    assert_eq!(
        get(addr, "/admin/health").await.json(),
        serde_json::json!({"status": "UP"})
    );

    let down = control(addr, "/admin/health", br#"{"status":"DOWN"}"#).await;
    assert_eq!(down.status, StatusCode::OK);
    assert_eq!(down.json()["status"], "DOWN");
    let reply = get(addr, "/healthz").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["status"], "DOWN");
    assert_eq!(reply.json()["instanceId"], "web-d");
    assert_eq!(get(addr, "/admin/health").await.json()["status"], "DOWN");

    control(addr, "/admin/health", br#"{"status":"DRAINING"}"#).await;
    let reply = get(addr, "/healthz").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["status"], "DRAINING");

    for bad in [&b"{\"status\":\"SIDEWAYS\"}"[..], b"not json", b""] {
        let reply = control(addr, "/admin/health", bad).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert!(reply.json()["error"].is_string());
    }
    assert_eq!(get(addr, "/healthz").await.json()["status"], "DRAINING");

    control(addr, "/admin/health", br#"{"status":"UP"}"#).await;
    let reply = get(addr, "/healthz").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["status"], "UP");
    node.shutdown().await;
}

#[tokio::test]
async fn control_endpoints_need_the_admin_token_and_are_off_without_one() {
    let node = node("web-t").await;
    let addr = node.local_addr();
    for headers in [&[][..], &[("authorization", "Bearer wrong")][..]] {
        for path in ["/admin/health", "/admin/pause?ms=60000"] {
            let reply = send(
                addr,
                Method::POST,
                path,
                headers,
                Bytes::from_static(br#"{"status":"DOWN"}"#),
            )
            .await;
            assert_eq!(
                reply.status(),
                StatusCode::UNAUTHORIZED,
                "{path} {headers:?}"
            );
        }
    }
    // Nothing changed: still up, and not paused.
    let started = Instant::now();
    assert_eq!(get(addr, "/healthz").await.json()["status"], "UP");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A node started without --admin-token has no control endpoints at all.
    let closed = webnode::spawn(WebNodeOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        "web-closed",
    ))
    .await
    .unwrap();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let reply = send(
        closed.local_addr(),
        Method::POST,
        "/admin/health",
        &[("authorization", &bearer)],
        Bytes::from_static(br#"{"status":"DOWN"}"#),
    )
    .await;
    assert_eq!(reply.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        get(closed.local_addr(), "/healthz").await.json()["status"],
        "UP"
    );
    closed.shutdown().await;
    node.shutdown().await;
}

#[tokio::test]
async fn pause_stalls_requests_while_admin_stays_responsive() {
    let node = node("web-p").await;
    let addr = node.local_addr();
    let pause = Duration::from_millis(600);
    let started = Instant::now();
    let reply = control(addr, "/admin/pause?ms=600", b"").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), serde_json::json!({"paused_ms": 600}));

    let stalled = tokio::spawn(async move { (get(addr, "/").await.status, started.elapsed()) });
    let health =
        tokio::spawn(async move { (get(addr, "/healthz").await.status, started.elapsed()) });
    let admin = get(addr, "/admin/health").await;
    let admin_elapsed = started.elapsed();
    assert_eq!(admin.status, StatusCode::OK);
    assert!(
        admin_elapsed < pause,
        "admin waited out the pause: {admin_elapsed:?}"
    );
    assert!(
        !stalled.is_finished(),
        "a request was answered during the pause"
    );

    for task in [stalled, health] {
        let (status, elapsed) = task.await.expect("request task");
        assert_eq!(status, StatusCode::OK);
        assert!(
            elapsed >= pause,
            "answered after {elapsed:?}, inside the pause"
        );
    }
    let bad = control(addr, "/admin/pause", b"").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    node.shutdown().await;
}

#[tokio::test]
async fn slow_sleeps_for_the_asked_time() {
    let node = node("web-s").await;
    let addr = node.local_addr();
    let started = Instant::now();
    let reply = get(addr, "/slow?ms=150").await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "slept 150 ms\n");
    for bad in ["/slow", "/slow?ms=abc", "/slow?ms=-5", "/slow?ms="] {
        assert_eq!(
            get(addr, bad).await.status,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn bytes_streams_exactly_n_bytes() {
    let node = node("web-b").await;
    let addr = node.local_addr();
    let n: usize = 5_000_000;
    let resp = send(addr, Method::GET, "/bytes?n=5000000", &[], Bytes::new()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], "5000000");
    assert_eq!(resp.headers()["x-served-by"], "web-b");
    let mut body = resp.into_body();
    let (mut total, mut frames) = (0, 0);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            total += data.len();
            frames += 1;
        }
    }
    assert_eq!(total, n);
    assert!(frames > 1, "5 MB arrived in a single frame");

    let empty = get(addr, "/bytes?n=0").await;
    assert_eq!(empty.status, StatusCode::OK);
    assert!(empty.body.is_empty());
    let too_many = format!("/bytes?n={}", webnode::MAX_BYTES + 1);
    for bad in ["/bytes", "/bytes?n=lots", "/bytes?n=1e6", &too_many] {
        assert_eq!(
            get(addr, bad).await.status,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn echo_reports_what_arrived() {
    let node = node("web-e").await;
    let addr = node.local_addr();
    let body: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let expected_sha = format!("{:x}", Sha256::digest(&body));
    let headers = [("x-rep", "a"), ("x-one", "1"), ("x-rep", "b")];
    let resp = send(addr, Method::POST, "/echo?x=1", &headers, Bytes::from(body)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let json: Value =
        serde_json::from_slice(&resp.into_body().collect().await.expect("body").to_bytes())
            .expect("JSON");
    assert_eq!(json["method"], "POST");
    assert_eq!(json["path"], "/echo?x=1");
    assert_eq!(json["version"], "HTTP/1.1");
    assert_eq!(json["body_bytes"], 1024 * 1024);
    assert_eq!(json["body_sha256"], expected_sha);
    let received: Vec<(String, String)> =
        serde_json::from_value(json["headers"].clone()).expect("headers as pairs");
    let pair = |n: &str, v: &str| (n.to_owned(), v.to_owned());
    assert_eq!(received[0], pair("host", &addr.to_string()));
    let rep: Vec<_> = received.iter().filter(|(n, _)| n == "x-rep").collect();
    assert_eq!(rep, [&pair("x-rep", "a"), &pair("x-rep", "b")]);
    assert!(received.contains(&pair("x-one", "1")));
    assert!(received.contains(&pair("content-length", "1048576")));

    let empty = get(addr, "/echo").await.json();
    assert_eq!(empty["method"], "GET");
    assert_eq!(empty["body_bytes"], 0);
    assert_eq!(
        empty["body_sha256"],
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn status_answers_the_asked_code() {
    let node = node("web-c").await;
    let addr = node.local_addr();
    let reply = get(addr, "/status/418").await;
    assert_eq!(reply.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(reply.text(), "status 418\n");
    let reply = fetch(addr, Method::DELETE, "/status/503", b"").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.text(), "status 503\n");
    let reply = get(addr, "/status/204").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(reply.body.is_empty());
    for bad in ["/status/100", "/status/600", "/status/abc", "/status/"] {
        assert_eq!(
            get(addr, bad).await.status,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn unknown_paths_and_methods_are_404() {
    let node = node("web-n").await;
    let addr = node.local_addr();
    let reply = get(addr, "/nope").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.text(), "not found\n");
    assert_eq!(reply.headers["x-served-by"], "web-n");
    let reply = fetch(addr, Method::POST, "/healthz", b"").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    node.shutdown().await;
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let node = node("web-2").await;
    let stream = TcpStream::connect(node.local_addr())
        .await
        .expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let uri = format!("http://{}/echo", node.local_addr());
    let req = Request::get(uri)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.headers()["x-served-by"], "web-2");
    let json: Value =
        serde_json::from_slice(&resp.into_body().collect().await.expect("body").to_bytes())
            .expect("JSON");
    assert_eq!(json["version"], "HTTP/2.0");
    node.shutdown().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_refuses() {
    let node = node("web-x").await;
    let addr = node.local_addr();
    let in_flight = tokio::spawn(async move { get(addr, "/slow?ms=300").await });
    // Shut down only once the slow request is being served.
    let deadline = Instant::now() + DEADLINE;
    while node.requests() == 0 {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.shutdown().await;
    let reply = in_flight.await.expect("request task");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "slept 300 ms\n");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn healthz_cpu_figure_sees_this_process_working() {
    let node = node("web-cpu").await;
    // Keep one core busy for longer than the node's minimum 1 s sampling window.
    tokio::task::spawn_blocking(|| {
        let until = Instant::now() + Duration::from_millis(1200);
        let mut x: u64 = 0;
        while Instant::now() < until {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    })
    .await
    .expect("busy loop");
    let json = get(node.local_addr(), "/healthz").await.json();
    let cpu = json["systemMetrics"]["cpuUtilizationPercent"].as_f64();
    // One busy core is ~100 %; a loaded 2-core machine still gives it a good share.
    assert!(cpu.is_some_and(|c| c > 10.0), "{json}");
    node.shutdown().await;
}
