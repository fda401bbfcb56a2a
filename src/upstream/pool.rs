//! The upstream connection pools: one per worker thread, over hyper's connection-level client
//! (`hyper::client::conn`).
//!
//! HTTP/1.1 connections are pooled per upstream (scheme and authority). A connection is handed
//! out for one request and goes back to the pool with a [`Lease`] when the response body has
//! been read to its end; a body dropped early takes its connection with it, because hyper
//! cannot reuse a connection with unread bytes. HTTPS upstreams that pick `h2` by ALPN share one
//! HTTP/2 connection per upstream instead; until an HTTPS upstream has said which it speaks, and
//! while it speaks `h2`, connections to it are opened one at a time, so a cold burst opens one.
//! A request that a reused connection closed on before it was sent is sent again, on another
//! connection; a request that may have reached the upstream never is.
//!
//! Compared with hyper-util's general-purpose pool, this one does no work per request beyond a
//! short uncontended lock: no connector service, no checkout/connect race, and no task spawned
//! per request to wait for the connection to become idle.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};

use super::connect::{http1_handshake, http2_handshake, tcp_connect, tls_connect, tunnel};
use super::target::{origin_form, Target};
use super::UpstreamError;
use crate::egress::{Egress, ProxyEndpoint};

/// Idle HTTP/1.1 connections kept per upstream and worker; older ones are closed beyond this.
const MAX_IDLE_PER_UPSTREAM: usize = 256;

/// How many times one request is sent again after pooled connections closed on it unsent (an
/// upstream that closed its idle connections at once closes several pooled ones together).
const MAX_RESENDS: u32 = 8;

/// The connection pool of one worker thread, for requests with bodies of type `B`. Cheap to share
/// by reference; requests made through it are driven by the calling thread's runtime.
///
/// Generic so that this module need not know the proxy's body type, which holds a [`Lease`] and
/// so would make the two modules import each other. The proxy uses one body type, so this
/// compiles to the same code as a pool written for it.
#[derive(Debug)]
pub struct UpstreamPool<B> {
    pool: Arc<Pool<B>>,
}

#[derive(Debug)]
struct Pool<B> {
    tls: Arc<rustls::ClientConfig>,
    /// Which upstreams are reached through an egress proxy.
    egress: Egress,
    connect_timeout: Duration,
    idle_timeout: Duration,
    state: Mutex<State<B>>,
}

#[derive(Debug)]
struct State<B> {
    upstreams: Vec<Upstream<B>>,
    /// Whether a sweeper task is closing expired idle connections.
    sweeping: bool,
}

/// The connections to one scheme and authority.
struct Upstream<B> {
    https: bool,
    authority: Authority,
    /// The egress proxy its connections go through, if any (the rule is fixed per runtime).
    via: Option<ProxyEndpoint>,
    /// For a plain-HTTP upstream behind an egress proxy: requests go in absolute form, with this
    /// `Proxy-Authorization` (when the proxy has credentials).
    forward: Option<Forward>,
    /// Idle HTTP/1.1 connections, oldest first.
    idle: VecDeque<Idle<B>>,
    /// The shared HTTP/2 connection, when the upstream negotiated `h2`, and when a request
    /// last used it: unused for the idle timeout, it is let go like an idle HTTP/1.1 one.
    h2: Option<http2::SendRequest<B>>,
    h2_used: Instant,
    /// What the last TLS handshake negotiated.
    alpn: Alpn,
    /// Held while connecting to an HTTPS upstream that speaks `h2` or has not said yet, so a
    /// burst of requests shares one HTTP/2 connection instead of opening one each.
    h2_connect: Arc<tokio::sync::Mutex<()>>,
    /// The last connection attempt failed: the next ones are not serialised, so requests waiting
    /// on a dead upstream fail in parallel instead of one connect timeout after another.
    failing: bool,
}

/// The protocol an HTTPS upstream picked by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alpn {
    Unknown,
    Http1,
    Http2,
}

/// How a request to a plain-HTTP upstream is sent through an egress proxy.
#[derive(Debug, Clone)]
struct Forward {
    authorization: Option<HeaderValue>,
}

