//! The emulator's token side: the fixed signing keys and their rotation, token signing (good
//! tokens and every bad kind a [`TokenFault`] asks for), the `POST /oauth/token` endpoint with
//! Auth0's request and error shapes, the JWKS endpoint, and the token check the emulated APIs use.

use super::token_request::{parse_token_request, TokenParams};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::http::{fault_status, json_response, ResponseBody};
use super::{lock, unix_now, Shared, TokenFault, TokenRequestRecord, DEFAULT_AUDIENCE};

/// Where the token endpoint listens.
const TOKEN_PATH: &str = "/oauth/token";
/// Where the JWKS is published.
const JWKS_PATH: &str = "/.well-known/jwks.json";
/// The `scope` of issued tokens, as Sitecore grants an automation client.
const SCOPE: &str = "xmcloud.cm:admin xmclouddeploy.projects:manage \
    xmclouddeploy.environments:manage xmclouddeploy.deployments:manage \
    xmclouddeploy.organizations:read edge.tokens:manage edge.admin:manage ai.org:admin";
/// Token request bodies are small; anything larger is refused as malformed.
const MAX_TOKEN_REQUEST_BODY: usize = 64 * 1024;
/// The secret of [`TokenFault::Hs256`] tokens.
const HS256_SECRET: &[u8] = b"emulator-hs256-fault-secret";
/// How many verified tokens the emulated APIs remember (an RSA check per request is the
/// emulator's main cost in benchmarks).
const VERIFIED_CACHE_LIMIT: usize = 4096;

/// `(kid, PKCS#8 PEM, base64url modulus)` of the fixed keys. The last is never published.
const KEY_FILES: [(&str, &str, &str); 4] = [
    (
        "emulator-key-1",
        include_str!("keys/key1.pem"),
        include_str!("keys/key1.n"),
    ),
    (
        "emulator-key-2",
        include_str!("keys/key2.pem"),
        include_str!("keys/key2.n"),
    ),
    (
        "emulator-key-3",
        include_str!("keys/key3.pem"),
        include_str!("keys/key3.n"),
    ),
    (
        "emulator-key-unknown",
        include_str!("keys/key4.pem"),
        include_str!("keys/key4.n"),
    ),
];
/// Keys `0..ROTATING_KEYS` take turns; the next one signs the unknown-kid faults.
const ROTATING_KEYS: usize = 3;
const UNKNOWN_KEY: usize = 3;

struct SigningKey {
    kid: &'static str,
    n: &'static str,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// Which key signs, which are published, and a generation that changes on every rotation.
#[derive(Clone, Copy)]
struct Rotation {
    active: usize,
    previous: Option<usize>,
    generation: u64,
}

/// The fixed signing keys and the rotation state.
pub(super) struct KeyRing {
    keys: Vec<SigningKey>,
    rotation: Mutex<Rotation>,
}

impl KeyRing {
    /// Parses the embedded keys.
    pub(super) fn load() -> std::io::Result<Self> {
        let mut keys = Vec::with_capacity(KEY_FILES.len());
        for (kid, pem, n) in KEY_FILES {
            let n = n.trim();
            let encoding =
                EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(std::io::Error::other)?;
            let decoding =
                DecodingKey::from_rsa_components(n, "AQAB").map_err(std::io::Error::other)?;
            keys.push(SigningKey {
                kid,
                n,
                encoding,
                decoding,
            });
        }
        Ok(KeyRing {
            keys,
            rotation: Mutex::new(Rotation {
                active: 0,
                previous: None,
                generation: 0,
            }),
        })
    }

    fn rotation(&self) -> Rotation {
        *lock(&self.rotation)
    }

    fn key(&self, index: usize) -> Option<&SigningKey> {
        self.keys.get(index)
    }

    /// Moves signing to the next rotating key and publishes it with the previous one.
    pub(super) fn rotate(&self) {
        let mut rotation = lock(&self.rotation);
        rotation.previous = Some(rotation.active);
        rotation.active = (rotation.active + 1) % ROTATING_KEYS;
        rotation.generation += 1;
    }

