//! The client-facing listener: accept loop, connection limit, TLS, HTTP/1.1 + HTTP/2 (h2c prior
//! knowledge, or ALPN with TLS) through hyper-util's auto builder, the idle timeout, and the
//! graceful drain.
//!
//! Each connection task watches three things: the connection itself, the drain signal, and its
//! idle deadline. On either of the last two it asks hyper for a graceful shutdown (HTTP/2 GOAWAY,
//! HTTP/1.1 close after the current response), so no request is cut by the idle timeout.

use std::cell::Cell;
use std::convert::Infallible;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::ServerSettings;
use crate::proxy::{process_request, ConnInfo, PipelineStats};
use crate::runtime::Runtime;

/// Listener settings fixed for the life of the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSettings {
    /// Slowloris guard: time allowed to send a request's headers (for HTTP/1.1 also the idle
    /// time between requests, as hyper's timer runs while waiting for the next head).
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
    fn new() -> ConnActivity {
        ConnActivity {
            opened: Instant::now(),
            inflight: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(0),
            started: AtomicBool::new(false),
        }
    }

    /// A request started.
    pub fn begin(&self) {
        self.started.store(true, Ordering::Relaxed);
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the connection has ever started a request.
    fn has_started(&self) -> bool {
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
    fn idle_deadline(&self, idle: Duration, first_request: Duration) -> Option<Instant> {
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

/// How long an idle connection that was asked to close may take to do so.
const IDLE_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Written to a connection beyond `max_connections` before it is closed.
const OVERLOADED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 83\r\n\r\n\
{\"error\":\"overloaded\",\"message\":\"The proxy is at its connection limit; retry later.\"}";

/// Where the proxy listener's connections are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// On the caller's tokio runtime, as one task (embedding, and benchmarks that want the whole
    /// pipeline on one thread).
    Inline,
    /// On this many threads, each with its own single-threaded tokio runtime, its own accept
    /// loop on the shared listening socket and its own upstream connection pool, so a request is
    /// served start to end on one thread (like nginx's worker processes). The default: one per
    /// available core (`SITECORE_PROXY_WORKERS` overrides it in the binary).
    Threads(NonZeroUsize),
}

impl Default for Workers {
    fn default() -> Workers {
        Workers::Threads(std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))
    }
}

impl std::fmt::Display for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workers::Inline => f.write_str("inline"),
            Workers::Threads(n) => write!(f, "{n}"),
        }
    }
}

impl Workers {
    /// How many upstream connection pools a runtime needs: one per worker thread.
    pub fn pools(self) -> usize {
        match self {
            Workers::Inline => 1,
            Workers::Threads(n) => n.get(),
        }
    }
}

thread_local! {
    /// The index of the worker thread this is (0 off the worker threads).
    static WORKER_INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The index of the current worker thread, for picking its upstream pool (0 elsewhere).
pub fn worker_index() -> usize {
    WORKER_INDEX.with(Cell::get)
}

/// Why the listener could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A worker thread or its runtime could not be created.
    #[error("cannot start worker thread {index}")]
    Worker {
        /// Which worker.
        index: usize,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Starts serving `listener` as `workers` says. The returned task ends when every accept loop
/// has drained (after `shutdown`); `cut` ends the drain at once, cutting what is left.
pub fn spawn(
    listener: TcpListener,
    workers: Workers,
    runtime: Arc<ArcSwap<Runtime>>,
    stats: Arc<PipelineStats>,
    settings: ListenerSettings,
    shutdown: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, SpawnError> {
    let serving = Serving::new(runtime, stats, settings);
    let n = match workers {
        Workers::Inline => {
            return Ok(tokio::spawn(serve(listener, serving, shutdown, cut)));
        }
        Workers::Threads(n) => n.get(),
    };
    let worker_error = |index| move |source| SpawnError::Worker { index, source };
    let listener = listener.into_std().map_err(worker_error(0))?;
    let mut done = Vec::with_capacity(n);
    for index in 0..n {
        let listener = listener.try_clone().map_err(worker_error(index))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(crate::logging::flush_this_thread)
            .build()
            .map_err(worker_error(index))?;
        let (serving, shutdown, cut) = (serving.clone(), shutdown.clone(), cut.clone());
        let (finished, finished_rx) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("proxy-worker-{index}"))
            .spawn(move || {
                WORKER_INDEX.with(|w| w.set(index));
                crate::logging::batch_this_thread();
                rt.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, serving, shutdown, cut).await,
                        Err(e) => {
                            tracing::error!(worker = index, error = %e, "worker cannot listen")
                        }
                    }
                });
                // Connection tasks the drain cut, and pooled upstream connections, end here.
                drop(rt);
                crate::logging::flush_this_thread();
                let _ = finished.send(());
            })
            .map_err(worker_error(index))?;
        done.push(finished_rx);
    }
    Ok(tokio::spawn(async move {
        for finished in done {
            // A worker that panicked drops its sender: it is finished all the same.
            let _ = finished.await;
        }
    }))
}

