//! HTTP/1.1 connections to backends: each node keeps its own idle connections.
//!
//! hyper-util's pooled client files idle connections under a `(scheme, authority)` key in a
//! mutex-guarded map; checking one out and putting it back SipHashes the authority byte by
//! byte, twice per request, and returning it spawns a task. fulcrum already knows which node a
//! request goes to, so the node holds its idle connections in a lock-free bounded queue:
//! a checkout is a pop and a readiness check, a return is a push. Each connection still runs in
//! a task of its own, which keeps the socket work batched per task as hyper intends.
//!
//! The queue is allocated when the node's first connection goes idle, with room for the
//! node's cap (`max_connections`), or [`MAX_IDLE_PER_BACKEND`] when uncapped or above it. A
//! node that never gets a request (one registered and gone before its checks passed, say) costs
//! a few words, not 1024 slots, and a capped node keeps at most its cap of idle connections,
//! since it never has more in use. An `ArrayQueue` allocated once keeps a checkout and a return
//! to one compare-and-swap each and allocates nothing per request; a `SegQueue` would grow
//! without a bound of its own and allocate a new block every 31 returns as its indices move on.
//!
//! Each worker thread keeps its own queue per node: a connection's I/O task runs on the
//! thread that opened it, so a request on another thread would wake that one for every read
//! and write. Per-thread queues keep a request, its connection and its socket on one core,
//! as nginx workers' `keepalive` caches do.
//!
//! HTTP/2 backends (`h2c`) and `Upgrade` requests keep using hyper-util's client.

pub(crate) mod body;
pub(crate) mod client;

use std::io;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::base::clock::now_ms;
use crate::base::workers;
use crate::upstream::body::RequestBody;

/// Idle connections kept per backend; a connection released when the queue is full is closed.
/// HAProxy keeps every reusable connection, nginx `keepalive N` per worker: this bounds the
/// file descriptors one backend can hold without churning connections under heavy concurrency.
pub(crate) const MAX_IDLE_PER_BACKEND: usize = 1024;

/// The request half of one HTTP/1.1 connection to a backend; its I/O runs in a spawned task
/// that ends when this is dropped or the backend closes.
#[derive(Debug)]
pub struct UpstreamConn {
    sender: SendRequest<RequestBody>,
    address: SocketAddr,
    idle_since_ms: u64,
}

/// Why a request got no response from the backend.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// Nothing was sent: the request may go to another backend.
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    /// The connection failed after the request may have been sent.
    #[error(transparent)]
    Exchange(hyper::Error),
}

impl UpstreamConn {
    /// Idle for less than `idle_timeout_ms` as of `now_ms`.
    fn fresh(&self, now_ms: u64, idle_timeout_ms: u64) -> bool {
        now_ms.saturating_sub(self.idle_since_ms) < idle_timeout_ms
    }

    async fn connect(address: SocketAddr, timeout: Duration) -> Result<Self, io::Error> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
            Ok(stream) => stream?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {timeout:?}"),
                ));
            }
        };
        // Small requests must not wait on Nagle's algorithm.
        stream.set_nodelay(true)?;
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                debug!(%address, error = %e, "backend connection ended with an error");
            }
        });
        Ok(Self {
            sender,
            address,
            idle_since_ms: 0,
        })
    }
}

/// Sends `request` over an idle connection to `address` from `idle`, or a new one, and
/// returns the response head with the connection, which goes back to `idle` once the response
/// body has ended, and the time the connection took to open (zero for an idle one). A reused connection the backend closed just as the request went out hands
/// the request back unsent: it is then sent once more over a new connection.
pub(crate) async fn request(
    idle: &IdleConns,
    address: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    mut request: Request<RequestBody>,
) -> Result<(Response<Incoming>, UpstreamConn, Duration), UpstreamError> {
    let mut reused = idle.take(address, idle_timeout);
    loop {
        let fresh = reused.is_none();
        let mut connect = Duration::ZERO;
        let mut conn = match reused.take() {
            Some(conn) => conn,
            None => {
                let start = Instant::now();
                let conn = UpstreamConn::connect(address, connect_timeout)
                    .await
                    .map_err(UpstreamError::Connect)?;
                connect = start.elapsed();
                conn
            }
        };
        match conn.sender.try_send_request(request).await {
            Ok(response) => return Ok((response, conn, connect)),
            Err(mut e) => match e.take_message() {
                Some(unsent) if !fresh => request = unsent,
                _ => return Err(UpstreamError::Exchange(e.into_error())),
            },
        }
    }
}

