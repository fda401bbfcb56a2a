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

/// Builds the subscriber writing to `writer`.
pub fn subscriber<W>(
    format: Format,
    directives: &str,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(directives))
        .with_writer(writer)
        .with_ansi(false);
    match format {
        Format::Text => Box::new(builder.finish()),
        Format::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}
