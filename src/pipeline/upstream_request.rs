//! Phase 6, `upstream_request`: the request as the upstream gets it. The prefix is replaced by
//! the upstream's base path, hop-by-hop headers and the client's own credentials are removed,
//! `Host` is the upstream's, the credential is set. A body up to `replay_body_limit` is read
//! ahead: checked whole (bad chunking or a short body is refused before anything is sent) and
//! kept for a replay after a 401. A larger one streams, watched so that its end starts the wait
//! for the upstream's answer.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Uri};
use http_body::Body;
use hyper::body::Incoming;

use super::ConnInfo;
use crate::body::{read_ahead, BodyError, PeerBody, ProxyBody, ReadAhead, UploadWatch};
use crate::credential::Injection;
use crate::error::ProxyError;
use crate::routes::Route;
use crate::runtime::Runtime;
use crate::upstream::{strip_hop_by_hop, strip_inbound_credentials};

/// The request to send, and what sending it again would take.
pub(super) struct Prepared {
    pub(super) request: Request<ProxyBody>,
    /// The request again, when its body fit the replay buffer and the credential can replay.
    pub(super) replay: Option<Replay>,
    /// The progress of a streamed body (see [`UploadWatch`]).
    pub(super) upload: Option<Arc<UploadWatch>>,
}

/// A copy of a request whose body is held whole, to send once more after a 401.
pub(super) struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Replay {
    /// The request again, with `injection` instead of the credential that was refused.
    pub(super) fn into_request(self, injection: &Injection) -> Request<ProxyBody> {
        let mut headers = self.headers;
        injection.apply(&mut headers);
        build(self.method, self.uri, headers, ProxyBody::full(self.body))
    }
}

/// Builds the upstream request from the client's.
// Not an `async fn`: its arguments would be stored twice in every request's future.
#[allow(clippy::manual_async_fn)]
pub(super) fn upstream_request<'a>(
    rt: &'a Runtime,
    route: &'a Route,
    injection: &'a Injection,
    may_replay: bool,
    req: Request<Incoming>,
    conn: &'a ConnInfo,
) -> impl Future<Output = Result<Prepared, ProxyError>> + 'a {
    async move {
        let (parts, body) = req.into_parts();
        let uri = route
            .upstream_uri(&parts.uri)
            .ok_or(ProxyError::BadRequest("The request target is malformed."))?;
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        strip_inbound_credentials(&mut headers);
        let original_host = headers.insert(header::HOST, route.host_header.clone());
        if rt.forwarded_headers {
            // HTTP/2 carries the host in :authority.
            let host = original_host.or_else(|| {
                let authority = parts.uri.authority()?;
                HeaderValue::from_str(authority.as_str()).ok()
            });
            add_forwarded_headers(&mut headers, conn, host);
        }
        injection.apply(&mut headers);

        let (kept, body, upload) = match declared_len(&headers, &body) {
            Some(len) if len > rt.replay_body_limit => {
                let (body, watch) = PeerBody::new(body, route.timeout).watched();
                (None, ProxyBody::Streamed(body), Some(watch))
            }
            _ if body.is_end_stream() => (Some(Bytes::new()), ProxyBody::Empty, None),
            _ => match read_ahead(PeerBody::new(body, route.timeout), rt.replay_body_limit).await {
                Ok(ReadAhead::Complete(bytes)) => {
                    (Some(bytes.clone()), ProxyBody::full(bytes), None)
                }
                Ok(ReadAhead::Partial { head, rest }) => {
                    let (rest, watch) = rest.watched();
                    (None, ProxyBody::Prefixed { head, rest }, Some(watch))
                }
                Err(BodyError::Idle(_)) => {
                    return Err(ProxyError::RequestBodyStalled(route.timeout))
                }
                Err(BodyError::Peer(_)) => {
                    return Err(ProxyError::BadRequest(
                        "The request body is malformed or incomplete.",
                    ))
                }
            },
        };
        let replay = kept.filter(|_| may_replay).map(|body| Replay {
            method: parts.method.clone(),
            uri: uri.clone(),
            headers: headers.clone(),
            body,
        });
        Ok(Prepared {
            request: build(parts.method, uri, headers, body),
            replay,
            upload,
        })
    }
}

/// The body length the request declares (HTTP/1.1 `Content-Length`, or HTTP/2's exact hint).
fn declared_len(headers: &HeaderMap, body: &Incoming) -> Option<u64> {
    body.size_hint().exact().or_else(|| {
        headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    })
}

fn build(method: Method, uri: Uri, headers: HeaderMap, body: ProxyBody) -> Request<ProxyBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    request
}

fn add_forwarded_headers(headers: &mut HeaderMap, conn: &ConnInfo, host: Option<HeaderValue>) {
    let ip = conn.peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::try_from(xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if let Some(host) = host {
        headers.insert("x-forwarded-host", host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn conn(tls: bool) -> ConnInfo {
        ConnInfo {
            peer: SocketAddr::from(([192, 0, 2, 7], 5000)),
            tls,
            activity: Arc::new(crate::server::ConnActivity::new()),
        }
    }

    #[test]
    fn forwarded_headers_append_to_a_prior_chain() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        add_forwarded_headers(
            &mut headers,
            &conn(true),
            Some(HeaderValue::from_static("proxy")),
        );
        assert_eq!(headers["x-forwarded-for"], "198.51.100.1, 192.0.2.7");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "proxy");
    }

    #[test]
    fn forwarded_headers_start_a_chain() {
        let mut headers = HeaderMap::new();
        add_forwarded_headers(&mut headers, &conn(false), None);
        assert_eq!(headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert!(!headers.contains_key("x-forwarded-host"));
    }
}
