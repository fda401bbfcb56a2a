//! Spreading accepted connections over the worker threads by their open connections.

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

/// Spreads the accepted connections over the worker threads. All of them accept on the shared
/// listening socket, and whichever wakes first could otherwise take a whole burst (a pool of
/// keep-alive clients connecting at once) and serve it on one core while the others idle. The
/// worker that accepts a connection keeps it unless it has at least two more open connections
/// than the least busy running worker; then it hands the connection to that one. The slack of
/// one keeps clients that connect for a single request from being handed back and forth. A
/// worker runs while its inbox is open: one that has stopped (draining, or it failed) has
/// closed it and is no longer picked.
pub(super) struct Spread {
    /// Open connections per worker (the `proxy_open_connections` gauges), each counted from its
    /// placement until it ends.
    open: Arc<[Gauge]>,
    inboxes: Box<[mpsc::UnboundedSender<Arrival>]>,
}

/// One worker's side of the [`Spread`]. Dropping it (the worker stopped or failed) takes the
/// worker out of the spread.
pub(super) struct Lane {
    index: usize,
    spread: Arc<Spread>,
    inbox: mpsc::UnboundedReceiver<Arrival>,
}

/// A connection handed from the worker that accepted it to the one that serves it.
pub(super) struct Arrival {
    /// Out of the accepting worker's reactor, to be registered with the serving worker's.
    pub(super) stream: std::net::TcpStream,
    pub(super) peer: std::net::SocketAddr,
    pub(super) permit: OwnedSemaphorePermit,
    pub(super) seat: Seat,
}

/// One open connection counted against the worker that serves it, until dropped.
pub(super) struct Seat {
    open: Arc<[Gauge]>,
    worker: usize,
}

impl Seat {
    pub(super) fn take(open: &Arc<[Gauge]>, worker: usize) -> Seat {
        open[worker].inc();
        Seat {
            open: Arc::clone(open),
            worker,
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.open[self.worker].dec();
    }
}

impl Spread {
    /// The lanes of `n` workers, in worker order, counting into `open` (one entry per worker).
    pub(super) fn lanes(open: &Arc<[Gauge]>, n: usize) -> Vec<Lane> {
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let spread = Arc::new(Spread {
            open: Arc::clone(open),
            inboxes: inboxes.into_boxed_slice(),
        });
        receivers
            .into_iter()
            .enumerate()
            .map(|(index, inbox)| Lane {
                index,
                spread: Arc::clone(&spread),
                inbox,
            })
            .collect()
    }
}

impl Lane {
    /// Places a connection this worker accepted. Returns it with its seat if this worker is to
    /// serve it; `None` if it went to another worker, or was closed because it could not be
    /// moved between the workers' reactors (logged at debug level; the client sees a reset).
    pub(super) fn place(
        &self,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Option<(tokio::net::TcpStream, OwnedSemaphorePermit, Seat)> {
        let Spread { open, inboxes } = &*self.spread;
        let mine = open[self.index].get();
        // The least busy running worker (the lowest index on a tie).
        let least = (0..open.len())
            .filter(|&w| w != self.index && !inboxes[w].is_closed())
            .map(|w| (open[w].get(), w))
            .min()
            .filter(|&(count, _)| mine > count + 1);
        let Some((_, to)) = least else {
            return Some((stream, permit, Seat::take(open, self.index)));
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot hand over a connection; closing it");
                return None;
            }
        };
        let arrival = Arrival {
            stream,
            peer,
            permit,
            seat: Seat::take(open, to),
        };
        // That worker stopped after it was picked: serve the connection here after all (its
        // seat there is dropped with the rest of the returned arrival).
        let Arrival { stream, permit, .. } = inboxes[to].send(arrival).err()?.0;
        match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => Some((stream, permit, Seat::take(open, self.index))),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot take back a connection; closing it");
                None
            }
        }
    }

    /// The next connection another worker handed to this one (never, without a lane).
    pub(super) async fn next(lane: &mut Option<Lane>) -> Option<Arrival> {
        match lane {
            Some(lane) => lane.inbox.recv().await,
            None => std::future::pending().await,
        }
    }
}

