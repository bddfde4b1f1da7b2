//! A node that comes back up ramps from about a tenth of its weight to its full weight over
//! `slow_start`, under every strategy that weighs nodes (round robin, least connections,
//! ip_hash); before it went down and once the window is over it takes its full share.
//!
//! The ramp is read off live traffic, not off sleeps: requests run one after another from the
//! moment the health checker brings the node back until the window is over, each filed under
//! the slice of the window it was sent in, and each slice's share is judged against what the
//! ramp allows over that slice.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::time::{Duration, Instant};

use fulcrum::pool::Health;
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use rand::RngExt;
use rand::rngs::StdRng;
use support::sample::{self, SIGMAS};
use support::*;

/// Long enough for a few hundred requests in each slice, short enough for a test.
const WINDOW: Duration = Duration::from_secs(3);
const SLICES: usize = 5;
/// Where the ramp starts, as a fraction of the weight (README: "from 10 % to full weight").
const FLOOR: f64 = 0.1;
/// Fewer requests in a slice than this cannot tell a ramp from none.
const MIN_PER_SLICE: usize = 100;

/// The returning node's weight, as a fraction of its own, `fraction` of the way into the window.
fn ramp(fraction: f64) -> f64 {
    (FLOOR + (1.0 - FLOOR) * fraction).min(1.0)
}

/// The returning node's share of requests when its weight is scaled by `p`: both nodes have
/// weight 1, so it is `p / (p + 1)`, and its full share is one half.
fn share(p: f64) -> f64 {
    p / (p + 1.0)
}

/// How requests are made: plain ones, or (for ip_hash) each from a new random client.
enum Clients {
    Same,
    Random(Box<StdRng>, u64),
}

impl Clients {
    fn request(&mut self, target: &str) -> Request<TestBody> {
        let request = Request::get(target);
        match self {
            Clients::Same => request,
            // Believed: the listener trusts the test's own address (127.0.0.1) as a proxy.
            Clients::Random(rng, _) => request.header(
                "x-forwarded-for",
                std::net::Ipv4Addr::from(rng.random::<u32>()).to_string(),
            ),
        }
        .body(empty())
        .unwrap()
    }

    /// Round robin and least connections split a run of one-at-a-time requests exactly by
    /// weight; ip_hash does over many clients, within the binomial's spread.
    fn assert_full_share(&self, what: &str, returning: usize, n: usize) {
        match self {
            Clients::Same => assert_eq!(returning, n / 2, "{what}: {returning} of {n}"),
            Clients::Random(_, seed) => sample::assert_binomial(what, returning, n, 0.5, *seed),
        }
    }
}

