//! Tests of the text-only behaviour: defaults, substitution, every-problem reporting, value
//! parsers, and robustness against garbage. File-backed settings are in `tests_files`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use sha2::{Digest, Sha256};

use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/proxy/proxy.toml"), &no_env)
}

pub(super) fn parse_ok(text: &str) -> Config {
    match parse(text) {
        Ok(config) => config,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

pub(super) fn problems(text: &str) -> Vec<Problem> {
    match parse(text) {
        Ok(config) => panic!("expected problems, got {config:?}"),
        Err(e) => e.problems,
    }
}

/// The message at `key`, failing with the full list when there is none.
pub(super) fn message_at<'a>(problems: &'a [Problem], key: &str) -> &'a str {
    match problems.iter().find(|p| p.key == key) {
        Some(p) => &p.message,
        None => panic!("no problem at {key:?}; problems: {problems:#?}"),
    }
}

/// Asserts that `problems` holds exactly the `(key, message fragment)` pairs of `expect`.
pub(super) fn assert_problems(problems: &[Problem], expect: &[(&str, &str)]) {
    for (key, fragment) in expect {
        let message = message_at(problems, key);
        assert!(
            message.contains(fragment),
            "{key}: {message:?} lacks {fragment:?}"
        );
    }
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
}

/// `rate` and `burst` as the file writes them.
pub(super) fn rate_settings(rate: &str, burst: u32) -> RateSettings {
    RateSettings {
        rate: Rate::parse(rate).expect("valid rate literal"),
        burst: NonZeroU32::new(burst).expect("nonzero burst literal"),
    }
}

pub(super) const MINIMAL: &str = r#"
[credentials.automation]
client_id = "my-client"
client_secret = "s3cret+&="

[[routes]]
prefix = "/authoring"
upstream = "https://xmc-example.sitecorecloud.io/sitecore/api/authoring/graphql/v1/"
credential = "automation"
"#;

pub(super) fn oauth<'a>(config: &'a Config, name: &str) -> &'a OAuthSettings {
    match config.credentials.get(name) {
        Some(CredentialSettings::OAuth(s)) => s,
        other => panic!("{name} is not an oauth credential: {other:?}"),
    }
}

#[test]
fn minimal_file_gets_the_documented_defaults() {
    let config = parse_ok(MINIMAL);
    assert_eq!(config.path, Path::new("/etc/proxy/proxy.toml"));

    let s = &config.server;
    assert_eq!(
        s.listen,
        "127.0.0.1:8080"
            .parse::<SocketAddr>()
            .expect("valid literal")
    );
    assert_eq!(s.tls, None);
    assert!(!s.allow_anonymous);
    assert_eq!(s.token_endpoint.as_deref(), Some("/oauth/token"));
    assert_eq!(s.request_timeout, Duration::from_secs(120));
    assert_eq!(s.connect_timeout, Duration::from_secs(10));
    assert_eq!(s.idle_timeout, Duration::from_secs(90));
    assert_eq!(s.header_read_timeout, Duration::from_secs(10));
    assert_eq!(s.max_connections, 10_000);
    assert_eq!(s.replay_body_limit, 1024 * 1024);
    assert_eq!(s.shutdown_grace, Duration::from_secs(30));
    assert!(!s.forwarded_headers);
    assert!(s.rewrite_location);
    assert!(s.upstream_ca.is_empty());
    assert!(s.upstream_ca_files.is_empty());

    assert_eq!(config.admin, None);
    assert!(config.clients.is_empty());

    assert_eq!(config.credentials.len(), 1);
    let o = oauth(&config, "automation");
    assert_eq!(o.client_id, "my-client");
    assert_eq!(o.client_secret.expose(), "s3cret+&=");
    assert_eq!(o.client_secret_file, None);
    assert_eq!(
        o.token_url.as_str(),
        "https://auth.sitecorecloud.io/oauth/token"
    );
    assert_eq!(o.audience, "https://api.sitecorecloud.io");
    assert_eq!(o.request_format, RequestFormat::Form);
    assert!(o.extra_params.is_empty());
    assert_eq!(o.issuer, "https://auth.sitecorecloud.io/");
    assert_eq!(
        o.jwks_url.as_str(),
        "https://auth.sitecorecloud.io/.well-known/jwks.json"
    );
    assert_eq!(o.algorithms, vec![Algorithm::RS256]);
    assert_eq!(o.leeway, Duration::from_secs(60));
    assert_eq!(o.refresh_at, 0.8);

    assert_eq!(config.routes.len(), 1);
    let r = &config.routes[0];
    assert_eq!(r.prefix, "/authoring");
    assert_eq!(
        r.upstream.to_string(),
        "https://xmc-example.sitecorecloud.io/sitecore/api/authoring/graphql/v1"
    );
    assert_eq!(r.credential, "automation");
    assert_eq!(r.timeout, None);
    assert_eq!(
        r.limits,
        RouteLimitSettings {
            rate: None,
            max_in_flight: None,
            honor_upstream_retry_after: true,
        }
    );
    assert_eq!(config.used_credentials(), vec!["automation"]);
}

