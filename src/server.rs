//! The client-facing listener: accept loop, connection limit, TLS, HTTP/1.1 + HTTP/2 (h2c prior
//! knowledge, or ALPN with TLS), the idle timeout, and the graceful drain.
//!
//! The protocol comes from ALPN, or for plain connections from a `peek` at the first bytes, and
//! the connection goes straight to hyper's HTTP/1 or HTTP/2 server; hyper-util's auto builder is
//! only the fallback for a split HTTP/2 preface. Peeking instead of reading ahead keeps hyper's
//! HTTP/1 read buffer at 8 KiB, and the request future and the TLS states are boxed, so an idle
//! HTTP/1.1 connection costs about 13 KiB instead of 26 (BENCHMARKS.md, finding 4).
//!
//! With several worker threads, the one that accepts a connection hands it to a less busy one
//! when the open connections are uneven (`Spread`).
//!
//! Each connection task watches three things: the connection itself, the drain signal, and its
//! idle deadline. On either of the last two it asks hyper for a graceful shutdown (HTTP/2 GOAWAY,
//! HTTP/1.1 close after the current response), so no request is cut by the idle timeout.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::ServerSettings;
use crate::proxy::{process_request, ConnInfo, PipelineStats};
use crate::runtime::Runtime;

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
    /// served start to end on one thread (like nginx's worker processes). Accepted connections
    /// are spread over the threads by their open connections (see `Spread`). The default: one
    /// per available core (`SITECORE_PROXY_WORKERS` overrides it in the binary).
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
    /// The open-connection gauges are not one per worker.
    #[error("{counters} open-connection gauges for {workers} workers")]
    Counters {
        /// Workers to start ([`Workers::pools`]).
        workers: usize,
        /// Gauges given.
        counters: usize,
    },
}

/// Starts serving `listener` as `workers` says, counting each worker's open connections in its
/// gauge of `open_connections` (one per worker, see [`Workers::pools`]). The returned task ends
/// when every accept loop has drained (after `shutdown`); `cut` ends the drain at once, cutting
/// what is left.
// Eight until the pipeline's runtime and stats become one request handler.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    listener: TcpListener,
    workers: Workers,
    runtime: Arc<ArcSwap<Runtime>>,
    stats: Arc<PipelineStats>,
    open_connections: Arc<[Gauge]>,
    settings: ListenerSettings,
    shutdown: watch::Receiver<bool>,
    cut: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, SpawnError> {
    if open_connections.len() != workers.pools() {
        return Err(SpawnError::Counters {
            workers: workers.pools(),
            counters: open_connections.len(),
        });
    }
    let serving = Serving::new(runtime, stats, open_connections, settings);
    let n = match workers {
        Workers::Inline => {
            return Ok(tokio::spawn(serve(listener, serving, shutdown, cut, None)));
        }
        Workers::Threads(n) => n.get(),
    };
    let open = &serving.open;
    let worker_error = |index| move |source| SpawnError::Worker { index, source };
    let listener = listener.into_std().map_err(worker_error(0))?;
    // One worker takes every connection it accepts: nothing to spread.
    let mut lanes = match n {
        1 => Vec::new(),
        _ => Spread::lanes(open, n),
    }
    .into_iter();
    let mut done = Vec::with_capacity(n);
    for index in 0..n {
        let listener = listener.try_clone().map_err(worker_error(index))?;
        let lane = lanes.next();
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
                        Ok(listener) => serve(listener, serving, shutdown, cut, lane).await,
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
    builders: Arc<Builders>,
    runtime: Arc<ArcSwap<Runtime>>,
    stats: Arc<PipelineStats>,
    /// Open connections per worker.
    open: Arc<[Gauge]>,
    settings: ListenerSettings,
    limit: Arc<Semaphore>,
}

impl Serving {
    fn new(
        runtime: Arc<ArcSwap<Runtime>>,
        stats: Arc<PipelineStats>,
        open: Arc<[Gauge]>,
        settings: ListenerSettings,
    ) -> Serving {
        Serving {
            builders: Arc::new(Builders::new(&settings)),
            runtime,
            stats,
            open,
            limit: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
        }
    }
}

/// Spreads the accepted connections over the worker threads. All of them accept on the shared
/// listening socket, and whichever wakes first could otherwise take a whole burst (a pool of
/// keep-alive clients connecting at once) and serve it on one core while the others idle. The
/// worker that accepts a connection keeps it unless it has at least two more open connections
/// than the least busy running worker; then it hands the connection to that one. The slack of
/// one keeps clients that connect for a single request from being handed back and forth. A
/// worker runs while its inbox is open: one that has stopped (draining, or it failed) has
/// closed it and is no longer picked.
struct Spread {
    /// Open connections per worker (the `proxy_open_connections` gauges), each counted from its
    /// placement until it ends.
    open: Arc<[Gauge]>,
    inboxes: Box<[mpsc::UnboundedSender<Arrival>]>,
}

/// What the accept loop woke up for.
enum Next {
    Accepted(std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)>),
    HandedOver(Arrival),
}

