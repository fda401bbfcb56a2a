//! A rate limiter for one key (a client, or a route for all its clients together): `governor`'s
//! GCRA, which keeps one atomic word of state and decides without a lock, plus the numbers the
//! `RateLimit` header fields and the status page need.
//!
//! In a fleet (`[cluster]`) each replica enforces its share of the limit. The GCRA is built in
//! cells, [`CELLS_PER_REQUEST`] to a request at the full rate; a replica with share `s` charges
//! `CELLS_PER_REQUEST / s` cells per request, so its share changes every `sync_interval` without
//! rebuilding the limiter or forgetting what was spent.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::Quota;

use super::recent::RecentCounts;
use crate::config::RateSettings;

type Gcra<C> = governor::RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

/// Cells a request costs at a share of 1 (alone, or in a fleet with the whole limit). A share is
/// then exact to 0.1 %.
pub const CELLS_PER_REQUEST: u32 = 1000;

/// A GCRA limiter: `settings.rate` sustained, up to `settings.burst` at once.
///
/// Generic over the clock so tests can drive it with `governor::clock::FakeRelativeClock`; the
/// proxy uses the monotonic clock.
pub struct RateLimiter<C: Clock = MonotonicClock> {
    settings: RateSettings,
    policy: &'static str,
    /// This limiter's `RateLimit-Policy` item, built once: it says only what the settings say.
    policy_field: http::HeaderValue,
    gcra: Gcra<C>,
    /// Cells per request: [`CELLS_PER_REQUEST`] divided by this replica's share.
    cost: AtomicU32,
    /// The most a request may cost: the whole burst (the GCRA cannot charge more at once).
    max_cost: u32,
    /// Requests checked, admitted or not: the fleet divides the limit by this demand.
    offered: AtomicU64,
    start: C::Instant,
    admitted: RecentCounts,
    refused: RecentCounts,
}

/// A request this limiter let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    /// Requests that would pass right now, after this one.
    pub remaining: u32,
    /// An upper bound on the time until one more request than `remaining` would pass: one
    /// interval of the rate (`window / count`). GCRA refills one request per interval, and the
    /// state `governor` reports does not say how far into the current interval it is; the bound
    /// errs on the safe side, so a client that sends no more than `remaining` within `reset` is
    /// never refused by this limiter.
    pub reset: Duration,
}

/// A request this limiter refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The time until a request would pass (exact, from the GCRA state).
    pub retry_after: Duration,
}

impl Refused {
    /// `retry_after` in whole seconds for `Retry-After`: rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        whole_seconds_up(self.retry_after)
    }
}

/// Requests admitted and refused over the last seconds (see [`super::recent::WINDOW_SECS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedRate {
    /// Requests let through in the window.
    pub admitted: u64,
    /// Requests refused in the window.
    pub refused: u64,
    /// The window: the last complete seconds, fewer right after the limiter was created.
    pub window: Duration,
}

impl ObservedRate {
    /// Admitted requests per second over the window (0 for an empty window).
    pub fn admitted_per_second(&self) -> f64 {
        per_second(self.admitted, self.window)
    }

    /// Refused requests per second over the window (0 for an empty window).
    pub fn refused_per_second(&self) -> f64 {
        per_second(self.refused, self.window)
    }
}

fn per_second(count: u64, window: Duration) -> f64 {
    if window.is_zero() {
        0.0
    } else {
        count as f64 / window.as_secs_f64()
    }
}

/// Rounds up to whole seconds, at least 1 (for `Retry-After` and the `t` parameter).
pub(super) fn whole_seconds_up(d: Duration) -> u64 {
    let seconds = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    seconds.max(1)
}

impl RateLimiter {
    /// A limiter on the monotonic clock. `policy` names it in the `RateLimit` header fields
    /// (`"client"`, `"route"`).
    pub fn new(policy: &'static str, settings: RateSettings) -> Self {
        RateLimiter::with_clock(policy, settings, MonotonicClock)
    }
}

impl<C: Clock> RateLimiter<C> {
    /// A limiter on `clock`.
    pub fn with_clock(policy: &'static str, settings: RateSettings, clock: C) -> Self {
        // `Rate::parse` guarantees an interval of at least a microsecond, so `with_period` (which
        // refuses only zero) always has a quota; the fallback is the rate's own limit anyway.
        // `MAX_BURST` × `CELLS_PER_REQUEST` fits a u32, and a rate's interval is at least a
        // microsecond, so a cell's interval is at least a nanosecond.
        let cells = settings.burst.saturating_mul(CELLS);
        let quota = Quota::with_period(settings.rate.interval() / CELLS_PER_REQUEST)
            .unwrap_or_else(|| Quota::per_second(settings.rate.count().saturating_mul(CELLS)))
            .allow_burst(cells);
        let start = clock.now();
        let rate = settings.rate;
        let policy_field = http::HeaderValue::try_from(format!(
            "\"{policy}\";q={};w={}",
            rate.count(),
            rate.unit().seconds()
        ))
        // A fixed ASCII name and two numbers: always a valid value.
        .unwrap_or(http::HeaderValue::from_static(""));
        RateLimiter {
            settings,
            policy,
            policy_field,
            gcra: governor::RateLimiter::direct_with_clock(quota, clock)
                .with_middleware::<StateInformationMiddleware>(),
            cost: AtomicU32::new(CELLS_PER_REQUEST),
            max_cost: cells.get(),
            offered: AtomicU64::new(0),
            start,
            admitted: RecentCounts::default(),
            refused: RecentCounts::default(),
        }
    }

