//! The token lifecycle against the emulator's fault modes: background refresh, backoff, 429,
//! recovery, upstream 401 replay and its rate limit, key rotation, JWKS outages.

mod support;

use std::time::{Duration, Instant};

use sitecore_auth_proxy::emulator::{Emulator, TokenFault, UpstreamFault};
use support::{eventually, json, Harness, Setup};
use tokio::net::TcpListener;

#[tokio::test]
async fn short_lived_tokens_refresh_in_the_background_without_any_request_waiting() {
    let setup = Setup {
        emulator: Emulator::builder().token_lifetime(Duration::from_secs(3)),
        ..Setup::default()
    };
    let h = Harness::with(setup).await;
    h.wait_ready().await;
    let credential = h.proxy.credential("automation").expect("credential");
    let cold_before = credential.cold_waits();

    // Keep requests flowing until the background task has refreshed at least three times.
    let mut served = 0u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.emulator.token_requests() < 4 && Instant::now() < deadline {
        let response = h.get("/deploy/api/projects/v1").await;
        assert_eq!(response.status(), 200, "no request fails during refreshes");
        served += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        h.emulator.token_requests() >= 4,
        "the background task refreshed"
    );
    assert!(served > 20);
    assert_eq!(
        credential.cold_waits(),
        cold_before,
        "no request waited for the token endpoint: every fetch was the refresher's"
    );
    assert!(h.emulator.seen_requests().iter().all(|r| r.token_valid));
}

#[tokio::test]
async fn a_429_retry_after_is_honoured() {
    let setup = Setup::default();
    let emulator = setup.emulator.clone().start().await.expect("emulator");
    emulator.push_token_faults([TokenFault::RateLimited {
        retry_after_secs: 2,
    }]);
    let text = support::config_text(&setup, &emulator);
    let h = Harness::from_text(emulator, &text, setup.tuning).await;
    let credential = h.proxy.credential("automation").expect("credential");

    assert!(eventually(Duration::from_secs(5), || h.emulator.token_requests() >= 1).await);
    assert!(eventually(Duration::from_secs(5), || credential.status().attempts >= 1).await);
    let failed_at = Instant::now();
    let status = credential.status();
    assert_eq!(status.last_error.as_deref(), Some("rate_limited"));
    let retry_at = status.retry_at.expect("in backoff");
    assert!(
        retry_at + Duration::from_millis(100) >= failed_at + Duration::from_secs(2),
        "the next attempt is scheduled no earlier than Retry-After"
    );

    // Meanwhile requests fail fast with a Retry-After of their own.
    let response = h.get("/deploy/x").await;
    assert_eq!(response.status(), 503);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    assert_eq!(
        h.emulator.token_requests(),
        1,
        "no request started a fetch of its own"
    );

    assert!(eventually(Duration::from_secs(6), || credential.current().is_some()).await);
    assert_eq!(h.emulator.token_requests(), 2);
    let response = h.get("/deploy/x").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn server_errors_then_recovery() {
    let setup = Setup::default();
    let emulator = setup.emulator.clone().start().await.expect("emulator");
    emulator.push_token_faults([
        TokenFault::Status(500),
        TokenFault::Status(502),
        TokenFault::Status(500),
    ]);
    let text = support::config_text(&setup, &emulator);
    let h = Harness::from_text(emulator, &text, setup.tuning).await;
    let credential = h.proxy.credential("automation").expect("credential");

    assert!(eventually(Duration::from_secs(10), || credential.current().is_some()).await);
    assert_eq!(
        h.emulator.token_requests(),
        4,
        "three failures, one success, no storm"
    );
    let status = credential.status();
    assert_eq!(status.consecutive_failures, 0);
    assert!(status.last_error.is_none());
    let response = h.get("/deploy/x").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn concurrent_waiters_on_a_failing_fetch_all_fail_at_once() {
    let h = Harness::prepared(Setup::default(), |emulator| {
        emulator.set_token_fault(Some(TokenFault::AccessDenied));
    })
    .await;

    let mut tasks = Vec::new();
    for _ in 0..50 {
        let http = h.http.clone();
        let url = h.url("/authoring");
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).body("{}").send().await.expect("response");
            (r.status().as_u16(), r.text().await.expect("body"))
        }));
    }
    for task in tasks {
        let (status, body) = task.await.expect("task");
        assert_eq!(status, 503);
        assert!(body.contains("token_unavailable"));
        assert!(
            !body.contains("Unauthorized"),
            "the endpoint's body is not relayed"
        );
    }
    assert!(
        h.emulator.token_requests() <= 3,
        "50 waiters did not each retry: {}",
        h.emulator.token_requests()
    );
    assert_eq!(h.emulator.upstream_requests(), 0);
}

#[tokio::test]
async fn token_endpoint_down_at_start_then_recovery_without_restart() {
    // Reserve a port, close it: the token endpoint refuses connections.
    let placeholder = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let down_addr = placeholder.local_addr().expect("addr");
    drop(placeholder);

    let setup = Setup::default();
    let emulator = setup.emulator.clone().start().await.expect("emulator");
    let real_token_url = emulator.token_url();
    let text = support::config_text(&setup, &emulator)
        .replace(&real_token_url, &format!("http://{down_addr}/oauth/token"))
        .replace(
            "[credentials.automation]\n",
            &format!(
                "[credentials.automation]\nissuer = \"{}\"\njwks_url = \"{}\"\n",
                emulator.issuer(),
                emulator.jwks_url()
            ),
        );
    let h = Harness::from_text(emulator, &text, setup.tuning).await;

    let started = Instant::now();
    let response = h.get("/deploy/x").await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(json(response).await["error"], "token_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered, not hung"
    );

    // The endpoint comes up at the same address: a TCP relay to the emulator.
    let listener = TcpListener::bind(down_addr)
        .await
        .expect("rebind the token endpoint port");
    let target = h.emulator.auth_addr();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let credential = h.proxy.credential("automation").expect("credential");
    assert!(eventually(Duration::from_secs(10), || credential.current().is_some()).await);
    let response = h.get("/deploy/x").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        h.emulator.token_requests(),
        1,
        "one successful request once it was up"
    );
}

