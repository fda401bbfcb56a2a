//! OpenTelemetry traces (`[telemetry]`): the tracer and its exporter, set up once at start and
//! flushed at shutdown, and the spans the proxy makes.
//!
//! Without `[telemetry]` none of this exists: the runtime holds no [`Telemetry`], a request's
//! [`RequestTrace`] is an empty `Option` (8 bytes) whose every method returns at once, no header
//! is looked at and nothing is allocated. With it:
//!
//! | span | kind | parent | attributes |
//! |---|---|---|---|
//! | `{method} {route}` (`{method}` when no route matched) | server | the client's `traceparent`, else none | `http.request.method`, `url.scheme`, `url.path` (never the query), `http.route`, `http.response.status_code`, `sitecore_proxy.request_id`, `sitecore_proxy.client`, `sitecore_proxy.credential`, `sitecore_proxy.upstream_status_code`, `error.type` |
//! | `{method}` | client | the request's span | `http.request.method`, `server.address`, `server.port`, `http.response.status_code`, `error.type` |
//! | `token wait` | internal | the request's span | `sitecore_proxy.credential`, `sitecore_proxy.token.outcome` |
//! | `token fetch` | client | none: each refresher attempt is a trace of its own | `sitecore_proxy.credential`, `sitecore_proxy.token.trigger`, `server.address`, `sitecore_proxy.token.outcome` |
//!
//! Attribute values are names the configuration gives (routes, clients, credentials, hosts),
//! statuses and error codes: never a header value, key, token, secret or query string.
//!
//! Propagation is W3C Trace Context: a valid incoming `traceparent` (with its `tracestate`) is the
//! request span's parent, and the upstream call carries a `traceparent` (and the `tracestate`) of
//! its own span in place of the client's. Sampling is parent-based: a sampled parent is always
//! followed, an unsampled one never; a new trace is kept with probability `sample_ratio`. An
//! unsampled request still gets a trace id, which goes upstream and into the access line.
//!
//! Finished spans wait in a bounded queue ([`QUEUE_BOUND`]) and leave in batches from the SDK's
//! batch processor thread ([`export`]), so a collector that is down, slow or refusing costs a
//! request nothing: when the queue is full, spans are dropped and counted
//! (`telemetry_spans_dropped_total`).

mod export;
mod request;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;

use crate::config::{ServerSettings, TelemetrySettings};
use crate::metrics::Metrics;
pub use request::{Ending, RequestTrace, TokenFetch};

/// The most finished spans waiting for export; more are dropped and counted.
pub const QUEUE_BOUND: usize = 2048;
/// The most spans in one OTLP request.
const BATCH_SIZE: usize = 512;
/// How long finished spans may wait before a batch leaves, full or not.
const BATCH_DELAY: Duration = Duration::from_secs(2);
/// One export request, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// One export with its retries (the exporter retries throttling and 5xx answers until then).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest shutdown waits for the last spans to leave.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("telemetry: {0}")]
pub struct TelemetryError(String);

/// The process's tracer: cheap to clone, shared by every runtime of the process (`[telemetry]`
/// changes take a restart).
#[derive(Clone, Debug)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    /// Set by the first shutdown; later ones have nothing to do.
    shut: AtomicBool,
}

