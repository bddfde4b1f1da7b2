//! WebSocket (HTTP/1.1 `Upgrade`) pass-through: the handshake goes to the backend, frames flow
//! both ways until a side closes, the tunnel counts as in flight for least connections, and
//! graceful shutdown waits for it until `shutdown_grace`, then cuts it off.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::net::SocketAddr;

use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use support::tls::{self, CertDir};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::{WebSocketStream, client_async};

/// Describes the handshake request the backend got, for the test to read back.
struct Describe(std::sync::mpsc::Sender<String>);

impl Callback for Describe {
    fn on_request(self, req: &WsRequest, resp: WsResponse) -> Result<WsResponse, ErrorResponse> {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .map_or("-", |v| v.to_str().unwrap_or("?"))
                .to_owned()
        };
        let _ = self.0.send(format!(
            "path={} proto={} xff={}",
            req.uri().path(),
            header("x-forwarded-proto"),
            header("x-forwarded-for")
        ));
        Ok(resp)
    }
}

/// A WebSocket server that first sends one text message describing the handshake request it
/// got, then echoes every data message.
async fn ws_echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (tx, rx) = std::sync::mpsc::channel();
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, Describe(tx)).await
                else {
                    return;
                };
                let seen = rx.recv().unwrap_or_default();
                if ws.send(Message::text(seen)).await.is_err() {
                    return;
                }
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

type Ws<S> = WebSocketStream<S>;

async fn open(addr: SocketAddr, path: &str) -> Ws<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (ws, response) =
        tokio::time::timeout(DEADLINE, client_async(format!("ws://ws.test{path}"), tcp))
            .await
            .expect("handshake within the deadline")
            .expect("WebSocket handshake through fulcrum");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

async fn next_message<S>(ws: &mut Ws<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("a message within the deadline")
        .expect("the stream is open")
        .expect("a valid frame")
}

/// Sends text and a 256 KiB binary frame and expects both back unchanged.
async fn round_trip<S>(ws: &mut Ws<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_message(ws).await, Message::text("hello"));
    let blob: Vec<u8> = (0..256 * 1024).map(|i: u32| (i % 253) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(next_message(ws).await, Message::binary(blob));
}

/// The client's side of the closing handshake: send Close, read until the server's Close and
/// the end of the stream, and hang up, as a browser does.
async fn close<S>(mut ws: Ws<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.close(None).await.unwrap();
    tokio::time::timeout(DEADLINE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await
    .expect("the server completes the close");
}

#[tokio::test]
async fn websocket_frames_round_trip_and_count_in_flight_while_open() {
    let backend = ws_echo_backend().await;
    let running = balancer(&single_pool(
        "ws_lc",
        "least_connections",
        &[("ws", backend, 1)],
        "",
    ))
    .await;
    let node = node(&running, "ws");

    let mut ws = open(running.addr("http").unwrap(), "/chat").await;
    let hello = next_message(&mut ws).await.into_text().unwrap();
    assert_eq!(hello.as_str(), "path=/chat proto=http xff=127.0.0.1");
    round_trip(&mut ws).await;
    assert_eq!(node.in_flight(), 1, "an open tunnel is a request in flight");

    // A second socket at the same time: the tunnels are independent.
    let mut second = open(running.addr("http").unwrap(), "/two").await;
    next_message(&mut second).await;
    round_trip(&mut second).await;
    assert_eq!(node.in_flight(), 2);

    close(ws).await;
    close(second).await;
    wait_until("closed tunnels leave the in-flight count", || async {
        node.in_flight() == 0
    })
    .await;
}

#[tokio::test]
async fn secure_websocket_through_a_tls_listener_is_told_https() {
    let backend = ws_echo_backend().await;
    let dir = CertDir::new("wss");
    let cert = dir.cert("site", &["ws.test"]);
    let mut toml = single_pool("wss", "round_robin", &[("ws", backend, 1)], "");
    toml += &tls::tls_listener("wss", &cert.cert, &cert.key, "");
    let running = balancer(&toml).await;

    // WebSocket over TLS is HTTP/1.1: a client that offers only h2 could not upgrade.
    let stream = tls::connect(
        running.addr("wss").unwrap(),
        Some("ws.test"),
        &[b"http/1.1"],
    )
    .await;
    let (mut ws, response) = client_async("wss://ws.test/secure", stream)
        .await
        .expect("wss handshake through fulcrum");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let hello = next_message(&mut ws).await.into_text().unwrap();
    assert!(hello.contains("proto=https"), "{hello}");
    round_trip(&mut ws).await;
    close(ws).await;
}

#[tokio::test]
async fn an_upgrade_the_backend_declines_is_an_ordinary_response_on_a_kept_connection() {
    // The web node knows nothing of WebSockets and answers 200.
    let nodes = webnodes(1).await;
    let running = balancer(&single_pool(
        "ws_declined",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    let tcp = TcpStream::connect(running.addr("http").unwrap())
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    for upgrade in [true, false] {
        let mut request = Request::get("/").header("host", "ws.test");
        if upgrade {
            request = request
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        }
        let response = sender.send_request(request.body(empty()).unwrap()).await;
        let got = collect(response.expect("answered on the same connection")).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.text(), "served by web-1\n");
        assert!(!got.headers.contains_key("upgrade"));
    }
}

fn with_grace(toml: String, grace: &str) -> String {
    toml.replace(
        "shutdown_grace = \"5s\"",
        &format!("shutdown_grace = \"{grace}\""),
    )
}

#[tokio::test]
async fn shutdown_waits_for_a_tunnel_that_closes_within_the_grace() {
    let backend = ws_echo_backend().await;
    let toml = single_pool("ws_drain", "round_robin", &[("ws", backend, 1)], "");
    let running = balancer(&with_grace(toml, "5s")).await;
    let addr = running.addr("http").unwrap();
    let mut ws = open(addr, "/drain").await;
    next_message(&mut ws).await;

    let shutdown = tokio::spawn(running.shutdown());
    // Shutdown is under way once the listener is closed; it must still be waiting.
    wait_until("shutdown closes the listener", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(
        !shutdown.is_finished(),
        "shutdown must wait for the open tunnel"
    );
    round_trip(&mut ws).await;
    close(ws).await;
    let cut_off = tokio::time::timeout(DEADLINE, shutdown)
        .await
        .expect("shutdown finishes once the tunnel closed")
        .unwrap();
    assert_eq!(cut_off, 0);
}

#[tokio::test]
async fn shutdown_cuts_off_a_tunnel_still_open_when_the_grace_runs_out() {
    let backend = ws_echo_backend().await;
    let toml = single_pool("ws_cut", "round_robin", &[("ws", backend, 1)], "");
    let running = balancer(&with_grace(toml, "300ms")).await;
    let mut ws = open(running.addr("http").unwrap(), "/cut").await;
    next_message(&mut ws).await;

    let cut_off = tokio::time::timeout(DEADLINE, running.shutdown())
        .await
        .expect("shutdown ends at the grace");
    assert_eq!(cut_off, 1, "the open tunnel is counted as cut off");
    let end = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("the client sees the tunnel end");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
}
