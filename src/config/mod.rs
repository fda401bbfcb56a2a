//! Configuration: `proxy.toml` text in, validated runtime settings out.
//!
//! The file is read once into a `toml::Table`, `${NAME}` references are replaced from the
//! environment, and each section (server, admin, every credential, every route, every client) is
//! deserialized and checked on its own, so one run reports every problem in the file, each with the
//! key path it belongs to. After this module, the rest of the proxy sees `SocketAddr`, `Duration`,
//! `Uri`, `Url`, `HeaderName`, parsed certificates and [`Secret`]s, never raw strings.
//!
//! Layout: `raw` holds the serde shapes of the file, `env` the `${NAME}` substitution, `values`
//! the parsers for single values (durations, sizes, URLs, prefixes), `files` the PEM and secret
//! files, `limits` the rate, burst and concurrency keys, and `server`, `credentials`, `routes`
//! and `telemetry` turn each section into its runtime type.

mod cluster;
mod context;
mod credentials;
mod egress;
mod env;
mod files;
mod limits;
mod raw;
mod routes;
mod server;
mod telemetry;
mod values;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_files;
#[cfg(test)]
mod tests_limits;
#[cfg(test)]
mod tests_telemetry;
#[cfg(test)]
mod tests_values;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::egress::Egress;
use crate::secret::Secret;
use context::{key_join, Cx, Problems};
pub use context::{ConfigError, Problem};

pub use limits::{
    ClientLimitSettings, Rate, RateSettings, RateUnit, ReadyRequires, RouteLimitSettings, MAX_BURST,
};
pub use values::{parse_duration, parse_size};

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// The `[server]` section: the main listener and its limits.
    pub server: ServerSettings,
    /// The `[admin]` section; `None` means no admin listener.
    pub admin: Option<AdminSettings>,
    /// The `[credentials.NAME]` sections, by name.
    pub credentials: BTreeMap<String, CredentialSettings>,
    /// The `[[routes]]`, in file order.
    pub routes: Vec<RouteSettings>,
    /// The `[[clients]]`, in file order; empty means no inbound key is required.
    pub clients: Vec<ClientSettings>,
    /// The `[telemetry]` section; `None` means no tracing.
    pub telemetry: Option<TelemetrySettings>,
    /// The `[cluster]` section; `None` means everything stays in-process.
    pub cluster: Option<ClusterSettings>,
}

/// Where replicas share tokens and rate-limit usage (`[cluster]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    /// `redis://` or `rediss://` URL, which may hold a password.
    pub redis_url: Secret,
    /// The file `redis_url` was read from, if any.
    pub redis_url_file: Option<PathBuf>,
    /// The URL without its user and password, for logs and `/status`.
    pub shown_url: String,
    /// Prefix of every key (default `sitecore-auth-proxy:`).
    pub key_prefix: String,
    /// One token fetch per credential per lifetime for the whole fleet (default true).
    pub share_tokens: bool,
    /// How often a replica reconciles rate-limit usage with the others (default 100 ms).
    pub sync_interval: Duration,
    /// The longest anything waits on Redis (default 50 ms).
    pub timeout: Duration,
}

/// Where OpenTelemetry traces go (`[telemetry]` with an `otlp_endpoint`).
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// `<otlp_endpoint>/v1/traces`: the OTLP/HTTP URL spans are posted to.
    pub traces_url: reqwest::Url,
    /// The `service.name` of every span (default `sitecore-auth-proxy`).
    pub service_name: String,
    /// The share of new traces kept, 0.0 to 1.0 (default 1.0); a sampled incoming
    /// `traceparent` is always followed.
    pub sample_ratio: f64,
}