#[test]
fn every_text_key_lands_in_its_field() {
    let text = r#"
[server]
listen = "127.0.0.2:18080"
allow_anonymous = true
token_endpoint = ""
request_timeout = "121s"
connect_timeout = "11s"
idle_timeout = "91s"
header_read_timeout = "12s"
max_connections = 77
replay_body_limit = "512KiB"
shutdown_grace = "31s"
forwarded_headers = true
rewrite_location = false
upstream_ca = []

[admin]
listen = "127.0.0.1:19090"
ready_requires = "all_tokens"

[credentials.automation]
type = "oauth"
client_id = "cid"
client_secret = "csecret"
token_url = "http://127.0.0.1:4000/oauth/token"
audience = "https://api-beta.sitecorecloud.io/tenant"
request_format = "json"
extra_params = { scope = "a b", organization = "org" }
issuer = "http://127.0.0.1:4000/"
jwks_url = "http://localhost:4000/keys"
algorithms = ["RS512", "ES256", "EdDSA", "PS256"]
leeway = "5s"
refresh_at = 0.5

[credentials.edge-delivery]
type = "header"
header = "SC_ApiKey"
value = "edge-key-value"

[[routes]]
prefix = "/"
upstream = "https://edge.sitecorecloud.io"
credential = "edge-delivery"
timeout = "300s"
rate = "80/s"
burst = 120
max_in_flight = 64
honor_upstream_retry_after = false

[[routes]]
prefix = "/deploy"
upstream = "http://[::1]:9000/api/"
credential = "automation"

[[clients]]
name = "ci"
key = "ci-key"
routes = ["/deploy"]
rate = "600/min"
max_in_flight = 16

[[clients]]
name = "ops"
key_sha256 = "ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB"
"#;
    let config = parse_ok(text);
    let s = &config.server;
    assert_eq!(
        s.listen,
        "127.0.0.2:18080"
            .parse::<SocketAddr>()
            .expect("valid literal")
    );
    assert!(s.allow_anonymous);
    assert_eq!(s.token_endpoint, None);
    assert_eq!(s.request_timeout, Duration::from_secs(121));
    assert_eq!(s.connect_timeout, Duration::from_secs(11));
    assert_eq!(s.idle_timeout, Duration::from_secs(91));
    assert_eq!(s.header_read_timeout, Duration::from_secs(12));
    assert_eq!(s.max_connections, 77);
    assert_eq!(s.replay_body_limit, 512 * 1024);
    assert_eq!(s.shutdown_grace, Duration::from_secs(31));
    assert!(s.forwarded_headers);
    assert!(!s.rewrite_location);
    assert_eq!(
        config.admin,
        Some(AdminSettings {
            listen: "127.0.0.1:19090".parse().expect("valid literal"),
            ready_requires: ReadyRequires::AllTokens,
        })
    );

    let o = oauth(&config, "automation");
    assert_eq!(o.client_id, "cid");
    assert_eq!(o.client_secret.expose(), "csecret");
    assert_eq!(o.token_url.as_str(), "http://127.0.0.1:4000/oauth/token");
    assert_eq!(o.audience, "https://api-beta.sitecorecloud.io/tenant");
    assert_eq!(o.request_format, RequestFormat::Json);
    let expected: BTreeMap<String, String> = [("scope", "a b"), ("organization", "org")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(o.extra_params, expected);
    assert_eq!(o.issuer, "http://127.0.0.1:4000/");
    assert_eq!(o.jwks_url.as_str(), "http://localhost:4000/keys");
    assert_eq!(
        o.algorithms,
        vec![
            Algorithm::RS512,
            Algorithm::ES256,
            Algorithm::EdDSA,
            Algorithm::PS256
        ]
    );
    assert_eq!(o.leeway, Duration::from_secs(5));
    assert_eq!(o.refresh_at, 0.5);

    match config.credentials.get("edge-delivery") {
        Some(CredentialSettings::Header(h)) => {
            assert_eq!(h.header.as_str(), "sc_apikey");
            assert_eq!(h.value.expose(), "edge-key-value");
            assert_eq!(h.value_file, None);
        }
        other => panic!("not a header credential: {other:?}"),
    }

    assert_eq!(config.routes[0].prefix, "/");
    assert_eq!(
        config.routes[0].upstream.to_string(),
        "https://edge.sitecorecloud.io/"
    );
    assert_eq!(config.routes[0].credential, "edge-delivery");
    assert_eq!(config.routes[0].timeout, Some(Duration::from_secs(300)));
    assert_eq!(
        config.routes[0].limits,
        RouteLimitSettings {
            rate: Some(rate_settings("80/s", 120)),
            max_in_flight: NonZeroU32::new(64),
            honor_upstream_retry_after: false,
        }
    );
    assert_eq!(config.routes[1].prefix, "/deploy");
    assert_eq!(
        config.routes[1].upstream.to_string(),
        "http://[::1]:9000/api"
    );
    assert_eq!(config.routes[1].timeout, None);
    assert_eq!(config.routes[1].limits, RouteLimitSettings::default());
    assert_eq!(
        config.used_credentials(),
        vec!["automation", "edge-delivery"]
    );

    assert_eq!(config.clients[0].name, "ci");
    assert_eq!(
        config.clients[0].key_sha256,
        <[u8; 32]>::from(Sha256::digest(b"ci-key"))
    );
    assert_eq!(config.clients[0].routes, Some(vec!["/deploy".to_owned()]));
    assert_eq!(
        config.clients[0].limits,
        ClientLimitSettings {
            rate: Some(rate_settings("600/min", 10)),
            max_in_flight: NonZeroU32::new(16),
        }
    );
    assert_eq!(config.clients[1].name, "ops");
    assert_eq!(config.clients[1].key_sha256, [0xab; 32]);
    assert_eq!(config.clients[1].routes, None);
    assert_eq!(config.clients[1].limits, ClientLimitSettings::default());
}

#[test]
fn issuer_and_jwks_default_from_the_token_url_keeping_the_port() {
    let text = MINIMAL.replace(
        "client_secret = \"s3cret+&=\"",
        "client_secret = \"x\"\ntoken_url = \"http://127.0.0.1:4000/oauth/token\"",
    );
    let config = parse_ok(&text);
    let o = oauth(&config, "automation");
    assert_eq!(o.issuer, "http://127.0.0.1:4000/");
    assert_eq!(
        o.jwks_url.as_str(),
        "http://127.0.0.1:4000/.well-known/jwks.json"
    );

    let text = MINIMAL.replace(
        "client_secret = \"s3cret+&=\"",
        "client_secret = \"x\"\nissuer = \"https://one-sc-production.eu.auth0.com\"",
    );
    let o = parse_ok(&text);
    assert_eq!(
        oauth(&o, "automation").jwks_url.as_str(),
        "https://one-sc-production.eu.auth0.com/.well-known/jwks.json"
    );
}

#[test]
fn environment_references_are_substituted_everywhere() {
    let text = r#"
[credentials.automation]
client_id = "${CLIENT_ID}"
client_secret = "pre-${SECRET}-post$$"
extra_params = { scope = "${SCOPE}" }

[[routes]]
prefix = "/deploy"
upstream = "https://${HOST}/api"
credential = "automation"

[[clients]]
name = "ci"
key = "${CI_KEY}"
routes = ["${ROUTE}"]
"#;
    let env = |name: &str| {
        let value = match name {
            "CLIENT_ID" => "the-id",
            "SECRET" => "p$ss${NOT_EXPANDED}",
            "SCOPE" => "xmcloud.cm:admin",
            "HOST" => "xmclouddeploy-api.sitecorecloud.io",
            "CI_KEY" => "ci-key",
            "ROUTE" => "/deploy",
            _ => return None,
        };
        Some(value.to_owned())
    };
    let config = match Config::parse(text, Path::new("proxy.toml"), &env) {
        Ok(config) => config,
        Err(e) => panic!("{e}"),
    };
    let o = oauth(&config, "automation");
    assert_eq!(o.client_id, "the-id");
    assert_eq!(o.client_secret.expose(), "pre-p$ss${NOT_EXPANDED}-post$");
    assert_eq!(
        o.extra_params.get("scope").map(String::as_str),
        Some("xmcloud.cm:admin")
    );
    assert_eq!(
        config.routes[0].upstream.to_string(),
        "https://xmclouddeploy-api.sitecorecloud.io/api"
    );
    assert_eq!(
        config.clients[0].key_sha256,
        <[u8; 32]>::from(Sha256::digest(b"ci-key"))
    );
    assert_eq!(config.clients[0].routes, Some(vec!["/deploy".to_owned()]));

    // The same file with an empty environment: every reference is reported where it is used.
    let problems = problems(text);
    assert_eq!(
        message_at(&problems, "credentials.automation.client_secret"),
        "environment variable SECRET is not set (set it, or write $$ for a literal $)"
    );
    assert!(message_at(&problems, "credentials.automation.client_id").contains("CLIENT_ID"));
    assert!(message_at(&problems, "credentials.automation.extra_params.scope").contains("SCOPE"));
    assert!(message_at(&problems, "routes[0].upstream").contains("HOST"));
    assert!(message_at(&problems, "clients[0].routes[0]").contains("ROUTE"));
}

#[test]
fn bad_references_are_problems() {
    let expand = |text: &str| env::expand(text, &|_| Some("v".to_owned()));
    assert_eq!(expand("a$b$$c${X}").as_deref(), Ok("a$b$cv"));
    assert!(expand("${X")
        .expect_err("should fail")
        .contains("unterminated"));
    assert!(expand("${}")
        .expect_err("should fail")
        .contains("not a valid"));
    assert!(expand("${1A}")
        .expect_err("should fail")
        .contains("not a valid"));
    let unset = env::expand("${A}${B}${A}", &no_env).expect_err("should fail");
    assert_eq!(unset, "environment variables A, B are not set");
}

#[test]
fn every_mistake_is_reported_at_its_key() {
    let text = r#"
[server]
listen = "127.0.0.1:8080"
tls_cert = "server.crt"
colour = "blue"
request_timeout = "soon"
max_connections = 0

[credentials.automation]
client_id = "id"
client_secret = "secret"
algorithms = ["RS256", "HS256"]
refresh_at = 1.5
leeway = "60"
tokne_url = "typo"

[credentials.edge]
type = "header"
header = "connection"

[[routes]]
prefix = "/deploy"
upstream = "http://xmclouddeploy-api.sitecorecloud.io"
credential = "automation"

[[routes]]
prefix = "/deploy"
upstream = "https://example.com/?q=1"
credential = "missing"

[[routes]]
prefix = "deploy/"
upstream = "https://example.com"
credential = "automation"
timeout = "5 parsecs"

[[clients]]
name = "ci"
key_sha256 = "abc"
routes = ["/nope"]
"#;
    let problems = problems(text);
    let expect = [
        ("server.colour", "unknown field `colour`"),
        ("server.request_timeout", "\"soon\" is not a duration"),
        ("server.max_connections", "at least 1"),
        ("server.tls_key", "tls_cert is set but tls_key is not"),
        ("server.tls_cert", "cannot read /etc/proxy/server.crt"),
        (
            "credentials.automation.tokne_url",
            "unknown field `tokne_url`",
        ),
        ("credentials.automation.algorithms[1]", "HMAC"),
        ("credentials.automation.refresh_at", "outside (0, 1)"),
        ("credentials.automation.leeway", "time unit needed"),
        ("credentials.edge.header", "hop-by-hop"),
        ("credentials.edge.value", "missing"),
        ("routes[0].upstream", "not loopback"),
        ("routes[1].prefix", "already the prefix of routes[0]"),
        ("routes[1].upstream", "?query"),
        (
            "routes[1].credential",
            "no credential named \"missing\"; defined: automation, edge",
        ),
        ("routes[2].prefix", "must start with '/'"),
        ("routes[2].timeout", "\"5 parsecs\" is not a duration"),
        ("clients[0].key_sha256", "64 hex characters"),
        ("clients[0].routes[0]", "no route has the prefix \"/nope\""),
    ];
    assert_problems(&problems, &expect);
}

#[test]
fn several_mistakes_in_one_section_are_all_reported() {
    let problems = problems(
        r#"
[server]
listen = 8080
typo_one = 1
typo_two = 2
forwarded_headers = "yes"
"#,
    );
    assert!(message_at(&problems, "server.listen").contains("invalid type"));
    assert!(message_at(&problems, "server.typo_one").contains("unknown field"));
    assert!(message_at(&problems, "server.typo_two").contains("unknown field"));
    assert!(message_at(&problems, "server.forwarded_headers").contains("invalid type"));
}

#[test]
fn file_level_problems() {
    let p = problems("[server\nlisten = 1");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].key, "");
    assert!(
        p[0].message
            .starts_with("TOML syntax error at line 1, column "),
        "{p:?}"
    );

    let p = problems("colour = 1\nroutes = \"x\"\n[credentials]\nfoo = 3\n");
    assert!(message_at(&p, "colour").contains("unknown section"));
    assert!(message_at(&p, "routes").contains("[[routes]]"));
    assert!(message_at(&p, "credentials.foo").contains("must be a table"));

    let p = problems("[credentials.\"a.b\"]\ntype = \"magic\"\n");
    assert!(message_at(&p, "credentials.\"a.b\"").contains("credential name"));
    assert!(
        message_at(&p, "credentials.\"a.b\".type").contains("\"magic\" is not a credential type")
    );

    let p = problems("[server]\nlisten = 1979-05-27\n");
    assert!(message_at(&p, "server.listen").contains("date"));
}