/// Sends `n` requests one at a time and counts those `web-2` served.
async fn served_by_web_2(
    client: &Client<HttpConnector, TestBody>,
    target: &str,
    clients: &mut Clients,
    n: usize,
) -> usize {
    let mut count = 0;
    for _ in 0..n {
        let reply = send(client, clients.request(target)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        count += usize::from(reply.served_by() == "web-2");
    }
    count
}

/// Takes `web-2` of two equal nodes down and back up through the health checker, and judges
/// its share before, while down, during the ramp and after it.
async fn a_returning_node_ramps_up(strategy: &str, pool: &str, mut clients: Clients) {
    let nodes = webnodes(2).await;
    let extra = format!(
        "slow_start = \"{}ms\"\n[pools.{pool}.health]\ninterval = \"50ms\"\ntimeout = \"40ms\"\n\
         fall = 2\nrise = 2\n",
        WINDOW.as_millis()
    );
    let toml = single_pool(pool, strategy, &nodes_as_backends(&nodes), &extra).replace(
        "name = \"http\"\n",
        "name = \"http\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    );
    let running = balancer(&toml).await;
    let target = url(&running, "/");
    let client = client();
    let returning = node(&running, "web-2");

    let before = served_by_web_2(&client, &target, &mut clients, 400).await;
    clients.assert_full_share("web-2's share before it went down", before, 400);

    let down = send(
        &client,
        node_control(&nodes[1], "/admin/health", r#"{"status":"DOWN"}"#),
    )
    .await;
    assert_eq!(down.status, 200, "{}", down.text());
    wait_until("the checker takes web-2 out", || async {
        returning.health() == Health::Down
    })
    .await;
    let while_down = served_by_web_2(&client, &target, &mut clients, 50).await;
    assert_eq!(while_down, 0, "web-2 served requests while down");

    let up = send(
        &client,
        node_control(&nodes[1], "/admin/health", r#"{"status":"UP"}"#),
    )
    .await;
    assert_eq!(up.status, 200, "{}", up.text());
    // The ramp starts when the checker brings the node back: between the last look that saw
    // it down and the first that sees it up.
    let mut last_seen_down = Instant::now();
    let up_at = loop {
        if returning.health() == Health::Up {
            break Instant::now();
        }
        assert!(
            last_seen_down.elapsed() < DEADLINE,
            "the checker did not bring web-2 back"
        );
        last_seen_down = Instant::now();
        tokio::time::sleep(Duration::from_millis(2)).await;
    };

    // (served by web-2, requests) in each slice of the window.
    let mut slices = [(0usize, 0usize); SLICES];
    let mut slowest = Duration::ZERO;
    loop {
        let sent = up_at.elapsed();
        if sent >= WINDOW {
            break;
        }
        let reply = send(&client, clients.request(&target)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        slowest = slowest.max(up_at.elapsed() - sent);
        let slice =
            &mut slices[(sent.as_secs_f64() / WINDOW.as_secs_f64() * SLICES as f64) as usize];
        slice.0 += usize::from(reply.served_by() == "web-2");
        slice.1 += 1;
    }
    // A request's pick may come up to `late` (of the window) after the moment it is filed under.
    let late = ((up_at - last_seen_down) + slowest).as_secs_f64() / WINDOW.as_secs_f64();
    let table: Vec<String> = slices
        .iter()
        .map(|(mine, n)| format!("{mine}/{n} = {:.3}", *mine as f64 / (*n).max(1) as f64))
        .collect();
    let table = format!("web-2's share per fifth of the window: {table:?} (late {late:.4})");
    eprintln!("{strategy}: {table}");

    let (first, first_n) = slices[0];
    assert!(
        first > 0,
        "web-2 got nothing at the start of its ramp: {table}"
    );
    for (k, &(mine, n)) in slices.iter().enumerate() {
        assert!(
            n >= MIN_PER_SLICE,
            "only {n} requests in slice {k}: too few to judge the ramp: {table}"
        );
        let (from, to) = (k as f64 / SLICES as f64, (k + 1) as f64 / SLICES as f64);
        let (low, high) = (share(ramp(from)), share(ramp(to + late)));
        let middle = (low + high) / 2.0;
        let tolerance = SIGMAS * (middle * (1.0 - middle) / n as f64).sqrt();
        let observed = mine as f64 / n as f64;
        assert!(
            observed >= low - tolerance && observed <= high + tolerance,
            "slice {k} ({from:.1}..{to:.1} of the window): share {observed:.3}, the ramp allows \
             {low:.3}..{high:.3} ± {tolerance:.3}: {table}"
        );
    }
    // Not its full share at once: well under half of the first fifth's requests.
    assert!(
        (first as f64) < 0.35 * first_n as f64,
        "web-2 took {first} of the first {first_n} requests: no ramp: {table}"
    );

    let after = served_by_web_2(&client, &target, &mut clients, 400).await;
    clients.assert_full_share("web-2's share once the window is over", after, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_node_ramps_to_its_full_share_under_round_robin() {
    a_returning_node_ramps_up("round_robin", "ss_rr", Clients::Same).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_node_ramps_to_its_full_share_under_least_connections() {
    // One request at a time: every pick is a tie on load, so the weights alone decide.
    a_returning_node_ramps_up("least_connections", "ss_lc", Clients::Same).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_node_ramps_to_its_full_share_of_clients_under_ip_hash() {
    let (rng, seed) = sample::rng("ip_hash slow start");
    a_returning_node_ramps_up("ip_hash", "ss_ih", Clients::Random(Box::new(rng), seed)).await;
}
