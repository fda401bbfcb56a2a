//! The connection to Redis or Valkey: every operation is bounded by `[cluster] timeout`, and its
//! outcome moves one health flag (`cluster_up`, the status page, one log line per change).

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisResult, Script};
use rustls_pki_types::CertificateDer;

use crate::config::ClusterSettings;
use crate::metrics::ClusterMetrics;

/// Why a Redis operation did not complete. Never holds the URL or its password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No answer within `timeout` (Redis frozen, slow or far).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connection refused, reset or TLS failure.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The password (or user) was refused.
    #[error("authentication failed")]
    Auth,
    /// Another error, such as an answer of the wrong type.
    #[error("{0}")]
    Other(String),
}

impl From<RedisError> for StoreError {
    fn from(e: RedisError) -> Self {
        if e.is_timeout() {
            return StoreError::Unreachable("connection timed out".to_owned());
        }
        if e.kind() == redis::ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
        {
            return StoreError::Auth;
        }
        if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
            return StoreError::Unreachable(e.to_string());
        }
        StoreError::Other(e.to_string())
    }
}

/// Redis as the fleet sees it.
pub struct Store {
    conn: ConnectionManager,
    timeout: Duration,
    health: Health,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// Up or down, with the last problem; each change is logged once.
struct Health {
    state: AtomicU8,
    last_error: Mutex<Option<String>>,
    shown_url: String,
    /// `cluster_up`.
    up: Gauge,
    /// `cluster_sync_errors_total`.
    errors: Counter,
}

impl Store {
    /// A lazily connecting client for `settings` (no I/O here: a replica starts whether or not
    /// Redis answers). `rediss://` trusts the system roots plus `extra_roots`.
    pub fn new(
        settings: &ClusterSettings,
        extra_roots: &[CertificateDer<'static>],
        metrics: &ClusterMetrics,
    ) -> Result<Store, String> {
        let url = settings.redis_url.expose().trim();
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| format!("[cluster] redis_url: {}", StoreError::from(e)))?
            // A peer that vanishes without a reset (a rescheduled pod's old address) is noticed
            // by the kernel, and the connection is rebuilt, within seconds rather than the
            // quarter of an hour TCP retransmission takes by default.
            .set_tcp_settings(
                redis::io::tcp::TcpSettings::default()
                    .set_nodelay(true)
                    .set_keepalive(
                        socket2::TcpKeepalive::new()
                            .with_time(Duration::from_secs(5))
                            .with_interval(Duration::from_secs(2))
                            .with_retries(3),
                    )
                    .set_user_timeout(Duration::from_secs(10)),
            );
        let client = if url.starts_with("rediss:") && !extra_roots.is_empty() {
            let mut pem = system_roots_pem();
            for cert in extra_roots {
                pem.push_str(&pem_certificate(cert));
            }
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.into_bytes()),
                },
            )
        } else {
            redis::Client::open(info)
        }
        .map_err(|e| format!("[cluster] redis_url: {}", StoreError::from(e)))?;
        let config = ConnectionManagerConfig::new()
            // A connection may take longer than one operation's budget (TLS across a network);
            // operations give up at `timeout` while the connection attempt carries on.
            .set_connection_timeout(Some(settings.timeout.max(Duration::from_secs(2))))
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("[cluster] redis_url: {}", StoreError::from(e)))?;
        metrics.up.set(0);
        Ok(Store {
            conn,
            timeout: settings.timeout,
            health: Health {
                state: AtomicU8::new(UNKNOWN),
                last_error: Mutex::new(None),
                shown_url: settings.shown_url.clone(),
                up: metrics.up.clone(),
                errors: metrics.sync_errors.clone(),
            },
        })
    }

    /// One command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(cmd.query_async(&mut conn)).await
    }

    /// Several commands in one round trip.
    pub async fn pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(pipe.query_async(&mut conn)).await
    }

    /// A Lua script (EVALSHA, loading it when Redis does not know it yet).
    pub async fn script<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        let mut conn = self.conn.clone();
        self.bounded(invocation.invoke_async(&mut conn)).await
    }

    /// Whether the last operation succeeded.
    pub fn is_up(&self) -> bool {
        self.health.state.load(Ordering::Acquire) == UP
    }

    /// The last failure, while down.
    pub fn last_error(&self) -> Option<String> {
        self.health.last_error.lock().ok().and_then(|e| e.clone())
    }

    async fn bounded<T>(
        &self,
        operation: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let outcome = match tokio::time::timeout(self.timeout, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError::from(e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        match &outcome {
            Ok(_) => self.health.up(),
            Err(e) => self.health.down(e),
        }
        outcome
    }
}

impl Health {
    fn up(&self) {
        let before = self.state.swap(UP, Ordering::AcqRel);
        if before == UP {
            return;
        }
        self.up.set(1);
        if let Ok(mut last) = self.last_error.lock() {
            *last = None;
        }
        if before == UNKNOWN {
            tracing::info!(redis = %self.shown_url, "cluster: Redis answers; sharing state with the fleet");
        } else {
            tracing::warn!(redis = %self.shown_url, "cluster: Redis answers again; the fleet converges");
        }
    }

    fn down(&self, error: &StoreError) {
        self.errors.inc();
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error.to_string());
        }
        if self.state.swap(DOWN, Ordering::AcqRel) != DOWN {
            self.up.set(0);
            tracing::warn!(
                redis = %self.shown_url,
                %error,
                "cluster: Redis is unavailable; each replica keeps its own tokens and enforces \
                 each rate divided by the replicas it last saw"
            );
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("redis", &self.health.shown_url)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

/// The system's trust roots as PEM: a custom root list replaces the client's default roots, so
/// `upstream_ca` is added to these rather than used alone.
fn system_roots_pem() -> String {
    let found = rustls_native_certs::load_native_certs();
    found.certs.iter().map(pem_certificate).collect()
}

fn pem_certificate(cert: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}
