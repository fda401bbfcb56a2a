//! Per-client and per-route limits: request rates (`rate`, `burst`), concurrency
//! (`max_in_flight`) and pauses asked for by an upstream (`honor_upstream_retry_after`).
//!
//! [`Limits`] is built from a [`Config`] once per load and rebuilt on every reload, keeping the
//! state of every limiter whose settings did not change: the old and the new registry then share
//! the same limiter through an `Arc`, so a reload neither forgives a client's spent burst nor
//! forgets an upstream's pause. The pipeline looks up the [`ClientLimits`] and [`RouteLimits`]
//! once per load and keeps the `Arc`s next to the client identity and the route, so a request
//! pays no lookup; [`admit`] then checks them all in one place, in an order that spends nothing
//! it cannot give back.
//!
//! Files: `rate` (a limiter on the GCRA of `gcra`), `in_flight` (the concurrency cap), `throttle` (upstream
//! pauses), `headers` (the IETF `RateLimit` fields), `recent` (per-second counts for the status
//! page). Everything a request touches is an atomic; nothing here locks.

mod gcra;
pub mod headers;
pub mod in_flight;
pub mod rate;
pub mod recent;
mod status;
pub mod throttle;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode, Uri};

pub use headers::RateLimitHeaders;
pub use in_flight::{InFlight, InFlightGuard};
pub use rate::{Allowed, ObservedRate, RateLimiter, Refused};
pub use throttle::{Pause, Throttle};

use crate::config::{ClientLimitSettings, Config, RateSettings, RouteLimitSettings};

/// The policy name of a client's own rate in the `RateLimit` fields.
pub const CLIENT_POLICY: &str = "client";
/// The policy name of a route's shared rate in the `RateLimit` fields.
pub const ROUTE_POLICY: &str = "route";

/// The limit state of every client (by name) and route (by prefix) of one configuration.
#[derive(Debug, Default)]
pub struct Limits {
    clients: BTreeMap<String, Arc<ClientLimits>>,
    routes: BTreeMap<String, Arc<RouteLimits>>,
}

/// One client's limits.
#[derive(Debug)]
pub struct ClientLimits {
    settings: ClientLimitSettings,
    rate: Option<Arc<RateLimiter>>,
    in_flight: InFlight,
}

/// One route's limits, shared by all its clients.
#[derive(Debug)]
pub struct RouteLimits {
    settings: RouteLimitSettings,
    upstream: Uri,
    rate: Option<Arc<RateLimiter>>,
    in_flight: InFlight,
    throttle: Option<Arc<Throttle>>,
}

