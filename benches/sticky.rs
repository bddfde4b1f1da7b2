//! Nanoseconds per sticky-cookie operation: signing a value, checking a genuine one and a
//! tampered one, resolving a request's `Cookie` header to a backend, and building the
//! `Set-Cookie` for a new user.
//!
//! A `sticky_cookie` pool reads the cookie on every request (one HMAC-SHA256 over 12 bytes)
//! and signs a new value for every new user or half-expired cookie, so these are the costs
//! that strategy adds to the pick. A tampered value must cost the same as a genuine one: the
//! tag is checked in constant time and nothing returns early before it, so a forger learns
//! nothing from timing. `decode/tampered_*` against `decode/valid` shows that.
//!
//! Run with `cargo bench --bench sticky`; it takes about half a minute.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a bench setup that fails should stop

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use fulcrum::balance::CookieTarget;
use fulcrum::balance::sticky::CookieCodec;
use fulcrum::config::{
    BackendConfig, BackendProtocol, HealthConfig, PoolConfig, StickyConfig, Strategy,
};
use fulcrum::pool::{Pool, PoolState};
use http::{HeaderMap, HeaderValue, header};

const SECRET: &str = "a long random secret shared by every balancer";
const MAX_AGE: Duration = Duration::from_secs(3600);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970")
        .as_secs()
}

fn sticky_pool(backends: usize) -> PoolConfig {
    PoolConfig {
        strategy: Strategy::StickyCookie,
        backend_protocol: BackendProtocol::Http1,
        slow_start: None,
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(30),
        retries: 2,
        idle_pool_timeout: Duration::from_secs(90),
        max_connections_per_backend: None,
        queue_timeout: Duration::from_secs(5),
        backends: (0..backends)
            .map(|i| BackendConfig {
                name: format!("web-{}", i + 1),
                address: SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)),
                weight: 1,
                max_connections: None,
            })
            .collect(),
        health: HealthConfig {
            path: "/healthz".to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            fall: 3,
            rise: 3,
        },
        sticky: StickyConfig {
            secret: Some(SECRET.to_owned()),
            max_age: Some(MAX_AGE),
            ..StickyConfig::default()
        },
    }
}

/// Changes one character of a value to another base64url character, so it still decodes to
/// 24 bytes and only the tag check can reject it.
fn tamper(value: &str, at: usize) -> Vec<u8> {
    let mut forged = value.as_bytes().to_vec();
    forged[at] = if forged[at] == b'A' { b'B' } else { b'A' };
    forged
}

fn bench_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    let codec = CookieCodec::new(Some(SECRET));
    let id = codec.node_id("web-2");
    let now = unix_now();
    let expires = (now + MAX_AGE.as_secs()) as u32;
    let value = codec.encode(&id, expires);

    group.bench_function("encode", |b| {
        b.iter(|| codec.encode(black_box(&id), black_box(expires)))
    });
    group.bench_function("decode/valid", |b| {
        b.iter(|| codec.decode(black_box(value.as_bytes()), black_box(now)))
    });
    // A changed node id (first character) and a changed tag (last character): both must be
    // rejected by the same full HMAC and constant-time comparison as a valid value passes.
    for (name, at) in [("tampered_id", 0), ("tampered_tag", value.len() - 1)] {
        let forged = tamper(&value, at);
        assert_eq!(codec.decode(&forged, now), None, "{name} must be rejected");
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| codec.decode(black_box(&forged), black_box(now)))
        });
    }
    // Not on the request path (ids are computed when a pool is built), for comparison.
    group.bench_function("node_id", |b| b.iter(|| codec.node_id(black_box("web-2"))));
    group.finish();
}

/// What a browser sends: analytics and session cookies around ours, in one header.
fn cookie_header(sticky: Option<&str>) -> HeaderMap {
    let mut value = String::from(
        "_ga=GA1.2.1234567890.1700000000; _gid=GA1.2.987654321.1700000000; \
         session=4f9c2a7e1b3d5f60a8c9e0d1b2a3c4d5; theme=dark",
    );
    if let Some(sticky) = sticky {
        value.push_str("; fulcrum_sticky=");
        value.push_str(sticky);
    }
    value.push_str("; consent=analytics%3Dno%26ads%3Dno");
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("shop.example.com"));
    headers.insert(
        header::COOKIE,
        HeaderValue::from_str(&value).expect("a valid cookie header"),
    );
    headers
}

fn bench_target(c: &mut Criterion) {
    let mut group = c.benchmark_group("target");
    let pool = Pool::new("bench", &sticky_pool(3));
    let snapshot: Arc<PoolState> = pool.snapshot();
    let sticky = snapshot.sticky().expect("a sticky_cookie pool");
    let codec = CookieCodec::new(Some(SECRET));
    let expires = (unix_now() + MAX_AGE.as_secs()) as u32;
    let valid = codec.encode(&codec.node_id("web-2"), expires);
    let cases = [
        ("hit", cookie_header(Some(&valid))),
        ("no_sticky_cookie", cookie_header(None)),
        (
            "tampered",
            cookie_header(Some(&String::from_utf8(tamper(&valid, 31)).unwrap())),
        ),
        (
            "gone",
            cookie_header(Some(&codec.encode(&codec.node_id("web-9"), expires))),
        ),
    ];
    let expected = [
        CookieTarget::Node { index: 1, expires },
        CookieTarget::Absent,
        CookieTarget::Absent,
        CookieTarget::Gone,
    ];
    for ((name, headers), expected) in cases.iter().zip(expected) {
        assert_eq!(
            sticky.target(headers.get_all(header::COOKIE).iter()),
            expected,
            "{name}"
        );
        group.bench_function(*name, |b| {
            b.iter(|| sticky.target(black_box(headers).get_all(header::COOKIE).iter()))
        });
    }
    // What the proxy calls: the same lookup through the pool's strategy dispatch.
    let (_, hit) = &cases[0];
    group.bench_function("hit/via_affinity", |b| {
        b.iter(|| snapshot.affinity(black_box(hit), || unreachable!("sticky pools need no IP")))
    });
    group.finish();
}

fn bench_set_cookie(c: &mut Criterion) {
    let mut group = c.benchmark_group("set_cookie");
    let pool = Pool::new("bench", &sticky_pool(3));
    let snapshot: Arc<PoolState> = pool.snapshot();
    let sticky = snapshot.sticky().expect("a sticky_cookie pool");
    // A new user: sign a value and format the header with its attributes.
    assert!(sticky.set_cookie(CookieTarget::Absent, 1, true).is_some());
    group.bench_function("new_user", |b| {
        b.iter(|| sticky.set_cookie(black_box(CookieTarget::Absent), black_box(1), true))
    });
    // A returning user with a fresh cookie for the node that served them: nothing to send.
    let fresh = CookieTarget::Node {
        index: 1,
        expires: (unix_now() + MAX_AGE.as_secs()) as u32,
    };
    assert!(sticky.set_cookie(fresh, 1, true).is_none());
    group.bench_function("fresh_hit", |b| {
        b.iter(|| sticky.set_cookie(black_box(fresh), black_box(1), true))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // About 2.5 s per case, 12 cases: the whole run stays near half a minute.
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30);
    targets = bench_codec, bench_target, bench_set_cookie
}
criterion_main!(benches);