/// The main listener (`[server]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// Where tools connect (default `127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// HTTPS settings; `None` serves plain HTTP (HTTP/1.1 and h2c).
    pub tls: Option<TlsSettings>,
    /// Allows a non-loopback `listen` without any inbound authentication.
    pub allow_anonymous: bool,
    /// Path of the local OAuth token endpoint (default `/oauth/token`); `None` turns it off.
    pub token_endpoint: Option<String>,
    /// Time allowed until the upstream's response headers (default 120 s).
    pub request_timeout: Duration,
    /// Time allowed to connect to an upstream (default 10 s).
    pub connect_timeout: Duration,
    /// How long an idle keep-alive client connection is kept (default 90 s).
    pub idle_timeout: Duration,
    /// Time allowed for a client to send its request headers (default 10 s).
    pub header_read_timeout: Duration,
    /// Most client connections served at once (default 10000).
    pub max_connections: usize,
    /// Request bodies up to this many bytes may be replayed after an upstream 401 (default 1 MiB).
    pub replay_body_limit: u64,
    /// How long in-flight requests may drain at shutdown (default 30 s).
    pub shutdown_grace: Duration,
    /// Adds `X-Forwarded-For`, `-Proto` and `-Host` upstream (default false).
    pub forwarded_headers: bool,
    /// Rewrites `Location` headers that point into an upstream (default true).
    pub rewrite_location: bool,
    /// Extra roots trusted for upstream and token endpoint TLS, from `upstream_ca_files`.
    pub upstream_ca: Vec<CertificateDer<'static>>,
    /// The PEM files `upstream_ca` was read from, resolved against the config file's directory.
    pub upstream_ca_files: Vec<PathBuf>,
    /// The HTTP proxy upstreams, token endpoints and JWKS are reached through, if any.
    pub egress: Egress,
}

/// HTTPS on the main listener (`tls_cert`, `tls_key`, `client_ca`).
#[derive(Clone, PartialEq)]
pub struct TlsSettings {
    /// The certificate chain's PEM file.
    pub cert_file: PathBuf,
    /// The private key's PEM file.
    pub key_file: PathBuf,
    /// The certificate chain, leaf first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: Arc<PrivateKeyDer<'static>>,
    /// The PEM file of the CA that signs client certificates (mTLS), if any.
    pub client_ca_file: Option<PathBuf>,
    /// The client CA certificates; empty when client certificates are not required.
    pub client_ca: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Certificates as byte arrays drown the output; counts say what matters.
        f.debug_struct("TlsSettings")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field(
                "cert_chain",
                &format_args!("{} certificate(s)", self.cert_chain.len()),
            )
            .field("key", &format_args!("[redacted]"))
            .field("client_ca_file", &self.client_ca_file)
            .field(
                "client_ca",
                &format_args!("{} certificate(s)", self.client_ca.len()),
            )
            .finish()
    }
}

/// The admin listener (`[admin]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// Where `/healthz`, `/readyz`, `/metrics` and `/status` are served (default `127.0.0.1:9090`).
    pub listen: SocketAddr,
    /// What `/readyz` requires of the credentials in use (default [`ReadyRequires::FirstTokens`]).
    pub ready_requires: ReadyRequires,
}

/// One named credential (`[credentials.NAME]`).
#[derive(Debug, Clone, PartialEq)]
// A few credentials, built once per load: boxing would only make every match noisier.
#[allow(clippy::large_enum_variant)]
pub enum CredentialSettings {
    /// `type = "oauth"` (the default): client credentials exchanged for verified JWTs.
    OAuth(OAuthSettings),
    /// `type = "header"`: a static value injected as a header.
    Header(HeaderSettings),
}

impl CredentialSettings {
    /// The `type` key's value.
    pub fn kind(&self) -> &'static str {
        match self {
            CredentialSettings::OAuth(_) => "oauth",
            CredentialSettings::Header(_) => "header",
        }
    }

    /// The URLs the proxy calls for this credential (`token_url`, `jwks_url`), for `check`.
    pub fn endpoints(&self) -> Vec<(&'static str, &reqwest::Url)> {
        match self {
            CredentialSettings::OAuth(o) => {
                vec![("token_url", &o.token_url), ("jwks_url", &o.jwks_url)]
            }
            CredentialSettings::Header(_) => Vec::new(),
        }
    }

    /// The secret this credential holds (the OAuth client secret, or the static value): what the
    /// local token endpoint's signing keys are derived from.
    pub fn secret(&self) -> &Secret {
        match self {
            CredentialSettings::OAuth(o) => &o.client_secret,
            CredentialSettings::Header(h) => &h.value,
        }
    }
}

