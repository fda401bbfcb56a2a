//! The request id: the client's `X-Request-Id` when it is a sane token, otherwise a fresh random
//! one. It goes upstream, back to the client, and into the access line.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

pub(super) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The id of a request with `headers`.
pub(super) fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        let sane = !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'));
        if sane {
            return v.clone();
        }
    }
    // Hex in a fixed buffer that the header value owns: no formatting, and the two clones
    // (upstream request, response) share it instead of each promoting a `Vec` to shared.
    let mut hex = [0u8; 32];
    let id: u128 = rand::random();
    if ::hex::encode_to_slice(id.to_be_bytes(), &mut hex).is_err() {
        return HeaderValue::from_static("-");
    }
    HeaderValue::from_maybe_shared(Bytes::from_owner(hex)).unwrap_or(HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_id(id: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID.clone(), HeaderValue::from_static(id));
        headers
    }

    #[test]
    fn a_sane_client_id_is_kept() {
        assert_eq!(request_id(&with_id("abc-123_x.y:z")), "abc-123_x.y:z");
    }

    #[test]
    fn an_odd_or_missing_id_is_replaced_by_a_random_one() {
        for headers in [with_id("has space"), with_id("a\"b"), HeaderMap::new()] {
            let id = request_id(&headers);
            assert_eq!(id.len(), 32);
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
        }
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
    }
}
