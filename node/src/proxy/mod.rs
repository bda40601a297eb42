//! The data path: accept → parse → route → balancer → pooled upstream connection →
//! response. It reads only the published [`ProxySnapshot`]; nothing here waits on Raft
//! or takes a lock the control plane holds. `node/PROXY.md` walks through each step.
//!
//! One request lifecycle (`lifecycle.rs`: every policy decision, as phases) and two
//! codecs that call it: the direct HTTP/1.1 codec (`direct.rs`) for the common
//! request, the hyper adapter (`general.rs`) for everything else. This file holds
//! what both share: the compiled snapshot, the node's limits, the listener and its
//! workers, and the per-connection state.

pub mod balancer;
pub mod connect;
pub mod direct;
pub mod error;
pub mod general;
pub mod lifecycle;
pub mod path;
pub mod pool;
pub mod router;
pub mod service;
pub mod snapshot;
mod stop;
pub mod telemetry;
pub mod tls;
pub mod trusted;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::Request;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;

pub use self::snapshot::{CompiledConfig, ProxySnapshot, Published};
use crate::conn;

/// What the client gets: an upstream body (its errors boxed: a read timeout cuts it
/// off), or one the proxy made.
pub type ProxyBody = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request headers the proxy adds (`X-Forwarded-*`, `X-Real-IP`, `Via`, the request
/// id) and room for a few from plugins: reserved at once.
const REQUEST_HEADERS_ADDED: usize = 16;

/// Response headers the proxy adds (`Via`, the request id, two latencies).
const RESPONSE_HEADERS_ADDED: usize = 4;

/// What is sent upstream: the client's body, bounded, with its errors boxed.
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

/// Most proxy connections open at once per node.
pub const PROXY_CONNECTIONS_MAX: usize = 16 * 1024;
/// Request line and headers together, in bytes: 431 above (nginx's default is 4 × 8 KiB).
pub const HEADER_BYTES_MAX: usize = 32 * 1024;
/// Request headers, in number: 431 above.
pub const HEADERS_COUNT_MAX: usize = 100;
/// Concurrent streams one HTTP/2 client connection may open (nginx's default is 128).
pub const H2_STREAMS_MAX: u32 = 128;
/// Decoded HTTP/2 header list, in bytes (the HTTP/1 limit's counterpart).
pub const H2_HEADER_LIST_BYTES_MAX: u32 = HEADER_BYTES_MAX as u32;
/// Request target (path and query), in bytes: 414 above.
pub const URI_BYTES_MAX: usize = 8 * 1024;
/// Request body, in bytes: 413 above, from `Content-Length` before anything is sent
/// upstream, or when a streamed body passes it.
pub const BODY_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Upper bound on a service's `retries` on the data path, whatever the config says.
pub const RETRIES_MAX: u32 = 16;
/// A request body of at most this many bytes, with its length declared, is read
/// whole before it goes upstream when the service has `retries`, so that a failed
/// connection can be retried with it (nginx buffers request bodies too). Larger or
/// chunked bodies stream, and are not retried.
pub const RETRY_BODY_BYTES_MAX: u64 = 64 * 1024;
/// How long a client may take to send a body that is read whole: 408 after it.
pub const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);

pub const REQUEST_ID_HEADER: &str = "x-tollgate-request-id";

/// What every proxy worker of a node starts from.
#[derive(Clone)]
pub struct ProxySetup {
    pub published: Arc<Published>,
    pub access_log: Option<telemetry::AccessLog>,
    pub trusted_ips: Arc<trusted::TrustedIps>,
    pub timeouts: conn::Timeouts,
    /// Plugin state that outlives config changes (rate-limit counters, verified
    /// passwords), shared by the node's workers.
    pub plugin_state: Arc<crate::plugins::NodeState>,
    /// Targets the cluster knows are down (from the health checker).
    pub health: Arc<balancer::HealthView>,
    /// The node's proxy load, published by gossip.
    pub load: Arc<Load>,
    /// HTTP/1.1 requests take the direct path where they can (`--proxy-direct`).
    pub direct: bool,
    /// The node's graceful stop.
    pub drain: Arc<crate::serve::Drain>,
}

/// A node's proxy load, over all its workers.
#[derive(Default)]
pub struct Load {
    /// Requests being handled, until their response headers.
    pub in_flight: AtomicU64,
    /// Requests since start.
    pub requests: AtomicU64,
    /// Client connections accepted since start, and open now (`GET /status`'s
    /// `server`, as Kong reports nginx's).
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
}

