//! The connection layer: accept, run the TLS handshake (TLS listeners), hand each connection to
//! hyper, carry upgraded connections as byte tunnels, close idle and silent ones, count the
//! requests hyper refuses itself (a malformed or oversized head), and drain on shutdown.
//! What happens to a request once hyper has parsed it is [`crate::datapath::proxy`]'s story.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;

use futures_util::task::AtomicWaker;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use metrics::Gauge;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use crate::base::error::BoxError;
use crate::base::metrics::{ClientErrorKind, ClientErrors, DOWNSTREAM_CONNECTIONS};
use crate::datapath::proxy_protocol::{ProxyProtocol, Rewind};
use crate::datapath::tls::{TlsInfo, TlsTerminator};

mod h1;
mod idle_set;

use h1::{TunnelIo, Wakeable};
use idle_set::{ClientSocket, IdleSetHandle, Sleeper};

/// Limits applied to every connection of one listener.
#[derive(Debug, Clone)]
pub(crate) struct ConnLimits {
    /// Time to receive a complete request head. The first one's clock starts at accept (at the
    /// end of the TLS handshake), whatever the protocol; after that hyper starts it whenever it
    /// waits for a head, so on HTTP/1.1 it also bounds how long a keep-alive connection may sit
    /// between requests (HAProxy's `timeout http-keep-alive` defaults the same way).
    pub header_read_timeout: Duration,
    /// No byte in either direction for this long closes the connection (HAProxy's
    /// `timeout client`); the only idle bound for HTTP/2 and for upgraded connections.
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// On a `proxy_protocol` listener, whom it takes PROXY headers from; each connection's
    /// header is read in its own task, before anything else.
    pub proxy_protocol: Option<Arc<ProxyProtocol>>,
}

/// The limits of fulcrum's own service listeners (admin API, registry): their callers are few
/// and known, so the bounds are fixed rather than configured.
pub(crate) const SERVICE_LIMITS: ConnLimits = ConnLimits {
    header_read_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(60),
    max_header_bytes: 16 * 1024,
    max_connections: 1024,
    proxy_protocol: None,
};

/// HTTP/2 flow control: a stream may have 1 MiB unread in flight (a fast upload is not held
/// back by round trips), a connection 2 MiB in all, which bounds what one client can make
/// fulcrum buffer whatever its number of streams.
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 2 << 20;
/// Streams one HTTP/2 client may have open at once (hyper's default is 200; browsers open
/// at most ~100).
const H2_MAX_STREAMS: u32 = 256;
/// Response bytes buffered per stream for a client that does not read. The limit is per
/// stream, so the connection's worst case is this times [`H2_MAX_STREAMS`]: 16 MiB, where
/// hyper's default (~400 KB) allowed ~100 MiB. Four full-size frames still keep one stream's
/// pipe full between two polls of the backend's body.
const H2_SEND_BUFFER: usize = 64 << 10;
/// A peer that stops acknowledging pings is gone: noticed even while a stream trickles bytes
/// one way, which the idle timer cannot see. hyper's server pings idle connections too, and
/// an acknowledgement is traffic, so the interval never drops below 1.5 × `idle_timeout`:
/// the idle timer (which fires by 1.25 × `idle_timeout`) still closes an idle connection.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams a client may open and reset before fulcrum has accepted them, then `GOAWAY`: the
/// "rapid reset" flood (CVE-2023-44487) costs the server work for streams nobody will read.
/// h2's current default, pinned so an upgrade cannot loosen it.
const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams fulcrum may reset for a client's protocol errors before it sends `GOAWAY`: a
/// client that earns more resets than it may have streams open is not making mistakes.
const H2_MAX_ERROR_RESETS: usize = H2_MAX_STREAMS as usize;

/// The stop signals and the task tracker every accept loop of one balancer shares.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    /// Cancelled on Ctrl-C / SIGTERM: stop accepting, let in-flight work finish.
    pub shutdown: CancellationToken,
    /// Cancelled when `shutdown_grace` has run out: whatever still runs is cut off.
    pub cut_off: CancellationToken,
    /// Connection and tunnel tasks, so the drain can wait for them.
    pub tracker: TaskTracker,
}

/// What serves a client connection's requests: a fresh copy for each hyper connection of a
/// hibernating HTTP/1.1 client, and `Unpin` as hyper's `poll_without_shutdown` wants.
pub(crate) trait ClientService:
    Service<
        Request<Incoming>,
        Response = Response<Self::ResponseBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Unpin
    + Send
    + 'static
{
    /// The response body.
    type ResponseBody: Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
}

