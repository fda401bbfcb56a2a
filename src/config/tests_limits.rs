//! Tests of the limit keys: the rate syntax, burst defaults, `max_in_flight`,
//! `honor_upstream_retry_after` and `[admin] ready_requires`, and that every bad value is
//! reported at its key path in one run.

use std::time::Duration;

use super::tests::{
    assert_problems, message_at, parse, parse_ok, problems, rate_settings, MINIMAL,
};
use super::*;

#[test]
fn rates_are_written_per_second_minute_or_hour() {
    // text, count, unit, interval, default burst, canonical spelling
    #[rustfmt::skip]
    let cases = [
        ("20/s", 20, RateUnit::Second, Duration::from_millis(50), 20, "20/s"),
        ("600/min", 600, RateUnit::Minute, Duration::from_millis(100), 10, "600/min"),
        ("10000/h", 10_000, RateUnit::Hour, Duration::from_millis(360), 3, "10000/h"),
        ("1/m", 1, RateUnit::Minute, Duration::from_secs(60), 1, "1/min"),
        ("90/minute", 90, RateUnit::Minute, Duration::from_secs(60) / 90, 2, "90/min"),
        ("1/hour", 1, RateUnit::Hour, Duration::from_secs(3600), 1, "1/h"),
        (" 5 / sec ", 5, RateUnit::Second, Duration::from_millis(200), 5, "5/s"),
        ("7/hr", 7, RateUnit::Hour, Duration::from_secs(3600) / 7, 1, "7/h"),
        ("1000000/s", 1_000_000, RateUnit::Second, Duration::from_micros(1), 1_000_000, "1000000/s"),
    ];
    for (text, count, unit, interval, burst, canonical) in cases {
        let r = Rate::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(r.count().get(), count, "{text}");
        assert_eq!(r.unit(), unit, "{text}");
        assert_eq!(
            r.window(),
            Duration::from_secs(u64::from(unit.seconds())),
            "{text}"
        );
        assert_eq!(r.interval(), interval, "{text}");
        assert_eq!(r.default_burst().get(), burst, "{text}");
        assert_eq!(r.to_string(), canonical, "{text}");
        assert_eq!(Rate::parse(canonical), Ok(r), "{canonical} round-trips");
    }
}

#[test]
fn bad_rates_say_what_is_wrong() {
    let cases = [
        ("fast", "expected a number of requests, '/', and a unit"),
        ("20", "expected a number of requests"),
        ("0/s", "is zero"),
        ("000/min", "is zero"),
        ("-5/s", "whole number"),
        ("2.5/s", "whole number"),
        ("/s", "whole number"),
        ("twenty/s", "whole number"),
        ("20/", "unknown unit"),
        ("20/d", "unknown unit"),
        ("20/S", "unknown unit"),
        ("20/s/s", "unknown unit"),
        ("99999999999/s", "too large"),
        ("1000001/s", "limits nothing"),
    ];
    for (text, fragment) in cases {
        match Rate::parse(text) {
            Ok(r) => panic!("{text:?} parsed as {r}"),
            Err(message) => {
                assert!(message.contains(fragment), "{text:?}: {message}");
                assert!(message.contains(text.trim()), "{text:?}: {message}");
            }
        }
    }
    // Every "not a rate" message shows the accepted shapes.
    let message = Rate::parse("fast").expect_err("not a rate");
    assert!(
        message.contains("\"20/s\", \"600/min\" or \"10000/h\""),
        "{message}"
    );
}

#[test]
fn burst_defaults_to_one_seconds_worth_and_may_be_set() {
    let text = format!(
        "{MINIMAL}rate = \"600/min\"\n\n[[clients]]\nname = \"ci\"\nkey = \"k\"\nrate = \"1/h\"\nburst = 5\n"
    );
    let config = parse_ok(&text);
    assert_eq!(
        config.routes[0].limits.rate,
        Some(rate_settings("600/min", 10))
    );
    assert_eq!(
        config.clients[0].limits,
        ClientLimitSettings {
            rate: Some(rate_settings("1/h", 5)),
            max_in_flight: None,
        }
    );
}

