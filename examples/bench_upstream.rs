//! The fast upstream of the load comparison (`benches/load/run.sh`): answers every request with
//! 200 and a small fixed body, over HTTP/1.1 keep-alive and HTTP/2 prior knowledge (h2c), or,
//! with `--tls`, over HTTPS with HTTP/1.1 and HTTP/2 by ALPN. It reads and discards request
//! bodies (so streamed uploads flow through) and verifies nothing, so every contender is measured
//! against the same, cheap server.
//!
//! ```text
//! cargo run --release --example bench_upstream -- [ADDR] [THREADS] [--tls CERT KEY] [--alpn LIST]
//! ```
//!
//! `ADDR` defaults to `127.0.0.1:0`, `THREADS` (tokio worker threads) to 1. `--tls` serves HTTPS
//! with the PEM certificate chain `CERT` and key `KEY`; `--alpn` is what it offers by ALPN
//! (default `h2,http/1.1`; `http/1.1` makes every client speak HTTP/1.1).
//!
//! It prints `listening <addr> <counters addr>` on stdout and runs until it is killed. A `GET` to
//! the counters address (plain HTTP) answers how the contenders used it:
//! `{"connections":N,"tls_full":N,"tls_resumed":N,"tls12":N,"requests":N}`, counted since
//! start. A contender that keeps its upstream connections and resumes TLS sessions opens few
//! connections and few full handshakes, whatever the number of requests. `tls12` counts the
//! TLS connections on TLS 1.2 (whose resumption skips the key exchange TLS 1.3's does): the
//! comparison is fair only when it stays 0.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::HandshakeKind;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The fixed response body (a small JSON document, like a short API answer).
const BODY: &[u8] = br#"{"ok":true,"service":"bench-upstream"}"#;

/// How the contenders used this upstream.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    tls_full: AtomicU64,
    tls_resumed: AtomicU64,
    tls12: AtomicU64,
    requests: AtomicU64,
}

impl Counters {
    fn json(&self) -> String {
        format!(
            r#"{{"connections":{},"tls_full":{},"tls_resumed":{},"tls12":{},"requests":{}}}"#,
            self.connections.load(Ordering::Relaxed),
            self.tls_full.load(Ordering::Relaxed),
            self.tls_resumed.load(Ordering::Relaxed),
            self.tls12.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }
}

async fn handle(
    counters: Arc<Counters>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    counters.requests.fetch_add(1, Ordering::Relaxed);
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

async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, counters: Arc<Counters>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true);
    builder.http2().max_concurrent_streams(1024);
    let builder = Arc::new(builder);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let counters = Arc::clone(&counters);
        let builder = Arc::clone(&builder);
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = {
                let counters = Arc::clone(&counters);
                service_fn(move |req| handle(Arc::clone(&counters), req))
            };
            match tls {
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let session = stream.get_ref().1;
                    if session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_2) {
                        counters.tls12.fetch_add(1, Ordering::Relaxed);
                    }
                    let kind = session.handshake_kind();
                    let counter = if kind == Some(HandshakeKind::Resumed) {
                        &counters.tls_resumed
                    } else {
                        &counters.tls_full
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    // The auto builder reads the connection preface, so it serves whatever
                    // ALPN picked.
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

/// Answers every request on `listener` with the counters.
async fn serve_counters(listener: TcpListener, counters: Arc<Counters>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let counters = Arc::clone(&counters);
        let service = service_fn(move |_req: Request<Incoming>| {
            let response = Response::new(Full::new(Bytes::from(counters.json())));
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
}

fn tls_acceptor(cert: &str, key: &str, alpn: &str) -> Result<TlsAcceptor, Error> {
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = alpn.split(',').map(|p| p.as_bytes().to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn main() -> Result<(), Error> {
    let mut positional = Vec::new();
    let mut tls_files = None;
    let mut alpn = String::from("h2,http/1.1");
    let mut args = std::env::args().skip(1);
    let usage = "usage: bench_upstream [ADDR] [THREADS] [--tls CERT KEY] [--alpn LIST]";
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--tls" => {
                let cert = args.next().ok_or(usage)?;
                let key = args.next().ok_or(usage)?;
                tls_files = Some((cert, key));
            }
            "--alpn" => alpn = args.next().ok_or(usage)?,
            _ => positional.push(arg),
        }
    }
    let addr: SocketAddr = positional
        .first()
        .map_or("127.0.0.1:0", String::as_str)
        .parse()?;
    let threads: usize = positional
        .get(1)
        .map_or(Ok(1), |t| t.parse())
        .unwrap_or(1)
        .max(1);
    let tls = match &tls_files {
        Some((cert, key)) => Some(tls_acceptor(cert, key, &alpn)?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        let counters_listener = TcpListener::bind("127.0.0.1:0").await?;
        println!(
            "listening {} {}",
            listener.local_addr()?,
            counters_listener.local_addr()?
        );
        let counters = Arc::new(Counters::default());
        tokio::spawn(serve_counters(counters_listener, Arc::clone(&counters)));
        serve(listener, tls, counters).await;
        Ok(())
    })
}
