//! The request pipeline. [`process_request`] owns the order of the phases:
//!
//! 1. `request_filter`: method and request-target safety (`CONNECT` 405, dot segments 400),
//! 2. `inbound_auth`: client key or issued token (401), the local token endpoint,
//! 3. `route`: longest segment-prefix match (404), client permission (403),
//! 4. `credential`: a verified token from the cache, never waiting unless cold (503),
//! 5. `upstream_request`: path rewrite, header hygiene, credential header,
//! 6. `forward`: send with the route's timeout (502/504),
//! 7. `upstream_401`: invalidate the used token, fetch one fresh token, replay once,
//! 8. `response_filter`: hop-by-hop headers removed, `Location` rewritten.
//!
//! Errors become JSON in one place ([`ProxyError::into_response`]); the full error chain is logged
//! once, here. The access-log line and the request metrics are written when the response body
//! ends (see [`TrackedBody`]), so duration and bytes cover streamed responses too.
//!
//! The route's timeout bounds every wait on a peer: the upstream's response head (counted from
//! the end of a streamed request body), and each stretch in which a body streamed in either
//! direction delivers no bytes ([`PeerBody`]). A stalled body is cut; a slow but steady one is
//! not.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::{read_ahead, BodyError, PeerBody, ProxyBody, ReadAhead, UploadWatch};
use crate::client::Lease;
use crate::error::ProxyError;
use crate::inbound::{ClientIdentity, Clients};
use crate::metrics::{Metrics, RouteLabels, UpstreamErrorLabels};
use crate::routes::{check_path, PathError, Route};
use crate::runtime::Runtime;
use crate::server::{ConnActivity, ConnInfo};
use crate::token::{Credential, ErrorChain, OAuthCredential, Token};
use crate::upstream::{rewrite_location, strip_hop_by_hop, strip_inbound_credentials};

/// Live counters of the pipeline and the process's metrics.
#[derive(Debug)]
pub struct PipelineStats {
    /// Requests whose response has not finished streaming.
    pub inflight: AtomicI64,
    /// Requests handled.
    pub requests: AtomicU64,
    /// Requests replayed after an upstream 401.
    pub replays: AtomicU64,
    /// The Prometheus families.
    pub metrics: Arc<Metrics>,
}

impl PipelineStats {
    /// Counters at zero, recording into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> PipelineStats {
        PipelineStats {
            inflight: AtomicI64::new(0),
            requests: AtomicU64::new(0),
            replays: AtomicU64::new(0),
            metrics,
        }
    }
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static NO_LABEL: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("-"));

/// What the access log and the metrics record about one request.
#[derive(Debug, Default)]
struct Outcome {
    route: Option<Arc<Route>>,
    client: Option<Arc<str>>,
    upstream_status: Option<u16>,
}

/// Handles one request end to end; never fails (errors become JSON responses), hence the
/// `Infallible`, which hyper's service takes as it is.
pub fn process_request(
    runtime: Arc<Runtime>,
    stats: Arc<PipelineStats>,
    mut req: Request<Incoming>,
    conn: ConnInfo,
) -> impl Future<Output = Result<Response<TrackedBody>, Infallible>> {
    let request_id = request_id(req.headers());
    req.headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    // The record exists from the first moment: if the client goes away before there is a
    // response (this future is dropped), its `Drop` still counts and logs the request.
    let mut record = AccessRecord::begin(
        Arc::clone(&stats),
        Arc::clone(&conn.activity),
        request_id,
        req.method().clone(),
        // The path only: query strings may carry secrets and are never logged. A copy, because
        // the request's `Uri` shares the buffer its head was read into (HTTP/1.1) or decoded
        // into (HTTP/2), which the record would otherwise keep until the response ends.
        req.uri().path().into(),
    );
    // Not an `async fn`: that would store its arguments twice in the future (the state they are
    // moved into, and the locals its body works on), and the future is allocated and copied
    // per request. So the record above is made when hyper calls the service, just before the
    // first poll (a future dropped unpolled still logs its request, as 499).
    async move {
        let mut response = match proxy(&runtime, &stats, req, conn, &mut record.outcome).await {
            Ok(response) => response,
            Err(error) => {
                let kind = match &error {
                    ProxyError::UpstreamUnreachable(_) => Some("unreachable"),
                    ProxyError::UpstreamTimeout(_) => Some("timeout"),
                    _ => None,
                };
                if let (Some(kind), Some(route)) = (kind, &record.outcome.route) {
                    count_upstream_error(&stats.metrics, route, kind);
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
        };
        response
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), record.request_id.clone());
        record.status = response.status().as_u16();
        Ok(response.map(|inner| TrackedBody { inner, record }))
    }
}

