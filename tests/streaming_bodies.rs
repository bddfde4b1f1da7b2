//! Bodies stream both ways: 10 MiB arrive intact, and a 1 GiB body is relayed chunk by chunk
//! under backpressure instead of being buffered whole.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::channel::Channel;
use serde_json::Value;
use sha2::{Digest, Sha256};
use support::*;
use tokio::sync::Notify;

const TEN_MIB: usize = 10 * 1024 * 1024;
const ONE_GIB: u64 = 1024 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
/// Far more than socket buffers and hyper's buffers hold, far less than the body.
const BUFFERED_AT_MOST: u64 = 64 * 1024 * 1024;

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_request_and_response_bodies_arrive_intact() {
    let nodes = webnodes(1).await;
    let running = balancer(&single_pool(
        "body_10m",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    let client = client();

    let upload: Vec<u8> = (0..TEN_MIB).map(|i| (i * 31 % 251) as u8).collect();
    let req = Request::post(url(&running, "/echo"))
        .body(full(upload.clone()))
        .unwrap();
    let reply = send(&client, req).await;
    assert_eq!(reply.status, 200);
    let echo: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(echo["body_bytes"], TEN_MIB as u64);
    assert_eq!(echo["body_sha256"], hex_sha256(&upload));

    let reply = get(&client, &url(&running, &format!("/bytes?n={TEN_MIB}"))).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), TEN_MIB);
    assert_eq!(hex_sha256(&reply.body), hex_sha256(&vec![b'x'; TEN_MIB]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_response_streams_before_the_backend_finishes() {
    let sent = Arc::new(AtomicU64::new(0));
    let produced = sent.clone();
    let backend = backend(move |_req| {
        let sent = produced.clone();
        async move {
            let (mut tx, body) = Channel::<Bytes, BoxError>::new(1);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'z'; CHUNK]);
                while sent.load(Ordering::SeqCst) < ONE_GIB {
                    if tx.send_data(chunk.clone()).await.is_err() {
                        return; // the client went away
                    }
                    sent.fetch_add(CHUNK as u64, Ordering::SeqCst);
                }
            });
            Response::builder()
                .header("content-length", ONE_GIB.to_string())
                .body(body.boxed())
                .unwrap()
        }
    })
    .await;
    let running = balancer(&single_pool(
        "body_1g_down",
        "round_robin",
        &[("big", backend.addr, 1)],
        "",
    ))
    .await;

    let response = client()
        .request(Request::get(url(&running, "/")).body(empty()).unwrap())
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(!first.is_empty());
    assert!(
        sent.load(Ordering::SeqCst) < ONE_GIB,
        "the first bytes waited for the whole body"
    );

    // Stop reading: backpressure must stop the backend long before the body is done.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stalled_at = sent.load(Ordering::SeqCst);
    eprintln!(
        "response side: {} KiB in flight for a client that stopped reading",
        stalled_at / 1024
    );
    assert!(
        stalled_at < BUFFERED_AT_MOST,
        "{stalled_at} bytes buffered for a client that stopped reading"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(sent.load(Ordering::SeqCst) < BUFFERED_AT_MOST);

    // Reading resumes and streams on.
    let mut received = first.len() as u64;
    while received < 8 * BUFFERED_AT_MOST / 4 {
        received += body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap()
            .len() as u64;
    }
    assert!(sent.load(Ordering::SeqCst) >= received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_request_reaches_the_backend_while_the_client_still_sends() {
    let first_bytes = Arc::new(Notify::new());
    let seen = first_bytes.clone();
    let backend = backend(move |req| {
        let seen = seen.clone();
        async move {
            let mut body = req.into_body();
            if let Some(Ok(frame)) = body.frame().await
                && frame.is_data()
            {
                seen.notify_one();
            }
            // Read nothing more for a while: the sender must be held back, not buffered.
            tokio::time::sleep(Duration::from_millis(500)).await;
            Response::new(full("enough"))
        }
    })
    .await;
    let running = balancer(&single_pool(
        "body_1g_up",
        "round_robin",
        &[("sink", backend.addr, 1)],
        "",
    ))
    .await;

    let sent = Arc::new(AtomicU64::new(0));
    let (mut tx, body) = Channel::<Bytes, BoxError>::new(1);
    let producer_sent = sent.clone();
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'u'; CHUNK]);
        while producer_sent.load(Ordering::SeqCst) < ONE_GIB {
            if tx.send_data(chunk.clone()).await.is_err() {
                return;
            }
            producer_sent.fetch_add(CHUNK as u64, Ordering::SeqCst);
        }
    });
    let req = Request::post(url(&running, "/"))
        .header("content-length", ONE_GIB.to_string())
        .body(body.boxed())
        .unwrap();
    let client = client();
    let pending = tokio::spawn(async move { client.request(req).await });

    tokio::time::timeout(DEADLINE, first_bytes.notified())
        .await
        .expect("the backend sees the body start");
    assert!(
        sent.load(Ordering::SeqCst) < ONE_GIB,
        "the backend waited for the whole upload"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held_at = sent.load(Ordering::SeqCst);
    eprintln!(
        "request side: {} KiB accepted from the client while the backend read nothing",
        held_at / 1024
    );
    assert!(
        held_at < BUFFERED_AT_MOST,
        "{held_at} bytes accepted while the backend read nothing"
    );
    pending.abort();
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
