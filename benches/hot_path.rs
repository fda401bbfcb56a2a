//! Micro-benchmarks of the request hot path (criterion, `cargo bench --bench hot_path`).
//!
//! - `routes/*`: longest segment-prefix match over 10 and 200 routes (hit, deep hit, miss);
//! - `check_path/*`: the dot-segment guard on plain, percent-encoded and hostile paths;
//! - `token_current/*`: the cached-token read (`OAuthCredential::current`, an `ArcSwap` load and
//!   an `Arc` clone) from 1 thread and from every core at once, against a real emulator token;
//! - `headers/*`: request header hygiene (hop-by-hop and inbound credentials) on a realistic map,
//!   and the upstream URI rewrite;
//! - `inbound/*`: the client key check (`Clients::check_key`, SHA-256 and a constant-time compare
//!   against every client) over 1, 10 and 100 clients, and `Clients::authenticate` with a key
//!   and with a token issued by the local token endpoint;
//! - `access_line/*`: one access-log line (`logging::log_access`) through the proxy's subscriber
//!   to `io::sink`, text and JSON;
//! - `pipeline_1_thread/*`, `pipeline_all_cores/*`: one whole request through the proxy on
//!   127.0.0.1 to an in-process upstream that answers 200 without verifying anything, next to the
//!   same request sent directly, so the difference is what the proxy adds (HTTP/1.1 keep-alive
//!   and HTTP/2 prior knowledge). On one thread the time is the CPU a request costs; on all cores
//!   it also includes the cross-thread wake-ups of a multi-thread runtime.
//!
//! The pipeline benchmarks run without a tracing subscriber, so the access log costs nothing
//! there; `access_line/*` measures it alone, and the load comparison (`benches/load/run.sh`)
//! measures the binary with its logging.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use http::{header, HeaderMap, HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sitecore_auth_proxy::app::{self, Options, RunningProxy};
use sitecore_auth_proxy::config::{Config, RouteSettings};
use sitecore_auth_proxy::emulator::Emulator;
use sitecore_auth_proxy::inbound::Clients;
use sitecore_auth_proxy::logging::{self, AccessLine, Format};
use sitecore_auth_proxy::routes::{check_path, Route, RouteTable};
use sitecore_auth_proxy::server::Workers;
use sitecore_auth_proxy::upstream::{strip_hop_by_hop, strip_inbound_credentials};
use tokio::net::TcpListener;

// -------------------------------------------------------------------------------- access log

fn bench_access_line(c: &mut Criterion) {
    let method = http::Method::GET;
    let line = AccessLine {
        request_id: "5f0c6b2e9d8a4c1b8e7f6a5b4c3d2e1f",
        client: "-",
        method: &method,
        path: "/deploy/api/projects/v1",
        route: "/deploy",
        credential: "deploy",
        status: 200,
        upstream_status: 200,
        duration_us: 842,
        bytes: 38,
        complete: true,
        error: None,
        trace_id: None,
    };
    let mut group = c.benchmark_group("access_line");
    for (name, format) in [("text", Format::Text), ("json", Format::Json)] {
        let subscriber = logging::subscriber(format, "info", std::io::sink, false);
        tracing::dispatcher::with_default(&subscriber, || {
            group.bench_function(name, |b| b.iter(|| logging::log_access(black_box(&line))));
        });
    }
    group.finish();
}

// ------------------------------------------------------------------------------------- routes

/// API families a gateway serving many teams typically exposes, one route per team and family.
const FAMILIES: [(&str, &str); 5] = [
    (
        "authoring",
        "https://xmc-{t}.sitecorecloud.io/sitecore/api/authoring/graphql/v1",
    ),
    ("deploy", "https://xmclouddeploy-api.sitecorecloud.io"),
    ("edge-admin", "https://edge.sitecorecloud.io/api/admin/v1"),
    ("edge-token", "https://edge.sitecorecloud.io/api/apikey/v1"),
    (
        "stream/documents",
        "https://ai-documents-api-euw.sitecorecloud.io",
    ),
];

