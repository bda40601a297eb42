//! proxy-cache (Kong priority 100) with the memory strategy: responses kept per node.
//!
//! Key: SHA-256 of route, consumer, method, path (lower-cased with
//! `ignore_uri_case`), the query arguments (all, or `vary_query_params`, sorted) and
//! the `vary_headers` values. A fresh entry answers the request itself
//! (`X-Cache-Status: Hit`, `Age`); otherwise the upstream's response is stored while
//! it streams to the client (`Miss`) when its status, content type and (with
//! `cache_control`) `Cache-Control` allow, or passed on untouched (`Bypass`).
//! The node holds at most [`CACHE_BYTES_MAX`]; past it the least recently used
//! entries go. `DELETE /proxy-cache` and `DELETE /proxy-cache/{key}` on a node's Admin
//! API purge that node's cache (the memory strategy is per node, as in Kong).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body::{Body, Frame, SizeHint};
use ring::digest;
use tollgate_raft_store::plugins::ProxyCacheConfig;

use super::{Ctx, Env, Exit, Flow, Phases, Plugin, RequestView};

/// Bytes of cached responses a node holds (Kong's default cache dictionary is 128 MiB).
pub const CACHE_BYTES_MAX: usize = 128 * 1024 * 1024;
/// Largest response stored; larger ones stream through uncached.
pub const CACHE_OBJECT_BYTES_MAX: usize = 4 * 1024 * 1024;

const X_CACHE_STATUS: HeaderName = HeaderName::from_static("x-cache-status");
const X_CACHE_KEY: HeaderName = HeaderName::from_static("x-cache-key");

/// One stored response.
pub struct Cached {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    stored_at_ms: u64,
    /// Seconds.
    ttl: u64,
    last_used: AtomicU64,
}

impl Cached {
    fn size(&self) -> usize {
        self.body.len() + self.headers.iter().map(|(n, v)| n.as_str().len() + v.len()).sum::<usize>() + 64
    }
}

/// A node's cached responses.
#[derive(Default)]
pub struct ResponseCache {
    entries: RwLock<HashMap<String, Arc<Cached>>>,
    bytes: AtomicUsize,
    tick: AtomicU64,
}

