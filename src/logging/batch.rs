//! The per-thread batched stderr writer behind [`init_stderr`](super::init_stderr).
//!
//! Lines are formatted on the thread that logs them. A worker thread (see [`batch_this_thread`])
//! collects them in a buffer of its own that is written with one `write(2)` when it fills, when
//! its oldest line is [`MAX_DELAY`] old, and whenever the thread runs out of work, so a request's
//! access line costs no system call, no lock and no cross-thread hand-off. Other threads write
//! each line at once. Nothing is dropped (the access log is an audit trail): a slow stderr slows
//! the writers down.

use std::cell::RefCell;
use std::io::Write;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

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

/// Makes the calling thread collect its log lines in a buffer (see the module doc). Its owner
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

/// The [`MakeWriter`] behind [`init_stderr`](super::init_stderr): the calling thread's buffer.
#[derive(Debug, Clone, Copy)]
pub struct BatchedStderr;

/// Collects one line's output; decides on drop whether the buffer is written now.
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
