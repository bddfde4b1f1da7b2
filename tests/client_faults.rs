//! A client's fault is the client's: a body that breaks its framing, outgrows `max_body_bytes`,
//! stalls or is abandoned is answered `400`/`413`/`408` (or, for a client that left, just
//! counted) in `fulcrum_client_errors_total`, never in `fulcrum_proxy_errors_total` nor against
//! the node. `response_timeout` starts once the upload is done, and a connection that sends
//! nothing is closed at `header_read_timeout`. Over HTTP/1.1, HTTP/2 to the listener, and
//! through `h2c` pools.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fulcrum::Running;
use fulcrum::webnode::WebNode;
use http::Request;
use http_body_util::BodyExt;
use http_body_util::channel::Channel;
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One web node behind a balancer whose listener and pool are both called `name` (so the
/// test's series are its own), with `listener_extra` in the listener's table and `pool_extra`
/// in the pool's.
async fn setup(name: &str, listener_extra: &str, pool_extra: &str) -> (Running, Vec<WebNode>) {
    let nodes = webnodes(1).await;
    let toml = single_pool(name, "round_robin", &nodes_as_backends(&nodes), pool_extra).replace(
        "name = \"http\"\nbind = \"127.0.0.1:0\"\n",
        &format!("name = \"{name}\"\nbind = \"127.0.0.1:0\"\n{listener_extra}\n"),
    );
    (balancer(&toml).await, nodes)
}

async fn client_errors(running: &Running, listener: &str, kind: &str) -> f64 {
    let metrics = scrape(running).await;
    let name = format!("fulcrum_client_errors_total{{listener=\"{listener}\",kind=\"{kind}\"}}");
    series(&metrics, &name).unwrap_or(0.0)
}

async fn wait_for_client_error(running: &Running, listener: &str, kind: &str) {
    wait_until(
        &format!("{listener} counts a {kind} client error"),
        || async { client_errors(running, listener, kind).await >= 1.0 },
    )
    .await;
    assert_eq!(client_errors(running, listener, kind).await, 1.0);
}

/// The node kept its record clean: no failure, no cool-off, no proxy error in its pool.
async fn assert_unblamed(running: &Running, pool: &str) {
    let web = node(running, "web-1");
    assert_eq!(web.failures(), 0, "the node was blamed");
    assert!(
        web.is_routable() && !web.is_cooling(),
        "the node left routing"
    );
    let metrics = scrape(running).await;
    let blamed: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("fulcrum_proxy_errors_total{{pool=\"{pool}\"")))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert!(blamed.is_empty(), "counted as proxy errors: {blamed:?}");
}

/// Writes `request` on a new connection and returns the answer read until the balancer closes.
async fn raw_to(running: &Running, listener: &str, request: &[u8]) -> String {
    raw(running.addr(listener).unwrap(), request).await
}

fn assert_closing_answer(response: &str, status: &str) {
    assert!(
        response.starts_with(&format!("HTTP/1.1 {status}")),
        "expected {status}: {response:?}"
    );
    assert!(
        response
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "no Connection: close: {response:?}"
    );
}

#[tokio::test]
async fn a_bad_chunk_size_is_the_clients_fault_not_the_backends() {
    let (running, _nodes) = setup("cf_chunk_size", "", "").await;
    let request = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
        5\r\nhello\r\nzz\r\nmore\r\n0\r\n\r\n";
    let response = raw_to(&running, "cf_chunk_size", request).await;
    assert_closing_answer(&response, "400");
    wait_for_client_error(&running, "cf_chunk_size", "malformed").await;
    assert_unblamed(&running, "cf_chunk_size").await;
}

#[tokio::test]
async fn a_chunk_without_its_crlf_is_the_clients_fault() {
    let (running, _nodes) = setup("cf_chunk_crlf", "", "").await;
    let request = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
        5\r\nhelloXX0\r\n\r\n";
    let response = raw_to(&running, "cf_chunk_crlf", request).await;
    assert_closing_answer(&response, "400");
    wait_for_client_error(&running, "cf_chunk_crlf", "malformed").await;
    assert_unblamed(&running, "cf_chunk_crlf").await;
}

#[tokio::test]
async fn a_chunked_body_past_max_body_bytes_is_413_and_the_clients() {
    let (running, _nodes) = setup("cf_too_large", "max_body_bytes = 1000", "").await;
    let chunk = format!("320\r\n{}\r\n", "x".repeat(0x320));
    let request = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    let response = raw_to(&running, "cf_too_large", request.as_bytes()).await;
    assert_closing_answer(&response, "413");
    wait_for_client_error(&running, "cf_too_large", "too_large").await;
    assert_unblamed(&running, "cf_too_large").await;
}

