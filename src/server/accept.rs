//! One accept loop: accepting within the connection limit (the overload answer beyond it),
//! placing each connection on a worker, and the drain.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::connection::Connection;
use super::protocol::Builders;
use super::spread::{Arrival, Lane, Seat};
use super::workers::worker_index;
use super::{Handler, ListenerSettings};

/// Written to a connection beyond `max_connections` before it is closed.
const OVERLOADED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 83\r\n\r\n\
{\"error\":\"overloaded\",\"message\":\"The proxy is at its connection limit; retry later.\"}";

/// What every accept loop of one listener shares, including the connection limit.
pub(super) struct Serving<H> {
    builders: Arc<Builders>,
    handler: Arc<H>,
    /// Open connections per worker.
    pub(super) open: Arc<[Gauge]>,
    settings: ListenerSettings,
    limit: Arc<Semaphore>,
}

// Not derived: that would ask `H: Clone`.
impl<H> Clone for Serving<H> {
    fn clone(&self) -> Self {
        Serving {
            builders: Arc::clone(&self.builders),
            handler: Arc::clone(&self.handler),
            open: Arc::clone(&self.open),
            settings: self.settings.clone(),
            limit: Arc::clone(&self.limit),
        }
    }
}

impl<H> Serving<H> {
    pub(super) fn new(handler: Arc<H>, open: Arc<[Gauge]>, settings: ListenerSettings) -> Self {
        Serving {
            builders: Arc::new(Builders::new(&settings)),
            handler,
            open,
            limit: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
        }
    }
}

/// What the accept loop woke up for.
enum Next {
    Accepted(std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)>),
    HandedOver(Arrival),
}

/// One accept loop: serves `listener` until `shutdown` turns true, then drains for up to the
/// grace period (or until `cut`) and cuts what is left. With a `lane` (one of several worker
/// threads), an accepted connection may go to a less busy worker (see `Spread`).
pub(super) async fn serve<H: Handler>(
    listener: TcpListener,
    serving: Serving<H>,
    mut shutdown: watch::Receiver<bool>,
    mut cut: watch::Receiver<bool>,
    mut lane: Option<Lane>,
) {
    let Serving {
        builders,
        handler,
        open,
        settings,
        limit,
    } = serving;
    // Every connection task, so the drain can wait for them and cut what outlives the grace.
    let mut connections = JoinSet::new();

    // After a failed accept (EMFILE and friends), the next waits a little instead of spinning;
    // connections handed over meanwhile are still taken.
    let mut backoff = None;
    loop {
        backoff = backoff.filter(|&until| until > tokio::time::Instant::now());
        let next = tokio::select! {
            accepted = accept_after(&listener, backoff) => Next::Accepted(accepted),
            Some(arrival) = Lane::next(&mut lane) => Next::HandedOver(arrival),
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (stream, peer, permit, seat) = match next {
            Next::Accepted(Err(e)) => {
                tracing::warn!(error = %e, "accept failed");
                backoff = Some(tokio::time::Instant::now() + Duration::from_millis(50));
                continue;
            }
            Next::Accepted(Ok((mut stream, peer))) => {
                backoff = None;
                let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached; refusing connection");
                    connections.spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            let _ = stream.write_all(OVERLOADED_RESPONSE).await;
                            let _ = stream.shutdown().await;
                        })
                        .await;
                    });
                    continue;
                };
                let _ = stream.set_nodelay(true);
                match &lane {
                    // The only accept loop: counted as worker 0.
                    None => {
                        let seat = Seat::take(&open, 0);
                        (stream, peer, permit, seat)
                    }
                    Some(lane) => match lane.place(stream, peer, permit) {
                        Some((stream, permit, seat)) => (stream, peer, permit, seat),
                        None => continue,
                    },
                }
            }
            Next::HandedOver(Arrival {
                stream,
                peer,
                permit,
                seat,
            }) => match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => (stream, peer, permit, seat),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "cannot take over a connection");
                    continue;
                }
            },
        };
        let tls = handler.tls();
        let connection = Connection {
            builders: Arc::clone(&builders),
            handler: Arc::clone(&handler),
            shutdown: shutdown.clone(),
            idle_timeout: settings.idle_timeout,
            header_read_timeout: settings.header_read_timeout,
        };
        connections.spawn(async move {
            let _counted = (permit, seat);
            match tls {
                None => connection.serve_plain(stream, peer).await,
                // Boxed: the TLS states (handshake, rustls connection) are large, and the task
                // of every plain connection would otherwise be as large as theirs.
                Some(config) => Box::pin(connection.serve_tls(stream, peer, config)).await,
            }
        });
    }

    // Out of the spread before the drain; what was handed here and not taken is closed.
    drop(lane);
    // Stop accepting: the listener is dropped before the drain starts. Each connection has seen
    // the shutdown signal and is closing gracefully.
    drop(listener);
    let worker = worker_index();
    tracing::info!(
        worker,
        open_connections = connections.len(),
        grace_s = settings.shutdown_grace.as_secs(),
        "draining"
    );
    let drained = tokio::select! {
        drained = tokio::time::timeout(settings.shutdown_grace, async {
            while connections.join_next().await.is_some() {}
        }) => drained.is_ok(),
        _ = cut.wait_for(|cut| *cut) => false,
    };
    match drained {
        true => tracing::info!(worker, "drained"),
        false => {
            tracing::warn!(
                worker,
                open_connections = connections.len(),
                "shutdown grace elapsed; cutting the remaining connections and requests"
            );
            connections.shutdown().await;
        }
    }
}

/// Accepts a connection, after waiting until `backoff` if it is set.
async fn accept_after(
    listener: &TcpListener,
    backoff: Option<tokio::time::Instant>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    if let Some(until) = backoff {
        tokio::time::sleep_until(until).await;
    }
    listener.accept().await
}
