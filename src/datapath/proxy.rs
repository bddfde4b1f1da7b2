//! The request path after a connection is up: route → pick → forward → respond.
//!
//! [`handle`] is the whole story of a request. Everything that can go wrong becomes a
//! [`ProxyError`], and [`ProxyError::into_response`] is the one place that turns errors into
//! statuses, metrics and log lines, and decides who is to blame: a backend, or the client.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::FutureExt as _;
use futures_util::future::Either;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use ipnet::IpNet;
use tracing::{debug, warn};

use crate::base::config::MAX_ATTEMPTS;
use crate::base::config::{Config, strip_port};
use crate::base::error::{BoxError, ErrorChain};
use crate::base::metrics::{ClientErrorKind, ErrorKind, NONE, ResponseCounters};
use crate::datapath::access_log::{AccessLog, Origin, Termination, Trace};
use crate::datapath::body::ProxyBody;
use crate::datapath::headers::{self, ForwardedFor};
use crate::datapath::server::ConnHandle;
use crate::model::balance::{CookieTarget, Pick};
use crate::model::pool::{Backend, InFlight, Node, Placement, Pool, PoolState, Unplaced};
use crate::upstream::body::{RequestBody, Upload};
use crate::upstream::client::UpstreamClient;
use crate::upstream::{self, UpstreamConn, UpstreamError};
use http_body::Body as _;
use tokio::sync::oneshot;

/// What one listener tells the proxy path about its connections.
#[derive(Debug)]
pub(crate) struct ListenerInfo {
    pub name: Arc<str>,
    /// `"http"` or `"https"`, for `X-Forwarded-Proto`.
    pub proto: &'static str,
    pub forwarded: bool,
    pub max_body_bytes: Option<u64>,
    /// Peers whose `X-Forwarded-For` names the client (for `ip_hash`).
    pub trusted_proxies: Box<[IpNet]>,
    pub router: Arc<ArcSwap<Router>>,
    /// Swapped by a reload that changes `access_log`; empty when the listener logs nothing.
    pub access_log: Arc<ArcSwapOption<AccessLog>>,
    /// Whether `X-Request-Id` is kept when sane and set when not.
    pub request_id: bool,
}

/// One client connection.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    pub peer: SocketAddr,
    pub listener: Arc<ListenerInfo>,
    /// The connection's share for a tunnel that outlives the request (an upgrade).
    pub conn: ConnHandle,
}

/// Routes in file order, first match wins.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    pools: Vec<Arc<Pool>>,
    /// `fulcrum_requests_total{pool="none",backend="none"}`: requests no route matched.
    unrouted: ResponseCounters,
}

#[derive(Debug)]
struct Route {
    /// Lower-case, without port.
    host: Option<String>,
    path_prefix: Option<String>,
    pool: Arc<Pool>,
}

impl Router {
    pub fn new(config: &Config) -> Self {
        let pools: Vec<Arc<Pool>> = config
            .pools
            .iter()
            .map(|(name, pool)| Arc::new(Pool::new(name, pool)))
            .collect();
        Self::assemble(config, pools)
    }

    /// The routing table of `config` over `pools`, which must hold every pool it names.
    #[expect(clippy::expect_used, reason = "see the message")]
    pub fn assemble(config: &Config, pools: Vec<Arc<Pool>>) -> Self {
        let find = |name: &str| {
            pools
                .iter()
                .find(|p| &*p.name == name)
                .cloned()
                .expect("validated config routes only to existing pools")
        };
        let mut routes: Vec<Route> = config
            .routes
            .iter()
            .map(|r| Route {
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                pool: find(&r.pool),
            })
            .collect();
        if let Some(pool) = config.default_pool() {
            routes.push(Route {
                host: None,
                path_prefix: None,
                pool: find(pool),
            });
        }
        Self {
            routes,
            pools,
            unrouted: ResponseCounters::new(Arc::from(NONE), Arc::from(NONE)),
        }
    }

    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Pool>> {
        let host = host.map(strip_port);
        self.routes
            .iter()
            .find(|r| {
                r.host
                    .as_deref()
                    .is_none_or(|want| host.is_some_and(|h| h.eq_ignore_ascii_case(want)))
                    && r.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
            })
            .map(|r| &r.pool)
    }

    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| &*p.name == name)
    }
}

