//! The `RateLimit-Policy` and `RateLimit` response fields of
//! [draft-ietf-httpapi-ratelimit-headers-11](https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/)
//! (May 2026; the syntax is unchanged since -09): Structured Field Lists of items named by a
//! String, one per rate limit the request passed through.
//!
//! ```text
//! RateLimit-Policy: "client";q=20;w=1, "route";q=80;w=1
//! RateLimit: "client";r=19;t=1, "route";r=0;t=1
//! ```
//!
//! - `q`/`w`: the configured rate as written, `q` requests per `w` seconds (`"600/min"` is
//!   `q=600;w=60`); the burst is not part of the policy, it shows in `r`.
//! - `r`: the requests that would pass now (the remaining burst); 0 when the limiter refused.
//! - `t`: whole seconds, rounded up, within which the client should use no more than `r`: the
//!   exact wait when refused (equal to `Retry-After`), otherwise one interval of the rate, an upper
//!   bound on the time until `r` grows (see [`super::rate::Allowed::reset`]).
//!
//! The policies are named `"client"` (the client's own `rate`) and `"route"` (the route's shared
//! `rate`).

use std::io::Write;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::rate::{whole_seconds_up, Allowed, RateLimiter, Refused};

/// `RateLimit-Policy`.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The rate-limit fields of one response, collected as the request passes its limiters (a
/// request passes at most two: its client's and its route's). Held inline: the fields are built
/// for every admitted response of a rate-limited route, so they cost no allocation but the two
/// header values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    items: [Option<Item>; 2],
}

/// The longest field value: two items of a policy name and three numbers each.
const MAX_VALUE: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    policy: &'static str,
    quota: u32,
    window_secs: u32,
    remaining: u32,
    reset_secs: u64,
}

impl RateLimitHeaders {
    /// No limits yet.
    pub fn new() -> Self {
        RateLimitHeaders::default()
    }

    /// Adds one limiter's verdict on this request.
    pub fn record<C: governor::clock::Clock>(
        &mut self,
        limiter: &RateLimiter<C>,
        verdict: &Result<Allowed, Refused>,
    ) {
        let rate = limiter.settings().rate;
        let (remaining, reset) = match verdict {
            Ok(allowed) => (allowed.remaining, allowed.reset),
            Err(refused) => (0, refused.retry_after),
        };
        let item = Item {
            policy: limiter.policy(),
            quota: rate.count().get(),
            window_secs: rate.unit().seconds(),
            remaining,
            reset_secs: whole_seconds_up(reset),
        };
        if let Some(slot) = self.items.iter_mut().find(|slot| slot.is_none()) {
            *slot = Some(item);
        }
    }

    /// True when no rate limit applied to the request.
    pub fn is_empty(&self) -> bool {
        self.items[0].is_none()
    }

    /// The `RateLimit-Policy` value; `None` when no rate limit applied.
    pub fn policy_value(&self) -> Option<HeaderValue> {
        self.value(|out, item| {
            write!(
                out,
                "\"{}\";q={};w={}",
                item.policy, item.quota, item.window_secs
            )
        })
    }

    /// The `RateLimit` value; `None` when no rate limit applied.
    pub fn ratelimit_value(&self) -> Option<HeaderValue> {
        self.value(|out, item| {
            write!(
                out,
                "\"{}\";r={};t={}",
                item.policy, item.remaining, item.reset_secs
            )
        })
    }

    /// Appends both fields to `headers`. Appended, not replacing: an upstream's own fields stay
    /// (an intermediary must not make the advertised limits look more permissive), and Structured
    /// Field Lists split over several field lines read as one list.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if let (Some(policy), Some(ratelimit)) = (self.policy_value(), self.ratelimit_value()) {
            headers.append(RATELIMIT_POLICY, policy);
            headers.append(RATELIMIT, ratelimit);
        }
    }

    /// The items joined as one list, written on the stack and copied once into the value.
    fn value(
        &self,
        item: impl Fn(&mut std::io::Cursor<&mut [u8]>, &Item) -> std::io::Result<()>,
    ) -> Option<HeaderValue> {
        let mut buf = [0u8; MAX_VALUE];
        let mut out = std::io::Cursor::new(&mut buf[..]);
        for (i, it) in self.items.iter().flatten().enumerate() {
            if i > 0 {
                out.write_all(b", ").ok()?;
            }
            item(&mut out, it).ok()?;
        }
        let len = usize::try_from(out.position()).ok()?;
        if len == 0 {
            return None;
        }
        // Policy names are fixed ASCII and the rest are digits: always a valid value.
        HeaderValue::from_bytes(&buf[..len]).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::rate::tests::limiter;

    fn fields(headers: &HeaderMap, name: &HeaderName) -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().expect("ASCII").to_owned())
            .collect()
    }

    #[test]
    fn an_allowed_request_reports_the_remaining_burst() {
        let (client, _) = limiter("client", "20/s", 20);
        let mut headers = RateLimitHeaders::new();
        headers.record(&client, &client.check());
        let mut map = HeaderMap::new();
        headers.apply(&mut map);
        assert_eq!(fields(&map, &RATELIMIT_POLICY), ["\"client\";q=20;w=1"]);
        assert_eq!(fields(&map, &RATELIMIT), ["\"client\";r=19;t=1"]);
    }

    #[test]
    fn a_refused_request_reports_zero_and_the_retry_after() {
        let (route, _) = limiter("route", "1/min", 1);
        assert!(route.check().is_ok());
        let verdict = route.check();
        let retry_after = verdict.as_ref().map_err(Refused::retry_after_secs);
        assert_eq!(retry_after, Err(60));
        let mut headers = RateLimitHeaders::new();
        headers.record(&route, &verdict);
        assert_eq!(
            headers.policy_value(),
            Some(HeaderValue::from_static("\"route\";q=1;w=60"))
        );
        assert_eq!(
            headers.ratelimit_value(),
            Some(HeaderValue::from_static("\"route\";r=0;t=60"))
        );
    }

    #[test]
    fn both_policies_form_one_list_after_the_upstreams_own() {
        let (client, _) = limiter("client", "600/min", 3);
        let (route, _) = limiter("route", "10000/h", 50);
        let mut headers = RateLimitHeaders::new();
        headers.record(&client, &client.check());
        headers.record(&route, &route.check());
        let mut map = HeaderMap::new();
        map.insert(RATELIMIT, HeaderValue::from_static("\"upstream\";r=7;t=30"));
        headers.apply(&mut map);
        assert_eq!(
            fields(&map, &RATELIMIT_POLICY),
            ["\"client\";q=600;w=60, \"route\";q=10000;w=3600"]
        );
        assert_eq!(
            fields(&map, &RATELIMIT),
            [
                "\"upstream\";r=7;t=30",
                "\"client\";r=2;t=1, \"route\";r=49;t=1"
            ]
        );
    }

    #[test]
    fn no_rate_limit_means_no_fields() {
        let headers = RateLimitHeaders::new();
        assert!(headers.is_empty());
        let mut map = HeaderMap::new();
        headers.apply(&mut map);
        assert!(map.is_empty());
    }

    #[test]
    fn t_is_whole_seconds_rounded_up() {
        let (slow, _) = limiter("client", "7/min", 7);
        let mut headers = RateLimitHeaders::new();
        headers.record(&slow, &slow.check());
        // One interval is 8.57 s.
        assert_eq!(
            headers.ratelimit_value(),
            Some(HeaderValue::from_static("\"client\";r=6;t=9"))
        );
    }
}
