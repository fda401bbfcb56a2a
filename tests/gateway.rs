//! A gateway for many teams: client keys and permissions, safe defaults, TLS and mTLS, and the
//! local token endpoint for legacy tools. All through real sockets.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use sitecore_auth_proxy::config::Config;
use sitecore_auth_proxy::inbound::Clients;
use support::tls::{self, TestCa};
use support::{json, Harness, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALPHA_KEY: &str = "alpha-key-0123456789";
const BETA_KEY: &str = "beta-key-9876543210";

fn clients_toml() -> String {
    format!(
        "\n[[clients]]\nname = \"alpha\"\nkey = \"{ALPHA_KEY}\"\nroutes = [\"/deploy\", \"/authoring\"]\n\
         \n[[clients]]\nname = \"beta\"\nkey_sha256 = \"{}\"\nroutes = [\"/edge-admin\"]\n",
        hex::encode(Sha256::digest(BETA_KEY))
    )
}

async fn gateway() -> Harness {
    Harness::with(Setup {
        extra_toml: clients_toml(),
        ..Setup::default()
    })
    .await
}

#[tokio::test]
async fn permission_matrix_across_two_clients_and_three_routes() {
    let h = gateway().await;
    let routes = [
        "/deploy/api/projects/v1",
        "/authoring",
        "/edge-admin/content",
    ];
    // (client key, expected status per route)
    let matrix: [(Option<&str>, [u16; 3]); 4] = [
        (Some(ALPHA_KEY), [200, 200, 403]),
        (Some(BETA_KEY), [403, 403, 200]),
        (Some("not-a-key"), [401, 401, 401]),
        (None, [401, 401, 401]),
    ];
    for (key, expected) in matrix {
        for (route, want) in routes.iter().zip(expected) {
            for header in ["authorization", "x-api-key"] {
                let mut request = h.http.get(h.url(route));
                if let Some(key) = key {
                    let value = if header == "authorization" {
                        format!("Bearer {key}")
                    } else {
                        key.to_owned()
                    };
                    request = request.header(header, value);
                }
                let response = request.send().await.expect("response");
                assert_eq!(response.status(), want, "{key:?} {route} via {header}");
                if want == 401 {
                    assert_eq!(
                        response.headers()["www-authenticate"],
                        "Bearer realm=\"sitecore-auth-proxy\""
                    );
                    assert_eq!(json(response).await["error"], "unauthorized");
                } else if want == 403 {
                    assert_eq!(json(response).await["error"], "forbidden");
                }
            }
        }
    }
    // Only the 200s were forwarded: alpha twice per header on two routes, beta on one.
    assert_eq!(h.emulator.upstream_requests(), 2 * 2 + 2);
}

#[tokio::test]
async fn the_inbound_key_never_reaches_the_upstream() {
    let h = gateway().await;
    for header in ["authorization", "x-api-key"] {
        let value = if header == "authorization" {
            format!("Bearer {ALPHA_KEY}")
        } else {
            ALPHA_KEY.to_owned()
        };
        let response = h
            .http
            .get(h.url("/deploy/api/projects/v1"))
            .header(header, value)
            .send()
            .await
            .expect("response");
        assert_eq!(response.status(), 200);
    }
    for seen in h.emulator.seen_requests() {
        let auth = seen.authorization.as_deref().expect("credential injected");
        assert!(!auth.contains(ALPHA_KEY), "{auth}");
        assert!(seen.token_valid);
        for (name, value) in &seen.headers {
            assert!(!value.contains(ALPHA_KEY), "{name}: {value}");
        }
    }
}

#[test]
fn a_public_listener_without_inbound_auth_refuses_to_start() {
    let text = "[server]\nlisten = \"0.0.0.0:8080\"\n\n[credentials.c]\nclient_id = \"i\"\nclient_secret = \"s\"\n\n\
                [[routes]]\nprefix = \"/d\"\nupstream = \"https://example.com\"\ncredential = \"c\"\n";
    let error = Config::parse(text, Path::new("public.toml"), &|_| None).expect_err("refused");
    let message = error.to_string();
    assert!(message.contains("server.listen"), "{message}");
    assert!(message.contains("clients"), "names [[clients]]: {message}");
    assert!(message.contains("client_ca"), "names client_ca: {message}");
    assert!(
        message.contains("allow_anonymous"),
        "names allow_anonymous: {message}"
    );

    let opted_in = text.replace("[server]\n", "[server]\nallow_anonymous = true\n");
    Config::parse(&opted_in, Path::new("public.toml"), &|_| None).expect("explicit opt-in");
    let with_clients = format!("{text}\n[[clients]]\nname = \"a\"\nkey = \"k\"\n");
    Config::parse(&with_clients, Path::new("public.toml"), &|_| None).expect("with clients");
}

/// A harness serving HTTPS with a certificate from `ca`, optionally requiring client certs.
async fn https_harness(ca: &TestCa, client_ca: Option<&TestCa>) -> Harness {
    https_harness_with_config(ca, client_ca).await.0
}

/// [`https_harness`], and the path of a file holding its configuration (for a reload).
async fn https_harness_with_config(
    ca: &TestCa,
    client_ca: Option<&TestCa>,
) -> (Harness, std::path::PathBuf) {
    let dir = tls::temp_dir("https");
    let server = ca.server();
    let cert = tls::write(&dir, "server.crt", &server.cert_pem);
    let key = tls::write(&dir, "server.key", &server.key_pem);
    let mut server_extra = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    if let Some(client_ca) = client_ca {
        let path = tls::write(&dir, "clients.pem", &client_ca.pem());
        server_extra.push_str(&format!("client_ca = \"{}\"\n", path.display()));
    }
    let setup = || Setup {
        server_extra: server_extra.clone(),
        ..Setup::default()
    };
    let mut h = Harness::with(setup()).await;
    h.base = format!("https://{}", h.proxy.local_addr());
    let text = support::config_text(&setup(), &h.emulator);
    (h, tls::write(&dir, "proxy.toml", &text))
}

fn https_client(config: rustls::ClientConfig, h2: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .timeout(Duration::from_secs(10));
    let builder = if h2 { builder } else { builder.http1_only() };
    builder.build().expect("client")
}

#[tokio::test]
async fn https_serves_http1_and_http2_by_alpn() {
    let ca = TestCa::new("test server CA");
    let h = https_harness(&ca, None).await;
    for (alpn, version) in [
        (&b"http/1.1"[..], reqwest::Version::HTTP_11),
        (&b"h2"[..], reqwest::Version::HTTP_2),
    ] {
        let client = https_client(
            tls::client_config(&[ca.der()], None, &[alpn]),
            alpn == b"h2",
        );
        let response = client
            .get(h.url("/deploy/api/projects/v1"))
            .send()
            .await
            .expect("https response");
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
        assert_eq!(json(response).await["path"], "/api/projects/v1");
    }
    // A client that does not trust the CA cannot connect.
    let stranger = TestCa::new("someone else");
    let client = https_client(tls::client_config(&[stranger.der()], None, &[b"h2"]), true);
    assert!(client.get(h.url("/deploy/x")).send().await.is_err());
}

#[tokio::test]
async fn mtls_requires_a_certificate_from_the_client_ca() {
    let server_ca = TestCa::new("server CA");
    let client_ca = TestCa::new("client CA");
    let h = https_harness(&server_ca, Some(&client_ca)).await;

    let good = client_ca.client("team-a");
    let client = https_client(
        tls::client_config(&[server_ca.der()], Some(&good), &[b"h2"]),
        true,
    );
    let response = client
        .get(h.url("/deploy/x"))
        .send()
        .await
        .expect("mTLS response");
    assert_eq!(response.status(), 200);

    let foreign_ca = TestCa::new("foreign CA");
    let foreign = foreign_ca.client("intruder");
    let client = https_client(
        tls::client_config(&[server_ca.der()], Some(&foreign), &[b"http/1.1"]),
        false,
    );
    assert!(
        client.get(h.url("/deploy/x")).send().await.is_err(),
        "a certificate from another CA fails the handshake"
    );

    let client = https_client(
        tls::client_config(&[server_ca.der()], None, &[b"http/1.1"]),
        false,
    );
    assert!(
        client.get(h.url("/deploy/x")).send().await.is_err(),
        "no certificate fails the handshake"
    );
    assert_eq!(
        h.emulator.upstream_requests(),
        1,
        "only the good client got through"
    );
}

/// One HTTP/1.1 request on a new TLS connection made with `config`: whether its handshake
/// resumed a session, and the response's status line.
async fn tls_request(h: &Harness, config: &Arc<rustls::ClientConfig>) -> (bool, String) {
    let (resumed, status, _) = tls_request_with_suite(h, config).await;
    (resumed, status)
}

/// [`tls_request`], and the cipher suite the handshake agreed on.
async fn tls_request_with_suite(
    h: &Harness,
    config: &Arc<rustls::ClientConfig>,
) -> (bool, String, Option<rustls::CipherSuite>) {
    tls_exchange(h, config).await.expect("TLS exchange")
}

/// [`tls_request_with_suite`], or why the connection failed. In TLS 1.3 the client finishes
/// its side of the handshake before the server has judged its certificate, so a refused
/// certificate may surface on the read, as an alert instead of a response.
async fn tls_exchange(
    h: &Harness,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<(bool, String, Option<rustls::CipherSuite>)> {
    let tcp = tokio::net::TcpStream::connect(h.proxy.local_addr()).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    let mut stream = tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(name, tcp)
        .await?;
    let session = stream.get_ref().1;
    let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let suite = session.negotiated_cipher_suite().map(|s| s.suite());
    stream
        .write_all(b"GET /deploy/x HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await?;
    // Reading the response also reads the session tickets sent after the handshake. The end
    // of the connection may come without a close_notify; the status line is what counts.
    let mut response = Vec::new();
    let read = stream.read_to_end(&mut response).await;
    if let (Err(e), true) = (read, response.is_empty()) {
        return Err(e);
    }
    let text = String::from_utf8_lossy(&response);
    Ok((
        resumed,
        text.lines().next().unwrap_or("").to_string(),
        suite,
    ))
}

#[tokio::test]
async fn https_prefers_aes_128_gcm_sha256_whatever_the_client_order() {
    let ca = TestCa::new("test server CA");
    let h = https_harness(&ca, None).await;
    let config = tls::client_config(&[ca.der()], None, &[b"http/1.1"]);
    let offered: Vec<_> = config
        .crypto_provider()
        .cipher_suites
        .iter()
        .map(|s| s.suite())
        .collect();
    assert_eq!(
        offered.first(),
        Some(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
        "the client prefers AES-256"
    );
    let (_, status, suite) = tls_request_with_suite(&h, &Arc::new(config)).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
}

#[tokio::test]
async fn https_clients_resume_however_many_they_are_until_a_reload() {
    let ca = TestCa::new("test server CA");
    let (h, path) = https_harness_with_config(&ca, None).await;
    // More clients than a session cache of 256 holds, each with a session store of its own.
    let clients: Vec<Arc<rustls::ClientConfig>> = (0..300)
        .map(|_| Arc::new(tls::client_config(&[ca.der()], None, &[b"http/1.1"])))
        .collect();
    for config in &clients {
        let (resumed, status) = tls_request(&h, config).await;
        assert!(!resumed, "a first connection is a full handshake");
        assert_eq!(status, "HTTP/1.1 200 OK");
    }
    let mut resumed = 0;
    for config in &clients {
        let (again, status) = tls_request(&h, config).await;
        resumed += usize::from(again);
        assert_eq!(status, "HTTP/1.1 200 OK");
    }
    assert_eq!(resumed, clients.len(), "every client resumed its session");

    // A reload brings new ticket keys: a client verifies again (and a changed client_ca would
    // apply to it).
    h.proxy.reload_from(&path).await.expect("reload");
    let (again, status) = tls_request(&h, &clients[0]).await;
    assert!(!again, "no session from before the reload is resumed");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(h.emulator.upstream_requests(), 601);
}

#[tokio::test]
async fn a_reload_with_another_client_ca_refuses_the_old_cas_clients_even_with_a_ticket() {
    let server_ca = TestCa::new("server CA");
    let old_ca = TestCa::new("old client CA");
    let (h, path) = https_harness_with_config(&server_ca, Some(&old_ca)).await;
    let old_client = Arc::new(tls::client_config(
        &[server_ca.der()],
        Some(&old_ca.client("team-a")),
        &[b"http/1.1"],
    ));
    let (resumed, status) = tls_request(&h, &old_client).await;
    assert!(!resumed);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let (resumed, status) = tls_request(&h, &old_client).await;
    assert!(
        resumed,
        "the client holds a ticket, which skips certificate checks"
    );
    assert_eq!(status, "HTTP/1.1 200 OK");

    // Another client CA: the old tickets' keys are gone with the old configuration, so the
    // old client must show its certificate again, and it no longer passes.
    let new_ca = TestCa::new("new client CA");
    let dir = path.parent().expect("config dir");
    tls::write(dir, "clients.pem", &new_ca.pem());
    h.proxy.reload_from(&path).await.expect("reload");
    let refused = tls_exchange(&h, &old_client).await;
    assert!(
        refused.is_err(),
        "the old CA's client is refused after the reload: {refused:?}"
    );

    let new_client = Arc::new(tls::client_config(
        &[server_ca.der()],
        Some(&new_ca.client("team-b")),
        &[b"http/1.1"],
    ));
    let (_, status) = tls_request(&h, &new_client).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        h.emulator.upstream_requests(),
        3,
        "nothing of the refused connection was forwarded"
    );
}

async fn local_token(h: &Harness, json_body: bool, id: &str, secret: &str) -> reqwest::Response {
    let request = h.http.post(h.url("/oauth/token"));
    let request = if json_body {
        request.json(&serde_json::json!({
            "grant_type": "client_credentials",
            "client_id": id,
            "client_secret": secret,
            "audience": "https://api.sitecorecloud.io",
        }))
    } else {
        request.form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_secret", secret),
            ("audience", "https://api.sitecorecloud.io"),
        ])
    };
    request.send().await.expect("token response")
}

#[tokio::test]
async fn legacy_tools_get_a_token_from_the_proxy_in_form_and_json() {
    let h = gateway().await;
    for json_body in [false, true] {
        let response = local_token(&h, json_body, "alpha", ALPHA_KEY).await;
        assert_eq!(response.status(), 200);
        let body = json(response).await;
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 86_400);
        let token = body["access_token"].as_str().expect("token").to_owned();
        assert!(!token.contains(ALPHA_KEY));

        let response = h
            .http
            .get(h.url("/deploy/api/projects/v1"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("api response");
        assert_eq!(
            response.status(),
            200,
            "the issued token is alpha's identity"
        );
        let response = h
            .http
            .get(h.url("/edge-admin/x"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("api response");
        assert_eq!(response.status(), 403, "with alpha's permissions");
    }
    assert_eq!(
        h.emulator.token_requests(),
        1,
        "Sitecore was asked once, for the proxy itself"
    );

    for (id, secret) in [
        ("alpha", BETA_KEY),
        ("beta", ALPHA_KEY),
        ("nobody", ALPHA_KEY),
    ] {
        let response = local_token(&h, false, id, secret).await;
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.text().await.expect("body"),
            r#"{"error":"access_denied","error_description":"Unauthorized"}"#
        );
    }
    let response = h
        .http
        .post(h.url("/oauth/token"))
        .form(&[
            ("grant_type", "password"),
            ("client_id", "alpha"),
            ("client_secret", ALPHA_KEY),
        ])
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 400);
    assert_eq!(json(response).await["error"], "unsupported_grant_type");
    let response = h
        .http
        .post(h.url("/oauth/token"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 400);
    assert_eq!(json(response).await["error"], "invalid_request");
}

#[tokio::test]
async fn a_token_from_one_replica_is_accepted_by_another_and_expired_ones_are_not() {
    let setup = Setup {
        extra_toml: clients_toml(),
        ..Setup::default()
    };
    let emulator = setup.emulator.clone().start().await.expect("emulator");
    let text = support::config_text(&setup, &emulator);
    let first = Harness::from_text(emulator, &text, setup.tuning.clone()).await;
    let second_emulator = Setup::default().emulator.start().await.expect("emulator");
    let second = Harness::from_text(second_emulator, &text, setup.tuning.clone()).await;
    assert_ne!(first.proxy.local_addr(), second.proxy.local_addr());

    let token = json(local_token(&first, false, "alpha", ALPHA_KEY).await).await["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let response = second
        .http
        .get(second.url("/deploy/api/projects/v1"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("response");
    assert_eq!(
        response.status(),
        200,
        "the second replica accepts the first one's token"
    );

    // An issued token past its expiry, minted with the same configuration.
    let config = support::parse(&text);
    let clients = Clients::from_config(&config).expect("clients");
    let past = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("now")
        .as_secs()
        - 1;
    let expired = clients.issue_token("alpha", past).expect("token");
    let response = second
        .http
        .get(second.url("/deploy/x"))
        .bearer_auth(&expired)
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 401);

    // A token whose signature was tampered with.
    let mut forged = token.clone();
    forged.replace_range(forged.len() - 2.., "AA");
    let response = second
        .http
        .get(second.url("/deploy/x"))
        .bearer_auth(&forged)
        .send()
        .await
        .expect("response");
    assert_eq!(response.status(), 401);
}
