//! HTTP versions end to end: HTTP/1.1 and HTTP/2 (h2c prior knowledge) to the proxy, times an
//! HTTPS upstream that offers HTTP/2 by ALPN or only HTTP/1.1, with the upstream trusted through
//! `upstream_ca` (a CA generated in the test).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sitecore_auth_proxy::emulator::{Api, Emulator};
use support::tls::{self, TestCa};
use support::{json, Harness, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    assert_one_deploy_connection_per_worker_at_most(&h, "21 sequential requests");
}

/// The `/deploy` upstream saw at least one and at most one connection per worker pool.
fn assert_one_deploy_connection_per_worker_at_most(h: &Harness, what: &str) {
    let pools = h.proxy.workers().pools() as u64;
    let connections = h.emulator.upstream_connections(Api::Deploy);
    assert!(
        (1..=pools).contains(&connections),
        "{what} over {connections} upstream connections with {pools} worker pools"
    );
}

#[tokio::test]
async fn a_cold_burst_to_an_http2_upstream_opens_one_connection_per_worker() {
    let ca = TestCa::new("h2 burst CA");
    let h = https_upstream_harness(&ca, true, true).await;
    // 40 requests at once on 40 client connections, before the proxy has any upstream
    // connection: each worker opens one HTTP/2 connection and the rest of its requests share it.
    let http = client(false);
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (http, url) = (http.clone(), h.url(&format!("/deploy/burst/{i}")));
        burst.spawn(async move {
            let response = http.get(url).send().await.expect("response");
            assert_eq!(response.status(), 200);
            json(response).await["version"].as_str().map(str::to_owned)
        });
    }
    let mut versions = Vec::new();
    while let Some(version) = burst.join_next().await {
        versions.push(version.expect("request task"));
    }
    assert_eq!(versions.len(), 40);
    assert!(versions.iter().all(|v| v.as_deref() == Some("HTTP/2.0")));
    assert_one_deploy_connection_per_worker_at_most(&h, "40 concurrent HTTP/2 requests");
}

#[tokio::test]
async fn a_response_the_client_abandoned_never_leaks_into_the_next_one() {
    let h = Harness::start().await;
    let http = client(false);
    // The client reads the head and a first chunk of a 4 MB body, then goes away: the upstream
    // connection still holds unread bytes and must not carry another request.
    let mut abandoned = http
        .get(h.url("/deploy/big?emulator_bytes=4000000"))
        .send()
        .await
        .expect("response");
    assert_eq!(abandoned.status(), 200);
    assert!(abandoned.chunk().await.expect("first chunk").is_some());
    drop(abandoned);
    for i in 0..10 {
        let response = http
            .get(h.url("/deploy/small?emulator_bytes=100000"))
            .send()
            .await
            .expect("response");
        assert_eq!(response.status(), 200, "request {i}");
        let body = response.bytes().await.expect("body");
        assert_eq!(
            body,
            sitecore_auth_proxy::emulator::pattern_bytes(0, 100_000),
            "request {i} got exactly its own body"
        );
    }
}

/// A plain HTTP/1.1 upstream answering `200 ok` to every request on a kept-alive connection,
/// counting the connections it accepted and those its peer closed.
struct CountingUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingUpstream {
    async fn start() -> CountingUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(AtomicU64::new(0));
        let (a, c) = (Arc::clone(&accepted), Arc::clone(&closed));
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let c = Arc::clone(&c);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                        // Requests without bodies: one answer per complete head.
                        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            head.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).await.is_err() {
                                break;
                            }
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        CountingUpstream {
            addr,
            accepted,
            closed,
            task,
        }
    }
}

