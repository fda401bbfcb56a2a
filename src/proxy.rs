//! The request pipeline. [`process_request`] owns the order of the phases:
//!
//! 1. `request_filter`: method and request-target safety (`CONNECT` 405, dot segments 400),
//! 2. inbound authentication (clients; see `inbound`),
//! 3. `route`: longest segment-prefix match (404),
//! 4. `credential`: a verified token from the cache, never waiting unless cold (503),
//! 5. `upstream_request`: path rewrite, header hygiene, credential header,
//! 6. `forward`: send with the route's timeout (502/504),
//! 7. `upstream_401`: invalidate the used token, fetch one fresh token, replay once,
//! 8. `response_filter`: hop-by-hop headers removed.
//!
//! Errors become JSON in one place ([`ProxyError::into_response`]); the full error chain is logged
//! once, here.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::inbound::{ClientIdentity, Clients};
use crate::routes::{check_path, PathError, Route};
use crate::runtime::Runtime;
use crate::token::{Credential, ErrorChain, Token};
use crate::upstream::{strip_hop_by_hop, strip_inbound_credentials};

/// Per-connection facts the pipeline needs.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the client connected over TLS.
    pub tls: bool,
}

/// Live counters of the pipeline (the admin endpoint exports them).
#[derive(Debug, Default)]
pub struct PipelineStats {
    /// Requests whose response has not finished streaming.
    pub inflight: AtomicI64,
    /// Requests handled.
    pub requests: AtomicU64,
    /// Requests replayed after an upstream 401.
    pub replays: AtomicU64,
}

/// What the access log records about one request.
struct Outcome {
    route: Option<Arc<Route>>,
    client: Option<Arc<str>>,
    upstream_status: Option<u16>,
}

/// Handles one request end to end; never fails, errors become JSON responses.
pub async fn process_request(
    runtime: Arc<Runtime>,
    stats: Arc<PipelineStats>,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Response<TrackedBody> {
    let started = Instant::now();
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let guard = InflightGuard::new(Arc::clone(&stats));
    let method = req.method().clone();
    // The path only: query strings may carry secrets and are never logged.
    let path = req.uri().path().to_owned();
    let mut outcome = Outcome {
        route: None,
        client: None,
        upstream_status: None,
    };
    let response = match proxy(&runtime, &stats, req, conn, &mut outcome).await {
        Ok(response) => response,
        Err(error) => {
            let level_warn = matches!(
                error,
                ProxyError::UpstreamUnreachable(_)
                    | ProxyError::UpstreamTimeout(_)
                    | ProxyError::TokenUnavailable(_)
            );
            if level_warn {
                tracing::warn!(%method, %path, error = %ErrorChain(&error), "request failed");
            } else {
                tracing::debug!(%method, %path, error = %ErrorChain(&error), "request refused");
            }
            error.into_response()
        }
    };
    let route = outcome.route.as_deref();
    tracing::info!(
        target: "access",
        %method,
        %path,
        client = outcome.client.as_deref().unwrap_or("-"),
        route = route.map_or("-", |r| r.prefix.as_str()),
        credential = route.map_or("-", |r| r.credential.as_str()),
        status = response.status().as_u16(),
        upstream_status = outcome.upstream_status.unwrap_or(0),
        duration_us = started.elapsed().as_micros() as u64,
        "request"
    );
    response.map(|body| TrackedBody {
        inner: body,
        _guard: guard,
    })
}

async fn proxy(
    rt: &Runtime,
    stats: &PipelineStats,
    req: Request<Incoming>,
    conn: ConnInfo,
    outcome: &mut Outcome,
) -> Result<Response<ProxyBody>, ProxyError> {
    // 1. request_filter. Ordering: method before path, so `CONNECT host:443` is 405, not 400.
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    check_path(req.uri().path()).map_err(|e| {
        ProxyError::BadRequest(match e {
            PathError::NotAbsolute => "The request path must start with '/'.",
            PathError::DotSegment => "The request path must not contain '.' or '..' segments.",
            PathError::ControlCharacter => {
                "The request path must not contain encoded control characters."
            }
        })
    })?;

    // 2. inbound authentication. The local token endpoint authenticates by its body.
    let mut req = req;
    if let Some(clients) = &rt.clients {
        if rt.token_endpoint.as_deref() == Some(req.uri().path()) {
            return local_token_endpoint(clients, req).await;
        }
        let identity = clients
            .authenticate(req.headers())
            .map_err(|_| ProxyError::Unauthorized)?;
        outcome.client = Some(Arc::clone(&identity.name));
        req.extensions_mut().insert(identity);
    }

    // 3. route
    let route = Arc::clone(
        rt.routes
            .find(req.uri().path())
            .ok_or(ProxyError::NoRoute)?,
    );
    outcome.route = Some(Arc::clone(&route));
    if let Some(identity) = req.extensions().get::<Arc<ClientIdentity>>() {
        if !identity.may_use(&route.prefix) {
            return Err(ProxyError::Forbidden);
        }
    }

    // 4. credential
    let credential = rt
        .credential(&route.credential)
        .ok_or(ProxyError::NoRoute)?;
    let (token, auth_name, auth_value) = match credential {
        Credential::OAuth(c) => {
            let token = c.token().await.map_err(ProxyError::TokenUnavailable)?;
            let value = token.authorization.clone();
            (Some(token), header::AUTHORIZATION, value)
        }
        Credential::Header { name, value } => (None, name.clone(), value.clone()),
    };

    // 5. upstream_request
    let (parts, body) = req.into_parts();
    let path_and_query = route.upstream_path_and_query(parts.uri.path(), parts.uri.query());
    let uri = Uri::builder()
        .scheme(route.scheme.clone())
        .authority(route.authority.clone())
        .path_and_query(
            PathAndQuery::try_from(path_and_query)
                .map_err(|_| ProxyError::BadRequest("The request target is malformed."))?,
        )
        .build()
        .map_err(|_| ProxyError::BadRequest("The request target is malformed."))?;
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    strip_inbound_credentials(&mut headers);
    headers.insert(header::HOST, route.host_header.clone());
    if rt.forwarded_headers {
        add_forwarded_headers(&mut headers, conn, parts.version);
    }
    headers.insert(auth_name.clone(), auth_value);

    // A body that fits the replay buffer is read first so it can be sent again after a 401;
    // anything larger (or of unknown length) streams through untouched.
    let replayable =
        token.is_some() && replayable_len(&headers, &body, rt.replay_body_limit).is_some();
    let (replay, first_body) = if replayable {
        let bytes = body
            .collect()
            .await
            .map_err(|_| ProxyError::BadRequest("The request body could not be read."))?
            .to_bytes();
        (Some(bytes.clone()), ProxyBody::full(bytes))
    } else {
        (None, ProxyBody::Incoming(body))
    };
    let method = parts.method;
    let first = build_request(&method, &uri, headers.clone(), first_body);

    // 6. forward
    let response = forward(rt, &route, first).await?;
    outcome.upstream_status = Some(response.status().as_u16());

    // 7. upstream_401
    let response = match (response.status(), credential, token, replay) {
        (StatusCode::UNAUTHORIZED, Credential::OAuth(c), Some(used), Some(bytes)) => {
            match fresh_token(c, &used).await {
                Some(fresh) => {
                    drop(response);
                    stats.replays.fetch_add(1, Ordering::Relaxed);
                    headers.insert(header::AUTHORIZATION, fresh.authorization.clone());
                    let again = build_request(&method, &uri, headers, ProxyBody::full(bytes));
                    let response = forward(rt, &route, again).await?;
                    outcome.upstream_status = Some(response.status().as_u16());
                    response
                }
                None => response,
            }
        }
        (StatusCode::UNAUTHORIZED, Credential::OAuth(c), Some(used), None) => {
            // Not replayable, but the token may still be bad: let the next request get a
            // fresh one.
            c.invalidate(&used);
            response
        }
        _ => response,
    };

    // 8. response_filter
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, ProxyBody::Incoming(body)))
}

