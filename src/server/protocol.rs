//! Which HTTP a connection speaks, and the hyper builders that serve each.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

use super::ListenerSettings;

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol of a connection, from ALPN or its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Proto {
    Http1,
    Http2,
    /// Not known yet: hyper-util's auto builder reads the first bytes and decides.
    Unsure,
}

/// Peeks (does not read) the first bytes of a plain connection. HTTP/1 is served by hyper's own
/// HTTP/1 connection with nothing in front of it: the auto builder's read-ahead of the version
/// bytes makes hyper grow the connection's read buffer from 8 KiB to 16 KiB on the first
/// request, and that buffer is kept for the connection's life.
pub(super) async fn sniff(
    stream: tokio::net::TcpStream,
) -> std::io::Result<(tokio::net::TcpStream, Proto)> {
    let mut buf = [0u8; 24];
    let n = stream.peek(&mut buf).await?;
    let proto = if n == 0 || buf[..n] != H2_PREFACE[..n] {
        // EOF (hyper sees it and ends quietly) or anything but the preface.
        Proto::Http1
    } else if n == H2_PREFACE.len() {
        Proto::Http2
    } else {
        // A split preface: peeking again would return at once with the same bytes.
        Proto::Unsure
    };
    Ok((stream, proto))
}

/// The connection builders, configured alike.
pub(super) struct Builders {
    pub(super) http1: hyper::server::conn::http1::Builder,
    pub(super) http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    pub(super) auto: auto::Builder<TokioExecutor>,
}

impl Builders {
    pub(super) fn new(settings: &ListenerSettings) -> Builders {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        // No hyper timer: it would box a new `Sleep` for every request head (hyper drops it
        // after each head). The connection's watch enforces `header_read_timeout` instead, with
        // its one timer per connection (see `Connection::serve`).
        http1
            .header_read_timeout(None::<Duration>)
            .keep_alive(true)
            .max_buf_size(64 * 1024)
            // A hard limit: `max_buf_size` alone is a soft one (one read may fill the buffer's
            // whole capacity, which grows past it), so a 100 KiB head could pass.
            .max_header_size(64 * 1024);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(64 * 1024)
            .max_concurrent_streams(256);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .keep_alive(true)
            .max_buf_size(64 * 1024);
        auto.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(64 * 1024)
            .max_concurrent_streams(256);
        Builders { http1, http2, auto }
    }
}
