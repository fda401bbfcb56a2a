//! A rate limiter for one key (a client, or a route for all its clients together): a GCRA
//! (`gcra.rs`) that keeps one atomic word of state and decides without a lock, plus the numbers
//! the `RateLimit` header fields and the status page need.
//!
//! In a fleet (`[cluster]`) each replica enforces its share of the limit: `interval / share` per
//! request and `burst × share` at once, changed every `sync_interval` without forgetting what was
//! spent.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock, Reference};

use super::gcra::{nanos, Gcra, Verdict};
use super::recent::RecentCounts;
use crate::config::RateSettings;

/// A GCRA limiter: `settings.rate` sustained, up to `settings.burst` at once.
///
/// Generic over the clock so tests can drive it with `governor::clock::FakeRelativeClock`; the
/// proxy uses the monotonic clock.
pub struct RateLimiter<C: Clock = MonotonicClock> {
    settings: RateSettings,
    policy: &'static str,
    /// This limiter's `RateLimit-Policy` item, built once: it says only what the settings say.
    policy_field: http::HeaderValue,
    gcra: Gcra,
    /// This replica's share of the limit, as `f64` bits (1 alone).
    share: AtomicU64,
    /// Requests checked, admitted or not: the fleet divides the limit by this demand.
    offered: AtomicU64,
    clock: C,
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
            gcra: Gcra::new(settings.rate.interval(), settings.burst.get()),
            share: AtomicU64::new(1f64.to_bits()),
            offered: AtomicU64::new(0),
            clock,
            start,
            admitted: RecentCounts::default(),
            refused: RecentCounts::default(),
        }
    }

    /// Takes one request from the limiter, or says how long until one would pass.
    pub fn check(&self) -> Result<Allowed, Refused> {
        self.offered.fetch_add(1, Ordering::Relaxed);
        let elapsed = Duration::from(self.clock.now().duration_since(self.start));
        let second = elapsed.as_secs();
        match self.gcra.check(nanos(elapsed)) {
            Verdict::Allowed { remaining } => {
                self.admitted.add(second);
                Ok(Allowed {
                    remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                    reset: self.gcra.interval(),
                })
            }
            Verdict::Refused { wait } => {
                self.refused.add(second);
                Err(Refused { retry_after: wait })
            }
        }
    }

    /// Sets this replica's share of the limit (0 < share ≤ 1; 1 alone): it enforces
    /// `interval / share` per request and `burst × share` at once (one request at a time when
    /// that is less than one).
    pub fn set_share(&self, share: f64) {
        let share = if share.is_finite() {
            share.clamp(1e-6, 1.0)
        } else {
            1.0
        };
        if self.share.swap(share.to_bits(), Ordering::Relaxed) == share.to_bits() {
            return;
        }
        let interval = self.settings.rate.interval().div_f64(share);
        self.gcra
            .set(interval, f64::from(self.settings.burst.get()) * share);
    }

    /// This replica's share of the limit (1 unless a fleet divides it).
    pub fn share(&self) -> f64 {
        f64::from_bits(self.share.load(Ordering::Relaxed))
    }

    /// Requests checked since the limiter was built, admitted or refused.
    pub fn offered(&self) -> u64 {
        self.offered.load(Ordering::Relaxed)
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
        let second = self.second(self.clock.now());
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