/// Collects what the balancer logs at warning level and above while the guard lives (the
/// test's runtime is single-threaded, so every task logs on this thread).
fn capture_warnings() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = Sink(logs.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || sink.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_upload_is_counted_as_aborted() {
    let (logs, _guard) = capture_warnings();
    let (running, _nodes) = setup("cf_aborted", "", "").await;
    let mut stream = TcpStream::connect(running.addr("cf_aborted").unwrap())
        .await
        .unwrap();
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    stream.write_all(&[b'x'; 50]).await.unwrap();
    let web = node(&running, "web-1");
    wait_until("the upload reaches the node", || async {
        web.in_flight() == 1
    })
    .await;
    drop(stream);
    wait_for_client_error(&running, "cf_aborted", "aborted").await;
    wait_until("the request is over", || async { web.in_flight() == 0 }).await;
    assert_unblamed(&running, "cf_aborted").await;
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(
        !logs.contains("upstream request failed"),
        "a client's abort was logged as a backend failure:\n{logs}"
    );
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn response_timeout_starts_when_the_upload_is_done() {
    let (running, _nodes) = setup("cf_slow_upload", "", "response_timeout = \"500ms\"").await;
    let (mut tx, body) = Channel::<Bytes, Box<dyn std::error::Error + Send + Sync>>::new(1);
    let request = Request::post(url_of(&running, "cf_slow_upload", "/echo"))
        .body(body.boxed())
        .unwrap();
    let chunk = Bytes::from(vec![b'u'; 1000]);
    let trickle = tokio::spawn(async move {
        for _ in 0..15 {
            tx.send_data(chunk.clone()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let started = Instant::now();
    let reply = send(&client(), request).await;
    trickle.await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "answered after {:?}, before the upload ended",
        started.elapsed()
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echo: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(echo["body_bytes"], 15_000);
    assert_eq!(echo["body_sha256"], hex_sha256(&[b'u'; 15_000]));
    assert_unblamed(&running, "cf_slow_upload").await;
}

fn url_of(running: &Running, listener: &str, path: &str) -> String {
    format!("http://{}{path}", running.addr(listener).unwrap())
}

#[tokio::test]
async fn a_stalled_upload_is_408_after_the_listeners_idle_timeout() {
    let (running, _nodes) = setup("cf_stalled", "idle_timeout = \"300ms\"", "").await;
    let mut stream = TcpStream::connect(running.addr("cf_stalled").unwrap())
        .await
        .unwrap();
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out))
        .await
        .expect("the balancer answers a stalled upload")
        .unwrap();
    let stalled = started.elapsed();
    let response = String::from_utf8_lossy(&out);
    assert_closing_answer(&response, "408");
    assert!(
        stalled >= Duration::from_millis(300) && stalled < Duration::from_secs(3),
        "answered after {stalled:?}"
    );
    wait_for_client_error(&running, "cf_stalled", "timeout").await;
    assert_unblamed(&running, "cf_stalled").await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_header_read_timeout_and_not_counted() {
    let (running, _nodes) = setup(
        "cf_silent",
        "header_read_timeout = \"300ms\"\nidle_timeout = \"10s\"",
        "",
    )
    .await;
    let mut stream = TcpStream::connect(running.addr("cf_silent").unwrap())
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out))
        .await
        .expect("the balancer closes a silent connection")
        .ok();
    let closed = started.elapsed();
    assert!(
        closed >= Duration::from_millis(300) && closed < Duration::from_secs(3),
        "closed after {closed:?}"
    );
    assert!(out.is_empty(), "{:?}", String::from_utf8_lossy(&out));
    assert_eq!(client_errors(&running, "cf_silent", "timeout").await, 0.0);

    // A partial head is held to the same clock from accept, and is a client's timeout.
    let mut stream = TcpStream::connect(running.addr("cf_silent").unwrap())
        .await
        .unwrap();
    let started = Instant::now();
    stream.write_all(b"GET / HT").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out))
        .await
        .expect("the balancer closes a connection with a partial head")
        .ok();
    let closed = started.elapsed();
    assert!(closed < Duration::from_secs(3), "closed after {closed:?}");
    wait_for_client_error(&running, "cf_silent", "timeout").await;
}

#[tokio::test]
async fn heads_hyper_refuses_are_counted_as_client_errors() {
    let (running, _nodes) = setup("cf_heads", "", "").await;
    let response = raw_to(
        &running,
        "cf_heads",
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    wait_for_client_error(&running, "cf_heads", "malformed").await;

    let big = "a".repeat(70 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let response = raw_to(&running, "cf_heads", request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response:.80}");
    wait_for_client_error(&running, "cf_heads", "too_large").await;

    // Connections that end between requests are not errors.
    let reply = get(&client(), &url_of(&running, "cf_heads", "/")).await;
    assert_eq!(reply.status, 200);
    let mut stream = TcpStream::connect(running.addr("cf_heads").unwrap())
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    drop(stream);
    let metrics = scrape(&running).await;
    for kind in ["malformed", "too_large", "aborted", "timeout"] {
        let want = if matches!(kind, "malformed" | "too_large") {
            1.0
        } else {
            0.0
        };
        let name = format!("fulcrum_client_errors_total{{listener=\"cf_heads\",kind=\"{kind}\"}}");
        assert_eq!(series(&metrics, &name).unwrap_or(0.0), want, "{kind}");
    }
}

/// An HTTP/2 (prior knowledge) connection to `listener`, and the start of a `POST /echo`
/// declaring `content_length` whose first bytes have reached the web node.
async fn h2_upload(
    running: &Running,
    listener: &str,
    content_length: usize,
) -> (
    h2::client::ResponseFuture,
    h2::SendStream<Bytes>,
    h2::client::SendRequest<Bytes>,
) {
    let tcp = TcpStream::connect(running.addr(listener).unwrap())
        .await
        .unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut h2 = h2.ready().await.unwrap();
    let request = Request::post(format!("http://{}/echo", running.addr(listener).unwrap()))
        .header("content-length", content_length.to_string())
        .body(())
        .unwrap();
    let (response, mut stream) = h2.send_request(request, false).unwrap();
    stream.send_data(Bytes::from_static(b"ab"), false).unwrap();
    let web = node(running, "web-1");
    wait_until("the upload reaches the node", || async {
        web.in_flight() == 1
    })
    .await;
    (response, stream, h2)
}

#[tokio::test]
async fn http2_data_past_the_declared_length_is_malformed_not_the_backends() {
    let (running, _nodes) = setup("cf_h2_length", "", "").await;
    let (response, mut stream, _h2) = h2_upload(&running, "cf_h2_length", 4).await;
    stream
        .send_data(Bytes::from_static(b"cdefghij"), true)
        .unwrap();
    let answer = tokio::time::timeout(DEADLINE, response)
        .await
        .expect("the stream ends");
    assert!(answer.is_err(), "{answer:?}");
    wait_for_client_error(&running, "cf_h2_length", "malformed").await;
    assert_unblamed(&running, "cf_h2_length").await;
}

#[tokio::test]
async fn http2_reset_mid_upload_is_counted_as_aborted() {
    let (running, _nodes) = setup("cf_h2_reset", "", "").await;
    let (_response, mut stream, _h2) = h2_upload(&running, "cf_h2_reset", 100).await;
    stream.send_reset(h2::Reason::CANCEL);
    wait_for_client_error(&running, "cf_h2_reset", "aborted").await;
    let web = node(&running, "web-1");
    wait_until("the request is over", || async { web.in_flight() == 0 }).await;
    assert_unblamed(&running, "cf_h2_reset").await;
}

#[tokio::test]
async fn a_bad_chunk_through_an_h2c_pool_is_the_clients_fault() {
    let (running, _nodes) = setup("cf_h2c_pool", "", "backend_protocol = \"h2c\"").await;
    // The pool works over h2c to begin with.
    let reply = get(&client(), &url_of(&running, "cf_h2c_pool", "/echo")).await;
    assert_eq!(reply.status, 200);
    let echo: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(echo["version"], "HTTP/2.0");

    let request = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
        5\r\nhello\r\nzz\r\n";
    let response = raw_to(&running, "cf_h2c_pool", request).await;
    assert_closing_answer(&response, "400");
    wait_for_client_error(&running, "cf_h2c_pool", "malformed").await;
    assert_unblamed(&running, "cf_h2c_pool").await;

    // The node still serves.
    let reply = get(&client(), &url_of(&running, "cf_h2c_pool", "/")).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn a_tls_connection_silent_after_its_handshake_is_closed_at_header_read_timeout() {
    let dir = support::tls::CertDir::new("cf_tls_silent");
    let cert = dir.cert("site", &["silent.test"]);
    let nodes = webnodes(1).await;
    let mut toml = single_pool(
        "cf_tls_silent",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    );
    toml += &support::tls::tls_listener(
        "cf-tls-silent",
        &cert.cert,
        &cert.key,
        "header_read_timeout = \"300ms\"\nidle_timeout = \"10s\"",
    );
    let running = balancer(&toml).await;
    let addr = running.addr("cf-tls-silent").unwrap();
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let mut stream = support::tls::connect(addr, Some("silent.test"), &[alpn]).await;
        let handshaken = Instant::now();
        let mut out = Vec::new();
        tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out))
            .await
            .expect("the balancer closes a connection silent after its handshake")
            .ok();
        let closed = handshaken.elapsed();
        assert!(
            closed >= Duration::from_millis(300) && closed < Duration::from_secs(3),
            "{}: closed after {closed:?}",
            String::from_utf8_lossy(alpn)
        );
    }
    assert_eq!(
        client_errors(&running, "cf-tls-silent", "timeout").await,
        0.0
    );
}
