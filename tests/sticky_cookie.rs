//! `sticky_cookie`: a user's cookie brings them back to the node that served them, on any
//! balancer with the same secret, until that node is down or gone.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use fulcrum::balance::sticky::CookieCodec;
use fulcrum::pool::Health;
use http::Request;
use support::*;
use tokio::net::TcpStream;

const SECRET: &str = "correct horse battery staple";

fn sticky_table(pool: &str, extra: &str) -> String {
    format!("[pools.{pool}.sticky]\nsecret = \"{SECRET}\"\nfallback = \"round_robin\"\n{extra}")
}

/// A browser's view of one balancer: it keeps the sticky cookie it was given.
#[derive(Default)]
struct User {
    cookie: Option<String>,
}

struct Visit {
    served_by: String,
    set_cookie: Option<String>,
}

impl User {
    async fn visit(&mut self, url: &str) -> Visit {
        let mut request = Request::get(url);
        if let Some(cookie) = &self.cookie {
            request = request.header("cookie", format!("theme=dark; {cookie}"));
        }
        let reply = send(&client(), request.body(empty()).unwrap()).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let set_cookie = reply
            .headers
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_owned());
        if let Some(header) = &set_cookie {
            // The `name=value` pair is what a browser sends back.
            self.cookie = Some(header.split(';').next().unwrap().to_owned());
        }
        Visit {
            served_by: reply.served_by(),
            set_cookie,
        }
    }
}

