//! Assembling and running the proxy: the entry point shared by `main`, tests and benchmarks.
//! Also owns the operations: reload (swap the whole `Runtime`), readiness, and the drain.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::Cluster;
use crate::config::{Config, ConfigError};
use crate::credential::Credential;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::pipeline::ProxyHandler;
use crate::runtime::{BuildError, Runtime, Services};
use crate::server::{self, ListenerSettings, Workers};
use crate::shared::Shared;
use crate::telemetry::{Telemetry, TelemetryError};
use crate::token::{OAuthCredential, Tuning};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The runtime could not be built from the configuration.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The worker threads could not be started.
    #[error(transparent)]
    Spawn(#[from] server::SpawnError),
    /// Tracing could not be set up.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// The `[cluster]` client could not be set up (a URL it cannot use).
    #[error("{0}")]
    Cluster(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Why a reload was refused; the old configuration keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The new configuration is valid but could not be built (TLS material, header values).
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Options that are not part of `proxy.toml`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Token lifecycle timings (tests shorten them).
    pub tuning: Tuning,
    /// Where client connections are served (default: one worker thread per core).
    pub workers: Workers,
}

/// The credentials' background tasks (token refreshers), one per credential, kept across reloads
/// for the credentials a reload keeps.
#[derive(Debug)]
struct Refreshers {
    tasks: Mutex<Vec<(Arc<Credential>, JoinHandle<()>)>>,
    stop: watch::Receiver<bool>,
}

impl Refreshers {
    /// Starts the background task (token refresher) of every credential of `runtime` that has
    /// none, and stops those whose credential is gone. Credentials a reload kept keep theirs.
    fn sync(&self, runtime: &Runtime) {
        let Ok(mut refreshers) = self.tasks.lock() else {
            return;
        };
        let wanted: Vec<&Arc<Credential>> = runtime.credentials.values().collect();
        refreshers.retain(|(credential, task)| {
            let keep = wanted.iter().any(|w| Arc::ptr_eq(w, credential));
            if !keep {
                task.abort();
            }
            keep
        });
        for credential in wanted {
            if refreshers.iter().any(|(c, _)| Arc::ptr_eq(c, credential)) {
                continue;
            }
            if let Some(task) = credential.background(self.stop.clone()) {
                refreshers.push((Arc::clone(credential), tokio::spawn(task)));
            }
        }
    }

    fn stop(&self) {
        if let Ok(refreshers) = self.tasks.lock() {
            for (_, task) in refreshers.iter() {
                task.abort();
            }
        }
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct RunningProxy {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    tuning: Tuning,
    workers: Workers,
    refreshers: Refreshers,
    /// The tracer and the fleet, as set at start (they change only on restart).
    services: Services,
    /// The fleet's background exchange, with `[cluster]`.
    fleet_sync: Option<JoinHandle<()>>,
    /// Reloads run one at a time.
    reload_lock: tokio::sync::Mutex<()>,
    shutdown: watch::Sender<bool>,
    /// Ends the drain at once (on drop).
    cut: watch::Sender<bool>,
    admin_stop: watch::Sender<bool>,
    refresher_stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    admin: Option<JoinHandle<()>>,
}

/// Builds the runtime, binds the listeners, starts one refresher per `oauth` credential (each
/// fetches its first token at once) and starts serving; with `[telemetry]`, starts tracing
/// first, so the first token fetches are traced too.
pub async fn start(config: Config, options: Options) -> Result<RunningProxy, StartError> {
    crate::install_crypto_providers();
    let metrics = Arc::new(Metrics::new());
    let config = Arc::new(config);
    let telemetry = match &config.telemetry {
        Some(settings) => Some(Telemetry::start(settings, &config.server, &metrics)?),
        None => None,
    };
    let cluster = match &config.cluster {
        Some(settings) => Some(
            Cluster::new(settings, &config.server.upstream_ca, &metrics)
                .map_err(StartError::Cluster)?,
        ),
        None => None,
    };
    let services = Services { telemetry, cluster };
    let runtime = Runtime::build(
        Arc::clone(&config),
        &options.tuning,
        &metrics,
        None,
        options.workers.pools(),
        &services,
    )?;
    let listener = bind(config.server.listen).await?;
    let addr = local_addr(&listener, config.server.listen)?;
    let admin_listener = match &config.admin {
        Some(admin) => Some(bind(admin.listen).await?),
        None => None,
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    let (refresher_stop, refresher_stop_rx) = watch::channel(false);
    let open_connections = metrics.worker_connections(options.workers.pools());
    let shared = Arc::new(Shared {
        runtime: Arc::new(ArcSwap::from_pointee(runtime)),
        metrics,
        open_connections: Arc::clone(&open_connections),
        shutting_down: AtomicBool::new(false),
        started_at: SystemTime::now(),
        listen_addr: addr,
        cluster: services.cluster.clone(),
    });
    // The fleet's exchange runs beside the refreshers and stops with them.
    let fleet_sync = services.cluster.as_ref().map(|cluster| {
        let runtime = Arc::clone(&shared.runtime);
        cluster.spawn_sync(
            Box::new(move || runtime.load().limits.rate_limiters()),
            addr.to_string(),
            refresher_stop_rx.clone(),
        )
    });
    let refreshers = Refreshers {
        tasks: Mutex::new(Vec::new()),
        stop: refresher_stop_rx,
    };
    refreshers.sync(&shared.runtime.load());

    let (admin_addr, admin) = match admin_listener {
        Some(listener) => {
            let admin_addr = local_addr(&listener, listener.local_addr().ok().unwrap_or(addr))?;
            let task = tokio::spawn(crate::admin::serve(
                listener,
                Arc::clone(&shared),
                admin_stop_rx,
            ));
            tracing::info!(addr = %admin_addr, "admin listening");
            (Some(admin_addr), Some(task))
        }
        None => (None, None),
    };
    let (cut, cut_rx) = watch::channel(false);
    let server = server::spawn(
        listener,
        options.workers,
        Arc::new(ProxyHandler::new(Arc::clone(&shared.runtime))),
        open_connections,
        ListenerSettings::from(&config.server),
        shutdown_rx,
        cut_rx,
    )?;
    tracing::info!(
        %addr,
        routes = config.routes.len(),
        tls = config.server.tls.is_some(),
        workers = %options.workers,
        "proxy listening"
    );
    Ok(RunningProxy {
        addr,
        admin_addr,
        shared,
        tuning: options.tuning,
        workers: options.workers,
        refreshers,
        services,
        fleet_sync,
        reload_lock: tokio::sync::Mutex::new(()),
        shutdown,
        cut,
        admin_stop,
        refresher_stop,
        server,
        admin,
    })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })
}

impl RunningProxy {
    /// The bound address of the proxy listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound address of the admin listener, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The runtime currently serving.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.shared.runtime.load_full()
    }

    /// Where client connections are served.
    pub fn workers(&self) -> Workers {
        self.workers
    }

    /// Shared state (metrics, readiness).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The process's metrics (in-flight requests, replays, token counters, ...).
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Open client connections, per worker thread (one entry when served inline).
    pub fn open_connections(&self) -> Vec<i64> {
        self.shared.open_connections()
    }

    /// The `oauth` credential of that name in the current runtime.
    pub fn credential(&self, name: &str) -> Option<Arc<OAuthCredential>> {
        self.runtime().credential(name)?.oauth().cloned()
    }

    /// Swaps in a new configuration atomically: requests in flight finish on the old runtime,
    /// new ones use the new one. Credentials whose settings did not change keep their tokens.
    /// The listen addresses and listener limits are fixed at start; changing them needs a
    /// restart (logged).
    pub async fn reload(&self, config: Config) -> Result<(), ReloadError> {
        let _serialised = self.reload_lock.lock().await;
        let current = self.shared.runtime.load_full();
        let result = Runtime::build(
            Arc::new(config),
            &self.tuning,
            &self.shared.metrics,
            Some(&current),
            self.workers.pools(),
            &self.services,
        );
        let runtime = match result {
            Ok(r) => r,
            Err(e) => {
                self.count_reload("error");
                return Err(e.into());
            }
        };
        let (old, new) = (&current.config, &runtime.config);
        if old.server.listen != new.server.listen
            || old.admin.as_ref().map(|a| a.listen) != new.admin.as_ref().map(|a| a.listen)
            || ListenerSettings::from(&old.server) != ListenerSettings::from(&new.server)
        {
            tracing::warn!("listen addresses and listener limits change only on restart");
        }
        if old.telemetry != new.telemetry {
            tracing::warn!("[telemetry] changes only on restart");
        }
        if old.cluster != new.cluster {
            tracing::warn!("[cluster] changes only on restart");
        }
        let runtime = Arc::new(runtime);
        self.shared.runtime.store(Arc::clone(&runtime));
        self.refreshers.sync(&runtime);
        self.count_reload("success");
        tracing::info!(
            routes = runtime.config.routes.len(),
            "configuration reloaded"
        );
        Ok(())
    }

    /// Re-reads `path` (and every file it names) and reloads; an invalid file is refused and
    /// counted, and the old configuration keeps serving.
    pub async fn reload_from(&self, path: &Path) -> Result<(), ReloadError> {
        match Config::load(path) {
            Ok(config) => self.reload(config).await,
            Err(e) => {
                self.count_reload("error");
                Err(e.into())
            }
        }
    }

    fn count_reload(&self, outcome: &'static str) {
        self.shared
            .metrics
            .config_reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Begins the graceful shutdown: `/readyz` turns 503 at once, the listener stops accepting,
    /// in-flight requests drain for up to `shutdown_grace`.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::Release);
        self.shutdown.send_replace(true);
    }

    /// Waits until the listener has drained (after [`RunningProxy::shutdown`]), then stops the
    /// refreshers and the admin listener, and exports the last spans (waiting at most
    /// [`FLUSH_TIMEOUT`](crate::telemetry::FLUSH_TIMEOUT), or `shutdown_grace` if shorter).
    pub async fn wait(mut self) {
        let _ = (&mut self.server).await;
        self.refresher_stop.send_replace(true);
        self.refreshers.stop();
        self.admin_stop.send_replace(true);
        if let Some(admin) = self.admin.take() {
            let _ = admin.await;
        }
        // The exchange tells the fleet this replica left (bounded by [cluster] timeout).
        if let Some(sync) = self.fleet_sync.take() {
            let _ = sync.await;
        }
        if let Some(telemetry) = &self.services.telemetry {
            let grace = self.shared.runtime.load().config.server.shutdown_grace;
            telemetry
                .shutdown(crate::telemetry::FLUSH_TIMEOUT.min(grace))
                .await;
        }
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        self.cut.send_replace(true);
        self.refresher_stop.send_replace(true);
        self.admin_stop.send_replace(true);
        self.refreshers.stop();
        self.server.abort();
        if let Some(admin) = &self.admin {
            admin.abort();
        }
        // The fleet's exchange, if still running, sees the stop signal and leaves on its own.
        if let Some(telemetry) = &self.services.telemetry {
            telemetry.shutdown_in_background();
        }
    }
}
