//! The limit keys: `rate`, `burst` and `max_in_flight` of `[[clients]]` and `[[routes]]`, a
//! route's `honor_upstream_retry_after`, and `[admin] ready_requires`, with their runtime types.
//!
//! The state these settings drive (rate limiters, in-flight counters, upstream pauses) lives in
//! [`crate::limits`]; the types here derive `PartialEq` so a reload can tell which limiters keep
//! their state.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;

use super::{key_join, Cx};

/// A sustained request rate, written `"20/s"`, `"600/min"` or `"10000/h"` in the file.
///
/// Units: `s` (also `sec`, `second`), `min` (also `m`, `minute`; `m` is minutes as in the
/// duration syntax `"5m"`), `h` (also `hr`, `hour`). The number is a whole number of at least 1;
/// at most 1000000 requests per second in any unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    count: NonZeroU32,
    unit: RateUnit,
}

/// The time unit of a [`Rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateUnit {
    /// Per second.
    Second,
    /// Per minute.
    Minute,
    /// Per hour.
    Hour,
}

impl RateUnit {
    /// The unit's length in seconds.
    pub fn seconds(self) -> u32 {
        match self {
            RateUnit::Second => 1,
            RateUnit::Minute => 60,
            RateUnit::Hour => 3600,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            RateUnit::Second => "s",
            RateUnit::Minute => "min",
            RateUnit::Hour => "h",
        }
    }
}

/// Faster than this per request is not a limit any upstream has; the bound also keeps the GCRA
/// arithmetic (nanoseconds in a `u64`) far from overflow.
const MIN_INTERVAL: Duration = Duration::from_micros(1);

/// The largest `burst`: with the slowest rate (1/h) the limiter's tolerance stays inside a
/// `u64` of nanoseconds.
pub const MAX_BURST: u32 = 1_000_000;

impl Rate {
    /// Parses `"20/s"`, `"600/min"`, `"10000/h"` (see the type's documentation for the units).
    pub fn parse(s: &str) -> Result<Rate, String> {
        let bad = |why: &str| {
            format!(
                "\"{s}\" is not a rate ({why}); write e.g. \"20/s\", \"600/min\" or \"10000/h\""
            )
        };
        let Some((count, unit)) = s.split_once('/') else {
            return Err(bad("expected a number of requests, '/', and a unit"));
        };
        let count = count.trim();
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the number of requests must be a whole number"));
        }
        let unit = match unit.trim() {
            "s" | "sec" | "second" => RateUnit::Second,
            "m" | "min" | "minute" => RateUnit::Minute,
            "h" | "hr" | "hour" => RateUnit::Hour,
            _ => return Err(bad("unknown unit; use s, min or h")),
        };
        let count: u32 = count.parse().map_err(|_| bad("the number is too large"))?;
        let Some(count) = NonZeroU32::new(count) else {
            return Err(format!(
                "\"{s}\" is zero; a rate must let at least one request through (remove the key \
                 for no limit)"
            ));
        };
        let rate = Rate { count, unit };
        if rate.interval() < MIN_INTERVAL {
            return Err(format!(
                "\"{s}\" is more than 1000000 requests per second, which limits nothing; remove \
                 the key for no limit"
            ));
        }
        Ok(rate)
    }

    /// The number of requests per [`Rate::unit`].
    pub fn count(self) -> NonZeroU32 {
        self.count
    }

    /// The time unit.
    pub fn unit(self) -> RateUnit {
        self.unit
    }

    /// The unit as a duration: the window `count` requests are spread over.
    pub fn window(self) -> Duration {
        Duration::from_secs(u64::from(self.unit.seconds()))
    }

    /// The time one request takes up: `window / count` (truncated to whole nanoseconds).
    pub fn interval(self) -> Duration {
        self.window() / self.count.get()
    }

    /// The default `burst`: one second's worth of the rate, rounded up, at least 1.
    pub fn default_burst(self) -> NonZeroU32 {
        let per_second = self.count.get().div_ceil(self.unit.seconds());
        NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN)
    }
}

