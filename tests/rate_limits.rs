//! Rate limits, bursts, in-flight caps and upstream pauses (DESIGN.md, "One gateway for many
//! teams") through real sockets: who is refused, with which status, code and headers, how many
//! requests the upstream and the token endpoint saw, and what `/metrics` and `/status` report.
//! Waits are for the behaviour under test (a `Retry-After` running out) and are polled, with
//! generous "not a hang" bounds; nothing asserts a duration.

mod support;

use std::path::Path;
use std::time::Duration;

use sitecore_auth_proxy::config::Config;
use sitecore_auth_proxy::emulator::{Api, Emulator, TokenFault, UpstreamFault};
use support::{eventually, json, Harness, Setup};
use tokio::task::JoinSet;

const A_KEY: &str = "team-a-key-0123456789";
const B_KEY: &str = "team-b-key-9876543210";
const ADMIN: &str = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";

/// How long a test waits for something the proxy should do soon before calling it a hang.
const NOT_A_HANG: Duration = Duration::from_secs(10);
/// How long the upstream holds a request in the in-flight tests: far longer than it takes to send
/// the requests that must find the slots taken.
const SLOW: Duration = Duration::from_secs(3);

/// A `[[clients]]` entry; `limits` holds more keys (`rate = "1/min"`, ...).
fn client(name: &str, key: &str, limits: &str) -> String {
    format!("\n[[clients]]\nname = \"{name}\"\nkey = \"{key}\"\n{limits}\n")
}

/// A `[[routes]]` entry to the emulated Deploy API; `extra` holds more keys.
fn route(emulator: &Emulator, prefix: &str, extra: &str) -> String {
    format!(
        "\n[[routes]]\nprefix = \"{prefix}\"\nupstream = \"{}\"\ncredential = \"automation\"\n{extra}\n",
        emulator.api_base(Api::Deploy)
    )
}

/// The harness config text for the standard routes plus what `extra` returns for the started
/// emulator (extra routes need its addresses).
fn text_for(emulator: &Emulator, extra: &str) -> String {
    let mut text = support::config_text(&Setup::default(), emulator);
    text.push_str(extra);
    text
}

/// Starts an emulator (`prepare` may set faults before the proxy's first token request) and a
/// proxy with the standard routes plus `extra(emulator)`.
async fn start_with(
    prepare: impl FnOnce(&Emulator),
    extra: impl FnOnce(&Emulator) -> String,
) -> Harness {
    let setup = Setup::default();
    let emulator = setup
        .emulator
        .clone()
        .start()
        .await
        .expect("emulator starts");
    prepare(&emulator);
    let text = text_for(&emulator, &extra(&emulator));
    Harness::from_text(emulator, &text, setup.tuning).await
}

async fn start(extra: impl FnOnce(&Emulator) -> String) -> Harness {
    let h = start_with(|_| {}, extra).await;
    h.wait_ready().await;
    h
}

/// `GET path` through the proxy with a client key (`None`: no key).
async fn get_as(h: &Harness, key: Option<&str>, path: &str) -> reqwest::Response {
    let mut request = h.http.get(h.url(path));
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    request.send().await.expect("response")
}

/// Status and `error` code (`None` for a body without one, such as an upstream echo).
async fn outcome(response: reqwest::Response) -> (u16, Option<String>) {
    let status = response.status().as_u16();
    let body = json(response).await;
    (status, body["error"].as_str().map(str::to_owned))
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii header").to_owned())
}

/// `Retry-After` in seconds; panics when it is missing or not delay-seconds.
fn retry_after(response: &reqwest::Response) -> u64 {
    let value = header(response, "retry-after").expect("Retry-After present");
    value
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After is not delay-seconds: {value}"))
}

/// The `r` and `t` parameters of `policy` in a `RateLimit` field value.
fn ratelimit_item(value: &str, policy: &str) -> Option<(u64, u64)> {
    let item = value
        .split(',')
        .map(str::trim)
        .find(|item| item.starts_with(&format!("\"{policy}\";")))?;
    let param = |name: &str| -> Option<u64> {
        item.split(';')
            .find_map(|p| p.trim().strip_prefix(&format!("{name}=")))?
            .parse()
            .ok()
    };
    Some((param("r")?, param("t")?))
}

