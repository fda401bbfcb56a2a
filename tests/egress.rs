//! The egress proxy, through a real forward proxy (tinyproxy, see `support/forward_proxy.rs`):
//! `https://` upstreams through a `CONNECT` tunnel (TLS end to end, certificate generated in the
//! test and trusted through `upstream_ca`), `http://` upstreams and the token endpoint and JWKS
//! in absolute form, `NO_PROXY`, the proxy variables of the environment when
//! `server.egress_proxy` is absent, a proxy that refuses (407, 401, 403), stays silent or dies,
//! and what `check` prints. What went through the forward proxy is read from its log; what arrived is read from
//! the emulator.
//!
//! The environment is injected through `Config::parse`, never set on the test process, so the
//! tests can run in parallel.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sitecore_auth_proxy::app::{self, Options};
use sitecore_auth_proxy::config::Config;
use sitecore_auth_proxy::emulator::{Api, Emulator};
use support::forward_proxy::{ForwardProxy, ProxyOptions};
use support::tls::{self, TestCa};
use support::{config_text, eventually, fast_tuning, json, toml_str, Harness, Setup};

/// How long a refused or dead egress proxy may take to become a 502: the configured
/// `connect_timeout` (2 s) and a margin. A bound on the test, not a measurement.
const PROMPT: Duration = Duration::from_secs(5);

/// The user and password the forward proxy asks for, when it asks.
const PROXY_USER: &str = "egress-user";
const PROXY_PASSWORD: &str = "pr0xy-pa55word";

/// An emulator serving its APIs over HTTPS (`https://localhost:<port>`) with a certificate from
/// `ca`, and the `upstream_ca` line that trusts it. Its token endpoint and JWKS stay plain HTTP
/// on 127.0.0.1.
async fn tls_emulator(ca: &TestCa) -> (Emulator, String) {
    tls_emulator_offering(ca, true).await
}

/// [`tls_emulator`], offering HTTP/2 by ALPN or only HTTP/1.1.
async fn tls_emulator_offering(ca: &TestCa, offer_h2: bool) -> (Emulator, String) {
    let mut server = (*tls::server_config(&ca.server())).clone();
    if !offer_h2 {
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    let emulator = Emulator::builder()
        .upstream_tls(Arc::new(server))
        .start()
        .await
        .expect("emulator starts");
    let dir = tls::temp_dir("egress-ca");
    let ca_file = tls::write(&dir, "ca.pem", &ca.pem());
    let trust = format!(
        "upstream_ca = [{}]\n",
        toml_str(&ca_file.display().to_string())
    );
    (emulator, trust)
}

async fn plain_emulator() -> Emulator {
    Emulator::builder().start().await.expect("emulator starts")
}

/// The harness's proxy.toml for `emulator` with `server_extra` in `[server]`.
fn text_for(emulator: &Emulator, server_extra: &str) -> String {
    config_text(
        &Setup {
            server_extra: server_extra.to_owned(),
            ..Setup::default()
        },
        emulator,
    )
}

/// `egress_proxy = "<url>"`.
fn egress_line(url: &str) -> String {
    format!("egress_proxy = {}\n", toml_str(url))
}

/// Starts the proxy on `text` with `env` as the process environment it reads.
async fn start_with_env(emulator: Emulator, text: &str, env: &[(&str, String)]) -> Harness {
    let lookup = |name: &str| {
        env.iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.clone())
    };
    let config = match Config::parse(text, Path::new("test.toml"), &lookup) {
        Ok(config) => config,
        Err(e) => panic!("test config refused:\n{e}\n---\n{text}"),
    };
    let proxy = app::start(
        config,
        Options {
            tuning: fast_tuning(),
            ..Options::default()
        },
    )
    .await
    .expect("proxy starts");
    Harness {
        emulator,
        base: format!("http://{}", proxy.local_addr()),
        proxy,
        http: support::client(),
    }
}

/// Starts the proxy on `text` with an empty environment.
async fn start(emulator: Emulator, text: &str) -> Harness {
    start_with_env(emulator, text, &[]).await
}

/// The port of a URL.
fn port_of(url: &str) -> u16 {
    reqwest::Url::parse(url)
        .expect("URL")
        .port_or_known_default()
        .expect("port")
}

