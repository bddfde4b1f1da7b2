//! Web node sessions over real loopback sockets: `GET /session` counting per cookie, resets on
//! another node's memory, continuity through a shared Redis, `POST /v1/sessions/verify`, and
//! what a node does while its Redis is away.
//!
//! Redis tests start their own `redis-server` and fail without one unless `FULCRUM_SKIP_REDIS=1`
//! (see `support/redis_server.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::time::Instant;

use fulcrum::webnode::{self, SessionBackend, WebNode, WebNodeOptions};
use http::header::{COOKIE, SET_COOKIE};
use http::{Request, StatusCode};
use serde_json::Value;
use support::redis_server::{RedisServer, free_port, redis_available};
use support::{DEADLINE, Reply, client, empty, full, get, send, wait_until};

async fn node(id: &str, sessions: SessionBackend) -> WebNode {
    let opts = WebNodeOptions::new("127.0.0.1:0".parse().unwrap(), id);
    webnode::spawn_with_sessions(opts, sessions)
        .await
        .expect("web node starts")
}

fn redis_backend(port: u16) -> SessionBackend {
    format!("redis://127.0.0.1:{port}")
        .parse()
        .expect("a redis:// URL")
}

/// `GET /session` on `node`, with `session=ID` when `cookie` is given.
async fn visit(node: &WebNode, cookie: Option<&str>) -> Reply {
    let mut req = Request::get(format!("http://{}/session", node.local_addr()));
    if let Some(id) = cookie {
        req = req.header(COOKIE, format!("session={id}"));
    }
    send(&client(), req.body(empty()).unwrap()).await
}

/// What a `/session` answer said, checked for consistency between its parts.
#[derive(Debug)]
struct Seen {
    node: String,
    session: String,
    visits: u64,
    new: bool,
}

fn seen(reply: &Reply) -> Seen {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let json: Value = serde_json::from_slice(&reply.body).expect("JSON body");
    let seen = Seen {
        node: json["node"].as_str().expect("node").to_owned(),
        session: json["session"].as_str().expect("session").to_owned(),
        visits: json["visits"].as_u64().expect("visits"),
        new: json["new"].as_bool().expect("new"),
    };
    assert_eq!(reply.served_by(), seen.node);
    let header = reply
        .headers
        .get("x-session-visits")
        .expect("x-session-visits");
    assert_eq!(header.to_str().unwrap(), seen.visits.to_string());
    let set_cookie = reply.headers.get(SET_COOKIE).map(|v| v.to_str().unwrap());
    if seen.new {
        assert_eq!(seen.visits, 1);
        assert_eq!(
            set_cookie,
            Some(format!("session={}; Path=/; HttpOnly; SameSite=Lax", seen.session).as_str())
        );
    } else {
        assert_eq!(set_cookie, None, "a continued session is not re-issued");
    }
    seen
}

async fn verify(node: &WebNode, body: &'static str) -> (StatusCode, Value) {
    let req = Request::post(format!("http://{}/v1/sessions/verify", node.local_addr()))
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap();
    let reply = send(&client(), req).await;
    let json = serde_json::from_slice(&reply.body)
        .unwrap_or_else(|e| panic!("verify answers JSON ({e}): {}", reply.text()));
    (reply.status, json)
}

async fn verify_token(node: &WebNode, token: &str) -> Value {
    let body = serde_json::json!({
        "sessionToken": token,
        "clientIp": "203.0.113.9",
        "userAgent": "test",
        "validationParameters": {"requireFresh": false}
    });
    let body: &'static str = Box::leak(body.to_string().into_boxed_str());
    let (status, json) = verify(node, body).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    json
}

async fn healthz(node: &WebNode) -> Value {
    let reply = get(&client(), &format!("http://{}/healthz", node.local_addr())).await;
    serde_json::from_slice(&reply.body).expect("healthz JSON")
}

#[tokio::test]
async fn memory_sessions_count_1_2_3_for_one_cookie() {
    let a = node("web-1", SessionBackend::Memory).await;
    let first = seen(&visit(&a, None).await);
    assert_eq!(
        (first.visits, first.new, first.node.as_str()),
        (1, true, "web-1")
    );
    assert_eq!(first.session.len(), 32, "{first:?}");
    for expected in 2..=3 {
        let next = seen(&visit(&a, Some(&first.session)).await);
        assert_eq!((next.visits, next.new), (expected, false), "{next:?}");
        assert_eq!(next.session, first.session);
    }
    // Another user, another session, counted on its own.
    let other = seen(&visit(&a, None).await);
    assert_eq!((other.visits, other.new), (1, true));
    assert_ne!(other.session, first.session);
    assert_eq!(
        healthz(&a).await["dependencyStatus"]["redisSessionCache"],
        "NOT_CONFIGURED"
    );
}

