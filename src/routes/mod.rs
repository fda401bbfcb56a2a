//! The route table: longest segment-prefix match, path rewrite and path safety, and the reverse
//! rewrite of a `Location` pointing into an upstream ([`rewrite_location`]).
//!
//! Matching probes the path's own segment boundaries from the longest to the shortest in a hash
//! map, so its cost depends on the depth of the path, not on the number of routes. Boundaries at
//! a length no prefix has are skipped without hashing, so a typical request makes one probe.

mod location;

pub use location::rewrite_location;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderValue, Uri};
use percent_encoding::percent_decode_str;

use crate::config::RouteSettings;
use crate::limits::RouteLimits;
use crate::metrics::RouteMetrics;
use crate::upstream::Target;

/// One route, ready for the hot path.
#[derive(Debug)]
pub struct Route {
    /// Local path prefix, e.g. `/deploy` (no trailing slash, except the root route `/`).
    pub prefix: String,
    /// The prefix as a shared label for metrics.
    pub label: Arc<str>,
    /// Upstream scheme and authority (host and port; also the `Host` header sent upstream).
    pub target: Target,
    /// Pre-built `Host` header value.
    pub host_header: HeaderValue,
    /// Upstream base path without a trailing slash (`""` for the upstream's root).
    pub base_path: String,
    /// Name of the credential injected on this route.
    pub credential: String,
    /// Time allowed until the upstream's response headers.
    pub timeout: Duration,
    /// This route's handles on its metric series, set by `Runtime::build` from
    /// [`crate::metrics::Metrics::register_route`]. Until then (routes built alone, in tests and
    /// benchmarks) series that no registry exports.
    pub metrics: RouteMetrics,
    /// Its rate, in-flight and upstream-pause state, set by `Runtime::build` (none for routes
    /// built alone).
    pub limits: Option<Arc<RouteLimits>>,
}

impl Route {
    /// Builds a route from validated settings.
    pub fn new(settings: &RouteSettings, default_timeout: Duration) -> Result<Route, String> {
        let scheme = settings
            .upstream
            .scheme()
            .cloned()
            .ok_or_else(|| format!("route {}: upstream has no scheme", settings.prefix))?;
        let authority = settings
            .upstream
            .authority()
            .cloned()
            .ok_or_else(|| format!("route {}: upstream has no host", settings.prefix))?;
        let host_header = HeaderValue::from_str(authority.as_str()).map_err(|_| {
            format!(
                "route {}: upstream host is not a valid header",
                settings.prefix
            )
        })?;
        let target = Target::new(&scheme, &authority).ok_or_else(|| {
            format!(
                "route {}: upstream scheme must be http or https",
                settings.prefix
            )
        })?;
        let base_path = settings.upstream.path().trim_end_matches('/').to_owned();
        let label = Arc::from(settings.prefix.as_str());
        Ok(Route {
            prefix: settings.prefix.clone(),
            metrics: RouteMetrics::unregistered(&label),
            limits: None,
            label,
            target,
            host_header,
            base_path,
            credential: settings.credential.clone(),
            timeout: settings.timeout.unwrap_or(default_timeout),
        })
    }

    /// The origin-form URI (path and query) this route sends upstream for a client's `uri`
    /// that it matched; `None` when the rewritten target is not a valid URI.
    pub fn upstream_uri(&self, uri: &Uri) -> Option<Uri> {
        let path_and_query = self.upstream_path_and_query(uri.path(), uri.query());
        PathAndQuery::try_from(path_and_query).ok().map(Uri::from)
    }