/// How many requests the emulated `api` received.
fn seen_by(h: &Harness, api: Api) -> usize {
    h.emulator
        .seen_requests()
        .iter()
        .filter(|r| r.api == api)
        .count()
}

/// `GET path`, bounded by [`PROMPT`].
async fn get_promptly(h: &Harness, path: &str) -> reqwest::Response {
    tokio::time::timeout(PROMPT, h.get(path))
        .await
        .unwrap_or_else(|_| panic!("GET {path} took longer than {PROMPT:?}"))
}

/// Asserts a 200 echo from `api` and returns it.
async fn assert_echo(response: reqwest::Response, api: &str) -> serde_json::Value {
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status, 200, "expected the upstream's echo, got: {text}");
    let echo: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(echo["api"], api, "{text}");
    echo
}

/// Asserts the proxy's 502 `upstream_unreachable` naming `proxy_url`, and never `secret`;
/// returns the message.
async fn assert_unreachable_via(
    response: reqwest::Response,
    proxy_url: &str,
    secret: &str,
) -> String {
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status, 502, "{text}");
    assert!(
        !text.contains(secret),
        "the proxy's password is never shown: {text}"
    );
    let body: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert_eq!(body["error"], "upstream_unreachable", "{text}");
    let message = body["message"].as_str().unwrap_or_default().to_owned();
    assert!(
        message.contains(proxy_url),
        "the message names the egress proxy {proxy_url}: {message:?}"
    );
    message
}

#[tokio::test]
async fn https_upstream_goes_through_a_connect_tunnel_that_is_reused() {
    let Some(forward) = ForwardProxy::start().await else {
        return;
    };
    let ca = TestCa::new("upstream CA");
    // HTTP/2 multiplexes on one connection anyway; HTTP/1.1 shows that idle tunnels go back to
    // the pool.
    for offer_h2 in [true, false] {
        let (emulator, trust) = tls_emulator_offering(&ca, offer_h2).await;
        let deploy_port = port_of(&emulator.api_base(Api::Deploy));
        let text = text_for(
            &emulator,
            &format!("{trust}{}", egress_line(&forward.url())),
        );
        let h = start(emulator, &text).await;
        let label = format!("upstream offers h2={offer_h2}");

        const REQUESTS: usize = 6;
        for i in 0..REQUESTS {
            let response = h.get(&format!("/deploy/api/projects/v1?n={i}")).await;
            let echo = assert_echo(response, "deploy").await;
            assert_eq!(echo["path"], "/api/projects/v1", "{label}");
            let version = if offer_h2 { "HTTP/2.0" } else { "HTTP/1.1" };
            assert_eq!(echo["version"], version, "{label}: ALPN end to end");
        }

        let seen: Vec<_> = h
            .emulator
            .seen_requests()
            .into_iter()
            .filter(|r| r.api == Api::Deploy)
            .collect();
        assert_eq!(
            seen.len(),
            REQUESTS,
            "{label}: the upstream saw every request"
        );
        assert!(
            seen.iter().all(|r| r.token_valid),
            "{label}: each with the credential's token"
        );

        let tunnels = forward.connects_to(deploy_port);
        assert!(
            (1..REQUESTS).contains(&tunnels),
            "{label}: {REQUESTS} sequential requests reuse a pooled tunnel: {tunnels} CONNECTs \
             to localhost:{deploy_port}; log:\n{}",
            forward.log()
        );
        assert!(
            forward
                .requests_to(deploy_port)
                .iter()
                .all(|r| r.is_connect() && r.target == format!("localhost:{deploy_port}")),
            "{label}: an https:// upstream is only ever reached through CONNECT host:port: {:?}",
            forward.requests_to(deploy_port)
        );
        assert_eq!(
            h.emulator.upstream_connections(Api::Deploy),
            tunnels as u64,
            "{label}: every connection the upstream accepted came through a tunnel"
        );
    }
}

