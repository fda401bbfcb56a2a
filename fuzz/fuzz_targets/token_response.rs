//! `parse_token_response` on arbitrary bodies: never a panic; an error never echoes the body, and
//! the parsed token never shows in `Debug`.
//!
//! Echoes are detected with a marker: when the body contains `ZQXJ`, no error text may.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sitecore_auth_proxy::token::fetch::parse_token_response;

const MARKER: &str = "ZQXJ";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|body: &[u8]| {
    let marked = contains(body, MARKER.as_bytes());
    match parse_token_response(body) {
        Ok(response) => {
            let token = response.access_token.expose();
            assert!(!token.is_empty(), "an empty access_token was accepted");
            // serde skips unknown fields without validating their UTF-8, so an accepted body
            // need not be strict JSON; the token type is checked when it is.
            let raw: Option<serde_json::Value> = serde_json::from_slice(body).ok();
            if let Some(kind) = raw.as_ref().and_then(|r| r.get("token_type")?.as_str()) {
                assert!(
                    kind.eq_ignore_ascii_case("bearer"),
                    "token_type {kind:?} accepted"
                );
            }
            let scope_marked = response
                .scope
                .as_deref()
                .is_some_and(|s| s.contains(MARKER));
            if token.contains(MARKER) && !scope_marked {
                assert!(
                    !format!("{response:?}").contains(MARKER),
                    "Debug shows the token"
                );
            }
        }
        Err(error) => {
            if marked {
                let shown = format!("{error} {error:?}");
                assert!(!shown.contains(MARKER), "error echoes the body: {shown}");
            }
        }
    }
});