#[test]
fn unreadable_file_is_one_problem_with_an_empty_key() {
    let path = Path::new("/nonexistent/sitecore-auth-proxy/proxy.toml");
    let error = Config::load(path).expect_err("should fail");
    assert_eq!(error.path, path);
    assert_eq!(error.problems.len(), 1);
    assert_eq!(error.problems[0].key, "");
    assert!(error.problems[0].message.contains("cannot read"));
    assert!(error
        .to_string()
        .starts_with("/nonexistent/sitecore-auth-proxy/proxy.toml: cannot read"));
}

#[test]
fn display_is_one_line_per_problem() {
    let error = parse("[admin]\nlisten = \"nowhere\"\n[server]\nmax_connections = -1\n")
        .expect_err("should fail");
    let text = error.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines
        .iter()
        .any(|l| l.starts_with("/etc/proxy/proxy.toml: admin.listen: ")));
    assert!(lines
        .iter()
        .any(|l| l.starts_with("/etc/proxy/proxy.toml: server.max_connections: ")));
}

#[test]
fn non_loopback_listen_needs_inbound_authentication() {
    let exposed = format!("[server]\nlisten = \"0.0.0.0:8080\"\n{MINIMAL}");
    let p = problems(&exposed);
    assert_eq!(p.len(), 1);
    let message = message_at(&p, "server.listen");
    for way_out in ["[[clients]]", "client_ca", "allow_anonymous = true"] {
        assert!(message.contains(way_out), "{message} lacks {way_out}");
    }

    let anonymous = exposed.replace("[server]", "[server]\nallow_anonymous = true");
    assert!(parse(&anonymous).is_ok());
    let with_client = format!("{exposed}\n[[clients]]\nname = \"ci\"\nkey = \"k\"\n");
    assert!(parse(&with_client).is_ok());
    // The client_ca way out needs real certificate files: see tests_files.

    for loopback in ["127.0.0.1:1", "127.9.9.9:1", "[::1]:1"] {
        let text = format!("[server]\nlisten = \"{loopback}\"\n{MINIMAL}");
        assert!(parse(&text).is_ok(), "{loopback}");
    }
    for exposed in ["[::]:1", "10.0.0.1:1", "[::ffff:10.0.0.1]:1"] {
        let text = format!("[server]\nlisten = \"{exposed}\"\n{MINIMAL}");
        assert!(parse(&text).is_err(), "{exposed}");
    }
}

