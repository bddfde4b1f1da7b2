//! The demo / drill backend behind `fulcrum webnode`.
//!
//! A small, honest HTTP server (HTTP/1.1 and cleartext HTTP/2) that owns nothing of the
//! balancer: it answers which node served a request, reports real health figures in the seed's
//! `/healthz` schema, and has knobs for failover drills (flip health, pause like a GC, slow and
//! large responses, echo exactly what arrived). Every response carries `x-served-by: ID`.
//! `/session` and `/v1/sessions/verify` use the node's session store (`sessions.rs`: in memory
//! or in Redis, one server or a cluster; `session_db.rs`: the durable `user_sessions` table
//! behind Redis; `session_api.rs`: the HTTP side); `GET /metrics` shows how fast sessions are
//! found (`session_metrics.rs`).
//! All other state is atomics on one `Shared`; the only lock guards the CPU sample `/healthz`
//! reads.

mod register;
mod session_api;
mod session_core;
mod session_db;
mod session_metrics;
mod sessions;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::base::health_report::{CpuMeter, HealthReport};

pub use register::RegisterOptions;
pub use session_api::{SESSION_COOKIE, X_SESSION_VISITS};
pub use session_db::SessionDatabase;
use sessions::Store;
pub use sessions::{
    DEFAULT_CLEANUP_INTERVAL, MEMORY_SESSION_CAP, SESSION_TTL, SessionBackend, SessionOptions,
};

/// How long `shutdown` lets in-flight requests finish before cutting their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Slow-loris guard: a client that has not sent its headers by then is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// EMFILE and friends are transient: back off instead of spinning or dying.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// Upper bound for `/slow` and `/admin/pause`: ten minutes is longer than any drill needs.
const MAX_SLEEP_MS: u64 = 600_000;
/// `/bytes` streams slices of one static buffer, so a 1 GiB answer allocates nothing.
const CHUNK_LEN: usize = 64 * 1024;
static CHUNK: [u8; CHUNK_LEN] = [b'x'; CHUNK_LEN];
/// `POST /admin/health` bodies are tiny; refuse anything larger than this.
const MAX_ADMIN_BODY: usize = 4 * 1024;
/// `/bytes?n=` past this is refused: a GiB is more than any drill streams, and an unbounded `n`
/// would let one request keep the node busy forever.
pub const MAX_BYTES: u64 = 1 << 30;

const X_SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");

/// What `fulcrum webnode` was asked to be. Where sessions live is the second argument of
/// [`spawn_with_sessions`], so code that builds these options stays as it is.
#[derive(Debug, Clone)]
pub struct WebNodeOptions {
    /// The address to serve on; port 0 takes a free one.
    pub listen: SocketAddr,
    /// The node's name, sent as `X-Served-By` and to the registry.
    pub id: String,
    /// Bearer token the control endpoints (`POST /admin/health`, `POST /admin/pause`) require.
    /// `None` turns them off: a node behind a balancer is reachable by every client, and
    /// flipping its health or pausing it is a drill for its operator only.
    pub admin_token: Option<String>,
}

impl WebNodeOptions {
    /// A node on `listen` named `id`, with its control endpoints off.
    pub fn new(listen: SocketAddr, id: impl Into<String>) -> Self {
        Self {
            listen,
            id: id.into(),
            admin_token: None,
        }
    }

    /// The same node with its control endpoints open to `token`.
    #[must_use]
    pub fn with_admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(token.into());
        self
    }
}

/// A running web node. Dropping it stops accepting and drains in the background;
/// [`WebNode::shutdown`] does the same and waits for the drain.
pub struct WebNode {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl WebNode {
    /// The address actually bound (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The node's name, as given in [`WebNodeOptions::id`].
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Requests answered or in progress since start (`/admin/*` included).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Stop accepting, let in-flight requests finish (at most ~5 s), resolve when done.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take()
            && let Err(err) = task.await
        {
            warn!(id = %self.shared.id, error = %err, "web node server task failed");
        }
    }
}

