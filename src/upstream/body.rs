//! What backends receive: [`RequestBody`], the client's streamed body, cut off at the
//! listener's `max_body_bytes`, and recoverable for a retry while no byte of it was sent. Its
//! failures are the client's ([`ClientBodyError`]) and it reports the upload's progress to the
//! proxy path through an [`Upload`], which is how a stalled or broken upload is told from a
//! backend that failed. It lives with the upstream connections because they are typed by it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;

use crate::base::error::BoxError;
use crate::base::metrics::{ClientErrorKind, ClientErrors};

/// The client's body stream exceeded the listener's `max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub(crate) struct BodyTooLarge {
    pub limit: u64,
}

/// The client's request body failed: the client's fault, never the backend's. This is what
/// the upstream connection sees as the body's error, so it heads hyper's error chain there.
#[derive(Debug, thiserror::Error)]
#[error("client request body failed ({})", kind.as_str())]
pub(crate) struct ClientBodyError {
    pub kind: ClientErrorKind,
    #[source]
    source: BoxError,
}

/// What `hyper` reports when reading a client's body failed, as the client's fault.
///
/// HTTP/1.1 decoding errors carry an `io::Error`: `InvalidData`/`InvalidInput` for a bad chunk
/// size, a missing CRLF or oversized trailers, `UnexpectedEof` for a body cut short, the
/// socket's own error for a reset. HTTP/2 carries an `h2::Error`: one `h2` raised itself (a DATA
/// frame past the declared `content-length`, a flow-control violation) is the client breaking
/// the protocol; a `RST_STREAM` or `GOAWAY` from the client is the client leaving. Anything else
/// (the connection task ended) is the client gone.
fn classify(error: &hyper::Error) -> ClientErrorKind {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => {
                    ClientErrorKind::Malformed
                }
                _ => ClientErrorKind::Aborted,
            };
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return if h2.is_library() {
                ClientErrorKind::Malformed
            } else {
                ClientErrorKind::Aborted
            };
        }
        source = e.source();
    }
    ClientErrorKind::Aborted
}

/// What the proxy path and a request body share about one client upload: whether it has been
/// sent whole, how it failed, and enough to tell a client that stalls from a backend that does
/// not read. Only requests with a body have one, so a GET allocates nothing for it.
#[derive(Debug)]
pub struct Upload {
    /// `UPLOADING`, `SENT`, or `FAULT + kind`; set once.
    state: AtomicU8,
    /// Data frames read from the client so far.
    progress: AtomicU64,
    /// Body bytes read from the client so far (the access log's `bytes_in`).
    received: AtomicU64,
    /// The body's last read of the client found nothing: the client owes the next byte. False
    /// while the backend connection is not asking for more (the backend is not reading).
    waiting: AtomicBool,
    /// The proxy task waiting for the upload to settle.
    waker: AtomicWaker,
    /// hyper dropped the request mid-upload: its client reset the stream or left.
    abandoned: AtomicBool,
    limit: Option<u64>,
    errors: Arc<ClientErrors>,
}

const UPLOADING: u8 = 0;
const SENT: u8 = 1;
const FAULT: u8 = 2;

impl Upload {
    /// `limit` is the listener's `max_body_bytes`; a fault is counted once in `errors`.
    pub fn new(limit: Option<u64>, errors: Arc<ClientErrors>) -> Self {
        Self {
            state: AtomicU8::new(UPLOADING),
            progress: AtomicU64::new(0),
            received: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            abandoned: AtomicBool::new(false),
            limit,
            errors,
        }
    }

    /// Records how the upload failed and counts it, unless it had already settled; returns
    /// whether this call settled it. The first settlement wins, so a fault is counted once
    /// whoever notices it (the body, the stall timer, or the last look at an abandoned body).
    pub fn fail(&self, kind: ClientErrorKind) -> bool {
        let settled = self.settle(FAULT + kind as u8);
        if settled {
            self.errors.count(kind);
        }
        settled
    }

    /// hyper dropped the request before its body was sent. Why is the body's to say (a reset
    /// from the client, or the client's protocol error that made h2 reset the stream), and it
    /// may not have looked yet: an upload still unsettled when the last reference goes is
    /// counted as aborted.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }

    fn finish(&self) {
        self.settle(SENT);
    }

    fn settle(&self, to: u8) -> bool {
        let settled = self
            .state
            .compare_exchange(UPLOADING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if settled {
            self.waker.wake();
        }
        settled
    }

    /// How the client broke this upload, if it did.
    pub fn fault(&self) -> Option<ClientErrorKind> {
        let state = self.state.load(Ordering::Acquire);
        state
            .checked_sub(FAULT)
            .map(|i| ClientErrorKind::ALL[usize::from(i)])
    }

    /// The listener's `max_body_bytes`.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Data frames read so far, and whether the body now waits on the client.
    pub fn progress(&self) -> (u64, bool) {
        (
            self.progress.load(Ordering::Relaxed),
            self.waiting.load(Ordering::Relaxed),
        )
    }

    /// Body bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Resolves once the body has been sent whole or has failed.
    pub fn settled(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.state.load(Ordering::Acquire) != UPLOADING {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.state.load(Ordering::Acquire) != UPLOADING {
                return Poll::Ready(());
            }
            Poll::Pending
        })
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if *self.state.get_mut() == UPLOADING && *self.abandoned.get_mut() {
            self.errors.count(ClientErrorKind::Aborted);
        }
    }
}

