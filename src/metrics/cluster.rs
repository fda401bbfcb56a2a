//! The fleet's metrics, exported only once `[cluster]` is set: without it there is no Redis to be
//! up or down, and a `cluster_up 0` would page someone for nothing.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `cluster_up` and `cluster_sync_errors_total`, in their own registry.
#[derive(Debug)]
pub struct ClusterMetrics {
    pub(super) registry: Registry,
    /// `cluster_up`: 1 while Redis answers within `timeout`, 0 otherwise.
    pub up: Gauge,
    /// `cluster_sync_errors_total`: Redis operations that failed or timed out.
    pub sync_errors: Counter,
}

impl ClusterMetrics {
    pub(super) fn new() -> ClusterMetrics {
        let mut registry = Registry::default();
        let up = Gauge::default();
        registry.register(
            "cluster_up",
            "Whether Redis, where replicas share state, answers within [cluster] timeout",
            up.clone(),
        );
        let sync_errors = Counter::default();
        registry.register(
            "cluster_sync_errors",
            "Redis operations of the fleet that failed or timed out",
            sync_errors.clone(),
        );
        ClusterMetrics {
            registry,
            up,
            sync_errors,
        }
    }
}