fn route_table(n: usize) -> RouteTable {
    let routes = (0..n)
        .map(|i| {
            let (family, upstream) = FAMILIES[i % FAMILIES.len()];
            let team = i / FAMILIES.len();
            let settings = RouteSettings {
                prefix: format!("/team-{team:03}/{family}"),
                upstream: upstream
                    .replace("{t}", &team.to_string())
                    .parse()
                    .expect("upstream URI"),
                credential: format!("team-{team:03}"),
                timeout: None,
                limits: Default::default(),
            };
            Route::new(&settings, Duration::from_secs(120)).expect("route")
        })
        .collect();
    RouteTable::new(routes)
}

fn bench_routes(c: &mut Criterion) {
    let mut group = c.benchmark_group("routes");
    for n in [10usize, 200] {
        let table = route_table(n);
        let last_team = n / FAMILIES.len() - 1;
        let hit = format!("/team-{last_team:03}/deploy/api/projects/v1");
        let deep = format!(
            "/team-{last_team:03}/stream/documents/api/documents/v1/0f8fad5b-d9cb-469f-a165-70867728950e/versions/3"
        );
        let miss = "/nobody/deploy/api/projects/v1".to_owned();
        assert!(table.find(&hit).is_some() && table.find(&deep).is_some());
        assert!(table.find(&miss).is_none());
        for (label, path) in [("hit", &hit), ("deep_hit", &deep), ("miss", &miss)] {
            group.bench_with_input(BenchmarkId::new(label, n), path, |b, path| {
                b.iter(|| black_box(table.find(black_box(path)).is_some()))
            });
        }
    }
    group.finish();
}

fn bench_check_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("check_path");
    for (label, path) in [
        ("plain", "/deploy/api/environments/v2/0f8fad5b/deployments"),
        (
            "percent_encoded",
            "/authoring/items/%7B0f8fad5b-d9cb-469f-a165-70867728950e%7D/children%20list",
        ),
        ("hostile", "/deploy/x%252f%252e%252e%252fsecret"),
    ] {
        group.bench_with_input(BenchmarkId::from_parameter(label), path, |b, path| {
            b.iter(|| black_box(check_path(black_box(path))))
        });
    }
    group.finish();
}

// -------------------------------------------------------------------------------- headers