impl Telemetry {
    /// The tracer for `settings`, exporting in the background. The collector is reached directly
    /// (not through `egress_proxy`), trusting the same roots as upstreams (`upstream_ca` too).
    /// `OTEL_EXPORTER_OTLP_HEADERS` adds headers to export requests (a collector's credentials),
    /// and `OTEL_RESOURCE_ATTRIBUTES` attributes to the resource.
    pub fn start(
        settings: &TelemetrySettings,
        server: &ServerSettings,
        metrics: &Metrics,
    ) -> Result<Telemetry, TelemetryError> {
        let tls = crate::upstream::tls_client_config(&server.upstream_ca)
            .map_err(|e| TelemetryError(format!("TLS roots: {e}")))?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .use_preconfigured_tls(tls)
            .connect_timeout(server.connect_timeout.min(REQUEST_TIMEOUT))
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("sitecore-auth-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TelemetryError(format!("HTTP client: {e}")))?;
        let client = export::ExportClient::new(http);
        let otlp = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(settings.traces_url.as_str())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError(format!("OTLP exporter: {e}")))?;

        let queued = Arc::new(AtomicUsize::new(0));
        let exporter = export::CountingExporter::new(
            otlp,
            Arc::clone(&queued),
            metrics.telemetry_export_failures.clone(),
            settings.traces_url.to_string(),
        );
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(QUEUE_BOUND)
            .with_max_export_batch_size(BATCH_SIZE)
            .with_scheduled_delay(BATCH_DELAY)
            .build();
        let processor = export::BoundedProcessor::new(
            BatchSpanProcessor::new(exporter, batch),
            queued,
            QUEUE_BOUND,
            metrics.telemetry_spans_dropped.clone(),
        );
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("sitecore-auth-proxy");
        tracing::info!(
            collector = %settings.traces_url,
            service_name = %settings.service_name,
            sample_ratio = settings.sample_ratio,
            "tracing on"
        );
        Ok(Telemetry {
            inner: Arc::new(Inner {
                provider,
                tracer,
                propagator: TraceContextPropagator::new(),
                shut: AtomicBool::new(false),
            }),
        })
    }

    /// A root span for one attempt of a credential's refresher to obtain a token: `trigger` is
    /// `refresh` (a token is still served), `cold` (none is) or `forced` (after an upstream 401).
    pub fn token_fetch(
        &self,
        credential: &str,
        trigger: &'static str,
        token_url: &reqwest::Url,
    ) -> TokenFetch {
        let span = self
            .inner
            .tracer
            .span_builder("token fetch")
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("sitecore_proxy.credential", credential.to_owned()),
                KeyValue::new("sitecore_proxy.token.trigger", trigger),
                KeyValue::new(
                    "server.address",
                    token_url.host_str().unwrap_or_default().to_owned(),
                ),
            ])
            .start_with_context(&self.inner.tracer, &Context::new());
        TokenFetch::new(span)
    }

    /// Exports what is still queued and stops the exporter, waiting at most `timeout`. Blocking
    /// work, so it runs on Tokio's blocking pool; if the collector does not answer in time, the
    /// spans still queued are lost (and the export thread ends once its request times out).
    pub async fn shutdown(&self, timeout: Duration) {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        let provider = self.inner.provider.clone();
        let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        // The provider's own wait is bounded by `timeout`; this bound is for the blocking pool.
        match tokio::time::timeout(timeout + Duration::from_secs(1), flush).await {
            Ok(Ok(Ok(()))) => tracing::debug!("spans flushed"),
            Ok(Ok(Err(error))) => tracing::warn!(%error, "the last spans were not all exported"),
            Ok(Err(_)) | Err(_) => tracing::warn!("the last spans were not all exported"),
        }
    }

    /// Starts shutting down without waiting (a proxy dropped without
    /// [`RunningProxy::wait`](crate::app::RunningProxy::wait)): on a thread of its own, so that
    /// neither the caller nor the last holder of the tracer blocks on the export.
    pub fn shutdown_in_background(&self) {
        if self.inner.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        let provider = self.inner.provider.clone();
        let spawned = std::thread::Builder::new()
            .name("telemetry-shutdown".into())
            .spawn(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT));
        if let Err(error) = spawned {
            tracing::debug!(%error, "telemetry shutdown thread not started");
        }
    }

    fn tracer(&self) -> &SdkTracer {
        &self.inner.tracer
    }

    fn propagator(&self) -> &TraceContextPropagator {
        &self.inner.propagator
    }
}

/// The parent context for spans below `span_context`: local, so children are not marked as
/// having a remote parent.
fn parent_of(span_context: opentelemetry::trace::SpanContext) -> Context {
    Context::new().with_remote_span_context(span_context)
}
