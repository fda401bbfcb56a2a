//! Upstream trust roots and header hygiene in both directions.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName};
use rustls_pki_types::CertificateDer;

use crate::routes::Route;
use http::HeaderValue;

/// A rustls client configuration trusting webpki roots plus `extra_roots`.
pub fn tls_client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert.clone())?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

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

/// Rewrites a `Location` that points into `route`'s upstream (absolute, or path-absolute under
/// the upstream's base path) to the same place behind the proxy's prefix, so a tool that follows
/// the redirect stays behind the proxy. Anything else is left alone (`None`).
pub fn rewrite_location(route: &Route, location: &HeaderValue) -> Option<HeaderValue> {
    let text = location.to_str().ok()?;
    let path = if text.starts_with('/') {
        if text.starts_with("//") {
            return None;
        }
        text
    } else {
        let (scheme, rest) = text.split_once("://")?;
        if !scheme.eq_ignore_ascii_case(route.target.scheme().as_str()) {
            return None;
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if !same_authority(authority, route) {
            return None;
        }
        path
    };
    let remainder = if route.base_path.is_empty() {
        path
    } else {
        let rest = path.strip_prefix(route.base_path.as_str())?;
        if !(rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
            return None;
        }
        rest
    };
    let prefix = if route.prefix == "/" {
        ""
    } else {
        route.prefix.as_str()
    };
    let mut rewritten = String::with_capacity(prefix.len() + remainder.len() + 1);
    rewritten.push_str(prefix);
    if prefix.is_empty() && !remainder.starts_with('/') {
        rewritten.push('/');
    }
    rewritten.push_str(remainder);
    // The result must be a path on the proxy itself: never scheme-relative (`//host`, `/\host`,
    // which browsers and HTTP clients resolve to another host) and never with dot segments that
    // would climb out of the prefix once the client normalises it.
    let path_end = rewritten.find(['?', '#']).unwrap_or(rewritten.len());
    if rewritten.starts_with("//")
        || rewritten.starts_with("/\\")
        || crate::routes::check_path(&rewritten[..path_end]).is_err()
    {
        return None;
    }
    HeaderValue::from_str(&rewritten).ok()
}

fn same_authority(authority: &str, route: &Route) -> bool {
    let expected = route.target.authority().as_str();
    if authority.eq_ignore_ascii_case(expected) {
        return true;
    }
    let default_port = if *route.target.scheme() == http::uri::Scheme::HTTPS {
        ":443"
    } else {
        ":80"
    };
    let strip = |a: &str| -> String {
        let lower = a.to_ascii_lowercase();
        lower
            .strip_suffix(default_port)
            .map(str::to_owned)
            .unwrap_or(lower)
    };
    strip(authority) == strip(expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    use crate::routes::tests::route;

    fn rewrite(route: &Route, location: &str) -> Option<String> {
        rewrite_location(route, &HeaderValue::from_str(location).expect("hv"))
            .map(|v| v.to_str().expect("ascii").to_owned())
    }

    #[test]
    fn locations_into_the_upstream_move_behind_the_prefix() {
        let r = route(
            "/authoring",
            "https://xmc.example.io/sitecore/api/authoring/graphql/v1",
        );
        assert_eq!(
            rewrite(
                &r,
                "https://xmc.example.io/sitecore/api/authoring/graphql/v1/next?x=1"
            )
            .as_deref(),
            Some("/authoring/next?x=1")
        );
        assert_eq!(
            rewrite(
                &r,
                "HTTPS://XMC.example.io:443/sitecore/api/authoring/graphql/v1"
            )
            .as_deref(),
            Some("/authoring")
        );
        assert_eq!(
            rewrite(&r, "/sitecore/api/authoring/graphql/v1/x").as_deref(),
            Some("/authoring/x")
        );
        assert_eq!(
            rewrite(&r, "/sitecore/api/authoring/graphql/v10"),
            None,
            "segment boundary"
        );
        assert_eq!(
            rewrite(
                &r,
                "https://other.example/sitecore/api/authoring/graphql/v1"
            ),
            None
        );
        assert_eq!(
            rewrite(
                &r,
                "http://xmc.example.io/sitecore/api/authoring/graphql/v1"
            ),
            None
        );
        assert_eq!(rewrite(&r, "//xmc.example.io/x"), None);
        let d = route("/deploy", "https://deploy.example.io");
        assert_eq!(
            rewrite(&d, "https://deploy.example.io/api/x").as_deref(),
            Some("/deploy/api/x")
        );
        assert_eq!(
            rewrite(&d, "https://deploy.example.io").as_deref(),
            Some("/deploy")
        );
        assert_eq!(
            rewrite(&r, "/sitecore/api/authoring/graphql/v1/../../other"),
            None
        );
        let root = route("/", "https://root.example.io/base");
        for escaping in [
            "/base//evil.example/x",
            "https://root.example.io/base//evil.example/x",
            "https://root.example.io/base/\\evil.example/x",
            "/base/%2e%2e/x",
        ] {
            assert_eq!(rewrite(&root, escaping), None, "{escaping}");
        }
        assert_eq!(
            rewrite(&root, "https://root.example.io/base?q").as_deref(),
            Some("/?q")
        );
    }

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
