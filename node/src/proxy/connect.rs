//! How the data path reaches upstreams, below any pool or codec: names resolved
//! through a TTL cache, sockets whose writes are timed, and a service's timeouts.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::client::legacy::connect::dns::Name;
use tokio::time::Instant;

/// A service's timeouts (Kong's fields), as both codecs apply them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// To open a connection (TCP, and TLS when the service has it).
    pub connect: Duration,
    /// Between two writes of the request to the upstream.
    pub write: Duration,
    /// Between two reads from the upstream, response head and body.
    pub read: Duration,
}

/// How long a resolved name is used before it is looked up again. The system
/// resolver (`getaddrinfo`) does not report record TTLs, so this is one setting for
/// every name (Kong's `dns_valid_ttl`).
pub const DNS_TTL: Duration = Duration::from_secs(30);
/// How long past its TTL an answer may still be used while a fresh lookup runs, or
/// when lookups fail (Kong's `dns_stale_ttl`).
pub const DNS_STALE_MAX: Duration = Duration::from_secs(3600);
/// Names one worker's DNS cache holds; past this it starts over.
pub const DNS_CACHE_ENTRIES_MAX: usize = 4096;

/// An upstream socket whose writes fail when one makes no progress for the write
/// timeout in force (Kong's `write_timeout`, nginx's `proxy_send_timeout`). Reads are
/// not timed here: an idle pooled connection waits for reads legitimately; the
/// response is timed by the request (`general.rs`). The timeout is shared with the
/// pool, which sets it for each exchange a pooled connection carries.
pub struct WriteTimed<S> {
    inner: S,
    timeout_ms: Arc<AtomicU64>,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteTimed<S> {
    pub fn new(inner: S, timeout_ms: Arc<AtomicU64>) -> WriteTimed<S> {
        WriteTimed { inner, timeout_ms, stalled: None }
    }

    /// A write is pending: fails once it has been pending for the timeout.
    fn stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed));
        let sleep = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.stalled = None;
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "upstream write timed out")))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, polled: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.stall(cx),
        }
    }
}

/// Whether an error (or one it wraps) is a timeout of [`WriteTimed`] or of a read.
pub fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if current.downcast_ref::<io::Error>().is_some_and(|io| io.kind() == io::ErrorKind::TimedOut) {
            return true;
        }
        cause = current.source();
    }
    false
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteTimed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteTimed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Looks a name up; the system resolver in production, a fake in tests.
pub type Lookup =
    Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>> + Send + Sync>;

/// Resolved names with their age. A fresh answer is used as is; a stale one (up to
/// [`DNS_STALE_MAX`] past [`DNS_TTL`]) is used while one lookup refreshes it in the
/// background, and kept when lookups fail. Only a name never resolved (or too stale)
/// waits for a lookup.
#[derive(Clone)]
pub struct DnsCache {
    entries: Arc<ArcSwap<HashMap<String, Arc<DnsEntry>>>>,
    lookup: Lookup,
}

pub struct DnsEntry {
    addresses: Arc<[SocketAddr]>,
    resolved_at: Instant,
    refreshing: AtomicBool,
}

impl DnsCache {
    pub fn system() -> DnsCache {
        DnsCache::with_lookup(Arc::new(|name: String| {
            Box::pin(async move {
                let ips = crate::dns::lookup(&name).await?;
                Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect())
            })
        }))
    }

    pub fn with_lookup(lookup: Lookup) -> DnsCache {
        DnsCache { entries: Arc::default(), lookup }
    }

    /// The addresses of `name` (port 0: the connector sets the port).
    pub async fn resolve(&self, name: &str) -> io::Result<Arc<[SocketAddr]>> {
        let cached = self.entries.load().get(name).cloned();
        if let Some(entry) = &cached {
            let age = entry.resolved_at.elapsed();
            if age < DNS_TTL {
                return Ok(entry.addresses.clone());
            }
            if age < DNS_TTL + DNS_STALE_MAX {
                if !entry.refreshing.swap(true, Ordering::Relaxed) {
                    let cache = self.clone();
                    let name = name.to_string();
                    let entry = entry.clone();
                    tokio::spawn(async move {
                        if let Err(error) = cache.refresh(&name).await {
                            tracing::debug!(%error, name, "dns refresh failed; the stale answer stays");
                            entry.refreshing.store(false, Ordering::Relaxed);
                        }
                    });
                }
                return Ok(entry.addresses.clone());
            }
        }
        self.refresh(name).await
    }

    async fn refresh(&self, name: &str) -> io::Result<Arc<[SocketAddr]>> {
        let addresses: Arc<[SocketAddr]> = (self.lookup)(name.to_string()).await?.into();
        if addresses.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{name}: no addresses")));
        }
        let entry =
            Arc::new(DnsEntry { addresses: addresses.clone(), resolved_at: Instant::now(), refreshing: false.into() });
        self.entries.rcu(|entries| {
            let mut entries = if entries.len() >= DNS_CACHE_ENTRIES_MAX { HashMap::new() } else { (**entries).clone() };
            entries.insert(name.to_string(), entry.clone());
            entries
        });
        Ok(addresses)
    }
}