/// Serves one request: the whole request path after the connection layer.
///
/// What needs no waiting (the request id, routing, the checks, the rewritten head) is done
/// before the future is made, so the future (which hyper boxes, and keeps for as long as the
/// request lasts) holds the rewritten request once, not the client's request as well.
pub(crate) fn handle(
    mut req: Request<Incoming>,
    conn: Arc<ConnInfo>,
) -> impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static {
    let started = Instant::now();
    let listener = &conn.listener;
    let request_id = listener
        .request_id
        .then(|| headers::request_id(req.headers_mut()));
    let mut trace = match listener.access_log.load_full() {
        None => Trace::default(),
        Some(log) => {
            let origin = Origin {
                listener: &listener.name,
                client: headers::client_ip(
                    conn.peer.ip(),
                    req.headers(),
                    &listener.trusted_proxies,
                ),
                tls: conn.conn.tls(),
                started,
            };
            Trace::start(log, &req, request_id.as_ref(), origin)
        }
    };
    let routed = route(req, &conn, &mut trace);
    async move {
        let mut response = match routed {
            Routed::Answered(response) => response,
            Routed::Forward {
                mut outgoing,
                state,
                pool,
                version,
            } => match send_with_retries(&mut outgoing, &state, &pool, &conn, started, &mut trace)
                .await
            {
                Ok(response) => response,
                Err(e) => {
                    trace.failed(e.status().as_u16(), e.termination());
                    e.into_response(&pool.metrics.responses, version)
                }
            },
        };
        if trace.is_on() {
            let tail = trace.respond(response.status().as_u16(), response.body().is_end_stream());
            response.body_mut().set_tail(tail);
        }
        Ok(response)
    }
}

/// Where a request goes before any backend sees it.
enum Routed {
    /// To a pool: the request rewritten for its backends, and the pool's state it was
    /// checked against.
    Forward {
        outgoing: Outgoing,
        state: Arc<PoolState>,
        pool: Arc<Pool>,
        /// The client's HTTP version, which an error answer is given in.
        version: Version,
    },
    /// Nowhere: the answer fulcrum gives itself, already in `trace`.
    Answered(Response<ProxyBody>),
}

/// Routes a request and checks what it declares: a failure becomes its answer through the
/// funnel, and its access-log termination through `trace`.
fn route(req: Request<Incoming>, conn: &ConnInfo, trace: &mut Trace) -> Routed {
    let version = req.version();
    if req.method() == Method::CONNECT {
        // A reverse proxy does not open tunnels to arbitrary hosts.
        let error = ProxyError::Method;
        trace.failed(error.status().as_u16(), error.termination());
        return Routed::Answered(
            error.into_response(&conn.listener.router.load().unrouted, version),
        );
    }
    let pool = {
        let router = conn.listener.router.load();
        match router.route(request_host(&req), req.uri().path()) {
            Some(pool) => pool.clone(),
            None => {
                let error = ProxyError::NoRoute;
                trace.failed(error.status().as_u16(), error.termination());
                return Routed::Answered(error.into_response(&router.unrouted, version));
            }
        }
    };
    trace.pool(&pool.name);
    if let Some(limit) = conn.listener.max_body_bytes
        && declared_length(&req).is_some_and(|len| len > limit)
    {
        conn.conn.client_errors().count(ClientErrorKind::TooLarge);
        let error = ProxyError::BodyTooLarge { limit };
        trace.failed(error.status().as_u16(), error.termination());
        return Routed::Answered(error.into_response(&pool.metrics.responses, version));
    }
    let state = pool.snapshot();
    let outgoing = Outgoing::prepare(req, &state, conn);
    trace.upload(outgoing.upload.as_ref());
    Routed::Forward {
        outgoing,
        state,
        pool,
        version,
    }
}

