//! Readiness when one credential of several is down (DESIGN.md, "Admin listener"): once every
//! credential in use has held a token, losing one later keeps `/readyz` 200 and degrades only that
//! credential's routes (503 `token_unavailable`), which `credential_up` and `/readyz?verbose` show;
//! `[admin] ready_requires = "all_tokens"` restores the strict rule. A credential that never held
//! a token keeps the replica unready. All through real sockets against the emulator.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use sitecore_auth_proxy::emulator::{
    Api, Emulator, TokenFault, DEFAULT_AUDIENCE, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET,
};
use support::{eventually, json, toml_str, Harness, Setup};

/// How long a test waits for something the proxy should do soon before calling it a hang.
const NOT_A_HANG: Duration = Duration::from_secs(10);
/// The token lifetime of the emulator whose credential is made to lose its token: short, so the
/// token runs out soon after its endpoint starts failing.
const SHORT_LIFETIME: Duration = Duration::from_secs(3);

/// An `[admin]` table; `extra` holds more keys.
fn admin(extra: &str) -> String {
    format!("\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra}\n")
}

/// An OAuth credential `name` at `token_url`, and a route `prefix` using it to `emulator`'s
/// Deploy API.
fn oauth_route(
    name: &str,
    secret: &str,
    token_url: &str,
    prefix: &str,
    emulator: &Emulator,
) -> String {
    format!(
        "\n[credentials.{name}]\nclient_id = {}\nclient_secret = {}\ntoken_url = \"{token_url}\"\n\
         \n[[routes]]\nprefix = \"{prefix}\"\nupstream = \"{}\"\ncredential = \"{name}\"\n",
        toml_str(DEFAULT_CLIENT_ID),
        toml_str(secret),
        emulator.api_base(Api::Deploy)
    )
}

/// The standard harness against a started `emulator`, plus `extra`.
async fn start(emulator: Emulator, extra: &str) -> Harness {
    let setup = Setup::default();
    let mut text = support::config_text(&setup, &emulator);
    text.push_str(extra);
    Harness::from_text(emulator, &text, setup.tuning).await
}

/// The standard harness (credential `automation`, 24 h tokens) plus a credential `flaky` on a
/// second emulator with short-lived tokens, serving `/flaky`; both up. Returns the second
/// emulator too (its token faults break `flaky` alone).
async fn with_flaky(admin_extra: &str) -> (Harness, Emulator) {
    let flaky = Emulator::builder()
        .token_lifetime(SHORT_LIFETIME)
        .start()
        .await
        .expect("second emulator starts");
    let main = Emulator::builder().start().await.expect("emulator starts");
    let extra = admin(admin_extra)
        + &oauth_route(
            "flaky",
            DEFAULT_CLIENT_SECRET,
            &flaky.token_url(),
            "/flaky",
            &flaky,
        );
    let h = start(main, &extra).await;
    h.wait_ready().await;
    let credential = h.proxy.credential("flaky").expect("flaky credential");
    assert!(eventually(NOT_A_HANG, || credential.current().is_some()).await);
    (h, flaky)
}

/// Makes `flaky`'s token endpoint fail from now on and waits until its token ran out.
async fn break_flaky(h: &Harness, flaky: &Emulator) {
    flaky.set_token_fault(Some(TokenFault::Status(500)));
    let credential = h.proxy.credential("flaky").expect("flaky credential");
    assert!(
        eventually(NOT_A_HANG, || credential.current().is_none()).await,
        "the short-lived token ran out"
    );
}

async fn admin_json(h: &Harness, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = h.admin_get(path).await;
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    (status, value)
}

/// `credential_up{credential="name"}` on `/metrics`.
async fn credential_up(h: &Harness) -> HashMap<String, f64> {
    let (status, text) = h.admin_get("/metrics").await;
    assert_eq!(status, 200);
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("credential_up{credential=\"")?;
            let (name, value) = rest.split_once("\"} ")?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Status and `error` code of `GET path` through the proxy.
async fn outcome(h: &Harness, path: &str) -> (u16, Option<String>) {
    let response = h.get(path).await;
    let status = response.status().as_u16();
    let body = json(response).await;
    (status, body["error"].as_str().map(str::to_owned))
}

/// The `credentials` entry named `name` of a `/readyz?verbose` answer.
fn verbose_entry<'a>(body: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    body["credentials"]
        .as_array()
        .expect("credentials list")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no credential {name} in {body}"))
}

#[tokio::test]
async fn a_credential_that_loses_its_token_degrades_only_its_routes() {
    let (h, flaky) = with_flaky("").await;
    assert_eq!(h.admin_get("/readyz").await, (200, "ready\n".to_owned()));
    assert_eq!(outcome(&h, "/flaky/x").await, (200, None));
    let up = credential_up(&h).await;
    assert_eq!(up.get("flaky"), Some(&1.0), "{up:?}");

    break_flaky(&h, &flaky).await;

    assert_eq!(
        h.admin_get("/readyz").await,
        (200, "ready\n".to_owned()),
        "it held a token since start: the replica stays ready"
    );
    assert_eq!(
        outcome(&h, "/deploy/api/projects/v1").await,
        (200, None),
        "other credentials' routes keep working"
    );
    let response = h.get("/flaky/x").await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(json(response).await["error"], "token_unavailable");

    let up = credential_up(&h).await;
    assert_eq!(up.get("flaky"), Some(&0.0), "{up:?}");
    assert_eq!(up.get("automation"), Some(&1.0), "{up:?}");

    let (status, body) = admin_json(&h, "/readyz?verbose").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true, "{body}");
    assert_eq!(body["ready_requires"], "first_tokens", "{body}");
    let entry = verbose_entry(&body, "flaky");
    assert_eq!(entry["up"], false, "{body}");
    assert_eq!(entry["has_been_up"], true, "{body}");
    assert!(
        entry["reason"]
            .as_str()
            .is_some_and(|r| r.contains("flaky")),
        "{body}"
    );
    let entry = verbose_entry(&body, "automation");
    assert_eq!(entry["up"], true, "{body}");
    assert!(entry["reason"].is_null(), "{body}");

    // The endpoint recovers: so do the credential and its routes.
    flaky.set_token_fault(None);
    let credential = h.proxy.credential("flaky").expect("flaky credential");
    assert!(eventually(NOT_A_HANG, || credential.current().is_some()).await);
    assert_eq!(outcome(&h, "/flaky/x").await, (200, None));
    assert_eq!(credential_up(&h).await.get("flaky"), Some(&1.0));
}

