//! Shared pieces of the integration tests: real web nodes, real balancers and real clients on
//! `127.0.0.1:0`. Nothing here is a mock.
#![allow(dead_code)] // each test binary uses a different subset

pub mod admin_api;
pub mod haproxy;
pub mod postgres;
pub mod redis_server;
pub mod registry;
pub mod sample;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fulcrum::Running;
use fulcrum::config::Config;
use fulcrum::pool::Node;
use fulcrum::webnode::{self, WebNode, WebNodeOptions};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const DEADLINE: Duration = Duration::from_secs(10);

/// The token [`webnodes`] open their control endpoints (`POST /admin/...`) to.
pub const NODE_ADMIN_TOKEN: &str = "drill-token";

/// A control request to a web node (`POST /admin/health`, `POST /admin/pause?ms=N`) with the
/// token [`webnodes`] use.
pub fn node_control(node: &WebNode, path_and_query: &str, body: &str) -> Request<TestBody> {
    Request::post(format!("http://{}{path_and_query}", node.local_addr()))
        .header("authorization", format!("Bearer {NODE_ADMIN_TOKEN}"))
        .body(full(body.to_owned()))
        .unwrap()
}

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// `n` web nodes named `web-1` … `web-n`.
pub async fn webnodes(n: usize) -> Vec<WebNode> {
    let mut nodes = Vec::new();
    for i in 1..=n {
        let opts = WebNodeOptions::new("127.0.0.1:0".parse().unwrap(), format!("web-{i}"))
            .with_admin_token(NODE_ADMIN_TOKEN);
        nodes.push(webnode::spawn(opts).await.expect("web node starts"));
    }
    nodes
}

/// A config with one listener and an admin listener on ephemeral ports and one pool.
/// `pool_extra` is appended inside the `[pools.NAME]` table.
pub fn single_pool(
    pool: &str,
    strategy: &str,
    backends: &[(&str, SocketAddr, u32)],
    pool_extra: &str,
) -> String {
    let backends: Vec<String> = backends
        .iter()
        .map(|(name, addr, weight)| {
            format!("{{ name = \"{name}\", address = \"{addr}\", weight = {weight} }}")
        })
        .collect();
    format!(
        r#"
shutdown_grace = "5s"
[[listeners]]
name = "http"
bind = "127.0.0.1:0"
[admin]
bind = "127.0.0.1:0"
[pools.{pool}]
strategy = "{strategy}"
backends = [{}]
{pool_extra}
"#,
        backends.join(", ")
    )
}

/// Backends for [`single_pool`] from web nodes, all with weight 1.
pub fn nodes_as_backends(nodes: &[WebNode]) -> Vec<(&str, SocketAddr, u32)> {
    nodes.iter().map(|n| (n.id(), n.local_addr(), 1)).collect()
}

pub async fn balancer(toml: &str) -> Running {
    let config = Config::parse(Path::new("test.toml"), toml)
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}"));
    fulcrum::start(&config).await.expect("balancer starts")
}

/// The state of the backend `name` in the balancer's first pool.
pub fn node(running: &Running, name: &str) -> Arc<Node> {
    running.router().pools()[0]
        .snapshot()
        .backends
        .iter()
        .find(|b| &*b.node.name == name)
        .map(|b| b.node.clone())
        .unwrap_or_else(|| panic!("no backend {name} in the pool"))
}

pub fn url(running: &Running, path: &str) -> String {
    format!(
        "http://{}{path}",
        running.addr("http").expect("listener `http`")
    )
}

/// A keep-alive HTTP/1.1 client, as a browser or load generator would use.
pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|e| match e {}).boxed()
}

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn served_by(&self) -> String {
        self.headers
            .get("x-served-by")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
}

pub async fn send(client: &Client<HttpConnector, TestBody>, req: Request<TestBody>) -> Reply {
    let response = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .expect("response within the deadline")
        .expect("request succeeds");
    collect(response).await
}

