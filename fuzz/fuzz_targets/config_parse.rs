//! `Config::parse` on arbitrary bytes (as lossy UTF-8): `Ok` or a `ConfigError`, never a panic.
//!
//! The environment is fixed (`SET_*` names are set, every other name is unset) and the file sits
//! in a directory that does not exist, so relative file references fail cleanly.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sitecore_auth_proxy::config::Config;

fn config_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        std::env::temp_dir()
            .join("sitecore-auth-proxy-fuzz-missing-dir")
            .join("proxy.toml")
    })
}

fn env(name: &str) -> Option<String> {
    name.starts_with("SET_").then(|| "x".to_owned())
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, config_path(), &env) {
        Ok(config) => assert_eq!(config.path, config_path()),
        Err(error) => {
            assert!(!error.problems.is_empty(), "an error names its problems");
            // Display promises one line per problem.
            for problem in &error.problems {
                assert!(
                    !problem.key.contains(['\n', '\r']) && !problem.message.contains(['\n', '\r']),
                    "multi-line problem: {problem:?}"
                );
            }
            assert_eq!(error.to_string().lines().count(), error.problems.len());
        }
    }
});
