//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/status` (JSON, or HTML for
//! browsers). Separate from the proxy listener so no route can shadow it, and it keeps answering
//! during the drain. Nothing here ever shows a secret or a token.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::Shared;
use crate::body::ProxyBody;
use crate::error::json_response;
use crate::metrics::CredentialLabels;

/// Serves the admin endpoints until `stop` turns true.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let service = service_fn(move |req| {
            let shared = Arc::clone(&shared);
            async move { Ok::<_, Infallible>(handle(&shared, req)) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

/// Answers one admin request.
pub fn handle(shared: &Shared, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "The admin endpoints answer GET only.",
        );
    }
    let mut response = match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if verbose(req.uri().query()) => {
            let (status, body) = readiness_verbose(shared);
            with_type(status, body.to_string(), "application/json")
        }
        "/readyz" => match shared.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reasons) => {
                let body = json!({ "ready": false, "reasons": reasons }).to_string();
                with_type(StatusCode::SERVICE_UNAVAILABLE, body, "application/json")
            }
        },
        "/metrics" => with_type(
            StatusCode::OK,
            metrics_text(shared),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/status" => {
            let html = req
                .headers()
                .get(ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("text/html"));
            let status = status_json(shared);
            if html {
                with_type(
                    StatusCode::OK,
                    status_html(&status),
                    "text/html; charset=utf-8",
                )
            } else {
                with_type(StatusCode::OK, status.to_string(), "application/json")
            }
        }
        _ => json_response(StatusCode::NOT_FOUND, "no_route", "Unknown admin endpoint."),
    };
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Whether the query asks for the verbose answer (`?verbose`, `?verbose=1`, `?verbose=true`).
fn verbose(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|p| matches!(p, "verbose" | "verbose=1" | "verbose=true"))
    })
}

/// `/readyz?verbose`: the verdict, its reasons, and every credential in use with whether it is
/// up now and has been since it was built, so a degraded credential shows without failing
/// readiness.
fn readiness_verbose(shared: &Shared) -> (StatusCode, serde_json::Value) {
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

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    with_type(status, body.to_owned(), "text/plain; charset=utf-8")
}