impl ResponseCache {
    fn get(&self, key: &str) -> Option<Arc<Cached>> {
        let entry = self.entries.read().ok()?.get(key).cloned()?;
        if crate::clock::wall_ms() >= entry.stored_at_ms + entry.ttl * 1000 {
            self.remove(key);
            return None;
        }
        entry.last_used.store(self.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        Some(entry)
    }

    fn insert(&self, key: String, cached: Cached) {
        let size = cached.size();
        let Ok(mut entries) = self.entries.write() else { return };
        if let Some(old) = entries.insert(key, Arc::new(cached)) {
            self.bytes.fetch_sub(old.size(), Ordering::Relaxed);
        }
        let total = self.bytes.fetch_add(size, Ordering::Relaxed) + size;
        if total > CACHE_BYTES_MAX {
            // Least recently used first, down to 90% of the bound.
            let mut order: Vec<(u64, String)> =
                entries.iter().map(|(key, entry)| (entry.last_used.load(Ordering::Relaxed), key.clone())).collect();
            order.sort_unstable();
            let mut total = total;
            for (_, key) in order {
                if total <= CACHE_BYTES_MAX / 10 * 9 {
                    break;
                }
                if let Some(entry) = entries.remove(&key) {
                    total -= entry.size();
                    self.bytes.fetch_sub(entry.size(), Ordering::Relaxed);
                }
            }
        }
    }

    /// Removes one entry; `true` when there was one.
    pub fn remove(&self, key: &str) -> bool {
        let Ok(mut entries) = self.entries.write() else { return false };
        match entries.remove(key) {
            Some(entry) => {
                self.bytes.fetch_sub(entry.size(), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    pub fn clear(&self) {
        if let Ok(mut entries) = self.entries.write() {
            entries.clear();
            self.bytes.store(0, Ordering::Relaxed);
        }
    }

    /// An entry's description for `GET /proxy-cache/{key}`.
    pub fn describe(&self, key: &str) -> Option<serde_json::Value> {
        let entry = self.entries.read().ok()?.get(key).cloned()?;
        Some(serde_json::json!({
            "key": key,
            "status": entry.status.as_u16(),
            "body_size": entry.body.len(),
            "stored_at": entry.stored_at_ms / 1000,
            "ttl": entry.ttl,
        }))
    }
}

/// A miss whose response may be stored: decided in `header_filter`.
pub struct Pending {
    key: String,
    config: Arc<ProxyCacheConfig>,
}

/// A response being stored while it streams: the key and its time to live.
pub struct Store {
    pub key: String,
    pub ttl: u64,
}

pub struct ProxyCache {
    config: Arc<ProxyCacheConfig>,
    vary_headers: Vec<HeaderName>,
}

impl ProxyCache {
    pub fn new(config: ProxyCacheConfig) -> Result<ProxyCache, String> {
        let vary_headers = config
            .vary_headers
            .iter()
            .flatten()
            .map(|name| HeaderName::from_bytes(name.as_bytes()).map_err(|error| error.to_string()))
            .collect::<Result<_, _>>()?;
        Ok(ProxyCache { config: Arc::new(config), vary_headers })
    }

    fn key(&self, ctx: &Ctx, request: &RequestView<'_>) -> String {
        let mut context = digest::Context::new(&digest::SHA256);
        let mut part = |bytes: &[u8]| {
            context.update(bytes);
            context.update(b"|");
        };
        part(ctx.route.map(|id| id.to_string()).unwrap_or_default().as_bytes());
        part(ctx.consumer.as_ref().map(|c| c.id.to_string()).unwrap_or_default().as_bytes());
        part(request.method.as_str().as_bytes());
        if self.config.ignore_uri_case {
            part(request.path.to_ascii_lowercase().as_bytes());
        } else {
            part(request.path.as_bytes());
        }
        let mut arguments: Vec<&str> = request
            .query
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .filter(|pair| {
                let name = pair.split_once('=').map_or(*pair, |(name, _)| name);
                self.config.vary_query_params.as_ref().is_none_or(|wanted| wanted.iter().any(|w| w == name))
            })
            .collect();
        arguments.sort_unstable();
        part(arguments.join("&").as_bytes());
        for name in &self.vary_headers {
            let value = request.headers.get(name).map(HeaderValue::as_bytes).unwrap_or_default();
            part(value);
        }
        crate::text::hex(context.finish().as_ref())
    }
}

/// The `Cache-Control` directives of a header map, lower-cased.
fn directives(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .collect()
}

impl Plugin for ProxyCache {
    fn phases(&self) -> Phases {
        // The stored copy is made from the response head and body.
        Phases { rewrite: false, header_filter: true, response_body: true }
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, env: &Env<'_>) -> Flow {
        let bypass = |ctx: &mut Ctx| {
            ctx.response_headers.push((X_CACHE_STATUS, HeaderValue::from_static("Bypass")));
            Flow::Continue
        };
        if !self.config.request_method.iter().any(|m| m == request.method.as_str()) {
            return bypass(ctx);
        }
        if self.config.cache_control {
            let asked = directives(request.headers);
            if asked.iter().any(|d| d == "no-store" || d == "no-cache") {
                return bypass(ctx);
            }
        }
        let key = self.key(ctx, request);
        if let Some(cached) = env.cache.get(&key) {
            let mut headers = cached.headers.clone();
            let show = &self.config.response_headers;
            if show.x_cache_status {
                headers.push((X_CACHE_STATUS, HeaderValue::from_static("Hit")));
            }
            if show.x_cache_key {
                headers.push((X_CACHE_KEY, HeaderValue::from_str(&key).unwrap_or(HeaderValue::from_static(""))));
            }
            if show.age {
                headers.push((
                    http::header::AGE,
                    HeaderValue::from(crate::clock::wall_ms().saturating_sub(cached.stored_at_ms) / 1000),
                ));
            }
            return Flow::Exit(Exit { status: cached.status, body: cached.body.clone(), headers });
        }
        ctx.cache_pending = Some(Pending { key, config: self.config.clone() });
        Flow::Continue
    }

    fn header_filter(&self, ctx: &mut Ctx, status: StatusCode, headers: &mut HeaderMap) {
        let Some(pending) = ctx.cache_pending.take() else { return };
        let config = &pending.config;
        let content_type = headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let content_type = content_type.split(';').next().unwrap_or_default().trim();
        let mut ttl = config.cache_ttl;
        let mut storable = config.response_code.contains(&status.as_u16())
            && config.content_type.iter().any(|wanted| wanted == content_type || wanted == "*/*")
            && headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                .is_none_or(|length| length <= CACHE_OBJECT_BYTES_MAX);
        if config.cache_control {
            for directive in directives(headers) {
                if ["no-store", "no-cache", "private"].contains(&directive.as_str()) {
                    storable = false;
                }
                let max_age = directive.strip_prefix("s-maxage=").or_else(|| directive.strip_prefix("max-age="));
                if let Some(seconds) = max_age.and_then(|s| s.parse::<u64>().ok()) {
                    ttl = seconds;
                }
            }
            storable &= ttl > 0;
        }
        let show = &config.response_headers;
        if show.x_cache_status {
            let value = if storable { "Miss" } else { "Bypass" };
            headers.insert(X_CACHE_STATUS, HeaderValue::from_static(value));
        }
        if storable {
            if show.x_cache_key {
                if let Ok(value) = HeaderValue::from_str(&pending.key) {
                    headers.insert(X_CACHE_KEY, value);
                }
            }
            ctx.cache_store = Some(Store { key: pending.key, ttl: config.storage_ttl.unwrap_or(ttl).max(1) });
        }
    }
}

/// A response body that stores what it passes in the cache when it ends whole.
pub struct CacheTee<B> {
    inner: B,
    buffer: Option<BytesMut>,
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    store: Option<Store>,
    state: Arc<super::NodeState>,
}

impl<B> CacheTee<B> {
    pub fn new(inner: B, status: StatusCode, headers: &HeaderMap, store: Store, state: Arc<super::NodeState>) -> Self {
        // Hop-by-hop and per-answer headers are not replayed from the cache.
        let skip = [
            "x-cache-status",
            "x-cache-key",
            "age",
            "date",
            "x-tollgate-request-id",
            "x-tollgate-upstream-latency",
            "x-tollgate-proxy-latency",
            "via",
        ];
        let headers = headers
            .iter()
            .filter(|(name, _)| !skip.contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        CacheTee { inner, buffer: Some(BytesMut::new()), status, headers, store: Some(store), state }
    }
}

impl<B> CacheTee<B> {
    /// The whole body went through: store it.
    fn finish(&mut self) {
        let (Some(buffer), Some(store)) = (self.buffer.take(), self.store.take()) else { return };
        let cached = Cached {
            status: self.status,
            headers: std::mem::take(&mut self.headers),
            body: buffer.freeze(),
            stored_at_ms: crate::clock::wall_ms(),
            ttl: store.ttl,
            last_used: AtomicU64::new(self.state.cache.tick.fetch_add(1, Ordering::Relaxed)),
        };
        self.state.cache.insert(store.key, cached);
    }
}

impl<B> Body for CacheTee<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(buffer)) = (frame.data_ref(), self.buffer.as_mut()) {
                    if buffer.len() + data.len() > CACHE_OBJECT_BYTES_MAX {
                        self.buffer = None;
                    } else {
                        buffer.extend_from_slice(data);
                    }
                }
                // hyper stops polling once the body says it has ended.
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None) => self.finish(),
            Poll::Ready(Some(Err(_))) => self.buffer = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