impl Drop for WebNode {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Binds, spawns the server with sessions in memory on the current tokio runtime, returns at
/// once.
pub async fn spawn(opts: WebNodeOptions) -> io::Result<WebNode> {
    spawn_with_sessions(opts, SessionBackend::Memory).await
}

/// [`spawn`] with sessions kept where `sessions` says (a [`SessionBackend`] alone, or
/// [`SessionOptions`] with a database behind Redis). A Redis or PostgreSQL that is down does
/// not stop the node from starting: `/healthz` says `DISCONNECTED` until it is up, and
/// `/session` is answered by the other store, or 503 when neither can.
pub async fn spawn_with_sessions(
    opts: WebNodeOptions,
    sessions: impl Into<SessionOptions>,
) -> io::Result<WebNode> {
    let sessions: SessionOptions = sessions.into();
    let served_by = HeaderValue::from_str(&opts.id).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("web node id {:?} is not a valid header value", opts.id),
        )
    })?;
    let listener = crate::datapath::server::listen(opts.listen, 4096, false)?;
    let local_addr = listener.local_addr()?;
    let started = Instant::now();
    let cancel = CancellationToken::new();
    let sessions_text = sessions.backend.describe();
    let database_text = sessions
        .database
        .as_ref()
        .map_or("none", SessionDatabase::describe)
        .to_owned();
    let sessions = Store::start(sessions, &opts.id, &cancel)
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    let shared = Arc::new(Shared {
        id: opts.id,
        served_by,
        started,
        health: AtomicU8::new(Health::Up as u8),
        pause_until_us: AtomicU64::new(0),
        active_connections: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        cpu: CpuMeter::new(),
        sessions,
        admin_token: opts.admin_token,
    });
    let task = tokio::spawn(serve(listener, Arc::clone(&shared), cancel.clone()));
    info!(id = %shared.id, addr = %local_addr, sessions = %sessions_text,
        database = %database_text, "web node listening");
    Ok(WebNode {
        local_addr,
        shared,
        cancel,
        task: Some(task),
    })
}

/// What `fulcrum webnode` runs: serve until Ctrl-C / SIGTERM, then shut down gracefully.
/// With `register`, the node also announces itself to a balancer's registry and, on the
/// signal, is decommissioned and drained there before it stops.
pub async fn run(
    opts: WebNodeOptions,
    sessions: impl Into<SessionOptions>,
    register: Option<RegisterOptions>,
) -> io::Result<()> {
    let node = spawn_with_sessions(opts, sessions).await?;
    let registration = match register {
        Some(register) => {
            Some(register::Registration::start(register, node.id(), node.local_addr()).await?)
        }
        None => None,
    };
    let signal = shutdown_signal().await;
    if let Some(registration) = registration {
        registration.leave().await;
    }
    node.shutdown().await;
    signal
}

async fn shutdown_signal() -> io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            res = tokio::signal::ctrl_c() => res,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

struct Shared {
    id: String,
    served_by: HeaderValue,
    started: Instant,
    health: AtomicU8,
    /// Microseconds since `started` until which non-admin requests stall (0 = no pause).
    pause_until_us: AtomicU64,
    active_connections: AtomicU64,
    requests: AtomicU64,
    cpu: CpuMeter,
    sessions: Store,
    admin_token: Option<String>,
}

impl Shared {
    fn now_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn health(&self) -> Health {
        match self.health.load(Ordering::Acquire) {
            x if x == Health::Down as u8 => Health::Down,
            x if x == Health::Draining as u8 => Health::Draining,
            _ => Health::Up,
        }
    }
}

/// Counts a TCP connection from accept until its task ends, however it ends.
struct ConnGuard(Arc<Shared>);

impl ConnGuard {
    fn open(shared: &Arc<Shared>) -> Self {
        shared.active_connections.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(shared))
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.active_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    // Cuts the connections still open when the grace period runs out.
    let hard_stop = CancellationToken::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => (stream, peer),
                Err(err) => {
                    warn!(id = %shared.id, error = %err, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        // Best effort: without NODELAY small responses only wait a little longer.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "set_nodelay failed");
        }
        let guard = ConnGuard::open(&shared);
        let svc_shared = Arc::clone(&shared);
        let svc = service_fn(move |req| handle(Arc::clone(&svc_shared), peer, req));
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        let hard_stop = hard_stop.clone();
        tokio::spawn(async move {
            let _guard = guard;
            // A client reset or protocol error ends one connection; it is not worth a log line.
            tokio::select! {
                _ = conn => {}
                () = hard_stop.cancelled() => {}
            }
        });
    }
    // Closing the listener makes new connections fail fast, which is what a drill expects.
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        let cut = shared.active_connections.load(Ordering::Relaxed);
        hard_stop.cancel();
        warn!(id = %shared.id, cut, "grace period over; cut the connections still open");
    }
    info!(
        id = %shared.id,
        requests = shared.requests.load(Ordering::Relaxed),
        "web node stopped"
    );
}

