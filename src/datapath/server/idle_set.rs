//! Idle keep-alive connections held as bare sockets: no task, no registration with the
//! runtime, ~0.3 KiB each.
//!
//! A connection hibernating in a task of its own still cost that task (a timer and the
//! futures it waits on), tokio's registration of its socket (a cache-padded `ScheduledIo`,
//! 256 bytes) and the allocator's rounding of each: ~2.7 KiB per idle client, where HAProxy
//! needs ~1.2 and nginx ~0.6. An [`IdleSet`] keeps what an idle connection *is* (the socket,
//! its TLS state if any, the handles to serve it again) in one slot, waits on every socket
//! with an epoll instance of its own (itself one registration with the runtime, nested as
//! epoll allows), and closes them in deadline order, one timer for the whole set. A socket
//! that becomes readable leaves the set: it is registered with the runtime again and a fresh
//! task serves it.
//!
//! One set per accept loop, so per listener and worker thread: its sockets share one
//! timeout, laid down in deadline order, which a queue keeps without a timer wheel. The
//! epoll instance comes from mio, what tokio itself is built on: tokio has no way to wait on
//! many sockets without registering each. Its size is bounded by the listener's
//! `max_connections`, since each connection keeps its slot while it sleeps.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// An idle connection laid down in an [`IdleSet`].
pub(crate) trait Sleeper: Send + 'static {
    /// The socket to wait on, off the runtime while the connection sleeps.
    fn fd(&self) -> RawFd;

    /// Serves the connection again, on the set's worker thread: its socket is readable (or
    /// closed), or with `readable` false, the set could not hold it and it waits in a task of
    /// its own.
    fn resume(self: Box<Self>, readable: bool);
}

/// Where the connections of one accept loop go to sleep.
#[derive(Clone)]
pub(crate) struct IdleSetHandle {
    inbox: mpsc::UnboundedSender<Box<dyn Sleeper>>,
}

impl IdleSetHandle {
    /// Hands an idle connection to the set; given back once the set is gone (shutdown).
    pub(crate) fn lay_down(&self, sleeper: Box<dyn Sleeper>) -> Result<(), Box<dyn Sleeper>> {
        self.inbox.send(sleeper).map_err(|refused| refused.0)
    }
}

/// Starts the idle set of an accept loop on the current worker: its sleepers are closed after
/// `timeout` and at `shutdown`. `None` when no epoll instance can be had (connections then
/// hibernate in their own tasks).
pub(crate) fn spawn(
    tracker: &TaskTracker,
    timeout: Duration,
    shutdown: CancellationToken,
) -> Option<IdleSetHandle> {
    // The constructor tokio deprecated for its lack of I/O safety, since the safe crate cannot
    // call the `unsafe` one: `Epoll` owns its descriptor and never closes or replaces it
    // while the `AsyncFd` lives, which is what that one asks.
    #[expect(
        deprecated,
        reason = "the safe constructor; its condition holds, see above"
    )]
    let epoll = mio::Poll::new()
        .and_then(|poll| AsyncFd::with_interest(Epoll(poll), tokio::io::Interest::READABLE));
    let epoll = match epoll {
        Ok(epoll) => epoll,
        Err(e) => {
            warn!(error = %e, "no epoll instance for idle connections; each waits in its own task");
            return None;
        }
    };
    let (inbox, laid_down) = mpsc::unbounded_channel();
    let set = IdleSet {
        epoll,
        sleepers: Slab::new(),
        deadlines: VecDeque::new(),
        timeout,
        laid: 0,
    };
    tracker.spawn(set.run(laid_down, shutdown));
    Some(IdleSetHandle { inbox })
}

/// The epoll instance, as tokio sees a file descriptor.
struct Epoll(mio::Poll);

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