/// A client connection counted in [`Load::connections_active`] while it lives.
struct OpenConnection(Arc<Load>);

impl OpenConnection {
    fn new(load: &Arc<Load>) -> OpenConnection {
        load.connections_accepted.fetch_add(1, Ordering::Relaxed);
        load.connections_active.fetch_add(1, Ordering::Relaxed);
        OpenConnection(load.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request id as Kong's (`X-Kong-Request-Id`, 16 random bytes in hex): 32 hex
/// digits, on the stack (the direct path writes it without allocating). The first 16
/// are drawn once per proxy (so two workers, two nodes or two runs of one node never
/// share them); the last 16 are the proxy's request sequence through a bijective mix,
/// so ids never repeat within a proxy and do not reveal how many requests it served.
pub struct RequestId {
    bytes: [u8; 32],
}

impl RequestId {
    fn new(prefix: u64, sequence: u64) -> RequestId {
        let mut id = RequestId { bytes: [0; 32] };
        id.put_hex(0, prefix);
        id.put_hex(16, mix(sequence));
        id
    }

    fn put_hex(&mut self, at: usize, value: u64) {
        for position in 0..16 {
            let nibble = (value >> ((15 - position) * 4)) & 0xf;
            self.bytes[at + position] = b"0123456789abcdef"[nibble as usize];
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes).unwrap_or("-")
    }

    pub fn header_value(&self) -> HeaderValue {
        lifecycle::request_id_value(self.as_str())
    }
}

/// splitmix64's finalizer: a bijection on 64 bits, so distinct sequences give distinct
/// ids.
fn mix(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Counts a request in flight until dropped.
struct InFlight<'a>(&'a Load);

impl<'a> InFlight<'a> {
    fn new(load: &'a Load) -> InFlight<'a> {
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        load.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(load)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Shared by every proxy connection of a node.
pub struct Proxy {
    published: Arc<Published>,
    trusted_ips: Arc<trusted::TrustedIps>,
    access_log: Option<telemetry::AccessLog>,
    clients: upstream::Clients,
    request_id_prefix: u64,
    request_counter: AtomicU64,
    timeouts: conn::Timeouts,
    plugin_state: Arc<crate::plugins::NodeState>,
    health: Arc<balancer::HealthView>,
    load: Arc<Load>,
    direct: bool,
    drain: Arc<crate::serve::Drain>,
    /// Requests answered by the direct path, and connections it handed to hyper.
    direct_requests: metrics::Counter,
    handoffs: metrics::Counter,
}

impl Proxy {
    pub fn new(setup: ProxySetup) -> Proxy {
        let ProxySetup { published, access_log, trusted_ips, timeouts, plugin_state, health, load, direct, drain } =
            setup;
        let clients = upstream::Clients::default();
        let request_counter = AtomicU64::new(0);
        Proxy {
            published,
            trusted_ips,
            access_log,
            clients,
            request_id_prefix: crate::env::random() as u64,
            request_counter,
            timeouts,
            plugin_state,
            health,
            load,
            direct,
            drain,
            direct_requests: metrics::counter!("tollgate_proxy_direct_requests_total"),
            handoffs: metrics::counter!("tollgate_proxy_handoffs_total"),
        }
    }

    fn next_request_id(&self) -> RequestId {
        RequestId::new(self.request_id_prefix, self.request_counter.fetch_add(1, Ordering::Relaxed))
    }
}

/// One client connection, shared by its requests: who it is, and header values made
/// once for all of them.
pub struct ClientConn {
    proxy: Arc<Proxy>,
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer's address, for `X-Forwarded-For` and `X-Real-IP`.
    peer_ip: HeaderValue,
    /// The listener's port, for `X-Forwarded-Port`.
    local_port: HeaderValue,
    /// The hyper adapter's connection timers (none on the direct codec, which has its
    /// own).
    state: Option<Arc<conn::ConnState>>,
    /// The direct path waits for a request (no request of this connection is being
    /// answered): a graceful stop may close it now.
    idle: std::sync::atomic::AtomicBool,
}

impl ClientConn {
    pub fn new(
        proxy: Arc<Proxy>,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        tls: bool,
        state: Option<Arc<conn::ConnState>>,
    ) -> ClientConn {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static(""));
        let port = local.map_or(if tls { 443 } else { 80 }, |local| local.port());
        ClientConn {
            proxy,
            peer,
            tls,
            peer_ip,
            local_port: HeaderValue::from(port),
            state,
            idle: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Whether this connection closes after the request being answered: a graceful
    /// stop began.
    #[inline]
    pub fn closing(&self) -> bool {
        self.proxy.drain.started()
    }

    /// Answers one request on this connection (the hyper adapter).
    pub async fn serve(&self, request: Request<Incoming>) -> http::Response<ProxyBody> {
        general::handle(self, request).await
    }
}

/// The proxy's listener, before its workers start: a TCP listener its worker threads
/// share, or under the simulator the environment's, served by one task.
pub enum Workers {
    Threads(std::net::TcpListener),
    Task(crate::env::Listener),
}

impl Workers {
    /// Binds with a listen `backlog` (std's bind would give 128).
    pub async fn bind(address: SocketAddr, backlog: u32) -> std::io::Result<Workers> {
        if crate::env::simulated() {
            return Ok(Workers::Task(crate::env::bind(address).await?));
        }
        let socket = socket2::Socket::new(socket2::Domain::for_address(address), socket2::Type::STREAM, None)?;
        // As std's bind does on Unix: a restarted node rebinds while old connections
        // linger in TIME_WAIT.
        socket.set_reuse_address(true)?;
        socket.bind(&address.into())?;
        socket.listen(backlog.min(i32::MAX as u32) as i32)?;
        Ok(Workers::Threads(socket.into()))
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Workers::Threads(listener) => listener.local_addr(),
            Workers::Task(listener) => listener.local_addr(),
        }
    }

    /// Starts the workers: threads (returned), or under the simulator one task on
    /// `tasks` (the simulator runs a node on one thread).
    pub fn spawn(
        self,
        workers: usize,
        tls: Option<Arc<rustls::ServerConfig>>,
        setup: ProxySetup,
        shutdown: watch::Receiver<bool>,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
        match self {
            Workers::Threads(listener) => spawn_workers(workers, listener, tls, setup, shutdown),
            Workers::Task(listener) => {
                tasks.spawn(serve(listener, tls, Arc::new(Proxy::new(setup)), shutdown));
                Ok(Vec::new())
            }
        }
    }
}

/// Starts `workers` proxy threads, each with its own single-threaded runtime and
/// upstream connection pool, all accepting on `listener` (nginx's worker model: no
/// work stealing or cross-thread wake-ups on the request path). They stop when
/// `shutdown` turns true.
fn spawn_workers(
    workers: usize,
    listener: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    setup: ProxySetup,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    debug_assert!(workers > 0);
    listener.set_nonblocking(true)?;
    let mut threads = Vec::with_capacity(workers);
    for worker in 0..workers {
        let listener = listener.try_clone()?;
        let setup = setup.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        let name = if tls.is_some() { format!("proxy-tls-{worker}") } else { format!("proxy-{worker}") };
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, worker, "cannot start a proxy worker runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        // Ends with the runtime, when serving does.
                        tokio::spawn(release_memory_periodically());
                        serve(crate::env::Listener::Tcp(listener), tls, Arc::new(Proxy::new(setup)), shutdown).await
                    }
                    Err(error) => tracing::error!(%error, worker, "cannot use the proxy listener"),
                }
            });
        })?;
        threads.push(thread);
    }
    Ok(threads)
}

