//! `[credentials.NAME]`: OAuth client credentials (the default type) and static header values.
//! Secrets come from the file (usually as `${NAME}`) or from a secret file, and go straight
//! into [`Secret`]; no message here ever contains one.

use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily};

use super::raw::{deserialize_item, RawHeader, RawOAuth};
use super::values::parse_secure_url;
use super::{
    files, key_join, CredentialSettings, Cx, HeaderSettings, OAuthSettings, RequestFormat,
};
use crate::secret::Secret;

const DEFAULT_TOKEN_URL: &str = "https://auth.sitecorecloud.io/oauth/token";
const DEFAULT_AUDIENCE: &str = "https://api.sitecorecloud.io";
const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
const DEFAULT_REFRESH_AT: f64 = 0.8;
/// Token request fields the proxy sets itself.
const RESERVED_PARAMS: [&str; 4] = ["grant_type", "client_id", "client_secret", "audience"];
/// Headers a credential may not set: hop-by-hop ones (RFC 9110 section 7.6.1) are removed before
/// forwarding, `Host` comes from the upstream URL, and `Content-Length` frames the body.
const FORBIDDEN_HEADERS: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// One credential; `None` when it has problems (all recorded).
pub(super) fn credential(
    name: &str,
    value: &toml::Value,
    cx: &mut Cx,
) -> Option<CredentialSettings> {
    let key = key_join("credentials", name);
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !name_ok {
        cx.problem(
            &key,
            "a credential name may use only ASCII letters, digits, '-' and '_' (it appears in \
             routes, logs and metrics)",
        );
    }
    // The `type` key picks the shape; it is taken out so each shape can deny unknown keys.
    let mut value = value.clone();
    let kind = value.as_table_mut().and_then(|t| t.remove("type"));
    let settings = match kind.as_ref().map(|k| k.as_str()) {
        None | Some(Some("oauth")) => {
            let raw: RawOAuth = deserialize_item(&value, &key, cx.problems);
            oauth(raw, &key, cx).map(CredentialSettings::OAuth)
        }
        Some(Some("header")) => {
            let raw: RawHeader = deserialize_item(&value, &key, cx.problems);
            header(raw, &key, cx).map(CredentialSettings::Header)
        }
        Some(other) => {
            let shown = other.map_or_else(|| "this value".to_owned(), |s| format!("\"{s}\""));
            cx.problem(
                key_join(&key, "type"),
                format!(
                    "{shown} is not a credential type; use \"oauth\" (the default) or \"header\""
                ),
            );
            None
        }
    };
    settings.filter(|_| name_ok)
}