struct IdleSet {
    epoll: AsyncFd<Epoll>,
    sleepers: Slab<Asleep>,
    /// When each sleeper is to be closed, in the order they were laid down, which is the
    /// order of their deadlines. An entry whose sleeper has left (woken, or its slot reused:
    /// the `laid` number differs) is skipped; the queue is compacted when such entries
    /// outnumber the live ones, so a connection that sleeps and wakes often costs nothing
    /// extra.
    deadlines: VecDeque<Deadline>,
    timeout: Duration,
    /// Sleepers laid down so far, wrapping: tells a slot's tenants apart.
    laid: u32,
}

struct Asleep {
    sleeper: Box<dyn Sleeper>,
    laid: u32,
}

struct Deadline {
    at: Instant,
    key: u32,
    laid: u32,
}

/// Readiness events taken from the epoll instance at a time.
const EVENTS: usize = 256;

impl IdleSet {
    async fn run(
        mut self,
        mut laid_down: mpsc::UnboundedReceiver<Box<dyn Sleeper>>,
        shutdown: CancellationToken,
    ) {
        let mut events = Events::with_capacity(EVENTS);
        let mut woken = Vec::new();
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut armed_for = None;
        loop {
            let next = self.next_deadline();
            if next != armed_for {
                if let Some(at) = next {
                    timer.as_mut().reset(at);
                }
                armed_for = next;
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                sleeper = laid_down.recv() => match sleeper {
                    Some(sleeper) => self.lay(sleeper),
                    None => break,
                },
                ready = self.epoll.readable_mut() => {
                    let mut ready = match ready {
                        Ok(ready) => ready,
                        Err(e) => {
                            warn!(error = %e, "idle connections' epoll instance failed");
                            break;
                        }
                    };
                    // Edge-triggered: take every event before clearing the readiness, which
                    // tokio keeps if another arrived meanwhile.
                    loop {
                        match ready.get_inner_mut().0.poll(&mut events, Some(Duration::ZERO)) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                warn!(error = %e, "waiting on idle connections failed");
                                break;
                            }
                        }
                        woken.extend(events.iter().map(|event| event.token().0));
                        let all_taken = woken.len() < EVENTS;
                        for token in woken.drain(..) {
                            let (key, laid) = split(token);
                            if self.sleepers.get(key).is_some_and(|s| s.laid == laid) {
                                let asleep = self.sleepers.remove(key);
                                let registry = ready.get_inner().0.registry();
                                // Off this set before the runtime takes the socket back.
                                let _ = registry.deregister(&mut SourceFd(&asleep.sleeper.fd()));
                                asleep.sleeper.resume(true);
                            }
                        }
                        if all_taken {
                            ready.clear_ready();
                            break;
                        }
                    }
                }
                () = &mut timer, if armed_for.is_some() => {
                    armed_for = None;
                    self.expire(Instant::now());
                }
            }
        }
        let held = self.sleepers.len();
        if held > 0 {
            debug!(connections = held, "closing idle connections");
        }
    }

    /// Adds a sleeper, or hands it back to a task of its own when epoll will not take it.
    fn lay(&mut self, sleeper: Box<dyn Sleeper>) {
        let fd = sleeper.fd();
        self.laid = self.laid.wrapping_add(1);
        let laid = self.laid;
        let entry = self.sleepers.vacant_entry();
        let key = entry.key();
        let Ok(key) = u32::try_from(key) else {
            sleeper.resume(false);
            return;
        };
        let token = join(key, laid);
        // Registering reports data that is already waiting, so a request sent while the
        // connection was on its way here still wakes it.
        let registry = self.epoll.get_ref().0.registry();
        if let Err(e) = registry.register(&mut SourceFd(&fd), token, Interest::READABLE) {
            debug!(error = %e, "an idle connection cannot join the idle set");
            sleeper.resume(false);
            return;
        }
        entry.insert(Asleep { sleeper, laid });
        if self.deadlines.len() >= 2 * self.sleepers.len() + 64 {
            let sleepers = &self.sleepers;
            self.deadlines.retain(|d| d.holds(sleepers));
        }
        self.deadlines.push_back(Deadline {
            at: Instant::now() + self.timeout,
            key,
            laid,
        });
    }

    /// The first deadline of a sleeper still here; drops the entries of those gone before it.
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(first) = self.deadlines.front() {
            if first.holds(&self.sleepers) {
                return Some(first.at);
            }
            self.deadlines.pop_front();
        }
        None
    }

    /// Closes the sleepers whose time is up: a client quiet for the listener's keep-alive
    /// bound.
    fn expire(&mut self, now: Instant) {
        while let Some(first) = self.deadlines.front() {
            if first.at > now {
                break;
            }
            if first.holds(&self.sleepers) {
                // Closing the socket takes it off the epoll instance too.
                drop(self.sleepers.remove(first.key as usize));
            }
            self.deadlines.pop_front();
        }
    }
}

