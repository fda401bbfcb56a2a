//! One exchange with the fleet, every `sync_interval`: this replica's heartbeat and rate-limit
//! demand go in, every live replica's come back. Two round trips whatever the request rate.
//!
//! Keys: `replicas` (a sorted set of names scored by their last heartbeat, in Unix ms),
//! `replica:NAME` (what the status page shows) and `demand:NAME` (requests per second offered
//! to each rate limiter), the last two expiring with the heartbeat.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Cluster, StoreError};

/// What the last exchange saw.
#[derive(Debug, Default, Clone)]
pub struct FleetView {
    /// When it was seen; `None` before the first exchange succeeded.
    pub at: Option<SystemTime>,
    /// The live replicas, this one included, by name.
    pub replicas: Vec<Peer>,
}

/// One live replica.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its name in the fleet.
    pub name: String,
    /// Unix ms of its last heartbeat.
    pub seen_ms: u64,
    /// What it says about itself (listen address, start time, version).
    pub info: Option<serde_json::Value>,
    /// Requests per second offered to each rate limiter, by limiter id.
    pub demand: BTreeMap<String, f64>,
}

impl Peer {
    /// Its row on the status page.
    pub fn describe(&self, own: &str) -> serde_json::Value {
        let age = unix_ms(SystemTime::now()).saturating_sub(self.seen_ms);
        let mut row = serde_json::json!({
            "name": self.name,
            "this": self.name == own,
            "heartbeat_age_ms": age,
        });
        if let (Some(row), Some(serde_json::Value::Object(info))) =
            (row.as_object_mut(), self.info.as_ref())
        {
            for (k, v) in info {
                row.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        row
    }
}

/// Sends this replica's heartbeat, `info` and `demand`; returns the live fleet.
pub(super) async fn exchange(
    cluster: &Cluster,
    info: &str,
    demand: &BTreeMap<String, f64>,
) -> Result<FleetView, StoreError> {
    let now = SystemTime::now();
    let now_ms = unix_ms(now);
    let ttl = cluster.heartbeat_ttl();
    let ttl_ms = ttl.as_millis() as u64;
    let own = cluster.replica();
    let replicas = cluster.key("replicas");
    let demand_json = serde_json::to_string(demand).unwrap_or_else(|_| "{}".to_owned());

    let mut pipe = redis::pipe();
    pipe.cmd("ZADD")
        .arg(&replicas)
        .arg(now_ms)
        .arg(own)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(&replicas)
        .arg("-inf")
        .arg(format!("({}", now_ms.saturating_sub(ttl_ms)))
        .ignore()
        .cmd("PEXPIRE")
        .arg(&replicas)
        .arg(ttl_ms * 4)
        .ignore()
        .cmd("SET")
        .arg(cluster.key(&format!("replica:{own}")))
        .arg(info)
        .arg("PX")
        .arg(ttl_ms)
        .ignore()
        .cmd("SET")
        .arg(cluster.key(&format!("demand:{own}")))
        .arg(&demand_json)
        .arg("PX")
        .arg(ttl_ms)
        .ignore()
        .cmd("ZRANGE")
        .arg(&replicas)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES");
    let (members,): (Vec<(String, f64)>,) = cluster.store().pipeline(&pipe).await?;

    let mut peers: Vec<Peer> = members
        .into_iter()
        .map(|(name, score)| Peer {
            name,
            seen_ms: score as u64,
            info: None,
            demand: BTreeMap::new(),
        })
        .collect();
    if !peers.iter().any(|p| p.name == own) {
        // Our own heartbeat was just written; a clock far behind the others' could have had it
        // trimmed. We are alive either way.
        peers.push(Peer {
            name: own.to_owned(),
            seen_ms: now_ms,
            info: None,
            demand: BTreeMap::new(),
        });
    }
    let mut mget = redis::cmd("MGET");
    for peer in &peers {
        mget.arg(cluster.key(&format!("replica:{}", peer.name)))
            .arg(cluster.key(&format!("demand:{}", peer.name)));
    }
    let values: Vec<Option<Vec<u8>>> = cluster.store().query(&mget).await?;
    for (peer, pair) in peers.iter_mut().zip(values.chunks(2)) {
        // Garbage in a peer's keys costs that peer its say, never this replica its service.
        peer.info = pair
            .first()
            .and_then(Option::as_deref)
            .and_then(|v| serde_json::from_slice(v).ok());
        peer.demand = pair
            .get(1)
            .and_then(Option::as_deref)
            .and_then(|v| serde_json::from_slice::<BTreeMap<String, f64>>(v).ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, d)| d.is_finite() && *d >= 0.0)
            .collect();
    }
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(FleetView {
        at: Some(now),
        replicas: peers,
    })
}

/// Tells the fleet this replica is leaving (at shutdown), so the others take over its share at
/// their next exchange rather than when its heartbeat expires.
pub(super) async fn leave(cluster: &Cluster) -> Result<(), StoreError> {
    let own = cluster.replica();
    let mut pipe = redis::pipe();
    pipe.cmd("ZREM")
        .arg(cluster.key("replicas"))
        .arg(own)
        .ignore()
        .cmd("DEL")
        .arg(cluster.key(&format!("replica:{own}")))
        .arg(cluster.key(&format!("demand:{own}")))
        .ignore();
    cluster.store().pipeline::<()>(&pipe).await
}

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}
