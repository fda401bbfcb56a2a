//! The access line's documented formats, pinned, and the subscriber's decisions about it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

/// 2026-12-04T15:36:51.123456Z
fn documented_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(1_796_398_611_123_456)
}

fn access<'a>(method: &'a http::Method, client: &'a str, path: &'a str) -> AccessLine<'a> {
    AccessLine {
        request_id: "5f0c6b2e9d8a4c1b8e7f6a5b4c3d2e1f",
        client,
        method,
        path,
        route: "/deploy",
        credential: "automation",
        status: 200,
        upstream_status: 200,
        duration_us: 812,
        bytes: 123,
        complete: true,
        error: None,
        trace_id: None,
    }
}

/// The same request, cut by an upstream stall after its headers were relayed.
fn cut<'a>(method: &'a http::Method) -> AccessLine<'a> {
    AccessLine {
        duration_us: u64::MAX,
        bytes: 1000,
        complete: false,
        error: Some("upstream_timeout"),
        ..access(method, "ci", "/deploy/api/projects/v1")
    }
}

/// The cut request again, traced (`[telemetry]`).
fn traced<'a>(method: &'a http::Method) -> AccessLine<'a> {
    AccessLine {
        trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        ..cut(method)
    }
}

fn spell(format: Format, line: &AccessLine<'_>) -> String {
    let mut out = Vec::new();
    match format {
        Format::Text => line::text(&mut out, line, documented_time()),
        Format::Json => line::json(&mut out, line, documented_time()),
    }
    String::from_utf8(out).expect("UTF-8")
}

