//! One exchange with the fleet, every `sync_interval`: this replica's heartbeat and rate-limit
//! demand go in, every live replica's come back. Two round trips whatever the request rate.
//!
//! Keys: `replicas` (a sorted set of names scored by their last heartbeat, in Redis's own Unix
//! ms, so replicas whose clocks disagree still agree on who is alive), `replica:NAME` (what the
//! status page shows) and `demand:NAME` (requests per second offered to each rate limiter), the
//! last two expiring with the heartbeat.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::SystemTime;

use redis::Script;

use super::{Cluster, StoreError};

/// The heartbeat, on Redis's clock: add this replica, drop those silent for longer than the
/// time to live, store this replica's info and demand, return Redis's time and the members.
const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], string.format('%.0f', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now - ttl))
redis.call('PEXPIRE', KEYS[1], ttl * 4)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
redis.call('SET', KEYS[3], ARGV[3], 'PX', ttl)
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
table.insert(members, 1, string.format('%.0f', now))
return members
";

/// Its digest is computed once: the script runs every `sync_interval`.
static HEARTBEAT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(HEARTBEAT));

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
    /// How long before the exchange its last heartbeat was, in ms of Redis's clock.
    pub age_ms: u64,
    /// What it says about itself (listen address, start time, version).
    pub info: Option<serde_json::Value>,
    /// Requests per second offered to each rate limiter, by limiter id.
    pub demand: BTreeMap<String, f64>,
}

impl Peer {
    /// Its row on the status page.
    pub fn describe(&self, own: &str) -> serde_json::Value {
        let mut row = serde_json::json!({
            "name": self.name,
            "this": self.name == own,
            "heartbeat_age_ms": self.age_ms,
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
    let ttl_ms = cluster.heartbeat_ttl().as_millis() as u64;
    let own = cluster.replica();
    let demand_json = serde_json::to_string(demand).unwrap_or_else(|_| "{}".to_owned());
    let replicas = cluster.key("replicas");
    let info_key = cluster.key(&format!("replica:{own}"));
    let demand_key = cluster.key(&format!("demand:{own}"));
    let reply: Vec<String> = cluster
        .store()
        .script(
            &HEARTBEAT_SCRIPT,
            &[&replicas, &info_key, &demand_key],
            &[
                own.as_bytes(),
                info.as_bytes(),
                demand_json.as_bytes(),
                ttl_ms.to_string().as_bytes(),
            ],
        )
        .await?;
    let redis_now: u64 = reply.first().and_then(|n| n.parse().ok()).unwrap_or(0);
    let mut peers: Vec<Peer> = reply
        .get(1..)
        .unwrap_or_default()
        .chunks(2)
        .filter_map(|pair| {
            let seen = pair.get(1)?.parse::<f64>().ok()? as u64;
            Some(Peer {
                name: pair.first()?.clone(),
                age_ms: redis_now.saturating_sub(seen),
                info: None,
                demand: BTreeMap::new(),
            })
        })
        .collect();
    if !peers.iter().any(|p| p.name == own) {
        peers.push(Peer {
            name: own.to_owned(),
            age_ms: 0,
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
