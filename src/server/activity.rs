//! What the server knows about one client connection, and hands to the request handler with it:
//! its peer, whether it is TLS, and its request activity, which decides its idle deadline.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per-connection facts the request handler gets with each new connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the client connected over TLS.
    pub tls: bool,
    /// The connection's activity, for its idle deadline: the handler calls
    /// [`ConnActivity::begin`] when a request starts and [`ConnActivity::end`] when its response
    /// has finished (or was abandoned).
    pub activity: Arc<ConnActivity>,
}

/// What one client connection is doing, for its idle deadline.
#[derive(Debug)]
pub struct ConnActivity {
    opened: Instant,
    /// Requests on this connection whose responses have not finished.
    inflight: AtomicUsize,
    /// Milliseconds after `opened` at which the last request finished.
    last_done_ms: AtomicU64,
    /// Whether any request has started (before that, the header-read timeout applies).
    started: AtomicBool,
}

impl ConnActivity {
    pub(crate) fn new() -> ConnActivity {
        ConnActivity {
            opened: Instant::now(),
            inflight: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(0),
            started: AtomicBool::new(false),
        }
    }

    /// When the connection was opened.
    pub(super) fn opened(&self) -> Instant {
        self.opened
    }

    /// A request started.
    pub fn begin(&self) {
        self.started.store(true, Ordering::Relaxed);
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the connection has ever started a request.
    pub(super) fn has_started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// A response finished (or was abandoned).
    pub fn end(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_done_ms.store(ms, Ordering::Relaxed);
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }

    /// When the connection becomes idle if nothing happens, or `None` while a request runs.
    /// Before its first request a connection gets `first_request` (the header-read timeout:
    /// hyper's own timer does not cover the protocol detection of the first bytes).
    pub(super) fn idle_deadline(&self, idle: Duration, first_request: Duration) -> Option<Instant> {
        if !self.has_started() {
            return Some(self.opened + first_request.min(idle));
        }
        if self.inflight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_done_ms.load(Ordering::Relaxed));
        Some(self.opened + last + idle)
    }
}