/// What every accept loop of one listener shares, including the connection limit.
#[derive(Clone)]
struct Serving {
    builder: Arc<auto::Builder<TokioExecutor>>,
    runtime: Arc<ArcSwap<Runtime>>,
    stats: Arc<PipelineStats>,
    settings: ListenerSettings,
    limit: Arc<Semaphore>,
}

impl Serving {
    fn new(
        runtime: Arc<ArcSwap<Runtime>>,
        stats: Arc<PipelineStats>,
        settings: ListenerSettings,
    ) -> Serving {
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
        Serving {
            builder: Arc::new(builder),
            runtime,
            stats,
            limit: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
        }
    }
}

/// One accept loop: serves `listener` until `shutdown` turns true, then drains for up to the
/// grace period (or until `cut`) and cuts what is left.
async fn serve(
    listener: TcpListener,
    serving: Serving,
    mut shutdown: watch::Receiver<bool>,
    mut cut: watch::Receiver<bool>,
) {
    let Serving {
        builder,
        runtime,
        stats,
        settings,
        limit,
    } = serving;
    // Every connection task, so the drain can wait for them and cut what outlives the grace.
    let mut connections = JoinSet::new();

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
        let tls = runtime.load().tls.clone();
        let connection = Connection {
            builder: Arc::clone(&builder),
            runtime: Arc::clone(&runtime),
            stats: Arc::clone(&stats),
            shutdown: shutdown.clone(),
            idle_timeout: settings.idle_timeout,
            header_read_timeout: settings.header_read_timeout,
        };
        let handshake_timeout = settings.header_read_timeout;
        connections.spawn(async move {
            let _permit = permit;
            match tls {
                None => connection.serve(TokioIo::new(stream), peer, false).await,
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => connection.serve(TokioIo::new(stream), peer, true).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }

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
                inflight_requests = stats.inflight.load(Ordering::Relaxed),
                "shutdown grace elapsed; cutting the remaining connections and requests"
            );
            connections.shutdown().await;
        }
    }
}

/// What a connection task needs.
struct Connection {
    builder: Arc<auto::Builder<TokioExecutor>>,
    runtime: Arc<ArcSwap<Runtime>>,
    stats: Arc<PipelineStats>,
    shutdown: watch::Receiver<bool>,
    idle_timeout: Duration,
    header_read_timeout: Duration,
}

impl Connection {
    /// Serves one client connection (plain or TLS) until it closes, going idle or the drain
    /// closing it gracefully.
    async fn serve<I>(mut self, io: TokioIo<I>, peer: std::net::SocketAddr, tls: bool)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(ConnActivity::new());
        let info = ConnInfo {
            peer,
            tls,
            activity: Arc::clone(&activity),
        };
        let runtime = self.runtime;
        let stats = self.stats;
        let service = service_fn(move |req| {
            let runtime = runtime.load_full();
            let stats = Arc::clone(&stats);
            let info = info.clone();
            async move { Ok::<_, Infallible>(process_request(runtime, stats, req, info).await) }
        });
        let connection = self.builder.serve_connection(io, service).into_owned();
        tokio::pin!(connection);
        let mut closing = false;
        // After an idle close is requested, the peer gets this long to finish the goodbye
        // (HTTP/2 waits for the PING ack after GOAWAY); an unresponsive one is dropped.
        let mut hard_stop: Option<Instant> = None;
        loop {
            let deadline = activity.idle_deadline(self.idle_timeout, self.header_read_timeout);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "client connection ended with an error");
                    }
                    return;
                }
                _ = self.shutdown.wait_for(|stop| *stop), if !closing => {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
                _ = sleep_until_or_forever(deadline), if !closing => {
                    // Re-check: a request may have started since the deadline was computed.
                    let expired = activity
                        .idle_deadline(self.idle_timeout, self.header_read_timeout)
                        .is_some_and(|d| d <= Instant::now());
                    if expired && !activity.has_started() {
                        // Nothing to finish gracefully: a client that never sent a request.
                        tracing::debug!(%peer, "client sent no request in time; closing");
                        return;
                    }
                    if expired {
                        tracing::debug!(%peer, "closing idle client connection");
                        closing = true;
                        hard_stop = Some(Instant::now() + IDLE_CLOSE_WAIT);
                        connection.as_mut().graceful_shutdown();
                    }
                }
                _ = sleep_until_or_forever(hard_stop), if hard_stop.is_some() => {
                    if hard_stop.is_some_and(|t| t <= Instant::now()) {
                        tracing::debug!(%peer, "idle client did not close; dropping the connection");
                        return;
                    }
                }
            }
        }
    }
}

/// Sleeps until `deadline`, or, while a request runs (`None`), re-checks every second.
async fn sleep_until_or_forever(deadline: Option<Instant>) {
    let until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
    tokio::time::sleep_until(until.into()).await;
}
