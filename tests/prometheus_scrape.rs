//! A real Prometheus scrapes a real fulcrum under load with fulcrum's rules loaded: every
//! dashboard panel's expression and every rule's expression answers with data through the
//! HTTP API, every rule evaluates healthy, and killing a web node fires `FulcrumBackendDown`.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::registry::registry_config;
use support::tls::CertDir;
use support::*;

const POOL: &str = "prom_web";
/// Prometheus needs a few scrapes before `rate()` answers and its rule groups have run.
const PROMETHEUS_DEADLINE: Duration = Duration::from_secs(60);

/// Alerts whose metric only exists with a feature this balancer does not configure: they
/// must still evaluate healthy, but their expression has no series to answer with.
const WITHOUT_SERIES_HERE: &[&str] = &[
    // `fulcrum_registry_store_up` exists with `[registry] store` (PostgreSQL) only.
    "FulcrumRegistryStoreDown",
];

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

/// `s` as a URL query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Prometheus of the test's own, stopped (by its PID) when dropped.
struct Prometheus {
    addr: std::net::SocketAddr,
    dir: PathBuf,
    _process: Process,
}

impl Prometheus {
    /// Scrapes `target`'s `/metrics` every second with fulcrum's rules loaded, each rule's
    /// `for:` shortened to 1s so an alert fires within the test.
    async fn start(target: std::net::SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("fulcrum-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let rules = std::fs::read_to_string(deploy("prometheus/fulcrum-rules.yml")).unwrap();
        let rules: Vec<String> = rules
            .lines()
            .map(|line| match line.trim_start().strip_prefix("for:") {
                Some(_) => format!("{}for: 1s", &line[..line.len() - line.trim_start().len()]),
                None => line.to_owned(),
            })
            .collect();
        std::fs::write(dir.join("fulcrum-rules.yml"), rules.join("\n")).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - fulcrum-rules.yml\n\
                 scrape_configs:\n  - job_name: fulcrum\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = free_port().await;
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        Self {
            addr,
            dir,
            _process: Process(child),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/PATH`'s `data`, or `None` while Prometheus is not up or answers an error.
    async fn api(&self, path_and_query: &str) -> Option<Value> {
        let url = format!("http://{}/api/v1/{path_and_query}", self.addr);
        let response = tokio::time::timeout(
            DEADLINE,
            client().request(http::Request::get(url).body(empty()).unwrap()),
        )
        .await
        .ok()?
        .ok()?;
        let reply = collect(response).await;
        let body: Value = serde_json::from_slice(&reply.body).ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }

    /// The instant vector `expr` evaluates to now (empty when it has no series).
    async fn query(&self, expr: &str) -> Vec<Value> {
        self.api(&format!("query?query={}", encode(expr)))
            .await
            .and_then(|data| data["result"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Every rule Prometheus loaded, as `/api/v1/rules` lists it.
    async fn rules(&self) -> Vec<Value> {
        let data = self.api("rules").await.unwrap_or_default();
        data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `condition` until it holds or [`PROMETHEUS_DEADLINE`] passes; false if it never did.
async fn eventually<F, Fut>(mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if condition().await {
            return true;
        }
        if start.elapsed() > PROMETHEUS_DEADLINE {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An alert's expression without its final comparison (`a - b < 14 * 86400` -> `a - b`): what
/// the alert measures, which has data whether or not it fires.
fn measured(query: &str) -> &str {
    let bytes = query.as_bytes();
    let (mut depth, mut quoted, mut cut) = (0i32, false, None);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => quoted = !quoted,
            b'\\' if quoted => i += 1,
            b'(' | b'{' | b'[' if !quoted => depth += 1,
            b')' | b'}' | b']' if !quoted => depth -= 1,
            b'=' | b'!' | b'<' | b'>' if !quoted && depth == 0 => {
                let op = if bytes.get(i + 1) == Some(&b'=') {
                    2
                } else {
                    1
                };
                if op == 2 || matches!(bytes[i], b'<' | b'>') {
                    cut = Some(i);
                }
                i += op - 1;
            }
            _ => {}
        }
        i += 1;
    }
    cut.map_or(query, |at| query[..at].trim_end())
}

/// Every panel's expressions in the dashboard, with the template variables a user would pick
/// substituted: `(panel title, expr)`.
fn dashboard_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("grafana/fulcrum.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["schemaVersion"], 39);
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(variables, ["datasource", "pool", "backend"]);
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap().to_owned();
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$pool", POOL)
                .replace("$backend", ".*");
            assert!(
                !expr.contains('$'),
                "{title}: unsubstituted variable in {expr}"
            );
            exprs.push((title.clone(), expr));
        }
    }
    exprs
}

/// Traffic until `stop`: mostly `/`, every fifth request a `/status/503` from the node.
fn load(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let client = client();
        let mut sent = 0u64;
        // Bounded: a test that forgets to stop it still ends.
        while !stop.load(Ordering::Relaxed) && sent < 100_000 {
            let path = if sent % 5 == 4 { "status/503" } else { "" };
            let _ = get(&client, &format!("{url}{path}")).await;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sent
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_answers_every_panel_and_rule_and_fires_backend_down_when_a_node_dies() {
    if !tool_available(
        "prometheus",
        "FULCRUM_SKIP_PROMTOOL",
        "Debian/Ubuntu: `apt-get install prometheus`, or a Prometheus release tarball",
    ) {
        return;
    }
    let certs = CertDir::new("prometheus-scrape");
    let cert = certs.cert("prom", &["prom.test"]);
    let mut nodes = webnodes(3).await;
    let toml = registry_config(POOL, &nodes_as_backends(&nodes), "1s", "")
        + &tls::tls_listener("prom_tls", &cert.cert, &cert.key, "");
    let running = balancer(&toml).await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(url(&running, "/"), stop.clone());
    let prometheus = Prometheus::start(running.admin_addr().unwrap()).await;

    let scraped = eventually(|| async {
        !prometheus
            .query(&format!(
                "rate(fulcrum_requests_total{{pool=\"{POOL}\",code=\"503\"}}[1m]) > 0"
            ))
            .await
            .is_empty()
    })
    .await;
    assert!(
        scraped,
        "Prometheus never scraped fulcrum's traffic:\n{}",
        prometheus.log()
    );

    // Every panel answers with data (recording rules need an evaluation or two first).
    let mut silent = Vec::new();
    for (title, expr) in dashboard_exprs() {
        if !eventually(|| async { !prometheus.query(&expr).await.is_empty() }).await {
            silent.push(format!("panel {title:?}: {expr}"));
        }
    }

    // Every rule has run, healthy, and what it measures answers with data.
    let rules = prometheus.rules().await;
    assert!(rules.len() >= 16, "rules loaded: {rules:#?}");
    let evaluated = eventually(|| async {
        prometheus
            .rules()
            .await
            .iter()
            .all(|r| r["health"] == "ok" && r["lastEvaluation"] != "0001-01-01T00:00:00Z")
    })
    .await;
    assert!(
        evaluated,
        "a rule is unhealthy: {:#?}",
        prometheus.rules().await
    );
    for rule in &rules {
        let name = rule["name"].as_str().unwrap();
        let query = rule["query"].as_str().unwrap();
        let expr = match rule["type"].as_str() {
            // A recording rule's data is the series it records.
            Some("recording") => name,
            _ if WITHOUT_SERIES_HERE.contains(&name) => continue,
            _ => measured(query),
        };
        if !eventually(|| async { !prometheus.query(expr).await.is_empty() }).await {
            silent.push(format!("rule {name}: {expr}"));
        }
    }
    assert!(
        silent.is_empty(),
        "expressions without data:\n{}",
        silent.join("\n")
    );
    // The TLS listener's certificate, about a year ahead (rcgen's default validity).
    let days_left = prometheus
        .query("(fulcrum_tls_certificate_expiry_timestamp_seconds{listener=\"prom_tls\",name=\"prom.test\"} - time()) / 86400")
        .await;
    let days: f64 = days_left[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(days > 14.0, "days left {days}");

    // A node dies: its backend-down alert fires; the pool keeps two, so the pool alert stays quiet.
    let dead = nodes.remove(0);
    let dead_name = dead.id().to_owned();
    dead.shutdown().await;
    let fired = eventually(|| async {
        let alerts = prometheus.api("alerts").await.unwrap_or_default();
        alerts["alerts"].as_array().into_iter().flatten().any(|a| {
            a["labels"]["alertname"] == "FulcrumBackendDown"
                && a["labels"]["backend"] == dead_name.as_str()
                && a["labels"]["pool"] == POOL
                && a["state"] == "firing"
        })
    })
    .await;
    let alerts = prometheus.api("alerts").await.unwrap_or_default();
    assert!(
        fired,
        "FulcrumBackendDown did not fire for {dead_name}: {alerts:#}"
    );
    assert!(
        !alerts["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["labels"]["alertname"] == "FulcrumPoolNoRoutableBackend"),
        "{alerts:#}"
    );

    stop.store(true, Ordering::Relaxed);
    let sent = traffic.await.unwrap();
    assert!(sent > 0);
    drop(prometheus);
    running.shutdown().await;
}

#[test]
fn measured_drops_only_the_final_comparison() {
    assert_eq!(measured("fulcrum_backend_up == 0"), "fulcrum_backend_up");
    assert_eq!(
        measured("fulcrum_tls_certificate_expiry_timestamp_seconds - time() < 14 * 86400"),
        "fulcrum_tls_certificate_expiry_timestamp_seconds - time()"
    );
    assert_eq!(
        measured("increase(fulcrum_config_reloads_total{result=\"error\"}[15m]) > 0"),
        "increase(fulcrum_config_reloads_total{result=\"error\"}[15m])"
    );
    assert_eq!(measured("up{job=\"fulcrum\"} == 0"), "up{job=\"fulcrum\"}");
    assert_eq!(
        measured("sum without (backend) (x{a=~\"b|c\",d!=\"e\"}) >= 1"),
        "sum without (backend) (x{a=~\"b|c\",d!=\"e\"})"
    );
}