#[tokio::test]
async fn a_memory_session_moved_to_another_node_resets_with_a_new_id() {
    let (a, b) = (
        node("web-1", SessionBackend::Memory).await,
        node("web-2", SessionBackend::Memory).await,
    );
    let on_a = seen(&visit(&a, None).await);
    seen(&visit(&a, Some(&on_a.session)).await);

    let on_b = seen(&visit(&b, Some(&on_a.session)).await);
    assert_eq!((on_b.visits, on_b.new), (1, true), "{on_b:?}");
    assert_ne!(
        on_b.session, on_a.session,
        "an id b never issued is not adopted"
    );
    // Each node still counts the session it issued.
    assert_eq!(seen(&visit(&a, Some(&on_a.session)).await).visits, 3);
    assert_eq!(seen(&visit(&b, Some(&on_b.session)).await).visits, 2);
}

#[tokio::test]
async fn malformed_and_forged_cookies_start_a_new_session() {
    let a = node("web-1", SessionBackend::Memory).await;
    for cookie in [
        "not-hex",
        "0123456789ABCDEF0123456789ABCDEF",
        "0123456789abcdef0123456789abcdef",
        "",
    ] {
        let s = seen(&visit(&a, Some(cookie)).await);
        assert_eq!((s.visits, s.new), (1, true), "{cookie:?}: {s:?}");
        assert_ne!(s.session, cookie);
    }
}

#[tokio::test]
async fn head_does_not_count_a_visit() {
    let a = node("web-1", SessionBackend::Memory).await;
    let s = seen(&visit(&a, None).await);
    let req = Request::head(format!("http://{}/session", a.local_addr()))
        .header(COOKIE, format!("session={}", s.session))
        .body(empty())
        .unwrap();
    assert_eq!(send(&client(), req).await.status, StatusCode::NOT_FOUND);
    assert_eq!(seen(&visit(&a, Some(&s.session)).await).visits, 2);
}

