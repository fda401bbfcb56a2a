//! Phase 5, `limit`: the route's and the client's limits (README, "Rate limits and caps"). A
//! route paused by its upstream answers with the upstream's status
//! (`upstream_throttled`); over a `max_in_flight`, 429 `too_many_in_flight`; over a `rate`, 429
//! `rate_limited` with `Retry-After` and the `RateLimit` fields. Runs before the credential, so
//! a refused request never reaches the upstream and never costs a token. After the upstream
//! answered, [`observe_upstream`] reads its own 429/503 with `Retry-After` to pause the route.

use std::sync::Arc;

use http::Response;
use hyper::body::Incoming;

use crate::error::ProxyError;
use crate::inbound::ClientIdentity;
use crate::limits::{admit, Admission, Refusal};
use crate::metrics::RejectedLabels;
use crate::routes::Route;
use crate::runtime::Runtime;

/// Admits the request or refuses it, counting the refusal in `proxy_rejected_total`. `None`
/// for a route without limits state (built alone, in tests and benchmarks).
pub(super) fn limit(
    rt: &Runtime,
    route: &Route,
    client: Option<&ClientIdentity>,
) -> Result<Option<Admission>, ProxyError> {
    let Some(limits) = &route.limits else {
        return Ok(None);
    };
    let client_limits = client.and_then(|c| c.limits.as_deref());
    let refusal = match admit(limits, client_limits) {
        Ok(admission) => return Ok(Some(admission)),
        Err(refusal) => refusal,
    };
    rt.metrics
        .rejected
        .get_or_create(&RejectedLabels {
            route: Arc::clone(&route.label),
            client: client.map_or_else(|| Arc::from("-"), |c| Arc::clone(&c.name)),
            reason: refusal.reason(),
        })
        .inc();
    Err(match refusal {
        Refusal::UpstreamThrottled(pause) => ProxyError::UpstreamThrottled {
            status: pause.status,
            retry_after_secs: pause.retry_after_secs(),
        },
        Refusal::RateLimited {
            refused, headers, ..
        } => ProxyError::RateLimited {
            retry_after_secs: refused.retry_after_secs(),
            headers,
        },
        Refusal::TooManyInFlight(_) => ProxyError::TooManyInFlight,
    })
}

/// Pauses the route when the upstream answered 429/503 with `Retry-After` or
/// `x-ratelimit-reset` (and `honor_upstream_retry_after` is on).
pub(super) fn observe_upstream(route: &Route, response: &Response<Incoming>) {
    let Some(limits) = &route.limits else {
        return;
    };
    if let Some(pause) = limits.observe_upstream(response.status(), response.headers()) {
        tracing::warn!(
            route = %route.prefix,
            status = response.status().as_u16(),
            pause_ms = pause.as_millis() as u64,
            "upstream asked for a pause; answering this route locally until it ends"
        );
    }
}
