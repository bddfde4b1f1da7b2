//! `ip_hash`: each client address maps to one node, evenly, and a change in the pool moves only
//! the clients it must.
//!
//! Every property is judged over random samples of at least 1,000 distinct clients (fewer is
//! statistics, not a property of the hash), drawn afresh on each run from a seed printed with
//! the test's output; `FULCRUM_TEST_SEED=SEED` replays a failure. Shares are judged within five
//! binomial standard deviations: a fair hash essentially never lands outside, and a bias of a
//! few percent over thousands of clients does.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use fulcrum::balance::{Pick, client_key};
use fulcrum::config::{Config, PoolConfig};
use fulcrum::pool::{Health, Pool, PoolState};
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::seq::SliceRandom;
use support::sample::{self, assert_binomial};
use support::*;

/// Clients in one sample: the contract's floor for judging evenness.
const CLIENTS: usize = 1_000;
/// Connections asking at once; the answers do not depend on it.
const WORKERS: usize = 4;
/// The proxy the listener trusts, so its `X-Forwarded-For` names the client.
const PROXY: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A keep-alive client whose connections come from `source`.
fn client_from(source: IpAddr) -> Client<HttpConnector, TestBody> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(source));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// An ip_hash pool of `backends` whose listener believes `X-Forwarded-For` from [`PROXY`].
fn behind_proxy(pool: &str, backends: &[(&str, std::net::SocketAddr, u32)]) -> String {
    single_pool(pool, "ip_hash", backends, "").replace(
        "name = \"http\"\n",
        &format!("name = \"http\"\ntrusted_proxies = [\"{PROXY}/32\"]\n"),
    )
}

/// `ask` for every item of `items`, split over [`WORKERS`] tasks; answers in `items`' order.
async fn in_parallel<T, F, Fut>(items: &[T], ask: F) -> Vec<String>
where
    T: Clone + Send + 'static,
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Vec<String>> + Send + 'static,
{
    let chunk = items.len().div_ceil(WORKERS).max(1);
    let tasks: Vec<_> = items
        .chunks(chunk)
        .map(|part| tokio::spawn(ask(part.to_vec())))
        .collect();
    let mut answers = Vec::with_capacity(items.len());
    for task in tasks {
        answers.extend(task.await.expect("worker"));
    }
    answers
}

/// The node serving each request, sent from `peer` with each `X-Forwarded-For` value.
async fn homes_via(peer: IpAddr, target: &str, forwarded_for: &[String]) -> Vec<String> {
    in_parallel(forwarded_for, |part| {
        let target = target.to_owned();
        async move {
            let client = client_from(peer);
            let mut homes = Vec::with_capacity(part.len());
            for value in part {
                let request = Request::get(&target)
                    .header("x-forwarded-for", value)
                    .body(empty())
                    .unwrap();
                homes.push(send(&client, request).await.served_by());
            }
            homes
        }
    })
    .await
}

/// The node serving each client, asked through the trusted proxy.
async fn homes_via_proxy(target: &str, clients: &[IpAddr]) -> Vec<String> {
    let claims: Vec<String> = clients.iter().map(IpAddr::to_string).collect();
    homes_via(PROXY, target, &claims).await
}

/// The node serving each client connecting from its own address, on a new connection.
async fn homes_direct(target: &str, clients: &[IpAddr]) -> Vec<String> {
    in_parallel(clients, |part| {
        let target = target.to_owned();
        async move {
            let mut homes = Vec::with_capacity(part.len());
            for ip in part {
                homes.push(get(&client_from(ip), &target).await.served_by());
            }
            homes
        }
    })
    .await
}

fn counts<'a>(homes: impl IntoIterator<Item = &'a String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for home in homes {
        *counts.entry(home.clone()).or_default() += 1;
    }
    counts
}

