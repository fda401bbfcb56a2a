//! Raw sockets for requests no well-behaved client would send, and a scripted upstream.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Writes `request` as is and reads the answer until the peer closes or goes quiet.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = connect_and_write(addr, request).await;
    read_until_quiet(&mut stream, Duration::from_millis(1500)).await
}

/// Connects to `addr`, writes `bytes` and returns the open connection.
pub async fn connect_and_write(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    stream
}

/// Reads until the peer closes (EOF or reset); everything it sent before.
pub async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response with a `Content-Length` body, leaving the connection open.
pub async fn read_response(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return text;
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return text,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads until EOF or `quiet` passes with no data.
pub async fn read_until_quiet(stream: &mut TcpStream, quiet: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(quiet, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1.1 response.
pub fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// An upstream that records each request head it receives and answers with a fixed response.
pub struct ScriptedUpstream {
    pub addr: SocketAddr,
    pub heads: Arc<Mutex<Vec<String>>>,
}

impl ScriptedUpstream {
    /// Answers every request with `response` (a complete HTTP/1.1 response).
    pub async fn start(response: &'static str) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&heads);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    loop {
                        let Some(head) = read_head(&mut stream).await else {
                            return;
                        };
                        let length = content_length(&head);
                        seen.lock().expect("heads").push(head);
                        let mut body = vec![0u8; length];
                        if stream.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        ScriptedUpstream { addr, heads }
    }

    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("heads").clone()
    }
}

async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// An upstream that sends a response head and a first chunk, then waits for `release` before
/// sending the last chunk: the test decides when the upstream finishes.
pub async fn held_stream_upstream(
    first: &'static [u8],
    last: &'static [u8],
) -> (SocketAddr, tokio::sync::mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (release, mut released) = tokio::sync::mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        if read_head(&mut stream).await.is_none() {
            return;
        }
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream
            .write_all(format!("{:x}\r\n", first.len()).as_bytes())
            .await;
        let _ = stream.write_all(first).await;
        let _ = stream.write_all(b"\r\n").await;
        let _ = stream.flush().await;
        let _ = released.recv().await;
        let _ = stream
            .write_all(format!("{:x}\r\n", last.len()).as_bytes())
            .await;
        let _ = stream.write_all(last).await;
        let _ = stream.write_all(b"\r\n0\r\n\r\n").await;
        let _ = stream.flush().await;
        let _ = read_until_quiet(&mut stream, Duration::from_millis(200)).await;
    });
    (addr, release)
}