#[tokio::test]
async fn plain_http_upstream_is_sent_to_the_proxy_in_absolute_form() {
    let Some(forward) = ForwardProxy::start().await else {
        return;
    };
    let emulator = plain_emulator().await;
    let deploy = emulator.api_base(Api::Deploy);
    let text = text_for(&emulator, &egress_line(&forward.url()));
    let h = start(emulator, &text).await;

    // tinyproxy closes its client connection after each answer in absolute form, without
    // `Connection: close` (the upstream's HTTP/1.1 head is relayed as it came): back-to-back
    // requests must never be sent on, and fail with, the connection it is closing.
    const REQUESTS: usize = 10;
    for i in 0..REQUESTS {
        let response = h.get(&format!("/deploy/api/projects/v1?n={i}")).await;
        let echo = assert_echo(response, "deploy").await;
        assert_eq!(echo["path"], "/api/projects/v1");
        assert_eq!(echo["query"], format!("n={i}"));
    }
    assert_eq!(seen_by(&h, Api::Deploy), REQUESTS);

    let through = forward.requests_to(port_of(&deploy));
    for i in 0..REQUESTS {
        let target = format!("{deploy}/api/projects/v1?n={i}");
        assert!(
            through
                .iter()
                .any(|r| r.method == "GET" && r.target == target),
            "the proxy's log shows GET {target}; log:\n{}",
            forward.log()
        );
    }
    assert!(
        through.iter().all(|r| !r.is_connect()),
        "an http:// upstream is never tunnelled: {through:?}"
    );
}

#[tokio::test]
async fn token_endpoint_and_jwks_are_reached_through_the_proxy() {
    let Some(forward) = ForwardProxy::start().await else {
        return;
    };
    let emulator = plain_emulator().await;
    let token_url = emulator.token_url();
    let jwks_url = emulator.jwks_url();
    let auth_port = emulator.auth_addr().port();
    let text = text_for(&emulator, &egress_line(&forward.url()));
    let h = start(emulator, &text).await;

    assert_echo(h.get("/deploy/api/projects/v1").await, "deploy").await;
    assert!(h.emulator.token_requests_ok() >= 1);
    assert!(h.emulator.jwks_requests() >= 1, "the token was verified");

    let through = forward.requests_to(auth_port);
    assert!(
        through
            .iter()
            .any(|r| r.method == "POST" && r.target == token_url),
        "the token request went through the proxy; log:\n{}",
        forward.log()
    );
    assert!(
        through
            .iter()
            .any(|r| r.method == "GET" && r.target == jwks_url),
        "the JWKS request went through the proxy; log:\n{}",
        forward.log()
    );
    assert_eq!(
        through.len() as u64,
        h.emulator.token_requests() + h.emulator.jwks_requests(),
        "every request to the token host went through the proxy: {through:?}"
    );
}

#[tokio::test]
async fn no_proxy_sends_matching_hosts_direct() {
    let Some(forward) = ForwardProxy::start().await else {
        return;
    };
    let ca = TestCa::new("upstream CA");
    let (emulator, trust) = tls_emulator(&ca).await;
    let text = text_for(
        &emulator,
        &format!("{trust}{}", egress_line(&forward.url())),
    );
    // Upper-case NO_PROXY as well, with another value: the lower-case name is read first.
    let env = [
        ("no_proxy", "127.0.0.1, .localhost,localhost".to_owned()),
        ("NO_PROXY", "nothing.example".to_owned()),
    ];
    let h = start_with_env(emulator, &text, &env).await;

    assert_echo(get_promptly(&h, "/deploy/api/projects/v1").await, "deploy").await;
    assert_echo(
        get_promptly(&h, "/edge-admin/content/x").await,
        "edge-admin",
    )
    .await;
    assert!(h.emulator.token_requests_ok() >= 1);
    assert_eq!(
        forward.requests(),
        Vec::new(),
        "nothing went through the proxy; log:\n{}",
        forward.log()
    );
}

#[tokio::test]
async fn https_proxy_from_the_environment_applies_when_the_key_is_absent() {
    let Some(forward) = ForwardProxy::start().await else {
        return;
    };
    let ca = TestCa::new("upstream CA");
    let (emulator, trust) = tls_emulator(&ca).await;
    let deploy_port = port_of(&emulator.api_base(Api::Deploy));
    let auth_port = emulator.auth_addr().port();
    let text = text_for(&emulator, &trust);
    // The lower-case name wins over the upper-case one (a dead port here); no HTTP_PROXY, so the
    // plain-HTTP token endpoint is reached directly.
    let env = [
        ("https_proxy", forward.url()),
        ("HTTPS_PROXY", "http://127.0.0.1:1".to_owned()),
    ];
    let h = start_with_env(emulator, &text, &env).await;

    assert_echo(h.get("/deploy/api/projects/v1").await, "deploy").await;
    assert!(
        forward.connects_to(deploy_port) >= 1,
        "the https:// upstream went through the environment's proxy; log:\n{}",
        forward.log()
    );
    assert!(h.emulator.token_requests_ok() >= 1);
    assert_eq!(
        forward.requests_to(auth_port),
        Vec::new(),
        "HTTPS_PROXY does not apply to the http:// token endpoint"
    );
}

