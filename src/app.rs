//! Assembling and running the proxy: the entry point shared by `main`, tests and benchmarks.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::proxy::PipelineStats;
use crate::runtime::{BuildError, Runtime};
use crate::server::{self, ListenerSettings};
use crate::token::{OAuthCredential, Tuning};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The runtime could not be built from the configuration.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Options that are not part of `proxy.toml`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Token lifecycle timings (tests shorten them).
    pub tuning: Tuning,
}

/// A running proxy.
#[derive(Debug)]
pub struct RunningProxy {
    addr: SocketAddr,
    runtime: Arc<ArcSwap<Runtime>>,
    stats: Arc<PipelineStats>,
    shutdown: watch::Sender<bool>,
    refreshers: Vec<(Arc<OAuthCredential>, JoinHandle<()>)>,
    server: JoinHandle<()>,
}

/// Builds the runtime, binds the listener, starts one refresher per `oauth` credential (each
/// fetches its first token at once) and starts serving.
pub async fn start(config: Config, options: Options) -> Result<RunningProxy, StartError> {
    crate::install_crypto_providers();
    let config = Arc::new(config);
    let runtime = Runtime::build(Arc::clone(&config), &options.tuning, None)?;
    let addr = config.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let refreshers = runtime
        .oauth_credentials()
        .map(|c| {
            let task = tokio::spawn(Arc::clone(c).run_refresher(shutdown_rx.clone()));
            (Arc::clone(c), task)
        })
        .collect();
    let runtime = Arc::new(ArcSwap::from_pointee(runtime));
    let stats = Arc::new(PipelineStats::default());
    let server = tokio::spawn(server::serve(
        listener,
        Arc::clone(&runtime),
        Arc::clone(&stats),
        ListenerSettings::from(&config.server),
        shutdown_rx,
    ));
    tracing::info!(%addr, routes = config.routes.len(), "proxy listening");
    Ok(RunningProxy {
        addr,
        runtime,
        stats,
        shutdown,
        refreshers,
        server,
    })
}

impl RunningProxy {
    /// The bound address of the proxy listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The runtime currently serving.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Pipeline counters (in-flight gauge, requests, replays).
    pub fn stats(&self) -> &PipelineStats {
        &self.stats
    }

    /// The `oauth` credential of that name, for status and tests.
    pub fn credential(&self, name: &str) -> Option<Arc<OAuthCredential>> {
        self.refreshers
            .iter()
            .find(|(c, _)| c.name() == name)
            .map(|(c, _)| Arc::clone(c))
    }

    /// Begins the graceful shutdown: stop accepting, drain, stop refreshers.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits until the listener has drained (after [`RunningProxy::shutdown`]).
    pub async fn wait(mut self) {
        let _ = (&mut self.server).await;
        for (_, task) in &self.refreshers {
            task.abort();
        }
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        for (_, task) in &self.refreshers {
            task.abort();
        }
    }
}
