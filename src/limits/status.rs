//! How the limits of a client or route show on `/status`: the configured limits, what is in
//! flight, the rate admitted and refused over the last seconds, and an upstream's pause.

use serde_json::{json, Value};

use super::{ClientLimits, InFlight, RateLimiter, RouteLimits};

impl ClientLimits {
    /// Its `/status` entry.
    pub fn describe(&self) -> Value {
        describe(self.rate(), self.in_flight())
    }
}

impl RouteLimits {
    /// Its `/status` entry, with the upstream's pause when one is in force.
    pub fn describe(&self) -> Value {
        let mut entry = describe(self.rate(), self.in_flight());
        entry["honor_upstream_retry_after"] = self.settings().honor_upstream_retry_after.into();
        entry["paused"] = match self.paused() {
            Some(pause) => json!({
                "status": pause.status.as_u16(),
                "remaining_seconds": pause.remaining.as_secs_f64(),
            }),
            None => Value::Null,
        };
        entry
    }
}

fn describe(rate: Option<&RateLimiter>, in_flight: &InFlight) -> Value {
    let observed = rate.map(RateLimiter::observed);
    json!({
        "rate": rate.map(|r| r.settings().rate.to_string()),
        "burst": rate.map(|r| r.settings().burst.get()),
        "max_in_flight": in_flight.limit().map(|l| l.get()),
        "in_flight": in_flight.current(),
        "admitted_per_second": observed.map(|o| o.admitted_per_second()),
        "refused_per_second": observed.map(|o| o.refused_per_second()),
        "refused_recently": observed.map(|o| o.refused),
        // In a fleet: the part of the rate this replica enforces (1 alone).
        "share": rate.map(|r| (r.share() * 1000.0).round() / 1000.0),
    })
}
