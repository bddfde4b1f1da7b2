//! `fulcrum load`'s comparison figures against real web nodes on 127.0.0.1:0: `--visits` per
//! user, per-node shares and evenness, and session continuity read from `/session`.
//!
//! Users are moved between nodes by a tiny test balancer that routes each source address's
//! n-th request by a rule the test picks (`--source-ips` gives every user its own address), so
//! each expected figure is exact. fulcrum's own strategies are compared in their own tests.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use clap::Parser;
use fulcrum::load::{self, LoadArgs, Report};
use fulcrum::webnode::{self, SessionBackend, WebNode, WebNodeOptions};
use http::{Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use support::TestBody;
use support::redis_server::RedisServer;
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

async fn node(id: &str, sessions: SessionBackend) -> WebNode {
    let opts = WebNodeOptions::new("127.0.0.1:0".parse().unwrap(), id);
    webnode::spawn_with_sessions(opts, sessions)
        .await
        .expect("web node starts")
}

/// A test balancer: the `n`-th request (from 0) of each client address goes to
/// `nodes[route(n) % nodes.len()]`. Bodies and headers pass through as they are.
async fn balancer(nodes: Vec<SocketAddr>, route: fn(u64) -> usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<HashMap<IpAddr, u64>>> = Arc::default();
    let upstream = Client::builder(TokioExecutor::new()).build_http::<Incoming>();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let (nodes, seen, upstream) = (nodes.clone(), seen.clone(), upstream.clone());
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                        let n = {
                            let mut seen = seen.lock().unwrap();
                            let count = seen.entry(peer.ip()).or_default();
                            *count += 1;
                            *count - 1
                        };
                        let node = nodes[route(n) % nodes.len()];
                        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                        *req.uri_mut() = format!("http://{node}{path}").parse::<Uri>().unwrap();
                        let upstream = upstream.clone();
                        async move {
                            let answer: Response<TestBody> = match upstream.request(req).await {
                                Ok(resp) => resp.map(|b| b.map_err(Into::into).boxed()),
                                Err(_) => Response::builder()
                                    .status(StatusCode::BAD_GATEWAY)
                                    .body(support::empty())
                                    .unwrap(),
                            };
                            Ok::<_, Infallible>(answer)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn every_visit_elsewhere(n: u64) -> usize {
    n as usize
}

fn moved_once_after_three(n: u64) -> usize {
    usize::from(n >= 3)
}

/// The flags of a comparison run: `users` with their own source address, `visits` each.
fn session_run(url: &str, users: &str, visits: &str) -> Vec<String> {
    [
        "--url",
        url,
        "--users",
        users,
        "--visits",
        visits,
        "--source-ips",
        "127.0.0.2-127.0.1.250",
        "--duration",
        "30s",
    ]
    .map(str::to_owned)
    .to_vec()
}

async fn run_owned(flags: &[String]) -> Report {
    run(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_users_visiting_one_node_ten_times_each_keep_continuity() {
    let n = node("web-1", SessionBackend::Memory).await;
    let url = format!("http://{}/session", n.local_addr());
    let report = run(&[
        "--url",
        &url,
        "--users",
        "50",
        "--visits",
        "10",
        "--duration",
        "30s",
    ])
    .await;

    assert_eq!(report.requests, 500, "{report:#?}");
    assert_eq!(n.requests(), 500, "exactly 10 per user, none beyond");
    assert_eq!(report.errors.total, 0);
    let s = report.sessions;
    assert_eq!(
        (s.users_tracked, s.users_reset, s.resets, s.continuity),
        (50, 0, 0, Some(1.0))
    );
    assert_eq!((s.switches, s.users_switched), (0, 0));
    let d = &report.distribution;
    assert_eq!(d.shares.get("web-1"), Some(&1.0));
    assert_eq!((d.cv, d.max_min_ratio), (Some(0.0), Some(1.0)));

    let table = report.to_table();
    assert!(
        table.contains("continuity 100.0%: 0 of 50 users saw their visit count reset (0 resets)"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visits_is_exact_per_user_in_the_open_loop_too() {
    let n = node("web-1", SessionBackend::Memory).await;
    let url = format!("http://{}/session", n.local_addr());
    let report = run(&[
        "--url",
        &url,
        "--users",
        "5",
        "--visits",
        "4",
        "--rate",
        "200",
        "--duration",
        "30s",
    ])
    .await;
    assert_eq!(report.requests, 20, "{report:#?}");
    assert_eq!(n.requests(), 20);
    // Each user's four visits are 25 ms apart: they never overlap, so every count goes on.
    assert_eq!(report.sessions.users_tracked, 5);
    assert_eq!(
        report.sessions.continuity,
        Some(1.0),
        "{:#?}",
        report.sessions
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_nodes_reset_a_user_moved_on_every_visit() {
    let (a, b) = (
        node("web-1", SessionBackend::Memory).await,
        node("web-2", SessionBackend::Memory).await,
    );
    let front = balancer(vec![a.local_addr(), b.local_addr()], every_visit_elsewhere).await;
    let report = run_owned(&session_run(&format!("http://{front}/session"), "4", "6")).await;

    assert_eq!(report.requests, 24, "{report:#?}");
    assert_eq!(report.errors.total, 0);
    let s = report.sessions;
    // Each node sees a cookie the other issued: every visit after the first starts over.
    assert_eq!((s.switches, s.users_switched), (20, 4));
    assert_eq!(
        (s.users_tracked, s.users_reset, s.resets, s.continuity),
        (4, 4, 20, Some(0.0))
    );
    let d = &report.distribution;
    assert_eq!(d.shares.get("web-1"), Some(&0.5));
    assert_eq!(d.shares.get("web-2"), Some(&0.5));
    assert_eq!((d.cv, d.max_min_ratio), (Some(0.0), Some(1.0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_moved_once_resets_once_then_continues() {
    let (a, b) = (
        node("web-1", SessionBackend::Memory).await,
        node("web-2", SessionBackend::Memory).await,
    );
    let front = balancer(vec![a.local_addr(), b.local_addr()], moved_once_after_three).await;
    let report = run_owned(&session_run(&format!("http://{front}/session"), "10", "5")).await;

    let s = report.sessions;
    assert_eq!((s.switches, s.users_switched), (10, 10), "{s:#?}");
    assert_eq!((s.users_reset, s.resets, s.continuity), (10, 10, Some(0.0)));
    // 3 visits on web-1 and 2 on web-2 per user: cv 0.2, max/min 1.5.
    let d = &report.distribution;
    assert_eq!(d.shares.get("web-1"), Some(&0.6));
    assert_eq!((d.cv, d.max_min_ratio), (Some(0.2), Some(1.5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_nodes_keep_continuity_for_users_moved_on_every_visit() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let backend: SessionBackend = format!("redis://127.0.0.1:{}", redis.port).parse().unwrap();
    let (a, b) = (
        node("web-1", backend.clone()).await,
        node("web-2", backend).await,
    );
    let front = balancer(vec![a.local_addr(), b.local_addr()], every_visit_elsewhere).await;
    let report = run_owned(&session_run(&format!("http://{front}/session"), "4", "6")).await;

    assert_eq!(report.errors.total, 0, "{report:#?}");
    let s = report.sessions;
    assert_eq!((s.switches, s.users_switched), (20, 4));
    assert_eq!(
        (s.users_tracked, s.users_reset, s.resets, s.continuity),
        (4, 0, 0, Some(1.0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_report_names_the_comparison_fields() {
    let (a, b) = (
        node("web-1", SessionBackend::Memory).await,
        node("web-2", SessionBackend::Memory).await,
    );
    let front = balancer(vec![a.local_addr(), b.local_addr()], moved_once_after_three).await;
    let mut flags = session_run(&format!("http://{front}/session"), "2", "4");
    flags.push("--json".into());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let args = args(&flags);
    let report = load::run(&args).await.unwrap();
    let json: Value = serde_json::from_str(&load::render(&report, &args).unwrap()).unwrap();

    assert_eq!(
        json["distribution"],
        serde_json::json!({"shares": {"web-1": 0.75, "web-2": 0.25}, "cv": 0.5, "max_min_ratio": 3.0})
    );
    assert_eq!(
        json["sessions"],
        serde_json::json!({"switches": 2, "users_switched": 2, "users_tracked": 2,
                           "users_reset": 2, "resets": 2, "continuity": 0.0})
    );
}

#[tokio::test]
async fn without_session_counts_continuity_is_null() {
    let n = node("web-1", SessionBackend::Memory).await;
    let url = format!("http://{}/", n.local_addr());
    let report = run(&["--url", &url, "--users", "2", "--visits", "3"]).await;
    assert_eq!(report.requests, 6);
    assert_eq!(report.sessions.users_tracked, 0);
    assert_eq!(report.sessions.continuity, None);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["sessions"]["continuity"], Value::Null);
    assert!(
        report
            .to_table()
            .contains("continuity -: no answer carried x-session-visits")
    );
}
