//! The one body type that flows through the proxy in both directions, and the idle timer on
//! bodies streamed from a peer.
//!
//! An enum instead of a boxed trait object: the hot path forwards streamed bodies without an
//! allocation, and the proxy's own small responses (JSON errors, replayable request bodies) are
//! `Full`.
//!
//! A body streamed from a peer (the client's request body, the upstream's response body) is a
//! [`PeerBody`]: when it has been waited on for its idle limit (the route's timeout) with no
//! bytes arriving, it fails with [`BodyError::Idle`]. The transfer is then cut, not held open: a
//! peer that stops sending mid-body cannot hold a request and a connection forever, while a slow
//! but steady body streams for as long as it takes.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::upstream::Lease;

/// Why a streamed body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The peer broke the stream: bad framing, a short body, a reset, a closed connection.
    #[error("body stream failed")]
    Peer(#[source] hyper::Error),
    /// No body bytes arrived for this long while the body was waited on.
    #[error("no body bytes for {0:?}")]
    Idle(Duration),
}

/// A request or response body: streamed from a peer, or held in memory.
#[derive(Debug)]
pub enum ProxyBody {
    /// No body at all.
    Empty,
    /// A body held in memory; `None` once it has been yielded.
    Full(Option<Bytes>),
    /// A body streamed from the client or the upstream.
    Streamed(PeerBody),
    /// The first chunks of a streamed body, already read, then the rest of the stream.
    Prefixed {
        /// Chunks read ahead, in order.
        head: VecDeque<Bytes>,
        /// The remainder.
        rest: PeerBody,
    },
}

impl ProxyBody {
    /// A body with the given bytes.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            ProxyBody::Empty
        } else {
            ProxyBody::Full(Some(bytes))
        }
    }
}

/// A body streamed from a peer, cut with [`BodyError::Idle`] when no bytes arrive for `idle`
/// while it is being waited on.
///
/// The clock runs only while the body is polled and has nothing to give: a reader that stops
/// reading (backpressure from the other side) is not a stalled peer. One timer per body, made on
/// the first wait and reset at the start of each later one, so a body whose bytes are always
/// there when asked for never touches the timer wheel.
#[derive(Debug)]
pub struct PeerBody {
    body: Incoming,
    idle: Duration,
    /// Boxed because the upstream pool only takes `Unpin` bodies.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer runs: the last poll found no bytes, and none came since.
    waiting: bool,
    watch: Option<Arc<UploadWatch>>,
    /// The upstream connection of a response body, returned to its pool at the body's end.
    lease: Option<Lease<ProxyBody>>,
}

impl PeerBody {
    /// `body`, cut when it stalls for `idle`.
    pub fn new(body: Incoming, idle: Duration) -> PeerBody {
        PeerBody {
            body,
            idle,
            timer: None,
            waiting: false,
            watch: None,
            lease: None,
        }
    }

    /// This response body, giving `lease`'s connection back to its pool once the body has been
    /// read to its end (at once when there is no body). Dropped earlier, the body closes it.
    pub fn releasing(mut self, lease: Option<Lease<ProxyBody>>) -> PeerBody {
        self.lease = lease;
        if self.body.is_end_stream() {
            self.release();
        }
        self
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }

    /// This body, reporting its progress and its stall to the returned watch: a request body
    /// streamed upstream is owned by the upstream connection, and the pipeline still needs to know.
    pub fn watched(mut self) -> (PeerBody, Arc<UploadWatch>) {
        let watch = Arc::new(UploadWatch::new());
        self.watch = Some(Arc::clone(&watch));
        (self, watch)
    }

    /// Bytes came, or the body ended.
    fn moved(&mut self) {
        self.waiting = false;
        if let Some(watch) = &self.watch {
            watch.moved();
        }
    }

