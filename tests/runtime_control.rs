//! Runtime changes: the admin API, reloads and drains, none of which may drop a request.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fulcrum::Running;
use http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use support::*;
use tokio::net::TcpStream;

/// Calls the admin API; `token` goes in `Authorization: Bearer`.
async fn api(
    running: &Running,
    method: Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let admin = running.admin_addr().expect("admin listener");
    api_at(admin, method, path, body, token).await
}

async fn api_at(
    admin: std::net::SocketAddr,
    method: Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let body = match body {
        Some(value) => full(value.to_string()),
        None => empty(),
    };
    let reply = send(&client(), request.body(body).unwrap()).await;
    let value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.status, value)
}

/// The backend names of `pool` as `GET /api/pools` lists them, with their states.
async fn listed(running: &Running, pool: &str) -> Vec<(String, String)> {
    let (status, body) = api(running, Method::GET, "/api/pools", None, None).await;
    assert_eq!(status, 200);
    body["pools"][pool]["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("no pool {pool} in {body}"))
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn spec(node: &fulcrum::webnode::WebNode) -> Value {
    json!({ "name": node.id(), "address": node.local_addr().to_string() })
}

/// A config file of its own for a balancer that reloads.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("fulcrum-{name}-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).unwrap();
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const FAST_CHECKS: &str =
    "[pools.POOL.health]\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_swaps_and_twenty_reloads_under_load_fail_no_request() {
    let nodes = webnodes(5).await;
    let pool = |backends: &[fulcrum::webnode::WebNode]| {
        single_pool(
            "rc_swaps",
            "round_robin",
            &nodes_as_backends(backends),
            &FAST_CHECKS.replace("POOL", "rc_swaps"),
        )
    };
    let file = ConfigFile::new("rc-swaps", &pool(&nodes[..3]));
    let running = fulcrum::start_file(file.path()).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(url(&running, "/"), 4, stop.clone(), None);

    for round in 0..100 {
        let (status, body) = match round % 4 {
            // Replace the whole list: the first three, then two of them and the fourth.
            0 => {
                let list: Vec<Value> = nodes[..3].iter().map(spec).collect();
                api(
                    &running,
                    Method::PUT,
                    "/api/pools/rc_swaps/backends",
                    Some(json!(list)),
                    None,
                )
                .await
            }
            1 => {
                let list: Vec<Value> = [&nodes[0], &nodes[1], &nodes[3]]
                    .into_iter()
                    .map(spec)
                    .collect();
                api(
                    &running,
                    Method::PUT,
                    "/api/pools/rc_swaps/backends",
                    Some(json!(list)),
                    None,
                )
                .await
            }
            2 => {
                api(
                    &running,
                    Method::POST,
                    "/api/pools/rc_swaps/backends",
                    Some(spec(&nodes[4])),
                    None,
                )
                .await
            }
            _ => {
                api(
                    &running,
                    Method::DELETE,
                    "/api/pools/rc_swaps/backends/web-5",
                    None,
                    None,
                )
                .await
            }
        };
        assert_eq!(status, 200, "round {round}: {body}");
        // Twenty reloads, after a DELETE so the file and the API agree on web-5 being out,
        // alternating between two valid files.
        if round % 4 == 3 && round < 80 {
            let backends = if round % 8 == 3 {
                &nodes[..3]
            } else {
                &nodes[1..4]
            };
            file.write(&pool(backends));
            let (status, body) = api(&running, Method::POST, "/api/reload", None, None).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body, json!({ "result": "ok" }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (done, failed) = load.await.unwrap();
    assert!(done > 200, "the load ran throughout: {done} requests");
    assert_eq!(failed, 0, "{failed} of {done} requests failed");
    // Nodes removed and re-added many times over still come up: none inherits a stale streak.
    wait_until("every node of the last list is up", || async {
        listed(&running, "rc_swaps")
            .await
            .iter()
            .all(|(_, state)| state == "up")
    })
    .await;
    let metrics = scrape(&running).await;
    assert_eq!(
        series(&metrics, "fulcrum_config_reloads_total{result=\"ok\"}").map(|n| n >= 20.0),
        Some(true),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_invalid_reload_is_refused_with_file_lines_and_the_old_config_keeps_serving() {
    let nodes = webnodes(2).await;
    let good = single_pool("rc_bad", "round_robin", &nodes_as_backends(&nodes[..1]), "");
    let file = ConfigFile::new("rc-bad", &good);
    let running = fulcrum::start_file(file.path()).await.unwrap();

    file.write(&good.replace("strategy = \"round_robin\"", "strategy = \"fastest\""));
    let (status, body) = api(&running, Method::POST, "/api/reload", None, None).await;
    assert_eq!(status, 400, "{body}");
    let errors = body["errors"][0].as_str().unwrap();
    let expected = format!("{}:", file.path().display());
    assert!(errors.starts_with(&expected), "{body}");
    assert!(
        errors.contains("pools.rc_bad.strategy: unknown strategy"),
        "{body}"
    );

    for _ in 0..5 {
        let reply = get(&client(), &url(&running, "/")).await;
        assert_eq!(
            (reply.status.as_u16(), reply.served_by()),
            (200, "web-1".into())
        );
    }
    assert_eq!(listed(&running, "rc_bad").await.len(), 1);
    // The counter is process-wide and other tests in this binary reject reloads too.
    let metrics = scrape(&running).await;
    assert_eq!(
        series(&metrics, "fulcrum_config_reloads_total{result=\"error\"}").map(|n| n >= 1.0),
        Some(true),
        "{metrics}"
    );

    // A fixed file goes through, and the node it adds must pass its checks before traffic.
    file.write(&single_pool(
        "rc_bad",
        "round_robin",
        &nodes_as_backends(&nodes),
        &FAST_CHECKS.replace("POOL", "rc_bad"),
    ));
    let (status, _) = api(&running, Method::POST, "/api/reload", None, None).await;
    assert_eq!(status, 200);
    let states = listed(&running, "rc_bad").await;
    assert_eq!(states[0], ("web-1".into(), "up".into()), "kept its health");
    assert_eq!(states[1], ("web-2".into(), "pending".into()), "{states:?}");
    wait_until("the reloaded node passes its check", || async {
        listed(&running, "rc_bad").await[1].1 == "up"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_finishes_its_request_then_gets_nothing_and_leaves() {
    let nodes = webnodes(2).await;
    let running = balancer(&single_pool(
        "rc_drain",
        "least_connections",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    // Two slow requests: least connections puts one on each node.
    let slow = url(&running, "/slow?ms=1000");
    let in_flight: Vec<_> = (0..2)
        .map(|_| {
            let slow = slow.clone();
            tokio::spawn(async move { get(&client(), &slow).await })
        })
        .collect();
    let web_1 = node(&running, "web-1");
    wait_until("web-1 has its slow request", || {
        let web_1 = web_1.clone();
        async move { web_1.in_flight() == 1 }
    })
    .await;
    let served_before = web_1.requests();

    let (status, body) = api(
        &running,
        Method::DELETE,
        "/api/pools/rc_drain/backends/web-1?drain=10s",
        None,
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["backends"][0]["state"], "draining", "{body}");
    for _ in 0..20 {
        assert_eq!(
            get(&client(), &url(&running, "/")).await.served_by(),
            "web-2"
        );
    }
    let mut served = Vec::new();
    for request in in_flight {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 200, "the in-flight request completes");
        served.push(reply.served_by());
    }
    served.sort();
    assert_eq!(served, ["web-1", "web-2"]);
    wait_until("the drained node leaves the pool", || async {
        listed(&running, "rc_drain").await.len() == 1
    })
    .await;
    assert_eq!(
        web_1.requests(),
        served_before,
        "no new request after the drain began"
    );
}

#[tokio::test]
async fn mutations_without_the_token_are_refused_and_change_nothing() {
    let nodes = webnodes(2).await;
    let toml = single_pool(
        "rc_auth",
        "round_robin",
        &nodes_as_backends(&nodes[..1]),
        "",
    )
    .replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"s3cret\"",
    );
    let file = ConfigFile::new("rc-auth", &toml);
    let running = fulcrum::start_file(file.path()).await.unwrap();
    let add = || Some(spec(&nodes[1]));
    for token in [None, Some("wrong"), Some("s3cre"), Some("s3crets")] {
        let attempts = [
            api(
                &running,
                Method::POST,
                "/api/pools/rc_auth/backends",
                add(),
                token,
            )
            .await,
            api(
                &running,
                Method::PUT,
                "/api/pools/rc_auth/backends",
                Some(json!([])),
                token,
            )
            .await,
            api(
                &running,
                Method::DELETE,
                "/api/pools/rc_auth/backends/web-1",
                None,
                token,
            )
            .await,
            api(&running, Method::POST, "/api/reload", None, token).await,
        ];
        for (status, body) in attempts {
            assert_eq!(status, 401, "token {token:?}: {body}");
            assert!(body["error"].is_string());
        }
    }
    assert_eq!(
        listed(&running, "rc_auth").await.len(),
        1,
        "reads stay open; nothing changed"
    );
    let (status, body) = api(
        &running,
        Method::POST,
        "/api/pools/rc_auth/backends",
        add(),
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(listed(&running, "rc_auth").await.len(), 2);
}

#[tokio::test]
async fn bad_requests_get_400_404_409_with_a_json_error_and_change_nothing() {
    let nodes = webnodes(2).await;
    let running = balancer(&single_pool(
        "rc_errors",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    let path = "/api/pools/rc_errors/backends";
    let raw_post = |body: &'static str| {
        let admin = running.admin_addr().unwrap();
        async move {
            let request = Request::post(format!("http://{admin}/api/pools/rc_errors/backends"))
                .header("content-type", "application/json")
                .body(full(body))
                .unwrap();
            send(&client(), request).await
        }
    };
    let reply = raw_post("{not json").await;
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("invalid JSON"), "{}", reply.text());

    let cases = [
        (
            Method::POST,
            path.to_owned(),
            Some(json!({"address": "nope"})),
            400,
        ),
        (
            Method::POST,
            path.to_owned(),
            Some(json!({"address": "127.0.0.1:1", "weight": 0})),
            400,
        ),
        (
            Method::POST,
            path.to_owned(),
            Some(json!({"address": "127.0.0.1:1", "colour": "red"})),
            400,
        ),
        (
            Method::PUT,
            path.to_owned(),
            Some(json!({"address": "127.0.0.1:1"})),
            400,
        ),
        (
            Method::POST,
            "/api/pools/nope/backends".to_owned(),
            Some(json!({"address": "127.0.0.1:1"})),
            404,
        ),
        (Method::DELETE, format!("{path}/nobody"), None, 404),
        (
            Method::DELETE,
            format!("{path}/web-1?drain=soon"),
            None,
            400,
        ),
        (
            Method::POST,
            path.to_owned(),
            Some(json!({"address": "127.0.0.1:1", "name": "web-1"})),
            409,
        ),
        (
            Method::POST,
            path.to_owned(),
            Some(
                spec(&nodes[0])
                    .as_object()
                    .map(|o| {
                        let mut o = o.clone();
                        o.insert("name".into(), json!("fresh-name"));
                        Value::Object(o)
                    })
                    .unwrap(),
            ),
            409,
        ),
        (
            Method::PUT,
            path.to_owned(),
            Some(json!([{"address": "127.0.0.1:1"}, {"address": "127.0.0.1:1", "name": "x"}])),
            409,
        ),
    ];
    for (method, path, body, expected) in cases {
        let (status, reply) = api(&running, method.clone(), &path, body.clone(), None).await;
        assert_eq!(
            status.as_u16(),
            expected,
            "{method} {path} {body:?}: {reply}"
        );
        assert!(reply["error"].is_string(), "{reply}");
    }
    let names: Vec<String> = listed(&running, "rc_errors")
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["web-1", "web-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_at_runtime_waits_for_rise_passes_before_traffic() {
    let nodes = webnodes(2).await;
    let running = balancer(&single_pool(
        "rc_rise",
        "round_robin",
        &nodes_as_backends(&nodes[..1]),
        "[pools.rc_rise.health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 3\n",
    ))
    .await;
    let (status, body) = api(
        &running,
        Method::POST,
        "/api/pools/rc_rise/backends",
        Some(spec(&nodes[1])),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["backends"][1]["state"], "pending", "{body}");
    // Three passes at 200 ms take at least 400 ms after the first: until then only web-1.
    for _ in 0..10 {
        assert_eq!(
            get(&client(), &url(&running, "/")).await.served_by(),
            "web-1"
        );
    }
    wait_until("web-2 passes three checks", || async {
        listed(&running, "rc_rise").await[1].1 == "up"
    })
    .await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(get(&client(), &url(&running, "/")).await.served_by());
    }
    assert!(seen.contains("web-2"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_of_a_running_process() {
    let nodes = webnodes(2).await;
    let (listen, admin) = (free_port().await, free_port().await);
    let config = |backends: &[fulcrum::webnode::WebNode]| {
        single_pool("rc_hup", "round_robin", &nodes_as_backends(backends), "")
            .replace(
                "name = \"http\"\nbind = \"127.0.0.1:0\"",
                &format!("name = \"http\"\nbind = \"{listen}\""),
            )
            .replace(
                "[admin]\nbind = \"127.0.0.1:0\"",
                &format!("[admin]\nbind = \"{admin}\""),
            )
    };
    let file = ConfigFile::new("rc-hup", &config(&nodes[..1]));
    let child = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["run", "-c"])
        .arg(file.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let process = Process(child);
    wait_until("the balancer listens", || async {
        TcpStream::connect(admin).await.is_ok()
    })
    .await;
    let count = || async {
        let (_, body) = api_at(admin, Method::GET, "/api/pools", None, None).await;
        body["pools"]["rc_hup"]["backends"]
            .as_array()
            .map_or(0, Vec::len)
    };
    assert_eq!(count().await, 1);

    file.write(&config(&nodes));
    let status = Command::new("kill")
        .args(["-HUP", &process.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_until("SIGHUP applied the new file", || async {
        count().await == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_listeners_and_a_removed_one_finishes_its_requests() {
    let nodes = webnodes(1).await;
    let base = single_pool(
        "rc_listeners",
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    );
    let file = ConfigFile::new("rc-listeners", &base);
    let running = fulcrum::start_file(file.path()).await.unwrap();
    let old = running.addr("http").unwrap();

    // Add a second listener.
    let extra = free_port().await;
    let with_extra = format!("{base}\n[[listeners]]\nname = \"extra\"\nbind = \"{extra}\"\n");
    file.write(&with_extra);
    let (status, body) = api(&running, Method::POST, "/api/reload", None, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(running.addr("extra"), Some(extra));
    assert_eq!(
        running.addr("http"),
        Some(old),
        "the kept listener did not move"
    );
    assert_eq!(
        get(&client(), &format!("http://{extra}/")).await.status,
        200
    );

    // A listener whose address is taken fails the whole reload; nothing changes.
    let taken = running.admin_addr().unwrap();
    file.write(&format!(
        "{with_extra}\n[[listeners]]\nname = \"clash\"\nbind = \"{taken}\"\n"
    ));
    let (status, body) = api(&running, Method::POST, "/api/reload", None, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["errors"][0]
            .as_str()
            .unwrap()
            .contains(&taken.to_string()),
        "{body}"
    );
    assert_eq!(running.addr("clash"), None);

    // Remove the first listener while a slow request is in flight on it.
    let slow =
        tokio::spawn(async move { get(&client(), &format!("http://{old}/slow?ms=1000")).await });
    let web_1 = node(&running, "web-1");
    wait_until("the slow request reaches the node", || async {
        web_1.in_flight() == 1
    })
    .await;
    let only_extra = with_extra.replacen(
        "[[listeners]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n",
        "",
        1,
    );
    assert!(!only_extra.contains("name = \"http\""), "{only_extra}");
    file.write(&only_extra);
    let (status, body) = api(&running, Method::POST, "/api/reload", None, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(running.addr("http"), None);
    assert_eq!(
        web_1.in_flight(),
        1,
        "the slow request ended before its listener was removed: nothing was tested"
    );
    assert_eq!(
        slow.await.unwrap().status,
        200,
        "the request in flight finished"
    );
    wait_until("the removed listener stops accepting", || async {
        TcpStream::connect(old).await.is_err()
    })
    .await;
    assert_eq!(
        get(&client(), &format!("http://{extra}/")).await.status,
        200
    );
}