    /// Takes one request from the limiter, or says how long until one would pass.
    pub fn check(&self) -> Result<Allowed, Refused> {
        self.offered.fetch_add(1, Ordering::Relaxed);
        let cost = self.cost.load(Ordering::Relaxed);
        let outcome = self.gcra.check_n(NonZeroU32::new(cost).unwrap_or(CELLS));
        let now = self.gcra.clock().now();
        let second = self.second(now);
        match outcome {
            Ok(Ok(snapshot)) => {
                self.admitted.add(second);
                Ok(Allowed {
                    remaining: snapshot.remaining_burst_capacity() / cost,
                    reset: self.local_interval(cost),
                })
            }
            Ok(Err(not_until)) => {
                self.refused.add(second);
                Err(Refused {
                    retry_after: not_until.wait_time_from(now),
                })
            }
            // `set_share` never charges more than the burst; should it ever, the request waits
            // one interval like any refused one.
            Err(_) => {
                self.refused.add(second);
                Err(Refused {
                    retry_after: self.local_interval(cost),
                })
            }
        }
    }

    /// Sets this replica's share of the limit (0 < share ≤ 1; 1 alone). A share below what one
    /// request of the burst allows (1 / burst) is raised to it: a replica always lets a request
    /// through now and then.
    pub fn set_share(&self, share: f64) {
        let share = if share.is_finite() {
            share.clamp(1e-6, 1.0)
        } else {
            1.0
        };
        let cost = (f64::from(CELLS_PER_REQUEST) / share).round();
        let cost = (cost as u32).clamp(CELLS_PER_REQUEST, self.max_cost.max(CELLS_PER_REQUEST));
        self.cost.store(cost, Ordering::Relaxed);
    }

    /// This replica's share of the limit (1 unless a fleet divides it).
    pub fn share(&self) -> f64 {
        f64::from(CELLS_PER_REQUEST) / f64::from(self.cost.load(Ordering::Relaxed).max(1))
    }

    /// Requests checked since the limiter was built, admitted or refused.
    pub fn offered(&self) -> u64 {
        self.offered.load(Ordering::Relaxed)
    }

    /// One interval of the rate this replica enforces at `cost` cells per request.
    fn local_interval(&self, cost: u32) -> Duration {
        let interval = self.settings.rate.interval();
        if cost == CELLS_PER_REQUEST {
            interval
        } else {
            interval.mul_f64(f64::from(cost) / f64::from(CELLS_PER_REQUEST))
        }
    }

    /// The settings the limiter was built from.
    pub fn settings(&self) -> &RateSettings {
        &self.settings
    }

    /// The policy name used in the `RateLimit` header fields.
    pub fn policy(&self) -> &'static str {
        self.policy
    }

    /// This limiter's `RateLimit-Policy` item (`"route";q=80;w=1`).
    pub fn policy_field(&self) -> &http::HeaderValue {
        &self.policy_field
    }

    /// Requests admitted and refused over the last complete seconds.
    pub fn observed(&self) -> ObservedRate {
        let second = self.second(self.gcra.clock().now());
        let (admitted, window) = self.admitted.sum(second);
        let (refused, _) = self.refused.sum(second);
        ObservedRate {
            admitted,
            refused,
            window,
        }
    }

    fn second(&self, now: C::Instant) -> u64 {
        Duration::from(now.duration_since(self.start)).as_secs()
    }
}

const CELLS: NonZeroU32 = match NonZeroU32::new(CELLS_PER_REQUEST) {
    Some(cells) => cells,
    None => panic!("CELLS_PER_REQUEST is not zero"),
};

