//! Logging setup shared by the binary and the tests: `tracing` with text or JSON output.
//!
//! The level comes from `RUST_LOG` (default `info`). Whatever it says, the dependencies that
//! could print wire data at trace level (HTTP/2 frames, TLS records, connection internals) are
//! capped at `info`, so raising the level never exposes a header value. The proxy's own events
//! never carry secrets: tokens and keys live in redacting types and query strings are not logged.

pub mod batch;
pub mod memory;

use std::cell::{Cell, RefCell};
use std::io::Write;
#[cfg(test)]
use std::time::Duration;

use std::sync::Arc;

pub use batch::{batch_this_thread, flush_this_thread, BatchedStderr, BatchedWriter, MAX_DELAY};
pub use memory::MemoryWriter;

use tracing::Subscriber;
use tracing_subscriber::fmt::format;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Crates whose trace/debug output can contain raw protocol data.
const CAPPED: [&str; 7] = [
    "h2",
    "hyper",
    "hyper_util",
    "rustls",
    "reqwest",
    "tokio_rustls",
    "hyper_rustls",
];

/// The filter: `directives` (as `RUST_LOG`), with the wire-level crates capped at `info`.
pub fn filter(directives: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"));
    for krate in CAPPED {
        if let Ok(directive) = format!("{krate}=info").parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Installs the process's logger on stderr. Lines are formatted on the thread that logs them.
/// Worker threads (see [`batch_this_thread`]) collect them in a per-thread buffer that is
/// written with one `write(2)` when it fills, when its oldest line is [`MAX_DELAY`] old, and
/// whenever the thread runs out of work, so the access log costs no system call and no
/// cross-thread hand-off per request. Other threads write each line at once. Nothing is dropped
/// (an audit trail): a slow stderr slows the writers down. Keep the returned guard alive until
/// exit; dropping it flushes the calling thread.
pub fn init_stderr(format: Format, directives: &str) -> LogGuard {
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    if tracing::dispatcher::set_global_default(subscriber(format, directives, BatchedStderr, ansi))
        .is_err()
    {
        eprintln!("a logger was already installed");
    }
    LogGuard(())
}

/// Flushes the calling thread's log buffer when dropped (see [`init_stderr`]).
#[derive(Debug)]
#[must_use = "dropping the guard flushes the log buffer"]
pub struct LogGuard(());

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush_this_thread();
    }
}

/// Builds the subscriber writing to `writer`; `ansi` colours text output (for terminals only).
/// It is [`generic_subscriber`] plus the access line's own writer (see [`log_access`]). It comes
/// as a `Dispatch`, which cannot be wrapped in more layers: they would not see the access lines
/// that [`log_access`] writes directly. Build custom stacks on [`generic_subscriber`].
pub fn subscriber<W>(format: Format, directives: &str, writer: W, ansi: bool) -> tracing::Dispatch
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let writer = Arc::new(writer);
    let access = AccessWriter {
        json: format == Format::Json,
        ansi: ansi && format == Format::Text,
        write: {
            let writer = Arc::clone(&writer);
            Box::new(move |line: &[u8]| {
                // As the fmt layer does: a failed write has nowhere better to be reported.
                let _ = writer.make_writer_for(&ACCESS_METADATA).write_all(line);
            })
        },
    };
    let builder = builder(directives, Shared(writer), access.ansi);
    match format {
        Format::Text => tracing::Dispatch::new(builder.finish().with(access)),
        Format::Json => {
            tracing::Dispatch::new(builder.json().flatten_event(true).finish().with(access))
        }
    }
}

/// tracing-subscriber's own formatter for every event, the access line included: what
/// [`subscriber`] writes without the access line's own writer (and without colour). The
/// reference that the tests and the `access_line` benchmark compare it with.
pub fn generic_subscriber<W>(
    format: Format,
    directives: &str,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = builder(directives, writer, false);
    match format {
        Format::Text => Box::new(builder.finish()),
        Format::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}

/// One [`MakeWriter`] shared by the fmt layer and the [`AccessWriter`].
struct Shared<W>(Arc<W>);

impl<'a, W: MakeWriter<'a>> MakeWriter<'a> for Shared<W> {
    type Writer = W::Writer;

    fn make_writer(&'a self) -> W::Writer {
        self.0.make_writer()
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> W::Writer {
        self.0.make_writer_for(meta)
    }
}

/// The fmt builder both subscribers start from: the filter, the writer, colour or not.
fn builder<W>(
    directives: &str,
    writer: W,
    ansi: bool,
) -> tracing_subscriber::fmt::SubscriberBuilder<format::DefaultFields, format::Format, EnvFilter, W>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter(directives))
        .with_writer(writer)
        .with_ansi(ansi)
}

