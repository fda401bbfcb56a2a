//! Fleet mode (`[cluster]`): replicas that act as one gateway by sharing state in Redis or
//! Valkey, without a Redis round trip on any request's path.
//!
//! - `store`: the connection, every operation bounded by `timeout`, and the health flag.
//! - `seal`: AES-GCM sealing of shared token entries under a key derived from the client secret.
//! - `tokens`: one credential's shared entry, refresh lease and forced-refresh budget (the token
//!   module drives them from its refresher).
//! - `fleet`: heartbeats and the exchange of rate-limit demand, once per `sync_interval`.
//! - `shares`: how a limit is divided between replicas, from their demand.
//! - `sync`: the background task that runs the exchange and sets every limiter's share.
//!
//! Redis down, slow or answering garbage: each replica keeps serving from its own token cache,
//! fetches its own tokens when they are due, and enforces each limit divided by the number of
//! replicas it last saw. Redis holds nothing the proxy cannot rebuild and no secret in clear.

mod fleet;
pub mod seal;
mod shares;
pub mod store;
mod sync;
pub mod tokens;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::config::ClusterSettings;
use crate::metrics::Metrics;
use crate::secret::Secret;
pub use fleet::{FleetView, Peer};
pub use store::{Store, StoreError};
pub use sync::RateLimiters;
pub use tokens::SharedTokens;

/// The process's membership of a fleet. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    settings: ClusterSettings,
    store: Store,
    /// This replica's name in the fleet: host, process and a random suffix.
    replica: String,
    started_at: SystemTime,
    /// What the last exchange saw (or the last good one, while Redis is down).
    fleet: ArcSwap<FleetView>,
}

impl Cluster {
    /// Joins the fleet described by `settings` (no I/O yet: the first exchange runs in the
    /// background task, so a replica starts whether or not Redis answers).
    pub fn new(
        settings: &ClusterSettings,
        extra_roots: &[CertificateDer<'static>],
        metrics: &Metrics,
    ) -> Result<Cluster, String> {
        let store = Store::new(settings, extra_roots, metrics.cluster())?;
        let replica = replica_name();
        tracing::info!(
            redis = %settings.shown_url,
            %replica,
            share_tokens = settings.share_tokens,
            sync_interval_ms = settings.sync_interval.as_millis() as u64,
            "cluster: joining the fleet"
        );
        Ok(Cluster(Arc::new(Inner {
            settings: settings.clone(),
            store,
            replica,
            started_at: SystemTime::now(),
            fleet: ArcSwap::from_pointee(FleetView::default()),
        })))
    }

    /// The settings it was started with (a reload cannot change them).
    pub fn settings(&self) -> &ClusterSettings {
        &self.0.settings
    }

    /// This replica's name in the fleet.
    pub fn replica(&self) -> &str {
        &self.0.replica
    }

    /// Whether Redis answered the last operation.
    pub fn is_up(&self) -> bool {
        self.0.store.is_up()
    }

    /// The connection.
    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// What the last exchange saw.
    pub fn fleet(&self) -> Arc<FleetView> {
        self.0.fleet.load_full()
    }

    /// The shared entry of an OAuth credential, or `None` with `share_tokens = false`.
    /// `identity` names what the token is for (endpoint, client, audience, parameters,
    /// verification); its digest is part of the key, so replicas only share an entry while
    /// their credential of that name asks for the same token.
    pub fn shared_tokens(
        &self,
        credential: &str,
        identity: &str,
        secret: &Secret,
    ) -> Option<SharedTokens> {
        if !self.0.settings.share_tokens {
            return None;
        }
        let digest = Sha256::digest(identity.as_bytes());
        let id = format!("{credential}:{}", hex::encode(&digest[..8]));
        Some(SharedTokens::new(
            self.clone(),
            &self.key(&format!("token:{id}")),
            &self.key(&format!("lease:{id}")),
            &self.key(&format!("forced:{id}")),
            secret,
        ))
    }

    /// `/status`'s `cluster` section: Redis health and the fleet's replicas. Never the URL's
    /// password.
    pub fn describe(&self) -> serde_json::Value {
        let fleet = self.fleet();
        let store = &self.0.store;
        serde_json::json!({
            "up": store.is_up(),
            "redis": self.0.settings.shown_url,
            "replica": self.0.replica,
            "replicas_seen": fleet.replicas.len().max(1),
            "last_sync": fleet.at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "last_error": store.last_error(),
            "share_tokens": self.0.settings.share_tokens,
            "sync_interval_ms": self.0.settings.sync_interval.as_millis() as u64,
            "replicas": fleet.replicas.iter().map(|p| p.describe(&self.0.replica)).collect::<Vec<_>>(),
        })
    }

    /// Starts the background exchange; it ends when `stop` turns true, after telling the fleet
    /// this replica left.
    pub fn spawn_sync(
        &self,
        limiters: RateLimiters,
        listen: String,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(sync::run(self.clone(), limiters, listen, stop))
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.0.settings.key_prefix)
    }

    /// How long a replica counts as alive after its last heartbeat.
    fn heartbeat_ttl(&self) -> Duration {
        (self.0.settings.sync_interval * 5).max(Duration::from_secs(1))
    }
}

/// `HOSTNAME` (a pod's name) or the machine's name, the process id, and a random suffix so two
/// processes in one network namespace never collide.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".to_owned());
    let suffix: u16 = rand::random();
    format!("{host}-{}-{suffix:04x}", std::process::id())
}