    /// The `kid` of the signing key.
    pub(super) fn active_kid(&self) -> &'static str {
        self.key(self.rotation().active).map_or("", |k| k.kid)
    }

    /// The published keys, the active one first.
    fn published(&self, rotation: Rotation) -> impl Iterator<Item = &SigningKey> {
        [Some(rotation.active), rotation.previous]
            .into_iter()
            .flatten()
            .filter_map(|index| self.key(index))
    }
}

/// The claims of every token the emulator issues.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: String,
    azp: &'a str,
    iat: u64,
    exp: u64,
    scope: &'a str,
    jti: String,
}

impl<'a> Claims<'a> {
    fn new(shared: &'a Shared, client_id: &'a str, audience: &'a str, lifetime: u64) -> Self {
        let now = unix_now();
        Claims {
            iss: &shared.settings.issuer,
            aud: audience,
            sub: format!("{client_id}@clients"),
            azp: client_id,
            iat: now,
            exp: now.saturating_add(lifetime),
            scope: SCOPE,
            jti: hex::encode(rand::random::<[u8; 16]>()),
        }
    }
}

/// The claims the emulated APIs read after jsonwebtoken has checked `iss`, `aud` and `exp`.
#[derive(Deserialize)]
struct CheckedClaims {
    azp: Option<String>,
    sub: Option<String>,
    exp: u64,
}

/// A token that passed the check, remembered for its generation of published keys.
pub(super) struct Verified {
    client_id: String,
    exp: u64,
    generation: u64,
}

/// The checks the emulated APIs apply: RS256 only, this issuer, one of these audiences, `exp`
/// with no leeway.
pub(super) fn validation(issuer: &str, audiences: &[String]) -> Validation {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.leeway = 0;
    validation.set_issuer(&[issuer]);
    validation.set_audience(audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation
}

/// Checks a bearer token against the currently published keys; returns the client id (`azp`).
pub(super) fn verify(shared: &Shared, token: &str) -> Option<String> {
    let now = unix_now();
    let rotation = shared.keys.rotation();
    if let Some(hit) = lock(&shared.verified).get(token) {
        if hit.generation == rotation.generation && hit.exp >= now {
            return Some(hit.client_id.clone());
        }
    }
    let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
    let key = shared.keys.published(rotation).find(|k| k.kid == kid)?;
    let claims = jsonwebtoken::decode::<CheckedClaims>(token, &key.decoding, &shared.validation)
        .ok()?
        .claims;
    let client_id = match (claims.azp, claims.sub) {
        (Some(azp), _) => azp,
        (None, Some(sub)) => sub.strip_suffix("@clients").unwrap_or(&sub).to_owned(),
        (None, None) => String::new(),
    };
    let mut cache = lock(&shared.verified);
    if cache.len() >= VERIFIED_CACHE_LIMIT {
        cache.clear();
    }
    cache.insert(
        token.to_owned(),
        Verified {
            client_id: client_id.clone(),
            exp: claims.exp,
            generation: rotation.generation,
        },
    );
    Some(client_id)
}

/// Signs claims with one of the ring's keys under its `kid`.
fn sign_rsa(
    shared: &Shared,
    key_index: usize,
    claims: &Claims<'_>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let key = shared
        .keys
        .key(key_index)
        .ok_or(jsonwebtoken::errors::ErrorKind::InvalidRsaKey(String::new()))?;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(key.kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key.encoding)
}

/// A good token, signed by the active key.
pub(super) fn mint(
    shared: &Shared,
    client_id: &str,
    audience: &str,
    lifetime: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let claims = Claims::new(shared, client_id, audience, lifetime.as_secs());
    sign_rsa(shared, shared.keys.rotation().active, &claims)
}

/// A bad token of the kind the fault names, or `None` when the fault is not about the token.
fn fault_token(
    shared: &Shared,
    fault: &TokenFault,
    client_id: &str,
    audience: &str,
) -> Option<Result<String, jsonwebtoken::errors::Error>> {
    let lifetime = shared.settings.token_lifetime.as_secs();
    let mut claims = Claims::new(shared, client_id, audience, lifetime);
    let active = shared.keys.rotation().active;
    let token = match fault {
        TokenFault::WrongAudience => {
            claims.aud = "https://wrong.example";
            sign_rsa(shared, active, &claims)
        }
        TokenFault::WrongIssuer => {
            claims.iss = "https://evil.example/";
            sign_rsa(shared, active, &claims)
        }
        TokenFault::Expired => {
            claims.iat = claims.iat.saturating_sub(7200);
            claims.exp = claims.iat + 3600;
            sign_rsa(shared, active, &claims)
        }
        TokenFault::UnknownKid => sign_rsa(shared, UNKNOWN_KEY, &claims),
        TokenFault::AlgNone => {
            let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
            let payload = serde_json::to_vec(&claims).map(|p| URL_SAFE_NO_PAD.encode(p));
            payload
                .map(|payload| format!("{header}.{payload}."))
                .map_err(Into::into)
        }
        TokenFault::Hs256 => {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(shared.keys.active_kid().to_owned());
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(HS256_SECRET))
        }
        TokenFault::Status(_)
        | TokenFault::AccessDenied
        | TokenFault::RateLimited { .. }
        | TokenFault::Delay(_)
        | TokenFault::MalformedBody
        | TokenFault::NoExpiresIn => return None,
    };
    Some(token)
}