/// How often each proxy worker lets the allocator return the memory of closed
/// connections to the system. mimalloc returns freed pages 1 s after they were freed,
/// but only from inside a later call into it: a worker whose connections all closed
/// makes no such call, and would keep a burst's memory for good.
pub const MEMORY_RELEASE_PERIOD: Duration = Duration::from_secs(1);

/// What a worker calls every [`MEMORY_RELEASE_PERIOD`]: set by the binary, which
/// chooses the allocator (nothing when unset, as in tests).
static RELEASE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what proxy workers call to return freed memory to the system (once).
pub fn set_memory_release(release: fn()) {
    let _ = RELEASE_MEMORY.set(release);
}

async fn release_memory_periodically() {
    let Some(release) = RELEASE_MEMORY.get() else { return };
    let mut ticks = tokio::time::interval(MEMORY_RELEASE_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        release();
    }
}

/// Resolves each handshake against the snapshot published at that moment.
#[derive(Debug)]
pub struct SnapshotResolver {
    published: Arc<Published>,
}

impl rustls::server::ResolvesServerCert for SnapshotResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = hello.server_name()?;
        self.published.load().proxy.certificates.find(name)
    }
}

/// The rustls server configuration of the TLS listener: TLS 1.2 and 1.3, ALPN h2 and
/// http/1.1, certificates from the snapshot.
pub fn server_config(published: Arc<Published>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SnapshotResolver { published }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Longest a TLS handshake may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves proxy traffic until the node drains (then until its connections have
/// closed) or `shutdown` turns true: HTTP/1.1 and h2c, or with `tls` HTTPS (HTTP/1.1
/// and h2 by ALPN).
pub async fn serve(
    listener: crate::env::Listener,
    tls: Option<Arc<rustls::ServerConfig>>,
    proxy: Arc<Proxy>,
    shutdown: watch::Receiver<bool>,
) {
    let local = listener.local_addr().ok();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let draining = proxy.drain.subscribe();
    let hard_stop = shutdown.clone();
    // The accept loop ends when draining begins; each connection stops early only at
    // the hard stop.
    let on_connection =
        move |stream: crate::env::Stream, peer: SocketAddr, _: watch::Receiver<bool>, place: crate::serve::Place| {
            let proxy = proxy.clone();
            let acceptor = acceptor.clone();
            let shutdown = hard_stop.clone();
            let open = OpenConnection::new(&proxy.load);
            async move {
                let _held = (open, place);
                match acceptor {
                    None => {
                        let accepted = Accepted { peer, local, tls: false, h2: false, proxy, shutdown };
                        serve_stream(stream, accepted).await
                    }
                    // Boxed: a TLS session's state is large, and plain connections'
                    // tasks should not carry room for it.
                    Some(acceptor) => {
                        Box::pin(async move {
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => {
                                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                                    serve_stream(stream, Accepted { peer, local, tls: true, h2, proxy, shutdown }).await
                                }
                                Ok(Err(error)) => tracing::debug!(%error, %peer, "tls handshake failed"),
                                Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                            }
                        })
                        .await
                    }
                }
            }
        };
    // No limit per client address: clients behind one NAT share it (nginx has none by
    // default either).
    let limits = crate::serve::Limits {
        connections_max: PROXY_CONNECTIONS_MAX,
        per_peer_max: PROXY_CONNECTIONS_MAX,
        pending_max: PROXY_CONNECTIONS_MAX,
    };
    let mut accepting = draining.clone();
    let mut shutdown = shutdown;
    tokio::select! {
        biased;
        _ = shutdown.wait_for(|stop| *stop) => {}
        _ = async move {
            let open = crate::serve::accept_loop("proxy", listener, limits, on_connection, draining).await;
            // Draining: the listener is closed; wait for the connections to finish.
            let _ = accepting.wait_for(|drain| *drain).await;
            open.closed().await;
        } => {}
    }
}

/// A client connection as accepted (after its TLS handshake), what serving it needs
/// besides its stream.
struct Accepted {
    peer: SocketAddr,
    local: Option<SocketAddr>,
    tls: bool,
    h2: bool,
    proxy: Arc<Proxy>,
    /// The node's hard stop.
    shutdown: watch::Receiver<bool>,
}

async fn serve_stream<S>(stream: S, mut accepted: Accepted)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + direct::ReadReady + Unpin + Send + 'static,
{
    let mut stream = stream;
    let mut prefix = bytes::BytesMut::new();
    let mut draining = accepted.proxy.drain.subscribe();
    if !accepted.h2 && accepted.proxy.direct {
        // The common request takes the direct path; the first one it leaves hands
        // the connection (and the bytes read of that request) to hyper below.
        let connection = ClientConn::new(accepted.proxy.clone(), accepted.peer, accepted.local, accepted.tls, None);
        // `None`: the node stops now. The future borrows the stream, so it ends with
        // this block, before the stream is closed or handed on.
        let outcome = {
            let serving = direct::serve(&mut stream, &connection);
            tokio::pin!(serving);
            let mut hard_stop = accepted.shutdown.clone();
            let signal = std::pin::pin!(stop_signal(&mut accepted.shutdown, &mut draining));
            match stop::unless(serving.as_mut(), signal).await {
                Ok(outcome) => Some(outcome),
                Err(Stop::Now) => None,
                // Idle between requests: closed now. Busy: the answer goes out with
                // `Connection: close` (direct::serve reads `closing`), then it ends.
                Err(Stop::Drain) if connection.idle.load(Ordering::Relaxed) => Some(direct::Outcome::Closed),
                Err(Stop::Drain) => stop::unless(serving, std::pin::pin!(turned_true(&mut hard_stop))).await.ok(),
            }
        };
        match outcome {
            None => return,
            Some(direct::Outcome::Closed) => {
                close_gracefully(&mut stream, accepted.tls).await;
                return;
            }
            Some(direct::Outcome::HandOff(read)) => prefix = read,
        }
    }
    // Boxed: hyper's connection state is large, and only handed-off and h2
    // connections need it, not every connection's task.
    Box::pin(serve_hyper(direct::Prefixed::new(prefix, stream), accepted, draining)).await
}

/// Serves a connection with hyper (HTTP/1.1 or h2) to its end.
async fn serve_hyper<S>(stream: direct::Prefixed<S>, accepted: Accepted, mut draining: watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Accepted { peer, local, tls, h2, proxy, mut shutdown } = accepted;
    let (stream, state) = conn::TimedIo::new(stream, proxy.timeouts, h2);
    let connection = Arc::new(ClientConn::new(proxy, peer, local, tls, Some(state)));
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let connection = connection.clone();
        // Boxed: on h2, hyper spawns a task per stream and moves this future (the whole
        // request's state, kilobytes) several times on the way; boxed, it moves once.
        Box::pin(async move { Ok::<_, std::convert::Infallible>(connection.serve(request).await) })
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        // `conn::TimedIo` times headers and idle connections (hyper's timer would
        // close without the 408).
        .header_read_timeout(None)
        .max_buf_size(HEADER_BYTES_MAX)
        .max_headers(HEADERS_COUNT_MAX);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(H2_STREAMS_MAX)
        .max_header_list_size(H2_HEADER_LIST_BYTES_MAX);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut hard_stop = shutdown.clone();
    let signal = std::pin::pin!(stop_signal(&mut shutdown, &mut draining));
    let result = match stop::unless(connection.as_mut(), signal).await {
        Ok(result) => result,
        Err(Stop::Now) => return,
        Err(Stop::Drain) => {
            // hyper closes an idle connection now, a busy one after its answers (h2:
            // GOAWAY, streams in progress finish).
            connection.as_mut().graceful_shutdown();
            match stop::unless(connection.as_mut(), std::pin::pin!(turned_true(&mut hard_stop))).await {
                Ok(result) => result,
                Err(()) => return,
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, %peer, "proxy connection ended");
    }
}

/// The longest a closing TLS connection waits to send its `close_notify`.
pub const CLOSE_NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);

/// Ends a connection the direct path is done with: over TLS with `close_notify` (then
/// the TCP FIN), as nginx does; OpenSSL 3 clients treat an end without it as an error
/// and never resume the session. A client that stops reading cannot hold it past
/// [`CLOSE_NOTIFY_TIMEOUT`]. Plain TCP needs nothing: dropping it sends the FIN.
async fn close_gracefully<S: tokio::io::AsyncWrite + Unpin>(stream: &mut S, tls: bool) {
    if tls {
        use tokio::io::AsyncWriteExt;
        let _ = tokio::time::timeout(CLOSE_NOTIFY_TIMEOUT, stream.shutdown()).await;
    }
}

/// Waits until `signal` turns true (or its sender is gone).
async fn turned_true(signal: &mut watch::Receiver<bool>) {
    let _ = signal.wait_for(|on| *on).await;
}

/// How the node asks a connection to end.
enum Stop {
    /// The hard stop: the connection ends now.
    Now,
    /// Draining: it ends after the request in progress.
    Drain,
}

/// Waits for the node's hard stop (first) or its draining.
async fn stop_signal(shutdown: &mut watch::Receiver<bool>, draining: &mut watch::Receiver<bool>) -> Stop {
    tokio::select! {
        biased;
        _ = turned_true(shutdown) => Stop::Now,
        _ = turned_true(draining) => Stop::Drain,
    }
}

#[cfg(test)]
mod request_id_tests {
    use super::RequestId;

    /// spec/02-integration/05-proxy/33-request-id-header_spec.lua:89 (`^[0-9a-f]+$`)
    /// and spec/03-plugins/11-correlation-id/01-access_spec.lua:486 (32 digits).
    #[test]
    fn request_ids_are_32_hex_digits_and_never_repeat_within_a_proxy() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|sequence| RequestId::new(0x2a, sequence).as_str().to_string()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{id}");
            assert!(id.starts_with("000000000000002a"), "{id}");
        }
        assert_ne!(RequestId::new(1, 0).as_str(), RequestId::new(2, 0).as_str());
    }
}
