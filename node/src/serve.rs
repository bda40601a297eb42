//! The accept loop behind every listener of a node, and the HTTP/1.1 server behind
//! the Admin API, the cluster port and the echo upstream: bounded connections in all
//! and per client address, TLS when configured (the handshake done, and the client's
//! certificate checked, before any byte of a request is parsed), header, idle and
//! send timeouts ([`crate::conn`]), graceful stop.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use tokio::sync::{watch, Semaphore};

use crate::conn::{RequestGuard, TimedIo, Timeouts};
use crate::env::{Io, Listener, Stream};

/// Longest a TLS handshake may take on the Admin API and the cluster port.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; further ones wait in the listen backlog.
    pub connections_max: usize,
    /// Connections of one client address open at once; further ones are closed at
    /// once (`tollgate_connections_refused_total{server}`). Not counted when it is
    /// `connections_max`.
    pub per_peer_max: usize,
    /// Connections that have not sent a first request yet (nor finished their TLS
    /// handshake): past this, the oldest of them is closed to make room
    /// (`tollgate_connections_evicted_total{server}`), so sockets opened and left
    /// silent never keep a real client out for longer than it takes to open more.
    pub pending_max: usize,
}

/// Open connections per client address, for [`Limits::per_peer_max`].
#[derive(Default)]
struct PeerCounts(RwLock<HashMap<IpAddr, usize>>);

/// A client address's place, given back when the connection ends.
struct PeerSlot {
    counts: Arc<PeerCounts>,
    ip: IpAddr,
}

impl PeerCounts {
    fn take(counts: &Arc<PeerCounts>, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut map = counts.0.write().ok()?;
        let open = map.entry(ip).or_default();
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(PeerSlot { counts: counts.clone(), ip })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.counts.0.write() {
            if let Some(open) = map.get_mut(&self.ip) {
                *open -= 1;
                if *open == 0 {
                    map.remove(&self.ip);
                }
            }
        }
    }
}

/// A node's graceful stop, shared by its proxy workers and its readiness answer:
/// once started, listeners stop accepting, idle connections close, and a connection
/// busy with a request closes after answering it (with `Connection: close`).
pub struct Drain {
    started: AtomicBool,
    signal: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Drain {
        Drain { started: AtomicBool::new(false), signal: watch::Sender::new(false) }
    }
}

impl Drain {
    pub fn start(&self) {
        self.started.store(true, Ordering::Relaxed);
        self.signal.send_replace(true);
    }

    /// Whether the stop began (one atomic load: read once per request).
    #[inline]
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// Turns true when the stop begins.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.signal.subscribe()
    }
}

/// The connections an accept loop started, to wait for after it stopped accepting.
pub struct Connections {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Connections {
    /// Returns once every connection's task has ended.
    pub async fn closed(self) {
        let max = u32::try_from(self.max).unwrap_or(u32::MAX);
        let _ = self.permits.acquire_many(max).await;
    }
}

/// A connection's places within its listener's [`Limits`]: its connection's task
/// holds it to the end.
pub struct Place {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _slot: Option<PeerSlot>,
}

/// Accepts connections until `shutdown` turns true and hands each to `on_connection`
/// with the `shutdown` receiver, within `limits`: the future it makes holds the
/// connection's [`Place`] until it ends, and is the connection's task (the future is
/// spawned as it is, not wrapped: a wrapping `async` block would hold it twice, and
/// the task's size is what an idle connection costs). The listener is closed on return; the connections go on, and
/// [`Connections::closed`] waits for them.
pub async fn accept_loop<C, Fut>(
    name: &'static str,
    listener: Listener,
    limits: Limits,
    on_connection: C,
    mut shutdown: watch::Receiver<bool>,
) -> Connections
where
    C: Fn(Stream, SocketAddr, watch::Receiver<bool>, Place) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    debug_assert!(limits.connections_max > 0 && limits.per_peer_max > 0);
    let permits = Arc::new(Semaphore::new(limits.connections_max));
    let open = Connections { permits: permits.clone(), max: limits.connections_max };
    let peers = Arc::new(PeerCounts::default());
    loop {
        let permit = tokio::select! {
            biased;
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return open,
            },
            _ = shutdown.wait_for(|stop| *stop) => return open,
        };
        let accepted = tokio::select! {
            biased;
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return open,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, server = name, "accept failed");
                continue;
            }
        };
        let slot = if limits.per_peer_max < limits.connections_max {
            let Some(slot) = PeerCounts::take(&peers, peer.ip(), limits.per_peer_max) else {
                tracing::debug!(%peer, server = name, "connection refused: too many from this address");
                metrics::counter!("tollgate_connections_refused_total", "server" => name).increment(1);
                continue;
            };
            Some(slot)
        } else {
            None
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(on_connection(stream, peer, shutdown.clone(), Place { _permit: permit, _slot: slot }));
    }
}

