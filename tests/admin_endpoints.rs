//! The admin listener: Prometheus text with help for every fulcrum metric and the contract's
//! labels, and fulcrum's own health in the seed schema.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

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

/// The `<tr>` of node `name` on a status page.
fn row(page: &str, name: &str) -> String {
    let start = page
        .find(&format!("<tr class=node><td>{name}</td>"))
        .unwrap_or_else(|| panic!("no row for {name}: {page}"));
    page[start..start + page[start..].find("</tr>").unwrap()].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_each_node_its_state_rates_and_recent_changes() {
    let mut nodes = webnodes(2).await;
    let running = balancer(&single_pool(
        "adm_status",
        "round_robin",
        &nodes_as_backends(&nodes),
        "[pools.adm_status.health]\ninterval = \"100ms\"\ntimeout = \"80ms\"\n",
    ))
    .await;
    let status_url = format!("http://{}/status", running.admin_addr().unwrap());
    let first = get(&client(), &status_url).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.headers["content-type"], "text/html; charset=utf-8");
    let page = first.text();
    assert!(
        page.contains("<meta http-equiv=refresh"),
        "refreshes itself"
    );
    assert!(
        !page.contains("src=") && !page.contains("href="),
        "no external assets"
    );
    for name in ["web-1", "web-2"] {
        assert!(
            page.contains(&format!("<tr class=node><td>{name}</td>")),
            "{page}"
        );
    }

    nodes.pop().unwrap().shutdown().await;
    let web_2 = node(&running, "web-2");
    wait_until("web-2 is marked down", || {
        let web_2 = web_2.clone();
        async move { web_2.health() == fulcrum::pool::Health::Down }
    })
    .await;
    for _ in 0..30 {
        assert_eq!(get(&client(), &url(&running, "/")).await.status, 200);
    }
    // Rates are taken between renders at least 500 ms apart: until then web-1's is a dash.
    let rate_of_web_1 = |page: &str| {
        let web_1 = row(page, "web-1");
        let cells: Vec<&str> = web_1.split("<td>").collect();
        cells[7].trim_end_matches("</td>").parse::<f64>().ok()
    };
    let waiting = std::time::Instant::now();
    let page = loop {
        let page = get(&client(), &status_url).await.text();
        if rate_of_web_1(&page).is_some() {
            break page;
        }
        assert!(
            waiting.elapsed() < DEADLINE,
            "web-1's rate never showed: {page}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let row = |name: &str| row(&page, name);
    assert!(
        row("web-1").contains("class='state up'"),
        "{}",
        row("web-1")
    );
    assert!(
        row("web-2").contains("class='state down'"),
        "{}",
        row("web-2")
    );
    // Thirty requests since the first render: web-1's rate is a real number of them.
    let rate = rate_of_web_1(&page).unwrap();
    assert!(rate > 1.0, "{}", row("web-1"));
    assert!(
        page.contains("<tr class=event>")
            && page.contains("<td>web-2</td><td><span class='state down'>down</span>"),
        "the transition is listed: {page}"
    );
}
