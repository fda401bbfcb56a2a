//! The built-in Sitecore emulator: a token endpoint with Sitecore's (Auth0's) request and response
//! shapes, a JWKS endpoint, and one emulated upstream per Sitecore API host family, all on
//! `127.0.0.1:0`.
//!
//! It is the fixture behind the integration tests, the `demo` command and the benchmarks. The
//! emulated APIs check the bearer token themselves (signature against the published keys, issuer,
//! audience, expiry) and echo what they received as JSON, so a test can assert exactly what the
//! proxy forwarded. Faults (error statuses, delays, bad tokens, connection resets, stalled
//! bodies) are injected through [`Emulator`] methods, either queued (one per request) or
//! persistent.
//!
//! This file owns the builder, the running handle and the shared state; `token.rs` the token
//! endpoint, JWKS and signing; `upstream.rs` the emulated APIs; `http.rs` the accept loop.

mod http;
mod token;
mod token_request;
mod types;
mod upstream;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use types::{Api, SeenRequest, TokenFault, TokenRequestRecord, UpstreamFault};
pub use upstream::pattern_bytes;

use types::Family;

/// The client id registered when the builder names no client.
pub const DEFAULT_CLIENT_ID: &str = "emulator-client";
/// The secret of [`DEFAULT_CLIENT_ID`].
pub const DEFAULT_CLIENT_SECRET: &str = "emulator-secret";
/// The audience requested when a token request names none, and the one the emulated APIs accept
/// unless [`EmulatorBuilder::accepted_audiences`] says otherwise.
pub const DEFAULT_AUDIENCE: &str = "https://api.sitecorecloud.io";
/// The default token lifetime (Sitecore's: one day).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(86_400);
/// How many [`SeenRequest`]s and [`TokenRequestRecord`]s are kept by default; older entries are
/// dropped first (counters stay exact). Benchmarks send millions of requests.
pub const DEFAULT_LOG_LIMIT: usize = 100_000;

/// Builds and starts an [`Emulator`].
#[derive(Clone)]
pub struct EmulatorBuilder {
    clients: Vec<(String, String)>,
    token_lifetime: Duration,
    issuer: Option<String>,
    audiences: Vec<String>,
    upstream_tls: Option<Arc<rustls::ServerConfig>>,
    log_limit: usize,
}

impl Default for EmulatorBuilder {
    fn default() -> Self {
        EmulatorBuilder {
            clients: Vec::new(),
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            issuer: None,
            audiences: vec![DEFAULT_AUDIENCE.to_owned()],
            upstream_tls: None,
            log_limit: DEFAULT_LOG_LIMIT,
        }
    }
}

impl fmt::Debug for EmulatorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let client_ids: Vec<&str> = self.clients.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("EmulatorBuilder")
            .field("clients", &client_ids)
            .field("token_lifetime", &self.token_lifetime)
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("upstream_tls", &self.upstream_tls.is_some())
            .field("log_limit", &self.log_limit)
            .finish()
    }
}

impl EmulatorBuilder {
    /// Registers an OAuth client. Without any, one client [`DEFAULT_CLIENT_ID`] /
    /// [`DEFAULT_CLIENT_SECRET`] exists.
    pub fn client(mut self, client_id: &str, client_secret: &str) -> Self {
        self.clients
            .push((client_id.to_owned(), client_secret.to_owned()));
        self
    }

    /// The lifetime of issued tokens (default one day): `expires_in` is its whole seconds and
    /// `exp = iat + lifetime`.
    pub fn token_lifetime(mut self, d: Duration) -> Self {
        self.token_lifetime = d;
        self
    }

    /// Overrides the `iss` claim (default: `http://127.0.0.1:<port>/` of the token endpoint).
    /// The emulated APIs then expect this issuer.
    pub fn issuer(mut self, iss: &str) -> Self {
        self.issuer = Some(iss.to_owned());
        self
    }