/// The `key=value` pairs after `access:` of a text line, quoted values unescaped as JSON strings.
fn text_fields(line: &str) -> Vec<(String, String)> {
    let line = line
        .strip_suffix('\n')
        .expect("one line, newline-terminated");
    let (_, mut rest) = line.split_once(" access:").expect("the target");
    let mut fields = Vec::new();
    while let Some(pair) = rest.strip_prefix(' ') {
        let (key, after) = pair.split_once('=').expect("key=value");
        let (value, tail) = if after.starts_with('"') {
            let mut values = serde_json::Deserializer::from_str(after).into_iter::<String>();
            let value = values.next().expect("a value").expect("a JSON string");
            (value, &after[values.byte_offset()..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_owned(), &after[end..])
        };
        fields.push((key.to_owned(), value));
        rest = tail;
    }
    assert_eq!(rest, "", "nothing after the last field: {line}");
    fields
}

const ALL_FIELDS: [&str; 11] = [
    "request_id",
    "client",
    "method",
    "path",
    "route",
    "credential",
    "status",
    "upstream_status",
    "duration_us",
    "bytes",
    "complete",
];

#[test]
fn the_text_line_is_the_documented_one() {
    let get = http::Method::GET;
    assert_eq!(
        spell(Format::Text, &access(&get, "ci", "/deploy/api/projects/v1")),
        "2026-12-04T15:36:51.123456Z  INFO access: request_id=5f0c6b2e9d8a4c1b8e7f6a5b4c3d2e1f \
         client=ci method=GET path=/deploy/api/projects/v1 route=/deploy credential=automation \
         status=200 upstream_status=200 duration_us=812 bytes=123 complete=true\n"
    );
    assert_eq!(
        spell(Format::Text, &cut(&get)),
        "2026-12-04T15:36:51.123456Z  INFO access: request_id=5f0c6b2e9d8a4c1b8e7f6a5b4c3d2e1f \
         client=ci method=GET path=/deploy/api/projects/v1 route=/deploy credential=automation \
         status=200 upstream_status=200 duration_us=18446744073709551615 bytes=1000 complete=false \
         error=upstream_timeout\n"
    );
    assert_eq!(
        spell(Format::Text, &traced(&get)),
        "2026-12-04T15:36:51.123456Z  INFO access: request_id=5f0c6b2e9d8a4c1b8e7f6a5b4c3d2e1f \
         client=ci method=GET path=/deploy/api/projects/v1 route=/deploy credential=automation \
         status=200 upstream_status=200 duration_us=18446744073709551615 bytes=1000 complete=false \
         error=upstream_timeout trace_id=4bf92f3577b34da6a3ce929d0e0e4736\n"
    );
}

#[test]
fn the_json_line_is_the_documented_one() {
    let get = http::Method::GET;
    assert_eq!(
        spell(Format::Json, &cut(&get)),
        "{\"timestamp\":\"2026-12-04T15:36:51.123456Z\",\"level\":\"INFO\",\"target\":\"access\",\
         \"request_id\":\"5f0c6b2e9d8a4c1b8e7f6a5b4c3d2e1f\",\"client\":\"ci\",\"method\":\"GET\",\
         \"path\":\"/deploy/api/projects/v1\",\"route\":\"/deploy\",\"credential\":\"automation\",\
         \"status\":200,\"upstream_status\":200,\"duration_us\":18446744073709551615,\"bytes\":1000,\
         \"complete\":false,\"error\":\"upstream_timeout\"}\n"
    );
    assert!(spell(Format::Json, &traced(&get)).ends_with(
        ",\"error\":\"upstream_timeout\",\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\"}\n"
    ));
}

#[test]
fn every_json_field_has_its_natural_type() {
    let get = http::Method::GET;
    for line in [access(&get, "-", "/deploy/x"), cut(&get), traced(&get)] {
        let json = spell(Format::Json, &line);
        assert_eq!(json.matches('\n').count(), 1, "{json}");
        let parsed: serde_json::Value = serde_json::from_str(&json).expect("one JSON object");
        let object = parsed.as_object().expect("an object");
        assert_eq!(parsed["timestamp"], "2026-12-04T15:36:51.123456Z");
        assert_eq!(parsed["level"], "INFO");
        assert_eq!(parsed["target"], ACCESS_TARGET);
        assert_eq!(parsed["request_id"], line.request_id);
        assert_eq!(parsed["client"], line.client);
        assert_eq!(parsed["method"], line.method.as_str());
        assert_eq!(parsed["path"], line.path);
        assert_eq!(parsed["route"], line.route);
        assert_eq!(parsed["credential"], line.credential);
        assert_eq!(parsed["status"].as_u64(), Some(line.status.into()));
        assert_eq!(
            parsed["upstream_status"].as_u64(),
            Some(line.upstream_status.into())
        );
        assert_eq!(parsed["duration_us"].as_u64(), Some(line.duration_us));
        assert_eq!(parsed["bytes"].as_u64(), Some(line.bytes));
        assert_eq!(parsed["complete"].as_bool(), Some(line.complete));
        assert_eq!(parsed.get("error").and_then(|e| e.as_str()), line.error);
        assert_eq!(
            parsed.get("trace_id").and_then(|e| e.as_str()),
            line.trace_id
        );
        let expected = 3
            + ALL_FIELDS.len()
            + usize::from(line.error.is_some())
            + usize::from(line.trace_id.is_some());
        assert_eq!(object.len(), expected, "no other field: {json}");
        // The documented order, in the raw line.
        let at = |key: &str| json.find(&format!("\"{key}\":")).expect(key);
        let order = ["timestamp", "level", "target"]
            .into_iter()
            .chain(ALL_FIELDS)
            .chain(line.error.map(|_| "error"))
            .chain(line.trace_id.map(|_| "trace_id"));
        let positions: Vec<usize> = order.map(at).collect();
        assert!(positions.is_sorted(), "{json}");
    }
}

#[test]
fn hostile_values_stay_on_their_line_in_their_field_in_both_formats() {
    let purge = http::Method::from_bytes(b"PURGE").expect("an extension method");
    let hostile = [
        "/deploy/\"quoted\" path",
        "/deploy/a b=c",
        "/deploy/line\nbreak\r\n2026-01-01T00:00:00.000000Z  INFO access: forged=1",
        "/deploy/\u{1b}[31mred\u{7}\u{0}\u{7f}",
        "/deploy/\u{85}\u{2028}\u{2029}",
        "/deploy/\u{202e}gpj.exe",
        "/deploy/%FF%FE%00",
        "/deploy/\u{fffd}Zoë",
        "/deploy/back\\slash\\",
        "",
    ];
    for path in hostile {
        let line = AccessLine {
            client: path,
            error: Some(path),
            ..access(&purge, "-", path)
        };
        let text = spell(Format::Text, &line);
        assert_eq!(text.matches('\n').count(), 1, "{text:?}");
        assert!(
            !text
                .trim_end_matches('\n')
                .chars()
                .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202e}')),
            "{text:?}"
        );
        let fields = text_fields(&text);
        let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        let expected: Vec<&str> = ALL_FIELDS.into_iter().chain(["error"]).collect();
        assert_eq!(keys, expected, "{text:?}");
        assert_eq!(fields[1].1, path, "client {text:?}");
        assert_eq!(fields[2].1, "PURGE");
        assert_eq!(fields[3].1, path, "path {text:?}");
        assert_eq!(fields[11].1, path, "error {text:?}");

        let json = spell(Format::Json, &line);
        assert_eq!(json.matches('\n').count(), 1, "{json:?}");
        let parsed: serde_json::Value = serde_json::from_str(&json).expect("one JSON object");
        for key in ["client", "path", "error"] {
            assert_eq!(parsed[key], path, "{key} {json:?}");
        }
    }
}

