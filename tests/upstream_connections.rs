//! fulcrum's own HTTP/1.1 connections to backends (src/upstream/mod.rs): kept per node and
//! reused, cooled to a bare socket when idle and warmed again on the same TCP connection,
//! replaced without a failed request when the backend closed one while it sat idle, and closed
//! once idle for `idle_pool_timeout`.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A backend that counts the connections fulcrum's proxied requests arrive on (health checks
/// use connections of their own and are left out).
struct ConnCountingBackend {
    addr: SocketAddr,
    /// Connections that carried at least one proxied request.
    opened: Arc<AtomicU64>,
    /// Of those, the ones still open.
    open: Arc<AtomicU64>,
}

async fn conn_counting_backend() -> ConnCountingBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (opened, open) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (opened_count, open_count) = (opened.clone(), open.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (opened, open) = (opened_count.clone(), open_count.clone());
            tokio::spawn(async move {
                let proxied = Arc::new(AtomicBool::new(false));
                let seen = proxied.clone();
                let (opened_here, open_here) = (opened.clone(), open.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let health = req
                        .headers()
                        .get(http::header::USER_AGENT)
                        .is_some_and(|ua| ua == "fulcrum-health");
                    if !health && !seen.swap(true, Ordering::SeqCst) {
                        opened_here.fetch_add(1, Ordering::SeqCst);
                        open_here.fetch_add(1, Ordering::SeqCst);
                    }
                    async { Ok::<_, Infallible>(Response::new(full("ok"))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if proxied.load(Ordering::SeqCst) {
                    open.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    });
    ConnCountingBackend { addr, opened, open }
}

/// A backend whose keep-alive timeout fires right after each response: it answers as if the
/// connection stayed open (no `Connection: close`), then closes it. Returns its address and
/// the count of connections it accepted.
async fn closing_backend() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn sequential_requests_reuse_one_backend_connection() {
    let backend = conn_counting_backend().await;
    let config = single_pool(
        "reuse",
        "round_robin",
        &[("only", backend.addr, 1)],
        "[pools.reuse.health]\ninterval = \"1h\"",
    );
    let running = balancer(&config).await;
    let client = client();
    for _ in 0..50 {
        let reply = get(&client, &url(&running, "/")).await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(backend.opened.load(Ordering::SeqCst), 1);
    assert_eq!(
        running.router().pools()[0].snapshot().backends[0]
            .node
            .idle
            .len(),
        1
    );
}

#[tokio::test]
async fn a_backend_closing_idle_connections_costs_no_request() {
    let (addr, accepted) = closing_backend().await;
    let config = single_pool(
        "closing",
        "round_robin",
        &[("only", addr, 1)],
        "retries = 0\n[pools.closing.health]\ninterval = \"1h\"",
    );
    let running = balancer(&config).await;
    let client = client();
    for i in 0..40 {
        let reply = get(&client, &url(&running, "/")).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
        // Every other request right away, racing the close; the rest once it has landed.
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 40);
}

#[tokio::test]
async fn idle_connections_close_after_idle_pool_timeout() {
    let backend = conn_counting_backend().await;
    let config = single_pool(
        "expiry",
        "round_robin",
        &[("only", backend.addr, 1)],
        "idle_pool_timeout = \"300ms\"\n[pools.expiry.health]\ninterval = \"100ms\"",
    );
    let running = balancer(&config).await;
    let client = client();
    for _ in 0..3 {
        assert_eq!(get(&client, &url(&running, "/")).await.status, 200);
    }
    assert_eq!(backend.open.load(Ordering::SeqCst), 1);
    wait_until("the idle connections are closed", || async {
        backend.open.load(Ordering::SeqCst) == 0
    })
    .await;
    // And the next request simply opens a new one.
    assert_eq!(get(&client, &url(&running, "/")).await.status, 200);
    assert_eq!(backend.open.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_idle_connection_goes_cold_and_the_next_request_reuses_its_socket() {
    let backend = conn_counting_backend().await;
    let config = single_pool(
        "cold",
        "round_robin",
        &[("only", backend.addr, 1)],
        "[pools.cold.health]\ninterval = \"1h\"",
    );
    let running = balancer(&config).await;
    let node = running.router().pools()[0].snapshot().backends[0]
        .node
        .clone();
    let client = client();
    for round in 0..3 {
        assert_eq!(get(&client, &url(&running, "/")).await.status, 200);
        // Warm right after the response, then only its socket once it has idled.
        wait_until("the idle connection goes cold", || async {
            node.idle.cold_len() == 1 && node.idle.len() == 1
        })
        .await;
        assert_eq!(
            backend.opened.load(Ordering::SeqCst),
            1,
            "round {round}: one TCP connection, warmed again for each request"
        );
    }
    assert_eq!(backend.open.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_cold_connection_the_backend_closed_costs_no_request() {
    let (addr, accepted) = closing_backend().await;
    let config = single_pool(
        "cold_closing",
        "round_robin",
        &[("only", addr, 1)],
        "retries = 0\n[pools.cold_closing.health]\ninterval = \"1h\"",
    );
    let running = balancer(&config).await;
    let node = running.router().pools()[0].snapshot().backends[0]
        .node
        .clone();
    let client = client();
    for i in 0..5 {
        let reply = get(&client, &url(&running, "/")).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
        // Long enough to go cold (or be seen closed on the way): the next request must not
        // be sent over the dead socket.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(node.idle.len() <= 1);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
}
