//! The fast upstream of the load comparison (`benches/load/run.sh`): answers every request with
//! 200 and a small fixed body, over HTTP/1.1 keep-alive and HTTP/2 prior knowledge (h2c). It reads
//! and discards request bodies (so streamed uploads flow through) and verifies nothing, so every
//! contender is measured against the same, cheap server.
//!
//! ```text
//! cargo run --release --example bench_upstream -- [ADDR] [THREADS]
//! ```
//!
//! `ADDR` defaults to `127.0.0.1:0`, `THREADS` (tokio worker threads) to 1. The bound address is
//! printed on stdout as `listening <addr>`; the process runs until it is killed.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The fixed response body (a small JSON document, like a short API answer).
const BODY: &[u8] = br#"{"ok":true,"service":"bench-upstream"}"#;

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Drain the request body frame by frame: nothing is kept, uploads of any size stream.
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

async fn serve(listener: TcpListener) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true);
    builder.http2().max_concurrent_streams(1024);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = builder
            .serve_connection(TokioIo::new(stream), service_fn(handle))
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let threads: usize = args
        .next()
        .map(|t| t.parse().unwrap_or(1))
        .unwrap_or(1)
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        println!("listening {}", listener.local_addr()?);
        serve(listener).await;
        Ok(())
    })
}
