//! The emulator through real sockets: shared helpers; the token side in `token.rs`, the emulated
//! APIs in `upstream.rs`.

mod token;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::*;

pub(super) fn client() -> reqwest::Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub(super) async fn start(builder: EmulatorBuilder) -> Emulator {
    // Tests that build their own reqwest client need the provider too, whichever runs first.
    crate::install_crypto_providers();
    builder.start().await.expect("emulator starts")
}

pub(super) fn form_request(id: &str, secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("grant_type", "client_credentials".to_owned()),
        ("client_id", id.to_owned()),
        ("client_secret", secret.to_owned()),
    ]
}

/// Requests a token with the default client; returns status and body.
pub(super) async fn default_token(emulator: &Emulator) -> (u16, String) {
    let response = client()
        .post(emulator.token_url())
        .form(&form_request(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET))
        .send()
        .await
        .expect("token request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

pub(super) fn json_of(text: &str) -> Value {
    serde_json::from_str(text).expect("JSON body")
}

/// The decoded header and claims of a JWT, and its signature part.
pub(super) fn jwt_parts(token: &str) -> (Value, Value, String) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "three parts in {token}");
    let decode = |part: &str| -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
    };
    (decode(parts[0]), decode(parts[1]), parts[2].to_owned())
}

pub(super) async fn call_api(
    emulator: &Emulator,
    api: Api,
    rest: &str,
    token: Option<&str>,
) -> reqwest::Response {
    let mut request = client().get(format!("{}{rest}", emulator.api_base(api)));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("API request")
}

pub(super) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}
