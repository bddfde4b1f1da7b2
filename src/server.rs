//! The connection layer: accept, run the TLS handshake (TLS listeners), hand each connection to
//! hyper, carry upgraded connections as byte tunnels, close idle ones, and drain on shutdown.
//! What happens to a request once hyper has parsed it is [`crate::proxy`]'s story.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

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
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use crate::body::BoxError;
use crate::metrics::DOWNSTREAM_CONNECTIONS;
use crate::tls::TlsTerminator;

/// Limits applied to every connection of one listener.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Time to receive a complete request head. hyper starts this clock whenever it waits for a
    /// head, so on HTTP/1.1 it also bounds how long a keep-alive connection may sit between
    /// requests (HAProxy's `timeout http-keep-alive` defaults the same way).
    pub header_read_timeout: Duration,
    /// No byte in either direction for this long closes the connection (HAProxy's
    /// `timeout client`); the only idle bound for HTTP/2 and for upgraded connections.
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
}

/// HTTP/2 flow control: a stream may have 1 MiB unread in flight (a fast upload is not held
/// back by round trips), a connection 2 MiB in all, which bounds what one client can make
/// fulcrum buffer whatever its number of streams.
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 2 << 20;
/// Streams one HTTP/2 client may have open at once (hyper's default is 200; browsers open
/// at most ~100).
const H2_MAX_STREAMS: u32 = 256;

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

/// Accepts connections on `listener` until shutdown, serving each with the service that
/// `make_service` builds for its peer. With `tls`, each connection's task first runs the
/// handshake (bounded by its timeout), so a slow or silent client never holds up the loop.
pub fn spawn_accept_loop<M, S, B>(
    listener: TcpListener,
    name: Arc<str>,
    limits: ConnLimits,
    tls: Option<Arc<TlsTerminator>>,
    make_service: M,
    open_connections: Arc<AtomicU64>,
    lifecycle: Lifecycle,
) where
    M: Fn(SocketAddr, ConnHandle) -> S + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builders = Arc::new(Builders::new(&limits));
    let connections = metrics::gauge!(DOWNSTREAM_CONNECTIONS, "listener" => name.to_string());
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let shutdown = lifecycle.shutdown.clone();
    lifecycle.tracker.clone().spawn(async move {
        loop {
            // At max_connections we stop accepting and let the kernel's backlog queue, rather
            // than accept and drop.
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("semaphore is never closed"),
                () = shutdown.cancelled() => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        accept_error(&name, e).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            // Small responses must not wait on Nagle's algorithm.
            let _ = stream.set_nodelay(true);
            let conn = ConnHandle::new(
                slot,
                connections.clone(),
                open_connections.clone(),
                limits.idle_timeout,
                lifecycle.clone(),
            );
            let service = make_service(peer, conn.clone());
            let builders = builders.clone();
            let io = CountingIo {
                inner: stream,
                activity: conn.inner.activity.clone(),
            };
            // Two kinds of task rather than one that can be either: a task's size is that of
            // its largest state, and a cleartext connection should not carry room for a TLS one
            // for as long as it stays open.
            let Some(tls) = tls.clone() else {
                lifecycle.tracker.spawn(async move {
                    serve_connection(io, &builders.auto, service, &conn).await;
                });
                continue;
            };
            lifecycle.tracker.spawn(async move {
                // A connection that arrives as shutdown starts is not worth a handshake.
                let stream = tokio::select! {
                    stream = tls.handshake(io, peer) => stream,
                    () = conn.inner.lifecycle.shutdown.cancelled() => None,
                };
                if let Some(stream) = stream {
                    let builder = match crate::tls::alpn(&stream) {
                        Some(b"h2") => &builders.h2,
                        Some(b"http/1.1") => &builders.h1,
                        // No ALPN: HTTP/1.1, or HTTP/2 with prior knowledge.
                        _ => &builders.auto,
                    };
                    serve_connection(stream, builder, service, &conn).await;
                }
            });
        }
        debug!(listener = %name, "stopped accepting");
    });
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
    auto: auto::Builder<TokioExecutor>,
    h1: auto::Builder<TokioExecutor>,
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
            .initial_connection_window_size(H2_CONNECTION_WINDOW);
        Self {
            h1: builder.clone().http1_only(),
            h2: builder.clone().http2_only(),
            auto: builder,
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
pub struct ConnHandle {
    inner: Arc<ConnShared>,
}

struct ConnShared {
    _slot: OwnedSemaphorePermit,
    gauge: Gauge,
    open_connections: Arc<AtomicU64>,
    /// Bumped by every read and write on the client socket (see [`CountingIo`]).
    activity: Arc<AtomicU64>,
    idle_timeout: Duration,
    lifecycle: Lifecycle,
}

impl ConnHandle {
    fn new(
        slot: OwnedSemaphorePermit,
        gauge: Gauge,
        open_connections: Arc<AtomicU64>,
        idle_timeout: Duration,
        lifecycle: Lifecycle,
    ) -> Self {
        gauge.increment(1.0);
        open_connections.fetch_add(1, Ordering::Relaxed);
        Self {
            inner: Arc::new(ConnShared {
                _slot: slot,
                gauge,
                open_connections,
                activity: Arc::new(AtomicU64::new(0)),
                idle_timeout,
                lifecycle,
            }),
        }
    }

    /// Once both sides have switched protocols, copies bytes between the client and the
    /// backend until either closes, the connection idles for `idle_timeout`, or shutdown
    /// cuts it off. `guard` (the request's in-flight count) lives as long as the tunnel.
    pub fn spawn_tunnel<G: Send + 'static>(&self, client: OnUpgrade, backend: OnUpgrade, guard: G) {
        let conn = self.clone();
        self.inner.lifecycle.tracker.spawn(async move {
            let _guard = guard;
            let (client, backend) = match tokio::try_join!(client, backend) {
                Ok(both) => both,
                Err(e) => {
                    debug!(error = %e, "upgrade did not complete");
                    return;
                }
            };
            let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
            let shared = &conn.inner;
            tokio::select! {
                result = tokio::io::copy_bidirectional(&mut client, &mut backend) => match result {
                    Ok((up, down)) => debug!(up, down, "tunnel closed"),
                    Err(e) => debug!(error = %e, "tunnel ended with an error"),
                },
                () = idle(&shared.activity, shared.idle_timeout) => debug!("closing idle tunnel"),
                () = shared.lifecycle.cut_off.cancelled() => debug!("tunnel cut off by shutdown_grace"),
            }
        });
    }
}