    /// The upstream path and query for a request path that this route matched.
    ///
    /// The prefix is replaced by the base path; the rest of the path and the query are kept byte
    /// for byte.
    pub fn upstream_path_and_query(&self, path: &str, query: Option<&str>) -> String {
        let rest = if self.prefix == "/" {
            path
        } else {
            &path[self.prefix.len().min(path.len())..]
        };
        // Exactly the length: a string without spare capacity becomes a `Bytes` (in the URI)
        // without another allocation.
        let path_len = (self.base_path.len() + rest.len()).max(1);
        let mut out = String::with_capacity(path_len + query.map_or(0, |q| q.len() + 1));
        out.push_str(&self.base_path);
        out.push_str(rest);
        if out.is_empty() {
            out.push('/');
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

/// All routes, indexed by prefix.
#[derive(Debug, Default)]
pub struct RouteTable {
    by_prefix: HashMap<Box<str>, Arc<Route>>,
    /// `prefix_lens[n]`: whether some prefix is `n` bytes long.
    prefix_lens: Box<[bool]>,
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table; prefixes are unique (the config guarantees it).
    pub fn new(routes: Vec<Route>) -> RouteTable {
        let routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        let by_prefix: HashMap<Box<str>, Arc<Route>> = routes
            .iter()
            .map(|r| (r.prefix.clone().into_boxed_str(), Arc::clone(r)))
            .collect();
        let longest = by_prefix.keys().map(|p| p.len()).max().unwrap_or(0);
        let mut prefix_lens = vec![false; longest + 1].into_boxed_slice();
        for prefix in by_prefix.keys() {
            prefix_lens[prefix.len()] = true;
        }
        RouteTable {
            by_prefix,
            prefix_lens,
            routes,
        }
    }

    /// Routes in configuration order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// The route with the longest prefix that matches `path` on a segment boundary.
    ///
    /// `/deploy` matches `/deploy`, `/deploy/` and `/deploy/x`, never `/deployment`.
    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
        let mut candidate = path;
        loop {
            if let Some(route) = self.exact(candidate) {
                return Some(route);
            }
            // A byte scan: `str::rfind` with a `char` goes through the general searcher.
            match candidate.bytes().rposition(|b| b == b'/') {
                Some(0) | None => return self.exact("/"),
                Some(i) => candidate = &candidate[..i],
            }
        }
    }

    /// The route whose prefix is exactly `prefix`; hashed only when some prefix has its length.
    fn exact(&self, prefix: &str) -> Option<&Arc<Route>> {
        if self.prefix_lens.get(prefix.len()) == Some(&true) {
            self.by_prefix.get(prefix)
        } else {
            None
        }
    }
}

/// Why a request path was refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/` (asterisk-form or garbage).
    #[error("the request path must start with '/'")]
    NotAbsolute,
    /// A `.` or `..` segment, possibly percent-encoded or hidden behind an encoded slash.
    #[error("the request path contains a '.' or '..' segment")]
    DotSegment,
    /// A percent-encoded NUL or control character.
    #[error("the request path contains an encoded control character")]
    ControlCharacter,
}

/// How many rounds of percent-decoding are inspected: enough for double and triple encoding.
const DECODE_ROUNDS: usize = 3;

/// Refuses paths that could climb out of the route's base path once some server decodes them.
///
/// Each decoding round is split on `/` and `\` (so `%2f..%2f` is caught too) and every segment is
/// checked for `.` and `..`.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // Without a '.' there is no dot segment, and without a '%' nothing decodes into one.
    if !path.bytes().any(|b| b == b'.' || b == b'%') {
        return Ok(());
    }
    let mut current = std::borrow::Cow::Borrowed(path);
    for _ in 0..DECODE_ROUNDS {
        if current
            .split(['/', '\\'])
            .any(|segment| segment == "." || segment == "..")
        {
            return Err(PathError::DotSegment);
        }
        if !current.contains('%') {
            return Ok(());
        }
        let decoded: Vec<u8> = percent_decode_str(&current).collect();
        if decoded.iter().any(|b| *b < 0x20 || *b == 0x7f) {
            return Err(PathError::ControlCharacter);
        }
        let next = String::from_utf8_lossy(&decoded).into_owned();
        if next == *current {
            return Ok(());
        }
        current = std::borrow::Cow::Owned(next);
    }
    if current
        .split(['/', '\\'])
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(PathError::DotSegment);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A route for unit tests (also used by `upstream`'s tests).
    pub(crate) fn route(prefix: &str, upstream: &str) -> Route {
        let settings = RouteSettings {
            prefix: prefix.into(),
            upstream: upstream.parse().expect("uri"),
            credential: "c".into(),
            timeout: None,
            limits: Default::default(),
        };
        Route::new(&settings, Duration::from_secs(1)).expect("route")
    }

    fn table() -> RouteTable {
        RouteTable::new(vec![
            route("/deploy", "https://deploy.example"),
            route("/deploy/special", "https://special.example/x/"),
            route(
                "/authoring",
                "https://a.example/sitecore/api/authoring/graphql/v1",
            ),
        ])
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = table();
        assert_eq!(
            t.find("/deploy").map(|r| r.prefix.as_str()),
            Some("/deploy")
        );
        assert_eq!(
            t.find("/deploy/").map(|r| r.prefix.as_str()),
            Some("/deploy")
        );
        assert_eq!(
            t.find("/deploy/api/projects/v1").map(|r| r.prefix.as_str()),
            Some("/deploy")
        );
        assert_eq!(
            t.find("/deploy/special/1").map(|r| r.prefix.as_str()),
            Some("/deploy/special")
        );
        assert_eq!(
            t.find("/deploy/specialist").map(|r| r.prefix.as_str()),
            Some("/deploy")
        );
        assert!(t.find("/deployment").is_none());
        assert!(t.find("/").is_none());
        assert!(t.find("").is_none());
    }

    #[test]
    fn root_route_catches_the_rest() {
        let t = RouteTable::new(vec![
            route("/", "https://root.example/base"),
            route("/a", "https://a.example"),
        ]);
        assert_eq!(t.find("/zzz/y").map(|r| r.prefix.as_str()), Some("/"));
        assert_eq!(t.find("/a/b").map(|r| r.prefix.as_str()), Some("/a"));
        let root = t.find("/x").expect("root");
        assert_eq!(
            root.upstream_path_and_query("/x/y", Some("q=1")),
            "/base/x/y?q=1"
        );
    }

    #[test]
    fn rewrite_keeps_rest_and_query_byte_for_byte() {
        let t = table();
        let a = t.find("/authoring").expect("route");
        assert_eq!(
            a.upstream_path_and_query("/authoring", None),
            "/sitecore/api/authoring/graphql/v1"
        );
        assert_eq!(
            a.upstream_path_and_query("/authoring/x%20y", Some("a=1&b=%2F+c&&")),
            "/sitecore/api/authoring/graphql/v1/x%20y?a=1&b=%2F+c&&"
        );
        let d = t.find("/deploy").expect("route");
        assert_eq!(d.upstream_path_and_query("/deploy", None), "/");
        assert_eq!(d.upstream_path_and_query("/deploy/", Some("")), "/?");
        let s = t.find("/deploy/special").expect("route");
        assert_eq!(s.upstream_path_and_query("/deploy/special/z", None), "/x/z");
    }

    #[test]
    fn dot_segments_are_refused_in_every_encoding() {
        for bad in [
            "/deploy/../secret",
            "/deploy/./x",
            "/deploy/..",
            "/deploy/%2e%2e/x",
            "/deploy/%2E%2e/x",
            "/deploy/.%2E",
            "/deploy/%2e",
            "/deploy/x%2f..%2fy",
            "/deploy/x%2F%2e%2e%2Fy",
            "/deploy/x%5c..%5cy",
            "/deploy/x\\..\\y",
            "/deploy/%252e%252e/x",
            "/deploy/%25252e%25252e/x",
        ] {
            assert_eq!(check_path(bad), Err(PathError::DotSegment), "{bad}");
        }
        assert_eq!(check_path("*"), Err(PathError::NotAbsolute));
        assert_eq!(check_path("/a%00b"), Err(PathError::ControlCharacter));
        for good in [
            "/",
            "/deploy/x.y",
            "/deploy/...",
            "/deploy/.well-known",
            "/a%20b",
            "/a/%2e%2ex",
        ] {
            assert_eq!(check_path(good), Ok(()), "{good}");
        }
    }
}