/// What a Sitecore CLI, SDK or CI tool typically sends, including an inbound key.
fn realistic_headers(connection: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("host", "proxy.internal:8080"),
        (
            "user-agent",
            "Sitecore.CLI/6.0.23 (Linux x64) dotnet/8.0.11",
        ),
        ("accept", "application/json, text/plain, */*"),
        ("accept-encoding", "gzip, deflate, br"),
        ("content-type", "application/json; charset=utf-8"),
        ("content-length", "183"),
        ("authorization", "Bearer k-5b0b3a1e9f2c4d7a8e6f1b2c3d4e5f60"),
        ("x-request-id", "7d4e1f0a-3c2b-4a5d-9e8f-1a2b3c4d5e6f"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("connection", connection),
    ] {
        h.insert(
            header::HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    h
}

fn bench_headers(c: &mut Criterion) {
    let mut group = c.benchmark_group("headers");
    for (label, connection) in [
        ("keep_alive", "keep-alive"),
        ("connection_names_extra", "keep-alive, x-trace-hop"),
    ] {
        let headers = realistic_headers(connection);
        group.bench_function(BenchmarkId::new("strip_both", label), |b| {
            b.iter_batched(
                || headers.clone(),
                |mut h| {
                    strip_hop_by_hop(&mut h);
                    strip_inbound_credentials(&mut h);
                    h
                },
                BatchSize::SmallInput,
            )
        });
    }
    let headers = realistic_headers("keep-alive");
    group.bench_function("clone_only_baseline", |b| {
        b.iter(|| black_box(headers.clone()))
    });

    let table = route_table(10);
    let route = Arc::clone(table.find("/team-000/authoring").expect("route"));
    let client_uri: Uri = "/team-000/authoring/items/abc?language=en&version=2"
        .parse()
        .expect("uri");
    group.bench_function("upstream_uri_rewrite", |b| {
        b.iter(|| black_box(route.upstream_uri(black_box(&client_uri)).expect("uri")))
    });
    group.finish();
}

// -------------------------------------------------------------------------------- inbound

/// A configuration with `n` clients whose keys are `client-key-<i>`.
fn clients_config(n: usize) -> Config {
    let mut text = String::from(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [credentials.automation]\nclient_id = \"id\"\nclient_secret = \"secret\"\n\n\
         [[routes]]\nprefix = \"/deploy\"\nupstream = \"https://xmclouddeploy-api.sitecorecloud.io\"\n\
         credential = \"automation\"\n",
    );
    for i in 0..n {
        text.push_str(&format!(
            "\n[[clients]]\nname = \"client-{i:03}\"\nkey = \"client-key-{i:03}-5b0b3a1e9f2c4d7a8e6f\"\n"
        ));
    }
    Config::parse(&text, Path::new("bench.toml"), &|_| None).expect("clients config")
}

fn bench_inbound(c: &mut Criterion) {
    let mut group = c.benchmark_group("inbound");
    for n in [1usize, 10, 100] {
        let clients = Clients::from_config(&clients_config(n)).expect("clients");
        let last = format!("client-key-{:03}-5b0b3a1e9f2c4d7a8e6f", n - 1);
        assert!(clients.check_key(&last).is_some());
        group.bench_with_input(BenchmarkId::new("check_key_hit", n), &last, |b, key| {
            b.iter(|| black_box(clients.check_key(black_box(key)).is_some()))
        });
        group.bench_function(BenchmarkId::new("check_key_miss", n), |b| {
            b.iter(|| black_box(clients.check_key(black_box("not-a-client-key")).is_some()))
        });
        let mut headers = realistic_headers("keep-alive");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {last}")).expect("header"),
        );
        group.bench_with_input(
            BenchmarkId::new("authenticate_key", n),
            &headers,
            |b, headers| b.iter(|| black_box(clients.authenticate(black_box(headers)).is_ok())),
        );
        let expires_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 3600;
        let token = clients
            .issue_token(&format!("client-{:03}", n - 1), expires_at)
            .expect("issued token");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        assert!(clients.authenticate(&headers).is_ok());
        group.bench_with_input(
            BenchmarkId::new("authenticate_issued_token", n),
            &headers,
            |b, headers| b.iter(|| black_box(clients.authenticate(black_box(headers)).is_ok())),
        );
    }
    group.finish();
}

// ------------------------------------------------------------------ proxy + emulator fixture

/// The emulator, a fast upstream and the proxy, on a runtime that outlives the benchmarks.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    _emulator: Emulator,
    proxy: RunningProxy,
    upstream: SocketAddr,
}

const UPSTREAM_BODY: &[u8] = br#"{"ok":true,"service":"bench-upstream"}"#;

/// A minimal upstream: 200 with a small body, request body drained, nothing verified.
async fn serve_upstream(listener: TcpListener) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = service_fn(|req: Request<Incoming>| async move {
            let _ = req.into_body().collect().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(UPSTREAM_BODY))))
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

