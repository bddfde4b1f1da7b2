//! Metric series follow the pool: a node's series leave the very next scrape when it leaves,
//! a node that returns under the same name starts fresh, a pool dropped by a reload takes its
//! series along, and a scrape after every kind of traffic passes `promtool check metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;

use fulcrum::Running;
use http::{Method, Request, Response, StatusCode, header};
use serde_json::json;
use support::admin_api::{ConfigFile, api};
use support::*;
use tokio::sync::Notify;

/// Scrape lines (not comments) of the series labelled with `pool` and `backend`.
fn of_node<'a>(scrape: &'a str, pool: &str, backend: &str) -> Vec<&'a str> {
    let (pool, backend) = (format!("pool=\"{pool}\""), format!("backend=\"{backend}\""));
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&pool) && l.contains(&backend))
        .collect()
}

/// Scrape lines (not comments) of the series labelled with `pool`.
fn of_pool<'a>(scrape: &'a str, pool: &str) -> Vec<&'a str> {
    let pool = format!("pool=\"{pool}\"");
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&pool))
        .collect()
}

fn requests(scrape: &str, pool: &str, backend: &str, code: u16) -> Option<f64> {
    series(
        scrape,
        &format!("fulcrum_requests_total{{pool=\"{pool}\",backend=\"{backend}\",code=\"{code}\"}}"),
    )
}

fn up(scrape: &str, pool: &str, backend: &str) -> Option<f64> {
    series(
        scrape,
        &format!("fulcrum_backend_up{{pool=\"{pool}\",backend=\"{backend}\"}}"),
    )
}

/// Checks once a second and needs two passes: a node re-added is still pending when the test
/// scrapes right after adding it.
const SLOW_RISE: &str =
    "[pools.POOL.health]\ninterval = \"1s\"\ntimeout = \"500ms\"\nfall = 3\nrise = 2\n";