#[tokio::test]
async fn empty_egress_proxy_ignores_the_environment() {
    let Some(forward) = ForwardProxy::start().await else {
        return;
    };
    let ca = TestCa::new("upstream CA");
    let (emulator, trust) = tls_emulator(&ca).await;
    let text = text_for(&emulator, &format!("{trust}egress_proxy = \"\"\n"));
    let env = [
        ("HTTPS_PROXY", forward.url()),
        ("HTTP_PROXY", forward.url()),
        ("https_proxy", forward.url()),
        ("http_proxy", forward.url()),
    ];
    let h = start_with_env(emulator, &text, &env).await;

    assert_echo(h.get("/deploy/api/projects/v1").await, "deploy").await;
    assert!(h.emulator.token_requests_ok() >= 1);
    assert_eq!(
        forward.requests(),
        Vec::new(),
        "egress_proxy = \"\" means no proxy; log:\n{}",
        forward.log()
    );
}

#[tokio::test]
async fn a_proxy_refusing_the_tunnel_is_a_502_that_names_it() {
    let Some(guarded) = ForwardProxy::start_with(ProxyOptions {
        basic_auth: Some((PROXY_USER.to_owned(), PROXY_PASSWORD.to_owned())),
        ..ProxyOptions::default()
    })
    .await
    else {
        return;
    };

    // 407 to a CONNECT: the upstream is https://localhost; the token endpoint (127.0.0.1) is
    // direct, so the token is not what fails.
    let ca = TestCa::new("upstream CA");
    let (emulator, trust) = tls_emulator(&ca).await;
    let text = text_for(
        &emulator,
        &format!("{trust}{}", egress_line(&guarded.url())),
    );
    let env = [("NO_PROXY", "127.0.0.1".to_owned())];
    let h = start_with_env(emulator, &text, &env).await;
    let response = get_promptly(&h, "/deploy/api/projects/v1").await;
    assert_unreachable_via(response, &guarded.url(), PROXY_PASSWORD).await;
    assert_eq!(seen_by(&h, Api::Deploy), 0, "nothing reached the upstream");
    assert!(guarded.requests().iter().any(|r| r.is_connect()));
    drop(h);

    // 403: this proxy allows CONNECT to port 443 only.
    let Some(strict) = ForwardProxy::start_with(ProxyOptions {
        connect_ports: vec![443],
        ..ProxyOptions::default()
    })
    .await
    else {
        return;
    };
    let (emulator, trust) = tls_emulator(&ca).await;
    let text = text_for(&emulator, &format!("{trust}{}", egress_line(&strict.url())));
    let env = [("NO_PROXY", "127.0.0.1".to_owned())];
    let h = start_with_env(emulator, &text, &env).await;
    let response = get_promptly(&h, "/deploy/api/projects/v1").await;
    assert_unreachable_via(response, &strict.url(), PROXY_PASSWORD).await;
    assert_eq!(seen_by(&h, Api::Deploy), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn a_proxy_refusing_an_absolute_form_request_is_a_502_that_names_it() {
    let Some(guarded) = ForwardProxy::start_with(ProxyOptions {
        basic_auth: Some((PROXY_USER.to_owned(), PROXY_PASSWORD.to_owned())),
        ..ProxyOptions::default()
    })
    .await
    else {
        return;
    };

    // 407 to a request in absolute form: the plain upstream shares 127.0.0.1 with the token
    // endpoint, so only the token endpoint's port bypasses the proxy.
    let emulator = plain_emulator().await;
    let deploy_port = port_of(&emulator.api_base(Api::Deploy));
    let auth_port = emulator.auth_addr().port();
    let text = text_for(&emulator, &egress_line(&guarded.url()));
    let env = [("NO_PROXY", format!("127.0.0.1:{auth_port}"))];
    let h = start_with_env(emulator, &text, &env).await;
    let response = get_promptly(&h, "/deploy/api/projects/v1").await;
    assert_unreachable_via(response, &guarded.url(), PROXY_PASSWORD).await;
    assert_eq!(seen_by(&h, Api::Deploy), 0, "nothing reached the upstream");
    assert!(
        guarded
            .requests_to(deploy_port)
            .iter()
            .any(|r| r.method == "GET"),
        "the request was refused by the proxy, not sent elsewhere; log:\n{}",
        guarded.log()
    );
}

#[tokio::test]
async fn proxy_credentials_in_the_url_are_used_and_never_shown() {
    let Some(guarded) = ForwardProxy::start_with(ProxyOptions {
        basic_auth: Some((PROXY_USER.to_owned(), PROXY_PASSWORD.to_owned())),
        ..ProxyOptions::default()
    })
    .await
    else {
        return;
    };
    let ca = TestCa::new("upstream CA");

    // A wrong password: 407, a 502 naming the proxy without the password it was given.
    let wrong = "wr0ng-pa55word";
    let (emulator, trust) = tls_emulator(&ca).await;
    let text = text_for(
        &emulator,
        &format!(
            "{trust}{}",
            egress_line(&guarded.url_with(PROXY_USER, wrong))
        ),
    );
    let env = [("NO_PROXY", "127.0.0.1".to_owned())];
    let h = start_with_env(emulator, &text, &env).await;
    let response = get_promptly(&h, "/deploy/api/projects/v1").await;
    let message = assert_unreachable_via(response, &guarded.url(), wrong).await;
    assert!(!message.contains(PROXY_USER), "{message}");
    drop(h);

    // The right credentials, for everything: the CONNECT tunnel to the https:// upstream, and
    // the token endpoint and JWKS in absolute form.
    let (emulator, trust) = tls_emulator(&ca).await;
    let deploy_port = port_of(&emulator.api_base(Api::Deploy));
    let auth_port = emulator.auth_addr().port();
    let text = text_for(
        &emulator,
        &format!(
            "{trust}{}",
            egress_line(&guarded.url_with(PROXY_USER, PROXY_PASSWORD))
        ),
    );
    let h = start(emulator, &text).await;
    for _ in 0..2 {
        let response = h.get("/deploy/api/projects/v1").await;
        let echo = assert_echo(response, "deploy").await;
        assert!(!echo.to_string().contains(PROXY_PASSWORD));
    }
    assert!(
        forward_saw(&guarded, deploy_port, "CONNECT"),
        "{}",
        guarded.log()
    );
    assert!(
        forward_saw(&guarded, auth_port, "POST"),
        "{}",
        guarded.log()
    );
    let seen = h.emulator.seen_requests();
    assert!(
        seen.iter().all(|r| r
            .headers
            .iter()
            .all(|(name, _)| name != "proxy-authorization")),
        "the proxy's credentials stop at the proxy"
    );
    drop(h);

    // The right credentials for a plain http:// upstream in absolute form.
    let emulator = plain_emulator().await;
    let text = text_for(
        &emulator,
        &egress_line(&guarded.url_with(PROXY_USER, PROXY_PASSWORD)),
    );
    let h = start(emulator, &text).await;
    assert_echo(h.get("/deploy/api/projects/v1").await, "deploy").await;
    let seen = h.emulator.seen_requests();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0]
            .headers
            .iter()
            .all(|(name, _)| name != "proxy-authorization"),
        "tinyproxy strips Proxy-Authorization; the upstream never sees it: {:?}",
        seen[0].headers
    );
}

