//! TLS termination: the rustls server configuration built from `[server]` TLS settings.
//!
//! It lives in the `Runtime`, so a reload that re-reads the certificate files swaps it for new
//! connections while established ones keep theirs.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::config::TlsSettings;

/// Builds the server configuration: client certificates required when `client_ca` is set,
/// and the rest of [`tune_listener`].
pub fn server_config(settings: &TlsSettings) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = listener_provider();
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = if settings.client_ca.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for cert in &settings.client_ca {
            roots.add(cert.clone())?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| rustls::Error::General(format!("client_ca: {e}")))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config =
        builder.with_single_cert(settings.cert_chain.clone(), settings.key.clone_key())?;
    tune_listener(&mut config)?;
    Ok(Arc::new(config))
}

/// aws-lc-rs with TLS_AES_128_GCM_SHA256 first (the other suites in rustls's order). Every
/// TLS 1.3 client has that suite, and its handshake hashes with SHA-256, which current x86
/// CPUs compute in hardware, where the SHA-384 of OpenSSL's first choice is done in software:
/// a resumed handshake costs 17 % less CPU (BENCHMARKS.md).
pub fn listener_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// What a listener's configuration gets besides its certificates (the benchmarks' floor uses
/// it too): HTTP/2 and HTTP/1.1 by ALPN, the provider's suite order over the client's, and
/// stateless session tickets.
pub fn tune_listener(config: &mut rustls::ServerConfig) -> Result<(), rustls::Error> {
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    // Tickets sealed with keys rotated every 6 hours, the previous kept, so a ticket is accepted
    // for up to 12: a gateway's clients resume however many they are, where rustls's default
    // cache holds 256 sessions and a 257th client's reconnection evicts the oldest. A resumed
    // session carries its first handshake's verdict on the client certificate, and so do the
    // tickets each resumption hands out: a client that keeps reconnecting is not verified again
    // while the keys live. They belong to this configuration, so a reload (made to change
    // `client_ca`, say) verifies every client again.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(())
}