/// Largest body the local token endpoint reads.
const TOKEN_REQUEST_LIMIT: usize = 64 * 1024;

async fn local_token_endpoint(
    clients: &Clients,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    if req.method() != Method::POST {
        return Err(ProxyError::MethodNotAllowed);
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = http_body_util::Limited::new(req.into_body(), TOKEN_REQUEST_LIMIT)
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

/// After a 401: a token other than `used`, or `None` when no replay should happen.
async fn fresh_token(
    credential: &crate::token::OAuthCredential,
    used: &Arc<Token>,
) -> Option<Arc<Token>> {
    if !credential.invalidate(used) {
        return None;
    }
    match credential.token().await {
        Ok(fresh) if !Arc::ptr_eq(&fresh, used) => Some(fresh),
        _ => None,
    }
}

/// The body length if it is known and small enough to keep for a replay.
fn replayable_len(headers: &HeaderMap, body: &Incoming, limit: u64) -> Option<u64> {
    if body.is_end_stream() {
        return Some(0);
    }
    let declared = body.size_hint().exact().or_else(|| {
        headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    })?;
    (declared <= limit).then_some(declared)
}

fn build_request(
    method: &Method,
    uri: &Uri,
    headers: HeaderMap,
    body: ProxyBody,
) -> Request<ProxyBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers;
    request
}

async fn forward(
    rt: &Runtime,
    route: &Route,
    request: Request<ProxyBody>,
) -> Result<Response<Incoming>, ProxyError> {
    match tokio::time::timeout(route.timeout, rt.client.request(request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(ProxyError::UpstreamUnreachable(Box::new(e))),
        Err(_) => Err(ProxyError::UpstreamTimeout(route.timeout)),
    }
}

fn add_forwarded_headers(headers: &mut HeaderMap, conn: ConnInfo, _version: Version) {
    let ip = conn.peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::try_from(xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
}

/// Decrements the in-flight gauge when the response (body included) is done.
#[derive(Debug)]
pub struct InflightGuard(Arc<PipelineStats>);

impl InflightGuard {
    fn new(stats: Arc<PipelineStats>) -> Self {
        stats.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(stats)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The response body sent to clients: keeps the request counted in flight until it ends.
#[derive(Debug)]
pub struct TrackedBody {
    inner: ProxyBody,
    _guard: InflightGuard,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
