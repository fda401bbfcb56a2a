//! The command line: `check` reports every problem at once, `hash-key`, and exit codes.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sitecore_auth_proxy::emulator::{Api, Emulator, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET};

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sitecore-auth-proxy"));
    cmd.env_remove("SITECORE_PROXY_CONFIG")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs the binary with `args` and waits for it to exit.
fn run<S: AsRef<OsStr>>(args: &[S]) -> Output {
    bin().args(args).output().expect("run")
}

/// [`run`] on a blocking thread, so the in-process emulator and proxy keep serving meanwhile.
async fn run_bin(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || run(&args))
        .await
        .expect("join")
}

fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("scap-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("proxy.toml");
    std::fs::write(&path, text).expect("write");
    path
}

/// The path as a command-line argument.
fn path_arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

/// A proxy.toml: `head` (the tables before the credential), then the `automation` credential
/// against `emulator` and one `/deploy` route.
fn emulator_config(emulator: &Emulator, head: &str) -> String {
    format!(
        "{head}\n[credentials.automation]\nclient_id = \"{DEFAULT_CLIENT_ID}\"\n\
         client_secret = \"{DEFAULT_CLIENT_SECRET}\"\ntoken_url = \"{}\"\n\n\
         [[routes]]\nprefix = \"/deploy\"\nupstream = \"{}\"\ncredential = \"automation\"\n",
        emulator.token_url(),
        emulator.api_base(Api::Deploy)
    )
}

#[test]
fn check_reports_every_problem_at_once_with_file_and_key() {
    let path = temp_config(
        "bad",
        r#"
[server]
listen = "127.0.0.1:8080"
request_timeout = "soon"
colour = "blue"

[credentials.automation]
client_id = "id"
client_secret = "${SCAP_TEST_UNSET_SECRET}"
algorithms = ["HS256"]

[[routes]]
prefix = "/deploy"
upstream = "http://xmclouddeploy-api.sitecorecloud.io"
credential = "automation"

[[routes]]
prefix = "/deploy"
upstream = "https://example.com"
credential = "missing"
"#,
    );
    let output = run(&["check", "--config", path_arg(&path)]);
    assert_eq!(output.status.code(), Some(64), "bad config exits 64");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let file = path.display().to_string();
    for (key, word) in [
        ("server.request_timeout", "soon"),
        ("server.colour", "colour"),
        (
            "credentials.automation.client_secret",
            "SCAP_TEST_UNSET_SECRET",
        ),
        ("credentials.automation.algorithms", "HS256"),
        ("routes[0].upstream", "https"),
        ("routes[1].credential", "missing"),
        ("routes[1].prefix", "/deploy"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&file) && l.contains(key) && l.contains(word)),
            "no line for {key} mentioning {word:?} in:\n{stderr}"
        );
    }
}

#[test]
fn check_prints_the_route_table_for_a_good_config() {
    let path = temp_config(
        "good",
        r#"
[server]
listen = "127.0.0.1:8080"

[credentials.automation]
client_id = "id"
client_secret = "super-secret-value"

[credentials.edge]
type = "header"
header = "sc_apikey"
value = "edge-key-value"

[[routes]]
prefix = "/authoring"
upstream = "https://xmc-example.sitecorecloud.io/sitecore/api/authoring/graphql/v1"
credential = "automation"

[[routes]]
prefix = "/edge"
upstream = "https://edge.sitecorecloud.io/api/graphql/v1"
credential = "edge"
timeout = "300s"
"#,
    );
    let output = run(&["check", "--config", path_arg(&path)]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("/authoring"));
    assert!(stdout.contains("xmc-example.sitecorecloud.io"));
    assert!(stdout.contains("/edge"));
    assert!(stdout.contains("header"));
    assert!(
        stdout.contains("5m"),
        "the route timeout is shown: {stdout}"
    );
    assert!(!stdout.contains("super-secret-value") && !stdout.contains("edge-key-value"));
}

#[test]
fn config_path_comes_from_the_environment_too() {
    let path = temp_config("env", "[server]\nlisten = \"not an address\"\n");
    let output = bin()
        .arg("check")
        .env("SITECORE_PROXY_CONFIG", &path)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("server.listen"));
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let output = run(&["check", "--config", "/nonexistent/proxy.toml"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/proxy.toml"));
}

#[test]
fn hash_key_prints_the_sha256_of_stdin() {
    let mut child = bin()
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"my-client-key\n")
        .expect("write");
    let output = child.wait_with_output().expect("wait");
    assert!(output.status.success());
    // sha256("my-client-key"), the trailing newline excluded.
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        hex_sha256(b"my-client-key")
    );
}

fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[test]
fn the_repository_example_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let text = std::fs::read_to_string(&path).expect("proxy.toml at the repository root");
    let config = sitecore_auth_proxy::config::Config::parse(&text, &path, &|name| {
        Some(format!("value-of-{name}"))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let prefixes: Vec<&str> = config.routes.iter().map(|r| r.prefix.as_str()).collect();
    for family in [
        "/authoring",
        "/deploy",
        "/edge-admin",
        "/edge-token",
        "/stream/documents",
    ] {
        assert!(
            prefixes.contains(&family),
            "{family} missing from {prefixes:?}"
        );
    }
}

#[tokio::test]
async fn check_fetch_obtains_and_verifies_a_token_without_printing_it() {
    let emulator = Emulator::builder().start().await.expect("emulator");
    let text = emulator_config(&emulator, "");
    let path = temp_config("fetch", &text);
    let output = run_bin(&["check", "--fetch", "--config", path_arg(&path)]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("credential automation: token OK"),
        "{stdout}"
    );
    assert!(stdout.contains("scopes:"), "{stdout}");
    assert!(
        !stdout.contains("eyJ"),
        "the token is never printed: {stdout}"
    );
    assert!(!stdout.contains(DEFAULT_CLIENT_SECRET));
    assert_eq!(emulator.token_requests(), 1);

    // A wrong secret: the check fails, naming the credential and the OAuth error code only.
    let path = temp_config(
        "fetch-bad",
        &text.replace(DEFAULT_CLIENT_SECRET, "wrong-secret"),
    );
    let output = run_bin(&["check", "--fetch", "--config", path_arg(&path)]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(
        stdout.contains("credential automation: FAILED (access_denied)"),
        "{stdout}"
    );
}

#[tokio::test]
async fn healthcheck_exits_zero_only_when_healthz_answers() {
    let emulator = Emulator::builder().start().await.expect("emulator");
    let text = emulator_config(
        &emulator,
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let config = sitecore_auth_proxy::config::Config::parse(&text, Path::new("h.toml"), &|_| None)
        .expect("config");
    let proxy = sitecore_auth_proxy::app::start(config, Default::default())
        .await
        .expect("start");
    let admin = format!("http://{}", proxy.admin_addr().expect("admin"));
    let output = run_bin(&["healthcheck", "--admin", &admin]).await;
    assert!(output.status.success(), "healthy admin: exit 0");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let output = run_bin(&["healthcheck", "--admin", &format!("http://{closed}")]).await;
    assert!(!output.status.success(), "nothing listening: non-zero");
}

/// The binary as users run it: worker threads from `SITECORE_PROXY_WORKERS`, one access-log
/// line per request written while the proxy idles (the per-thread log buffers flush when a
/// worker runs out of work), none lost on SIGTERM, and a drain that exits 0.
#[tokio::test]
async fn run_logs_every_request_while_idle_and_on_sigterm() {
    use std::io::BufRead;
    use std::sync::{Arc, Mutex};

    let emulator = Emulator::builder().start().await.expect("emulator");
    let text = emulator_config(&emulator, "[server]\nlisten = \"127.0.0.1:0\"\n");
    let path = temp_config("run-log", &text);
    let mut child = bin()
        .args(["run", "--config"])
        .arg(&path)
        .env("SITECORE_PROXY_WORKERS", "3")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = Arc::clone(&lines);
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lines.lock().expect("lines").push(line);
            }
        })
    };
    let started = wait_for_log(&lines, |t| t.contains("proxy listening")).await;
    let addr = started
        .lines()
        .find(|l| l.contains("proxy listening"))
        .and_then(|l| l.split("addr=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the listening line names the address")
        .to_owned();

    // Fresh connections, so the three workers all take some.
    sitecore_auth_proxy::install_crypto_providers();
    const REQUESTS: usize = 60;
    for _ in 0..REQUESTS {
        let response = reqwest::Client::new()
            .get(format!("http://{addr}/deploy/api/projects/v1"))
            .send()
            .await
            .expect("response");
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("body");
    }
    // Written while the proxy keeps running, not only at exit.
    let idle_log = wait_for_log(&lines, |t| access_lines(t) >= REQUESTS).await;
    assert_eq!(access_lines(&idle_log), REQUESTS, "{idle_log}");
    assert!(idle_log.contains("workers=3"), "{idle_log}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().expect("wait"))
        .await
        .expect("join");
    reader.join().expect("reader");
    let text = lines.lock().expect("lines").join("\n");
    assert!(
        exit.success(),
        "a drained shutdown exits 0: {exit:?}\n{text}"
    );
    assert_eq!(access_lines(&text), REQUESTS, "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains("drained")).count(),
        3,
        "each worker drains: {text}"
    );
    assert_eq!(emulator.upstream_requests(), REQUESTS as u64);
}

#[test]
fn a_bad_worker_count_is_a_configuration_error() {
    let path = temp_config("bad-workers", "[server]\nlisten = \"127.0.0.1:0\"\n");
    for value in ["0", "many", "5000"] {
        let output = bin()
            .args(["run", "--config"])
            .arg(&path)
            .env("SITECORE_PROXY_WORKERS", value)
            .output()
            .expect("run");
        assert_eq!(output.status.code(), Some(64), "{value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("SITECORE_PROXY_WORKERS") && stderr.contains(value),
            "{stderr}"
        );
    }
}

fn access_lines(text: &str) -> usize {
    text.lines().filter(|l| l.contains(" access: ")).count()
}

/// Waits (up to 15 s) until the collected stderr lines satisfy `done`; returns them.
async fn wait_for_log(
    lines: &std::sync::Mutex<Vec<String>>,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let text = lines.lock().expect("lines").join("\n");
        if done(&text) || std::time::Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