async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<NodeBody>, Infallible> {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    if !req.uri().path().starts_with("/admin/") {
        wait_out_pause(&shared).await;
    }
    let mut resp = route(&shared, peer, req).await;
    let served_by = shared.served_by.clone();
    resp.headers_mut().insert(X_SERVED_BY, served_by);
    Ok(resp)
}

async fn wait_out_pause(shared: &Shared) {
    // Loop: a pause extended while we slept must be honoured too.
    loop {
        let until = shared.pause_until_us.load(Ordering::Acquire);
        let now = shared.now_us();
        if until <= now {
            return;
        }
        tokio::time::sleep(Duration::from_micros(until - now)).await;
    }
}

async fn route(shared: &Shared, peer: SocketAddr, req: Request<Incoming>) -> Response<NodeBody> {
    let method = req.method().clone();
    let is_get = method == Method::GET || method == Method::HEAD;
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    match path.as_str() {
        "/" if is_get => text(StatusCode::OK, format!("served by {}\n", shared.id)),
        "/healthz" if is_get => healthz(shared),
        // GET only: HEAD is a safe method and must not count a visit.
        "/session" if method == Method::GET => {
            session_api::session(shared, peer, req.headers()).await
        }
        "/metrics" if is_get => metrics(shared),
        "/v1/sessions/verify" if method == Method::POST => session_api::verify(shared, req).await,
        "/slow" if is_get => match query_ms(query) {
            Some(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                text(StatusCode::OK, format!("slept {ms} ms\n"))
            }
            None => text(StatusCode::BAD_REQUEST, "ms must be a whole number\n"),
        },
        "/bytes" if is_get => match query_u64(query, "n") {
            Some(n) if n <= MAX_BYTES => bytes_response(n),
            Some(_) => text(
                StatusCode::BAD_REQUEST,
                format!("n must be at most {MAX_BYTES}\n"),
            ),
            None => text(StatusCode::BAD_REQUEST, "n must be a whole number\n"),
        },
        "/echo" => echo(req).await,
        "/admin/health" if is_get => json(
            StatusCode::OK,
            &HealthBody {
                status: shared.health(),
            },
        ),
        "/admin/health" | "/admin/pause" if method == Method::POST => {
            match control_refusal(shared, &req) {
                Some(refusal) => refusal,
                None if path == "/admin/health" => set_health(shared, req).await,
                None => pause(shared, query),
            }
        }
        _ => match path.strip_prefix("/status/") {
            Some(code) => status_response(code),
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
    }
}

/// Why a control request may not go ahead: the endpoints are off, or the token is wrong.
fn control_refusal(shared: &Shared, req: &Request<Incoming>) -> Option<Response<NodeBody>> {
    let Some(token) = &shared.admin_token else {
        return Some(error_json(
            StatusCode::FORBIDDEN,
            "control endpoints are off; start the node with --admin-token",
        ));
    };
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    // Constant time, so the answer's timing does not tell how much of a guess was right.
    if given.is_some_and(|given| bool::from(given.ct_eq(token.as_bytes()))) {
        return None;
    }
    let mut refusal = error_json(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    refusal.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer"),
    );
    Some(refusal)
}

fn pause(shared: &Shared, query: Option<&str>) -> Response<NodeBody> {
    match query_ms(query) {
        Some(ms) => {
            // +1 µs rounds the start up, so a stall is never a hair shorter than asked.
            let until = shared.now_us().saturating_add(1 + ms * 1000);
            shared.pause_until_us.store(until, Ordering::Release);
            json(StatusCode::OK, &serde_json::json!({ "paused_ms": ms }))
        }
        None => error_json(StatusCode::BAD_REQUEST, "ms must be a whole number"),
    }
}

fn healthz(shared: &Shared) -> Response<NodeBody> {
    let status = shared.health();
    let mut body = HealthReport::new(
        &shared.id,
        status.as_str(),
        &shared.cpu,
        shared.active_connections.load(Ordering::Relaxed),
    );
    // Redis with `--sessions redis://`, PostgreSQL with `--database`. An outage of either does
    // not make the node DOWN: it still serves everything else (and sessions from the other
    // store), and every node sharing that store would go down with it, leaving the balancer
    // nothing to route to.
    body.dependency_status.redis_session_cache = shared.sessions.redis_status();
    body.dependency_status.database_connection = shared.sessions.database_status();
    let code = match status {
        Health::Up => StatusCode::OK,
        Health::Down | Health::Draining => StatusCode::SERVICE_UNAVAILABLE,
    };
    json(code, &body)
}

/// `GET /metrics`: the node's session figures in the Prometheus text format.
fn metrics(shared: &Shared) -> Response<NodeBody> {
    let mut out = String::new();
    shared.sessions.lookups().render(&mut out);
    if let Some(deleted) = shared.sessions.expired_deleted() {
        session_metrics::render_expired_deleted(&mut out, deleted);
    }
    respond(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        NodeBody::Full(Some(out.into())),
    )
}

async fn set_health(shared: &Shared, req: Request<Incoming>) -> Response<NodeBody> {
    let body = match Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(err) => return error_json(StatusCode::BAD_REQUEST, &format!("reading body: {err}")),
    };
    match serde_json::from_slice::<HealthBody>(&body) {
        Ok(HealthBody { status }) => {
            shared.health.store(status as u8, Ordering::Release);
            json(StatusCode::OK, &HealthBody { status })
        }
        Err(err) => error_json(StatusCode::BAD_REQUEST, &err.to_string()),
    }
}

