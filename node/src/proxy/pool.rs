//! The keep-alive pool of plain `http` services (the common case), on hyper's
//! connection API directly: one per worker, no cross-thread locks in use, no task per
//! request. (hyper-util's pooled client, still used for h2c and TLS upstreams, spawns a
//! task per HTTP/1.1 request to give the connection back, and hashes a key and takes a
//! lock per checkout; this pool costs a map lookup.)
//!
//! A connection goes back to the pool when the response body it carried has been
//! consumed or dropped and hyper says it is ready for another request; otherwise it
//! is closed. A request that a pooled connection could not even start (the upstream
//! closed it while idle) is sent again on a fresh connection: nothing of it left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::connect::{DnsCache, Timeouts, WriteTimed};
use super::{BoxError, UpstreamBody};

/// Idle keep-alive connections kept per upstream target and pool (each worker has
/// its pools). 1024, twice Kong 3's `upstream_keepalive_pool_size`: with 1 000 client
/// connections on one worker, 256 opened 15 000–26 000 new upstream connections per
/// 10 s (one request in eight) and 1024 opened 1 or 2, for 7–50% more requests/s
/// (node/PROXY.md, "Upstream keep-alive"). An idle direct-path connection holds no
/// buffer, so the room costs little.
pub const UPSTREAM_IDLE_CONNECTIONS_MAX: usize = 1024;
/// How long an idle upstream connection is kept.
pub const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Distinct upstream addresses one worker keeps idle connections for; past this the
/// pool starts over.
pub const POOL_AUTHORITIES_MAX: usize = 4096;
/// How often idle connections past [`UPSTREAM_IDLE_TIMEOUT`] are closed.
pub const POOL_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing was sent, another target may be tried.
    Connect(BoxError),
    /// No connection within the connect timeout.
    ConnectTimeout,
    /// A reused connection closed before any answer: the request may or may not have
    /// been read by the upstream.
    Closed(BoxError),
    /// The request may have reached the upstream.
    Request(BoxError),
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    /// The write timeout its socket applies, set for each exchange.
    write_timeout_ms: Arc<AtomicU64>,
    since: Instant,
}

pub struct H1Pool {
    /// Only ever locked with `try_lock` by the worker's own thread, so never waited on.
    idle: Mutex<HashMap<Authority, Vec<Idle>>>,
    tcp: HttpConnector<DnsCache>,
}

/// The TCP connector of both pools: names through the DNS cache, `TCP_NODELAY` set.
fn connector(dns: DnsCache) -> HttpConnector<DnsCache> {
    let mut tcp = HttpConnector::new_with_resolver(dns);
    tcp.set_nodelay(true);
    tcp
}

/// Runs `sweep` on `pool` every [`POOL_SWEEP_INTERVAL`] until the pool is gone (when
/// there is a runtime to run it on).
fn spawn_sweeper<P: Send + Sync + 'static>(pool: &Arc<P>, sweep: fn(&P)) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let pool = Arc::downgrade(pool);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(POOL_SWEEP_INTERVAL);
        loop {
            ticks.tick().await;
            let Some(pool) = pool.upgrade() else { return };
            sweep(&pool);
        }
    });
}

impl H1Pool {
    pub fn new(dns: DnsCache) -> Arc<H1Pool> {
        let pool = Arc::new(H1Pool { idle: Mutex::default(), tcp: connector(dns) });
        spawn_sweeper(&pool, H1Pool::sweep);
        pool
    }

    /// Closes idle connections past their time.
    fn sweep(&self) {
        let Ok(mut idle) = self.idle.try_lock() else { return };
        idle.retain(|_, senders| {
            senders.retain(|entry| !entry.sender.is_closed() && entry.since.elapsed() < UPSTREAM_IDLE_TIMEOUT);
            !senders.is_empty()
        });
    }

