//! The `Location` rewrite: a redirect into an upstream becomes the same place behind the proxy.

use http::HeaderValue;

use super::Route;

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
        || super::check_path(&rewritten[..path_end]).is_err()
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
}
