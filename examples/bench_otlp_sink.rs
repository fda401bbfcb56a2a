//! The trace collector of the load comparison's tracing rows (`benches/load/run.sh --scenarios
//! tracing`): takes OTLP/HTTP protobuf exports (`POST /v1/traces`), counts the spans in them and
//! answers 200 with an empty `ExportTraceServiceResponse`. It keeps nothing else, so the proxy's
//! exporter never waits on it for long. Its CPU time is its own process's, not the proxy's.
//!
//! ```text
//! cargo run --release --example bench_otlp_sink -- [ADDR]
//! ```
//!
//! `ADDR` defaults to `127.0.0.1:0`. It prints `listening <addr>` on stdout and runs until it is
//! killed. `GET /counters` answers `{"exports":N,"spans":N,"bytes":N,"bad":N}` since start:
//! export requests taken, spans in them, their body bytes, and bodies that did not decode.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use tokio::net::TcpListener;

#[derive(Default)]
struct Counters {
    exports: AtomicU64,
    spans: AtomicU64,
    bytes: AtomicU64,
    bad: AtomicU64,
}

async fn handle(
    counters: Arc<Counters>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() == Method::GET && req.uri().path() == "/counters" {
        let json = format!(
            r#"{{"exports":{},"spans":{},"bytes":{},"bad":{}}}"#,
            counters.exports.load(Ordering::Relaxed),
            counters.spans.load(Ordering::Relaxed),
            counters.bytes.load(Ordering::Relaxed),
            counters.bad.load(Ordering::Relaxed),
        );
        return Ok(Response::new(Full::new(Bytes::from(json))));
    }
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    counters.exports.fetch_add(1, Ordering::Relaxed);
    counters
        .bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    match ExportTraceServiceRequest::decode(body) {
        Ok(export) => {
            let spans: usize = export
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            counters.spans.fetch_add(spans as u64, Ordering::Relaxed);
        }
        Err(_) => {
            counters.bad.fetch_add(1, Ordering::Relaxed);
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(response);
        }
    }
    // An empty ExportTraceServiceResponse encodes as no bytes.
    let mut response = Response::new(Full::new(Bytes::new()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-protobuf"),
    );
    Ok(response)
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        println!("listening {}", listener.local_addr()?);
        let counters = Arc::new(Counters::default());
        let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counters = Arc::clone(&counters);
            let builder = Arc::clone(&builder);
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(Arc::clone(&counters), req));
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
