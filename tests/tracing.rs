//! OpenTelemetry traces (`[telemetry]`), through real sockets: the proxy and the emulator on
//! 127.0.0.1:0, and an OTLP/HTTP collector started here that decodes what it is sent with the
//! OpenTelemetry protobuf types. Spans are flushed by shutting the proxy down (the flush is part
//! of what is tested).

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use sitecore_auth_proxy::emulator::{TokenFault, DEFAULT_CLIENT_SECRET};
use sitecore_auth_proxy::logging::{self, Format, MemoryWriter};
use support::{json, Harness, Setup};
use tokio::net::TcpListener;

const CLIENT_KEY: &str = "client-key-9f8e7d6c5b4a";
const QUERY_SECRET: &str = "sig=query-secret-31337";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// A span as the collector received it, with its resource's attributes.
type ReceivedSpan = (Vec<KeyValue>, Span);

/// What the collector was sent: every span, with its resource's attributes.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    posts: Arc<Mutex<Vec<String>>>,
}

impl Received {
    fn spans(&self) -> Vec<Span> {
        let spans = self.spans.lock().expect("lock");
        spans.iter().map(|(_, span)| span.clone()).collect()
    }

    fn resources(&self) -> Vec<Vec<KeyValue>> {
        let spans = self.spans.lock().expect("lock");
        spans.iter().map(|(resource, _)| resource.clone()).collect()
    }
}

/// An OTLP/HTTP collector on 127.0.0.1:0 that takes `POST /v1/traces` (protobuf).
async fn collector() -> (SocketAddr, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = Received::default();
    let shared = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let received = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let received = received.clone();
                    async move {
                        let target = format!("{} {}", request.method(), request.uri().path());
                        let body = request
                            .into_body()
                            .collect()
                            .await
                            .expect("body")
                            .to_bytes();
                        let export =
                            ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                        let mut spans = received.spans.lock().expect("lock");
                        for resource_spans in export.resource_spans {
                            let resource = resource_spans
                                .resource
                                .map(|r| r.attributes)
                                .unwrap_or_default();
                            for scope in resource_spans.scope_spans {
                                for span in scope.spans {
                                    spans.push((resource.clone(), span));
                                }
                            }
                        }
                        received.posts.lock().expect("lock").push(target);
                        let mut response = hyper::Response::new(Full::new(Bytes::new()));
                        response.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/x-protobuf"),
                        );
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, received)
}

/// The harness with one client (so a key is involved) and `[telemetry]` pointing at `endpoint`.
fn setup(endpoint: &str, telemetry_extra: &str, server_extra: &str) -> Setup {
    Setup {
        server_extra: server_extra.to_owned(),
        extra_toml: format!(
            "\n[[clients]]\nname = \"ci\"\nkey = \"{CLIENT_KEY}\"\n\n[telemetry]\n\
             otlp_endpoint = \"{endpoint}\"\nservice_name = \"gateway-under-test\"\n\
             {telemetry_extra}\n"
        ),
        ..Setup::default()
    }
}

/// `GET /deploy/api/projects/v1?<secret>` with the client key and, optionally, a `traceparent`.
async fn get(harness: &Harness, traceparent: Option<&str>) -> reqwest::Response {
    let mut request = harness
        .http
        .get(harness.url(&format!("/deploy/api/projects/v1?{QUERY_SECRET}")))
        .header("x-api-key", CLIENT_KEY);
    if let Some(traceparent) = traceparent {
        request = request
            .header("traceparent", traceparent)
            .header("tracestate", "vendor=opaque");
    }
    request.send().await.expect("response")
}

