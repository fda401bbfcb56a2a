//! Serving one client connection: the TLS handshake or the protocol sniff, then hyper's
//! connection for its protocol, driven by the connection's watch.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;

use super::activity::{ConnActivity, ConnInfo};
use super::protocol::{sniff, Builders, Proto};
use super::watch::Watch;
use super::Handler;

/// What a connection task needs.
pub(super) struct Connection<H> {
    pub(super) builders: Arc<Builders>,
    pub(super) handler: Arc<H>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) idle_timeout: Duration,
    pub(super) header_read_timeout: Duration,
}

impl<H: Handler> Connection<H> {
    /// A plain connection: waits (within the first-request timeout) for its first bytes, then
    /// serves it.
    pub(super) async fn serve_plain(
        mut self,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
    ) {
        let activity = Arc::new(ConnActivity::new());
        let first = activity.opened() + self.header_read_timeout.min(self.idle_timeout);
        let (stream, proto) = tokio::select! {
            sniffed = sniff(stream) => match sniffed {
                Ok(sniffed) => sniffed,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "client connection failed");
                    return;
                }
            },
            _ = tokio::time::sleep_until(first.into()) => {
                tracing::debug!(%peer, "client sent no request in time; closing");
                return;
            }
            _ = self.shutdown.wait_for(|stop| *stop) => return,
        };
        self.serve(TokioIo::new(stream), peer, false, proto, activity)
            .await
    }

    /// A TLS connection: the handshake (within the header-read timeout), then serves it in the
    /// protocol ALPN chose. Not an `async fn`: one would store its arguments twice in the future
    /// (as they came, and in the locals its body works on), and the future is allocated per TLS
    /// connection.
    #[allow(clippy::manual_async_fn)]
    pub(super) fn serve_tls(
        self,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
        config: Arc<rustls::ServerConfig>,
    ) -> impl Future<Output = ()> + Send {
        async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let handshake = acceptor.accept(stream);
            match tokio::time::timeout(self.header_read_timeout, handshake).await {
                Ok(Ok(stream)) => {
                    let proto = match stream.get_ref().1.alpn_protocol() {
                        Some(b"h2") => Proto::Http2,
                        Some(b"http/1.1") => Proto::Http1,
                        _ => Proto::Unsure,
                    };
                    let activity = Arc::new(ConnActivity::new());
                    let io = TokioIo::new(stream);
                    self.serve(io, peer, true, proto, activity).await
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }

    /// Serves one client connection (plain or TLS) until it closes, going idle or the drain
    /// closing it gracefully.
    async fn serve<I>(
        self,
        io: TokioIo<I>,
        peer: std::net::SocketAddr,
        tls: bool,
        proto: Proto,
        activity: Arc<ConnActivity>,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let info = ConnInfo {
            peer,
            tls,
            activity: Arc::clone(&activity),
        };
        let service = TowerToHyperService::new(self.handler.connection(info));
        let watch = Watch {
            activity,
            shutdown: self.shutdown,
            // Plain HTTP/1.1: the watch also enforces the header-read timeout between requests
            // (hyper's own timer is off there, see `Builders::new`), so a kept-alive client has
            // `header_read_timeout` to send its next head, and the idle close comes no later.
            idle_timeout: match proto {
                Proto::Http1 => self.idle_timeout.min(self.header_read_timeout),
                Proto::Http2 | Proto::Unsure => self.idle_timeout,
            },
            header_read_timeout: self.header_read_timeout,
            peer,
        };
        let builders = &*self.builders;
        // Each connection is pinned here and driven by reference: a connection moved into
        // `drive` by value would be stored twice in the task (argument and pinned local).
        match proto {
            Proto::Http1 => {
                let connection = std::pin::pin!(builders.http1.serve_connection(io, service));
                watch.drive(connection).await
            }
            // Boxed, so the task of every HTTP/1 connection is not as large as these.
            Proto::Http2 => {
                let mut connection = Box::pin(builders.http2.serve_connection(io, service));
                watch.drive(connection.as_mut()).await
            }
            Proto::Unsure => {
                let mut connection = Box::pin(builders.auto.serve_connection(io, service));
                watch.drive(connection.as_mut()).await
            }
        }
    }
}