/// Sends `n` requests at once and returns their outcomes, in completion order.
async fn concurrently(
    h: &Harness,
    key: Option<&str>,
    path: &str,
    n: usize,
) -> Vec<(u16, Option<String>)> {
    let mut set = JoinSet::new();
    for _ in 0..n {
        let request = h.http.get(h.url(path));
        let request = match key {
            Some(key) => request.header("x-api-key", key),
            None => request,
        };
        set.spawn(async move { outcome(request.send().await.expect("response")).await });
    }
    let mut out = Vec::new();
    while let Some(result) = set.join_next().await {
        out.push(result.expect("request task"));
    }
    out
}

fn count(outcomes: &[(u16, Option<String>)], status: u16, code: Option<&str>) -> usize {
    outcomes
        .iter()
        .filter(|(s, c)| *s == status && c.as_deref() == code)
        .count()
}

/// Sends `GET path` until it is not answered locally with `upstream_throttled`, at most for
/// `timeout`; asserts that the upstream saw nothing meanwhile. Returns the first other response
/// and how many local answers came before it.
async fn until_unpaused(
    h: &Harness,
    path: &str,
    throttled_status: u16,
    timeout: Duration,
) -> (reqwest::Response, u32) {
    let seen = h.emulator.upstream_requests();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut local = 0;
    loop {
        let response = h.get(path).await;
        if response.status() != throttled_status {
            return (response, local);
        }
        assert!(retry_after(&response) >= 1);
        let (_, code) = outcome(response).await;
        assert_eq!(code.as_deref(), Some("upstream_throttled"));
        assert_eq!(
            h.emulator.upstream_requests(),
            seen,
            "a paused route forwards nothing"
        );
        local += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pause did not end within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn rejected(route: &str, client: &str, reason: &str) -> String {
    format!(r#"proxy_rejected_total{{route="{route}",client="{client}",reason="{reason}"}}"#)
}

async fn status_json(h: &Harness) -> serde_json::Value {
    let (status, body) = h.admin_get("/status").await;
    assert_eq!(status, 200);
    serde_json::from_str(&body).expect("status JSON")
}

fn entry<'a>(list: &'a serde_json::Value, field: &str, value: &str) -> &'a serde_json::Value {
    list.as_array()
        .expect("a list")
        .iter()
        .find(|e| e[field] == value)
        .unwrap_or_else(|| panic!("no entry with {field} = {value} in {list}"))
}

// ---- client rates --------------------------------------------------------------------------

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after_and_ratelimit_fields() {
    let h = start(|_| client("team-a", A_KEY, "rate = \"1/min\"\nburst = 2")).await;

    for remaining in [1, 0] {
        let response = get_as(&h, Some(A_KEY), "/deploy/api/projects/v1").await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "ratelimit-policy").as_deref(),
            Some("\"client\";q=1;w=60"),
            "admitted responses carry the policy"
        );
        let field = header(&response, "ratelimit").expect("RateLimit on an admitted response");
        let (r, t) = ratelimit_item(&field, "client").expect("client item");
        assert_eq!(r, remaining, "{field}");
        assert!((1..=60).contains(&t), "{field}");
        assert!(header(&response, "retry-after").is_none());
        response.bytes().await.expect("body");
    }

    let response = get_as(&h, Some(A_KEY), "/deploy/api/projects/v1").await;
    assert_eq!(response.status(), 429);
    let wait = retry_after(&response);
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    assert_eq!(
        header(&response, "ratelimit-policy").as_deref(),
        Some("\"client\";q=1;w=60")
    );
    let field = header(&response, "ratelimit").expect("RateLimit on the 429");
    assert_eq!(
        ratelimit_item(&field, "client"),
        Some((0, wait)),
        "r=0 and t equal to Retry-After: {field}"
    );
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(json(response).await["error"], "rate_limited");

    assert_eq!(
        h.emulator.upstream_requests(),
        2,
        "the refused request never left"
    );
}