async fn echo(req: Request<Incoming>) -> Response<NodeBody> {
    let (parts, mut body) = req.into_parts();
    // hyper keeps all values of one name together, each name where it first appeared.
    let headers = parts.headers.iter();
    let headers =
        headers.map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()));
    let headers = headers.collect();
    // Hash frame by frame: a large upload is never held whole.
    let mut hasher = Sha256::new();
    let mut body_bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    body_bytes += data.len() as u64;
                }
            }
            Err(err) => {
                return error_json(StatusCode::BAD_REQUEST, &format!("reading body: {err}"));
            }
        }
    }
    let report = Echo {
        method: parts.method.as_str().to_owned(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        version: format!("{:?}", parts.version),
        headers,
        body_bytes,
        body_sha256: format!("{:x}", hasher.finalize()),
    };
    json(StatusCode::OK, &report)
}

fn bytes_response(n: u64) -> Response<NodeBody> {
    let body = NodeBody::Repeat { remaining: n };
    let mut resp = respond(StatusCode::OK, "application/octet-stream", body);
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(n));
    resp
}

fn status_response(code: &str) -> Response<NodeBody> {
    let Some(status) = parse_status(code) else {
        return text(StatusCode::BAD_REQUEST, "status must be 200..=599\n");
    };
    let mut resp = text(status, format!("status {}\n", status.as_u16()));
    // These statuses must not carry content (RFC 9110 §15.3.5, §15.3.6, §15.4.5).
    if matches!(status.as_u16(), 204 | 205 | 304) {
        *resp.body_mut() = NodeBody::Full(None);
    }
    resp
}

/// A final status a node may answer with: 200..=599 (1xx are not final answers).
fn parse_status(code: &str) -> Option<StatusCode> {
    let code: u16 = code.parse().ok()?;
    if (200..=599).contains(&code) {
        StatusCode::from_u16(code).ok()
    } else {
        None
    }
}

/// The first `key=` value in a query string, as a whole number.
fn query_u64(query: Option<&str>, key: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// `ms=N` for `/slow` and `/admin/pause`, capped at ten minutes.
fn query_ms(query: Option<&str>) -> Option<u64> {
    query_u64(query, "ms").map(|ms| ms.min(MAX_SLEEP_MS))
}

fn respond(status: StatusCode, content_type: &'static str, body: NodeBody) -> Response<NodeBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let value = HeaderValue::from_static(content_type);
    resp.headers_mut().insert(CONTENT_TYPE, value);
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<NodeBody> {
    respond(status, "text/plain", NodeBody::Full(Some(body.into())))
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<NodeBody> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(
            status,
            "application/json",
            NodeBody::Full(Some(body.into())),
        ),
        Err(err) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding JSON: {err}\n"),
        ),
    }
}

