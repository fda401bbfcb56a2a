//! `${NAME}` references in string values, replaced from the environment before any section is
//! deserialized, so every string key (including inside `extra_params` and arrays) accepts them.
//!
//! `$$` is a literal `$`; any other `$` is kept as it is. Values read from the environment are
//! not scanned again.

use super::{key_join, Problems};

/// Deeper nesting than this is never a valid proxy.toml; stopping keeps the walk's stack small.
const MAX_DEPTH: usize = 32;

/// Replaces references in every string of `root`, recording a problem per bad string.
pub(super) fn substitute(
    root: &mut toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) {
    for (key, value) in root.iter_mut() {
        walk(value, &key_join("", key), env, problems, 0);
    }
}

fn walk(
    value: &mut toml::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
    depth: usize,
) {
    if depth > MAX_DEPTH {
        problems.push(key, "is nested too deeply");
        return;
    }
    match value {
        toml::Value::String(text) => match expand(text, env) {
            Ok(expanded) => *text = expanded,
            Err(message) => problems.push(key, message),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                walk(item, &format!("{key}[{i}]"), env, problems, depth + 1);
            }
        }
        toml::Value::Table(table) => {
            for (child, item) in table.iter_mut() {
                walk(item, &key_join(key, child), env, problems, depth + 1);
            }
        }
        // No key of proxy.toml takes a date; saying so here beats serde's "invalid type: map".
        toml::Value::Datetime(_) => problems.push(
            key,
            "a date/time is not valid here; quote the value if it is meant as text",
        ),
        toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {}
    }
}

/// `text` with `${NAME}` replaced and `$$` turned into `$`.
pub(super) fn expand(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !text.contains('$') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut unset: Vec<&str> = Vec::new();
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('{') {
            let Some(end) = reference.find('}') else {
                return Err(
                    "unterminated \"${\" (write ${NAME} for an environment variable, or \
                            $$ for a literal $)"
                        .to_owned(),
                );
            };
            let name = &reference[..end];
            if !is_variable_name(name) {
                // The text is not quoted back: it may be part of a secret that lacks its `$$`.
                return Err(
                    "contains a \"${...}\" that is not a valid environment variable reference; \
                     names are letters, digits and '_', not starting with a digit (write $$ for a \
                     literal $)"
                        .to_owned(),
                );
            }
            match env(name) {
                Some(value) => out.push_str(&value),
                None if !unset.contains(&name) => unset.push(name),
                None => {}
            }
            rest = &reference[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    match unset.as_slice() {
        [] => Ok(out),
        [name] => Err(format!(
            "environment variable {name} is not set (set it, or write $$ for a literal $)"
        )),
        names => Err(format!(
            "environment variables {} are not set",
            names.join(", ")
        )),
    }
}

fn is_variable_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
