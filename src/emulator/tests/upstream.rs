//! The emulated APIs: token check, echo, special responses, faults, HTTP/2 and TLS.

use super::*;

#[tokio::test]
async fn emulated_api_checks_the_token_and_echoes_the_request() {
    let emulator = start(Emulator::builder()).await;
    let token = emulator.mint_token("tester", DEFAULT_AUDIENCE, Duration::from_secs(300));
    let body = b"{\"name\":\"project\"}".to_vec();
    let response = client()
        .post(format!(
            "{}/api/projects/v1?a=1&b=%20x",
            emulator.api_base(Api::Deploy)
        ))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .header("x-repeated", "one")
        .header("x-repeated", "two")
        .body(body.clone())
        .send()
        .await
        .expect("API request");
    assert_eq!(response.status(), 200);
    let echo = json_of(&response.text().await.expect("echo"));
    assert_eq!(echo["api"], "deploy");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/api/projects/v1");
    assert_eq!(echo["query"], "a=1&b=%20x");
    assert_eq!(echo["body_bytes"], body.len());
    assert_eq!(echo["body_sha256"], sha256_hex(&body));
    assert_eq!(echo["client_id"], "tester");
    assert_eq!(echo["headers"]["content-type"], "application/json");
    assert_eq!(echo["headers"]["x-repeated"], "one, two");
    assert!(echo["headers"].get("authorization").is_none());

    let seen = emulator.seen_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {token}").as_str())
    );
    assert!(seen[0].token_valid);
    assert_eq!(seen[0].body_bytes, body.len() as u64);
    assert_eq!(seen[0].body_sha256, sha256_hex(&body));
    assert_eq!(seen[0].version, "HTTP/1.1");

    // The Edge host tells its two APIs apart by path.
    let response = client()
        .get(format!("{}/keys", emulator.api_base(Api::EdgeToken)))
        .bearer_auth(&token)
        .send()
        .await
        .expect("edge request");
    assert_eq!(
        json_of(&response.text().await.expect("echo"))["api"],
        "edge-token"
    );
    let admin = emulator.api_base(Api::EdgeAdmin);
    let edge_origin = admin
        .strip_suffix("/api/admin/v1")
        .expect("edge admin base");
    assert_eq!(
        emulator.api_base(Api::EdgeToken),
        format!("{edge_origin}/api/apikey/v1")
    );
    let deploy = emulator.api_base(Api::Deploy);
    assert!(
        deploy.starts_with("http://127.0.0.1:") && !deploy.ends_with('/'),
        "{deploy}"
    );
    assert_eq!(emulator.upstream_requests(), 2);
}

#[tokio::test]
async fn missing_or_unacceptable_tokens_get_401_and_are_recorded() {
    let emulator = start(Emulator::builder().accepted_audiences(&["https://only.example"])).await;
    let response = call_api(&emulator, Api::Authoring, "", None).await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer error=\"invalid_token\"")
    );
    assert_eq!(
        json_of(&response.text().await.expect("body")),
        json!({"error": "invalid_token"})
    );

    let wrong_audience = emulator.mint_token("c", DEFAULT_AUDIENCE, Duration::from_secs(60));
    let response = call_api(&emulator, Api::Authoring, "", Some(&wrong_audience)).await;
    assert_eq!(response.status(), 401);
    let right = emulator.mint_token("c", "https://only.example", Duration::from_secs(60));
    let response = call_api(&emulator, Api::Authoring, "", Some(&right)).await;
    assert_eq!(response.status(), 200);
    let response = call_api(&emulator, Api::Authoring, "", Some("not-a-jwt")).await;
    assert_eq!(response.status(), 401);

    let seen = emulator.seen_requests();
    let valid: Vec<bool> = seen.iter().map(|s| s.token_valid).collect();
    assert_eq!(valid, [false, false, true, false]);
    assert_eq!(seen[0].authorization, None);
    assert_eq!(seen[0].path, "/sitecore/api/authoring/graphql/v1");

    emulator.reset_counters();
    assert!(emulator.seen_requests().is_empty());
    assert_eq!(emulator.upstream_requests(), 0);
}

#[tokio::test]
async fn emulator_bytes_streams_the_pattern() {
    let emulator = start(Emulator::builder()).await;
    let token = emulator.mint_token("c", DEFAULT_AUDIENCE, Duration::from_secs(60));
    let response = call_api(
        &emulator,
        Api::StreamDocuments,
        "/download?emulator_bytes=200000&emulator_chunk=7000&emulator_chunk_delay_ms=1",
        Some(&token),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/octet-stream")
    );
    let bytes = response.bytes().await.expect("body");
    assert_eq!(bytes.len(), 200_000);
    assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));

    let response = call_api(&emulator, Api::Deploy, "/d?emulator_bytes=0", Some(&token)).await;
    assert_eq!(response.bytes().await.expect("body").len(), 0);
}