impl Forward {
    /// The request as a forward proxy takes it: the target in absolute form, and the proxy's
    /// credentials (the client's own `Proxy-Authorization` was stripped as hop-by-hop).
    fn prepare<B>(&self, target: &Target, request: &mut Request<B>) {
        *request.uri_mut() = target.absolute(request.uri());
        if let Some(authorization) = &self.authorization {
            request
                .headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, authorization.clone());
        }
    }
}

impl<B> Upstream<B> {
    fn new(https: bool, authority: Authority, egress: &Egress) -> Upstream<B> {
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let scheme = if https { "https" } else { "http" };
        let via = egress.proxy_for(scheme, host, port).cloned();
        let forward = via.as_ref().filter(|_| !https).map(|proxy| Forward {
            authorization: proxy.authorization(),
        });
        Upstream {
            https,
            authority,
            via,
            forward,
            idle: VecDeque::new(),
            h2: None,
            h2_used: Instant::now(),
            alpn: Alpn::Unknown,
            h2_connect: Arc::new(tokio::sync::Mutex::new(())),
            failing: false,
        }
    }
}

impl<B> std::fmt::Debug for Upstream<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("https", &self.https)
            .field("authority", &self.authority)
            .field("idle", &self.idle.len())
            .field("h2", &self.h2.is_some())
            .finish()
    }
}

struct Idle<B> {
    sender: http1::SendRequest<B>,
    since: Instant,
}

/// A connection ready for one request.
enum Sender<B> {
    Http1(http1::SendRequest<B>),
    Http2(http2::SendRequest<B>),
}

/// What a pool lookup found.
enum Checkout<B> {
    Ready(Sender<B>),
    /// Nothing usable: connect. `h2_connect` is set when connects to this upstream are serialised.
    Connect {
        h2_connect: Option<Arc<tokio::sync::Mutex<()>>>,
    },
}

/// The HTTP/1.1 connection a response arrived on. [`Lease::release`] puts it back in its pool
/// (the response body has been read to its end); dropping the lease closes it.
#[must_use = "a dropped lease closes its connection"]
pub struct Lease<B> {
    pool: Arc<Pool<B>>,
    upstream: usize,
    sender: http1::SendRequest<B>,
}

impl<B> std::fmt::Debug for Lease<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("upstream", &self.upstream)
            .finish()
    }
}

impl<B: Send + 'static> Lease<B> {
    /// The response has been read to its end: the connection may carry the next request.
    pub fn release(self) {
        self.pool.check_in(self.upstream, self.sender);
    }
}