/// The target of the access-log event, one per request.
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
    /// The DESIGN.md code of what cut the response, when something did.
    pub error: Option<&'a str>,
}

/// Writes the access-log line of one request (target [`ACCESS_TARGET`], level info).
///
/// Under a [`subscriber`], the line is written directly from `line`, in exactly the shape
/// tracing-subscriber's formatter gives the event below (a test compares the two). It is one
/// line per request, and the event's way costs a dispatch, a visitor call per field and a
/// write per piece: 4.1k instructions of a request's 41k even with a hand-written event
/// formatter, against 2.0k this way
/// (BENCHMARKS.md). Filtering is the subscriber's as for the event; colours, a current span and
/// values that need escaping take the event's way.
pub fn log_access(line: &AccessLine<'_>) {
    if tracing::dispatcher::get_default(|d| d.is::<AccessWriter>()) {
        // Outside the lookups below: a lookup inside another sees no dispatcher.
        if !tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO) {
            return;
        }
        let written = tracing::dispatcher::get_default(|d| {
            d.downcast_ref::<AccessWriter>()
                .is_some_and(|writer| writer.write(d, line))
        });
        if written {
            return;
        }
    }
    tracing::info!(
        target: ACCESS_TARGET,
        request_id = line.request_id,
        client = line.client,
        method = %line.method,
        path = line.path,
        route = line.route,
        credential = line.credential,
        status = line.status,
        upstream_status = line.upstream_status,
        duration_us = line.duration_us,
        bytes = line.bytes,
        complete = line.complete,
        error = line.error,
        "request"
    );
}

/// The access line's writer: a layer of [`subscriber`]'s stack that does nothing with events;
/// [`log_access`] finds it in the current dispatcher.
struct AccessWriter {
    json: bool,
    /// Coloured text: the generic formatter writes the line.
    ansi: bool,
    /// Writes a line to the subscriber's writer.
    write: WriteLine,
}

/// A line's way to a subscriber's writer.
type WriteLine = Box<dyn Fn(&[u8]) + Send + Sync>;

impl<S: Subscriber> Layer<S> for AccessWriter {}

/// What the writer sees of an access line written by [`AccessWriter`] (writers that filter by
/// target or level look at it): the event's target, level, module, file and field names.
static ACCESS_METADATA: tracing::Metadata<'static> = tracing::Metadata::new(
    "access line",
    ACCESS_TARGET,
    tracing::Level::INFO,
    Some(file!()),
    None,
    Some(module_path!()),
    tracing::field::FieldSet::new(
        &[
            "message",
            "request_id",
            "client",
            "method",
            "path",
            "route",
            "credential",
            "status",
            "upstream_status",
            "duration_us",
            "bytes",
            "complete",
            "error",
        ],
        tracing::callsite::Identifier(&ACCESS_CALLSITE),
    ),
    tracing::metadata::Kind::EVENT,
);

/// The callsite [`ACCESS_METADATA`] names; never registered, as no event is made from it.
struct AccessCallsite;

static ACCESS_CALLSITE: AccessCallsite = AccessCallsite;

impl tracing::Callsite for AccessCallsite {
    fn set_interest(&self, _: tracing::subscriber::Interest) {}

    fn metadata(&self) -> &tracing::Metadata<'_> {
        &ACCESS_METADATA
    }
}

