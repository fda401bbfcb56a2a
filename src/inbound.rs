//! Inbound authentication: client keys, the local token endpoint, and the typed client identity.
//!
//! A client presents its key as `Authorization: Bearer <key>` or `X-Api-Key: <key>`, or a token
//! that the local token endpoint issued. Keys are compared as SHA-256 digests. The first 8 bytes
//! of the presented key's digest find, in a hash map, the clients whose digests begin with them
//! (almost always one or none), and those are compared in full, in constant time. So the cost of
//! a check does not grow with the number of clients (a constant-time scan of every client cost
//! 358k instructions per request at 1,000 clients). The lookup's timing could only say whether
//! some client's digest shares 64 bits with the presented key's digest, which tells nothing
//! about any key; the digests themselves are not secrets either (see below). Issued tokens find
//! their client by name, in a hash map too.
//!
//! Issued tokens are `scap1.<base64url(name)>.<exp>.<base64url(mac)>`. The MAC key of a client is
//! derived from the configuration: HMAC-SHA256 over the secrets of every credential in use
//! (sorted by name) and the client's own key hash. So every replica with the same configuration
//! accepts every other replica's tokens without shared state, and rotating a client's key (or
//! any credential secret) revokes its tokens. Knowing the `key_sha256` values alone (they may sit
//! in a ConfigMap) is not enough to forge one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::body::ProxyBody;
use crate::config::Config;
use crate::limits::{ClientLimits, Limits};
use crate::secret::Secret;

/// Who is calling: put into request extensions once authenticated.
#[derive(Debug)]
pub struct ClientIdentity {
    /// The client's configured name.
    pub name: Arc<str>,
    routes: Option<HashSet<String>>,
    /// Its rate and in-flight limits; `None` for clients built without a limits registry.
    pub limits: Option<Arc<ClientLimits>>,
}

impl ClientIdentity {
    /// Whether this client may use the route with `prefix`.
    pub fn may_use(&self, prefix: &str) -> bool {
        self.routes.as_ref().is_none_or(|r| r.contains(prefix))
    }
}

struct Client {
    identity: Arc<ClientIdentity>,
    key_sha256: [u8; 32],
    mac_key: hmac::Key,
}

/// Lifetime of tokens issued by the local token endpoint, as Sitecore's own.
pub const ISSUED_TOKEN_LIFETIME: Duration = Duration::from_secs(86_400);

const TOKEN_PREFIX: &str = "scap1.";
const DERIVATION_LABEL: &[u8] = b"sitecore-auth-proxy/local-token/v1";

/// The configured clients.
pub struct Clients {
    clients: Vec<Client>,
    /// Indices into `clients` by the first 8 bytes of their key digest.
    by_digest: HashMap<u64, Vec<usize>>,
    /// Indices into `clients` by name (names are unique: the config checks).
    by_name: HashMap<Arc<str>, usize>,
    lifetime: Duration,
}

/// The first 8 bytes of a key digest, the key of [`Clients::by_digest`].
fn digest_prefix(digest: &[u8; 32]) -> u64 {
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(prefix)
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.clients.iter().map(|c| &c.identity.name))
            .finish()
    }
}

/// Why inbound authentication failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No or a wrong key or token: 401.
    Unauthorized,
}

impl Clients {
    /// The clients of `config`; `None` when it has no `[[clients]]`.
    pub fn from_config(config: &Config) -> Option<Clients> {
        Clients::with_limits(config, None)
    }

