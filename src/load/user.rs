//! A virtual user: its own keep-alive connection pool (bound to its source address, if any) and
//! cookie jar, the `--url` it is on, the GET it sends, how that request ended, and what its
//! answers said about the node it reached and the session it kept.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{COOKIE, HeaderValue, USER_AGENT};
use http::{HeaderMap, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use super::continuity::{Continuity, Sessions};
use super::failover::Moves;
use super::jar::Jar;
use super::report::Failover;
use super::report::{ErrorKind, NO_NODE};

const USER_AGENT_VALUE: &str = concat!("fulcrum-load/", env!("CARGO_PKG_VERSION"));

/// The web node's `/session` visit count; continuity is judged from it.
const X_SESSION_VISITS: &str = "x-session-visits";

/// A virtual user: its own connection pool, cookie jar, node switches and session count.
pub(super) struct User {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// The index of the `--url` this user sends to; an atomic so that of several of its
    /// requests failing at once on a gone balancer, only one moves it on.
    site: AtomicUsize,
    state: Mutex<UserState>,
}

#[derive(Default)]
struct UserState {
    jar: Jar,
    last_node: Option<String>,
    switches: u64,
    continuity: Continuity,
    moves: Moves,
}

impl User {
    /// A user on `--url` number `site` whose connections leave from `source` (the system's
    /// choice without one).
    pub(super) fn new(source: Option<IpAddr>, site: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_local_address(source);
        User {
            client: Client::builder(TokioExecutor::new()).build(connector),
            site: AtomicUsize::new(site),
            state: Mutex::new(UserState::default()),
        }
    }

    /// A panicking request task poisons this lock; see `propagate_panic` for why that is
    /// ignored here.
    fn state(&self) -> MutexGuard<'_, UserState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The index of the `--url` this user sends to.
    pub(super) fn site(&self) -> usize {
        self.site.load(Ordering::Acquire)
    }

    /// Moves this user from URL `from` to the next of `sites`, unless another of its requests
    /// already moved it; returns whether this call did.
    pub(super) fn move_on(&self, from: usize, sites: usize) -> bool {
        let next = (from + 1) % sites.max(1);
        let moved = self
            .site
            .compare_exchange(from, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if moved {
            let mut state = self.state();
            let last = state.last_node.clone();
            state.moves.moved(last.as_deref());
        }
        moved
    }

    /// A GET of `uri` carrying this user's cookies.
    #[expect(
        clippy::expect_used,
        reason = "a GET of a valid URI is a valid request"
    )]
    pub(super) fn get(&self, uri: &Uri) -> Request<Empty<Bytes>> {
        let mut builder = Request::get(uri.clone())
            .header(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        if let Some(cookies) = self.state().jar.header(std::time::Instant::now()) {
            builder = builder.header(COOKIE, cookies);
        }
        builder
            .body(Empty::new())
            .expect("a GET of a valid URI is a valid request")
    }

    /// Sends `req` on this user's connections and reads the whole answer, within `timeout`
    /// and before `deadline`.
    pub(super) async fn exchange(
        &self,
        req: Request<Empty<Bytes>>,
        timeout: Duration,
        deadline: Instant,
    ) -> Ending {
        let exchange = async {
            let response = self.client.request(req).await?;
            let (parts, body) = response.into_parts();
            // The whole body, so latency is what a user waits for and the connection is
            // reusable.
            body.collect().await?;
            Ok::<_, Box<dyn StdError + Send + Sync>>(parts)
        };
        let outcome =
            tokio::time::timeout_at(deadline, tokio::time::timeout(timeout, exchange)).await;
        match outcome {
            Err(_) => Ending::Unfinished,
            Ok(Err(_)) => Ending::TimedOut,
            Ok(Ok(Err(error))) => Ending::Failed(error),
            Ok(Ok(Ok(parts))) => Ending::Answered(parts),
        }
    }

    /// An answer from `node`: its cookies, whether the user moved, and its visit count.
    pub(super) fn answered(&self, headers: &HeaderMap, node: &str, now: std::time::Instant) {
        let mut state = self.state();
        state.jar.store(headers, now);
        state.moves.answered(node);
        if state.last_node.as_deref() != Some(node) {
            // A user's first answer is no switch: there was no node to switch from.
            state.switches += u64::from(state.last_node.is_some());
            state.last_node = Some(node.to_owned());
        }
        match visit_count(headers) {
            Some(visits) => state.continuity.counted(visits),
            None => state.continuity.uncounted(),
        }
    }

    /// A request that ended without an answer: the server may have counted the visit or not.
    pub(super) fn unanswered(&self) {
        self.state().continuity.uncounted();
    }

    /// Adds this user's node switches and visit counts to the run's.
    pub(super) fn add_to(&self, sessions: &mut Sessions) {
        let state = self.state();
        sessions.add_user(state.switches, &state.continuity);
    }

    /// Adds this user's moves between URLs to the run's.
    pub(super) fn add_moves_to(&self, failover: &mut Failover) {
        failover.add_user(&self.state().moves);
    }
}

/// How one request ended.
pub(super) enum Ending {
    /// Head and whole body arrived.
    Answered(http::response::Parts),
    /// Still in flight when the run's deadline came.
    Unfinished,
    /// No whole answer within `--timeout`.
    TimedOut,
    /// The client failed it: no connection, a reset, a malformed answer.
    Failed(Box<dyn StdError + Send + Sync>),
}

/// The node an answer names in `x-served-by`, or [`NO_NODE`].
pub(super) fn served_by(headers: &HeaderMap) -> Cow<'_, str> {
    headers
        .get("x-served-by")
        .map_or_else(|| NO_NODE.into(), |v| String::from_utf8_lossy(v.as_bytes()))
}

/// The `x-session-visits` figure of an answer, if it carries a whole number.
fn visit_count(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(X_SESSION_VISITS)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Sorts a client error into the report's kinds by walking its source chain.
pub(super) fn classify(error: &(dyn StdError + 'static)) -> ErrorKind {
    if let Some(e) = error.downcast_ref::<hyper_util::client::legacy::Error>()
        && e.is_connect()
    {
        return ErrorKind::Connect;
    }
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled() || h.is_closed())
        {
            return ErrorKind::Reset;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as Io;
            match io.kind() {
                Io::ConnectionRefused => return ErrorKind::Connect,
                Io::TimedOut => return ErrorKind::Timeout,
                Io::ConnectionReset
                | Io::ConnectionAborted
                | Io::BrokenPipe
                | Io::UnexpectedEof => return ErrorKind::Reset,
                _ => {}
            }
        }
        cause = e.source();
    }
    ErrorKind::Other
}
