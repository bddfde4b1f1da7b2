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
//! An idle connection is *warm* (hyper's connection and its task running, ready at once) for
//! [`COOL_AFTER`], then goes *cold*: hyper's connection ends at the request boundary, its task
//! and buffers (~40 KiB: two 8 KiB buffers, its request channel, the task) are freed, and the
//! queue keeps the bare socket (~50 bytes). The next request over a cold connection starts a
//! fresh hyper connection on it, no new TCP handshake; one the backend closed meanwhile is
//! noticed with a `peek` and dropped. After a burst, the connections it opened cost the
//! balancer nothing but their sockets, as HAProxy's idle server connections do.
//!
//! HTTP/2 backends (`h2c`) and `Upgrade` requests keep using hyper-util's client.

pub(crate) mod body;
pub(crate) mod client;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
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

/// How long an idle connection stays warm: a connection reused within this keeps hyper's
/// connection (no new buffers, no new task); one idle for longer keeps only its socket. Short,
/// because a burst's surplus is what it frees; long against the gaps of a steady stream of
/// requests, which then never pays for a cold start.
pub(crate) const COOL_AFTER: Duration = Duration::from_millis(50);

/// The request half of one HTTP/1.1 connection to a backend; its I/O runs in a spawned task
/// that ends when this is dropped or the backend closes.
#[derive(Debug)]
pub struct UpstreamConn {
    sender: SendRequest<RequestBody>,
    address: SocketAddr,
    idle_since_ms: u64,
    /// Set before the sender is dropped to cool the connection: the task then hands the socket
    /// back to `pool` rather than closing it.
    cooling: Arc<AtomicBool>,
}

/// An idle connection without hyper's connection: the socket, off the runtime.
#[derive(Debug)]
struct ColdConn {
    socket: std::net::TcpStream,
    address: SocketAddr,
    idle_since_ms: u64,
}

impl ColdConn {
    /// Idle for less than `idle_timeout_ms` as of `now_ms`.
    fn fresh(&self, now_ms: u64, idle_timeout_ms: u64) -> bool {
        now_ms.saturating_sub(self.idle_since_ms) < idle_timeout_ms
    }

