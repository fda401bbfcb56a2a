//! Tests of the settings backed by files: secret files, TLS and CA PEM files, relative paths.
//! Each test writes its files into its own directory under the system temp directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::tests::message_at;
use super::*;

/// A fresh directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = format!(
            "sitecore-auth-proxy-config-{}-{name}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).expect("write temp file");
        path
    }

    fn load(&self, text: &str) -> Result<Config, ConfigError> {
        let path = self.write("proxy.toml", text);
        Config::load(&path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_ok(dir: &TempDir, text: &str) -> Config {
    match dir.load(text) {
        Ok(config) => config,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn load_problems(dir: &TempDir, text: &str) -> Vec<Problem> {
    match dir.load(text) {
        Ok(config) => panic!("expected problems, got {config:?}"),
        Err(e) => e.problems,
    }
}

/// A self-signed certificate and its key, as PEM.
fn certificate() -> (String, String) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("generate certificate");
    (generated.cert.pem(), generated.signing_key.serialize_pem())
}

const ROUTE: &str = r#"
[[routes]]
prefix = "/x"
upstream = "https://example.com"
credential = "automation"
"#;

#[test]
fn secret_files_lose_one_trailing_newline_and_resolve_relative_paths() {
    let dir = TempDir::new("secret");
    dir.write("lf.secret", "s3cret\n");
    dir.write("crlf.secret", "s3cret\r\n");
    dir.write("two.secret", "s3cret\n\n");
    dir.write("value.secret", "edge-key\n");
    let text = format!(
        r#"
[credentials.automation]
client_id = "id"
client_secret_file = "lf.secret"

[credentials.crlf]
client_id = "id"
client_secret_file = "crlf.secret"

[credentials.two]
client_id = "id"
client_secret_file = "{}"

[credentials.edge]
type = "header"
header = "sc_apikey"
value_file = "value.secret"
{ROUTE}"#,
        dir.0.join("two.secret").display()
    );
    let config = load_ok(&dir, &text);
    let secret = |name: &str| match config.credentials.get(name) {
        Some(CredentialSettings::OAuth(o)) => (
            o.client_secret.expose().to_owned(),
            o.client_secret_file.clone(),
        ),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        secret("automation"),
        ("s3cret".to_owned(), Some(dir.0.join("lf.secret")))
    );
    assert_eq!(secret("crlf").0, "s3cret");
    assert_eq!(secret("two").0, "s3cret\n");
    match config.credentials.get("edge") {
        Some(CredentialSettings::Header(h)) => {
            assert_eq!(h.value.expose(), "edge-key");
            assert_eq!(h.value_file, Some(dir.0.join("value.secret")));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_secret_files_are_problems() {
    let dir = TempDir::new("bad-secret");
    dir.write("empty.secret", "\n");
    let text = format!(
        r#"
[credentials.automation]
client_id = "id"
client_secret_file = "empty.secret"

[credentials.missing]
client_id = "id"
client_secret_file = "nope.secret"

[credentials.both]
client_id = "id"
client_secret = "x"
client_secret_file = "empty.secret"
{ROUTE}"#
    );
    let p = load_problems(&dir, &text);
    assert!(message_at(&p, "credentials.automation.client_secret_file").ends_with("is empty"));
    assert!(message_at(&p, "credentials.missing.client_secret_file").contains("cannot read"));
    assert!(message_at(&p, "credentials.both.client_secret").contains("not both"));
    assert_eq!(p.len(), 3, "{p:#?}");
}

#[test]
fn full_file_with_tls_and_cas() {
    let dir = TempDir::new("full");
    let (cert, key) = certificate();
    let (ca_one, _) = certificate();
    let (ca_two, _) = certificate();
    dir.write("server.crt", &cert);
    dir.write("server.key", &key);
    dir.write("clients.pem", format!("{ca_one}{ca_two}"));
    dir.write("upstream.pem", &ca_one);
    std::fs::create_dir_all(dir.0.join("sub")).expect("mkdir");
    dir.write("sub/more.pem", &ca_two);
    let text = format!(
        r#"
[server]
listen = "0.0.0.0:8443"
tls_cert = "server.crt"
tls_key = "server.key"
client_ca = "clients.pem"
upstream_ca = ["upstream.pem", "sub/more.pem"]

[credentials.automation]
client_id = "id"
client_secret = "x"
{ROUTE}"#
    );
    // client_ca is the mTLS way out of the non-loopback refusal: no [[clients]] needed.
    let config = load_ok(&dir, &text);
    let s = &config.server;
    let Some(tls) = &s.tls else {
        panic!("no TLS settings");
    };
    assert_eq!(tls.cert_file, dir.0.join("server.crt"));
    assert_eq!(tls.key_file, dir.0.join("server.key"));
    assert_eq!(tls.cert_chain.len(), 1);
    assert_eq!(tls.client_ca_file, Some(dir.0.join("clients.pem")));
    assert_eq!(tls.client_ca.len(), 2);
    assert_eq!(
        s.upstream_ca_files,
        vec![dir.0.join("upstream.pem"), dir.0.join("sub/more.pem")]
    );
    assert_eq!(s.upstream_ca.len(), 2);
    assert_ne!(s.upstream_ca[0], s.upstream_ca[1]);

    // Reload compares with ==: the same files give an equal config.
    let again = load_ok(&dir, &text);
    assert_eq!(config, again);
    let debug = format!("{config:?}");
    assert!(!debug.contains(key.trim()), "the key leaked into Debug");
}

#[test]
fn tls_files_must_exist_parse_and_come_in_pairs() {
    let dir = TempDir::new("tls");
    let (cert, key) = certificate();
    dir.write("key-only.pem", &key);
    dir.write("cert-only.pem", &cert);
    dir.write("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64!\n");
    let text = format!(
        r#"
[server]
tls_cert = "key-only.pem"
tls_key = "cert-only.pem"
client_ca = "garbage.pem"
upstream_ca = ["missing.pem", "", "key-only.pem"]

[credentials.automation]
client_id = "id"
client_secret = "x"
{ROUTE}"#
    );
    let p = load_problems(&dir, &text);
    assert!(message_at(&p, "server.tls_cert").contains("holds no certificate"));
    assert!(message_at(&p, "server.tls_key").contains("holds no private key"));
    assert!(message_at(&p, "server.client_ca").contains("not valid PEM"));
    assert!(message_at(&p, "server.upstream_ca[0]").contains("cannot read"));
    assert!(message_at(&p, "server.upstream_ca[1]").contains("empty"));
    assert!(message_at(&p, "server.upstream_ca[2]").contains("holds no certificate"));
    assert_eq!(p.len(), 6, "{p:#?}");

    let p = load_problems(
        &dir,
        &format!("[server]\ntls_key = \"key-only.pem\"\nclient_ca = \"cert-only.pem\"\n[credentials.automation]\nclient_id = \"i\"\nclient_secret = \"s\"\n{ROUTE}"),
    );
    assert!(message_at(&p, "server.tls_cert").contains("tls_key is set but tls_cert is not"));
    assert_eq!(p.len(), 1, "{p:#?}");

    let p = load_problems(
        &dir,
        &format!("[server]\nclient_ca = \"cert-only.pem\"\n[credentials.automation]\nclient_id = \"i\"\nclient_secret = \"s\"\n{ROUTE}"),
    );
    assert!(message_at(&p, "server.client_ca").contains("needs tls_cert and tls_key"));
}

#[test]
fn load_reports_a_file_that_is_not_utf8() {
    let dir = TempDir::new("binary");
    let path = dir.write("proxy.toml", [0xff, 0xfe, 0x00, b'[']);
    let error = Config::load(&path).expect_err("should fail");
    assert_eq!(error.problems.len(), 1);
    assert_eq!(error.problems[0].key, "");
    assert!(error.problems[0].message.contains("UTF-8"));
    assert!(Path::new(&error.path).ends_with("proxy.toml"));
}
