//! The emulated token endpoint's request parsing: form or JSON bodies with Sitecore's fields.

use std::borrow::Cow;

/// The token request fields the endpoint reads.
const KNOWN_FIELDS: [&str; 4] = ["grant_type", "client_id", "client_secret", "audience"];

/// The fields of a token request; other fields are ignored.
#[derive(Default)]
pub(super) struct TokenParams {
    pub(super) grant_type: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<String>,
    pub(super) audience: Option<String>,
}

impl TokenParams {
    /// Sets a known field; `None` when it was already set (a repeated parameter is malformed).
    pub(super) fn set(&mut self, name: &str, value: String) -> Option<()> {
        let slot = match name {
            "grant_type" => &mut self.grant_type,
            "client_id" => &mut self.client_id,
            "client_secret" => &mut self.client_secret,
            "audience" => &mut self.audience,
            _ => return Some(()),
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(value);
        Some(())
    }
}

/// Parses a form or JSON body; `None` when it is malformed or of another media type.
pub(super) fn parse_token_request(content_type: &str, body: &[u8]) -> Option<TokenParams> {
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let mut params = TokenParams::default();
    match media_type.as_str() {
        "application/x-www-form-urlencoded" => {
            let text = std::str::from_utf8(body).ok()?;
            for pair in text.split('&').filter(|pair| !pair.is_empty()) {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                params.set(&form_decode(name)?, form_decode(value)?)?;
            }
        }
        "application/json" => {
            let serde_json::Value::Object(fields) = serde_json::from_slice(body).ok()? else {
                return None;
            };
            for (name, value) in fields {
                match value {
                    serde_json::Value::String(value) => params.set(&name, value)?,
                    serde_json::Value::Null => {}
                    // A known field must be a string; unknown fields may be anything.
                    _ if KNOWN_FIELDS.contains(&name.as_str()) => return None,
                    _ => {}
                }
            }
        }
        _ => return None,
    }
    Some(params)
}

/// Decodes one `application/x-www-form-urlencoded` name or value: `+` is a space, then
/// percent-decoding; the result must be UTF-8.
fn form_decode(raw: &str) -> Option<String> {
    let spaced: Cow<'_, str> = if raw.contains('+') {
        Cow::Owned(raw.replace('+', " "))
    } else {
        Cow::Borrowed(raw)
    };
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(Cow::into_owned)
}