thread_local! {
    /// The access line being built (reused, so building one allocates nothing).
    static ACCESS_LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl AccessWriter {
    /// Writes `line`; false when the generic formatter must (see [`log_access`]).
    fn write(&self, dispatch: &tracing::Dispatch, line: &AccessLine<'_>) -> bool {
        if self.ansi || dispatch.current_span().id().is_some() {
            return false;
        }
        let written = ACCESS_LINE.try_with(|buffer| {
            let Ok(mut buffer) = buffer.try_borrow_mut() else {
                return false;
            };
            buffer.clear();
            if !format_access(&mut buffer, line, self.json) {
                return false;
            }
            (self.write)(&buffer);
            true
        });
        #[cfg(test)]
        if written == Ok(true) {
            tests::FAST_LINES.with(|n| n.set(n.get() + 1));
        }
        written == Ok(true)
    }
}

/// Appends `line` as tracing-subscriber's formatter writes the event of [`log_access`] (text, or
/// flattened JSON); false, with `out` in any state, when a value would need escaping.
fn format_access(out: &mut Vec<u8>, line: &AccessLine<'_>, json: bool) -> bool {
    let quoted = [
        line.request_id,
        line.client,
        line.path,
        line.route,
        line.credential,
        line.error.unwrap_or(""),
    ];
    if !quoted.iter().all(|s| plain(s)) {
        return false;
    }
    // What goes between the values, in JSON or text. The text format writes the message first
    // and without its name, strings quoted (`Debug`) and the method as it is (`Display`).
    let keys: [&str; 13] = if json {
        [
            "\",\"level\":\"INFO\",\"message\":\"request\",\"request_id\":\"",
            "\",\"client\":\"",
            "\",\"method\":\"",
            "\",\"path\":\"",
            "\",\"route\":\"",
            "\",\"credential\":\"",
            "\",\"status\":",
            ",\"upstream_status\":",
            ",\"duration_us\":",
            ",\"bytes\":",
            ",\"complete\":",
            ",\"error\":\"",
            "\"",
        ]
    } else {
        [
            "  INFO access: request request_id=\"",
            "\" client=\"",
            "\" method=",
            " path=\"",
            "\" route=\"",
            "\" credential=\"",
            "\" status=",
            " upstream_status=",
            " duration_us=",
            " bytes=",
            " complete=",
            " error=\"",
            "\"",
        ]
    };
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
    }
    timestamp(out, std::time::SystemTime::now());
    let strings = [
        line.request_id,
        line.client,
        line.method.as_str(),
        line.path,
        line.route,
        line.credential,
    ];
    for (key, value) in keys.iter().zip(strings) {
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    let numbers = [
        line.status.into(),
        line.upstream_status.into(),
        line.duration_us,
        line.bytes,
    ];
    for (key, value) in keys[6..].iter().zip(numbers) {
        out.extend_from_slice(key.as_bytes());
        push_decimal(out, value, 0);
    }
    out.extend_from_slice(keys[10].as_bytes());
    out.extend_from_slice(if line.complete { b"true" } else { b"false" });
    if let Some(error) = line.error {
        for piece in [keys[11], error, keys[12]] {
            out.extend_from_slice(piece.as_bytes());
        }
    }
    out.extend_from_slice(if json {
        b",\"target\":\"access\"}\n"
    } else {
        b"\n"
    });
    true
}

/// Whether `s` is written as it is between quotes, by `Debug` and by JSON alike: printable
/// ASCII without quotes or backslashes.
fn plain(s: &str) -> bool {
    // A fold without an early exit, which the compiler vectorises.
    s.bytes().fold(true, |plain, b| {
        plain & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
    })
}

thread_local! {
    /// The second of the last timestamp and its text up to the seconds (`2026-11-24T03:20:15`).
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// Appends `now` as tracing-subscriber's `SystemTime` timer writes it (RFC 3339, UTC,
/// microseconds: `2026-11-24T03:20:15.123456Z`). The date and time of day are formatted once a
/// second per thread; within the second only the microseconds are written.
fn timestamp(line: &mut Vec<u8>, now: std::time::SystemTime) {
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        // humantime writes the same shape; its seconds part is what is cached.
        let full = humantime::format_rfc3339_seconds(now).to_string();
        if full.len() != 20 {
            // Years beyond 9999: not worth a cache.
            line.extend_from_slice(humantime::format_rfc3339_micros(now).to_string().as_bytes());
            return;
        }
        text.copy_from_slice(&full.as_bytes()[..19]);
        SECOND.set((secs, text));
    }
    line.extend_from_slice(&text);
    line.push(b'.');
    push_decimal(line, u64::from(since_epoch.subsec_micros()), 6);
    line.push(b'Z');
}

/// Appends `value` in decimal, with leading zeros up to `width` digits (at most 20).
fn push_decimal(line: &mut Vec<u8>, mut value: u64, width: usize) {
    let mut buf = [0u8; 20];
    let stop = buf.len() - width.min(buf.len());
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 && at <= stop {
            break;
        }
    }
    line.extend_from_slice(&buf[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Access lines this thread wrote directly (by `AccessWriter`).
        pub(super) static FAST_LINES: Cell<usize> = const { Cell::new(0) };
    }

    /// `line` with its timestamp (27 characters, checked for shape) replaced by `T`.
    fn without_timestamp(line: &str) -> String {
        let at = line.find("20").unwrap_or(0);
        let stamp = &line[at..(at + 27).min(line.len())];
        let b = stamp.as_bytes();
        assert!(
            b.len() == 27 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && b[26] == b'Z',
            "timestamp in {line:?}"
        );
        format!("{}T{}", &line[..at], &line[at + 27..])
    }

    fn line<'a>(method: &'a http::Method, client: &'a str, path: &'a str) -> AccessLine<'a> {
        AccessLine {
            request_id: "0123456789abcdef0123456789abcdef",
            client,
            method,
            path,
            route: "/deploy",
            credential: "deploy",
            status: 200,
            upstream_status: 200,
            duration_us: 1234,
            bytes: 38,
            complete: true,
            error: None,
        }
    }

    #[test]
    fn the_access_line_is_written_exactly_as_the_generic_formatter_writes_it() {
        let get = http::Method::GET;
        let purge = http::Method::from_bytes(b"PURGE").unwrap_or(http::Method::GET);
        let mut cut = line(&get, "ci-pipeline", "/deploy/api/v1/projects");
        cut.status = 499;
        cut.upstream_status = 0;
        cut.duration_us = u64::MAX;
        cut.bytes = 0;
        cut.complete = false;
        cut.error = Some("upstream_timeout");
        // (line, written directly by `AccessWriter`)
        let cases = [
            (line(&get, "-", "/deploy/api/projects/v1"), true),
            (cut, true),
            (line(&purge, "team 'ops'", "/deploy/a%20b/~x"), true),
            // Values that need escaping: the generic formatter writes these lines.
            (line(&get, "Zoë", "/deploy/x"), false),
            (line(&get, "-", "/deploy/\"q\"\\x"), false),
            (line(&get, "-", "/deploy/\u{1b}[31m"), false),
        ];
        for format in [Format::Text, Format::Json] {
            for (access, fast) in &cases {
                let (ours, theirs) = (MemoryWriter::default(), MemoryWriter::default());
                let before = FAST_LINES.with(Cell::get);
                tracing::dispatcher::with_default(
                    &subscriber(format, "info", ours.clone(), false),
                    || log_access(access),
                );
                let took_fast_path = FAST_LINES.with(Cell::get) > before;
                tracing::subscriber::with_default(
                    generic_subscriber(format, "info", theirs.clone()),
                    || log_access(access),
                );
                let (ours, theirs) = (ours.take(), theirs.take());
                assert_eq!(ours.lines().count(), 1, "{ours}");
                assert_eq!(
                    without_timestamp(&ours),
                    without_timestamp(&theirs),
                    "{format:?} {access:?}"
                );
                assert_eq!(took_fast_path, *fast, "{format:?} {access:?}");
                if format == Format::Json {
                    let parsed: serde_json::Value =
                        serde_json::from_str(ours.trim_end()).unwrap_or_default();
                    assert_eq!(parsed["client"], access.client, "{ours}");
                }
            }
        }
    }

    #[test]
    fn other_events_and_terminal_output_keep_the_generic_formatter() {
        let captured = MemoryWriter::default();
        let before = FAST_LINES.with(Cell::get);
        tracing::dispatcher::with_default(
            &subscriber(Format::Text, "info", captured.clone(), true),
            || {
                log_access(&line(&http::Method::GET, "-", "/deploy/x"));
                tracing::info!(target: "sitecore_auth_proxy", routes = 3, "started");
            },
        );
        let out = captured.take();
        assert_eq!(FAST_LINES.with(Cell::get), before, "{out}");
        assert!(
            out.contains("\u{1b}["),
            "terminal output keeps its colours: {out}"
        );
        assert!(out.contains("started"), "{out}");
    }

    #[test]
    fn inside_a_span_the_generic_formatter_writes_the_line_with_the_span() {
        let access = line(&http::Method::GET, "-", "/deploy/x");
        let (ours, theirs) = (MemoryWriter::default(), MemoryWriter::default());
        let before = FAST_LINES.with(Cell::get);
        tracing::dispatcher::with_default(
            &subscriber(Format::Json, "info", ours.clone(), false),
            || tracing::info_span!("batch", job = 7).in_scope(|| log_access(&access)),
        );
        tracing::subscriber::with_default(
            generic_subscriber(Format::Json, "info", theirs.clone()),
            || tracing::info_span!("batch", job = 7).in_scope(|| log_access(&access)),
        );
        assert_eq!(FAST_LINES.with(Cell::get), before);
        let ours = ours.take();
        assert!(ours.contains("\"span\":{\"job\":7"), "{ours}");
        assert_eq!(without_timestamp(&ours), without_timestamp(&theirs.take()));
    }

    /// An event's target, level and field names.
    type Shape = (String, tracing::Level, Vec<String>);

    /// Records the shape of every event it sees.
    struct EventShapes(std::sync::Arc<std::sync::Mutex<Vec<Shape>>>);

    impl<S: Subscriber> Layer<S> for EventShapes {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let meta = event.metadata();
            let names = meta.fields().iter().map(|f| f.name().to_owned()).collect();
            if let Ok(mut shapes) = self.0.lock() {
                shapes.push((meta.target().to_owned(), *meta.level(), names));
            }
        }
    }

    #[test]
    fn the_writers_metadata_names_what_the_event_names() {
        use tracing_subscriber::layer::SubscriberExt;
        let shapes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let recording = tracing_subscriber::registry().with(EventShapes(shapes.clone()));
        tracing::subscriber::with_default(recording, || {
            log_access(&line(&http::Method::GET, "-", "/deploy/x"));
        });
        let shapes = shapes.lock().map(|s| s.clone()).unwrap_or_default();
        let ours = ACCESS_METADATA.fields().iter().map(|f| f.name().to_owned());
        assert_eq!(
            shapes,
            [(
                ACCESS_METADATA.target().to_owned(),
                *ACCESS_METADATA.level(),
                ours.collect::<Vec<_>>()
            )]
        );
    }

    #[test]
    fn filter_directives_select_the_same_lines_on_both_ways() {
        let get = http::Method::GET;
        let mut cut = line(&get, "-", "/deploy/cut");
        cut.error = Some("upstream_timeout");
        let lines = [line(&get, "-", "/deploy/whole"), cut];
        for directives in [
            "info",
            "warn",
            "info,access=off",
            "info,access=warn",
            "info,access[{error}]=off",
            "off,access[{client}]=info",
        ] {
            for format in [Format::Text, Format::Json] {
                let (ours, theirs) = (MemoryWriter::default(), MemoryWriter::default());
                tracing::dispatcher::with_default(
                    &subscriber(format, directives, ours.clone(), false),
                    || lines.iter().for_each(log_access),
                );
                tracing::subscriber::with_default(
                    generic_subscriber(format, directives, theirs.clone()),
                    || lines.iter().for_each(log_access),
                );
                let strip = |out: String| out.lines().map(without_timestamp).collect::<Vec<_>>();
                assert_eq!(
                    strip(ours.take()),
                    strip(theirs.take()),
                    "{directives} {format:?}"
                );
            }
        }
    }

    #[test]
    fn the_filter_and_the_writer_decide_as_they_do_for_events() {
        use tracing_subscriber::fmt::writer::MakeWriterExt;
        let access = line(&http::Method::GET, "-", "/deploy/x");
        for format in [Format::Text, Format::Json] {
            // The access target turned off: nothing, by either path.
            let captured = MemoryWriter::default();
            tracing::dispatcher::with_default(
                &subscriber(format, "info,access=off", captured.clone(), false),
                || {
                    log_access(&access);
                    tracing::info!(target: "sitecore_auth_proxy", "kept");
                },
            );
            let out = captured.take();
            assert!(!out.contains("/deploy/x") && out.contains("kept"), "{out}");
            // A writer that leaves out the access target sees no access line.
            let captured = MemoryWriter::default();
            tracing::dispatcher::with_default(
                &subscriber(
                    format,
                    "info",
                    captured
                        .clone()
                        .with_filter(|meta| meta.target() != ACCESS_TARGET),
                    false,
                ),
                || {
                    log_access(&access);
                    tracing::info!(target: "sitecore_auth_proxy", "kept");
                },
            );
            let out = captured.take();
            assert!(!out.contains("/deploy/x") && out.contains("kept"), "{out}");
        }
    }

    #[test]
    fn timestamps_match_the_rfc3339_micros_shape_across_seconds_and_days() {
        let base = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let offsets_us = [
            0,
            1,
            999_999,
            1_000_000,
            1_000_001,
            59_999_999,
            86_399_999_999,
        ];
        for us in offsets_us
            .into_iter()
            .chain((0..500).map(|i| i * 7_919_777))
        {
            let t = base + Duration::from_micros(us);
            let mut ours = Vec::new();
            timestamp(&mut ours, t);
            assert_eq!(
                String::from_utf8_lossy(&ours),
                humantime::format_rfc3339_micros(t).to_string()
            );
        }
    }

    #[test]
    fn integers_are_written_in_decimal() {
        for n in [0, 7, 10, 38, 1234, 99_999, u64::MAX] {
            for width in [0, 1, 6, 20, 30] {
                let mut line = b"x".to_vec();
                push_decimal(&mut line, n, width);
                assert_eq!(
                    String::from_utf8_lossy(&line),
                    format!("x{n:0width$}", width = width.min(20))
                );
            }
        }
    }
}
