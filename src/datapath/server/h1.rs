//! HTTP/1.1 client connections that hold hyper's buffers only while a request is in flight.
//!
//! hyper's HTTP/1.1 server connection keeps an 8 KiB write buffer from its creation and an
//! 8 KiB read buffer from its first read for as long as it lives, and has no setting to let
//! them go: ~16 KiB for every idle keep-alive client, ~160 GiB for ten million. HAProxy and
//! nginx lend buffers only while bytes move. This module gets there with hyper's public API
//! instead of a parser of fulcrum's own: once a response has ended, nothing else is in flight
//! and the client has been quiet for [`REST_AFTER`], the hyper connection is ended at that
//! request boundary
//! ([`graceful_shutdown`](hyper::server::conn::http1::Connection::graceful_shutdown) on an
//! idle connection writes nothing) and `into_parts` hands back the socket and any bytes hyper
//! read ahead. With nothing unread, the connection then sleeps in its accept loop's idle set
//! (see `idle_set`) until the client sends again, and a fresh hyper connection serves the
//! next request.
//!
//! Upgrades (WebSocket) end hyper's part the same way: the socket and its read-ahead bytes go
//! to the tunnel task through the connection's tunnel slot, since hyper's own
//! upgrade hand-over only exists on the connection type that shuts the socket down when done.

use std::future::poll_fn;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::{
    ClientService, ConnHandle, ConnShared, Quiet, ended_with_error, first_head_missed, idle, reads,
};
use crate::datapath::proxy_protocol::Rewind;

/// A client socket fulcrum can wait on without reading from it.
pub(crate) trait Wakeable: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready once the client may have sent something (or closed).
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Takes the socket off the runtime, for an idle set to wait on its descriptor. `None`
    /// when there is nothing to wait for (bytes already read from it wait above it, or it is
    /// gone) or it cannot leave: the connection then waits in its own task.
    fn park(&mut self) -> Option<RawFd>;

    /// The descriptor of a parked socket.
    fn fd(&self) -> RawFd;

    /// Registers a parked socket with the current worker's runtime again.
    fn unpark(&mut self) -> io::Result<()>;
}

/// A client connection handed to an upgrade's tunnel: the socket, and first the bytes the
/// client sent after its upgrade request.
pub(crate) type TunnelIo = Rewind<Box<dyn TunnelStream>>;

/// What a tunnel needs of a client socket.
pub(crate) trait TunnelStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> TunnelStream for T {}

/// How long a connection with nothing in flight stays awake before it hibernates. A client
/// that sends its next request sooner (a browser's burst, a benchmark's loop) keeps its hyper
/// connection: ending and rebuilding one per request costs more CPU than the request itself
/// gains. Short enough that a burst of new connections (thousands a second) has few awake at
/// once, so their buffers are reused rather than piling up in the allocator.
const REST_AFTER: Duration = Duration::from_millis(10);

/// How one hyper connection (one awake spell) ended.
enum Spell<I> {
    /// Nothing in flight: the socket and hyper's read-ahead bytes, to hibernate or go on.
    Rested(I, Bytes),
    /// The connection is over (closed, failed, drained, timed out or tunnelled).
    Over,
}

/// Serves HTTP/1.1 on `io` (whose first bytes are `prefix`) until the client leaves or the
/// connection rests with nothing unread: then the socket (and the service) are handed back,
/// to sleep until the client sends again. `reads_at_start` is given for a connection's first
/// request.
pub(crate) async fn serve<I, S>(
    mut io: I,
    mut prefix: Bytes,
    reads_at_start: Option<u64>,
    builder: &http1::Builder,
    service: S,
    conn: &ConnHandle,
) -> Option<(I, S)>
where
    I: Wakeable,
    S: ClientService,
{
    let shared = &conn.inner;
    let mut first = reads_at_start;
    loop {
        // Boxed: the hibernating task holds none of a spell's state.
        match Box::pin(awake(io, prefix, builder, service.clone(), shared, first)).await {
            Spell::Rested(rested, read_ahead) => (io, prefix) = (rested, read_ahead),
            Spell::Over => return None,
        }
        first = None;
        // A pipelined request, or part of the next head: serve it at once.
        if prefix.is_empty() {
            return Some((io, service));
        }
    }
}