    /// Whether the backend has neither closed the connection nor sent anything unasked (which
    /// would be read as the next response's start).
    fn is_quiet(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.socket.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
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

    async fn connect(
        address: SocketAddr,
        timeout: Duration,
        pool: &Arc<IdleConns>,
    ) -> Result<Self, io::Error> {
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
        Self::start(stream, address, pool).await
    }

    /// A cold connection warmed again: the socket back on this worker's runtime, under a fresh
    /// hyper connection.
    async fn warm(cold: ColdConn, pool: &Arc<IdleConns>) -> Result<Self, io::Error> {
        let stream = TcpStream::from_std(cold.socket)?;
        Self::start(stream, cold.address, pool).await
    }

    /// Runs hyper's connection on `stream` in a task of its own. Once the sender is dropped
    /// with `cooling` set, the task puts the bare socket in `pool`'s cold queue.
    async fn start(
        stream: TcpStream,
        address: SocketAddr,
        pool: &Arc<IdleConns>,
    ) -> Result<Self, io::Error> {
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let cooling = Arc::new(AtomicBool::new(false));
        let cool = cooling.clone();
        let pool = Arc::downgrade(pool);
        tokio::spawn(async move {
            let parts = match driver.without_shutdown().await {
                Ok(parts) => parts,
                Err(e) => {
                    debug!(%address, error = %e, "backend connection ended with an error");
                    return;
                }
            };
            // Bytes the backend sent unasked: nothing to build the next exchange on.
            if !cool.load(Ordering::Acquire) || !parts.read_buf.is_empty() {
                return;
            }
            let (Ok(socket), Some(pool)) = (parts.io.into_inner().into_std(), pool.upgrade())
            else {
                return;
            };
            pool.put_cold(ColdConn {
                socket,
                address,
                idle_since_ms: now_ms(),
            });
        });
        Ok(Self {
            sender,
            address,
            idle_since_ms: 0,
            cooling,
        })
    }

    /// Ends hyper's connection, keeping the socket (see [`COOL_AFTER`]).
    fn cool(self) {
        self.cooling.store(true, Ordering::Release);
        crate::base::heap::released();
    }
}

/// Sends `request` over an idle connection to `address` from `idle`, or a new one, and
/// returns the response head with the connection, which goes back to `idle` once the response
/// body has ended, and the time the connection took to open (zero for an idle one). A reused connection the backend closed just as the request went out hands
/// the request back unsent: it is then sent once more over a new connection.
///
/// Opening and warming a connection are boxed: inline, their handshakes' state would make
/// every request's future (which hyper boxes, and which lives as long as the request) larger
/// by ~1 KiB, for a step most requests skip.
pub(crate) async fn request(
    idle: &Arc<IdleConns>,
    address: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    mut request: Request<RequestBody>,
) -> Result<(Response<Incoming>, UpstreamConn, Duration), UpstreamError> {
    let mut reused = idle.take(address, idle_timeout);
    if reused.is_none() {
        reused = match idle.take_cold(address, idle_timeout) {
            // A socket the runtime will not take back is just not reused.
            Some(cold) => Box::pin(UpstreamConn::warm(cold, idle)).await.ok(),
            None => None,
        };
    }
    loop {
        let fresh = reused.is_none();
        let mut connect = Duration::ZERO;
        let mut conn = match reused.take() {
            Some(conn) => conn,
            None => {
                let start = Instant::now();
                let conn = Box::pin(UpstreamConn::connect(address, connect_timeout, idle))
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

/// A backend's idle connections, oldest first, one set of queues per worker thread.
pub struct IdleConns {
    /// One slot per worker, allocated by its worker's first [`IdleConns::put`].
    queues: OnceLock<Box<[OnceLock<WorkerQueues>]>>,
    /// The node's cap, at most [`MAX_IDLE_PER_BACKEND`].
    limit: AtomicUsize,
}

/// One worker's idle connections to a backend, each queue with room for the node's cap.
struct WorkerQueues {
    warm: ArrayQueue<UpstreamConn>,
    /// Allocated when a connection first goes cold.
    cold: OnceLock<ArrayQueue<ColdConn>>,
    /// A task on the worker cools this queue's warm connections while it has any.
    cooler_running: AtomicBool,
}

impl WorkerQueues {
    fn all(&self) -> impl Iterator<Item = Queue<'_>> {
        std::iter::once(Queue::Warm(&self.warm)).chain(self.cold.get().map(Queue::Cold))
    }
}

enum Queue<'a> {
    Warm(&'a ArrayQueue<UpstreamConn>),
    Cold(&'a ArrayQueue<ColdConn>),
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
        for queues in self.allocated() {
            while queues.warm.len() > limit && queues.warm.pop().is_some() {}
            if let Some(cold) = queues.cold.get() {
                // The warm ones count first: their connections were used last.
                while queues.warm.len() + cold.len() > limit && cold.pop().is_some() {}
            }
        }
    }

    /// Room for this many idle connections per worker, allocated or not.
    pub fn capacity(&self) -> usize {
        self.allocated()
            .next()
            .map_or_else(|| self.limit.load(Ordering::Relaxed), |q| q.warm.capacity())
    }

    /// Some worker's queue has been allocated (a connection went idle at least once).
    pub fn is_allocated(&self) -> bool {
        self.allocated().next().is_some()
    }

    fn allocated(&self) -> impl Iterator<Item = &WorkerQueues> {
        self.queues
            .get()
            .into_iter()
            .flatten()
            .filter_map(OnceLock::get)
    }

    /// This worker's queues, if allocated.
    fn mine(&self) -> Option<&WorkerQueues> {
        self.queues.get()?.get(workers::index())?.get()
    }

    /// A warm connection to `address`, idle for less than `idle_timeout` and ready for a
    /// request. Those that fail the test are let go on the way: one still busy (say, sending
    /// the rest of an upload the backend answered early) finishes that exchange, then closes.
    fn take(&self, address: SocketAddr, idle_timeout: Duration) -> Option<UpstreamConn> {
        let now = now_ms();
        let idle_timeout = idle_timeout.as_millis() as u64;
        let queue = &self.mine()?.warm;
        while let Some(conn) = queue.pop() {
            if conn.address == address && conn.sender.is_ready() && conn.fresh(now, idle_timeout) {
                return Some(conn);
            }
        }
        None
    }

    /// A cold connection to `address`, idle for less than `idle_timeout`, that the backend
    /// has kept open; the others are closed on the way.
    fn take_cold(&self, address: SocketAddr, idle_timeout: Duration) -> Option<ColdConn> {
        let now = now_ms();
        let idle_timeout = idle_timeout.as_millis() as u64;
        let queue = self.mine()?.cold.get()?;
        while let Some(cold) = queue.pop() {
            if cold.address == address && cold.fresh(now, idle_timeout) && cold.is_quiet() {
                return Some(cold);
            }
        }
        None
    }

    /// Keeps `conn` for the next request while there is room.
    pub fn put(self: &Arc<Self>, mut conn: UpstreamConn) {
        if conn.sender.is_closed() {
            return;
        }
        conn.idle_since_ms = now_ms();
        let Some(queues) = self.worker_queues() else {
            return;
        };
        // A full queue hands the connection back: dropping it closes it.
        drop(queues.warm.push(conn));
        // A plain load on the request path; the runtime is looked up only to start a cooler.
        if !queues.cooler_running.load(Ordering::Acquire)
            && !queues.cooler_running.swap(true, Ordering::AcqRel)
        {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(cooler(Arc::downgrade(self)))),
                // Outside a runtime (never on the request path) the connection stays warm.
                Err(_) => queues.cooler_running.store(false, Ordering::Release),
            }
        }
    }

    /// Keeps a connection that just went cold, on the worker its task ran on.
    fn put_cold(&self, cold: ColdConn) {
        let Some(queues) = self.worker_queues() else {
            return;
        };
        let limit = self.limit.load(Ordering::Relaxed);
        let queue = queues.cold.get_or_init(|| ArrayQueue::new(limit));
        drop(queue.push(cold));
    }

    /// This worker's queues, allocated on first use.
    fn worker_queues(&self) -> Option<&WorkerQueues> {
        let slots = self.queues.get_or_init(|| {
            (0..workers::count())
                .map(|_| OnceLock::new())
                .collect::<Vec<_>>()
                .into_boxed_slice()
        });
        let slot = slots.get(workers::index())?;
        Some(slot.get_or_init(|| WorkerQueues {
            warm: ArrayQueue::new(self.limit.load(Ordering::Relaxed)),
            cold: OnceLock::new(),
            cooler_running: AtomicBool::new(false),
        }))
    }

    /// Cools this worker's warm connections idle for [`COOL_AFTER`]; `false` once it has none
    /// left (the cooler then stops).
    fn cool_mine(&self) -> bool {
        let Some(queues) = self.mine() else {
            return false;
        };
        let now = now_ms();
        let after = COOL_AFTER.as_millis() as u64;
        for _ in 0..queues.warm.len() {
            let Some(conn) = queues.warm.pop() else { break };
            if conn.fresh(now, after) {
                // Requests may have refilled the queue meanwhile: then this one closes.
                drop(queues.warm.push(conn));
            } else {
                conn.cool();
            }
        }
        if !queues.warm.is_empty() {
            return true;
        }
        queues.cooler_running.store(false, Ordering::Release);
        // A connection put back just before the flag went down would wait for the next put.
        !queues.warm.is_empty() && !queues.cooler_running.swap(true, Ordering::AcqRel)
    }

    /// Closes connections idle for `idle_timeout` or more and those the backend closed.
    pub fn expire(&self, idle_timeout: Duration) {
        let now = now_ms();
        let idle_timeout = idle_timeout.as_millis() as u64;
        for queue in self.allocated().flat_map(WorkerQueues::all) {
            match queue {
                Queue::Warm(queue) => {
                    for _ in 0..queue.len() {
                        let Some(conn) = queue.pop() else { break };
                        if conn.fresh(now, idle_timeout) && !conn.sender.is_closed() {
                            // Requests may have refilled the queue meanwhile: then this one closes.
                            drop(queue.push(conn));
                        }
                    }
                }
                Queue::Cold(queue) => {
                    for _ in 0..queue.len() {
                        let Some(cold) = queue.pop() else { break };
                        if cold.fresh(now, idle_timeout) && cold.is_quiet() {
                            drop(queue.push(cold));
                        }
                    }
                }
            }
        }
    }

    /// Of the idle connections, those gone cold (see [`COOL_AFTER`]).
    pub fn cold_len(&self) -> usize {
        self.allocated()
            .filter_map(|queues| queues.cold.get())
            .map(ArrayQueue::len)
            .sum()
    }

    /// Idle connections, warm and cold.
    pub fn len(&self) -> usize {
        self.allocated()
            .flat_map(WorkerQueues::all)
            .map(|queue| match queue {
                Queue::Warm(queue) => queue.len(),
                Queue::Cold(queue) => queue.len(),
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Cools a worker's warm idle connections to one backend every [`COOL_AFTER`] while it has
/// any; runs on that worker (its queues are the worker's own).
async fn cooler(pool: Weak<IdleConns>) {
    loop {
        tokio::time::sleep(COOL_AFTER).await;
        let Some(pool) = pool.upgrade() else { return };
        if !pool.cool_mine() {
            return;
        }
    }
}
