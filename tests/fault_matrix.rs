//! The fault matrix: each way a neighbour can break, at the token endpoint and at the upstream,
//! and what a client of the proxy sees. One [`FaultServer`] per cell plays the broken neighbour;
//! the emulator plays everything healthy.
//!
//! | fault                          | token endpoint (cold credential)       | upstream (POST, PATCH, DELETE, each once)        |
//! |--------------------------------|----------------------------------------|--------------------------------------------------|
//! | refused connection             | 503 `token_unavailable`, `unreachable` | 502 `upstream_unreachable`, never received       |
//! | hang (timeout)                 | 503 `token_unavailable`, `timeout`     | 504 `upstream_timeout`, received once            |
//! | reset mid response head        | 503 `token_unavailable`, `unreachable` | 502 `upstream_unreachable`, received once        |
//! | reset mid response body        | 503 `token_unavailable`, `unreachable` | 200, then the body breaks off (transport error)  |
//! | 5xx (503 with a body)          | 503 `token_unavailable`, `temporarily_unavailable` | 503 relayed with the upstream's body |
//! | 429 with `Retry-After: 1`      | 503 `token_unavailable`, `rate_limited` | 429 relayed with `Retry-After: 1`               |
//! | garbage (not HTTP)             | 503 `token_unavailable`, `unreachable` | 502 `upstream_unreachable`, received once        |
//! | garbage body (200, not JSON)   | 503 `token_unavailable`, `malformed_response` | 200 relayed byte for byte                 |
//! | slow drip (a byte per 60 ms)   | 503 `token_unavailable`, `timeout`     | 504 `upstream_timeout`, received once            |
//! | TLS: certificate from an untrusted CA | 503 `token_unavailable`, `unreachable`, no request | 502 `upstream_unreachable`, no request |
//! | TLS: plaintext answer          | 503 `token_unavailable`, `unreachable`, no request | 502 `upstream_unreachable`, no request |
//! | TLS: trusted CA, wrong host    | 503 `token_unavailable`, `unreachable`, no request | 502 `upstream_unreachable`, no request |
//! | upstream 401 once, then 200    | -                                      | 200; the upstream sees exactly 2 requests (the one allowed replay) |
//!
//! The second word of a token-endpoint cell is the credential's `last_error` (what `/status`
//! and `/readyz` show). Every token-endpoint answer carries `Retry-After`, and no request is ever
//! forwarded without a token. Upstream faults the proxy can name become its own JSON errors
//! (502 when the exchange broke, 504 when no response head came in time); an upstream that
//! answered, however badly, is relayed as it answered, because the status is the upstream's to
//! give. Once a response head has been relayed the proxy cannot change the status: a body that
//! breaks off is cut off for the client too (never ended cleanly), so the client can tell.
//!
//! In every cell the proxy keeps serving another route (`/healthy`, on the emulator, with a
//! healthy credential) and the in-flight gauge returns to zero. Each faulted upstream request
//! follows a `/warmup` request on the same pooled connection, where a careless client would
//! retry: the fault server still receives each non-idempotent request at most once.

mod support;

#[path = "support/faults.rs"]
mod faults;

use std::path::PathBuf;
use std::time::Duration;

use faults::{Fault, FaultServer};
use reqwest::Method;
use sitecore_auth_proxy::emulator::{Api, Emulator, UpstreamFault};
use sitecore_auth_proxy::token::Tuning;
use support::tls::{self, TestCa};
use support::{eventually, json, toml_str, Harness, Setup};

/// Short timeouts keep the file fast: a hanging neighbour costs one second.
const SERVER_EXTRA: &str = "request_timeout = \"1s\"\nconnect_timeout = \"1s\"\n";

fn tuning() -> Tuning {
    Tuning {
        token_request_timeout: Duration::from_secs(1),
        ..support::fast_tuning()
    }
}

/// The rows of the matrix.
#[derive(Clone, Copy, Debug)]
enum Case {
    Refused,
    Hang,
    ResetMidHead,
    ResetMidBody,
    Status5xx,
    TooMany,
    Garbage,
    GarbageBody,
    SlowDrip,
    UntrustedCert,
    PlaintextToTls,
    WrongHostCert,
}