impl fmt::Display for Rate {
    /// The canonical spelling: `20/s`, `600/min`, `10000/h`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.unit.suffix())
    }
}

/// A rate limit: the sustained `rate`, and how many requests may pass at once after a quiet
/// period (`burst`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSettings {
    /// The sustained rate.
    pub rate: Rate,
    /// Requests let through at once (default: [`Rate::default_burst`]; at most [`MAX_BURST`]).
    pub burst: NonZeroU32,
}

/// The limits of one `[[clients]]` entry. Absent keys mean no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientLimitSettings {
    /// `rate` and `burst`: this client's own request rate.
    pub rate: Option<RateSettings>,
    /// `max_in_flight`: this client's concurrent requests.
    pub max_in_flight: Option<NonZeroU32>,
}

/// The limits of one `[[routes]]` entry, shared by every client of the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLimitSettings {
    /// `rate` and `burst`: all clients together (typically the upstream tenant's quota).
    pub rate: Option<RateSettings>,
    /// `max_in_flight`: concurrent requests on the route, all clients together.
    pub max_in_flight: Option<NonZeroU32>,
    /// `honor_upstream_retry_after` (default true): an upstream 429/503 with `Retry-After` or
    /// `x-ratelimit-reset` pauses the route until then.
    pub honor_upstream_retry_after: bool,
}

impl Default for RouteLimitSettings {
    fn default() -> Self {
        RouteLimitSettings {
            rate: None,
            max_in_flight: None,
            honor_upstream_retry_after: true,
        }
    }
}

/// `[admin] ready_requires`: what `/readyz` waits for besides "not shutting down".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyRequires {
    /// `"first_tokens"` (the default): ready once every credential in use has held a valid token
    /// since start, or since the reload that added it. Losing a token later does not make the
    /// replica unready: every replica shares the token endpoint, so pulling them all would turn
    /// one credential's outage into an outage of every route.
    #[default]
    FirstTokens,
    /// `"all_tokens"`: the strict rule; every credential in use must hold a valid token now.
    AllTokens,
}

/// `rate` and `burst` of the item at `key` (`clients[1]`, `routes[0]`); `None` when there is no
/// rate or a problem was recorded.
pub(super) fn rate_settings(
    key: &str,
    rate: Option<&str>,
    burst: Option<i64>,
    cx: &mut Cx,
) -> Option<RateSettings> {
    let Some(text) = rate else {
        if burst.is_some() {
            cx.problem(
                key_join(key, "burst"),
                "is set but rate is not; a burst belongs to a rate: add e.g. rate = \"20/s\", or \
                 remove burst",
            );
        }
        return None;
    };
    let rate = Rate::parse(text)
        .map_err(|message| cx.problem(key_join(key, "rate"), message))
        .ok();
    let burst = match burst {
        None => rate.map(Rate::default_burst),
        Some(n) => count(
            cx,
            &key_join(key, "burst"),
            n,
            MAX_BURST,
            "requests let through at once; default: one second's worth of the rate",
        ),
    };
    Some(RateSettings {
        rate: rate?,
        burst: burst?,
    })
}

/// `max_in_flight` of the item at `key`; `None` when absent or bad (the problem is recorded).
pub(super) fn max_in_flight(key: &str, value: Option<i64>, cx: &mut Cx) -> Option<NonZeroU32> {
    count(
        cx,
        &key_join(key, "max_in_flight"),
        value?,
        u32::MAX,
        "concurrent requests; remove the key for no limit",
    )
}

/// A whole number in `1..=max`, or a problem at `key`.
fn count(cx: &mut Cx, key: &str, n: i64, max: u32, meaning: &str) -> Option<NonZeroU32> {
    match u32::try_from(n).ok().and_then(NonZeroU32::new) {
        Some(count) if count.get() <= max => Some(count),
        _ if n < 1 => {
            cx.problem(
                key,
                format!("{n} is not allowed; it must be at least 1 ({meaning})"),
            );
            None
        }
        _ => {
            cx.problem(
                key,
                format!("{n} is more than {max}, the most allowed ({meaning})"),
            );
            None
        }
    }
}
