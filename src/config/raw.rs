//! The serde shapes of `proxy.toml`, one per section, and [`deserialize_item`], which reports
//! every unknown key and mistyped value of one section rather than only the first.
//!
//! Every field is optional here: whether a key is required, and what its default is, is decided
//! by the section converters, which can then say so at the right key.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_path_to_error::Segment;

use super::{key_join, AuthMethod, Problems, ReadyRequires, RequestFormat};

/// `[server]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub listen: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub client_ca: Option<String>,
    pub allow_anonymous: Option<bool>,
    pub token_endpoint: Option<String>,
    pub request_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub max_connections: Option<i64>,
    pub replay_body_limit: Option<String>,
    pub shutdown_grace: Option<String>,
    pub forwarded_headers: Option<bool>,
    pub rewrite_location: Option<bool>,
    pub upstream_ca: Option<Vec<String>>,
    pub egress_proxy: Option<String>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub listen: Option<String>,
    pub ready_requires: Option<ReadyRequires>,
}

/// `[telemetry]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
}

/// `[credentials.NAME]` with `type = "oauth"` (the `type` key is taken out before this).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth {
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<String>,
    pub token_url: Option<String>,
    pub audience: Option<String>,
    pub request_format: Option<RequestFormat>,
    pub auth_method: Option<AuthMethod>,
    pub extra_params: Option<BTreeMap<String, String>>,
    pub issuer: Option<String>,
    pub jwks_url: Option<String>,
    pub algorithms: Option<Vec<String>>,
    pub leeway: Option<String>,
    pub refresh_at: Option<f64>,
}

/// `[credentials.NAME]` with `type = "header"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHeader {
    pub header: Option<String>,
    pub value: Option<String>,
    pub value_file: Option<String>,
}

/// `[[routes]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub prefix: Option<String>,
    pub upstream: Option<String>,
    pub credential: Option<String>,
    pub timeout: Option<String>,
    pub rate: Option<String>,
    pub burst: Option<i64>,
    pub max_in_flight: Option<i64>,
    pub honor_upstream_retry_after: Option<bool>,
}

/// `[[clients]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub name: Option<String>,
    pub key: Option<String>,
    pub key_sha256: Option<String>,
    pub routes: Option<Vec<String>>,
    pub rate: Option<String>,
    pub burst: Option<i64>,
    pub max_in_flight: Option<i64>,
}

/// Upper bound on retries; each retry removes one key, so a section never needs more than its
/// number of keys.
const MAX_ATTEMPTS: usize = 64;

/// Deserializes one section found at `key`, recording each serde error as a problem at its key
/// path. After an error the offending key is removed and the section deserialized again, so
/// a section with three mistakes reports three problems; the result then lacks those keys, which
/// is harmless because the problems already make the whole file fail.
pub(super) fn deserialize_item<T: DeserializeOwned + Default>(
    value: &toml::Value,
    key: &str,
    problems: &mut Problems,
) -> T {
    let mut value = value.clone();
    for _ in 0..MAX_ATTEMPTS {
        let error = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(item) => return item,
            Err(error) => error,
        };
        let segments: Vec<&Segment> = error.path().iter().collect();
        problems.push(
            segments_key(key, &segments),
            error.inner().message().trim().to_owned(),
        );
        if !remove_at(&mut value, &segments) {
            break;
        }
    }
    T::default()
}

/// `parent` followed by the serde path, as `a.b[2].c`.
fn segments_key(parent: &str, segments: &[&Segment]) -> String {
    let mut key = parent.to_owned();
    for segment in segments {
        match segment {
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Map { key: child } => key = key_join(&key, child),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    key
}

/// Removes the table entry deepest along `segments` (a bad array element removes the whole
/// array, so later indices keep their meaning). False when nothing could be removed.
fn remove_at(root: &mut toml::Value, segments: &[&Segment]) -> bool {
    let map_positions = segments
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s, Segment::Map { .. }))
        .map(|(i, _)| i)
        .rev();
    for position in map_positions {
        let Segment::Map { key } = segments[position] else {
            continue;
        };
        if let Some(table) = navigate(root, &segments[..position]).and_then(|v| v.as_table_mut()) {
            if table.remove(key).is_some() {
                return true;
            }
        }
    }
    false
}

fn navigate<'v>(value: &'v mut toml::Value, segments: &[&Segment]) -> Option<&'v mut toml::Value> {
    let mut current = value;
    for segment in segments {
        current = match segment {
            Segment::Map { key } => current.as_table_mut()?.get_mut(key.as_str())?,
            Segment::Seq { index } => current.as_array_mut()?.get_mut(*index)?,
            Segment::Enum { .. } | Segment::Unknown => return None,
        };
    }
    Some(current)
}

/// `[cluster]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub redis_url: Option<String>,
    pub redis_url_file: Option<String>,
    pub key_prefix: Option<String>,
    pub share_tokens: Option<bool>,
    pub sync_interval: Option<String>,
    pub timeout: Option<String>,
}