    /// The clients of `config`, each with its state in `limits`.
    pub fn with_limits(config: &Config, limits: Option<&Limits>) -> Option<Clients> {
        if config.clients.is_empty() {
            return None;
        }
        let mut master =
            hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, DERIVATION_LABEL));
        for name in config.used_credentials() {
            let Some(secret) = config.credentials.get(name).map(|c| c.secret().expose()) else {
                continue;
            };
            master.update(&(name.len() as u64).to_be_bytes());
            master.update(name.as_bytes());
            master.update(&(secret.len() as u64).to_be_bytes());
            master.update(secret.as_bytes());
        }
        let master = master.sign();
        let master = hmac::Key::new(hmac::HMAC_SHA256, master.as_ref());
        let clients: Vec<Client> = config
            .clients
            .iter()
            .map(|c| {
                let mut derivation = hmac::Context::with_key(&master);
                derivation.update(&c.key_sha256);
                derivation.update(c.name.as_bytes());
                let client_key = derivation.sign();
                Client {
                    identity: Arc::new(ClientIdentity {
                        name: Arc::from(c.name.as_str()),
                        routes: c.routes.as_ref().map(|r| r.iter().cloned().collect()),
                        limits: limits.and_then(|l| l.client(&c.name)).cloned(),
                    }),
                    key_sha256: c.key_sha256,
                    mac_key: hmac::Key::new(hmac::HMAC_SHA256, client_key.as_ref()),
                }
            })
            .collect();
        let mut by_digest: HashMap<u64, Vec<usize>> = HashMap::with_capacity(clients.len());
        let mut by_name = HashMap::with_capacity(clients.len());
        for (i, client) in clients.iter().enumerate() {
            by_digest
                .entry(digest_prefix(&client.key_sha256))
                .or_default()
                .push(i);
            by_name
                .entry(Arc::clone(&client.identity.name))
                .or_insert(i);
        }
        Some(Clients {
            clients,
            by_digest,
            by_name,
            lifetime: ISSUED_TOKEN_LIFETIME,
        })
    }

    /// The client whose key is `key`: the clients whose digests begin like the key's are
    /// compared in full, in constant time, without an early exit (with two clients of the same
    /// key, the later one wins, as in the configuration's order).
    pub fn check_key(&self, key: &str) -> Option<&Arc<ClientIdentity>> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let candidates = self.by_digest.get(&digest_prefix(&digest))?;
        let mut found = subtle::CtOption::new(0u32, 0u8.into());
        for &i in candidates {
            let hit = digest.ct_eq(&self.clients[i].key_sha256);
            let candidate = subtle::CtOption::new(i as u32, hit);
            found = subtle::CtOption::conditional_select(&found, &candidate, hit);
        }
        Option::<u32>::from(found).map(|i| &self.clients[i as usize].identity)
    }

    /// The client named `name`.
    fn named(&self, name: &str) -> Option<&Client> {
        self.by_name.get(name).map(|&i| &self.clients[i])
    }

    /// Authenticates a request from its headers: a client key or an issued token.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<ClientIdentity>, Denied> {
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .or_else(|| {
                headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::trim)
            })
            .filter(|v| !v.is_empty())
            .ok_or(Denied::Unauthorized)?;
        if presented.starts_with(TOKEN_PREFIX) {
            return self
                .verify_token(presented, SystemTime::now())
                .cloned()
                .ok_or(Denied::Unauthorized);
        }
        self.check_key(presented)
            .cloned()
            .ok_or(Denied::Unauthorized)
    }

    /// Issues a token for the client named `name`, expiring at `expires_at` (UNIX seconds).
    pub fn issue_token(&self, name: &str, expires_at: u64) -> Option<String> {
        let client = self.named(name)?;
        let payload = format!(
            "{TOKEN_PREFIX}{}.{expires_at}",
            URL_SAFE_NO_PAD.encode(name)
        );
        let tag = hmac::sign(&client.mac_key, payload.as_bytes());
        Some(format!(
            "{payload}.{}",
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        ))
    }

    /// The client an issued token belongs to, if its MAC verifies and it has not expired.
    pub fn verify_token(&self, token: &str, now: SystemTime) -> Option<&Arc<ClientIdentity>> {
        let rest = token.strip_prefix(TOKEN_PREFIX)?;
        let (payload_rest, mac) = rest.rsplit_once('.')?;
        let (name_b64, exp) = payload_rest.split_once('.')?;
        let name = String::from_utf8(URL_SAFE_NO_PAD.decode(name_b64).ok()?).ok()?;
        let expires_at: u64 = exp.parse().ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let client = self.named(&name)?;
        let signed = &token[..TOKEN_PREFIX.len() + payload_rest.len()];
        hmac::verify(&client.mac_key, signed.as_bytes(), &mac).ok()?;
        let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
        (now < expires_at).then_some(&client.identity)
    }

    /// Answers one request to the local token endpoint.
    pub fn token_endpoint(
        &self,
        content_type: Option<&str>,
        authorization: Option<&str>,
        body: &[u8],
    ) -> Response<ProxyBody> {
        let request = match parse_token_request(content_type, authorization, body) {
            Ok(r) => r,
            Err(TokenRequestError::UnsupportedGrantType) => {
                return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", None)
            }
            Err(TokenRequestError::Invalid) => {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", None)
            }
        };
        let client = self
            .check_key(request.client_secret.expose())
            .filter(|identity| *identity.name == *request.client_id);
        let Some(client) = client else {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "access_denied",
                Some("Unauthorized"),
            );
        };
        let expires_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + self.lifetime.as_secs();
        let Some(token) = self.issue_token(&client.name, expires_at) else {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "access_denied",
                Some("Unauthorized"),
            );
        };
        oauth_json(
            StatusCode::OK,
            serde_json::json!({
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": self.lifetime.as_secs(),
            }),
        )
    }
}