pub async fn collect(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body arrives").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(client: &Client<HttpConnector, TestBody>, url: &str) -> Reply {
    send(client, Request::get(url).body(empty()).unwrap()).await
}

/// Writes raw bytes on a new connection and reads until the server closes or `DEADLINE`.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The admin listener's `/metrics` text.
pub async fn scrape(running: &Running) -> String {
    let admin = running.admin_addr().expect("admin listener");
    get(&client(), &format!("http://{admin}/metrics"))
        .await
        .text()
}

/// The value of one series in a scrape, e.g. `fulcrum_requests_total{pool="p",backend="a",code="200"}`.
pub fn series(scrape: &str, name_and_labels: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// Whether a test may use the external command `tool`: true when `tool --version` runs. When
/// it does not, the test fails (a suite that passes without running a check says nothing about
/// what it checks), unless the environment sets `skip_var=1`: then a `SKIPPED` line goes to
/// stderr and this returns false, and the test returns without asserting anything. `.ci/run`
/// installs every such tool, so CI never skips.
pub fn tool_available(tool: &str, skip_var: &str, install: &str) -> bool {
    let installed = std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if installed {
        return true;
    }
    // libtest names the thread that runs a test after the test.
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    if std::env::var(skip_var).as_deref() == Ok("1") {
        // Straight to the stderr handle, in one write: `eprintln!` is captured by the test
        // harness and shown only for failures, and a skip must be seen in a passing run.
        let line = format!("\n!!! SKIPPED: {test}: {tool} is not installed and {skip_var}=1 !!!\n");
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        return false;
    }
    panic!(
        "{test} needs {tool}, which is not installed: install it ({install}) or set \
         {skip_var}=1 to skip the tests that need it"
    );
}

/// Polls `condition` until it holds or `DEADLINE` passes.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !condition().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A hand-written backend for behaviour the web node has no knob for. Counts requests that
/// reached its handler, apart from fulcrum's health checks (which arrive at a random moment).
pub struct Backend {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
}

impl Backend {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

pub async fn backend<F, Fut>(handler: F) -> Backend
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    // fulcrum's own health checks are not traffic that "reached" the backend.
                    let health_check = req
                        .headers()
                        .get(http::header::USER_AGENT)
                        .is_some_and(|ua| ua == "fulcrum-health");
                    if !health_check {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Backend { addr, requests }
}

/// A loopback address nobody listens on right now (for processes that need a port up front).
pub async fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A child process that is killed and reaped when the test lets go of it.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Steady GETs from `workers` keep-alive clients until `stop` (or 20,000 each); returns
/// (done, failed). With `watch = Some((node, count))`, answers served by `node` are counted
/// live in `count`. Failures are printed with their cause.
pub fn steady_load(
    target: String,
    workers: usize,
    stop: Arc<AtomicBool>,
    watch: Option<(&'static str, Arc<AtomicU64>)>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    tokio::spawn(async move {
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (target, stop, done, failed, watch) = (
                target.clone(),
                stop.clone(),
                done.clone(),
                failed.clone(),
                watch.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let client = client();
                // Bounded: at most 20,000 requests per worker even if nobody says stop.
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let request = Request::get(&target).body(empty()).unwrap();
                    let ok = match tokio::time::timeout(DEADLINE, client.request(request)).await {
                        Ok(Ok(response)) => {
                            let reply = collect(response).await;
                            if let Some((node, count)) = &watch
                                && reply.served_by() == *node
                            {
                                count.fetch_add(1, Ordering::Relaxed);
                            }
                            if reply.status != 200 {
                                eprintln!("failed: {} {}", reply.status, reply.text());
                            }
                            reply.status == 200
                        }
                        Ok(Err(e)) => {
                            eprintln!("failed: {e:?}");
                            false
                        }
                        Err(_) => {
                            eprintln!("failed: no response within {DEADLINE:?}");
                            false
                        }
                    };
                    done.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    })
}