impl Drop for Lane {
    /// Takes this worker out of the spread (it stopped, or failed) and closes the connections
    /// handed to it that it has not taken yet, like those still in the listener's backlog.
    fn drop(&mut self) {
        self.inbox.close();
        // Dropping the receiver alone would leave a send that had begun in the channel, with
        // its permit and seat, until every worker is gone. After `close`, `try_recv` reports
        // `Empty` until such a send has landed (a few instructions away) and then
        // `Disconnected`.
        loop {
            match self.inbox.try_recv() {
                Ok(_) => {}
                Err(mpsc::error::TryRecvError::Empty) => std::hint::spin_loop(),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;
    use tokio::sync::Semaphore;

    use super::*;

    type Placed = (tokio::net::TcpStream, OwnedSemaphorePermit, Seat);

    /// Two workers' lanes, with a listener to accept real connections from.
    struct Two {
        listener: TcpListener,
        limit: Arc<Semaphore>,
        open: Arc<[Gauge]>,
        lane: Lane,
        /// Worker 1's lane, until it leaves.
        other: Option<Lane>,
    }

    impl Two {
        async fn new() -> Two {
            let open: Arc<[Gauge]> = (0..2).map(|_| Gauge::default()).collect();
            let mut lanes = Spread::lanes(&open, 2);
            let other = lanes.pop().expect("lane 1");
            let lane = lanes.pop().expect("lane 0");
            Two {
                listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                limit: Arc::new(Semaphore::new(100)),
                open,
                lane,
                other: Some(other),
            }
        }

        /// Accepts a connection as worker 0's accept loop would and places it; its peer too.
        async fn place(&self) -> (Option<Placed>, std::net::SocketAddr) {
            let addr = self.listener.local_addr().expect("addr");
            let (client, accepted) =
                tokio::join!(tokio::net::TcpStream::connect(addr), self.listener.accept());
            // The server side stays open without the client side.
            drop(client.expect("connect"));
            let (stream, peer) = accepted.expect("accept");
            let permit = Arc::clone(&self.limit).try_acquire_owned().expect("permit");
            (self.lane.place(stream, peer, permit), peer)
        }

        async fn keep(&self) -> Placed {
            self.place().await.0.expect("kept by worker 0")
        }

        fn counts(&self) -> [i64; 2] {
            [0, 1].map(|w| self.open[w].get())
        }
    }

    #[tokio::test]
    async fn a_worker_keeps_connections_until_it_has_two_more_than_the_least_busy() {
        let mut t = Two::new().await;
        let mut kept = vec![t.keep().await, t.keep().await];
        assert_eq!(t.counts(), [2, 0]);

        // Two ahead: the next one goes to worker 1, with its permit and its seat there.
        let (placed, peer) = t.place().await;
        assert!(placed.is_none(), "handed over");
        let other = t.other.as_mut().expect("lane 1");
        let arrival = other.inbox.recv().await.expect("arrival");
        assert_eq!((arrival.peer, arrival.seat.worker), (peer, 1));
        assert_eq!(t.counts(), [2, 1]);
        assert_eq!(t.limit.available_permits(), 97);
        drop(arrival);
        assert_eq!(t.counts(), [2, 0], "its seat went with it");
        assert_eq!(t.limit.available_permits(), 98, "and its permit");

        // A worker that leaves closes what was handed to it and not taken, and is no longer
        // picked, however idle it looks.
        assert!(t.place().await.0.is_none(), "handed over again");
        assert_eq!((t.counts(), t.limit.available_permits()), ([2, 1], 97));
        drop(t.other.take());
        assert_eq!((t.counts(), t.limit.available_permits()), ([2, 0], 98));
        for _ in 0..3 {
            kept.push(t.keep().await);
        }
        assert_eq!(t.counts(), [5, 0]);
        drop(kept);
        assert_eq!(t.counts(), [0, 0]);
        assert_eq!(t.limit.available_permits(), 100);
    }

    #[tokio::test]
    async fn a_worker_that_closed_its_inbox_is_not_picked_and_the_connection_stays() {
        let mut t = Two::new().await;
        let _kept = [t.keep().await, t.keep().await];
        // Worker 1 is stopping: its inbox is closed, though its lane is not dropped yet.
        t.other.as_mut().expect("lane 1").inbox.close();
        let (placed, _) = t.place().await;
        let (_stream, _permit, seat) = placed.expect("served here");
        assert_eq!(seat.worker, 0);
        assert_eq!(t.counts(), [3, 0]);
    }
}
