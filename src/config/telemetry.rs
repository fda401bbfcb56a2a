//! `[telemetry]`: where OpenTelemetry traces go (OTLP/HTTP), under which service name, and which
//! share of new traces is kept. Absent, or without `otlp_endpoint`: no tracing at all.

use super::raw::RawTelemetry;
use super::{Cx, TelemetrySettings};

const DEFAULT_SERVICE_NAME: &str = "sitecore-auth-proxy";

/// `[telemetry]`; `None` when absent or when it names no `otlp_endpoint`. Every key is checked
/// either way, so a typo in a section that is switched off is still reported.
pub(super) fn telemetry(value: Option<&toml::Value>, cx: &mut Cx) -> Option<TelemetrySettings> {
    let value = value?;
    let raw: RawTelemetry = cx.section(Some(value), "telemetry", "[telemetry]");
    let traces_url = raw
        .otlp_endpoint
        .as_deref()
        .and_then(|text| match traces_url(text) {
            Ok(url) => Some(url),
            Err(message) => {
                cx.problem("telemetry.otlp_endpoint", message);
                None
            }
        });
    let service_name = match raw.service_name {
        None => DEFAULT_SERVICE_NAME.to_owned(),
        Some(name) if !name.trim().is_empty() && !name.chars().any(char::is_control) => name,
        Some(_) => {
            cx.problem(
                "telemetry.service_name",
                "must be a non-empty name without control characters (default \
                 \"sitecore-auth-proxy\")",
            );
            DEFAULT_SERVICE_NAME.to_owned()
        }
    };
    let sample_ratio = match raw.sample_ratio {
        None => 1.0,
        Some(ratio) if (0.0..=1.0).contains(&ratio) => ratio,
        Some(ratio) => {
            cx.problem(
                "telemetry.sample_ratio",
                format!(
                    "{ratio} is not a share of traces; write a number from 0.0 (none) to 1.0 \
                     (all, the default)"
                ),
            );
            1.0
        }
    };
    Some(TelemetrySettings {
        traces_url: traces_url?,
        service_name,
        sample_ratio,
    })
}

/// `<endpoint>/v1/traces` (OTLP/HTTP's path for spans) from the base URL in the file.
fn traces_url(text: &str) -> Result<reqwest::Url, String> {
    const EXAMPLE: &str = "http://otel-collector:4318";
    let url = reqwest::Url::parse(text.trim())
        .map_err(|e| format!("\"{text}\" is not a valid URL ({e}); write e.g. \"{EXAMPLE}\""))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "\"{text}\" has scheme {}://; the OTLP/HTTP endpoint is http:// or https://, e.g. \
             \"{EXAMPLE}\"",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("\"{text}\" has no host; write e.g. \"{EXAMPLE}\""));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "the URL contains a user name or password; remove it (a collector's credentials go \
             in the OTEL_EXPORTER_OTLP_HEADERS environment variable)"
                .to_owned(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "\"{text}\" has a ?query or #fragment; the endpoint is a base URL, spans go to \
             <endpoint>/v1/traces"
        ));
    }
    let base = url.as_str().trim_end_matches('/');
    reqwest::Url::parse(&format!("{base}/v1/traces"))
        .map_err(|e| format!("\"{text}\" cannot take the path /v1/traces ({e})"))
}
