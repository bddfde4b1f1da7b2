//! Errors are answered, never hung: 503 with no backend, 502 on a refused connection, 504 on a
//! slow backend, 400 for malformed requests (which never reach a backend), 431 for oversized
//! heads, 413 over the body limit, 404 when no route matches. Each is counted.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::time::{Duration, Instant};

use fulcrum::Running;
use http::Request;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that counts whatever reaches it.
async fn counting_backend() -> Backend {
    backend(|_req| async { http::Response::new(full("reached")) }).await
}

#[tokio::test]
async fn no_backend_is_503_at_once_and_counted() {
    let running = balancer(&single_pool("err_503", "round_robin", &[], "")).await;
    let client = client();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let reply = get(&client, &url(&running, "/")).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(reply.status, 503);
        assert!(
            reply.text().contains("no routable backend"),
            "{}",
            reply.text()
        );
    }
    assert!(slowest < Duration::from_secs(1), "a 503 took {slowest:?}");
    let metrics = scrape(&running).await;
    let errors =
        "fulcrum_proxy_errors_total{pool=\"err_503\",backend=\"none\",kind=\"no_backend\"}";
    assert_eq!(series(&metrics, errors), Some(20.0), "{metrics}");
    let answered = "fulcrum_requests_total{pool=\"err_503\",backend=\"none\",code=\"503\"}";
    assert_eq!(series(&metrics, answered), Some(20.0), "{metrics}");
}

#[tokio::test]
async fn refused_connection_is_502_and_counted_as_connect() {
    // A port that was just free: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let running = balancer(&single_pool(
        "err_502",
        "round_robin",
        &[("gone", closed, 1)],
        "",
    ))
    .await;
    let reply = get(&client(), &url(&running, "/")).await;
    assert_eq!(reply.status, 502);
    let metrics = scrape(&running).await;
    let connect = "fulcrum_proxy_errors_total{pool=\"err_502\",backend=\"gone\",kind=\"connect\"}";
    assert_eq!(series(&metrics, connect), Some(1.0), "{metrics}");
    assert_eq!(
        series(
            &metrics,
            "fulcrum_requests_total{pool=\"err_502\",backend=\"gone\",code=\"502\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn backend_slower_than_response_timeout_is_504() {
    let nodes = webnodes(1).await;
    let running = balancer(&single_pool(
        "err_504",
        "round_robin",
        &nodes_as_backends(&nodes),
        "response_timeout = \"200ms\"",
    ))
    .await;
    let started = Instant::now();
    let reply = get(&client(), &url(&running, "/slow?ms=3000")).await;
    assert_eq!(reply.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        started.elapsed()
    );
    let metrics = scrape(&running).await;
    let timeout = "fulcrum_proxy_errors_total{pool=\"err_504\",backend=\"web-1\",kind=\"timeout\"}";
    assert_eq!(series(&metrics, timeout), Some(1.0), "{metrics}");
}

#[tokio::test]
async fn backend_that_closes_mid_response_is_502_reset() {
    // Accepts, reads the request, then closes without answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").await;
        }
    });
    let running = balancer(&single_pool(
        "err_reset",
        "round_robin",
        &[("rude", addr, 1)],
        "",
    ))
    .await;
    let reply = get(&client(), &url(&running, "/")).await;
    assert_eq!(reply.status, 502);
    let metrics = scrape(&running).await;
    let reset = "fulcrum_proxy_errors_total{pool=\"err_reset\",backend=\"rude\",kind=\"reset\"}";
    assert_eq!(series(&metrics, reset), Some(1.0), "{metrics}");
}

