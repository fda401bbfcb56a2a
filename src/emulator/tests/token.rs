//! The token endpoint, JWKS, rotation and token faults.

use super::*;

#[tokio::test]
async fn form_token_request_issues_a_good_token() {
    let emulator = start(Emulator::builder()).await;
    let (status, body) = default_token(&emulator).await;
    assert_eq!(status, 200, "{body}");
    let body = json_of(&body);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 86_400);
    assert!(body["scope"]
        .as_str()
        .is_some_and(|s| s.contains("xmcloud.cm:admin")));

    let token = body["access_token"].as_str().expect("token");
    let (header, claims, signature) = jwt_parts(token);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["kid"], "emulator-key-1");
    assert!(!signature.is_empty());
    assert_eq!(claims["iss"], emulator.issuer());
    assert_eq!(
        emulator.issuer(),
        format!("http://{}/", emulator.auth_addr())
    );
    assert_eq!(claims["aud"], DEFAULT_AUDIENCE);
    assert_eq!(claims["sub"], format!("{DEFAULT_CLIENT_ID}@clients"));
    assert_eq!(claims["azp"], DEFAULT_CLIENT_ID);
    assert_eq!(
        claims["exp"].as_u64().unwrap_or(0) - claims["iat"].as_u64().unwrap_or(0),
        86_400
    );
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));

    assert_eq!(emulator.token_requests(), 1);
    assert_eq!(emulator.token_requests_ok(), 1);
    let log = emulator.token_request_log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].content_type, "application/x-www-form-urlencoded");
    assert_eq!(log[0].client_id.as_deref(), Some(DEFAULT_CLIENT_ID));
    assert_eq!(log[0].grant_type.as_deref(), Some("client_credentials"));
    assert_eq!(log[0].audience, None);
    assert_eq!(log[0].outcome_status, 200);
    assert!(!format!("{log:?}").contains(DEFAULT_CLIENT_SECRET));

    // The token works on every emulated API.
    for &api in Api::all() {
        let response = call_api(&emulator, api, "/x", Some(token)).await;
        assert_eq!(response.status(), 200, "{}", api.name());
        let echo = json_of(&response.text().await.expect("echo"));
        assert_eq!(echo["api"], api.name());
    }
}

#[tokio::test]
async fn json_token_request_with_charset_and_audience() {
    let emulator = start(Emulator::builder().token_lifetime(Duration::from_secs(600))).await;
    let response = client()
        .post(emulator.token_url())
        .header("content-type", "application/json; charset=utf-8")
        .body(
            json!({
                "grant_type": "client_credentials",
                "client_id": DEFAULT_CLIENT_ID,
                "client_secret": DEFAULT_CLIENT_SECRET,
                "audience": "https://api-beta.sitecorecloud.io/tenant",
                "extra": 5
            })
            .to_string(),
        )
        .send()
        .await
        .expect("token request");
    assert_eq!(response.status(), 200);
    let body = json_of(&response.text().await.expect("body"));
    assert_eq!(body["expires_in"], 600);
    let (_, claims, _) = jwt_parts(body["access_token"].as_str().expect("token"));
    assert_eq!(claims["aud"], "https://api-beta.sitecorecloud.io/tenant");
    assert_eq!(
        claims["exp"].as_u64().unwrap_or(0) - claims["iat"].as_u64().unwrap_or(0),
        600
    );
    let log = emulator.token_request_log();
    assert_eq!(log[0].content_type, "application/json; charset=utf-8");
    assert_eq!(
        log[0].audience.as_deref(),
        Some("https://api-beta.sitecorecloud.io/tenant")
    );
}

