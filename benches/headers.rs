//! Nanoseconds per request-head rewrite: everything `headers.rs` does to a client's head
//! before it goes upstream, on five realistic heads, plus its pieces and the trusted-proxy
//! walk of `client_ip`.
//!
//! Every proxied request pays for `upstream_head` (hop-by-hop removal, `X-Forwarded-*`) and
//! `upstream_uri` once per attempt, so this is fixed per-request cost on top of the pick. The
//! heads:
//! - `wrk`: `Host` only, what load generators send; the floor.
//! - `browser`: a typical browser GET, 11 headers with a cookie and a referer.
//! - `browser_keep_alive`: the same plus `Connection: keep-alive`, which Firefox and Chrome
//!   send on HTTP/1.1: the one hop-by-hop header most real HTTP/1.1 heads carry, so this is
//!   where the hop-by-hop fast path stops applying.
//! - `hop_by_hop`: a keep-alive HTTP/1.1 client behind another proxy: `Connection` naming an
//!   extra header, `Keep-Alive`, `TE`, `Upgrade`, `Proxy-Connection` and a two-line
//!   `X-Forwarded-For` chain to append to.
//! - `browser_h2`: the browser head as HTTP/2 delivers it: `:authority` instead of `Host` and the
//!   cookie split over three fields, which are joined for HTTP/1.1.
//!
//! Each head is built once and cloned outside the timed section (`iter_batched`), and the
//! rewritten head is dropped outside it too, so only the rewrite itself is measured. The
//! batches are small and fixed (64 heads): with criterion's `SmallInput` a batch holds tens of
//! thousands of cloned heads, and the allocations a rewrite makes landed on freshly faulted
//! pages (page faults were a quarter of the profile), where a server reuses warm memory.
//!
//! Run with `cargo bench --bench headers`; it takes about forty seconds.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a bench setup that fails should stop

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use fulcrum::headers::{
    ForwardedFor, client_ip, remove_hop_by_hop, set_forwarding, upstream_head, upstream_uri,
};
use http::uri::Authority;
use http::{Request, Version, request};
use ipnet::IpNet;

const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));

/// Heads cloned and rewritten per timed batch: few enough that the allocator works from warm
/// memory, enough that reading the clock twice per batch is noise.
const BATCH: BatchSize = BatchSize::NumIterations(64);

const FWD: ForwardedFor = ForwardedFor {
    peer: PEER,
    proto: "http",
    rfc7239: false,
};

const BROWSER: &[(&str, &str)] = &[
    ("host", "shop.example.com"),
    (
        "user-agent",
        "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    ),
    (
        "accept",
        "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
    ),
    ("accept-language", "en-GB,en;q=0.7,fr;q=0.3"),
    ("accept-encoding", "gzip, deflate, br, zstd"),
    ("referer", "https://shop.example.com/catalogue?page=2"),
    (
        "cookie",
        "_ga=GA1.2.1234567890.1700000000; _gid=GA1.2.987654321.1700000000; \
         session=4f9c2a7e1b3d5f60a8c9e0d1b2a3c4d5; theme=dark",
    ),
    ("upgrade-insecure-requests", "1"),
    ("sec-fetch-dest", "document"),
    ("sec-fetch-mode", "navigate"),
    ("sec-fetch-site", "same-origin"),
];

const HOP_BY_HOP: &[(&str, &str)] = &[
    ("host", "api.example.com"),
    ("user-agent", "curl/8.5.0"),
    ("accept", "*/*"),
    ("connection", "keep-alive, x-hop-secret, Upgrade"),
    ("keep-alive", "timeout=5, max=1000"),
    ("proxy-connection", "keep-alive"),
    ("te", "trailers, deflate"),
    ("upgrade", "websocket"),
    ("x-hop-secret", "for the next hop only"),
    ("x-forwarded-for", "203.0.113.7, 198.51.100.2"),
    ("x-forwarded-for", "192.168.1.20"),
];

fn head(version: Version, uri: &str, headers: &[(&str, &str)]) -> request::Parts {
    let mut builder = Request::get(uri).version(version);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).expect("a valid head").into_parts().0
}

/// The browser head as Firefox or Chrome sends it over HTTP/1.1.
fn browser_keep_alive() -> request::Parts {
    let mut headers = BROWSER.to_vec();
    headers.insert(1, ("connection", "keep-alive"));
    head(Version::HTTP_11, "/products/42?colour=blue", &headers)
}

/// The browser head as an HTTP/2 request: no Host, the authority in the URI, three cookie
/// fields.
fn browser_h2() -> request::Parts {
    let mut headers: Vec<(&str, &str)> = BROWSER
        .iter()
        .copied()
        .filter(|(name, _)| *name != "host" && *name != "cookie")
        .collect();
    headers.extend([
        ("cookie", "_ga=GA1.2.1234567890.1700000000"),
        ("cookie", "_gid=GA1.2.987654321.1700000000"),
        (
            "cookie",
            "session=4f9c2a7e1b3d5f60a8c9e0d1b2a3c4d5; theme=dark",
        ),
    ]);
    head(
        Version::HTTP_2,
        "https://shop.example.com/products/42?colour=blue",
        &headers,
    )
}

