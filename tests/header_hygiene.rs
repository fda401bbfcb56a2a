//! Header hygiene in both directions: hop-by-hop headers, inbound credentials, forwarded
//! headers, request ids and `Location` rewriting.

mod support;

use sitecore_auth_proxy::emulator::Api;
use support::raw::ScriptedUpstream;
use support::{json, Harness, Setup};

fn raw_route(addr: std::net::SocketAddr) -> String {
    format!("\n[[routes]]\nprefix = \"/raw\"\nupstream = \"http://{addr}/base\"\ncredential = \"automation\"\n")
}

#[tokio::test]
async fn hop_by_hop_response_headers_never_reach_the_client() {
    let upstream = ScriptedUpstream::start(
        "HTTP/1.1 200 OK\r\nconnection: x-private-hop\r\nx-private-hop: 1\r\nkeep-alive: timeout=5\r\n\
         proxy-authenticate: Basic realm=\"up\"\r\ntrailer: x-t\r\nx-kept: yes\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    let h = Harness::with(Setup {
        extra_toml: raw_route(upstream.addr),
        ..Setup::default()
    })
    .await;
    let response = h.get("/raw/x?a=1").await;
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    for name in [
        "x-private-hop",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
    ] {
        assert!(!headers.contains_key(name), "{name} reached the client");
    }
    assert_eq!(headers["x-kept"], "yes");
    assert_eq!(response.text().await.expect("body"), "ok");

    let heads = upstream.heads();
    assert_eq!(heads.len(), 1);
    let head = &heads[0];
    assert!(head.starts_with("GET /base/x?a=1 HTTP/1.1\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("host: {}\r\n", upstream.addr)),
        "{head}"
    );
    assert!(head.contains("authorization: Bearer ey"), "{head}");
}

#[tokio::test]
async fn forwarded_headers_are_added_only_when_enabled() {
    for enabled in [false, true] {
        let h = Harness::with(Setup {
            server_extra: format!("forwarded_headers = {enabled}\n"),
            ..Setup::default()
        })
        .await;
        let proxy_host = h.proxy.local_addr().to_string();
        let echo = json(
            h.http
                .get(h.url("/deploy/x"))
                .header("x-forwarded-for", "203.0.113.9")
                .send()
                .await
                .expect("response"),
        )
        .await;
        let headers = &echo["headers"];
        if enabled {
            assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
            assert_eq!(headers["x-forwarded-proto"], "http");
            assert_eq!(headers["x-forwarded-host"], proxy_host.as_str());
        } else {
            assert_eq!(
                headers["x-forwarded-for"], "203.0.113.9",
                "passed through untouched"
            );
            assert!(headers.get("x-forwarded-proto").is_none());
            assert!(headers.get("x-forwarded-host").is_none());
        }
        assert_ne!(
            headers["host"],
            proxy_host.as_str(),
            "Host is the upstream's"
        );
    }
}

#[tokio::test]
async fn request_ids_are_passed_upstream_and_returned() {
    let h = Harness::start().await;
    // Generated when absent: the same id upstream and back.
    let response = h.get("/deploy/x").await;
    let returned = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let generated = |id: &str| {
        id.len() == 32
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(generated(&returned), "{returned}");
    let echo = json(response).await;
    assert_eq!(echo["headers"]["x-request-id"], returned.as_str());

    // Kept when the client sends a sane one.
    let response = h
        .http
        .get(h.url("/deploy/x"))
        .header("x-request-id", "ci-run-42.step_7")
        .send()
        .await
        .expect("response");
    assert_eq!(response.headers()["x-request-id"], "ci-run-42.step_7");
    assert_eq!(
        json(response).await["headers"]["x-request-id"],
        "ci-run-42.step_7"
    );

    // Replaced when it is not.
    let response = h
        .http
        .get(h.url("/deploy/x"))
        .header("x-request-id", "has spaces;and=stuff")
        .send()
        .await
        .expect("response");
    let replaced = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(generated(&replaced), "{replaced}");
    assert_ne!(replaced, returned, "each request gets its own id");
    assert_eq!(
        json(response).await["headers"]["x-request-id"],
        replaced.as_str()
    );

    // Errors the proxy produces carry one too.
    let response = h.get("/nowhere").await;
    assert!(response.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn location_headers_into_the_upstream_are_rewritten_to_the_prefix() {
    for enabled in [true, false] {
        let h = Harness::with(Setup {
            server_extra: format!("rewrite_location = {enabled}\n"),
            ..Setup::default()
        })
        .await;
        let upstream = h.emulator.api_base(Api::Authoring);
        let cases = [
            (format!("{upstream}/jobs/7?x=1"), "/authoring/jobs/7?x=1"),
            (
                "/sitecore/api/authoring/graphql/v1/next".to_owned(),
                "/authoring/next",
            ),
            (
                "https://elsewhere.example/x".to_owned(),
                "https://elsewhere.example/x",
            ),
        ];
        for (location, rewritten) in cases {
            let encoded: String = percent_encoding::utf8_percent_encode(
                &location,
                percent_encoding::NON_ALPHANUMERIC,
            )
            .to_string();
            let url = format!(
                "{}?emulator_status=302&emulator_location={encoded}",
                h.url("/authoring")
            );
            let response = h.http.get(&url).send().await.expect("response");
            assert_eq!(response.status(), 302);
            let got = response.headers()["location"].to_str().expect("ascii");
            let want = if enabled {
                rewritten
            } else {
                location.as_str()
            };
            assert_eq!(got, want, "rewrite_location = {enabled}");
        }
    }
}
