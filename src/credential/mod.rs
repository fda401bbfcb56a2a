//! The credentials the proxy injects upstream, behind one type. Outside this module no code
//! knows which kinds exist: the pipeline asks a [`Credential`] what to inject, what to do after
//! an upstream 401 and whether a request may be replayed; operations ask whether it is up, how
//! it describes itself on `/status` and what `check --fetch` should print; the app asks for its
//! background task. Adding a kind touches this module and the configuration only.
//!
//! The kinds:
//! - `oauth` ([`crate::token::OAuthCredential`]): client credentials exchanged for verified JWTs,
//!   cached and refreshed in the background;
//! - `header` ([`StaticHeader`]): a static key set as a header.

mod static_header;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::config::CredentialSettings;
use crate::error::TokenUnavailable;
use crate::metrics::Metrics;
use crate::telemetry::Telemetry;
use crate::token::verify::Jwks;
use crate::token::{OAuthCredential, Token, Tuning};

pub use static_header::StaticHeader;

/// A credential of the runtime. Shared (`Arc`) between the runtimes of successive reloads when
/// its settings did not change, so its cached token survives the reload.
#[derive(Debug)]
pub struct Credential {
    name: Arc<str>,
    settings: CredentialSettings,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    OAuth(Arc<OAuthCredential>),
    Header(StaticHeader),
}

/// What a credential sets on one upstream request.
#[derive(Debug, Clone)]
pub struct Injection {
    name: HeaderName,
    value: HeaderValue,
    /// The token the value came from, so that a 401 invalidates exactly that token.
    token: Option<Arc<Token>>,
}

impl Injection {
    /// Sets the credential's header on `headers`, replacing any value the client sent.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(self.name.clone(), self.value.clone());
    }
}

/// What the shared resources of a runtime build lend to its credentials.
#[derive(Debug)]
pub struct Resources<'a> {
    /// The HTTP client for token endpoints and JWKS.
    pub http: &'a reqwest::Client,
    /// The token lifecycle's timings.
    pub tuning: &'a Tuning,
    /// Where token outcomes are counted.
    pub metrics: &'a Arc<Metrics>,
    /// JWKS caches by URL, shared by the credentials that use the same one.
    pub jwks: BTreeMap<String, Arc<Jwks>>,
    /// The tracer, for the refreshers' spans.
    pub telemetry: Option<&'a Telemetry>,
    /// The fleet, with which OAuth credentials share their tokens.
    pub cluster: Option<&'a Cluster>,
}