fn error_json(status: StatusCode, message: &str) -> Response<NodeBody> {
    json(status, &serde_json::json!({ "error": message }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[repr(u8)]
enum Health {
    Up = 0,
    Down = 1,
    Draining = 2,
}

impl Health {
    fn as_str(self) -> &'static str {
        match self {
            Health::Up => "UP",
            Health::Down => "DOWN",
            Health::Draining => "DRAINING",
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthBody {
    status: Health,
}

#[derive(Serialize)]
struct Echo {
    method: String,
    path: String,
    version: String,
    headers: Vec<(String, String)>,
    body_bytes: u64,
    body_sha256: String,
}

/// Response body: a buffered answer, or `/bytes`' stream of static chunks.
enum NodeBody {
    Full(Option<Bytes>),
    Repeat { remaining: u64 },
}

impl http_body::Body for NodeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = match self.get_mut() {
            Self::Full(data) => data.take(),
            Self::Repeat { remaining } => {
                let len = usize::try_from(*remaining).map_or(CHUNK_LEN, |r| r.min(CHUNK_LEN));
                *remaining -= len as u64;
                (len > 0).then(|| Bytes::from_static(&CHUNK[..len]))
            }
        };
        Poll::Ready(frame.map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(data) => data.is_none(),
            Self::Repeat { remaining } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Self::Repeat { remaining } => SizeHint::with_exact(*remaining),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_u64_takes_the_first_whole_number_for_the_key() {
        assert_eq!(query_u64(Some("ms=250"), "ms"), Some(250));
        assert_eq!(query_u64(Some("a=1&ms=7&ms=9"), "ms"), Some(7));
        assert_eq!(query_u64(Some("n=0"), "n"), Some(0));
        assert_eq!(query_u64(None, "ms"), None);
        assert_eq!(query_u64(Some("ms"), "ms"), None);
        assert_eq!(query_u64(Some("ms="), "ms"), None);
        assert_eq!(query_u64(Some("ms=-1"), "ms"), None);
        assert_eq!(query_u64(Some("ms=1.5"), "ms"), None);
        assert_eq!(query_u64(Some("mss=5"), "ms"), None);
        assert_eq!(query_u64(Some("ms=99999999999999999999999"), "ms"), None);
    }

    #[test]
    fn parse_status_accepts_final_codes_only() {
        assert_eq!(parse_status("418"), Some(StatusCode::IM_A_TEAPOT));
        assert_eq!(parse_status("200"), Some(StatusCode::OK));
        assert_eq!(parse_status("599").map(|s| s.as_u16()), Some(599));
        for bad in ["100", "199", "600", "99", "abc", "", "-200", "4180"] {
            assert_eq!(parse_status(bad), None, "{bad}");
        }
    }

    #[test]
    fn health_bodies_parse_strictly() {
        let parse = |s: &str| serde_json::from_str::<HealthBody>(s).map(|b| b.status).ok();
        assert_eq!(parse(r#"{"status":"DOWN"}"#), Some(Health::Down));
        assert_eq!(parse(r#"{"status":"UP"}"#), Some(Health::Up));
        assert_eq!(parse(r#"{"status":"DRAINING"}"#), Some(Health::Draining));
        assert_eq!(parse(r#"{"status":"down"}"#), None);
        assert_eq!(parse(r#"{"status":"UP","x":1}"#), None);
        assert_eq!(parse("not json"), None);
    }

    #[test]
    fn repeat_body_yields_exact_chunks() {
        let mut body = NodeBody::Repeat {
            remaining: 2 * CHUNK_LEN as u64 + 10,
        };
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut lens = Vec::new();
        while let Poll::Ready(Some(Ok(frame))) =
            http_body::Body::poll_frame(Pin::new(&mut body), &mut cx)
        {
            lens.push(frame.into_data().map_or(0, |d| d.len()));
        }
        assert_eq!(lens, [CHUNK_LEN, CHUNK_LEN, 10]);
        assert!(http_body::Body::is_end_stream(&body));
    }
}
