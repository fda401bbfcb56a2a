//! Upstream throttling of one route (`honor_upstream_retry_after`): after the upstream answers 429
//! or 503 with `Retry-After` or `x-ratelimit-reset`, the route is paused until then, so one tool
//! cannot get the whole tenant throttled for everyone. The check on a request's path is one
//! atomic load (and a clock read only while a pause is recorded).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, StatusCode};

/// The longest pause one upstream answer can cause. A `Retry-After` of days (a misconfigured
/// upstream, or a middlebox speaking for it) would otherwise take the route down for everyone
/// for days; past this bound the next request reaches the upstream, and a real throttle answers
/// it with a fresh `Retry-After`, so the bound costs at most one more upstream 429 per bound.
/// Five minutes matches the longest back-off of the token endpoint's retries in spirit: a few
/// minutes.
pub const MAX_PAUSE: Duration = Duration::from_secs(5 * 60);

/// An `x-ratelimit-reset` up to this many seconds is a delay, not a time: no current UNIX time is
/// this small, and some APIs send the seconds until the reset in that header.
const MAX_RESET_DELAY_SECS: u64 = 24 * 60 * 60;

/// An `x-ratelimit-reset` from this value up is a UNIX time in seconds (2001-09-09 onwards).
/// Values between the two bounds are neither, and are ignored.
const MIN_RESET_UNIX_SECS: u64 = 1_000_000_000;

const X_RATELIMIT_RESET: &str = "x-ratelimit-reset";

/// The pause of one route, if any.
///
/// The state is one `AtomicU64`: the end of the pause in nanoseconds since the throttle was
/// created, shifted left by one, with the low bit set when the upstream's status was 503. A later
/// end always wins ([`AtomicU64::fetch_max`]), so concurrent answers never shorten a pause.
#[derive(Debug)]
pub struct Throttle {
    epoch: Instant,
    until: AtomicU64,
}

/// A route paused by its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    /// The time left.
    pub remaining: Duration,
    /// The upstream's status, which the route answers with meanwhile: 429 or 503.
    pub status: StatusCode,
}

impl Pause {
    /// `remaining` in whole seconds for `Retry-After`: rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        super::rate::whole_seconds_up(self.remaining)
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

impl Throttle {
    /// A route that is not paused.
    pub fn new() -> Self {
        Throttle {
            epoch: Instant::now(),
            until: AtomicU64::new(0),
        }
    }

    /// Pauses the route until `until` (unless it is paused longer already). `status` is what the
    /// route answers meanwhile: 503 stays 503, anything else is recorded as 429.
    pub fn pause_until(&self, until: Instant, status: StatusCode) {
        let nanos = self.nanos_since_epoch(until);
        if nanos == 0 {
            return;
        }
        let unavailable = u64::from(status == StatusCode::SERVICE_UNAVAILABLE);
        self.until
            .fetch_max((nanos << 1) | unavailable, Ordering::Relaxed);
    }

    /// The pause in force now, if any.
    pub fn paused(&self) -> Option<Pause> {
        if self.until.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.paused_at(Instant::now())
    }

    /// The pause in force at `now`, if any.
    pub fn paused_at(&self, now: Instant) -> Option<Pause> {
        let value = self.until.load(Ordering::Relaxed);
        let until = value >> 1;
        let now = self.nanos_since_epoch(now);
        if until <= now {
            return None;
        }
        let status = if value & 1 == 1 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        Some(Pause {
            remaining: Duration::from_nanos(until - now),
            status,
        })
    }

    /// Reads an upstream answer: a 429 or 503 that says how long to wait pauses the route for
    /// that long (see [`upstream_wait`]). Returns the pause it started, if any.
    pub fn observe(&self, status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
        self.observe_at(status, headers, Instant::now(), SystemTime::now())
    }

    /// [`Throttle::observe`] at a given monotonic `now` and wall-clock `wall_now`.
    pub fn observe_at(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        now: Instant,
        wall_now: SystemTime,
    ) -> Option<Duration> {
        if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
            return None;
        }
        let wait = upstream_wait(headers, wall_now)?;
        self.pause_until(now + wait, status);
        Some(wait)
    }

    fn nanos_since_epoch(&self, at: Instant) -> u64 {
        // 2^63 nanoseconds are 292 years: the shift in `pause_until` loses nothing real.
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos)
            .unwrap_or(u64::MAX >> 1)
            .min(u64::MAX >> 1)
    }
}

