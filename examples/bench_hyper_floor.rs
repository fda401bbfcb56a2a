//! The floor of the load comparison (`benches/load/run.sh`): a bare forwarder on the proxy's own
//! stack and thread model, doing nothing but the job. Like sitecore-auth-proxy it runs one
//! single-threaded tokio runtime per core, each accepting on the shared listening socket and
//! keeping its own pool of HTTP/1.1 upstream connections, and serves clients with hyper's HTTP/1.1
//! and HTTP/2 servers and the upstream with hyper's HTTP/1.1 client. Like the nginx contender it
//! rewrites `/deploy` to the upstream's `/base` and sets a static `Authorization` header.
//!
//! Its TLS listener takes the proxy's settings (`sitecore_auth_proxy::tls`), so a TLS row
//! compares the same handshakes. It has none of the proxy's own work: no route table, path check
//! or header hygiene (beyond dropping the client's `Connection` header, as nginx does), no token
//! cache, no access log, metrics, request ids, limits or timeouts. So its CPU time per request is
//! what hyper and tokio cost for this job on this machine, and the proxy's excess over it is the
//! proxy's own. It is a measuring stick, not a proxy to deploy.
//!
//! ```text
//! cargo run --release --example bench_hyper_floor -- UPSTREAM_ADDR BEARER_TOKEN [THREADS] \
//!     [--upstream-tls CA_PEM SERVER_NAME] [--tls CERT KEY]
//! ```
//!
//! `THREADS` defaults to the number of cores. It prints `listening <h1 addr> <h2 addr>` on stdout
//! (HTTP/1.1 on the first, HTTP/2 prior knowledge on the second) and runs until it is killed.
//!
//! `--upstream-tls` reaches the upstream over HTTPS (HTTP/1.1 by ALPN), trusting the PEM roots in
//! `CA_PEM` and checking the certificate for `SERVER_NAME`, with rustls's default session cache,
//! so a new pooled connection resumes the session, as the proxy's pool does. `--tls` serves
//! clients over HTTPS with the PEM chain `CERT` and key `KEY` on both addresses, HTTP/2 or
//! HTTP/1.1 by ALPN, with rustls's default server session cache (as the proxy's listener).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sitecore_auth_proxy::tls;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What every request of one worker thread shares.
struct Worker {
    upstream: SocketAddr,
    authorization: HeaderValue,
    host: HeaderValue,
    /// TLS to the upstream, and the name its certificate must carry.
    upstream_tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Idle upstream connections (uncontended: one thread uses it).
    idle: Mutex<Vec<SendRequest<Incoming>>>,
}

impl Worker {
    /// An idle connection ready for a request, or a new one.
    async fn checkout(&self) -> Result<SendRequest<Incoming>, Error> {
        loop {
            let popped = self.idle.lock().map_err(|_| "pool lock poisoned")?.pop();
            let Some(mut sender) = popped else { break };
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        let stream = TcpStream::connect(self.upstream).await?;
        stream.set_nodelay(true)?;
        if let Some((connector, name)) = &self.upstream_tls {
            let stream = connector.connect(name.clone(), stream).await?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            return Ok(sender);
        }
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    fn checkin(&self, sender: SendRequest<Incoming>) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(sender);
        }
    }

