//! Phase 10, the access record: the access-log line and the request's metrics, written once when
//! the response body ends, or early when the client went away. It exists from the request's
//! first moment, so every request is counted and logged, whatever ends it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method};
use http_body::{Body, Frame, SizeHint};

use crate::body::{BodyError, ProxyBody};
use crate::error::ErrorChain;
use crate::inbound::ClientIdentity;
use crate::limits::Slots;
use crate::metrics::{Metrics, RouteLabels, UpstreamErrorLabels};
use crate::routes::Route;
use crate::runtime::Runtime;
use crate::server::ConnActivity;
use crate::telemetry::{Ending, RequestTrace};

static NO_LABEL: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("-"));

/// Logged for a request whose client went away before the response.
const CLIENT_CLOSED: u16 = 499;

/// What the phases learned that the record reports.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub(super) route: Option<Arc<Route>>,
    pub(super) client: Option<Arc<ClientIdentity>>,
    pub(super) upstream_status: Option<u16>,
    /// The request's in-flight slots, freed when the record is (the response body's end).
    pub(super) slots: Option<Slots>,
    /// The request's spans, ended with the record (empty without `[telemetry]`).
    pub(super) trace: RequestTrace,
}

/// Everything the access line and the metrics need, carried by the response body until it ends.
#[derive(Debug)]
pub(super) struct AccessRecord {
    started: Instant,
    pub(super) request_id: HeaderValue,
    pub(super) method: Method,
    pub(super) path: Box<str>,
    /// 499 (client closed the request, as nginx logs it) until a response exists.
    pub(super) status: u16,
    pub(super) outcome: Outcome,
    bytes: u64,
    complete: bool,
    /// The error code (README, "How a request is handled") of what cut the response body, if anything did.
    cut: Option<&'static str>,
    /// The runtime the request was served by: its metrics, kept until the line is written.
    runtime: Arc<Runtime>,
    activity: Arc<ConnActivity>,
}

impl AccessRecord {
    pub(super) fn begin(
        runtime: Arc<Runtime>,
        activity: Arc<ConnActivity>,
        request_id: HeaderValue,
        method: Method,
        path: Box<str>,
    ) -> AccessRecord {
        runtime.metrics.inflight.inc();
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
            runtime,
            activity,
        }
    }

    /// Counts an upstream failure of the record's route (`unreachable` or `timeout`).
    pub(super) fn upstream_error(&self, kind: &'static str) {
        if let Some(route) = &self.outcome.route {
            count_upstream_error(&self.runtime.metrics, route, kind);
        }
    }

    /// The upstream's response body stalled and is cut: an upstream timeout, after the head.
    fn upstream_stalled(&mut self, error: &BodyError) {
        self.cut = Some("upstream_timeout");
        self.upstream_error("timeout");
        let (id, method, path) = (&self.request_id, &self.method, &self.path);
        tracing::warn!(request_id = ?id, %method, %path, error = %ErrorChain(error), "response body cut");
    }

    /// The response body this record rides on.
    pub(super) fn tracking(self, inner: ProxyBody) -> TrackedBody {
        TrackedBody {
            inner,
            record: self,
        }
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

impl Drop for AccessRecord {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let metrics = &self.runtime.metrics;
        metrics.inflight.dec();
        self.activity.end();
        let client = self.outcome.client.as_ref().map_or(&*NO_LABEL, |c| &c.name);
        let seconds = elapsed.as_secs_f64();
        match &self.outcome.route {
            Some(route) => {
                route.metrics.record(client, self.status, seconds);
            }
            None => {
                metrics.unrouted_requests.count(client, self.status);
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
            client,
            method: &self.method,
            path: &self.path,
            route: route.map_or("-", |r| r.prefix.as_str()),
            credential: route.map_or("-", |r| r.credential.as_str()),
            status: self.status,
            upstream_status: self.outcome.upstream_status.unwrap_or(0),
            duration_us: elapsed.as_micros() as u64,
            bytes: self.bytes,
            complete: self.complete,
            error: self.cut,
            trace_id: self.outcome.trace.trace_id(),
        });
        self.outcome.trace.end(&Ending {
            status: self.status,
            route: route.map(|r| r.prefix.as_str()),
            client: self.outcome.client.as_ref().map(|c| &*c.name),
            credential: route.map(|r| r.credential.as_str()),
            upstream_status: self.outcome.upstream_status,
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