/// A request on its way to a backend: its rewritten head, the body no backend has read yet,
/// and what a pick and a retry need to know about it.
struct Outgoing {
    head: http::request::Parts,
    body: Option<Incoming>,
    bodiless: bool,
    /// Only a request with a body pays for watching its upload.
    upload: Option<Arc<Upload>>,
    /// Safe to repeat after a backend dropped the connection mid-exchange (RFC 9110 §9.2.2).
    idempotent: bool,
    /// An HTTP/1.1 `Upgrade` (WebSocket) goes to the backend as one, over HTTP/1.1; hyper hands
    /// over the client's connection once the backend's 101 has been relayed.
    upgrade: Option<HeaderValue>,
    client_upgrade: Option<OnUpgrade>,
    /// `ip_hash`'s key and the node the sticky cookie names.
    client: u64,
    cookie: CookieTarget,
}

impl Outgoing {
    fn prepare(req: Request<Incoming>, state: &PoolState, conn: &ConnInfo) -> Self {
        let (mut head, body) = req.into_parts();
        let (client, cookie) = state.affinity(&head.headers, || {
            headers::client_ip(
                conn.peer.ip(),
                &head.headers,
                &conn.listener.trusted_proxies,
            )
        });
        let upgrade = headers::upgrade_protocol(head.version, &head.headers);
        let client_upgrade = upgrade
            .as_ref()
            .and_then(|_| head.extensions.remove::<OnUpgrade>());
        let fwd = ForwardedFor {
            peer: conn.peer.ip(),
            proto: conn.listener.proto,
            rfc7239: conn.listener.forwarded,
        };
        headers::upstream_head(&mut head, fwd);
        if let Some(protocol) = &upgrade {
            headers::keep_upgrade(&mut head.headers, protocol.clone());
        }
        let bodiless = body.is_end_stream();
        let upload = (!bodiless).then(|| {
            let errors = conn.conn.client_errors().clone();
            Arc::new(Upload::new(conn.listener.max_body_bytes, errors))
        });
        let idempotent = matches!(
            head.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        Self {
            head,
            body: (!bodiless).then_some(body),
            bodiless,
            upload,
            idempotent,
            upgrade,
            client_upgrade,
            client,
            cookie,
        }
    }

    /// The request for one attempt on `backend`. Before the last attempt the body goes out
    /// recoverable (handed back on the receiver if the backend never read it) and the head is
    /// cloned; the last attempt takes both.
    fn attempt(
        &mut self,
        backend: &Backend,
        pooled: Option<&UpstreamClient>,
        last: bool,
    ) -> (Request<RequestBody>, Option<oneshot::Receiver<Incoming>>) {
        let (body, giveback) = match (self.body.take(), &self.upload) {
            (Some(b), Some(upload)) if last => (RequestBody::new(b, upload.clone()), None),
            (Some(b), Some(upload)) => {
                let (b, giveback) = RequestBody::recoverable(b, upload.clone());
                (b, Some(giveback))
            }
            _ => (RequestBody::empty(), None),
        };
        let mut upstream = Request::new(body);
        *upstream.method_mut() = self.head.method.clone();
        // hyper-util's client (h2c, upgrades) picks its connection by the URI's authority; an
        // HTTP/1.1 connection of our own takes the origin form it sends.
        *upstream.uri_mut() = match pooled {
            Some(_) => headers::upstream_uri(&backend.authority, &self.head.uri),
            None => headers::origin_form(&self.head.uri),
        };
        *upstream.version_mut() = self.head.version;
        *upstream.headers_mut() = if last {
            std::mem::take(&mut self.head.headers)
        } else {
            self.head.headers.clone()
        };
        (upstream, giveback)
    }

    /// Whether `error` may go to another node: only a request no backend has seen may. Nothing
    /// was sent over a refused connection, and an idempotent request without a body may be
    /// repeated. A refusal also starts the node's cool-off.
    fn may_retry(&self, error: &ProxyError, body_back: bool) -> bool {
        match error {
            ProxyError::Connect { node, .. } => {
                let cool_off = node.refused();
                debug!(backend = %node.name, ?cool_off, "backend refused; cooling off");
                self.bodiless || body_back
            }
            ProxyError::Reset { .. } => self.idempotent && self.bodiless,
            _ => false,
        }
    }
}

/// Picks a node, sends, and relays its answer; a failure no backend saw goes to another node,
/// never the same one twice, up to `retries` times.
async fn send_with_retries(
    outgoing: &mut Outgoing,
    state: &Arc<PoolState>,
    pool: &Pool,
    conn: &ConnInfo,
    started: Instant,
    trace: &mut Trace,
) -> Result<Response<ProxyBody>, ProxyError> {
    // No node is tried twice, so a pool of one never needs the retry bookkeeping (or the
    // header clone it costs).
    let attempts = (state.settings.retries as usize + 1)
        .min(MAX_ATTEMPTS)
        .min(state.backends.len().max(1));
    let mut tried = [0usize; MAX_ATTEMPTS];
    let mut failed: Option<ProxyError> = None;
    for attempt in 0..attempts {
        let pick = Pick {
            tried: &tried[..attempt],
            slow_start: state.settings.slow_start,
            client: outgoing.client,
            cookie: outgoing.cookie,
        };
        let Some((index, in_flight)) = place(state, pool, &pick, started, failed.is_some()).await?
        else {
            break;
        };
        if let Some(previous) = failed.take() {
            // The failure is hidden from the client: count it here, not in the funnel.
            previous.count();
            pool.metrics.retries.increment(1);
            debug!(pool = %pool.name, error = %ErrorChain(&previous), "retrying on another backend");
        }
        tried[attempt] = index;
        trace.attempt(&state.backends[index].node.name);
        let last = attempt + 1 == attempts;
        let (error, giveback) = match exchange(outgoing, state, index, last, conn, trace).await {
            Ok(answer) => {
                return relay(answer, outgoing, state, pool, index, in_flight, conn, trace);
            }
            Err(failure) => failure,
        };
        let recovered = giveback.and_then(|mut g| g.try_recv().ok());
        if !outgoing.may_retry(&error, recovered.is_some()) {
            return Err(error);
        }
        outgoing.body = recovered;
        failed = Some(error);
    }
    match failed {
        Some(error) => Err(error),
        None => {
            pool.metrics.no_backend.increment(1);
            Err(ProxyError::NoBackend)
        }
    }
}

/// A node for `pick` with its in-flight count taken, waiting in the pool's queue while every
/// node it may use is at its cap; `None` when the pool has no node for it.
async fn place(
    state: &Arc<PoolState>,
    pool: &Pool,
    pick: &Pick<'_>,
    started: Instant,
    retrying: bool,
) -> Result<Option<(usize, InFlight)>, ProxyError> {
    match state.place(pick, started) {
        Placement::Placed(index, in_flight) => Ok(Some((index, in_flight))),
        Placement::Nowhere => Ok(None),
        // Boxed: only requests to full capped nodes pay for the waiting machinery's size.
        Placement::Full(wanted) => match Box::pin(state.wait(pick, wanted, started)).await {
            Ok(placed) => Ok(Some(placed)),
            Err(Unplaced::Nowhere) => Ok(None),
            // A retry that found no room answers with the failure that made it retry.
            Err(Unplaced::QueueTimeout) if retrying => Ok(None),
            Err(Unplaced::QueueTimeout) => {
                pool.metrics.queue_timeouts.increment(1);
                Err(ProxyError::QueueTimeout {
                    after: state.settings.queue_timeout,
                })
            }
        },
    }
}

/// The backend's answer to one attempt, with the HTTP/1.1 connection it came on (ours, not
/// hyper-util's) to go back to the node's idle queue once its body has ended.
type Answer = (Response<Incoming>, Option<UpstreamConn>);

/// Sends one attempt to the node at `index` and waits for its response head within the pool's
/// deadlines; a failure comes with the receiver its unread body may come back on.
async fn exchange(
    outgoing: &mut Outgoing,
    state: &PoolState,
    index: usize,
    last: bool,
    conn: &ConnInfo,
    trace: &mut Trace,
) -> Result<Answer, (ProxyError, Option<oneshot::Receiver<Incoming>>)> {
    let backend = &state.backends[index];
    let node = &backend.node;
    let pooled = match (&outgoing.upgrade, &state.h2c_client) {
        (Some(_), _) => Some(&state.upgrade_client),
        (None, h2c) => h2c.as_ref(),
    };
    let (upstream, giveback) = outgoing.attempt(backend, pooled, last);
    let settings = &state.settings;
    let uploading = outgoing.upload.as_deref();
    // Pinned where it is built: moved into `exchange_in_time`, the exchange would be stored
    // twice in this request's future, once as the argument and once as what it awaits. An
    // `Either` rather than an `async` block, which would hold `upstream` once more.
    let send = std::pin::pin!(match pooled {
        None => Either::Left(
            upstream::request(
                &node.idle,
                backend.address,
                settings.connect_timeout,
                settings.idle_pool_timeout,
                upstream,
            )
            .map(|sent| {
                sent.map(|(response, conn, connect)| ((response, Some(conn)), Some(connect)))
                    .map_err(|e| ProxyError::exchange(node, e, uploading))
            }),
        ),
        // hyper-util's pool opens its connections unseen.
        Some(client) => Either::Right(client.request(upstream).map(|sent| {
            sent.map(|response| ((response, None), None))
                .map_err(|e| ProxyError::pooled_client(node, e, uploading))
        })),
    });
    let timeout = settings.response_timeout;
    let error = match exchange_in_time(send, uploading, &conn.conn, timeout).await {
        Ok(Ok((answer, connect))) => {
            node.answered();
            trace.answered(connect);
            return Ok(answer);
        }
        Ok(Err(error)) => error,
        Err(Late::Backend) => ProxyError::Timeout {
            node: node.clone(),
            after: timeout,
        },
        Err(Late::Client) => ProxyError::UploadStalled,
    };
    Err((error, giveback))
}

/// Relays a backend's answer: a 101 becomes a tunnel; any other response goes to the client
/// with its hop-by-hop headers gone, the sticky cookie set, and its body carrying the
/// in-flight count until it ends.
#[expect(
    clippy::too_many_arguments,
    reason = "the retry loop's state, passed down once"
)]
fn relay(
    (response, upstream_conn): Answer,
    outgoing: &mut Outgoing,
    state: &PoolState,
    pool: &Pool,
    index: usize,
    in_flight: InFlight,
    conn: &ConnInfo,
    trace: &mut Trace,
) -> Result<Response<ProxyBody>, ProxyError> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return switch_protocols(response, outgoing.client_upgrade.take(), in_flight, conn);
    }
    let node = in_flight.node().clone();
    let (mut head, body) = response.into_parts();
    headers::remove_hop_by_hop(&mut head.headers, false);
    if let Some(sticky) = state.sticky() {
        let cookie = outgoing.cookie;
        let outcome = sticky.outcome(cookie, index);
        pool.metrics.sticky(outcome).increment(1);
        trace.sticky(outcome);
        let tls = conn.listener.proto == "https";
        if let Some(set_cookie) = sticky.set_cookie(cookie, index, tls) {
            head.headers.append(header::SET_COOKIE, set_cookie);
        }
    }
    node.metrics.responses.record(head.status.as_u16());
    Ok(Response::from_parts(
        head,
        ProxyBody::upstream(body, in_flight, upstream_conn),
    ))
}

