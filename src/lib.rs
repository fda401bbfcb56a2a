//! sitecore-auth-proxy: an authenticating reverse proxy for Sitecore's cloud APIs.
//!
//! The binary (`main.rs`) is a thin CLI over [`app::start`]; tests and benchmarks use the same
//! entry point. Module map: `config` (proxy.toml -> validated types), `runtime` (what requests
//! use), `pipeline` (the request phases, one file each, and the pipeline as the server's
//! handler), `credential` (the kinds of credential behind one type), `routes`, `upstream`
//! (connection pools, targets, trust roots, header hygiene), `egress` (the HTTP proxy on the way
//! out), `token` (OAuth cache, fetch, verify), `limits` (rate limits, in-flight caps, upstream
//! pauses), `server` (listener, workers, connections, drain; generic over the handler),
//! `telemetry` (OpenTelemetry traces), `error` (JSON errors), `emulator` (the built-in Sitecore
//! emulator).

pub mod admin;
pub mod app;
pub mod body;
pub mod check;
pub mod cluster;
pub mod config;
pub mod credential;
#[cfg(feature = "emulator")]
pub mod demo;
pub mod egress;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod error;
pub mod inbound;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod routes;
pub mod runtime;
pub mod secret;
pub mod server;
pub mod shared;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod upstream;

/// Makes aws-lc-rs the process-wide provider for rustls and jsonwebtoken. Idempotent.
pub fn install_crypto_providers() {
    // An `Err` means a provider is installed already, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}
