//! Phase 8, `upstream_401`: the upstream refused the credential. The credential drops the token
//! that was refused (only if it is still the cached one; forced refreshes are limited per
//! credential) and, when the request's body was kept, the request is replayed once with a fresh
//! token. Otherwise the 401 goes back to the client.

use std::future::Future;

use http::StatusCode;

use super::forward::{forward, Answer};
use super::upstream_request::Replay;
use crate::credential::{Credential, Injection};
use crate::error::ProxyError;
use crate::routes::Route;
use crate::runtime::Runtime;
use crate::telemetry::RequestTrace;

/// The answer to give the client: `answer` itself, or the replay's.
// Not an `async fn`, for the reason given in `forward`.
#[allow(clippy::manual_async_fn)]
pub(super) fn upstream_401<'a>(
    rt: &'a Runtime,
    route: &'a Route,
    credential: &'a Credential,
    used: &'a Injection,
    replay: Option<Replay>,
    answer: Answer,
    trace: &'a mut RequestTrace,
) -> impl Future<Output = Result<Answer, ProxyError>> + 'a {
    async move {
        if answer.0.status() != StatusCode::UNAUTHORIZED {
            return Ok(answer);
        }
        // Rare, and boxed so that every request's future does not carry the replay's state.
        Box::pin(after_401(
            rt, route, credential, used, replay, answer, trace,
        ))
        .await
    }
}

async fn after_401(
    rt: &Runtime,
    route: &Route,
    credential: &Credential,
    used: &Injection,
    replay: Option<Replay>,
    answer: Answer,
    trace: &mut RequestTrace,
) -> Result<Answer, ProxyError> {
    // Not replayable, the token is dropped all the same: the next request gets a fresh one.
    let Some(fresh) = credential.after_unauthorized(used, replay.is_some()).await else {
        return Ok(answer);
    };
    let Some(replay) = replay else {
        return Ok(answer);
    };
    // The refused response and its connection go before the replay takes another.
    drop(answer);
    rt.metrics.replays.inc();
    let mut request = replay.into_request(&fresh);
    trace.upstream(&route.target, request.headers_mut());
    let answer = forward(rt, route, request, None).await?;
    trace.upstream_answered(answer.0.status().as_u16());
    Ok(answer)
}
