//! Stalled bodies, through real sockets: a peer that stops sending in the middle of a body is cut
//! once no bytes have moved for the route's timeout, in both directions, while a slow but steady
//! body streams for as long as it takes.
//!
//! - The upstream sends its head, then stalls its body: the client's body breaks off (HTTP/1.1:
//!   the connection closes short of `Content-Length`; HTTP/2: the stream is reset), the access
//!   line says `complete: false` and `error: "upstream_timeout"`, the upstream error metric
//!   counts a timeout, and the stalled upstream connection is never reused.
//! - A client stalls its upload: 504 `upstream_timeout` with its own message (DESIGN.md has no
//!   code for a client timeout), not counted as an upstream error. A body within `replay_body_limit` is read ahead,
//!   so nothing reaches the upstream; a larger one streams, and the upstream sees it break off.
//!
//! The proxy runs inline on the test's runtime (one upstream pool, so connection reuse is
//! observable). Every case asserts outcomes and counts; time bounds are generous "not a hang"
//! limits, never measurements.

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use sitecore_auth_proxy::emulator::{pattern_bytes, Api, Emulator, UpstreamFault};
use sitecore_auth_proxy::logging::{self, Format, MemoryWriter};
use support::raw::status_of;
use support::{eventually, json, Harness, Setup};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The stall route's timeout: short, so a stall costs a test little.
const TIMEOUT: &str = "300ms";
/// How long the test waits for the proxy to act before calling it a hang.
const NOT_A_HANG: Duration = Duration::from_secs(10);
/// The stall route: the emulated Deploy API with [`TIMEOUT`].
const ROUTE: &str = "/stall";

/// The proxy (inline, one pool) in front of the emulator, with [`ROUTE`] added.
async fn start(server_extra: &str) -> Harness {
    start_with(server_extra, "").await
}

/// [`start`], with more TOML tables after the routes.
async fn start_with(server_extra: &str, extra_toml: &str) -> Harness {
    capture_logs();
    let emulator = Emulator::builder().start().await.expect("emulator starts");
    let setup = Setup {
        server_extra: server_extra.to_owned(),
        extra_toml: extra_toml.to_owned(),
        ..Setup::default()
    };
    let mut text = support::config_text(&setup, &emulator);
    text.push_str(&format!(
        "\n[[routes]]\nprefix = \"{ROUTE}\"\nupstream = \"{}\"\ncredential = \"automation\"\ntimeout = \"{TIMEOUT}\"\n",
        emulator.api_base(Api::Deploy)
    ));
    let h = Harness::inline(emulator, &text, setup.tuning).await;
    h
}

// --------------------------------------------------------------------------- access lines

/// The access lines this test binary writes (the proxy's JSON format), captured by the
/// process's subscriber.
static ACCESS: OnceLock<MemoryWriter> = OnceLock::new();

fn capture_logs() {
    ACCESS.get_or_init(|| {
        let lines = MemoryWriter::default();
        let subscriber = logging::subscriber(Format::Json, "off,access=info", lines.clone(), false);
        tracing::dispatcher::set_global_default(subscriber).expect("global subscriber");
        lines
    });
}

/// The access line of the request with this id, once it is written.
async fn access_line(request_id: &str) -> serde_json::Value {
    let find = || {
        let lines = ACCESS.get().expect("access lines captured").contents();
        lines
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("a JSON line"))
            .find(|line| line["request_id"] == request_id)
    };
    let mut line = None;
    assert!(
        eventually(NOT_A_HANG, || {
            line = find();
            line.is_some()
        })
        .await,
        "an access line for {request_id}"
    );
    line.expect("found")
}

// ---------------------------------------------------------------------------------- helpers

/// A sample of the proxy's Prometheus text whose line contains every `labels` pair; 0 if absent.
fn metric(h: &Harness, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = h.proxy.shared().metrics.encode();
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn upstream_timeouts(h: &Harness) -> f64 {
    metric(
        h,
        "proxy_upstream_errors_total",
        &[("route", ROUTE), ("kind", "timeout")],
    )
}

async fn assert_nothing_in_flight(h: &Harness) {
    let stats = h.proxy.metrics();
    assert!(
        eventually(NOT_A_HANG, || stats.inflight.get() == 0).await,
        "the in-flight gauge returns to 0"
    );
}

/// Reads one response from a raw connection: until its head and `Content-Length` body are in,
/// or the proxy closes the connection.
async fn read_response(stream: &mut (impl AsyncRead + Unpin)) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let complete = |out: &[u8]| {
        let text = String::from_utf8_lossy(out);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        });
        length.is_some_and(|n| body.len() >= n)
    };
    let read = async {
        while !complete(&out) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(NOT_A_HANG, read)
        .await
        .expect("the proxy answers or closes: no hang");
    String::from_utf8_lossy(&out).into_owned()
}

