//! How an access line is spelled, in text and in JSON (the formats are documented on
//! [`access`](super::access) and in the README's "Logs" section).
//!
//! Both spellings write the same fields in the same order, from one list. A string value that
//! needs quoting is escaped the same way in both: the quoted text value is a JSON string, so a
//! reader of either format unescapes it with a JSON parser. Escaping keeps every line one line
//! that displays as it is stored: line breaks, control characters and the characters that
//! reorder text on display never appear raw.

use std::cell::Cell;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use super::access::{AccessLine, ACCESS_TARGET};

/// The string fields, in the order both formats write them.
const STRING_KEYS: [&str; 6] = [
    "request_id",
    "client",
    "method",
    "path",
    "route",
    "credential",
];

/// The numeric fields, written after the strings.
const NUMBER_KEYS: [&str; 4] = ["status", "upstream_status", "duration_us", "bytes"];

/// Appends `line`'s fields in their order: each key spelled by `key`, each string by `string`.
fn fields(
    out: &mut Vec<u8>,
    line: &AccessLine<'_>,
    key: fn(&mut Vec<u8>, &str),
    string: fn(&mut Vec<u8>, &str),
) {
    let strings = [
        line.request_id,
        line.client,
        line.method.as_str(),
        line.path,
        line.route,
        line.credential,
    ];
    for (name, value) in STRING_KEYS.into_iter().zip(strings) {
        key(out, name);
        string(out, value);
    }
    let numbers = [
        line.status.into(),
        line.upstream_status.into(),
        line.duration_us,
        line.bytes,
    ];
    for (name, value) in NUMBER_KEYS.into_iter().zip(numbers) {
        key(out, name);
        push_decimal(out, value, 0);
    }
    key(out, "complete");
    out.extend_from_slice(if line.complete { b"true" } else { b"false" });
    if let Some(error) = line.error {
        key(out, "error");
        string(out, error);
    }
    if let Some(trace_id) = line.trace_id {
        key(out, "trace_id");
        string(out, trace_id);
    }
}

/// Appends `line` in the text format, newline included.
pub(super) fn text(out: &mut Vec<u8>, line: &AccessLine<'_>, now: SystemTime) {
    timestamp(out, now);
    // The level right-aligned to five columns, as on the other log lines of the stream.
    out.extend_from_slice(b"  INFO ");
    out.extend_from_slice(ACCESS_TARGET.as_bytes());
    out.push(b':');
    fields(out, line, text_key, text_value);
    out.push(b'\n');
}

/// Appends `line` in the JSON format (one object), newline included.
pub(super) fn json(out: &mut Vec<u8>, line: &AccessLine<'_>, now: SystemTime) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out, now);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"");
    out.extend_from_slice(ACCESS_TARGET.as_bytes());
    out.push(b'"');
    fields(out, line, json_key, quoted);
    out.extend_from_slice(b"}\n");
}

fn text_key(out: &mut Vec<u8>, key: &str) {
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
}

