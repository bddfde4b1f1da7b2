//! `fulcrum load --url A --url B`: users are spread over two real balancers with the same
//! sticky secret; when A goes away its users move to B, as a browser with several A records
//! does, and keep their node and their session there.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use clap::Parser;
use fulcrum::load::{self, LoadArgs};
use support::*;

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

/// A sticky pool over `nodes`, the same secret on every balancer that uses it.
fn sticky_balancer_config(nodes: &[fulcrum::webnode::WebNode]) -> String {
    single_pool(
        "lf",
        "sticky_cookie",
        &nodes_as_backends(nodes),
        "[pools.lf.sticky]\nsecret = \"one secret for every balancer\"\nfallback = \"round_robin\"\n",
    )
}

/// Answers a balancer has sent, from its own `/metrics`.
async fn answered(running: &fulcrum::Running) -> f64 {
    scrape(running)
        .await
        .lines()
        .filter(|line| line.starts_with("fulcrum_requests_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn users_of_a_stopped_balancer_move_to_the_next_url_and_keep_their_node() {
    // Memory sessions: a user keeps its visit count only if it keeps its node, so continuity
    // shows that B honoured the cookies A handed out.
    let nodes = webnodes(2).await;
    let config = sticky_balancer_config(&nodes);
    let a = balancer(&config).await;
    let b = balancer(&config).await;
    let (url_a, url_b) = (url(&a, "/session"), url(&b, "/session"));
    let dir = std::env::temp_dir().join(format!("fulcrum-load-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("failover.svg");
    let flags = [
        "--url",
        &url_a,
        "--url",
        &url_b,
        "--users",
        "8",
        "--duration",
        "3s",
        "--svg",
        svg.to_str().unwrap(),
    ];
    let load_args = args(&flags);
    assert_eq!(load_args.urls, [url_a.clone(), url_b.clone()]);
    let run = tokio::spawn(async move { load::run(&load_args).await.expect("the run starts") });

    wait_until("A has answered some of its users", || async {
        answered(&a).await >= 20.0
    })
    .await;
    a.shutdown().await;
    let report = run.await.unwrap();

    let failover = report
        .failover
        .as_ref()
        .expect("two --urls report per balancer");
    let (on_a, on_b) = (&failover.balancers[0], &failover.balancers[1]);
    assert_eq!((on_a.url.as_str(), on_b.url.as_str()), (&*url_a, &*url_b));
    assert_eq!((on_a.users_started, on_b.users_started), (4, 4));
    assert!(on_a.responses > 0, "{report:#?}");
    // Every user of A moved once, to B; nobody left B.
    assert_eq!(
        (failover.moves, failover.users_moved),
        (4, 4),
        "{report:#?}"
    );
    assert_eq!((on_a.moves_away, on_b.moves_away), (4, 0), "{report:#?}");
    // Only requests in flight on A when it went away may fail, each a reset, at most one per
    // user of A (a refused connection is tried on B at once, so it is no error).
    assert_eq!(report.errors.total, report.errors.reset, "{report:#?}");
    assert!(report.errors.reset <= 4, "{report:#?}");
    assert_eq!(on_b.errors.total, 0, "{report:#?}");
    // B read A's cookies: each moved user stayed on its node and its session went on.
    assert_eq!(
        (failover.kept_node, failover.changed_node),
        (4, 0),
        "{report:#?}"
    );
    assert_eq!(failover.sticky_kept, Some(1.0));
    assert_eq!(report.sessions.switches, 0, "{report:#?}");
    assert_eq!(report.sessions.continuity, Some(1.0), "{report:#?}");
    // B went on answering after A was gone.
    let last = report.timeline.last().unwrap();
    assert!(last.responses > 0, "{report:#?}");

    let table = report.to_table();
    assert!(table.contains("moves     4 (4 users moved to the next --url); 100.0% kept their node (4 kept, 0 changed)"), "{table}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["failover"]["moves"], 4);
    // Per second, answers through each balancer: A's stop, B's carrying on.
    let through = |i: usize| -> u64 {
        report
            .timeline
            .iter()
            .map(|s| s.balancers.get(i).copied().unwrap_or(0))
            .sum()
    };
    assert_eq!((through(0), through(1)), (on_a.responses, on_b.responses));
    assert_eq!(
        last.balancers.first().copied().unwrap_or(0),
        0,
        "{report:#?}"
    );
    load::render(&report, &args(&flags)).unwrap();
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(
        chart.contains("balancer A") && chart.contains("balancer B"),
        "{chart}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(json["failover"]["balancers"][0]["moves_away"], 4);
    b.shutdown().await;
}

#[tokio::test]
async fn a_single_url_reports_no_failover() {
    let nodes = webnodes(1).await;
    let a = balancer(&sticky_balancer_config(&nodes)).await;
    let report = load::run(&args(&[
        "--url",
        &url(&a, "/"),
        "--users",
        "2",
        "--requests",
        "10",
    ]))
    .await
    .unwrap();
    assert_eq!(report.requests, 10);
    assert!(report.failover.is_none());
    let json = serde_json::to_value(&report).unwrap();
    assert!(json.get("failover").is_none(), "{json}");
}
