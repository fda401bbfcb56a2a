//! The emulated Sitecore APIs: record every request, apply a pending [`UpstreamFault`], check the
//! bearer token like the real services, drain and hash the body as it streams in, and answer a
//! JSON echo of what arrived (or the query-driven special responses: a streamed byte pattern, a
//! chosen status, a `Location`).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::http::{
    fault_status, json_response, ConnectionReset, PatternStream, ResponseBody, StalledBody,
};
use super::{lock, token, Family, SeenRequest, Shared, UpstreamFault};

/// The pattern repeats every this many bytes (a prime, so it never lines up with chunk sizes).
const PERIOD: usize = 251;
/// Requests up to this length are served as slices of a static buffer, without copying.
const STATIC_SPAN: usize = 64 * 1024;
const PATTERN_LEN: usize = PERIOD + STATIC_SPAN;
/// The default and the largest `emulator_chunk`.
const DEFAULT_CHUNK: usize = 64 * 1024;
const MAX_CHUNK: usize = 16 * 1024 * 1024;

static PATTERN: [u8; PATTERN_LEN] = build_pattern();

const fn build_pattern() -> [u8; PATTERN_LEN] {
    let mut pattern = [0u8; PATTERN_LEN];
    let mut i = 0;
    while i < PATTERN_LEN {
        pattern[i] = (i % PERIOD) as u8;
        i += 1;
    }
    pattern
}

/// `len` bytes of the deterministic pattern the emulated APIs stream for `emulator_bytes=N`,
/// starting at `offset`: byte `i` of the whole stream is `(i % 251) as u8`.
pub fn pattern_bytes(offset: u64, len: usize) -> Bytes {
    let start = (offset % PERIOD as u64) as usize;
    if len <= STATIC_SPAN {
        return Bytes::from_static(&PATTERN[start..start + len]);
    }
    let mut out = Vec::with_capacity(len);
    let mut position = start;
    while out.len() < len {
        let take = (len - out.len()).min(STATIC_SPAN);
        out.extend_from_slice(&PATTERN[position..position + take]);
        position = (position + take) % PERIOD;
    }
    Bytes::from(out)
}

