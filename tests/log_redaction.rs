//! The audit trail without the secrets: a full run captured at trace level by the binary's own
//! subscriber (its filter, its formats), in text and in JSON, contains access lines and never a
//! secret, key, token, `Authorization` value, query string or the token endpoint's raw error
//! body.
//!
//! Each format has its run: the proxy serves inline on the test's single-threaded runtime with
//! the subscriber installed for the test's scope, so every event and access line of the run is
//! captured, and the two runs do not see each other's.

mod support;

use sitecore_auth_proxy::emulator::{Emulator, TokenFault, UpstreamFault};
use sitecore_auth_proxy::logging::{self, Format, MemoryWriter};
use support::{json, Harness, Setup};

const SECRET: &str = "cs-LOGMARK-secret-3e1f";
const CLIENT_KEY: &str = "ck-LOGMARK-key-9a0c";
const QUERY_MARK: &str = "qs-LOGMARK-query-5b77";
const HEADER_KEY: &str = "hk-LOGMARK-edge-11aa";

async fn full_run() -> Vec<String> {
    let mut forbidden = vec![
        SECRET.to_owned(),
        CLIENT_KEY.to_owned(),
        QUERY_MARK.to_owned(),
        HEADER_KEY.to_owned(),
    ];
    let setup = Setup {
        emulator: Emulator::builder().client("log-client", SECRET),
        client_id: "log-client".into(),
        client_secret: SECRET.into(),
        extra_toml: format!(
            "\n[credentials.edge]\ntype = \"header\"\nheader = \"sc_apikey\"\nvalue = \"{HEADER_KEY}\"\n\
             \n[[routes]]\nprefix = \"/edge\"\nupstream = \"http://127.0.0.1:9/\"\ncredential = \"edge\"\n\
             \n[[clients]]\nname = \"log-team\"\nkey = \"{CLIENT_KEY}\"\n"
        ),
        ..Setup::default()
    };
    let emulator = setup.emulator.clone().start().await.expect("emulator");
    // The first token request is refused with Auth0's body, then one 500: neither body may be logged.
    emulator.push_token_faults([TokenFault::AccessDenied, TokenFault::Status(500)]);
    let text = support::config_text(&setup, &emulator);
    let h = Harness::inline(emulator, &text, setup.tuning).await;
    let credential = h.proxy.credential("automation").expect("credential");
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || credential
            .current()
            .is_some())
        .await
    );
    forbidden.push(
        credential
            .current()
            .expect("token")
            .authorization
            .to_str()
            .expect("ascii")
            .trim_start_matches("Bearer ")
            .to_owned(),
    );

    // Requests with the key in both headers and a query string that must not be logged.
    for header in ["authorization", "x-api-key"] {
        let value = if header == "authorization" {
            format!("Bearer {CLIENT_KEY}")
        } else {
            CLIENT_KEY.to_owned()
        };
        let r = h
            .http
            .get(format!(
                "{}?token={QUERY_MARK}",
                h.url("/deploy/api/projects/v1")
            ))
            .header(header, value)
            .send()
            .await
            .expect("response");
        assert_eq!(r.status(), 200);
    }
    // A local token, then a call with it.
    let issued = json(
        h.http
            .post(h.url("/oauth/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "log-team"),
                ("client_secret", CLIENT_KEY),
            ])
            .send()
            .await
            .expect("token"),
    )
    .await["access_token"]
        .as_str()
        .expect("issued")
        .to_owned();
    forbidden.push(issued.clone());
    let r = h
        .http
        .get(h.url("/deploy/x"))
        .bearer_auth(&issued)
        .send()
        .await
        .expect("response");
    assert_eq!(r.status(), 200);
    // An upstream 401 and its replay with a fresh token.
    h.emulator
        .push_upstream_faults([UpstreamFault::Status(401)]);
    let r = h
        .http
        .post(h.url("/authoring"))
        .header("x-api-key", CLIENT_KEY)
        .body("{}")
        .send()
        .await
        .expect("response");
    assert_eq!(r.status(), 200);
    forbidden.push(
        credential
            .current()
            .expect("token")
            .authorization
            .to_str()
            .expect("ascii")
            .trim_start_matches("Bearer ")
            .to_owned(),
    );
    // The header credential towards an unreachable upstream, a refused key, a bad path.
    let r = h
        .http
        .get(h.url("/edge/x"))
        .header("x-api-key", CLIENT_KEY)
        .send()
        .await
        .expect("response");
    assert_eq!(r.status(), 502);
    let r = h
        .http
        .get(h.url("/deploy/x"))
        .header("x-api-key", "wrong-LOGMARK")
        .send()
        .await
        .expect("response");
    assert_eq!(r.status(), 401);
    forbidden.push("wrong-LOGMARK".into());
    // Raw error bodies of the token endpoint.
    forbidden.push("error_description".into());
    forbidden.push("Unauthorized\"".into());
    forbidden
}

/// Runs [`full_run`] under the binary's subscriber in `format` at trace level; its logs, and
/// what they must not contain.
async fn captured_run(format: Format) -> (String, Vec<String>) {
    let capture = MemoryWriter::default();
    let scope = tracing::dispatcher::set_default(&logging::subscriber(
        format,
        "trace",
        capture.clone(),
        false,
    ));
    let forbidden = full_run().await;
    drop(scope);
    (capture.take(), forbidden)
}

fn assert_no_secret(name: &str, logs: &str, forbidden: &[String]) {
    assert!(
        logs.lines().count() > 10,
        "{name}: logs were captured:\n{logs}"
    );
    assert!(
        logs.contains("log-team"),
        "{name}: the access log names the client"
    );
    assert!(
        logs.contains("/deploy/api/projects/v1"),
        "{name}: paths are logged"
    );
    assert!(
        logs.contains("access_denied"),
        "{name}: the endpoint's error code may be logged"
    );
    for needle in forbidden {
        if let Some(line) = logs.lines().find(|l| l.contains(needle.as_str())) {
            panic!("{name}: {needle:?} leaked into the logs:\n{line}");
        }
    }
    assert!(
        !logs.to_ascii_lowercase().contains("bearer ey"),
        "{name}: no bearer JWT"
    );
}

/// Requests the run makes through the proxy: each has its access line.
const REQUESTS: usize = 6;

#[tokio::test]
async fn trace_level_text_logs_of_a_full_run_contain_no_secret() {
    let (logs, forbidden) = captured_run(Format::Text).await;
    assert_no_secret("text", &logs, &forbidden);
    let access = logs.lines().filter(|l| l.contains("  INFO access: "));
    assert!(access.count() >= REQUESTS, "{logs}");
}

#[tokio::test]
async fn trace_level_json_logs_of_a_full_run_contain_no_secret() {
    let (logs, forbidden) = captured_run(Format::Json).await;
    assert_no_secret("json", &logs, &forbidden);
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is one JSON object"))
        .collect();
    let access = lines.iter().filter(|l| l["target"] == "access").count();
    assert!(access >= REQUESTS, "{logs}");
}
