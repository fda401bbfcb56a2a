//! Parsers for single values: durations, sizes, listen addresses, URLs and route prefixes. Each
//! returns a one-line message that says what is accepted, ready to be a [`super::Problem`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Parses a duration such as `"30s"`, `"5m"`, `"1h 30m"` or `"250ms"` (humantime syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("\"{s}\" is not a duration ({e}); write e.g. \"30s\", \"5m\" or \"1h 30m\"")
    })
}

/// Parses a size such as `"1MiB"`, `"512KiB"`, `"10MB"`, `"1 GiB"` or `"2048"` (bytes).
///
/// `KiB`, `MiB`, `GiB`, `TiB` are powers of 1024; `KB`, `MB`, `GB`, `TB` powers of 1000; `B` or no
/// unit means bytes. Units are case-insensitive.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!(
            "\"{s}\" is not a size ({why}); write e.g. \"1MiB\", \"512KiB\", \"10MB\" or \"2048\""
        )
    };
    let trimmed = s.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(bad("it must start with a whole number"));
    }
    let number: u64 = digits.parse().map_err(|_| bad("the number is too large"))?;
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(bad("unknown unit; use B, KB, MB, GB, KiB, MiB or GiB")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| bad("the size is too large"))
}

/// Parses a listen address such as `127.0.0.1:8080` or `[::]:8443`.
pub(super) fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!(
            "\"{s}\" is not an IP:PORT address; write e.g. \"127.0.0.1:8080\", \"0.0.0.0:8080\" \
             or \"[::]:8080\" (host names are not resolved)"
        )
    })
}

/// True for `127.0.0.0/8` and `::1` (also as an IPv4-mapped address).
pub(super) fn is_loopback_ip(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// True for `localhost`, `127.0.0.0/8` and `::1`, as a URL writes them (IPv6 in brackets).
fn is_loopback_host(host: &str) -> bool {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(ip) => is_loopback_ip(ip),
        Err(_) => bare.eq_ignore_ascii_case("localhost"),
    }
}

/// Parses a URL the proxy sends credentials or tokens to: `https://`, or `http://` to a loopback
/// host; no user info, no fragment; a query only when `query_allowed`.
pub(super) fn parse_secure_url(
    s: &str,
    example: &str,
    query_allowed: bool,
) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(s.trim())
        .map_err(|e| format!("\"{s}\" is not a valid URL ({e}); write e.g. \"{example}\""))?;
    let host = match url.host_str() {
        Some(host) if !host.is_empty() => host,
        _ => return Err(format!("\"{s}\" has no host; write e.g. \"{example}\"")),
    };
    match url.scheme() {
        "https" => {}
        "http" if is_loopback_host(host) => {}
        "http" => {
            return Err(format!(
                "\"{s}\" uses http:// to a host that is not loopback: requests carrying \
                 credentials and tokens would cross the network unencrypted; use https:// \
                 (http:// is only allowed for localhost, 127.0.0.0/8 and ::1)"
            ))
        }
        other => {
            return Err(format!(
                "\"{s}\" has scheme {other}://; only https:// (or http:// to a loopback host) is \
                 supported"
            ))
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "\"{}\" contains a user name or password; remove it (credentials belong in \
             [credentials])",
            redact_userinfo(&url)
        ));
    }
    if url.fragment().is_some() {
        return Err(format!("\"{s}\" has a #fragment; remove it"));
    }
    if !query_allowed && url.query().is_some() {
        return Err(format!(
            "\"{s}\" has a ?query; an upstream base URL is scheme, host and path only"
        ));
    }
    Ok(url)
}

/// The URL without its password, for messages.
fn redact_userinfo(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    // Setting a password only fails for URLs that cannot have one, which then have none to hide.
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.to_string()
}

/// Parses a route's upstream base URL into scheme, authority and path, with the path's trailing
/// `/` removed (an empty path becomes `/`).
pub(super) fn parse_upstream(s: &str) -> Result<http::Uri, String> {
    let url = parse_secure_url(s, "https://xmclouddeploy-api.sitecorecloud.io", false)?;
    let host = url.host_str().unwrap_or_default();
    let authority = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let path = url.path().trim_end_matches('/');
    let path = if path.is_empty() { "/" } else { path };
    let text = format!("{}://{authority}{path}", url.scheme());
    http::Uri::try_from(text.as_str())
        .map_err(|e| format!("\"{s}\" is not a valid upstream URL ({e})"))
}

/// Checks a route prefix: `/` or `/a/b`, with no trailing `/`, no empty, `.` or `..` segments and
/// only characters that appear literally in a request path.
pub(super) fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Err("is empty; write e.g. \"/deploy\" (or \"/\" for every path)".to_owned());
    }
    if !prefix.starts_with('/') {
        return Err(format!(
            "\"{prefix}\" must start with '/'; write \"/{prefix}\""
        ));
    }
    if let Some(c) = prefix.chars().find(|c| matches!(c, '?' | '#' | '%')) {
        return Err(format!(
            "\"{prefix}\" contains '{c}'; a prefix is a plain path (no query, fragment or \
             percent-encoding)"
        ));
    }
    if let Some(c) = prefix.chars().find(|&c| !is_path_char(c)) {
        return Err(format!(
            "\"{prefix}\" contains {c:?}; a prefix may use ASCII letters, digits and \
             -._~!$&'()*+,;=:@/"
        ));
    }
    if prefix == "/" {
        return Ok(());
    }
    if prefix.ends_with('/') {
        let trimmed = prefix.trim_end_matches('/');
        let fix = if trimmed.is_empty() { "/" } else { trimmed };
        return Err(format!(
            "\"{prefix}\" ends with '/'; write \"{fix}\" (prefixes match whole segments anyway)"
        ));
    }
    for segment in prefix[1..].split('/') {
        match segment {
            "" => return Err(format!("\"{prefix}\" has an empty segment (\"//\")")),
            "." | ".." => {
                return Err(format!(
                    "\"{prefix}\" has a \"{segment}\" segment; requests with dot segments are \
                     refused, so this prefix could never match"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// RFC 3986 `pchar` without `%`, plus `/`.
fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/".contains(c)
}
