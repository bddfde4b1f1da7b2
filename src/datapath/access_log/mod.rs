//! The access log: one line per request, in JSON or nginx's `combined` format, written off the
//! request path.
//!
//! The request path only fills a [`Record`] (a boxed struct of copied handles: no formatting,
//! no clock but the `Instant`s it reads anyway) and pushes it onto a bounded lock-free queue;
//! a dedicated writer thread per file formats and writes it ([`writer`]). When the queue is
//! full the line is dropped and counted, so a slow disk never slows a request. With the log
//! off, a request pays one branch per step on an empty [`Trace`].
//!
//! A record follows its request: [`Trace`] while the proxy routes, picks and forwards, then
//! [`Tail`] inside the response body, so the line is written when the body has ended (or the
//! client went away, or the backend broke it) and `bytes_out` and `duration_ms` are real.
//! Whatever drops a record before it was finished is a client that left: the line says
//! `client_aborted`.

mod format;
mod writer;

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, Uri, Version, header};

use crate::base::config::{AccessLogConfig, AccessLogFormat};
use crate::base::metrics::Outcome;
use crate::datapath::tls::TlsInfo;
use crate::upstream::body::Upload;

pub(crate) use writer::{flush_all, reopen_all};

/// The status logged for a request whose client left before any response (nginx's 499).
const CLIENT_CLOSED: u16 = 499;

/// One listener's access log: the file's writer, shared by every listener that names the same
/// path, and how this listener's lines are written.
#[derive(Debug)]
pub(crate) struct AccessLog {
    sink: Arc<writer::Sink>,
    format: AccessLogFormat,
    include_query: bool,
}

impl AccessLog {
    /// Opens (or joins) the writer of `config.path`; a file that cannot be opened for
    /// appending is an error here, before the listener serves.
    pub(crate) fn open(config: &AccessLogConfig) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            sink: writer::Sink::open(&config.path)?,
            format: config.format,
            include_query: config.include_query,
        }))
    }
}

/// Why a request ended, as the log says it (HAProxy's termination state, in words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Termination {
    /// The response was sent whole.
    Completed,
    /// The client went away (or stalled its upload) before the response was sent whole.
    ClientAborted,
    /// The backend failed after the connection was made: before its answer, or mid-body.
    BackendReset,
    /// The backend sent no response head within `response_timeout`.
    BackendTimeout,
    /// No connection to the backend could be made.
    Refused,
    /// The pool had no routable node.
    NoBackend,
    /// Every node the request could use stayed full for `queue_timeout`.
    QueueTimeout,
    /// No route matched (or a `CONNECT`, which is never routed).
    NoRoute,
    /// The request broke HTTP (a bad body framing).
    Malformed,
    /// The request body exceeded `max_body_bytes`.
    TooLarge,
}

impl Termination {
    /// The `termination` field's value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Termination::Completed => "completed",
            Termination::ClientAborted => "client_aborted",
            Termination::BackendReset => "backend_reset",
            Termination::BackendTimeout => "backend_timeout",
            Termination::Refused => "refused",
            Termination::NoBackend => "no_backend",
            Termination::QueueTimeout => "queue_timeout",
            Termination::NoRoute => "no_route",
            Termination::Malformed => "malformed",
            Termination::TooLarge => "too_large",
        }
    }
}

/// Everything one line says, as copied handles: formatting waits for the writer thread.
#[derive(Debug)]
pub(crate) struct Record {
    log: Arc<AccessLog>,
    started: Instant,
    listener: Arc<str>,
    client: IpAddr,
    method: Method,
    uri: Uri,
    host: Option<HeaderValue>,
    version: Version,
    /// Only the `combined` format reads these two.
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
    tls: Option<TlsInfo>,
    status: u16,
    upload: Option<Arc<Upload>>,
    bytes_in: u64,
    bytes_out: u64,
    pool: Option<Arc<str>>,
    backend: Option<Arc<str>>,
    attempts: u32,
    sticky: Option<Outcome>,
    connect: Option<Duration>,
    ttfb: Option<Duration>,
    duration: Duration,
    /// `None` until decided; a record finished undecided was dropped: its client left.
    termination: Option<Termination>,
}

impl Record {
    /// Stamps the end of the request and hands the record to the writer.
    fn finish(mut self: Box<Self>) {
        self.duration = self.started.elapsed();
        if let Some(upload) = self.upload.take() {
            self.bytes_in = upload.received();
        }
        let log = self.log.clone();
        log.sink.push(self);
    }
}

/// What a request needs to start its record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub listener: &'a Arc<str>,
    /// After `trusted_proxies` (and the PROXY protocol, which sets the peer).
    pub client: IpAddr,
    pub tls: Option<&'a TlsInfo>,
    pub started: Instant,
}

