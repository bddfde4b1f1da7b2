//! Smooth weighted round robin is exact: over sum(weights) requests every node gets its weight.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::collections::HashMap;

use support::*;

async fn count_served_by(url: &str, requests: usize, concurrency: usize) -> HashMap<String, usize> {
    let client = client();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let client = client.clone();
        let url = url.to_owned();
        let share = requests / concurrency + usize::from(worker < requests % concurrency);
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..share {
                let reply = get(&client, &url).await;
                assert_eq!(reply.status, 200);
                seen.push(reply.served_by());
            }
            seen
        }));
    }
    let mut counts = HashMap::new();
    for task in tasks {
        for name in task.await.unwrap() {
            *counts.entry(name).or_default() += 1;
        }
    }
    counts
}

#[tokio::test]
async fn three_equal_nodes_get_100_each_of_300_requests() {
    let nodes = webnodes(3).await;
    let running = balancer(&single_pool(
        "rr_equal",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    let counts = count_served_by(&url(&running, "/"), 300, 1).await;
    for node in &nodes {
        assert_eq!(counts[node.id()], 100, "{counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_1_2_3_are_exact_over_600_requests() {
    let nodes = webnodes(3).await;
    let backends: Vec<_> = nodes
        .iter()
        .zip([1, 2, 3])
        .map(|(n, w)| (n.id(), n.local_addr(), w))
        .collect();
    let running = balancer(&single_pool("rr_weighted", "round_robin", &backends, "")).await;
    // Eight concurrent clients: exactness must not depend on requests arriving one at a time.
    let counts = count_served_by(&url(&running, "/"), 600, 8).await;
    assert_eq!(counts["web-1"], 100, "{counts:?}");
    assert_eq!(counts["web-2"], 200, "{counts:?}");
    assert_eq!(counts["web-3"], 300, "{counts:?}");
}

#[tokio::test]
async fn heavy_node_turns_are_spread_not_bunched() {
    let nodes = webnodes(3).await;
    let backends = [
        (nodes[0].id(), nodes[0].local_addr(), 5),
        (nodes[1].id(), nodes[1].local_addr(), 1),
        (nodes[2].id(), nodes[2].local_addr(), 1),
    ];
    let running = balancer(&single_pool("rr_smooth", "round_robin", &backends, "")).await;
    let client = client();
    let mut order = Vec::new();
    for _ in 0..7 {
        order.push(get(&client, &url(&running, "/")).await.served_by());
    }
    // nginx's smooth sequence for 5:1:1: the light nodes are interleaved, not left to the end.
    assert_eq!(
        order,
        [
            "web-1", "web-1", "web-2", "web-1", "web-3", "web-1", "web-1"
        ]
    );
}