/// The task that keeps a credential usable (the token refresher), when its kind has one.
pub type Background = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Credential {
    /// The credential `name` with `settings`: `previous` itself when it was built from the same
    /// settings (so it keeps its cached token), otherwise a new one.
    pub fn build(
        name: &str,
        settings: &CredentialSettings,
        previous: Option<&Arc<Credential>>,
        resources: &mut Resources<'_>,
    ) -> Result<Arc<Credential>, String> {
        if let Some(previous) = previous.filter(|p| &p.settings == settings) {
            return Ok(Arc::clone(previous));
        }
        let kind = match settings {
            CredentialSettings::OAuth(s) => {
                let jwks = resources
                    .jwks
                    .entry(s.jwks_url.to_string())
                    .or_insert_with(|| {
                        Arc::new(Jwks::new(s.jwks_url.clone(), resources.http.clone()))
                    })
                    .clone();
                resources.metrics.register_credential(&Arc::from(name));
                let shared = resources.cluster.and_then(|cluster| {
                    // Everything that decides which token the endpoint issues and how it is
                    // checked: a change (a new scope, say) never adopts the old token.
                    let identity = format!(
                        "{}\n{}\n{}\n{:?}\n{}\n{}",
                        s.token_url, s.client_id, s.audience, s.extra_params, s.issuer, s.jwks_url
                    );
                    cluster.shared_tokens(name, &identity, &s.client_secret)
                });
                Kind::OAuth(Arc::new(
                    OAuthCredential::new(
                        name,
                        s.clone(),
                        resources.http.clone(),
                        jwks,
                        resources.tuning.clone(),
                        Arc::clone(resources.metrics),
                        resources.telemetry.cloned(),
                    )
                    .with_fleet(shared),
                ))
            }
            CredentialSettings::Header(h) => Kind::Header(StaticHeader::new(name, h)?),
        };
        Ok(Arc::new(Credential {
            name: Arc::from(name),
            settings: settings.clone(),
            kind,
        }))
    }

    /// The credential's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What to set on an upstream request. Never waits on the network unless the token cache
    /// is cold; then all waiters share one fetch.
    pub async fn injection(&self) -> Result<Injection, TokenUnavailable> {
        match &self.kind {
            Kind::OAuth(c) => {
                let token = c.token().await?;
                Ok(Injection {
                    name: AUTHORIZATION,
                    value: token.authorization.clone(),
                    token: Some(token),
                })
            }
            Kind::Header(h) => Ok(h.injection()),
        }
    }

    /// Whether a request refused with 401 may be replayed with a fresh credential: only one that
    /// can obtain a fresh one.
    pub fn may_replay(&self) -> bool {
        match &self.kind {
            Kind::OAuth(_) => true,
            Kind::Header(_) => false,
        }
    }

    /// After the upstream answered 401 to `used`: drops it (only if it is still the cached one,
    /// and within the forced-refresh limit) and, when `replay` is wanted, returns a different,
    /// fresh injection to replay the request with. `None`: the 401 goes back to the client.
    pub async fn after_unauthorized(&self, used: &Injection, replay: bool) -> Option<Injection> {
        let (Kind::OAuth(c), Some(token)) = (&self.kind, &used.token) else {
            return None;
        };
        if !c.invalidate(token) || !replay {
            return None;
        }
        match c.token().await {
            // Compared by value: in a fleet the same token may come back in a new `Arc`.
            Ok(fresh) if fresh.authorization != token.authorization => Some(Injection {
                name: AUTHORIZATION,
                value: fresh.authorization.clone(),
                token: Some(fresh),
            }),
            _ => None,
        }
    }

    /// Whether the credential can serve requests now.
    pub fn is_up(&self) -> bool {
        match &self.kind {
            Kind::OAuth(c) => c.current().is_some(),
            Kind::Header(_) => true,
        }
    }

    /// Until its token expires, for `token_expiry_seconds` (zero without a token); `None` for
    /// kinds without a token.
    pub fn expires_in(&self, now: SystemTime) -> Option<std::time::Duration> {
        match &self.kind {
            Kind::OAuth(c) => Some(c.current().map_or(std::time::Duration::ZERO, |t| {
                t.expires_at.duration_since(now).unwrap_or_default()
            })),
            Kind::Header(_) => None,
        }
    }

    /// Whether the credential has been up at least once since it was built (at start, or by
    /// the reload that added or changed it).
    pub fn has_been_up(&self) -> bool {
        match &self.kind {
            Kind::OAuth(c) => c.has_held_token(),
            Kind::Header(_) => true,
        }
    }

    /// Why the credential is down, for `/readyz`; `None` while it is up.
    pub fn down_reason(&self) -> Option<String> {
        match &self.kind {
            Kind::OAuth(c) if c.current().is_none() => Some(match c.status().last_error {
                Some(code) => format!(
                    "credential {} has no valid token (last error: {code})",
                    self.name
                ),
                None => format!("credential {} has no valid token yet", self.name),
            }),
            Kind::OAuth(_) | Kind::Header(_) => None,
        }
    }

    /// The task that keeps it usable, to be spawned once per credential (not per runtime).
    pub fn background(&self, stop: watch::Receiver<bool>) -> Option<Background> {
        match &self.kind {
            Kind::OAuth(c) => Some(Box::pin(Arc::clone(c).run_refresher(stop))),
            Kind::Header(_) => None,
        }
    }

    /// Its entry on `/status`: names, URLs, times and error codes, never a secret.
    pub fn describe(&self, now: SystemTime) -> serde_json::Value {
        let mut entry = match &self.kind {
            Kind::OAuth(c) => c.describe(now),
            Kind::Header(h) => h.describe(),
        };
        entry["name"] = serde_json::Value::from(self.name.as_ref());
        entry["up"] = serde_json::Value::from(self.is_up());
        entry
    }

    /// For `check --fetch`: obtains and verifies what it injects, and says so in one line
    /// (`token OK, expires in ..., scopes: ...`), never showing the value. `Err` when it cannot.
    pub async fn check(&self) -> Result<String, String> {
        match &self.kind {
            Kind::OAuth(c) => {
                let stop = watch::channel(false);
                let refresher = tokio::spawn(Arc::clone(c).run_refresher(stop.1));
                let result = c.check().await;
                refresher.abort();
                result
            }
            Kind::Header(h) => Ok(h.check()),
        }
    }

    /// The `oauth` machinery, for tests and benchmarks that look at the token cache itself.
    pub fn oauth(&self) -> Option<&Arc<OAuthCredential>> {
        match &self.kind {
            Kind::OAuth(c) => Some(c),
            Kind::Header(_) => None,
        }
    }
}