/// The body of a raw response.
fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// Bytes of `response`'s body the client receives, and whether it ended cleanly.
async fn drain(mut response: reqwest::Response) -> (usize, bool) {
    let mut received = 0;
    let read = async {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => received += chunk.len(),
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    };
    let clean = tokio::time::timeout(NOT_A_HANG, read)
        .await
        .expect("the body ends or breaks off: no hang");
    (received, clean)
}

// ----------------------------------------------------------------------- upstream stalls

#[tokio::test]
async fn an_upstream_body_that_stalls_is_cut_and_its_connection_dropped() {
    let h = start("").await;
    h.emulator.push_upstream_faults([UpstreamFault::StallBody {
        sent: 1000,
        declared: 100_000,
    }]);
    let response = h
        .http
        .get(h.url("/stall/api/projects/v1"))
        .header("x-request-id", "stall-upstream-h1")
        .send()
        .await
        .expect("the head arrives");
    assert_eq!(response.status(), 200, "the upstream's head is relayed");
    assert_eq!(response.content_length(), Some(100_000));
    let (received, clean) = drain(response).await;
    assert!(
        !clean,
        "the client sees the body break off, not a clean end"
    );
    assert_eq!(received, 1000, "what the upstream sent before the stall");

    let line = access_line("stall-upstream-h1").await;
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["complete"], false, "{line}");
    assert_eq!(line["error"], "upstream_timeout", "{line}");
    assert_eq!(line["bytes"], 1000, "{line}");
    assert_eq!(upstream_timeouts(&h), 1.0);
    assert_nothing_in_flight(&h).await;

    // The stalled upstream connection was dropped, not pooled: the next request opens another.
    assert_eq!(h.emulator.upstream_connections(Api::Deploy), 1);
    let response = h.get("/stall/api/projects/v1").await;
    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await["api"], "deploy");
    assert_eq!(h.emulator.upstream_connections(Api::Deploy), 2);
    assert_eq!(
        upstream_timeouts(&h),
        1.0,
        "the healthy request counts nothing"
    );
}

#[tokio::test]
async fn over_http2_a_stalled_upstream_body_resets_only_its_stream() {
    let h = start("").await;
    let http2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    h.emulator.push_upstream_faults([UpstreamFault::StallBody {
        sent: 1000,
        declared: 100_000,
    }]);
    let response = http2
        .get(h.url("/stall/api/projects/v1"))
        .header("x-request-id", "stall-upstream-h2")
        .send()
        .await
        .expect("the head arrives");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let (received, clean) = drain(response).await;
    assert!(!clean, "the stream is reset, not ended");
    assert_eq!(received, 1000);

    let line = access_line("stall-upstream-h2").await;
    assert_eq!(line["complete"], false, "{line}");
    assert_eq!(line["error"], "upstream_timeout", "{line}");
    assert_eq!(upstream_timeouts(&h), 1.0);

    // The client's connection survives the reset: the next request on it is served.
    let response = http2
        .get(h.url("/stall/api/projects/v1"))
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await["api"], "deploy");
    assert_nothing_in_flight(&h).await;
}

#[tokio::test]
async fn a_slow_but_steady_upstream_body_streams_for_longer_than_the_timeout() {
    let h = start("").await;
    // 24 chunks 50 ms apart: about 1.2 s in all, four times the route's timeout, while no gap
    // comes near it.
    const LEN: usize = 24 * 512;
    let response = h
        .http
        .get(h.url(&format!(
            "/stall/api/projects/v1?emulator_bytes={LEN}&emulator_chunk=512&emulator_chunk_delay_ms=50"
        )))
        .header("x-request-id", "steady-download")
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(NOT_A_HANG, response.bytes())
        .await
        .expect("no hang")
        .expect("the whole body arrives");
    assert_eq!(body, pattern_bytes(0, LEN), "byte for byte");

    let line = access_line("steady-download").await;
    assert_eq!(line["complete"], true, "{line}");
    assert!(line.get("error").is_none(), "{line}");
    assert_eq!(upstream_timeouts(&h), 0.0);
    assert_nothing_in_flight(&h).await;
}