fn oauth_error(status: StatusCode, code: &str, description: Option<&str>) -> Response<ProxyBody> {
    let body = match description {
        Some(d) => serde_json::json!({ "error": code, "error_description": d }),
        None => serde_json::json!({ "error": code }),
    };
    oauth_json(status, body)
}

/// A token endpoint answer: JSON, never cached (RFC 6749 section 5.1).
fn oauth_json(status: StatusCode, body: serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A parsed client-credentials request to the local token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The client's name.
    pub client_id: String,
    /// The client's key.
    pub client_secret: Secret,
}

/// Why a local token request was refused before looking at credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRequestError {
    /// Malformed body, missing fields, repeated fields, unknown content type.
    Invalid,
    /// A grant type other than `client_credentials`.
    UnsupportedGrantType,
}

/// Parses Sitecore's token request shapes: form or JSON body, with the credentials in the body
/// or as HTTP Basic (`client_secret_basic`). `audience` and other fields are ignored.
pub fn parse_token_request(
    content_type: Option<&str>,
    authorization: Option<&str>,
    body: &[u8],
) -> Result<TokenRequest, TokenRequestError> {
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let mut grant_type = None;
    let mut client_id = None;
    let mut client_secret = None;
    let set = |slot: &mut Option<String>, value: String| -> Result<(), TokenRequestError> {
        if slot.replace(value).is_some() {
            return Err(TokenRequestError::Invalid);
        }
        Ok(())
    };
    match media.as_str() {
        "application/x-www-form-urlencoded" => {
            for (key, value) in form_urlencoded::parse(body) {
                match &*key {
                    "grant_type" => set(&mut grant_type, value.into_owned())?,
                    "client_id" => set(&mut client_id, value.into_owned())?,
                    "client_secret" => set(&mut client_secret, value.into_owned())?,
                    _ => {}
                }
            }
        }
        "application/json" => {
            let value: serde_json::Value =
                serde_json::from_slice(body).map_err(|_| TokenRequestError::Invalid)?;
            let object = value.as_object().ok_or(TokenRequestError::Invalid)?;
            let field = |name: &str| -> Result<Option<String>, TokenRequestError> {
                match object.get(name) {
                    None | Some(serde_json::Value::Null) => Ok(None),
                    Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(TokenRequestError::Invalid),
                }
            };
            grant_type = field("grant_type")?;
            client_id = field("client_id")?;
            client_secret = field("client_secret")?;
        }
        _ => return Err(TokenRequestError::Invalid),
    }
    if let Some((id, secret)) = authorization.and_then(basic_credentials) {
        if client_id.is_some() || client_secret.is_some() {
            return Err(TokenRequestError::Invalid);
        }
        client_id = Some(id);
        client_secret = Some(secret);
    }
    match grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(_) => return Err(TokenRequestError::UnsupportedGrantType),
        None => return Err(TokenRequestError::Invalid),
    }
    match (client_id, client_secret) {
        (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => Ok(TokenRequest {
            client_id: id,
            client_secret: Secret::new(secret),
        }),
        _ => Err(TokenRequestError::Invalid),
    }
}

