//! Header hygiene in both directions: hop-by-hop headers never cross the proxy, and the
//! client's own credentials never reach an upstream.

use http::header::{self, HeaderMap, HeaderName};

/// The hop-by-hop headers of RFC 9110 section 7.6.1, plus the legacy ones proxies also drop.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
    )
}

/// Inbound credentials that must never reach an upstream.
fn inbound_credential(name: &str) -> bool {
    matches!(name, "authorization" | "proxy-authorization" | "x-api-key")
}

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed = present(headers, hop_by_hop);
    if listed.is_empty() {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.into_iter().chain(named) {
        headers.remove(name);
    }
}

/// Removes every inbound credential header.
pub fn strip_inbound_credentials(headers: &mut HeaderMap) {
    for name in present(headers, inbound_credential) {
        headers.remove(name);
    }
}

/// The names present in `headers` that `listed` picks. Most messages carry none (and the empty
/// `Vec` allocates nothing): one pass over the few names present, each matched by length and
/// then bytes, is much cheaper than hashing every candidate for a `remove`.
fn present(headers: &HeaderMap, listed: fn(&str) -> bool) -> Vec<HeaderName> {
    headers
        .keys()
        .filter(|name| listed(name.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop , close"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_stripped_and_others_kept() {
        let hop = [
            "connection",
            "proxy-connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authenticate",
        ];
        let kept = [
            "host",
            "accept",
            "content-length",
            "x-connection",
            "tee",
            "upgrades",
        ];
        for name in hop {
            let mut h = HeaderMap::new();
            for other in kept {
                h.insert(other, HeaderValue::from_static("1"));
            }
            h.insert(name, HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(name), "{name} was kept");
            assert_eq!(h.len(), kept.len(), "{name}: {h:?}");
        }
        // Every Connection header's names go, and the credentials are not hop-by-hop.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("x-a"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-b"));
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), [header::AUTHORIZATION]);
    }

    #[test]
    fn strips_inbound_credentials() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client-key"),
        );
        h.insert("x-api-key", HeaderValue::from_static("k"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_inbound_credentials(&mut h);
        assert_eq!(h.len(), 1);
    }
}
