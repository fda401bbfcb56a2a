//! The token side of the load comparison (`benches/load/run.sh`): the built-in Sitecore emulator
//! with a chosen token lifetime, plus a tiny counter endpoint so a script can read how many token
//! requests the proxy made.
//!
//! ```text
//! cargo run --release --example bench_emulator -- [LIFETIME_S] [TOKEN_DELAY_MS]
//! ```
//!
//! `LIFETIME_S` defaults to 86400 (Sitecore's one day); `TOKEN_DELAY_MS` (default 0) delays every
//! token response, which widens the cold-start window of the cold-start probe. On start it prints
//! one JSON line on stdout:
//! `{"token_url":..,"issuer":..,"jwks_url":..,"counters":"http://127.0.0.1:<port>/counters"}`.
//! `GET /counters` answers `{"token_requests":N,"token_requests_ok":N,"jwks_requests":N}`.
//! The process runs until it is killed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sitecore_auth_proxy::emulator::{Emulator, TokenFault};
use tokio::net::TcpListener;

fn counters(emulator: &Emulator) -> String {
    format!(
        r#"{{"token_requests":{},"token_requests_ok":{},"jwks_requests":{}}}"#,
        emulator.token_requests(),
        emulator.token_requests_ok(),
        emulator.jwks_requests()
    )
}

async fn serve_counters(listener: TcpListener, emulator: Arc<Emulator>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let emulator = Arc::clone(&emulator);
        let service = service_fn(move |_req: Request<Incoming>| {
            let mut response = Response::new(Full::new(Bytes::from(counters(&emulator))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
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

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let lifetime_s: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(86_400);
    let delay_ms: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let emulator = Emulator::builder()
            .token_lifetime(Duration::from_secs(lifetime_s))
            .log_limit(1_000)
            .start()
            .await?;
        if delay_ms > 0 {
            emulator.set_token_fault(Some(TokenFault::Delay(Duration::from_millis(delay_ms))));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        println!(
            r#"{{"token_url":"{}","issuer":"{}","jwks_url":"{}","counters":"http://{}/counters"}}"#,
            emulator.token_url(),
            emulator.issuer(),
            emulator.jwks_url(),
            listener.local_addr()?
        );
        serve_counters(listener, Arc::new(emulator)).await;
        Ok(())
    })
}
