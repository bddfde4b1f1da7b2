//! Who may change a running balancer through the admin API: not a web page in the operator's
//! browser (foreign `Origin` → 403, non-JSON bodies → 415), and no value in a call may be
//! absurd (a drain longer than a day → 400). Each refusal changes nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use http::{Method, Request};
use serde_json::{Value, json};
use support::*;

/// `(name, state)` of every backend of the pool, as `GET /api/pools` lists them.
async fn listed(running: &fulcrum::Running, pool: &str) -> Vec<(String, String)> {
    let admin = running.admin_addr().expect("admin listener");
    let reply = get(&client(), &format!("http://{admin}/api/pools")).await;
    let value: Value = serde_json::from_slice(&reply.body).expect("JSON");
    value["pools"][pool]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn admin_call(
    running: &fulcrum::Running,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Reply {
    let admin = running.admin_addr().expect("admin listener");
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = body.map_or_else(empty, full);
    send(&client(), request.body(body).unwrap()).await
}

#[tokio::test]
async fn mutations_from_a_foreign_origin_get_403_and_change_nothing() {
    let nodes = webnodes(3).await;
    let running = balancer(&single_pool(
        "at_origin",
        "round_robin",
        &nodes_as_backends(&nodes[..2]),
        "",
    ))
    .await;
    let before = listed(&running, "at_origin").await;
    let new_node =
        json!({"address": nodes[2].local_addr().to_string(), "name": "web-3"}).to_string();
    let attacker = [
        ("origin", "http://attacker.example"),
        ("content-type", "application/json"),
    ];
    // DNS rebinding: the attacker's name resolves to the admin's address, port and all.
    let port = running.admin_addr().unwrap().port();
    let rebound_origin = format!("http://attacker.example:{port}");
    let rebound = [
        ("origin", rebound_origin.as_str()),
        ("content-type", "application/json"),
    ];
    for (method, path, headers, body) in [
        (
            Method::POST,
            "/api/pools/at_origin/backends",
            &attacker,
            Some(new_node.clone()),
        ),
        (
            Method::PUT,
            "/api/pools/at_origin/backends",
            &rebound,
            Some(format!("[{new_node}]")),
        ),
        (
            Method::DELETE,
            "/api/pools/at_origin/backends/web-1",
            &rebound,
            None,
        ),
        (Method::POST, "/api/reload", &attacker, None),
    ] {
        let reply = admin_call(&running, method.clone(), path, headers, body).await;
        assert_eq!(reply.status, 403, "{method} {path}: {}", reply.text());
        assert!(reply.text().contains("origin"), "{}", reply.text());
    }
    assert_eq!(listed(&running, "at_origin").await, before);

    // The admin's own origin (a page served by the admin listener itself) may.
    let own = format!("http://{}", running.admin_addr().unwrap());
    let reply = admin_call(
        &running,
        Method::POST,
        "/api/pools/at_origin/backends",
        &[("origin", &own), ("content-type", "application/json")],
        Some(new_node),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(listed(&running, "at_origin").await.len(), 3);
}

#[tokio::test]
async fn a_body_that_is_not_json_gets_415_and_changes_nothing() {
    let nodes = webnodes(3).await;
    let running = balancer(&single_pool(
        "at_media",
        "round_robin",
        &nodes_as_backends(&nodes[..2]),
        "",
    ))
    .await;
    let before = listed(&running, "at_media").await;
    let new_node =
        json!({"address": nodes[2].local_addr().to_string(), "name": "web-3"}).to_string();
    // What an HTML form or a `fetch` without preflight can send.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let headers: Vec<(&str, &str)> = content_type
            .map(|ct| vec![("content-type", ct)])
            .unwrap_or_default();
        let reply = admin_call(
            &running,
            Method::POST,
            "/api/pools/at_media/backends",
            &headers,
            Some(new_node.clone()),
        )
        .await;
        assert_eq!(reply.status, 415, "{content_type:?}: {}", reply.text());
    }
    assert_eq!(listed(&running, "at_media").await, before);
}

#[tokio::test]
async fn a_drain_longer_than_a_day_gets_400_and_the_node_keeps_serving() {
    let nodes = webnodes(2).await;
    let running = balancer(&single_pool(
        "at_drain",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    for drain in ["25h", "18446744073709551615s", "99999y"] {
        let reply = admin_call(
            &running,
            Method::DELETE,
            &format!("/api/pools/at_drain/backends/web-1?drain={drain}"),
            &[],
            None,
        )
        .await;
        assert_eq!(reply.status, 400, "drain={drain}: {}", reply.text());
        let value: Value = serde_json::from_slice(&reply.body).unwrap();
        assert!(
            value["error"].as_str().unwrap().contains("drain"),
            "{value}"
        );
    }
    assert_eq!(
        listed(&running, "at_drain").await,
        [
            ("web-1".to_owned(), "up".to_owned()),
            ("web-2".to_owned(), "up".to_owned())
        ],
        "nothing was marked draining"
    );
    // Both nodes still take traffic.
    let client = client();
    let mut served = std::collections::HashSet::new();
    for _ in 0..4 {
        served.insert(get(&client, &url(&running, "/")).await.served_by());
    }
    assert_eq!(served.len(), 2, "{served:?}");

    // A day exactly is a drain like any other.
    let reply = admin_call(
        &running,
        Method::DELETE,
        "/api/pools/at_drain/backends/web-1?drain=24h",
        &[],
        None,
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
}
