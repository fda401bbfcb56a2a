//! Phase 5, `credential`: what the route's credential injects, from its cache without waiting on
//! the network; only a cold cache waits, sharing one fetch with every other waiter. No valid
//! token: 503 `token_unavailable` with `Retry-After`.

use std::future::Future;
use std::sync::Arc;

use crate::credential::{Credential, Injection};
use crate::error::ProxyError;
use crate::routes::Route;
use crate::runtime::Runtime;
use crate::telemetry::RequestTrace;

/// The route's credential and what it injects into this request. A traced request that finds
/// the cache cold waits in a child span of its own.
// Not an `async fn`: its arguments would be stored twice in every request's future.
#[allow(clippy::manual_async_fn)]
pub(super) fn credential<'a>(
    rt: &'a Runtime,
    route: &'a Route,
    trace: &'a mut RequestTrace,
) -> impl Future<Output = Result<(Arc<Credential>, Injection), ProxyError>> + 'a {
    async move {
        // Runtime::build resolves every route's credential, so a miss cannot happen; 404
        // rather than a panic if it ever did.
        let credential = rt
            .credential(&route.credential)
            .ok_or(ProxyError::NoRoute)?;
        // Asked only of a traced request: whether it is about to wait.
        if trace.is_on() && !credential.is_up() {
            trace.token_wait(credential.name());
        }
        let injection = credential.injection().await;
        trace.token_ready(injection.is_ok());
        let injection = injection.map_err(ProxyError::TokenUnavailable)?;
        Ok((Arc::clone(credential), injection))
    }
}
