//! A broken neighbour on 127.0.0.1:0: a [`FaultServer`] answers every request with one
//! [`Fault`], so a test can point a token URL or a route's upstream at it and watch the proxy.
//!
//! It counts the connections it accepts and the requests it reads, by method, so a test can
//! assert that a non-idempotent request reached it exactly once (or never). A request whose path
//! ends in `/warmup` is always answered `200` on a kept-alive connection: sending one first puts a
//! pooled connection in place, so the faulted request that follows travels over a reused
//! connection, where a careless client would retry.
//!
//! Included with `#[path = "support/faults.rs"] mod faults;` (not from `support/mod.rs`), so it
//! takes its TLS configurations as arguments instead of building them.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// The pause between two bytes of [`Fault::SlowDrip`].
pub const DRIP_INTERVAL: Duration = Duration::from_millis(60);
/// The longest a [`Fault::Hang`] connection is held open (the peer normally gives up first).
pub const HANG_LIMIT: Duration = Duration::from_secs(30);
/// The pause between the partial response of a reset fault and the reset itself, so that the
/// partial bytes reach the peer before the RST does.
pub const RESET_PAUSE: Duration = Duration::from_millis(100);
/// The longest a TLS handshake or a request head may take.
const READ_LIMIT: Duration = Duration::from_secs(10);
/// A request head larger than this is not a request this server understands.
const MAX_HEAD: usize = 64 * 1024;

/// The body of [`Fault::Status5xx`]: Auth0-shaped, with a description a proxy must not relay
/// as its own message.
pub const STATUS_5XX_BODY: &str =
    r#"{"error":"temporarily_unavailable","error_description":"fault-server maintenance page"}"#;
/// The body of [`Fault::TooMany`].
pub const TOO_MANY_BODY: &str =
    r#"{"error":"too_many_requests","error_description":"fault-server says slow down"}"#;
/// What [`Fault::Garbage`] sends instead of an HTTP response.
pub const GARBAGE: &[u8] = b"SSH-2.0-fault-server\r\n\x00\xff\xfe not http at all \x01\x02\r\n\r\n";
/// The body of [`Fault::GarbageBody`]: a 200 whose body is not JSON.
pub const GARBAGE_BODY: &[u8] = b"\x00\xff<html>fault-server: not the JSON you asked for</html>";
/// The response [`Fault::SlowDrip`] writes one byte at a time (about 4 s in all).
pub const DRIP_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
/// The part of a response head [`Fault::ResetMidHead`] sends before the reset.
const PARTIAL_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: appli";
/// The declared length of [`Fault::ResetMidBody`]'s body; only [`PARTIAL_BODY_LEN`] bytes come.
pub const RESET_BODY_DECLARED: usize = 4096;
/// How much of the body [`Fault::ResetMidBody`] sends before the reset.
pub const PARTIAL_BODY_LEN: usize = 512;
/// The body of a healthy answer (warm-ups, and any request that gets through a TLS fault).
pub const HEALTHY_BODY: &str = r#"{"fault_server":"healthy"}"#;

/// How the server misbehaves.
#[derive(Clone)]
pub enum Fault {
    /// Nothing listens: the port was bound, then closed.
    Refuse,
    /// Accept and read the request, never answer.
    Hang,
    /// Send part of a response head, then reset the connection (RST).
    ResetMidHead,
    /// Send a complete head declaring [`RESET_BODY_DECLARED`] bytes and [`PARTIAL_BODY_LEN`] of
    /// them, then reset the connection.
    ResetMidBody,
    /// 503 with [`STATUS_5XX_BODY`].
    Status5xx,
    /// 429 with `Retry-After: 1` and [`TOO_MANY_BODY`].
    TooMany,
    /// [`GARBAGE`]: bytes that are not HTTP, then close.
    Garbage,
    /// A well-formed 200 whose body is [`GARBAGE_BODY`].
    GarbageBody,
    /// [`DRIP_RESPONSE`], one byte every [`DRIP_INTERVAL`].
    SlowDrip,
    /// TLS with this configuration, whose certificate the client should refuse (an untrusted
    /// CA, or a trusted CA but another host name). A request that gets through anyway is
    /// counted and answered `200`, so a test sees the breach.
    Tls(Arc<rustls::ServerConfig>),
    /// Plaintext HTTP bytes written at once to whoever connects (a TLS client expecting a
    /// ServerHello), then close.
    PlaintextToTls,
}