/// Whether the forward proxy's log shows a `method` request to `port`.
fn forward_saw(forward: &ForwardProxy, port: u16, method: &str) -> bool {
    forward.requests_to(port).iter().any(|r| r.method == method)
}

#[tokio::test]
async fn a_dying_proxy_gives_prompt_502s_and_recovery_after_restart() {
    let Some(mut forward) = ForwardProxy::start().await else {
        return;
    };
    let ca = TestCa::new("upstream CA");
    let (emulator, trust) = tls_emulator(&ca).await;
    let deploy_port = port_of(&emulator.api_base(Api::Deploy));
    let edge_port = port_of(&emulator.api_base(Api::EdgeAdmin));
    let text = text_for(
        &emulator,
        &format!(
            "{trust}{}connect_timeout = \"2s\"\n",
            egress_line(&forward.url())
        ),
    );
    // The token endpoint and the Edge host are direct; Deploy goes through the proxy.
    let env = [("NO_PROXY", format!("127.0.0.1,localhost:{edge_port}"))];
    let h = start_with_env(emulator, &text, &env).await;

    for _ in 0..3 {
        assert_echo(get_promptly(&h, "/deploy/api/projects/v1").await, "deploy").await;
    }
    assert_echo(
        get_promptly(&h, "/edge-admin/content/x").await,
        "edge-admin",
    )
    .await;
    let tunnels_before = forward.connects_to(deploy_port);
    assert!(tunnels_before >= 1, "{}", forward.log());
    assert_eq!(forward.connects_to(edge_port), 0, "the Edge host is direct");

    forward.kill();
    let deploy_seen = seen_by(&h, Api::Deploy);
    for attempt in 0..3 {
        let response = get_promptly(&h, "/deploy/api/projects/v1").await;
        let status = response.status();
        let body = json(response).await;
        assert_eq!(status, 502, "attempt {attempt}: {body}");
        assert_eq!(body["error"], "upstream_unreachable", "attempt {attempt}");
        // The first attempt may find the pooled tunnel just closing; later ones must find the
        // proxy gone and say so.
        if attempt > 0 {
            let message = body["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(&forward.url()),
                "attempt {attempt} names the egress proxy: {message:?}"
            );
        }
        // Other routes keep working meanwhile.
        assert_echo(
            get_promptly(&h, "/edge-admin/content/x").await,
            "edge-admin",
        )
        .await;
    }
    assert_eq!(
        seen_by(&h, Api::Deploy),
        deploy_seen,
        "nothing reached the upstream while the proxy was down"
    );

    forward.restart().await;
    let mut recovered = false;
    for _ in 0..50 {
        let response = get_promptly(&h, "/deploy/api/projects/v1").await;
        if response.status() == 200 {
            assert_echo(response, "deploy").await;
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "requests succeed again once the proxy is back");
    assert!(
        forward.connects_to(deploy_port) > tunnels_before,
        "through a new tunnel; log:\n{}",
        forward.log()
    );
}

#[tokio::test]
async fn a_silent_proxy_is_a_502_within_the_connect_timeout() {
    // A proxy that accepts connections and never answers: no tinyproxy mode does that, so a
    // listener plays it, holding every connection open.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent = format!("http://{}", listener.local_addr().expect("addr"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });

    let ca = TestCa::new("upstream CA");
    let (emulator, trust) = tls_emulator(&ca).await;
    // The request timeout is far beyond the bound: the connect timeout must cover the proxy's
    // answer to CONNECT, not only the TCP connect.
    let text = text_for(
        &emulator,
        &format!(
            "{trust}{}connect_timeout = \"1s\"\nrequest_timeout = \"30s\"\n",
            egress_line(&silent)
        ),
    );
    let env = [("NO_PROXY", "127.0.0.1".to_owned())];
    let h = start_with_env(emulator, &text, &env).await;

    let response = get_promptly(&h, "/deploy/api/projects/v1").await;
    assert_unreachable_via(response, &silent, PROXY_PASSWORD).await;
    assert!(accepted.load(Ordering::SeqCst) >= 1, "the proxy was tried");
    assert_eq!(seen_by(&h, Api::Deploy), 0);
    holder.abort();
}

/// The built binary, with none of the proxy variables of the test's own environment.
fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sitecore-auth-proxy"));
    cmd.env_remove("SITECORE_PROXY_CONFIG")
        .env_remove("RUST_LOG");
    for name in ["https_proxy", "http_proxy", "no_proxy"] {
        cmd.env_remove(name).env_remove(name.to_ascii_uppercase());
    }
    cmd
}

