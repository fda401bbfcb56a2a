//! `/readyz?verbose`: the verdict, its reasons, and every credential in use with whether it is
//! up now and has been since it was built, so a degraded credential shows without failing
//! readiness.

use http::StatusCode;
use serde_json::json;

use crate::shared::Shared;

/// The status code and JSON body of `/readyz?verbose`.
pub(super) fn verbose(shared: &Shared) -> (StatusCode, serde_json::Value) {
    let runtime = shared.runtime.load();
    let credentials: Vec<_> = runtime
        .credentials_by_name()
        .into_iter()
        .map(|c| {
            json!({
                "name": c.name(),
                "up": c.is_up(),
                "has_been_up": c.has_been_up(),
                "reason": c.down_reason(),
            })
        })
        .collect();
    let requires = if runtime.config.ready_requires_all_tokens() {
        "all_tokens"
    } else {
        "first_tokens"
    };
    let (status, reasons) = match shared.readiness() {
        Ok(()) => (StatusCode::OK, Vec::new()),
        Err(reasons) => (StatusCode::SERVICE_UNAVAILABLE, reasons),
    };
    let body = json!({
        "ready": status == StatusCode::OK,
        "ready_requires": requires,
        "reasons": reasons,
        "credentials": credentials,
    });
    (status, body)
}