#[tokio::test]
async fn one_upstream_401_is_replayed_with_one_fresh_token() {
    let h = Harness::start().await;
    h.wait_ready().await;
    h.emulator
        .push_upstream_faults([UpstreamFault::Status(401)]);
    let body = r#"{"query":"mutation { createItem(name: \"x\") { id } }"}"#;
    let response = h
        .http
        .post(h.url("/authoring"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200, "the client never saw the 401");
    assert_eq!(
        h.emulator.token_requests(),
        2,
        "exactly one extra token request"
    );
    let seen = h.emulator.seen_requests();
    assert_eq!(
        seen.len(),
        2,
        "the upstream saw the request and its one replay"
    );
    assert_eq!(
        seen[0].body_sha256, seen[1].body_sha256,
        "the replay carried the same body"
    );
    assert_ne!(
        seen[0].authorization, seen[1].authorization,
        "with a fresh token"
    );
    assert_eq!(h.proxy.metrics().replays.get(), 1);
}

#[tokio::test]
async fn a_flood_of_401s_forces_at_most_one_refresh_per_interval() {
    let h = Harness::start().await;
    h.wait_ready().await;
    h.emulator
        .set_upstream_fault(Some(UpstreamFault::Status(401)));
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let http = h.http.clone();
        let url = h.url("/deploy/api/projects/v1");
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
        assert_eq!(
            task.await.expect("task"),
            401,
            "the upstream's 401 goes back"
        );
    }
    for _ in 0..10 {
        let r = h.get("/deploy/x").await;
        assert_eq!(r.status(), 401);
    }
    assert_eq!(
        h.emulator.token_requests(),
        2,
        "the first token plus one forced refresh, however many 401s"
    );
    let credential = h.proxy.credential("automation").expect("credential");
    assert_eq!(credential.forced_refreshes(), 1);
}

#[tokio::test]
async fn a_large_body_is_not_replayed_and_the_401_goes_back() {
    let h = Harness::start().await;
    h.wait_ready().await;
    h.emulator
        .push_upstream_faults([UpstreamFault::Status(401)]);
    let body = vec![b'z'; 2 * 1024 * 1024];
    let response = h
        .http
        .post(h.url("/deploy/api/deployments/v2/1/source"))
        .body(body)
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 401);
    assert_eq!(h.emulator.upstream_requests(), 1, "not replayed");
}

#[tokio::test]
async fn key_rotation_is_followed_without_a_restart() {
    let setup = Setup {
        emulator: Emulator::builder().token_lifetime(Duration::from_secs(3)),
        ..Setup::default()
    };
    let h = Harness::with(setup).await;
    h.wait_ready().await;
    let jwks_before = h.emulator.jwks_requests();
    assert_eq!(jwks_before, 1);
    h.emulator.rotate_keys();
    let rotated_kid = h.emulator.active_kid();
    let requests_before = h.emulator.token_requests();
    let credential = h.proxy.credential("automation").expect("credential");
    // The next scheduled refresh brings a token signed with the new key.
    assert!(
        eventually(Duration::from_secs(10), || {
            h.emulator.token_requests() > requests_before
                && credential.status().attempts as usize > requests_before as usize
        })
        .await
    );
    assert!(
        credential.status().last_error.is_none(),
        "{:?}",
        credential.status()
    );
    assert_eq!(
        h.emulator.jwks_requests(),
        2,
        "the unknown kid triggered one JWKS refetch"
    );
    let response = h.get("/deploy/x").await;
    assert_eq!(response.status(), 200);
    assert_eq!(rotated_kid, "emulator-key-2");
}

#[tokio::test]
async fn no_token_is_used_when_the_jwks_cannot_be_fetched() {
    let placeholder = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed = placeholder.local_addr().expect("addr");
    drop(placeholder);
    let setup = Setup {
        credential_extra: format!("jwks_url = \"http://{closed}/.well-known/jwks.json\""),
        ..Setup::default()
    };
    let h = Harness::with(setup).await;
    let response = h.get("/deploy/x").await;
    assert_eq!(response.status(), 503);
    assert_eq!(h.emulator.upstream_requests(), 0);
    let credential = h.proxy.credential("automation").expect("credential");
    assert_eq!(
        credential.status().last_error.as_deref(),
        Some("invalid_token_jwks_unavailable")
    );
}

#[tokio::test]
async fn a_missing_expires_in_falls_back_to_the_jwt_exp() {
    let h = Harness::prepared(Setup::default(), |emulator| {
        emulator.push_token_faults([TokenFault::NoExpiresIn]);
    })
    .await;
    h.wait_ready().await;
    let credential = h.proxy.credential("automation").expect("credential");
    let token = credential.current().expect("token");
    let left = token
        .expires_at
        .duration_since(std::time::SystemTime::now())
        .expect("in the future");
    assert!(
        left > Duration::from_secs(86_000),
        "lifetime taken from exp: {left:?}"
    );
    let response = h.get("/deploy/x").await;
    assert_eq!(response.status(), 200);
}