#[tokio::test]
async fn a_refused_client_passes_again_once_retry_after_has_elapsed() {
    let h = start(|_| client("team-a", A_KEY, "rate = \"2/s\"\nburst = 1")).await;

    assert_eq!(
        outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await.0,
        200
    );
    let response = get_as(&h, Some(A_KEY), "/deploy/x").await;
    assert_eq!(response.status(), 429);
    let wait = retry_after(&response);
    assert_eq!(wait, 1, "half a second, rounded up to whole seconds");
    assert_eq!(json(response).await["error"], "rate_limited");

    // The behaviour under test is the wait itself: do exactly what Retry-After says.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(
        outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await,
        (200, None)
    );
    assert_eq!(h.emulator.upstream_requests(), 2);
}

#[tokio::test]
async fn two_clients_are_limited_independently() {
    let h = start(|_| {
        client("team-a", A_KEY, "rate = \"1/min\"\nburst = 1")
            + &client("team-b", B_KEY, "rate = \"1/min\"\nburst = 1")
    })
    .await;

    assert_eq!(
        outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await.0,
        200
    );
    let (status, code) = outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await;
    assert_eq!((status, code.as_deref()), (429, Some("rate_limited")));

    // team-a's spent burst is not team-b's.
    assert_eq!(
        outcome(get_as(&h, Some(B_KEY), "/deploy/x").await).await.0,
        200
    );
    let (status, _) = outcome(get_as(&h, Some(B_KEY), "/deploy/x").await).await;
    assert_eq!(status, 429);
    let (status, _) = outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await;
    assert_eq!(status, 429);

    assert_eq!(h.emulator.upstream_requests(), 2);
}

// ---- route rates and bursts ----------------------------------------------------------------