impl<B> UpstreamPool<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A pool trusting `tls`'s roots, reaching upstreams as `egress` says, bounding DNS plus TCP
    /// by `connect_timeout` and closing connections idle for `idle_timeout`.
    pub fn new(
        mut tls: rustls::ClientConfig,
        egress: Egress,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> UpstreamPool<B> {
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        UpstreamPool {
            pool: Arc::new(Pool {
                tls: Arc::new(tls),
                egress,
                connect_timeout,
                idle_timeout,
                state: Mutex::new(State {
                    upstreams: Vec::new(),
                    sweeping: false,
                }),
            }),
        }
    }

    /// Sends `request` (origin-form URI: path and query) to `target` and returns the response
    /// head, with the lease of its HTTP/1.1 connection (`None` over HTTP/2).
    // Not an `async fn`: that would store `request` twice in every request's future (see
    // `pipeline::process_request`).
    #[allow(clippy::manual_async_fn)]
    pub fn request<'a>(
        &'a self,
        target: &'a Target,
        mut request: Request<B>,
    ) -> impl std::future::Future<
        Output = Result<(Response<Incoming>, Option<Lease<B>>), UpstreamError>,
    > + 'a {
        async move {
            let (upstream, mut checkout, forward) =
                self.pool.find(target.https(), target.authority());
            if let Some(forward) = &forward {
                forward.prepare(target, &mut request);
            }
            let mut resends = 0;
            loop {
                let (sender, reused) = match checkout {
                    Checkout::Ready(sender) => (sender, true),
                    // Boxed: the states of waiting for the HTTP/2 lock and of connecting (DNS, TCP,
                    // TLS, handshake: several KiB) would otherwise make every request's future, which
                    // is allocated and copied per request, that much larger.
                    Checkout::Connect { h2_connect } => {
                        Box::pin(self.connect_for(upstream, h2_connect)).await?
                    }
                };
                let may_resend = reused && resends < MAX_RESENDS;
                let mut unsent = match sender {
                    Sender::Http1(mut sender) => match sender.try_send_request(request).await {
                        Ok(response)
                            if forward.is_some()
                                && response.status()
                                    == http::StatusCode::PROXY_AUTHENTICATION_REQUIRED =>
                        {
                            return Err(self.pool.egress_refused(upstream));
                        }
                        Ok(response) => {
                            let lease = Lease {
                                pool: Arc::clone(&self.pool),
                                upstream,
                                sender,
                            };
                            return Ok((response, Some(lease)));
                        }
                        Err(e) => unsent_or_error(e, may_resend)?,
                    },
                    Sender::Http2(mut sender) => {
                        // HTTP/2 carries the scheme and authority as pseudo-headers.
                        *request.uri_mut() = target.absolute(request.uri());
                        match sender.try_send_request(request).await {
                            Ok(response) => return Ok((response, None)),
                            Err(e) => unsent_or_error(e, may_resend)?,
                        }
                    }
                };
                // A reused connection closed before the request went out: the upstream never saw
                // it, so it is safe to send again on another connection.
                tracing::debug!("pooled upstream connection closed before sending; retrying");
                *unsent.uri_mut() = origin_form(unsent.uri());
                if let Some(forward) = &forward {
                    forward.prepare(target, &mut unsent);
                }
                request = unsent;
                resends += 1;
                checkout = self.pool.check_out(upstream);
            }
        }
    }

    /// A connection for `upstream` when the pool had none ready, and whether it was pooled:
    /// after waiting for `h2_connect` (another request is finding out whether the upstream
    /// speaks HTTP/2) the pool may have one.
    async fn connect_for(
        &self,
        upstream: usize,
        h2_connect: Option<Arc<tokio::sync::Mutex<()>>>,
    ) -> Result<(Sender<B>, bool), UpstreamError> {
        let Some(lock) = h2_connect else {
            return Ok((self.connect(upstream).await?, false));
        };
        let one_at_a_time = lock.lock().await;
        match self.pool.check_out(upstream) {
            Checkout::Ready(sender) => Ok((sender, true)),
            Checkout::Connect { h2_connect } => {
                if h2_connect.is_none() {
                    // The first connection said HTTP/1.1, or failed: go parallel.
                    drop(one_at_a_time);
                }
                Ok((self.connect(upstream).await?, false))
            }
        }
    }

    /// Opens a connection to `upstream` and notes whether that worked.
    ///
    /// The connect timeout bounds all of it: DNS, TCP, TLS and the HTTP handshake.
    async fn connect(&self, upstream: usize) -> Result<Sender<B>, UpstreamError> {
        // Until it finishes, the attempt counts as failed: one abandoned midway (its request
        // timed out) lifts the one-at-a-time rule just as a failure does.
        let mut attempt = Attempt {
            pool: &self.pool,
            upstream,
            connected: false,
        };
        let timeout = self.pool.connect_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let target = self.pool.target(upstream);
        let via = target.2.clone();
        let result = tokio::time::timeout_at(deadline, self.open(upstream, target, deadline))
            .await
            .unwrap_or_else(|_| {
                Err(match via {
                    Some(proxy) => UpstreamError::Egress {
                        proxy: proxy.to_string(),
                        reason: format!("did not open the way to the upstream within {timeout:?}"),
                    },
                    None => UpstreamError::ConnectTimeout(timeout),
                })
            });
        attempt.connected = result.is_ok();
        result
    }

    /// DNS and TCP, then TLS with ALPN for HTTPS, then the HTTP handshake. The connection is
    /// driven by a task on the calling thread's runtime.
    async fn open(
        &self,
        upstream: usize,
        (https, authority, via): (bool, Authority, Option<ProxyEndpoint>),
        deadline: tokio::time::Instant,
    ) -> Result<Sender<B>, UpstreamError> {
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = match &via {
            None => tcp_connect(host, port, deadline).await?,
            Some(proxy) => {
                let tcp = tcp_connect(&proxy.host, proxy.port, deadline)
                    .await
                    .map_err(|e| UpstreamError::Egress {
                        proxy: proxy.to_string(),
                        reason: format!("could not be reached ({e})"),
                    })?;
                if https {
                    tunnel(tcp, proxy, host, port).await?
                } else {
                    tcp
                }
            }
        };
        if !https {
            return http1_handshake(tcp).await.map(Sender::Http1);
        }
        let tls = tls_connect(&self.pool.tls, host, tcp).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            self.pool.learned(upstream, Alpn::Http1);
            return http1_handshake(tls).await.map(Sender::Http1);
        }
        let sender = http2_handshake(tls).await?;
        self.pool.keep_h2(upstream, sender.clone());
        Ok(Sender::Http2(sender))
    }
}