/// Shuts the proxy down, which exports what is queued.
async fn flush(harness: Harness) {
    harness.proxy.shutdown();
    tokio::time::timeout(Duration::from_secs(20), harness.proxy.wait())
        .await
        .expect("the proxy stops");
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn string(span: &Span, key: &str) -> Option<String> {
    match attribute(span, key) {
        Some(Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn int(span: &Span, key: &str) -> Option<i64> {
    match attribute(span, key) {
        Some(Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

fn by_name<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// The `traceparent` the upstream received: (trace id, span id, flags).
fn upstream_traceparent(echo: &serde_json::Value) -> (String, String, String) {
    let header = echo["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("the upstream saw a traceparent: {echo}"));
    let parts: Vec<&str> = header.split('-').collect();
    assert_eq!(parts.len(), 4, "{header}");
    assert_eq!(parts[0], "00", "{header}");
    (
        parts[1].to_owned(),
        parts[2].to_owned(),
        parts[3].to_owned(),
    )
}

#[tokio::test]
async fn an_incoming_traceparent_is_continued_in_the_spans_and_upstream() {
    let (addr, received) = collector().await;
    let harness = Harness::with(setup(&format!("http://{addr}"), "", "")).await;
    harness.wait_ready().await;

    let response = get(&harness, Some(&format!("00-{TRACE_ID}-{PARENT_ID}-01"))).await;
    assert_eq!(response.status(), 200);
    let echo = json(response).await;
    let (trace_id, upstream_span_id, flags) = upstream_traceparent(&echo);
    assert_eq!(trace_id, TRACE_ID, "the upstream is in the client's trace");
    assert_ne!(
        upstream_span_id, PARENT_ID,
        "the upstream's parent is the proxy's span"
    );
    assert_eq!(flags, "01");
    assert_eq!(echo["headers"]["tracestate"], "vendor=opaque");
    flush(harness).await;

    let spans = received.spans();
    let server = by_name(&spans, "GET /deploy");
    assert_eq!(server.len(), 1, "one request span: {spans:#?}");
    let server = server[0];
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(hex::encode(&server.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&server.parent_span_id), PARENT_ID);
    assert_eq!(string(server, "http.route").as_deref(), Some("/deploy"));
    assert_eq!(
        string(server, "http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(
        string(server, "url.path").as_deref(),
        Some("/deploy/api/projects/v1")
    );
    assert_eq!(
        string(server, "sitecore_proxy.client").as_deref(),
        Some("ci")
    );
    assert_eq!(
        string(server, "sitecore_proxy.credential").as_deref(),
        Some("automation")
    );
    assert_eq!(int(server, "http.response.status_code"), Some(200));
    assert_eq!(
        int(server, "sitecore_proxy.upstream_status_code"),
        Some(200)
    );

    let upstream: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32 && s.parent_span_id == server.span_id)
        .collect();
    assert_eq!(upstream.len(), 1, "one upstream call: {spans:#?}");
    let upstream = upstream[0];
    assert_eq!(upstream.name, "GET");
    assert_eq!(hex::encode(&upstream.trace_id), TRACE_ID);
    assert_eq!(hex::encode(&upstream.span_id), upstream_span_id);
    assert_eq!(
        string(upstream, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(int(upstream, "http.response.status_code"), Some(200));

    // The refresher's first fetch is a trace of its own.
    let fetches = by_name(&spans, "token fetch");
    assert!(!fetches.is_empty(), "{spans:#?}");
    for fetch in fetches {
        assert!(fetch.parent_span_id.is_empty(), "a root span: {fetch:?}");
        assert_ne!(hex::encode(&fetch.trace_id), TRACE_ID);
        assert_eq!(
            string(fetch, "sitecore_proxy.token.outcome").as_deref(),
            Some("ok")
        );
    }
    let service = received.resources()[0]
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.clone()?.value);
    assert_eq!(
        service,
        Some(Value::StringValue("gateway-under-test".to_owned()))
    );
    assert!(received
        .posts
        .lock()
        .expect("lock")
        .iter()
        .all(|p| p == "POST /v1/traces"));
}

#[tokio::test]
async fn without_a_traceparent_a_new_trace_starts_and_goes_upstream() {
    let (addr, received) = collector().await;
    let harness = Harness::with(setup(&format!("http://{addr}/"), "", "")).await;
    harness.wait_ready().await;

    // A malformed one counts as none.
    for traceparent in [None, Some("00-not-a-trace-01")] {
        let response = get(&harness, traceparent).await;
        assert_eq!(response.status(), 200);
        let echo = json(response).await;
        let (trace_id, _, flags) = upstream_traceparent(&echo);
        assert_ne!(trace_id, "0".repeat(32));
        assert_eq!(flags, "01", "sampled at the default ratio 1.0");
        assert!(echo["headers"].get("tracestate").is_none(), "{echo}");
    }
    let token = harness
        .proxy
        .credential("automation")
        .and_then(|c| c.current())
        .expect("a token");
    let bearer = token
        .authorization
        .to_str()
        .expect("ASCII")
        .trim_start_matches("Bearer ")
        .to_owned();
    flush(harness).await;

    let spans = received.spans();
    let servers = by_name(&spans, "GET /deploy");
    assert_eq!(servers.len(), 2, "{spans:#?}");
    for server in servers {
        assert!(server.parent_span_id.is_empty(), "a new trace: {server:?}");
        let children: Vec<&Span> = spans
            .iter()
            .filter(|s| s.parent_span_id == server.span_id)
            .collect();
        assert_eq!(children.len(), 1, "{spans:#?}");
        assert_eq!(children[0].trace_id, server.trace_id);
    }

    // Nothing secret anywhere: not in a name, an attribute or the resource.
    let secrets = [
        CLIENT_KEY,
        DEFAULT_CLIENT_SECRET,
        bearer.as_str(),
        QUERY_SECRET,
        "query-secret",
    ];
    let mut texts: Vec<String> = Vec::new();
    for span in &spans {
        texts.push(span.name.clone());
        texts.extend(span.attributes.iter().map(|kv| format!("{kv:?}")));
        texts.extend(span.events.iter().map(|e| format!("{e:?}")));
        texts.push(format!("{:?}", span.status));
    }
    for resource in received.resources() {
        texts.extend(resource.iter().map(|kv| format!("{kv:?}")));
    }
    for secret in secrets {
        assert!(
            texts.iter().all(|t| !t.contains(secret)),
            "{secret:?} appears in a span: {texts:#?}"
        );
    }
}

#[tokio::test]
async fn the_access_line_carries_the_trace_id() {
    let (addr, _received) = collector().await;
    // Served inline, under a subscriber installed for this test's scope, so its access lines
    // are captured here.
    let capture = MemoryWriter::default();
    let scope = tracing::dispatcher::set_default(&logging::subscriber(
        Format::Json,
        "info",
        capture.clone(),
        false,
    ));
    let setup = setup(&format!("http://{addr}"), "", "");
    let emulator = setup.emulator.clone().start().await.expect("emulator");
    let text = support::config_text(&setup, &emulator);
    let harness = Harness::inline(emulator, &text, setup.tuning).await;
    let response = get(&harness, Some(&format!("00-{TRACE_ID}-{PARENT_ID}-01"))).await;
    assert_eq!(response.status(), 200);
    let response = get(&harness, None).await;
    let (new_trace, _, _) = upstream_traceparent(&json(response).await);
    flush(harness).await;
    drop(scope);

    let logs = capture.take();
    let trace_ids: Vec<String> = logs
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "access")
        .map(|line| line["trace_id"].as_str().unwrap_or("none").to_owned())
        .collect();
    assert_eq!(trace_ids, [TRACE_ID.to_owned(), new_trace], "{logs}");
}

#[tokio::test]
async fn a_request_that_finds_the_cache_cold_waits_in_a_child_span() {
    let (addr, received) = collector().await;
    let setup = setup(&format!("http://{addr}"), "", "");
    let harness = Harness::prepared(setup, |emulator| {
        emulator.push_token_faults([TokenFault::Delay(Duration::from_secs(1))]);
    })
    .await;
    // No wait for readiness: the first token is still on its way.
    let response = get(&harness, None).await;
    assert_eq!(response.status(), 200);
    flush(harness).await;

    let spans = received.spans();
    let server = by_name(&spans, "GET /deploy");
    assert_eq!(server.len(), 1, "{spans:#?}");
    let waits = by_name(&spans, "token wait");
    assert_eq!(waits.len(), 1, "{spans:#?}");
    assert_eq!(waits[0].parent_span_id, server[0].span_id);
    assert_eq!(
        string(waits[0], "sitecore_proxy.credential").as_deref(),
        Some("automation")
    );
    assert_eq!(
        string(waits[0], "sitecore_proxy.token.outcome").as_deref(),
        Some("ok")
    );
    let cold = by_name(&spans, "token fetch");
    assert!(
        cold.iter()
            .any(|f| string(f, "sitecore_proxy.token.trigger").as_deref() == Some("cold")),
        "{spans:#?}"
    );
}

#[tokio::test]
async fn at_ratio_zero_new_traces_are_dropped_and_sampled_parents_followed() {
    let (addr, received) = collector().await;
    let harness = Harness::with(setup(&format!("http://{addr}"), "sample_ratio = 0.0", "")).await;
    harness.wait_ready().await;

    let response = get(&harness, None).await;
    assert_eq!(response.status(), 200);
    let (_, _, flags) = upstream_traceparent(&json(response).await);
    assert_eq!(flags, "00", "the upstream learns the trace is not sampled");

    let response = get(&harness, Some(&format!("00-{TRACE_ID}-{PARENT_ID}-01"))).await;
    assert_eq!(response.status(), 200);
    let (trace_id, _, flags) = upstream_traceparent(&json(response).await);
    assert_eq!((trace_id.as_str(), flags.as_str()), (TRACE_ID, "01"));

    // A parent that is not sampled is followed too: nothing.
    let response = get(&harness, Some(&format!("00-{TRACE_ID}-{PARENT_ID}-00"))).await;
    assert_eq!(response.status(), 200);
    flush(harness).await;

    let spans = received.spans();
    assert_eq!(
        spans.len(),
        2,
        "the sampled request and its upstream call: {spans:#?}"
    );
    for span in &spans {
        assert_eq!(hex::encode(&span.trace_id), TRACE_ID);
    }
}

/// A collector that accepts connections and never answers.
async fn hanging_collector() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}

/// A port nothing listens on.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

/// Requests through a proxy whose collector is at `addr` (down or hanging) answer at once, and
/// the proxy still stops within its grace.
async fn requests_do_not_wait_for(addr: SocketAddr) -> Harness {
    let harness = Harness::with(setup(
        &format!("http://{addr}"),
        "",
        "shutdown_grace = \"1s\"",
    ))
    .await;
    harness.wait_ready().await;
    for _ in 0..20 {
        let response = tokio::time::timeout(Duration::from_secs(5), get(&harness, None))
            .await
            .expect("an answer without waiting on the collector");
        assert_eq!(response.status(), 200);
    }
    harness
}

#[tokio::test]
async fn a_collector_that_is_down_costs_requests_nothing() {
    let addr = closed_port().await;
    let harness = requests_do_not_wait_for(addr).await;
    // The batch leaves after its delay and fails; that is counted, and nothing else happens.
    let proxy = &harness.proxy;
    assert!(
        support::eventually(Duration::from_secs(30), || {
            proxy.metrics().telemetry_export_failures.get() > 0
        })
        .await,
        "the failed export is counted"
    );
    let response = get(&harness, None).await;
    assert_eq!(response.status(), 200);
    harness.proxy.shutdown();
    tokio::time::timeout(Duration::from_secs(4), harness.proxy.wait())
        .await
        .expect("the proxy stops within its grace (1 s) and the flush bound");
}

#[tokio::test]
async fn a_collector_that_hangs_costs_requests_nothing() {
    let (addr, collector) = hanging_collector().await;
    let harness = requests_do_not_wait_for(addr).await;
    harness.proxy.shutdown();
    tokio::time::timeout(Duration::from_secs(4), harness.proxy.wait())
        .await
        .expect("the proxy stops within its grace (1 s) and the flush bound");
    collector.abort();
}
