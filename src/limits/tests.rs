//! Tests of the registry: what a rebuild keeps and resets, and the order of [`admit`].
//! Rates are slow (per hour) so that the real clock cannot refill a limiter during a test.

use std::path::Path;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};

use super::*;

const CREDENTIAL: &str = r#"
[credentials.automation]
client_id = "id"
client_secret = "secret"
"#;

/// A config with one route (`/edge` to `upstream`, with `route_extra` keys) and one client
/// (`ci`, with `client_extra` keys).
fn config(route_extra: &str, client_extra: &str, upstream: &str) -> Config {
    let text = format!(
        "{CREDENTIAL}
[[routes]]
prefix = \"/edge\"
upstream = \"{upstream}\"
credential = \"automation\"
{route_extra}

[[clients]]
name = \"ci\"
key = \"ci-key\"
{client_extra}
"
    );
    match Config::parse(&text, Path::new("proxy.toml"), &|_| None) {
        Ok(config) => config,
        Err(e) => panic!("{e}"),
    }
}

fn simple(route_extra: &str, client_extra: &str) -> Config {
    config(route_extra, client_extra, "https://edge.example")
}

fn route(limits: &Limits) -> &RouteLimits {
    limits.route("/edge").expect("route /edge")
}

fn client(limits: &Limits) -> &ClientLimits {
    limits.client("ci").expect("client ci")
}

