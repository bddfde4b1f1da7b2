//! A node that comes back up ramps from a small share to its full weight over `slow_start`,
//! for round robin and least connections alike.

mod support;

use std::collections::HashMap;

use fulcrum::pool::Health;
use support::*;

async fn shares_right_after_return(strategy: &str, pool: &str) -> HashMap<String, usize> {
    let nodes = webnodes(2).await;
    let extra = format!("slow_start = \"30s\"\n[pools.{pool}.health]\ninterval = \"1h\"\n");
    let running = balancer(&single_pool(
        pool,
        strategy,
        &nodes_as_backends(&nodes),
        &extra,
    ))
    .await;
    let returning = node(&running, "web-2");
    returning.set_health(Health::Down);
    returning.set_health(Health::Up);

    let client = client();
    let mut counts = HashMap::new();
    for _ in 0..400 {
        *counts
            .entry(get(&client, &url(&running, "/")).await.served_by())
            .or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_returning_node_starts_with_a_small_share_under_round_robin() {
    let counts = shares_right_after_return("round_robin", "ss_rr").await;
    // Equal weights would give 200 each; at the start of a 30 s ramp it is about a tenth.
    let returning = counts.get("web-2").copied().unwrap_or(0);
    assert!(returning > 0 && returning < 80, "{counts:?}");
}

#[tokio::test]
async fn a_returning_node_starts_with_a_small_share_under_least_connections() {
    let counts = shares_right_after_return("least_connections", "ss_lc").await;
    // One request at a time: every pick is a tie on load, so weight alone decides, and the
    // ramping node's weight is a tenth of the other's.
    let returning = counts.get("web-2").copied().unwrap_or(0);
    assert!(returning < 80, "{counts:?}");
}