impl Case {
    /// Whether the proxy is told to speak TLS to the fault server.
    fn tls(self) -> bool {
        matches!(
            self,
            Case::UntrustedCert | Case::PlaintextToTls | Case::WrongHostCert
        )
    }

    /// Whether the fault server reads an HTTP request before misbehaving.
    fn reads_requests(self) -> bool {
        !matches!(self, Case::Refused) && !self.tls()
    }

    /// The fault server for this row; `trusted` is the CA the proxy trusts.
    fn fault(self, trusted: &TestCa) -> Fault {
        match self {
            Case::Refused => Fault::Refuse,
            Case::Hang => Fault::Hang,
            Case::ResetMidHead => Fault::ResetMidHead,
            Case::ResetMidBody => Fault::ResetMidBody,
            Case::Status5xx => Fault::Status5xx,
            Case::TooMany => Fault::TooMany,
            Case::Garbage => Fault::Garbage,
            Case::GarbageBody => Fault::GarbageBody,
            Case::SlowDrip => Fault::SlowDrip,
            Case::UntrustedCert => {
                let untrusted = TestCa::new("a CA the proxy does not trust");
                Fault::Tls(tls::server_config(&untrusted.server()))
            }
            Case::PlaintextToTls => Fault::PlaintextToTls,
            Case::WrongHostCert => {
                Fault::Tls(tls::server_config(&trusted.server_for("wrong.example")))
            }
        }
    }
}

/// The token endpoint column: the client always gets 503 `token_unavailable` with
/// `Retry-After`; this is the credential's `last_error`, the reason an operator sees.
fn token_last_error(case: Case) -> &'static str {
    match case {
        Case::Refused
        | Case::ResetMidHead
        | Case::ResetMidBody
        | Case::Garbage
        | Case::UntrustedCert
        | Case::PlaintextToTls
        | Case::WrongHostCert => "unreachable",
        Case::Hang | Case::SlowDrip => "timeout",
        // The endpoint's own OAuth error code, sanitised; never its description.
        Case::Status5xx => "temporarily_unavailable",
        Case::TooMany => "rate_limited",
        Case::GarbageBody => "malformed_response",
    }
}

/// What a client of a route whose upstream misbehaves sees.
#[derive(Debug)]
enum Seen {
    /// The proxy's own JSON error.
    ProxyError { status: u16, code: &'static str },
    /// The upstream's answer, relayed as it came.
    Relayed {
        status: u16,
        body: &'static [u8],
        retry_after: Option<&'static str>,
    },
    /// The upstream's 200 head, then a body that breaks off.
    Truncated,
}

/// The upstream column.
fn upstream_expectation(case: Case) -> Seen {
    let unreachable = Seen::ProxyError {
        status: 502,
        code: "upstream_unreachable",
    };
    let timeout = Seen::ProxyError {
        status: 504,
        code: "upstream_timeout",
    };
    match case {
        Case::Refused
        | Case::ResetMidHead
        | Case::Garbage
        | Case::UntrustedCert
        | Case::PlaintextToTls
        | Case::WrongHostCert => unreachable,
        Case::Hang | Case::SlowDrip => timeout,
        Case::ResetMidBody => Seen::Truncated,
        Case::Status5xx => Seen::Relayed {
            status: 503,
            body: faults::STATUS_5XX_BODY.as_bytes(),
            retry_after: None,
        },
        Case::TooMany => Seen::Relayed {
            status: 429,
            body: faults::TOO_MANY_BODY.as_bytes(),
            retry_after: Some("1"),
        },
        Case::GarbageBody => Seen::Relayed {
            status: 200,
            body: faults::GARBAGE_BODY,
            retry_after: None,
        },
    }
}

/// Which neighbour the fault server replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    TokenEndpoint,
    Upstream,
}

/// One cell: the proxy, the emulator and the fault server.
struct Cell {
    h: Harness,
    server: FaultServer,
    _ca_dir: PathBuf,
}

