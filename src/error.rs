//! The proxy's own errors and the one place that turns them into JSON responses.
//!
//! Every error the pipeline can produce is a [`ProxyError`] variant; [`ProxyError::status`] and
//! [`ProxyError::code`] are exhaustive matches, so a new variant cannot ship without a status.
//! The client gets a short, fixed sentence; the full `#[source]` chain is logged once by the
//! pipeline.

use std::time::Duration;

use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::limits::RateLimitHeaders;
use std::sync::Arc;

/// A request could not get a token from its credential; carries when to retry. Defined with the
/// pipeline's errors, which carry it, so the token cache depends on them and not the reverse.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no valid token for credential {credential}")]
pub struct TokenUnavailable {
    /// Credential name.
    pub credential: Arc<str>,
    /// Suggested wait before retrying.
    pub retry_after: Duration,
    /// The last attempt's error code, if any.
    pub last_error: Option<String>,
}

impl TokenUnavailable {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// Everything that can go wrong while proxying one request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No or a wrong inbound credential.
    #[error("missing or invalid client credential")]
    Unauthorized,
    /// The client may not use this route.
    #[error("client may not use this route")]
    Forbidden,
    /// No route matches the path.
    #[error("no route matches the request path")]
    NoRoute,
    /// The request target is unsafe or malformed.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// `CONNECT` and other methods a reverse proxy does not serve.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request body is larger than the proxy accepts.
    #[error("payload too large")]
    PayloadTooLarge,
    /// The route's credential has no valid token.
    #[error("no valid token for credential")]
    TokenUnavailable(#[source] TokenUnavailable),
    /// The proxy is at its connection or request limit.
    #[error("overloaded")]
    Overloaded,
    /// The upstream could not be reached or broke the exchange.
    #[error("upstream unreachable")]
    UpstreamUnreachable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The egress proxy could not be reached or refused the way to the upstream.
    #[error("upstream unreachable through the egress proxy")]
    EgressUnreachable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The upstream did not send response headers in time.
    #[error("upstream timed out after {0:?}")]
    UpstreamTimeout(Duration),
    /// Over a client's or a route's `rate`.
    #[error("rate limited")]
    RateLimited {
        /// Seconds until a request would pass, at least 1.
        retry_after_secs: u64,
        /// The `RateLimit-Policy` / `RateLimit` fields of the verdict (boxed: rare, and every
        /// request's future carries a `ProxyError` slot).
        headers: Box<RateLimitHeaders>,
    },
    /// Over a client's or a route's `max_in_flight`.
    #[error("too many requests in flight")]
    TooManyInFlight,
    /// The route's upstream asked for a pause (429 or 503 with `Retry-After`); answered locally
    /// with the upstream's status until it ends.
    #[error("upstream throttled this route")]
    UpstreamThrottled {
        /// The upstream's status (429 or 503).
        status: StatusCode,
        /// Seconds left of the pause, at least 1.
        retry_after_secs: u64,
    },
    /// The client's request body moved no bytes for the route's timeout. Answered like an
    /// upstream timeout (the error codes have none for a client timeout) but with its own message, and not
    /// counted against the upstream.
    #[error("request body stalled for {0:?}")]
    RequestBodyStalled(Duration),
}

impl ProxyError {
    /// The HTTP status the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden => StatusCode::FORBIDDEN,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::TokenUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::RateLimited { .. } | ProxyError::TooManyInFlight => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::UpstreamThrottled { status, .. } => *status,
            ProxyError::UpstreamUnreachable(_) | ProxyError::EgressUnreachable(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout(_) | ProxyError::RequestBodyStalled(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    /// The stable error code (README, "How a request is handled"), which users' scripts match on.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::Forbidden => "forbidden",
            ProxyError::NoRoute => "no_route",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::PayloadTooLarge => "payload_too_large",
            ProxyError::TokenUnavailable(_) => "token_unavailable",
            ProxyError::Overloaded => "overloaded",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::TooManyInFlight => "too_many_in_flight",
            ProxyError::UpstreamThrottled { .. } => "upstream_throttled",
            ProxyError::UpstreamUnreachable(_) | ProxyError::EgressUnreachable(_) => {
                "upstream_unreachable"
            }
            ProxyError::UpstreamTimeout(_) | ProxyError::RequestBodyStalled(_) => {
                "upstream_timeout"
            }
        }
    }

    /// One safe sentence for the client: never a secret, a token or an upstream's raw body.
    fn message(&self) -> std::borrow::Cow<'static, str> {
        if let ProxyError::EgressUnreachable(e) = self {
            // The egress error names the proxy as `http://host:port` and the stage, never the
            // proxy's credentials: the operator's way to tell a proxy problem from an upstream's.
            return format!("The upstream could not be reached: {e}.").into();
        }
        std::borrow::Cow::Borrowed(match self {
            ProxyError::Unauthorized => "A valid client key or proxy-issued token is required.",
            ProxyError::Forbidden => "This client may not use this route.",
            ProxyError::NoRoute => "No route matches this path.",
            ProxyError::BadRequest(reason) => reason,
            ProxyError::MethodNotAllowed => "This method is not served by the proxy.",
            ProxyError::PayloadTooLarge => "The request body is too large.",
            ProxyError::TokenUnavailable(_) => {
                "No valid access token is available for this route's credential; retry later."
            }
            ProxyError::Overloaded => "The proxy is at its connection limit; retry later.",
            ProxyError::RateLimited { .. } => {
                "Too many requests for this client or route; retry after the given time."
            }
            ProxyError::TooManyInFlight => {
                "Too many requests of this client or route are in flight; retry later."
            }
            ProxyError::UpstreamThrottled { .. } => {
                "The upstream asked for a pause on this route; retry after the given time."
            }
            ProxyError::UpstreamUnreachable(_) | ProxyError::EgressUnreachable(_) => {
                "The upstream could not be reached."
            }
            ProxyError::UpstreamTimeout(_) => "The upstream did not answer in time.",
            ProxyError::RequestBodyStalled(_) => {
                "The request body stopped arriving; the request was abandoned."
            }
        })
    }

    /// The JSON response for this error.
    pub fn into_response(self) -> Response<ProxyBody> {
        let mut response = json_response(self.status(), self.code(), &self.message());
        let headers = response.headers_mut();
        match &self {
            ProxyError::Unauthorized => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"sitecore-auth-proxy\""),
                );
            }
            ProxyError::TokenUnavailable(e) => {
                headers.insert(RETRY_AFTER, HeaderValue::from(e.retry_after_secs()));
            }
            ProxyError::Overloaded | ProxyError::TooManyInFlight => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::RateLimited {
                retry_after_secs,
                headers: fields,
            } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                fields.apply(headers);
            }
            ProxyError::UpstreamThrottled {
                retry_after_secs, ..
            } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ProxyError::MethodNotAllowed => {
                headers.insert(
                    http::header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            _ => {}
        }
        response
    }
}

/// `{"error": code, "message": message}` with the given status.
pub fn json_response(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Displays an error with its `source()` chain, `a: b: c`: how every error is logged, once.
#[derive(Debug)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