impl<S, B> ClientService for S
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Unpin
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    type ResponseBody = B;
}

/// A listening socket of one listener, and the worker thread that accepts on it.
#[derive(Debug)]
pub(crate) enum AcceptSocket {
    /// Registered with the current runtime.
    Here(TcpListener),
    /// A worker's own `SO_REUSEPORT` socket, registered on that worker's runtime.
    On(std::net::TcpListener, tokio::runtime::Handle),
}

/// Accepts connections on each of `sockets` until shutdown, serving each with the service
/// that `make_service` builds for its client. The sockets of one listener share its
/// `max_connections` and counters; each accept loop and its connections run on the socket's
/// worker. Each connection's task first reads its PROXY header (on a `proxy_protocol`
/// listener) and runs the TLS handshake (with `tls`), each bounded by its timeout, so a slow
/// or silent client never holds up the loop.
pub(crate) fn spawn_accept_loop<M, S>(
    sockets: Vec<AcceptSocket>,
    name: Arc<str>,
    limits: ConnLimits,
    tls: Option<Arc<TlsTerminator>>,
    make_service: M,
    open_connections: Arc<AtomicU64>,
    lifecycle: Lifecycle,
) where
    M: Fn(SocketAddr, ConnHandle) -> S + Send + Sync + 'static,
    S: ClientService,
{
    let shared = Arc::new(AcceptShared {
        builders: Arc::new(Builders::new(&limits)),
        listener: Arc::new(ListenerConns {
            gauge: metrics::gauge!(DOWNSTREAM_CONNECTIONS, "listener" => name.to_string()),
            open_connections,
            idle_timeout: limits.idle_timeout,
            header_read_timeout: limits.header_read_timeout,
            client_errors: Arc::new(ClientErrors::new(&name)),
            lifecycle,
        }),
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        limits,
        tls,
        make_service,
        name,
    });
    for socket in sockets {
        let shared = shared.clone();
        match socket {
            AcceptSocket::Here(listener) => {
                let tracker = shared.listener.lifecycle.tracker.clone();
                tracker.spawn(accept_loop(listener, shared));
            }
            AcceptSocket::On(listener, worker) => {
                // Registered with the worker's reactor, and spawned there: the loop and every
                // connection it accepts stay on that thread.
                let _on_worker = worker.enter();
                let listener = match TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(e) => {
                        error!(listener = %shared.name, error = %e, "a worker cannot accept on its socket");
                        continue;
                    }
                };
                let tracker = shared.listener.lifecycle.tracker.clone();
                tracker.spawn(accept_loop(listener, shared));
            }
        }
    }
}

/// What the accept loops of one listener share.
struct AcceptShared<M> {
    builders: Arc<Builders>,
    listener: Arc<ListenerConns>,
    slots: Arc<Semaphore>,
    limits: ConnLimits,
    tls: Option<Arc<TlsTerminator>>,
    make_service: M,
    name: Arc<str>,
}

/// What every connection of one listener shares, held by each through one pointer rather
/// than copied into it: a sleeping connection's whole cost is a few hundred bytes.
struct ListenerConns {
    /// `fulcrum_downstream_connections{listener}`.
    gauge: Gauge,
    /// Client connections open on all traffic listeners.
    open_connections: Arc<AtomicU64>,
    idle_timeout: Duration,
    header_read_timeout: Duration,
    client_errors: Arc<ClientErrors>,
    lifecycle: Lifecycle,
}