/// Serves the token endpoint and the JWKS.
pub(super) async fn handle(shared: &Shared, request: Request<Incoming>) -> Response<ResponseBody> {
    let path = request.uri().path();
    if path == TOKEN_PATH {
        shared.token_requests.fetch_add(1, Ordering::Relaxed);
        if request.method() == Method::POST {
            token_endpoint(shared, request).await
        } else {
            let record = TokenRequestRecord {
                content_type: content_type(&request).to_owned(),
                client_id: None,
                audience: None,
                grant_type: None,
                basic_auth: false,
                secret_in_body: false,
                outcome_status: StatusCode::METHOD_NOT_ALLOWED.as_u16(),
            };
            shared.record_token_request(record);
            method_not_allowed("POST")
        }
    } else if path == JWKS_PATH {
        if request.method() == Method::GET || request.method() == Method::HEAD {
            shared.jwks_requests.fetch_add(1, Ordering::Relaxed);
            jwks(shared)
        } else {
            method_not_allowed("GET")
        }
    } else {
        json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"}))
    }
}

fn content_type<B>(request: &Request<B>) -> &str {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

fn method_not_allowed(allow: &'static str) -> Response<ResponseBody> {
    let mut response = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({"error": "method_not_allowed"}),
    );
    response
        .headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    response
}

fn jwks(shared: &Shared) -> Response<ResponseBody> {
    let keys: Vec<serde_json::Value> = shared
        .keys
        .published(shared.keys.rotation())
        .map(|key| {
            json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": key.kid, "n": key.n, "e": "AQAB"})
        })
        .collect();
    json_response(StatusCode::OK, &json!({ "keys": keys }))
}

async fn token_endpoint(shared: &Shared, request: Request<Incoming>) -> Response<ResponseBody> {
    let content_type = content_type(&request).to_owned();
    let basic = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::inbound::basic_credentials);
    let body = Limited::new(request.into_body(), MAX_TOKEN_REQUEST_BODY)
        .collect()
        .await
        .map(|collected| collected.to_bytes());
    let mut params = body
        .ok()
        .and_then(|body| parse_token_request(&content_type, &body));
    let secret_in_body = params.as_ref().is_some_and(|p| p.client_secret.is_some());
    let basic_auth = basic.is_some();
    if let Some((id, secret)) = basic {
        // RFC 6749 section 2.3: one authentication method per request; both is malformed.
        params = params.and_then(|mut p| {
            p.set("client_id", id)?;
            p.set("client_secret", secret)?;
            Some(p)
        });
    }
    let mut record = TokenRequestRecord {
        basic_auth,
        secret_in_body,
        content_type,
        client_id: params.as_ref().and_then(|p| p.client_id.clone()),
        audience: params.as_ref().and_then(|p| p.audience.clone()),
        grant_type: params.as_ref().and_then(|p| p.grant_type.clone()),
        outcome_status: 0,
    };
    let fault = lock(&shared.token_faults).next();
    let response = answer(shared, params, fault).await;
    record.outcome_status = response.status().as_u16();
    shared.record_token_request(record);
    response
}