fn same<T>(a: Option<&T>, b: Option<&T>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

#[test]
fn the_registry_mirrors_the_config() {
    let limits = Limits::build(
        &simple(
            "rate = \"80/s\"\nmax_in_flight = 64",
            "rate = \"20/s\"\nburst = 40",
        ),
        None,
    );
    let r = route(&limits);
    assert_eq!(r.rate().map(|l| l.settings().burst.get()), Some(80));
    assert_eq!(r.rate().map(RateLimiter::policy), Some(ROUTE_POLICY));
    assert_eq!(r.in_flight().limit().map(|n| n.get()), Some(64));
    assert!(
        r.throttle().is_some(),
        "honor_upstream_retry_after defaults to on"
    );
    let c = client(&limits);
    assert_eq!(c.rate().map(|l| l.settings().burst.get()), Some(40));
    assert_eq!(c.rate().map(RateLimiter::policy), Some(CLIENT_POLICY));
    assert_eq!(c.in_flight().limit(), None);
    assert_eq!(c.settings().max_in_flight, None);

    let names: Vec<&str> = limits.clients().map(|(name, _)| name).collect();
    let prefixes: Vec<&str> = limits.routes().map(|(prefix, _)| prefix).collect();
    assert_eq!((names, prefixes), (vec!["ci"], vec!["/edge"]));
    assert!(limits.client("other").is_none());
    assert!(limits.route("/other").is_none());

    let unlimited = Limits::build(&simple("honor_upstream_retry_after = false", ""), None);
    assert!(route(&unlimited).rate().is_none());
    assert!(route(&unlimited).throttle().is_none());
    assert!(client(&unlimited).rate().is_none());
}

#[test]
fn unchanged_rate_settings_keep_their_state_across_a_rebuild() {
    let before = simple("rate = \"1/h\"", "rate = \"2/h\"\nburst = 1");
    let old = Limits::build(&before, None);
    assert!(route(&old).rate().expect("rate").check().is_ok());
    assert!(client(&old).rate().expect("rate").check().is_ok());

    // Other keys change (the client's routes, the route's timeout): the limiters stay.
    let after = simple(
        "rate = \"1/h\"\ntimeout = \"5s\"",
        "rate = \"2/h\"\nburst = 1\nroutes = [\"/edge\"]",
    );
    let new = Limits::build(&after, Some(&old));
    assert!(same(route(&old).rate(), route(&new).rate()));
    assert!(same(client(&old).rate(), client(&new).rate()));
    assert!(route(&new).rate().expect("rate").check().is_err());
    assert!(client(&new).rate().expect("rate").check().is_err());
}

#[test]
fn changed_rate_settings_start_fresh() {
    let old = Limits::build(&simple("rate = \"1/h\"", "rate = \"1/h\""), None);
    assert!(route(&old).rate().expect("rate").check().is_ok());
    assert!(client(&old).rate().expect("rate").check().is_ok());

    let new = Limits::build(
        &simple("rate = \"2/h\"", "rate = \"1/h\"\nburst = 2"),
        Some(&old),
    );
    assert!(!same(route(&old).rate(), route(&new).rate()));
    assert!(!same(client(&old).rate(), client(&new).rate()));
    assert!(route(&new).rate().expect("rate").check().is_ok());
    assert!(client(&new).rate().expect("rate").check().is_ok());

    // Removing the rate drops the limiter; adding it back starts with a full burst.
    let without = Limits::build(&simple("", ""), Some(&new));
    assert!(route(&without).rate().is_none());
    let again = Limits::build(&simple("rate = \"2/h\"", ""), Some(&without));
    assert!(route(&again).rate().expect("rate").check().is_ok());
}

#[test]
fn removed_clients_and_routes_come_back_fresh() {
    let old = Limits::build(&simple("rate = \"1/h\"", "rate = \"1/h\""), None);
    assert!(client(&old).rate().expect("rate").check().is_ok());
    let mut renamed = simple("rate = \"1/h\"", "rate = \"1/h\"");
    renamed.clients[0].name = "ci-2".to_owned();
    renamed.routes[0].prefix = "/edge-2".to_owned();
    let middle = Limits::build(&renamed, Some(&old));
    assert!(middle.client("ci").is_none());
    let fresh = middle.client("ci-2").expect("renamed client");
    assert!(fresh.rate().expect("rate").check().is_ok());
    let back = Limits::build(&simple("rate = \"1/h\"", "rate = \"1/h\""), Some(&middle));
    assert!(client(&back).rate().expect("rate").check().is_ok());
    assert!(route(&back).rate().expect("rate").check().is_ok());
}

#[test]
fn in_flight_counts_survive_any_rebuild() {
    let old = Limits::build(&simple("max_in_flight = 2", "max_in_flight = 5"), None);
    let admitted = admit(route(&old), Some(client(&old))).expect("admitted");
    let new = Limits::build(&simple("max_in_flight = 1", ""), Some(&old));
    assert!(route(&new)
        .in_flight()
        .shares_counter_with(route(&old).in_flight()));
    assert_eq!(route(&new).in_flight().current(), 1);
    assert_eq!(client(&new).in_flight().current(), 1);
    assert!(matches!(
        admit(route(&new), Some(client(&new))).expect_err("refused"),
        Refusal::TooManyInFlight(Scope::Route)
    ));
    drop(admitted);
    assert_eq!(route(&new).in_flight().current(), 0);
    assert_eq!(client(&new).in_flight().current(), 0);
    assert!(admit(route(&new), Some(client(&new))).is_ok());
}

fn throttle_for_a_minute(limits: &Limits) {
    let mut headers = HeaderMap::new();
    headers.insert("retry-after", HeaderValue::from_static("60"));
    assert_eq!(
        route(limits).observe_upstream(StatusCode::TOO_MANY_REQUESTS, &headers),
        Some(Duration::from_secs(60))
    );
}

#[test]
fn an_upstream_pause_survives_a_rebuild_of_the_same_upstream_only() {
    let old = Limits::build(&simple("", ""), None);
    throttle_for_a_minute(&old);
    assert!(route(&old).paused().is_some());

    let same_upstream = Limits::build(&simple("rate = \"5/s\"", ""), Some(&old));
    assert!(same(
        route(&old).throttle(),
        route(&same_upstream).throttle()
    ));
    assert!(route(&same_upstream).paused().is_some());

    let moved = Limits::build(
        &config("", "", "https://other.example"),
        Some(&same_upstream),
    );
    assert!(route(&moved).paused().is_none());

    // Turned off, the route neither pauses nor records pauses.
    let off = Limits::build(
        &simple("honor_upstream_retry_after = false", ""),
        Some(&old),
    );
    assert!(route(&off).paused().is_none());
    let mut headers = HeaderMap::new();
    headers.insert("retry-after", HeaderValue::from_static("60"));
    assert_eq!(
        route(&off).observe_upstream(StatusCode::TOO_MANY_REQUESTS, &headers),
        None
    );
    // Turned on again, it starts unpaused.
    let on = Limits::build(&simple("", ""), Some(&off));
    assert!(route(&on).paused().is_none());
}

#[test]
fn a_paused_route_refuses_before_spending_anything() {
    let limits = Limits::build(
        &simple("rate = \"1/h\"\nmax_in_flight = 1", "rate = \"1/h\""),
        None,
    );
    throttle_for_a_minute(&limits);
    match admit(route(&limits), Some(client(&limits))).expect_err("refused") {
        Refusal::UpstreamThrottled(pause) => {
            assert_eq!(pause.status, StatusCode::TOO_MANY_REQUESTS);
            assert!(pause.remaining <= Duration::from_secs(60));
            assert_eq!(pause.retry_after_secs(), 60);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(route(&limits).in_flight().current(), 0);
    // Both rates still have their one request.
    assert!(client(&limits).rate().expect("rate").check().is_ok());
    assert!(route(&limits).rate().expect("rate").check().is_ok());
}

#[test]
fn a_full_in_flight_cap_refuses_before_the_rates() {
    let limits = Limits::build(
        &simple(
            "rate = \"1/h\"",
            "rate = \"2/h\"\nburst = 2\nmax_in_flight = 1",
        ),
        None,
    );
    let first = admit(route(&limits), Some(client(&limits))).expect("first");
    let second = admit(route(&limits), Some(client(&limits))).expect_err("refused");
    assert!(matches!(second, Refusal::TooManyInFlight(Scope::Client)));
    assert_eq!(second.reason(), "client_in_flight");
    drop(first);
    // The refused request spent no client rate: the client's second request still passes its
    // own limiter (and then meets the route's, spent by the first request).
    match admit(route(&limits), Some(client(&limits))).expect_err("refused") {
        Refusal::RateLimited {
            scope: Scope::Route,
            refused,
            headers,
        } => {
            assert!(refused.retry_after > Duration::from_secs(3500));
            assert_eq!(
                headers.ratelimit_value(),
                Some(HeaderValue::from_static(
                    "\"client\";r=0;t=1800, \"route\";r=0;t=3600"
                ))
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(client(&limits).in_flight().current(), 0, "slots given back");
    assert_eq!(route(&limits).in_flight().current(), 0, "slots given back");
}

#[test]
fn a_client_over_its_rate_leaves_the_route_budget_alone() {
    let limits = Limits::build(&simple("rate = \"2/h\"\nburst = 2", "rate = \"1/h\""), None);
    let admission = admit(route(&limits), Some(client(&limits))).expect("first");
    assert_eq!(
        admission.headers.policy_values().collect::<Vec<_>>(),
        [
            &HeaderValue::from_static("\"client\";q=1;w=3600"),
            &HeaderValue::from_static("\"route\";q=2;w=3600")
        ]
    );
    let refused = admit(route(&limits), Some(client(&limits))).expect_err("refused");
    assert_eq!(refused.reason(), "client_rate");
    match &refused {
        Refusal::RateLimited { headers, .. } => assert_eq!(
            headers.ratelimit_value(),
            Some(HeaderValue::from_static("\"client\";r=0;t=3600"))
        ),
        other => panic!("{other:?}"),
    }
    // The route still has one of its two requests for another client.
    assert!(admit(route(&limits), None).is_ok());
}

#[test]
fn without_limits_every_request_passes_counted_and_without_fields() {
    let limits = Limits::build(&simple("", ""), None);
    let admissions: Vec<Admission> = (0..50)
        .map(|_| admit(route(&limits), Some(client(&limits))).expect("no limits"))
        .collect();
    assert!(admissions.iter().all(|a| a.headers.is_empty()));
    assert_eq!(route(&limits).in_flight().current(), 50);
    assert_eq!(client(&limits).in_flight().current(), 50);
    drop(admissions);
    assert_eq!(route(&limits).in_flight().current(), 0);
}

#[test]
fn refusal_reasons_name_the_limit() {
    let pause = Pause {
        remaining: Duration::from_secs(1),
        status: StatusCode::SERVICE_UNAVAILABLE,
    };
    let refused = Refused {
        retry_after: Duration::from_secs(1),
    };
    let cases = [
        (Refusal::UpstreamThrottled(pause), "upstream_throttled"),
        (
            Refusal::RateLimited {
                scope: Scope::Client,
                refused,
                headers: Box::default(),
            },
            "client_rate",
        ),
        (
            Refusal::RateLimited {
                scope: Scope::Route,
                refused,
                headers: Box::default(),
            },
            "route_rate",
        ),
        (Refusal::TooManyInFlight(Scope::Client), "client_in_flight"),
        (Refusal::TooManyInFlight(Scope::Route), "route_in_flight"),
    ];
    for (refusal, reason) in cases {
        assert_eq!(refusal.reason(), reason);
    }
}

#[test]
fn admission_slots_are_send_and_static() {
    fn send_static<T: Send + 'static>(_: T) {}
    let limits = Limits::build(&simple("max_in_flight = 1", ""), None);
    let admission = admit(route(&limits), None).expect("admitted");
    assert_eq!(route(&limits).in_flight().current(), 1);
    send_static(admission.slots);
    assert_eq!(route(&limits).in_flight().current(), 0);
}