async fn accept_loop<M, S>(listener: TcpListener, shared: Arc<AcceptShared<M>>)
where
    M: Fn(SocketAddr, ConnHandle) -> S + Send + Sync + 'static,
    S: ClientService,
{
    let lifecycle = &shared.listener.lifecycle;
    // This loop's own: its connections sleep on the same worker thread.
    let rest = Rest {
        builders: shared.builders.clone(),
        idle_set: idle_set::spawn(
            &lifecycle.tracker,
            shared
                .limits
                .header_read_timeout
                .min(shared.limits.idle_timeout),
            lifecycle.shutdown.clone(),
        ),
    };
    loop {
        let Some((slot, stream, peer)) =
            next_connection(&listener, &shared.slots, &lifecycle.shutdown, &shared.name).await
        else {
            break;
        };
        // Small responses must not wait on Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        crate::base::heap::woken();
        let conn = ConnHandle::new(slot, shared.listener.clone());
        let accepted = Accepted {
            stream,
            peer,
            proxy_protocol: shared.limits.proxy_protocol.clone(),
        };
        let shared = shared.clone();
        let rest = rest.clone();
        // Two kinds of task rather than one that can be either: a task's size is that of
        // its largest state, and a cleartext connection should not carry room for a TLS one
        // for as long as it stays open.
        let Some(tls) = shared.tls.clone() else {
            lifecycle.tracker.spawn(async move {
                let Some((io, client)) = accepted.client(&conn).await else {
                    return;
                };
                let service = (shared.make_service)(client, conn.clone());
                drop(shared);
                serve_sniffed(io, rest, service, conn).await;
            });
            continue;
        };
        lifecycle.tracker.spawn(async move {
            let Some((io, client)) = accepted.client(&conn).await else {
                return;
            };
            let service = (shared.make_service)(client, conn.clone());
            drop(shared);
            serve_tls(tls, io, client, rest, service, conn).await;
        });
    }
    debug!(listener = %shared.name, "stopped accepting");
}

/// The next client connection with its `max_connections` slot, or `None` once shutdown
/// starts. At `max_connections` it stops accepting and lets the kernel's backlog queue, rather
/// than accept and drop.
#[expect(clippy::expect_used, reason = "semaphore is never closed")]
async fn next_connection(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    name: &str,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let slot = tokio::select! {
        slot = slots.clone().acquire_owned() => slot.expect("semaphore is never closed"),
        () = shutdown.cancelled() => return None,
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => return Some((slot, stream, peer)),
                Err(e) => accept_error(name, e).await,
            },
            () = shutdown.cancelled() => return None,
        }
    }
}

/// A connection as the accept loop hands it to the connection's task.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    proxy_protocol: Option<Arc<ProxyProtocol>>,
}

/// A client's stream: bytes read past a PROXY header come first.
type ClientIo = CountingIo<Rewind<ClientSocket>>;

impl Accepted {
    /// The connection's client and its stream: the peer, or on a `proxy_protocol` listener the
    /// client its PROXY header names. `None`: refused (counted), or shutdown began first.
    /// The header's own bytes are not the client's activity; what follows it is.
    async fn client(self, conn: &ConnHandle) -> Option<(ClientIo, SocketAddr)> {
        let shared = &conn.inner;
        let (stream, client) = match self.proxy_protocol {
            None => (Rewind::new(ClientSocket::Awake(self.stream)), self.peer),
            // Boxed: the header's buffer and reads are no part of the connection's task after.
            Some(rule) => tokio::select! {
                read = Box::pin(rule.accept(ClientSocket::Awake(self.stream), self.peer, shared.listener.header_read_timeout)) => read?,
                () = shared.listener.lifecycle.shutdown.cancelled() => return None,
            },
        };
        Some((
            CountingIo {
                inner: stream,
                conn: shared.clone(),
            },
            client,
        ))
    }
}

/// A TLS connection's task: the handshake (bounded by its timeout), then hyper with the
/// protocol ALPN settled.
async fn serve_tls<S>(
    tls: Arc<TlsTerminator>,
    io: ClientIo,
    peer: SocketAddr,
    rest: Rest,
    service: S,
    conn: ConnHandle,
) where
    S: ClientService,
{
    // A connection that arrives as shutdown starts is not worth a handshake.
    let stream = tokio::select! {
        stream = tls.handshake(io, peer) => stream,
        () = conn.inner.listener.lifecycle.shutdown.cancelled() => None,
    };
    let Some(stream) = stream else { return };
    // Before hyper sees the connection, so its first request reads it.
    let _ = conn
        .inner
        .tls
        .set(Box::new(crate::datapath::tls::info(&stream)));
    // Each protocol's serving boxed: until the handshake is done the task holds only its
    // state (a handshake storm's connections are a third of the size).
    match crate::datapath::tls::alpn(&stream) {
        Some(b"h2") => Box::pin(serve_connection(stream, &rest.builders.h2, service, &conn)).await,
        Some(b"http/1.1") => {
            let reads_before = reads(&conn.inner.activity);
            let serve = serve_h1(
                stream,
                Bytes::new(),
                Some(reads_before),
                rest,
                service,
                conn,
            );
            Box::pin(serve).await;
        }
        // No ALPN: HTTP/1.1, or HTTP/2 with prior knowledge.
        _ => Box::pin(serve_sniffed(stream, rest, service, conn)).await,
    }
}