/// An OAuth client-credentials credential.
#[derive(Debug, Clone, PartialEq)]
pub struct OAuthSettings {
    /// The OAuth client id.
    pub client_id: String,
    /// The OAuth client secret, from `client_secret` or the content of `client_secret_file`.
    pub client_secret: Secret,
    /// The file the secret was read from (re-read on reload), if any.
    pub client_secret_file: Option<PathBuf>,
    /// The token endpoint (default `https://auth.sitecorecloud.io/oauth/token`).
    pub token_url: reqwest::Url,
    /// The audience requested and required in tokens (default `https://api.sitecorecloud.io`).
    pub audience: String,
    /// How the token request body is encoded.
    pub request_format: RequestFormat,
    /// How the client authenticates to the token endpoint.
    pub auth_method: AuthMethod,
    /// Extra fields sent to the token endpoint.
    pub extra_params: BTreeMap<String, String>,
    /// The `iss` tokens must carry (default: `scheme://authority/` of `token_url`).
    pub issuer: String,
    /// Where the signing keys are fetched (default: `issuer` + `.well-known/jwks.json`).
    pub jwks_url: reqwest::Url,
    /// Accepted signature algorithms (default `[RS256]`; never `none` or HMAC).
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Clock-skew tolerance when checking `exp` and `nbf` (default 60 s).
    pub leeway: Duration,
    /// Share of a token's lifetime after which it is refreshed, in (0, 1) (default 0.8).
    pub refresh_at: f64,
}

/// The body encoding of a token request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestFormat {
    /// `application/x-www-form-urlencoded` (the default).
    #[default]
    Form,
    /// `application/json`.
    Json,
}

/// How a client authenticates to the token endpoint (RFC 6749 section 2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// `client_id` and `client_secret` in the request body (the default; what Sitecore's
    /// endpoint documents).
    #[default]
    ClientSecretPost,
    /// HTTP Basic with the form-encoded id and secret; neither is sent in the body.
    ClientSecretBasic,
}

/// A static credential injected as a header.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderSettings {
    /// The header to set (never hop-by-hop or `Host`).
    pub header: http::HeaderName,
    /// The header's value; valid as an HTTP header value.
    pub value: Secret,
    /// The file the value was read from (re-read on reload), if any.
    pub value_file: Option<PathBuf>,
}

/// One route (`[[routes]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSettings {
    /// The path prefix, matched on whole segments: `/` or `/a/b`, never with a trailing `/`.
    pub prefix: String,
    /// The upstream base: scheme, authority and path (no trailing `/` except the root).
    pub upstream: http::Uri,
    /// The name of the credential injected on this route.
    pub credential: String,
    /// Overrides `server.request_timeout` for this route.
    pub timeout: Option<Duration>,
    /// `rate`, `burst`, `max_in_flight` (all clients together) and `honor_upstream_retry_after`.
    pub limits: RouteLimitSettings,
}

/// One inbound client (`[[clients]]`).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// The client's name (its `client_id` at the local token endpoint; shown in logs and metrics).
    pub name: String,
    /// SHA-256 of the client's key.
    pub key_sha256: [u8; 32],
    /// Route prefixes this client may use; `None` means all routes.
    pub routes: Option<Vec<String>>,
    /// `rate`, `burst` and `max_in_flight` of this client.
    pub limits: ClientLimitSettings,
}

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSettings")
            .field("name", &self.name)
            .field("key_sha256", &hex::encode(self.key_sha256))
            .field("routes", &self.routes)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Config {
    /// Reads and validates the file; relative file paths inside it (`tls_cert`, `tls_key`,
    /// `client_ca`, `upstream_ca`, `*_file`) resolve against the config file's directory.
    /// `${NAME}` references are read from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let whole_file = |message: String| ConfigError {
            path: path.to_path_buf(),
            problems: vec![Problem {
                key: String::new(),
                message,
            }],
        };
        let bytes = std::fs::read(path)
            .map_err(|e| whole_file(format!("cannot read the configuration file: {e}")))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| whole_file(format!("the file is not UTF-8 text: {e}")))?;
        Config::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Same as [`Config::load`] from text, with an injectable environment lookup (tests must not
    /// mutate the process environment). Files named in the text are still read from disk.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let base_dir = path.parent().unwrap_or_else(|| Path::new(""));
        let mut problems = Problems::default();
        let config = build(text, path, base_dir, env, &mut problems);
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => {
                if problems.is_empty() {
                    // Every converter records why it gave up; this is a guard, not a path.
                    problems.push("", "the configuration could not be read (internal error)");
                }
                Err(ConfigError {
                    path: path.to_path_buf(),
                    problems: problems.into_vec(),
                })
            }
        }
    }

    /// Whether `/readyz` requires every credential in use to hold a valid token now
    /// (`[admin] ready_requires = "all_tokens"`).
    pub fn ready_requires_all_tokens(&self) -> bool {
        self.admin
            .as_ref()
            .is_some_and(|a| a.ready_requires == ReadyRequires::AllTokens)
    }

    /// Names of credentials referenced by at least one route, sorted, deduplicated.
    pub fn used_credentials(&self) -> Vec<&str> {
        let used: BTreeSet<&str> = self.routes.iter().map(|r| r.credential.as_str()).collect();
        used.into_iter().collect()
    }
}

