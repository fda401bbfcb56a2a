//! The validated configuration turned into what requests use: route table, credentials with
//! their token caches, the upstream connection pools. One `Runtime` is swapped in as a whole on
//! reload, so a request sees one consistent configuration from start to end.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::body::ProxyBody;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::credential::{Credential, Resources};
use crate::egress::Egress;
use crate::inbound::Clients;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::routes::{Route, RouteTable};
use crate::telemetry::Telemetry;
use crate::token::Tuning;
use crate::upstream::{self, UpstreamPool};

/// What the pipeline reads per request.
#[derive(Debug)]
pub struct Runtime {
    /// The configuration this runtime was built from.
    pub config: Arc<Config>,
    /// Routes by prefix.
    pub routes: RouteTable,
    /// Credentials by name (only those used by a route).
    pub credentials: HashMap<String, Arc<Credential>>,
    /// One upstream connection pool per worker thread (see [`Runtime::pool`]).
    pub pools_by_worker: Box<[UpstreamPool<ProxyBody>]>,
    /// `server.forwarded_headers`.
    pub forwarded_headers: bool,
    /// `server.replay_body_limit`.
    pub replay_body_limit: u64,
    /// `server.rewrite_location`.
    pub rewrite_location: bool,
    /// Inbound clients; `None` when the config has no `[[clients]]`.
    pub clients: Option<Clients>,
    /// Path of the local token endpoint, when it is on and there are clients.
    pub token_endpoint: Option<String>,
    /// TLS termination, when `tls_cert`/`tls_key` are set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The process's metrics, which every runtime records into.
    pub metrics: Arc<Metrics>,
    /// Rate, in-flight and upstream-pause state of every client and route; a reload keeps the
    /// state of those whose limits did not change.
    pub limits: Limits,
    /// The process's tracer, when `[telemetry]` was set at start.
    pub telemetry: Option<Telemetry>,
}

/// What the process makes once, at start, and every runtime of it uses: the tracer
/// (`[telemetry]`) and the fleet membership (`[cluster]`). Both change only on restart.
#[derive(Debug, Default, Clone)]
pub struct Services {
    /// The tracer.
    pub telemetry: Option<Telemetry>,
    /// The fleet.
    pub cluster: Option<Cluster>,
}

/// Why a runtime could not be built from a valid configuration (TLS roots, header values).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(pub String);

impl Runtime {
    /// Builds the runtime with `pools` upstream connection pools (one per worker thread).
    /// `previous` lends its credentials (and their cached tokens) to credentials whose settings
    /// did not change. `services` are the process's tracer and fleet (made once, at start).
    pub fn build(
        config: Arc<Config>,
        tuning: &Tuning,
        metrics: &Arc<Metrics>,
        previous: Option<&Runtime>,
        pools: usize,
        services: &Services,
    ) -> Result<Runtime, BuildError> {
        let telemetry = services.telemetry.as_ref();
        let server = &config.server;
        let tls = upstream::tls_client_config(&server.upstream_ca)
            .map_err(|e| BuildError(format!("upstream TLS roots: {e}")))?;
        let pools_by_worker = (0..pools.max(1))
            .map(|_| {
                UpstreamPool::new(
                    tls.clone(),
                    server.egress.clone(),
                    server.connect_timeout,
                    server.idle_timeout,
                )
            })
            .collect();
        let http = token_http_client(
            tls,
            &server.egress,
            server.connect_timeout,
            tuning.token_request_timeout,
        )?;
        // A kept credential keeps its HTTP client: only while the way to its endpoints (trust
        // roots, egress proxy) is the same.
        let previous = previous.filter(|p| {
            p.config.server.upstream_ca == server.upstream_ca
                && p.config.server.egress == server.egress
        });

        let mut resources = Resources {
            http: &http,
            tuning,
            metrics,
            jwks: BTreeMap::new(),
            telemetry,
            cluster: services.cluster.as_ref(),
        };
        let mut credentials = HashMap::new();
        for name in config.used_credentials() {
            let Some(settings) = config.credentials.get(name) else {
                continue;
            };
            let previous = previous.and_then(|p| p.credentials.get(name));
            let credential =
                Credential::build(name, settings, previous, &mut resources).map_err(BuildError)?;
            credentials.insert(name.to_owned(), credential);
        }

        let mut routes = config
            .routes
            .iter()
            .map(|r| Route::new(r, server.request_timeout))
            .collect::<Result<Vec<_>, _>>()
            .map_err(BuildError)?;
        let limits = Limits::build(&config, previous.map(|p| &p.limits));
        metrics.unrouted_requests.forget_clients();
        for route in &mut routes {
            route.metrics = metrics.register_route(&route.label);
            route.limits = limits.route(&route.prefix).cloned();
        }
        let tls = server
            .tls
            .as_ref()
            .map(crate::tls::server_config)
            .transpose()
            .map_err(|e| BuildError(format!("server TLS: {e}")))?;
        let clients = Clients::with_limits(&config, Some(&limits));
        let token_endpoint = clients.as_ref().and(server.token_endpoint.clone());
        Ok(Runtime {
            clients,
            token_endpoint,
            tls,
            routes: RouteTable::new(routes),
            credentials,
            pools_by_worker,
            forwarded_headers: server.forwarded_headers,
            replay_body_limit: server.replay_body_limit,
            rewrite_location: server.rewrite_location,
            metrics: Arc::clone(metrics),
            limits,
            config,
            telemetry: telemetry.cloned(),
        })
    }

    /// The upstream connection pool of the calling worker thread. Each worker keeps its own, so a
    /// pooled connection is driven by the thread whose requests use it.
    pub fn pool(&self) -> &UpstreamPool<ProxyBody> {
        let index = crate::server::worker_index() % self.pools_by_worker.len();
        &self.pools_by_worker[index]
    }

    /// The credential named by a route.
    pub fn credential(&self, name: &str) -> Option<&Arc<Credential>> {
        self.credentials.get(name)
    }

    /// The credentials in use, sorted by name (readiness, status, `check`).
    pub fn credentials_by_name(&self) -> Vec<&Arc<Credential>> {
        let mut all: Vec<_> = self.credentials.values().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }
}

/// The HTTP client for token endpoints and JWKS: same trust roots and egress rule as upstreams,
/// no redirects (a secret is never sent anywhere but the configured URL), bounded in time.
fn token_http_client(
    tls: rustls::ClientConfig,
    egress: &Egress,
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<reqwest::Client, BuildError> {
    let egress = egress.clone();
    // The egress rule only: reqwest would otherwise read the proxy variables itself, with rules
    // of its own, and tokens and requests could leave by different ways.
    let proxy = reqwest::Proxy::custom(move |url| {
        let proxy = egress.proxy_for_url(url)?;
        let mut url = reqwest::Url::parse(&proxy.to_string()).ok()?;
        if let Some((user, password)) = &proxy.credentials {
            url.set_username(user).ok()?;
            url.set_password(Some(password.expose())).ok()?;
        }
        Some(url)
    });
    reqwest::Client::builder()
        .no_proxy()
        .proxy(proxy)
        // No idle connections: tokens and key sets are fetched minutes or hours apart, and a
        // forward proxy may close a kept connection without saying so (tinyproxy does after an
        // absolute-form exchange), failing the next fetch on it.
        .pool_max_idle_per_host(0)
        .use_preconfigured_tls(tls)
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("sitecore-auth-proxy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| BuildError(format!("token HTTP client: {e}")))
}
