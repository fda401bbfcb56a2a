//! The one body type that flows through the proxy in both directions.
//!
//! An enum instead of a boxed trait object: the hot path forwards `Incoming` bodies without an
//! allocation, and the proxy's own small responses (JSON errors, replayable request bodies) are
//! `Full`.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// A request or response body: streamed from a peer, or held in memory.
#[derive(Debug)]
pub enum ProxyBody {
    /// No body at all.
    Empty,
    /// A body held in memory; `None` once it has been yielded.
    Full(Option<Bytes>),
    /// A body streamed from the client or the upstream.
    Incoming(Incoming),
    /// The first chunks of a streamed body, already read, then the rest of the stream.
    Prefixed {
        /// Chunks read ahead, in order.
        head: std::collections::VecDeque<Bytes>,
        /// The remainder.
        rest: Incoming,
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

/// A request body after reading ahead up to a limit.
#[derive(Debug)]
pub enum ReadAhead {
    /// The whole body fit: it can be sent (and replayed) from memory.
    Complete(Bytes),
    /// It is larger: what was read, then the rest of the stream.
    Partial(ProxyBody),
}

/// Reads `body` until it ends or more than `limit` bytes arrived. A malformed body (bad chunking,
/// a short `Content-Length`, a client that went away) is an error here, before anything is sent
/// upstream.
pub async fn read_ahead(mut body: Incoming, limit: u64) -> Result<ReadAhead, hyper::Error> {
    use http_body_util::BodyExt;
    let mut head = std::collections::VecDeque::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        // Trailers are not forwarded (hyper's client would need them declared up front).
        if let Ok(data) = frame?.into_data() {
            total += data.len() as u64;
            head.push_back(data);
            if total > limit {
                return Ok(ReadAhead::Partial(ProxyBody::Prefixed { head, rest: body }));
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

impl From<Incoming> for ProxyBody {
    fn from(body: Incoming) -> Self {
        ProxyBody::Incoming(body)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Incoming(body) => Pin::new(body).poll_frame(cx),
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
            ProxyBody::Incoming(body) => body.is_end_stream(),
            ProxyBody::Prefixed { head, rest } => head.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Incoming(body) => body.size_hint(),
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
