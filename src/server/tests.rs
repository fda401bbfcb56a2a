//! The server with a handler of its own, through real sockets: what an embedder sees.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::*;

/// Answers every request with the client's address and transport, as the server saw them.
struct Echo;

#[derive(Clone)]
struct EchoService(ConnInfo);

impl tower_service::Service<Request<Incoming>> for EchoService {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Full<Bytes>>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Incoming>) -> Self::Future {
        let ConnInfo {
            peer,
            tls,
            activity,
        } = &self.0;
        activity.begin();
        let body = format!("{peer} tls={tls}");
        activity.end();
        ready(Ok(Response::new(Full::new(Bytes::from(body)))))
    }
}

impl Handler for Echo {
    type Service = EchoService;
    type Body = Full<Bytes>;

    fn connection(&self, conn: ConnInfo) -> EchoService {
        EchoService(conn)
    }

    fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        None
    }
}

fn settings() -> ListenerSettings {
    ListenerSettings {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(10),
        max_connections: 10,
        shutdown_grace: Duration::from_secs(5),
    }
}

/// An inline server of [`Echo`] counting into `open`, with its shutdown and cut signals.
async fn start(
    open: &Arc<[Gauge]>,
) -> (
    Result<tokio::task::JoinHandle<()>, SpawnError>,
    std::net::SocketAddr,
    [watch::Sender<bool>; 2],
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, shutdown) = watch::channel(false);
    let (cut, cut_rx) = watch::channel(false);
    let open = Arc::clone(open);
    let server = spawn(
        listener,
        Workers::Inline,
        Arc::new(Echo),
        open,
        settings(),
        shutdown,
        cut_rx,
    );
    (server, addr, [stop, cut])
}

/// Waits (up to five seconds) until `f` holds.
async fn eventually(f: impl Fn() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

#[tokio::test]
async fn a_handler_of_its_own_is_served_and_its_connections_counted() {
    let open: Arc<[Gauge]> = Arc::from([Gauge::default()]);
    let (server, addr, [stop, _cut]) = start(&open).await;
    let server = server.expect("spawn");

    let mut client = TcpStream::connect(addr).await.expect("connect");
    let expected = format!("{} tls=false", client.local_addr().expect("client addr"));
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("write");
    let mut response = Vec::new();
    while !response.ends_with(expected.as_bytes()) {
        let mut buf = [0u8; 1024];
        let n = client.read(&mut buf).await.expect("read");
        assert!(
            n > 0,
            "closed early: {}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buf[..n]);
    }
    assert!(response.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert_eq!(open[0].get(), 1, "the open connection is counted");

    drop(client);
    assert!(eventually(|| open[0].get() == 0).await, "and uncounted");
    stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("drained")
        .expect("server task");
}

#[tokio::test]
async fn gauges_that_are_not_one_per_worker_are_refused() {
    let open: Arc<[Gauge]> = Arc::from([Gauge::default(), Gauge::default()]);
    let (refused, _, _signals) = start(&open).await;
    assert!(matches!(
        refused,
        Err(SpawnError::Counters {
            workers: 1,
            counters: 2
        })
    ));
}
