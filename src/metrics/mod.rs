//! Prometheus metrics: the families the README lists under "Metrics", registered once per process and shared by the
//! pipeline, the credentials and the admin listener.
//!
//! Counters and histograms are atomics behind prometheus-client's families; label values are
//! `Arc<str>` clones of names the runtime already holds, so recording allocates nothing.
//!
//! `route` holds a route's handles on its series; `history` keeps the last 15 minutes of every
//! route and client for the status page's charts. A finished request is recorded into both in
//! one place ([`RouteMetrics::record`]).

mod cluster;
pub mod history;
mod route;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

pub use cluster::ClusterMetrics;
use history::Histories;
pub use route::{RouteMetrics, RouteRequests};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `route`, `client`, `status` of `proxy_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route prefix, `-` when no route matched.
    pub route: Arc<str>,
    /// Client name, `-` without inbound authentication.
    pub client: Arc<str>,
    /// Response status code.
    pub status: u16,
}

/// `route` of `proxy_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route prefix, `-` when no route matched.
    pub route: Arc<str>,
}

/// `route`, `kind` of `proxy_upstream_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    /// Route prefix.
    pub route: Arc<str>,
    /// `unreachable` or `timeout`.
    pub kind: &'static str,
}

/// `worker` of `proxy_open_connections`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// The worker thread's index, from 0.
    pub worker: usize,
}

/// `credential`, `outcome` of `token_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// Credential name.
    pub credential: Arc<str>,
    /// `ok`, `rejected`, `rate_limited`, `server_error`, `unreachable`, `timeout`, `malformed`, `invalid_token`.
    pub outcome: &'static str,
}

/// `route`, `client`, `reason` of `proxy_rejected_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    /// Route prefix.
    pub route: Arc<str>,
    /// Client name, `-` without clients.
    pub client: Arc<str>,
    /// `client_rate`, `route_rate`, `client_in_flight`, `route_in_flight`, `upstream_throttled`.
    pub reason: &'static str,
}

/// `credential` of `token_expiry_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    /// Credential name.
    pub credential: Arc<str>,
}

/// `credential`, `reason` of `token_verification_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerificationLabels {
    /// Credential name.
    pub credential: Arc<str>,
    /// See `VerifyError::reason`.
    pub reason: &'static str,
}

/// `outcome` of `config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `success` or `error`.
    pub outcome: &'static str,
}

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `proxy_requests_total{route,client,status}`.
    pub requests: Family<RequestLabels, Counter>,
    /// Its series for requests no route matched (`route="-"`).
    pub unrouted_requests: RouteRequests,
    /// `proxy_request_duration_seconds{route}`: until the response body is done.
    pub duration: Family<RouteLabels, Histogram>,
    /// `proxy_upstream_errors_total{route,kind}`.
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    /// `proxy_inflight_requests`.
    pub inflight: Gauge,
    /// `proxy_rejected_total{route,client,reason}`: requests refused by a limit or an upstream
    /// pause, before reaching the upstream.
    pub rejected: Family<RejectedLabels, Counter>,
    /// `proxy_replays_total`: requests sent again after an upstream 401.
    pub replays: Counter,
    /// `proxy_open_connections{worker}`: open client connections per worker thread, counted by
    /// the server through [`Metrics::worker_connections`].
    pub open_connections: Family<WorkerLabels, Gauge>,
    /// `token_requests_total{credential,outcome}`.
    pub token_requests: Family<TokenLabels, Counter>,
    /// `token_expiry_seconds{credential}`: seconds left, set at scrape time.
    pub token_expiry: Family<CredentialLabels, Gauge<f64, AtomicU64>>,
    /// `credential_up{credential}`: 1 while the credential can serve requests, set at scrape
    /// time.
    pub credential_up: Family<CredentialLabels, Gauge>,
    /// `token_cold_waits_total{credential}`: requests that found the token cache cold and waited.
    pub token_cold_waits: Family<CredentialLabels, Counter>,
    /// `token_forced_refreshes_total{credential}`: refreshes forced by an upstream 401.
    pub token_forced_refreshes: Family<CredentialLabels, Counter>,
    /// `token_fleet_adoptions_total{credential}`: tokens taken from the fleet's shared entry
    /// instead of a token request (`[cluster]` only).
    pub token_fleet_adoptions: Family<CredentialLabels, Counter>,
    /// `token_verification_failures_total{credential,reason}`.
    pub token_verification_failures: Family<VerificationLabels, Counter>,
    /// `config_reloads_total{outcome}`.
    pub config_reloads: Family<OutcomeLabels, Counter>,
    /// Each route's last 15 minutes (requests, errors, latency), by prefix; not exported to
    /// Prometheus, shown on `/status`.
    pub route_histories: Histories,
    /// Each client's last 15 minutes (requests, errors), by name (`-` without clients).
    pub client_histories: Arc<Histories>,
    /// `telemetry_spans_dropped_total`: finished spans dropped because the export queue was
    /// full (a collector down or slower than the spans come).
    pub telemetry_spans_dropped: Counter,
    /// `telemetry_export_failures_total`: span batches the collector did not take.
    pub telemetry_export_failures: Counter,
    /// `cluster_up` and `cluster_sync_errors_total`, once `[cluster]` asks for them.
    cluster: OnceLock<ClusterMetrics>,
}

