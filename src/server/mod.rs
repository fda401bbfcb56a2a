//! The client-facing listener: accept loop, connection limit, TLS, HTTP/1.1 + HTTP/2 (h2c prior
//! knowledge, or ALPN with TLS), the idle timeout, and the graceful drain. It serves any
//! [`Handler`]: one tower `Service` per connection (the proxy's is `crate::pipeline::ProxyHandler`).
//!
//! The protocol comes from ALPN, or for plain connections from a `peek` at the first bytes, and
//! the connection goes straight to hyper's HTTP/1 or HTTP/2 server; hyper-util's auto builder is
//! only the fallback for a split HTTP/2 preface (`protocol`). Peeking instead of reading ahead
//! keeps hyper's HTTP/1 read buffer at 8 KiB, and the TLS states (and the proxy's request
//! future, see [`Handler::Service`]) are boxed, so an idle HTTP/1.1 connection costs about
//! 13 KiB instead of 26.
//!
//! With several worker threads (`workers`), the one that accepts a connection (`accept`)
//! hands it to a less busy one when the open connections are uneven (`spread`).
//!
//! Each connection task (`connection`) watches three things: the connection itself, the drain
//! signal, and its idle deadline (`watch`, from the connection's [`ConnActivity`]). On either of
//! the last two it asks hyper for a graceful shutdown (HTTP/2 GOAWAY, HTTP/1.1 close after the
//! current response), so no request is cut by the idle timeout.

mod accept;
mod activity;
mod connection;
mod handler;
mod protocol;
mod spread;
mod watch;
mod workers;

#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::config::ServerSettings;

pub use activity::{ConnActivity, ConnInfo};
pub use handler::{BoxError, Handler};
pub use workers::{spawn, worker_index, SpawnError, Workers};

/// Listener settings fixed for the life of the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSettings {
    /// Slowloris guard: time allowed to send a request's headers. For HTTP/1.1 it also bounds
    /// the idle time between requests: it runs from the end of one response to the next head.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed gracefully.
    pub idle_timeout: Duration,
    /// Open client connections allowed at once.
    pub max_connections: usize,
    /// How long in-flight requests may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
}

impl From<&ServerSettings> for ListenerSettings {
    fn from(s: &ServerSettings) -> Self {
        ListenerSettings {
            header_read_timeout: s.header_read_timeout,
            idle_timeout: s.idle_timeout,
            max_connections: s.max_connections,
            shutdown_grace: s.shutdown_grace,
        }
    }
}
