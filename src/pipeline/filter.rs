//! Phase 1, `request_filter`: what no route may see. `CONNECT` is refused (405) and so is a path
//! with `.`/`..` segments or encoded control characters (400), before anything else looks at
//! the request.

use http::{Method, Request};

use crate::error::ProxyError;
use crate::routes::{check_path, PathError};

/// Refuses requests a reverse proxy must not route.
pub(super) fn request_filter<B>(req: &Request<B>) -> Result<(), ProxyError> {
    // Ordering: method before path, so `CONNECT host:443` is 405, not 400.
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    // Body framing is settled by hyper before this point: conflicting Content-Lengths and
    // unknown codings are 400s; Content-Length beside Transfer-Encoding is dropped (RFC 9112
    // section 6.1) and the connection closes after the response. The forwarded request is
    // re-framed from the body alone, so the upstream never sees two framings.
    check_path(req.uri().path()).map_err(|e| {
        ProxyError::BadRequest(match e {
            PathError::NotAbsolute => "The request path must start with '/'.",
            PathError::DotSegment => "The request path must not contain '.' or '..' segments.",
            PathError::ControlCharacter => {
                "The request path must not contain encoded control characters."
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, target: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(target)
            .body(())
            .expect("a valid request")
    }

    #[test]
    fn connect_is_refused_before_its_target_is_looked_at() {
        let refused = request_filter(&request(Method::CONNECT, "example.com:443"));
        assert!(matches!(refused, Err(ProxyError::MethodNotAllowed)));
    }

    #[test]
    fn dot_segments_in_any_encoding_are_bad_requests() {
        for target in ["/a/../b", "/a/%2e%2E/b", "/a/./b", "/a/%2E/b"] {
            let refused = request_filter(&request(Method::GET, target));
            assert!(
                matches!(refused, Err(ProxyError::BadRequest(_))),
                "{target} passed"
            );
        }
    }

    #[test]
    fn ordinary_requests_pass() {
        for target in ["/", "/deploy/api/projects/v1?x=1", "/a/..b/c.d"] {
            assert!(
                request_filter(&request(Method::POST, target)).is_ok(),
                "{target}"
            );
        }
    }
}
