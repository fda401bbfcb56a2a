//! One request's spans ([`RequestTrace`]), a refresher attempt's ([`TokenFetch`]), and W3C trace
//! context in and out.

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method};
use opentelemetry::propagation::{Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::trace::Span;

use super::{parent_of, Telemetry};
use crate::upstream::Target;

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The spans of one request, or nothing when tracing is off: an `Option` of a box, so the
/// request's state grows by one pointer either way, and every method starts with a `None` check.
#[derive(Debug, Default)]
pub struct RequestTrace(Option<Box<Spans>>);

#[derive(Debug)]
struct Spans {
    telemetry: Telemetry,
    server: Span,
    /// The server span's context, parent of the others.
    parent: Context,
    upstream: Option<Span>,
    token_wait: Option<Span>,
    /// The trace id in hex, for the access line.
    trace_id: [u8; 32],
    method: Method,
    /// The error code the proxy answered with, if it did.
    error: Option<&'static str>,
}

/// What the request's span reports when the request ends (the access record's fields).
#[derive(Debug)]
pub struct Ending<'a> {
    /// The status sent to the client.
    pub status: u16,
    /// The route's prefix, if one matched.
    pub route: Option<&'a str>,
    /// The client's name, if any.
    pub client: Option<&'a str>,
    /// The route's credential, if a route matched.
    pub credential: Option<&'a str>,
    /// The upstream's status, if it answered.
    pub upstream_status: Option<u16>,
    /// The error code the response was cut for, if it was.
    pub error: Option<&'static str>,
}

impl RequestTrace {
    /// The request's span, continuing the client's `traceparent` when it has a valid one;
    /// nothing without `telemetry`.
    #[inline]
    pub fn begin(
        telemetry: Option<&Telemetry>,
        request_id: &HeaderValue,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        tls: bool,
    ) -> RequestTrace {
        match telemetry {
            None => RequestTrace(None),
            Some(telemetry) => RequestTrace(Some(Box::new(Spans::begin(
                telemetry, request_id, method, path, headers, tls,
            )))),
        }
    }

    /// Whether the request is traced.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// The trace id (32 hex digits) while tracing is on, sampled or not.
    pub fn trace_id(&self) -> Option<&str> {
        self.0
            .as_ref()
            .and_then(|spans| std::str::from_utf8(&spans.trace_id).ok())
    }

    /// The request waits for its credential's token fetch (a cold cache): a child span until
    /// [`RequestTrace::token_ready`].
    pub fn token_wait(&mut self, credential: &str) {
        let Some(spans) = &mut self.0 else { return };
        let tracer = spans.telemetry.tracer();
        let span = tracer
            .span_builder("token wait")
            .with_kind(SpanKind::Internal)
            .with_attributes([KeyValue::new(
                "sitecore_proxy.credential",
                credential.to_owned(),
            )])
            .start_with_context(tracer, &spans.parent);
        spans.token_wait = Some(span);
    }

    /// The wait that [`RequestTrace::token_wait`] began ended, with a token or without.
    #[inline]
    pub fn token_ready(&mut self, ok: bool) {
        let Some(spans) = &mut self.0 else { return };
        if let Some(mut span) = spans.token_wait.take() {
            let outcome = if ok { "ok" } else { "token_unavailable" };
            span.set_attribute(KeyValue::new("sitecore_proxy.token.outcome", outcome));
            if !ok {
                span.set_status(Status::error("no valid token"));
            }
            span.end();
        }
    }

    /// The upstream call to `target` begins: a client span under the request's, whose
    /// `traceparent` (and `tracestate`) replace whatever the client sent in `headers`.
    #[inline]
    pub fn upstream(&mut self, target: &Target, headers: &mut HeaderMap) {
        if let Some(spans) = &mut self.0 {
            spans.upstream(target, headers);
        }
    }

    /// The upstream answered with `status`: the upstream span ends.
    #[inline]
    pub fn upstream_answered(&mut self, status: u16) {
        let Some(spans) = &mut self.0 else { return };
        if let Some(mut span) = spans.upstream.take() {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 400 {
                span.set_attribute(KeyValue::new("error.type", status.to_string()));
                span.set_status(Status::error(""));
            }
            span.end();
        }
    }

    /// The proxy answers with its own error `code` (README, "How a request is handled"): an
    /// upstream call still open ends with it, and the request's span reports it.
    #[inline]
    pub fn failed(&mut self, code: &'static str) {
        let Some(spans) = &mut self.0 else { return };
        spans.error = Some(code);
        if let Some(mut span) = spans.upstream.take() {
            span.set_attribute(KeyValue::new("error.type", code));
            span.set_status(Status::error(""));
            span.end();
        }
    }

    /// The request ends: the open spans end (an upstream call still open failed with `error`),
    /// and the request's span reports `ending`.
    pub fn end(&mut self, ending: &Ending<'_>) {
        if let Some(spans) = self.0.take() {
            spans.end(ending);
        }
    }
}