/// A request's record while the proxy works on it; empty when its listener logs nothing.
/// Dropped unfinished (hyper dropped the request: its client left), it logs `client_aborted`.
#[derive(Debug, Default)]
pub(crate) struct Trace(Option<Box<Record>>);

impl Trace {
    /// Starts the record of `req`, for `log`.
    pub(crate) fn start<B>(
        log: Arc<AccessLog>,
        req: &Request<B>,
        request_id: Option<&HeaderValue>,
        origin: Origin<'_>,
    ) -> Self {
        let headers = req.headers();
        let combined = log.format == AccessLogFormat::Combined;
        let header = |name| combined.then(|| headers.get(name).cloned()).flatten();
        let host = match req.uri().authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None => headers.get(header::HOST).cloned(),
        };
        Self(Some(Box::new(Record {
            started: origin.started,
            listener: origin.listener.clone(),
            client: origin.client,
            method: req.method().clone(),
            uri: req.uri().clone(),
            host,
            version: req.version(),
            referer: header(header::REFERER),
            user_agent: header(header::USER_AGENT),
            // Off, the client's own header is recorded as it came.
            request_id: request_id.or_else(|| headers.get("x-request-id")).cloned(),
            tls: origin.tls.cloned(),
            status: CLIENT_CLOSED,
            upload: None,
            bytes_in: 0,
            bytes_out: 0,
            pool: None,
            backend: None,
            attempts: 0,
            sticky: None,
            connect: None,
            ttfb: None,
            duration: Duration::ZERO,
            termination: None,
            log,
        })))
    }

    /// Whether the request is logged.
    pub(crate) fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// The pool the request was routed to.
    pub(crate) fn pool(&mut self, name: &Arc<str>) {
        if let Some(r) = &mut self.0 {
            r.pool = Some(name.clone());
        }
    }

    /// The request's body, whose bytes read so far are `bytes_in`.
    pub(crate) fn upload(&mut self, upload: Option<&Arc<Upload>>) {
        if let (Some(r), Some(upload)) = (&mut self.0, upload) {
            r.upload = Some(upload.clone());
        }
    }

    /// An attempt on the node `backend`: the last one is the backend the line names.
    pub(crate) fn attempt(&mut self, backend: &Arc<str>) {
        if let Some(r) = &mut self.0 {
            r.attempts += 1;
            r.backend = Some(backend.clone());
            (r.connect, r.ttfb) = (None, None);
        }
    }

    /// The backend's response head arrived; `connect` is the time the connection took (zero
    /// for a kept-alive one, `None` when a pooled client made it unseen).
    pub(crate) fn answered(&mut self, connect: Option<Duration>) {
        if let Some(r) = &mut self.0 {
            r.connect = connect;
            r.ttfb = Some(r.started.elapsed());
        }
    }

    /// The sticky strategy's outcome for this request.
    pub(crate) fn sticky(&mut self, outcome: Outcome) {
        if let Some(r) = &mut self.0 {
            r.sticky = Some(outcome);
        }
    }

    /// The request failed with `status` for `termination`, answered by fulcrum.
    pub(crate) fn failed(&mut self, status: u16, termination: Termination) {
        if let Some(r) = &mut self.0 {
            r.termination = Some(termination);
            r.status = match termination {
                Termination::ClientAborted => CLIENT_CLOSED,
                _ => status,
            };
        }
    }

    /// The response about to be sent, with `status`: the record moves into its body, whose
    /// end writes the line. `empty` bodies are never polled, so they count as sent.
    pub(crate) fn respond(&mut self, status: u16, empty: bool) -> Tail {
        let Some(mut r) = self.0.take() else {
            return Tail(None);
        };
        r.status = status;
        if empty {
            r.termination.get_or_insert(Termination::Completed);
        }
        Tail(Some(r))
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.finish();
        }
    }
}

/// A request's record inside its response body, written when the body ends.
#[derive(Debug, Default)]
pub(crate) struct Tail(Option<Box<Record>>);

impl Tail {
    /// `n` more body bytes went to the client.
    #[inline]
    pub(crate) fn sent(&mut self, n: usize) {
        if let Some(r) = &mut self.0 {
            r.bytes_out += n as u64;
        }
    }

    /// The body ended (`Completed`) or broke (`BackendReset`): the line is written now. An
    /// answer fulcrum gave itself keeps the reason it gave it for.
    pub(crate) fn end(&mut self, termination: Termination) {
        if let Some(mut r) = self.0.take() {
            r.termination.get_or_insert(termination);
            r.finish();
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        // Unfinished: hyper dropped the body before its end, so the client left (unless the
        // body was empty and never polled, which `Trace::respond` marked completed).
        if let Some(r) = self.0.take() {
            r.finish();
        }
    }
}