/// A backend's idle connections, oldest first, one queue per worker thread.
pub struct IdleConns {
    /// One slot per worker; each queue allocated by its worker's first [`IdleConns::put`],
    /// with room for `limit` connections.
    queues: OnceLock<Box<[OnceLock<ArrayQueue<UpstreamConn>>]>>,
    /// The node's cap, at most [`MAX_IDLE_PER_BACKEND`].
    limit: AtomicUsize,
}

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleConns")
            .field("len", &self.len())
            .field("limit", &self.limit.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for IdleConns {
    fn default() -> Self {
        Self {
            queues: OnceLock::new(),
            limit: AtomicUsize::new(MAX_IDLE_PER_BACKEND),
        }
    }
}

impl IdleConns {
    /// Keeps at most `cap` idle connections (`None`: [`MAX_IDLE_PER_BACKEND`]). A queue already
    /// allocated for more gives up its surplus now; later returns fill it only as far as the
    /// requests in flight, which the cap bounds. One allocated for fewer keeps its size for
    /// the node's life: connections past it close after their request.
    pub fn set_limit(&self, cap: Option<u32>) {
        let limit = cap.map_or(MAX_IDLE_PER_BACKEND, |cap| {
            (cap as usize).clamp(1, MAX_IDLE_PER_BACKEND)
        });
        self.limit.store(limit, Ordering::Relaxed);
        for queue in self.allocated() {
            while queue.len() > limit && queue.pop().is_some() {}
        }
    }

    /// Room for this many idle connections per worker, allocated or not.
    pub fn capacity(&self) -> usize {
        self.allocated()
            .next()
            .map_or_else(|| self.limit.load(Ordering::Relaxed), ArrayQueue::capacity)
    }

    /// Some worker's queue has been allocated (a connection went idle at least once).
    pub fn is_allocated(&self) -> bool {
        self.allocated().next().is_some()
    }

    fn allocated(&self) -> impl Iterator<Item = &ArrayQueue<UpstreamConn>> {
        self.queues
            .get()
            .into_iter()
            .flatten()
            .filter_map(OnceLock::get)
    }

    /// This worker's queue, if allocated.
    fn mine(&self) -> Option<&ArrayQueue<UpstreamConn>> {
        self.queues.get()?.get(workers::index())?.get()
    }

    /// An open connection to `address`, idle for less than `idle_timeout` and ready for a
    /// request. Those that fail the test are let go on the way: one still busy (say, sending
    /// the rest of an upload the backend answered early) finishes that exchange, then closes.
    fn take(&self, address: SocketAddr, idle_timeout: Duration) -> Option<UpstreamConn> {
        let now = now_ms();
        let idle_timeout = idle_timeout.as_millis() as u64;
        let queue = self.mine()?;
        while let Some(conn) = queue.pop() {
            if conn.address == address && conn.sender.is_ready() && conn.fresh(now, idle_timeout) {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next request while there is room.
    pub fn put(&self, mut conn: UpstreamConn) {
        if conn.sender.is_closed() {
            return;
        }
        conn.idle_since_ms = now_ms();
        let slots = self.queues.get_or_init(|| {
            (0..workers::count())
                .map(|_| OnceLock::new())
                .collect::<Vec<_>>()
                .into_boxed_slice()
        });
        let Some(slot) = slots.get(workers::index()) else {
            return;
        };
        let queue = slot.get_or_init(|| ArrayQueue::new(self.limit.load(Ordering::Relaxed)));
        // A full queue hands the connection back: dropping it closes it.
        drop(queue.push(conn));
    }

    /// Closes connections idle for `idle_timeout` or more and those the backend closed.
    pub fn expire(&self, idle_timeout: Duration) {
        let now = now_ms();
        let idle_timeout = idle_timeout.as_millis() as u64;
        for queue in self.allocated() {
            for _ in 0..queue.len() {
                let Some(conn) = queue.pop() else { break };
                if conn.fresh(now, idle_timeout) && !conn.sender.is_closed() {
                    // Requests may have refilled the queue meanwhile: then this one closes.
                    drop(queue.push(conn));
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.allocated().map(ArrayQueue::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