#[tokio::test]
async fn verify_answers_valid_unknown_and_malformed() {
    let a = node("web-1", SessionBackend::Memory).await;
    let s = seen(&visit(&a, None).await);
    seen(&visit(&a, Some(&s.session)).await);

    let json = verify_token(&a, &s.session).await;
    assert_eq!(
        json,
        serde_json::json!({"valid": true, "sessionToken": s.session, "visits": 2, "servedBy": "web-1"})
    );
    // Verifying is not a visit.
    assert_eq!(seen(&visit(&a, Some(&s.session)).await).visits, 3);

    for unknown in ["0123456789abcdef0123456789abcdef", "not-a-token", ""] {
        let json = verify_token(&a, unknown).await;
        assert_eq!(
            json,
            serde_json::json!({"valid": false, "sessionToken": unknown, "visits": 0, "servedBy": "web-1"})
        );
    }

    for bad in [
        "not json",
        "",
        "{}",
        r#"{"clientIp":"127.0.0.1"}"#,
        r#"{"sessionToken":42}"#,
        r#"{"sessionToken":"x","validationParameters":"strict"}"#,
    ] {
        let (status, json) = verify(&a, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {json}");
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{json}"
        );
    }
    let huge: &'static str =
        Box::leak(format!(r#"{{"sessionToken":"{}"}}"#, "a".repeat(20_000)).into_boxed_str());
    assert_eq!(verify(&a, huge).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    let get_verify = get(
        &client(),
        &format!("http://{}/v1/sessions/verify", a.local_addr()),
    )
    .await;
    assert_eq!(get_verify.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_session_started_on_one_node_continues_on_another() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let backend = redis_backend(redis.port);
    let (a, b) = (
        node("web-1", backend.clone()).await,
        node("web-2", backend).await,
    );

    let first = seen(&visit(&a, None).await);
    assert_eq!((first.visits, first.new), (1, true));
    for (i, n) in [&b, &a, &b].into_iter().enumerate() {
        let next = seen(&visit(n, Some(&first.session)).await);
        assert_eq!((next.visits, next.new), (i as u64 + 2, false), "{next:?}");
        assert_eq!(next.session, first.session);
    }
    let json = verify_token(&b, &first.session).await;
    assert_eq!(
        (json["valid"].as_bool(), json["visits"].as_u64()),
        (Some(true), Some(4))
    );
    assert_eq!(
        verify_token(&a, "0123456789abcdef0123456789abcdef").await["valid"],
        false
    );

    // The key expires 30 minutes after the last visit, and each visit restarts the clock.
    let key = format!("fulcrum:session:{}", first.session);
    let ttl = redis.command(&["TTL", &key]);
    assert!(
        (1790..=1800).contains(&ttl.parse::<i64>().unwrap_or(-1)),
        "TTL {ttl}"
    );
    redis.command(&["EXPIRE", &key, "5"]);
    seen(&visit(&a, Some(&first.session)).await);
    assert!(redis.command(&["TTL", &key]).parse::<i64>().unwrap_or(-1) > 1790);

    // Gone from Redis means gone for every node: a reset with a new id.
    redis.command(&["DEL", &key]);
    let reset = seen(&visit(&b, Some(&first.session)).await);
    assert_eq!((reset.visits, reset.new), (1, true));
    assert_ne!(reset.session, first.session);
    for n in [&a, &b] {
        assert_eq!(
            healthz(n).await["dependencyStatus"]["redisSessionCache"],
            "CONNECTED"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_visits_through_two_redis_nodes_lose_no_count() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let backend = redis_backend(redis.port);
    let (a, b) = (
        node("web-1", backend.clone()).await,
        node("web-2", backend).await,
    );
    let id = seen(&visit(&a, None).await).session;

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let url = format!(
            "http://{}/session",
            if i % 2 == 0 {
                a.local_addr()
            } else {
                b.local_addr()
            }
        );
        let cookie = format!("session={id}");
        tasks.spawn(async move {
            let req = Request::get(url)
                .header(COOKIE, cookie)
                .body(empty())
                .unwrap();
            seen(&send(&client(), req).await).visits
        });
    }
    let mut counts = Vec::new();
    while let Some(visits) = tasks.join_next().await {
        counts.push(visits.expect("visit task"));
    }
    counts.sort_unstable();
    // Each of the 100 saw its own count: none was lost or doubled by a race.
    assert_eq!(counts, (2..=101).collect::<Vec<u64>>());
    assert_eq!(verify_token(&b, &id).await["visits"], 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_redis_is_away_answers_503_on_sessions_and_recovers() {
    if !redis_available() {
        return;
    }
    // Nothing listens here yet: the node must start anyway.
    let port = free_port();
    let n = node("web-1", redis_backend(port)).await;

    let reply = visit(&n, None).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.served_by(), "web-1");
    let error: Value = serde_json::from_slice(&reply.body).unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains(&format!("redis at 127.0.0.1:{port}")),
        "{error}"
    );
    let (status, json) = verify(&n, r#"{"sessionToken":"0123456789abcdef0123456789abcdef"}"#).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    let health = healthz(&n).await;
    assert_eq!(
        health["dependencyStatus"]["redisSessionCache"], "DISCONNECTED",
        "{health}"
    );
    assert_eq!(
        health["status"], "UP",
        "the node still serves everything else"
    );
    let root = get(&client(), &format!("http://{}/", n.local_addr())).await;
    assert_eq!(root.status, StatusCode::OK);

    // Redis comes up on that port: sessions work again without restarting the node.
    let redis = RedisServer::start_on(port).expect("redis-server starts on the chosen port");
    wait_until("the node reports Redis connected", || async {
        healthz(&n).await["dependencyStatus"]["redisSessionCache"] == "CONNECTED"
    })
    .await;
    let s = seen(&visit(&n, None).await);
    assert_eq!(seen(&visit(&n, Some(&s.session)).await).visits, 2);

    // And goes away again: 503 and DISCONNECTED, promptly, not a hang.
    drop(redis);
    let started = Instant::now();
    wait_until("the node reports Redis disconnected", || async {
        healthz(&n).await["dependencyStatus"]["redisSessionCache"] == "DISCONNECTED"
    })
    .await;
    let reply = visit(&n, Some(&s.session)).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert!(started.elapsed() < DEADLINE);
}