#[tokio::test]
async fn a_route_rate_holds_across_clients() {
    let h = start(|emulator| {
        route(emulator, "/shared", "rate = \"1/min\"\nburst = 3")
            + &client("team-a", A_KEY, "")
            + &client("team-b", B_KEY, "")
    })
    .await;

    let mut passed = 0;
    let mut refused = 0;
    for key in [A_KEY, B_KEY, A_KEY, B_KEY, A_KEY, B_KEY] {
        let response = get_as(&h, Some(key), "/shared/x").await;
        match response.status().as_u16() {
            200 => passed += 1,
            429 => {
                let wait = retry_after(&response);
                assert!((1..=60).contains(&wait), "Retry-After {wait}");
                let field = header(&response, "ratelimit").expect("RateLimit");
                assert_eq!(ratelimit_item(&field, "route"), Some((0, wait)), "{field}");
                assert_eq!(
                    header(&response, "ratelimit-policy").as_deref(),
                    Some("\"route\";q=1;w=60")
                );
                assert_eq!(json(response).await["error"], "rate_limited");
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(
        (passed, refused),
        (3, 3),
        "burst 3 for both clients together"
    );
    assert_eq!(h.emulator.upstream_requests(), 3);
    // Other routes have no shared rate.
    assert_eq!(
        outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await.0,
        200
    );
}

#[tokio::test]
async fn a_client_over_its_own_rate_does_not_spend_the_route_budget() {
    let h = start(|emulator| {
        ADMIN.to_owned()
            + &route(emulator, "/shared", "rate = \"1/min\"\nburst = 2")
            + &client("team-a", A_KEY, "rate = \"1/min\"\nburst = 1")
            + &client("team-b", B_KEY, "")
    })
    .await;

    let mut a = Vec::new();
    for _ in 0..3 {
        a.push(outcome(get_as(&h, Some(A_KEY), "/shared/x").await).await);
    }
    assert_eq!(count(&a, 200, None), 1, "{a:?}");
    assert_eq!(count(&a, 429, Some("rate_limited")), 2, "{a:?}");
    // team-a's refusals took nothing from the route: one of its two requests is left for team-b.
    assert_eq!(
        outcome(get_as(&h, Some(B_KEY), "/shared/x").await).await.0,
        200
    );
    let (status, code) = outcome(get_as(&h, Some(B_KEY), "/shared/x").await).await;
    assert_eq!((status, code.as_deref()), (429, Some("rate_limited")));
    assert_eq!(h.emulator.upstream_requests(), 2);

    let (_, text) = h.admin_get("/metrics").await;
    let m = support::samples(&text);
    assert_eq!(
        m.get(&rejected("/shared", "team-a", "client_rate")),
        Some(&2.0),
        "{text}"
    );
    assert_eq!(
        m.get(&rejected("/shared", "team-b", "route_rate")),
        Some(&1.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_burst_of_5_admits_exactly_5_of_10_concurrent_requests() {
    let h = start(|_| client("team-a", A_KEY, "rate = \"1/min\"\nburst = 5")).await;

    let outcomes = concurrently(&h, Some(A_KEY), "/deploy/x", 10).await;
    assert_eq!(count(&outcomes, 200, None), 5, "{outcomes:?}");
    assert_eq!(
        count(&outcomes, 429, Some("rate_limited")),
        5,
        "{outcomes:?}"
    );
    assert_eq!(h.emulator.upstream_requests(), 5);
}

// ---- in-flight caps ------------------------------------------------------------------------

/// Starts `GET path` as `key` in the background.
fn spawn_get(h: &Harness, key: &str, path: &str) -> tokio::task::JoinHandle<(u16, Option<String>)> {
    let request = h.http.get(h.url(path)).header("x-api-key", key);
    tokio::spawn(async move { outcome(request.send().await.expect("response")).await })
}

#[tokio::test]
async fn a_client_max_in_flight_refuses_what_exceeds_it_while_the_upstream_is_slow() {
    let h = start(|_| client("team-a", A_KEY, "max_in_flight = 2")).await;
    h.emulator
        .push_upstream_faults([UpstreamFault::Delay(SLOW), UpstreamFault::Delay(SLOW)]);

    // Two requests take both slots and sit at the slow upstream...
    let slow = [
        spawn_get(&h, A_KEY, "/deploy/slow"),
        spawn_get(&h, A_KEY, "/deploy/slow"),
    ];
    assert!(eventually(NOT_A_HANG, || h.emulator.upstream_requests() == 2).await);
    // ...so the next three, concurrent with them, are refused at once.
    let outcomes = concurrently(&h, Some(A_KEY), "/deploy/x", 3).await;
    assert_eq!(
        count(&outcomes, 429, Some("too_many_in_flight")),
        3,
        "{outcomes:?}"
    );
    assert_eq!(
        h.emulator.upstream_requests(),
        2,
        "refused requests never left"
    );

    for task in slow {
        assert_eq!(task.await.expect("slow request").0, 200);
    }
    // The slots are freed with the responses: a new request passes.
    let limits = h
        .proxy
        .runtime()
        .limits
        .client("team-a")
        .cloned()
        .expect("client limits");
    assert!(eventually(NOT_A_HANG, || limits.in_flight().current() == 0).await);
    assert_eq!(
        outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await,
        (200, None)
    );
    assert_eq!(h.emulator.upstream_requests(), 3);
}

#[tokio::test]
async fn a_route_max_in_flight_holds_across_clients() {
    let h = start(|emulator| {
        route(emulator, "/slow", "max_in_flight = 2")
            + &client("team-a", A_KEY, "")
            + &client("team-b", B_KEY, "")
    })
    .await;
    h.emulator
        .push_upstream_faults([UpstreamFault::Delay(SLOW), UpstreamFault::Delay(SLOW)]);

    let slow = [
        spawn_get(&h, A_KEY, "/slow/x"),
        spawn_get(&h, B_KEY, "/slow/x"),
    ];
    assert!(eventually(NOT_A_HANG, || h.emulator.upstream_requests() == 2).await);
    for key in [A_KEY, B_KEY] {
        let (status, code) = outcome(get_as(&h, Some(key), "/slow/x").await).await;
        assert_eq!((status, code.as_deref()), (429, Some("too_many_in_flight")));
    }
    // The cap is the route's: the clients' other routes are free.
    assert_eq!(
        outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await.0,
        200
    );
    assert_eq!(h.emulator.upstream_requests(), 3);

    for task in slow {
        assert_eq!(task.await.expect("slow request").0, 200);
    }
    let limits = h
        .proxy
        .runtime()
        .limits
        .route("/slow")
        .cloned()
        .expect("route limits");
    assert!(eventually(NOT_A_HANG, || limits.in_flight().current() == 0).await);
    assert_eq!(
        outcome(get_as(&h, Some(B_KEY), "/slow/x").await).await.0,
        200
    );
    assert_eq!(h.emulator.upstream_requests(), 4);
}

// ---- upstream pauses -----------------------------------------------------------------------

fn throttled(status: u16, headers: &[(&str, &str)]) -> UpstreamFault {
    UpstreamFault::StatusWithHeaders {
        status,
        headers: headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

#[tokio::test]
async fn an_upstream_429_with_retry_after_pauses_the_route() {
    let h = start(|_| ADMIN.to_owned()).await;
    h.emulator
        .push_upstream_faults([throttled(429, &[("retry-after", "3")])]);

    // The upstream's own answer passes through.
    let response = h.get("/deploy/x").await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "retry-after").as_deref(), Some("3"));
    assert_eq!(json(response).await["error"], "emulated_fault");
    assert_eq!(h.emulator.upstream_requests(), 1);

    // Within the pause the route answers locally.
    for _ in 0..3 {
        let response = h.get("/deploy/x").await;
        assert_eq!(response.status(), 429);
        let wait = retry_after(&response);
        assert!((1..=3).contains(&wait), "Retry-After {wait}");
        assert_eq!(json(response).await["error"], "upstream_throttled");
    }
    assert_eq!(
        h.emulator.upstream_requests(),
        1,
        "the upstream saw nothing more"
    );

    // Other routes are not paused.
    assert_eq!(h.get("/authoring").await.status(), 200);
    assert_eq!(h.emulator.upstream_requests(), 2);

    let (status, text) = h.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        support::samples(&text).get(&rejected("/deploy", "-", "upstream_throttled")),
        Some(&3.0),
        "{text}"
    );
    let status = status_json(&h).await;
    let paused = &entry(&status["routes"], "prefix", "/deploy")["limits"]["paused"];
    assert_eq!(paused["status"], 429, "{paused}");
    assert!(paused["remaining_seconds"].as_f64().expect("seconds") <= 3.0);

    // After the pause the upstream is asked again.
    let (response, _) = until_unpaused(&h, "/deploy/x", 429, Duration::from_secs(6)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(h.emulator.upstream_requests(), 3);
}

#[tokio::test]
async fn an_upstream_503_with_x_ratelimit_reset_pauses_the_route_with_503() {
    let h = start(|_| String::new()).await;
    h.emulator
        .push_upstream_faults([throttled(503, &[("x-ratelimit-reset", "2")])]);

    assert_eq!(h.get("/deploy/x").await.status(), 503);
    let response = h.get("/deploy/x").await;
    assert_eq!(
        response.status(),
        503,
        "the upstream's status, answered locally"
    );
    let wait = retry_after(&response);
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    assert_eq!(json(response).await["error"], "upstream_throttled");
    assert_eq!(h.emulator.upstream_requests(), 1);

    let (response, _) = until_unpaused(&h, "/deploy/x", 503, Duration::from_secs(6)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(h.emulator.upstream_requests(), 2);
}

#[tokio::test]
async fn with_honor_upstream_retry_after_off_nothing_is_paused() {
    let h = start(|emulator| route(emulator, "/raw", "honor_upstream_retry_after = false")).await;
    h.emulator.push_upstream_faults([
        throttled(429, &[("retry-after", "3")]),
        throttled(503, &[("x-ratelimit-reset", "3")]),
    ]);

    assert_eq!(h.get("/raw/x").await.status(), 429);
    assert_eq!(h.get("/raw/x").await.status(), 503);
    let response = h.get("/raw/x").await;
    assert_eq!(response.status(), 200, "forwarded at once");
    assert_eq!(h.emulator.upstream_requests(), 3);
    let limits = h
        .proxy
        .runtime()
        .limits
        .route("/raw")
        .cloned()
        .expect("route limits");
    assert!(limits.paused().is_none());
}

#[tokio::test]
async fn an_absurd_retry_after_is_bounded() {
    let h = start(|_| String::new()).await;
    h.emulator
        .push_upstream_faults([throttled(429, &[("retry-after", "999999")])]);

    assert_eq!(h.get("/deploy/x").await.status(), 429);
    let response = h.get("/deploy/x").await;
    assert_eq!(response.status(), 429);
    let wait = retry_after(&response);
    assert!(
        (4..=300).contains(&wait),
        "paused, but for at most five minutes: Retry-After {wait}"
    );
    assert_eq!(json(response).await["error"], "upstream_throttled");
    assert_eq!(h.emulator.upstream_requests(), 1);
}

// ---- tokens, metrics, status, reload, config -----------------------------------------------

#[tokio::test]
async fn refused_requests_never_wait_for_or_cost_a_token() {
    // The first token takes a while, so the first admitted request finds the cache cold.
    let h = start_with(
        |emulator| emulator.push_token_faults([TokenFault::Delay(SLOW)]),
        |_| client("team-a", A_KEY, "rate = \"1/min\"\nburst = 1"),
    )
    .await;
    let credential = h.proxy.credential("automation").expect("credential");
    assert!(eventually(NOT_A_HANG, || h.emulator.token_requests() == 1).await);

    let first = spawn_get(&h, A_KEY, "/deploy/x");
    assert!(eventually(NOT_A_HANG, || credential.cold_waits() == 1).await);
    for _ in 0..5 {
        let (status, code) = outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await;
        assert_eq!((status, code.as_deref()), (429, Some("rate_limited")));
    }
    assert_eq!(
        credential.cold_waits(),
        1,
        "refused requests never waited for the token"
    );
    assert_eq!(first.await.expect("first request").0, 200);

    for _ in 0..3 {
        assert_eq!(
            outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await.0,
            429
        );
    }
    assert_eq!(h.emulator.token_requests(), 1, "only the refresher's fetch");
    assert_eq!(h.emulator.upstream_requests(), 1);
}

#[tokio::test]
async fn refusals_are_counted_on_metrics_and_limits_show_on_status() {
    let h = start(|emulator| {
        ADMIN.to_owned()
            + &route(
                emulator,
                "/shared",
                "rate = \"100/min\"\nburst = 10\nmax_in_flight = 8",
            )
            + &client(
                "team-a",
                A_KEY,
                "rate = \"1/min\"\nburst = 1\nmax_in_flight = 4",
            )
    })
    .await;

    for expected in [200, 429, 429, 429] {
        assert_eq!(
            outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await.0,
            expected
        );
    }

    let (status, text) = h.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let m = support::samples(&text);
    assert_eq!(
        m.get(&rejected("/deploy", "team-a", "client_rate")),
        Some(&3.0),
        "{text}"
    );
    assert_eq!(
        m.get(r#"proxy_requests_total{route="/deploy",client="team-a",status="429"}"#),
        Some(&3.0),
        "{text}"
    );

    // `refused_recently` counts complete seconds: poll until the refusals' second has ended.
    let deadline = tokio::time::Instant::now() + NOT_A_HANG;
    let status = loop {
        let status = status_json(&h).await;
        let team = entry(&status["clients"], "name", "team-a");
        if team["limits"]["refused_recently"] == 3 || tokio::time::Instant::now() >= deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let team = &entry(&status["clients"], "name", "team-a")["limits"];
    assert_eq!(team["rate"], "1/min", "{team}");
    assert_eq!(team["burst"], 1);
    assert_eq!(team["max_in_flight"], 4);
    assert_eq!(team["in_flight"], 0);
    assert_eq!(team["refused_recently"], 3, "{team}");
    assert!(team["admitted_per_second"].as_f64().expect("a number") > 0.0);
    assert!(team["refused_per_second"].as_f64().expect("a number") > 0.0);

    let shared = &entry(&status["routes"], "prefix", "/shared")["limits"];
    assert_eq!(shared["rate"], "100/min", "{shared}");
    assert_eq!(shared["burst"], 10);
    assert_eq!(shared["max_in_flight"], 8);
    assert_eq!(shared["in_flight"], 0);
    assert_eq!(shared["honor_upstream_retry_after"], true);
    assert!(shared["paused"].is_null());
    let deploy = &entry(&status["routes"], "prefix", "/deploy")["limits"];
    assert!(
        deploy["rate"].is_null(),
        "no route rate configured: {deploy}"
    );
    assert!(deploy["max_in_flight"].is_null());
}

#[tokio::test]
async fn reload_keeps_a_spent_burst_and_a_changed_rate_starts_afresh() {
    let extra = |emulator: &Emulator, rate: &str, timeout: &str| {
        route(emulator, "/other", &format!("timeout = \"{timeout}\""))
            + &client("team-a", A_KEY, &format!("rate = \"{rate}\"\nburst = 1"))
    };
    let h = start(|emulator| extra(emulator, "1/min", "30s")).await;

    assert_eq!(
        outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await.0,
        200
    );
    assert_eq!(
        outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await.0,
        429
    );

    // An unrelated change keeps the limiter: the burst stays spent.
    let text = text_for(&h.emulator, &extra(&h.emulator, "1/min", "45s"));
    h.proxy.reload(support::parse(&text)).await.expect("reload");
    let (status, code) = outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await;
    assert_eq!(
        (status, code.as_deref()),
        (429, Some("rate_limited")),
        "a reload does not forgive a spent burst"
    );

    // A changed rate is a new limiter with a full burst.
    let text = text_for(&h.emulator, &extra(&h.emulator, "2/min", "45s"));
    h.proxy.reload(support::parse(&text)).await.expect("reload");
    assert_eq!(
        outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await.0,
        200
    );
    assert_eq!(
        outcome(get_as(&h, Some(A_KEY), "/deploy/x").await).await.0,
        429
    );
    assert_eq!(h.emulator.upstream_requests(), 2);
}

#[test]
fn bad_limit_values_are_errors_naming_the_key() {
    let text = "[server]\nlisten = \"127.0.0.1:0\"\n\n\
                [credentials.c]\nclient_id = \"i\"\nclient_secret = \"s\"\n\n\
                [[routes]]\nprefix = \"/d\"\nupstream = \"https://example.com\"\ncredential = \"c\"\n\
                rate = \"fast\"\nburst = 0\nmax_in_flight = -1\n\n\
                [[clients]]\nname = \"a\"\nkey = \"k\"\n\
                rate = \"fast\"\nburst = 0\nmax_in_flight = -1\n";
    let error = Config::parse(text, Path::new("p.toml"), &|_| None).expect_err("refused");
    let message = error.to_string();
    for key in [
        "clients[0].rate",
        "clients[0].burst",
        "clients[0].max_in_flight",
        "routes[0].rate",
        "routes[0].burst",
        "routes[0].max_in_flight",
    ] {
        assert!(message.contains(key), "names {key}: {message}");
    }
    assert!(message.contains("\"fast\" is not a rate"), "{message}");

    // Each one alone is refused too, and the good spellings pass.
    let good = text
        .replace("rate = \"fast\"", "rate = \"600/min\"")
        .replace("burst = 0", "burst = 10")
        .replace("max_in_flight = -1", "max_in_flight = 4");
    Config::parse(&good, Path::new("p.toml"), &|_| None).expect("good values parse");
    // The route's keys come first in the text: `replacen(.., 1)` spoils the route's only.
    for (good_value, bad, key) in [
        ("rate = \"600/min\"", "rate = \"0/s\"", "routes[0].rate"),
        ("burst = 10", "burst = 0", "routes[0].burst"),
        (
            "max_in_flight = 4",
            "max_in_flight = 0",
            "routes[0].max_in_flight",
        ),
    ] {
        let one_bad = good.replacen(good_value, bad, 1);
        let message = Config::parse(&one_bad, Path::new("p.toml"), &|_| None)
            .expect_err("refused")
            .to_string();
        assert!(message.contains(key), "names {key}: {message}");
        assert!(
            !message.contains("clients[0]"),
            "only the route's key: {message}"
        );
    }
}
