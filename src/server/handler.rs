//! What the server serves: the request handler it is generic over.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;

use super::ConnInfo;

/// What a response body may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the server serves: one tower `Service` per client connection. The server drives it
/// through hyper-util's tower adapter, so it can be wrapped in the ecosystem's layers.
pub trait Handler: Send + Sync + 'static {
    /// The service of one connection. The tower adapter calls a clone of it for each request,
    /// so a clone should cost no more than a few `Arc` clones. Keep it and its future small
    /// (box the future if the work is large): hyper's HTTP/1 dispatcher keeps a slot for the
    /// connection's life the size of the adapter's future, which holds the service's clone and
    /// the request until the call, then the service's future.
    type Service: tower_service::Service<
            Request<Incoming>,
            Response = Response<Self::Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static;
    /// The response body.
    type Body: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static;

    /// The service for a new connection.
    fn connection(&self, conn: ConnInfo) -> Self::Service;

    /// TLS for the next accepted connection (`None`: plain). Asked again for each connection,
    /// so a reload's certificates apply to the connections after it.
    fn tls(&self) -> Option<Arc<rustls::ServerConfig>>;
}
