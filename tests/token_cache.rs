//! The verified token cache: one fetch for many cold requests, bad tokens never injected,
//! secrets encoded intact.

mod support;

use std::time::Duration;

use sitecore_auth_proxy::emulator::{Emulator, TokenFault};
use support::{json, Harness, Setup};

#[tokio::test]
async fn two_hundred_concurrent_cold_requests_share_one_token_request() {
    // The token endpoint answers slowly, so every request arrives while the first fetch is in
    // flight and must join it.
    let h = Harness::prepared(Setup::default(), |emulator| {
        emulator.set_token_fault(Some(TokenFault::Delay(Duration::from_millis(500))));
    })
    .await;

    let mut tasks = Vec::new();
    for i in 0..200 {
        let http = h.http.clone();
        let url = h.url(&format!("/deploy/api/projects/v1?i={i}"));
        tasks.push(tokio::spawn(async move {
            http.get(url)
                .send()
                .await
                .expect("response")
                .status()
                .as_u16()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), 200);
    }
    assert_eq!(h.emulator.token_requests(), 1, "exactly one token request");
    assert_eq!(h.emulator.upstream_requests(), 200);
    assert!(h.emulator.seen_requests().iter().all(|r| r.token_valid));
}

async fn assert_never_injected(fault: TokenFault) {
    let h = Harness::prepared(Setup::default(), |emulator| {
        emulator.set_token_fault(Some(fault.clone()));
    })
    .await;

    for _ in 0..3 {
        let response = h.get("/deploy/api/projects/v1").await;
        assert_eq!(response.status(), 503, "{fault:?}");
        assert!(response.headers().contains_key("retry-after"), "{fault:?}");
        let body = json(response).await;
        assert_eq!(body["error"], "token_unavailable", "{fault:?}");
    }
    assert!(
        h.emulator.token_requests() >= 1,
        "{fault:?}: the token was requested"
    );
    assert_eq!(
        h.emulator.upstream_requests(),
        0,
        "{fault:?}: nothing reached the upstream"
    );
}

#[tokio::test]
async fn wrong_audience_is_never_injected() {
    assert_never_injected(TokenFault::WrongAudience).await;
}

#[tokio::test]
async fn wrong_issuer_is_never_injected() {
    assert_never_injected(TokenFault::WrongIssuer).await;
}

#[tokio::test]
async fn alg_none_is_never_injected() {
    assert_never_injected(TokenFault::AlgNone).await;
}

#[tokio::test]
async fn hs256_is_never_injected() {
    assert_never_injected(TokenFault::Hs256).await;
}

#[tokio::test]
async fn expired_token_is_never_injected() {
    assert_never_injected(TokenFault::Expired).await;
}

#[tokio::test]
async fn unknown_kid_is_never_injected() {
    assert_never_injected(TokenFault::UnknownKid).await;
}

#[tokio::test]
async fn malformed_token_response_is_never_injected() {
    assert_never_injected(TokenFault::MalformedBody).await;
}

#[tokio::test]
async fn secret_with_form_special_characters_arrives_intact() {
    for format in ["form", "json"] {
        let secret = "s3cr+t&a=b%20c d%";
        let setup = Setup {
            emulator: Emulator::builder().client("special-client", secret),
            client_id: "special-client".into(),
            client_secret: secret.into(),
            credential_extra: format!("request_format = \"{format}\""),
            ..Setup::default()
        };
        let h = Harness::with(setup).await;
        let response = h.get("/deploy/api/projects/v1").await;
        assert_eq!(response.status(), 200, "{format}");
        let log = h.emulator.token_request_log();
        assert_eq!(log.len(), 1, "{format}");
        assert_eq!(
            log[0].outcome_status, 200,
            "{format}: the emulator accepted the secret"
        );
        assert!(log[0].content_type.contains(if format == "form" {
            "application/x-www-form-urlencoded"
        } else {
            "application/json"
        }));
    }
}

#[tokio::test]
async fn wrong_client_secret_gives_503_and_nothing_upstream() {
    let setup = Setup {
        client_secret: "not-the-secret".into(),
        ..Setup::default()
    };
    let h = Harness::with(setup).await;
    let response = h.get("/deploy/api/projects/v1").await;
    assert_eq!(response.status(), 503);
    let body = response.text().await.expect("body");
    assert!(body.contains("token_unavailable"));
    assert!(
        !body.contains("Unauthorized"),
        "the endpoint's body is not relayed: {body}"
    );
    assert_eq!(h.emulator.upstream_requests(), 0);
}

#[tokio::test]
async fn client_secret_basic_sends_the_credentials_as_http_basic_and_not_in_the_body() {
    // `:` and `%` are what RFC 6749 2.3.1's form-encoding before the base64 is for.
    let secret = "s3cr:t%2F+&x y";
    for format in ["form", "json"] {
        let setup = Setup {
            emulator: Emulator::builder().client("basic:client", secret),
            client_id: "basic:client".into(),
            client_secret: secret.into(),
            credential_extra: format!(
                "auth_method = \"client_secret_basic\"\nrequest_format = \"{format}\""
            ),
            ..Setup::default()
        };
        let h = Harness::with(setup).await;
        let response = h.get("/deploy/api/projects/v1").await;
        assert_eq!(response.status(), 200, "{format}");
        let log = h.emulator.token_request_log();
        assert_eq!(log.len(), 1, "{format}");
        assert_eq!(
            log[0].outcome_status, 200,
            "{format}: the emulator accepted it"
        );
        assert!(log[0].basic_auth, "{format}: HTTP Basic was used");
        assert!(!log[0].secret_in_body, "{format}: no secret in the body");
        assert_eq!(log[0].client_id.as_deref(), Some("basic:client"));
    }
}

#[tokio::test]
async fn client_secret_post_stays_the_default() {
    let h = Harness::start().await;
    assert_eq!(h.get("/deploy/api/projects/v1").await.status(), 200);
    let log = h.emulator.token_request_log();
    assert_eq!(log.len(), 1);
    assert!(!log[0].basic_auth);
    assert!(log[0].secret_in_body);
}

#[tokio::test]
async fn an_unknown_auth_method_is_a_config_error_naming_the_key() {
    let text = "[credentials.automation]\nclient_id = \"a\"\nclient_secret = \"b\"\nauth_method = \"private_key_jwt\"\n\n[[routes]]\nprefix = \"/x\"\nupstream = \"http://127.0.0.1:1\"\ncredential = \"automation\"\n";
    let error =
        sitecore_auth_proxy::config::Config::parse(text, std::path::Path::new("p.toml"), &|_| None)
            .expect_err("refused")
            .to_string();
    assert!(
        error.contains("credentials.automation.auth_method"),
        "{error}"
    );
}