/// The body sent upstream: the client's stream, or nothing.
///
/// A body that was never polled is handed back through `giveback` when the client drops it,
/// which is what happens when connecting to the backend failed: the request can then be retried
/// on another node with its body intact. Once a byte has been polled the body is committed.
/// Every read is reported to the request's [`Upload`].
#[derive(Debug)]
pub struct RequestBody {
    body: Option<Incoming>,
    upload: Option<Arc<Upload>>,
    seen: u64,
    polled: bool,
    giveback: Option<oneshot::Sender<Incoming>>,
}

impl RequestBody {
    /// A body that cannot be recovered (used for the last attempt).
    pub fn new(body: Incoming, upload: Arc<Upload>) -> Self {
        Self {
            body: Some(body),
            upload: Some(upload),
            seen: 0,
            polled: false,
            giveback: None,
        }
    }

    /// A body that comes back on the returned receiver if it is dropped before being polled.
    pub fn recoverable(body: Incoming, upload: Arc<Upload>) -> (Self, oneshot::Receiver<Incoming>) {
        let (tx, rx) = oneshot::channel();
        let mut this = Self::new(body, upload);
        this.giveback = Some(tx);
        (this, rx)
    }

    pub fn empty() -> Self {
        Self {
            body: None,
            upload: None,
            seen: 0,
            polled: false,
            giveback: None,
        }
    }

    fn fail(&self, kind: ClientErrorKind, source: BoxError) -> BoxError {
        if let Some(upload) = &self.upload {
            upload.fail(kind);
        }
        Box::new(ClientBodyError { kind, source })
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if !self.polled
            && let (Some(body), Some(giveback)) = (self.body.take(), self.giveback.take())
        {
            let _ = giveback.send(body);
            return;
        }
        // Dropped mid-upload (the exchange ended early): one last look, without waiting, tells
        // a client that broke or reset its stream from one that is simply still sending.
        if let (Some(body), Some(upload)) = (&mut self.body, &self.upload)
            && upload.fault().is_none()
            && let Poll::Ready(Some(Err(e))) =
                Pin::new(body).poll_frame(&mut Context::from_waker(Waker::noop()))
        {
            upload.fail(classify(&e));
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
        let polled = Pin::new(&mut *body).poll_frame(cx);
        let upload = this.upload.as_deref();
        if let Some(upload) = upload {
            upload.waiting.store(polled.is_pending(), Ordering::Relaxed);
        }
        let frame = match ready!(polled) {
            None => {
                if let Some(upload) = upload {
                    upload.finish();
                }
                return Poll::Ready(None);
            }
            Some(Err(e)) => {
                let kind = classify(&e);
                return Poll::Ready(Some(Err(this.fail(kind, e.into()))));
            }
            Some(Ok(frame)) => frame,
        };
        if let Some(data) = frame.data_ref() {
            this.seen += data.len() as u64;
            if let Some(upload) = upload {
                upload
                    .received
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            if let Some(limit) = upload.and_then(Upload::limit)
                && this.seen > limit
            {
                let error = Box::new(BodyTooLarge { limit });
                return Poll::Ready(Some(Err(this.fail(ClientErrorKind::TooLarge, error))));
            }
        }
        if let Some(upload) = upload {
            upload.progress.fetch_add(1, Ordering::Relaxed);
            // hyper stops polling once `is_end_stream` says so: the last frame is the end.
            if body.is_end_stream() {
                upload.finish();
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let Some(body) = &self.body else {
            return true;
        };
        let end = body.is_end_stream();
        // An HTTP/2 body can end (an empty DATA frame with END_STREAM) before it is polled;
        // hyper then sends it without polling, so this is where the upload is seen whole.
        if end && let Some(upload) = &self.upload {
            upload.finish();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload() -> Upload {
        Upload::new(Some(10), Arc::new(ClientErrors::new("test")))
    }

    fn is_settled(upload: &Upload) -> bool {
        let settled = std::pin::pin!(upload.settled());
        settled
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_ready()
    }

    #[test]
    fn the_first_fault_is_the_one_recorded() {
        let upload = upload();
        assert!(!is_settled(&upload));
        assert!(upload.fail(ClientErrorKind::Malformed));
        assert!(!upload.fail(ClientErrorKind::Aborted));
        assert_eq!(upload.fault(), Some(ClientErrorKind::Malformed));
        assert!(is_settled(&upload));
    }

    #[test]
    fn a_body_sent_whole_cannot_fail_afterwards() {
        let upload = upload();
        upload.finish();
        assert!(is_settled(&upload));
        assert!(!upload.fail(ClientErrorKind::Timeout));
        assert_eq!(upload.fault(), None);
    }

    #[test]
    fn every_kind_round_trips_through_the_state() {
        for kind in ClientErrorKind::ALL {
            let upload = upload();
            assert!(upload.fail(kind));
            assert_eq!(upload.fault(), Some(kind));
        }
    }
}
