//! Tests of the single-value rules (URLs, prefixes, algorithms, header credentials, sizes,
//! durations) and of robustness against garbage input.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::Algorithm;

use super::tests::{message_at, oauth, parse, parse_ok, problems, MINIMAL};
use super::*;

#[test]
fn urls_must_be_https_unless_loopback() {
    let with_upstream = |upstream: &str| {
        MINIMAL.replace(
            "https://xmc-example.sitecorecloud.io/sitecore/api/authoring/graphql/v1/",
            upstream,
        )
    };
    for ok in [
        "http://localhost:3000",
        "http://LOCALHOST/x",
        "http://127.0.0.9/",
        "http://[::1]:8080/a/b/",
        "https://example.com:8443/base",
    ] {
        assert!(parse(&with_upstream(ok)).is_ok(), "{ok}");
    }
    for bad in [
        "http://example.com",
        "http://10.0.0.1",
        "ftp://localhost/x",
        "https://user:pw@example.com",
        "https://example.com/#frag",
        "not a url",
        "/relative",
    ] {
        let p = problems(&with_upstream(bad));
        assert!(
            !message_at(&p, "routes[0].upstream").contains("pw"),
            "{p:?}"
        );
    }
    let token = MINIMAL.replace(
        "client_secret = \"s3cret+&=\"",
        "client_secret = \"x\"\ntoken_url = \"http://auth.example.com/oauth/token\"",
    );
    let p = problems(&token);
    assert!(message_at(&p, "credentials.automation.token_url").contains("unencrypted"));
}