/// Two credentials and two routes. `automation` fetches from `token_url` (the fault server in
/// token-endpoint cells) while its issuer and JWKS stay on the emulator; `healthy` always uses
/// the emulator. `/faulty` forwards to `faulty_upstream` with `automation`; `/healthy` forwards
/// to the emulator with `healthy`. `/faulty` does not honour an upstream's `Retry-After`: the
/// matrix checks what each fault relays, request after request (the pause an upstream 429 starts
/// is `tests/rate_limits.rs`'s).
fn config_text(emulator: &Emulator, token_url: &str, faulty_upstream: &str, ca: &str) -> String {
    let id = toml_str(sitecore_auth_proxy::emulator::DEFAULT_CLIENT_ID);
    let secret = toml_str(sitecore_auth_proxy::emulator::DEFAULT_CLIENT_SECRET);
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{SERVER_EXTRA}upstream_ca = [{ca}]\n\n\
         [credentials.automation]\nclient_id = {id}\nclient_secret = {secret}\n\
         token_url = {token_url}\nissuer = {issuer}\njwks_url = {jwks}\n\n\
         [credentials.healthy]\nclient_id = {id}\nclient_secret = {secret}\n\
         token_url = {healthy_token_url}\n\n\
         [[routes]]\nprefix = \"/faulty\"\nupstream = {faulty_upstream}\ncredential = \"automation\"\n\
         honor_upstream_retry_after = false\n\n\
         [[routes]]\nprefix = \"/healthy\"\nupstream = {healthy_upstream}\ncredential = \"healthy\"\n",
        ca = toml_str(ca),
        token_url = toml_str(token_url),
        issuer = toml_str(&emulator.issuer()),
        jwks = toml_str(&emulator.jwks_url()),
        healthy_token_url = toml_str(&emulator.token_url()),
        faulty_upstream = toml_str(faulty_upstream),
        healthy_upstream = toml_str(&emulator.api_base(Api::Deploy)),
    )
}

async fn start(case: Case, side: Side) -> Cell {
    let ca = TestCa::new("fault matrix CA");
    let ca_dir = tls::temp_dir("fault-matrix");
    let ca_file = tls::write(&ca_dir, "ca.pem", &ca.pem());
    let server = FaultServer::start(case.fault(&ca)).await;
    // The test CA's certificates name `localhost`; plain cells use the address itself.
    let origin = if case.tls() {
        format!("https://localhost:{}", server.addr().port())
    } else {
        format!("http://{}", server.addr())
    };
    let emulator = Emulator::builder().start().await.expect("emulator starts");
    let (token_url, faulty_upstream) = match side {
        Side::TokenEndpoint => (
            format!("{origin}/oauth/token"),
            emulator.api_base(Api::Deploy),
        ),
        Side::Upstream => (emulator.token_url(), format!("{origin}/api")),
    };
    let text = config_text(
        &emulator,
        &token_url,
        &faulty_upstream,
        &ca_file.display().to_string(),
    );
    let h = Harness::from_text(emulator, &text, tuning()).await;
    Cell {
        h,
        server,
        _ca_dir: ca_dir,
    }
}

impl Cell {
    /// Another route keeps working, and nothing stays in flight.
    async fn assert_still_serving(&self, label: &str) {
        let response = self
            .h
            .http
            .get(self.h.url("/healthy/api/projects/v1"))
            .send()
            .await
            .expect("response");
        assert_eq!(response.status(), 200, "{label}: the healthy route answers");
        assert_eq!(json(response).await["api"], "deploy", "{label}");
        let stats = self.h.proxy.metrics();
        assert!(
            eventually(Duration::from_secs(5), || stats.inflight.get() == 0).await,
            "{label}: the in-flight gauge returns to 0 (it is {})",
            stats.inflight.get()
        );
    }