impl Fault {
    /// Whether the server speaks HTTP (without TLS) well enough to answer a warm-up request.
    pub fn answers_warmup(&self) -> bool {
        !matches!(self, Fault::Refuse | Fault::Tls(_) | Fault::PlaintextToTls)
    }
}

impl std::fmt::Debug for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Fault::Refuse => "Refuse",
            Fault::Hang => "Hang",
            Fault::ResetMidHead => "ResetMidHead",
            Fault::ResetMidBody => "ResetMidBody",
            Fault::Status5xx => "Status5xx",
            Fault::TooMany => "TooMany",
            Fault::Garbage => "Garbage",
            Fault::GarbageBody => "GarbageBody",
            Fault::SlowDrip => "SlowDrip",
            Fault::Tls(_) => "Tls",
            Fault::PlaintextToTls => "PlaintextToTls",
        };
        f.write_str(name)
    }
}

/// What the server saw.
#[derive(Debug, Default)]
struct Counts {
    connections: AtomicU64,
    warmups: AtomicU64,
    /// Faulted (non-warm-up) requests by method.
    by_method: Mutex<HashMap<String, u64>>,
}

/// A misbehaving HTTP server on 127.0.0.1. Dropping it stops the listener and every connection.
pub struct FaultServer {
    addr: SocketAddr,
    counts: Arc<Counts>,
    task: Option<JoinHandle<()>>,
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl FaultServer {
    /// Binds 127.0.0.1:0 and serves `fault` on every connection.
    pub async fn start(fault: Fault) -> FaultServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let counts = Arc::new(Counts::default());
        if matches!(fault, Fault::Refuse) {
            // The port was ours a moment ago; now nothing listens there.
            drop(listener);
            return FaultServer {
                addr,
                counts,
                task: None,
            };
        }
        let task = tokio::spawn(accept_loop(listener, fault, Arc::clone(&counts)));
        FaultServer {
            addr,
            counts,
            task: Some(task),
        }
    }

    /// The bound (or, for [`Fault::Refuse`], formerly bound) address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// Warm-up requests answered.
    pub fn warmups(&self) -> u64 {
        self.counts.warmups.load(Ordering::SeqCst)
    }

    /// Faulted requests received with this method (warm-ups excluded).
    pub fn received(&self, method: &str) -> u64 {
        lock(&self.counts.by_method)
            .get(method)
            .copied()
            .unwrap_or(0)
    }