// ------------------------------------------------------------------------- client stalls

/// A raw request head for a `ROUTE` upload.
fn upload_head(request_id: &str, framing: &str) -> String {
    format!(
        "POST /stall/api/items HTTP/1.1\r\nhost: proxy.test\r\ncontent-type: application/octet-stream\r\n\
         x-request-id: {request_id}\r\n{framing}\r\n\r\n"
    )
}

/// One chunk of a chunked body.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// Sends `head` and `partial`, then nothing more; returns the proxy's answer.
async fn stalled_upload(h: &Harness, head: &str, partial: &[u8]) -> String {
    let mut stream = TcpStream::connect(h.proxy.local_addr())
        .await
        .expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(partial).await.expect("partial body");
    read_response(&mut stream).await
}

async fn assert_client_stall_answer(h: &Harness, response: &str, request_id: &str) {
    assert_504_upstream_timeout(response);
    assert!(
        body_of(response).contains("request body stopped arriving"),
        "the message blames the request body, not the upstream: {response}"
    );
    let line = access_line(request_id).await;
    assert_eq!(line["status"], 504, "{line}");
    assert_eq!(
        upstream_timeouts(h),
        0.0,
        "a stalled client is not counted as an upstream error"
    );
}

#[tokio::test]
async fn a_client_that_stalls_a_small_upload_gets_504_and_nothing_is_forwarded() {
    let h = start("").await;
    let cases: [(&str, String, Vec<u8>); 3] = [
        ("stall-small-none", "content-length: 500".into(), Vec::new()),
        (
            "stall-small-some",
            "content-length: 500".into(),
            vec![b'x'; 100],
        ),
        (
            "stall-small-chunked",
            "transfer-encoding: chunked".into(),
            chunk(&[b'y'; 100]),
        ),
    ];
    for (request_id, framing, partial) in cases {
        let head = upload_head(request_id, &framing);
        let response = stalled_upload(&h, &head, &partial).await;
        assert_client_stall_answer(&h, &response, request_id).await;
    }
    assert_eq!(
        h.emulator.upstream_requests(),
        0,
        "a body within replay_body_limit is read ahead: nothing was forwarded"
    );
    assert_nothing_in_flight(&h).await;
}

#[tokio::test]
async fn a_client_that_stalls_a_streamed_upload_is_cut_and_the_upstream_sees_it_break_off() {
    let h = start("replay_body_limit = \"1KiB\"").await;
    let cases: [(&str, String, Vec<u8>); 2] = [
        // A declared length over the limit streams at once.
        (
            "stall-large-declared",
            "content-length: 100000".into(),
            vec![b'x'; 8192],
        ),
        // Chunked: read ahead past the limit, then streamed.
        (
            "stall-large-chunked",
            "transfer-encoding: chunked".into(),
            chunk(&[b'y'; 4096]),
        ),
    ];
    for (i, (request_id, framing, partial)) in cases.into_iter().enumerate() {
        let head = upload_head(request_id, &framing);
        let response = stalled_upload(&h, &head, &partial).await;
        assert_client_stall_answer(&h, &response, request_id).await;

        let mut seen = None;
        assert!(
            eventually(NOT_A_HANG, || {
                seen = h.emulator.seen_requests().get(i).cloned();
                seen.as_ref().is_some_and(|s| s.body_aborted)
            })
            .await,
            "{request_id}: the upstream sees the body break off: {seen:?}"
        );
        let seen = seen.expect("seen");
        assert!(
            seen.body_bytes > 0 && seen.body_bytes < 100_000,
            "{request_id}: part of the body arrived: {}",
            seen.body_bytes
        );
    }
    assert_eq!(h.emulator.upstream_requests(), 2, "each upload sent once");
    assert_nothing_in_flight(&h).await;
}