    /// The audiences the emulated APIs accept (default [`DEFAULT_AUDIENCE`]).
    pub fn accepted_audiences(mut self, auds: &[&str]) -> Self {
        self.audiences = auds.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// Serves the emulated APIs over HTTPS with this config; their base URLs then use
    /// `https://localhost:<port>`. The caller sets ALPN (`h2`, `http/1.1`). The token endpoint
    /// stays plain HTTP.
    pub fn upstream_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.upstream_tls = Some(config);
        self
    }

    /// How many seen requests and token request records are kept (default
    /// [`DEFAULT_LOG_LIMIT`]); the oldest are dropped first.
    pub fn log_limit(mut self, limit: usize) -> Self {
        self.log_limit = limit;
        self
    }

    /// Binds every listener on `127.0.0.1:0` and starts serving.
    pub async fn start(self) -> std::io::Result<Emulator> {
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
        let keys = token::KeyRing::load()?;

        let auth_listener = TcpListener::bind("127.0.0.1:0").await?;
        let auth_addr = auth_listener.local_addr()?;
        let mut api_listeners = Vec::with_capacity(Family::ALL.len());
        let mut api_addrs = Vec::with_capacity(Family::ALL.len());
        for family in Family::ALL {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            api_addrs.push(listener.local_addr()?);
            api_listeners.push((family, listener));
        }

        let issuer = self
            .issuer
            .unwrap_or_else(|| format!("http://{auth_addr}/"));
        let clients: HashMap<String, String> = if self.clients.is_empty() {
            HashMap::from([(
                DEFAULT_CLIENT_ID.to_owned(),
                DEFAULT_CLIENT_SECRET.to_owned(),
            )])
        } else {
            self.clients.into_iter().collect()
        };
        let shared = Arc::new(Shared::new(
            Settings {
                clients,
                token_lifetime: self.token_lifetime,
                issuer,
                audiences: self.audiences,
                log_limit: self.log_limit,
            },
            keys,
        ));
        // Fail at start, not on the first request, if signing does not work.
        token::mint(
            &shared,
            DEFAULT_CLIENT_ID,
            DEFAULT_AUDIENCE,
            Duration::from_secs(60),
        )
        .map_err(std::io::Error::other)?;

        let tls = self.upstream_tls.map(tokio_rustls::TlsAcceptor::from);
        let scheme_host = if tls.is_some() {
            "https://localhost"
        } else {
            "http://127.0.0.1"
        };
        let mut tasks = Vec::with_capacity(api_listeners.len() + 1);
        tasks.push(tokio::spawn(http::serve(
            auth_listener,
            None,
            shared.clone(),
            http::Site::Auth,
        )));
        for (family, listener) in api_listeners {
            tasks.push(tokio::spawn(http::serve(
                listener,
                tls.clone(),
                shared.clone(),
                http::Site::Api(family),
            )));
        }
        Ok(Emulator {
            shared,
            tasks,
            auth_addr,
            api_origins: api_addrs
                .iter()
                .map(|addr| format!("{scheme_host}:{}", addr.port()))
                .collect(),
        })
    }
}

/// A running emulator. Dropping it stops every listener and connection it serves.
pub struct Emulator {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    auth_addr: SocketAddr,
    /// `scheme://host:port` per [`Family`], indexed by [`Family::index`].
    api_origins: Vec<String>,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("auth_addr", &self.auth_addr)
            .field("api_origins", &self.api_origins)
            .field("issuer", &self.shared.settings.issuer)
            .finish_non_exhaustive()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Emulator {
    /// A builder with the defaults.
    pub fn builder() -> EmulatorBuilder {
        EmulatorBuilder::default()
    }

    /// The token endpoint, `http://127.0.0.1:<port>/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}/oauth/token", self.auth_addr)
    }

