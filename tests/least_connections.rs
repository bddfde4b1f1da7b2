//! Least connections counts requests until their response body ends, and steers new requests
//! away from a node that holds them longer.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::channel::{Channel, Sender};
use support::*;

/// A backend that names itself and answers after `delay`.
async fn named(name: &'static str, delay: Duration) -> Backend {
    backend(move |_req| async move {
        tokio::time::sleep(delay).await;
        Response::builder()
            .header("x-served-by", name)
            .body(full("ok"))
            .unwrap()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_steers_away_from_a_slow_node() {
    let slow = named("slow", Duration::from_millis(100)).await;
    let fast1 = named("fast-1", Duration::ZERO).await;
    let fast2 = named("fast-2", Duration::ZERO).await;
    let backends = [
        ("slow", slow.addr, 1),
        ("fast-1", fast1.addr, 1),
        ("fast-2", fast2.addr, 1),
    ];
    let running = balancer(&single_pool("lc_slow", "least_connections", &backends, "")).await;

    let client = client();
    let target = url(&running, "/");
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (client, target) = (client.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..30 {
                seen.push(get(&client, &target).await.served_by());
            }
            seen
        }));
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for task in tasks {
        for name in task.await.unwrap() {
            *counts.entry(name).or_default() += 1;
        }
    }
    assert_eq!(counts.values().sum::<usize>(), 300);
    // Round robin would give it exactly 100 of 300; with ten clients it always holds a request
    // while the fast nodes are mostly idle, so it should get a small fraction.
    let slow_share = counts.get("slow").copied().unwrap_or(0);
    assert!(
        slow_share < 45,
        "slow node got {slow_share} of 300: {counts:?}"
    );
    // Steered away from, not shut out: it takes requests whenever it is the least loaded.
    assert!(slow_share > 0, "the slow node got nothing: {counts:?}");
    assert!(
        counts["fast-1"] > 100 && counts["fast-2"] > 100,
        "{counts:?}"
    );
}

#[tokio::test]
async fn weights_scale_the_load_a_node_may_carry() {
    // Two idle nodes, weight 1 and 3: with (in_flight + 1) / weight the heavy one is chosen
    // until it carries three times the light one's load.
    let a = named("light", Duration::from_millis(300)).await;
    let b = named("heavy", Duration::from_millis(300)).await;
    let backends = [("light", a.addr, 1), ("heavy", b.addr, 3)];
    let running = balancer(&single_pool(
        "lc_weights",
        "least_connections",
        &backends,
        "",
    ))
    .await;
    let client = client();
    let target = url(&running, "/");
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let (client, target) = (client.clone(), target.clone());
            tokio::spawn(async move { get(&client, &target).await.served_by() })
        })
        .collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in requests {
        *counts.entry(r.await.unwrap()).or_default() += 1;
    }
    assert_eq!(counts.get("heavy"), Some(&6), "{counts:?}");
    assert_eq!(counts.get("light"), Some(&2), "{counts:?}");
}

type Chunks = Arc<Mutex<Option<Sender<Bytes, BoxError>>>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A backend whose response body is fed by the test through the sender it leaves in the slot.
async fn streaming_backend() -> (Backend, Chunks) {
    let slot: Chunks = Arc::new(Mutex::new(None));
    let handler_slot = slot.clone();
    let backend = backend(move |_req| {
        let slot = handler_slot.clone();
        async move {
            let (tx, body) = Channel::<Bytes, BoxError>::new(4);
            *slot.lock().unwrap() = Some(tx);
            Response::builder()
                .header("x-served-by", "stream")
                .body(body.boxed())
                .unwrap()
        }
    })
    .await;
    (backend, slot)
}

#[tokio::test]
async fn in_flight_lasts_until_the_response_body_ends() {
    let (backend, chunks) = streaming_backend().await;
    let running = balancer(&single_pool(
        "lc_inflight",
        "least_connections",
        &[("stream", backend.addr, 1)],
        "",
    ))
    .await;
    let node = node(&running, "stream");

    let client = client();
    let response = client
        .request(Request::get(url(&running, "/")).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Headers are out but the body is not: the node is still busy.
    assert_eq!(node.in_flight(), 1);
    let metric = "fulcrum_backend_in_flight{pool=\"lc_inflight\",backend=\"stream\"}";
    assert_eq!(series(&scrape(&running).await, metric), Some(1.0));

    let mut sender = chunks.lock().unwrap().take().unwrap();
    sender
        .send_data(Bytes::from_static(b"part one"))
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"part one");
    assert_eq!(node.in_flight(), 1, "mid-body the request still counts");

    drop(sender); // the backend ends the body
    assert!(body.frame().await.is_none());
    wait_until("the finished body releases the node", || async {
        node.in_flight() == 0
    })
    .await;
    assert_eq!(series(&scrape(&running).await, metric), Some(0.0));
}

#[tokio::test]
async fn a_client_that_goes_away_releases_the_node() {
    let (backend, chunks) = streaming_backend().await;
    let running = balancer(&single_pool(
        "lc_gone",
        "least_connections",
        &[("stream", backend.addr, 1)],
        "",
    ))
    .await;
    let node = node(&running, "stream");

    let response = client()
        .request(Request::get(url(&running, "/")).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(node.in_flight(), 1);
    let sender = chunks.lock().unwrap().take().unwrap();
    drop(response); // the client hangs up mid-body
    wait_until("the abandoned body releases the node", || async {
        node.in_flight() == 0
    })
    .await;
    drop(sender);
}

#[tokio::test]
async fn an_idle_pool_shares_requests_by_weight_not_all_to_the_heaviest() {
    // One request at a time: every node is idle at each pick, so ties decide everything.
    let nodes = webnodes(3).await;
    let backends = [
        (nodes[0].id(), nodes[0].local_addr(), 1),
        (nodes[1].id(), nodes[1].local_addr(), 1),
        (nodes[2].id(), nodes[2].local_addr(), 2),
    ];
    let running = balancer(&single_pool("lc_idle", "least_connections", &backends, "")).await;
    let client = client();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..400 {
        *counts
            .entry(get(&client, &url(&running, "/")).await.served_by())
            .or_default() += 1;
    }
    let heavy = counts.get("web-3").copied().unwrap_or(0);
    assert!(
        (180..=220).contains(&heavy),
        "weight 2 of 4 is half: {counts:?}"
    );
    for light in ["web-1", "web-2"] {
        let n = counts.get(light).copied().unwrap_or(0);
        assert!((80..=120).contains(&n), "{light}: {counts:?}");
    }
}