// Not an `async fn`, for the reason given in `process_request`.
#[allow(clippy::manual_async_fn)]
fn proxy<'a>(
    rt: &'a Runtime,
    stats: &'a PipelineStats,
    mut req: Request<Incoming>,
    conn: ConnInfo,
    outcome: &'a mut Outcome,
) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + 'a {
    async move {
        // 1. request_filter. Ordering: method before path, so `CONNECT host:443` is 405, not 400.
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
        })?;

        // 2. inbound_auth. The local token endpoint authenticates by its body.
        if let Some(clients) = &rt.clients {
            if rt.token_endpoint.as_deref() == Some(req.uri().path()) {
                return local_token_endpoint(clients, req, rt.config.server.request_timeout).await;
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
        let uri = upstream_uri(&route, &parts.uri)?;
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        strip_inbound_credentials(&mut headers);
        let original_host = headers.insert(header::HOST, route.host_header.clone());
        if rt.forwarded_headers {
            add_forwarded_headers(
                &mut headers,
                &conn,
                original_host.or_else(|| {
                    // HTTP/2 carries the host in :authority.
                    parts
                        .uri
                        .authority()
                        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                }),
            );
        }
        headers.insert(auth_name, auth_value);

        // Bodies are read ahead up to `replay_body_limit`: a small one is checked whole (bad
        // chunking or a short body is refused before anything is sent) and kept for a replay after
        // a 401; a larger one streams (after what was read, when its length was not declared),
        // watched so that its end starts the wait for the upstream's answer.
        let (replay, first_body, upload) = match declared_len(&headers, &body) {
            Some(len) if len > rt.replay_body_limit => {
                let (body, watch) = PeerBody::new(body, route.timeout).watched();
                (None, ProxyBody::Streamed(body), Some(watch))
            }
            _ if body.is_end_stream() => (Some(Bytes::new()), ProxyBody::Empty, None),
            _ => match read_ahead(PeerBody::new(body, route.timeout), rt.replay_body_limit).await {
                Ok(ReadAhead::Complete(bytes)) => {
                    (Some(bytes.clone()), ProxyBody::full(bytes), None)
                }
                Ok(ReadAhead::Partial { head, rest }) => {
                    let (rest, watch) = rest.watched();
                    (None, ProxyBody::Prefixed { head, rest }, Some(watch))
                }
                Err(BodyError::Idle(_)) => {
                    return Err(ProxyError::RequestBodyStalled(route.timeout))
                }
                Err(BodyError::Peer(_)) => {
                    return Err(ProxyError::BadRequest(
                        "The request body is malformed or incomplete.",
                    ))
                }
            },
        };
        // What a replay after a 401 needs; only an `oauth` credential can get a fresh token.
        let replay = match credential {
            Credential::OAuth(_) => {
                replay.map(|body| (body, parts.method.clone(), headers.clone()))
            }
            Credential::Header { .. } => None,
        };
        let first = build_request(parts.method, uri, headers, first_body);

        // 6. forward
        let (response, lease) = match forward(rt, &route, first, upload.as_deref()).await {
            Ok(answer) => answer,
            Err(_) if upload.as_deref().is_some_and(UploadWatch::stalled) => {
                return Err(ProxyError::RequestBodyStalled(route.timeout))
            }
            Err(error) => return Err(error),
        };
        outcome.upstream_status = Some(response.status().as_u16());

        // 7. upstream_401
        let (response, lease) = match (response.status(), credential, token, replay) {
            (StatusCode::UNAUTHORIZED, Credential::OAuth(c), Some(used), Some(replay)) => {
                match fresh_token(c, &used).await {
                    Some(fresh) => {
                        drop((response, lease));
                        stats.replays.fetch_add(1, Ordering::Relaxed);
                        let (bytes, method, mut headers) = replay;
                        headers.insert(header::AUTHORIZATION, fresh.authorization.clone());
                        let uri = upstream_uri(&route, &parts.uri)?;
                        let again = build_request(method, uri, headers, ProxyBody::full(bytes));
                        let answer = forward(rt, &route, again, None).await?;
                        outcome.upstream_status = Some(answer.0.status().as_u16());
                        answer
                    }
                    None => (response, lease),
                }
            }
            (StatusCode::UNAUTHORIZED, Credential::OAuth(c), Some(used), None) => {
                // Not replayable, but the token may still be bad: let the next request get a
                // fresh one (within the forced-refresh limit).
                c.invalidate(&used);
                (response, lease)
            }
            _ => (response, lease),
        };

        // 8. response_filter
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if rt.rewrite_location {
            if let Some(location) = parts.headers.get(header::LOCATION) {
                if let Some(rewritten) = rewrite_location(&route, location) {
                    parts.headers.insert(header::LOCATION, rewritten);
                }
            }
        }
        Ok(Response::from_parts(
            parts,
            ProxyBody::Streamed(PeerBody::new(body, route.timeout).releasing(lease)),
        ))
    }
}

