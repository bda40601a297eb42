//! The environment seam: how a node listens, dials, draws random ids, runs blocking
//! work and spawns its proxy workers. The wall clock is the other half of it
//! ([`crate::clock`]), storage the third (`raft-store`'s `store::install_storage`).
//!
//! A production node never installs an environment: it binds TCP listeners, dials
//! with TCP, draws ids from the system's randomness, runs blocking work on tokio's
//! blocking pool and its proxy workers on threads of their own, as before. The
//! simulator installs one [`Environment`] for the whole process before any node
//! starts; its answers depend on the simulated host they are called from, so every
//! node of a simulated cluster runs the same [`crate::startup::start`] on simulated
//! sockets, on one thread, with ids drawn from the seed.
//!
//! Listeners and streams are enums rather than trait objects: the TCP arm is what
//! production runs, and costs one predictable branch per read or write.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream the environment hands out.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A listener the environment hands out.
pub trait Listen: Send + Sync + 'static {
    fn accept(&self) -> BoxFuture<io::Result<(Box<dyn Io>, SocketAddr)>>;
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// A datagram socket the environment hands out (gossip).
pub trait Datagrams: Send + Sync + 'static {
    fn send_to(&self, datagram: Vec<u8>, to: SocketAddr) -> BoxFuture<io::Result<()>>;
    fn recv_from(&self) -> BoxFuture<io::Result<(Vec<u8>, SocketAddr)>>;
}

/// What the simulator provides in place of the operating system.
pub trait Environment: Send + Sync + 'static {
    fn bind(&self, address: SocketAddr) -> BoxFuture<io::Result<Box<dyn Listen>>>;
    /// Dials `address` (`host:port`, a name the environment resolves).
    fn connect(&self, address: String) -> BoxFuture<io::Result<Box<dyn Io>>>;
    fn bind_udp(&self, address: SocketAddr) -> BoxFuture<io::Result<Box<dyn Datagrams>>>;
    /// 128 random bits (entity ids, generated keys, request ids).
    fn random(&self) -> u128;
    /// The address `name` resolves to (a node's advertised `host:port`).
    fn resolve(&self, name: &str) -> io::Result<SocketAddr>;
}

static INSTALLED: OnceLock<Box<dyn Environment>> = OnceLock::new();

/// Makes every node of this process run in `environment`. Once per process, before
/// any node starts: a second one is refused.
pub fn install(environment: Box<dyn Environment>) -> Result<(), &'static str> {
    INSTALLED.set(environment).map_err(|_| "an environment is already installed in this process")
}

/// Whether this process runs under the simulator: blocking work runs inline, proxy
/// workers are tasks, gossip is the deterministic kind (`gossip.rs`).
#[inline]
pub fn simulated() -> bool {
    INSTALLED.get().is_some()
}

/// A listener bound to `address`.
pub async fn bind(address: SocketAddr) -> io::Result<Listener> {
    match INSTALLED.get() {
        Some(environment) => Ok(Listener::Other(environment.bind(address).await?)),
        None => Ok(Listener::Tcp(tokio::net::TcpListener::bind(address).await?)),
    }
}

/// A stream to `address` (`host:port`, the name looked up by [`crate::dns`]), with
/// Nagle off.
pub async fn connect(address: &str) -> io::Result<Stream> {
    if INSTALLED.get().is_some() {
        return connect_to(address).await;
    }
    let addresses = resolve_all(address).await?;
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, format!("{address} has no address"));
    for address in addresses {
        match connect_to(address).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// [`connect`] to a socket address.
pub async fn connect_addr(address: SocketAddr) -> io::Result<Stream> {
    connect_to(address).await
}

async fn connect_to<A: tokio::net::ToSocketAddrs + std::fmt::Display>(address: A) -> io::Result<Stream> {
    match INSTALLED.get() {
        Some(environment) => Ok(Stream::Other(environment.connect(address.to_string()).await?)),
        None => {
            let stream = tokio::net::TcpStream::connect(address).await?;
            let _ = stream.set_nodelay(true);
            Ok(Stream::Tcp(stream))
        }
    }
}

/// The first address `name` (`host:port`) resolves to.
pub async fn resolve(name: &str) -> io::Result<SocketAddr> {
    match INSTALLED.get() {
        Some(environment) => environment.resolve(name),
        None => resolve_all(name)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name} has no address"))),
    }
}