impl Deadline {
    /// Whether its sleeper is still in the set.
    fn holds(&self, sleepers: &Slab<Asleep>) -> bool {
        sleepers
            .get(self.key as usize)
            .is_some_and(|s| s.laid == self.laid)
    }
}

/// An epoll token: the slot in the low half, its tenant's number in the high half, so an
/// event for a sleeper that has left cannot wake the next tenant of its slot. (fulcrum runs on
/// 64-bit Linux, where a token holds both.)
fn join(key: u32, laid: u32) -> Token {
    Token(usize::try_from(u64::from(laid) << 32 | u64::from(key)).unwrap_or(key as usize))
}

fn split(token: usize) -> (usize, u32) {
    let token = token as u64;
    let key = token & u64::from(u32::MAX);
    let laid = token >> 32;
    (
        usize::try_from(key).unwrap_or(usize::MAX),
        u32::try_from(laid).unwrap_or(0),
    )
}

/// A client's TCP socket, which can leave the runtime while its connection sleeps.
#[derive(Debug)]
pub(crate) enum ClientSocket {
    /// Registered with the current worker's runtime.
    Awake(tokio::net::TcpStream),
    /// Off the runtime, in an idle set.
    Asleep(std::net::TcpStream),
    /// Lost while changing state (the runtime refused it): reads and writes fail.
    Gone,
}

impl ClientSocket {
    /// Takes the socket off the runtime; its descriptor, for an idle set to wait on.
    pub(crate) fn park(&mut self) -> io::Result<RawFd> {
        match std::mem::replace(self, Self::Gone) {
            Self::Awake(stream) => {
                let stream = stream.into_std()?;
                let fd = stream.as_raw_fd();
                *self = Self::Asleep(stream);
                Ok(fd)
            }
            Self::Asleep(stream) => {
                let fd = stream.as_raw_fd();
                *self = Self::Asleep(stream);
                Ok(fd)
            }
            Self::Gone => Err(gone()),
        }
    }

    /// The descriptor of a parked socket.
    pub(crate) fn fd(&self) -> RawFd {
        match self {
            Self::Awake(stream) => stream.as_raw_fd(),
            Self::Asleep(stream) => stream.as_raw_fd(),
            Self::Gone => -1,
        }
    }

    /// Registers a parked socket with the current worker's runtime again.
    pub(crate) fn unpark(&mut self) -> io::Result<()> {
        match std::mem::replace(self, Self::Gone) {
            Self::Asleep(stream) => *self = Self::Awake(tokio::net::TcpStream::from_std(stream)?),
            awake @ Self::Awake(_) => *self = awake,
            Self::Gone => return Err(gone()),
        }
        Ok(())
    }

    /// Ready once the client has sent something (or closed).
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Awake(stream) => stream.poll_read_ready(cx),
            Self::Asleep(_) | Self::Gone => Poll::Ready(Err(gone())),
        }
    }

    fn awake(self: Pin<&mut Self>) -> io::Result<Pin<&mut tokio::net::TcpStream>> {
        match self.get_mut() {
            Self::Awake(stream) => Ok(Pin::new(stream)),
            Self::Asleep(_) | Self::Gone => Err(gone()),
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "client socket is off the runtime",
    )
}

impl AsyncRead for ClientSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.awake()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.awake()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.awake()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.awake()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.awake()?.poll_shutdown(cx)
    }
}