/// One hyper connection, boxed so that a hibernating task does not carry its state.
async fn awake<I, S>(
    io: I,
    prefix: Bytes,
    builder: &http1::Builder,
    service: S,
    shared: &Arc<ConnShared>,
    mut first: Option<u64>,
) -> Spell<I>
where
    I: Wakeable,
    S: ClientService,
{
    let tracked = Tracked {
        inner: service,
        shared: shared.clone(),
    };
    let mut conn =
        Box::new(builder.serve_connection(TokioIo::new(Rewind::with_prefix(io, prefix)), tracked));
    let dispatched_before = shared.requests.load(Ordering::Relaxed);
    // The head deadline (`header_read_timeout`) is fulcrum's, not hyper's: hyper's boxes a new
    // timer for every request. It runs from this spell's start, which is the accept (or the
    // end of the TLS handshake) for a connection's first request, else the moment the client
    // woke a sleeping connection or left part of a head unread when the last spell ended
    // (a spell ends 10 ms after a response with no new request). After a request with a body
    // the spell goes on, so the deadline is armed again from that response's end.
    let reads_before = first.unwrap_or_else(|| reads(&shared.activity));
    let head_deadline = tokio::time::sleep(shared.listener.header_read_timeout);
    tokio::pin!(head_deadline);
    let mut awaiting_head = true;
    let mut head_since = dispatched_before;
    let idle = idle(shared);
    tokio::pin!(idle);
    let shutdown = Quiet::new(shared.listener.lifecycle.shutdown.cancelled());
    tokio::pin!(shutdown);
    let cut_off = Quiet::new(shared.listener.lifecycle.cut_off.cancelled());
    tokio::pin!(cut_off);
    // Armed once the connection rests, with the request count then; when it fires with the
    // count unchanged the connection hibernates. One timer per quiet spell, not per request.
    let rest = tokio::time::sleep(REST_AFTER);
    tokio::pin!(rest);
    let mut resting_since: Option<u64> = None;
    let mut ending = false;
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            result = poll_fn(|cx| conn.poll_without_shutdown(cx)) => {
                if let Err(e) = result {
                    ended_with_error(shared, &e, reads_before);
                    return Spell::Over;
                }
                let parts = conn.into_parts();
                let (io, unread) = parts.io.into_inner().into_parts();
                let read_ahead = join(unread, parts.read_buf);
                if let Some(tunnel) = shared.take_tunnel() {
                    let client: Box<dyn TunnelStream> = Box::new(io);
                    let _ = tunnel.send(Rewind::with_prefix(client, read_ahead));
                    return Spell::Over;
                }
                if ending && !draining {
                    return Spell::Rested(io, read_ahead);
                }
                // The client closed, asked to close, or shutdown drained the connection.
                let mut io = io;
                let _ = io.shutdown().await;
                return Spell::Over;
            }
            () = rested(shared, dispatched_before), if !ending && resting_since.is_none() => {
                resting_since = Some(shared.requests.load(Ordering::Relaxed));
                rest.as_mut().reset(tokio::time::Instant::now() + REST_AFTER);
            }
            () = rest.as_mut(), if !ending && resting_since.is_some() => {
                let quiet = resting_since.take() == Some(shared.requests.load(Ordering::Relaxed))
                    && shared.in_flight.load(Ordering::Relaxed) == 0;
                if quiet {
                    ending = true;
                    Pin::new(&mut *conn).graceful_shutdown();
                }
            }
            () = shutdown.as_mut(), if !draining => {
                draining = true;
                ending = true;
                Pin::new(&mut *conn).graceful_shutdown();
            }
            () = head_deadline.as_mut(), if awaiting_head => {
                awaiting_head = false;
                let missed = match first {
                    Some(_) => first_head_missed(shared, reads_before),
                    // Like hyper's timer on a reused connection, not counted as a client error:
                    // a keep-alive client may simply have gone quiet.
                    None => {
                        let missed = shared.requests.load(Ordering::Relaxed) == head_since
                            && shared.in_flight.load(Ordering::Relaxed) == 0;
                        if missed {
                            debug!("no request head within header_read_timeout; closing");
                        }
                        missed
                    }
                };
                if missed {
                    return Spell::Over;
                }
            }
            () = after_body(shared, head_since), if !ending => {
                head_since = shared.requests.load(Ordering::Relaxed);
                awaiting_head = true;
                first = None;
                head_deadline
                    .as_mut()
                    .reset(tokio::time::Instant::now() + shared.listener.header_read_timeout);
            }
            () = &mut idle => {
                debug!("closing idle client connection");
                return Spell::Over;
            }
            () = cut_off.as_mut() => return Spell::Over,
        }
    }
}

