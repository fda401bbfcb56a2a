//! Phase 2, `inbound_auth`: who is calling. With `[[clients]]`, a request must carry a client key
//! (`Authorization: Bearer` or `X-Api-Key`) or a token the local token endpoint issued (401
//! otherwise); the local token endpoint itself is answered here, authenticated by its body.

use std::sync::Arc;
use std::time::Duration;

use http::header;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::{PeerBody, ProxyBody};
use crate::error::ProxyError;
use crate::inbound::{ClientIdentity, Clients};
use crate::runtime::Runtime;

/// The calling client; `None` when the proxy has no `[[clients]]`.
pub(super) fn inbound_auth(
    rt: &Runtime,
    headers: &HeaderMap,
) -> Result<Option<Arc<ClientIdentity>>, ProxyError> {
    let Some(clients) = &rt.clients else {
        return Ok(None);
    };
    match clients.authenticate(headers) {
        Ok(identity) => Ok(Some(identity)),
        Err(_) => Err(ProxyError::Unauthorized),
    }
}

/// The clients, when `req` is for the local token endpoint.
pub(super) fn token_endpoint<'a>(rt: &'a Runtime, req: &Request<Incoming>) -> Option<&'a Clients> {
    let clients = rt.clients.as_ref()?;
    (rt.token_endpoint.as_deref() == Some(req.uri().path())).then_some(clients)
}

/// Largest body the local token endpoint reads.
const TOKEN_REQUEST_LIMIT: usize = 64 * 1024;

/// The local token endpoint; a body that stalls for `idle` is refused like a malformed one.
pub(super) async fn local_token_endpoint(
    clients: &Clients,
    req: Request<Incoming>,
    idle: Duration,
) -> Result<Response<ProxyBody>, ProxyError> {
    if req.method() != Method::POST {
        return Err(ProxyError::MethodNotAllowed);
    }
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(header::CONTENT_TYPE);
    let authorization = header(header::AUTHORIZATION);
    let body = PeerBody::new(req.into_body(), idle);
    let body = http_body_util::Limited::new(body, TOKEN_REQUEST_LIMIT)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ProxyError::PayloadTooLarge
            } else {
                ProxyError::BadRequest("The request body could not be read.")
            }
        })?
        .to_bytes();
    Ok(clients.token_endpoint(content_type.as_deref(), authorization.as_deref(), &body))
}
