//! Logging setup shared by the binary and the tests: `tracing` with text or JSON output.
//!
//! The level comes from `RUST_LOG` (default `info`). Whatever it says, the dependencies that
//! could print wire data at trace level (HTTP/2 frames, TLS records, connection internals) are
//! capped at `info`, so raising the level never exposes a header value. The proxy's own events
//! never carry secrets: tokens and keys live in redacting types and query strings are not logged.

use tracing_subscriber::fmt::MakeWriter;
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

/// Installs the process's logger on stderr: lines are formatted on the calling thread and
/// written by a background thread through a buffer, so the access log costs no `write(2)` per
/// request. It is not lossy (an audit trail): when the buffer is full, callers wait. Keep the
/// returned guard alive until exit; dropping it flushes.
pub fn init_stderr(
    format: Format,
    directives: &str,
) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stderr());
    if tracing::subscriber::set_global_default(subscriber(format, directives, writer, ansi))
        .is_err()
    {
        eprintln!("a logger was already installed");
    }
    guard
}

/// Builds the subscriber writing to `writer`; `ansi` colours text output (for terminals only).
pub fn subscriber<W>(
    format: Format,
    directives: &str,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(directives))
        .with_writer(writer)
        .with_ansi(ansi && format == Format::Text);
    match format {
        Format::Text => Box::new(builder.finish()),
        Format::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}
