//! The egress proxy: which HTTP proxy, if any, a connection to an upstream, a token endpoint or
//! a JWKS goes through. One rule for all of them, so tokens and requests never disagree about the
//! way out.
//!
//! The proxy is `server.egress_proxy` when the key is set (`""` turns it off), otherwise
//! `HTTPS_PROXY` for `https://` targets and `HTTP_PROXY` for `http://` ones (lower-case names
//! first, as curl reads them). `NO_PROXY` applies in both cases, with curl's rules
//! ([`NoProxy`]); there is no automatic loopback bypass. `https://` targets go through a `CONNECT`
//! tunnel with TLS end to end to the upstream; `http://` targets are sent to the proxy in
//! absolute form.

mod no_proxy;

use std::fmt;

use base64::Engine;
use http::HeaderValue;

pub use no_proxy::NoProxy;

use crate::secret::Secret;

/// An HTTP proxy to connect through. `Display` and `Debug` show `http://host:port`, never the
/// password.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyEndpoint {
    /// The proxy's host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// `user` and `password` for `Proxy-Authorization: Basic`, from the URL's userinfo.
    pub credentials: Option<(String, Secret)>,
}

impl ProxyEndpoint {
    /// Parses `http://[user:password@]host[:port][/]` (port default 80). Only `http://` proxies:
    /// TLS to the proxy itself is not supported. Errors never repeat the password.
    pub fn parse(text: &str) -> Result<ProxyEndpoint, String> {
        let url = reqwest::Url::parse(text).map_err(|_| {
            "is not a URL; expected http://host:port (optionally http://user:password@host:port)"
                .to_owned()
        })?;
        if url.scheme() != "http" {
            return Err(format!(
                "the scheme must be http:// (the proxy is reached in plain HTTP; tunnels to \
                 https:// upstreams are TLS end to end), not {}://",
                url.scheme()
            ));
        }
        let host = match url.host_str() {
            Some(host) if !host.is_empty() => unbracket(host).to_owned(),
            _ => return Err("has no host".to_owned()),
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err("must be http://host:port with no path or query".to_owned());
        }
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| "its user or password is not valid UTF-8".to_owned())
        };
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (user, password) => Some((
                decode(user)?,
                Secret::new(decode(password.unwrap_or_default())?),
            )),
        };
        Ok(ProxyEndpoint {
            host,
            port: url.port().unwrap_or(80),
            credentials,
        })
    }

    /// `host:port`, bracketing an IPv6 address: what to connect to and what to name in errors.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// `Proxy-Authorization` for this proxy, marked sensitive; `None` without credentials.
    pub fn authorization(&self) -> Option<HeaderValue> {
        let (user, password) = self.credentials.as_ref()?;
        let pair = Secret::new(format!("{user}:{}", password.expose()));
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair.expose());
        let mut value = HeaderValue::try_from(format!("Basic {encoded}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

impl fmt::Display for ProxyEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.authority())
    }
}

impl fmt::Debug for ProxyEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyEndpoint")
            .field("proxy", &self.to_string())
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

/// The way out for every target: the configured rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Egress {
    /// The proxy for `https://` targets.
    pub https: Option<ProxyEndpoint>,
    /// The proxy for `http://` targets.
    pub http: Option<ProxyEndpoint>,
    /// Targets reached directly.
    pub no_proxy: NoProxy,
    /// Where the rule came from, for `check` (`server.egress_proxy`, `HTTPS_PROXY`, ...).
    pub source: String,
}

impl Egress {
    /// The proxy a connection to `host:port` over `scheme` goes through; `None`: direct.
    pub fn proxy_for(&self, scheme: &str, host: &str, port: u16) -> Option<&ProxyEndpoint> {
        let proxy = match scheme {
            "https" => self.https.as_ref(),
            "http" => self.http.as_ref(),
            _ => None,
        }?;
        (!self.no_proxy.bypasses(host, port)).then_some(proxy)
    }

    /// [`Egress::proxy_for`] a URL.
    pub fn proxy_for_url(&self, url: &reqwest::Url) -> Option<&ProxyEndpoint> {
        let host = unbracket(url.host_str()?);
        self.proxy_for(url.scheme(), host, url.port_or_known_default()?)
    }

    /// How a URL is reached, for `check`: `direct` or `via http://host:port (source)`.
    pub fn describe(&self, url: &reqwest::Url) -> String {
        match self.proxy_for_url(url) {
            Some(proxy) => format!("via {proxy} ({})", self.source),
            None => "direct".to_owned(),
        }
    }
}

/// An IPv6 host without the brackets a URL puts around it.
fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

#[cfg(test)]
mod tests;