/// The HTTP/2 connection preface, which a client speaking HTTP/2 with prior knowledge sends
/// first; anything else is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves a connection whose protocol its first bytes tell: HTTP/2 with prior knowledge, or
/// HTTP/1.1. Reads only as far as they differ from the HTTP/2 preface, within the first
/// head's deadline.
async fn serve_sniffed<I, S>(mut io: I, rest: Rest, service: S, conn: ConnHandle)
where
    I: Wakeable,
    S: ClientService,
{
    let shared = &conn.inner;
    let reads_before = reads(&shared.activity);
    // Boxed, like each protocol's serving below: a task is as large as its largest state.
    let Some(prefix) = Box::pin(sniff(&mut io, shared, reads_before)).await else {
        return;
    };
    if prefix == H2_PREFACE {
        let io = Rewind::with_prefix(io, prefix);
        Box::pin(serve_connection(io, &rest.builders.h2, service, &conn)).await;
    } else {
        serve_h1(io, prefix, Some(reads_before), rest, service, conn).await;
    }
}

/// What an HTTP/1.1 connection needs to be served again after it slept: hyper's builders,
/// and the idle set of its accept loop (`None`: each connection waits in its own task).
#[derive(Clone)]
struct Rest {
    builders: Arc<Builders>,
    idle_set: Option<IdleSetHandle>,
}

/// Serves HTTP/1.1 until the client leaves; whenever the connection rests with nothing
/// unread, it goes to sleep in the idle set and this task ends.
async fn serve_h1<I, S>(
    mut io: I,
    mut prefix: Bytes,
    mut reads_at_start: Option<u64>,
    rest: Rest,
    mut service: S,
    conn: ConnHandle,
) where
    I: Wakeable,
    S: ClientService,
{
    loop {
        let Some((rested, kept)) = h1::serve(
            io,
            prefix,
            reads_at_start,
            &rest.builders.http1,
            service,
            &conn,
        )
        .await
        else {
            return;
        };
        (io, service) = (rested, kept);
        if let Some(idle_set) = rest.idle_set.clone()
            && io.park().is_some()
        {
            // Refused only once the set is gone: shutdown has begun, and an idle connection
            // closes.
            if idle_set
                .lay_down(Box::new(Asleep {
                    io,
                    service,
                    conn,
                    rest,
                }))
                .is_ok()
            {
                crate::base::heap::released();
            }
            return;
        }
        // No idle set to hold it: wait here.
        if !h1::hibernate(&mut io, &conn.inner).await {
            return;
        }
        (prefix, reads_at_start) = (Bytes::new(), None);
    }
}

/// An HTTP/1.1 connection asleep in an idle set, with what serves it again.
struct Asleep<I, S> {
    io: I,
    service: S,
    conn: ConnHandle,
    rest: Rest,
}

impl<I: Wakeable, S: ClientService> Sleeper for Asleep<I, S> {
    fn fd(&self) -> std::os::fd::RawFd {
        self.io.fd()
    }

    fn resume(self: Box<Self>, readable: bool) {
        let Asleep {
            mut io,
            service,
            conn,
            rest,
        } = *self;
        let tracker = conn.inner.listener.lifecycle.tracker.clone();
        tracker.spawn(async move {
            if let Err(e) = io.unpark() {
                debug!(error = %e, "an idle connection cannot rejoin the runtime");
                return;
            }
            if !readable && !h1::hibernate(&mut io, &conn.inner).await {
                return;
            }
            crate::base::heap::woken();
            serve_h1(io, Bytes::new(), None, rest, service, conn).await;
        });
    }
}

