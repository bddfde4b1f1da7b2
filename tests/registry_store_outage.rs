//! The shared registry store going away and coming back, with two balancers on it: routing
//! carries on with the last known nodes, registry calls answer `UNAVAILABLE`,
//! `fulcrum_registry_store_up` reads 0 (then 1), and a node registered after the store returns
//! is served. A file of its own: the gauge has no labels, so it is one per process.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use support::postgres::Postgres;
use support::registry::*;
use support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_down_routing_carries_on_and_registrations_answer_unavailable() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let nodes = webnodes(2).await;
    let pool = "store_outage";
    let a = store_balancer(pool, "round_robin", &pg.url(), "5s").await;
    let b = store_balancer(pool, "round_robin", &pg.url(), "5s").await;
    store_ready(&a).await;
    store_ready(&b).await;
    let mut registry_a = registry_client(&a).await;
    registry_a
        .report_active(active("before", nodes[0].local_addr()))
        .await
        .unwrap();
    wait_until("B serves the node", || async {
        state_of(&b, pool, "before").await.as_deref() == Some("up")
    })
    .await;

    pg.stop();
    wait_until("the gauge says the store is down", || async {
        series(&scrape(&a).await, "fulcrum_registry_store_up") == Some(0.0)
    })
    .await;
    for _ in 0..20 {
        assert_eq!(served_by(&b).await, "web-1", "routing carries on");
        assert_eq!(served_by(&a).await, "web-1", "routing carries on");
    }
    let refused = registry_a
        .report_active(active("during", nodes[1].local_addr()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        state_of(&a, pool, "during").await.is_none(),
        "a registration the store did not take is not served either"
    );
    let heartbeat = registry_a
        .clone()
        .report_active(active("before", nodes[0].local_addr()))
        .await
        .unwrap_err();
    assert_eq!(heartbeat.code(), Code::Unavailable);

    pg.restart();
    wait_until("the gauge says the store is back", || async {
        series(&scrape(&a).await, "fulcrum_registry_store_up") == Some(1.0)
    })
    .await;
    store_ready(&a).await;
    store_ready(&b).await;
    registry_a
        .report_active(active("after", nodes[1].local_addr()))
        .await
        .expect("registration works again");
    wait_until("B serves the node registered after the outage", || async {
        state_of(&b, pool, "after").await.as_deref() == Some("up")
    })
    .await;
    wait_until("B routes to it", || async {
        served_by(&b).await == "web-2"
    })
    .await;
    assert_eq!(
        state_of(&b, pool, "before").await.as_deref(),
        Some("up"),
        "the node known before the outage stays"
    );
}
