//! The upstream side: where requests go ([`Target`]), the connection pools that carry them there
//! ([`UpstreamPool`], one per worker thread), the roots upstream certificates are checked
//! against, and header hygiene in both directions (hop-by-hop and inbound-credential headers).

mod connect;
mod error;
mod headers;
mod pool;
mod target;
mod trust;

pub use error::UpstreamError;
pub use headers::{strip_hop_by_hop, strip_inbound_credentials};
pub use pool::{Lease, UpstreamPool};
pub use target::Target;
pub use trust::tls_client_config;