#[tokio::test]
async fn a_removed_node_leaves_the_very_next_scrape_and_returns_with_fresh_series() {
    let pool = "ms_remove";
    let nodes = webnodes(3).await;
    let running = balancer(&single_pool(
        pool,
        "round_robin",
        &nodes_as_backends(&nodes),
        &SLOW_RISE.replace("POOL", pool),
    ))
    .await;
    let client = client();
    for _ in 0..30 {
        assert_eq!(get(&client, &url(&running, "/")).await.status, 200);
    }
    let passed =
        format!("fulcrum_health_checks_total{{pool=\"{pool}\",backend=\"web-2\",result=\"pass\"}}");
    wait_until("web-2 passed a health check", || async {
        series(&scrape(&running).await, &passed).is_some_and(|n| n >= 1.0)
    })
    .await;
    let before = scrape(&running).await;
    let web2 = of_node(&before, pool, "web-2");
    for metric in [
        "fulcrum_requests_total{",
        "fulcrum_request_duration_seconds_bucket{",
        "fulcrum_request_duration_seconds_count{",
        "fulcrum_backend_in_flight{",
        "fulcrum_backend_up{",
        "fulcrum_health_checks_total{",
        "fulcrum_backend_transitions_total{",
        "fulcrum_proxy_errors_total{",
    ] {
        assert!(
            web2.iter().any(|l| l.starts_with(metric)),
            "no {metric} series of web-2 before it leaves:\n{before}"
        );
    }
    assert_eq!(requests(&before, pool, "web-2", 200), Some(10.0));

    let (status, body) = api(
        &running,
        Method::DELETE,
        &format!("/api/pools/{pool}/backends/web-2"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let after = scrape(&running).await;
    assert_eq!(
        of_node(&after, pool, "web-2"),
        Vec::<&str>::new(),
        "series of the removed node are still scraped"
    );
    for other in ["web-1", "web-3"] {
        assert_eq!(requests(&after, pool, other, 200), Some(10.0), "{after}");
        assert_eq!(up(&after, pool, other), Some(1.0), "{after}");
        assert!(of_node(&after, pool, other).len() >= web2.len(), "{after}");
    }

    let (status, body) = api(
        &running,
        Method::POST,
        &format!("/api/pools/{pool}/backends"),
        Some(json!({ "name": "web-2", "address": nodes[1].local_addr().to_string() })),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let fresh = scrape(&running).await;
    assert_eq!(
        up(&fresh, pool, "web-2"),
        Some(0.0),
        "pending, not the old 1"
    );
    assert_eq!(requests(&fresh, pool, "web-2", 200), None, "{fresh}");
    let count =
        format!("fulcrum_request_duration_seconds_count{{pool=\"{pool}\",backend=\"web-2\"}}");
    assert_eq!(series(&fresh, &count), Some(0.0), "{fresh}");

    let returned = node(&running, "web-2");
    wait_until("the returning web-2 passes rise checks", || async {
        returned.health() == fulcrum::pool::Health::Up
    })
    .await;
    for _ in 0..30 {
        assert_eq!(get(&client, &url(&running, "/")).await.status, 200);
    }
    let later = scrape(&running).await;
    assert_eq!(
        requests(&later, pool, "web-2", 200),
        Some(10.0),
        "counted from zero again"
    );
    assert_eq!(series(&later, &count), Some(10.0));
    assert_eq!(up(&later, pool, "web-2"), Some(1.0));
    assert_eq!(requests(&later, pool, "web-1", 200), Some(20.0));
}

#[tokio::test]
async fn a_request_in_flight_on_a_removed_node_does_not_bring_its_series_back() {
    let pool = "ms_in_flight";
    // Answers `/teapot` with a status no request of this node has had yet, once the test has
    // removed the node and looked at the scrape.
    let release = Arc::new(Notify::new());
    let slow = backend({
        let release = release.clone();
        move |req| {
            let release = release.clone();
            async move {
                if req.uri().path() == "/teapot" {
                    release.notified().await;
                    return Response::builder()
                        .status(418)
                        .body(full("teapot"))
                        .unwrap();
                }
                Response::new(full("ok"))
            }
        }
    })
    .await;
    let running = balancer(&single_pool(
        pool,
        "round_robin",
        &[("slow", slow.addr, 1)],
        "",
    ))
    .await;
    let target = url(&running, "/teapot");
    let in_flight = tokio::spawn(async move { get(&client(), &target).await.status });
    wait_until("the request reached the node", || async {
        slow.requests() == 1
    })
    .await;
    let (status, body) = api(
        &running,
        Method::DELETE,
        &format!("/api/pools/{pool}/backends/slow"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        of_node(&scrape(&running).await, pool, "slow"),
        Vec::<&str>::new()
    );

    release.notify_one();
    assert_eq!(
        in_flight.await.unwrap(),
        StatusCode::IM_A_TEAPOT,
        "a request in flight completes"
    );
    let after = scrape(&running).await;
    assert_eq!(
        of_node(&after, pool, "slow"),
        Vec::<&str>::new(),
        "its 418, duration and in-flight count must not recreate the node's series"
    );
}

#[tokio::test]
async fn a_pool_dropped_by_a_reload_takes_its_series_along() {
    let nodes = webnodes(2).await;
    let config = |with_dropped: bool| {
        let mut text = format!(
            r#"
shutdown_grace = "5s"
[[listeners]]
name = "http"
bind = "127.0.0.1:0"
[admin]
bind = "127.0.0.1:0"
[pools.ms_kept]
backends = [{{ name = "web-1", address = "{}" }}]
"#,
            nodes[0].local_addr()
        );
        if with_dropped {
            text.push_str(&format!(
                "[pools.ms_dropped]\nbackends = [{{ name = \"web-2\", address = \"{}\" }}]\n\
                 [[routes]]\nhost = \"dropped.test\"\npool = \"ms_dropped\"\n",
                nodes[1].local_addr()
            ));
        }
        text.push_str("[[routes]]\npool = \"ms_kept\"\n");
        text
    };
    let file = ConfigFile::new("ms-dropped", &config(true));
    let running = fulcrum::start_file(file.path()).await.unwrap();
    let client = client();
    for host in ["dropped.test", "kept.test", "dropped.test"] {
        let request = Request::get(url(&running, "/"))
            .header(header::HOST, host)
            .body(empty())
            .unwrap();
        assert_eq!(send(&client, request).await.status, 200);
    }
    let before = scrape(&running).await;
    assert_eq!(requests(&before, "ms_dropped", "web-2", 200), Some(2.0));
    assert!(
        of_pool(&before, "ms_dropped")
            .iter()
            .any(|l| l.contains("backend=\"none\"")),
        "pool-level series exist before the reload:\n{before}"
    );

    file.write(&config(false));
    let (status, body) = api(&running, Method::POST, "/api/reload", None, None).await;
    assert_eq!(status, 200, "{body}");
    let after = scrape(&running).await;
    assert_eq!(
        of_pool(&after, "ms_dropped"),
        Vec::<&str>::new(),
        "series of the dropped pool are still scraped"
    );
    assert_eq!(
        requests(&after, "ms_kept", "web-1", 200),
        Some(1.0),
        "{after}"
    );
    assert_eq!(up(&after, "ms_kept", "web-1"), Some(1.0), "{after}");
}

/// `promtool check metrics` on `text`: every metric needs HELP, a TYPE, valid names and
/// values. CI installs promtool (Debian's `prometheus` package); elsewhere a missing promtool
/// fails the test unless `FULCRUM_SKIP_PROMTOOL=1` says to skip it.
fn promtool_check(text: &str) {
    if !tool_available(
        "promtool",
        "FULCRUM_SKIP_PROMTOOL",
        "Debian/Ubuntu: `apt-get install prometheus`, or a Prometheus release tarball",
    ) {
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// GET `/` with `Host: host` (and a cookie), as routes and sticky pools see it.
async fn get_host(running: &Running, host: &str, cookie: Option<&str>) -> Reply {
    let mut request = Request::get(url(running, "/")).header(header::HOST, host);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    send(&client(), request.body(empty()).unwrap()).await
}

#[tokio::test]
async fn a_scrape_after_every_kind_of_traffic_passes_promtool() {
    let nodes = webnodes(3).await;
    let dead = free_port().await;
    // Nothing listens there: the registry's store gauge reads 0.
    let no_store = free_port().await;
    let toml = format!(
        r#"
shutdown_grace = "5s"
[[listeners]]
name = "http"
bind = "127.0.0.1:0"
[admin]
bind = "127.0.0.1:0"
[registry]
bind = "127.0.0.1:0"
pool = "ms_lint_web"
store = "postgres://fulcrum@{no_store}/registry"

[pools.ms_lint_web]
strategy = "sticky_cookie"
backends = [{{ name = "web-1", address = "{web1}" }}, {{ name = "web-2", address = "{web2}" }}]
[pools.ms_lint_web.sticky]
secret = "lint-secret"
[pools.ms_lint_web.health]
interval = "100ms"
timeout = "300ms"

[pools.ms_lint_retry]
backends = [{{ name = "dead", address = "{dead}" }}, {{ name = "web-3", address = "{web3}" }}]

[pools.ms_lint_empty]
backends = [{{ name = "leaving", address = "{web3}" }}]

[[routes]]
host = "web.test"
pool = "ms_lint_web"
[[routes]]
host = "retry.test"
pool = "ms_lint_retry"
[[routes]]
host = "empty.test"
pool = "ms_lint_empty"
"#,
        web1 = nodes[0].local_addr(),
        web2 = nodes[1].local_addr(),
        web3 = nodes[2].local_addr(),
    );
    let running = balancer(&toml).await;

    // 2xx, and sticky: a new user, then the same user coming back.
    let first = get_host(&running, "web.test", None).await;
    assert_eq!(first.status, 200);
    let cookie = first
        .headers
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .expect("a sticky cookie")
        .to_owned();
    for _ in 0..3 {
        let again = get_host(&running, "web.test", Some(&cookie)).await;
        assert_eq!(again.served_by(), first.served_by());
    }
    // Retries: the dead node refuses, web-3 answers.
    for _ in 0..4 {
        assert_eq!(get_host(&running, "retry.test", None).await.status, 200);
    }
    // 404: no route.
    assert_eq!(get_host(&running, "nowhere.test", None).await.status, 404);
    // 503: a pool with no node left.
    let (status, body) = api(
        &running,
        Method::DELETE,
        "/api/pools/ms_lint_empty/backends/leaving",
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get_host(&running, "empty.test", None).await.status, 503);
    // A reload that fails: this balancer has no file.
    let (status, _) = api(&running, Method::POST, "/api/reload", None, None).await;
    assert!(status.is_client_error() || status.is_server_error());
    wait_until("health checks passed", || async {
        series(
            &scrape(&running).await,
            "fulcrum_health_checks_total{pool=\"ms_lint_web\",backend=\"web-1\",result=\"pass\"}",
        )
        .is_some_and(|n| n >= 1.0)
    })
    .await;

    let text = scrape(&running).await;
    for expected in [
        "fulcrum_sticky_total{pool=\"ms_lint_web\",outcome=\"hit\"} 3",
        "fulcrum_requests_total{pool=\"none\",backend=\"none\",code=\"404\"}",
        "fulcrum_proxy_errors_total{pool=\"ms_lint_empty\",backend=\"none\",kind=\"no_backend\"} 1",
        "fulcrum_proxy_errors_total{pool=\"ms_lint_retry\",backend=\"dead\",kind=\"connect\"}",
        "fulcrum_retries_total{pool=\"ms_lint_retry\"}",
        "fulcrum_request_duration_seconds_bucket{pool=\"ms_lint_web\"",
        "fulcrum_config_reloads_total{result=\"error\"}",
        "fulcrum_registry_events_total{event=\"register\"}",
        "fulcrum_downstream_connections{listener=\"http\"}",
        "fulcrum_registry_store_up 0",
    ] {
        assert!(text.contains(expected), "no {expected} in:\n{text}");
    }
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split(' ').nth(2).unwrap();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
    promtool_check(&text);
}
