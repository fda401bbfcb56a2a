//! Limits and timeouts through real sockets: request timeouts per route and per server (504),
//! upstream connection failures (502), the slowloris guard, the connection limit and the upstream
//! connect timeout. Every case asserts statuses, JSON error codes and counts, never durations;
//! the only time bounds are generous "not a hang" limits.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use sitecore_auth_proxy::emulator::{Api, Emulator, UpstreamFault};
use support::raw::{connect_and_write, exchange, read_response, read_until_closed, status_of};
use support::{json, Harness, Setup};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// How long a client may wait for the proxy to act before the test calls it a hang.
const NOT_A_HANG: Duration = Duration::from_secs(10);

/// Starts a harness with `server_extra` in `[server]`, the standard routes, and the TOML `extra`
/// returns for the started emulator (extra routes need its addresses).
async fn harness_with(server_extra: &str, extra: impl FnOnce(&Emulator) -> String) -> Harness {
    let setup = Setup {
        server_extra: server_extra.to_owned(),
        ..Setup::default()
    };
    let emulator = setup
        .emulator
        .clone()
        .start()
        .await
        .expect("emulator starts");
    let mut text = support::config_text(&setup, &emulator);
    text.push_str(&extra(&emulator));
    Harness::from_text(emulator, &text, setup.tuning).await
}

/// [`harness_with`] and the standard routes only.
async fn start(server_extra: &str) -> Harness {
    harness_with(server_extra, |_| String::new()).await
}

/// `GET path` while the upstream holds its next answer for 3 s.
async fn get_with_slow_upstream(h: &Harness, path: &str) -> reqwest::Response {
    h.emulator
        .push_upstream_faults([UpstreamFault::Delay(Duration::from_secs(3))]);
    h.get(path).await
}

/// A `[[routes]]` table using the harness credential; `extra` holds more keys (`timeout = ...`).
fn route(prefix: &str, upstream: &str, extra: &str) -> String {
    format!(
        "\n[[routes]]\nprefix = \"{prefix}\"\nupstream = \"{upstream}\"\ncredential = \"automation\"\n{extra}"
    )
}

/// Asserts one of the proxy's own JSON errors.
async fn assert_proxy_error(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status(), status);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = json(response).await;
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// The value of the Prometheus sample `name{labels...}` in `text`, when present.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (label_text, value) = rest.rsplit_once("} ")?;
        let all = labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|l| l == format!("{k}=\"{v}\"")));
        if all {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

fn upstream_errors(h: &Harness, route: &str, kind: &str) -> f64 {
    let text = h.proxy.shared().metrics.encode();
    sample(
        &text,
        "proxy_upstream_errors_total",
        &[("route", route), ("kind", kind)],
    )
    .unwrap_or_else(|| panic!("no upstream error series for {route} {kind}:\n{text}"))
}

#[tokio::test]
async fn a_route_timeout_shorter_than_a_slow_upstream_answers_504_upstream_timeout() {
    let h = harness_with("request_timeout = \"30s\"", |e| {
        route(
            "/deploy-short",
            &e.api_base(Api::Deploy),
            "timeout = \"1s\"\n",
        )
    })
    .await;

    let response = get_with_slow_upstream(&h, "/deploy-short/api/projects/v1").await;
    assert_proxy_error(response, 504, "upstream_timeout").await;
    assert_eq!(
        h.emulator.upstream_requests(),
        1,
        "the request reached the upstream, which was too slow"
    );

    // The same slow upstream behind a route without the override: the server's 30 s apply.
    let response = get_with_slow_upstream(&h, "/deploy/api/projects/v1").await;
    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await["path"], "/api/projects/v1");
    assert_eq!(h.emulator.upstream_requests(), 2);

    assert_eq!(upstream_errors(&h, "/deploy-short", "timeout"), 1.0);
    assert_eq!(upstream_errors(&h, "/deploy", "timeout"), 0.0);
}

#[tokio::test]
async fn server_request_timeout_applies_to_routes_without_an_override() {
    let h = harness_with("request_timeout = \"1s\"", |e| {
        route(
            "/deploy-patient",
            &e.api_base(Api::Deploy),
            "timeout = \"30s\"\n",
        )
    })
    .await;

    let response = get_with_slow_upstream(&h, "/deploy/api/projects/v1").await;
    assert_proxy_error(response, 504, "upstream_timeout").await;

    // A route may also allow more than the server default.
    let response = get_with_slow_upstream(&h, "/deploy-patient/api/projects/v1").await;
    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await["path"], "/api/projects/v1");

    assert_eq!(h.emulator.upstream_requests(), 2);
    assert_eq!(upstream_errors(&h, "/deploy", "timeout"), 1.0);
    assert_eq!(upstream_errors(&h, "/deploy-patient", "timeout"), 0.0);
}

