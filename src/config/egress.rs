//! `server.egress_proxy`, or the proxy environment (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`, in
//! lower or upper case) when the key is absent: the rule of [`crate::egress`].

use super::Cx;
use crate::egress::{Egress, NoProxy, ProxyEndpoint};

/// The egress rule. `NO_PROXY` applies whether the proxy comes from the key or the environment.
pub(super) fn egress(key: Option<&str>, cx: &mut Cx) -> Egress {
    let no_proxy = NoProxy::parse(&env_var(cx, "no_proxy").unwrap_or_default());
    match key {
        Some("") => Egress {
            no_proxy,
            source: "server.egress_proxy = \"\"".to_owned(),
            ..Egress::default()
        },
        Some(text) => {
            let proxy = ProxyEndpoint::parse(text)
                .map_err(|message| cx.problem("server.egress_proxy", message))
                .ok();
            Egress {
                https: proxy.clone(),
                http: proxy,
                no_proxy,
                source: "server.egress_proxy".to_owned(),
            }
        }
        None => {
            let https = from_env(cx, "https_proxy");
            let http = from_env(cx, "http_proxy");
            let source = match (&https, &http) {
                (None, None) => "no egress proxy",
                (Some(_), None) => "HTTPS_PROXY",
                (None, Some(_)) => "HTTP_PROXY",
                (Some(_), Some(_)) => "HTTPS_PROXY / HTTP_PROXY",
            };
            Egress {
                https,
                http,
                no_proxy,
                source: source.to_owned(),
            }
        }
    }
}

/// A proxy variable's value, lower-case name first as curl reads them; empty counts as unset.
fn env_var(cx: &Cx, lower: &str) -> Option<String> {
    [lower.to_owned(), lower.to_ascii_uppercase()]
        .iter()
        .find_map(|name| (cx.env)(name))
        .filter(|v| !v.trim().is_empty())
}

/// The proxy a variable names; `host:port` without a scheme means `http://host:port`, as in curl.
fn from_env(cx: &mut Cx, lower: &str) -> Option<ProxyEndpoint> {
    let value = env_var(cx, lower)?;
    let value = value.trim();
    let url = if value.contains("://") {
        value.to_owned()
    } else {
        format!("http://{value}")
    };
    ProxyEndpoint::parse(&url)
        .map_err(|message| {
            cx.problem(
                "server.egress_proxy",
                format!(
                    "not set, so the environment's {} applies, and it {message}",
                    lower.to_ascii_uppercase()
                ),
            )
        })
        .ok()
}