    async fn forward(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Returning>, Error> {
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let rest = path.strip_prefix("/deploy").unwrap_or(path);
        parts.uri = Uri::try_from(format!("/base{rest}"))?;
        parts.version = http::Version::HTTP_11;
        // As nginx's `proxy_set_header Connection ""`: a client's `Connection: close` ends its
        // own connection, not the pooled upstream one.
        parts.headers.remove(header::CONNECTION);
        parts.headers.insert(header::HOST, self.host.clone());
        parts
            .headers
            .insert(header::AUTHORIZATION, self.authorization.clone());
        let mut sender = self.checkout().await?;
        let response = sender
            .send_request(Request::from_parts(parts, body))
            .await?;
        let (parts, body) = response.into_parts();
        let body = Returning {
            inner: body,
            sender: Some(sender),
            worker: self,
        };
        Ok(Response::from_parts(parts, body))
    }
}

/// The upstream response body; gives its connection back to the pool when it has ended.
struct Returning {
    inner: Incoming,
    sender: Option<SendRequest<Incoming>>,
    worker: Arc<Worker>,
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if this.inner.is_end_stream() {
            if let Some(sender) = this.sender.take() {
                this.worker.checkin(sender);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn handle(
    worker: Arc<Worker>,
    req: Request<Incoming>,
) -> Result<Response<http_body_util::Either<Returning, String>>, Infallible> {
    Ok(match worker.forward(req).await {
        Ok(response) => response.map(http_body_util::Either::Left),
        Err(e) => {
            let mut response = Response::new(http_body_util::Either::Right(e.to_string()));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        }
    })
}

/// One worker thread's accept loops (HTTP/1.1 and HTTP/2; with `tls`, both by ALPN).
async fn serve(
    h1: std::net::TcpListener,
    h2: std::net::TcpListener,
    worker: Arc<Worker>,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<()> {
    let h1 = TcpListener::from_std(h1)?;
    let h2 = TcpListener::from_std(h2)?;
    loop {
        let (accepted, http2) = tokio::select! {
            a = h1.accept() => (a, false),
            a = h2.accept() => (a, true),
        };
        let Ok((stream, _)) = accepted else { continue };
        let _ = stream.set_nodelay(true);
        let worker = Arc::clone(&worker);
        match &tls {
            None => serve_connection(stream, http2, worker),
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    serve_connection(stream, http2, worker);
                });
            }
        }
    }
}

/// Serves one client connection on its own task.
fn serve_connection<I>(io: I, http2: bool, worker: Arc<Worker>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let service = service_fn(move |req| handle(Arc::clone(&worker), req));
    let io = TokioIo::new(io);
    if http2 {
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(256)
            .serve_connection(io, service);
        tokio::spawn(connection);
    } else {
        let connection = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(io, service);
        tokio::spawn(connection);
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The client side of `--upstream-tls`: `ca` trusted, HTTP/1.1 by ALPN.
fn upstream_tls(ca: &str, name: &str) -> Result<(TlsConnector, ServerName<'static>), Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(name.to_owned())?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

/// The server side of `--tls`: the proxy's listener settings (HTTP/2 and HTTP/1.1 by ALPN, its
/// suite order, stateless session tickets).
fn server_tls(cert: &str, key: &str) -> Result<TlsAcceptor, Error> {
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(tls::listener_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls::tune_listener(&mut config)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn main() -> Result<(), Error> {
    let usage = "usage: bench_hyper_floor UPSTREAM_ADDR BEARER_TOKEN [THREADS] \
                 [--upstream-tls CA_PEM SERVER_NAME] [--tls CERT KEY]";
    let mut positional = Vec::new();
    let mut upstream_tls_files = None;
    let mut tls_files = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--upstream-tls" => {
                let ca = args.next().ok_or(usage)?;
                let name = args.next().ok_or(usage)?;
                upstream_tls_files = Some((ca, name));
            }
            "--tls" => {
                let cert = args.next().ok_or(usage)?;
                let key = args.next().ok_or(usage)?;
                tls_files = Some((cert, key));
            }
            _ => positional.push(arg),
        }
    }
    let mut positional = positional.into_iter();
    let upstream: SocketAddr = positional.next().ok_or(usage)?.parse()?;
    let token = positional.next().ok_or(usage)?;
    let threads = match positional.next() {
        Some(t) => t.parse()?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let upstream_tls = match &upstream_tls_files {
        Some((ca, name)) => Some(upstream_tls(ca, name)?),
        None => None,
    };
    let tls = match &tls_files {
        Some((cert, key)) => Some(server_tls(cert, key)?),
        None => None,
    };
    let authorization = HeaderValue::try_from(format!("Bearer {token}"))?;
    let host = HeaderValue::try_from(upstream.to_string())?;
    let h1 = std::net::TcpListener::bind("127.0.0.1:0")?;
    let h2 = std::net::TcpListener::bind("127.0.0.1:0")?;
    h1.set_nonblocking(true)?;
    h2.set_nonblocking(true)?;
    println!("listening {} {}", h1.local_addr()?, h2.local_addr()?);
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let (h1, h2) = (h1.try_clone()?, h2.try_clone()?);
        let worker = Arc::new(Worker {
            upstream,
            authorization: authorization.clone(),
            host: host.clone(),
            upstream_tls: upstream_tls.clone(),
            idle: Mutex::new(Vec::new()),
        });
        let tls = tls.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(std::thread::spawn(move || {
            runtime.block_on(serve(h1, h2, worker, tls))
        }));
    }
    for handle in handles {
        handle.join().map_err(|_| "a worker thread panicked")??;
    }
    Ok(())
}