    /// Sends `request` to `authority` over a pooled connection (unless `fresh`) or a
    /// new one, within `timeouts`' connect and write timeouts. The request's URI
    /// becomes origin-form; its `Host` header must be set.
    pub async fn send(
        self: &Arc<Self>,
        authority: &Authority,
        mut request: Request<UpstreamBody>,
        timeouts: Timeouts,
        fresh: bool,
    ) -> Result<(Response<Incoming>, PoolReturn), SendError> {
        let mut origin = http::uri::Parts::default();
        origin.path_and_query = request.uri().path_and_query().cloned();
        *request.uri_mut() = Uri::from_parts(origin).map_err(|error| SendError::Request(error.into()))?;
        if !request.headers().contains_key(http::header::HOST) {
            if let Ok(host) = http::HeaderValue::from_str(authority.as_str()) {
                request.headers_mut().insert(http::header::HOST, host);
            }
        }
        let write_ms = timeouts.write.as_millis() as u64;
        while let Some(mut idle) = (!fresh).then(|| self.checkout(authority)).flatten() {
            idle.write_timeout_ms.store(write_ms, Ordering::Relaxed);
            match idle.sender.try_send_request(request).await {
                Ok(response) => return Ok((response, self.give_back(authority, idle.sender, idle.write_timeout_ms))),
                Err(mut failed) => match failed.take_message() {
                    // Not started: the idle connection was closed; try the next one.
                    Some(unsent) => request = unsent,
                    None => {
                        let error = failed.into_error();
                        return Err(if closed_unanswered(&error) {
                            SendError::Closed(error.into())
                        } else {
                            SendError::Request(error.into())
                        });
                    }
                },
            }
        }
        let write_timeout_ms = Arc::new(AtomicU64::new(write_ms));
        let connecting = self.connect(authority, write_timeout_ms.clone());
        let mut sender = match tokio::time::timeout(timeouts.connect, connecting).await {
            Ok(connected) => connected?,
            Err(_) => return Err(SendError::ConnectTimeout),
        };
        match sender.send_request(request).await {
            Ok(response) => Ok((response, self.give_back(authority, sender, write_timeout_ms))),
            Err(error) => Err(SendError::Request(error.into())),
        }
    }

    fn give_back(
        self: &Arc<Self>,
        authority: &Authority,
        sender: SendRequest<UpstreamBody>,
        write_timeout_ms: Arc<AtomicU64>,
    ) -> PoolReturn {
        PoolReturn { pool: self.clone(), authority: authority.clone(), sender: Some((sender, write_timeout_ms)) }
    }

    fn checkout(&self, authority: &Authority) -> Option<Idle> {
        let mut idle = self.idle.try_lock().ok()?;
        let senders = idle.get_mut(authority)?;
        while let Some(entry) = senders.pop() {
            if entry.sender.is_ready() && entry.since.elapsed() < UPSTREAM_IDLE_TIMEOUT {
                return Some(entry);
            }
        }
        None
    }

    async fn connect(
        &self,
        authority: &Authority,
        write_timeout_ms: Arc<AtomicU64>,
    ) -> Result<SendRequest<UpstreamBody>, SendError> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|error| SendError::Connect(error.into()))?;
        let stream = super::connect::dial(&self.tcp, uri).await.map_err(SendError::Connect)?;
        let stream = TokioIo::new(WriteTimed::new(stream, write_timeout_ms));
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(stream)
            .await
            .map_err(|error| SendError::Connect(error.into()))?;
        metrics::counter!("tollgate_upstream_connections_opened_total").increment(1);
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    fn put(&self, authority: Authority, sender: SendRequest<UpstreamBody>, write_timeout_ms: Arc<AtomicU64>) {
        let Ok(mut idle) = self.idle.try_lock() else { return };
        if idle.len() >= POOL_AUTHORITIES_MAX && !idle.contains_key(&authority) {
            idle.clear();
        }
        let senders = idle.entry(authority).or_default();
        if senders.len() < UPSTREAM_IDLE_CONNECTIONS_MAX {
            senders.push(Idle { sender, write_timeout_ms, since: Instant::now() });
        }
    }
}

/// Whether an exchange on a reused connection failed because the upstream closed it
/// before a byte of the answer: an incomplete message, or the socket reset or closed
/// under the request.
fn closed_unanswered(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        cause = current.source();
    }
    false
}

/// Gives a connection back to its pool when dropped (with the response body), if it
/// is ready for another request; [`PoolReturn::discard`] keeps it out (an upgrade).
pub struct PoolReturn {
    pool: Arc<H1Pool>,
    authority: Authority,
    sender: Option<(SendRequest<UpstreamBody>, Arc<AtomicU64>)>,
}

impl PoolReturn {
    pub fn discard(&mut self) {
        self.sender = None;
    }
}

