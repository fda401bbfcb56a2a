//! `[cluster]`: the Redis or Valkey that replicas share state through. Absent: everything stays
//! in-process and nothing connects anywhere.

use std::time::Duration;

use super::credentials::secret_or_file;
use super::raw::RawCluster;
use super::{ClusterSettings, Cx};

const DEFAULT_KEY_PREFIX: &str = "sitecore-auth-proxy:";
const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(100);
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// Reconciling more often than this costs Redis round trips and buys no accuracy.
const MIN_SYNC_INTERVAL: Duration = Duration::from_millis(10);
/// Beyond this a fleet's limits drift for too long between reconciliations.
const MAX_SYNC_INTERVAL: Duration = Duration::from_secs(60);
/// `timeout` bounds what a refresher or the sync task waits, never a request; beyond this a
/// frozen Redis would hold a token refresh too long.
const MAX_TIMEOUT: Duration = Duration::from_secs(10);

/// `[cluster]`, `None` when absent. Every key is checked.
pub(super) fn cluster(value: Option<&toml::Value>, cx: &mut Cx) -> Option<ClusterSettings> {
    let value = value?;
    let raw: RawCluster = cx.section(Some(value), "cluster", "[cluster]");
    let (url, url_file) = secret_or_file(
        raw.redis_url,
        raw.redis_url_file,
        ("cluster.redis_url", "cluster.redis_url_file"),
        "redis://valkey:6379/0",
        cx,
    )?;
    let key = if url_file.is_some() {
        "cluster.redis_url_file"
    } else {
        "cluster.redis_url"
    };
    let shown_url = match shown_url(url.expose()) {
        Ok(shown) => shown,
        Err(message) => {
            cx.problem(key, message);
            return None;
        }
    };
    let key_prefix = match raw.key_prefix {
        None => DEFAULT_KEY_PREFIX.to_owned(),
        Some(prefix) if !prefix.is_empty() && !prefix.chars().any(char::is_whitespace) => prefix,
        Some(_) => {
            cx.problem(
                "cluster.key_prefix",
                "must be non-empty and without spaces (default \"sitecore-auth-proxy:\")",
            );
            return None;
        }
    };
    let sync_interval = cx.timeout(
        "cluster.sync_interval",
        raw.sync_interval.as_deref(),
        DEFAULT_SYNC_INTERVAL,
    );
    if !(MIN_SYNC_INTERVAL..=MAX_SYNC_INTERVAL).contains(&sync_interval) {
        cx.problem(
            "cluster.sync_interval",
            "must be from 10ms to 60s (default \"100ms\"): replicas reconcile rate-limit usage \
             this often",
        );
    }
    let timeout = cx.timeout("cluster.timeout", raw.timeout.as_deref(), DEFAULT_TIMEOUT);
    if timeout > MAX_TIMEOUT {
        cx.problem(
            "cluster.timeout",
            "must be at most 10s (default \"50ms\"): the longest anything waits on Redis",
        );
    }
    Some(ClusterSettings {
        redis_url: url,
        redis_url_file: url_file,
        shown_url,
        key_prefix,
        share_tokens: raw.share_tokens.unwrap_or(true),
        sync_interval,
        timeout,
    })
}

/// The URL without its password, for logs and `/status`; an error for what is not a Redis URL.
fn shown_url(text: &str) -> Result<String, String> {
    const EXAMPLE: &str = "redis://valkey:6379/0";
    // The URL may hold a password: no message repeats it.
    let url = reqwest::Url::parse(text.trim())
        .map_err(|e| format!("is not a valid URL ({e}); write e.g. \"{EXAMPLE}\""))?;
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Err(format!(
            "has scheme {}://; write redis:// or rediss:// (TLS), e.g. \"{EXAMPLE}\"",
            url.scheme()
        ));
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(format!("has no host; write e.g. \"{EXAMPLE}\""));
    };
    if url.fragment().is_some() {
        return Err(
            "has a #fragment; `#insecure` would turn off certificate verification, which the \
             proxy does not allow (trust a private CA with server.upstream_ca)"
                .to_owned(),
        );
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u32>().is_err() {
        // Not repeated: a mistyped URL may have moved part of the password into the path.
        return Err(format!(
            "has a path that is not a database number; write e.g. \"{EXAMPLE}\""
        ));
    }
    let port = url.port().unwrap_or(6379);
    let db = if db.is_empty() { "0" } else { db };
    Ok(format!("{}://{host}:{port}/{db}", url.scheme()))
}
