//! Phase 7, `forward`: sends the request on the worker's pooled upstream connections and waits up
//! to the route's timeout for the response head (502 `upstream_unreachable`, 504
//! `upstream_timeout`).

use std::future::Future;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::{ProxyBody, UploadWatch};
use crate::error::ProxyError;
use crate::routes::Route;
use crate::runtime::Runtime;
use crate::upstream::{Lease, UpstreamError};

/// The upstream's response head, with the lease of its pooled connection (see
/// [`crate::body::PeerBody::releasing`]).
pub(super) type Answer = (Response<Incoming>, Option<Lease<ProxyBody>>);

/// Sends `request` and waits for the answer. While a streamed request body is still moving, the
/// wait runs from its last bytes (the upstream answers once it has the whole body); while it
/// waits on the client, the body's own idle timer decides, and a body that stalled is the
/// client's fault, not the upstream's.
// Not an `async fn`: that would store the arguments twice in the future (the state they are
// moved into, and the locals its body works on), and every request's future is allocated and
// copied.
#[allow(clippy::manual_async_fn)]
pub(super) fn forward<'a>(
    rt: &'a Runtime,
    route: &'a Route,
    request: Request<ProxyBody>,
    upload: Option<&'a UploadWatch>,
) -> impl Future<Output = Result<Answer, ProxyError>> + 'a {
    async move {
        match wait(rt, route, request, upload).await {
            Err(_) if upload.is_some_and(UploadWatch::stalled) => {
                Err(ProxyError::RequestBodyStalled(route.timeout))
            }
            answer => answer,
        }
    }
}

#[allow(clippy::manual_async_fn)]
fn wait<'a>(
    rt: &'a Runtime,
    route: &'a Route,
    request: Request<ProxyBody>,
    upload: Option<&'a UploadWatch>,
) -> impl Future<Output = Result<Answer, ProxyError>> + 'a {
    async move {
        let mut sent = std::pin::pin!(rt.pool().request(&route.target, request));
        let mut deadline = tokio::time::Instant::now() + route.timeout;
        loop {
            match tokio::time::timeout_at(deadline, &mut sent).await {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(e @ UpstreamError::Egress { .. })) => {
                    return Err(ProxyError::EgressUnreachable(Box::new(e)))
                }
                Ok(Err(e)) => return Err(ProxyError::UpstreamUnreachable(Box::new(e))),
                Err(_) => {
                    let now = tokio::time::Instant::now();
                    deadline = match upload {
                        Some(upload) if upload.waiting_on_client() => now + route.timeout,
                        Some(upload) if upload.last_progress() + route.timeout > now => {
                            upload.last_progress() + route.timeout
                        }
                        // No upload, or one the upstream stopped reading.
                        _ => return Err(ProxyError::UpstreamTimeout(route.timeout)),
                    };
                }
            }
        }
    }
}