impl Limits {
    /// The limits of `config`. With `previous` (the registry of the configuration being
    /// replaced), a client or route keeps:
    /// - its rate limiter when its `rate` and `burst` are unchanged (otherwise the new limiter
    ///   starts with a full burst);
    /// - its in-flight count always (only the limit follows the new `max_in_flight`), since the
    ///   requests in flight are real whatever the limit;
    /// - a route its upstream pause while `honor_upstream_retry_after` stays on and the
    ///   `upstream` is the same (a pause is that upstream's word).
    ///
    /// Clients are matched by name and routes by prefix; other changes (a client's key or
    /// routes, a route's credential or timeout) keep the state.
    pub fn build(config: &Config, previous: Option<&Limits>) -> Limits {
        let clients = config
            .clients
            .iter()
            .map(|client| {
                let old = previous.and_then(|p| p.clients.get(&client.name));
                let limits = ClientLimits {
                    settings: client.limits,
                    rate: rate_limiter(
                        CLIENT_POLICY,
                        client.limits.rate,
                        old.and_then(|o| o.rate.as_ref()),
                    ),
                    in_flight: in_flight(client.limits.max_in_flight, old.map(|o| &o.in_flight)),
                };
                (client.name.clone(), Arc::new(limits))
            })
            .collect();
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let old = previous.and_then(|p| p.routes.get(&route.prefix));
                let throttle = route.limits.honor_upstream_retry_after.then(|| {
                    old.filter(|o| o.upstream == route.upstream)
                        .and_then(|o| o.throttle.clone())
                        .unwrap_or_default()
                });
                let limits = RouteLimits {
                    settings: route.limits,
                    upstream: route.upstream.clone(),
                    rate: rate_limiter(
                        ROUTE_POLICY,
                        route.limits.rate,
                        old.and_then(|o| o.rate.as_ref()),
                    ),
                    in_flight: in_flight(route.limits.max_in_flight, old.map(|o| &o.in_flight)),
                    throttle,
                };
                (route.prefix.clone(), Arc::new(limits))
            })
            .collect();
        Limits { clients, routes }
    }

    /// The limits of the client named `name`.
    pub fn client(&self, name: &str) -> Option<&Arc<ClientLimits>> {
        self.clients.get(name)
    }

    /// The limits of the route with `prefix`.
    pub fn route(&self, prefix: &str) -> Option<&Arc<RouteLimits>> {
        self.routes.get(prefix)
    }

    /// Every client's limits, by name (for the status page).
    pub fn clients(&self) -> impl Iterator<Item = (&str, &Arc<ClientLimits>)> {
        self.clients.iter().map(|(name, l)| (name.as_str(), l))
    }

    /// Every route's limits, by prefix (for the status page).
    pub fn routes(&self) -> impl Iterator<Item = (&str, &Arc<RouteLimits>)> {
        self.routes.iter().map(|(prefix, l)| (prefix.as_str(), l))
    }

    /// Every rate limiter, by an id that names its client or route (`client:NAME`,
    /// `route:PREFIX`): what a fleet divides between its replicas.
    pub fn rate_limiters(&self) -> Vec<(String, Arc<RateLimiter>)> {
        let clients = self.clients.iter().filter_map(|(name, l)| {
            l.rate
                .as_ref()
                .map(|r| (format!("client:{name}"), Arc::clone(r)))
        });
        let routes = self.routes.iter().filter_map(|(prefix, l)| {
            l.rate
                .as_ref()
                .map(|r| (format!("route:{prefix}"), Arc::clone(r)))
        });
        clients.chain(routes).collect()
    }
}

fn rate_limiter(
    policy: &'static str,
    settings: Option<RateSettings>,
    previous: Option<&Arc<RateLimiter>>,
) -> Option<Arc<RateLimiter>> {
    let settings = settings?;
    Some(match previous {
        Some(limiter) if *limiter.settings() == settings => limiter.clone(),
        _ => Arc::new(RateLimiter::new(policy, settings)),
    })
}

fn in_flight(limit: Option<NonZeroU32>, previous: Option<&InFlight>) -> InFlight {
    match previous {
        Some(counter) => counter.with_limit(limit),
        None => InFlight::new(limit),
    }
}

impl ClientLimits {
    /// The settings these limits were built from.
    pub fn settings(&self) -> &ClientLimitSettings {
        &self.settings
    }

    /// The client's rate limiter; `None` without `rate`.
    pub fn rate(&self) -> Option<&RateLimiter> {
        self.rate.as_deref()
    }

    /// The client's requests in flight, and `max_in_flight`.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }
}

impl RouteLimits {
    /// The settings these limits were built from.
    pub fn settings(&self) -> &RouteLimitSettings {
        &self.settings
    }

    /// The route's shared rate limiter; `None` without `rate`.
    pub fn rate(&self) -> Option<&RateLimiter> {
        self.rate.as_deref()
    }

    /// The route's requests in flight, and `max_in_flight`.
    pub fn in_flight(&self) -> &InFlight {
        &self.in_flight
    }

    /// The upstream pause state; `None` with `honor_upstream_retry_after = false`.
    pub fn throttle(&self) -> Option<&Throttle> {
        self.throttle.as_deref()
    }

    /// The pause the upstream asked for, if one is in force.
    pub fn paused(&self) -> Option<Pause> {
        self.throttle.as_ref()?.paused()
    }

