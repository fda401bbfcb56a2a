//! The request pipeline as the server's [`Handler`]: one service per client connection, whose
//! requests go to [`process_request`] with the runtime current when each arrives.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;

use super::{process_request, TrackedBody};
use crate::runtime::Runtime;
use crate::server::{ConnInfo, Handler};

/// The pipeline, served: the runtime, swapped whole on reload.
#[derive(Debug)]
pub struct ProxyHandler {
    runtime: Arc<ArcSwap<Runtime>>,
}

impl ProxyHandler {
    /// Serves the runtime current in `runtime`.
    pub fn new(runtime: Arc<ArcSwap<Runtime>>) -> ProxyHandler {
        ProxyHandler { runtime }
    }
}

impl Handler for ProxyHandler {
    type Service = ConnectionService;
    type Body = TrackedBody;

    fn connection(&self, conn: ConnInfo) -> ConnectionService {
        ConnectionService {
            runtime: Arc::clone(&self.runtime),
            conn,
        }
    }

    fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.runtime.load().tls.clone()
    }
}

/// The pipeline's service for one client connection. A clone (the tower adapter makes one per
/// request) is two `Arc` clones.
#[derive(Debug, Clone)]
pub struct ConnectionService {
    runtime: Arc<ArcSwap<Runtime>>,
    conn: ConnInfo,
}

/// The pipeline's request future, boxed: hyper's HTTP/1 dispatcher keeps a slot the size of the
/// service future for the connection's life, and the pipeline's is several KiB.
pub type RequestFuture =
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, Infallible>> + Send>>;

impl tower_service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = RequestFuture;

    /// Always ready: the limits are the server's (connections) and hyper's (HTTP/2 streams).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> RequestFuture {
        let runtime = self.runtime.load_full();
        Box::pin(process_request(runtime, req, self.conn.clone()))
    }
}

#[cfg(test)]
mod tests {
    use hyper_util::service::TowerToHyperService;

    use super::*;

    /// What hyper's HTTP/1 dispatcher allocates per connection and keeps for its life: a slot
    /// for the tower adapter's future, which holds a clone of the service and the request until
    /// the service is called, then the boxed request future. An unboxed request future would
    /// make it several KiB.
    #[test]
    fn the_per_connection_request_slot_stays_small() {
        type Slot = Option<
            <TowerToHyperService<ConnectionService> as hyper::service::Service<
                Request<Incoming>,
            >>::Future,
        >;
        let size = std::mem::size_of::<Slot>();
        eprintln!("request slot: {size} bytes");
        assert!(size <= 384, "the request slot grew to {size} bytes");
    }
}
