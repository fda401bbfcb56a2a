//! The access log: one line per request, written by its own sink in the proxy's own format.
//!
//! The line is not a `tracing` event: [`log_access`] spells it from an [`AccessLine`] into the
//! thread's reused buffer and hands it to the writer of the subscriber in effect (the batched
//! stderr writer in the binary, a test's writer in tests). Only the `AccessLine` fields are
//! written, so nothing else a request carried (headers, query string) can reach the line.
//!
//! # Formats
//!
//! The fields, always in this order: `request_id`, `client`, `method`, `path`, `route`,
//! `credential` (strings; `client`, `route` and `credential` are `-` when there is none),
//! `status`, `upstream_status` (0 without an upstream response), `duration_us`, `bytes`
//! (integers), `complete` (boolean), then `error` (string) only when something cut the response,
//! and `trace_id` (string) only when the request is traced (`[telemetry]`).
//!
//! Text, one line:
//!
//! ```text
//! 2026-12-04T15:36:51.123456Z  INFO access: request_id=5f0c6b2e9d8a4c1b8e7f6a5b4c3d2e1f client=ci method=GET path=/deploy/api/projects/v1 route=/deploy credential=automation status=200 upstream_status=200 duration_us=812 bytes=123 complete=true
//! ```
//!
//! The timestamp is RFC 3339 in UTC with microseconds, then the level and target columns of the
//! other log lines, then `key=value` pairs (logfmt). A value is written bare when it is non-empty
//! printable ASCII without spaces, `"`, `=` or `\`, and otherwise as a JSON string:
//! `path="/a b=\"c\""`.
//!
//! JSON, one object per line, the fields flat after `timestamp`, `level` and `target`:
//!
//! ```text
//! {"timestamp":"2026-12-04T15:36:51.123456Z","level":"INFO","target":"access","request_id":"5f0c6b2e9d8a4c1b8e7f6a5b4c3d2e1f","client":"ci","method":"GET","path":"/deploy/api/projects/v1","route":"/deploy","credential":"automation","status":200,"upstream_status":200,"duration_us":30000412,"bytes":1000,"complete":false,"error":"upstream_timeout"}
//! ```
//!
//! In both formats, control characters, line and paragraph separators and bidirectional
//! formatting characters in a value are escaped (`\n`, `\u001b`, `\u202e`), so a line is one
//! line and displays as it is stored. Access lines are never coloured and carry no span.
//!
//! # Turning it on and off
//!
//! [`subscriber`](super::subscriber) decides once, when it is built, from the `RUST_LOG`
//! directives: the sink is on when they enable target [`ACCESS_TARGET`] at level `info`
//! (`RUST_LOG=warn` or `info,access=off` turn it off). Span and field directives do not apply
//! to it, as it is not an event. The sink is part of the subscriber, so [`log_access`] finds it
//! where `tracing` finds the subscriber: the global one on every thread (the proxy's workers),
//! or the one a test installed for its scope on that thread.

use std::cell::RefCell;
use std::io::Write;
use std::sync::Arc;
use std::time::SystemTime;

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt};

use super::{line, Format};

/// The target of the access line, as `RUST_LOG` directives name it.
pub const ACCESS_TARGET: &str = "access";

/// What the access line says about one request (see [`log_access`]).
#[derive(Debug)]
pub struct AccessLine<'a> {
    /// The request id, as sent to the upstream and the client.
    pub request_id: &'a str,
    /// The inbound client's name, `-` without clients.
    pub client: &'a str,
    /// The request method.
    pub method: &'a http::Method,
    /// The path, without the query (which may carry secrets).
    pub path: &'a str,
    /// The route's prefix, `-` without a route.
    pub route: &'a str,
    /// The route's credential, `-` without a route.
    pub credential: &'a str,
    /// The status sent to the client (499 when it went away first).
    pub status: u16,
    /// The upstream's status, 0 without one.
    pub upstream_status: u16,
    /// From the request's head to the end of its response.
    pub duration_us: u64,
    /// Response body bytes sent.
    pub bytes: u64,
    /// Whether the response body was sent to its end.
    pub complete: bool,
    /// The error code (README, "How a request is handled") of what cut the response, if anything did.
    pub error: Option<&'a str>,
    /// The request's W3C trace id (32 hex digits) when `[telemetry]` is on, sampled or not.
    pub trace_id: Option<&'a str>,
}

/// Writes the access line of one request (see the module doc for its format), through the
/// sink of the subscriber in effect on this thread; nothing without one, or when the
/// subscriber's directives turned the access line off.
pub fn log_access(line: &AccessLine<'_>) {
    tracing::dispatcher::get_default(|current| {
        if let Some(sink) = current.downcast_ref::<AccessSink>() {
            sink.write(line);
        }
    });
}

/// The access log's sink: a format and a writer. It rides in the subscriber as a layer that
/// ignores every event, so that whoever installs the subscriber (globally, or for a test's scope)
/// installs the sink with it and [`log_access`] finds it with one lookup.
pub(super) struct AccessSink {
    format: Format,
    write: WriteLine,
}

/// A line's way to the subscriber's writer.
type WriteLine = Box<dyn Fn(&[u8]) + Send + Sync>;

impl std::fmt::Debug for AccessSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessSink")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl<S: Subscriber> Layer<S> for AccessSink {}

thread_local! {
    /// The line being spelled, reused so that spelling one allocates nothing.
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl AccessSink {
    /// The sink writing to `writer` in `format`, or `None` when `directives` leave the access
    /// target out at `info`.
    pub(super) fn new<W>(format: Format, directives: &str, writer: Arc<W>) -> Option<AccessSink>
    where
        W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
    {
        enabled(directives).then(|| AccessSink {
            format,
            write: Box::new(move |bytes: &[u8]| {
                // As for the other log lines: a failed write has nowhere better to be reported.
                let _ = writer.make_writer().write_all(bytes);
            }),
        })
    }

    fn write(&self, line: &AccessLine<'_>) {
        let now = SystemTime::now();
        let spell = |out: &mut Vec<u8>| match self.format {
            Format::Text => line::text(out, line, now),
            Format::Json => line::json(out, line, now),
        };
        let written = BUFFER.try_with(|buffer| {
            let Ok(mut buffer) = buffer.try_borrow_mut() else {
                return false;
            };
            buffer.clear();
            spell(&mut buffer);
            (self.write)(&buffer);
            true
        });
        if written != Ok(true) {
            // Thread teardown, or a writer that logs an access line itself: a buffer of its
            // own, as the line is part of an audit trail and never dropped.
            let mut out = Vec::new();
            spell(&mut out);
            (self.write)(&out);
        }
    }
}

/// Whether `directives` enable target [`ACCESS_TARGET`] at `info`: asked of the filter itself,
/// through a subscriber that holds only the filter.
fn enabled(directives: &str) -> bool {
    let probe =
        tracing::Dispatch::new(tracing_subscriber::registry().with(super::filter(directives)));
    tracing::dispatcher::with_default(
        &probe,
        || tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO),
    )
}
