//! `check`: the validated configuration as a route table, and with `--fetch` one verified token
//! per credential (its expiry and scopes, never the token).

use std::io::Write;
use std::sync::Arc;

use crate::config::Config;
use crate::runtime::Runtime;

/// Why `check` could not run to the end.
pub type CheckError = Box<dyn std::error::Error + Send + Sync>;

/// Prints the summary of `config` to `out`; with `fetch`, obtains and verifies what every
/// credential in use injects. `Ok(false)` when a credential failed.
pub async fn run(config: Config, fetch: bool, out: &mut dyn Write) -> Result<bool, CheckError> {
    route_table(&config, out)?;
    if !fetch {
        return Ok(true);
    }
    crate::install_crypto_providers();
    let runtime = Runtime::build(
        Arc::new(config),
        &Default::default(),
        &Default::default(),
        None,
        1,
        &Default::default(),
    )?;
    writeln!(out)?;
    let mut ok = true;
    for credential in runtime.credentials_by_name() {
        match credential.check().await {
            Ok(line) => writeln!(out, "credential {}: {line}", credential.name())?,
            Err(reason) => {
                ok = false;
                writeln!(out, "credential {}: FAILED ({reason})", credential.name())?;
            }
        }
    }
    Ok(ok)
}

fn route_table(config: &Config, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "{}: OK", config.path.display())?;
    let tls = if config.server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    writeln!(out, "listen {} ({tls})", config.server.listen)?;
    if let Some(admin) = &config.admin {
        writeln!(out, "admin  {}", admin.listen)?;
    }
    writeln!(out)?;
    let width = config
        .routes
        .iter()
        .map(|r| r.prefix.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let cwidth = config
        .routes
        .iter()
        .map(|r| r.credential.len())
        .max()
        .unwrap_or(10)
        .max(10);
    writeln!(
        out,
        "{:width$}  {:cwidth$}  UPSTREAM",
        "PREFIX", "CREDENTIAL"
    )?;
    let egress = &config.server.egress;
    for route in &config.routes {
        let kind = config
            .credentials
            .get(&route.credential)
            .map_or("?", |c| c.kind());
        let way = reqwest::Url::parse(&route.upstream.to_string())
            .map_or_else(|_| "?".to_owned(), |url| egress.describe(&url));
        writeln!(
            out,
            "{:width$}  {:cwidth$}  {}  ({kind}, timeout {}, {way})",
            route.prefix,
            route.credential,
            route.upstream,
            humantime::format_duration(route.timeout.unwrap_or(config.server.request_timeout)),
        )?;
    }
    let mut endpoints = Vec::new();
    for (name, credential) in &config.credentials {
        for (what, url) in credential.endpoints() {
            endpoints.push(format!(
                "credential {name}: {what} {url} ({})",
                egress.describe(url)
            ));
        }
    }
    if !endpoints.is_empty() {
        writeln!(out)?;
        for line in endpoints {
            writeln!(out, "{line}")?;
        }
    }
    if !config.clients.is_empty() {
        writeln!(out)?;
        for client in &config.clients {
            let routes = client
                .routes
                .as_ref()
                .map_or("all routes".to_owned(), |r| r.join(", "));
            writeln!(out, "client {}: {routes}", client.name)?;
        }
    }
    Ok(())
}
