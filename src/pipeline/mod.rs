//! The request pipeline. [`process_request`] owns the order of the phases, one function each,
//! in files named after them:
//!
//! 1. `request_filter` ([`filter`]): `CONNECT` 405, unsafe paths 400,
//! 2. `inbound_auth` ([`identify`]): client key or issued token (401); the local token endpoint,
//! 3. `route` ([`route`]): longest segment-prefix match (404),
//! 4. `policy` ([`route`]): the client's permission for the route (403),
//! 5. `limit` ([`limit`]): upstream pause, in-flight caps, rates (429 or the upstream's status),
//! 6. `credential` ([`credential`]): what the credential injects, from its cache (503),
//! 7. `upstream_request` ([`upstream_request`]): path rewrite, header hygiene, the body read ahead,
//! 8. `forward` ([`forward`]): send with the route's timeout (502/504), and an upstream's own
//!    429/503 with `Retry-After` pauses the route ([`limit::observe_upstream`]),
//! 9. `upstream_401` ([`replay`]): drop the refused token, replay once with a fresh one,
//! 10. `response_filter` ([`response`]): hop-by-hop headers removed, `Location` rewritten, the
//!     `RateLimit` fields added,
//! 11. the access record ([`access`]): log line and metrics when the response body ends; it
//!     holds the in-flight slots until then.
//!
//! With `[telemetry]`, the request's span ([`RequestTrace`]) begins with the record and ends
//! with it; the credential phase opens a child span while it waits on a cold cache, and each
//! upstream call (the first and a replay) is a child span whose `traceparent` goes upstream.
//! Without it, each of those calls is one `None` check.
//!
//! Errors become JSON in one place ([`ProxyError::into_response`]); the full error chain is
//! logged once, here.
//!
//! The route's timeout bounds every wait on a peer: the upstream's response head (counted from
//! the end of a streamed request body), and each stretch in which a body streamed in either
//! direction delivers no bytes ([`crate::body::PeerBody`]). A stalled body is cut; a slow but
//! steady one is not.

mod access;
mod credential;
mod filter;
mod forward;
mod handler;
mod identify;
mod limit;
mod replay;
mod request_id;
mod response;
mod route;
mod upstream_request;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::error::{ErrorChain, ProxyError};
use crate::runtime::Runtime;
use crate::server::ConnInfo;
use crate::telemetry::RequestTrace;
pub use access::TrackedBody;
use access::{AccessRecord, Outcome};
pub use handler::{ConnectionService, ProxyHandler};
use request_id::X_REQUEST_ID;

/// Handles one request end to end; never fails (errors become JSON responses), hence the
/// `Infallible`, which hyper's service takes as it is.
pub fn process_request(
    runtime: Arc<Runtime>,
    mut req: Request<Incoming>,
    conn: ConnInfo,
) -> impl Future<Output = Result<Response<TrackedBody>, Infallible>> {
    let request_id = request_id::request_id(req.headers());
    req.headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    // The record exists from the first moment: if the client goes away before there is a
    // response (this future is dropped), its `Drop` still counts and logs the request.
    let mut record = AccessRecord::begin(
        Arc::clone(&runtime),
        Arc::clone(&conn.activity),
        request_id,
        req.method().clone(),
        // The path only: query strings may carry secrets and are never logged. A copy, because
        // the request's `Uri` shares the buffer its head was read into (HTTP/1.1) or decoded
        // into (HTTP/2), which the record would otherwise keep until the response ends.
        req.uri().path().into(),
    );
    record.outcome.trace = RequestTrace::begin(
        runtime.telemetry.as_ref(),
        &record.request_id,
        &record.method,
        &record.path,
        req.headers(),
        conn.tls,
    );
    // Not an `async fn`: that would store its arguments twice in the future (the state they are
    // moved into, and the locals its body works on), and the future is allocated and copied
    // per request. So the record above is made when hyper calls the service, just before the
    // first poll (a future dropped unpolled still logs its request, as 499).
    async move {
        let mut response = match proxy(&runtime, req, conn, &mut record.outcome).await {
            Ok(response) => response,
            Err(error) => fail_to_proxy(&mut record, error),
        };
        response
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), record.request_id.clone());
        record.status = response.status().as_u16();
        Ok(response.map(|inner| record.tracking(inner)))
    }
}