/// Marks the upstream failing unless the connect it guards finished.
struct Attempt<'a, B> {
    pool: &'a Pool<B>,
    upstream: usize,
    connected: bool,
}

impl<B> Drop for Attempt<'_, B> {
    fn drop(&mut self) {
        self.pool.lock().upstreams[self.upstream].failing = !self.connected;
    }
}

/// The request back when it never left and may be sent again, else the error.
fn unsent_or_error<B>(
    mut e: hyper::client::conn::TrySendError<Request<B>>,
    may_resend: bool,
) -> Result<Request<B>, UpstreamError> {
    match e.take_message() {
        Some(unsent) if may_resend => Ok(unsent),
        _ => Err(UpstreamError::Send(e.into_error())),
    }
}

impl<B> Pool<B> {
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        // The state stays consistent even if a holder panicked: every change is one operation.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The index of the upstream for `https` and `authority`, added on first use, and a
    /// [`Pool::check_out`] from it under the same lock. Upstreams are never removed: they are
    /// the routes' targets, a fixed set per runtime.
    fn find(&self, https: bool, authority: &Authority) -> (usize, Checkout<B>, Option<Forward>) {
        let mut state = self.lock();
        let found = state
            .upstreams
            .iter()
            .position(|u| u.https == https && u.authority == *authority);
        let index = found.unwrap_or_else(|| {
            state
                .upstreams
                .push(Upstream::new(https, authority.clone(), &self.egress));
            state.upstreams.len() - 1
        });
        let upstream = &mut state.upstreams[index];
        let forward = upstream.forward.clone();
        let checkout = self.check_out_locked(upstream);
        (index, checkout, forward)
    }

    /// Whether a connection unused since `since` has passed the idle timeout at `now`.
    fn expired(&self, since: Instant, now: Instant) -> bool {
        now.duration_since(since) >= self.idle_timeout
    }

    /// The error for a forward proxy's 407 to a plain-HTTP request.
    fn egress_refused(&self, upstream: usize) -> UpstreamError {
        let proxy = self.lock().upstreams[upstream]
            .via
            .as_ref()
            .map_or_else(String::new, ToString::to_string);
        UpstreamError::Egress {
            proxy,
            reason: "refused the request: proxy authentication required (407); check the user \
                     and password in server.egress_proxy"
                .into(),
        }
    }

    fn target(&self, upstream: usize) -> (bool, Authority, Option<ProxyEndpoint>) {
        let state = self.lock();
        let u = &state.upstreams[upstream];
        (u.https, u.authority.clone(), u.via.clone())
    }

    fn check_out(&self, upstream: usize) -> Checkout<B> {
        let mut state = self.lock();
        self.check_out_locked(&mut state.upstreams[upstream])
    }

