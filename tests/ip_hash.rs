//! `ip_hash`: each client address maps to one node, evenly, and a change in the pool moves only
//! the clients it must.

mod support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use fulcrum::balance::{Pick, client_key};
use fulcrum::config::{Config, PoolConfig};
use fulcrum::pool::{Pool, PoolState};
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::*;

/// `n` distinct client addresses in 127.0.0.0/8 (any of them can be bound on loopback).
fn client_addresses(n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                1 + (i / 250) as u8,
                1 + (i % 250) as u8,
            ))
        })
        .collect()
}

/// A keep-alive client whose connections come from `source`.
fn client_from(source: IpAddr) -> Client<HttpConnector, TestBody> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(source));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Which node serves each client, checking that all `visits` of a client land on one node.
async fn homes(target: &str, clients: &[IpAddr], visits: usize) -> HashMap<IpAddr, String> {
    let mut homes = HashMap::new();
    for &ip in clients {
        let client = client_from(ip);
        let first = get(&client, target).await.served_by();
        for _ in 1..visits {
            assert_eq!(get(&client, target).await.served_by(), first, "{ip} moved");
        }
        homes.insert(ip, first);
    }
    homes
}

fn shares(homes: &HashMap<IpAddr, String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for node in homes.values() {
        *counts.entry(node.clone()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_each_stay_on_one_node_and_the_shares_are_even() {
    let nodes = webnodes(3).await;
    let running = balancer(&single_pool(
        "ih_even",
        "ip_hash",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    let homes = homes(&url(&running, "/"), &client_addresses(200), 3).await;
    let counts = shares(&homes);
    println!("clients per node: {counts:?}");
    let even = 200.0 / 3.0;
    for node in &nodes {
        let count = counts.get(node.id()).copied().unwrap_or(0) as f64;
        assert!(
            (count - even).abs() <= 0.15 * even,
            "{} has {count} of 200 clients, more than 15% off {even:.1}: {counts:?}",
            node.id()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_one_of_four_nodes_moves_only_its_own_clients() {
    let nodes = webnodes(4).await;
    let toml = |backends: &[(&str, std::net::SocketAddr, u32)]| {
        single_pool("ih_remove", "ip_hash", backends, "")
    };
    let all = nodes_as_backends(&nodes);
    let running = balancer(&toml(&all)).await;
    let target = url(&running, "/");
    let clients = client_addresses(200);
    let before = homes(&target, &clients, 1).await;

    let without_web_3: Vec<_> = all.iter().copied().filter(|b| b.0 != "web-3").collect();
    let smaller = Config::parse(Path::new("t.toml"), &toml(&without_web_3)).unwrap();
    running.router().pools()[0].replace(&smaller.pools["ih_remove"]);
    let after = homes(&target, &clients, 1).await;

    let mut moved = 0;
    for ip in &clients {
        if before[ip] == "web-3" {
            assert_ne!(after[ip], "web-3");
            moved += 1;
        } else {
            assert_eq!(after[ip], before[ip], "{ip} moved though its node stayed");
        }
    }
    assert!(
        moved > 0,
        "web-3 had clients to lose: {:?}",
        shares(&before)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_a_trusted_peer() {
    let nodes = webnodes(3).await;
    let toml = single_pool("ih_xff", "ip_hash", &nodes_as_backends(&nodes), "").replace(
        "name = \"http\"\n",
        "name = \"http\"\ntrusted_proxies = [\"127.0.0.2/32\"]\n",
    );
    let running = balancer(&toml).await;
    let target = url(&running, "/");
    let via = |proxy: IpAddr| {
        let target = target.clone();
        async move {
            let client = client_from(proxy);
            let mut homes = HashMap::new();
            for i in 0..60u8 {
                let claimed = format!("203.0.113.{i}");
                let request = Request::get(&target)
                    .header("x-forwarded-for", &claimed)
                    .body(empty())
                    .unwrap();
                homes.insert(claimed, send(&client, request).await.served_by());
            }
            homes
        }
    };
    let trusted = via("127.0.0.2".parse().unwrap()).await;
    let nodes_used: std::collections::HashSet<_> = trusted.values().collect();
    assert_eq!(
        nodes_used.len(),
        3,
        "clients behind the trusted proxy spread out"
    );
    // Each forwarded client is hashed as itself: the same as connecting directly.
    let direct = homes(&target, &["127.0.0.9".parse().unwrap()], 1).await;
    let via_proxy = {
        let request = Request::get(&target)
            .header("x-forwarded-for", "127.0.0.9")
            .body(empty())
            .unwrap();
        send(&client_from("127.0.0.2".parse().unwrap()), request)
            .await
            .served_by()
    };
    assert_eq!(via_proxy, direct[&"127.0.0.9".parse::<IpAddr>().unwrap()]);

    let untrusted = via("127.0.0.3".parse().unwrap()).await;
    let nodes_used: std::collections::HashSet<_> = untrusted.values().collect();
    assert_eq!(
        nodes_used.len(),
        1,
        "an untrusted peer's X-Forwarded-For is ignored: {untrusted:?}"
    );
}

// The statistics need more clients than sockets are worth: these pick straight from a pool
// snapshot with the same keys the proxy computes.

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

fn assignments(snapshot: &PoolState, clients: u32) -> Vec<String> {
    (0..clients)
        .map(|i| {
            let pick = Pick {
                client: client_key(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))),
                ..Pick::plain(None)
            };
            let index = snapshot.pick_for(&pick).expect("a routable node");
            snapshot.backends[index].node.name.to_string()
        })
        .collect()
}

fn fractions(assigned: &[String]) -> HashMap<String, f64> {
    let mut counts: HashMap<String, f64> = HashMap::new();
    for name in assigned {
        *counts.entry(name.clone()).or_default() += 1.0 / assigned.len() as f64;
    }
    counts
}

#[test]
fn over_twenty_thousand_clients_shares_follow_weights_and_changes_move_the_minimum() {
    const CLIENTS: u32 = 20_000;
    let even = Pool::new("ih_stats_even", &pool("ih_stats_even", &[1, 1, 1, 1]));
    let four = assignments(&even.snapshot(), CLIENTS);
    for (name, share) in fractions(&four) {
        assert!((share - 0.25).abs() < 0.02, "{name}: {share}");
    }

    // Adding a fifth node takes about 1/5 of the clients, all of them onto the newcomer.
    even.replace(&pool("ih_stats_even", &[1, 1, 1, 1, 1]));
    let newcomer = &even.snapshot().backends[4].node;
    newcomer.set_health(fulcrum::pool::Health::Up);
    let five = assignments(&even.snapshot(), CLIENTS);
    let moved: Vec<_> = four.iter().zip(&five).filter(|(a, b)| a != b).collect();
    let moved_share = moved.len() as f64 / f64::from(CLIENTS);
    assert!((moved_share - 0.2).abs() < 0.02, "moved {moved_share}");
    assert!(moved.iter().all(|(_, to)| *to == "node-4"));

    // A node going down moves exactly its clients.
    even.snapshot().backends[1]
        .node
        .set_health(fulcrum::pool::Health::Down);
    let down = assignments(&even.snapshot(), CLIENTS);
    for (before, after) in five.iter().zip(&down) {
        if before == "node-1" {
            assert_ne!(after, "node-1");
        } else {
            assert_eq!(before, after);
        }
    }

    let weighted = Pool::new("ih_stats_weighted", &pool("ih_stats_weighted", &[1, 3]));
    let shares = fractions(&assignments(&weighted.snapshot(), CLIENTS));
    assert!((shares["node-0"] - 0.25).abs() < 0.02, "{shares:?}");
}
