//! The admin listener: Prometheus text with help for every fulcrum metric and the contract's
//! labels, and fulcrum's own health in the seed schema.

mod support;

use serde_json::Value;
use support::*;

#[tokio::test]
async fn metrics_have_help_types_and_the_contract_labels() {
    let nodes = webnodes(2).await;
    let running = balancer(&single_pool(
        "adm_metrics",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    let client = client();
    for _ in 0..4 {
        assert_eq!(get(&client, &url(&running, "/")).await.status, 200);
    }
    let metrics = scrape(&running).await;

    for (name, kind) in [
        ("fulcrum_requests_total", "counter"),
        ("fulcrum_request_duration_seconds", "histogram"),
        ("fulcrum_backend_in_flight", "gauge"),
        ("fulcrum_proxy_errors_total", "counter"),
        ("fulcrum_downstream_connections", "gauge"),
    ] {
        assert!(
            metrics.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{metrics}"
        );
        assert!(
            metrics.contains(&format!("# TYPE {name} {kind}")),
            "{name} is not a {kind}:\n{metrics}"
        );
    }
    for node in ["web-1", "web-2"] {
        let requests = format!(
            "fulcrum_requests_total{{pool=\"adm_metrics\",backend=\"{node}\",code=\"200\"}}"
        );
        assert_eq!(series(&metrics, &requests), Some(2.0), "{metrics}");
        let count = format!(
            "fulcrum_request_duration_seconds_count{{pool=\"adm_metrics\",backend=\"{node}\"}}"
        );
        assert_eq!(series(&metrics, &count), Some(2.0), "{metrics}");
        let bucket = format!(
            "fulcrum_request_duration_seconds_bucket{{pool=\"adm_metrics\",backend=\"{node}\",le=\"+Inf\"}}"
        );
        assert_eq!(series(&metrics, &bucket), Some(2.0), "{metrics}");
    }
    // The client above keeps its connection open.
    assert_eq!(
        series(
            &metrics,
            "fulcrum_downstream_connections{listener=\"http\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn healthz_reports_fulcrum_in_the_seed_schema() {
    let nodes = webnodes(1).await;
    let running = balancer(&single_pool(
        "adm_health",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    let admin = running.admin_addr().unwrap();
    let reply = get(&client(), &format!("http://{admin}/healthz")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/json");
    let health: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(health["instanceId"], "fulcrum");
    assert_eq!(health["status"], "UP");
    assert!(
        health["systemMetrics"]["freeMemoryBytes"].as_u64().unwrap() > 0,
        "{health}"
    );
    assert!(health["systemMetrics"]["cpuUtilizationPercent"].is_number());
    assert!(health["systemMetrics"]["activeConnections"].is_u64());
    assert!(health["dependencyStatus"].is_object());

    let missing = get(&client(), &format!("http://{admin}/nope")).await;
    assert_eq!(missing.status, 404);
}
