//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/status` (JSON, or the live status
//! page for browsers). Separate from the proxy listener so no route can shadow it, and it keeps
//! answering during the drain. Nothing here ever shows a secret or a token.
//!
//! Files: this one serves and routes; `readiness` (`/readyz?verbose`), `metrics_text`
//! (`/metrics`), `status` (the `/status` document), `page` (the status page, whose HTML, CSS and
//! JavaScript are in `status_page.html`).

mod metrics_text;
mod page;
mod readiness;
mod status;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::ProxyBody;
use crate::error::json_response;
use crate::shared::Shared;

pub use status::status_json;

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
            let (status, body) = readiness::verbose(shared);
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
            metrics_text::metrics_text(shared),
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
                    page::status_page(&status),
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
