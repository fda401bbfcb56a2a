//! Phase 3, `route`: the longest route whose prefix matches the path on segment boundaries
//! (404 otherwise). Phase 4, `policy`: whether the calling client may use it (403).

use std::sync::Arc;

use crate::error::ProxyError;
use crate::inbound::ClientIdentity;
use crate::routes::Route;
use crate::runtime::Runtime;

/// The route for `path`.
pub(super) fn route(rt: &Runtime, path: &str) -> Result<Arc<Route>, ProxyError> {
    rt.routes
        .find(path)
        .map(Arc::clone)
        .ok_or(ProxyError::NoRoute)
}

/// Refuses a client the route is not open to. Without `[[clients]]` every route is open.
pub(super) fn policy(route: &Route, client: Option<&ClientIdentity>) -> Result<(), ProxyError> {
    match client {
        Some(client) if !client.may_use(&route.prefix) => Err(ProxyError::Forbidden),
        _ => Ok(()),
    }
}
