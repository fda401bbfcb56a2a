//! `rewrite_location` on arbitrary `Location` values: never a panic; a rewritten value starts
//! with the route's prefix on a segment boundary (`/` for the root route), is a valid header
//! value, and never points to another host (no `//` or `/\` at the start, which clients read
//! as scheme-relative, and no scheme).
//!
//! Input: byte 0 picks the route (prefix and upstream); the rest is the `Location` value.
#![no_main]

use std::time::Duration;

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use sitecore_auth_proxy::config::RouteSettings;
use sitecore_auth_proxy::routes::Route;
use sitecore_auth_proxy::routes::rewrite_location;

const PREFIXES: [&str; 4] = ["/", "/deploy", "/a/b", "/authoring"];

const UPSTREAMS: [&str; 5] = [
    "https://up.example/base/path",
    "https://up.example",
    "http://127.0.0.1:8080/a",
    "https://up.example:8443/x",
    "https://xmc.example.io/sitecore/api/authoring/graphql/v1",
];

fuzz_target!(|data: &[u8]| {
    let [select, location @ ..] = data else {
        return;
    };
    let Ok(location) = HeaderValue::from_bytes(location) else {
        return;
    };
    let select = usize::from(*select);
    let prefix = PREFIXES[select % PREFIXES.len()];
    let upstream = UPSTREAMS[(select / PREFIXES.len()) % UPSTREAMS.len()];
    let settings = RouteSettings {
        prefix: prefix.to_owned(),
        upstream: upstream.parse().expect("fixed upstream"),
        credential: "c".into(),
        timeout: None,
        limits: Default::default(),
    };
    let route = Route::new(&settings, Duration::from_secs(1)).expect("fixed route");

    let Some(rewritten) = rewrite_location(&route, &location) else {
        return;
    };
    let out = rewritten
        .to_str()
        .expect("a rewritten Location is visible ASCII");
    assert!(
        HeaderValue::from_str(out).is_ok(),
        "not a valid header value: {out:?}"
    );
    let rest = if prefix == "/" {
        out.strip_prefix('/')
    } else {
        out.strip_prefix(prefix)
            .filter(|r| r.is_empty() || r.starts_with(['/', '?', '#']))
    };
    assert!(
        rest.is_some(),
        "{location:?} -> {out:?} leaves prefix {prefix}"
    );
    assert!(
        !out.starts_with("//") && !out.starts_with("/\\"),
        "{location:?} -> {out:?} points to another host (route {prefix} -> {upstream})"
    );
});
