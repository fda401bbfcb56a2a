//! Credentials and their token caches: the token endpoint is never on the hot path.
//!
//! Each `oauth` credential has one refresher task that owns every call to the token endpoint.
//! Requests only read the cached token (an `ArcSwap` load, no lock, no I/O). When the cache is
//! cold they wake the refresher and wait for its next attempt, so any number of concurrent
//! requests share exactly one fetch.
//!
//! ```text
//!                 start (eager)            refresh_at (+jitter) passed
//!   ┌─────────┐ ────────────────► ┌──────────┐ ◄──────────────────── ┌───────┐
//!   │  Empty  │                   │ Fetching │ ───── ok ───────────► │ Valid │──┐ upstream 401
//!   └─────────┘ ◄──── 401 ─────── └──────────┘                       └───────┘  │ (≤ 1 forced
//!        ▲   (token invalidated)    │ fail                 ▲  served until       │  per 30 s)
//!        │                          ▼                      │  exp - margin       │
//!        │                     ┌─────────┐  retry_at       │                     │
//!        └──── expired ─────── │ Backoff │ ────────────────┘ (via Fetching)      │
//!                              └─────────┘                                       │
//!   Empty/expired + Backoff: requests get 503 token_unavailable with Retry-After at once.
//! ```
//!
//! Failures back off exponentially with jitter (1 s doubling to 2 min), and a 429's
//! `Retry-After` / `x-ratelimit-reset` is never undercut. The current token keeps being served
//! while it is valid.

pub mod fetch;
mod shared;
pub mod verify;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use rand::Rng;
use tokio::sync::{watch, Notify};

use crate::cluster::seal::Fingerprint;
use crate::cluster::SharedTokens;
use crate::config::OAuthSettings;
use crate::error::{ErrorChain, TokenUnavailable};
use crate::metrics::{CredentialLabels, Metrics, TokenLabels};
use crate::telemetry::Telemetry;
use prometheus_client::metrics::counter::Counter;
use verify::{Expectations, Jwks, VerifyError};

/// Why one attempt to obtain a token failed. Never carries the endpoint's raw body.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Connection refused, reset, TLS failure.
    #[error("token endpoint unreachable")]
    Unreachable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No answer in time.
    #[error("token endpoint timed out")]
    Timeout,
    /// A non-success status other than 429; `code` is the sanitised OAuth `error` field.
    #[error("token endpoint answered {status}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status {
        /// HTTP status.
        status: u16,
        /// OAuth error code such as `access_denied`.
        code: Option<String>,
    },
    /// 429; wait at least this long.
    #[error("token endpoint rate-limited the request")]
    RateLimited {
        /// From `Retry-After` or `x-ratelimit-reset`.
        retry_after: Option<Duration>,
    },
    /// A 200 whose body is not a usable token response.
    #[error("token response is malformed: {0}")]
    Malformed(&'static str),
    /// The token failed verification.
    #[error("token failed verification")]
    Invalid(#[source] VerifyError),
}

impl TokenError {
    /// Short stable code for status pages, logs and the `outcome` label.
    pub fn code(&self) -> String {
        match self {
            TokenError::Unreachable(_) => "unreachable".into(),
            TokenError::Timeout => "timeout".into(),
            TokenError::Status { code: Some(c), .. } => c.clone(),
            TokenError::Status { status, code: None } => format!("http_{status}"),
            TokenError::RateLimited { .. } => "rate_limited".into(),
            TokenError::Malformed(_) => "malformed_response".into(),
            TokenError::Invalid(v) => format!("invalid_token_{}", v.reason()),
        }
    }

    /// The `outcome` label of `token_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            TokenError::Unreachable(_) => "unreachable",
            TokenError::Timeout => "timeout",
            TokenError::Status { status, .. } if *status >= 500 => "server_error",
            TokenError::Status { .. } => "rejected",
            TokenError::RateLimited { .. } => "rate_limited",
            TokenError::Malformed(_) => "malformed",
            TokenError::Invalid(_) => "invalid_token",
        }
    }
}

/// A verified token, ready to inject.
pub struct Token {
    /// `Bearer <jwt>`, marked sensitive.
    pub authorization: HeaderValue,
    /// The JWT's `exp`.
    pub expires_at: SystemTime,
    /// Served to requests until this instant (exp minus a safety margin).
    pub serve_until: Instant,
    /// The refresher fetches the next token from this instant.
    pub refresh_due: Instant,
    /// When it was obtained.
    pub obtained_at: SystemTime,
    /// Granted scopes.
    pub scope: Option<String>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("authorization", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .field("scope", &self.scope)
            .finish()
    }
}