#[test]
fn prefix_rules() {
    for ok in ["/", "/a", "/a/b-c_d.e~f", "/api:v1/@x"] {
        assert_eq!(values::check_prefix(ok), Ok(()), "{ok}");
    }
    for bad in [
        "", "a", "/a/", "//", "/a//b", "/a/./b", "/..", "/a?b", "/a#b", "/a%20", "/a b", "/é",
    ] {
        assert!(values::check_prefix(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn algorithms_are_asymmetric_only() {
    let with = |algs: &str| {
        MINIMAL.replace(
            "client_secret = \"s3cret+&=\"",
            &format!("client_secret = \"x\"\nalgorithms = {algs}"),
        )
    };
    let config = parse_ok(&with("[\"rs256\", \"es384\", \"eddsa\", \"RS256\"]"));
    assert_eq!(
        oauth(&config, "automation").algorithms,
        vec![Algorithm::RS256, Algorithm::ES384, Algorithm::EdDSA]
    );
    let p = problems(&with("[\"none\", \"HS512\", \"XY1\"]"));
    assert!(message_at(&p, "credentials.automation.algorithms[0]").contains("never accepted"));
    assert!(message_at(&p, "credentials.automation.algorithms[1]").contains("HMAC"));
    assert!(message_at(&p, "credentials.automation.algorithms[2]").contains("not a JWS algorithm"));
    let p = problems(&with("[]"));
    assert!(message_at(&p, "credentials.automation.algorithms").contains("empty"));
}

#[test]
fn header_credentials_are_checked() {
    let header = |body: &str| format!("[credentials.h]\ntype = \"header\"\n{body}\n");
    let p = problems(&header("header = \"Host\"\nvalue = \"v\""));
    assert!(message_at(&p, "credentials.h.header").contains("Host"));
    let p = problems(&header(
        "header = \"bad header\"\nvalue = \"line\\nbreak-secret\"",
    ));
    assert!(message_at(&p, "credentials.h.header").contains("not a valid header name"));
    let message = message_at(&p, "credentials.h.value");
    assert!(message.contains("not a valid header value"));
    assert!(!message.contains("break-secret"));
    let p = problems(&header(
        "header = \"x\"\nclient_id = \"oops\"\nvalue = \"\"",
    ));
    assert!(message_at(&p, "credentials.h.client_id").contains("unknown field"));
    assert!(message_at(&p, "credentials.h.value").contains("empty"));
}

#[test]
fn extra_params_cannot_override_the_proxys_fields() {
    let text = MINIMAL.replace(
        "client_secret = \"s3cret+&=\"",
        "client_secret = \"x\"\nextra_params = { grant_type = \"password\", audience = \"a\", scope = \"s\" }",
    );
    let p = problems(&text);
    assert!(
        message_at(&p, "credentials.automation.extra_params.grant_type")
            .contains("cannot be overridden")
    );
    assert!(
        message_at(&p, "credentials.automation.extra_params.audience")
            .contains("cannot be overridden")
    );
    assert_eq!(p.len(), 2);
}

#[test]
fn sizes() {
    let cases = [
        ("1MiB", 1 << 20),
        ("512KiB", 512 << 10),
        ("10MB", 10_000_000),
        ("1GiB", 1 << 30),
        ("2048", 2048),
        ("1 MiB", 1 << 20),
        ("7B", 7),
        ("3kb", 3000),
        (" 2 GB ", 2_000_000_000),
    ];
    for (text, expected) in cases {
        assert_eq!(parse_size(text), Ok(expected), "{text}");
    }
    for bad in [
        "",
        "MiB",
        "1.5MiB",
        "-1",
        "1 parsec",
        "99999999999999999999",
        "18446744073709551615GiB",
    ] {
        let message = parse_size(bad).expect_err("should fail");
        assert!(message.contains("\"1MiB\""), "{message}");
    }
}

#[test]
fn durations() {
    assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
    assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    for bad in ["", "30", "soon", "5 parsecs", "-1s"] {
        let message = parse_duration(bad).expect_err("should fail");
        assert!(message.contains("\"30s\""), "{message}");
    }
    let p = problems(
        "[server]\nrequest_timeout = \"0s\"\nshutdown_grace = \"0s\"\nidle_timeout = \"100y\"\n",
    );
    assert!(message_at(&p, "server.request_timeout").contains("zero"));
    assert!(message_at(&p, "server.idle_timeout").contains("longer than a year"));
    assert_eq!(p.len(), 2, "shutdown_grace may be zero: {p:?}");
}

/// A small deterministic generator, so the garbage is the same on every run.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn garbage_never_panics() {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let alphabet: &[u8] = b"[]{}=\"'.,$\\\n #abcdefghijklmnopqrstuvwxyz0123456789:/_-";
    let full = format!("{MINIMAL}\n[server]\nlisten = \"0.0.0.0:1\"\nupstream_ca = [\"x\"]\n[[clients]]\nname = \"a\"\nkey = \"${{K}}\"\nroutes = [\"/authoring\"]\n");
    let mut inputs: Vec<String> = Vec::new();
    // Every truncation of a valid file.
    for end in 0..=full.len() {
        if let Some(prefix) = full.get(..end) {
            inputs.push(prefix.to_owned());
        }
    }
    // Random bytes, random bytes from TOML-ish characters, and random edits of the valid file.
    for _ in 0..2000 {
        let len = (xorshift(&mut seed) % 200) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| xorshift(&mut seed) as u8).collect();
        inputs.push(String::from_utf8_lossy(&bytes).into_owned());
        let toml_ish: Vec<u8> = (0..len)
            .map(|_| alphabet[(xorshift(&mut seed) as usize) % alphabet.len()])
            .collect();
        inputs.push(String::from_utf8_lossy(&toml_ish).into_owned());
        let mut edited = full.clone().into_bytes();
        for _ in 0..3 {
            let at = (xorshift(&mut seed) as usize) % edited.len();
            edited[at] = alphabet[(xorshift(&mut seed) as usize) % alphabet.len()];
        }
        inputs.push(String::from_utf8_lossy(&edited).into_owned());
    }
    inputs.push("a = [".repeat(10_000));
    inputs.push(format!("x = {}1{}", "[".repeat(200), "]".repeat(200)));
    inputs.push(format!("[{}]", vec!["a"; 500].join(".")));
    inputs.push("[server]\nmax_connections = 9223372036854775807\nreplay_body_limit = \"18446744073709551615\"\n".to_owned());
    inputs
        .push("[credentials.a]\nrefresh_at = nan\nleeway = \"99999999999999999999s\"\n".to_owned());
    let env = |name: &str| (name == "K").then(|| "${K}".to_owned());
    for input in &inputs {
        // Either outcome is fine; returning at all is the test.
        let _ = Config::parse(input, Path::new("fuzz.toml"), &env);
    }
}