/// Who kept a request from getting its answer in time.
enum Late {
    /// No response headers within `response_timeout` of the body being sent, or a backend
    /// that stopped reading the upload for that long.
    Backend,
    /// The client sent no body byte for the listener's `idle_timeout` while the backend
    /// waited for one.
    Client,
}

/// Runs `exchange` with its deadlines: `response_timeout` counts from the moment the request
/// body has been sent whole (at once for a request without one, which pays for nothing
/// else); while the body is uploading, a client that stalls for `idle_timeout` is the
/// client's fault and a backend that stops reading for `response_timeout` is the backend's.
async fn exchange_in_time<F: Future>(
    mut exchange: Pin<&mut F>,
    upload: Option<&Upload>,
    conn: &ConnHandle,
    response_timeout: Duration,
) -> Result<F::Output, Late> {
    if let Some(upload) = upload {
        let mut watch = UploadWatch {
            upload,
            conn,
            _hold: conn.hold_open(),
            armed: true,
        };
        let idle_timeout = conn.idle_timeout();
        // Four checks per limit, as the connection's idle timer does: a stall is noticed
        // within 1.25 × its limit with no clock read per body frame.
        let period = (idle_timeout.min(response_timeout) / 4).max(Duration::from_millis(1));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last = upload.progress();
        let mut quiet = Duration::ZERO;
        loop {
            tokio::select! {
                biased;
                output = exchange.as_mut() => {
                    watch.armed = false;
                    return Ok(output);
                }
                // Sent whole, or failed (the exchange is about to fail with it).
                () = upload.settled() => break,
                _ = ticker.tick() => {
                    let now = upload.progress();
                    if now != last {
                        (last, quiet) = (now, Duration::ZERO);
                        continue;
                    }
                    quiet += period;
                    let (_, client_owes) = now;
                    if client_owes && quiet >= idle_timeout {
                        if upload.fail(ClientErrorKind::Timeout) {
                            return Err(Late::Client);
                        }
                        break;
                    }
                    if !client_owes && quiet >= response_timeout {
                        watch.armed = false;
                        return Err(Late::Backend);
                    }
                }
            }
        }
    }
    tokio::time::timeout(response_timeout, exchange)
        .await
        .map_err(|_| Late::Backend)
}