/// One worker's side of the [`Spread`]. Dropping it (the worker stopped or failed) takes the
/// worker out of the spread.
struct Lane {
    index: usize,
    spread: Arc<Spread>,
    inbox: mpsc::UnboundedReceiver<Arrival>,
}

/// A connection handed from the worker that accepted it to the one that serves it.
struct Arrival {
    /// Out of the accepting worker's reactor, to be registered with the serving worker's.
    stream: std::net::TcpStream,
    peer: std::net::SocketAddr,
    permit: OwnedSemaphorePermit,
    seat: Seat,
}

/// One open connection counted against the worker that serves it, until dropped.
struct Seat {
    open: Arc<[Gauge]>,
    worker: usize,
}

impl Seat {
    fn take(open: &Arc<[Gauge]>, worker: usize) -> Seat {
        open[worker].inc();
        Seat {
            open: Arc::clone(open),
            worker,
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.open[self.worker].dec();
    }
}

impl Spread {
    /// The lanes of `n` workers, in worker order, counting into `open` (one entry per worker).
    fn lanes(open: &Arc<[Gauge]>, n: usize) -> Vec<Lane> {
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let spread = Arc::new(Spread {
            open: Arc::clone(open),
            inboxes: inboxes.into_boxed_slice(),
        });
        receivers
            .into_iter()
            .enumerate()
            .map(|(index, inbox)| Lane {
                index,
                spread: Arc::clone(&spread),
                inbox,
            })
            .collect()
    }
}

impl Lane {
    /// Places a connection this worker accepted. Returns it with its seat if this worker is to
    /// serve it; `None` if it went to another worker, or was closed because it could not be
    /// moved between the workers' reactors (logged at debug level; the client sees a reset).
    fn place(
        &self,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Option<(tokio::net::TcpStream, OwnedSemaphorePermit, Seat)> {
        let Spread { open, inboxes } = &*self.spread;
        let mine = open[self.index].get();
        // The least busy running worker (the lowest index on a tie).
        let least = (0..open.len())
            .filter(|&w| w != self.index && !inboxes[w].is_closed())
            .map(|w| (open[w].get(), w))
            .min()
            .filter(|&(count, _)| mine > count + 1);
        let Some((_, to)) = least else {
            return Some((stream, permit, Seat::take(open, self.index)));
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot hand over a connection; closing it");
                return None;
            }
        };
        let arrival = Arrival {
            stream,
            peer,
            permit,
            seat: Seat::take(open, to),
        };
        // That worker stopped after it was picked: serve the connection here after all (its
        // seat there is dropped with the rest of the returned arrival).
        let Arrival { stream, permit, .. } = inboxes[to].send(arrival).err()?.0;
        match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => Some((stream, permit, Seat::take(open, self.index))),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot take back a connection; closing it");
                None
            }
        }
    }

    /// The next connection another worker handed to this one (never, without a lane).
    async fn next(lane: &mut Option<Lane>) -> Option<Arrival> {
        match lane {
            Some(lane) => lane.inbox.recv().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Lane {
    /// Takes this worker out of the spread (it stopped, or failed) and closes the connections
    /// handed to it that it has not taken yet, like those still in the listener's backlog.
    fn drop(&mut self) {
        self.inbox.close();
        // Dropping the receiver alone would leave a send that had begun in the channel, with
        // its permit and seat, until every worker is gone. After `close`, `try_recv` reports
        // `Empty` until such a send has landed (a few instructions away) and then
        // `Disconnected`.
        loop {
            match self.inbox.try_recv() {
                Ok(_) => {}
                Err(mpsc::error::TryRecvError::Empty) => std::hint::spin_loop(),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
    }
}

/// One accept loop: serves `listener` until `shutdown` turns true, then drains for up to the
/// grace period (or until `cut`) and cuts what is left. With a `lane` (one of several worker
/// threads), an accepted connection may go to a less busy worker (see [`Spread`]).
async fn serve(
    listener: TcpListener,
    serving: Serving,
    mut shutdown: watch::Receiver<bool>,
    mut cut: watch::Receiver<bool>,
    mut lane: Option<Lane>,
) {
    let Serving {
        builders,
        runtime,
        stats,
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
        let tls = runtime.load().tls.clone();
        let connection = Connection {
            builders: Arc::clone(&builders),
            runtime: Arc::clone(&runtime),
            stats: Arc::clone(&stats),
            shutdown: shutdown.clone(),
            idle_timeout: settings.idle_timeout,
            header_read_timeout: settings.header_read_timeout,
        };
        let handshake_timeout = settings.header_read_timeout;
        connections.spawn(async move {
            let _counted = (permit, seat);
            match tls {
                None => connection.serve_plain(stream, peer).await,
                // Boxed: the TLS states (handshake, rustls connection) are large, and the task
                // of every plain connection would otherwise be as large as theirs.
                Some(config) => {
                    Box::pin(async move {
                        let acceptor = tokio_rustls::TlsAcceptor::from(config);
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await
                        {
                            Ok(Ok(stream)) => {
                                let proto = match stream.get_ref().1.alpn_protocol() {
                                    Some(b"h2") => Proto::Http2,
                                    Some(b"http/1.1") => Proto::Http1,
                                    _ => Proto::Unsure,
                                };
                                let activity = Arc::new(ConnActivity::new());
                                let io = TokioIo::new(stream);
                                connection.serve(io, peer, true, proto, activity).await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    })
                    .await
                }
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

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol of a connection, from ALPN or its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
    /// Not known yet: hyper-util's auto builder reads the first bytes and decides.
    Unsure,
}

/// Peeks (does not read) the first bytes of a plain connection. HTTP/1 is served by hyper's own
/// HTTP/1 connection with nothing in front of it: the auto builder's read-ahead of the version
/// bytes makes hyper grow the connection's read buffer from 8 KiB to 16 KiB on the first
/// request, and that buffer is kept for the connection's life.
async fn sniff(stream: tokio::net::TcpStream) -> std::io::Result<(tokio::net::TcpStream, Proto)> {
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
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new(settings: &ListenerSettings) -> Builders {
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

/// What a connection task needs.
struct Connection {
    builders: Arc<Builders>,
    runtime: Arc<ArcSwap<Runtime>>,
    stats: Arc<PipelineStats>,
    shutdown: watch::Receiver<bool>,
    idle_timeout: Duration,
    header_read_timeout: Duration,
}

impl Connection {
    /// A plain connection: waits (within the first-request timeout) for its first bytes, then
    /// serves it.
    async fn serve_plain(mut self, stream: tokio::net::TcpStream, peer: std::net::SocketAddr) {
        let activity = Arc::new(ConnActivity::new());
        let first = activity.opened + self.header_read_timeout.min(self.idle_timeout);
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
        let runtime = self.runtime;
        let stats = self.stats;
        // The request future is boxed: hyper's HTTP/1 dispatcher keeps a slot the size of the
        // service future for the connection's life, and ours is several KiB.
        let service = service_fn(move |req| {
            let runtime = runtime.load_full();
            let stats = Arc::clone(&stats);
            let info = info.clone();
            let fut: std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<_, Infallible>> + Send>,
            > = Box::pin(process_request(runtime, stats, req, info));
            fut
        });
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

/// What watches a connection: its activity, the drain signal, and its idle deadline.
struct Watch {
    activity: Arc<ConnActivity>,
    shutdown: watch::Receiver<bool>,
    idle_timeout: Duration,
    header_read_timeout: Duration,
    peer: std::net::SocketAddr,
}

impl Watch {
    /// Drives `connection` until it ends, asking it to close gracefully on the drain or when
    /// idle. Not an `async fn`: with one, rustc cannot prove the spawned task `Send` (a
    /// higher-ranked lifetime error on the generic connection).
    #[allow(clippy::manual_async_fn)]
    fn drive<C>(
        mut self,
        mut connection: std::pin::Pin<&mut C>,
    ) -> impl std::future::Future<Output = ()> + Send + '_
    where
        C: hyper_util::server::graceful::GracefulConnection + Send,
        C::Error: std::fmt::Display,
    {
        async move {
            let (activity, peer) = (Arc::clone(&self.activity), self.peer);
            let mut closing = false;
            // After an idle close is requested, the peer gets this long to finish the goodbye
            // (HTTP/2 waits for the PING ack after GOAWAY); an unresponsive one is dropped.
            let mut hard_stop: Option<Instant> = None;
            // One timer, reset each round: the idle deadline, or the hard stop once closing.
            let mut timer = std::pin::pin!(tokio::time::sleep_until(Instant::now().into()));
            let side = Arc::new(SideWaker::default());
            let side_waker = std::task::Waker::from(Arc::clone(&side));
            loop {
                let wake = match hard_stop {
                    Some(t) => t,
                    // While a request runs (no deadline), re-check every second.
                    None => activity
                        .idle_deadline(self.idle_timeout, self.header_read_timeout)
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(1)),
                };
                timer.as_mut().reset(wake.into());
                let mut drain = std::pin::pin!(self.shutdown.wait_for(|stop| *stop));
                // The new round's drain wait and deadline are polled (registered) at once.
                side.fired.store(true, Ordering::Release);
                // The connection is polled on every wake-up, several per request. The drain
                // signal and the timer are polled only when their own waker has fired: polling
                // them on each of the connection's wake-ups cost about 0.9k instructions per
                // request (BENCHMARKS.md, "Instruction counts").
                let event = std::future::poll_fn(|cx| {
                    if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                        return Poll::Ready(WatchEvent::Ended(result));
                    }
                    side.task.register(cx.waker());
                    if !side.fired.swap(false, Ordering::AcqRel) {
                        return Poll::Pending;
                    }
                    let mut side_cx = Context::from_waker(&side_waker);
                    if !closing && drain.as_mut().poll(&mut side_cx).is_ready() {
                        return Poll::Ready(WatchEvent::Drain);
                    }
                    if (!closing || hard_stop.is_some())
                        && timer.as_mut().poll(&mut side_cx).is_ready()
                    {
                        return Poll::Ready(WatchEvent::Timer);
                    }
                    Poll::Pending
                })
                .await;
                match event {
                    WatchEvent::Ended(result) => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "client connection ended with an error");
                        }
                        return;
                    }
                    WatchEvent::Drain => {
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    WatchEvent::Timer => {
                        if let Some(t) = hard_stop {
                            if t <= Instant::now() {
                                tracing::debug!(%peer, "idle client did not close; dropping the connection");
                                return;
                            }
                            continue;
                        }
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
                }
            }
        }
    }
}

/// What ended a round of [`Watch::drive`].
enum WatchEvent<E> {
    /// The connection finished, with hyper's result.
    Ended(Result<(), E>),
    /// The drain signal.
    Drain,
    /// The timer: the idle deadline, the once-a-second re-check, or the hard stop.
    Timer,
}

/// The waker a connection's watch gives its drain wait and timer: it records that one of them
/// fired and wakes the connection's task, whose waker it keeps.
#[derive(Default)]
struct SideWaker {
    fired: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for SideWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Placed = (tokio::net::TcpStream, OwnedSemaphorePermit, Seat);

    /// Two workers' lanes, with a listener to accept real connections from.
    struct Two {
        listener: TcpListener,
        limit: Arc<Semaphore>,
        open: Arc<[Gauge]>,
        lane: Lane,
        /// Worker 1's lane, until it leaves.
        other: Option<Lane>,
    }

    impl Two {
        async fn new() -> Two {
            let open: Arc<[Gauge]> = (0..2).map(|_| Gauge::default()).collect();
            let mut lanes = Spread::lanes(&open, 2);
            let other = lanes.pop().expect("lane 1");
            let lane = lanes.pop().expect("lane 0");
            Two {
                listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                limit: Arc::new(Semaphore::new(100)),
                open,
                lane,
                other: Some(other),
            }
        }

        /// Accepts a connection as worker 0's accept loop would and places it; its peer too.
        async fn place(&self) -> (Option<Placed>, std::net::SocketAddr) {
            let addr = self.listener.local_addr().expect("addr");
            let (client, accepted) =
                tokio::join!(tokio::net::TcpStream::connect(addr), self.listener.accept());
            // The server side stays open without the client side.
            drop(client.expect("connect"));
            let (stream, peer) = accepted.expect("accept");
            let permit = Arc::clone(&self.limit).try_acquire_owned().expect("permit");
            (self.lane.place(stream, peer, permit), peer)
        }

        async fn keep(&self) -> Placed {
            self.place().await.0.expect("kept by worker 0")
        }

        fn counts(&self) -> [i64; 2] {
            [0, 1].map(|w| self.open[w].get())
        }
    }

    #[tokio::test]
    async fn a_worker_keeps_connections_until_it_has_two_more_than_the_least_busy() {
        let mut t = Two::new().await;
        let mut kept = vec![t.keep().await, t.keep().await];
        assert_eq!(t.counts(), [2, 0]);

        // Two ahead: the next one goes to worker 1, with its permit and its seat there.
        let (placed, peer) = t.place().await;
        assert!(placed.is_none(), "handed over");
        let other = t.other.as_mut().expect("lane 1");
        let arrival = other.inbox.recv().await.expect("arrival");
        assert_eq!((arrival.peer, arrival.seat.worker), (peer, 1));
        assert_eq!(t.counts(), [2, 1]);
        assert_eq!(t.limit.available_permits(), 97);
        drop(arrival);
        assert_eq!(t.counts(), [2, 0], "its seat went with it");
        assert_eq!(t.limit.available_permits(), 98, "and its permit");

        // A worker that leaves closes what was handed to it and not taken, and is no longer
        // picked, however idle it looks.
        assert!(t.place().await.0.is_none(), "handed over again");
        assert_eq!((t.counts(), t.limit.available_permits()), ([2, 1], 97));
        drop(t.other.take());
        assert_eq!((t.counts(), t.limit.available_permits()), ([2, 0], 98));
        for _ in 0..3 {
            kept.push(t.keep().await);
        }
        assert_eq!(t.counts(), [5, 0]);
        drop(kept);
        assert_eq!(t.counts(), [0, 0]);
        assert_eq!(t.limit.available_permits(), 100);
    }

    #[tokio::test]
    async fn a_worker_that_closed_its_inbox_is_not_picked_and_the_connection_stays() {
        let mut t = Two::new().await;
        let _kept = [t.keep().await, t.keep().await];
        // Worker 1 is stopping: its inbox is closed, though its lane is not dropped yet.
        t.other.as_mut().expect("lane 1").inbox.close();
        let (placed, _) = t.place().await;
        let (_stream, _permit, seat) = placed.expect("served here");
        assert_eq!(seat.worker, 0);
        assert_eq!(t.counts(), [3, 0]);
    }
}
