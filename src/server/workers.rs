//! Where connections are served: inline on the caller's runtime, or on worker threads, each with
//! its own single-threaded runtime and accept loop; and which worker a thread is.

use std::cell::Cell;
use std::num::NonZeroUsize;
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::accept::{serve, Serving};
use super::spread::Spread;
use super::{Handler, ListenerSettings};

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

/// Starts serving `listener` with `handler` as `workers` says, counting each worker's open
/// connections in its gauge of `open_connections` (one per worker, see [`Workers::pools`]). The
/// returned task ends when every accept loop has drained (after `shutdown`); `cut` ends the
/// drain at once, cutting what is left.
pub fn spawn<H: Handler>(
    listener: TcpListener,
    workers: Workers,
    handler: Arc<H>,
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
    let serving = Serving::new(handler, open_connections, settings);
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