/// The first bytes of a connection, read as far as they match the HTTP/2 preface (all of it,
/// or up to the first byte that differs); `None` when the connection is to close first.
async fn sniff<I: AsyncRead + Unpin>(
    io: &mut I,
    shared: &ConnShared,
    reads_before: u64,
) -> Option<Bytes> {
    use tokio::io::AsyncReadExt;
    let mut seen = [0u8; H2_PREFACE.len()];
    let mut len = 0;
    let read = async {
        while len < seen.len() && seen[..len] == H2_PREFACE[..len] {
            match io.read(&mut seen[len..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => len += n,
            }
        }
        true
    };
    let sniffed = tokio::select! {
        sniffed = read => sniffed,
        () = tokio::time::sleep(shared.listener.header_read_timeout) => {
            first_head_missed(shared, reads_before);
            false
        }
        () = shared.listener.lifecycle.shutdown.cancelled() => false,
    };
    sniffed.then(|| Bytes::copy_from_slice(&seen[..len]))
}

/// Resource exhaustion (EMFILE, ENFILE, ENOBUFS) must not end the accept loop: back off so the
/// loop does not spin while the condition lasts. Per-connection errors are just skipped.
async fn accept_error(listener: &str, e: io::Error) {
    match e.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted => {
            debug!(listener, error = %e, "accept failed for one connection");
        }
        _ => {
            error!(listener, error = %e, "accept failed; retrying in 100ms");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// hyper connection builders: both protocols (cleartext, or TLS without ALPN), and one each for
/// the protocol ALPN settled.
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    h2: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new(limits: &ConnLimits) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // A head that fills the read buffer without completing is answered 431.
            // hyper-util's auto builder does not expose hyper's separate max_header_size, so
            // the buffer is the limit (hyper's floor is 8 KiB).
            .max_buf_size(limits.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(H2_MAX_STREAMS)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(H2_SEND_BUFFER)
            .keep_alive_interval(H2_PING_INTERVAL.max(limits.idle_timeout.saturating_mul(3) / 2))
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_ERROR_RESETS);
        let mut http1 = hyper::server::conn::http1::Builder::new();
        // `header_read_timeout` is kept by `h1::awake` with one timer per spell; hyper's would
        // box and arm a new one for every request.
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_bytes.max(8192));
        Self {
            http1,
            h2: builder.http2_only(),
        }
    }
}

/// A share in one client connection, held by the connection's task and by its service.
///
/// An upgraded connection (WebSocket) outlives hyper's part of it: [`ConnHandle::spawn_tunnel`]
/// keeps a share in the tunnel task, so until the tunnel ends the connection still holds its
/// `max_connections` slot and its place in `fulcrum_downstream_connections`, the drain waits
/// for it, and `idle_timeout` still closes it.
#[derive(Clone)]
pub(crate) struct ConnHandle {
    inner: Arc<ConnShared>,
}

struct ConnShared {
    _slot: OwnedSemaphorePermit,
    listener: Arc<ListenerConns>,
    /// Bumped by every read and write on the client socket (see [`CountingIo`]).
    activity: AtomicU64,
    /// Set when hyper hands over the connection's first request.
    dispatched: AtomicBool,
    /// HTTP/1.1: requests handed over so far, and those whose response is not yet written.
    requests: AtomicU64,
    in_flight: AtomicUsize,
    /// HTTP/1.1: a request or response said the connection closes after it.
    close_after: AtomicBool,
    /// HTTP/1.1: the last request handed over had a body.
    body_pending: AtomicBool,
    /// Set with `tunnel` when a `101` is on its way to the client.
    switching: AtomicBool,
    /// Where the client's socket goes once the `101` is written (see [`ConnHandle::spawn_tunnel`]).
    tunnel: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<TunnelIo>>>,
    /// Requests uploading a body under their own stall timer (see [`ConnHandle::hold_open`]).
    uploads: AtomicUsize,
    /// Set once the TLS handshake is done (TLS listeners), for the access log. Boxed: a
    /// cleartext connection carries one pointer for it, not the whole record.
    tls: std::sync::OnceLock<Box<TlsInfo>>,
}