/// Every address of `host:port`, IPv4 first ([`crate::dns`]).
async fn resolve_all(address: &str) -> io::Result<Vec<SocketAddr>> {
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{address}: expected host:port")))?;
    let mut ips = crate::dns::lookup(host).await?;
    ips.sort_by_key(|ip| ip.is_ipv6());
    Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect())
}

/// The simulator's datagram socket (only the simulator's gossip asks for one).
pub async fn bind_udp(address: SocketAddr) -> io::Result<Box<dyn Datagrams>> {
    match INSTALLED.get() {
        Some(environment) => environment.bind_udp(address).await,
        None => Err(io::Error::new(io::ErrorKind::Unsupported, "datagrams through the environment are simulated only")),
    }
}

/// 128 random bits: the system's, or the seed's under the simulator.
pub fn random() -> u128 {
    match INSTALLED.get() {
        Some(environment) => environment.random(),
        None => u128::from_be_bytes(*uuid::Uuid::new_v4().as_bytes()),
    }
}

/// A random (version 4) UUID drawn from [`random`].
pub fn uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(random().to_be_bytes()).into_uuid()
}

/// Runs `work` on the blocking pool, or inline under the simulator (whose one thread
/// must not hand work to threads it does not schedule).
pub async fn blocking<T, F>(work: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if simulated() {
        return Ok(work());
    }
    tokio::task::spawn_blocking(work).await.map_err(io::Error::other)
}

/// A listener: TCP, or the environment's.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Other(Box<dyn Listen>),
}

impl Listener {
    pub async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        match self {
            Listener::Tcp(listener) => listener.accept().await.map(|(stream, peer)| (Stream::Tcp(stream), peer)),
            Listener::Other(listener) => listener.accept().await.map(|(stream, peer)| (Stream::Other(stream), peer)),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Tcp(listener) => listener.local_addr(),
            Listener::Other(listener) => listener.local_addr(),
        }
    }
}

/// A connection: TCP, or the environment's.
pub enum Stream {
    Tcp(tokio::net::TcpStream),
    Other(Box<dyn Io>),
}

impl Stream {
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(stream) => stream.set_nodelay(nodelay),
            Stream::Other(_) => Ok(()),
        }
    }

    /// Whether the stream has something to read (or has closed) right now: a pooled
    /// connection that does was closed or sent garbage while idle. The environment's
    /// streams cannot tell without reading and answer false.
    pub fn poll_read_ready(&self, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(stream) => stream.poll_read_ready(context),
            Stream::Other(_) => Poll::Pending,
        }
    }
}

impl AsyncRead for Stream {
    #[inline]
    fn poll_read(self: Pin<&mut Self>, context: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_read(context, buf),
            Stream::Other(stream) => Pin::new(stream).poll_read(context, buf),
        }
    }
}

impl AsyncWrite for Stream {
    #[inline]
    fn poll_write(self: Pin<&mut Self>, context: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_write(context, data),
            Stream::Other(stream) => Pin::new(stream).poll_write(context, data),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_write_vectored(context, buffers),
            Stream::Other(stream) => Pin::new(stream).poll_write_vectored(context, buffers),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(stream) => stream.is_write_vectored(),
            Stream::Other(stream) => stream.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_flush(context),
            Stream::Other(stream) => Pin::new(stream).poll_flush(context),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(stream) => Pin::new(stream).poll_shutdown(context),
            Stream::Other(stream) => Pin::new(stream).poll_shutdown(context),
        }
    }
}