    /// The JWKS endpoint, `http://127.0.0.1:<port>/.well-known/jwks.json`.
    pub fn jwks_url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.auth_addr)
    }

    /// The `iss` of issued tokens: by default `http://127.0.0.1:<port>/`, which is what the proxy
    /// derives from [`Emulator::token_url`].
    pub fn issuer(&self) -> String {
        self.shared.settings.issuer.clone()
    }

    /// The address of the token and JWKS listener.
    pub fn auth_addr(&self) -> SocketAddr {
        self.auth_addr
    }

    /// The upstream base URL of an API, without a trailing slash, e.g.
    /// `http://127.0.0.1:<port>/api/admin/v1` for [`Api::EdgeAdmin`].
    pub fn api_base(&self, api: Api) -> String {
        let origin = self
            .api_origins
            .get(api.family().index())
            .map(String::as_str)
            .unwrap_or_default();
        format!("{origin}{}", api.base_path())
    }

    /// Every request the token endpoint received, whatever the outcome.
    pub fn token_requests(&self) -> u64 {
        self.shared.token_requests.load(Ordering::Relaxed)
    }

    /// The token requests answered 200 with a good token.
    pub fn token_requests_ok(&self) -> u64 {
        self.shared.token_requests_ok.load(Ordering::Relaxed)
    }

    /// Requests to the JWKS endpoint.
    pub fn jwks_requests(&self) -> u64 {
        self.shared.jwks_requests.load(Ordering::Relaxed)
    }

    /// The token requests, in order (the most recent [`EmulatorBuilder::log_limit`]).
    pub fn token_request_log(&self) -> Vec<TokenRequestRecord> {
        lock(&self.shared.token_log).iter().cloned().collect()
    }

    /// Queues faults: each token request consumes one, then normal behaviour resumes.
    pub fn push_token_faults(&self, faults: impl IntoIterator<Item = TokenFault>) {
        lock(&self.shared.token_faults).queue.extend(faults);
    }

    /// Sets (or with `None` clears) a fault applied to every token request while no queued fault
    /// is pending.
    pub fn set_token_fault(&self, fault: Option<TokenFault>) {
        lock(&self.shared.token_faults).persistent = fault;
    }

    /// The next key (1, 2, 3, 1, ...) signs from now on; the JWKS publishes it and the previous
    /// one. Tokens signed by older keys stop being accepted by the emulated APIs.
    pub fn rotate_keys(&self) {
        self.shared.keys.rotate();
    }

    /// The `kid` of the key that signs now.
    pub fn active_kid(&self) -> String {
        self.shared.keys.active_kid().to_owned()
    }

    /// Connections the API host serving `api` has accepted (pooling shows as few connections).
    pub fn upstream_connections(&self, api: Api) -> u64 {
        self.shared
            .connections
            .lock()
            .map(|c| c.get(&api.family()).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Every request the emulated APIs received, in order, including rejected ones (the most
    /// recent [`EmulatorBuilder::log_limit`]).
    pub fn seen_requests(&self) -> Vec<SeenRequest> {
        lock(&self.shared.seen)
            .iter()
            .map(|(_, seen)| seen.clone())
            .collect()
    }

    /// Requests the emulated APIs received.
    pub fn upstream_requests(&self) -> u64 {
        self.shared.upstream_requests.load(Ordering::Relaxed)
    }

    /// Queues faults: each request to any emulated API consumes one.
    pub fn push_upstream_faults(&self, faults: impl IntoIterator<Item = UpstreamFault>) {
        lock(&self.shared.upstream_faults).queue.extend(faults);
    }

    /// Sets (or with `None` clears) a fault applied to every API request while no queued fault is
    /// pending.
    pub fn set_upstream_fault(&self, fault: Option<UpstreamFault>) {
        lock(&self.shared.upstream_faults).persistent = fault;
    }

    /// Clears the logs and counters (not the faults, not the key rotation).
    pub fn reset_counters(&self) {
        let shared = &self.shared;
        for counter in [
            &shared.token_requests,
            &shared.token_requests_ok,
            &shared.jwks_requests,
            &shared.upstream_requests,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        lock(&shared.token_log).clear();
        lock(&shared.seen).clear();
    }

    /// A good token as the endpoint would issue it now, signed by the active key. Returns an
    /// empty string only if signing fails, which [`EmulatorBuilder::start`] already ruled out.
    pub fn mint_token(&self, client_id: &str, audience: &str, lifetime: Duration) -> String {
        token::mint(&self.shared, client_id, audience, lifetime).unwrap_or_else(|error| {
            tracing::error!(%error, "emulator could not sign a token");
            String::new()
        })
    }
}

/// Settings fixed at start.
struct Settings {
    clients: HashMap<String, String>,
    token_lifetime: Duration,
    issuer: String,
    audiences: Vec<String>,
    log_limit: usize,
}

/// A fault queue plus an optional persistent fault.
struct Faults<T> {
    queue: VecDeque<T>,
    persistent: Option<T>,
}

impl<T: Clone> Faults<T> {
    fn new() -> Self {
        Faults {
            queue: VecDeque::new(),
            persistent: None,
        }
    }

    /// The fault for the next request: a queued one first, else the persistent one.
    fn next(&mut self) -> Option<T> {
        self.queue.pop_front().or_else(|| self.persistent.clone())
    }
}

/// State shared by the handle and every connection task.
struct Shared {
    settings: Settings,
    keys: token::KeyRing,
    validation: jsonwebtoken::Validation,
    token_requests: AtomicU64,
    token_requests_ok: AtomicU64,
    jwks_requests: AtomicU64,
    upstream_requests: AtomicU64,
    /// Accepted connections per API host.
    connections: Mutex<HashMap<Family, u64>>,
    token_log: Mutex<VecDeque<TokenRequestRecord>>,
    /// Seen requests with an id, so the body digest can be filled in once the body is read.
    seen: Mutex<VecDeque<(u64, SeenRequest)>>,
    next_seen_id: AtomicU64,
    token_faults: Mutex<Faults<TokenFault>>,
    upstream_faults: Mutex<Faults<UpstreamFault>>,
    verified: Mutex<HashMap<String, token::Verified>>,
}

impl Shared {
    fn new(settings: Settings, keys: token::KeyRing) -> Self {
        let validation = token::validation(&settings.issuer, &settings.audiences);
        Shared {
            settings,
            keys,
            validation,
            token_requests: AtomicU64::new(0),
            token_requests_ok: AtomicU64::new(0),
            jwks_requests: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
            upstream_requests: AtomicU64::new(0),
            token_log: Mutex::new(VecDeque::new()),
            seen: Mutex::new(VecDeque::new()),
            next_seen_id: AtomicU64::new(0),
            token_faults: Mutex::new(Faults::new()),
            upstream_faults: Mutex::new(Faults::new()),
            verified: Mutex::new(HashMap::new()),
        }
    }

    fn record_token_request(&self, record: TokenRequestRecord) {
        let mut log = lock(&self.token_log);
        push_bounded(&mut log, record, self.settings.log_limit);
    }

    /// Records a seen request and returns its id for [`Shared::finish_seen`].
    fn record_seen(&self, seen: SeenRequest) -> u64 {
        let id = self.next_seen_id.fetch_add(1, Ordering::Relaxed);
        let mut log = lock(&self.seen);
        push_bounded(&mut log, (id, seen), self.settings.log_limit);
        id
    }

    /// Fills in the body size, digest and outcome of a seen request (if still logged).
    fn finish_seen(&self, id: u64, body_bytes: u64, body_sha256: String, aborted: bool) {
        let mut log = lock(&self.seen);
        // The entry is almost always the last one; search from the back.
        if let Some((_, seen)) = log.iter_mut().rev().find(|(seen_id, _)| *seen_id == id) {
            seen.body_bytes = body_bytes;
            seen.body_sha256 = body_sha256;
            seen.body_aborted = aborted;
        }
    }
}

fn push_bounded<T>(log: &mut VecDeque<T>, item: T, limit: usize) {
    if limit == 0 {
        return;
    }
    while log.len() >= limit {
        log.pop_front();
    }
    log.push_back(item);
}

/// Locks a mutex; a panic elsewhere while holding it leaves plain data that is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Seconds since the UNIX epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