#[tokio::test]
async fn emulator_status_and_location() {
    let emulator = start(Emulator::builder()).await;
    let token = emulator.mint_token("c", DEFAULT_AUDIENCE, Duration::from_secs(60));
    let target =
        "/p?emulator_status=302&emulator_location=http%3A%2F%2F127.0.0.1%3A1%2Fnext%3Fx%3D1";
    let response = call_api(&emulator, Api::Deploy, target, Some(&token)).await;
    assert_eq!(response.status(), 302);
    assert_eq!(
        response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok()),
        Some("http://127.0.0.1:1/next?x=1")
    );
    assert_eq!(json_of(&response.text().await.expect("echo"))["path"], "/p");

    let response = call_api(
        &emulator,
        Api::Deploy,
        "/p?emulator_status=99",
        Some(&token),
    )
    .await;
    assert_eq!(response.status(), 400);
    // Special parameters only work after the token check.
    let response = call_api(&emulator, Api::Deploy, "/p?emulator_status=200", None).await;
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn upstream_faults_apply_in_order() {
    let emulator = start(Emulator::builder()).await;
    let token = emulator.mint_token("c", DEFAULT_AUDIENCE, Duration::from_secs(60));
    emulator.push_upstream_faults([
        UpstreamFault::Status(503),
        UpstreamFault::Reset,
        UpstreamFault::Status(401),
        UpstreamFault::Delay(Duration::from_millis(10)),
    ]);
    let response = call_api(&emulator, Api::Deploy, "/a", Some(&token)).await;
    assert_eq!(response.status(), 503);
    let reset = client()
        .get(format!("{}/b", emulator.api_base(Api::Deploy)))
        .bearer_auth(&token)
        .send()
        .await;
    assert!(reset.is_err(), "a reset gives no response");
    let response = call_api(&emulator, Api::Deploy, "/c", Some(&token)).await;
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    assert_eq!(
        call_api(&emulator, Api::Deploy, "/d", Some(&token))
            .await
            .status(),
        200
    );
    assert_eq!(
        call_api(&emulator, Api::Deploy, "/e", Some(&token))
            .await
            .status(),
        200
    );

    emulator.set_upstream_fault(Some(UpstreamFault::Status(500)));
    assert_eq!(
        call_api(&emulator, Api::StreamSkills, "/f", Some(&token))
            .await
            .status(),
        500
    );
    emulator.set_upstream_fault(None);

    let paths: Vec<String> = emulator
        .seen_requests()
        .into_iter()
        .map(|s| s.path)
        .collect();
    assert_eq!(paths, ["/a", "/b", "/c", "/d", "/e", "/f"]);
    assert_eq!(emulator.upstream_requests(), 6);
}

#[tokio::test]
async fn a_status_fault_can_carry_headers() {
    let emulator = start(Emulator::builder()).await;
    let token = emulator.mint_token("c", DEFAULT_AUDIENCE, Duration::from_secs(60));
    let headers = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    };
    emulator.push_upstream_faults([
        UpstreamFault::StatusWithHeaders {
            status: 429,
            headers: headers(&[
                ("Retry-After", "3"),
                ("x-ratelimit-reset", "1700000000"),
                ("x-note", "one"),
                ("x-note", "two"),
                ("bad name", "left out"),
            ]),
        },
        UpstreamFault::StatusWithHeaders {
            status: 401,
            headers: Vec::new(),
        },
    ]);

    let response = call_api(&emulator, Api::Deploy, "/a", Some(&token)).await;
    assert_eq!(response.status(), 429);
    let h = response.headers();
    assert_eq!(h["retry-after"], "3");
    assert_eq!(h["x-ratelimit-reset"], "1700000000");
    let notes: Vec<_> = h.get_all("x-note").iter().collect();
    assert_eq!(notes, ["one", "two"]);
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(
        json_of(&response.text().await.expect("body")),
        json!({"error": "emulated_fault", "status": 429})
    );

    // Nothing implied: a 401 without listed headers has no WWW-Authenticate.
    let response = call_api(&emulator, Api::Deploy, "/b", None).await;
    assert_eq!(response.status(), 401);
    assert!(!response.headers().contains_key("www-authenticate"));
    assert!(!response.headers().contains_key("retry-after"));

    // The queue is spent: normal behaviour resumes.
    let response = call_api(&emulator, Api::Deploy, "/c", Some(&token)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(emulator.upstream_requests(), 3);
}

#[tokio::test]
async fn large_bodies_are_hashed_while_streaming() {
    let emulator = start(Emulator::builder()).await;
    let token = emulator.mint_token("c", DEFAULT_AUDIENCE, Duration::from_secs(60));
    let body = pattern_bytes(3, 5 * 1024 * 1024 + 17);
    let response = client()
        .put(format!(
            "{}/upload",
            emulator.api_base(Api::StreamDocuments)
        ))
        .bearer_auth(&token)
        .body(body.clone())
        .send()
        .await
        .expect("upload");
    let echo = json_of(&response.text().await.expect("echo"));
    assert_eq!(echo["body_bytes"], body.len());
    assert_eq!(echo["body_sha256"], sha256_hex(&body));
}

