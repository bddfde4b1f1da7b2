//! The connection layer: accept, hand each TCP connection to hyper, close idle ones, and drain
//! on shutdown. What happens to a request once hyper has parsed it is [`crate::proxy`]'s story.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, warn};

use crate::body::BoxError;
use crate::metrics::DOWNSTREAM_CONNECTIONS;

/// Limits applied to every connection of one listener.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Time to receive a complete request head. hyper starts this clock whenever it waits for a
    /// head, so on HTTP/1.1 it also bounds how long a keep-alive connection may sit between
    /// requests (HAProxy's `timeout http-keep-alive` defaults the same way).
    pub header_read_timeout: Duration,
    /// No byte in either direction for this long closes the connection (HAProxy's
    /// `timeout client`); the only idle bound for HTTP/2.
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
}

/// Accepts connections on `listener` until `shutdown`, serving each with the service that
/// `make_service` builds for its peer. Connection tasks join `tracker` so shutdown can wait
/// for them.
pub fn spawn_accept_loop<M, S, B>(
    listener: TcpListener,
    name: Arc<str>,
    limits: ConnLimits,
    make_service: M,
    open_connections: Arc<AtomicU64>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) where
    M: Fn(SocketAddr) -> S + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builder = Arc::new(connection_builder(&limits));
    let connections = metrics::gauge!(DOWNSTREAM_CONNECTIONS, "listener" => name.to_string());
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let conn_tracker = tracker.clone();
    tracker.spawn(async move {
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
            let service = make_service(peer);
            let builder = builder.clone();
            let shutdown = shutdown.clone();
            let connections = connections.clone();
            let open_connections = open_connections.clone();
            let idle_timeout = limits.idle_timeout;
            conn_tracker.spawn(async move {
                connections.increment(1.0);
                open_connections.fetch_add(1, Ordering::Relaxed);
                serve_connection(stream, &builder, service, idle_timeout, shutdown).await;
                open_connections.fetch_sub(1, Ordering::Relaxed);
                connections.decrement(1.0);
                drop(slot);
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

fn connection_builder(limits: &ConnLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // A head that fills the read buffer without completing is answered 431. hyper-util's
        // auto builder does not expose hyper's separate max_header_size, so the buffer is the
        // limit (hyper's floor is 8 KiB).
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    builder
}

async fn serve_connection<S, B>(
    stream: TcpStream,
    builder: &auto::Builder<TokioExecutor>,
    service: S,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(CountingIo {
        inner: stream,
        activity: activity.clone(),
    });
    let conn =
        builder.serve_connection(io, hyper::service::service_fn(move |req| service.call(req)));
    tokio::pin!(conn);

    // Checking four times per idle_timeout closes an idle connection within 1.25 × the limit
    // without reading a clock on every read and write.
    let period = idle_timeout / 4;
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_seen = 0;
    let mut quiet = Duration::ZERO;
    let mut draining = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = ticker.tick() => {
                let seen = activity.load(Ordering::Relaxed);
                if seen != last_seen {
                    last_seen = seen;
                    quiet = Duration::ZERO;
                } else {
                    quiet += period;
                    if quiet >= idle_timeout {
                        debug!("closing idle client connection");
                        return;
                    }
                }
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

/// Waits for the connection tasks in `tracker` for at most `grace`; returns how many were
/// still running when it ran out.
pub async fn drain(tracker: &TaskTracker, grace: Duration) -> usize {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        let left = tracker.len();
        warn!(
            connections = left,
            ?grace,
            "shutdown_grace ran out; cutting off connections still busy"
        );
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
