//! The fleet's background task: every `sync_interval`, measure the demand on each rate limiter,
//! exchange it with the other replicas, and set each limiter's share. Requests never wait on it:
//! they read the share from the limiter, an atomic.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{fleet, shares, Cluster};
use crate::limits::RateLimiter;

/// Every rate limiter of the configuration in force, by a stable id (`client:NAME`,
/// `route:PREFIX`). Called once per exchange, so a reload's limiters are picked up.
pub type RateLimiters = Box<dyn Fn() -> Vec<(String, Arc<RateLimiter>)> + Send + Sync>;

/// How quickly the measured demand follows a change: about a second.
const DEMAND_TIME_CONSTANT: Duration = Duration::from_secs(1);

/// Demand below this (requests per second) is not published.
const MIN_DEMAND: f64 = 0.001;

pub(super) async fn run(
    cluster: Cluster,
    limiters: RateLimiters,
    listen: String,
    mut stop: watch::Receiver<bool>,
) {
    let info = serde_json::json!({
        "listen": listen,
        "started_at": humantime::format_rfc3339_seconds(cluster.0.started_at).to_string(),
        "version": env!("CARGO_PKG_VERSION"),
    })
    .to_string();
    let mut ticker = tokio::time::interval(cluster.settings().sync_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut demand = Demand::default();
    let mut replicas_seen = 1;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
        let current = limiters();
        let own = demand.measure(&current);
        match fleet::exchange(&cluster, &info, &own).await {
            Ok(view) => {
                replicas_seen = view.replicas.len().max(1);
                for (id, limiter) in &current {
                    let mine = own.get(id).copied().unwrap_or(0.0);
                    let all: Vec<f64> = view
                        .replicas
                        .iter()
                        .map(|peer| {
                            if peer.name == cluster.replica() {
                                mine
                            } else {
                                peer.demand.get(id).copied().unwrap_or(0.0)
                            }
                        })
                        .collect();
                    limiter.set_share(shares::share(mine, &all));
                }
                cluster.0.fleet.store(Arc::new(view));
            }
            Err(_) => {
                // The store logged the change and counted the error.
                let share = shares::fallback(replicas_seen);
                for (_, limiter) in &current {
                    limiter.set_share(share);
                }
            }
        }
    }
    if fleet::leave(&cluster).await.is_ok() {
        tracing::info!(replica = %cluster.replica(), "cluster: left the fleet");
    }
}

/// Requests per second offered to each limiter, smoothed over about a second.
#[derive(Debug, Default)]
struct Demand {
    /// The limiter's `offered` count at the last measurement.
    counts: HashMap<String, u64>,
    rates: HashMap<String, f64>,
    at: Option<Instant>,
}

impl Demand {
    /// Updates the rates from the limiters' counts; returns those worth publishing.
    fn measure(&mut self, limiters: &[(String, Arc<RateLimiter>)]) -> BTreeMap<String, f64> {
        let now = Instant::now();
        let elapsed = self
            .at
            .map_or(Duration::ZERO, |at| now.duration_since(at))
            .as_secs_f64();
        self.at = Some(now);
        let alpha = if elapsed > 0.0 {
            1.0 - (-elapsed / DEMAND_TIME_CONSTANT.as_secs_f64()).exp()
        } else {
            0.0
        };
        let mut counts = HashMap::with_capacity(limiters.len());
        let mut rates = HashMap::with_capacity(limiters.len());
        let mut published = BTreeMap::new();
        for (id, limiter) in limiters {
            let offered = limiter.offered();
            // A limiter rebuilt by a reload starts counting from zero.
            let delta = match self.counts.get(id) {
                Some(&before) if before <= offered => offered - before,
                Some(_) => offered,
                None => 0,
            };
            let observed = if elapsed > 0.0 {
                delta as f64 / elapsed
            } else {
                0.0
            };
            let previous = self.rates.get(id).copied().unwrap_or(observed);
            let rate = previous + alpha * (observed - previous);
            if rate >= MIN_DEMAND {
                published.insert(id.clone(), rate);
            }
            counts.insert(id.clone(), offered);
            rates.insert(id.clone(), rate);
        }
        self.counts = counts;
        self.rates = rates;
        published
    }
}