#[test]
fn every_bad_limit_is_reported_at_its_key() {
    let text = r#"
[admin]
ready_requires = "strict"

[credentials.automation]
client_id = "id"
client_secret = "secret"

[[routes]]
prefix = "/a"
upstream = "https://example.com"
credential = "automation"
rate = "fast"
max_in_flight = 0
honor_upstream_retry_after = "yes"

[[routes]]
prefix = "/b"
upstream = "https://example.com"
credential = "automation"
burst = 5
max_in_flight = 4294967296

[[routes]]
prefix = "/c"
upstream = "https://example.com"
credential = "automation"
rate = 20
burst = "40"

[[clients]]
name = "a"
key = "ka"
rate = "20/s"
burst = 0

[[clients]]
name = "b"
key = "kb"
rate = "0/s"
max_in_flight = -1

[[clients]]
name = "c"
key = "kc"
rate = "1/s"
burst = 1000001
"#;
    let problems = problems(text);
    let expect = [
        (
            "admin.ready_requires",
            "unknown variant `strict`, expected `first_tokens` or `all_tokens`",
        ),
        ("routes[0].rate", "\"fast\" is not a rate"),
        (
            "routes[0].max_in_flight",
            "0 is not allowed; it must be at least 1",
        ),
        (
            "routes[0].honor_upstream_retry_after",
            "invalid type: string \"yes\", expected a boolean",
        ),
        ("routes[1].burst", "is set but rate is not"),
        (
            "routes[1].max_in_flight",
            "4294967296 is more than 4294967295",
        ),
        (
            "routes[2].rate",
            "invalid type: integer `20`, expected a string",
        ),
        (
            "routes[2].burst",
            "invalid type: string \"40\", expected i64",
        ),
        (
            "clients[0].burst",
            "0 is not allowed; it must be at least 1",
        ),
        ("clients[1].rate", "\"0/s\" is zero"),
        (
            "clients[1].max_in_flight",
            "-1 is not allowed; it must be at least 1",
        ),
        ("clients[2].burst", "1000001 is more than 1000000"),
    ];
    assert_problems(&problems, &expect);

    // The file and the key path lead every line, like every other problem.
    let error = parse(text).expect_err("bad limits");
    let display = error.to_string();
    for line in [
        "/etc/proxy/proxy.toml: routes[0].rate: \"fast\" is not a rate",
        "/etc/proxy/proxy.toml: clients[1].max_in_flight: -1 is not allowed",
        "/etc/proxy/proxy.toml: clients[0].burst: 0 is not allowed",
    ] {
        assert!(
            display.lines().any(|l| l.starts_with(line)),
            "{line}\nnot in:\n{display}"
        );
    }
}

#[test]
fn a_bad_rate_is_one_problem_even_with_a_burst() {
    let text = format!("{MINIMAL}rate = \"20/d\"\nburst = 40\n");
    let p = problems(&text);
    assert!(message_at(&p, "routes[0].rate").contains("unknown unit"));
    assert_eq!(p.len(), 1, "{p:#?}");
}

#[test]
fn honor_upstream_retry_after_defaults_to_true() {
    let config = parse_ok(MINIMAL);
    assert!(config.routes[0].limits.honor_upstream_retry_after);
    let off = parse_ok(&format!("{MINIMAL}honor_upstream_retry_after = false\n"));
    assert!(!off.routes[0].limits.honor_upstream_retry_after);
}

#[test]
fn ready_requires_defaults_to_first_tokens() {
    let admin = |extra: &str| {
        let config = parse_ok(&format!("[admin]\n{extra}\n{MINIMAL}"));
        config.admin.map(|a| a.ready_requires)
    };
    assert_eq!(admin(""), Some(ReadyRequires::FirstTokens));
    assert_eq!(
        admin("ready_requires = \"first_tokens\""),
        Some(ReadyRequires::FirstTokens)
    );
    assert_eq!(
        admin("ready_requires = \"all_tokens\""),
        Some(ReadyRequires::AllTokens)
    );
}

#[test]
fn reload_can_compare_limit_settings() {
    // Limit state survives a reload exactly when these compare equal, whatever else changed.
    let before = parse_ok(&format!("{MINIMAL}rate = \"20/s\"\n"));
    let same = parse_ok(&format!("{MINIMAL}rate = \"20/s\"\nburst = 20\n"));
    let other_upstream =
        parse_ok(&format!("{MINIMAL}rate = \"20/s\"\n").replace("xmc-example", "xmc-other"));
    let faster = parse_ok(&format!("{MINIMAL}rate = \"21/s\"\n"));
    let per_minute = parse_ok(&format!("{MINIMAL}rate = \"1200/min\"\n"));
    let limits = |c: &Config| c.routes[0].limits;
    assert_eq!(
        limits(&before),
        limits(&same),
        "the default burst written out"
    );
    assert_eq!(limits(&before), limits(&other_upstream));
    assert_ne!(limits(&before), limits(&faster));
    // The same average rate in another unit is another policy (its headers differ).
    assert_ne!(limits(&before).rate, limits(&per_minute).rate);
}