#[tokio::test]
async fn ready_requires_all_tokens_makes_readyz_503_when_a_credential_loses_its_token() {
    let (h, flaky) = with_flaky("ready_requires = \"all_tokens\"").await;
    assert_eq!(h.admin_get("/readyz").await.0, 200);

    break_flaky(&h, &flaky).await;

    let (status, body) = admin_json(&h, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false, "{body}");
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains("flaky"), "names the credential: {body}");
    assert!(!reasons.contains("automation"), "{body}");

    let (status, body) = admin_json(&h, "/readyz?verbose").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready_requires"], "all_tokens", "{body}");
    assert_eq!(verbose_entry(&body, "flaky")["up"], false, "{body}");

    // Readiness is the only difference: the routes answer as without the strict rule.
    assert_eq!(outcome(&h, "/deploy/x").await, (200, None));
    let (status, code) = outcome(&h, "/flaky/x").await;
    assert_eq!((status, code.as_deref()), (503, Some("token_unavailable")));
    assert_eq!(credential_up(&h).await.get("flaky"), Some(&0.0));
}

#[tokio::test]
async fn a_credential_that_never_held_a_token_keeps_readyz_503() {
    let emulator = Emulator::builder().start().await.expect("emulator starts");
    let token_url = emulator.token_url();
    let wrong = oauth_route("wrong", "not-the-secret", &token_url, "/wrong", &emulator);
    let h = start(emulator, &(admin("") + &wrong)).await;
    h.wait_ready().await;
    let credential = h.proxy.credential("wrong").expect("wrong credential");
    assert!(
        eventually(NOT_A_HANG, || credential.status().last_error.is_some()).await,
        "its first token request was refused"
    );

    let (status, body) = admin_json(&h, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let reasons = body["reasons"].to_string();
    assert!(reasons.contains("wrong"), "names the credential: {body}");
    assert!(!reasons.contains("automation"), "{body}");

    let (status, body) = admin_json(&h, "/readyz?verbose").await;
    assert_eq!(status, 503, "{body}");
    let entry = verbose_entry(&body, "wrong");
    assert_eq!(entry["up"], false, "{body}");
    assert_eq!(entry["has_been_up"], false, "{body}");
    assert_eq!(verbose_entry(&body, "automation")["up"], true, "{body}");

    // Serving does not wait for readiness: the good credential's routes work.
    assert_eq!(outcome(&h, "/deploy/x").await, (200, None));
    let (status, code) = outcome(&h, "/wrong/x").await;
    assert_eq!((status, code.as_deref()), (503, Some("token_unavailable")));
    let up = credential_up(&h).await;
    assert_eq!(up.get("wrong"), Some(&0.0), "{up:?}");
    assert_eq!(up.get("automation"), Some(&1.0), "{up:?}");
}

#[tokio::test]
async fn a_header_credential_route_keeps_answering_while_the_oauth_credential_is_down() {
    let emulator = Emulator::builder()
        .token_lifetime(SHORT_LIFETIME)
        .start()
        .await
        .expect("emulator starts");
    // A static value the emulated API accepts: a long-lived token it signed, sent as a header.
    let static_token = emulator.mint_token(
        DEFAULT_CLIENT_ID,
        DEFAULT_AUDIENCE,
        Duration::from_secs(3600),
    );
    let extra = admin("")
        + &format!(
            "\n[credentials.edge]\ntype = \"header\"\nheader = \"authorization\"\nvalue = {}\n\
             \n[[routes]]\nprefix = \"/static\"\nupstream = \"{}\"\ncredential = \"edge\"\n",
            toml_str(&format!("Bearer {static_token}")),
            emulator.api_base(Api::Deploy)
        );
    let h = start(emulator, &extra).await;
    h.wait_ready().await;
    assert_eq!(outcome(&h, "/static/x").await, (200, None));

    h.emulator.set_token_fault(Some(TokenFault::Status(500)));
    let credential = h.proxy.credential("automation").expect("credential");
    assert!(
        eventually(NOT_A_HANG, || credential.current().is_none()).await,
        "the short-lived token ran out"
    );

    let (status, code) = outcome(&h, "/deploy/x").await;
    assert_eq!((status, code.as_deref()), (503, Some("token_unavailable")));
    let before = h.emulator.upstream_requests();
    for _ in 0..3 {
        assert_eq!(
            outcome(&h, "/static/x").await,
            (200, None),
            "the static header needs no token"
        );
    }
    assert_eq!(h.emulator.upstream_requests(), before + 3);
    let seen = h.emulator.seen_requests();
    let last = seen.last().expect("a request");
    assert!(last.token_valid, "the static value reached the upstream");

    assert_eq!(h.admin_get("/readyz").await.0, 200);
    let up = credential_up(&h).await;
    assert_eq!(up.get("automation"), Some(&0.0), "{up:?}");
    assert_ne!(
        up.get("edge"),
        Some(&0.0),
        "a header credential is never down: {up:?}"
    );
}