fn with_type(status: StatusCode, body: String, content_type: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Sets the gauges that are read off the credentials (seconds left, up) and encodes every metric.
fn metrics_text(shared: &Shared) -> String {
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

/// The status document: credentials' token health, routes, clients. No secrets by construction:
/// only names, URLs, times and error codes are read.
pub fn status_json(shared: &Shared) -> serde_json::Value {
    let runtime = shared.runtime.load();
    let config = &runtime.config;
    let now = SystemTime::now();
    // Every configured credential: those no route uses have no runtime state to show.
    let credentials: Vec<_> = config
        .credentials
        .iter()
        .map(|(name, settings)| match runtime.credential(name) {
            Some(credential) => credential.describe(now),
            None => json!({ "name": name, "type": settings.kind(), "in_use": false }),
        })
        .collect();
    let routes: Vec<_> = runtime
        .routes
        .routes()
        .iter()
        .map(|r| {
            json!({
                "prefix": r.prefix,
                "upstream": format!(
                    "{}://{}{}",
                    r.target.scheme(),
                    r.target.authority(),
                    r.base_path
                ),
                "credential": r.credential,
                "credential_up": runtime.credential(&r.credential).is_some_and(|c| c.is_up()),
                "timeout_seconds": r.timeout.as_secs(),
                "limits": r.limits.as_ref().map(|l| l.describe()),
            })
        })
        .collect();
    let clients: Vec<_> = config
        .clients
        .iter()
        .map(|c| {
            let limits = runtime.limits.client(&c.name).map(|l| l.describe());
            json!({ "name": c.name, "routes": c.routes, "limits": limits })
        })
        .collect();
    json!({
        "service": "sitecore-auth-proxy",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": now.duration_since(shared.started_at).unwrap_or_default().as_secs(),
        "ready": shared.readiness().is_ok(),
        "shutting_down": shared.shutting_down.load(Ordering::Acquire),
        "listen": config.server.listen.to_string(),
        "tls": config.server.tls.is_some(),
        "inflight_requests": shared.metrics.inflight.get(),
        "open_connections_by_worker": shared.open_connections(),
        "credentials": credentials,
        "routes": routes,
        "clients": clients,
    })
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "–".to_owned(),
        serde_json::Value::String(s) => escape(s),
        other => escape(&other.to_string()),
    }
}

/// A small self-contained HTML page of the same document.
/// The columns of a client's or route's limits.
const LIMIT_HEADINGS: &str =
    "<th>rate (burst)</th><th>in flight (max)</th><th>admitted/s</th><th>refused/s</th>";

fn limit_cells(limits: &serde_json::Value) -> String {
    format!(
        "<td>{} ({})</td><td>{} ({})</td><td>{}</td><td>{}</td>",
        cell(&limits["rate"]),
        cell(&limits["burst"]),
        cell(&limits["in_flight"]),
        cell(&limits["max_in_flight"]),
        cell(&limits["admitted_per_second"]),
        cell(&limits["refused_per_second"]),
    )
}

fn status_html(status: &serde_json::Value) -> String {
    let mut html = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>sitecore-auth-proxy status</title><style>\
         body{font:14px system-ui,sans-serif;margin:2em;color:#222}\
         table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}\
         th{background:#f3f3f3}.ok{color:#0a0}.bad{color:#c00}</style></head><body>",
    );
    let ready = status["ready"].as_bool().unwrap_or(false);
    let _ = write!(
        html,
        "<h1>sitecore-auth-proxy {}</h1><p>Status: <b class=\"{}\">{}</b> · listening on {} · up {} s · {} requests in flight · open connections per worker: {}</p>",
        cell(&status["version"]),
        if ready { "ok" } else { "bad" },
        if ready { "ready" } else { "not ready" },
        cell(&status["listen"]),
        cell(&status["uptime_seconds"]),
        cell(&status["inflight_requests"]),
        cell(&status["open_connections_by_worker"]),
    );
    html.push_str("<h2>Credentials</h2><table><tr><th>name</th><th>type</th><th>token</th><th>expires in (s)</th><th>valid until</th><th>last refresh</th><th>failures</th><th>last error</th></tr>");
    for c in status["credentials"].as_array().into_iter().flatten() {
        let valid = c["token_valid"].as_bool();
        let token = match valid {
            Some(true) => "<span class=\"ok\">valid</span>",
            Some(false) => "<span class=\"bad\">none</span>",
            None => "–",
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{token}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            cell(&c["name"]),
            cell(&c["type"]),
            cell(&c["expires_in_seconds"]),
            cell(&c["valid_until"]),
            cell(&c["last_refresh"]),
            cell(&c["consecutive_failures"]),
            cell(&c["last_error"]),
        );
    }
    html.push_str("</table><h2>Routes</h2><table><tr><th>prefix</th><th>upstream</th><th>credential</th><th>timeout (s)</th>");
    html.push_str(LIMIT_HEADINGS);
    html.push_str("<th>upstream pause</th></tr>");
    for r in status["routes"].as_array().into_iter().flatten() {
        let limits = &r["limits"];
        let pause = match &limits["paused"] {
            serde_json::Value::Null => "–".to_owned(),
            p => format!(
                "<span class=\"bad\">{} for {} s</span>",
                cell(&p["status"]),
                cell(&p["remaining_seconds"])
            ),
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{}<td>{pause}</td></tr>",
            cell(&r["prefix"]),
            cell(&r["upstream"]),
            cell(&r["credential"]),
            cell(&r["timeout_seconds"]),
            limit_cells(limits),
        );
    }
    html.push_str("</table><h2>Clients</h2><table><tr><th>name</th><th>routes</th>");
    html.push_str(LIMIT_HEADINGS);
    html.push_str("</tr>");
    for c in status["clients"].as_array().into_iter().flatten() {
        let routes = match &c["routes"] {
            serde_json::Value::Null => "all".to_owned(),
            v => cell(v),
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{routes}</td>{}</tr>",
            cell(&c["name"]),
            limit_cells(&c["limits"]),
        );
    }
    html.push_str("</table></body></html>\n");
    html
}
