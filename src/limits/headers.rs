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

use http::{HeaderMap, HeaderName, HeaderValue};

use super::rate::{whole_seconds_up, Allowed, RateLimiter, Refused};

/// `RateLimit-Policy`.
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The rate-limit fields of one response, collected as the request passes its limiters (a
/// request passes at most two: its client's and its route's). Held inline and written without
/// `fmt`: the fields go on every admitted response of a rate-limited route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    items: [Option<Item>; 2],
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    /// The limiter's prebuilt `RateLimit-Policy` item.
    policy_field: HeaderValue,
    policy: &'static str,
    remaining: u32,
    reset_secs: u64,
}

/// The longest `RateLimit` value: two items of a policy name and two numbers each.
const MAX_VALUE: usize = 128;

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
        let (remaining, reset) = match verdict {
            Ok(allowed) => (allowed.remaining, allowed.reset),
            Err(refused) => (0, refused.retry_after),
        };
        let item = Item {
            policy_field: limiter.policy_field().clone(),
            policy: limiter.policy(),
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

    /// The `RateLimit-Policy` items, one per limiter (each its own field line: a Structured Field
    /// List split over several lines reads as one list).
    pub fn policy_values(&self) -> impl Iterator<Item = &HeaderValue> {
        self.items.iter().flatten().map(|item| &item.policy_field)
    }

    /// The `RateLimit` value; `None` when no rate limit applied.
    pub fn ratelimit_value(&self) -> Option<HeaderValue> {
        let mut buf = [0u8; MAX_VALUE];
        let mut len = 0;
        let mut push = |bytes: &[u8]| {
            let end = len + bytes.len();
            if let Some(slot) = buf.get_mut(len..end) {
                slot.copy_from_slice(bytes);
                len = end;
            }
        };
        let mut digits = itoa::Buffer::new();
        for (i, item) in self.items.iter().flatten().enumerate() {
            if i > 0 {
                push(b", ");
            }
            push(b"\"");
            push(item.policy.as_bytes());
            push(b"\";r=");
            push(digits.format(item.remaining).as_bytes());
            push(b";t=");
            push(digits.format(item.reset_secs).as_bytes());
        }
        if len == 0 {
            return None;
        }
        // Policy names are fixed ASCII and the rest are digits: always a valid value.
        HeaderValue::from_bytes(&buf[..len]).ok()
    }

    /// Appends the fields to `headers`. Appended, not replacing: an upstream's own fields stay
    /// (an intermediary must not make the advertised limits look more permissive).
    pub fn apply(&self, headers: &mut HeaderMap) {
        let Some(ratelimit) = self.ratelimit_value() else {
            return;
        };
        for policy in self.policy_values() {
            headers.append(RATELIMIT_POLICY, policy.clone());
        }
        headers.append(RATELIMIT, ratelimit);
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
            headers.policy_values().collect::<Vec<_>>(),
            [&HeaderValue::from_static("\"route\";q=1;w=60")]
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
        // One field line per policy: the same list as one line joined with ", ".
        assert_eq!(
            fields(&map, &RATELIMIT_POLICY),
            ["\"client\";q=600;w=60", "\"route\";q=10000;w=3600"]
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
