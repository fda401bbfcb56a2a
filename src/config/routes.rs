//! `[[routes]]` and `[[clients]]`: prefixes and upstreams, the credential each route names, and
//! the inbound clients with their key hashes and allowed routes.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::limits::{max_in_flight, rate_settings};
use super::raw::{deserialize_item, RawClient, RawRoute};
use super::values::{check_prefix, parse_upstream};
use super::{key_join, ClientLimitSettings, ClientSettings, Cx, RouteLimitSettings, RouteSettings};

/// The converted routes, and every prefix written in the file (valid or not), so that a client
/// naming a route with another problem is not reported twice.
pub(super) struct Routes {
    pub settings: Vec<RouteSettings>,
    pub prefixes: Vec<String>,
}

/// Every `[[routes]]` item, keyed `routes[i]`.
pub(super) fn routes(
    items: &[(String, &toml::Value)],
    credential_names: &[&str],
    cx: &mut Cx,
) -> Routes {
    let mut settings = Vec::new();
    let mut prefixes = Vec::new();
    // prefix -> key of the first route that uses it
    let mut first_use: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in items {
        let k = |field: &str| key_join(key, field);
        let raw: RawRoute = deserialize_item(value, key, cx.problems);

        let prefix = match raw.prefix {
            None => {
                cx.problem(
                    k("prefix"),
                    "missing; set the path prefix, e.g. prefix = \"/deploy\"",
                );
                None
            }
            Some(prefix) => {
                if !prefixes.contains(&prefix) {
                    prefixes.push(prefix.clone());
                }
                if let Some(first) = first_use.get(&prefix) {
                    cx.problem(
                        k("prefix"),
                        format!(
                            "\"{prefix}\" is already the prefix of {first}; every route needs its \
                             own prefix"
                        ),
                    );
                    None
                } else {
                    first_use.insert(prefix.clone(), key.clone());
                    match check_prefix(&prefix) {
                        Ok(()) => Some(prefix),
                        Err(message) => {
                            cx.problem(k("prefix"), message);
                            None
                        }
                    }
                }
            }
        };

        let upstream = match raw.upstream.as_deref() {
            None => {
                cx.problem(
                    k("upstream"),
                    "missing; set the upstream base URL, e.g. upstream = \
                     \"https://xmclouddeploy-api.sitecorecloud.io\"",
                );
                None
            }
            Some(text) => parse_upstream(text)
                .map_err(|message| cx.problem(k("upstream"), message))
                .ok(),
        };

        let credential = match raw.credential {
            None => {
                cx.problem(
                    k("credential"),
                    format!(
                        "missing; name the credential to inject ({})",
                        defined(credential_names)
                    ),
                );
                None
            }
            Some(name) if credential_names.contains(&name.as_str()) => Some(name),
            Some(name) => {
                cx.problem(
                    k("credential"),
                    format!(
                        "no credential named \"{name}\"; {}",
                        defined(credential_names)
                    ),
                );
                None
            }
        };

        // A bad timeout is recorded and leaves None, which the problem makes moot.
        let timeout = cx.checked_duration(&k("timeout"), raw.timeout.as_deref(), false);
        let limits = RouteLimitSettings {
            rate: rate_settings(key, raw.rate.as_deref(), raw.burst, cx),
            max_in_flight: max_in_flight(key, raw.max_in_flight, cx),
            honor_upstream_retry_after: raw.honor_upstream_retry_after.unwrap_or(true),
        };

        if let (Some(prefix), Some(upstream), Some(credential)) = (prefix, upstream, credential) {
            settings.push(RouteSettings {
                prefix,
                upstream,
                credential,
                timeout,
                limits,
            });
        }
    }
    Routes { settings, prefixes }
}

fn defined(names: &[&str]) -> String {
    if names.is_empty() {
        "no credentials are defined; add a [credentials.NAME] section".to_owned()
    } else {
        format!("defined: {}", names.join(", "))
    }
}

/// Every `[[clients]]` item, keyed `clients[i]`.
pub(super) fn clients(
    items: &[(String, &toml::Value)],
    prefixes: &[String],
    cx: &mut Cx,
) -> Vec<ClientSettings> {
    let mut out = Vec::new();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut hashes: BTreeMap<[u8; 32], String> = BTreeMap::new();
    for (key, value) in items {
        let k = |field: &str| key_join(key, field);
        let raw: RawClient = deserialize_item(value, key, cx.problems);

        let name = match raw.name {
            None => {
                cx.problem(
                    k("name"),
                    "missing; set name = \"ci-pipeline\" (shown in logs and metrics)",
                );
                None
            }
            Some(name) if name.is_empty() => {
                cx.problem(k("name"), "is empty; give the client a name");
                None
            }
            Some(name) => match names.get(&name) {
                Some(first) => {
                    cx.problem(
                        k("name"),
                        format!("\"{name}\" is already the name of {first}; names must be unique"),
                    );
                    None
                }
                None => {
                    names.insert(name.clone(), key.clone());
                    Some(name)
                }
            },
        };

        let (hash, hash_key) = match (raw.key, raw.key_sha256) {
            (Some(_), Some(_)) => {
                cx.problem(k("key"), "set key or key_sha256, not both");
                (None, k("key"))
            }
            (None, None) => {
                cx.problem(
                    k("key_sha256"),
                    "missing; set key_sha256 = \"<64 hex characters>\" (from `sitecore-auth-proxy \
                     hash-key`) or key = \"${CLIENT_KEY}\"",
                );
                (None, k("key_sha256"))
            }
            (Some(key_text), None) if key_text.is_empty() => {
                cx.problem(
                    k("key"),
                    "is empty; if it comes from ${NAME}, that variable is empty",
                );
                (None, k("key"))
            }
            (Some(key_text), None) => (Some(Sha256::digest(key_text.as_bytes()).into()), k("key")),
            (None, Some(hex_text)) => {
                let mut hash = [0u8; 32];
                match hex::decode_to_slice(hex_text.trim(), &mut hash) {
                    Ok(()) => (Some(hash), k("key_sha256")),
                    Err(_) => {
                        cx.problem(
                            k("key_sha256"),
                            "must be 64 hex characters, the SHA-256 of the key (`sitecore-auth-proxy \
                             hash-key` prints it)",
                        );
                        (None, k("key_sha256"))
                    }
                }
            }
        };
        let hash = hash.and_then(|hash: [u8; 32]| match hashes.get(&hash) {
            Some(first) => {
                cx.problem(
                    hash_key,
                    format!("{first} has the same key; every client needs its own key"),
                );
                None
            }
            None => {
                hashes.insert(hash, key.clone());
                Some(hash)
            }
        });

        if let Some(routes) = &raw.routes {
            for (i, prefix) in routes.iter().enumerate() {
                if !prefixes.contains(prefix) {
                    let known = if prefixes.is_empty() {
                        "no routes are defined".to_owned()
                    } else {
                        format!("route prefixes: {}", prefixes.join(", "))
                    };
                    cx.problem(
                        format!("{}[{i}]", k("routes")),
                        format!("no route has the prefix \"{prefix}\"; {known}"),
                    );
                }
            }
        }

        let limits = ClientLimitSettings {
            rate: rate_settings(key, raw.rate.as_deref(), raw.burst, cx),
            max_in_flight: max_in_flight(key, raw.max_in_flight, cx),
        };

        if let (Some(name), Some(key_sha256)) = (name, hash) {
            out.push(ClientSettings {
                name,
                key_sha256,
                routes: raw.routes,
                limits,
            });
        }
    }
    out
}
