//! A cap on concurrent requests (`max_in_flight`): an atomic counter, a guard that gives its slot
//! back when dropped, and an optional limit. Without a limit the counter still counts, for the
//! status page.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// The requests in flight for one client or route, and their limit.
///
/// The counter is shared through an `Arc`, so a reload that changes only the limit keeps
/// counting the requests already in flight ([`InFlight::with_limit`]).
#[derive(Debug)]
pub struct InFlight {
    count: Arc<AtomicU32>,
    limit: Option<NonZeroU32>,
}

/// One request's slot; dropping it (when the response body ends) frees the slot.
///
/// `Send + 'static`, so it can travel inside a response body.
#[derive(Debug)]
#[must_use = "the slot is freed as soon as the guard is dropped"]
pub struct InFlightGuard {
    count: Arc<AtomicU32>,
}

impl InFlight {
    /// A new counter at zero.
    pub fn new(limit: Option<NonZeroU32>) -> Self {
        InFlight {
            count: Arc::new(AtomicU32::new(0)),
            limit,
        }
    }

    /// The same counter with another limit.
    pub fn with_limit(&self, limit: Option<NonZeroU32>) -> Self {
        InFlight {
            count: self.count.clone(),
            limit,
        }
    }

    /// Takes a slot, or `None` when `limit` requests are in flight already.
    pub fn try_acquire(&self) -> Option<InFlightGuard> {
        let limit = self.limit.map_or(u32::MAX, NonZeroU32::get);
        // The counter guards no other data, so relaxed ordering is enough; the compare-and-swap
        // loop never admits more than `limit`, even under contention.
        self.count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(InFlightGuard {
            count: self.count.clone(),
        })
    }

    /// Requests in flight now.
    pub fn current(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
    }

    /// The limit; `None` means no limit.
    pub fn limit(&self) -> Option<NonZeroU32> {
        self.limit
    }

    /// True when both count the same requests (one survived a reload into the other).
    pub fn shares_counter_with(&self, other: &InFlight) -> bool {
        Arc::ptr_eq(&self.count, &other.count)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(n: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(n)
    }

    #[test]
    fn guards_count_and_free_their_slots() {
        let in_flight = InFlight::new(limit(2));
        let first = in_flight.try_acquire().expect("first slot");
        let second = in_flight.try_acquire().expect("second slot");
        assert_eq!(in_flight.current(), 2);
        assert!(in_flight.try_acquire().is_none());
        assert_eq!(in_flight.current(), 2, "a refusal takes no slot");

        drop(first);
        assert_eq!(in_flight.current(), 1);
        let third = in_flight.try_acquire().expect("a freed slot");
        drop(second);
        drop(third);
        assert_eq!(in_flight.current(), 0);
    }

    #[test]
    fn without_a_limit_every_request_passes_and_is_counted() {
        let in_flight = InFlight::new(None);
        let guards: Vec<_> = (0..100)
            .map(|_| in_flight.try_acquire().expect("no limit"))
            .collect();
        assert_eq!(in_flight.current(), 100);
        drop(guards);
        assert_eq!(in_flight.current(), 0);
    }

    #[test]
    fn a_new_limit_keeps_counting_the_requests_in_flight() {
        let old = InFlight::new(limit(5));
        let guards: Vec<_> = (0..3).map(|_| old.try_acquire().expect("slot")).collect();
        let new = old.with_limit(limit(3));
        assert!(new.shares_counter_with(&old));
        assert!(!new.shares_counter_with(&InFlight::new(limit(3))));
        assert_eq!(new.current(), 3);
        assert!(new.try_acquire().is_none());
        // A request admitted under the old limit frees its slot in the new one.
        drop(guards);
        assert_eq!(new.current(), 0);
        assert!(new.try_acquire().is_some());
    }

    #[test]
    fn the_guard_can_outlive_the_request_on_another_thread() {
        fn send_static<T: Send + 'static>(_: &T) {}
        let in_flight = InFlight::new(limit(1));
        let guard = in_flight.try_acquire().expect("slot");
        send_static(&guard);
        std::thread::spawn(move || drop(guard))
            .join()
            .expect("thread");
        assert_eq!(in_flight.current(), 0);
    }

    #[test]
    fn contention_never_admits_more_than_the_limit() {
        let in_flight = Arc::new(InFlight::new(limit(3)));
        let peak = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let in_flight = in_flight.clone();
                let peak = peak.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        if let Some(guard) = in_flight.try_acquire() {
                            peak.fetch_max(in_flight.current(), Ordering::Relaxed);
                            drop(guard);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("thread");
        }
        assert!(peak.load(Ordering::Relaxed) <= 3);
        assert_eq!(in_flight.current(), 0);
    }
}
