//! The `/status` document: the proxy's state, each credential's token health, each route's
//! limits and last 15 minutes, each client's limits and usage. The status page renders it and
//! fetches it again every few seconds.
//!
//! No secrets by construction: only names, URLs, counts, times and error codes are read.
//! With `[cluster]`, a `cluster` key holds the fleet's replicas and Redis health; the page shows
//! a fleet section only when the document has one.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde_json::json;

use crate::shared::Shared;

/// The status document.
pub fn status_json(shared: &Shared) -> serde_json::Value {
    let runtime = shared.runtime.load();
    let config = &runtime.config;
    let now = SystemTime::now();
    // Every configured credential: those no route uses have no runtime state to show.
    let credentials: Vec<_> = config
        .credentials
        .iter()
        .map(|(name, settings)| match runtime.credential(name) {
            Some(credential) => credential.describe(now),
            None => json!({ "name": name, "type": settings.kind(), "in_use": false }),
        })
        .collect();
    let routes: Vec<_> = runtime
        .routes
        .routes()
        .iter()
        .map(|r| {
            json!({
                "prefix": r.prefix,
                "upstream": format!(
                    "{}://{}{}",
                    r.target.scheme(),
                    r.target.authority(),
                    r.base_path
                ),
                "credential": r.credential,
                "credential_up": runtime.credential(&r.credential).is_some_and(|c| c.is_up()),
                "timeout_seconds": r.timeout.as_secs(),
                "limits": r.limits.as_ref().map(|l| l.describe()),
                "history": r.metrics.history.snapshot(),
            })
        })
        .collect();
    let clients: Vec<_> = config
        .clients
        .iter()
        .map(|c| {
            let limits = runtime.limits.client(&c.name).map(|l| l.describe());
            let history = shared
                .metrics
                .client_histories
                .get_or_create(&c.name.as_str().into())
                .snapshot();
            json!({ "name": c.name, "routes": c.routes, "limits": limits, "history": history })
        })
        .collect();
    let mut status = json!({
        "service": "sitecore-auth-proxy",
        "version": env!("CARGO_PKG_VERSION"),
        "now": humantime::format_rfc3339_millis(now).to_string(),
        "uptime_seconds": now.duration_since(shared.started_at).unwrap_or_default().as_secs(),
        "ready": shared.readiness().is_ok(),
        "shutting_down": shared.shutting_down.load(Ordering::Acquire),
        "listen": shared.listen_addr.to_string(),
        "tls": config.server.tls.is_some(),
        "inflight_requests": shared.metrics.inflight.get(),
        "open_connections_by_worker": shared.open_connections(),
        "credentials": credentials,
        "routes": routes,
        "clients": clients,
    });
    if let (Some(cluster), Some(status)) = (&shared.cluster, status.as_object_mut()) {
        status.insert("cluster".to_owned(), cluster.describe());
    }
    status
}