#[tokio::test]
async fn a_user_stays_on_one_node_for_50_requests_and_the_cookie_is_set_once() {
    let nodes = webnodes(3).await;
    let running = balancer(&single_pool(
        "st_50",
        "sticky_cookie",
        &nodes_as_backends(&nodes),
        &sticky_table("st_50", ""),
    ))
    .await;
    let target = url(&running, "/");

    let mut user = User::default();
    let first = user.visit(&target).await;
    let header = first.set_cookie.expect("a new user gets the cookie");
    assert!(
        header.starts_with("fulcrum_sticky=")
            && header.ends_with("; Path=/; HttpOnly; SameSite=Lax"),
        "attributes, and no Secure on a plain-HTTP listener: {header}"
    );
    let value = header["fulcrum_sticky=".len()..].split(';').next().unwrap();
    assert!(
        !value.contains(&nodes[0].local_addr().port().to_string()) && !value.contains("web-"),
        "the value is opaque: {value}"
    );
    for _ in 0..49 {
        let visit = user.visit(&target).await;
        assert_eq!(visit.served_by, first.served_by);
        assert_eq!(visit.set_cookie, None, "a hit does not re-set the cookie");
    }

    // Without cookies the fallback (round robin) spreads new users.
    let mut seen = HashSet::new();
    for _ in 0..3 {
        seen.insert(User::default().visit(&target).await.served_by);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    let metrics = scrape(&running).await;
    let sticky = |outcome: &str| {
        series(
            &metrics,
            &format!("fulcrum_sticky_total{{pool=\"st_50\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(sticky("hit"), Some(49.0), "{metrics}");
    assert_eq!(sticky("new"), Some(4.0), "{metrics}");
    assert_eq!(sticky("rerouted"), None, "{metrics}");
}

#[tokio::test]
async fn max_age_travels_in_the_value_and_in_the_attribute() {
    let nodes = webnodes(1).await;
    let running = balancer(&single_pool(
        "st_age",
        "sticky_cookie",
        &nodes_as_backends(&nodes),
        &sticky_table("st_age", "max_age = \"1h\"\ncookie = \"lb\"\n"),
    ))
    .await;
    let mut user = User::default();
    let header = user.visit(&url(&running, "/")).await.set_cookie.unwrap();
    assert!(header.starts_with("lb="), "{header}");
    assert!(header.ends_with("; Max-Age=3600"), "{header}");
    assert_eq!(user.visit(&url(&running, "/")).await.set_cookie, None);
}

#[tokio::test]
async fn forged_expired_and_garbled_cookies_are_treated_as_absent() {
    let nodes = webnodes(3).await;
    let running = balancer(&single_pool(
        "st_forged",
        "sticky_cookie",
        &nodes_as_backends(&nodes),
        &sticky_table("st_forged", ""),
    ))
    .await;
    let target = url(&running, "/");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as u32;
    let keyed = CookieCodec::new(Some(SECRET));
    let id = keyed.node_id("web-2");
    let genuine = keyed.encode(&id, 0);
    let mut tampered = genuine.clone().into_bytes();
    tampered[3] = if tampered[3] == b'x' { b'y' } else { b'x' };

    let attempts = [
        ("tampered", String::from_utf8(tampered).unwrap()),
        (
            "signed with another secret",
            CookieCodec::new(Some("guess")).encode(&id, 0),
        ),
        ("unkeyed", CookieCodec::new(None).encode(&id, 0)),
        ("expired", keyed.encode(&id, now - 10)),
        ("garbled", "%%%not-a-cookie%%%".to_owned()),
    ];
    for (what, value) in &attempts {
        let mut user = User {
            cookie: Some(format!("fulcrum_sticky={value}")),
        };
        let visit = user.visit(&target).await;
        let set = visit
            .set_cookie
            .unwrap_or_else(|| panic!("{what}: a new cookie replaces it"));
        assert!(!set.contains(value.as_str()), "{what}: {set}");
    }
    // The control: the genuine value pins web-2 every time.
    for _ in 0..5 {
        let mut user = User {
            cookie: Some(format!("fulcrum_sticky={genuine}")),
        };
        let visit = user.visit(&target).await;
        assert_eq!(visit.served_by, "web-2");
        assert_eq!(visit.set_cookie, None);
    }
    let metrics = scrape(&running).await;
    assert_eq!(
        series(
            &metrics,
            "fulcrum_sticky_total{pool=\"st_forged\",outcome=\"new\"}"
        ),
        Some(attempts.len() as f64),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_whose_node_dies_is_moved_and_the_cookie_re_set() {
    let nodes = webnodes(3).await;
    let pool_extra = format!(
        "{}\n[pools.st_dies.health]\ninterval = \"100ms\"\ntimeout = \"80ms\"\n",
        sticky_table("st_dies", "")
    );
    let running = balancer(&single_pool(
        "st_dies",
        "sticky_cookie",
        &nodes_as_backends(&nodes),
        &pool_extra,
    ))
    .await;
    let target = url(&running, "/");
    let mut user = User::default();
    let home = user.visit(&target).await.served_by;
    let old_cookie = user.cookie.clone();

    let mut nodes = nodes;
    let index = nodes.iter().position(|n| n.id() == home).unwrap();
    nodes.remove(index).shutdown().await;

    // Before the checker notices: the refused connection is retried elsewhere, and the cookie
    // names the node that actually answered.
    let moved = user.visit(&target).await;
    assert_ne!(moved.served_by, home);
    assert!(moved.set_cookie.is_some(), "the cookie is re-set");
    for _ in 0..10 {
        let visit = user.visit(&target).await;
        assert_eq!(visit.served_by, moved.served_by, "sticks to the new node");
        assert_eq!(visit.set_cookie, None);
    }

    // Once the checker has the node down, the old cookie is rerouted without a connect attempt.
    let dead = node(&running, &home);
    wait_until("the dead node is marked down", || {
        let dead = dead.clone();
        async move { dead.health() == Health::Down }
    })
    .await;
    let mut straggler = User { cookie: old_cookie };
    let visit = straggler.visit(&target).await;
    assert_ne!(visit.served_by, home);
    assert!(visit.set_cookie.is_some());

    let metrics = scrape(&running).await;
    assert_eq!(
        series(
            &metrics,
            "fulcrum_sticky_total{pool=\"st_dies\",outcome=\"rerouted\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_node_removed_from_the_pool_loses_its_users_to_the_others() {
    let nodes = webnodes(2).await;
    let toml = |backends: &[(&str, SocketAddr, u32)]| {
        single_pool(
            "st_gone",
            "sticky_cookie",
            backends,
            &sticky_table("st_gone", ""),
        )
    };
    let running = balancer(&toml(&nodes_as_backends(&nodes))).await;
    let target = url(&running, "/");
    let mut user = User {
        cookie: Some(format!(
            "fulcrum_sticky={}",
            CookieCodec::new(Some(SECRET))
                .encode(&CookieCodec::new(Some(SECRET)).node_id("web-1"), 0)
        )),
    };
    assert_eq!(user.visit(&target).await.served_by, "web-1");

    let smaller = fulcrum::config::Config::parse(
        std::path::Path::new("t.toml"),
        &toml(&nodes_as_backends(&nodes[1..])),
    )
    .unwrap();
    running.router().pools()[0].replace(&smaller.pools["st_gone"]);
    let visit = user.visit(&target).await;
    assert_eq!(visit.served_by, "web-2");
    assert!(visit.set_cookie.is_some());
}

/// `fulcrum run` in its own process on `addr`, with `config` written to a file of its own.
async fn balancer_process(name: &str, addr: SocketAddr, config: &str) -> Process {
    let path = std::env::temp_dir().join(format!("fulcrum-{name}-{}.toml", std::process::id()));
    std::fs::write(&path, config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["run", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the balancer binary");
    let process = Process(child);
    wait_until("the balancer process listens", || async {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;
    process
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_balancer_processes_with_one_config_agree_on_every_cookie() {
    let nodes = webnodes(3).await;
    // web-1 again, at another address: balancer B knows it there.
    let moved = fulcrum::webnode::spawn(fulcrum::webnode::WebNodeOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        "web-1",
    ))
    .await
    .unwrap();
    let (a_addr, b_addr) = (free_port().await, free_port().await);
    let config = |bind: SocketAddr, backends: &[(&str, SocketAddr)]| {
        let list: Vec<String> = backends
            .iter()
            .map(|(name, addr)| format!("{{ name = \"{name}\", address = \"{addr}\" }}"))
            .collect();
        format!(
            "[[listeners]]\nbind = \"{bind}\"\n[pools.web]\nstrategy = \"sticky_cookie\"\nbackends = [{}]\n{}",
            list.join(", "),
            sticky_table("web", "")
        )
    };
    let a_backends = [
        ("web-1", nodes[0].local_addr()),
        ("web-2", nodes[1].local_addr()),
        ("web-3", nodes[2].local_addr()),
    ];
    // Another order, and web-1 moved: ids follow names, not positions or addresses.
    let b_backends = [
        ("web-3", nodes[2].local_addr()),
        ("web-2", nodes[1].local_addr()),
        ("web-1", moved.local_addr()),
    ];
    let _a = balancer_process("sticky-a", a_addr, &config(a_addr, &a_backends)).await;
    let _b = balancer_process("sticky-b", b_addr, &config(b_addr, &b_backends)).await;

    let mut homes = HashSet::new();
    for _ in 0..9 {
        let mut user = User::default();
        let home = user.visit(&format!("http://{a_addr}/")).await.served_by;
        for _ in 0..3 {
            let visit = user.visit(&format!("http://{b_addr}/")).await;
            assert_eq!(visit.served_by, home, "balancer B honours A's cookie");
            assert_eq!(visit.set_cookie, None, "and does not replace it");
        }
        homes.insert(home);
    }
    // B only knows web-1 at its new address, so web-1's users reaching "web-1" through B
    // proves the id followed the name.
    assert_eq!(
        homes.len(),
        3,
        "users were spread over every node: {homes:?}"
    );
}
