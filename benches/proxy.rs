//! Microseconds per keep-alive GET through fulcrum over loopback, against the same GET sent
//! straight to the backend, for empty, 10 KiB and 1 MiB responses.
//!
//! Everything is real and in this process: a small hyper HTTP/1.1 backend on `127.0.0.1:0`
//! answering a fixed body chosen by the path (`/0`, `/10k`, `/1m`), fulcrum started with
//! `fulcrum::start` in front of it (one round robin pool, one backend), and a client on one
//! `hyper::client::conn::http1` keep-alive connection that sends a request, reads the whole
//! body and only then sends the next. `direct` is that client talking to the backend;
//! `fulcrum` is the same client talking to the balancer. The difference between the two is
//! what the proxy adds to a request's latency: the second loopback hop, parsing and writing
//! the head again, the pick, the header rewrite and copying the body through.
//!
//! Each case runs twice, on the two runtimes `fulcrum run` offers:
//! - `multi_thread`: two workers, what the default (one per CPU) gives on a two-core machine.
//!   The client drives its requests from the bench's own thread, so wake-ups cross threads as
//!   with an outside client.
//! - `current_thread`: `fulcrum run --threads 1`. Client, balancer and backend share one
//!   thread, so the time is pure CPU work of the three with no cross-thread wake-ups: the
//!   clearest view of what the proxy costs in CPU per request.
//!
//! Timing is `iter_custom`: one `block_on` runs all of a sample's requests back to back, so no
//! runtime entry or connection setup is counted. Throughput is in bytes of response body for
//! the sized cases and requests for the empty one.
//!
//! Run with `cargo bench --bench proxy`; it takes about a minute.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a bench setup that fails should stop

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fulcrum::config::Config;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// (case name, path, body size).
const SIZES: [(&str, &str, usize); 3] = [
    ("empty", "/0", 0),
    ("10KiB", "/10k", 10 * 1024),
    ("1MiB", "/1m", 1024 * 1024),
];

/// A backend answering `200` with a fixed body chosen by the path: zero bytes for anything
/// but `/10k` and `/1m` (fulcrum's health checks included). The bodies are built once and
/// shared, so the backend spends nothing on them beyond writing them out.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a backend port");
    let addr = listener
        .local_addr()
        .expect("a bound socket has an address");
    let ten_k = Bytes::from(vec![b'x'; 10 * 1024]);
    let one_m = Bytes::from(vec![b'x'; 1024 * 1024]);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (ten_k, one_m) = (ten_k.clone(), one_m.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let body = match req.uri().path() {
                        "/10k" => ten_k.clone(),
                        "/1m" => one_m.clone(),
                        _ => Bytes::new(),
                    };
                    async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// One listener on port 0 and one round robin pool holding `backend`, as an operator would
/// write it (the minimal part of the integration tests' `single_pool`).
fn config(backend: SocketAddr) -> Config {
    let toml = format!(
        r#"
shutdown_grace = "1s"
[[listeners]]
name = "http"
bind = "127.0.0.1:0"
[pools.bench]
strategy = "round_robin"
backends = [{{ name = "node-1", address = "{backend}", weight = 1 }}]
"#
    );
    Config::parse(Path::new("bench.toml"), &toml)
        .unwrap_or_else(|e| panic!("bench config is invalid:\n{e}"))
}

/// A new keep-alive HTTP/1.1 connection to `addr`; its driver runs as a task.
async fn connect(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("set TCP_NODELAY");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// One GET, reading the whole body frame by frame (no copy); returns the body's length.
async fn get(sender: &mut SendRequest<Empty<Bytes>>, path: &'static str) -> usize {
    sender.ready().await.expect("the connection stays open");
    let request = Request::get(path)
        .header(header::HOST, "bench.example")
        .body(Empty::new())
        .expect("a valid request");
    let response = sender.send_request(request).await.expect("a response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("the body arrives").into_data() {
            len += data.len();
        }
    }
    len
}

fn runtime(flavor: &str) -> Runtime {
    let mut builder = match flavor {
        "multi_thread" => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    builder.enable_all().build().expect("a tokio runtime")
}

fn bench_proxy(c: &mut Criterion) {
    for flavor in ["multi_thread", "current_thread"] {
        let rt = runtime(flavor);
        let (direct, running) = rt.block_on(async {
            let direct = backend().await;
            let running = fulcrum::start(&config(direct))
                .await
                .expect("fulcrum starts");
            (direct, running)
        });
        let proxied = running.addr("http").expect("listener `http`");

        for (name, path, size) in SIZES {
            let mut group = c.benchmark_group(format!("{flavor}/{name}"));
            group.throughput(match size {
                0 => Throughput::Elements(1),
                _ => Throughput::Bytes(size as u64),
            });
            for (target, addr) in [("direct", direct), ("fulcrum", proxied)] {
                // A fresh connection per case, opened and checked outside the timing.
                let mut sender = rt.block_on(async {
                    let mut sender = connect(addr).await;
                    assert_eq!(get(&mut sender, path).await, size, "{target} {path}");
                    sender
                });
                group.bench_function(target, |b| {
                    b.iter_custom(|iters| {
                        rt.block_on(async {
                            let started = Instant::now();
                            for _ in 0..iters {
                                black_box(get(&mut sender, path).await);
                            }
                            started.elapsed()
                        })
                    })
                });
            }
            group.finish();
        }
        rt.block_on(running.shutdown());
    }
}

criterion_group! {
    name = benches;
    // About 4.5 s per case (1 s warm-up, 3 s of samples, the analysis), 12 cases, plus
    // starting the backend and the balancer for each runtime: about a minute in all.
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20);
    targets = bench_proxy
}
criterion_main!(benches);
