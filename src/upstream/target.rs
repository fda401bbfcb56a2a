//! Where requests go: an upstream's scheme and authority, and the request-target forms that
//! HTTP/1.1 (origin-form, `/path?query`) and HTTP/2 (scheme and authority as pseudo-headers)
//! send.

use http::uri::{Authority, Scheme};
use http::Uri;

/// Where requests go: an upstream's scheme and authority (a route's, built once per runtime).
#[derive(Debug, Clone)]
pub struct Target {
    scheme: Scheme,
    authority: Authority,
}

impl Target {
    /// The target for `scheme` (`http` or `https`) and `authority`; `None` for other schemes.
    pub fn new(scheme: &Scheme, authority: &Authority) -> Option<Target> {
        (*scheme == Scheme::HTTPS || *scheme == Scheme::HTTP).then(|| Target {
            scheme: scheme.clone(),
            authority: authority.clone(),
        })
    }

    /// Whether the scheme is `https`.
    pub(super) fn https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// The scheme, `http` or `https`.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// The authority: host and port.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// `uri`'s path and query at this target.
    pub(super) fn absolute(&self, uri: &Uri) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = uri.path_and_query().cloned();
        Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
    }
}

/// `path?query` of `uri`, as HTTP/1.1 sends it to an origin server.
pub(super) fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => Uri::from(path.clone()),
        _ => Uri::from_static("/"),
    }
}
