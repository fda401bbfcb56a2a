//! `/metrics`: the Prometheus exposition, with the gauges that are read off the credentials at
//! scrape time.

use std::sync::Arc;
use std::time::SystemTime;

use crate::metrics::CredentialLabels;
use crate::shared::Shared;

/// Sets the gauges that are read off the credentials (seconds left, up) and encodes every metric.
pub(super) fn metrics_text(shared: &Shared) -> String {
    let metrics = &shared.metrics;
    let now = SystemTime::now();
    for credential in shared.runtime.load().credentials.values() {
        let labels = CredentialLabels {
            credential: Arc::from(credential.name()),
        };
        if let Some(left) = credential.expires_in(now) {
            metrics
                .token_expiry
                .get_or_create(&labels)
                .set(left.as_secs_f64());
        }
        metrics
            .credential_up
            .get_or_create(&labels)
            .set(i64::from(credential.is_up()));
    }
    metrics.encode()
}
