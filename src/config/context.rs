//! The parsing context: every problem of a file collected with its key path, and reported at
//! once as one [`ConfigError`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw;
use super::values::parse_duration;

/// Everything wrong with a configuration file, one [`Problem`] per key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file that was read.
    pub path: PathBuf,
    /// What is wrong, in the order found.
    pub problems: Vec<Problem>,
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The key path, like `credentials.automation.client_secret` or `routes[2].upstream`; empty
    /// for problems with the whole file.
    pub key: String,
    /// What is wrong and how to fix it; one line, never a secret.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl fmt::Display for ConfigError {
    /// One line per problem: `{path}: {key}: {message}` (`{path}: {message}` for whole-file ones).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {problem}", self.path.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// What the section converters share: where relative paths start, and the problem list.
pub(super) struct Cx<'a> {
    pub(super) base_dir: &'a Path,
    pub(super) problems: &'a mut Problems,
    /// The environment, for what the file does not say (the proxy variables).
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
}

impl Cx<'_> {
    pub(super) fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(key, message);
    }

    /// Resolves a path from the file against the config file's directory.
    pub(super) fn resolve(&mut self, key: &str, file: &str) -> Option<PathBuf> {
        if file.is_empty() {
            self.problem(key, "is empty; give the path of a file");
            return None;
        }
        Some(self.base_dir.join(file))
    }

    /// Deserializes an optional section (`[server]`, `[admin]`): absent means all defaults.
    pub(super) fn section<T: serde::de::DeserializeOwned + Default>(
        &mut self,
        value: Option<&toml::Value>,
        key: &str,
        written: &str,
    ) -> T {
        match value {
            None => T::default(),
            Some(value) if value.is_table() => raw::deserialize_item(value, key, self.problems),
            Some(_) => {
                self.problem(
                    key,
                    format!("must be a table, written as a {written} section"),
                );
                T::default()
            }
        }
    }

    /// A duration key that may be zero; `default` when absent or bad.
    pub(super) fn duration(
        &mut self,
        key: &str,
        text: Option<&str>,
        default: Duration,
    ) -> Duration {
        self.checked_duration(key, text, true).unwrap_or(default)
    }

    /// A timeout key, which must be more than zero; `default` when absent or bad.
    pub(super) fn timeout(&mut self, key: &str, text: Option<&str>, default: Duration) -> Duration {
        self.checked_duration(key, text, false).unwrap_or(default)
    }

    /// `None` when absent or bad (the problem is recorded).
    pub(super) fn checked_duration(
        &mut self,
        key: &str,
        text: Option<&str>,
        zero_ok: bool,
    ) -> Option<Duration> {
        let text = text?;
        match parse_duration(text) {
            Ok(d) if d.is_zero() && !zero_ok => {
                self.problem(key, format!("\"{text}\" is zero; write e.g. \"30s\""));
                None
            }
            Ok(d) if d > MAX_DURATION => {
                self.problem(
                    key,
                    format!(
                        "\"{text}\" is longer than a year; write e.g. \"30s\", \"5m\" or \"1h\""
                    ),
                );
                None
            }
            Ok(d) => Some(d),
            Err(message) => {
                self.problem(key, message);
                None
            }
        }
    }
}

/// Longer durations are typos, and would overflow `Instant` arithmetic downstream.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// The problems found so far, at most one per key (the first is usually the cause of the rest).
#[derive(Debug, Default)]
pub(super) struct Problems {
    pub(super) list: Vec<Problem>,
}

impl Problems {
    pub(super) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        if self.has(&key) {
            return;
        }
        // Display promises one line per problem.
        let message = message.into().replace(['\r', '\n'], " ");
        self.list.push(Problem { key, message });
    }

    pub(super) fn has(&self, key: &str) -> bool {
        self.list.iter().any(|p| p.key == key)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(super) fn into_vec(self) -> Vec<Problem> {
        self.list
    }
}

/// `parent.child`, quoting `child` when it is not a bare TOML key.
pub(super) fn key_join(parent: &str, child: &str) -> String {
    let bare = !child.is_empty()
        && child
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let child = if bare {
        child.to_owned()
    } else {
        format!("{child:?}")
    };
    if parent.is_empty() {
        child
    } else {
        format!("{parent}.{child}")
    }
}
