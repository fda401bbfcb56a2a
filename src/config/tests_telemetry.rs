//! Tests of `[telemetry]`: absent means no tracing, the defaults, the traces URL, and every bad
//! key reported at its path.

use super::tests::{assert_problems, parse_ok, problems, MINIMAL};
use super::*;

fn with(section: &str) -> String {
    format!("{MINIMAL}\n[telemetry]\n{section}\n")
}

#[test]
fn no_section_or_no_endpoint_means_no_tracing() {
    assert_eq!(parse_ok(MINIMAL).telemetry, None);
    assert_eq!(
        parse_ok(&with("service_name = \"edge-gw\"")).telemetry,
        None
    );
}

#[test]
fn an_endpoint_alone_takes_the_defaults() {
    let config = parse_ok(&with("otlp_endpoint = \"http://otel-collector:4318\""));
    let expected = TelemetrySettings {
        traces_url: reqwest::Url::parse("http://otel-collector:4318/v1/traces").expect("url"),
        service_name: "sitecore-auth-proxy".to_owned(),
        sample_ratio: 1.0,
    };
    assert_eq!(config.telemetry, Some(expected));
}

#[test]
fn every_key_is_read() {
    let config = parse_ok(&with(
        "otlp_endpoint = \"https://collector.example.com/otlp/\"\nservice_name = \"edge-gw\"\n\
         sample_ratio = 0.25",
    ));
    let telemetry = config.telemetry.expect("telemetry");
    assert_eq!(
        telemetry.traces_url.as_str(),
        "https://collector.example.com/otlp/v1/traces"
    );
    assert_eq!(telemetry.service_name, "edge-gw");
    assert_eq!(telemetry.sample_ratio, 0.25);
    // Whole numbers are ratios too.
    let config = parse_ok(&with("otlp_endpoint = \"http://c:4318\"\nsample_ratio = 0"));
    assert_eq!(config.telemetry.expect("telemetry").sample_ratio, 0.0);
}

#[test]
fn bad_values_and_unknown_keys_are_reported_at_their_keys() {
    let p = problems(&with(
        "otlp_endpoint = \"grpc://collector:4317\"\nservice_name = \"\"\nsample_ratio = 1.5\n\
         batch_size = 10",
    ));
    assert_problems(
        &p,
        &[
            ("telemetry.otlp_endpoint", "http:// or https://"),
            ("telemetry.service_name", "non-empty"),
            ("telemetry.sample_ratio", "0.0"),
            ("telemetry.batch_size", "unknown field"),
        ],
    );
}

#[test]
fn endpoint_rules() {
    for (bad, fragment) in [
        ("not a url", "not a valid URL"),
        (
            "http://user:pw@collector:4318",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ),
        ("http://collector:4318/?x=1", "?query"),
        ("http://collector:4318/#f", "#fragment"),
    ] {
        let p = problems(&with(&format!("otlp_endpoint = \"{bad}\"")));
        assert_problems(&p, &[("telemetry.otlp_endpoint", fragment)]);
        assert!(!p[0].message.contains("pw"), "{p:?}");
    }
    for bad in [
        "sample_ratio = -0.1",
        "sample_ratio = nan",
        "sample_ratio = \"1\"",
    ] {
        let p = problems(&with(&format!("otlp_endpoint = \"http://c:4318\"\n{bad}")));
        assert_problems(&p, &[("telemetry.sample_ratio", "")]);
    }
    let p = problems(&format!("telemetry = 3\n{MINIMAL}"));
    assert_problems(&p, &[("telemetry", "[telemetry]")]);
}