/// Watches a request while its body uploads: the connection stays open for the upload's own
/// stall timer, and if hyper drops the request mid-upload (the client reset its stream or
/// closed its connection) the upload is marked abandoned, to be counted as the client's.
struct UploadWatch<'a> {
    upload: &'a Upload,
    conn: &'a ConnHandle,
    _hold: crate::datapath::server::HoldOpen<'a>,
    armed: bool,
}

impl Drop for UploadWatch<'_> {
    fn drop(&mut self) {
        // A shutdown cutting the connection off is not the client leaving.
        if self.armed && !self.conn.is_cut_off() {
            self.upload.abandon();
        }
    }
}

/// The backend agreed to switch protocols: relay its 101 (with its `Upgrade`) to the client and
/// tunnel bytes both ways once both sides have switched. The request stays in flight for least
/// connections until the tunnel closes.
fn switch_protocols(
    mut response: Response<Incoming>,
    client_upgrade: Option<OnUpgrade>,
    in_flight: InFlight,
    conn: &ConnInfo,
) -> Result<Response<ProxyBody>, ProxyError> {
    let node = in_flight.node().clone();
    let backend_upgrade = hyper::upgrade::on(&mut response);
    let (mut head, _) = response.into_parts();
    let protocol = head.headers.get(header::UPGRADE).cloned();
    let (Some(_asked), Some(protocol)) = (client_upgrade, protocol) else {
        // A 101 nobody asked for (or without saying to what) cannot be relayed.
        return Err(ProxyError::UnexpectedUpgrade { node });
    };
    headers::remove_hop_by_hop(&mut head.headers, false);
    headers::keep_upgrade(&mut head.headers, protocol);
    node.metrics
        .responses
        .record(StatusCode::SWITCHING_PROTOCOLS.as_u16());
    conn.conn.spawn_tunnel(backend_upgrade, in_flight);
    Ok(Response::from_parts(head, ProxyBody::empty()))
}

