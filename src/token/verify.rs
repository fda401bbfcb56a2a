//! JWT verification against a cached JWKS.
//!
//! A token is accepted only when its header names an allowed asymmetric algorithm and a `kid`
//! found in the issuer's JWKS, its signature verifies, and `iss`, `aud`, `exp` (and `nbf` when
//! present) hold within the leeway. `alg: none` cannot even be parsed into an algorithm, and
//! HMAC algorithms are refused before any key is looked at.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Why a token was refused; the label of `token_verification_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not three base64url parts of JSON, or claims of the wrong type.
    #[error("token is malformed")]
    Malformed,
    /// `none`, HMAC, or an algorithm not in the credential's `algorithms`.
    #[error("token algorithm is not allowed")]
    Algorithm,
    /// No `kid`, or a `kid` the JWKS does not hold even after a refetch.
    #[error("token key id is not in the JWKS")]
    UnknownKid,
    /// The JWKS could not be fetched and holds no key for this token.
    #[error("the JWKS could not be fetched")]
    JwksUnavailable,
    /// The signature does not verify.
    #[error("token signature is invalid")]
    Signature,
    /// `exp` has passed.
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token is not valid yet")]
    NotYetValid,
    /// `iss` is not the expected issuer.
    #[error("token issuer is wrong")]
    Issuer,
    /// `aud` does not contain the requested audience.
    #[error("token audience is wrong")]
    Audience,
}

impl VerifyError {
    /// Stable label for metrics and status.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Malformed => "malformed",
            VerifyError::Algorithm => "algorithm",
            VerifyError::UnknownKid => "unknown_kid",
            VerifyError::JwksUnavailable => "jwks_unavailable",
            VerifyError::Signature => "signature",
            VerifyError::Expired => "expired",
            VerifyError::NotYetValid => "not_yet_valid",
            VerifyError::Issuer => "issuer",
            VerifyError::Audience => "audience",
        }
    }
}

/// The claims the proxy reads from a verified token.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    /// Expiry, seconds since the UNIX epoch.
    pub exp: u64,
    /// Not-before, when present.
    #[serde(default)]
    pub nbf: Option<u64>,
    /// Issued-at, when present.
    #[serde(default)]
    pub iat: Option<u64>,
    /// Granted scopes, when present.
    #[serde(default)]
    pub scope: Option<String>,
}

/// What a token must satisfy.
#[derive(Debug, Clone)]
pub struct Expectations {
    /// Exact `iss`.
    pub issuer: String,
    /// Required member of `aud`.
    pub audience: String,
    /// Allowed algorithms (never `none` or HMAC; the config refuses them too).
    pub algorithms: Vec<Algorithm>,
    /// Clock-skew tolerance.
    pub leeway: Duration,
}

/// A JWKS fetched from one URL and cached; shared by the credentials that use that URL.
#[derive(Debug)]
pub struct Jwks {
    url: reqwest::Url,
    http: reqwest::Client,
    keys: ArcSwap<KeySet>,
    refetch: tokio::sync::Mutex<()>,
    max_age: Duration,
    min_refetch_interval: Duration,
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, DecodingKey>,
    fetched_at: Option<Instant>,
    /// Last refetch caused by an unknown `kid`.
    kid_refetch_at: Option<Instant>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("fetched_at", &self.fetched_at)
            .finish()
    }
}

/// A JWKS older than this is refetched before use.
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(3600);
/// An unknown `kid` triggers at most one refetch per this interval.
pub const JWKS_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(10);

impl Jwks {
    /// A cache for the JWKS at `url`, empty until first use.
    pub fn new(url: reqwest::Url, http: reqwest::Client) -> Jwks {
        Jwks {
            url,
            http,
            keys: ArcSwap::from_pointee(KeySet::default()),
            refetch: tokio::sync::Mutex::new(()),
            max_age: JWKS_MAX_AGE,
            min_refetch_interval: JWKS_MIN_REFETCH_INTERVAL,
        }
    }