impl Drop for PoolReturn {
    fn drop(&mut self) {
        let Some((mut sender, write_timeout_ms)) = self.sender.take() else { return };
        if sender.is_ready() {
            self.pool.put(self.authority.clone(), sender, write_timeout_ms);
            return;
        }
        if sender.is_closed() {
            return;
        }
        // The connection is still finishing this exchange (the request body, say):
        // give it back once it is ready, if that happens soon.
        let pool = self.pool.clone();
        let authority = self.authority.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(RETURN_WAIT_MAX, sender.ready()).await {
                    pool.put(authority, sender, write_timeout_ms);
                }
            });
        }
    }
}

/// Longest a finished exchange's connection is waited for before it is closed.
const RETURN_WAIT_MAX: Duration = Duration::from_secs(1);

/// An upstream connection of the direct HTTP/1.1 path ([`super::direct`]): the socket
/// and the bytes read from it, owned by one request at a time.
pub struct DirectConn {
    pub stream: crate::env::Stream,
    pub buf: bytes::BytesMut,
    /// It served an earlier request (and the upstream may have closed it since).
    pub reused: bool,
}

/// Idle connections with when each went idle; foldhash, as the map is looked up
/// twice per request and its keys come from the config.
/// Keyed by the authority's text: `Authority` hashes and compares byte by byte,
/// lower-casing each.
type IdleDirect = HashMap<Box<str>, Vec<(DirectConn, Instant)>, foldhash::fast::RandomState>;

/// One worker's idle upstream connections for the direct path, by address.
pub struct DirectPool {
    /// Only ever locked with `try_lock` by the worker's own thread, never across an
    /// await, so never waited on.
    idle: Mutex<IdleDirect>,
    tcp: HttpConnector<DnsCache>,
}

impl DirectPool {
    pub fn new(dns: DnsCache) -> Arc<DirectPool> {
        let pool = Arc::new(DirectPool { idle: Mutex::default(), tcp: connector(dns) });
        spawn_sweeper(&pool, DirectPool::sweep);
        pool
    }

    /// Closes idle connections past their time.
    fn sweep(&self) {
        let Ok(mut idle) = self.idle.try_lock() else { return };
        let now = Instant::now();
        idle.retain(|_, connections| {
            connections.retain(|(_, since)| now.saturating_duration_since(*since) < UPSTREAM_IDLE_TIMEOUT);
            !connections.is_empty()
        });
    }

    /// An idle connection to `authority` that still looks open: one the upstream
    /// closed (or wrote to unasked) reads as ready, and is dropped.
    pub fn checkout(&self, authority: &Authority, now: Instant) -> Option<DirectConn> {
        let mut idle = self.idle.try_lock().ok()?;
        let connections = idle.get_mut(authority.as_str())?;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        while let Some((connection, since)) = connections.pop() {
            let fresh = now.saturating_duration_since(since) < UPSTREAM_IDLE_TIMEOUT;
            if fresh && connection.stream.poll_read_ready(&mut cx).is_pending() {
                return Some(connection);
            }
        }
        None
    }

    /// A new connection to `authority` (its name resolved through the DNS cache).
    pub async fn connect(&self, authority: &Authority) -> Result<DirectConn, BoxError> {
        let uri = Uri::builder().scheme("http").authority(authority.clone()).path_and_query("/").build()?;
        let stream = super::connect::dial(&self.tcp, uri).await?;
        metrics::counter!("tollgate_upstream_connections_opened_total").increment(1);
        // No buffer yet: each read of an exchange makes room first.
        Ok(DirectConn { stream, buf: bytes::BytesMut::new(), reused: false })
    }

    /// Keeps a connection whose exchange ended cleanly (`now`, about) for the next
    /// request.
    pub fn put(&self, authority: &Authority, mut connection: DirectConn, now: Instant) {
        let Ok(mut idle) = self.idle.try_lock() else { return };
        if !idle.contains_key(authority.as_str()) {
            if idle.len() >= POOL_AUTHORITIES_MAX {
                idle.clear();
            }
            idle.insert(authority.as_str().into(), Vec::new());
        }
        let Some(connections) = idle.get_mut(authority.as_str()) else { return };
        if connections.len() < UPSTREAM_IDLE_CONNECTIONS_MAX {
            // Given back while idle; the next exchange's first read takes one.
            connection.buf = bytes::BytesMut::new();
            connection.reused = true;
            connections.push((connection, now));
        }
    }
}