#[tokio::test]
async fn refused_and_reset_upstreams_answer_502_and_other_routes_keep_working() {
    // A port that was bound and released: connecting to it is refused.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr")
    };
    let h = harness_with("", |_| route("/gone", &format!("http://{closed}"), "")).await;

    let response = h.get("/gone/api/projects/v1").await;
    assert_proxy_error(response, 502, "upstream_unreachable").await;
    assert_eq!(h.emulator.upstream_requests(), 0);

    // An upstream that drops the connection without answering.
    h.emulator.push_upstream_faults([UpstreamFault::Reset]);
    let response = h.get("/deploy/api/projects/v1").await;
    assert_proxy_error(response, 502, "upstream_unreachable").await;
    assert_eq!(
        h.emulator.upstream_requests(),
        1,
        "the reset request was not retried"
    );

    // Nothing is stuck: the same and the other routes answer.
    for path in [
        "/deploy/api/projects/v1",
        "/authoring",
        "/edge-admin/content",
    ] {
        let response = h.get(path).await;
        assert_eq!(response.status(), 200, "{path}");
    }
    assert_eq!(h.emulator.upstream_requests(), 4);

    assert_eq!(upstream_errors(&h, "/gone", "unreachable"), 1.0);
    assert_eq!(upstream_errors(&h, "/deploy", "unreachable"), 1.0);
    assert_eq!(upstream_errors(&h, "/authoring", "unreachable"), 0.0);
}

/// `stream` is closed by the proxy within [`NOT_A_HANG`], having received at most a 408.
async fn assert_cut_off(stream: &mut TcpStream, who: &str) {
    let answer = tokio::time::timeout(NOT_A_HANG, read_until_closed(stream))
        .await
        .unwrap_or_else(|_| panic!("{who} was not disconnected"));
    assert!(
        answer.is_empty() || status_of(&answer) == 408,
        "{who} gets at most a 408: {answer:?}"
    );
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_while_a_normal_client_is_served() {
    let h = start("header_read_timeout = \"1s\"").await;

    let mut slow = connect_and_write(
        h.proxy.local_addr(),
        b"GET /deploy/api/projects/v1?from=slowloris HTTP/1.1\r\nHost: proxy.test\r\nX-Slow: ",
    )
    .await;

    let response = h.get("/deploy/api/projects/v1").await;
    assert_eq!(
        response.status(),
        200,
        "a normal client is served meanwhile"
    );

    assert_cut_off(&mut slow, "the slow client").await;
    assert_eq!(
        h.emulator.upstream_requests(),
        1,
        "nothing of the slow request reached the upstream"
    );
    assert!(h
        .emulator
        .seen_requests()
        .iter()
        .all(|r| r.query.as_deref() != Some("from=slowloris")));
}

#[tokio::test]
async fn a_kept_alive_connection_that_stalls_in_its_second_request_head_is_cut_off() {
    // The idle timeout is long: only the header-read timeout can end the stall.
    let h = start("header_read_timeout = \"1s\"\nidle_timeout = \"120s\"").await;
    let mut conn = connect_and_write(
        h.proxy.local_addr(),
        b"GET /deploy/api/projects/v1 HTTP/1.1\r\nHost: proxy.test\r\n\r\n",
    )
    .await;
    let first = tokio::time::timeout(NOT_A_HANG, read_response(&mut conn))
        .await
        .expect("the first response");
    assert_eq!(status_of(&first), 200, "{first}");

    conn.write_all(
        b"GET /deploy/api/projects/v1?from=stalled HTTP/1.1\r\nHost: proxy.test\r\nX-Slow: ",
    )
    .await
    .expect("write the partial head");
    assert_cut_off(&mut conn, "the stalled keep-alive connection").await;
    assert_eq!(
        h.emulator.upstream_requests(),
        1,
        "only the first request went up"
    );
}

#[tokio::test]
async fn clients_that_stall_before_their_first_line_are_cut_off_too() {
    let h = start("header_read_timeout = \"1s\"").await;

    // Nothing at all, and a stalled HTTP/2 preface: both hold a connection slot until cut off.
    for sent in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let mut stalled = connect_and_write(h.proxy.local_addr(), sent).await;
        let what = format!("a client that sent {:?}", String::from_utf8_lossy(sent));
        assert_cut_off(&mut stalled, &what).await;
    }
    assert_eq!(h.emulator.upstream_requests(), 0);
}