    /// The JWKS URL.
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// The key for `kid`, refetching the set when it is stale or does not know the `kid`.
    ///
    /// Refetches caused by unknown `kid`s are limited to one per `min_refetch_interval`, so a
    /// stream of tokens with made-up `kid`s cannot hammer the JWKS endpoint; the scheduled and
    /// first fetches do not count against that limit.
    async fn key(&self, kid: &str) -> Result<DecodingKey, VerifyError> {
        let requested_at = Instant::now();
        {
            let set = self.keys.load();
            if self.is_fresh(&set) {
                if let Some(key) = set.keys.get(kid) {
                    return Ok(key.clone());
                }
            }
        }
        // One refetch at a time; whoever waited behind it uses its result.
        let _guard = self.refetch.lock().await;
        let set = self.keys.load_full();
        if set.fetched_at.is_some_and(|t| t >= requested_at) {
            return set.keys.get(kid).cloned().ok_or(VerifyError::UnknownKid);
        }
        let for_unknown_kid = self.is_fresh(&set);
        if for_unknown_kid
            && set
                .kid_refetch_at
                .is_some_and(|t| t.elapsed() < self.min_refetch_interval)
        {
            return Err(VerifyError::UnknownKid);
        }
        match self.fetch().await {
            Ok(mut new_set) => {
                new_set.kid_refetch_at = if for_unknown_kid {
                    Some(Instant::now())
                } else {
                    set.kid_refetch_at
                };
                let key = new_set.keys.get(kid).cloned();
                self.keys.store(Arc::new(new_set));
                key.ok_or(VerifyError::UnknownKid)
            }
            Err(e) => {
                tracing::warn!(jwks_url = %self.url, error = %e, "JWKS fetch failed");
                // A key from the previous set (fetched from the same configured URL) still
                // verifies signatures; with none, nothing is accepted.
                set.keys
                    .get(kid)
                    .cloned()
                    .ok_or(VerifyError::JwksUnavailable)
            }
        }
    }

    fn is_fresh(&self, set: &KeySet) -> bool {
        set.fetched_at.is_some_and(|t| t.elapsed() < self.max_age)
    }

    async fn fetch(&self) -> Result<KeySet, Box<dyn std::error::Error + Send + Sync>> {
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<serde_json::Value>,
        }
        let response = self
            .http
            .get(self.url.clone())
            .send()
            .await
            .map_err(|e| e.without_url())?
            .error_for_status()
            .map_err(|e| e.without_url())?;
        let raw: RawSet = serde_json::from_slice(&response.bytes().await?)?;
        let mut keys = HashMap::new();
        for value in raw.keys {
            // Keys of types we cannot use are skipped, not fatal.
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            if let Ok(key) = DecodingKey::from_jwk(&jwk) {
                keys.insert(kid, key);
            }
        }
        tracing::debug!(jwks_url = %self.url, keys = keys.len(), "JWKS fetched");
        Ok(KeySet {
            keys,
            fetched_at: Some(Instant::now()),
            kid_refetch_at: None,
        })
    }

    /// Verifies `token` against this JWKS and `expect`.
    pub async fn verify(&self, token: &str, expect: &Expectations) -> Result<Claims, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => VerifyError::Algorithm,
            _ => VerifyError::Malformed,
        })?;
        if is_symmetric(header.alg) || !expect.algorithms.contains(&header.alg) {
            return Err(VerifyError::Algorithm);
        }
        let kid = header.kid.ok_or(VerifyError::UnknownKid)?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[&expect.issuer]);
        validation.set_audience(&[&expect.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = expect.leeway.as_secs();
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::InvalidSignature => VerifyError::Signature,
            ErrorKind::ExpiredSignature => VerifyError::Expired,
            ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
            ErrorKind::InvalidIssuer => VerifyError::Issuer,
            ErrorKind::InvalidAudience => VerifyError::Audience,
            ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidAlgorithmName
            | ErrorKind::MissingAlgorithm => VerifyError::Algorithm,
            _ => VerifyError::Malformed,
        })?;
        Ok(data.claims)
    }
}

fn is_symmetric(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}