/// Ready once a request with a body has been answered since `head_since` and nothing is in
/// flight: the next head's deadline starts then, since such a spell does not end at rest.
async fn after_body(shared: &ConnShared, head_since: u64) {
    poll_fn(|_| {
        let answered = shared.requests.load(Ordering::Relaxed) != head_since
            && shared.in_flight.load(Ordering::Relaxed) == 0;
        if answered
            && shared.body_pending.load(Ordering::Relaxed)
            && !shared.close_after.load(Ordering::Relaxed)
        {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// Ready while this spell has served a request without a body and nothing is in flight: after
/// a request with a body the connection stays awake until the next one without (hyper may not
/// have read all of that body, and then it closes the connection itself). Checked on every
/// wake-up of the connection's task: a response ends inside hyper's poll, just before.
async fn rested(shared: &ConnShared, dispatched_before: u64) {
    poll_fn(|_| {
        let served = shared.requests.load(Ordering::Relaxed) != dispatched_before;
        let closing = shared.close_after.load(Ordering::Relaxed)
            || shared.body_pending.load(Ordering::Relaxed);
        if served && !closing && shared.in_flight.load(Ordering::Relaxed) == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

/// Waits in the connection's task, holding only the socket, until the client sends again (when
/// no idle set holds it). `false`: the connection is to close (quiet past
/// `header_read_timeout`, the bound between keep-alive requests, or past `idle_timeout`;
/// shutdown; a socket error).
pub(crate) async fn hibernate<I: Wakeable>(io: &mut I, shared: &ConnShared) -> bool {
    tokio::select! {
        woke = poll_fn(|cx| io.poll_wake(cx)) => woke.is_ok(),
        () = tokio::time::sleep(shared.listener.header_read_timeout.min(shared.listener.idle_timeout)) => false,
        () = shared.listener.lifecycle.shutdown.cancelled() => false,
        () = shared.listener.lifecycle.cut_off.cancelled() => false,
    }
}

/// The bytes read but not yet served, in an allocation of their own: hyper's read-ahead is a
/// view into its whole read buffer, which would otherwise stay allocated, even when the view
/// is empty, for as long as the connection sleeps.
fn join(first: Bytes, then: Bytes) -> Bytes {
    if first.is_empty() && then.is_empty() {
        return Bytes::new();
    }
    let mut both = BytesMut::with_capacity(first.len() + then.len());
    both.extend_from_slice(&first);
    both.extend_from_slice(&then);
    both.freeze()
}

/// The service with the connection's request count and in-flight count kept: a request is in
/// flight from the call until hyper drops its response body.
struct Tracked<S> {
    inner: S,
    shared: Arc<ConnShared>,
}

/// Decrements the connection's in-flight count when the response (or the call) is gone.
struct InFlightGuard(Arc<ConnShared>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = std::convert::Infallible>,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = std::convert::Infallible;
    // Boxed: hyper's `poll_without_shutdown` wants an `Unpin` future. A struct rather than an
    // `async` block, which would hold the inner future twice (captured, then awaited).
    type Future = Pin<Box<TrackedCall<S::Future>>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.shared.dispatched.store(true, Ordering::Relaxed);
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        if !keeps_alive(req.version(), req.headers()) {
            self.shared.close_after.store(true, Ordering::Relaxed);
        }
        // Whether hyper has read all of a request body is not visible from here; only a
        // bodiless request leaves the connection at a boundary once its response ends.
        self.shared
            .body_pending
            .store(!req.body().is_end_stream(), Ordering::Relaxed);
        Box::pin(TrackedCall {
            response: self.inner.call(req),
            guard: Some(InFlightGuard(self.shared.clone())),
        })
    }
}

pin_project! {
    /// A call in flight: once its response comes, the guard moves into the response's body.
    pub(crate) struct TrackedCall<F> {
        #[pin]
        response: F,
        guard: Option<InFlightGuard>,
    }
}

impl<F, B> Future for TrackedCall<F>
where
    F: Future<Output = Result<Response<B>, std::convert::Infallible>>,
{
    type Output = Result<Response<TrackedBody<B>>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.response.poll(cx));
        // An `Option` only so the guard can move out of the pinned call.
        let guard = this.guard.take();
        if let Some(guard) = &guard
            && has_close(response.headers())
        {
            guard.0.close_after.store(true, Ordering::Relaxed);
        }
        Poll::Ready(Ok(response.map(|body| TrackedBody {
            body,
            _guard: guard,
        })))
    }
}

/// Whether hyper keeps the connection open after this request: HTTP/1.1 unless it says
/// `close`, HTTP/1.0 only with `keep-alive`.
fn keeps_alive(version: http::Version, headers: &http::HeaderMap) -> bool {
    let says = |token: &str| {
        headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match version {
        http::Version::HTTP_11 => !says("close"),
        http::Version::HTTP_10 => says("keep-alive"),
        _ => false,
    }
}

fn has_close(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"))
}

pin_project! {
    /// A response body that holds its request's in-flight share until hyper drops it.
    pub(crate) struct TrackedBody<B> {
        #[pin]
        body: B,
        _guard: Option<InFlightGuard>,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
