//! Operating the proxy: readiness, metrics, the status page, reload and drain, through the admin
//! listener and the real binary.

mod support;

use std::time::Duration;

use sitecore_auth_proxy::emulator::{Api, Emulator, TokenFault};
use support::tls::{temp_dir, write};
use support::{eventually, json, Harness, Setup};

const ADMIN: &str = "\n[admin]\nlisten = \"127.0.0.1:0\"\n";

#[tokio::test]
async fn readiness_goes_cold_to_ready_to_shutting_down() {
    let setup = Setup {
        extra_toml: ADMIN.into(),
        ..Setup::default()
    };
    let emulator = setup.emulator.clone().start().await.expect("emulator");
    emulator.push_token_faults([TokenFault::Status(503)]);
    let text = support::config_text(&setup, &emulator);
    let h = Harness::from_text(emulator, &text, setup.tuning).await;

    assert_eq!(h.admin_get("/healthz").await.0, 200);
    let (status, body) = h.admin_get("/readyz").await;
    assert_eq!(status, 503, "cold: {body}");
    assert!(body.contains("automation"), "names the credential: {body}");

    let credential = h.proxy.credential("automation").expect("credential");
    assert!(eventually(Duration::from_secs(10), || credential.current().is_some()).await);
    assert_eq!(h.admin_get("/readyz").await.0, 200);

    h.proxy.shutdown();
    let (status, body) = h.admin_get("/readyz").await;
    assert_eq!(status, 503, "draining: {body}");
    assert!(body.contains("shutting down"));
    assert_eq!(
        h.admin_get("/healthz").await.0,
        200,
        "the admin listener keeps answering"
    );
}