#[tokio::test]
async fn beyond_max_connections_a_client_gets_503_overloaded_and_the_proxy_recovers() {
    let h = start("max_connections = 2").await;
    let addr = h.proxy.local_addr();

    // Three connections that send nothing: two hold both slots, the third is refused. Which one
    // is refused depends on which worker thread takes which connection first.
    let mut a = TcpStream::connect(addr).await.expect("connect 1");
    let mut b = TcpStream::connect(addr).await.expect("connect 2");
    let mut c = TcpStream::connect(addr).await.expect("connect 3");
    let refused = tokio::time::timeout(NOT_A_HANG, async {
        tokio::select! {
            answer = read_until_closed(&mut a) => (answer, [b, c]),
            answer = read_until_closed(&mut b) => (answer, [a, c]),
            answer = read_until_closed(&mut c) => (answer, [a, b]),
        }
    })
    .await;
    let (answer, [first, second]) = refused.expect("the excess connection is answered and closed");
    assert!(
        answer.starts_with("HTTP/1.1 503 "),
        "an HTTP/1.1 503: {answer:?}"
    );
    let (head, body) = answer.split_once("\r\n\r\n").expect("a complete response");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("\r\nconnection: close"), "{head}");
    assert!(
        head.contains("\r\ncontent-type: application/json"),
        "{head}"
    );
    let body: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    assert_eq!(body["error"], "overloaded", "{body}");
    assert!(body["message"].is_string(), "{body}");

    // One of the holders leaves; its slot frees once the proxy notices the close.
    drop(first);
    let request =
        b"GET /deploy/api/projects/v1 HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n";
    let answer = served_within(addr, request, NOT_A_HANG).await;
    assert_eq!(
        status_of(&answer),
        200,
        "a new client was served after a slot freed: {answer}"
    );
    assert_eq!(h.emulator.upstream_requests(), 1);

    // The proxy stays responsive: with the slot of `first` free, requests keep succeeding. (A
    // slot is released just after its connection closes, so the next one may briefly see 503.)
    for round in 2..=4 {
        let answer = served_within(addr, request, NOT_A_HANG).await;
        assert_eq!(status_of(&answer), 200, "request {round}: {answer}");
        assert_eq!(h.emulator.upstream_requests(), round);
    }
    drop(second);
}

/// Sends `request` on fresh connections until one is served (anything but a refusal: 503, or 0
/// for a reset before the 503 was read), or `limit` passes; returns the last answer.
async fn served_within(addr: SocketAddr, request: &[u8], limit: Duration) -> String {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let answer = exchange(addr, request).await;
        if !matches!(status_of(&answer), 0 | 503) || tokio::time::Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A loopback address whose connects hang: a listener with a backlog of one that never accepts,
/// its accept queue filled, so the kernel drops further SYNs. The returned values keep it so.
async fn hanging_address() -> Option<(SocketAddr, TcpListener, Vec<TcpStream>)> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(_)) => return None,
            // A connect that does not complete: the queue is full.
            Err(_) => return Some((addr, listener, fillers)),
        }
    }
    None
}

#[tokio::test]
async fn connect_timeout_bounds_a_connect_that_hangs() {
    let (addr, _listener, _fillers) = hanging_address()
        .await
        .expect("a loopback listener with a full accept queue makes connects hang");
    // request_timeout is longer than connect_timeout: if only it applied, the answer would be
    // 504 upstream_timeout, not a connection failure.
    let h = harness_with(
        "connect_timeout = \"1s\"\nrequest_timeout = \"20s\"",
        |_| route("/blackhole", &format!("http://{addr}"), ""),
    )
    .await;

    let response = h.get("/blackhole/api/projects/v1").await;
    assert_proxy_error(response, 502, "upstream_unreachable").await;
    assert_eq!(upstream_errors(&h, "/blackhole", "unreachable"), 1.0);
    assert_eq!(upstream_errors(&h, "/blackhole", "timeout"), 0.0);

    // The other routes are unaffected.
    let response = h.get("/deploy/api/projects/v1").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn connect_timeout_bounds_a_tls_handshake_that_hangs() {
    // A listener that accepts TCP and then says nothing: the TLS handshake never finishes.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = silent.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let h = harness_with(
        "connect_timeout = \"1s\"\nrequest_timeout = \"20s\"",
        |_| route("/silent", &format!("https://{addr}"), ""),
    )
    .await;

    // Twice: the second request must not queue behind the first one's abandoned handshake.
    for round in 0..2 {
        let response = h.get("/silent/api/projects/v1").await;
        assert_proxy_error(response, 502, "upstream_unreachable").await;
        assert_eq!(
            upstream_errors(&h, "/silent", "unreachable"),
            f64::from(round + 1)
        );
    }
    assert_eq!(upstream_errors(&h, "/silent", "timeout"), 0.0);
    held.abort();
}