/// Health of one credential, for `/readyz`, `/status` and metrics.
#[derive(Debug, Clone, Default)]
pub struct CredentialStatus {
    /// `exp` of the served token.
    pub valid_until: Option<SystemTime>,
    /// When the last token was obtained.
    pub last_refresh: Option<SystemTime>,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
    /// Code of the last failure (cleared by a success).
    pub last_error: Option<String>,
    /// While failing: no attempt before this instant.
    pub retry_at: Option<Instant>,
    /// Completed attempts, successful or not.
    pub attempts: u64,
}

/// Timings of the lifecycle; the defaults are the product's, tests may shorten them.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// First backoff after a failure; doubles per consecutive failure.
    pub backoff_base: Duration,
    /// Backoff ceiling.
    pub backoff_cap: Duration,
    /// At most one forced (401-triggered) refresh per credential per this interval.
    pub forced_refresh_interval: Duration,
    /// Never schedule a refresh sooner than this after obtaining a token.
    pub min_refresh_interval: Duration,
    /// How long a request waits on a cold cache before giving up.
    pub max_wait: Duration,
    /// Whole-exchange timeout of one token endpoint or JWKS request.
    pub token_request_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(120),
            forced_refresh_interval: Duration::from_secs(30),
            min_refresh_interval: Duration::from_secs(1),
            max_wait: Duration::from_secs(30),
            token_request_timeout: Duration::from_secs(30),
        }
    }
}

/// An `oauth` credential: settings, token cache and refresher state.
#[derive(Debug)]
pub struct OAuthCredential {
    name: Arc<str>,
    settings: OAuthSettings,
    http: reqwest::Client,
    jwks: Arc<Jwks>,
    expect: Expectations,
    tuning: Tuning,
    token: ArcSwapOption<Token>,
    status: ArcSwap<CredentialStatus>,
    /// Wakes the refresher: a cold request or a forced refresh.
    wake: Notify,
    force: AtomicBool,
    /// Set by the first token obtained: readiness waits for it once, not after every loss.
    held: AtomicBool,
    last_forced: Mutex<Option<Instant>>,
    /// Bumped after every completed attempt; cold requests wait on it.
    attempts: watch::Sender<u64>,
    /// `token_cold_waits_total` and `token_forced_refreshes_total` of this credential.
    cold_waits: Counter,
    forced_refreshes: Counter,
    metrics: Arc<Metrics>,
    /// Each attempt is a root span when tracing is on.
    telemetry: Option<Telemetry>,
    /// The fleet's shared entry, lease and forced-refresh budget (`[cluster]`).
    shared: Option<SharedTokens>,
    /// The fingerprint of the last token an upstream refused, while sharing: the fleet's entry
    /// is not adopted again while it still holds that token.
    rejected: Mutex<Option<Fingerprint>>,
    /// `token_fleet_adoptions_total` of this credential (registered only in a fleet).
    shared_adoptions: Counter,
}

impl OAuthCredential {
    pub(crate) fn new(
        name: &str,
        settings: OAuthSettings,
        http: reqwest::Client,
        jwks: Arc<Jwks>,
        tuning: Tuning,
        metrics: Arc<Metrics>,
        telemetry: Option<Telemetry>,
    ) -> OAuthCredential {
        let expect = Expectations {
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            algorithms: settings.algorithms.clone(),
            leeway: settings.leeway,
        };
        let labels = CredentialLabels {
            credential: Arc::from(name),
        };
        let cold_waits = metrics.token_cold_waits.get_or_create(&labels).clone();
        let forced_refreshes = metrics
            .token_forced_refreshes
            .get_or_create(&labels)
            .clone();
        OAuthCredential {
            name: Arc::from(name),
            settings,
            http,
            jwks,
            expect,
            tuning,
            token: ArcSwapOption::empty(),
            status: ArcSwap::from_pointee(CredentialStatus::default()),
            wake: Notify::new(),
            force: AtomicBool::new(false),
            held: AtomicBool::new(false),
            last_forced: Mutex::new(None),
            attempts: watch::channel(0).0,
            cold_waits,
            forced_refreshes,
            metrics,
            telemetry,
            shared: None,
            rejected: Mutex::new(None),
            shared_adoptions: Counter::default(),
        }
    }

    /// Shares this credential's tokens with the fleet through `shared`.
    pub(crate) fn with_fleet(mut self, shared: Option<SharedTokens>) -> OAuthCredential {
        if shared.is_some() {
            self.shared_adoptions = self
                .metrics
                .token_fleet_adoptions
                .get_or_create(&CredentialLabels {
                    credential: Arc::clone(&self.name),
                })
                .clone();
        }
        self.shared = shared;
        self
    }