#[test]
fn the_subscriber_writes_access_lines_to_its_writer_in_its_format() {
    let get = http::Method::GET;
    for format in [Format::Text, Format::Json] {
        let captured = MemoryWriter::default();
        tracing::dispatcher::with_default(
            &subscriber(format, "info", captured.clone(), false),
            || {
                tracing::info!(target: "sitecore_auth_proxy", routes = 3, "started");
                log_access(&access(&get, "ci", "/deploy/x"));
            },
        );
        let out = captured.take();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].contains("started"), "{out}");
        match format {
            Format::Text => {
                let fields = text_fields(&format!("{}\n", lines[1]));
                let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
                assert_eq!(keys, ALL_FIELDS, "{out}");
                assert_eq!(fields[3].1, "/deploy/x");
            }
            Format::Json => {
                let parsed: serde_json::Value =
                    serde_json::from_str(lines[1]).expect("a JSON line");
                assert_eq!(parsed["target"], "access");
                assert_eq!(parsed["path"], "/deploy/x");
            }
        }
    }
}

#[test]
fn colours_and_spans_do_not_change_the_access_line() {
    let get = http::Method::GET;
    let line = access(&get, "ci", "/deploy/x");
    let captured = MemoryWriter::default();
    tracing::dispatcher::with_default(
        &subscriber(Format::Text, "info", captured.clone(), true),
        || tracing::info_span!("batch", job = 7).in_scope(|| log_access(&line)),
    );
    let out = captured.take();
    assert!(!out.contains('\u{1b}') && !out.contains("job"), "{out}");
    let fields = text_fields(&out);
    assert_eq!(fields.len(), ALL_FIELDS.len(), "{out}");
}

#[test]
fn rust_log_directives_turn_the_access_line_on_and_off() {
    let get = http::Method::GET;
    let line = access(&get, "ci", "/deploy/x");
    let cases = [
        ("info", true),
        ("trace", true),
        ("warn", false),
        ("off", false),
        ("info,access=off", false),
        ("info,access=warn", false),
        ("off,access=info", true),
        ("error,access=debug", true),
        ("sitecore_auth_proxy=debug", false),
        // An unreadable value falls back to `info`, as for the events.
        ("info,[", true),
    ];
    for (directives, on) in cases {
        for format in [Format::Text, Format::Json] {
            let captured = MemoryWriter::default();
            tracing::dispatcher::with_default(
                &subscriber(format, directives, captured.clone(), false),
                || log_access(&line),
            );
            let out = captured.take();
            assert_eq!(
                out.contains("/deploy/x"),
                on,
                "{directives} {format:?}: {out}"
            );
        }
    }
}

#[test]
fn a_scoped_subscriber_captures_only_its_own_thread() {
    let get = http::Method::GET;
    let captured = MemoryWriter::default();
    tracing::dispatcher::with_default(
        &subscriber(Format::Json, "info", captured.clone(), false),
        || {
            std::thread::scope(|s| {
                s.spawn(|| log_access(&access(&get, "ci", "/deploy/elsewhere")));
            });
            log_access(&access(&get, "ci", "/deploy/here"));
        },
    );
    let out = captured.take();
    assert!(
        out.contains("/deploy/here") && !out.contains("/deploy/elsewhere"),
        "{out}"
    );
}

#[test]
fn a_subscriber_without_the_sink_gets_no_access_line() {
    use tracing_subscriber::layer::SubscriberExt;
    let get = http::Method::GET;
    let captured = MemoryWriter::default();
    let foreign = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_writer(captured.clone())
            .with_ansi(false),
    );
    tracing::subscriber::with_default(foreign, || {
        log_access(&access(&get, "ci", "/deploy/x"));
        tracing::info!("kept");
    });
    let out = captured.take();
    assert!(!out.contains("/deploy/x") && out.contains("kept"), "{out}");
    // And without any subscriber, nothing happens.
    log_access(&access(&get, "ci", "/deploy/x"));
}