/// The answer to a token request, with the fault applied.
async fn answer(
    shared: &Shared,
    params: Option<TokenParams>,
    fault: Option<TokenFault>,
) -> Response<ResponseBody> {
    match &fault {
        Some(TokenFault::Status(code)) => {
            let status = fault_status(*code);
            let description = format!("Emulated failure (status {})", status.as_u16());
            return auth0_error(status, "server_error", &description);
        }
        Some(TokenFault::AccessDenied) => return access_denied(),
        Some(TokenFault::RateLimited { retry_after_secs }) => {
            return rate_limited(*retry_after_secs);
        }
        Some(TokenFault::MalformedBody) => {
            let mut response = Response::new(ResponseBody::Full(Some(Bytes::from_static(
                b"{\"access_token\":\"eyJhbGciOiJSUzI1NiIs",
            ))));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return response;
        }
        Some(TokenFault::Delay(delay)) => tokio::time::sleep(*delay).await,
        _ => {}
    }

    let Some(params) = params else {
        return auth0_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request body is malformed.",
        );
    };
    match params.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(_) => {
            return auth0_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "Unsupported grant type.",
            );
        }
        None => {
            return auth0_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing required parameter: grant_type",
            );
        }
    }
    let Some(client_id) = params.client_id.as_deref() else {
        return auth0_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Missing required parameter: client_id",
        );
    };
    let known_secret = shared.settings.clients.get(client_id);
    if known_secret.is_none() || known_secret != params.client_secret.as_ref() {
        return access_denied();
    }
    let audience = params.audience.as_deref().unwrap_or(DEFAULT_AUDIENCE);

    let lifetime = shared.settings.token_lifetime;
    let (token, good) = match fault
        .as_ref()
        .and_then(|f| fault_token(shared, f, client_id, audience))
    {
        Some(token) => (token, false),
        None => (mint(shared, client_id, audience, lifetime), true),
    };
    let token = match token {
        Ok(token) => token,
        Err(error) => {
            tracing::error!(%error, "emulator could not sign a token");
            return auth0_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "Signing failed.",
            );
        }
    };
    if good {
        shared.token_requests_ok.fetch_add(1, Ordering::Relaxed);
    }
    let mut body = json!({"access_token": token, "scope": SCOPE, "token_type": "Bearer"});
    if !matches!(fault, Some(TokenFault::NoExpiresIn)) {
        body["expires_in"] = json!(lifetime.as_secs());
    }
    let mut response = json_response(StatusCode::OK, &body);
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}

fn auth0_error(status: StatusCode, error: &str, description: &str) -> Response<ResponseBody> {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

fn access_denied() -> Response<ResponseBody> {
    auth0_error(StatusCode::UNAUTHORIZED, "access_denied", "Unauthorized")
}

fn rate_limited(retry_after_secs: u64) -> Response<ResponseBody> {
    let mut response = auth0_error(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_requests",
        "Global limit has been reached",
    );
    let reset = unix_now().saturating_add(retry_after_secs);
    let headers = response.headers_mut();
    headers.insert(
        http::header::RETRY_AFTER,
        HeaderValue::from(retry_after_secs),
    );
    headers.insert("x-ratelimit-limit", HeaderValue::from_static("10"));
    headers.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
    headers.insert("x-ratelimit-reset", HeaderValue::from(reset));
    response
}