/// The phases, in order. Each returns early with the error that ends the request.
// Not an `async fn`, for the reason given in `process_request`.
#[allow(clippy::manual_async_fn)]
fn proxy<'a>(
    rt: &'a Runtime,
    req: Request<Incoming>,
    conn: ConnInfo,
    outcome: &'a mut Outcome,
) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + 'a {
    async move {
        filter::request_filter(&req)?;
        if let Some(clients) = identify::token_endpoint(rt, &req) {
            let idle = rt.config.server.request_timeout;
            return identify::local_token_endpoint(clients, req, idle).await;
        }
        outcome.client = identify::inbound_auth(rt, req.headers())?;
        let route = route::route(rt, req.uri().path())?;
        outcome.route = Some(Arc::clone(&route));
        route::policy(&route, outcome.client.as_deref())?;
        let admission = limit::limit(rt, &route, outcome.client.as_deref())?;
        let (rate_fields, slots) = admission.map(|a| (a.headers, a.slots)).unzip();
        outcome.slots = slots;
        let (credential, injection) =
            credential::credential(rt, &route, &mut outcome.trace).await?;
        let mut prepared = upstream_request::upstream_request(
            rt,
            &route,
            &injection,
            credential.may_replay(),
            req,
            &conn,
        )
        .await?;
        let upload = prepared.upload.as_deref();
        // Into the prepared request's own headers: a local of its own would be kept across the
        // await, in every request's future.
        outcome
            .trace
            .upstream(&route.target, prepared.request.headers_mut());
        let answer = forward::forward(rt, &route, prepared.request, upload).await?;
        limit::observe_upstream(&route, &answer.0);
        outcome.upstream_status = Some(answer.0.status().as_u16());
        outcome.trace.upstream_answered(answer.0.status().as_u16());
        let answer = replay::upstream_401(
            rt,
            &route,
            &credential,
            &injection,
            prepared.replay,
            answer,
            &mut outcome.trace,
        )
        .await?;
        outcome.upstream_status = Some(answer.0.status().as_u16());
        Ok(response::response_filter(rt, &route, answer, rate_fields))
    }
}

/// The error's JSON response, counted, traced and logged once with its whole chain.
fn fail_to_proxy(record: &mut AccessRecord, error: ProxyError) -> Response<ProxyBody> {
    record.outcome.trace.failed(error.code());
    let kind = match &error {
        ProxyError::UpstreamUnreachable(_) | ProxyError::EgressUnreachable(_) => {
            Some("unreachable")
        }
        ProxyError::UpstreamTimeout(_) => Some("timeout"),
        _ => None,
    };
    if let Some(kind) = kind {
        record.upstream_error(kind);
    }
    let (id, method, path) = (&record.request_id, &record.method, &record.path);
    if matches!(error, ProxyError::RequestBodyStalled(_)) {
        tracing::debug!(request_id = ?id, %method, %path, "request body stalled; request abandoned");
    } else if kind.is_some() || matches!(error, ProxyError::TokenUnavailable(_)) {
        tracing::warn!(request_id = ?id, %method, %path, error = %ErrorChain(&error), "request failed");
    } else {
        tracing::debug!(request_id = ?id, %method, %path, error = %ErrorChain(&error), "request refused");
    }
    error.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future that `f`'s call returns, without calling it.
    fn future_size<A, B, C, F: Future>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every request's future is allocated and copied once (hyper's service future is boxed),
    /// and where its big states sit decides which heap pages idle connections touch
    /// (BENCHMARKS.md, finding 6). Growing past the budget is worth a look with
    /// `profile.sh --instructions` and the idle probe.
    #[test]
    fn the_request_future_stays_within_its_budget() {
        let size = future_size(process_request);
        eprintln!("request future: {size} bytes");
        assert!(size <= 3_584, "the request future grew to {size} bytes");
    }
}
