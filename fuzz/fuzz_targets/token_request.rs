//! `parse_token_request` (the local token endpoint) on arbitrary requests: never a panic; `Ok`
//! only for grant_type client_credentials with a non-empty client id and secret.
//!
//! Input: byte 0 picks the content type, byte 1 how `Authorization` is built (absent, the raw
//! bytes, or `Basic` + base64 of them) and byte 2 its length; the rest is the body.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use sitecore_auth_proxy::inbound::parse_token_request;

const CONTENT_TYPES: [Option<&str>; 8] = [
    Some("application/x-www-form-urlencoded"),
    Some("application/json"),
    Some("application/x-www-form-urlencoded; charset=utf-8"),
    Some(" Application/JSON ;charset=UTF-8"),
    None,
    Some("text/plain"),
    Some("multipart/form-data; boundary=x"),
    Some(""),
];

const MARKER: &str = "ZQXJ";

/// What the body says the grant type is, by an independent reading of the body.
fn grant_type(media: usize, body: &[u8]) -> Option<String> {
    if media.is_multiple_of(2) {
        let mut values = form_urlencoded::parse(body).filter(|(k, _)| k == "grant_type");
        let first = values.next()?;
        values.next().is_none().then(|| first.1.into_owned())
    } else {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        value.get("grant_type")?.as_str().map(str::to_owned)
    }
}

fuzz_target!(|data: &[u8]| {
    let [ct, auth_mode, auth_len, rest @ ..] = data else {
        return;
    };
    let media = usize::from(*ct) % CONTENT_TYPES.len();
    let split = usize::from(*auth_len).min(rest.len());
    let (auth_bytes, body) = rest.split_at(split);
    let authorization = match auth_mode % 3 {
        0 => None,
        1 => Some(String::from_utf8_lossy(auth_bytes).into_owned()),
        _ => Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(auth_bytes)
        )),
    };
    let result = parse_token_request(CONTENT_TYPES[media], authorization.as_deref(), body);
    let Ok(request) = result else {
        return;
    };
    assert!(
        media < 4,
        "accepted content type {:?}",
        CONTENT_TYPES[media]
    );
    assert_eq!(
        grant_type(media, body).as_deref(),
        Some("client_credentials"),
        "accepted without grant_type client_credentials"
    );
    assert!(!request.client_id.is_empty(), "empty client_id accepted");
    assert!(
        !request.client_secret.is_empty(),
        "empty client_secret accepted"
    );
    if request.client_secret.expose().contains(MARKER) && !request.client_id.contains(MARKER) {
        assert!(
            !format!("{request:?}").contains(MARKER),
            "Debug shows the secret"
        );
    }
});