    /// Reads the upstream's answer to a forwarded request: a 429 or 503 with `Retry-After` or
    /// `x-ratelimit-reset` pauses the route (see [`throttle::upstream_wait`]). Does nothing with
    /// `honor_upstream_retry_after = false`. Returns the pause started, if any.
    pub fn observe_upstream(&self, status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
        self.throttle.as_ref()?.observe(status, headers)
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The client's own limit.
    Client,
    /// The route's limit, shared by all its clients.
    Route,
}

/// A request that passed every limit.
#[derive(Debug)]
pub struct Admission {
    /// The `RateLimit-Policy` / `RateLimit` fields for the response.
    pub headers: RateLimitHeaders,
    /// The in-flight slots; keep them until the response body ends.
    pub slots: Slots,
}

/// The client's and the route's in-flight slots of one request; dropping frees both.
/// `Send + 'static`, so it can live inside the response body.
#[derive(Debug)]
#[must_use = "the slots are freed as soon as this is dropped"]
pub struct Slots {
    _client: Option<InFlightGuard>,
    _route: InFlightGuard,
}

/// Why a request was refused before reaching the upstream.
#[derive(Debug)]
pub enum Refusal {
    /// The route's upstream asked for a pause: answer `pause.status` (`upstream_throttled`) with
    /// `Retry-After`.
    UpstreamThrottled(Pause),
    /// Over a `rate`: answer 429 `rate_limited` with `Retry-After` and the `RateLimit` fields.
    RateLimited {
        /// Whose rate.
        scope: Scope,
        /// How long until a request would pass.
        refused: Refused,
        /// The fields for the 429 (the client's verdict too when the route refused); boxed, as
        /// refusals are the rare path.
        headers: Box<RateLimitHeaders>,
    },
    /// Over a `max_in_flight`: answer 429 `too_many_in_flight`.
    TooManyInFlight(Scope),
}

impl Refusal {
    /// The `reason` label of `proxy_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::UpstreamThrottled(_) => "upstream_throttled",
            Refusal::RateLimited {
                scope: Scope::Client,
                ..
            } => "client_rate",
            Refusal::RateLimited {
                scope: Scope::Route,
                ..
            } => "route_rate",
            Refusal::TooManyInFlight(Scope::Client) => "client_in_flight",
            Refusal::TooManyInFlight(Scope::Route) => "route_in_flight",
        }
    }
}

/// Checks one request of `client` (`None` when no `[[clients]]` are configured) on `route`.
///
/// The order spends nothing that cannot be given back: the upstream pause first (it only reads);
/// then the in-flight slots, client before route (a slot taken before a later refusal is freed
/// when it is dropped here); then the rates, client before route, so a client over its own rate
/// never spends the route's shared budget (the tenant's quota). A GCRA cell cannot be returned,
/// so when the route's rate refuses, the client's rate has counted the request; that is the
/// cheaper error, since the client did send it.
pub fn admit(route: &RouteLimits, client: Option<&ClientLimits>) -> Result<Admission, Refusal> {
    if let Some(pause) = route.paused() {
        return Err(Refusal::UpstreamThrottled(pause));
    }
    let client_slot = match client {
        Some(client) => Some(
            client
                .in_flight
                .try_acquire()
                .ok_or(Refusal::TooManyInFlight(Scope::Client))?,
        ),
        None => None,
    };
    let route_slot = route
        .in_flight
        .try_acquire()
        .ok_or(Refusal::TooManyInFlight(Scope::Route))?;

    let mut headers = RateLimitHeaders::new();
    let limiters = [
        (Scope::Client, client.and_then(ClientLimits::rate)),
        (Scope::Route, route.rate()),
    ];
    for (scope, limiter) in limiters {
        let Some(limiter) = limiter else { continue };
        let verdict = limiter.check();
        headers.record(limiter, &verdict);
        if let Err(refused) = verdict {
            return Err(Refusal::RateLimited {
                scope,
                refused,
                headers: Box::new(headers),
            });
        }
    }
    Ok(Admission {
        headers,
        slots: Slots {
            _client: client_slot,
            _route: route_slot,
        },
    })
}

#[cfg(test)]
mod tests;
