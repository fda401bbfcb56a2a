//! Forwarding end to end through real sockets: routing, path rewrite, query fidelity, credential
//! injection, header hygiene and streaming bodies.

mod support;

use sha2::{Digest, Sha256};
use sitecore_auth_proxy::emulator::{pattern_bytes, Api};
use support::{json, Harness};

#[tokio::test]
async fn graphql_post_reaches_authoring_with_an_accepted_token() {
    let h = Harness::start().await;
    let query = r#"{"query":"{ item(path: \"/sitecore/content/Home\") { id name } }"}"#;
    let response = h
        .http
        .post(h.url("/authoring"))
        .header("content-type", "application/json")
        .body(query)
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    let echo = json(response).await;
    assert_eq!(echo["api"], "authoring");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/sitecore/api/authoring/graphql/v1");
    assert_eq!(echo["body_bytes"], query.len());
    assert_eq!(echo["body_sha256"], hex::encode(Sha256::digest(query)));
    assert_eq!(
        echo["client_id"],
        sitecore_auth_proxy::emulator::DEFAULT_CLIENT_ID
    );
    assert_eq!(echo["headers"]["content-type"], "application/json");

    let seen = h.emulator.seen_requests();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].token_valid,
        "the upstream accepted the injected token"
    );
    assert_eq!(seen[0].api, Api::Authoring);
}

#[tokio::test]
async fn rest_get_reaches_deploy_at_the_rewritten_path() {
    let h = Harness::start().await;
    let response = h.get("/deploy/api/projects/v1").await;
    assert_eq!(response.status(), 200);
    let echo = json(response).await;
    assert_eq!(echo["api"], "deploy");
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/api/projects/v1");
    assert_eq!(echo["query"], serde_json::Value::Null);

    let response = h.get("/edge-admin/content/x").await;
    let echo = json(response).await;
    assert_eq!(echo["api"], "edge-admin");
    assert_eq!(echo["path"], "/api/admin/v1/content/x");
}

#[tokio::test]
async fn the_clients_own_credentials_never_reach_the_upstream() {
    let h = Harness::start().await;
    let response = h
        .http
        .get(h.url("/deploy/api/projects/v1"))
        .header("authorization", "Bearer client-supplied-junk")
        .header("x-api-key", "client-key")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    let echo = json(response).await;
    let headers = echo["headers"].as_object().expect("headers");
    assert!(!headers.contains_key("x-api-key"), "{headers:?}");
    assert!(!headers.contains_key("proxy-authorization"), "{headers:?}");

    let seen = h.emulator.seen_requests();
    assert_eq!(seen.len(), 1);
    let auth = seen[0]
        .authorization
        .as_deref()
        .expect("authorization sent");
    assert!(auth.starts_with("Bearer ey"), "a JWT was injected");
    assert!(!auth.contains("client-supplied-junk"));
    assert!(seen[0].token_valid);
}

#[tokio::test]
async fn prefixes_match_on_segment_boundaries_only() {
    let h = Harness::start().await;
    for (path, expected) in [
        ("/deploy", Some("/")),
        ("/deploy/", Some("/")),
        (
            "/deploy/api/environments/v2/abc",
            Some("/api/environments/v2/abc"),
        ),
    ] {
        let response = h.get(path).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            json(response).await["path"],
            expected.expect("path"),
            "{path}"
        );
    }
    for path in [
        "/deployment",
        "/deployment/api/projects/v1",
        "/",
        "/authoringx",
    ] {
        let response = h.get(path).await;
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{path}"
        );
        let body = json(response).await;
        assert_eq!(body["error"], "no_route", "{path}");
        assert!(body["message"].is_string());
    }
    assert_eq!(
        h.emulator.upstream_requests(),
        3,
        "404s were never forwarded"
    );
}

#[tokio::test]
async fn query_strings_are_kept_byte_for_byte() {
    let h = Harness::start().await;
    for query in [
        "a=1&b=2",
        "b=%2F+c&a=%20&&empty=&x=%7e~",
        "sort=name,desc&filter[status]=ok",
        "",
    ] {
        let url = format!("{}?{query}", h.url("/deploy/api/projects/v1"));
        let response = h.http.get(&url).send().await.expect("response");
        assert_eq!(response.status(), 200);
        let echo = json(response).await;
        if query.is_empty() {
            // `?` alone: an empty query is still a query.
            assert!(echo["query"] == "" || echo["query"].is_null(), "{echo}");
        } else {
            assert_eq!(echo["query"], query);
        }
    }
}

#[tokio::test]
async fn a_10_mib_body_streams_both_ways_with_matching_digests() {
    let h = Harness::start().await;
    const SIZE: usize = 10 * 1024 * 1024;
    let upload = pattern_bytes(0, SIZE);
    let expected = hex::encode(Sha256::digest(&upload));
    // Larger than replay_body_limit (1 MiB), so it streams instead of being buffered.
    let response = h
        .http
        .post(h.url("/stream/api/documents/v1"))
        .header("content-type", "application/octet-stream")
        .body(upload)
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    let echo = json(response).await;
    assert_eq!(echo["body_bytes"], SIZE);
    assert_eq!(echo["body_sha256"], expected);

    let url = format!(
        "{}?emulator_bytes={SIZE}",
        h.url("/deploy/api/artifacts/v1")
    );
    let response = h.http.get(&url).send().await.expect("response");
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.expect("download");
    assert_eq!(body.len(), SIZE);
    assert_eq!(hex::encode(Sha256::digest(&body)), expected);
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_and_host_is_the_upstream() {
    let h = Harness::start().await;
    let response = h
        .http
        .get(h.url("/deploy/api/projects/v1"))
        .header("connection", "x-private-hop")
        .header("x-private-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("x-kept", "yes")
        .send()
        .await
        .expect("response");
    let echo = json(response).await;
    let headers = echo["headers"].as_object().expect("headers");
    assert!(!headers.contains_key("x-private-hop"), "{headers:?}");
    assert!(!headers.contains_key("keep-alive"), "{headers:?}");
    assert_eq!(headers["x-kept"], "yes");
    let upstream = url_authority(&h.emulator.api_base(Api::Deploy));
    assert_eq!(headers["host"], upstream.as_str());
}

fn url_authority(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}