#[tokio::test]
async fn a_secret_with_form_metacharacters_survives_proper_encoding() {
    let secret = "a+b&c=d%e f";
    let emulator = start(Emulator::builder().client("special", secret)).await;
    let response = client()
        .post(emulator.token_url())
        .form(&form_request("special", secret))
        .send()
        .await
        .expect("token request");
    assert_eq!(response.status(), 200);

    // Sent raw, the same secret means something else and is refused.
    let raw = format!("grant_type=client_credentials&client_id=special&client_secret={secret}");
    let response = client()
        .post(emulator.token_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(raw)
        .send()
        .await
        .expect("token request");
    assert_eq!(response.status(), 401);
    assert_eq!(emulator.token_requests(), 2);
    assert_eq!(emulator.token_requests_ok(), 1);
}

#[tokio::test]
async fn bad_token_requests_get_auth0_errors() {
    let emulator = start(Emulator::builder()).await;
    let post = |content_type: &'static str, body: String| {
        let request = client()
            .post(emulator.token_url())
            .header("content-type", content_type)
            .body(body);
        async move {
            let response = request.send().await.expect("token request");
            let status = response.status().as_u16();
            (status, json_of(&response.text().await.expect("body")))
        }
    };
    let form = "application/x-www-form-urlencoded";

    let (status, body) = post(
        form,
        "grant_type=client_credentials&client_id=emulator-client&client_secret=no".into(),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        body,
        json!({"error": "access_denied", "error_description": "Unauthorized"})
    );

    let (status, body) = post(
        form,
        "grant_type=client_credentials&client_id=nobody&client_secret=x".into(),
    )
    .await;
    assert_eq!((status, &body["error"]), (401, &json!("access_denied")));

    let (status, body) = post(
        form,
        "grant_type=password&client_id=a&client_secret=b".into(),
    )
    .await;
    assert_eq!(
        (status, &body["error"]),
        (400, &json!("unsupported_grant_type"))
    );

    let (status, body) = post("application/json", "{not json".into()).await;
    assert_eq!((status, &body["error"]), (400, &json!("invalid_request")));

    let (status, body) = post("text/plain", "grant_type=client_credentials".into()).await;
    assert_eq!((status, &body["error"]), (400, &json!("invalid_request")));

    let response = client()
        .get(emulator.token_url())
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 405);

    assert_eq!(emulator.token_requests(), 6);
    assert_eq!(emulator.token_requests_ok(), 0);
    let statuses: Vec<u16> = emulator
        .token_request_log()
        .iter()
        .map(|r| r.outcome_status)
        .collect();
    assert_eq!(statuses, [401, 401, 400, 400, 400, 405]);
}