impl Spans {
    fn begin(
        telemetry: &Telemetry,
        request_id: &HeaderValue,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        tls: bool,
    ) -> Spans {
        // An absent or malformed `traceparent` leaves the context empty: a new trace.
        let remote = if headers.contains_key(&TRACEPARENT) {
            telemetry
                .propagator()
                .extract_with_context(&Context::new(), &HeaderExtractor(headers))
        } else {
            Context::new()
        };
        let tracer = telemetry.tracer();
        // The attributes go on after the sampling decision, and only on a sampled span: our
        // samplers look at the parent and the trace id alone, and an unsampled request (most of
        // them at a low `sample_ratio`) then pays for no attribute strings.
        let mut server = tracer
            .span_builder(method.as_str().to_owned())
            .with_kind(SpanKind::Server)
            .start_with_context(tracer, &remote);
        if server.is_recording() {
            server.set_attributes([
                KeyValue::new("http.request.method", method.as_str().to_owned()),
                KeyValue::new("url.scheme", if tls { "https" } else { "http" }),
                KeyValue::new("url.path", path.to_owned()),
            ]);
            if let Ok(id) = request_id.to_str() {
                server.set_attribute(KeyValue::new("sitecore_proxy.request_id", id.to_owned()));
            }
        }
        let context = server.span_context().clone();
        let mut trace_id = [b'0'; 32];
        // 16 bytes always fit 32 hex digits.
        let _ = hex::encode_to_slice(context.trace_id().to_bytes(), &mut trace_id);
        Spans {
            telemetry: telemetry.clone(),
            server,
            parent: parent_of(context),
            upstream: None,
            token_wait: None,
            trace_id,
            method: method.clone(),
            error: None,
        }
    }

    fn upstream(&mut self, target: &Target, headers: &mut HeaderMap) {
        let tracer = self.telemetry.tracer();
        // As for the request's span: attributes only once the span is known to be sampled.
        let mut span = tracer
            .span_builder(self.method.as_str().to_owned())
            .with_kind(SpanKind::Client)
            .start_with_context(tracer, &self.parent);
        if span.is_recording() {
            let scheme = target.scheme().as_str();
            let authority = target.authority();
            let port = authority
                .port_u16()
                .unwrap_or(if scheme == "https" { 443 } else { 80 });
            span.set_attributes([
                KeyValue::new("http.request.method", self.method.as_str().to_owned()),
                KeyValue::new("url.scheme", scheme.to_owned()),
                KeyValue::new("server.address", authority.host().to_owned()),
                KeyValue::new("server.port", i64::from(port)),
            ]);
        }
        headers.remove(&TRACEPARENT);
        headers.remove(&TRACESTATE);
        let context = parent_of(span.span_context().clone());
        self.telemetry
            .propagator()
            .inject_context(&context, &mut HeaderInjector(headers));
        // A replay's call replaces the first one's, which ended when it answered.
        if let Some(mut previous) = self.upstream.replace(span) {
            previous.end();
        }
    }

    fn end(mut self, ending: &Ending<'_>) {
        let error = self.error.or(ending.error);
        if let Some(mut span) = self.token_wait.take() {
            span.end();
        }
        if let Some(mut span) = self.upstream.take() {
            // Still open: the client went away first, or the response was cut.
            if let Some(error) = error {
                span.set_attribute(KeyValue::new("error.type", error));
                span.set_status(Status::error(""));
            }
            span.end();
        }
        let server = &mut self.server;
        if server.is_recording() {
            if let Some(route) = ending.route {
                server.update_name(format!("{} {route}", self.method));
                server.set_attribute(KeyValue::new("http.route", route.to_owned()));
            }
            server.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(ending.status),
            ));
            if let Some(client) = ending.client {
                server.set_attribute(KeyValue::new("sitecore_proxy.client", client.to_owned()));
            }
            if let Some(credential) = ending.credential {
                server.set_attribute(KeyValue::new(
                    "sitecore_proxy.credential",
                    credential.to_owned(),
                ));
            }
            if let Some(status) = ending.upstream_status {
                server.set_attribute(KeyValue::new(
                    "sitecore_proxy.upstream_status_code",
                    i64::from(status),
                ));
            }
            if let Some(error) = error {
                server.set_attribute(KeyValue::new("error.type", error));
            }
            // Server spans: 5xx is the server's failure, 4xx the client's.
            if ending.status >= 500 {
                server.set_status(Status::error(""));
            }
        }
        server.end();
    }
}

/// A refresher attempt's root span (see [`Telemetry::token_fetch`]).
#[derive(Debug)]
pub struct TokenFetch(Span);

impl TokenFetch {
    pub(super) fn new(span: Span) -> TokenFetch {
        TokenFetch(span)
    }

    /// The attempt ended with `outcome` (`ok`, or a `token_requests_total` outcome).
    pub fn end(mut self, outcome: &'static str) {
        self.0
            .set_attribute(KeyValue::new("sitecore_proxy.token.outcome", outcome));
        if outcome != "ok" {
            self.0.set_attribute(KeyValue::new("error.type", outcome));
            self.0.set_status(Status::error(""));
        }
        self.0.end();
    }
}

/// Sets the trace context headers, with names made once rather than per request.
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let name = match key {
            "traceparent" => TRACEPARENT.clone(),
            // The propagator writes an empty one for a trace without state; none is better.
            "tracestate" if value.is_empty() => return,
            "tracestate" => TRACESTATE.clone(),
            _ => return,
        };
        if let Ok(value) = HeaderValue::try_from(value) {
            self.0.insert(name, value);
        }
    }
}
