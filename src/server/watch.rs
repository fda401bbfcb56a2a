//! The watch over one connection: the drain signal and its idle deadline, polled only when
//! their own waker fires.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::activity::ConnActivity;

/// How long an idle connection that was asked to close may take to do so.
const IDLE_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// What watches a connection: its activity, the drain signal, and its idle deadline.
pub(super) struct Watch {
    pub(super) activity: Arc<ConnActivity>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) idle_timeout: Duration,
    pub(super) header_read_timeout: Duration,
    pub(super) peer: std::net::SocketAddr,
}

impl Watch {
    /// Drives `connection` until it ends, asking it to close gracefully on the drain or when
    /// idle. Not an `async fn`: with one, rustc cannot prove the spawned task `Send` (a
    /// higher-ranked lifetime error on the generic connection).
    #[allow(clippy::manual_async_fn)]
    pub(super) fn drive<C>(
        mut self,
        mut connection: std::pin::Pin<&mut C>,
    ) -> impl std::future::Future<Output = ()> + Send + '_
    where
        C: hyper_util::server::graceful::GracefulConnection + Send,
        C::Error: std::fmt::Display,
    {
        async move {
            let (activity, peer) = (Arc::clone(&self.activity), self.peer);
            let mut closing = false;
            // After an idle close is requested, the peer gets this long to finish the goodbye
            // (HTTP/2 waits for the PING ack after GOAWAY); an unresponsive one is dropped.
            let mut hard_stop: Option<Instant> = None;
            // One timer, reset each round: the idle deadline, or the hard stop once closing.
            let mut timer = std::pin::pin!(tokio::time::sleep_until(Instant::now().into()));
            let side = Arc::new(SideWaker::default());
            let side_waker = std::task::Waker::from(Arc::clone(&side));
            loop {
                let wake = match hard_stop {
                    Some(t) => t,
                    // While a request runs (no deadline), re-check every second.
                    None => activity
                        .idle_deadline(self.idle_timeout, self.header_read_timeout)
                        .unwrap_or_else(|| Instant::now() + Duration::from_secs(1)),
                };
                timer.as_mut().reset(wake.into());
                let mut drain = std::pin::pin!(self.shutdown.wait_for(|stop| *stop));
                // The new round's drain wait and deadline are polled (registered) at once.
                side.fired.store(true, Ordering::Release);
                // The connection is polled on every wake-up, several per request. The drain
                // signal and the timer are polled only when their own waker has fired: polling
                // them on each of the connection's wake-ups cost about 0.9k instructions per
                // request (BENCHMARKS.md, "Instruction counts").
                let event = std::future::poll_fn(|cx| {
                    if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                        return Poll::Ready(WatchEvent::Ended(result));
                    }
                    side.task.register(cx.waker());
                    if !side.fired.swap(false, Ordering::AcqRel) {
                        return Poll::Pending;
                    }
                    let mut side_cx = Context::from_waker(&side_waker);
                    if !closing && drain.as_mut().poll(&mut side_cx).is_ready() {
                        return Poll::Ready(WatchEvent::Drain);
                    }
                    if (!closing || hard_stop.is_some())
                        && timer.as_mut().poll(&mut side_cx).is_ready()
                    {
                        return Poll::Ready(WatchEvent::Timer);
                    }
                    Poll::Pending
                })
                .await;
                match event {
                    WatchEvent::Ended(result) => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "client connection ended with an error");
                        }
                        return;
                    }
                    WatchEvent::Drain => {
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    WatchEvent::Timer => {
                        if let Some(t) = hard_stop {
                            if t <= Instant::now() {
                                tracing::debug!(%peer, "idle client did not close; dropping the connection");
                                return;
                            }
                            continue;
                        }
                        // Re-check: a request may have started since the deadline was computed.
                        let expired = activity
                            .idle_deadline(self.idle_timeout, self.header_read_timeout)
                            .is_some_and(|d| d <= Instant::now());
                        if expired && !activity.has_started() {
                            // Nothing to finish gracefully: a client that never sent a request.
                            tracing::debug!(%peer, "client sent no request in time; closing");
                            return;
                        }
                        if expired {
                            tracing::debug!(%peer, "closing idle client connection");
                            closing = true;
                            hard_stop = Some(Instant::now() + IDLE_CLOSE_WAIT);
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        }
    }
}

/// What ended a round of [`Watch::drive`].
enum WatchEvent<E> {
    /// The connection finished, with hyper's result.
    Ended(Result<(), E>),
    /// The drain signal.
    Drain,
    /// The timer: the idle deadline, the once-a-second re-check, or the hard stop.
    Timer,
}

/// The waker a connection's watch gives its drain wait and timer: it records that one of them
/// fired and wakes the connection's task, whose waker it keeps.
#[derive(Default)]
struct SideWaker {
    fired: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for SideWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}
