//! Path safety and the upstream path rewrite, on request targets as hyper hands them over.
//!
//! Input: byte 0 picks which fixed prefixes are in the route table, byte 1 picks the upstreams
//! and how many leading segments of the request path become one more prefix (so arbitrary
//! segments get matched too); the rest is the request target. For every path that `check_path`
//! accepts and a route matches, the rewritten upstream path stays under the route's base path on
//! a segment boundary, keeps the query, parses as a `PathAndQuery`, and has no `.` or `..`
//! segment after up to three rounds of percent-decoding (split on `/` and `\`).
#![no_main]

use std::time::Duration;

use http::uri::PathAndQuery;
use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode;
use sitecore_auth_proxy::config::RouteSettings;
use sitecore_auth_proxy::routes::{check_path, Route, RouteTable};

const PREFIXES: [&str; 7] = [
    "/",
    "/deploy",
    "/deploy/special",
    "/a",
    "/a/b",
    "/x.y",
    "/stream/documents",
];

const UPSTREAMS: [&str; 4] = [
    "https://up.example/base/path",
    "https://up.example",
    "http://127.0.0.1:8080/a",
    "https://up.example/sitecore/api/authoring/graphql/v1",
];

fn route(prefix: &str, upstream: &str) -> Route {
    let settings = RouteSettings {
        prefix: prefix.to_owned(),
        upstream: upstream.parse().expect("fixed upstream"),
        credential: "c".into(),
        timeout: None,
        limits: Default::default(),
    };
    Route::new(&settings, Duration::from_secs(1)).expect("fixed route")
}

/// What `config::values::check_prefix` accepts: `/` or `/a/b` of plain path characters, with no
/// empty, `.` or `..` segment.
fn valid_prefix(prefix: &str) -> bool {
    prefix == "/"
        || (prefix.starts_with('/')
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/".contains(c))
            && prefix[1..]
                .split('/')
                .all(|s| !s.is_empty() && s != "." && s != ".."))
}

fn has_dot_segment(bytes: &[u8]) -> bool {
    bytes
        .split(|b| *b == b'/' || *b == b'\\')
        .any(|segment| segment == b"." || segment == b"..")
}

fuzz_target!(|data: &[u8]| {
    let [mask, select, target @ ..] = data else {
        return;
    };
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    let path = uri.path();
    let query = uri.query();
    if check_path(path).is_err() {
        return;
    }

    let mut routes: Vec<Route> = Vec::new();
    for (i, prefix) in PREFIXES.iter().enumerate() {
        if mask & (1 << i) != 0 {
            routes.push(route(
                prefix,
                UPSTREAMS[(i + usize::from(*select)) % UPSTREAMS.len()],
            ));
        }
    }
    let depth = usize::from(select >> 4) % 4 + 1;
    let derived_end = path
        .match_indices('/')
        .nth(depth)
        .map_or(path.len(), |(i, _)| i);
    let derived = &path[..derived_end];
    if valid_prefix(derived) && !routes.iter().any(|r| r.prefix == derived) {
        routes.push(route(derived, UPSTREAMS[usize::from(select & 3)]));
    }
    let table = RouteTable::new(routes);

    let Some(route) = table.find(path) else {
        return;
    };
    let prefix = route.prefix.as_str();
    assert!(
        prefix == "/"
            || path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|r| r.starts_with('/')),
        "{prefix} matched {path} off a segment boundary"
    );

    let out = route.upstream_path_and_query(path, query);
    let (upstream_path, upstream_query) = match out.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (out.as_str(), None),
    };
    assert_eq!(upstream_query, query, "query changed: {out}");
    let base = route.base_path.as_str();
    assert!(
        upstream_path == base
            || upstream_path
                .strip_prefix(base)
                .is_some_and(|r| r.starts_with('/')),
        "{path} -> {out} escapes base {base}"
    );
    assert!(
        PathAndQuery::try_from(out.as_str()).is_ok(),
        "{path} -> {out} is not a valid request target"
    );

    let mut current = upstream_path.as_bytes().to_vec();
    for _ in 0..=3 {
        assert!(
            !has_dot_segment(&current),
            "{path} -> {out} has a dot segment after decoding"
        );
        let next: Vec<u8> = percent_decode(&current).collect();
        if next == current {
            break;
        }
        current = next;
    }
});
