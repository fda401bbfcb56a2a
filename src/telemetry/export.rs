//! The way out for finished spans: the SDK's batch span processor behind a bound that counts
//! what it drops, and the OTLP/HTTP exporter over the project's own `reqwest`, driven on the
//! processor's thread by a Tokio runtime of its own.
//!
//! The batch processor runs its exports on a thread of its own (`futures_executor::block_on`),
//! outside any Tokio runtime, where `reqwest` cannot run. [`ExportClient`] gives each export a
//! small current-thread runtime, owned by that thread: a collector that is slow, hangs or
//! refuses only ever holds up that thread, never the proxy's workers or its main runtime, and
//! the proxy's shutdown cannot deadlock on an export it would otherwise have to drive.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::Context;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;

/// The exporter's HTTP client: `reqwest`, each request bounded by its own timeout and run to its
/// end on a runtime that belongs to the exporting thread.
pub(super) struct ExportClient {
    // Declared before the runtime so that its pooled connections go first.
    http: reqwest::Client,
    /// Made by the first export, on the export thread: a runtime may not be dropped inside
    /// another one, which an exporter dropped during set-up (on the proxy's runtime) would do.
    runtime: OnceLock<tokio::runtime::Runtime>,
}

impl fmt::Debug for ExportClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportClient").finish_non_exhaustive()
    }
}

impl ExportClient {
    pub(super) fn new(http: reqwest::Client) -> ExportClient {
        ExportClient {
            http,
            runtime: OnceLock::new(),
        }
    }

    fn runtime(&self) -> std::io::Result<&tokio::runtime::Runtime> {
        if let Some(runtime) = self.runtime.get() {
            return Ok(runtime);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(self.runtime.get_or_init(|| runtime))
    }
}

#[async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        // Blocking inside a future: this one is only ever polled by the batch processor's
        // thread, which exists to wait for exports (see the module doc). The `reqwest` client's
        // own timeout bounds the whole exchange.
        self.runtime()?.block_on(self.http.send_bytes(request))
    }
}

/// The batch processor with a bound of its own in front of its queue, so that what does not fit
/// is counted in `telemetry_spans_dropped_total` (the SDK keeps its count to itself).
///
/// `queued` counts spans handed to the processor and not yet taken by an export; the SDK's
/// queue holds at most that many, and its capacity is the same bound, so the SDK never drops a
/// span itself: every drop happens here, and is counted.
#[derive(Debug)]
pub(super) struct BoundedProcessor {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    bound: usize,
    dropped: Counter,
}

impl BoundedProcessor {
    pub(super) fn new(
        inner: BatchSpanProcessor,
        queued: Arc<AtomicUsize>,
        bound: usize,
        dropped: Counter,
    ) -> BoundedProcessor {
        BoundedProcessor {
            inner,
            queued,
            bound,
            dropped,
        }
    }
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.bound {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.dropped.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, taking each batch off the [`BoundedProcessor`]'s count and counting the
/// exports that fail; the first failure after a success is logged, and so is the recovery.
#[derive(Debug)]
pub(super) struct CountingExporter<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
    failures: Counter,
    failing: AtomicBool,
    collector: String,
}

impl<E> CountingExporter<E> {
    pub(super) fn new(
        inner: E,
        queued: Arc<AtomicUsize>,
        failures: Counter,
        collector: String,
    ) -> CountingExporter<E> {
        CountingExporter {
            inner,
            queued,
            failures,
            failing: AtomicBool::new(false),
            collector,
        }
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        let spans = batch.len();
        async move {
            let result = self.inner.export(batch).await;
            match &result {
                Ok(()) => {
                    if self.failing.swap(false, Ordering::AcqRel) {
                        tracing::info!(collector = %self.collector, "span export works again");
                    }
                }
                Err(error) => {
                    self.failures.inc();
                    if !self.failing.swap(true, Ordering::AcqRel) {
                        tracing::warn!(
                            collector = %self.collector,
                            spans,
                            %error,
                            "span export failed; spans are dropped until the collector answers \
                             (counted in telemetry_export_failures_total)"
                        );
                    }
                }
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::Mutex;

    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::{BatchConfigBuilder, SdkTracerProvider};

    use super::*;

    /// An exporter that holds each batch until it is let go (or a minute passes).
    #[derive(Debug)]
    struct Gate(Mutex<mpsc::Receiver<()>>);

    impl SpanExporter for Gate {
        fn export(
            &self,
            _batch: Vec<SpanData>,
        ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
            // On the batch processor's own thread, where blocking is what exports do.
            if let Ok(gate) = self.0.lock() {
                let _ = gate.recv_timeout(Duration::from_secs(60));
            }
            async { Ok(()) }
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (release, gate) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let dropped = Counter::default();
        let exporter = CountingExporter::new(
            Gate(Mutex::new(gate)),
            Arc::clone(&queued),
            Counter::default(),
            "test".to_owned(),
        );
        let config = BatchConfigBuilder::default()
            .with_max_queue_size(8)
            .with_max_export_batch_size(2)
            .with_scheduled_delay(Duration::from_secs(60))
            .build();
        let processor = BoundedProcessor::new(
            BatchSpanProcessor::new(exporter, config),
            Arc::clone(&queued),
            8,
            dropped.clone(),
        );
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer("test");
        for _ in 0..22 {
            tracer.start("request").end();
        }
        // The exporter holds at most one batch (2), the queue at most 8: the rest is dropped,
        // and ending a span never waited for the stuck export.
        assert!(dropped.get() >= 12, "dropped {}", dropped.get());
        assert!(queued.load(Ordering::Acquire) <= 8);
        drop(release);
        assert!(provider.shutdown().is_ok());
        assert_eq!(queued.load(Ordering::Acquire), 0, "everything queued left");
    }
}