    /// The credential's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its settings (reload compares them to decide whether the cached token survives).
    pub fn settings(&self) -> &OAuthSettings {
        &self.settings
    }

    /// Requests that found the cache cold and waited for a fetch.
    pub fn cold_waits(&self) -> u64 {
        self.cold_waits.get()
    }

    /// Tokens taken from the fleet's shared entry instead of a token request.
    pub fn fleet_adoptions(&self) -> u64 {
        self.shared_adoptions.get()
    }

    /// Refreshes forced by an upstream 401.
    pub fn forced_refreshes(&self) -> u64 {
        self.forced_refreshes.get()
    }

    /// Whether it has held a valid token since it was built.
    pub fn has_held_token(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Its `/status` entry (without the name): endpoint, audience, token health. Never the token.
    /// The times of its token's life (`last_refresh`: issued, `refresh_due`, `valid_until`) are
    /// wall-clock times; `retry_at` is the next attempt while failing.
    pub fn describe(&self, now: SystemTime) -> serde_json::Value {
        let status = self.status();
        let token = self.current();
        let wall = wall_clock(now, Instant::now());
        serde_json::json!({
            "type": "oauth",
            "token_url": self.settings.token_url.as_str(),
            "audience": self.settings.audience,
            "token_valid": token.is_some(),
            "valid_until": rfc3339(status.valid_until),
            "expires_in_seconds": token.as_ref().map(|t| t.expires_at.duration_since(now).unwrap_or_default().as_secs()),
            "last_refresh": rfc3339(status.last_refresh),
            "refresh_due": rfc3339(token.as_ref().map(|t| wall(t.refresh_due))),
            "retry_at": rfc3339(status.retry_at.map(wall)),
            "consecutive_failures": status.consecutive_failures,
            "last_error": status.last_error,
            "token_requests": status.attempts,
            "forced_refreshes": self.forced_refreshes.get(),
            "fleet_adoptions": self.shared.as_ref().map(|_| self.shared_adoptions.get()),
        })
    }

    /// One verified token (waiting for the refresher's fetch when the cache is cold), described
    /// for `check --fetch`: expiry and scopes, never the token.
    pub async fn check(&self) -> Result<String, String> {
        match self.token().await {
            Ok(token) => {
                let left = token
                    .expires_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                Ok(format!(
                    "token OK, expires in {}, scopes: {}",
                    humantime::format_duration(Duration::from_secs(left.as_secs())),
                    token.scope.as_deref().unwrap_or("-")
                ))
            }
            Err(e) => Err(e.last_error.unwrap_or_else(|| "no token".to_owned())),
        }
    }

    /// A snapshot of its health.
    pub fn status(&self) -> CredentialStatus {
        CredentialStatus::clone(&self.status.load())
    }

    /// The cached token if it may still be served. Lock-free; the hot path.
    pub fn current(&self) -> Option<Arc<Token>> {
        let guard = self.token.load();
        match guard.as_ref() {
            Some(t) if t.serve_until > Instant::now() => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// A valid token: from the cache, or, when it is cold, from the one shared fetch.
    pub async fn token(&self) -> Result<Arc<Token>, TokenUnavailable> {
        if let Some(t) = self.current() {
            return Ok(t);
        }
        self.cold_waits.inc();
        let mut attempts = self.attempts.subscribe();
        // Bounded: each round waits for one completed attempt; a success ends it, a failure
        // puts the credential in backoff, which ends it too.
        for _ in 0..3 {
            attempts.borrow_and_update();
            if let Some(t) = self.current() {
                return Ok(t);
            }
            let status = self.status.load();
            if let Some(retry_at) = status.retry_at {
                let now = Instant::now();
                if retry_at > now {
                    return Err(self.unavailable(retry_at - now, &status));
                }
            }
            self.wake.notify_one();
            match tokio::time::timeout(self.tuning.max_wait, attempts.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => break,
            }
        }
        if let Some(t) = self.current() {
            return Ok(t);
        }
        let status = self.status.load();
        Err(self.unavailable(self.tuning.backoff_base, &status))
    }

    fn unavailable(&self, retry_after: Duration, status: &CredentialStatus) -> TokenUnavailable {
        TokenUnavailable {
            credential: Arc::clone(&self.name),
            retry_after,
            last_error: status.last_error.clone(),
        }
    }

    /// After an upstream 401: drops `used` if it is still the cached token and asks for a fresh
    /// one. Returns false when the forced-refresh budget (one per interval) is spent, in which
    /// case nothing changed and the 401 should go back to the client.
    pub fn invalidate(&self, used: &Arc<Token>) -> bool {
        let current = self.token.load_full();
        let still_cached = current.as_ref().is_some_and(|c| Arc::ptr_eq(c, used));
        if !still_cached {
            // Someone already replaced it; the caller can use the new one.
            return true;
        }
        {
            let Ok(mut last) = self.last_forced.lock() else {
                return false;
            };
            let now = Instant::now();
            if last.is_some_and(|t| now.duration_since(t) < self.tuning.forced_refresh_interval) {
                return false;
            }
            *last = Some(now);
        }
        // Compare-and-swap: only the token that failed is dropped, never a newer one.
        let prev = self.token.compare_and_swap(&current, None);
        if !arc_swap_ptr_eq(&prev, &current) {
            return true;
        }
        if let (Some(shared), Some(jwt)) = (&self.shared, shared::bearer(&used.authorization)) {
            if let Ok(mut rejected) = self.rejected.lock() {
                *rejected = Some(shared.fingerprint(jwt));
            }
        }
        self.forced_refreshes.inc();
        self.force.store(true, Ordering::Release);
        self.wake.notify_one();
        tracing::info!(credential = %self.name, "upstream refused the token; forcing a refresh");
        true
    }

    /// Runs the refresher until `shutdown` fires. Spawned once per credential.
    pub async fn run_refresher(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let now = Instant::now();
            let forced = self.force.swap(false, Ordering::AcqRel);
            let due = if forced {
                now
            } else {
                let status = self.status.load();
                match (status.retry_at, self.token.load().as_ref()) {
                    (Some(retry_at), _) => retry_at,
                    (None, Some(token)) => token.refresh_due,
                    (None, None) => now,
                }
            };
            if due > now {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = self.wake.notified() => continue,
                    _ = shutdown.changed() => continue,
                }
            }
            let trigger = match (forced, self.current()) {
                (true, _) => "forced",
                (false, Some(_)) => "refresh",
                (false, None) => "cold",
            };
            self.attempt(trigger).await;
        }
    }

    /// The fingerprint of the token an upstream last refused (fleet mode).
    fn rejected(&self) -> Option<Fingerprint> {
        self.rejected.lock().ok().and_then(|r| *r)
    }

    /// One fetch-and-verify, with its bookkeeping; `trigger` names why it runs, for its span.
    /// In a fleet, the shared entry comes first and may make the fetch unnecessary.
    async fn attempt(&self, trigger: &'static str) {
        let publish = match &self.shared {
            Some(shared) => match self.ask_fleet(shared, trigger == "forced").await {
                shared::FromFleet::Adopted(token) => {
                    return self.adopt(token, "token taken from the fleet")
                }
                shared::FromFleet::Kept => {
                    self.attempts.send_modify(|n| *n += 1);
                    return;
                }
                shared::FromFleet::Fetch(publish) => Some((shared, publish)),
            },
            None => None,
        };
        let span = self
            .telemetry
            .as_ref()
            .map(|t| t.token_fetch(&self.name, trigger, &self.settings.token_url));
        let result = self.obtain().await;
        if let Some(span) = span {
            span.end(result.as_ref().map_or_else(TokenError::outcome, |_| "ok"));
        }
        let mut status = CredentialStatus::clone(&self.status.load());
        status.attempts += 1;
        let mut obtained = None;
        match result {
            Ok(token) => {
                self.count_outcome("ok");
                obtained = Some(self.install(token, &mut status, "token obtained"));
            }
            Err(e) => {
                self.count_outcome(e.outcome());
                if let TokenError::Invalid(reason) = &e {
                    self.count_verification_failure(reason);
                }
                status.consecutive_failures = status.consecutive_failures.saturating_add(1);
                let wait = self.backoff(status.consecutive_failures, &e);
                status.retry_at = Some(Instant::now() + wait);
                status.last_error = Some(e.code());
                tracing::warn!(
                    credential = %self.name,
                    error = %ErrorChain(&e),
                    failures = status.consecutive_failures,
                    retry_in_ms = wait.as_millis() as u64,
                    "token request failed"
                );
            }
        }
        self.status.store(Arc::new(status));
        self.attempts.send_modify(|n| *n += 1);
        // Shared after it is served: waiting requests never wait on Redis for it.
        match (obtained, publish) {
            (Some(token), Some((shared, how))) => self.publish(shared, &token, how).await,
            (None, Some((shared, how))) => self.abandon(shared, how).await,
            _ => {}
        }
    }

    /// Installs a verified token another replica fetched: no token request was made. `how` is
    /// the log line's message.
    fn adopt(&self, token: Token, how: &'static str) {
        let mut status = CredentialStatus::clone(&self.status.load());
        let _ = self.install(token, &mut status, how);
        self.status.store(Arc::new(status));
        self.shared_adoptions.inc();
        self.attempts.send_modify(|n| *n += 1);
    }

    /// Serves `token` from now on and clears the failure state in `status`.
    fn install(
        &self,
        token: Token,
        status: &mut CredentialStatus,
        how: &'static str,
    ) -> Arc<Token> {
        status.valid_until = Some(token.expires_at);
        status.last_refresh = Some(token.obtained_at);
        status.consecutive_failures = 0;
        status.last_error = None;
        status.retry_at = None;
        tracing::info!(
            credential = %self.name,
            expires_in_s = token.expires_at.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
            "{how}"
        );
        let token = Arc::new(token);
        self.token.store(Some(Arc::clone(&token)));
        self.held.store(true, Ordering::Release);
        token
    }

    fn count_outcome(&self, outcome: &'static str) {
        self.metrics
            .token_requests
            .get_or_create(&TokenLabels {
                credential: Arc::clone(&self.name),
                outcome,
            })
            .inc();
    }

    fn backoff(&self, failures: u32, error: &TokenError) -> Duration {
        let exp = failures.saturating_sub(1).min(16);
        let ceiling = self
            .tuning
            .backoff_base
            .saturating_mul(1u32 << exp)
            .min(self.tuning.backoff_cap);
        // Jitter in [ceiling/2, ceiling] so replicas spread out but never retry instantly.
        let jittered = ceiling.mul_f64(rand::rng().random_range(0.5..=1.0));
        match error {
            TokenError::RateLimited {
                retry_after: Some(after),
            } => jittered.max(*after),
            _ => jittered,
        }
    }

    async fn obtain(&self) -> Result<Token, TokenError> {
        let response = fetch::request_token(&self.http, &self.settings).await?;
        let claims = self
            .jwks
            .verify(response.access_token.expose(), &self.expect)
            .await
            .map_err(TokenError::Invalid)?;
        let now_sys = SystemTime::now();
        let now = Instant::now();
        let expires_at = UNIX_EPOCH + Duration::from_secs(claims.exp);
        let until_exp = expires_at.duration_since(now_sys).unwrap_or_default();
        // `expires_in` is the endpoint's word on the lifetime; the JWT's `exp` bounds it.
        let lifetime = response
            .expires_in
            .map(Duration::from_secs)
            .map_or(until_exp, |d| d.min(until_exp));
        let margin = (lifetime / 10).min(Duration::from_secs(30));
        let serve_for = lifetime.saturating_sub(margin);
        let jitter = lifetime.mul_f64(0.05 * rand::rng().random_range(0.0..=1.0));
        let mut refresh_in = lifetime
            .mul_f64(self.settings.refresh_at)
            .saturating_sub(jitter);
        if refresh_in < self.tuning.min_refresh_interval {
            tracing::warn!(
                credential = %self.name,
                lifetime_ms = lifetime.as_millis() as u64,
                "token lifetime is very short; refreshing no more often than the floor"
            );
            refresh_in = self.tuning.min_refresh_interval;
        }
        if serve_for.is_zero() {
            return Err(TokenError::Invalid(VerifyError::Expired));
        }
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {}", response.access_token.expose()))
                .map_err(|_| TokenError::Malformed("access_token is not a valid header value"))?;
        authorization.set_sensitive(true);
        Ok(Token {
            authorization,
            expires_at,
            serve_until: now + serve_for,
            refresh_due: now + refresh_in,
            obtained_at: now_sys,
            scope: claims.scope.or(response.scope),
        })
    }
}

fn arc_swap_ptr_eq(a: &Option<Arc<Token>>, b: &Option<Arc<Token>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Turns instants into wall-clock times, given one moment read on both clocks.
fn wall_clock(now: SystemTime, now_instant: Instant) -> impl Fn(Instant) -> SystemTime {
    move |at| match at.checked_duration_since(now_instant) {
        Some(ahead) => now + ahead,
        None => now - now_instant.duration_since(at),
    }
}

/// An RFC 3339 time for status documents, `null` when absent.
pub fn rfc3339(t: Option<SystemTime>) -> serde_json::Value {
    t.map_or(serde_json::Value::Null, |t| {
        serde_json::Value::from(humantime::format_rfc3339_seconds(t).to_string())
    })
}