#[tokio::test]
async fn jwks_publishes_the_active_and_previous_keys() {
    let emulator = start(Emulator::builder()).await;
    let kids = || async {
        let text = client()
            .get(emulator.jwks_url())
            .send()
            .await
            .expect("jwks")
            .text()
            .await;
        let jwks = json_of(&text.expect("body"));
        let keys = jwks["keys"].as_array().cloned().unwrap_or_default();
        for key in &keys {
            assert_eq!(key["kty"], "RSA");
            assert_eq!(key["alg"], "RS256");
            assert_eq!(key["use"], "sig");
            assert_eq!(key["e"], "AQAB");
            assert_eq!(key["n"].as_str().map(str::len), Some(342));
        }
        keys.iter()
            .map(|k| k["kid"].as_str().unwrap_or("").to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(kids().await, ["emulator-key-1"]);
    let first = emulator.mint_token("c", DEFAULT_AUDIENCE, Duration::from_secs(60));

    emulator.rotate_keys();
    assert_eq!(emulator.active_kid(), "emulator-key-2");
    assert_eq!(kids().await, ["emulator-key-2", "emulator-key-1"]);
    let (_, body) = default_token(&emulator).await;
    let (header, _, _) = jwt_parts(json_of(&body)["access_token"].as_str().expect("token"));
    assert_eq!(header["kid"], "emulator-key-2");
    // Still published: still accepted.
    assert_eq!(
        call_api(&emulator, Api::Deploy, "/", Some(&first))
            .await
            .status(),
        200
    );

    emulator.rotate_keys();
    assert_eq!(kids().await, ["emulator-key-3", "emulator-key-2"]);
    assert_eq!(
        call_api(&emulator, Api::Deploy, "/", Some(&first))
            .await
            .status(),
        401
    );
    emulator.rotate_keys();
    assert_eq!(emulator.active_kid(), "emulator-key-1");
    assert_eq!(emulator.jwks_requests(), 3);
}

/// An assertion on a token's header, claims and signature part.
type TokenCheck = Box<dyn Fn(&Value, &Value, &str)>;

#[tokio::test]
async fn each_token_fault_does_what_it_says() {
    let emulator = start(Emulator::builder()).await;

    emulator.push_token_faults([TokenFault::Status(503)]);
    let (status, body) = default_token(&emulator).await;
    assert_eq!(
        (status, &json_of(&body)["error"]),
        (503, &json!("server_error"))
    );

    emulator.push_token_faults([TokenFault::AccessDenied]);
    let (status, body) = default_token(&emulator).await;
    assert_eq!(status, 401);
    assert_eq!(
        json_of(&body),
        json!({"error": "access_denied", "error_description": "Unauthorized"})
    );

    emulator.push_token_faults([TokenFault::RateLimited {
        retry_after_secs: 30,
    }]);
    let response = client()
        .post(emulator.token_url())
        .form(&form_request(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET))
        .send()
        .await
        .expect("token request");
    assert_eq!(response.status(), 429);
    let header = |name: &str| -> u64 {
        let value = response.headers().get(name).and_then(|v| v.to_str().ok());
        value.and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    assert_eq!(header("retry-after"), 30);
    let reset = header("x-ratelimit-reset");
    assert!(
        reset >= unix_now() + 28 && reset <= unix_now() + 31,
        "reset {reset}"
    );
    assert_eq!(
        json_of(&response.text().await.expect("body"))["error"],
        "too_many_requests"
    );

    emulator.push_token_faults([TokenFault::Delay(Duration::from_millis(20))]);
    assert_eq!(default_token(&emulator).await.0, 200);

    emulator.push_token_faults([TokenFault::MalformedBody]);
    let (status, body) = default_token(&emulator).await;
    assert_eq!(status, 200);
    assert!(serde_json::from_str::<Value>(&body).is_err());
    assert_eq!(emulator.token_requests_ok(), 1);

    // Bad tokens: each is what it claims, and none is accepted by the emulated APIs.
    let checks: Vec<(TokenFault, TokenCheck)> = vec![
        (
            TokenFault::WrongAudience,
            Box::new(|_, c, _| assert_eq!(c["aud"], "https://wrong.example")),
        ),
        (
            TokenFault::WrongIssuer,
            Box::new(|_, c, _| assert_eq!(c["iss"], "https://evil.example/")),
        ),
        (
            TokenFault::Expired,
            Box::new(|_, c, _| assert!(c["exp"].as_u64().unwrap_or(u64::MAX) < unix_now())),
        ),
        (
            TokenFault::UnknownKid,
            Box::new(|h, _, _| assert_eq!(h["kid"], "emulator-key-unknown")),
        ),
        (
            TokenFault::AlgNone,
            Box::new(|h, _, s| {
                assert_eq!(h["alg"], "none");
                assert!(s.is_empty());
            }),
        ),
        (
            TokenFault::Hs256,
            Box::new(|h, _, _| {
                assert_eq!(h["alg"], "HS256");
                assert_eq!(h["kid"], "emulator-key-1");
            }),
        ),
    ];
    for (fault, check) in checks {
        emulator.push_token_faults([fault.clone()]);
        let (status, body) = default_token(&emulator).await;
        assert_eq!(status, 200, "{fault:?}");
        let token = json_of(&body)["access_token"]
            .as_str()
            .expect("token")
            .to_owned();
        let (header, claims, signature) = jwt_parts(&token);
        check(&header, &claims, &signature);
        let response = call_api(&emulator, Api::Deploy, "/", Some(&token)).await;
        assert_eq!(response.status(), 401, "{fault:?} must be refused");
    }
    assert_eq!(emulator.token_requests_ok(), 1);

    emulator.push_token_faults([TokenFault::NoExpiresIn]);
    let (status, body) = default_token(&emulator).await;
    let body = json_of(&body);
    assert_eq!(status, 200);
    assert!(body.get("expires_in").is_none());
    let token = body["access_token"].as_str().expect("token");
    assert_eq!(
        call_api(&emulator, Api::Deploy, "/", Some(token))
            .await
            .status(),
        200
    );
    assert_eq!(emulator.token_requests_ok(), 2);
}

#[tokio::test]
async fn queued_token_faults_are_consumed_one_per_request_before_the_persistent_one() {
    let emulator = start(Emulator::builder()).await;
    emulator.set_token_fault(Some(TokenFault::Status(502)));
    emulator.push_token_faults([TokenFault::Status(500), TokenFault::AccessDenied]);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(default_token(&emulator).await.0);
    }
    emulator.set_token_fault(None);
    statuses.push(default_token(&emulator).await.0);
    statuses.push(default_token(&emulator).await.0);
    assert_eq!(statuses, [500, 401, 502, 200, 200]);
    assert_eq!(emulator.token_requests(), 5);
    assert_eq!(emulator.token_requests_ok(), 2);
}
