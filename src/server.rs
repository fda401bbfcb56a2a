//! The client-facing listener: accept loop, connection limit, HTTP/1.1 + HTTP/2 (h2c prior
//! knowledge) through hyper-util's auto builder, and the graceful drain.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::ServerSettings;
use crate::proxy::{process_request, ConnInfo, PipelineStats};
use crate::runtime::Runtime;

/// Listener settings fixed for the life of the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSettings {
    /// Slowloris guard: time allowed to send a request's headers.
    pub header_read_timeout: Duration,
    /// Open client connections allowed at once.
    pub max_connections: usize,
    /// How long in-flight requests may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
}

impl From<&ServerSettings> for ListenerSettings {
    fn from(s: &ServerSettings) -> Self {
        ListenerSettings {
            header_read_timeout: s.header_read_timeout,
            max_connections: s.max_connections,
            shutdown_grace: s.shutdown_grace,
        }
    }
}

/// Written to a connection beyond `max_connections` before it is closed.
const OVERLOADED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 83\r\n\r\n\
{\"error\":\"overloaded\",\"message\":\"The proxy is at its connection limit; retry later.\"}";

/// Serves one client connection (plain or TLS) until it closes or the drain ends it.
async fn serve_one<I>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: TokioIo<I>,
    runtime: Arc<ArcSwap<Runtime>>,
    stats: Arc<PipelineStats>,
    info: ConnInfo,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let runtime = runtime.load_full();
        let stats = Arc::clone(&stats);
        async move { Ok::<_, Infallible>(process_request(runtime, stats, req, info).await) }
    });
    let connection = watcher.watch(builder.serve_connection(io, service).into_owned());
    if let Err(e) = connection.await {
        tracing::debug!(peer = %info.peer, error = %e, "client connection ended with an error");
    }
}

/// Serves `listener` until `shutdown` turns true, then drains for up to the grace period.
pub async fn serve(
    listener: TcpListener,
    runtime: Arc<ArcSwap<Runtime>>,
    stats: Arc<PipelineStats>,
    settings: ListenerSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(64 * 1024)
        .max_concurrent_streams(256);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(settings.max_connections));

    // Every connection task, so what outlives the grace can be cut.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (mut stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; refusing connection");
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = stream.write_all(OVERLOADED_RESPONSE).await;
                    let _ = stream.shutdown().await;
                })
                .await;
            });
            continue;
        };
        let _ = stream.set_nodelay(true);
        let current = runtime.load_full();
        let tls = current.tls.clone();
        drop(current);
        let runtime = Arc::clone(&runtime);
        let stats = Arc::clone(&stats);
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let handshake_timeout = settings.header_read_timeout;
        connections.spawn(async move {
            let _permit = permit;
            match tls {
                None => {
                    let info = ConnInfo { peer, tls: false };
                    serve_one(
                        &builder,
                        watcher,
                        TokioIo::new(stream),
                        runtime,
                        stats,
                        info,
                    )
                    .await;
                }
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    let stream = match tokio::time::timeout(
                        handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let info = ConnInfo { peer, tls: true };
                    serve_one(
                        &builder,
                        watcher,
                        TokioIo::new(stream),
                        runtime,
                        stats,
                        info,
                    )
                    .await;
                }
            }
        });
    }

    // Stop accepting: the listener is dropped before the drain starts.
    drop(listener);
    let open = graceful.count();
    tracing::info!(
        open_connections = open,
        grace_s = settings.shutdown_grace.as_secs(),
        "draining"
    );
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("drained"),
        _ = tokio::time::sleep(settings.shutdown_grace) => {
            tracing::warn!(
                inflight_requests = stats.inflight.load(std::sync::atomic::Ordering::Relaxed),
                "shutdown grace elapsed; cutting the remaining connections and requests"
            );
        }
    }
    connections.shutdown().await;
}