#[test]
fn client_keys_are_hashed_and_must_differ() {
    let text = r#"
[[clients]]
name = "a"
key = "same"

[[clients]]
name = "b"
key_sha256 = "SHA"

[[clients]]
name = "a"
key = "other"

[[clients]]
name = "c"
key = "x"
key_sha256 = "00"

[[clients]]
name = "d"
"#;
    let same = hex::encode(Sha256::digest(b"same"));
    let text = text.replace("SHA", &same.to_uppercase());
    let p = problems(&text);
    assert!(message_at(&p, "clients[1].key_sha256").contains("clients[0] has the same key"));
    assert!(message_at(&p, "clients[2].name").contains("already the name of clients[0]"));
    assert!(message_at(&p, "clients[3].key").contains("not both"));
    assert!(message_at(&p, "clients[4].key_sha256").contains("missing"));
    assert_eq!(p.len(), 4, "{p:#?}");
}

#[test]
fn debug_output_never_contains_a_secret() {
    let text = r#"
[credentials.automation]
client_id = "id"
client_secret = "SECRET-ONE"

[credentials.edge]
type = "header"
header = "sc_apikey"
value = "SECRET-TWO"

[[routes]]
prefix = "/x"
upstream = "https://example.com"
credential = "automation"

[[clients]]
name = "ci"
key = "SECRET-THREE"
"#;
    let config = parse_ok(text);
    let debug = format!("{config:?} {config:#?}");
    assert!(debug.contains("[redacted]"));
    for secret in ["SECRET-ONE", "SECRET-TWO", "SECRET-THREE"] {
        assert!(!debug.contains(secret), "{secret} leaked: {debug}");
    }
}