    /// A sample of the proxy's Prometheus text, 0 when the series is absent.
    fn metric(&self, series: &str) -> f64 {
        let text = self.h.proxy.shared().metrics.encode();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

async fn run_token_cell(case: Case) {
    let label = format!("token endpoint, {case:?}");
    let cell = start(case, Side::TokenEndpoint).await;
    let h = &cell.h;

    for method in [Method::GET, Method::POST] {
        let response = h
            .http
            .request(method.clone(), h.url("/faulty/api/projects/v1"))
            .header("content-type", "application/json")
            .body(if method == Method::POST { "{}" } else { "" })
            .send()
            .await
            .expect("response");
        assert_eq!(response.status(), 503, "{label}, {method}");
        let retry_after: u64 = response
            .headers()
            .get("retry-after")
            .unwrap_or_else(|| panic!("{label}: Retry-After is set"))
            .to_str()
            .expect("ascii")
            .parse()
            .expect("whole seconds");
        assert!(retry_after >= 1, "{label}: Retry-After {retry_after}");
        let text = response.text().await.expect("body");
        assert!(
            !text.contains("fault-server"),
            "{label}: the endpoint's body is never relayed: {text}"
        );
        let body: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(body["error"], "token_unavailable", "{label}, {method}");
    }

    let credential = h.proxy.credential("automation").expect("credential");
    let status = credential.status();
    assert_eq!(
        status.last_error.as_deref(),
        Some(token_last_error(case)),
        "{label}: {status:?}"
    );
    assert!(
        h.emulator
            .seen_requests()
            .iter()
            .all(|r| r.api != Api::Deploy),
        "{label}: nothing was forwarded without a token"
    );
    // Requests never fetch for themselves: every token request is one of the refresher's
    // attempts (completed, or the one under way).
    let posts = cell.server.received("POST");
    assert!(
        posts <= status.attempts + 1,
        "{label}: {posts} token requests for {} attempts",
        status.attempts
    );
    if case.reads_requests() {
        assert!(posts >= 1, "{label}: the token endpoint was asked");
    } else {
        assert_eq!(
            cell.server.requests(),
            0,
            "{label}: the client secret never reached a server that failed TLS"
        );
    }
    if case.tls() {
        assert!(
            cell.server.connections() >= 1,
            "{label}: the proxy connected, then refused the handshake"
        );
    }
    cell.assert_still_serving(&label).await;
}

async fn run_upstream_cell(case: Case) {
    let label = format!("upstream, {case:?}");
    let expect = upstream_expectation(case);
    let cell = start(case, Side::Upstream).await;
    let h = &cell.h;
    h.wait_ready().await;

    // One method after the other, each after a warm-up on the same pooled connection.
    for method in [Method::POST, Method::PATCH, Method::DELETE] {
        let label = format!("{label}, {method}");
        if case.reads_requests() {
            let warmup = h
                .http
                .get(h.url("/faulty/warmup"))
                .send()
                .await
                .expect("warm-up response");
            assert_eq!(warmup.status(), 200, "{label}: warm-up");
            warmup.bytes().await.expect("warm-up body");
        }
        let mut request = h.http.request(method.clone(), h.url("/faulty/items/42"));
        if method != Method::DELETE {
            request = request
                .header("content-type", "application/json")
                .body(r#"{"name":"fault matrix","version":2}"#);
        }
        let response = request.send().await.expect("response");
        let status = response.status().as_u16();
        match &expect {
            Seen::ProxyError {
                status: expected,
                code,
            } => {
                assert_eq!(status, *expected, "{label}");
                let body = json(response).await;
                assert_eq!(body["error"], *code, "{label}");
            }
            Seen::Relayed {
                status: expected,
                body,
                retry_after,
            } => {
                assert_eq!(status, *expected, "{label}");
                let header = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().expect("ascii").to_owned());
                assert_eq!(header.as_deref(), *retry_after, "{label}: Retry-After");
                let got = response.bytes().await.expect("body");
                assert_eq!(&got[..], *body, "{label}: relayed byte for byte");
            }
            Seen::Truncated => {
                assert_eq!(status, 200, "{label}: the head was already relayed");
                assert!(
                    response.bytes().await.is_err(),
                    "{label}: the client sees the body break off, not a clean end"
                );
            }
        }
    }

    let expected = u64::from(case.reads_requests());
    for method in ["POST", "PATCH", "DELETE"] {
        assert_eq!(
            cell.server.received(method),
            expected,
            "{label}: {method} reached the upstream {expected} time(s), never twice"
        );
    }
    assert_eq!(
        cell.server.requests(),
        3 * expected,
        "{label}: no other request"
    );
    if case.tls() {
        assert!(
            cell.server.connections() >= 3,
            "{label}: the proxy connected, then refused the handshake"
        );
    }
    if let Seen::ProxyError { status, .. } = expect {
        let kind = if status == 504 {
            "timeout"
        } else {
            "unreachable"
        };
        let series = format!("proxy_upstream_errors_total{{route=\"/faulty\",kind=\"{kind}\"}}");
        assert_eq!(cell.metric(&series), 3.0, "{label}: {series}");
    }
    cell.assert_still_serving(&label).await;
}

/// One test per cell, so a failing cell names itself and can be ignored alone.
macro_rules! cells {
    ($runner:ident: $( $(#[$attr:meta])* $name:ident => $case:expr; )*) => {
        $(
            #[tokio::test]
            $(#[$attr])*
            async fn $name() {
                $runner($case).await;
            }
        )*
    };
}

mod token_endpoint {
    use super::*;

    cells! { run_token_cell:
        refused => Case::Refused;
        hang => Case::Hang;
        reset_mid_head => Case::ResetMidHead;
        reset_mid_body => Case::ResetMidBody;
        status_5xx => Case::Status5xx;
        too_many_requests => Case::TooMany;
        garbage => Case::Garbage;
        garbage_body => Case::GarbageBody;
        slow_drip => Case::SlowDrip;
        tls_untrusted_ca => Case::UntrustedCert;
        tls_plaintext_answer => Case::PlaintextToTls;
        tls_wrong_host => Case::WrongHostCert;
    }
}

mod upstream {
    use super::*;

    cells! { run_upstream_cell:
        refused => Case::Refused;
        hang => Case::Hang;
        reset_mid_head => Case::ResetMidHead;
        reset_mid_body => Case::ResetMidBody;
        status_5xx => Case::Status5xx;
        too_many_requests => Case::TooMany;
        garbage => Case::Garbage;
        garbage_body => Case::GarbageBody;
        slow_drip => Case::SlowDrip;
        tls_untrusted_ca => Case::UntrustedCert;
        tls_plaintext_answer => Case::PlaintextToTls;
        tls_wrong_host => Case::WrongHostCert;
    }

    /// The one duplicate DESIGN.md allows: after an upstream 401 the request is replayed once
    /// with a fresh token. A second 401 inside the forced-refresh interval is not replayed.
    #[tokio::test]
    async fn a_401_is_replayed_once_and_only_once() {
        let h = Harness::with(Setup {
            server_extra: SERVER_EXTRA.to_owned(),
            tuning: tuning(),
            ..Setup::default()
        })
        .await;
        h.wait_ready().await;

        h.emulator
            .push_upstream_faults([UpstreamFault::Status(401)]);
        let response = h
            .http
            .post(h.url("/authoring"))
            .header("content-type", "application/json")
            .body(r#"{"query":"mutation { createItem(name: \"once\") { id } }"}"#)
            .send()
            .await
            .expect("response");
        assert_eq!(response.status(), 200, "the client never saw the 401");
        let seen = h.emulator.seen_requests();
        assert_eq!(
            seen.len(),
            2,
            "the upstream saw the POST and its one replay"
        );
        assert!(seen.iter().all(|r| r.method == "POST"));
        assert_eq!(seen[0].body_sha256, seen[1].body_sha256, "the same body");
        assert_ne!(
            seen[0].authorization, seen[1].authorization,
            "with a fresh token"
        );
        assert!(seen[1].token_valid, "the replay carried a valid token");
        assert_eq!(h.emulator.token_requests(), 2, "one forced refresh");
        assert_eq!(h.proxy.metrics().replays.get(), 1);

        h.emulator
            .push_upstream_faults([UpstreamFault::Status(401)]);
        let response = h
            .http
            .patch(h.url("/deploy/api/environments/v2/7"))
            .header("content-type", "application/json")
            .body(r#"{"name":"twice?"}"#)
            .send()
            .await
            .expect("response");
        assert_eq!(
            response.status(),
            401,
            "inside the forced-refresh interval the 401 goes back"
        );
        assert_eq!(h.emulator.upstream_requests(), 3, "the PATCH was sent once");
        assert_eq!(h.emulator.token_requests(), 2, "no second forced refresh");
        assert_eq!(h.proxy.metrics().replays.get(), 1);

        let response = h
            .http
            .get(h.url("/edge-admin/x"))
            .send()
            .await
            .expect("response");
        assert_eq!(response.status(), 200, "other routes keep serving");
        response.bytes().await.expect("body");
        let stats = h.proxy.metrics();
        assert!(eventually(Duration::from_secs(5), || stats.inflight.get() == 0).await);
    }
}
