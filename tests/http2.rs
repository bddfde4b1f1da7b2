//! `backend_protocol = "h2c"`: requests reach an HTTP/2 backend multiplexed over cleartext
//! HTTP/2 with bodies intact, while `Upgrade` requests (WebSocket) to the same pool still go
//! over HTTP/1.1, the only version that has them.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A backend speaking HTTP/1.1 and h2c (prior knowledge) on one port. It answers
/// `VERSION BODY_BYTES host=HOST`, accepts WebSocket upgrades on HTTP/1.1 with an echo, and
/// counts the connections it accepted.
async fn h2c_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        hyper::service::service_fn(handle),
                    )
                    .await;
            });
        }
    });
    (addr, connections)
}

async fn handle(mut req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    if let Some(key) = req.headers().get("sec-websocket-key") {
        let accept = derive_accept_key(key.as_bytes());
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(message)) = ws.next().await {
                if message.is_text() && ws.send(message).await.is_err() {
                    return;
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(empty())
            .unwrap());
    }
    let version = format!("{:?}", req.version());
    let host = req
        .headers()
        .get("host")
        .map(|h| h.to_str().unwrap().to_owned());
    let bytes = req.into_body().collect().await.unwrap().to_bytes().len();
    Ok(Response::new(full(format!(
        "{version} {bytes} host={host:?}"
    ))))
}

#[tokio::test]
async fn an_h2c_pool_multiplexes_requests_to_an_http2_backend() {
    let (backend, connections) = h2c_backend().await;
    let running = balancer(&single_pool(
        "h2c_pool",
        "round_robin",
        &[("h2", backend, 1)],
        "backend_protocol = \"h2c\"",
    ))
    .await;
    let url = url(&running, "/upload");

    let client = client();
    let mut tasks = Vec::new();
    for i in 0..20usize {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let body = vec![b'x'; 64 * 1024 + i];
            let request = Request::post(&url)
                .header("host", "app.test")
                .body(full(body))
                .unwrap();
            (i, send(&client, request).await)
        }));
    }
    for task in tasks {
        let (i, reply) = task.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.text(),
            format!("HTTP/2.0 {} host=Some(\"app.test\")", 64 * 1024 + i),
            "the backend hop is HTTP/2, the body intact, the client's Host kept"
        );
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "20 concurrent requests share one HTTP/2 connection"
    );
}

#[tokio::test]
async fn websocket_on_an_h2c_pool_goes_over_http1() {
    let (backend, _) = h2c_backend().await;
    let running = balancer(&single_pool(
        "h2c_ws",
        "round_robin",
        &[("h2", backend, 1)],
        "backend_protocol = \"h2c\"",
    ))
    .await;
    let tcp = TcpStream::connect(running.addr("http").unwrap())
        .await
        .unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("ws://app.test/ws", tcp)
        .await
        .expect("WebSocket handshake through an h2c pool");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("over http/1.1")).await.unwrap();
    let echoed = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::text("over http/1.1"));

    // Ordinary requests on the same pool still use h2c.
    let reply = get(&client(), &url(&running, "/")).await;
    assert!(reply.text().starts_with("HTTP/2.0 0"), "{}", reply.text());
}