/// Histogram buckets for a proxy: 100 µs doubling to about 26 s.
pub(crate) fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// Every `outcome` of `token_requests_total`.
pub const TOKEN_OUTCOMES: [&str; 8] = [
    "ok",
    "rejected",
    "rate_limited",
    "server_error",
    "unreachable",
    "timeout",
    "malformed",
    "invalid_token",
];

/// Every `reason` of `token_verification_failures_total`.
pub const VERIFICATION_REASONS: [&str; 9] = [
    "malformed",
    "algorithm",
    "unknown_kid",
    "jwks_unavailable",
    "signature",
    "expired",
    "not_yet_valid",
    "issuer",
    "audience",
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every family.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::default();
        registry.register(
            "proxy_requests",
            "Requests handled by the proxy",
            requests.clone(),
        );
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "proxy_request_duration_seconds",
            "Time from request to the end of the response body",
            duration.clone(),
        );
        let upstream_errors = Family::default();
        registry.register(
            "proxy_upstream_errors",
            "Upstream connection failures and timeouts",
            upstream_errors.clone(),
        );
        let inflight = Gauge::default();
        registry.register(
            "proxy_inflight_requests",
            "Requests in flight",
            inflight.clone(),
        );
        let rejected = Family::default();
        registry.register(
            "proxy_rejected",
            "Requests refused by a rate limit, an in-flight cap or an upstream pause",
            rejected.clone(),
        );
        let replays = Counter::default();
        registry.register(
            "proxy_replays",
            "Requests replayed with a fresh token after an upstream 401",
            replays.clone(),
        );
        let open_connections = Family::default();
        registry.register(
            "proxy_open_connections",
            "Open client connections per worker thread",
            open_connections.clone(),
        );
        let token_requests = Family::default();
        registry.register(
            "token_requests",
            "Requests to token endpoints by outcome",
            token_requests.clone(),
        );
        let token_expiry = Family::default();
        registry.register(
            "token_expiry_seconds",
            "Seconds until the served token expires",
            token_expiry.clone(),
        );
        let credential_up = Family::default();
        registry.register(
            "credential_up",
            "Whether the credential can serve requests (1) or has no valid token (0)",
            credential_up.clone(),
        );
        let token_cold_waits = Family::default();
        registry.register(
            "token_cold_waits",
            "Requests that found the token cache cold and waited for a fetch",
            token_cold_waits.clone(),
        );
        let token_forced_refreshes = Family::default();
        registry.register(
            "token_forced_refreshes",
            "Token refreshes forced by an upstream 401",
            token_forced_refreshes.clone(),
        );
        let token_fleet_adoptions = Family::default();
        registry.register(
            "token_fleet_adoptions",
            "Tokens taken from the fleet's shared entry instead of a token request",
            token_fleet_adoptions.clone(),
        );
        let token_verification_failures = Family::default();
        registry.register(
            "token_verification_failures",
            "Tokens refused by verification, by reason",
            token_verification_failures.clone(),
        );
        let config_reloads = Family::default();
        registry.register(
            "config_reloads",
            "Configuration reloads by outcome",
            config_reloads.clone(),
        );
        for outcome in ["success", "error"] {
            let _ = config_reloads.get_or_create(&OutcomeLabels { outcome });
        }
        let client_histories = Arc::new(Histories::new(false));
        let telemetry_spans_dropped = Counter::default();
        registry.register(
            "telemetry_spans_dropped",
            "Finished spans dropped because the export queue was full",
            telemetry_spans_dropped.clone(),
        );
        let telemetry_export_failures = Counter::default();
        registry.register(
            "telemetry_export_failures",
            "Span batches the OTLP collector did not take",
            telemetry_export_failures.clone(),
        );
        Metrics {
            registry,
            unrouted_requests: RouteRequests::new(
                requests.clone(),
                Arc::from("-"),
                Arc::clone(&client_histories),
            ),
            requests,
            duration,
            upstream_errors,
            inflight,
            rejected,
            replays,
            open_connections,
            token_requests,
            token_expiry,
            credential_up,
            token_cold_waits,
            token_forced_refreshes,
            token_fleet_adoptions,
            token_verification_failures,
            config_reloads,
            route_histories: Histories::new(true),
            client_histories,
            telemetry_spans_dropped,
            telemetry_export_failures,
            cluster: OnceLock::new(),
        }
    }

    /// The `proxy_open_connections{worker}` series of `workers` worker threads (at least one),
    /// in worker order: the server counts its open connections with them, so a scrape reads
    /// what the server counts.
    pub fn worker_connections(&self, workers: usize) -> Arc<[Gauge]> {
        (0..workers.max(1))
            .map(|worker| {
                self.open_connections
                    .get_or_create_owned(&WorkerLabels { worker })
            })
            .collect()
    }

    /// Creates the zero-valued series of a route, so dashboards see 0 rather than nothing, and
    /// returns the route's handles on its series: recording through them skips the families'
    /// lookups (a hash of the labels and a lock) on every request. A route of the same prefix
    /// (after a reload) gets the same history.
    pub fn register_route(&self, route: &Arc<str>) -> RouteMetrics {
        for kind in ["unreachable", "timeout"] {
            let _ = self.upstream_errors.get_or_create(&UpstreamErrorLabels {
                route: Arc::clone(route),
                kind,
            });
        }
        RouteMetrics {
            duration: self
                .duration
                .get_or_create(&RouteLabels {
                    route: Arc::clone(route),
                })
                .clone(),
            requests: RouteRequests::new(
                self.requests.clone(),
                Arc::clone(route),
                Arc::clone(&self.client_histories),
            ),
            history: self.route_histories.get_or_create(route),
        }
    }

    /// Creates the zero-valued series of an `oauth` credential.
    pub fn register_credential(&self, credential: &Arc<str>) {
        for outcome in TOKEN_OUTCOMES {
            let _ = self.token_requests.get_or_create(&TokenLabels {
                credential: Arc::clone(credential),
                outcome,
            });
        }
        for reason in VERIFICATION_REASONS {
            let _ = self
                .token_verification_failures
                .get_or_create(&VerificationLabels {
                    credential: Arc::clone(credential),
                    reason,
                });
        }
    }

    /// The fleet's metrics, exported from the first call on (made when `[cluster]` starts).
    pub fn cluster(&self) -> &ClusterMetrics {
        self.cluster.get_or_init(ClusterMetrics::new)
    }

    /// The exposition text (OpenMetrics, which Prometheus reads).
    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        if let Some(cluster) = self.cluster.get() {
            let _ = encode_registry(&mut out, &cluster.registry);
        }
        let _ = encode_eof(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_connection_gauges_are_the_exported_series() {
        let metrics = Metrics::new();
        let open = metrics.worker_connections(2);
        open[1].inc();
        open[1].inc();
        open[0].inc();
        open[1].dec();
        // Asking again hands out the same series, not new ones.
        assert_eq!(metrics.worker_connections(2)[1].get(), 1);
        let text = metrics.encode();
        for line in [
            "proxy_open_connections{worker=\"0\"} 1",
            "proxy_open_connections{worker=\"1\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert_eq!(
            metrics.worker_connections(0).len(),
            1,
            "at least one worker"
        );
    }
}