/// How long an upstream asks its clients to wait, from `Retry-After` (delay-seconds or an
/// HTTP-date, RFC 9110 section 10.2.3) and `x-ratelimit-reset` (a UNIX time in seconds, as
/// Sitecore's Auth0-based services send it; a value up to one day is taken as a delay in seconds,
/// as some other APIs send it). When both are present the longer wait wins, like the token
/// endpoint's back-off.
///
/// Bounded: a time in the past, a zero, negative, fractional or unreadable value asks for no
/// wait (`None`), so the route keeps forwarding and the upstream keeps answering for itself; the
/// proxy never invents a pause the upstream did not ask for. A wait longer than [`MAX_PAUSE`] is
/// clamped to it.
pub fn upstream_wait(headers: &HeaderMap, wall_now: SystemTime) -> Option<Duration> {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let retry_after =
        header(http::header::RETRY_AFTER.as_str()).and_then(|v| parse_retry_after(v, wall_now));
    let reset = header(X_RATELIMIT_RESET).and_then(|v| parse_reset(v, wall_now));
    let wait = match (retry_after, reset) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => a.or(b)?,
    };
    (!wait.is_zero()).then(|| wait.min(MAX_PAUSE))
}

fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    if let Some(seconds) = whole_number(value) {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn parse_reset(value: &str, now: SystemTime) -> Option<Duration> {
    let n = whole_number(value)?;
    if n <= MAX_RESET_DELAY_SECS {
        return Some(Duration::from_secs(n));
    }
    if n < MIN_RESET_UNIX_SECS {
        return None;
    }
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    Some(Duration::from_secs(n).saturating_sub(now))
}

/// Digits only (no sign, no fraction); a number too long for a `u64` saturates, since it can
/// only mean "very long" and is clamped anyway.
fn whole_number(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(value.parse().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-05-06T07:08:09Z, a Monday.
    const NOW_UNIX: u64 = 1_714_979_289;

    fn wall_now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW_UNIX)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                value.parse().expect("header value"),
            );
        }
        map
    }

    fn wait(pairs: &[(&str, &str)]) -> Option<Duration> {
        upstream_wait(&headers(pairs), wall_now())
    }

    fn secs(n: u64) -> Option<Duration> {
        Some(Duration::from_secs(n))
    }

    #[test]
    fn retry_after_as_delay_seconds() {
        assert_eq!(wait(&[("retry-after", "30")]), secs(30));
        assert_eq!(wait(&[("retry-after", " 7 ")]), secs(7));
        assert_eq!(wait(&[("retry-after", "0")]), None);
        assert_eq!(wait(&[]), None);
    }

    #[test]
    fn retry_after_as_an_http_date() {
        // IMF-fixdate, and the two obsolete forms RFC 9110 still requires recipients to read.
        for date in [
            "Mon, 06 May 2024 07:08:39 GMT",
            "Monday, 06-May-24 07:08:39 GMT",
            "Mon May  6 07:08:39 2024",
        ] {
            assert_eq!(wait(&[("retry-after", date)]), secs(30), "{date}");
        }
        assert_eq!(
            wait(&[("retry-after", "Mon, 06 May 2024 07:00:00 GMT")]),
            None,
            "a past date asks for no wait"
        );
    }

    #[test]
    fn x_ratelimit_reset_as_a_unix_time_or_a_short_delay() {
        let in_45s = (NOW_UNIX + 45).to_string();
        assert_eq!(wait(&[("x-ratelimit-reset", &in_45s)]), secs(45));
        assert_eq!(wait(&[("x-ratelimit-reset", "20")]), secs(20));
        assert_eq!(wait(&[("x-ratelimit-reset", "86400")]), Some(MAX_PAUSE));
        let past = (NOW_UNIX - 10).to_string();
        assert_eq!(wait(&[("x-ratelimit-reset", &past)]), None);
        // Neither a plausible delay nor a plausible time.
        assert_eq!(wait(&[("x-ratelimit-reset", "86401")]), None);
        assert_eq!(wait(&[("x-ratelimit-reset", "999999999")]), None);
    }

    #[test]
    fn the_longer_of_both_headers_wins() {
        let in_60s = (NOW_UNIX + 60).to_string();
        assert_eq!(
            wait(&[("retry-after", "10"), ("x-ratelimit-reset", &in_60s)]),
            secs(60)
        );
        assert_eq!(
            wait(&[("retry-after", "90"), ("x-ratelimit-reset", &in_60s)]),
            secs(90)
        );
        // A garbage header does not hide a good one.
        assert_eq!(
            wait(&[("retry-after", "soon"), ("x-ratelimit-reset", &in_60s)]),
            secs(60)
        );
    }

    #[test]
    fn negative_fractional_and_garbage_values_ask_for_no_wait() {
        for value in [
            "-5",
            "1.5",
            "",
            "soon",
            "30s",
            "+30",
            "0x10",
            "Mon, 99 Foo 2024",
        ] {
            assert_eq!(
                wait(&[("retry-after", value)]),
                None,
                "retry-after {value:?}"
            );
            assert_eq!(
                wait(&[("x-ratelimit-reset", value)]),
                None,
                "x-ratelimit-reset {value:?}"
            );
        }
    }

    #[test]
    fn days_ahead_are_clamped() {
        assert_eq!(wait(&[("retry-after", "259200")]), Some(MAX_PAUSE));
        assert_eq!(
            wait(&[("retry-after", "99999999999999999999999")]),
            Some(MAX_PAUSE)
        );
        assert_eq!(
            wait(&[("retry-after", "Thu, 09 May 2024 07:08:09 GMT")]),
            Some(MAX_PAUSE)
        );
        let in_a_week = (NOW_UNIX + 7 * 86_400).to_string();
        assert_eq!(wait(&[("x-ratelimit-reset", &in_a_week)]), Some(MAX_PAUSE));
    }

    #[test]
    fn a_throttled_answer_pauses_the_route_until_then() {
        let throttle = Throttle::new();
        let now = Instant::now();
        assert_eq!(throttle.paused_at(now), None);
        let answer = headers(&[("retry-after", "30")]);
        assert_eq!(
            throttle.observe_at(StatusCode::TOO_MANY_REQUESTS, &answer, now, wall_now()),
            secs(30)
        );
        assert_eq!(
            throttle.paused_at(now + Duration::from_secs(10)),
            Some(Pause {
                remaining: Duration::from_secs(20),
                status: StatusCode::TOO_MANY_REQUESTS,
            })
        );
        assert_eq!(throttle.paused_at(now + Duration::from_secs(30)), None);
        assert!(throttle.paused().is_some(), "the real clock is within 30 s");
    }

    #[test]
    fn a_503_pauses_with_503_and_other_statuses_do_not_pause() {
        let throttle = Throttle::new();
        let now = Instant::now();
        let answer = headers(&[("retry-after", "5")]);
        for status in [
            StatusCode::OK,
            StatusCode::BAD_GATEWAY,
            StatusCode::UNAUTHORIZED,
        ] {
            assert_eq!(throttle.observe_at(status, &answer, now, wall_now()), None);
        }
        assert_eq!(throttle.paused_at(now), None);
        throttle.observe_at(StatusCode::SERVICE_UNAVAILABLE, &answer, now, wall_now());
        let pause = throttle.paused_at(now).expect("paused");
        assert_eq!(pause.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(pause.retry_after_secs(), 5);
    }

    #[test]
    fn a_shorter_pause_never_cuts_a_longer_one() {
        let throttle = Throttle::new();
        let now = Instant::now();
        throttle.pause_until(now + Duration::from_secs(60), StatusCode::TOO_MANY_REQUESTS);
        throttle.pause_until(
            now + Duration::from_secs(5),
            StatusCode::SERVICE_UNAVAILABLE,
        );
        let pause = throttle.paused_at(now).expect("paused");
        assert_eq!(pause.remaining, Duration::from_secs(60));
        assert_eq!(pause.status, StatusCode::TOO_MANY_REQUESTS);
        // A pause that ended before the throttle existed is no pause.
        let fresh = Throttle::new();
        fresh.pause_until(now, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(fresh.paused(), None);
    }

    #[test]
    fn an_answer_without_a_wait_does_not_pause() {
        let throttle = Throttle::new();
        let now = Instant::now();
        for answer in [headers(&[]), headers(&[("retry-after", "-1")])] {
            assert_eq!(
                throttle.observe_at(StatusCode::TOO_MANY_REQUESTS, &answer, now, wall_now()),
                None
            );
        }
        assert_eq!(throttle.paused_at(now), None);
    }
}
