//! What clients receive: [`ProxyBody`], a backend's streamed body carrying the request's
//! [`InFlight`] guard, so the node counts as busy until the last byte is sent or the client goes
//! away (hyper drops the body then), or a small body fulcrum answers itself. Either carries
//! the request's access-log [`Tail`], written when the body ends. What backends
//! receive is [`crate::upstream::body::RequestBody`].

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;

use crate::datapath::access_log::{Tail, Termination};
use crate::model::pool::InFlight;
use crate::upstream::UpstreamConn;

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
            // The request's access-log record, written when the body ends.
            tail: Tail,
        },
        Local {
            data: Option<Bytes>,
            tail: Tail,
        },
    }
}

impl ProxyBody {
    /// A backend's body; `conn` is the connection it arrives on, when it is one of fulcrum's
    /// own (see [`crate::upstream`]).
    pub(crate) fn upstream(
        body: Incoming,
        in_flight: InFlight,
        conn: Option<UpstreamConn>,
    ) -> Self {
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
            tail: Tail::default(),
        }
    }

    pub(crate) fn local(data: impl Into<Bytes>) -> Self {
        ProxyBody::Local {
            data: Some(data.into()),
            tail: Tail::default(),
        }
    }

    pub(crate) fn empty() -> Self {
        ProxyBody::Local {
            data: None,
            tail: Tail::default(),
        }
    }

    /// Carries the request's access-log record until the body ends.
    pub(crate) fn set_tail(&mut self, new: Tail) {
        match self {
            ProxyBody::Upstream { tail, .. } | ProxyBody::Local { tail, .. } => *tail = new,
        }
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
                tail,
            } => {
                let mut body = body;
                let frame = ready!(body.as_mut().poll_frame(cx));
                if let Some(Ok(data)) = &frame
                    && let Some(data) = data.data_ref()
                {
                    tail.sent(data.len());
                }
                match &frame {
                    // hyper stops polling once `is_end_stream` says so: the last frame is the end.
                    Some(Ok(_)) if !body.is_end_stream() => {}
                    // A failed body leaves its connection unfit for reuse: it closes with us.
                    Some(Err(_)) => {
                        in_flight.take();
                        tail.end(Termination::BackendReset);
                    }
                    _ => {
                        let in_flight = in_flight.take();
                        if let (Some(conn), Some(in_flight)) = (conn.take(), &in_flight) {
                            in_flight.node().idle.put(conn);
                        }
                        tail.end(Termination::Completed);
                    }
                }
                Poll::Ready(frame)
            }
            ProxyBodyProj::Local { data, tail } => {
                let data = data.take();
                tail.sent(data.as_ref().map_or(0, Bytes::len));
                tail.end(Termination::Completed);
                Poll::Ready(data.map(|d| Ok(Frame::data(d))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Local { data, .. } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Local { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