#[tokio::test]
async fn a_slow_but_steady_upload_streams_for_longer_than_the_timeout() {
    let h = start("replay_body_limit = \"1KiB\"").await;
    // 24 pieces 50 ms apart: about 1.2 s, four times the timeout. The small one is read ahead
    // (the wait for the upstream starts after it); the large one streams, and the wait for the
    // upstream's head runs from its last bytes.
    for (request_id, piece) in [("steady-upload-small", 32), ("steady-upload-large", 512)] {
        let total = 24 * piece;
        let body: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
        let head = upload_head(request_id, &format!("content-length: {total}"));
        let mut stream = TcpStream::connect(h.proxy.local_addr())
            .await
            .expect("connect");
        stream.write_all(head.as_bytes()).await.expect("head");
        for piece in body.chunks(piece) {
            stream.write_all(piece).await.expect("piece");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let response = read_response(&mut stream).await;
        assert_eq!(status_of(&response), 200, "{request_id}: {response}");
        let echo: serde_json::Value = serde_json::from_str(body_of(&response)).expect("JSON");
        assert_eq!(echo["body_bytes"], total, "{request_id}");
        assert_eq!(
            echo["body_sha256"],
            hex::encode(Sha256::digest(&body)),
            "{request_id}: byte for byte"
        );
    }
    assert!(h.emulator.seen_requests().iter().all(|s| !s.body_aborted));
    assert_eq!(upstream_timeouts(&h), 0.0);
    assert_nothing_in_flight(&h).await;
}

#[tokio::test]
async fn an_upstream_that_answers_late_after_a_streamed_upload_still_times_out() {
    // The wait for the head starts when the upload ends; the upstream then takes too long.
    let h = start("replay_body_limit = \"1KiB\"").await;
    h.emulator
        .push_upstream_faults([UpstreamFault::Delay(Duration::from_secs(3))]);
    let response = h
        .http
        .post(h.url("/stall/api/items"))
        .header("x-request-id", "late-after-upload")
        .body(vec![b'z'; 16 * 1024])
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 504);
    assert_eq!(json(response).await["error"], "upstream_timeout");
    assert_eq!(upstream_timeouts(&h), 1.0, "this one is the upstream's");
    assert_nothing_in_flight(&h).await;
}

#[tokio::test]
async fn an_upstream_that_stops_reading_an_upload_is_the_one_timed_out() {
    // The upstream takes the head, then reads nothing for 3 s: once the socket buffers are full
    // the upload stops moving through no fault of the client, so the wait for the upstream
    // applies (and not the client's idle timer).
    let h = start("replay_body_limit = \"1KiB\"").await;
    h.emulator
        .push_upstream_faults([UpstreamFault::Delay(Duration::from_secs(3))]);
    const TOTAL: usize = 256 * 1024 * 1024;
    let head = upload_head("upstream-not-reading", &format!("content-length: {TOTAL}"));
    let stream = TcpStream::connect(h.proxy.local_addr())
        .await
        .expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let sender = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await.expect("head");
        let piece = vec![b'w'; 64 * 1024];
        // Until the buffers are full; a write error (the proxy closed) ends it early.
        for _ in 0..TOTAL / piece.len() {
            if writer.write_all(&piece).await.is_err() {
                break;
            }
        }
    });
    let response = read_response(&mut reader).await;
    assert_504_upstream_timeout(&response);
    assert!(
        body_of(&response).contains("upstream did not answer"),
        "{response}"
    );
    assert_eq!(
        upstream_timeouts(&h),
        1.0,
        "the upstream is the one timed out"
    );
    let line = access_line("upstream-not-reading").await;
    assert_eq!(line["status"], 504, "{line}");
    assert_nothing_in_flight(&h).await;
    sender.abort();
}

/// A raw answer is the proxy's 504 `upstream_timeout`.
fn assert_504_upstream_timeout(response: &str) {
    assert_eq!(status_of(response), 504, "{response}");
    let body: serde_json::Value =
        serde_json::from_str(body_of(response)).unwrap_or_else(|e| panic!("{e}: {response}"));
    assert_eq!(body["error"], "upstream_timeout", "{body}");
}

#[tokio::test]
async fn a_stalled_request_to_the_local_token_endpoint_is_refused() {
    // No route there: the server's request_timeout is the limit.
    let h = start_with(
        &format!("request_timeout = \"{TIMEOUT}\""),
        "\n[[clients]]\nname = \"stall-team\"\nkey = \"stall-key\"\n",
    )
    .await;
    let head = "POST /oauth/token HTTP/1.1\r\nhost: proxy.test\r\n\
                content-type: application/x-www-form-urlencoded\r\ncontent-length: 200\r\n\r\n";
    let mut stream = TcpStream::connect(h.proxy.local_addr())
        .await
        .expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    stream
        .write_all(b"grant_type=client_credentials&client_id=stall-team")
        .await
        .expect("part of the body");
    let response = read_response(&mut stream).await;
    assert_eq!(status_of(&response), 400, "{response}");
    assert_eq!(h.emulator.upstream_requests(), 0);
    assert_nothing_in_flight(&h).await;
}