/// The host a request is for: the URI's authority (HTTP/2, absolute-form) or its Host header.
fn request_host(req: &Request<Incoming>) -> Option<&str> {
    req.uri().host().or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Everything that stops a request from getting a backend's answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("no route matches the request")]
    NoRoute,
    #[error("CONNECT is not served by a reverse proxy")]
    Method,
    #[error("no routable backend in the pool")]
    NoBackend,
    #[error("every backend is at its max_connections; no room within {after:?}")]
    QueueTimeout { after: Duration },
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("malformed request body")]
    MalformedBody {
        #[source]
        source: BoxError,
    },
    #[error("the client went away before its request was complete")]
    ClientGone {
        #[source]
        source: BoxError,
    },
    #[error("the client stopped sending its request body")]
    UploadStalled,
    #[error("connecting to backend {} failed", node.name)]
    Connect {
        node: Arc<Node>,
        #[source]
        source: BoxError,
    },
    #[error("backend {} failed before answering", node.name)]
    Reset {
        node: Arc<Node>,
        #[source]
        source: BoxError,
    },
    #[error("backend {} sent no response headers within {after:?}", node.name)]
    Timeout { node: Arc<Node>, after: Duration },
    #[error("backend {} switched protocols for a request that did not ask to", node.name)]
    UnexpectedUpgrade { node: Arc<Node> },
}

