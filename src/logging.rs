//! Logging setup shared by the binary and the tests: `tracing` with text or JSON output.
//!
//! The level comes from `RUST_LOG` (default `info`). Whatever it says, the dependencies that
//! could print wire data at trace level (HTTP/2 frames, TLS records, connection internals) are
//! capped at `info`, so raising the level never exposes a header value. The proxy's own events
//! never carry secrets: tokens and keys live in redacting types and query strings are not logged.

use std::cell::RefCell;
use std::io::Write;
use std::time::{Duration, Instant};

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
    if tracing::subscriber::set_global_default(subscriber(format, directives, BatchedStderr, ansi))
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

/// A thread's buffer is written once it holds this much.
const BATCH_BYTES: usize = 32 * 1024;

/// A buffered line is written at the latest with the first line logged this long after it
/// (and at once when the thread goes idle).
pub const MAX_DELAY: Duration = Duration::from_millis(500);

/// The calling thread's pending lines.
struct LineBuffer {
    batching: bool,
    lines: Vec<u8>,
    oldest: Option<Instant>,
}

impl LineBuffer {
    fn flush(&mut self) {
        if !self.lines.is_empty() {
            // One write under stderr's lock, so batches from different threads never interleave
            // inside a line. A failed write to stderr has nowhere better to be reported.
            let _ = std::io::stderr().lock().write_all(&self.lines);
            self.lines.clear();
        }
        self.oldest = None;
    }
}

impl Drop for LineBuffer {
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    static LINES: RefCell<LineBuffer> = const {
        RefCell::new(LineBuffer { batching: false, lines: Vec::new(), oldest: None })
    };
}

/// Makes the calling thread collect its log lines in a buffer (see [`init_stderr`]). Its owner
/// must call [`flush_this_thread`] when the thread goes idle (a tokio `on_thread_park` hook).
pub fn batch_this_thread() {
    let _ = LINES.try_with(|b| b.borrow_mut().batching = true);
}

/// Writes the calling thread's buffered log lines now.
pub fn flush_this_thread() {
    let _ = LINES.try_with(|b| {
        if let Ok(mut b) = b.try_borrow_mut() {
            b.flush();
        }
    });
}

/// The [`MakeWriter`] behind [`init_stderr`].
#[derive(Debug, Clone, Copy)]
pub struct BatchedStderr;

/// Collects one event's output; decides on drop whether the buffer is written now.
#[derive(Debug)]
pub struct BatchedWriter(());

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = BatchedWriter;

    fn make_writer(&'a self) -> BatchedWriter {
        BatchedWriter(())
    }
}

impl Write for BatchedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let buffered = LINES.try_with(|b| match b.try_borrow_mut() {
            Ok(mut b) => {
                b.lines.extend_from_slice(data);
                true
            }
            Err(_) => false,
        });
        if buffered != Ok(true) {
            // Thread teardown, or logging from inside a flush: write directly.
            std::io::stderr().lock().write_all(data)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for BatchedWriter {
    fn drop(&mut self) {
        let _ = LINES.try_with(|b| {
            if let Ok(mut b) = b.try_borrow_mut() {
                if b.lines.is_empty() {
                    return;
                }
                let now = Instant::now();
                let oldest = *b.oldest.get_or_insert(now);
                if !b.batching
                    || b.lines.len() >= BATCH_BYTES
                    || now.duration_since(oldest) >= MAX_DELAY
                {
                    b.flush();
                }
            }
        });
    }
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
