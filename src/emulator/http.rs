//! The emulator's accept loop and response plumbing: one task per listener, HTTP/1.1 and HTTP/2
//! (prior knowledge, or ALPN under TLS) through hyper-util's auto builder, connection tasks held
//! in a `JoinSet` so that aborting the listener task also ends its connections.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;

use super::{token, upstream, Family, Shared};

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener serves.
#[derive(Clone, Copy, Debug)]
pub(super) enum Site {
    /// The token endpoint and the JWKS.
    Auth,
    /// One emulated API host.
    Api(Family),
}

/// Returned by a handler to drop the connection (HTTP/1.1) or reset the stream (HTTP/2) without
/// answering.
#[derive(Debug)]
pub(super) struct ConnectionReset;

impl fmt::Display for ConnectionReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("emulated connection reset")
    }
}

impl std::error::Error for ConnectionReset {}

/// A response body: a complete buffer or the deterministic byte pattern, streamed.
#[derive(Debug)]
pub(super) enum ResponseBody {
    /// A whole body, sent as one frame.
    Full(Option<Bytes>),
    /// [`super::pattern_bytes`] from offset 0, in chunks.
    Pattern(PatternStream),
    /// A first chunk, then a stall.
    Stalled(StalledBody),
}

/// A body that sends its first bytes and then never another: its waker is never woken, so it
/// stays pending until the peer closes the connection (or the emulator stops).
#[derive(Debug)]
pub(super) struct StalledBody {
    head: Option<Bytes>,
    remaining: u64,
}

impl StalledBody {
    /// `sent` bytes of the pattern out of a declared `declared` (at least `sent`).
    pub(super) fn new(sent: u64, declared: u64) -> Self {
        let sent_len = usize::try_from(sent).unwrap_or(usize::MAX);
        StalledBody {
            head: (sent > 0).then(|| super::pattern_bytes(0, sent_len)),
            remaining: declared.max(sent),
        }
    }
}

/// The state of a streamed pattern body.
#[derive(Debug)]
pub(super) struct PatternStream {
    offset: u64,
    remaining: u64,
    chunk: usize,
    delay: Option<Duration>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl PatternStream {
    /// `len` bytes in chunks of `chunk` (at least 1), sleeping `delay` between chunks.
    pub(super) fn new(len: u64, chunk: usize, delay: Option<Duration>) -> Self {
        PatternStream {
            offset: 0,
            remaining: len,
            chunk: chunk.max(1),
            delay: delay.filter(|d| !d.is_zero()),
            sleep: None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ResponseBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseBody::Pattern(stream) => {
                if stream.remaining == 0 {
                    return Poll::Ready(None);
                }
                if let Some(sleep) = stream.sleep.as_mut() {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    stream.sleep = None;
                }
                let len = usize::try_from(stream.remaining)
                    .unwrap_or(usize::MAX)
                    .min(stream.chunk);
                let data = super::pattern_bytes(stream.offset, len);
                stream.offset += len as u64;
                stream.remaining -= len as u64;
                if stream.remaining > 0 {
                    stream.sleep = stream.delay.map(|d| Box::pin(tokio::time::sleep(d)));
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            ResponseBody::Stalled(stalled) => match stalled.head.take() {
                Some(data) => {
                    stalled.remaining -= data.len() as u64;
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                None => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(data) => data.is_none(),
            ResponseBody::Pattern(stream) => stream.remaining == 0,
            ResponseBody::Stalled(stalled) => stalled.remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseBody::Pattern(stream) => SizeHint::with_exact(stream.remaining),
            ResponseBody::Stalled(stalled) => SizeHint::with_exact(stalled.remaining),
        }
    }
}

/// The status a fault names; anything that is not a final status (200 to 599) becomes 500.
pub(super) fn fault_status(code: u16) -> StatusCode {
    StatusCode::from_u16(code)
        .ok()
        .filter(|status| (200..=599).contains(&status.as_u16()))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A JSON response with this status.
pub(super) fn json_response(
    status: StatusCode,
    body: &serde_json::Value,
) -> Response<ResponseBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(ResponseBody::Full(Some(Bytes::from(bytes))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Accepts connections until the task is aborted; a failed accept or handshake only ends that
/// connection.
pub(super) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    site: Site,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if let Site::Api(family) = site {
                        if let Ok(mut counts) = shared.connections.lock() {
                            *counts.entry(family).or_default() += 1;
                        }
                    }
                    connections.spawn(serve_connection(
                        stream,
                        tls.clone(),
                        builder.clone(),
                        shared.clone(),
                        site,
                    ));
                }
                Err(error) => {
                    tracing::debug!(%error, "emulator accept failed");
                    // Out of file descriptors and the like: give the system a moment.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    builder: Arc<Builder<TokioExecutor>>,
    shared: Arc<Shared>,
    site: Site,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| dispatch(shared.clone(), site, request));
    let result = match tls {
        None => {
            builder
                .serve_connection(TokioIo::new(stream), service)
                .await
        }
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    builder
                        .serve_connection(TokioIo::new(tls_stream), service)
                        .await
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, "emulator TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("emulator TLS handshake timed out");
                    return;
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "emulator connection ended with an error");
    }
}

async fn dispatch(
    shared: Arc<Shared>,
    site: Site,
    request: http::Request<Incoming>,
) -> Result<Response<ResponseBody>, ConnectionReset> {
    match site {
        Site::Auth => Ok(token::handle(&shared, request).await),
        Site::Api(family) => upstream::handle(&shared, family, request).await,
    }
}