impl std::fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHandle")
            .field("idle_timeout", &self.inner.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl Drop for ConnShared {
    fn drop(&mut self) {
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
        self.gauge.decrement(1.0);
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
    let conn = builder.serve_connection_with_upgrades(
        TokioIo::new(io),
        hyper::service::service_fn(move |req| service.call(req)),
    );
    tokio::pin!(conn);
    let idle = idle(&shared.activity, shared.idle_timeout);
    tokio::pin!(idle);
    let shutdown = Quiet::new(shared.lifecycle.shutdown.cancelled());
    tokio::pin!(shutdown);
    let cut_off = Quiet::new(shared.lifecycle.cut_off.cancelled());
    tokio::pin!(cut_off);
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            () = shutdown.as_mut(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = &mut idle => {
                debug!("closing idle client connection");
                return;
            }
            () = cut_off.as_mut() => return,
        }
    }
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

/// Resolves once `activity` has not moved for `idle_timeout`. Checking four times per
/// timeout closes an idle connection within 1.25 × the limit without reading a clock on every
/// read and write.
async fn idle(activity: &AtomicU64, idle_timeout: Duration) {
    let period = idle_timeout / 4;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_seen = activity.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        ticker.tick().await;
        let seen = activity.load(Ordering::Relaxed);
        if seen != last_seen {
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
    /// A stream that counts reads and writes so the connection task can tell it is idle.
    struct CountingIo<T> {
        #[pin]
        inner: T,
        activity: Arc<AtomicU64>,
    }
}

impl<T> CountingIo<T> {
    fn touch(activity: &AtomicU64) {
        activity.fetch_add(1, Ordering::Relaxed);
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
            Self::touch(this.activity);
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
            Self::touch(this.activity);
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
            Self::touch(this.activity);
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

/// Waits for the connection and tunnel tasks for at most `grace`, then cuts off the rest;
/// returns how many were still running when it ran out.
pub async fn drain(lifecycle: &Lifecycle, grace: Duration) -> usize {
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
pub fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}
