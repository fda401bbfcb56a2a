//! Shared test harness: the built-in emulator and the proxy, in-process on 127.0.0.1:0.
#![allow(dead_code)]

pub mod forward_proxy;
pub mod raw;
pub mod redis;
pub mod tls;

use std::path::Path;
use std::time::Duration;

use sitecore_auth_proxy::app::{self, Options, RunningProxy};
use sitecore_auth_proxy::config::Config;
use sitecore_auth_proxy::emulator::{Api, Emulator, EmulatorBuilder};
use sitecore_auth_proxy::token::Tuning;

/// Routes every harness configures: prefix and emulated API.
pub const ROUTES: [(&str, Api); 5] = [
    ("/authoring", Api::Authoring),
    ("/deploy", Api::Deploy),
    ("/edge-admin", Api::EdgeAdmin),
    ("/edge-token", Api::EdgeToken),
    ("/stream", Api::StreamDocuments),
];

/// An emulator and a proxy wired to it.
pub struct Harness {
    pub emulator: Emulator,
    pub proxy: RunningProxy,
    pub base: String,
    pub http: reqwest::Client,
}

/// How to build a harness.
pub struct Setup {
    pub emulator: EmulatorBuilder,
    pub client_id: String,
    pub client_secret: String,
    pub credential_extra: String,
    pub server_extra: String,
    pub extra_toml: String,
    pub tuning: Tuning,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            emulator: Emulator::builder(),
            client_id: sitecore_auth_proxy::emulator::DEFAULT_CLIENT_ID.to_owned(),
            client_secret: sitecore_auth_proxy::emulator::DEFAULT_CLIENT_SECRET.to_owned(),
            credential_extra: String::new(),
            server_extra: String::new(),
            extra_toml: String::new(),
            tuning: fast_tuning(),
        }
    }
}

/// Lifecycle timings short enough for tests (the product defaults are seconds to minutes).
pub fn fast_tuning() -> Tuning {
    Tuning {
        backoff_base: Duration::from_millis(200),
        backoff_cap: Duration::from_secs(2),
        ..Tuning::default()
    }
}

/// Escapes a string for a TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The proxy.toml text for `setup` against `emulator`.
pub fn config_text(setup: &Setup, emulator: &Emulator) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}\n\n[credentials.automation]\nclient_id = {}\nclient_secret = {}\ntoken_url = \"{}\"\n{}\n",
        setup.server_extra,
        toml_str(&setup.client_id),
        toml_str(&setup.client_secret),
        emulator.token_url(),
        setup.credential_extra,
    );
    for (prefix, api) in ROUTES {
        text.push_str(&format!(
            "\n[[routes]]\nprefix = \"{prefix}\"\nupstream = \"{}\"\ncredential = \"automation\"\n",
            emulator.api_base(api)
        ));
    }
    text.push_str(&setup.extra_toml);
    text
}

/// Parses config text as the proxy would (no environment).
pub fn parse(text: &str) -> Config {
    match Config::parse(text, Path::new("test.toml"), &|_| None) {
        Ok(c) => c,
        Err(e) => panic!("test config refused:\n{e}\n---\n{text}"),
    }
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::with(Setup::default()).await
    }

    pub async fn with(setup: Setup) -> Harness {
        let emulator = setup
            .emulator
            .clone()
            .start()
            .await
            .expect("emulator starts");
        let text = config_text(&setup, &emulator);
        Harness::from_text(emulator, &text, setup.tuning).await
    }

    /// Starts the emulator, lets `prepare` set its faults before the proxy's first token request,
    /// then starts the proxy.
    pub async fn prepared(setup: Setup, prepare: impl FnOnce(&Emulator)) -> Harness {
        let emulator = setup
            .emulator
            .clone()
            .start()
            .await
            .expect("emulator starts");
        prepare(&emulator);
        let text = config_text(&setup, &emulator);
        Harness::from_text(emulator, &text, setup.tuning).await
    }

    /// `GET path` through the proxy.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("response")
    }

    pub async fn from_text(emulator: Emulator, text: &str, tuning: Tuning) -> Harness {
        let options = Options {
            tuning,
            ..Options::default()
        };
        Harness::from_text_with(emulator, text, options).await
    }

    /// The proxy served inline, on the test's own runtime (tests that capture logs with a
    /// thread-scoped subscriber need every request on their thread), once it holds its token.
    pub async fn inline(emulator: Emulator, text: &str, tuning: Tuning) -> Harness {
        let options = Options {
            workers: sitecore_auth_proxy::server::Workers::Inline,
            tuning,
        };
        let h = Harness::from_text_with(emulator, text, options).await;
        h.wait_ready().await;
        h
    }

    async fn from_text_with(emulator: Emulator, text: &str, options: Options) -> Harness {
        let proxy = app::start(parse(text), options)
            .await
            .expect("proxy starts");
        let base = format!("http://{}", proxy.local_addr());
        Harness {
            emulator,
            proxy,
            base,
            http: client(),
        }
    }

    /// `path` on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.proxy.admin_addr().expect("admin listener")
        )
    }

    /// `GET path` on the admin listener: status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let response = self
            .http
            .get(self.admin_url(path))
            .send()
            .await
            .expect("admin response");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Waits until the credential holds a token (the eager start-up fetch finished).
    pub async fn wait_ready(&self) {
        let credential = self.proxy.credential("automation").expect("credential");
        tokio::time::timeout(Duration::from_secs(10), async {
            while credential.current().is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("token obtained within 10 s");
    }
}

/// A plain HTTP/1.1 client without connection reuse surprises.
pub fn client() -> reqwest::Client {
    // A test may build its client before anything else in the process installed the provider.
    sitecore_auth_proxy::install_crypto_providers();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Parses a JSON response body.
pub async fn json(response: reqwest::Response) -> serde_json::Value {
    let text = response.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `name{labels} value` lines of a Prometheus exposition text.
pub fn samples(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A loopback port free at the moment of asking (another process may take it before use).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}
