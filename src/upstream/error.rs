//! Why a request could not reach its upstream or get an answer from it.

use std::time::Duration;

/// Why a request could not be sent or answered. The messages name the stage and never carry
/// request data.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// DNS resolution failed.
    #[error("could not resolve {host}")]
    Resolve {
        host: Box<str>,
        #[source]
        source: std::io::Error,
    },
    /// No address of the host accepted a TCP connection.
    #[error("tcp connect error")]
    Connect(#[source] std::io::Error),
    /// DNS plus TCP took longer than `server.connect_timeout`.
    #[error("connecting took longer than {0:?}")]
    ConnectTimeout(Duration),
    /// The TLS handshake failed (for example an untrusted certificate).
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    /// The host name is not a valid TLS server name.
    #[error("{0} is not a valid TLS server name")]
    ServerName(Box<str>),
    /// The HTTP handshake failed (HTTP/2 preface or settings).
    #[error("HTTP handshake failed")]
    Handshake(#[source] hyper::Error),
    /// The egress proxy could not be reached, or refused the tunnel or the request. Names the
    /// proxy (`http://host:port`, never its credentials).
    #[error("egress proxy {proxy}: {reason}")]
    Egress {
        /// The proxy, as `http://host:port`.
        proxy: String,
        /// What went wrong, in words safe to show a client.
        reason: String,
    },
    /// Sending the request or reading the response head failed.
    #[error("upstream request failed")]
    Send(#[source] hyper::Error),
}