impl ProxyError {
    fn exchange(node: &Arc<Node>, error: UpstreamError, upload: Option<&Upload>) -> Self {
        match error {
            UpstreamError::Connect(source) => ProxyError::Connect {
                node: node.clone(),
                source: source.into(),
            },
            UpstreamError::Exchange(source) => Self::failed_exchange(node, source.into(), upload),
        }
    }

    fn pooled_client(
        node: &Arc<Node>,
        source: hyper_util::client::legacy::Error,
        upload: Option<&Upload>,
    ) -> Self {
        if source.is_connect() {
            ProxyError::Connect {
                node: node.clone(),
                source: source.into(),
            }
        } else {
            Self::failed_exchange(node, source.into(), upload)
        }
    }

    /// A failure after connecting: the backend's fault unless the client's body failed first.
    ///
    /// The upload's record decides, not the error: over HTTP/1.1 hyper hands back the body's
    /// [`crate::upstream::body::ClientBodyError`] in its chain, but an HTTP/2 backend connection answers
    /// a failed body by resetting the stream, and the response future sees only that reset.
    fn failed_exchange(node: &Arc<Node>, source: BoxError, upload: Option<&Upload>) -> Self {
        match upload.and_then(|u| Some((u.fault()?, u.limit()))) {
            Some((ClientErrorKind::TooLarge, limit)) => ProxyError::BodyTooLarge {
                limit: limit.unwrap_or_default(),
            },
            Some((ClientErrorKind::Malformed, _)) => ProxyError::MalformedBody { source },
            Some((ClientErrorKind::Aborted, _)) => ProxyError::ClientGone { source },
            Some((ClientErrorKind::Timeout, _)) => ProxyError::UploadStalled,
            None => ProxyError::Reset {
                node: node.clone(),
                source,
            },
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::Method => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NoBackend | ProxyError::QueueTimeout { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::MalformedBody { .. } => StatusCode::BAD_REQUEST,
            // Read only by a client that half-closed its connection.
            ProxyError::ClientGone { .. } => StatusCode::BAD_REQUEST,
            ProxyError::UploadStalled => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Connect { .. }
            | ProxyError::Reset { .. }
            | ProxyError::UnexpectedUpgrade { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Why the request ended, for the access log.
    fn termination(&self) -> Termination {
        match self {
            ProxyError::NoRoute | ProxyError::Method => Termination::NoRoute,
            ProxyError::NoBackend => Termination::NoBackend,
            ProxyError::QueueTimeout { .. } => Termination::QueueTimeout,
            ProxyError::BodyTooLarge { .. } => Termination::TooLarge,
            ProxyError::MalformedBody { .. } => Termination::Malformed,
            ProxyError::ClientGone { .. } | ProxyError::UploadStalled => Termination::ClientAborted,
            ProxyError::Connect { .. } => Termination::Refused,
            ProxyError::Reset { .. } | ProxyError::UnexpectedUpgrade { .. } => {
                Termination::BackendReset
            }
            ProxyError::Timeout { .. } => Termination::BackendTimeout,
        }
    }

    /// The backend at fault and the `kind` label, for errors that are a backend's doing.
    fn blame(&self) -> Option<(&Node, ErrorKind)> {
        match self {
            ProxyError::NoRoute
            | ProxyError::Method
            | ProxyError::NoBackend
            | ProxyError::QueueTimeout { .. }
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::MalformedBody { .. }
            | ProxyError::ClientGone { .. }
            | ProxyError::UploadStalled => None,
            ProxyError::Connect { node, .. } => Some((node, ErrorKind::Connect)),
            ProxyError::Reset { node, .. } | ProxyError::UnexpectedUpgrade { node } => {
                Some((node, ErrorKind::Reset))
            }
            ProxyError::Timeout { node, .. } => Some((node, ErrorKind::Timeout)),
        }
    }

    /// Whether the client broke its request. These are counted in
    /// `fulcrum_client_errors_total` where they are noticed, not here: some are noticed after
    /// the response has started, or after hyper dropped the request, and never reach the funnel.
    fn client_fault(&self) -> bool {
        match self {
            ProxyError::BodyTooLarge { .. }
            | ProxyError::MalformedBody { .. }
            | ProxyError::ClientGone { .. }
            | ProxyError::UploadStalled => true,
            ProxyError::NoRoute
            | ProxyError::Method
            | ProxyError::NoBackend
            | ProxyError::QueueTimeout { .. }
            | ProxyError::Connect { .. }
            | ProxyError::Reset { .. }
            | ProxyError::Timeout { .. }
            | ProxyError::UnexpectedUpgrade { .. } => false,
        }
    }

    /// Counts the failure against the backend at fault, if any.
    fn count(&self) {
        if let Some((node, kind)) = self.blame() {
            node.metrics.error(kind);
            node.failed();
        }
    }

    /// The one funnel: status, metrics and a log line for every failed request.
    fn into_response(
        self,
        unattributed: &ResponseCounters,
        version: Version,
    ) -> Response<ProxyBody> {
        let status = self.status();
        self.count();
        match self.blame() {
            Some((node, kind)) => {
                node.metrics.responses.record(status.as_u16());
                warn!(backend = %node.name, kind = kind.as_str(), status = status.as_u16(), error = %ErrorChain(&self), "upstream request failed");
            }
            // A client that left gets no response it could read: none is recorded.
            None if matches!(self, ProxyError::ClientGone { .. }) => {
                debug!(error = %ErrorChain(&self), "client went away mid-request");
            }
            None => {
                unattributed.record(status.as_u16());
                debug!(status = status.as_u16(), error = %ErrorChain(&self), "request answered by fulcrum");
            }
        }
        let mut response = local_response(status, &self.to_string());
        // The client's body was not read to its end, so the connection cannot carry another
        // request (HTTP/2 ends just the stream, and forbids the header).
        if self.client_fault() && version <= Version::HTTP_11 {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// A short plain-text answer from fulcrum itself.
pub(crate) fn local_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::local(format!("{message}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn router(text: &str) -> Router {
        Router::new(&Config::parse(Path::new("t.toml"), text).unwrap())
    }

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, B, R>(_: fn(A, B) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_requests_future_stays_small() {
        // hyper boxes this future for every request and keeps it while the request lasts, so
        // its size is copied once per request and held per request in flight. It was 8.2 KiB
        // when every async layer stored the request again; 2.9 KiB since.
        let size = returned_size(handle);
        assert!(size <= 4 * 1024, "proxy::handle's future is {size} bytes");
    }

    #[test]
    fn routes_match_in_file_order_by_host_and_prefix() {
        let r = router(
            r#"
[[listeners]]
bind = "127.0.0.1:0"
[pools.api]
[pools.web]
[pools.fallback]
[[routes]]
host = "API.example.com"
path_prefix = "/v1/"
pool = "api"
[[routes]]
path_prefix = "/static"
pool = "web"
[[routes]]
pool = "fallback"
"#,
        );
        let pool = |host, path| r.route(host, path).map(|p| p.name.to_string());
        assert_eq!(
            pool(Some("api.EXAMPLE.com:8443"), "/v1/users").as_deref(),
            Some("api")
        );
        assert_eq!(
            pool(Some("api.example.com"), "/v2/users").as_deref(),
            Some("fallback")
        );
        assert_eq!(pool(Some("other"), "/staticx").as_deref(), Some("web"));
        assert_eq!(pool(None, "/").as_deref(), Some("fallback"));
    }

    #[test]
    fn no_match_without_a_catch_all() {
        let r = router(
            r#"
[[listeners]]
bind = "127.0.0.1:0"
[pools.api]
[[routes]]
host = "api.example.com"
pool = "api"
"#,
        );
        assert!(r.route(Some("www.example.com"), "/").is_none());
        assert!(r.route(None, "/").is_none());
    }
}