/// A `/counted` route to `upstream`.
fn counted_route(upstream: &CountingUpstream) -> String {
    format!(
        "\n[[routes]]\nprefix = \"/counted\"\nupstream = \"http://{}\"\ncredential = \"automation\"\n",
        upstream.addr
    )
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_after_the_idle_timeout() {
    let upstream = CountingUpstream::start().await;
    let h = Harness::with(Setup {
        server_extra: "idle_timeout = \"400ms\"\n".into(),
        extra_toml: counted_route(&upstream),
        ..Setup::default()
    })
    .await;
    let pools = h.proxy.workers().pools() as u64;
    for round in 0..2 {
        for i in 0..10 {
            let response = h.get(&format!("/counted/{i}")).await;
            assert_eq!(response.status(), 200, "round {round}, request {i}");
            assert_eq!(response.text().await.expect("body"), "ok");
        }
        let accepted = upstream.accepted.load(Ordering::SeqCst);
        assert!(
            accepted <= pools * (round + 1),
            "round {round}: 10 sequential requests opened {accepted} connections in all, {pools} pools"
        );
        // Nothing more to send: the pool closes what it kept once the idle timeout passes.
        assert!(
            support::eventually(Duration::from_secs(5), || {
                upstream.closed.load(Ordering::SeqCst) == upstream.accepted.load(Ordering::SeqCst)
            })
            .await,
            "round {round}: {} of {} upstream connections closed",
            upstream.closed.load(Ordering::SeqCst),
            upstream.accepted.load(Ordering::SeqCst)
        );
    }
}

#[tokio::test]
async fn an_unused_http2_upstream_connection_is_let_go_after_the_idle_timeout() {
    // One worker, so every request shares one pool and the count of upstream connections says
    // exactly whether the HTTP/2 connection was kept or replaced.
    let ca = TestCa::new("h2 idle CA");
    let mut server = (*tls::server_config(&ca.server())).clone();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let emulator = Emulator::builder()
        .upstream_tls(Arc::new(server))
        .start()
        .await
        .expect("emulator starts");
    let dir = tls::temp_dir("h2-idle-ca");
    let ca_file = tls::write(&dir, "ca.pem", &ca.pem());
    let setup = Setup {
        server_extra: format!(
            "upstream_ca = [\"{}\"]\nidle_timeout = \"400ms\"\n",
            ca_file.display()
        ),
        ..Setup::default()
    };
    let config = support::parse(&support::config_text(&setup, &emulator));
    let proxy = sitecore_auth_proxy::app::start(
        config,
        sitecore_auth_proxy::app::Options {
            tuning: support::fast_tuning(),
            workers: sitecore_auth_proxy::server::Workers::Threads(
                std::num::NonZeroUsize::new(1).expect("1"),
            ),
        },
    )
    .await
    .expect("proxy starts");
    let url = format!("http://{}/deploy/x", proxy.local_addr());
    let http = client(false);
    let send_five = || async {
        for i in 0..5 {
            let response = http.get(&url).send().await.expect("response");
            assert_eq!(response.status(), 200, "request {i}");
            assert_eq!(json(response).await["version"], "HTTP/2.0");
        }
    };
    send_five().await;
    assert_eq!(
        emulator.upstream_connections(Api::Deploy),
        1,
        "one shared connection"
    );
    send_five().await;
    assert_eq!(
        emulator.upstream_connections(Api::Deploy),
        1,
        "still the same one"
    );
    // Unused for longer than the idle timeout: the next request gets a new connection.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    send_five().await;
    assert_eq!(
        emulator.upstream_connections(Api::Deploy),
        2,
        "the expired connection was replaced once"
    );
}

#[tokio::test]
async fn a_reload_closes_the_old_pools_upstream_connections() {
    let upstream = CountingUpstream::start().await;
    let setup = || Setup {
        extra_toml: counted_route(&upstream),
        ..Setup::default()
    };
    let h = Harness::with(setup()).await;
    for i in 0..5 {
        let response = h.get(&format!("/counted/{i}")).await;
        assert_eq!(response.status(), 200, "request {i}");
        assert_eq!(response.text().await.expect("body"), "ok");
    }
    let before = upstream.accepted.load(Ordering::SeqCst);
    assert!(before >= 1);
    assert_eq!(
        upstream.closed.load(Ordering::SeqCst),
        0,
        "pooled, not closed"
    );

    // The same configuration again: a new runtime with new pools replaces the old one, whose
    // idle connections close with it (long before the 90 s idle timeout).
    let config = support::parse(&support::config_text(&setup(), &h.emulator));
    h.proxy.reload(config).await.expect("reload");
    assert!(
        support::eventually(Duration::from_secs(5), || {
            upstream.closed.load(Ordering::SeqCst) == before
        })
        .await,
        "{} of {before} old upstream connections closed",
        upstream.closed.load(Ordering::SeqCst)
    );
    let response = h.get("/counted/after").await;
    assert_eq!(response.status(), 200);
    assert!(
        upstream.accepted.load(Ordering::SeqCst) > before,
        "a new pool, a new connection"
    );
}