fn json_key(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

/// A text value as it is when that is unambiguous (logfmt's rule: not empty, printable ASCII
/// without spaces, `"`, `=` or `\`), else [`quoted`].
fn text_value(out: &mut Vec<u8>, value: &str) {
    // A fold without an early exit, which the compiler vectorises.
    let bare = value.bytes().fold(!value.is_empty(), |bare, b| {
        bare & (0x21..0x7f).contains(&b) & (b != b'"') & (b != b'=') & (b != b'\\')
    });
    if bare {
        out.extend_from_slice(value.as_bytes());
    } else {
        quoted(out, value);
    }
}

/// `value` as a JSON string: `"` and `\` escaped, `\n` `\r` `\t` by name, and as `\u00XX` (or
/// `\u20XX`) every control character, the line and paragraph separators and the bidirectional
/// formatting characters. Other non-ASCII characters are written as they are (UTF-8).
fn quoted(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    let plain = value.bytes().fold(true, |plain, b| {
        plain & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.extend_from_slice(value.as_bytes());
    } else {
        for c in value.chars() {
            match c {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                '\n' => out.extend_from_slice(b"\\n"),
                '\r' => out.extend_from_slice(b"\\r"),
                '\t' => out.extend_from_slice(b"\\t"),
                c if escaped(c) => {
                    out.extend_from_slice(b"\\u");
                    let code = u32::from(c);
                    for shift in [12, 8, 4, 0] {
                        out.push(b"0123456789abcdef"[((code >> shift) & 0xf) as usize]);
                    }
                }
                c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
    }
    out.push(b'"');
}

/// Characters that would break the line or change how it displays.
fn escaped(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}'
                | '\u{2029}'
                | '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

thread_local! {
    /// The second of the last timestamp and its text up to the seconds (`2026-11-24T03:20:15`).
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// Appends `now` as RFC 3339 in UTC with microseconds (`2026-11-24T03:20:15.123456Z`), the
/// timestamp of the other log lines. The date and time of day are formatted once a second per
/// thread, on the stack; within the second only the microseconds are written.
fn timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        let mut full = [0u8; 20];
        let fits = (&mut full[..])
            .write_fmt(format_args!("{}", humantime::format_rfc3339_seconds(now)))
            .is_ok();
        if !fits {
            // Years beyond 9999: not worth a cache. Writing to a `Vec` cannot fail.
            let _ = write!(out, "{}", humantime::format_rfc3339_micros(now));
            return;
        }
        text.copy_from_slice(&full[..19]);
        SECOND.set((secs, text));
    }
    out.extend_from_slice(&text);
    out.push(b'.');
    push_decimal(out, u64::from(since_epoch.subsec_micros()), 6);
    out.push(b'Z');
}

/// Appends `value` in decimal, with leading zeros up to `width` digits (at most 20).
fn push_decimal(out: &mut Vec<u8>, mut value: u64, width: usize) {
    let mut buf = [0u8; 20];
    let stop = buf.len() - width.min(buf.len());
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 && at <= stop {
            break;
        }
    }
    out.extend_from_slice(&buf[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_micros_across_seconds_and_days() {
        let base = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let offsets_us = [
            0,
            1,
            999_999,
            1_000_000,
            1_000_001,
            59_999_999,
            86_399_999_999,
        ];
        for us in offsets_us
            .into_iter()
            .chain((0..500).map(|i| i * 7_919_777))
        {
            let t = base + Duration::from_micros(us);
            let mut ours = Vec::new();
            timestamp(&mut ours, t);
            assert_eq!(
                String::from_utf8_lossy(&ours),
                humantime::format_rfc3339_micros(t).to_string()
            );
        }
    }

    #[test]
    fn integers_are_written_in_decimal() {
        for n in [0, 7, 10, 38, 1234, 99_999, u64::MAX] {
            for width in [0, 1, 6, 20, 30] {
                let mut out = b"x".to_vec();
                push_decimal(&mut out, n, width);
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    format!("x{n:0width$}", width = width.min(20))
                );
            }
        }
    }

    #[test]
    fn quoted_values_are_json_strings_that_display_as_stored() {
        let hostile = [
            "",
            "plain",
            "say \"hi\"",
            "back\\slash",
            "line\nbreak\rreturn\ttab",
            "\u{1b}[31mred\u{7f}\u{0}",
            "next\u{85}line\u{2028}sep\u{2029}",
            "\u{202e}txt.exe\u{2066}",
            "Zoë \u{fffd} 名前",
        ];
        for value in hostile {
            let mut out = Vec::new();
            quoted(&mut out, value);
            let text = String::from_utf8(out).expect("UTF-8");
            let parsed: String = serde_json::from_str(&text).expect("a JSON string");
            assert_eq!(parsed, value, "{text}");
            assert!(
                !text.chars().any(escaped),
                "nothing that breaks or reorders the line is raw: {text:?}"
            );
        }
    }

    #[test]
    fn text_values_are_bare_only_when_unambiguous() {
        let cases = [
            ("/deploy/a%20b/~x", "/deploy/a%20b/~x"),
            ("/deploy/%FF%FE", "/deploy/%FF%FE"),
            ("PURGE", "PURGE"),
            ("", "\"\""),
            ("team ops", "\"team ops\""),
            ("/a=b", "\"/a=b\""),
            ("/x\"y", "\"/x\\\"y\""),
            ("Zoë", "\"Zoë\""),
        ];
        for (value, written) in cases {
            let mut out = Vec::new();
            text_value(&mut out, value);
            assert_eq!(String::from_utf8_lossy(&out), written);
        }
    }
}