/// The top-level keys of the file.
const SECTIONS: [&str; 7] = [
    "server",
    "admin",
    "credentials",
    "routes",
    "clients",
    "telemetry",
    "cluster",
];

fn build(
    text: &str,
    path: &Path,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<Config> {
    let mut root = match toml::from_str::<toml::Table>(text) {
        Ok(root) => root,
        Err(e) => {
            problems.push("", syntax_message(text, &e));
            return None;
        }
    };
    env::substitute(&mut root, env, problems);
    for key in root.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            problems.push(
                key_join("", key),
                "unknown section; the file has [server], [admin], [credentials.NAME], [[routes]], \
                 [[clients]], [telemetry] and [cluster]",
            );
        }
    }

    let routes = table_array(root.get("routes"), "routes", problems);
    let clients = table_array(root.get("clients"), "clients", problems);
    let credential_items = named_tables(root.get("credentials"), "credentials", problems);

    let mut cx = Cx {
        base_dir,
        problems,
        env,
    };
    let server = server::server(root.get("server"), !clients.is_empty(), &mut cx);
    let admin = server::admin(root.get("admin"), &server, &mut cx);

    let mut credentials = BTreeMap::new();
    for (name, value) in &credential_items {
        if let Some(settings) = credentials::credential(name, value, &mut cx) {
            credentials.insert(name.clone(), settings);
        }
    }
    let credential_names: Vec<&str> = credential_items.iter().map(|(n, _)| n.as_str()).collect();
    let routes = routes::routes(&routes, &credential_names, &mut cx);
    let clients = routes::clients(&clients, &routes.prefixes, &mut cx);
    let telemetry = telemetry::telemetry(root.get("telemetry"), &mut cx);
    let cluster = cluster::cluster(root.get("cluster"), &mut cx);

    Some(Config {
        path: path.to_path_buf(),
        server,
        admin,
        credentials,
        routes: routes.settings,
        clients,
        telemetry,
        cluster,
    })
}

/// A TOML syntax error as one line, with its line and column.
fn syntax_message(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!("TOML syntax error at line {line}, column {column}: {message}")
        }
        None => format!("TOML syntax error: {message}"),
    }
}

/// `[[NAME]]` items: an array of tables (absent means none).
fn table_array<'a>(
    value: Option<&'a toml::Value>,
    key: &str,
    problems: &mut Problems,
) -> Vec<(String, &'a toml::Value)> {
    let Some(value) = value else {
        return Vec::new();
    };
    let Some(items) = value.as_array() else {
        problems.push(
            key,
            format!("must be an array of tables, written as [[{key}]] sections"),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let item_key = format!("{key}[{i}]");
        if item.is_table() {
            out.push((item_key, item));
        } else {
            problems.push(
                item_key,
                format!("must be a table, written as a [[{key}]] section"),
            );
        }
    }
    out
}

/// `[NAME.ITEM]` items: a table of tables, by name (absent means none).
fn named_tables<'a>(
    value: Option<&'a toml::Value>,
    key: &str,
    problems: &mut Problems,
) -> Vec<(String, &'a toml::Value)> {
    let Some(value) = value else {
        return Vec::new();
    };
    let Some(table) = value.as_table() else {
        problems.push(
            key,
            format!("must be a table of named sections, written as [{key}.NAME]"),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, item) in table {
        if item.is_table() {
            out.push((name.clone(), item));
        } else {
            problems.push(
                key_join(key, name),
                format!("must be a table, written as a [{key}.{name}] section"),
            );
        }
    }
    out
}