fn oauth(raw: RawOAuth, key: &str, cx: &mut Cx) -> Option<OAuthSettings> {
    let k = |field: &str| key_join(key, field);

    let client_id = match raw.client_id {
        Some(id) if !id.is_empty() => Some(id),
        Some(_) => {
            cx.problem(
                k("client_id"),
                "is empty; if it comes from ${NAME}, that variable is empty",
            );
            None
        }
        None => {
            cx.problem(
                k("client_id"),
                "missing; set client_id = \"${SITECORE_CLIENT_ID}\" (or the id itself)",
            );
            None
        }
    };

    let secret = secret_or_file(
        raw.client_secret,
        raw.client_secret_file,
        (&k("client_secret"), &k("client_secret_file")),
        "${SITECORE_CLIENT_SECRET}",
        cx,
    );

    let token_url_text = raw.token_url.as_deref().unwrap_or(DEFAULT_TOKEN_URL);
    let token_url = parse_secure_url(token_url_text, DEFAULT_TOKEN_URL, true)
        .map_err(|message| cx.problem(k("token_url"), message))
        .ok();

    let audience = match raw.audience {
        None => Some(DEFAULT_AUDIENCE.to_owned()),
        Some(audience) if !audience.is_empty() => Some(audience),
        Some(_) => {
            cx.problem(
                k("audience"),
                format!("is empty; remove the key for the default {DEFAULT_AUDIENCE}"),
            );
            None
        }
    };

    let mut extra_params = raw.extra_params.unwrap_or_default();
    for reserved in RESERVED_PARAMS {
        if extra_params.remove(reserved).is_some() {
            cx.problem(
                key_join(&k("extra_params"), reserved),
                format!(
                    "{reserved} cannot be overridden: the proxy sends grant_type itself, and \
                     client_id, client_secret and audience have their own keys"
                ),
            );
        }
    }

    let issuer = match (raw.issuer, &token_url) {
        (Some(issuer), _) if issuer.is_empty() => {
            cx.problem(
                k("issuer"),
                "is empty; remove the key to use scheme://authority/ of token_url",
            );
            None
        }
        (Some(issuer), _) => Some(issuer),
        (None, Some(url)) => Some(format!("{}/", url.origin().ascii_serialization())),
        // token_url is bad and already reported.
        (None, None) => None,
    };

    let jwks_url = match (raw.jwks_url, &issuer) {
        (Some(text), _) => parse_secure_url(
            &text,
            "https://auth.sitecorecloud.io/.well-known/jwks.json",
            true,
        )
        .map_err(|message| cx.problem(k("jwks_url"), message))
        .ok(),
        (None, Some(issuer)) => {
            let separator = if issuer.ends_with('/') { "" } else { "/" };
            let derived = format!("{issuer}{separator}.well-known/jwks.json");
            parse_secure_url(
                &derived,
                "https://auth.sitecorecloud.io/.well-known/jwks.json",
                true,
            )
            .map_err(|message| {
                cx.problem(
                    k("jwks_url"),
                    format!("cannot be derived from issuer: {message}; set jwks_url"),
                )
            })
            .ok()
        }
        (None, None) => None,
    };

    let algorithms = algorithms(raw.algorithms, &k("algorithms"), cx);

    let leeway = cx.duration(&k("leeway"), raw.leeway.as_deref(), DEFAULT_LEEWAY);

    let refresh_at = match raw.refresh_at {
        None => DEFAULT_REFRESH_AT,
        Some(share) if share > 0.0 && share < 1.0 => share,
        Some(share) => {
            cx.problem(
                k("refresh_at"),
                format!(
                    "{share} is outside (0, 1); it is the share of a token's lifetime after \
                     which it is refreshed, e.g. 0.8"
                ),
            );
            DEFAULT_REFRESH_AT
        }
    };

    let (client_secret, client_secret_file) = secret?;
    Some(OAuthSettings {
        client_id: client_id?,
        client_secret,
        client_secret_file,
        token_url: token_url?,
        audience: audience?,
        request_format: raw.request_format.unwrap_or(RequestFormat::Form),
        auth_method: raw.auth_method.unwrap_or_default(),
        extra_params,
        issuer: issuer?,
        jwks_url: jwks_url?,
        algorithms: algorithms?,
        leeway,
        refresh_at,
    })
}