    /// Faulted requests received, any method (warm-ups excluded).
    pub fn requests(&self) -> u64 {
        lock(&self.counts.by_method).values().sum()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(listener: TcpListener, fault: Fault, counts: Arc<Counts>) {
    // Connection tasks live in the set, so aborting this task ends them too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { return };
                counts.connections.fetch_add(1, Ordering::SeqCst);
                connections.spawn(serve(stream, fault.clone(), Arc::clone(&counts)));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve(stream: TcpStream, fault: Fault, counts: Arc<Counts>) {
    match fault {
        Fault::Tls(config) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            if let Ok(Ok(tls)) = tokio::time::timeout(READ_LIMIT, acceptor.accept(stream)).await {
                serve_healthy(Conn::new(tls), &counts).await;
            }
        }
        Fault::PlaintextToTls => {
            let mut stream = stream;
            let _ = stream
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            let _ = stream.shutdown().await;
        }
        fault => serve_plain(Conn::new(stream), fault, &counts).await,
    }
}

/// Answers every request `200` with [`HEALTHY_BODY`] (counted as a faulted request: it should
/// never have arrived).
async fn serve_healthy<S: AsyncRead + AsyncWrite + Unpin>(mut conn: Conn<S>, counts: &Counts) {
    while let Some(request) = conn.next_request().await {
        if request.is_warmup() {
            counts.warmups.fetch_add(1, Ordering::SeqCst);
        } else {
            request.count(counts);
        }
        if conn.stream.write_all(&healthy_response()).await.is_err() {
            return;
        }
    }
}

async fn serve_plain(mut conn: Conn<TcpStream>, fault: Fault, counts: &Counts) {
    while let Some(request) = conn.next_request().await {
        if request.is_warmup() {
            counts.warmups.fetch_add(1, Ordering::SeqCst);
            if conn.stream.write_all(&healthy_response()).await.is_err() {
                return;
            }
            continue;
        }
        request.count(counts);
        let stream = &mut conn.stream;
        match &fault {
            Fault::Hang => {
                // Never answer; hold the connection until the peer gives up (or the limit).
                let mut sink = [0u8; 4096];
                let _ = tokio::time::timeout(HANG_LIMIT, async {
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
                return;
            }
            Fault::ResetMidHead => {
                let _ = stream.write_all(PARTIAL_HEAD).await;
                reset_after_pause(conn.stream).await;
                return;
            }
            Fault::ResetMidBody => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {RESET_BODY_DECLARED}\r\n\r\n"
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&[b'x'; PARTIAL_BODY_LEN]).await;
                reset_after_pause(conn.stream).await;
                return;
            }
            Fault::Status5xx => {
                let response = response(
                    "503 Service Unavailable",
                    &[("content-type", "application/json")],
                    STATUS_5XX_BODY.as_bytes(),
                );
                if stream.write_all(&response).await.is_err() {
                    return;
                }
            }
            Fault::TooMany => {
                let response = response(
                    "429 Too Many Requests",
                    &[("content-type", "application/json"), ("retry-after", "1")],
                    TOO_MANY_BODY.as_bytes(),
                );
                if stream.write_all(&response).await.is_err() {
                    return;
                }
            }
            Fault::GarbageBody => {
                let response = response(
                    "200 OK",
                    &[("content-type", "application/json")],
                    GARBAGE_BODY,
                );
                if stream.write_all(&response).await.is_err() {
                    return;
                }
            }
            Fault::Garbage => {
                let _ = stream.write_all(GARBAGE).await;
                let _ = stream.shutdown().await;
                return;
            }
            Fault::SlowDrip => {
                // Bounded by the response's length; a peer that gave up ends it sooner.
                for byte in DRIP_RESPONSE {
                    if stream.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                    let _ = stream.flush().await;
                    tokio::time::sleep(DRIP_INTERVAL).await;
                }
            }
            Fault::Refuse | Fault::Tls(_) | Fault::PlaintextToTls => return,
        }
    }
}

/// Lets the partial bytes reach the peer, then closes with SO_LINGER 0: an RST, not a FIN.
// tokio deprecates `set_linger` because a positive linger blocks the thread on drop; a zero
// linger never blocks (the kernel discards the send buffer and resets at once).
#[allow(deprecated)]
async fn reset_after_pause(stream: TcpStream) {
    tokio::time::sleep(RESET_PAUSE).await;
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

fn healthy_response() -> Vec<u8> {
    response(
        "200 OK",
        &[("content-type", "application/json")],
        HEALTHY_BODY.as_bytes(),
    )
}

/// A request as far as this server cares.
struct RequestHead {
    method: String,
    path: String,
}

impl RequestHead {
    fn is_warmup(&self) -> bool {
        self.path.ends_with("/warmup")
    }

    fn count(&self, counts: &Counts) {
        *lock(&counts.by_method)
            .entry(self.method.clone())
            .or_insert(0) += 1;
    }
}

/// A connection with a read buffer, so pipelined or coalesced bytes are not lost between
/// requests.
struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + Unpin> Conn<S> {
    fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads one request (head and body); `None` when the peer closes, stalls or sends
    /// something that is not an HTTP/1.1 request.
    async fn next_request(&mut self) -> Option<RequestHead> {
        let head_end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at + 4;
            }
            if self.buf.len() > MAX_HEAD || !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        self.buf.drain(..head_end);
        let mut request_line = head.lines().next()?.split_whitespace();
        let method = request_line.next()?.to_owned();
        let path = request_line.next()?.to_owned();
        let header = |name: &str| {
            head.lines().skip(1).find_map(|line| {
                let (n, v) = line.split_once(':')?;
                n.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_ascii_lowercase())
            })
        };
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            // Enough for the small bodies these tests send: up to the last chunk.
            loop {
                if let Some(at) = find(&self.buf, b"0\r\n\r\n") {
                    self.buf.drain(..at + 5);
                    break;
                }
                if !self.fill().await {
                    return None;
                }
            }
        } else {
            let length: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while self.buf.len() < length {
                if !self.fill().await {
                    return None;
                }
            }
            self.buf.drain(..length);
        }
        Some(RequestHead { method, path })
    }

    /// Reads more bytes into the buffer; false on EOF, error or a stall.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(READ_LIMIT, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
