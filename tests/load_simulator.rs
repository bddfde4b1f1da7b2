//! `fulcrum load` against real servers on 127.0.0.1:0: counts, open-loop rate, error kinds,
//! per-user cookie jars, source addresses, and the report's JSON and SVG forms.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use fulcrum::load::{self, LoadArgs, Mode, Report};
use fulcrum::webnode::{self, WebNode, WebNodeOptions};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// The flags exactly as `fulcrum load` takes them.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    load: LoadArgs,
}

fn args(flags: &[&str]) -> LoadArgs {
    Cli::try_parse_from(std::iter::once("load").chain(flags.iter().copied()))
        .unwrap_or_else(|e| panic!("flags {flags:?} parse: {e}"))
        .load
}

async fn run(flags: &[&str]) -> Report {
    load::run(&args(flags)).await.expect("the run starts")
}

async fn web_node(id: &str) -> WebNode {
    webnode::spawn(WebNodeOptions::new("127.0.0.1:0".parse().unwrap(), id))
        .await
        .expect("web node starts")
}

/// A hand-written HTTP/1.1 backend for what the web node has no knob for; the handler sees
/// the peer address.
async fn backend<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(SocketAddr, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = handler(peer, req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn served_by(name: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .header("x-served-by", name)
        .body(Full::new(Bytes::from_static(b"ok")))
        .unwrap()
}

fn counts(report: &Report) -> BTreeMap<&str, u64> {
    report
        .nodes
        .iter()
        .map(|(name, n)| (name.as_str(), n.responses))
        .collect()
}

#[tokio::test]
async fn two_hundred_requests_against_one_node_are_all_served_by_it() {
    let node = web_node("web-1").await;
    let url = format!("http://{}/", node.local_addr());
    let report = run(&["--url", &url, "--requests", "200"]).await;

    assert_eq!(report.requests, 200);
    assert_eq!(counts(&report), BTreeMap::from([("web-1", 200)]));
    assert_eq!(report.nodes["web-1"].share_pct, 100.0);
    assert_eq!(report.statuses, BTreeMap::from([(200, 200)]));
    assert_eq!(report.errors.total, 0, "{report:#?}");
    assert_eq!(report.unfinished, 0);
    assert_eq!(report.mode, Mode::Closed);
    assert_eq!(report.users, 10);
    assert_eq!(report.latency_ms.samples, 200);
    assert!(report.latency_ms.p50 > 0.0 && report.latency_ms.p50 <= report.latency_ms.max);
    let per_second: u64 = report.timeline.iter().map(|s| s.responses).sum();
    assert_eq!(per_second, 200);
    assert_eq!(node.requests(), 200);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_at_100_per_second_for_2s_sends_about_200() {
    let node = web_node("web-1").await;
    let url = format!("http://{}/", node.local_addr());
    let started = Instant::now();
    let report = run(&["--url", &url, "--rate", "100", "--duration", "2s"]).await;

    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the run stops by itself"
    );
    assert_eq!(report.mode, Mode::Open);
    assert_eq!(report.target_rate, Some(100.0));
    assert!(
        (180..=220).contains(&report.requests),
        "sent {} requests",
        report.requests
    );
    assert!(
        (90.0..=110.0).contains(&report.achieved_rate),
        "{report:#?}"
    );
    assert_eq!(report.errors.total, 0);
    assert!(
        (2..=3).contains(&report.timeline.len()),
        "{:?}",
        report.timeline
    );
    // Each whole second carries about its hundred.
    for second in &report.timeline[..2] {
        assert!((70..=130).contains(&second.responses), "{second:?}");
        assert_eq!(second.nodes.get("web-1"), Some(&second.responses));
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_closed_port_counts_as_connect_errors() {
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = port.local_addr().unwrap();
    drop(port);
    let url = format!("http://{addr}/");
    let report = run(&["--url", &url, "--requests", "50", "--users", "2"]).await;

    assert_eq!(report.requests, 50);
    assert_eq!(report.errors.connect, 50, "{:?}", report.errors);
    assert_eq!(report.errors.total, 50);
    assert!(report.nodes.is_empty());
    assert_eq!(report.latency_ms.samples, 0);
}

#[tokio::test]
async fn answers_5xx_are_status_errors_and_4xx_are_not() {
    let node = web_node("web-1").await;
    let url = format!("http://{}/", node.local_addr());
    let report = run(&[
        "--url",
        &url,
        "--path",
        "/status/503",
        "--path",
        "/status/404",
        "--requests",
        "20",
    ])
    .await;

    assert_eq!(report.statuses, BTreeMap::from([(404, 10), (503, 10)]));
    assert_eq!(report.errors.status, 10, "{:?}", report.errors);
    assert_eq!(report.errors.total, 10);
    // An answer is an answer: both count for the node that gave them.
    assert_eq!(counts(&report), BTreeMap::from([("web-1", 20)]));
    node.shutdown().await;
}

#[tokio::test]
async fn an_answer_slower_than_timeout_is_a_timeout() {
    let node = web_node("web-1").await;
    let url = format!("http://{}/slow?ms=2000", node.local_addr());
    let started = Instant::now();
    let report = run(&[
        "--url",
        &url,
        "--timeout",
        "200ms",
        "--duration",
        "1s",
        "--users",
        "2",
    ])
    .await;

    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "a run does not wait for slow answers past its duration"
    );
    assert!(report.errors.timeout >= 6, "{:?}", report.errors);
    assert_eq!(report.errors.total, report.errors.timeout);
    assert_eq!(report.requests, report.errors.timeout);
    assert!(report.nodes.is_empty());
    node.shutdown().await;
}

#[tokio::test]
async fn a_connection_closed_mid_request_is_a_reset() {
    // Reads the request head, then hangs up without answering.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    let url = format!("http://{addr}/");
    let report = run(&["--url", &url, "--requests", "10", "--users", "2"]).await;

    assert_eq!(report.errors.reset, 10, "{:?}", report.errors);
    assert_eq!(report.errors.total, 10);
}

#[tokio::test]
async fn each_user_keeps_its_own_cookie_jar() {
    // Sets `session=sN` on a request without one; names the session it got back otherwise.
    let sessions = Arc::new(AtomicU64::new(0));
    let addr = backend(move |_peer, req: Request<Incoming>| {
        let sessions = sessions.clone();
        async move {
            let cookie = req
                .headers()
                .get(http::header::COOKIE)
                .map(|v| v.to_str().unwrap().to_owned());
            match cookie {
                Some(cookie) => served_by(&format!("back:{cookie}")),
                None => {
                    let n = sessions.fetch_add(1, Ordering::SeqCst) + 1;
                    let mut answer = served_by("new");
                    answer.headers_mut().insert(
                        http::header::SET_COOKIE,
                        format!("session=s{n}; Path=/; HttpOnly").parse().unwrap(),
                    );
                    answer
                }
            }
        }
    })
    .await;
    let url = format!("http://{addr}/");
    let report = run(&["--url", &url, "--users", "2", "--requests", "10"]).await;

    let seen = counts(&report);
    assert_eq!(
        seen.get("new"),
        Some(&2),
        "one new session per user: {seen:?}"
    );
    let back: Vec<&str> = seen
        .keys()
        .filter(|k| k.starts_with("back:"))
        .copied()
        .collect();
    assert_eq!(
        back,
        ["back:session=s1", "back:session=s2"],
        "each user sends its own cookie back: {seen:?}"
    );
    assert_eq!(seen.values().sum::<u64>(), 10);
    assert_eq!(report.errors.total, 0);
}

#[tokio::test]
async fn source_ips_become_the_peer_addresses_the_backend_sees() {
    let addr =
        backend(|peer: SocketAddr, _req| async move { served_by(&peer.ip().to_string()) }).await;
    let url = format!("http://{addr}/");
    let report = run(&[
        "--url",
        &url,
        "--users",
        "4",
        "--requests",
        "40",
        "--source-ips",
        "127.0.0.2-127.0.0.3",
    ])
    .await;

    let peers: Vec<&str> = report.nodes.keys().map(String::as_str).collect();
    assert_eq!(peers, ["127.0.0.2", "127.0.0.3"], "{report:#?}");
    assert_eq!(report.errors.total, 0);
}

#[tokio::test]
async fn round_robin_through_the_balancer_switches_a_user_every_request() {
    let (a, b) = (web_node("web-1").await, web_node("web-2").await);
    let config = format!(
        r#"
shutdown_grace = "1s"
[[listeners]]
name = "http"
bind = "127.0.0.1:0"
[pools.web]
strategy = "round_robin"
backends = [{{ name = "web-1", address = "{}" }}, {{ name = "web-2", address = "{}" }}]
"#,
        a.local_addr(),
        b.local_addr()
    );
    let config = fulcrum::config::Config::parse(Path::new("load.toml"), &config).unwrap();
    let running = fulcrum::start(&config).await.expect("balancer starts");
    let url = format!("http://{}/", running.addr("http").unwrap());
    let report = run(&["--url", &url, "--users", "1", "--requests", "10"]).await;

    assert_eq!(
        counts(&report),
        BTreeMap::from([("web-1", 5), ("web-2", 5)])
    );
    assert_eq!(report.sessions.switches, 9);
    assert_eq!(report.sessions.users_switched, 1);
    running.shutdown().await;
}

#[tokio::test]
async fn json_and_svg_outputs_are_written() {
    let node = web_node("web-1").await;
    let url = format!("http://{}/", node.local_addr());
    let svg = std::env::temp_dir().join(format!("fulcrum-load-{}.svg", std::process::id()));
    let svg_arg = svg.to_str().unwrap().to_owned();
    let flags = [
        "--url",
        &url,
        "--requests",
        "30",
        "--json",
        "--svg",
        &svg_arg,
        "--title",
        "drill one",
    ];
    let report = run(&flags).await;

    let printed = load::render(&report, &args(&flags)).expect("render");
    let parsed: Report = serde_json::from_str(&printed).expect("--json prints the report");
    // Floats may come back an ULP off through serde_json's parser; everything else is exact.
    assert_eq!(parsed.requests, report.requests);
    assert_eq!(parsed.nodes.keys().collect::<Vec<_>>(), ["web-1"]);
    assert_eq!(parsed.timeline, report.timeline);
    assert_eq!(parsed.errors, report.errors);
    let value: serde_json::Value = serde_json::from_str(&printed).unwrap();
    assert!(value["started_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(value["nodes"]["web-1"]["responses"], 30);
    assert_eq!(value["timeline"][0]["nodes"]["web-1"], 30);

    let drawn = std::fs::read_to_string(&svg).expect("the chart was written");
    std::fs::remove_file(&svg).unwrap();
    assert!(
        drawn.starts_with("<svg"),
        "{}",
        &drawn[..drawn.len().min(200)]
    );
    for text in ["drill one", "web-1", "errors", "seconds since start"] {
        assert!(drawn.contains(text), "the chart shows {text:?}");
    }

    let table = report.to_table();
    assert!(
        table.contains("web-1") && table.contains("p99.9"),
        "{table}"
    );
    node.shutdown().await;
}

#[test]
fn the_command_line_defaults_are_load_args_new() {
    assert_eq!(args(&["--url", "http://h/"]), LoadArgs::new("http://h/"));
}

async fn start_error(flags: &[&str]) -> String {
    load::run(&args(flags)).await.unwrap_err().to_string()
}

#[tokio::test]
async fn runs_that_cannot_start_say_why() {
    assert_eq!(
        start_error(&["--url", "https://127.0.0.1:1/"]).await,
        "--url `https://127.0.0.1:1/` must be an absolute http:// URL (https is not supported yet)"
    );
    assert_eq!(
        start_error(&["--url", "http://127.0.0.1:1/", "--rate", "0"]).await,
        "--rate must be a number of requests per second above 0 and at most 1000000 (got 0)"
    );
    assert_eq!(
        start_error(&[
            "--url",
            "http://[::1]:1/",
            "--source-ips",
            "127.0.0.2-127.0.0.3"
        ])
        .await,
        "--source-ips 127.0.0.2-127.0.0.3 and the target ::1 are different IP versions"
    );
    let bad = Cli::try_parse_from(["load", "--url", "x", "--source-ips", "127.0.0.9-127.0.0.2"]);
    assert!(
        bad.err().unwrap().to_string().contains("runs backwards"),
        "a bad range is a usage error"
    );
}