impl Fixture {
    /// `threads == 1`: a current-thread runtime, so the client, the proxy and the upstream all run
    /// on the benchmark thread and a request's time is the CPU it costs (syscalls included), free
    /// of cross-thread wake-ups. Otherwise a multi-thread runtime with that many workers for the
    /// client and the upstream, and the proxy on its own worker threads (one per core).
    fn start(threads: usize) -> Fixture {
        let runtime = if threads == 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
        }
        .expect("tokio runtime");
        let (emulator, proxy, upstream) = runtime.block_on(async {
            let emulator = Emulator::builder().start().await.expect("emulator");
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let upstream = listener.local_addr().expect("addr");
            tokio::spawn(serve_upstream(listener));
            let text = format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n\n\
                 [credentials.bench]\nclient_id = \"{id}\"\nclient_secret = \"{secret}\"\n\
                 token_url = \"{token_url}\"\nissuer = \"{issuer}\"\njwks_url = \"{jwks}\"\n\n\
                 [[routes]]\nprefix = \"/deploy\"\nupstream = \"http://{upstream}/base\"\n\
                 credential = \"bench\"\n",
                id = sitecore_auth_proxy::emulator::DEFAULT_CLIENT_ID,
                secret = sitecore_auth_proxy::emulator::DEFAULT_CLIENT_SECRET,
                token_url = emulator.token_url(),
                issuer = emulator.issuer(),
                jwks = emulator.jwks_url(),
            );
            let config =
                Config::parse(&text, Path::new("bench.toml"), &|_| None).expect("bench config");
            // One thread: the whole pipeline on this runtime. More: the proxy's own worker
            // threads, as the binary runs it.
            let workers = if threads == 1 {
                Workers::Inline
            } else {
                Workers::default()
            };
            let options = Options {
                workers,
                ..Options::default()
            };
            let proxy = app::start(config, options).await.expect("proxy starts");
            let credential = proxy.credential("bench").expect("credential");
            let deadline = Instant::now() + Duration::from_secs(10);
            while credential.current().is_none() {
                assert!(Instant::now() < deadline, "no token after 10 s");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (emulator, proxy, upstream)
        });
        Fixture {
            runtime,
            _emulator: emulator,
            proxy,
            upstream,
        }
    }
}

fn bench_token_current(c: &mut Criterion, fx: &Fixture) {
    let credential = fx.proxy.credential("bench").expect("credential");
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut group = c.benchmark_group("token_current");
    let mut counts = vec![1, cores, cores * 2];
    counts.dedup();
    for threads in counts {
        // Per-thread latency of one read while `threads` threads read at once: every thread does
        // `iters` reads; the wall time of the slowest is reported per read.
        group.bench_function(BenchmarkId::new("threads", threads), |b| {
            b.iter_custom(|iters| {
                let barrier = Barrier::new(threads);
                std::thread::scope(|s| {
                    let handles: Vec<_> = (0..threads)
                        .map(|_| {
                            s.spawn(|| {
                                barrier.wait();
                                let start = Instant::now();
                                for _ in 0..iters {
                                    black_box(credential.current().expect("token"));
                                }
                                start.elapsed()
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().expect("reader thread"))
                        .max()
                        .unwrap_or_default()
                })
            })
        });
    }
    group.finish();
}

fn bench_pipeline(c: &mut Criterion, fx: &Fixture, group_name: &str) {
    let h1: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let h2: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let proxy_uri: Uri = format!("http://{}/deploy/api/projects/v1", fx.proxy.local_addr())
        .parse()
        .expect("uri");
    let direct_uri: Uri = format!("http://{}/base/api/projects/v1", fx.upstream)
        .parse()
        .expect("uri");

    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Elements(1));
    for (label, client, uri) in [
        ("h1_direct", &h1, &direct_uri),
        ("h1_via_proxy", &h1, &proxy_uri),
        ("h2_direct", &h2, &direct_uri),
        ("h2_via_proxy", &h2, &proxy_uri),
    ] {
        group.bench_function(label, |b| {
            b.to_async(&fx.runtime).iter(|| async {
                let request = Request::get(uri.clone())
                    .header(header::AUTHORIZATION, "Bearer inbound-key")
                    .body(Empty::new())
                    .expect("request");
                let response = client.request(request).await.expect("response");
                assert!(response.status().is_success(), "{}", response.status());
                black_box(response.into_body().collect().await.expect("body"));
            })
        });
    }
    group.finish();
}

fn bench_live(c: &mut Criterion) {
    let single = Fixture::start(1);
    bench_token_current(c, &single);
    bench_pipeline(c, &single, "pipeline_1_thread");
    single.proxy.shutdown();
    drop(single);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let multi = Fixture::start(cores);
    bench_pipeline(c, &multi, "pipeline_all_cores");
    multi.proxy.shutdown();
}

criterion_group!(
    benches,
    bench_routes,
    bench_check_path,
    bench_headers,
    bench_inbound,
    bench_access_line,
    bench_live
);
criterion_main!(benches);