/// Runs `check` (with `args`) on `text` written to a fresh temp dir, with `env` set, on a
/// blocking thread so in-process servers keep serving.
async fn run_check(text: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tls::temp_dir("egress-check");
    let path: PathBuf = tls::write(&dir, "proxy.toml", text);
    let mut cmd = bin();
    cmd.arg("check").args(args).arg("--config").arg(&path);
    for (name, value) in env {
        cmd.env(name, value);
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("run check"))
        .await
        .expect("join")
}

/// A config for `check`: two routes to Sitecore hosts, with `server` lines in `[server]`.
fn check_config(server: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:8080"
{server}

[credentials.automation]
client_id = "id"
client_secret = "client-secret-value"

[[routes]]
prefix = "/deploy"
upstream = "https://xmclouddeploy-api.sitecorecloud.io"
credential = "automation"

[[routes]]
prefix = "/edge-admin"
upstream = "https://edge.sitecorecloud.io/api/admin/v1"
credential = "automation"
"#
    )
}

/// The line of `stdout` starting with `start`.
fn line_starting<'a>(stdout: &'a str, start: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no line starting with {start:?} in:\n{stdout}"))
}

#[tokio::test]
async fn check_names_the_way_out_for_every_route_and_endpoint() {
    let proxy = format!("http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:3128");
    let via_key = "via http://127.0.0.1:3128 (server.egress_proxy)";

    // The key, with NO_PROXY covering the Edge host.
    let output = run_check(
        &check_config(&egress_line(&proxy)),
        &[],
        &[("NO_PROXY", "edge.sitecorecloud.io")],
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains(PROXY_PASSWORD) && !stderr.contains(PROXY_PASSWORD),
        "the proxy's password is never printed:\n{stdout}\n{stderr}"
    );
    assert!(
        line_starting(&stdout, "/deploy ").contains(via_key),
        "{stdout}"
    );
    let edge = line_starting(&stdout, "/edge-admin ");
    assert!(
        edge.contains("direct") && !edge.contains("via "),
        "{stdout}"
    );
    for endpoint in ["token_url", "jwks_url"] {
        let line = line_starting(&stdout, &format!("credential automation: {endpoint} "));
        assert!(line.contains(via_key), "{stdout}");
    }

    // No key: HTTPS_PROXY from the environment.
    let output = run_check(
        &check_config(""),
        &[],
        &[("HTTPS_PROXY", "http://127.0.0.1:3129")],
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}");
    let via_env = "via http://127.0.0.1:3129 (HTTPS_PROXY)";
    assert!(
        line_starting(&stdout, "/deploy ").contains(via_env),
        "{stdout}"
    );
    assert!(
        line_starting(&stdout, "credential automation: token_url ").contains(via_env),
        "{stdout}"
    );

    // `egress_proxy = ""`: direct, whatever the environment says.
    let output = run_check(
        &check_config("egress_proxy = \"\""),
        &[],
        &[("HTTPS_PROXY", "http://127.0.0.1:3129")],
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}");
    assert!(
        !stdout.contains("via "),
        "nothing goes through a proxy:\n{stdout}"
    );
    assert!(
        line_starting(&stdout, "/deploy ").contains("direct"),
        "{stdout}"
    );
}