impl tower_service::Service<Name> for DnsCache {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let cache = self.clone();
        Box::pin(async move { Ok(cache.resolve(name.as_str()).await?.to_vec().into_iter()) })
    }
}

/// A TCP connection to `uri`'s authority: a name through the DNS cache, Nagle off
/// (`tcp`), or the simulator's network under the simulator ([`crate::env`]).
pub async fn dial(
    tcp: &hyper_util::client::legacy::connect::HttpConnector<DnsCache>,
    uri: http::Uri,
) -> Result<crate::env::Stream, super::BoxError> {
    use tower_service::Service;
    if crate::env::simulated() {
        let authority = uri.authority().map(|authority| authority.as_str()).unwrap_or_default();
        return Ok(crate::env::connect(authority).await?);
    }
    Ok(crate::env::Stream::Tcp(tcp.clone().call(uri).await?.into_inner()))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn counting_cache(answers: Arc<ArcSwap<Option<SocketAddr>>>) -> (DnsCache, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let cache = DnsCache::with_lookup(Arc::new(move |_name| {
            counter.fetch_add(1, Ordering::SeqCst);
            let answer = **answers.load();
            Box::pin(async move {
                answer.map(|address| vec![address]).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "down"))
            })
        }));
        (cache, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_answers_are_cached_stale_ones_refresh_in_the_background() {
        let first: SocketAddr = "10.0.0.1:0".parse().unwrap();
        let second: SocketAddr = "10.0.0.2:0".parse().unwrap();
        let answers = Arc::new(ArcSwap::from_pointee(Some(first)));
        let (cache, calls) = counting_cache(answers.clone());

        assert_eq!(&*cache.resolve("api.internal").await.unwrap(), &[first]);
        assert_eq!(&*cache.resolve("api.internal").await.unwrap(), &[first]);
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a fresh answer is not looked up again");

        answers.store(Arc::new(Some(second)));
        tokio::time::advance(DNS_TTL + Duration::from_secs(1)).await;
        // Stale: the old answer serves at once while one refresh runs.
        assert_eq!(&*cache.resolve("api.internal").await.unwrap(), &[first]);
        assert_eq!(&*cache.resolve("api.internal").await.unwrap(), &[first]);
        tokio::task::yield_now().await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one background refresh for many stale reads");
        assert_eq!(&*cache.resolve("api.internal").await.unwrap(), &[second]);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_lookups_keep_the_stale_answer_until_it_is_too_old() {
        let first: SocketAddr = "10.0.0.1:0".parse().unwrap();
        let answers = Arc::new(ArcSwap::from_pointee(Some(first)));
        let (cache, _calls) = counting_cache(answers.clone());
        cache.resolve("api.internal").await.unwrap();

        answers.store(Arc::new(None));
        tokio::time::advance(DNS_TTL * 2).await;
        assert_eq!(&*cache.resolve("api.internal").await.unwrap(), &[first]);
        tokio::task::yield_now().await;
        assert_eq!(&*cache.resolve("api.internal").await.unwrap(), &[first], "kept after a failed refresh");

        tokio::time::advance(DNS_STALE_MAX).await;
        assert!(cache.resolve("api.internal").await.is_err(), "too stale to use, and the lookup fails");
        assert!(cache.resolve("never.resolved").await.is_err());
    }
}
