//! `[server]` and `[admin]`: listen addresses, TLS files, timeouts and limits, with the
//! documented defaults, and the refusal to listen beyond loopback without inbound authentication.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::raw::{RawAdmin, RawServer};
use super::values::{is_loopback_ip, parse_listen, parse_size};
use super::{files, AdminSettings, Cx, ServerSettings, TlsSettings};

const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9090);
const DEFAULT_TOKEN_ENDPOINT: &str = "/oauth/token";
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
const DEFAULT_REPLAY_BODY_LIMIT: u64 = 1024 * 1024;
/// The replay buffer is held in memory per request; more than this is a typo, not a plan.
const MAX_REPLAY_BODY_LIMIT: u64 = 1024 * 1024 * 1024;

/// `[server]`, with defaults for every missing key. Never fails: a bad key records a problem and
/// falls back to its default so the rest of the file is still checked.
pub(super) fn server(
    value: Option<&toml::Value>,
    has_clients: bool,
    cx: &mut Cx,
) -> ServerSettings {
    let raw: RawServer = cx.section(value, "server", "[server]");

    let listen = match raw.listen.as_deref() {
        None => Some(DEFAULT_LISTEN),
        Some(text) => parse_listen(text)
            .map_err(|message| cx.problem("server.listen", message))
            .ok(),
    };
    let tls = tls(&raw, cx);
    let allow_anonymous = raw.allow_anonymous.unwrap_or(false);

    if let Some(listen) = listen {
        let client_ca = raw.client_ca.is_some();
        if !is_loopback_ip(listen.ip()) && !has_clients && !client_ca && !allow_anonymous {
            cx.problem(
                "server.listen",
                format!(
                    "{listen} is reachable from other hosts but nothing authenticates the \
                     tools that connect, so anyone who can reach it could use the credentials; \
                     add [[clients]] with keys, or set server.client_ca (with tls_cert and \
                     tls_key) to require client certificates, or set server.allow_anonymous = \
                     true if the network itself is trusted"
                ),
            );
        }
    }

    let token_endpoint = match raw.token_endpoint {
        None => Some(DEFAULT_TOKEN_ENDPOINT.to_owned()),
        Some(path) if path.is_empty() => None,
        Some(path) if path.starts_with('/') && !path.contains(['?', '#', ' ']) => Some(path),
        Some(path) => {
            cx.problem(
                "server.token_endpoint",
                format!(
                    "\"{path}\" must be a path starting with '/' (e.g. \"/oauth/token\"), or \"\" \
                     to turn the local token endpoint off"
                ),
            );
            None
        }
    };

    let max_connections = match raw.max_connections {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(n) => match usize::try_from(n) {
            Ok(n) if n >= 1 => n,
            _ => {
                cx.problem(
                    "server.max_connections",
                    format!("{n} is not allowed; it must be at least 1 (default 10000)"),
                );
                DEFAULT_MAX_CONNECTIONS
            }
        },
    };

    let replay_body_limit = match raw.replay_body_limit.as_deref() {
        None => DEFAULT_REPLAY_BODY_LIMIT,
        Some(text) => match parse_size(text) {
            Ok(n) if n <= MAX_REPLAY_BODY_LIMIT => n,
            Ok(_) => {
                cx.problem(
                    "server.replay_body_limit",
                    format!("\"{text}\" is more than 1GiB; the replay buffer is held in memory"),
                );
                DEFAULT_REPLAY_BODY_LIMIT
            }
            Err(message) => {
                cx.problem("server.replay_body_limit", message);
                DEFAULT_REPLAY_BODY_LIMIT
            }
        },
    };

    let mut upstream_ca = Vec::new();
    let mut upstream_ca_files = Vec::new();
    for (i, file) in raw.upstream_ca.iter().flatten().enumerate() {
        let key = format!("server.upstream_ca[{i}]");
        let Some(path) = cx.resolve(&key, file) else {
            continue;
        };
        match files::read_certs(&path) {
            Ok(certs) => upstream_ca.extend(certs),
            Err(message) => cx.problem(key, message),
        }
        upstream_ca_files.push(path);
    }

    ServerSettings {
        listen: listen.unwrap_or(DEFAULT_LISTEN),
        tls,
        allow_anonymous,
        token_endpoint,
        request_timeout: cx.timeout(
            "server.request_timeout",
            raw.request_timeout.as_deref(),
            Duration::from_secs(120),
        ),
        connect_timeout: cx.timeout(
            "server.connect_timeout",
            raw.connect_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        idle_timeout: cx.timeout(
            "server.idle_timeout",
            raw.idle_timeout.as_deref(),
            Duration::from_secs(90),
        ),
        header_read_timeout: cx.timeout(
            "server.header_read_timeout",
            raw.header_read_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        max_connections,
        replay_body_limit,
        shutdown_grace: cx.duration(
            "server.shutdown_grace",
            raw.shutdown_grace.as_deref(),
            Duration::from_secs(30),
        ),
        forwarded_headers: raw.forwarded_headers.unwrap_or(false),
        rewrite_location: raw.rewrite_location.unwrap_or(true),
        upstream_ca,
        upstream_ca_files,
        egress: super::egress::egress(raw.egress_proxy.as_deref(), cx),
    }
}

/// `tls_cert`, `tls_key` and `client_ca`: every named file is read (so each bad one is reported),
/// and the settings exist only when the pair is complete and every file is good.
fn tls(raw: &RawServer, cx: &mut Cx) -> Option<TlsSettings> {
    let cert = raw
        .tls_cert
        .as_deref()
        .and_then(|file| cx.resolve("server.tls_cert", file))
        .map(|path| {
            let chain = files::read_certs(&path)
                .map_err(|message| cx.problem("server.tls_cert", message))
                .ok();
            (path, chain)
        });
    let key = raw
        .tls_key
        .as_deref()
        .and_then(|file| cx.resolve("server.tls_key", file))
        .map(|path| {
            let key = files::read_key(&path)
                .map_err(|message| cx.problem("server.tls_key", message))
                .ok();
            (path, key)
        });
    let client_ca = raw
        .client_ca
        .as_deref()
        .and_then(|file| cx.resolve("server.client_ca", file))
        .map(|path| {
            let certs = files::read_certs(&path)
                .map_err(|message| cx.problem("server.client_ca", message))
                .ok();
            (path, certs)
        });

    match (raw.tls_cert.is_some(), raw.tls_key.is_some()) {
        (true, false) => cx.problem(
            "server.tls_key",
            "tls_cert is set but tls_key is not; HTTPS needs both (PEM files), or remove \
             tls_cert for plain HTTP",
        ),
        (false, true) => cx.problem(
            "server.tls_cert",
            "tls_key is set but tls_cert is not; HTTPS needs both (PEM files), or remove \
             tls_key for plain HTTP",
        ),
        (false, false) if raw.client_ca.is_some() => cx.problem(
            "server.client_ca",
            "client_ca needs tls_cert and tls_key: client certificates are only asked for over \
             HTTPS",
        ),
        _ => {}
    }

    let (cert_file, Some(cert_chain)) = cert? else {
        return None;
    };
    let (key_file, Some(key)) = key? else {
        return None;
    };
    let (client_ca_file, client_ca) = match client_ca {
        None => (None, Vec::new()),
        Some((path, Some(certs))) => (Some(path), certs),
        Some((_, None)) => return None,
    };
    Some(TlsSettings {
        cert_file,
        key_file,
        cert_chain,
        key: Arc::new(key),
        client_ca_file,
        client_ca,
    })
}

/// `[admin]`; absent means no admin listener.
pub(super) fn admin(
    value: Option<&toml::Value>,
    server: &ServerSettings,
    cx: &mut Cx,
) -> Option<AdminSettings> {
    let value = value?;
    let raw: RawAdmin = cx.section(Some(value), "admin", "[admin]");
    let listen = match raw.listen.as_deref() {
        None => DEFAULT_ADMIN_LISTEN,
        Some(text) => match parse_listen(text) {
            Ok(listen) => listen,
            Err(message) => {
                cx.problem("admin.listen", message);
                DEFAULT_ADMIN_LISTEN
            }
        },
    };
    if listen == server.listen && listen.port() != 0 {
        cx.problem(
            "admin.listen",
            format!("{listen} is also server.listen; give the admin listener its own port"),
        );
    }
    Some(AdminSettings {
        listen,
        ready_requires: raw.ready_requires.unwrap_or_default(),
    })
}
