//! The OAuth client-credentials request and the parsing of its response.
//!
//! The token endpoint's raw error body never leaves this file: only the status and a sanitised
//! `error` code travel on in [`TokenError`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use serde::Deserialize;

use crate::config::{AuthMethod, OAuthSettings, RequestFormat};
use crate::secret::Secret;
use crate::token::TokenError;

/// The parts of a token response the proxy uses.
#[derive(Debug, Clone)]
pub struct TokenResponse {
    /// The JWT, not yet verified.
    pub access_token: Secret,
    /// Lifetime in seconds, when the endpoint sent one.
    pub expires_in: Option<u64>,
    /// Granted scopes, when sent.
    pub scope: Option<String>,
}

#[derive(Deserialize)]
struct RawResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    token_type: Option<String>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default)]
    error: Option<String>,
}

/// Sends the client-credentials request for `settings` and parses the answer.
pub async fn request_token(
    http: &reqwest::Client,
    settings: &OAuthSettings,
) -> Result<TokenResponse, TokenError> {
    let mut fields: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
    if settings.auth_method == AuthMethod::ClientSecretPost {
        fields.push(("client_id", &settings.client_id));
        fields.push(("client_secret", settings.client_secret.expose()));
    }
    fields.push(("audience", &settings.audience));
    fields.extend(
        settings
            .extra_params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let mut request = http
        .post(settings.token_url.clone())
        .header(http::header::ACCEPT, "application/json");
    if settings.auth_method == AuthMethod::ClientSecretBasic {
        request = request.header(http::header::AUTHORIZATION, basic_authorization(settings)?);
    }
    let request = match settings.request_format {
        RequestFormat::Form => request.form(&fields),
        RequestFormat::Json => {
            let map: serde_json::Map<String, serde_json::Value> = fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
                .collect();
            request.json(&map)
        }
    };
    let response = request.send().await.map_err(classify_reqwest)?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.map_err(classify_reqwest)?;
    if status.is_success() {
        return parse_token_response(&body);
    }
    let code = error_code(&body);
    if status == http::StatusCode::TOO_MANY_REQUESTS {
        return Err(TokenError::RateLimited {
            retry_after: retry_after(&headers, SystemTime::now()),
        });
    }
    Err(TokenError::Status {
        status: status.as_u16(),
        code,
    })
}

/// `Basic base64(form(id) ":" form(secret))`: RFC 6749 section 2.3.1 form-encodes both parts
/// before joining them, so a `:` or `%` in the secret survives. Marked sensitive.
fn basic_authorization(settings: &OAuthSettings) -> Result<http::HeaderValue, TokenError> {
    use base64::Engine;
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = Secret::new(format!(
        "{}:{}",
        encode(&settings.client_id),
        encode(settings.client_secret.expose())
    ));
    let encoded = base64::engine::general_purpose::STANDARD.encode(pair.expose());
    let mut value = http::HeaderValue::try_from(format!("Basic {encoded}"))
        .map_err(|_| TokenError::Malformed("client credentials are not a valid header"))?;
    value.set_sensitive(true);
    Ok(value)
}

fn classify_reqwest(e: reqwest::Error) -> TokenError {
    if e.is_timeout() {
        TokenError::Timeout
    } else {
        // `without_url` keeps the error chain but drops the URL; the token URL is not secret,
        // but extra_params in a query never are sent there either way.
        TokenError::Unreachable(Box::new(e.without_url()))
    }
}

/// Parses a successful token response body.
///
/// Errors say what is wrong in fixed words; nothing of the body is echoed, since a broken
/// endpoint could put anything there.
pub fn parse_token_response(body: &[u8]) -> Result<TokenResponse, TokenError> {
    let raw: RawResponse = serde_json::from_slice(body)
        .map_err(|_| TokenError::Malformed("response is not the expected JSON"))?;
    if raw.access_token.is_empty() {
        return Err(TokenError::Malformed("access_token is empty"));
    }
    if let Some(kind) = &raw.token_type {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(TokenError::Malformed("token_type is not Bearer"));
        }
    }
    let expires_in = match raw.expires_in {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        }),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        Some(_) => None,
    };
    Ok(TokenResponse {
        access_token: Secret::new(raw.access_token),
        expires_in,
        scope: raw.scope,
    })
}

/// The `error` field of an Auth0-style error body, if it looks like an OAuth error code.
fn error_code(body: &[u8]) -> Option<String> {
    let raw: RawError = serde_json::from_slice(body).ok()?;
    let code = raw.error?;
    let safe = !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
    safe.then_some(code)
}

/// How long a 429 asks us to wait: `Retry-After` seconds, or `x-ratelimit-reset` as a UNIX time.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let from_retry_after = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let from_reset = headers
        .get("x-ratelimit-reset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|reset| {
            let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            Duration::from_secs(reset.saturating_sub(now))
        });
    match (from_retry_after, from_reset) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sitecore_shape() {
        let r = parse_token_response(
            br#"{"access_token":"a.b.c","scope":"x y","expires_in":86400,"token_type":"Bearer"}"#,
        )
        .expect("ok");
        assert_eq!(r.access_token.expose(), "a.b.c");
        assert_eq!(r.expires_in, Some(86400));
        assert_eq!(r.scope.as_deref(), Some("x y"));
    }

    #[test]
    fn tolerates_missing_or_stringly_expires_in() {
        let r = parse_token_response(br#"{"access_token":"t"}"#).expect("ok");
        assert_eq!(r.expires_in, None);
        let r = parse_token_response(br#"{"access_token":"t","expires_in":"60"}"#).expect("ok");
        assert_eq!(r.expires_in, Some(60));
    }

    #[test]
    fn malformed_bodies_never_echo_content() {
        for body in [
            &b"<html>secret-ish</html>"[..],
            br#"{"access_token":""}"#,
            br#"{"token":"x"}"#,
            br#"{"access_token":"t","token_type":"mac"}"#,
        ] {
            let e = parse_token_response(body).expect_err("malformed");
            let text = format!("{e} {e:?}");
            assert!(!text.contains("secret-ish"), "{text}");
            assert!(matches!(e, TokenError::Malformed(_)));
        }
    }

    #[test]
    fn error_code_is_sanitised() {
        assert_eq!(
            error_code(br#"{"error":"access_denied","error_description":"Unauthorized"}"#)
                .as_deref(),
            Some("access_denied")
        );
        assert_eq!(error_code(br#"{"error":"<script>"}"#), None);
        assert_eq!(error_code(b"not json"), None);
    }

    #[test]
    fn retry_after_prefers_the_longer_wait() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut h = HeaderMap::new();
        h.insert("retry-after", "3".parse().expect("hv"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(3)));
        h.insert("x-ratelimit-reset", "1010".parse().expect("hv"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(10)));
        h.remove("retry-after");
        h.insert("x-ratelimit-reset", "900".parse().expect("hv"));
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }
}
