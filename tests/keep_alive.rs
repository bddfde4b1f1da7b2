//! HTTP/1.1 keep-alive connections between requests: fulcrum ends hyper's connection at each
//! request boundary and keeps only the socket until the client sends again. Whatever arrives
//! meanwhile, however it is cut, must be served as if one connection had read it all.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads answers until `count` complete `HTTP/1.1` responses (Content-Length bodies) arrived;
/// returns their status lines and bodies.
async fn read_answers(stream: &mut TcpStream, count: usize) -> Vec<(String, String)> {
    let mut buf = Vec::new();
    let mut answers = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while answers.len() < count {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .expect("answers within the deadline")
            .unwrap();
        assert!(n > 0, "closed after {} answers", answers.len());
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() < end + 4 + length {
                break;
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
            answers.push((head.lines().next().unwrap().to_owned(), body));
            buf.drain(..end + 4 + length);
        }
    }
    answers
}

async fn connect(running: &fulcrum::Running) -> TcpStream {
    TcpStream::connect(running.addr("http").unwrap())
        .await
        .unwrap()
}

async fn one_node() -> (Vec<fulcrum::webnode::WebNode>, fulcrum::Running) {
    let nodes = webnodes(1).await;
    let toml = single_pool("ka", "round_robin", &nodes_as_backends(&nodes), "");
    let running = balancer(&toml).await;
    (nodes, running)
}

#[tokio::test]
async fn pipelined_requests_in_one_write_are_all_answered_in_order() {
    let (_nodes, running) = one_node().await;
    let mut stream = connect(&running).await;
    stream
        .write_all(
            b"GET /echo?n=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /echo?n=2 HTTP/1.1\r\nHost: x\r\n\r\nGET /echo?n=3 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap();
    let answers = read_answers(&mut stream, 3).await;
    for (i, (status, body)) in answers.iter().enumerate() {
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(body.contains(&format!("n={}", i + 1)), "answer {i}: {body}");
    }
}

#[tokio::test]
async fn a_request_cut_into_pieces_after_a_quiet_spell_is_served() {
    let (_nodes, running) = one_node().await;
    let mut stream = connect(&running).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        read_answers(&mut stream, 1).await[0]
            .0
            .starts_with("HTTP/1.1 200")
    );
    // Quiet: the connection sleeps. Then a head in three pieces, the first a single byte.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for piece in [
        &b"G"[..],
        b"ET /echo?after=sleep HTTP/1.1\r\nHo",
        b"st: x\r\n\r\n",
    ] {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = &read_answers(&mut stream, 1).await[0];
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(body.contains("after=sleep"), "{body}");
}

#[tokio::test]
async fn requests_with_and_without_bodies_share_one_connection() {
    let (_nodes, running) = one_node().await;
    let mut stream = connect(&running).await;
    for round in 0..3 {
        stream
            .write_all(
                format!(
                    "POST /echo?round={round} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let (status, _) = &read_answers(&mut stream, 1).await[0];
        assert!(status.starts_with("HTTP/1.1 200"), "POST {round}: {status}");
        stream
            .write_all(format!("GET /echo?get={round} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (status, body) = &read_answers(&mut stream, 1).await[0];
        assert!(status.starts_with("HTTP/1.1 200"), "GET {round}: {status}");
        assert!(body.contains(&format!("get={round}")), "{body}");
    }
}

#[tokio::test]
async fn a_client_that_asks_to_close_gets_its_answer_then_the_end() {
    let (_nodes, running) = one_node().await;
    for request in [
        &b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
        b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
    ] {
        let mut stream = connect(&running).await;
        stream.write_all(request).await.unwrap();
        let mut all = Vec::new();
        tokio::time::timeout(DEADLINE, stream.read_to_end(&mut all))
            .await
            .expect("the balancer closes after the answer")
            .unwrap();
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with("HTTP/1."), "{text}");
        assert!(text.contains(" 200 "), "{text}");
    }
}

#[tokio::test]
async fn many_requests_on_one_connection_with_pauses_between_them() {
    let (_nodes, running) = one_node().await;
    let mut stream = connect(&running).await;
    for i in 0..20 {
        stream
            .write_all(format!("GET /echo?i={i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (status, body) = &read_answers(&mut stream, 1).await[0];
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(body.contains(&format!("i={i}")), "{body}");
        if i % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
}
