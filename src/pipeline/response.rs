//! Phase 9, `response_filter`: the upstream's response as the client gets it. Hop-by-hop headers
//! are removed, a `Location` pointing into the upstream becomes a proxy path, the `RateLimit`
//! fields of the proxy's own limits are added (after the upstream's), and the body
//! streams with the route's idle limit, giving its connection back to the pool at its end.

use http::{header, Response};

use super::forward::Answer;
use crate::body::{PeerBody, ProxyBody};
use crate::limits::RateLimitHeaders;
use crate::routes::rewrite_location;
use crate::routes::Route;
use crate::runtime::Runtime;
use crate::upstream::strip_hop_by_hop;

/// The response to send the client, with the `RateLimit` fields of the limits it passed.
pub(super) fn response_filter(
    rt: &Runtime,
    route: &Route,
    answer: Answer,
    rate_fields: Option<RateLimitHeaders>,
) -> Response<ProxyBody> {
    let (response, lease) = answer;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(fields) = rate_fields {
        fields.apply(&mut parts.headers);
    }
    if rt.rewrite_location {
        if let Some(location) = parts.headers.get(header::LOCATION) {
            if let Some(rewritten) = rewrite_location(route, location) {
                parts.headers.insert(header::LOCATION, rewritten);
            }
        }
    }
    let body = PeerBody::new(body, route.timeout).releasing(lease);
    Response::from_parts(parts, ProxyBody::Streamed(body))
}