/// `algorithms`: asymmetric JWS algorithms only; `none` and HMAC are refused with a reason.
fn algorithms(names: Option<Vec<String>>, key: &str, cx: &mut Cx) -> Option<Vec<Algorithm>> {
    let Some(names) = names else {
        return Some(vec![Algorithm::RS256]);
    };
    if names.is_empty() {
        cx.problem(key, "is empty; remove the key for the default [\"RS256\"]");
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (i, name) in names.iter().enumerate() {
        let item_key = format!("{key}[{i}]");
        let upper = name.to_ascii_uppercase();
        let parsed = match upper.as_str() {
            "EDDSA" => Ok(Algorithm::EdDSA),
            "NONE" => Err(format!(
                "\"{name}\" is never accepted: an unsigned token proves nothing; use \"RS256\""
            )),
            other => other.parse::<Algorithm>().map_err(|_| {
                format!(
                    "\"{name}\" is not a JWS algorithm; use RS256, RS384, RS512, PS256, PS384, \
                     PS512, ES256, ES384 or EdDSA"
                )
            }),
        };
        match parsed {
            Ok(alg) if alg.family() == AlgorithmFamily::Hmac => {
                ok = false;
                cx.problem(
                    item_key,
                    format!(
                        "\"{name}\" is refused: an HMAC algorithm would accept tokens signed with \
                         a shared secret instead of the issuer's private key; use \"RS256\""
                    ),
                );
            }
            Ok(alg) => {
                if !out.contains(&alg) {
                    out.push(alg);
                }
            }
            Err(message) => {
                ok = false;
                cx.problem(item_key, message);
            }
        }
    }
    ok.then_some(out)
}

fn header(raw: RawHeader, key: &str, cx: &mut Cx) -> Option<HeaderSettings> {
    let k = |field: &str| key_join(key, field);
    let header = match raw.header.as_deref() {
        None => {
            cx.problem(
                k("header"),
                "missing; name the header to set, e.g. header = \"sc_apikey\"",
            );
            None
        }
        Some(text) => match http::HeaderName::from_bytes(text.as_bytes()) {
            Err(_) => {
                cx.problem(
                    k("header"),
                    format!("\"{text}\" is not a valid header name; e.g. \"sc_apikey\" or \"X-GQL-Token\""),
                );
                None
            }
            Ok(name) if FORBIDDEN_HEADERS.contains(&name.as_str()) => {
                cx.problem(
                    k("header"),
                    format!(
                        "\"{text}\" cannot carry a credential: hop-by-hop headers are removed \
                         before forwarding, and Host and Content-Length are set by the proxy"
                    ),
                );
                None
            }
            Ok(name) => Some(name),
        },
    };

    let value = secret_or_file(
        raw.value,
        raw.value_file,
        (&k("value"), &k("value_file")),
        "${EDGE_DELIVERY_KEY}",
        cx,
    );
    let value = value.and_then(|(value, file)| {
        if http::HeaderValue::from_str(value.expose()).is_ok() {
            Some((value, file))
        } else {
            let at = if file.is_some() {
                k("value_file")
            } else {
                k("value")
            };
            cx.problem(
                at,
                "is not a valid header value: only visible ASCII, spaces and tabs are allowed \
                 (look for a stray line break or non-ASCII character)",
            );
            None
        }
    });

    let (value, value_file) = value?;
    Some(HeaderSettings {
        header: header?,
        value,
        value_file,
    })
}

/// A secret given inline or as a file: exactly one of the two, never empty.
pub(super) fn secret_or_file(
    inline: Option<String>,
    file: Option<String>,
    (inline_key, file_key): (&str, &str),
    example: &str,
    cx: &mut Cx,
) -> Option<(Secret, Option<PathBuf>)> {
    let inline_name = inline_key.rsplit('.').next().unwrap_or(inline_key);
    let file_name = file_key.rsplit('.').next().unwrap_or(file_key);
    match (inline, file) {
        (Some(_), Some(_)) => {
            cx.problem(
                inline_key,
                format!("set {inline_name} or {file_name}, not both"),
            );
            None
        }
        (None, None) => {
            cx.problem(
                inline_key,
                format!("missing; set {inline_name} = \"{example}\" or {file_name} = \"PATH\""),
            );
            None
        }
        (Some(value), None) if value.is_empty() => {
            cx.problem(
                inline_key,
                "is empty; if it comes from ${NAME}, that variable is empty",
            );
            None
        }
        (Some(value), None) => Some((Secret::new(value), None)),
        (None, Some(file)) => {
            let path = cx.resolve(file_key, &file)?;
            match files::read_secret_file(&path) {
                Ok(value) => Some((Secret::new(value), Some(path))),
                Err(message) => {
                    cx.problem(file_key, message);
                    None
                }
            }
        }
    }
}
