//! Per-client and per-route limits: request rates (`rate`, `burst`), concurrency
//! (`max_in_flight`) and pauses asked for by an upstream (`honor_upstream_retry_after`).
//!
//! Files: `rate` (GCRA from `governor`), `in_flight` (the concurrency cap), `throttle` (upstream
//! pauses), `recent` (per-second counts for the status page). Everything a request touches is an atomic; nothing here locks.

pub mod in_flight;
pub mod rate;
pub mod recent;
pub mod throttle;

pub use in_flight::{InFlight, InFlightGuard};
pub use rate::{Allowed, ObservedRate, RateLimiter, Refused};
pub use throttle::{Pause, Throttle};