/// Where a listener's TLS configuration comes from (read per connection, so new
/// certificates apply to new connections).
pub type TlsSource = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;

/// An HTTP/1.1 server's settings.
#[derive(Clone)]
pub struct Http1Server {
    pub name: &'static str,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub tls: Option<TlsSource>,
}

/// Who sent a request: the address, and the certificate it presented (with TLS that
/// asks for one).
#[derive(Debug, Clone)]
pub struct Caller {
    pub address: SocketAddr,
    pub certificate: Option<CertificateDer<'static>>,
}

/// Connections that have not sent a first request yet, oldest first, each with the
/// means to close it.
struct Pending {
    queue: RwLock<std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>>,
    next: std::sync::atomic::AtomicU64,
    max: usize,
}

impl Pending {
    fn new(max: usize) -> Pending {
        Pending { queue: RwLock::default(), next: Default::default(), max }
    }

    /// Registers a new connection, closing the oldest pending one when full; the
    /// receiver fires if this one is closed so.
    fn enter(&self, name: &'static str) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (close, closed) = tokio::sync::oneshot::channel();
        if let Ok(mut queue) = self.queue.write() {
            while queue.len() >= self.max {
                let Some((_, oldest)) = queue.pop_front() else { break };
                let _ = oldest.send(());
                metrics::counter!("tollgate_connections_evicted_total", "server" => name).increment(1);
            }
            queue.push_back((id, close));
        }
        (id, closed)
    }

    /// The connection sent a request: it is no longer pending.
    fn leave(&self, id: u64) {
        if let Ok(mut queue) = self.queue.write() {
            if let Some(position) = queue.iter().position(|(pending, _)| *pending == id) {
                queue.remove(position);
            }
        }
    }
}

/// Serves `handler` over HTTP/1.1 on `listener` until `shutdown` turns true.
pub async fn serve_http1<H, Fut>(listener: Listener, server: Http1Server, handler: H, shutdown: watch::Receiver<bool>)
where
    H: Fn(Caller, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let Http1Server { name, limits, timeouts, tls } = server;
    let pending = Arc::new(Pending::new(limits.pending_max.max(1)));
    let on_connection =
        move |stream: Stream, address: SocketAddr, mut shutdown: watch::Receiver<bool>, place: Place| {
            let handler = handler.clone();
            let tls = tls.clone();
            let pending = pending.clone();
            async move {
                let _place = place;
                let (pending_id, evicted) = pending.enter(name);
                // Fires only when this connection is closed to make room (not when it
                // stops being pending).
                let evicted = async move {
                    if evicted.await.is_err() {
                        std::future::pending::<()>().await;
                    }
                };
                tokio::pin!(evicted);
                let accepted = async {
                    match tls {
                        None => Some((Box::new(stream) as Box<dyn Io>, None)),
                        Some(source) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(source());
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => {
                                    let certificate =
                                        stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()).cloned();
                                    Some((Box::new(stream) as Box<dyn Io>, certificate))
                                }
                                Ok(Err(error)) => {
                                    tracing::debug!(%error, %address, server = name, "tls handshake failed");
                                    metrics::counter!("tollgate_tls_handshake_failures_total", "server" => name)
                                        .increment(1);
                                    None
                                }
                                Err(_) => {
                                    tracing::debug!(%address, server = name, "tls handshake timed out");
                                    metrics::counter!("tollgate_tls_handshake_failures_total", "server" => name)
                                        .increment(1);
                                    None
                                }
                            }
                        }
                    }
                };
                let accepted = tokio::select! {
                    biased;
                    accepted = accepted => accepted,
                    _ = &mut evicted => None,
                };
                let Some((stream, certificate)) = accepted else {
                    pending.leave(pending_id);
                    return;
                };
                let (stream, state) = TimedIo::new(stream, timeouts, false);
                let caller = Caller { address, certificate };
                let first = pending.clone();
                let left = std::sync::atomic::AtomicBool::new(false);
                let service = hyper::service::service_fn(move |request| {
                    if !left.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        first.leave(pending_id);
                    }
                    state.request_started(false);
                    let guard = RequestGuard::new(Some(state.clone()));
                    let answer = handler(caller.clone(), request);
                    async move {
                        let response = answer.await;
                        drop(guard);
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    // `TimedIo` times headers and idle connections.
                    .header_read_timeout(None)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                tokio::select! {
                    biased;
                    result = connection => {
                        if let Err(error) = result {
                            tracing::debug!(%error, %address, server = name, "connection ended");
                        }
                    }
                    _ = &mut evicted => {
                        tracing::debug!(%address, server = name, "silent connection closed to make room");
                    }
                    _ = shutdown.wait_for(|stop| *stop) => {}
                }
                pending.leave(pending_id);
            }
        };
    accept_loop(name, listener, limits, on_connection, shutdown).await;
}