    /// Called when the body has nothing to give: starts the clock if it is not running, and
    /// fails once it has run for `idle`.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if !self.waiting {
            self.waiting = true;
            if let Some(watch) = &self.watch {
                watch.waiting.store(true, Ordering::Relaxed);
            }
            let deadline = Instant::now() + self.idle;
            match &mut self.timer {
                // A later deadline is only recorded; the timer wheel is touched when it fires.
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let elapsed = self
            .timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready());
        if !elapsed {
            return Poll::Pending;
        }
        if let Some(watch) = &self.watch {
            watch.stalled.store(true, Ordering::Release);
        }
        Poll::Ready(Some(Err(BodyError::Idle(self.idle))))
    }
}

impl Body for PeerBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // An empty DATA frame (HTTP/2 allows them) is not progress.
                if frame.data_ref().is_none_or(|data| !data.is_empty()) {
                    this.moved();
                }
                if this.body.is_end_stream() {
                    this.release();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(BodyError::Peer(error)))),
            Poll::Ready(None) => {
                this.moved();
                this.release();
                Poll::Ready(None)
            }
            Poll::Pending => this.poll_idle(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What the pipeline learns about a request body streamed upstream while the upstream connection
/// owns it: when bytes last came from the client, whether the client is being waited on now, and
/// whether its body stalled and was cut. That tells a slow client, whose body's own timer
/// decides, from an upstream that stopped reading, which the wait for its answer bounds.
#[derive(Debug)]
pub struct UploadWatch {
    started: Instant,
    /// Milliseconds from `started` to the last bytes (or the end) read from the client.
    last_progress_ms: AtomicU64,
    waiting: AtomicBool,
    stalled: AtomicBool,
}

impl UploadWatch {
    fn new() -> UploadWatch {
        UploadWatch {
            started: Instant::now(),
            last_progress_ms: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
        }
    }

    fn moved(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_progress_ms.store(ms, Ordering::Relaxed);
        self.waiting.store(false, Ordering::Relaxed);
    }

    /// When bytes last came from the client (or its body ended); when streaming began if none
    /// came yet.
    pub fn last_progress(&self) -> Instant {
        self.started + Duration::from_millis(self.last_progress_ms.load(Ordering::Relaxed))
    }

    /// Whether the upload is blocked on the client right now (its body's idle timer runs).
    pub fn waiting_on_client(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Whether the client's body stalled and was cut.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }
}

/// A request body after reading ahead up to a limit.
#[derive(Debug)]
pub enum ReadAhead {
    /// The whole body fit: it can be sent (and replayed) from memory.
    Complete(Bytes),
    /// It is larger: what was read, then the rest of the stream.
    Partial {
        /// Chunks read, in order.
        head: VecDeque<Bytes>,
        /// The remainder.
        rest: PeerBody,
    },
}

/// Reads `body` until it ends or more than `limit` bytes arrived. A malformed body (bad chunking,
/// a short `Content-Length`, a client that went away) or a stalled one is an error here, before
/// anything is sent upstream.
pub async fn read_ahead(mut body: PeerBody, limit: u64) -> Result<ReadAhead, BodyError> {
    use http_body_util::BodyExt;
    let mut head = VecDeque::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        // Trailers are not forwarded (hyper's client would need them declared up front).
        if let Ok(data) = frame?.into_data() {
            total += data.len() as u64;
            head.push_back(data);
            if total > limit {
                return Ok(ReadAhead::Partial { head, rest: body });
            }
        }
    }
    let bytes = match head.len() {
        0 => Bytes::new(),
        1 => head.pop_front().unwrap_or_default(),
        _ => {
            let mut all = bytes::BytesMut::with_capacity(total as usize);
            for chunk in head {
                all.extend_from_slice(&chunk);
            }
            all.freeze()
        }
    };
    Ok(ReadAhead::Complete(bytes))
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Streamed(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Prefixed { head, rest } => match head.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Streamed(body) => body.is_end_stream(),
            ProxyBody::Prefixed { head, rest } => head.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Streamed(body) => body.size_hint(),
            ProxyBody::Prefixed { head, rest } => {
                let buffered: u64 = head.iter().map(|b| b.len() as u64).sum();
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + buffered);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + buffered);
                }
                hint
            }
        }
    }
}