#[tokio::test]
async fn a_stalled_body_sends_its_first_bytes_then_nothing() {
    let emulator = start(Emulator::builder()).await;
    let token = emulator.mint_token("c", DEFAULT_AUDIENCE, Duration::from_secs(60));
    emulator.push_upstream_faults([UpstreamFault::StallBody {
        sent: 300,
        declared: 5000,
    }]);
    let mut response = call_api(&emulator, Api::Deploy, "/stall", Some(&token)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.content_length(), Some(5000));
    let mut received = Vec::new();
    // The first bytes come at once; then the body stays open with nothing more.
    let stalled = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(Some(chunk)) = response.chunk().await {
            received.extend_from_slice(&chunk);
        }
    })
    .await;
    assert!(stalled.is_err(), "the body neither ends nor fails");
    assert_eq!(received, pattern_bytes(0, 300));
}

#[tokio::test]
async fn a_request_body_that_breaks_off_is_recorded_as_aborted() {
    use tokio::io::AsyncWriteExt as _;
    let emulator = start(Emulator::builder()).await;
    let token = emulator.mint_token("c", DEFAULT_AUDIENCE, Duration::from_secs(60));
    let addr = emulator
        .api_base(Api::Deploy)
        .trim_start_matches("http://")
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-length: 1000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    stream
        .write_all(&[7u8; 400])
        .await
        .expect("part of the body");
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = emulator.seen_requests();
        if seen.first().is_some_and(|s| s.body_aborted) {
            assert_eq!(seen[0].body_bytes, 400);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A whole body is not aborted.
    let response = call_api(&emulator, Api::Deploy, "/whole", Some(&token)).await;
    assert_eq!(response.status(), 200);
    assert!(!emulator.seen_requests()[1].body_aborted);
}

#[test]
fn pattern_bytes_is_consistent_across_offsets_and_sizes() {
    let whole = pattern_bytes(0, 300_000);
    assert!(whole.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    let mut pieces = Vec::new();
    let mut offset = 0u64;
    for len in [1usize, 250, 70_000, 65_536, 0, 164_213] {
        pieces.extend_from_slice(&pattern_bytes(offset, len));
        offset += len as u64;
    }
    assert_eq!(pieces, whole);
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let emulator = start(Emulator::builder()).await;
    let token = emulator.mint_token("c", DEFAULT_AUDIENCE, Duration::from_secs(60));
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let response = h2
        .get(format!("{}/h2", emulator.api_base(Api::EdgeAdmin)))
        .bearer_auth(&token)
        .send()
        .await
        .expect("h2 request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let echo = json_of(&response.text().await.expect("echo"));
    assert_eq!(echo["version"], "HTTP/2.0");
    assert_eq!(echo["path"], "/api/admin/v1/h2");
    let host = echo["headers"]["host"].as_str().unwrap_or_default();
    assert!(
        emulator.api_base(Api::EdgeAdmin).contains(host),
        "host {host}"
    );
}

#[tokio::test]
async fn upstream_tls_serves_https_with_alpn() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let cert_der = generated.cert.der().clone();
    let key_der =
        rustls_pki_types::PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key_der)
        .expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let emulator = start(Emulator::builder().upstream_tls(Arc::new(config))).await;

    let base = emulator.api_base(Api::Authoring);
    assert!(base.starts_with("https://localhost:"), "{base}");
    let token = emulator.mint_token("c", DEFAULT_AUDIENCE, Duration::from_secs(60));
    let https = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_der(&cert_der).expect("cert")])
        .build()
        .expect("client");
    let response = https
        .post(&base)
        .bearer_auth(&token)
        .body("{}")
        .send()
        .await
        .expect("https");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    // The token endpoint stays plain HTTP.
    assert!(emulator.token_url().starts_with("http://127.0.0.1:"));
}

#[tokio::test]
async fn dropping_the_emulator_stops_its_listeners() {
    let emulator = start(Emulator::builder()).await;
    let token_url = emulator.token_url();
    assert_eq!(default_token(&emulator).await.0, 200);
    drop(emulator);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(client().post(token_url).send().await.is_err());
}

#[tokio::test]
async fn a_reset_over_http2_fails_only_that_stream() {
    let emulator = start(Emulator::builder()).await;
    let token = emulator.mint_token("c", DEFAULT_AUDIENCE, Duration::from_secs(60));
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let url = format!("{}/r", emulator.api_base(Api::Deploy));
    emulator.push_upstream_faults([UpstreamFault::Reset]);
    let reset = h2.get(&url).bearer_auth(&token).send().await;
    assert!(reset.is_err(), "a reset gives no response");
    let response = h2.get(&url).bearer_auth(&token).send().await.expect("next");
    assert_eq!(response.status(), 200);
}

#[test]
fn the_handle_can_be_shared_across_tasks() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Emulator>();
    assert_send_sync::<EmulatorBuilder>();
}