impl ConnHandle {
    fn new(slot: OwnedSemaphorePermit, listener: Arc<ListenerConns>) -> Self {
        listener.gauge.increment(1.0);
        listener.open_connections.fetch_add(1, Ordering::Relaxed);
        Self {
            inner: Arc::new(ConnShared {
                _slot: slot,
                listener,
                activity: AtomicU64::new(0),
                dispatched: AtomicBool::new(false),
                requests: AtomicU64::new(0),
                in_flight: AtomicUsize::new(0),
                close_after: AtomicBool::new(false),
                body_pending: AtomicBool::new(false),
                switching: AtomicBool::new(false),
                tunnel: std::sync::Mutex::new(None),
                uploads: AtomicUsize::new(0),
                tls: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The listener's `idle_timeout`: how long a client may leave its connection (or its
    /// upload) without a byte.
    pub(crate) fn idle_timeout(&self) -> Duration {
        self.inner.listener.idle_timeout
    }

    /// The listener's `fulcrum_client_errors_total` handles.
    pub(crate) fn client_errors(&self) -> &Arc<ClientErrors> {
        &self.inner.listener.client_errors
    }

    /// The connection's TLS version and SNI name; `None` on cleartext.
    pub(crate) fn tls(&self) -> Option<&TlsInfo> {
        self.inner.tls.get().map(|info| &**info)
    }

    /// Whether `shutdown_grace` ran out and the connection is being cut off (not the client's
    /// doing).
    pub(crate) fn is_cut_off(&self) -> bool {
        self.inner.listener.lifecycle.cut_off.is_cancelled()
    }

    /// Keeps the connection's idle timer from closing the connection while the returned guard
    /// lives: a request watching its own upload answers a stalled client `408` at the same
    /// `idle_timeout`, and must not lose that race to a silent close.
    pub(crate) fn hold_open(&self) -> HoldOpen<'_> {
        self.inner.uploads.fetch_add(1, Ordering::Relaxed);
        HoldOpen(&self.inner)
    }

    /// Once both sides have switched protocols, copies bytes between the client and the
    /// backend until either closes, the connection idles for `idle_timeout`, or shutdown
    /// cuts it off. `guard` (the request's in-flight count) lives as long as the tunnel.
    pub(crate) fn spawn_tunnel<G: Send + 'static>(&self, backend: OnUpgrade, guard: G) {
        let (client_tx, client) = tokio::sync::oneshot::channel();
        if let Ok(mut slot) = self.inner.tunnel.lock() {
            *slot = Some(client_tx);
        }
        self.inner.switching.store(true, Ordering::Release);
        let conn = self.clone();
        self.inner.listener.lifecycle.tracker.spawn(async move {
            let _guard = guard;
            let (mut client, backend) = match tokio::join!(client, backend) {
                (Ok(client), Ok(backend)) => (client, backend),
                (Err(_), _) => {
                    debug!("the client connection ended before its upgrade");
                    return;
                }
                (_, Err(e)) => {
                    debug!(error = %e, "backend upgrade did not complete");
                    return;
                }
            };
            let mut backend = TokioIo::new(backend);
            let shared = &conn.inner;
            tokio::select! {
                result = tokio::io::copy_bidirectional(&mut client, &mut backend) => match result {
                    Ok((up, down)) => debug!(up, down, "tunnel closed"),
                    Err(e) => debug!(error = %e, "tunnel ended with an error"),
                },
                () = idle(shared) => debug!("closing idle tunnel"),
                () = shared.listener.lifecycle.cut_off.cancelled() => debug!("tunnel cut off by shutdown_grace"),
            }
        });
    }
}

/// See [`ConnHandle::hold_open`].
pub(crate) struct HoldOpen<'a>(&'a ConnShared);

impl Drop for HoldOpen<'_> {
    fn drop(&mut self) {
        self.0.uploads.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for HoldOpen<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HoldOpen")
    }
}

impl std::fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHandle")
            .field("idle_timeout", &self.inner.listener.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl ConnShared {
    /// The tunnel waiting for this connection's socket, once a `101` has been written.
    fn take_tunnel(&self) -> Option<tokio::sync::oneshot::Sender<TunnelIo>> {
        if !self.switching.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.tunnel.lock().ok()?.take()
    }
}

impl Drop for ConnShared {
    fn drop(&mut self) {
        self.listener
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
        self.listener.gauge.decrement(1.0);
    }
}

async fn serve_connection<I, S, B>(
    io: I,
    builder: &auto::Builder<TokioExecutor>,
    service: S,
    conn: &ConnHandle,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let shared = &conn.inner;
    let first = conn.inner.clone();
    let conn = builder.serve_connection_with_upgrades(
        TokioIo::new(io),
        hyper::service::service_fn(move |req| {
            first.dispatched.store(true, Ordering::Relaxed);
            service.call(req)
        }),
    );
    tokio::pin!(conn);
    // hyper reads the protocol preface (HTTP/1.1 or HTTP/2?) without a timer, and its own
    // header timer starts only once it has decided: the first request gets a deadline of its
    // own, from accept (or the end of the TLS handshake).
    let reads_before = reads(&shared.activity);
    let first_head = tokio::time::sleep(shared.listener.header_read_timeout);
    tokio::pin!(first_head);
    let mut awaiting_first_head = true;
    let idle = idle(shared);
    tokio::pin!(idle);
    let shutdown = Quiet::new(shared.listener.lifecycle.shutdown.cancelled());
    tokio::pin!(shutdown);
    let cut_off = Quiet::new(shared.listener.lifecycle.cut_off.cancelled());
    tokio::pin!(cut_off);
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    ended_with_error(shared, &*e, reads_before);
                }
                return;
            }
            () = shutdown.as_mut(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = first_head.as_mut(), if awaiting_first_head => {
                awaiting_first_head = false;
                if first_head_missed(shared, reads_before) {
                    return;
                }
            }
            () = &mut idle => {
                debug!("closing idle client connection");
                return;
            }
            () = cut_off.as_mut() => return,
        }
    }
}