/// Serves one request on an emulated API host.
pub(super) async fn handle(
    shared: &Shared,
    family: Family,
    mut request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ConnectionReset> {
    shared
        .upstream_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seen = seen_request(family, &request);
    // The check is pure, so it runs before recording (to fill `token_valid`) but is acted on
    // only after the fault: a faulted request is answered by the fault whatever its token.
    let client_id = seen
        .authorization
        .as_deref()
        .and_then(bearer_token)
        .and_then(|token| token::verify(shared, token));
    let seen = SeenRequest {
        token_valid: client_id.is_some(),
        ..seen
    };
    let echo_base = echo_fields(&seen);
    let id = shared.record_seen(seen);
    let body = request.body_mut();

    let fault = lock(&shared.upstream_faults).next();
    match fault {
        Some(UpstreamFault::Reset) => return Err(ConnectionReset),
        Some(UpstreamFault::Delay(delay)) => tokio::time::sleep(delay).await,
        Some(UpstreamFault::StallBody { sent, declared }) => {
            drain(shared, id, body).await?;
            return Ok(Response::new(ResponseBody::Stalled(StalledBody::new(
                sent, declared,
            ))));
        }
        Some(UpstreamFault::Status(code)) => {
            drain(shared, id, body).await?;
            let status = fault_status(code);
            if status == StatusCode::UNAUTHORIZED {
                return Ok(invalid_token());
            }
            return Ok(fault_response(status));
        }
        Some(UpstreamFault::StatusWithHeaders { status, headers }) => {
            drain(shared, id, body).await?;
            let mut response = fault_response(fault_status(status));
            for (name, value) in headers {
                match (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    (Ok(name), Ok(value)) => {
                        response.headers_mut().append(name, value);
                    }
                    _ => tracing::warn!(%name, "invalid emulator fault header left out"),
                }
            }
            return Ok(response);
        }
        None => {}
    }

    let Some(client_id) = client_id else {
        drain(shared, id, body).await?;
        return Ok(invalid_token());
    };
    let special = match Special::parse(echo_base.query.as_deref()) {
        Ok(special) => special,
        Err(message) => {
            drain(shared, id, body).await?;
            let body = json!({"error": "bad_emulator_parameter", "message": message});
            return Ok(json_response(StatusCode::BAD_REQUEST, &body));
        }
    };
    let (body_bytes, body_sha256) = drain(shared, id, body).await?;

    let mut response = match special.bytes {
        Some(len) => {
            let stream = PatternStream::new(len, special.chunk, special.chunk_delay);
            let mut response = Response::new(ResponseBody::Pattern(stream));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        None => {
            let mut echo = echo_base.json;
            echo["body_bytes"] = json!(body_bytes);
            echo["body_sha256"] = json!(body_sha256);
            echo["client_id"] = json!(client_id);
            json_response(StatusCode::OK, &echo)
        }
    };
    if let Some(status) = special.status {
        *response.status_mut() = status;
    }
    if let Some(location) = special.location {
        response
            .headers_mut()
            .insert(http::header::LOCATION, location);
    }
    Ok(response)
}

/// The record of a request as it arrived (body not yet read, token not yet checked).
fn seen_request(family: Family, request: &Request<Incoming>) -> SeenRequest {
    let uri = request.uri();
    let mut headers = Vec::with_capacity(request.headers().len() + 1);
    if !request.headers().contains_key(http::header::HOST) {
        if let Some(authority) = uri.authority() {
            headers.push(("host".to_owned(), authority.as_str().to_owned()));
        }
    }
    let mut authorization: Option<String> = None;
    for (name, value) in request.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        if name == http::header::AUTHORIZATION {
            authorization = Some(match authorization {
                Some(previous) => format!("{previous}, {value}"),
                None => value,
            });
        } else {
            headers.push((name.as_str().to_owned(), value));
        }
    }
    SeenRequest {
        api: family.api_for(uri.path()),
        method: request.method().as_str().to_owned(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        authorization,
        headers,
        body_bytes: 0,
        body_sha256: hex::encode(Sha256::digest([])),
        body_aborted: false,
        token_valid: false,
        version: format!("{:?}", request.version()),
    }
}

/// The token of an `Authorization: Bearer <token>` value.
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The echo body without the fields known only after the body and token checks.
struct EchoBase {
    json: serde_json::Value,
    query: Option<String>,
}

fn echo_fields(seen: &SeenRequest) -> EchoBase {
    let mut headers = serde_json::Map::new();
    for (name, value) in &seen.headers {
        match headers.get_mut(name) {
            Some(serde_json::Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(value);
            }
            _ => {
                headers.insert(name.clone(), json!(value));
            }
        }
    }
    EchoBase {
        json: json!({
            "api": seen.api.name(),
            "method": seen.method,
            "path": seen.path,
            "query": seen.query,
            "headers": headers,
            "version": seen.version,
        }),
        query: seen.query.clone(),
    }
}

/// Reads the whole body, hashing it as it arrives, and fills in the seen request.
async fn drain(
    shared: &Shared,
    id: u64,
    body: &mut Incoming,
) -> Result<(u64, String), ConnectionReset> {
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut failed = false;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            failed = true;
            break;
        };
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            hasher.update(&data);
        }
    }
    let digest = hex::encode(hasher.finalize());
    shared.finish_seen(id, total, digest.clone(), failed);
    if failed {
        // The client went away mid-body: nobody is left to answer.
        return Err(ConnectionReset);
    }
    Ok((total, digest))
}

/// The small JSON body a faulted request is answered with.
fn fault_response(status: StatusCode) -> Response<ResponseBody> {
    let body = json!({"error": "emulated_fault", "status": status.as_u16()});
    json_response(status, &body)
}

fn invalid_token() -> Response<ResponseBody> {
    let mut response = json_response(StatusCode::UNAUTHORIZED, &json!({"error": "invalid_token"}));
    response.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    response
}

/// The query-driven special responses.
struct Special {
    bytes: Option<u64>,
    chunk: usize,
    chunk_delay: Option<Duration>,
    status: Option<StatusCode>,
    location: Option<HeaderValue>,
}

impl Special {
    fn parse(query: Option<&str>) -> Result<Special, String> {
        let mut special = Special {
            bytes: None,
            chunk: DEFAULT_CHUNK,
            chunk_delay: None,
            status: None,
            location: None,
        };
        let pairs = query
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='));
        for (name, raw) in pairs {
            if !name.starts_with("emulator_") {
                continue;
            }
            let value = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{name} must be a whole number"))
            };
            match name {
                "emulator_bytes" => special.bytes = Some(number()?),
                "emulator_chunk" => {
                    let chunk = usize::try_from(number()?).unwrap_or(MAX_CHUNK);
                    special.chunk = chunk.clamp(1, MAX_CHUNK);
                }
                "emulator_chunk_delay_ms" => {
                    special.chunk_delay = Some(Duration::from_millis(number()?));
                }
                "emulator_status" => {
                    let status = u16::try_from(number()?)
                        .ok()
                        .and_then(|code| StatusCode::from_u16(code).ok())
                        .filter(|status| (200..=599).contains(&status.as_u16()))
                        .ok_or_else(|| format!("{name} must be a status from 200 to 599"))?;
                    special.status = Some(status);
                }
                "emulator_location" => {
                    let location = HeaderValue::from_str(&value)
                        .map_err(|_| format!("{name} is not a valid header value"))?;
                    special.location = Some(location);
                }
                _ => {}
            }
        }
        Ok(special)
    }
}
