//! Hostile and malformed requests over raw sockets: none of them reaches the upstream, or reaches
//! anything but the route's configured upstream.

mod support;

use support::raw::{exchange, status_of};
use support::Harness;

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nhost: proxy.test\r\nconnection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn dot_segments_in_every_encoding_are_refused_and_never_forwarded() {
    let h = Harness::start().await;
    h.wait_ready().await;
    for target in [
        "/deploy/../admin",
        "/deploy/./api",
        "/deploy/..",
        "/deploy/%2e%2e/admin",
        "/deploy/%2E%2E/admin",
        "/deploy/%2e%2E/admin",
        "/deploy/.%2e/admin",
        "/deploy/%2e/api",
        "/deploy/api%2f..%2fadmin",
        "/deploy/api%2F%2e%2e%2Fadmin",
        "/deploy/api%5c..%5cadmin",
        "/deploy/%252e%252e/admin",
        "/deploy/api/..%2f..%2f",
    ] {
        let response = exchange(h.proxy.local_addr(), &get(target)).await;
        assert_eq!(status_of(&response), 400, "{target}: {response}");
        assert!(
            response.contains("\"error\":\"bad_request\""),
            "{target}: {response}"
        );
    }
    assert_eq!(h.emulator.upstream_requests(), 0, "nothing was forwarded");
}

#[tokio::test]
async fn an_absolute_form_target_cannot_choose_the_upstream() {
    let h = Harness::start().await;
    for request in [
        "GET http://evil.example/deploy/api/projects/v1 HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n",
        "GET https://evil.example:8443/deploy/api/projects/v1?x=1 HTTP/1.1\r\nhost: evil.example\r\nconnection: close\r\n\r\n",
    ] {
        let response = exchange(h.proxy.local_addr(), request.as_bytes()).await;
        assert_eq!(status_of(&response), 200, "{response}");
        assert!(response.contains("\"api\":\"deploy\""), "{response}");
        assert!(response.contains("\"path\":\"/api/projects/v1\""), "{response}");
        assert!(!response.contains("evil.example\",\"x-"), "{response}");
    }
    let seen = h.emulator.seen_requests();
    assert_eq!(seen.len(), 2);
    for request in seen {
        let host = request
            .headers
            .iter()
            .find(|(n, _)| n == "host")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        assert!(
            host.starts_with("127.0.0.1:"),
            "Host is the route's upstream: {host}"
        );
    }
}

#[tokio::test]
async fn connect_is_refused_with_405() {
    let h = Harness::start().await;
    let response = exchange(
        h.proxy.local_addr(),
        b"CONNECT xmclouddeploy-api.sitecorecloud.io:443 HTTP/1.1\r\nhost: xmclouddeploy-api.sitecorecloud.io:443\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&response), 405, "{response}");
    assert!(response.contains("method_not_allowed"));
    assert_eq!(h.emulator.upstream_requests(), 0);
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let h = Harness::start().await;
    let big = "x".repeat(100 * 1024);
    let request = format!("GET /deploy/x HTTP/1.1\r\nhost: a\r\nx-big: {big}\r\n\r\n");
    let response = exchange(h.proxy.local_addr(), request.as_bytes()).await;
    assert_eq!(status_of(&response), 431, "{response}");
    assert_eq!(h.emulator.upstream_requests(), 0);
}

#[tokio::test]
async fn malformed_bodies_and_smuggling_shapes_are_refused_without_forwarding() {
    let h = Harness::start().await;
    h.wait_ready().await;
    let cases: [(&str, &[u8]); 5] = [
        (
            "two different Content-Lengths",
            b"POST /deploy/x HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nabcde",
        ),
        (
            "bad chunk size",
            b"POST /deploy/x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "body shorter than Content-Length, then close",
            b"POST /deploy/x HTTP/1.1\r\nhost: a\r\ncontent-length: 100\r\n\r\nonly-this",
        ),
        (
            "an unknown transfer coding",
            b"POST /deploy/x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip\r\n\r\nabc",
        ),
        (
            "encoded CR LF in the path",
            b"GET /deploy/x%0d%0aX-Injected:%201 HTTP/1.1\r\nhost: a\r\n\r\n",
        ),
    ];
    for (label, request) in cases {
        let mut stream = tokio::net::TcpStream::connect(h.proxy.local_addr())
            .await
            .expect("connect");
        use tokio::io::AsyncWriteExt;
        stream.write_all(request).await.expect("write");
        // Half-close: the client sends nothing more.
        let _ = stream.shutdown().await;
        let response =
            support::raw::read_until_quiet(&mut stream, std::time::Duration::from_millis(1500))
                .await;
        let status = status_of(&response);
        assert!(
            status == 400 || status == 0 || status == 501,
            "{label}: refused (400/501) or closed, got {status}: {response}"
        );
        assert!(
            !response.contains("\"api\""),
            "{label}: nothing answered from upstream"
        );
    }
    assert_eq!(
        h.emulator.upstream_requests(),
        0,
        "no malformed request was forwarded"
    );
}

/// Both framings at once. hyper resolves it as RFC 9112 section 6.1 allows: the request is read
/// by `Transfer-Encoding` alone, `Content-Length` is dropped before the proxy sees the request,
/// and the connection is closed after the response. So what reaches the upstream is one request
/// framed one way only, and the request piggy-backed behind it is never read, let alone
/// forwarded.
#[tokio::test]
async fn content_length_with_transfer_encoding_cannot_smuggle_a_request() {
    for (label, request) in [
        (
            "CL.TE",
            &b"POST /deploy/x HTTP/1.1\r\nhost: a\r\ncontent-length: 48\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /deploy/smuggled HTTP/1.1\r\nhost: a\r\n\r\n"[..],
        ),
        (
            "TE.CL",
            b"POST /deploy/x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /deploy/smuggled HTTP/1.1\r\nhost: a\r\n\r\n",
        ),
    ] {
        let h = Harness::start().await;
        h.wait_ready().await;
        let response = exchange(h.proxy.local_addr(), request).await;
        assert!(!response.contains("smuggled"), "{label}: {response}");
        assert_eq!(
            response.matches("HTTP/1.1 ").count(),
            1,
            "{label}: one response, then the connection closed: {response}"
        );
        let seen = h.emulator.seen_requests();
        assert!(seen.len() <= 1, "{label}: {seen:?}");
        for request in &seen {
            assert!(!request.path.contains("smuggled"), "{label}");
            let framings = request
                .headers
                .iter()
                .filter(|(n, _)| n == "content-length" || n == "transfer-encoding")
                .count();
            assert!(framings <= 1, "{label}: forwarded with one framing only: {:?}", request.headers);
        }
    }
}