/// Counts the client error behind a connection hyper ended with an error, if it is one.
fn ended_with_error(
    shared: &ConnShared,
    error: &(dyn std::error::Error + 'static),
    reads_before: u64,
) {
    let first_head_pending = !shared.dispatched.load(Ordering::Relaxed);
    let sent_bytes = reads(&shared.activity) != reads_before;
    if let Some(kind) = refused(error, first_head_pending, sent_bytes) {
        shared.listener.client_errors.count(kind);
    }
    debug!(error = %error, "client connection ended with an error");
}

/// `header_read_timeout` ran out before the first request: whether the connection is to close.
/// A connection that never sent a byte is not a request, so it is not a client error either
/// (port scanners, browsers' speculative preconnects); one that sent part of a head is, like a
/// head hyper times out.
fn first_head_missed(shared: &ConnShared, reads_before: u64) -> bool {
    if shared.dispatched.load(Ordering::Relaxed) {
        return false;
    }
    if reads(&shared.activity) != reads_before {
        shared
            .listener
            .client_errors
            .count(ClientErrorKind::Timeout);
    }
    debug!("no request head within header_read_timeout; closing");
    true
}

/// The client error behind a connection hyper ended with an error, when it is one: a head
/// hyper answered itself (`400`, `431`, `414`), a head cut short, an HTTP/2 protocol
/// violation. Resets and an EOF between requests are how connections end, not errors.
///
/// hyper's header timer on a reused HTTP/1.1 connection cannot tell a keep-alive connection
/// that simply went quiet from a partial head, so only the first head's timeout counts (and
/// only when the client sent something, as for fulcrum's own first-head deadline).
fn refused(
    error: &(dyn std::error::Error + 'static),
    first_head_pending: bool,
    sent_bytes: bool,
) -> Option<ClientErrorKind> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            return if e.is_parse_too_large() {
                Some(ClientErrorKind::TooLarge)
            } else if e.is_parse() {
                Some(ClientErrorKind::Malformed)
            } else if e.is_incomplete_message() {
                Some(ClientErrorKind::Aborted)
            } else if e.is_timeout() {
                (first_head_pending && sent_bytes).then_some(ClientErrorKind::Timeout)
            } else {
                // HTTP/2: look further down for h2's own verdict.
                source = std::error::Error::source(e);
                continue;
            };
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // A GOAWAY h2 sent itself: the client broke the protocol (or flooded resets).
            return (h2.is_go_away() && h2.is_library()).then_some(ClientErrorKind::Malformed);
        }
        source = e.source();
    }
    None
}

pin_project! {
    /// Polls its future only after that future's own waker fired.
    ///
    /// Every wake-up of a connection's task polls each branch of its `select!`, and a
    /// cancellation future shared by every connection takes its `Notify`'s lock on each poll:
    /// several lock round trips per request, contended across workers. Behind a waker of its
    /// own, the signal costs one atomic swap per wake-up until it actually fires.
    struct Quiet<F> {
        #[pin]
        inner: F,
        waker: Arc<QuietWaker>,
    }
}

