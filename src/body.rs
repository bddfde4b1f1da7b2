//! Body types of the proxy path.
//!
//! [`ProxyBody`] is what clients receive: a backend's streamed body carrying the request's
//! [`InFlight`] guard, so the node counts as busy until the last byte is sent or the client goes
//! away (hyper drops the body then), or a small body fulcrum answers itself.
//! [`RequestBody`] is what backends receive: the client's streamed body, cut off at the
//! listener's `max_body_bytes`, and recoverable for a retry while no byte of it was sent.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;

use crate::pool::InFlight;
use crate::upstream::UpstreamConn;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Upstream {
            #[pin]
            body: Incoming,
            // Dropped at end of stream, so the count falls as soon as the body is done even if
            // the client keeps the connection open.
            in_flight: Option<InFlight>,
            // The HTTP/1.1 connection the body arrives on: back to the node's idle queue once
            // the body has ended, closed if the client goes away first.
            conn: Option<UpstreamConn>,
        },
        Local {
            data: Option<Bytes>,
        },
    }
}

impl ProxyBody {
    /// A backend's body; `conn` is the connection it arrives on, when it is one of fulcrum's
    /// own (see [`crate::upstream`]).
    pub fn upstream(body: Incoming, in_flight: InFlight, conn: Option<UpstreamConn>) -> Self {
        // An empty body may never be polled (HEAD, 204, 304): its connection is free already.
        let conn = match conn {
            Some(conn) if body.is_end_stream() => {
                in_flight.node().idle.put(conn);
                None
            }
            conn => conn,
        };
        ProxyBody::Upstream {
            body,
            in_flight: Some(in_flight),
            conn,
        }
    }

    pub fn local(data: impl Into<Bytes>) -> Self {
        ProxyBody::Local {
            data: Some(data.into()),
        }
    }

    pub fn empty() -> Self {
        ProxyBody::Local { data: None }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            ProxyBodyProj::Upstream {
                body,
                in_flight,
                conn,
            } => {
                let mut body = body;
                let frame = ready!(body.as_mut().poll_frame(cx));
                match &frame {
                    // hyper stops polling once `is_end_stream` says so: the last frame is the end.
                    Some(Ok(_)) if !body.is_end_stream() => {}
                    // A failed body leaves its connection unfit for reuse: it closes with us.
                    Some(Err(_)) => {
                        in_flight.take();
                    }
                    _ => {
                        let in_flight = in_flight.take();
                        if let (Some(conn), Some(in_flight)) = (conn.take(), &in_flight) {
                            in_flight.node().idle.put(conn);
                        }
                    }
                }
                Poll::Ready(frame)
            }
            ProxyBodyProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Local { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// The client's body stream exceeded the listener's `max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// The body sent upstream: the client's stream, or nothing.
///
/// A body that was never polled is handed back through `giveback` when the client drops it,
/// which is what happens when connecting to the backend failed: the request can then be retried
/// on another node with its body intact. Once a byte has been polled the body is committed.
#[derive(Debug)]
pub struct RequestBody {
    body: Option<Incoming>,
    limit: Option<u64>,
    seen: u64,
    polled: bool,
    giveback: Option<oneshot::Sender<Incoming>>,
}

impl RequestBody {
    /// A body that cannot be recovered (used for the last attempt).
    pub fn new(body: Incoming, limit: Option<u64>) -> Self {
        Self {
            body: Some(body),
            limit,
            seen: 0,
            polled: false,
            giveback: None,
        }
    }

    /// A body that comes back on the returned receiver if it is dropped before being polled.
    pub fn recoverable(body: Incoming, limit: Option<u64>) -> (Self, oneshot::Receiver<Incoming>) {
        let (tx, rx) = oneshot::channel();
        let mut this = Self::new(body, limit);
        this.giveback = Some(tx);
        (this, rx)
    }

    pub fn empty() -> Self {
        Self {
            body: None,
            limit: None,
            seen: 0,
            polled: false,
            giveback: None,
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if !self.polled
            && let (Some(body), Some(giveback)) = (self.body.take(), self.giveback.take())
        {
            let _ = giveback.send(body);
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        this.polled = true;
        let frame = ready!(Pin::new(body).poll_frame(cx));
        if let (Some(Ok(frame)), Some(limit)) = (&frame, this.limit)
            && let Some(data) = frame.data_ref()
        {
            this.seen += data.len() as u64;
            if this.seen > limit {
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
            }
        }
        Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