    /// A live connection for `u`: its HTTP/2 connection, or the most recently idle HTTP/1.1
    /// connection that is ready. Expired and closed connections met on the way are dropped; one
    /// still finishing its last exchange is left for later.
    fn check_out_locked(&self, u: &mut Upstream<B>) -> Checkout<B> {
        let now = Instant::now();
        if let Some(h2) = &u.h2 {
            if !h2.is_closed() && h2.is_ready() && !self.expired(u.h2_used, now) {
                u.h2_used = now;
                return Checkout::Ready(Sender::Http2(h2.clone()));
            }
            u.h2 = None;
        }
        let mut i = u.idle.len();
        while i > 0 {
            i -= 1;
            let idle = &u.idle[i];
            if self.expired(idle.since, now) {
                // This one and every older one have expired.
                u.idle.drain(..=i);
                break;
            }
            if idle.sender.is_closed() {
                u.idle.remove(i);
            } else if idle.sender.is_ready() {
                if let Some(idle) = u.idle.remove(i) {
                    return Checkout::Ready(Sender::Http1(idle.sender));
                }
            }
        }
        let serialise = u.https && u.alpn != Alpn::Http1 && !u.failing;
        Checkout::Connect {
            h2_connect: serialise.then(|| Arc::clone(&u.h2_connect)),
        }
    }

    fn learned(&self, upstream: usize, alpn: Alpn) {
        self.lock().upstreams[upstream].alpn = alpn;
    }
}

// Keeping a connection may start the sweeper, a task that holds the pool and may run on
// another thread.
impl<B: Send + 'static> Pool<B> {
    fn keep_h2(self: &Arc<Self>, upstream: usize, sender: http2::SendRequest<B>) {
        let mut state = self.lock();
        let u = &mut state.upstreams[upstream];
        u.alpn = Alpn::Http2;
        if u.h2.as_ref().is_none_or(|h2| h2.is_closed()) {
            u.h2 = Some(sender);
            u.h2_used = Instant::now();
            if !self.swept(state) {
                self.lock().upstreams[upstream].h2 = None;
            }
        }
    }

    /// Makes sure a sweeper watches this pool; false when there is no runtime to run one on
    /// (never in the proxy), and then nothing should be kept idle.
    fn swept(self: &Arc<Self>, mut state: MutexGuard<'_, State<B>>) -> bool {
        if state.sweeping {
            return true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        state.sweeping = true;
        drop(state);
        runtime.spawn(sweep(Arc::downgrade(self)));
        true
    }

    fn check_in(self: &Arc<Self>, upstream: usize, sender: http1::SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let mut state = self.lock();
        let u = &mut state.upstreams[upstream];
        if u.forward.is_some() {
            // A forward proxy may close a connection after an absolute-form exchange without
            // saying so (tinyproxy does), and a request sent on it then fails after it may have
            // left. Plain-HTTP upstreams behind an egress proxy are rare (Sitecore's are HTTPS,
            // whose CONNECT tunnels are pooled): one connection per request.
            return;
        }
        u.idle.push_back(Idle {
            sender,
            since: Instant::now(),
        });
        if u.idle.len() > MAX_IDLE_PER_UPSTREAM {
            u.idle.pop_front();
        }
        if !self.swept(state) {
            self.lock().upstreams[upstream].idle.pop_back();
        }
    }
}

/// Closes idle connections (HTTP/1.1 ones in the pool, shared HTTP/2 ones no request used) as
/// they pass the idle timeout, so an upstream that gets no more requests does not keep sockets
/// open. Sleeps until the oldest expires; ends when the pool is gone or keeps nothing.
async fn sweep<B>(pool: Weak<Pool<B>>) {
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next.into()).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut state = pool.lock();
        let now = Instant::now();
        let mut oldest: Option<Instant> = None;
        for u in &mut state.upstreams {
            u.idle
                .retain(|idle| !pool.expired(idle.since, now) && !idle.sender.is_closed());
            let h2_expired = pool.expired(u.h2_used, now);
            if u.h2.as_ref().is_some_and(|h2| h2.is_closed() || h2_expired) {
                u.h2 = None;
            }
            let idle_since = u.idle.front().map(|idle| idle.since);
            let h2_since = u.h2.as_ref().map(|_| u.h2_used);
            for since in idle_since.into_iter().chain(h2_since) {
                oldest = Some(oldest.map_or(since, |o: Instant| o.min(since)));
            }
        }
        match oldest {
            Some(since) => next = since + pool.idle_timeout,
            None => {
                state.sweeping = false;
                return;
            }
        }
    }
}