/// Each of `nodes` holds a fair share of `homes`, and no one else holds any.
fn assert_even(what: &str, homes: &[String], nodes: &[&str], seed: u64) {
    let counts = counts(homes);
    for (name, n) in &counts {
        assert!(
            nodes.contains(&name.as_str()),
            "{what}: {n} clients on {name:?}, not a node of the pool [FULCRUM_TEST_SEED={seed}]"
        );
    }
    for node in nodes {
        let count = counts.get(*node).copied().unwrap_or(0);
        assert_binomial(
            &format!("{what}: clients on {node} {counts:?}"),
            count,
            homes.len(),
            1.0 / nodes.len() as f64,
            seed,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_random_sample_of_clients_spreads_evenly_and_each_client_stays_on_its_node() {
    let (mut rng, seed) = sample::rng("ip_hash evenness");
    let nodes = webnodes(3).await;
    let names: Vec<&str> = nodes.iter().map(|n| n.id()).collect();
    let running = balancer(&behind_proxy("ih_even", &nodes_as_backends(&nodes))).await;
    let target = url(&running, "/");

    let samples = [
        ("IPv4", sample::distinct_v4(&mut rng, CLIENTS, &[PROXY])),
        ("IPv4", sample::distinct_v4(&mut rng, CLIENTS, &[PROXY])),
        ("IPv6", sample::distinct_v6(&mut rng, CLIENTS, &[])),
    ];
    let mut all = Vec::new();
    for (k, (family, clients)) in samples.iter().enumerate() {
        let homes = homes_via_proxy(&target, clients).await;
        assert_even(
            &format!("sample {k} ({CLIENTS} {family} clients)"),
            &homes,
            &names,
            seed,
        );
        // Each client again, in another order: every one is back on its node.
        let mut again: Vec<(IpAddr, String)> =
            clients.iter().copied().zip(homes.iter().cloned()).collect();
        again.shuffle(&mut rng);
        let (shuffled, expected): (Vec<IpAddr>, Vec<String>) = again.into_iter().unzip();
        let second = homes_via_proxy(&target, &shuffled).await;
        for ((ip, first), second) in shuffled.iter().zip(&expected).zip(&second) {
            assert_eq!(
                first, second,
                "{ip} moved on its second visit [FULCRUM_TEST_SEED={seed}]"
            );
        }
        all.extend(homes);
    }
    assert_even("all samples together", &all, &names, seed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connecting_from_their_own_addresses_are_hashed_as_themselves() {
    let (mut rng, seed) = sample::rng("ip_hash peer addresses");
    let nodes = webnodes(3).await;
    let names: Vec<&str> = nodes.iter().map(|n| n.id()).collect();
    let running = balancer(&behind_proxy("ih_peer", &nodes_as_backends(&nodes))).await;
    let target = url(&running, "/");
    let loopback_one = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let clients = sample::distinct_loopback(&mut rng, CLIENTS, &[PROXY, loopback_one]);

    let first = homes_direct(&target, &clients).await;
    assert_even(
        &format!("{CLIENTS} clients on their own connections"),
        &first,
        &names,
        seed,
    );
    // A new connection (a new source port) from the same address finds the same node, and so
    // does the same client named by the trusted proxy.
    let second = homes_direct(&target, &clients).await;
    let forwarded = homes_via_proxy(&target, &clients).await;
    for (i, ip) in clients.iter().enumerate() {
        assert_eq!(
            first[i], second[i],
            "{ip} moved on a new connection [FULCRUM_TEST_SEED={seed}]"
        );
        assert_eq!(
            first[i], forwarded[i],
            "{ip} behind the trusted proxy is not hashed as itself [FULCRUM_TEST_SEED={seed}]"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_one_of_four_nodes_moves_only_its_own_clients() {
    let (mut rng, seed) = sample::rng("ip_hash removal");
    let nodes = webnodes(4).await;
    let all = nodes_as_backends(&nodes);
    let running = balancer(&behind_proxy("ih_remove", &all)).await;
    let target = url(&running, "/");
    let clients = sample::distinct_v4(&mut rng, CLIENTS, &[PROXY]);
    let before = homes_via_proxy(&target, &clients).await;

    let without_web_3: Vec<_> = all.iter().copied().filter(|b| b.0 != "web-3").collect();
    let smaller = Config::parse(
        Path::new("t.toml"),
        &behind_proxy("ih_remove", &without_web_3),
    )
    .unwrap();
    running.router().pools()[0].replace(&smaller.pools["ih_remove"]);
    let after = homes_via_proxy(&target, &clients).await;

    let mut moved = Vec::new();
    for (i, ip) in clients.iter().enumerate() {
        if before[i] == "web-3" {
            assert_ne!(after[i], "web-3", "{ip} still on the removed node");
            moved.push(after[i].clone());
        } else {
            assert_eq!(
                after[i], before[i],
                "{ip} moved though its node stayed [FULCRUM_TEST_SEED={seed}]"
            );
        }
    }
    // web-3 held about a quarter of the clients, and they spread over the three others.
    assert_binomial(
        &format!("clients web-3 had {:?}", counts(&before)),
        moved.len(),
        CLIENTS,
        0.25,
        seed,
    );
    assert_even(
        "web-3's clients after it left",
        &moved,
        &["web-1", "web-2", "web-4"],
        seed,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_a_trusted_peer() {
    let (mut rng, seed) = sample::rng("ip_hash forwarded for");
    let nodes = webnodes(3).await;
    let running = balancer(&behind_proxy("ih_xff", &nodes_as_backends(&nodes))).await;
    let target = url(&running, "/");
    let clients = sample::distinct_v4(&mut rng, CLIENTS, &[PROXY]);
    let spoofed = sample::distinct_v4(&mut rng, CLIENTS, &[PROXY]);
    let homes = homes_via_proxy(&target, &clients).await;
    // What follows compares nodes: it tells something only if the clients are spread.
    let names: Vec<&str> = nodes.iter().map(|n| n.id()).collect();
    assert_even("clients named by the trusted proxy", &homes, &names, seed);

    // From the trusted proxy, the chain is read from the right, skipping the trusted hops: a
    // value the client wrote itself on the left changes nothing.
    let chains: Vec<String> = spoofed
        .iter()
        .zip(&clients)
        .map(|(spoofed, client)| format!("{spoofed}, {client}, {PROXY}"))
        .collect();
    let chained = homes_via(PROXY, &target, &chains).await;
    for (i, chain) in chains.iter().enumerate() {
        assert_eq!(
            chained[i], homes[i],
            "X-Forwarded-For: {chain} is not hashed as {} [FULCRUM_TEST_SEED={seed}]",
            clients[i]
        );
    }

    // From any other peer, the header is ignored: every claim lands where the peer itself does.
    let untrusted = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    let claims: Vec<String> = clients.iter().map(IpAddr::to_string).collect();
    let ignored = homes_via(untrusted, &target, &claims).await;
    let own = homes_direct(&target, &[untrusted]).await;
    let used: HashSet<&String> = ignored.iter().collect();
    assert_eq!(
        used,
        HashSet::from([&own[0]]),
        "an untrusted peer's X-Forwarded-For was believed [FULCRUM_TEST_SEED={seed}]"
    );
}

// The statistics of weights and of pool changes need more clients than sockets are worth:
// these pick straight from a pool snapshot with the same keys the proxy computes.

/// Clients in each in-process sample.
const MANY: usize = 20_000;

fn pool(name: &str, weights: &[u32]) -> PoolConfig {
    let backends: Vec<String> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            format!(
                "{{ name = \"node-{i}\", address = \"127.0.0.1:{}\", weight = {w} }}",
                20_000 + i
            )
        })
        .collect();
    let text = format!(
        "[[listeners]]\nbind = \"127.0.0.1:0\"\n[pools.{name}]\nstrategy = \"ip_hash\"\nbackends = [{}]\n",
        backends.join(", ")
    );
    Config::parse(Path::new("t.toml"), &text).unwrap().pools[name].clone()
}

fn assignments(snapshot: &PoolState, clients: &[IpAddr]) -> Vec<String> {
    clients
        .iter()
        .map(|&ip| {
            let pick = Pick {
                client: client_key(ip),
                ..Pick::plain(None)
            };
            let index = snapshot.pick_for(&pick).expect("a routable node");
            snapshot.backends[index].node.name.to_string()
        })
        .collect()
}

#[test]
fn over_random_samples_shares_follow_weights_and_changes_move_the_minimum() {
    let (mut rng, seed) = sample::rng("ip_hash weights and changes");
    for round in 0..3 {
        // Two IPv4 samples and one IPv6.
        let clients = if round == 2 {
            sample::distinct_v6(&mut rng, MANY, &[])
        } else {
            sample::distinct_v4(&mut rng, MANY, &[])
        };
        let even = Pool::new("ih_stats_even", &pool("ih_stats_even", &[1, 1, 1, 1]));
        let four = assignments(&even.snapshot(), &clients);
        assert_even(
            &format!("round {round}: four equal nodes"),
            &four,
            &["node-0", "node-1", "node-2", "node-3"],
            seed,
        );

        // Adding a fifth node takes about 1/5 of the clients, all of them onto the newcomer.
        even.replace(&pool("ih_stats_even", &[1, 1, 1, 1, 1]));
        even.snapshot().backends[4].node.set_health(Health::Up);
        let five = assignments(&even.snapshot(), &clients);
        let moved: Vec<_> = four.iter().zip(&five).filter(|(a, b)| a != b).collect();
        assert!(
            moved.iter().all(|(_, to)| *to == "node-4"),
            "round {round}: a client moved between old nodes [FULCRUM_TEST_SEED={seed}]"
        );
        assert_binomial(
            &format!("round {round}: clients the fifth node took"),
            moved.len(),
            MANY,
            0.2,
            seed,
        );

        // A node going down moves exactly its clients.
        even.snapshot().backends[1].node.set_health(Health::Down);
        let down = assignments(&even.snapshot(), &clients);
        for ((before, after), ip) in five.iter().zip(&down).zip(&clients) {
            if before == "node-1" {
                assert_ne!(after, "node-1", "{ip} stayed on a node that is down");
            } else {
                assert_eq!(
                    before, after,
                    "round {round}: {ip} moved though its node stayed up [FULCRUM_TEST_SEED={seed}]"
                );
            }
        }

        // Weights 1:3 give the first node a quarter.
        let weighted = Pool::new("ih_stats_weighted", &pool("ih_stats_weighted", &[1, 3]));
        let homes = assignments(&weighted.snapshot(), &clients);
        let light = homes.iter().filter(|h| *h == "node-0").count();
        assert_binomial(
            &format!("round {round}: clients of the weight-1 node beside a weight-3 one"),
            light,
            MANY,
            0.25,
            seed,
        );
    }
}