/// `proxy_upstream_errors_total{route, kind}` + 1.
fn count_upstream_error(metrics: &Metrics, route: &Route, kind: &'static str) {
    metrics
        .upstream_errors
        .get_or_create(&UpstreamErrorLabels {
            route: Arc::clone(&route.label),
            kind,
        })
        .inc();
}

/// The client's `X-Request-Id` when it is a sane token, otherwise a fresh random one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        let sane = !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'));
        if sane {
            return v.clone();
        }
    }
    // Hex in a fixed buffer that the header value owns: no formatting, and the two clones
    // (upstream request, response) share it instead of each promoting a `Vec` to shared.
    let mut hex = [0u8; 32];
    let id: u128 = rand::random();
    if ::hex::encode_to_slice(id.to_be_bytes(), &mut hex).is_err() {
        return HeaderValue::from_static("-");
    }
    HeaderValue::from_maybe_shared(Bytes::from_owner(hex)).unwrap_or(HeaderValue::from_static("-"))
}

/// Largest body the local token endpoint reads.
const TOKEN_REQUEST_LIMIT: usize = 64 * 1024;

/// The local token endpoint; a body that stalls for `idle` is refused like a malformed one.
async fn local_token_endpoint(
    clients: &Clients,
    req: Request<Incoming>,
    idle: Duration,
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

/// After a 401: a token other than `used`, or `None` when no replay should happen.
async fn fresh_token(credential: &OAuthCredential, used: &Arc<Token>) -> Option<Arc<Token>> {
    if !credential.invalidate(used) {
        return None;
    }
    match credential.token().await {
        Ok(fresh) if !Arc::ptr_eq(&fresh, used) => Some(fresh),
        _ => None,
    }
}

/// The body length the request declares (HTTP/1.1 `Content-Length`, or HTTP/2's exact hint).
fn declared_len(headers: &HeaderMap, body: &Incoming) -> Option<u64> {
    body.size_hint().exact().or_else(|| {
        headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    })
}

/// [`Route::upstream_uri`], or a 400 when the rewritten target is not a valid URI.
fn upstream_uri(route: &Route, uri: &Uri) -> Result<Uri, ProxyError> {
    route
        .upstream_uri(uri)
        .ok_or(ProxyError::BadRequest("The request target is malformed."))
}

fn build_request(
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: ProxyBody,
) -> Request<ProxyBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    request
}

