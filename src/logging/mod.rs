//! Logging setup shared by the binary and the tests: `tracing` events as text or JSON, and the
//! access log, a sink of its own with its own line format ([`access`]), on the same writer.
//!
//! The level comes from `RUST_LOG` (default `info`). Whatever it says, the dependencies that
//! could print wire data at trace level (HTTP/2 frames, TLS records, connection internals) are
//! capped at `info`, so raising the level never exposes a header value. The proxy's own events
//! never carry secrets: tokens and keys live in redacting types and query strings are not logged.
//!
//! - [`batch`]: the per-thread batched stderr writer of the binary;
//! - [`access`]: the access line, its sink and its two formats (spelled in `line`);
//! - [`memory`]: a writer that keeps what it is given, for tests.

pub mod access;
pub mod batch;
mod line;
pub mod memory;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::EnvFilter;

pub use access::{log_access, AccessLine, ACCESS_TARGET};
pub use batch::{batch_this_thread, flush_this_thread, BatchedStderr, BatchedWriter, MAX_DELAY};
pub use memory::MemoryWriter;

use access::AccessSink;

/// Log output format, for events and access lines alike.
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

/// Installs the process's logger on stderr, through the [`batch`] writer: worker threads that
/// called [`batch_this_thread`] write their lines in batches, other threads at once. Keep the
/// returned guard alive until exit; dropping it flushes the calling thread.
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

/// Builds the subscriber writing events and access lines to `writer` in `format`, filtered by
/// `directives` (as `RUST_LOG`, see [`filter`]); `ansi` colours the events' text (for
/// terminals only). Whether access lines are written is decided here, once (see [`access`]).
///
/// Installing it installs the access sink with it: globally for every thread, or for a scope
/// (`tracing::dispatcher::with_default`) on that thread. It comes as a `Dispatch`, which cannot
/// be wrapped in more layers: they would see the events but not the access lines.
pub fn subscriber<W>(format: Format, directives: &str, writer: W, ansi: bool) -> tracing::Dispatch
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let writer = Arc::new(writer);
    let access = AccessSink::new(format, directives, Arc::clone(&writer));
    let events = tracing_subscriber::fmt()
        .with_env_filter(filter(directives))
        .with_writer(Shared(writer))
        .with_ansi(ansi);
    match format {
        Format::Text => tracing::Dispatch::new(events.finish().with(access)),
        Format::Json => {
            tracing::Dispatch::new(events.json().flatten_event(true).finish().with(access))
        }
    }
}

/// One [`MakeWriter`] shared by the events' formatter and the access sink.
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
