//! Per-client and per-route limits: request rates (`rate`, `burst`) and concurrency
//! (`max_in_flight`).
//!
//! Files: `rate` (GCRA from `governor`), `in_flight` (the concurrency cap), `recent` (per-second
//! counts for the status page). Everything a request touches is an atomic; nothing here locks.

pub mod in_flight;
pub mod rate;
pub mod recent;

pub use in_flight::{InFlight, InFlightGuard};
pub use rate::{Allowed, ObservedRate, RateLimiter, Refused};