/// `Basic base64(id:secret)` with both parts form-decoded, as RFC 6749 section 2.3.1 says.
pub(crate) fn basic_credentials(header: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| -> String {
        form_urlencoded::parse(format!("v={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((unescape(id), unescape(secret)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config with one route and `clients` (name, `key = "..."` or `key_sha256 = "..."`).
    fn config_with(clients: &[(String, String)]) -> Config {
        let mut text = String::from(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n\
             [credentials.automation]\nclient_id = \"id\"\nclient_secret = \"secret\"\n\n\
             [[routes]]\nprefix = \"/deploy\"\nupstream = \"https://xmclouddeploy-api.sitecorecloud.io\"\n\
             credential = \"automation\"\n",
        );
        for (name, key) in clients {
            text.push_str(&format!("\n[[clients]]\nname = \"{name}\"\n{key}\n"));
        }
        Config::parse(&text, std::path::Path::new("clients.toml"), &|_| None).expect("config")
    }

    #[test]
    fn each_of_a_thousand_clients_is_found_by_its_key_and_by_its_issued_token() {
        let clients: Vec<(String, String)> = (0..1000)
            .map(|i| (format!("client-{i}"), format!("key = \"key-{i}-7f3a\"")))
            .collect();
        let clients = Clients::from_config(&config_with(&clients)).expect("clients");
        for i in 0..1000 {
            let found = clients
                .check_key(&format!("key-{i}-7f3a"))
                .expect("known key");
            assert_eq!(&*found.name, format!("client-{i}"));
        }
        assert!(clients.check_key("key-1000-7f3a").is_none());
        assert!(clients.check_key("").is_none());
        let later = SystemTime::now() + Duration::from_secs(60);
        let expires_at = later.duration_since(UNIX_EPOCH).expect("clock").as_secs();
        for name in ["client-0", "client-999"] {
            let token = clients.issue_token(name, expires_at).expect("issued");
            let found = clients
                .verify_token(&token, SystemTime::now())
                .expect("valid");
            assert_eq!(&*found.name, name);
        }
        assert!(clients.issue_token("client-1000", expires_at).is_none());
    }

    #[test]
    fn clients_whose_digests_begin_alike_are_told_apart_by_the_whole_digest() {
        let digest: [u8; 32] = Sha256::digest(b"alpha-key").into();
        // Digests sharing alpha's first 8 bytes (no key is known for them): the lookup finds
        // all three, and only the full comparison tells alpha from the others.
        let mut before = digest;
        before[31] ^= 1;
        let mut after = digest;
        after[8] ^= 0x80;
        let clients = Clients::from_config(&config_with(&[
            (
                "before".into(),
                format!("key_sha256 = \"{}\"", hex::encode(before)),
            ),
            ("alpha".into(), "key = \"alpha-key\"".into()),
            (
                "after".into(),
                format!("key_sha256 = \"{}\"", hex::encode(after)),
            ),
        ]))
        .expect("clients");
        assert_eq!(
            clients.by_digest.len(),
            1,
            "one prefix for the three clients"
        );
        let found = clients.check_key("alpha-key").expect("alpha's key");
        assert_eq!(&*found.name, "alpha");
        assert!(clients.check_key("alpha-key ").is_none());
    }

    #[test]
    fn form_and_json_shapes_parse() {
        let r = parse_token_request(
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            None,
            b"grant_type=client_credentials&client_id=ci&client_secret=a%2Bb%26c&audience=x",
        )
        .expect("form");
        assert_eq!(r.client_id, "ci");
        assert_eq!(r.client_secret.expose(), "a+b&c");
        let r = parse_token_request(
            Some("application/json"),
            None,
            br#"{"grant_type":"client_credentials","client_id":"ci","client_secret":"k","audience":"https://api.sitecorecloud.io"}"#,
        )
        .expect("json");
        assert_eq!(r.client_secret.expose(), "k");
    }

    #[test]
    fn basic_auth_credentials_are_accepted() {
        let header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("ci:s%2Bt")
        );
        let r = parse_token_request(
            Some("application/x-www-form-urlencoded"),
            Some(&header),
            b"grant_type=client_credentials",
        )
        .expect("basic");
        assert_eq!(r.client_id, "ci");
        assert_eq!(r.client_secret.expose(), "s+t");
    }

    #[test]
    fn malformed_requests_are_refused() {
        let form = Some("application/x-www-form-urlencoded");
        assert_eq!(
            parse_token_request(
                form,
                None,
                b"grant_type=password&client_id=a&client_secret=b"
            ),
            Err(TokenRequestError::UnsupportedGrantType)
        );
        for body in [
            &b"client_id=a&client_secret=b"[..],
            b"grant_type=client_credentials&client_id=a",
            b"grant_type=client_credentials&client_id=a&client_id=b&client_secret=c",
            b"grant_type=client_credentials&client_id=&client_secret=c",
        ] {
            assert_eq!(
                parse_token_request(form, None, body),
                Err(TokenRequestError::Invalid)
            );
        }
        assert_eq!(
            parse_token_request(Some("application/json"), None, b"[1]"),
            Err(TokenRequestError::Invalid)
        );
        assert_eq!(
            parse_token_request(
                Some("application/json"),
                None,
                br#"{"grant_type":"client_credentials","client_id":1,"client_secret":"x"}"#
            ),
            Err(TokenRequestError::Invalid)
        );
        assert_eq!(
            parse_token_request(Some("text/plain"), None, b"x"),
            Err(TokenRequestError::Invalid)
        );
        assert_eq!(
            parse_token_request(None, None, b""),
            Err(TokenRequestError::Invalid)
        );
    }
}
