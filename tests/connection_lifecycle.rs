//! Client connections: idle ones are closed, `max_connections` queues the excess, and shutdown
//! finishes in-flight requests before exiting.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

fn with_listener_option(toml: String, option: &str) -> String {
    toml.replace(
        "bind = \"127.0.0.1:0\"\n[admin]",
        &format!("bind = \"127.0.0.1:0\"\n{option}\n[admin]"),
    )
}

/// Sends one keep-alive request and reads exactly its response head and small body.
async fn one_request(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let nodes = webnodes(1).await;
    let toml = with_listener_option(
        single_pool("conn_idle", "round_robin", &nodes_as_backends(&nodes), ""),
        "idle_timeout = \"400ms\"",
    );
    let running = balancer(&toml).await;
    let mut stream = TcpStream::connect(running.addr("http").unwrap())
        .await
        .unwrap();
    assert!(one_request(&mut stream).await.starts_with("HTTP/1.1 200"));
    let idle_since = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("the balancer closes an idle connection")
        .unwrap();
    let idle = idle_since.elapsed();
    assert!(rest.is_empty());
    assert!(
        idle >= Duration::from_millis(300) && idle < Duration::from_secs(2),
        "closed after {idle:?}"
    );
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_for_a_free_slot() {
    let nodes = webnodes(1).await;
    let toml = with_listener_option(
        single_pool("conn_max", "round_robin", &nodes_as_backends(&nodes), ""),
        "max_connections = 1",
    );
    let running = balancer(&toml).await;
    let addr = running.addr("http").unwrap();
    let mut first = TcpStream::connect(addr).await.unwrap();
    assert!(one_request(&mut first).await.starts_with("HTTP/1.1 200"));

    // The second connection completes in the kernel's backlog but is not served...
    let mut second = TcpStream::connect(addr).await.unwrap();
    second
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond max_connections");

    // ...until the first one leaves.
    drop(first);
    let n = tokio::time::timeout(DEADLINE, second.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_refuses_new_ones() {
    let nodes = webnodes(1).await;
    let running = balancer(&single_pool(
        "conn_drain",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    let addr = running.addr("http").unwrap();
    let slow_url = url(&running, "/slow?ms=500");
    let in_flight = tokio::spawn(async move { get(&client(), &slow_url).await });
    let node = node(&running, "web-1");
    wait_until("the slow request reaches the backend", || async {
        node.in_flight() == 1
    })
    .await;

    let cut_off = running.shutdown().await;
    assert_eq!(cut_off, 0, "the in-flight request was cut off");
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "slept 500 ms\n");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn sigterm_finishes_the_in_flight_request_and_exits_0() {
    sigterm_mid_request(&[]).await;
}

#[tokio::test]
async fn on_a_single_threaded_runtime_too() {
    sigterm_mid_request(&["--threads", "1"]).await;
}

/// `fulcrum run ARGS` gets SIGTERM while a request is held at the backend, stops accepting,
/// finishes that request once the backend answers, and exits 0.
async fn sigterm_mid_request(args: &[&str]) {
    // The backend tells the test when the request has arrived and answers when told to: the
    // SIGTERM lands while the request is certainly in flight, however slow the machine.
    let arrived = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let held = backend({
        let (arrived, release) = (arrived.clone(), release.clone());
        move |req: Request<Incoming>| {
            let (arrived, release) = (arrived.clone(), release.clone());
            async move {
                if req.uri().path() == "/hold" {
                    arrived.notify_one();
                    release.notified().await;
                    return Response::new(full("released"));
                }
                Response::new(full(r#"{"status":"UP"}"#))
            }
        }
    })
    .await;
    let port = free_port().await;
    let config = single_pool("conn_sigterm", "round_robin", &[("held", held.addr, 1)], "").replace(
        "bind = \"127.0.0.1:0\"\n[admin]",
        &format!("bind = \"{port}\"\n[admin]"),
    );
    let path = std::env::temp_dir().join(format!(
        "fulcrum-sigterm-{}-{}.toml",
        std::process::id(),
        args.len()
    ));
    std::fs::write(&path, config).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .arg("run")
        .args(args)
        .arg("-c")
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Process(child);
    wait_until("fulcrum run listens", || async {
        TcpStream::connect(port).await.is_ok()
    })
    .await;

    let in_flight =
        tokio::spawn(async move { get(&client(), &format!("http://{port}/hold")).await });
    tokio::time::timeout(DEADLINE, arrived.notified())
        .await
        .expect("the request reaches the backend");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_until("fulcrum stops accepting after SIGTERM", || async {
        TcpStream::connect(port).await.is_err()
    })
    .await;
    assert!(
        !in_flight.is_finished(),
        "the held request ended before the backend answered it (cut off?)"
    );
    release.notify_one();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200, "the in-flight request was cut off");
    assert_eq!(reply.text(), "released");
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "fulcrum did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = std::fs::remove_file(&path);
    assert!(exit.success(), "exit status {exit:?}");
}