struct QuietWaker {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for QuietWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Quiet<F> {
    fn new(inner: F) -> Self {
        Self {
            inner,
            // Woken to begin with: the first poll registers with the signal.
            waker: Arc::new(QuietWaker {
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

impl<F: Future> Future for Quiet<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        this.waker.task.register(cx.waker());
        if !this.waker.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.waker.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

/// Resolves once the connection's `activity` has not moved for `idle_timeout` and no request
/// holds it open. Checking four times per timeout closes an idle connection within 1.25 × the
/// limit without reading a clock on every read and write.
async fn idle(shared: &ConnShared) {
    let (activity, idle_timeout) = (&shared.activity, shared.listener.idle_timeout);
    let period = idle_timeout / 4;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_seen = activity.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        ticker.tick().await;
        let seen = activity.load(Ordering::Relaxed);
        if seen != last_seen || shared.uploads.load(Ordering::Relaxed) != 0 {
            last_seen = seen;
            quiet = Duration::ZERO;
        } else {
            quiet += period;
            if quiet >= idle_timeout {
                return;
            }
        }
    }
}

pin_project! {
    /// A stream that counts reads and writes so the connection task can tell it is idle, and
    /// whether the client has sent anything.
    struct CountingIo<T> {
        #[pin]
        inner: T,
        // Its `activity` is bumped.
        conn: Arc<ConnShared>,
    }
}

/// Reads count in the high half of `activity`, writes in the low half: one atomic add per
/// operation tells both "anything happened" and "the client sent something". Only the change
/// matters, so wrapping is harmless.
const READ: u64 = 1 << 32;
const WRITE: u64 = 1;

fn reads(activity: &AtomicU64) -> u64 {
    activity.load(Ordering::Relaxed) >> 32
}

impl<T> CountingIo<T> {
    fn touch(activity: &AtomicU64, what: u64) {
        activity.fetch_add(what, Ordering::Relaxed);
    }
}

impl<T: AsyncRead> AsyncRead for CountingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.inner.poll_read(cx, buf);
        if buf.filled().len() != before {
            Self::touch(&this.conn.activity, READ);
        }
        result
    }
}

impl<T: AsyncWrite> AsyncWrite for CountingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let result = this.inner.poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            Self::touch(&this.conn.activity, WRITE);
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let result = this.inner.poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            Self::touch(&this.conn.activity, WRITE);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

impl Wakeable for ClientIo {
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.inner.has_prefix() {
            return Poll::Ready(Ok(()));
        }
        self.inner.get_ref().poll_read_ready(cx)
    }

    fn park(&mut self) -> Option<std::os::fd::RawFd> {
        if self.inner.has_prefix() {
            return None;
        }
        self.inner.get_mut().park().ok()
    }

    fn fd(&self) -> std::os::fd::RawFd {
        self.inner.get_ref().fd()
    }

    fn unpark(&mut self) -> io::Result<()> {
        self.inner.get_mut().unpark()
    }
}

impl Wakeable for tokio_rustls::server::TlsStream<ClientIo> {
    /// Decrypted bytes rustls already holds count as a wake-up: the socket may have nothing
    /// more to say about them.
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (io, tls) = self.get_mut();
        if tls_has_news(tls) {
            // Plaintext waiting, a close_notify or a TLS error: the next read says which.
            return Poll::Ready(Ok(()));
        }
        io.poll_wake(cx)
    }

    /// Only with nothing decrypted and nothing to send: the socket would not wake for them.
    fn park(&mut self) -> Option<std::os::fd::RawFd> {
        let (io, tls) = self.get_mut();
        if tls_has_news(tls) || tls.wants_write() {
            return None;
        }
        io.park()
    }

    fn fd(&self) -> std::os::fd::RawFd {
        self.get_ref().0.fd()
    }

    fn unpark(&mut self) -> io::Result<()> {
        self.get_mut().0.unpark()
    }
}

/// Whether rustls holds something for the reader that the socket will not announce again:
/// decrypted bytes, the peer's close_notify, or a TLS error.
fn tls_has_news(tls: &mut rustls::ServerConnection) -> bool {
    !matches!(tls.process_new_packets(),
        Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed())
}

/// Waits for the connection and tunnel tasks for at most `grace`, then cuts off the rest;
/// returns how many were still running when it ran out.
pub(crate) async fn drain(lifecycle: &Lifecycle, grace: Duration) -> usize {
    let tracker = &lifecycle.tracker;
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        let left = tracker.len();
        warn!(
            connections = left,
            ?grace,
            "shutdown_grace ran out; cutting off connections still busy"
        );
        lifecycle.cut_off.cancel();
        left
    } else {
        0
    }
}

/// Binds a listening socket with room for a burst of connections: tokio's default backlog of
/// 1024 overflows when a thousand clients connect at once, and each overflowed SYN costs its
/// client a one-second retransmit. The kernel caps the value at `net.core.somaxconn`.
///
/// With `reuse_port`, further sockets can join the address (see [`listen_more`]): one per
/// worker thread, among which the kernel spreads new connections. Linux only lets sockets of
/// the same user join a group.
pub(crate) fn listen(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        if addr.port() != 0 {
            // A group is open to any socket of the same user that asks to join: a second
            // fulcrum started on this port by mistake would silently take a share of the
            // connections. A plain bind first fails if anything listens there already.
            let probe = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            probe.set_reuseaddr(true)?;
            probe.bind(addr)?;
        }
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Another socket on the address of a `listen(…, reuse_port = true)` socket, for a worker
/// thread to register on its own runtime.
pub(crate) fn listen_more(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}
