//! The state the proxy listener, the admin listener and reload share: the runtime currently
//! serving, the metrics, and the process's readiness.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;

use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::runtime::Runtime;

/// State shared by the listeners, the admin endpoints and reload.
#[derive(Debug)]
pub struct Shared {
    /// The runtime currently serving; swapped whole on reload.
    pub runtime: Arc<ArcSwap<Runtime>>,
    /// Prometheus families.
    pub metrics: Arc<Metrics>,
    /// Open client connections per worker: the server's `proxy_open_connections` gauges.
    pub(crate) open_connections: Arc<[Gauge]>,
    /// Set the moment shutdown begins (`/readyz` turns 503).
    pub shutting_down: AtomicBool,
    /// Process start.
    pub started_at: SystemTime,
    /// The proxy listener's bound address (the configured one may name port 0).
    pub listen_addr: SocketAddr,
    /// The fleet, with `[cluster]`.
    pub cluster: Option<Cluster>,
}

impl Shared {
    /// Open client connections, per worker thread (one entry when served inline).
    pub fn open_connections(&self) -> Vec<i64> {
        self.open_connections.iter().map(Gauge::get).collect()
    }

    /// Whether `/readyz` should answer 200, and if not, why. A replica is ready once every
    /// credential in use has been up since it was built; a credential that goes down later
    /// degrades only its own routes (every replica shares the token endpoint, so pulling them
    /// all would turn one credential's outage into an outage of every route), unless
    /// `[admin] ready_requires = "all_tokens"` asks for every credential to be up now.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if self.shutting_down.load(Ordering::Acquire) {
            reasons.push("shutting down".to_owned());
        }
        let runtime = self.runtime.load();
        let strict = runtime.config.ready_requires_all_tokens();
        for credential in runtime.credentials_by_name() {
            if strict || !credential.has_been_up() {
                reasons.extend(credential.down_reason());
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}