fn heads() -> Vec<(&'static str, request::Parts)> {
    vec![
        (
            "wrk",
            head(Version::HTTP_11, "/", &[("host", "127.0.0.1:8080")]),
        ),
        (
            "browser",
            head(Version::HTTP_11, "/products/42?colour=blue", BROWSER),
        ),
        ("browser_keep_alive", browser_keep_alive()),
        (
            "hop_by_hop",
            head(Version::HTTP_11, "/v1/stream?since=1700000000", HOP_BY_HOP),
        ),
        ("browser_h2", browser_h2()),
    ]
}

fn bench_upstream_head(c: &mut Criterion) {
    let mut group = c.benchmark_group("upstream_head");
    for (name, parts) in heads() {
        group.bench_function(name, |b| {
            b.iter_batched(
                || parts.clone(),
                |mut parts| {
                    upstream_head(&mut parts, black_box(FWD));
                    parts
                },
                BATCH,
            )
        });
    }
    // The browser head with RFC 7239 `Forwarded` on as well: one more formatted element.
    let browser = head(Version::HTTP_11, "/products/42?colour=blue", BROWSER);
    group.bench_function("browser/rfc7239", |b| {
        let fwd = ForwardedFor {
            rfc7239: true,
            ..FWD
        };
        b.iter_batched(
            || browser.clone(),
            |mut parts| {
                upstream_head(&mut parts, black_box(fwd));
                parts
            },
            BATCH,
        )
    });
    group.finish();
}

/// The pieces of `upstream_head`, and `upstream_uri`, on the browser and hop-by-hop heads;
/// for `browser_keep_alive` only the hop-by-hop removal, the rest being `browser`'s.
fn bench_pieces(c: &mut Criterion) {
    let mut group = c.benchmark_group("pieces");
    let backend = Authority::from_static("10.1.0.12:8080");
    for (name, parts) in heads() {
        if name == "wrk" || name == "browser_h2" {
            continue;
        }
        group.bench_function(format!("remove_hop_by_hop/{name}"), |b| {
            b.iter_batched(
                || parts.headers.clone(),
                |mut headers| {
                    remove_hop_by_hop(&mut headers, black_box(true));
                    headers
                },
                BATCH,
            )
        });
        if name == "browser_keep_alive" {
            continue;
        }
        group.bench_function(format!("set_forwarding/{name}"), |b| {
            b.iter_batched(
                || parts.headers.clone(),
                |mut headers| {
                    set_forwarding(&mut headers, black_box(FWD));
                    headers
                },
                BATCH,
            )
        });
        group.bench_function(format!("upstream_uri/{name}"), |b| {
            b.iter(|| upstream_uri(black_box(&backend), black_box(&parts.uri)))
        });
    }
    group.finish();
}

/// `client_ip` behind trusted proxies: the walk of a three-hop `X-Forwarded-For`, and the early
/// return for a peer that is not trusted.
fn bench_client_ip(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_ip");
    let trusted: Vec<IpNet> = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8"]
        .iter()
        .map(|net| net.parse().expect("a valid network"))
        .collect();
    // Client 203.0.113.7, then a CDN edge (untrusted, so it is the answer), then our own
    // internal hop 10.2.3.4; the peer 10.0.0.7 is trusted too.
    let three_hops = head(
        Version::HTTP_11,
        "/",
        &[
            ("host", "shop.example.com"),
            ("x-forwarded-for", "203.0.113.7, 198.51.100.2, 10.2.3.4"),
        ],
    )
    .headers;
    assert_eq!(
        client_ip(PEER, &three_hops, &trusted),
        IpAddr::from([198, 51, 100, 2])
    );
    group.bench_function("trusted_peer/3_hops", |b| {
        b.iter(|| client_ip(black_box(PEER), black_box(&three_hops), black_box(&trusted)))
    });
    // Every hop trusted: the walk goes all the way to the leftmost address.
    let all_trusted = head(
        Version::HTTP_11,
        "/",
        &[
            ("host", "shop.example.com"),
            ("x-forwarded-for", "192.168.4.5, 172.16.0.9, 10.2.3.4"),
        ],
    )
    .headers;
    group.bench_function("trusted_peer/3_trusted_hops", |b| {
        b.iter(|| {
            client_ip(
                black_box(PEER),
                black_box(&all_trusted),
                black_box(&trusted),
            )
        })
    });
    let outsider = IpAddr::from([203, 0, 113, 99]);
    group.bench_function("untrusted_peer", |b| {
        b.iter(|| {
            client_ip(
                black_box(outsider),
                black_box(&three_hops),
                black_box(&trusted),
            )
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // About 2.5 s per case, 16 cases: the whole run stays near forty seconds.
    config = Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30);
    targets = bench_upstream_head, bench_pieces, bench_client_ip
}
criterion_main!(benches);
