//! The generic cell rate algorithm (GCRA, virtual scheduling) on one atomic word, with an
//! emission interval and tolerance that may change between two requests.
//!
//! A fleet (`[cluster]`) gives each replica a share of a limit that follows demand every
//! `sync_interval`: the replica's interval becomes `interval / share` and its burst
//! `burst × share`, which may be less than one request (an hourly quota split over three
//! replicas). `governor`'s quota is fixed when the limiter is built and cannot express either
//! without forgetting what was spent, so the algorithm lives here; it is a dozen lines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One limiter's state and parameters, all in nanoseconds since the limiter's start.
#[derive(Debug)]
pub(super) struct Gcra {
    /// The theoretical arrival time of the next request.
    tat: AtomicU64,
    /// The time one request is worth.
    interval: AtomicU64,
    /// How far ahead of now `tat` may be and a request still pass: the burst beyond the first.
    tolerance: AtomicU64,
}

/// What one check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Let through; this many more would pass right now.
    Allowed { remaining: u64 },
    /// Refused; a request would pass after this long.
    Refused { wait: Duration },
}

impl Gcra {
    /// `interval` per request, `burst` at once (at least one).
    pub(super) fn new(interval: Duration, burst: u32) -> Gcra {
        let gcra = Gcra {
            tat: AtomicU64::new(0),
            interval: AtomicU64::new(0),
            tolerance: AtomicU64::new(0),
        };
        gcra.set(interval, f64::from(burst.max(1)));
        gcra
    }

    /// Enforces `interval` per request and `burst` requests at once from now on (a burst below
    /// one lets one request through at a time, spaced by `interval`). What was spent stays spent.
    pub(super) fn set(&self, interval: Duration, burst: f64) {
        let interval = nanos(interval).max(1);
        let tolerance = (burst - 1.0).max(0.0) * interval as f64;
        self.interval.store(interval, Ordering::Relaxed);
        self.tolerance
            .store(tolerance.min(u64::MAX as f64) as u64, Ordering::Relaxed);
    }

    /// The interval in force.
    pub(super) fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval.load(Ordering::Relaxed))
    }

    /// Takes one request at `now` (nanoseconds since the limiter's start).
    pub(super) fn check(&self, now: u64) -> Verdict {
        let interval = self.interval.load(Ordering::Relaxed);
        let tolerance = self.tolerance.load(Ordering::Relaxed);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let start = tat.max(now);
            let ahead = start - now;
            if ahead > tolerance {
                return Verdict::Refused {
                    wait: Duration::from_nanos(ahead - tolerance),
                };
            }
            let next = start.saturating_add(interval);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    let room = (tolerance + interval).saturating_sub(next - now);
                    return Verdict::Allowed {
                        remaining: room / interval,
                    };
                }
                Err(actual) => tat = actual,
            }
        }
    }
}

/// A duration in whole nanoseconds, saturating (a year is 3e16 ns; u64 holds 584 years).
pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_burst_then_one_per_interval() {
        let gcra = Gcra::new(Duration::from_millis(100), 3);
        assert_eq!(gcra.check(0), Verdict::Allowed { remaining: 2 });
        assert_eq!(gcra.check(0), Verdict::Allowed { remaining: 1 });
        assert_eq!(gcra.check(0), Verdict::Allowed { remaining: 0 });
        assert_eq!(
            gcra.check(0),
            Verdict::Refused {
                wait: Duration::from_millis(100)
            }
        );
        assert_eq!(gcra.check(100 * MS), Verdict::Allowed { remaining: 0 });
    }

    #[test]
    fn a_smaller_share_spaces_requests_and_keeps_what_was_spent() {
        let gcra = Gcra::new(Duration::from_millis(100), 3);
        assert!(matches!(gcra.check(0), Verdict::Allowed { .. }));
        // A third of the limit: 300 ms per request, a burst of one.
        gcra.set(Duration::from_millis(300), 1.0);
        // The first request's 100 ms is still spent.
        assert_eq!(
            gcra.check(0),
            Verdict::Refused {
                wait: Duration::from_millis(100)
            }
        );
        assert_eq!(gcra.check(100 * MS), Verdict::Allowed { remaining: 0 });
        assert_eq!(
            gcra.check(100 * MS),
            Verdict::Refused {
                wait: Duration::from_millis(300)
            }
        );
        assert_eq!(gcra.check(400 * MS), Verdict::Allowed { remaining: 0 });
    }

    #[test]
    fn a_burst_below_one_still_lets_one_through_per_interval() {
        // 1/h shared by three replicas: one request every three hours here.
        let hour = Duration::from_secs(3600);
        let gcra = Gcra::new(hour, 1);
        gcra.set(hour * 3, 1.0 / 3.0);
        assert_eq!(gcra.check(0), Verdict::Allowed { remaining: 0 });
        assert_eq!(gcra.check(nanos(hour)), Verdict::Refused { wait: hour * 2 });
        assert_eq!(
            gcra.check(nanos(hour * 3)),
            Verdict::Allowed { remaining: 0 }
        );
    }
}