#[tokio::test]
async fn malformed_requests_get_400_and_never_reach_the_backend() {
    let backend = counting_backend().await;
    let running = balancer(&single_pool(
        "err_400",
        "round_robin",
        &[("b", backend.addr, 1)],
        "",
    ))
    .await;
    let addr = running.addr("http").unwrap();
    let malformed: [&[u8]; 5] = [
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /\x01path HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    ];
    for request in malformed {
        let response = raw(addr, request).await;
        assert!(
            response.starts_with("HTTP/1.1 400"),
            "{:?} got {response:?}",
            String::from_utf8_lossy(request)
        );
    }
    assert_eq!(
        backend.requests(),
        0,
        "a malformed request reached the backend"
    );
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_never_forwarded_ambiguously() {
    // RFC 9112 §6.1: Transfer-Encoding wins, Content-Length is dropped, and the connection is
    // closed after the response so nothing smuggled behind the body is read as a request.
    let nodes = webnodes(1).await;
    let running = balancer(&single_pool(
        "err_te_cl",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    let request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
        5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let response = raw(running.addr("http").unwrap(), request).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains("\"body_bytes\":5"),
        "the chunked body is the body: {response}"
    );
    assert!(!response.contains("content-length\",\"3"), "{response}");
    assert_eq!(
        response.matches("HTTP/1.1 ").count(),
        1,
        "the smuggled request was served: {response}"
    );
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let backend = counting_backend().await;
    let running = balancer(&single_pool(
        "err_431",
        "round_robin",
        &[("b", backend.addr, 1)],
        "",
    ))
    .await;
    let big = "a".repeat(70 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let response = raw(running.addr("http").unwrap(), request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response:.80}");
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn body_over_max_body_bytes_is_413() {
    let backend = counting_backend().await;
    let toml = single_pool("err_413", "round_robin", &[("b", backend.addr, 1)], "").replace(
        "bind = \"127.0.0.1:0\"\n[admin]",
        "bind = \"127.0.0.1:0\"\nmax_body_bytes = 1000\n[admin]",
    );
    let running = balancer(&toml).await;
    let req = Request::post(url(&running, "/"))
        .body(full(vec![b'x'; 1001]))
        .unwrap();
    assert_eq!(send(&client(), req).await.status, 413);
    assert_eq!(
        backend.requests(),
        0,
        "a declared oversize body is refused before any backend"
    );
    let req = Request::post(url(&running, "/"))
        .body(full(vec![b'x'; 1000]))
        .unwrap();
    assert_eq!(send(&client(), req).await.status, 200);
}

#[tokio::test]
async fn no_matching_route_is_404() {
    let backend = counting_backend().await;
    let toml = format!(
        "{}\n[[routes]]\nhost = \"api.example.com\"\npool = \"err_404\"\n",
        single_pool("err_404", "round_robin", &[("b", backend.addr, 1)], "")
    );
    let running = balancer(&toml).await;
    let req = Request::get(url(&running, "/"))
        .header("host", "www.example.com")
        .body(empty())
        .unwrap();
    assert_eq!(send(&client(), req).await.status, 404);
    let req = Request::get(url(&running, "/"))
        .header("host", "API.example.com:80")
        .body(empty())
        .unwrap();
    assert_eq!(send(&client(), req).await.status, 200);
    assert_eq!(backend.requests(), 1);
    let metrics = scrape(&running).await;
    assert!(
        series(
            &metrics,
            "fulcrum_requests_total{pool=\"none\",backend=\"none\",code=\"404\"}"
        )
        .is_some()
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_its_head_is_cut_off() {
    let (backend, running) = short_head_timeout("err_slowloris", "").await;
    let mut stream = TcpStream::connect(running.addr("http").unwrap())
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out))
        .await
        .expect("the balancer closes the connection")
        .ok();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
    assert_eq!(backend.requests(), 0);
}

/// A balancer whose listener has `header_read_timeout = "300ms"` (and `listener_extra`, whole
/// lines), in front of one counting backend.
async fn short_head_timeout(name: &str, listener_extra: &str) -> (Backend, Running) {
    let backend = counting_backend().await;
    let toml = single_pool(name, "round_robin", &[("b", backend.addr, 1)], "").replace(
        "bind = \"127.0.0.1:0\"\n[admin]",
        &format!(
            "bind = \"127.0.0.1:0\"\nheader_read_timeout = \"300ms\"\n{listener_extra}[admin]"
        ),
    );
    let running = balancer(&toml).await;
    (backend, running)
}

#[tokio::test]
async fn a_keep_alive_client_that_never_finishes_its_next_head_is_cut_off() {
    next_head_is_cut_off("err_slowloris_ka", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
}

#[tokio::test]
async fn after_a_request_with_a_body_a_next_head_that_never_finishes_is_cut_off() {
    next_head_is_cut_off(
        "err_slowloris_body",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
}

/// Sends `first` (answered 200), then starts the next head and trickles it a byte every
/// 50 ms: the connection is never quiet for long, so only the head's own deadline can end it.
async fn next_head_is_cut_off(name: &str, first: &[u8]) {
    let (backend, running) = short_head_timeout(name, "idle_timeout = \"30s\"\n").await;
    let mut stream = TcpStream::connect(running.addr("http").unwrap())
        .await
        .unwrap();
    stream.write_all(first).await.unwrap();
    let mut status = [0u8; 12];
    stream.read_exact(&mut status).await.unwrap();
    assert_eq!(&status, b"HTTP/1.1 200");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        while started.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if writer.write_all(b"a").await.is_err() {
                break;
            }
        }
        // Held open past the trickle: closing it would end the connection from this side.
        tokio::time::sleep(DEADLINE).await;
    });
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, reader.read_to_end(&mut rest))
        .await
        .expect("the balancer closes the connection")
        .ok();
    let closed = started.elapsed();
    trickle.abort();
    assert!(
        closed < Duration::from_secs(3),
        "closed after {closed:?}, header_read_timeout is 300 ms"
    );
    assert!(
        closed >= Duration::from_millis(150),
        "closed after {closed:?}, before header_read_timeout"
    );
    assert_eq!(backend.requests(), 1);
}

#[tokio::test]
async fn connect_is_refused_with_405() {
    let backend = counting_backend().await;
    let running = balancer(&single_pool(
        "err_405",
        "round_robin",
        &[("b", backend.addr, 1)],
        "",
    ))
    .await;
    let request = b"CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\nConnection: close\r\n\r\n";
    let response = raw(running.addr("http").unwrap(), request).await;
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert_eq!(backend.requests(), 0);
}