#[tokio::test]
async fn metrics_match_what_happened() {
    let h = Harness::with(Setup {
        extra_toml: ADMIN.into(),
        ..Setup::default()
    })
    .await;
    for _ in 0..5 {
        let r = h.get("/deploy/api/projects/v1").await;
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    let r = h.get("/nowhere").await;
    assert_eq!(r.status(), 404);
    r.bytes().await.expect("body");

    let (status, text) = h.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let m = support::samples(&text);
    assert_eq!(
        m.get(r#"proxy_requests_total{route="/deploy",client="-",status="200"}"#),
        Some(&5.0),
        "{text}"
    );
    assert_eq!(
        m.get(r#"proxy_requests_total{route="-",client="-",status="404"}"#),
        Some(&1.0)
    );
    assert_eq!(
        m.get(r#"token_requests_total{credential="automation",outcome="ok"}"#)
            .copied(),
        Some(h.emulator.token_requests_ok() as f64),
        "the proxy's count matches the emulator's"
    );
    assert_eq!(
        m.get(r#"proxy_request_duration_seconds_count{route="/deploy"}"#),
        Some(&5.0)
    );
    assert!(
        m.contains_key(r#"proxy_request_duration_seconds_bucket{le="0.0001",route="/deploy"}"#),
        "buckets start at 100 µs: {text}"
    );
    assert_eq!(m.get("proxy_inflight_requests"), Some(&0.0));
    let expiry = m[r#"token_expiry_seconds{credential="automation"}"#];
    assert!(expiry > 80_000.0 && expiry <= 86_400.0, "{expiry}");
    for name in [
        "proxy_upstream_errors_total",
        "token_verification_failures_total",
        "config_reloads_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {}", name.trim_end_matches("_total"))),
            "{name}"
        );
    }
}

#[tokio::test]
async fn status_page_shows_health_and_never_a_secret() {
    let secret = "cs-status-MARKER-40c1";
    let key = "ck-status-MARKER-77d9";
    let h = Harness::with(Setup {
        emulator: Emulator::builder().client("status-client", secret),
        client_id: "status-client".into(),
        client_secret: secret.into(),
        extra_toml: format!("{ADMIN}\n[[clients]]\nname = \"team-docs\"\nkey = \"{key}\"\n"),
        ..Setup::default()
    })
    .await;
    h.wait_ready().await;
    let token = h
        .proxy
        .credential("automation")
        .expect("credential")
        .current()
        .expect("token")
        .authorization
        .to_str()
        .expect("ascii")
        .trim_start_matches("Bearer ")
        .to_owned();

    let (status, body) = h.admin_get("/status").await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(doc["credentials"][0]["name"], "automation");
    assert_eq!(doc["credentials"][0]["token_valid"], true);
    assert_eq!(doc["clients"][0]["name"], "team-docs");
    assert!(doc["routes"].as_array().expect("routes").len() >= 5);

    let html = h
        .http
        .get(h.admin_url("/status"))
        .header("accept", "text/html")
        .send()
        .await
        .expect("html");
    assert!(html.headers()["content-type"]
        .to_str()
        .expect("ct")
        .starts_with("text/html"));
    let html = html.text().await.expect("body");
    assert!(html.contains("automation") && html.contains("team-docs") && html.contains("/deploy"));

    let (_, metrics) = h.admin_get("/metrics").await;
    for page in [&body, &html, &metrics] {
        for needle in [secret, key, token.as_str()] {
            assert!(!page.contains(needle), "a secret leaked into an admin page");
        }
    }
}

#[tokio::test]
async fn reload_adds_routes_keeps_tokens_and_refuses_bad_files() {
    let dir = temp_dir("reload");
    let setup = Setup {
        emulator: Emulator::builder()
            .client("client-a", "secret-a")
            .client("client-b", "secret-b"),
        ..Setup::default()
    };
    let emulator = setup.emulator.clone().start().await.expect("emulator");
    write(&dir, "secret", "secret-a\n");
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[credentials.automation]\nclient_id = \"client-a\"\n\
         client_secret_file = \"secret\"\ntoken_url = \"{}\"\n\n[[routes]]\nprefix = \"/deploy\"\n\
         upstream = \"{}\"\ncredential = \"automation\"\n",
        emulator.token_url(),
        emulator.api_base(sitecore_auth_proxy::emulator::Api::Deploy)
    );
    let path = write(&dir, "proxy.toml", &base);
    let config = sitecore_auth_proxy::config::Config::load(&path).expect("valid");
    let proxy = sitecore_auth_proxy::app::start(config, Default::default())
        .await
        .expect("start");
    let mut h = Harness {
        emulator,
        base: format!("http://{}", proxy.local_addr()),
        proxy,
        http: support::client(),
    };
    h.wait_ready().await;
    assert_eq!(h.emulator.token_requests(), 1);
    assert_eq!(
        h.http
            .get(h.url("/authoring"))
            .send()
            .await
            .expect("r")
            .status(),
        404
    );

    // 1. A new route; the credential's settings are unchanged, so its token is kept.
    let with_route = format!(
        "{base}\n[[routes]]\nprefix = \"/authoring\"\nupstream = \"{}\"\ncredential = \"automation\"\n",
        h.emulator.api_base(sitecore_auth_proxy::emulator::Api::Authoring)
    );
    write(&dir, "proxy.toml", &with_route);
    h.proxy.reload_from(&path).await.expect("reload");
    let r = h
        .http
        .post(h.url("/authoring"))
        .body("{}")
        .send()
        .await
        .expect("response");
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["api"], "authoring");
    assert_eq!(
        h.emulator.token_requests(),
        1,
        "no token request for an unchanged credential"
    );

    // 2. The secret file and client change: that credential fetches anew.
    write(&dir, "secret", "secret-b\n");
    write(
        &dir,
        "proxy.toml",
        &with_route.replace("client-a", "client-b"),
    );
    h.proxy.reload_from(&path).await.expect("reload");
    let r = h.get("/deploy/x").await;
    assert_eq!(r.status(), 200);
    assert_eq!(json(r).await["client_id"], "client-b");
    assert_eq!(
        h.emulator.token_requests(),
        2,
        "one token request for the changed credential"
    );

    // 3. An invalid file is refused; the old configuration keeps serving.
    write(
        &dir,
        "proxy.toml",
        &format!("{with_route}\nbogus_key = 1\n"),
    );
    let error = h.proxy.reload_from(&path).await.expect_err("refused");
    assert!(error.to_string().contains("bogus_key"), "{error}");
    write(&dir, "secret", "");
    assert!(
        h.proxy.reload_from(&path).await.is_err(),
        "an empty secret file is refused too"
    );
    let r = h
        .http
        .post(h.url("/authoring"))
        .body("{}")
        .send()
        .await
        .expect("response");
    assert_eq!(r.status(), 200, "still serving the previous configuration");
    assert_eq!(
        h.emulator.token_requests(),
        2,
        "a refused reload costs no token"
    );
    let outcomes = h.proxy.shared().metrics.encode();
    let m = support::samples(&outcomes);
    assert_eq!(
        m.get(r#"config_reloads_total{outcome="success"}"#),
        Some(&2.0)
    );
    assert_eq!(
        m.get(r#"config_reloads_total{outcome="error"}"#),
        Some(&2.0)
    );
    h.base.clear();
}

#[tokio::test]
async fn drain_finishes_a_streaming_request_and_refuses_new_connections() {
    let h = Harness::start().await;
    h.wait_ready().await;
    const SIZE: usize = 64 * 1024;
    let url = format!(
        "{}?emulator_bytes={SIZE}&emulator_chunk=4096&emulator_chunk_delay_ms=40",
        h.url("/deploy/api/logs")
    );
    let mut response = h.http.get(&url).send().await.expect("response");
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.expect("chunk").expect("first chunk");
    let mut received = first.len();

    h.proxy.shutdown();
    assert!(
        eventually(Duration::from_secs(2), || {
            std::net::TcpStream::connect_timeout(&h.proxy.local_addr(), Duration::from_millis(200))
                .is_err()
        })
        .await,
        "the listener stops accepting"
    );
    while let Some(chunk) = response.chunk().await.expect("chunk") {
        received += chunk.len();
    }
    assert_eq!(received, SIZE, "the in-flight stream finished");
    assert!(
        eventually(Duration::from_secs(2), || h.proxy.metrics().inflight.get()
            == 0)
        .await
    );
}

#[cfg(unix)]
mod binary {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    fn kill(pid: u32, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// The real binary: SIGHUP reloads, a bad file is refused and logged, SIGTERM drains and
    /// exits 0.
    #[tokio::test]
    async fn sighup_reloads_and_sigterm_exits_zero() {
        let emulator = Emulator::builder().start().await.expect("emulator");
        let dir = temp_dir("binary");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("probe")
            .local_addr()
            .expect("addr")
            .port();
        let config = |extra: &str| {
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"5s\"\n\n[credentials.automation]\n\
                 client_id = \"{}\"\nclient_secret = \"{}\"\ntoken_url = \"{}\"\n\n[[routes]]\nprefix = \"/deploy\"\n\
                 upstream = \"{}\"\ncredential = \"automation\"\n{extra}",
                sitecore_auth_proxy::emulator::DEFAULT_CLIENT_ID,
                sitecore_auth_proxy::emulator::DEFAULT_CLIENT_SECRET,
                emulator.token_url(),
                emulator.api_base(sitecore_auth_proxy::emulator::Api::Deploy),
            )
        };
        let path = write(&dir, "proxy.toml", &config(""));
        let mut child = Command::new(env!("CARGO_BIN_EXE_sitecore-auth-proxy"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let pid = child.id();
        let stderr = child.stderr.take().expect("stderr");
        let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let base = format!("http://127.0.0.1:{port}");
        let http = support::client();
        let up = async {
            for _ in 0..200 {
                if let Ok(r) = http.get(format!("{base}/deploy/x")).send().await {
                    return r.status().as_u16();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            0
        };
        assert_eq!(up.await, 200);
        assert_eq!(
            http.get(format!("{base}/authoring"))
                .send()
                .await
                .expect("r")
                .status(),
            404
        );

        let added = format!(
            "\n[[routes]]\nprefix = \"/authoring\"\nupstream = \"{}\"\ncredential = \"automation\"\n",
            emulator.api_base(sitecore_auth_proxy::emulator::Api::Authoring)
        );
        write(&dir, "proxy.toml", &config(&added));
        kill(pid, "-HUP");
        let mut ok = false;
        for _ in 0..100 {
            let r = http
                .post(format!("{base}/authoring"))
                .body("{}")
                .send()
                .await
                .expect("r");
            if r.status() == 200 {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ok, "SIGHUP applied the new route");

        write(&dir, "proxy.toml", "[server]\nlisten = 12\n");
        kill(pid, "-HUP");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut refused = false;
        while std::time::Instant::now() < deadline && !refused {
            if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(100)) {
                refused = line.contains("reload refused") && line.contains("server.listen");
            }
        }
        assert!(refused, "the refusal is logged with the problem");
        let r = http
            .post(format!("{base}/authoring"))
            .body("{}")
            .send()
            .await
            .expect("r");
        assert_eq!(r.status(), 200, "the previous configuration keeps serving");

        kill(pid, "-TERM");
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .expect("join")
            .expect("wait");
        assert_eq!(status.code(), Some(0), "SIGTERM drains and exits 0");
        assert_eq!(emulator.token_requests(), 1, "reloads kept the token");
    }
}

#[tokio::test]
async fn what_outlives_the_grace_is_cut() {
    let h = Harness::with(Setup {
        server_extra: "shutdown_grace = \"1s\"\n".into(),
        ..Setup::default()
    })
    .await;
    h.wait_ready().await;
    const SIZE: usize = 4 * 1024 * 1024;
    let url = format!(
        "{}?emulator_bytes={SIZE}&emulator_chunk=4096&emulator_chunk_delay_ms=20",
        h.url("/deploy/api/logs")
    );
    let mut response = h.http.get(&url).send().await.expect("response");
    let mut received = response
        .chunk()
        .await
        .expect("chunk")
        .map_or(0, |c| c.len());
    let Harness { proxy, .. } = h;
    proxy.shutdown();
    tokio::time::timeout(Duration::from_secs(10), proxy.wait())
        .await
        .expect("the drain ends after the grace, not when the stream does");
    while let Ok(Some(chunk)) = response.chunk().await {
        received += chunk.len();
    }
    assert!(
        received < SIZE,
        "the stream was cut at the grace: {received} of {SIZE}"
    );
}

#[tokio::test]
async fn idle_client_connections_are_closed_but_busy_ones_are_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::with(Setup {
        server_extra: "idle_timeout = \"1s\"\nheader_read_timeout = \"30s\"\n".into(),
        ..Setup::default()
    })
    .await;
    h.wait_ready().await;
    // An HTTP/2 connection (prior knowledge) that sends nothing after its preface.
    let mut idle = tokio::net::TcpStream::connect(h.proxy.local_addr())
        .await
        .expect("connect");
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    // A request that stays in flight longer than the idle timeout is not cut.
    let slow = h
        .http
        .get(format!(
            "{}?emulator_bytes=65536&emulator_chunk=4096&emulator_chunk_delay_ms=150",
            h.url("/deploy/slow")
        ))
        .send()
        .await
        .expect("response");
    let body = slow.bytes().await.expect("the busy connection was not cut");
    assert_eq!(body.len(), 65536);
    // Meanwhile the idle one was closed: the server sent GOAWAY and closed.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "the idle connection was closed, not left open"
    );
}

/// A harness whose proxy serves on `workers` worker threads, with the admin listener, in front
/// of an emulator whose upstreams speak HTTP/2 over TLS. Each worker keeps one shared HTTP/2
/// connection per upstream, so the upstream connections the emulator sees count the workers
/// that served a request.
async fn with_workers(workers: usize) -> Harness {
    use sitecore_auth_proxy::app::{self, Options};
    use sitecore_auth_proxy::server::Workers;
    use support::tls::TestCa;

    let ca = TestCa::new("spread CA");
    let mut server = (*support::tls::server_config(&ca.server())).clone();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let dir = temp_dir("spread-ca");
    let ca_file = write(&dir, "ca.pem", &ca.pem());
    let setup = Setup {
        emulator: Emulator::builder().upstream_tls(std::sync::Arc::new(server)),
        server_extra: format!("upstream_ca = [\"{}\"]\n", ca_file.display()),
        extra_toml: ADMIN.into(),
        ..Setup::default()
    };
    let emulator = setup.emulator.clone().start().await.expect("emulator");
    let config = support::parse(&support::config_text(&setup, &emulator));
    let workers = Workers::Threads(std::num::NonZeroUsize::new(workers).expect("workers"));
    let options = Options {
        tuning: setup.tuning,
        workers,
    };
    let proxy = app::start(config, options).await.expect("proxy starts");
    let base = format!("http://{}", proxy.local_addr());
    let h = Harness {
        emulator,
        proxy,
        base,
        http: support::client(),
    };
    h.wait_ready().await;
    h
}

/// Opens a keep-alive connection, has one request answered on it, and keeps it open.
async fn served_connection(h: &Harness) -> tokio::net::TcpStream {
    let mut stream = support::raw::connect_and_write(
        h.proxy.local_addr(),
        b"GET /deploy/api/projects/v1 HTTP/1.1\r\nhost: proxy\r\n\r\n",
    )
    .await;
    let response = support::raw::read_response(&mut stream).await;
    assert_eq!(support::raw::status_of(&response), 200, "{response}");
    stream
}

/// The largest difference between two workers' open connections.
fn spread(counts: &[i64]) -> i64 {
    counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
}

#[tokio::test]
async fn connections_are_spread_over_the_workers() {
    let h = with_workers(2).await;
    // One after the other: whichever worker accepts, one with two more open connections than
    // the other hands the next one over, so the two never drift further apart.
    let mut open = Vec::new();
    for i in 0..8 {
        open.push(served_connection(&h).await);
        let counts = h.proxy.open_connections();
        assert_eq!(counts.iter().sum::<i64>(), i + 1, "{counts:?}");
        assert!(spread(&counts) <= 2, "after {}: {counts:?}", i + 1);
    }
    // Both workers served: each opened its own HTTP/2 connection upstream.
    assert_eq!(
        h.emulator.upstream_connections(Api::Deploy),
        2,
        "one upstream connection per worker that served"
    );
    let counts = h.proxy.open_connections();
    let (status, text) = h.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let m = support::samples(&text);
    for (worker, count) in counts.iter().enumerate() {
        assert_eq!(
            m.get(&format!(r#"proxy_open_connections{{worker="{worker}"}}"#)),
            Some(&(*count as f64)),
            "{text}"
        );
    }
    let (status, page) = h.admin_get("/status").await;
    assert_eq!(status, 200);
    let page: serde_json::Value = serde_json::from_str(&page).expect("status JSON");
    assert_eq!(
        page["open_connections_by_worker"],
        serde_json::json!(counts)
    );

    // Closed connections are uncounted, wherever they were served.
    drop(open);
    assert!(
        eventually(Duration::from_secs(5), || {
            h.proxy.open_connections() == [0, 0]
        })
        .await,
        "{:?}",
        h.proxy.open_connections()
    );
}

#[tokio::test]
async fn a_burst_of_connections_is_not_taken_by_one_worker() {
    // All at once, as a pool of keep-alive clients connects: whichever worker wakes first would
    // otherwise accept most of them (26, 2 and 2 without the spread). Every one is served.
    let h = with_workers(3).await;
    let open = futures_util::future::join_all((0..30).map(|_| served_connection(&h))).await;
    let counts = h.proxy.open_connections();
    assert_eq!(counts.iter().sum::<i64>(), 30, "{counts:?}");
    // Two more than the least busy before handing over, plus what workers placing at the same
    // moment can each add.
    assert!(spread(&counts) <= 4, "{counts:?}");
    assert_eq!(
        h.emulator.upstream_connections(Api::Deploy),
        3,
        "every worker served some"
    );
    drop(open);
}
