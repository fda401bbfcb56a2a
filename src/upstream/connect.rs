//! Opening one upstream connection: DNS and TCP, TLS for HTTPS, then the HTTP/1.1 or HTTP/2
//! handshake. Each connection is then driven by its own task on the calling thread's runtime;
//! what to open, and what to keep, is the pool's business.

use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::UpstreamError;
use crate::egress::ProxyEndpoint;

/// HTTP/2 pings on shared upstream connections, and how long a ping may go unanswered.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// TCP keep-alive on upstream connections, so a pooled connection to a vanished host is found
/// dead by the kernel.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Resolves `host` and tries its addresses in order until one accepts, giving each an equal
/// share of the time left before `deadline`, so an address that drops SYNs does not use it all.
pub(super) async fn tcp_connect(
    host: &str,
    port: u16,
    deadline: tokio::time::Instant,
) -> Result<TcpStream, UpstreamError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| UpstreamError::Resolve {
            host: host.into(),
            source,
        })?
        .collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses");
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let share = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
        let attempt = tokio::time::timeout(share, TcpStream::connect(addr)).await;
        match attempt.unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())) {
            Ok(stream) => {
                // Both are best effort: a socket without them still works.
                let _ = stream.set_nodelay(true);
                let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
                let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(UpstreamError::Connect(last))
}

/// The longest `CONNECT` answer head read from an egress proxy.
const MAX_TUNNEL_HEAD: usize = 8 * 1024;

/// Opens a `CONNECT` tunnel to `host:port` through `proxy` on `tcp` (already connected to the
/// proxy). The bytes after it are the upstream's: TLS runs end to end through it.
pub(super) async fn tunnel(
    mut tcp: TcpStream,
    proxy: &ProxyEndpoint,
    host: &str,
    port: u16,
) -> Result<TcpStream, UpstreamError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let failed = |reason: String| UpstreamError::Egress {
        proxy: proxy.to_string(),
        reason,
    };
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(auth) = proxy.authorization() {
        head.push_str("Proxy-Authorization: ");
        head.push_str(auth.to_str().unwrap_or_default());
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes())
        .await
        .map_err(|e| failed(format!("the tunnel request could not be sent ({e})")))?;
    // The proxy answers with a head only: the upstream speaks after the client's TLS hello, so
    // nothing may follow the blank line yet.
    let mut answer = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    let end = loop {
        let n = tcp.read(&mut buf).await.map_err(|e| {
            failed(format!(
                "the connection broke while opening the tunnel ({e})"
            ))
        })?;
        if n == 0 {
            return Err(failed(
                "closed the connection instead of opening the tunnel".into(),
            ));
        }
        answer.extend_from_slice(&buf[..n]);
        if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if answer.len() > MAX_TUNNEL_HEAD {
            return Err(failed(
                "answered the tunnel request with an oversized head".into(),
            ));
        }
    };
    let status = std::str::from_utf8(&answer[..end])
        .ok()
        .and_then(|text| text.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(200..=299) if end == answer.len() => Ok(tcp),
        Some(200..=299) => Err(failed("sent data before the tunnel was used".into())),
        Some(407) => Err(failed(
            "refused the tunnel: proxy authentication required (407); check the user and \
             password in server.egress_proxy"
                .into(),
        )),
        Some(code) => Err(failed(format!("refused the tunnel with status {code}"))),
        None => Err(failed(
            "answered the tunnel request with something that is not HTTP".into(),
        )),
    }
}

/// The TLS handshake with `host` over `tcp`, offering the ALPN protocols `tls` lists.
pub(super) async fn tls_connect(
    tls: &Arc<rustls::ClientConfig>,
    host: &str,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>, UpstreamError> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| UpstreamError::ServerName(host.into()))?;
    tokio_rustls::TlsConnector::from(Arc::clone(tls))
        .connect(name, tcp)
        .await
        .map_err(UpstreamError::Tls)
}

/// The HTTP/1.1 handshake on `io`.
pub(super) async fn http1_handshake<T, B>(io: T) -> Result<http1::SendRequest<B>, UpstreamError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn Error + Send + Sync>>,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Handshake)?;
    drive(connection, "HTTP/1.1");
    Ok(sender)
}

/// The HTTP/2 handshake on `io`, for a connection that requests to one upstream share.
pub(super) async fn http2_handshake<T, B>(io: T) -> Result<http2::SendRequest<B>, UpstreamError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn Error + Send + Sync>>,
{
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Pings keep a shared connection's path open (and find it dead) between requests.
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::Handshake)?;
    drive(connection, "HTTP/2");
    Ok(sender)
}

/// Runs `connection` on its own task until it ends; how it ended is only worth a debug line,
/// since the request on it (if any) gets the error too.
fn drive<C>(connection: C, protocol: &'static str)
where
    C: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream {protocol} connection ended");
        }
    });
}