#[tokio::test]
async fn check_fetch_gets_the_token_through_the_proxy() {
    let Some(forward) = ForwardProxy::start_with(ProxyOptions {
        basic_auth: Some((PROXY_USER.to_owned(), PROXY_PASSWORD.to_owned())),
        ..ProxyOptions::default()
    })
    .await
    else {
        return;
    };
    let emulator = plain_emulator().await;
    let auth_port = emulator.auth_addr().port();
    let text = text_for(
        &emulator,
        &egress_line(&forward.url_with(PROXY_USER, PROXY_PASSWORD)),
    );
    let output = run_check(&text, &["--fetch"], &[]).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("credential automation: token OK"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(PROXY_PASSWORD) && !stderr.contains(PROXY_PASSWORD),
        "{stdout}\n{stderr}"
    );
    let via = format!("via {} (server.egress_proxy)", forward.url());
    assert!(
        line_starting(&stdout, "credential automation: token_url ").contains(&via),
        "{stdout}"
    );
    assert!(
        eventually(Duration::from_secs(5), || forward_saw(
            &forward, auth_port, "POST"
        ))
        .await,
        "check --fetch asked the token endpoint through the proxy; log:\n{}",
        forward.log()
    );
    assert_eq!(emulator.token_requests_ok(), 1);
}
