//! HTTP versions end to end: HTTP/1.1 and HTTP/2 (h2c prior knowledge) to the proxy, times an
//! HTTPS upstream that offers HTTP/2 by ALPN or only HTTP/1.1, with the upstream trusted through
//! `upstream_ca` (a CA generated in the test).

mod support;

use std::sync::Arc;

use sitecore_auth_proxy::emulator::{Api, Emulator};
use support::tls::{self, TestCa};
use support::{json, Harness, Setup};

async fn https_upstream_harness(ca: &TestCa, offer_h2: bool, trust: bool) -> Harness {
    let mut server = (*tls::server_config(&ca.server())).clone();
    if !offer_h2 {
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    let dir = tls::temp_dir("upstream-ca");
    let ca_file = tls::write(&dir, "ca.pem", &ca.pem());
    let server_extra = if trust {
        format!("upstream_ca = [\"{}\"]\n", ca_file.display())
    } else {
        String::new()
    };
    Harness::with(Setup {
        emulator: Emulator::builder().upstream_tls(Arc::new(server)),
        server_extra,
        ..Setup::default()
    })
    .await
}

fn client(h2: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder();
    let builder = if h2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    builder.build().expect("client")
}

#[tokio::test]
async fn every_client_version_times_every_upstream_version() {
    let ca = TestCa::new("upstream CA");
    for offer_h2 in [true, false] {
        let h = https_upstream_harness(&ca, offer_h2, true).await;
        assert!(h.emulator.api_base(Api::Deploy).starts_with("https://"));
        for client_h2 in [false, true] {
            let response = client(client_h2)
                .post(h.url("/authoring"))
                .header("content-type", "application/json")
                .body(r#"{"query":"{ __typename }"}"#)
                .send()
                .await
                .expect("response");
            let label = format!("client h2={client_h2}, upstream offers h2={offer_h2}");
            assert_eq!(response.status(), 200, "{label}");
            assert_eq!(
                response.version(),
                if client_h2 {
                    reqwest::Version::HTTP_2
                } else {
                    reqwest::Version::HTTP_11
                },
                "{label}"
            );
            let echo = json(response).await;
            assert_eq!(echo["api"], "authoring", "{label}");
            assert_eq!(
                echo["version"],
                if offer_h2 { "HTTP/2.0" } else { "HTTP/1.1" },
                "{label}: the upstream connection used ALPN's choice"
            );
            assert_eq!(
                echo["path"], "/sitecore/api/authoring/graphql/v1",
                "{label}"
            );
        }
        assert!(h.emulator.seen_requests().iter().all(|r| r.token_valid));
    }
}

#[tokio::test]
async fn upstream_certificates_are_verified() {
    let ca = TestCa::new("untrusted upstream CA");
    let h = https_upstream_harness(&ca, true, false).await;
    let response = client(false)
        .get(h.url("/deploy/x"))
        .send()
        .await
        .expect("response");
    assert_eq!(
        response.status(),
        502,
        "a certificate from an untrusted CA is refused"
    );
    assert_eq!(json(response).await["error"], "upstream_unreachable");
    assert_eq!(
        h.emulator.upstream_requests(),
        0,
        "no request (and no token) was sent"
    );
}

#[tokio::test]
async fn upstream_connections_are_pooled() {
    let ca = TestCa::new("pool CA");
    let h = https_upstream_harness(&ca, false, true).await;
    for _ in 0..20 {
        let r = client(false)
            .get(h.url("/deploy/x"))
            .send()
            .await
            .expect("response");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    let echo = json(
        client(false)
            .get(h.url("/deploy/x"))
            .send()
            .await
            .expect("r"),
    )
    .await;
    assert_eq!(echo["version"], "HTTP/1.1");
    // Sequential requests reuse one upstream connection per worker thread (each worker keeps
    // its own pool): the emulator counts its accepted connections per listener.
    let pools = h.proxy.workers().pools() as u64;
    let connections = h.emulator.upstream_connections(Api::Deploy);
    assert!(
        (1..=pools).contains(&connections),
        "21 requests over {connections} upstream connections with {pools} worker pools"
    );
}