/// Sends `request` and waits up to the route's timeout for the response head, which comes with
/// the lease of its pooled connection (see [`PeerBody::releasing`]). While a streamed
/// request body is still moving, the wait runs from its last bytes (the upstream answers once it
/// has the whole body); while it waits on the client, the body's own idle timer decides.
// Not an `async fn`, for the reason given in `process_request`.
#[allow(clippy::manual_async_fn)]
fn forward<'a>(
    rt: &'a Runtime,
    route: &'a Route,
    request: Request<ProxyBody>,
    upload: Option<&'a UploadWatch>,
) -> impl Future<Output = Result<(Response<Incoming>, Option<Lease>), ProxyError>> + 'a {
    async move {
        let mut sent = std::pin::pin!(rt.client().request(&route.target, request));
        let mut deadline = tokio::time::Instant::now() + route.timeout;
        loop {
            match tokio::time::timeout_at(deadline, &mut sent).await {
                Ok(Ok(response)) => return Ok(response),
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

fn add_forwarded_headers(headers: &mut HeaderMap, conn: &ConnInfo, host: Option<HeaderValue>) {
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
    if let Some(host) = host {
        headers.insert("x-forwarded-host", host);
    }
}

/// Everything the access log line needs, carried by the response body until it ends. Written
/// once, when it is dropped: with the body at its end, or early when the client went away.
#[derive(Debug)]
struct AccessRecord {
    started: Instant,
    request_id: HeaderValue,
    method: Method,
    path: Box<str>,
    /// 499 (client closed the request, as nginx logs it) until a response exists.
    status: u16,
    outcome: Outcome,
    bytes: u64,
    complete: bool,
    /// The DESIGN.md code of what cut the response body, when something did.
    cut: Option<&'static str>,
    stats: Arc<PipelineStats>,
    activity: Arc<ConnActivity>,
}

/// Logged for a request whose client went away before the response.
const CLIENT_CLOSED: u16 = 499;

impl AccessRecord {
    fn begin(
        stats: Arc<PipelineStats>,
        activity: Arc<ConnActivity>,
        request_id: HeaderValue,
        method: Method,
        path: Box<str>,
    ) -> AccessRecord {
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.inflight.fetch_add(1, Ordering::Relaxed);
        activity.begin();
        AccessRecord {
            started: Instant::now(),
            request_id,
            method,
            path,
            status: CLIENT_CLOSED,
            outcome: Outcome::default(),
            bytes: 0,
            complete: false,
            cut: None,
            stats,
            activity,
        }
    }

    /// The upstream's response body stalled and is cut: an upstream timeout, after the head.
    fn upstream_stalled(&mut self, error: &BodyError) {
        self.cut = Some("upstream_timeout");
        if let Some(route) = &self.outcome.route {
            count_upstream_error(&self.stats.metrics, route, "timeout");
        }
        let (id, method, path) = (&self.request_id, &self.method, &self.path);
        tracing::warn!(request_id = ?id, %method, %path, error = %ErrorChain(error), "response body cut");
    }
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        let complete = self.complete;
        let elapsed = self.started.elapsed();
        self.stats.inflight.fetch_sub(1, Ordering::Relaxed);
        self.activity.end();
        let client_label = self.outcome.client.as_ref().unwrap_or(&NO_LABEL);
        let seconds = elapsed.as_secs_f64();
        match &self.outcome.route {
            Some(route) => {
                route.metrics.requests.count(client_label, self.status);
                route.metrics.duration.observe(seconds);
            }
            None => {
                let metrics = &self.stats.metrics;
                metrics.unrouted_requests.count(client_label, self.status);
                metrics
                    .duration
                    .get_or_create(&RouteLabels {
                        route: Arc::clone(&NO_LABEL),
                    })
                    .observe(seconds);
            }
        }
        let route = self.outcome.route.as_deref();
        crate::logging::log_access(&crate::logging::AccessLine {
            request_id: self.request_id.to_str().unwrap_or("-"),
            client: client_label,
            method: &self.method,
            path: &self.path,
            route: route.map_or("-", |r| r.prefix.as_str()),
            credential: route.map_or("-", |r| r.credential.as_str()),
            status: self.status,
            upstream_status: self.outcome.upstream_status.unwrap_or(0),
            duration_us: elapsed.as_micros() as u64,
            bytes: self.bytes,
            complete,
            error: self.cut,
        });
    }
}

/// The response body sent to clients: counts bytes and writes the access record when it ends
/// (or is dropped because the client went away).
#[derive(Debug)]
pub struct TrackedBody {
    inner: ProxyBody,
    record: AccessRecord,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.record.bytes += data.len() as u64;
                }
            }
            // The upstream stalled mid-body. The error makes the server cut the response
            // (HTTP/1.1: the connection closes short of the body's end; HTTP/2: the stream is
            // reset), and dropping the upstream body closes that upstream connection instead of
            // pooling it.
            Poll::Ready(Some(Err(error @ BodyError::Idle(_)))) => {
                this.record.upstream_stalled(error)
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        // The record's own `Drop` (right after this) writes the line.
        self.record.complete = self.inner.is_end_stream();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future that `f`'s call returns, without calling it.
    fn future_size<A, B, C, D, F: Future>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every request's future is allocated and copied once (hyper's service future is boxed, see
    /// `server::Connection::serve`), and where its big states sit decides which heap pages
    /// idle connections touch (BENCHMARKS.md, finding 6). It was 4,336 bytes before the
    /// pipeline's functions stopped storing their arguments twice, 3,120 after. Growing past the
    /// budget is worth a look with `profile.sh --instructions` and the idle probe.
    #[test]
    fn the_request_future_stays_within_its_budget() {
        let size = future_size(process_request);
        eprintln!("request future: {size} bytes");
        assert!(size <= 3_584, "the request future grew to {size} bytes");
    }
}