impl<C: Clock> fmt::Debug for RateLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("policy", &self.policy)
            .field("rate", &format_args!("{}", self.settings.rate))
            .field("burst", &self.settings.burst)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::num::NonZeroU32;

    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::config::Rate;

    /// A limiter on a fake clock, and the clock.
    pub(crate) fn limiter(
        policy: &'static str,
        rate: &str,
        burst: u32,
    ) -> (RateLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let settings = RateSettings {
            rate: Rate::parse(rate).expect("valid rate"),
            burst: NonZeroU32::new(burst).expect("nonzero burst"),
        };
        let clock = FakeRelativeClock::default();
        (
            RateLimiter::with_clock(policy, settings, clock.clone()),
            clock,
        )
    }

    #[test]
    fn a_burst_passes_at_once_then_refuses() {
        let (limiter, _clock) = limiter("client", "20/s", 5);
        for remaining in (0..5).rev() {
            assert_eq!(
                limiter.check(),
                Ok(Allowed {
                    remaining,
                    reset: Duration::from_millis(50),
                })
            );
        }
        // The sixth request would pass one interval after the burst began.
        assert_eq!(
            limiter.check().expect_err("refused").retry_after,
            Duration::from_millis(50)
        );
    }

    #[test]
    fn a_request_passes_after_retry_after_and_not_before() {
        let (limiter, clock) = limiter("client", "2/s", 2);
        assert!(limiter.check().is_ok());
        clock.advance(Duration::from_millis(100));
        assert!(limiter.check().is_ok());
        clock.advance(Duration::from_millis(100));
        let wait = limiter.check().expect_err("refused").retry_after;
        // The first request's interval (500 ms) ends 300 ms from now.
        assert_eq!(wait, Duration::from_millis(300));

        clock.advance(wait - Duration::from_nanos(1));
        let almost = limiter.check().expect_err("refused").retry_after;
        assert_eq!(almost, Duration::from_nanos(1));
        clock.advance(almost);
        assert_eq!(
            limiter.check(),
            Ok(Allowed {
                remaining: 0,
                reset: Duration::from_millis(500),
            })
        );
        assert!(limiter.check().is_err());
    }

    #[test]
    fn the_sustained_rate_is_the_configured_one() {
        let (limiter, clock) = limiter("client", "600/min", 10);
        // Drain the burst, then offer a request every 10 ms for one minute.
        while limiter.check().is_ok() {}
        let mut admitted = 0;
        for _ in 0..6000 {
            clock.advance(Duration::from_millis(10));
            if limiter.check().is_ok() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 600);
    }

    #[test]
    fn slow_rates_and_their_bounds() {
        let (limiter, clock) = limiter("client", "1/h", 1);
        let allowed = limiter.check().expect("first request");
        assert_eq!(allowed.remaining, 0);
        assert_eq!(allowed.reset, Duration::from_secs(3600));
        clock.advance(Duration::from_secs(1800));
        let wait = limiter.check().expect_err("refused");
        assert_eq!(wait.retry_after, Duration::from_secs(1800));
        assert_eq!(wait.retry_after_secs(), 1800);
        clock.advance(Duration::from_secs(1800));
        assert!(limiter.check().is_ok());
    }

    #[test]
    fn the_burst_refills_one_interval_at_a_time() {
        let (limiter, clock) = limiter("client", "10/s", 3);
        for _ in 0..3 {
            assert!(limiter.check().is_ok());
        }
        clock.advance(Duration::from_millis(250));
        // Two intervals (200 ms) have passed: two requests pass, the third waits 50 ms.
        assert_eq!(limiter.check().map(|a| a.remaining), Ok(1));
        assert_eq!(limiter.check().map(|a| a.remaining), Ok(0));
        assert_eq!(
            limiter.check().expect_err("refused").retry_after,
            Duration::from_millis(50)
        );
        // A long quiet period refills the burst, never more.
        clock.advance(Duration::from_secs(60));
        assert_eq!(limiter.check().map(|a| a.remaining), Ok(2));
    }

    #[test]
    fn retry_after_seconds_round_up() {
        let secs = |d: Duration| Refused { retry_after: d }.retry_after_secs();
        assert_eq!(secs(Duration::ZERO), 1);
        assert_eq!(secs(Duration::from_millis(1)), 1);
        assert_eq!(secs(Duration::from_secs(1)), 1);
        assert_eq!(secs(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn observed_rate_counts_the_last_complete_seconds() {
        let (limiter, clock) = limiter("client", "5/s", 5);
        assert_eq!(limiter.observed().window, Duration::ZERO);
        assert_eq!(limiter.observed().admitted_per_second(), 0.0);
        for _ in 0..20 {
            // Four requests every 100 ms: the burst of five at once, then one per 200 ms.
            for _ in 0..4 {
                let _ = limiter.check();
            }
            clock.advance(Duration::from_millis(100));
        }
        let observed = limiter.observed();
        assert_eq!(observed.window, Duration::from_secs(2));
        assert_eq!(observed.admitted + observed.refused, 80);
        assert_eq!(observed.admitted, 5 + 9);
        assert_eq!(observed.admitted_per_second(), 7.0);
        assert_eq!(observed.refused_per_second(), 33.0);
    }
}
