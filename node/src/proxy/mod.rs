//! The data path: accept → parse → route → balancer → pooled upstream connection →
//! response. It reads only the published [`ProxySnapshot`]; nothing here waits on Raft
//! or takes a lock the control plane holds. `node/PROXY.md` walks through each step.

pub mod balancer;
pub mod direct;
pub mod path;
pub mod pool;
pub mod router;
pub mod telemetry;
pub mod tls;
pub mod trusted;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONNECTION, HOST};
use http::uri::Scheme;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tollgate_raft_store::state::ConfigState;
use tollgate_raft_store::EntityKind;
use uuid::Uuid;

use self::balancer::{BalanceKey, Balancer, HashOn, Target};
use self::router::{strip_port, CompiledService, RequestView, Router, Services};
use crate::conn;
use crate::publish::Published;

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;
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
const VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 tollgate");
const REQUEST_ID_NAME: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
const UPSTREAM_LATENCY_NAME: HeaderName = HeaderName::from_static("x-tollgate-upstream-latency");
const PROXY_LATENCY_NAME: HeaderName = HeaderName::from_static("x-tollgate-proxy-latency");

/// What the data path reads, compiled from one applied config.
#[derive(Default)]
pub struct ProxySnapshot {
    pub router: Router,
    pub services: Services,
    /// Upstreams by name, with their targets in rotation.
    pub upstreams: HashMap<String, Arc<balancer::Upstream>>,
    /// Certificates by SNI name, for the TLS listener.
    pub certificates: tls::Certificates,
    /// Metric handles per route id, and for requests no route matched.
    pub route_metrics: crate::plugins::IdMap<Uuid, Arc<telemetry::RouteMetrics>>,
    pub unmatched_metrics: Option<Arc<telemetry::RouteMetrics>>,
    /// Plugin instances by scope, consumers and credentials.
    pub plugins: crate::plugins::Plugins,
}

impl ProxySnapshot {
    pub fn compile(state: &ConfigState) -> ProxySnapshot {
        let router = Router::compile(state.table(EntityKind::Route).values().map(|route| &**route));
        let mut targets_by_upstream: HashMap<Uuid, Vec<Target>> = HashMap::new();
        for target in state.table(EntityKind::Target).values() {
            let Some(upstream) = tollgate_raft_store::state::foreign_id(target, "upstream") else { continue };
            let address = balancer::target_address(target.get("target").and_then(Value::as_str).unwrap_or_default());
            let weight = target.get("weight").and_then(Value::as_u64).unwrap_or(100) as u32;
            targets_by_upstream.entry(upstream).or_default().push(Target::new(address, weight));
        }
        let upstreams: HashMap<String, Arc<balancer::Upstream>> = state
            .table(EntityKind::Upstream)
            .values()
            .filter_map(|upstream| {
                let name = upstream.get("name").and_then(Value::as_str)?.to_ascii_lowercase();
                let id = tollgate_raft_store::state::entity_id(upstream);
                let mut targets = targets_by_upstream.remove(&id).unwrap_or_default();
                targets.sort_by(|a, b| a.address.cmp(&b.address));
                let text = |field: &str| upstream.get(field).and_then(Value::as_str);
                let hash_on = HashOn::from_config(
                    text("hash_on").unwrap_or("none"),
                    text("hash_on_header"),
                    text("hash_on_cookie"),
                    text("hash_on_query_arg"),
                );
                let hash_fallback = HashOn::from_config(
                    text("hash_fallback").unwrap_or("none"),
                    text("hash_fallback_header"),
                    text("hash_on_cookie"),
                    text("hash_fallback_query_arg"),
                );
                let algorithm = text("algorithm").unwrap_or("round-robin");
                let balancer = Balancer::new(algorithm, targets, hash_on, hash_fallback);
                let passive = balancer::passive_checks_on(upstream.get("healthchecks"));
                Some((name, Arc::new(balancer::Upstream::new(id, balancer, passive))))
            })
            .collect();
        let services = state
            .table(EntityKind::Service)
            .values()
            .map(|service| {
                let compiled = CompiledService::compile(service);
                let balancer = upstreams.get(&compiled.host.to_ascii_lowercase()).cloned();
                let direct = format!("{}:{}", compiled.host, compiled.port);
                let host_header = if balancer.is_some() || compiled.port == 80 { &compiled.host } else { &direct };
                let compiled = CompiledService {
                    transport: upstream::Transport::for_service(service, state),
                    authority: http::uri::Authority::try_from(direct.as_str()).ok(),
                    host_header: HeaderValue::from_str(host_header).ok(),
                    balancer,
                    ..compiled
                };
                (compiled.id, Arc::new(compiled))
            })
            .collect();
        let label = |entity: &serde_json::Map<String, Value>| {
            entity
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| tollgate_raft_store::state::entity_id(entity).to_string())
        };
        let route_metrics = state
            .table(EntityKind::Route)
            .values()
            .map(|route| {
                let service = tollgate_raft_store::state::foreign_id(route, "service")
                    .and_then(|id| state.table(EntityKind::Service).get(&id).map(|service| label(service)))
                    .unwrap_or_default();
                let id = tollgate_raft_store::state::entity_id(route);
                (id, Arc::new(telemetry::RouteMetrics::register(&service, &label(route))))
            })
            .collect();
        ProxySnapshot {
            router,
            services,
            upstreams,
            certificates: tls::Certificates::compile(state),
            route_metrics,
            unmatched_metrics: Some(Arc::new(telemetry::RouteMetrics::register("", ""))),
            plugins: crate::plugins::Plugins::compile(state),
        }
    }
}

/// What every proxy worker of a node starts from.
#[derive(Clone)]
pub struct ProxySetup {
    pub published: Arc<Published>,
    pub node_id: u64,
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
}

/// A node's proxy load, over all its workers.
#[derive(Default)]
pub struct Load {
    /// Requests being handled, until their response headers.
    pub in_flight: AtomicU64,
    /// Requests since start.
    pub requests: AtomicU64,
}

/// A request id, `{node:x}-{sequence:x}`, on the stack (the direct path writes it
/// without allocating).
pub struct RequestId {
    bytes: [u8; 33],
    len: usize,
}

impl RequestId {
    fn new(node: u64, sequence: u64) -> RequestId {
        let mut id = RequestId { bytes: [0; 33], len: 0 };
        id.push_hex(node);
        id.bytes[id.len] = b'-';
        id.len += 1;
        id.push_hex(sequence);
        id
    }

    fn push_hex(&mut self, value: u64) {
        let digits = (16 - value.leading_zeros() as usize / 4).max(1);
        for position in (0..digits).rev() {
            self.bytes[self.len] = b"0123456789abcdef"[((value >> (position * 4)) & 0xf) as usize];
            self.len += 1;
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("-")
    }

    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_str(self.as_str()).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
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
    node_id: u64,
    request_counter: AtomicU64,
    timeouts: conn::Timeouts,
    plugin_state: Arc<crate::plugins::NodeState>,
    health: Arc<balancer::HealthView>,
    load: Arc<Load>,
    direct: bool,
    /// Requests answered by the direct path, and connections it handed to hyper.
    direct_requests: metrics::Counter,
    handoffs: metrics::Counter,
}

impl Proxy {
    pub fn new(setup: ProxySetup) -> Proxy {
        let ProxySetup { published, node_id, access_log, trusted_ips, timeouts, plugin_state, health, load, direct } =
            setup;
        let clients = upstream::Clients::default();
        let request_counter = AtomicU64::new(0);
        Proxy {
            published,
            trusted_ips,
            access_log,
            clients,
            node_id,
            request_counter,
            timeouts,
            plugin_state,
            health,
            load,
            direct,
            direct_requests: metrics::counter!("tollgate_proxy_direct_requests_total"),
            handoffs: metrics::counter!("tollgate_proxy_handoffs_total"),
        }
    }

    fn next_request_id(&self) -> RequestId {
        RequestId::new(self.node_id, self.request_counter.fetch_add(1, Ordering::Relaxed))
    }

    fn request_id(&self) -> HeaderValue {
        self.next_request_id().header_value()
    }

    /// What the proxy adds to a request going upstream (step 7 of `node/PROXY.md`),
    /// once hop-by-hop fields are gone: `X-Forwarded-*` (a trusted peer's kept),
    /// `X-Real-IP`, the request id, `Via`, and `Host`; `Proxy` goes (httpoxy).
    fn forwarded_headers(
        &self,
        headers: &mut HeaderMap,
        connection: &ClientConn,
        client_ip: std::net::IpAddr,
        request_id: &HeaderValue,
        origin: Origin<'_>,
    ) {
        let Origin { client_host, upstream_host, path, prefix } = origin;
        let peer_ip = connection.peer.ip();
        let peer_trusted = self.trusted_ips.contains(peer_ip);
        // httpoxy (CVE-2016-5385): a CGI-style upstream reads `Proxy` as HTTP_PROXY.
        headers.remove(PROXY_HEADER);
        // Kong's `X-Forwarded-Path` (the path the client asked for) and
        // `X-Forwarded-Prefix` (what `strip_path` took off, unless only `/`); a
        // trusted peer's are kept, nobody else's.
        if !(peer_trusted && headers.contains_key(X_FORWARDED_PATH)) {
            set_header(headers, "x-forwarded-path", path);
        }
        if !(peer_trusted && headers.contains_key(X_FORWARDED_PREFIX)) {
            match prefix {
                Some(prefix) => set_header(headers, "x-forwarded-prefix", prefix),
                None => {
                    headers.remove(X_FORWARDED_PREFIX);
                }
            }
        }
        let forwarded_for = match forwarded_for_chain(headers) {
            Some(existing) => HeaderValue::from_str(&format!("{existing}, {peer_ip}")).ok(),
            None => Some(connection.peer_ip.clone()),
        };
        if let Some(forwarded_for) = forwarded_for {
            headers.insert(X_FORWARDED_FOR, forwarded_for);
        }
        // A trusted peer's X-Forwarded-Proto/-Host/-Port describe the client: keep them.
        if !(peer_trusted && headers.contains_key(X_FORWARDED_PROTO)) {
            let proto = HeaderValue::from_static(if connection.tls { "https" } else { "http" });
            headers.insert(X_FORWARDED_PROTO, proto);
        }
        if !(peer_trusted && headers.contains_key(X_FORWARDED_HOST)) {
            if let Some(host) = client_host.and_then(|h| h.to_str().ok()) {
                set_header(headers, "x-forwarded-host", strip_port(host));
            }
        }
        if !(peer_trusted && headers.contains_key(X_FORWARDED_PORT)) {
            headers.insert(X_FORWARDED_PORT, connection.local_port.clone());
        }
        if client_ip == peer_ip {
            headers.insert(X_REAL_IP, connection.peer_ip.clone());
        } else {
            set_header(headers, "x-real-ip", &client_ip.to_string());
        }
        headers.insert(REQUEST_ID_NAME, request_id.clone());
        headers.append(http::header::VIA, VIA_VALUE);
        if let Some(host) = upstream_host {
            headers.insert(HOST, host.clone());
        }
    }

    /// Answers one request of `connection`, which is told when the request started and
    /// when its response has been sent, for the connection's timers.
    pub async fn handle(&self, connection: &ClientConn, request: Request<Incoming>) -> Response<ProxyBody> {
        if let Some(state) = &connection.state {
            state.request_started(request.version() == http::Version::HTTP_2);
        }
        let guard = conn::RequestGuard::new(connection.state.clone());
        let _in_flight = InFlight::new(&self.load);
        let started = tokio::time::Instant::now();
        // RFC 9112 §6.3: after a request framed by Transfer-Encoding (which may also have
        // carried a Content-Length hyper discarded), close the connection, so bytes a
        // Content-Length-framing hop sent as body are never read as a next request.
        let close_after = request.headers().contains_key(http::header::TRANSFER_ENCODING);
        let method = self.access_log.as_ref().map(|_| request.method().clone());
        let original_path = self.access_log.as_ref().map(|_| request.uri().path().to_string());
        let mut trace = RequestTrace::default();
        let mut response = self.route_and_forward(connection, request, started, &mut trace).await;
        if close_after {
            response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        let status = response.status().as_u16();
        let metrics = trace.metrics.take();
        if let Some(metrics) = &metrics {
            metrics.record(status, latency_ms, trace.upstream_ms);
        }
        if let Some((ran, ctx)) = trace.plugins.take() {
            let summary = crate::plugins::LogSummary {
                status,
                latency_ms,
                upstream_ms: trace.upstream_ms,
                service: metrics.as_ref().map_or("", |m| m.service_label.as_str()),
                route: metrics.as_ref().map_or("", |m| m.route_label.as_str()),
                from_upstream: trace.from_upstream,
                response_bytes: response
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            };
            crate::plugins::log(&ran, &ctx, &summary, &self.plugin_state);
        }
        if let Some(access_log) = &self.access_log {
            let entry = AccessEntry {
                request_id: response.headers().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()),
                client_ip: connection.peer.ip(),
                method: method.as_ref().map(http::Method::as_str),
                path: original_path.as_deref(),
                tls: connection.tls,
                status,
                service: metrics.as_ref().map(|m| m.service_label.as_str()),
                route: metrics.as_ref().map(|m| m.route_label.as_str()),
                upstream: trace.upstream.as_deref(),
                latency_ms,
                upstream_latency_ms: trace.upstream_ms,
            };
            access_log.log(entry.line());
        }
        // The body counts what it sends and, when it is done, tells the connection.
        let egress = metrics.map_or_else(metrics::Counter::noop, |metrics| metrics.egress_bytes.clone());
        let (parts, body) = response.into_parts();
        let counted = telemetry::CountingBody::new(body, egress).with_guards(guard, trace.pool_return.take());
        Response::from_parts(parts, BodyExt::boxed(counted))
    }

    async fn route_and_forward(
        &self,
        connection: &ClientConn,
        request: Request<Incoming>,
        started: tokio::time::Instant,
        trace: &mut RequestTrace,
    ) -> Response<ProxyBody> {
        let compiled = self.published.load();
        trace.metrics = compiled.proxy.unmatched_metrics.clone();
        let snapshot = &compiled.proxy;
        let request_id = self.request_id();
        let tls = connection.tls;

        if let Some(refusal) = check_limits(&request, &request_id) {
            return refusal;
        }
        let (mut parts, body) = request.into_parts();
        // Room for what the proxy and plugins add, so the map grows once.
        parts.headers.reserve(REQUEST_HEADERS_ADDED);
        // What the client's hop-by-hop fields ask for is read now; then they go, with
        // every field its `Connection` names, before any plugin runs: a client must not
        // be able to name a header a plugin sets (`X-Consumer-ID`,
        // `X-Anonymous-Consumer`) and have it removed on the way upstream.
        let upgrade = requested_upgrade(&parts);
        let client_wants_trailers = asks_for_trailers(&parts.headers);
        remove_hop_by_hop(&mut parts.headers);
        // The client's URI is only read from here on; the upstream gets a new one.
        let uri = std::mem::take(&mut parts.uri);
        let Some(path) = path::normalize(uri.path()) else {
            return error(StatusCode::BAD_REQUEST, "invalid request path", &request_id);
        };
        let grpc = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let protocol = match (grpc, tls) {
            (true, true) => "grpcs",
            (true, false) => "grpc",
            (false, true) => "https",
            (false, false) => "http",
        };
        // Global plugins' rewrite phase, before the router reads the request.
        if !snapshot.plugins.is_empty() {
            let mut view =
                crate::plugins::RewriteView { method: &parts.method, path: &path, headers: &mut parts.headers };
            if let Some(exit) = snapshot.plugins.rewrite(protocol, &mut view) {
                return exit_response(exit, &request_id);
            }
        }
        let found = {
            let host = request_host(&parts.headers, &uri);
            let view = RequestView {
                method: parts.method.as_str(),
                host: &host,
                path: &path,
                headers: &parts.headers,
                protocol: if tls { "https" } else { "http" },
            };
            snapshot.router.find(&view).map(|m| {
                trace.metrics = snapshot.route_metrics.get(&m.route.id).cloned();
                (m.route.id, m.route.service, m.route.strip_path, m.route.preserve_host, m.matched_len)
            })
        };
        let Some((route_id, service_id, strip_path, preserve_host, matched_len)) = found else {
            return error(StatusCode::NOT_FOUND, "no Route matched with those values", &request_id);
        };
        let peer_ip = connection.peer.ip();
        let client_ip = match forwarded_for_chain(&parts.headers) {
            Some(chain) => self.trusted_ips.client_ip(peer_ip, Some(&chain)),
            None => peer_ip,
        };
        // Plugins' access phase (they run for routes without a service too:
        // request-termination is often used so).
        let declared_length = http_body::Body::size_hint(&body).exact();
        let ingress = trace.metrics.as_ref().map(|m| m.ingress_bytes.clone()).unwrap_or_else(metrics::Counter::noop);
        let mut body = Some(telemetry::CountingBody::new(body, ingress));
        let mut plugin_run = None;
        if !snapshot.plugins.is_empty() {
            let mut ctx =
                crate::plugins::Ctx::new(client_ip, Some(route_id), service_id, parts.method.clone(), protocol);
            let mut view = crate::plugins::RequestView {
                method: &parts.method,
                path: uri.path(),
                query: uri.query(),
                headers: &mut parts.headers,
            };
            let (ran, exit) = snapshot.plugins.access(&mut ctx, &mut view, &mut body, &self.plugin_state).await;
            if let Some(exit) = exit {
                // An exit goes through the response phases as an upstream answer would.
                let mut body = exit.body.clone();
                let mut response = exit_response(exit, &request_id);
                let status = response.status();
                crate::plugins::header_filter(&ran, &mut ctx, status, response.headers_mut());
                if crate::plugins::wants_body(&ran, &ctx, status, response.headers()) {
                    crate::plugins::body_filter(&ran, &mut ctx, status, response.headers(), &mut body);
                    response.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                    *response.body_mut() = Full::new(body).map_err(|never| match never {}).boxed();
                }
                // A plugin's own answer is never stored by proxy-cache.
                ctx.cache_store = None;
                trace.plugins = Some((ran, ctx));
                return response;
            }
            plugin_run = Some((ran, ctx));
        }
        let upstream_method = plugin_run.as_ref().and_then(|(_, ctx)| ctx.upstream_method.clone());
        let upstream_query = match &plugin_run {
            Some((_, ctx)) if ctx.upstream_query.is_some() => ctx.upstream_query.as_deref().filter(|q| !q.is_empty()),
            _ => uri.query(),
        };
        let Some(service) = service_id.and_then(|id| snapshot.services.get(&id)) else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "no Service found with those values", &request_id);
        };
        if !service.enabled {
            return error(StatusCode::SERVICE_UNAVAILABLE, "no Service found with those values", &request_id);
        }
        let Some(client) = self.clients.get(&service.transport) else {
            return error(StatusCode::BAD_GATEWAY, "the service's upstream TLS settings are not usable", &request_id);
        };

        let balancer = service.balancer.as_deref();
        let postfix = if strip_path { path::postfix(&path, matched_len) } else { &*path };
        let replaced_path = plugin_run.as_ref().and_then(|(_, ctx)| ctx.upstream_path.clone());
        let mut upstream_path =
            replaced_path.unwrap_or_else(|| path::upstream_path_v0(&service.path, &path, postfix, strip_path));
        if let Some(query) = upstream_query {
            upstream_path.push('?');
            upstream_path.push_str(query);
        }
        let Ok(path_and_query) = http::uri::PathAndQuery::from_maybe_shared(Bytes::from(upstream_path)) else {
            return error(StatusCode::BAD_REQUEST, "invalid request path", &request_id);
        };

        // `Upgrade` (WebSocket and others) passes through: the protocol name goes
        // upstream, and after a 101 both connections are spliced together.
        let client_upgrade = upgrade.as_ref().and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
        let client_host = parts.headers.get(HOST).cloned();
        // `TE: trailers` is end to end on HTTP/2 (gRPC needs it); other TE values and
        // every TE on HTTP/1.1 are hop-by-hop.
        let wants_trailers = service.transport.is_h2() && client_wants_trailers;
        // Hop-by-hop fields a plugin set (the client's went above).
        remove_hop_by_hop(&mut parts.headers);
        if wants_trailers {
            parts.headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(protocol) = &upgrade {
            parts.headers.insert(http::header::UPGRADE, protocol.clone());
            parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let upstream_host = if preserve_host { client_host.as_ref() } else { service.host_header.as_ref() };
        let origin = Origin {
            client_host: client_host.as_ref(),
            upstream_host,
            path: uri.path(),
            prefix: stripped_prefix(&path, matched_len, strip_path),
        };
        self.forwarded_headers(&mut parts.headers, connection, client_ip, &request_id, origin);

        // A failure of the client's body (bad chunk, over the size limit) must not be
        // blamed on the upstream: the flag tells the two apart.
        let client_body_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = client_body_failed.clone();
        let body_limit = plugin_run
            .as_ref()
            .and_then(|(_, ctx)| ctx.body_limit)
            .map_or(BODY_BYTES_MAX, |limit| limit.min(BODY_BYTES_MAX));
        // Kong's `retries`: a connection that could not be made is tried on the next
        // target. Nothing reached the upstream then, so this is safe for any method.
        // Only an upstream with several targets has a next one: a service naming a host
        // already has every address of that name tried by the connector.
        let may_retry = service.retries > 0 && balancer.is_some_and(|balancer| balancer.len() > 1);
        // A body a plugin read (and maybe edited) goes upstream as it is now, with its
        // length. Otherwise a request can be sent again when all its bytes are at hand:
        // no body, or a small one read whole first.
        let read_body = plugin_run.as_mut().and_then(|(_, ctx)| ctx.request_body.take());
        let (replay, mut body): (Option<Bytes>, Option<UpstreamBody>) = match (read_body, body) {
            (Some(bytes), _) => {
                if bytes.len() as u64 > body_limit {
                    return error(StatusCode::PAYLOAD_TOO_LARGE, "Request size limit exceeded", &request_id);
                }
                if !(bytes.is_empty() && declared_length == Some(0)) {
                    parts.headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                }
                (Some(bytes), None)
            }
            // Only a plugin takes the body, and then it left it in `request_body`.
            (None, None) => (Some(Bytes::new()), None),
            (None, Some(body)) => {
                let body = http_body_util::Limited::new(body, body_limit as usize).map_err(flag_failure(flag));
                match declared_length {
                    Some(0) => (Some(Bytes::new()), None),
                    Some(length) if length <= RETRY_BODY_BYTES_MAX && may_retry => {
                        match tokio::time::timeout(CLIENT_BODY_TIMEOUT, body.collect()).await {
                            Ok(Ok(collected)) => (Some(collected.to_bytes()), None),
                            Ok(Err(failure)) => {
                                tracing::debug!(%failure, "client request body failed");
                                return body_error(&*failure, &request_id);
                            }
                            Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "request body timed out", &request_id),
                        }
                    }
                    _ => (None, Some(body.boxed())),
                }
            }
        };
        let attempts_max = if replay.is_some() && may_retry { service.retries.min(RETRIES_MAX) + 1 } else { 1 };
        let timeout = Duration::from_millis(service.connect_timeout_ms.saturating_add(service.read_timeout_ms));
        let scheme =
            if matches!(service.transport, upstream::Transport::Tls(_)) { Scheme::HTTPS } else { Scheme::HTTP };
        let upstream_started = tokio::time::Instant::now();
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            // The pick counts as in flight until the upstream's response headers arrive.
            let pick = match balancer {
                Some(balancer) => {
                    let key = BalanceKey { client_ip, headers: &parts.headers, path: &path, query: uri.query() };
                    match balancer.pick(&key, &self.health) {
                        Some(pick) => Some(pick),
                        // Kong's 503; when targets exist, every one is down, and the
                        // answer says so.
                        None if balancer.is_empty() => {
                            return error(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "failure to get a peer from the ring-balancer",
                                &request_id,
                            )
                        }
                        None => {
                            return error(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "failure to get a peer from the ring-balancer: every target is unhealthy",
                                &request_id,
                            )
                        }
                    }
                }
                None => None,
            };
            let authority = match &pick {
                Some(pick) => pick.target.authority.clone(),
                None => service.authority.clone(),
            };
            let mut target = http::uri::Parts::default();
            target.scheme = Some(scheme.clone());
            target.authority = authority;
            target.path_and_query = Some(path_and_query.clone());
            let Ok(uri) = Uri::from_parts(target) else {
                return error(StatusCode::BAD_GATEWAY, "the upstream address is not usable", &request_id);
            };
            if self.access_log.is_some() {
                trace.upstream = uri.authority().map(|authority| authority.to_string());
            }
            let attempt_body = match &replay {
                Some(bytes) if bytes.is_empty() => empty_upstream_body(),
                Some(bytes) => Full::new(bytes.clone()).map_err(|never| match never {}).boxed(),
                None => body.take().unwrap_or_else(empty_upstream_body),
            };
            let mut upstream_request = Request::new(attempt_body);
            *upstream_request.method_mut() = upstream_method.clone().unwrap_or_else(|| parts.method.clone());
            *upstream_request.uri_mut() = uri;
            // The headers are cloned only while another attempt may need them.
            *upstream_request.headers_mut() =
                if attempt < attempts_max { parts.headers.clone() } else { std::mem::take(&mut parts.headers) };
            let sent = tokio::time::timeout(timeout, client.send(upstream_request)).await;
            // Passive health checks: what this request found of its target.
            if let (Some(balancer), Some(pick)) = (balancer.filter(|b| b.passive), &pick) {
                let observation = match &sent {
                    Err(_) => Some(balancer::Observation::Timeout),
                    Ok(Ok((response, _))) => Some(balancer::Observation::Status(response.status().as_u16())),
                    Ok(Err(_)) if client_body_failed.load(Ordering::Relaxed) => None,
                    Ok(Err(_)) => Some(balancer::Observation::TcpFailure),
                };
                if let Some(observation) = observation {
                    self.health.report(balancer.id, &pick.target.address, observation);
                }
            }
            match sent {
                Err(_) => return error(StatusCode::GATEWAY_TIMEOUT, "The upstream server is timing out", &request_id),
                Ok(Ok((response, back))) => {
                    if let Some(pick) = &pick {
                        pick.observe(upstream_started.elapsed());
                    }
                    trace.pool_return = back;
                    break response;
                }
                Ok(Err(failure)) if client_body_failed.load(Ordering::Relaxed) => {
                    tracing::debug!(?failure, "client request body failed");
                    let (pool::SendError::Connect(cause) | pool::SendError::Request(cause)) = &failure;
                    return body_error(&**cause, &request_id);
                }
                Ok(Err(pool::SendError::Connect(failure))) if attempt < attempts_max => {
                    tracing::debug!(%failure, attempt, "upstream connect failed; trying the next target");
                }
                Ok(Err(failure)) => {
                    tracing::debug!(?failure, "upstream request failed");
                    return error(
                        StatusCode::BAD_GATEWAY,
                        "An invalid response was received from the upstream server",
                        &request_id,
                    );
                }
            }
        };
        let upstream_elapsed = upstream_started.elapsed();
        let upstream_ms = upstream_elapsed.as_millis() as u64;
        trace.upstream_ms = Some(upstream_elapsed.as_secs_f64() * 1e3);
        let mut response = response;
        // A HEAD answer that announces a body: a broken upstream may still send it, or
        // answer again, on this connection; reused, it would hand that to another
        // client. The connection is not reused (the direct path does the same).
        let head_request = upstream_method.as_ref().unwrap_or(&parts.method) == http::Method::HEAD;
        if head_request && announces_body(response.headers()) {
            if let Some(back) = &mut trace.pool_return {
                back.discard();
            }
        }
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            let (Some(client_upgrade), Some(protocol)) = (client_upgrade, upgrade) else {
                return error(StatusCode::BAD_GATEWAY, "the upstream switched protocols unasked", &request_id);
            };
            // The upstream connection becomes the tunnel: it never goes back to a pool.
            if let Some(back) = &mut trace.pool_return {
                back.discard();
            }
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(splice(client_upgrade, upstream_upgrade, request_id.clone()));
            let (mut parts, _) = response.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            parts.headers.insert(http::header::UPGRADE, protocol);
            parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(REQUEST_ID_NAME, request_id);
            return Response::from_parts(parts, http_body_util::Empty::new().map_err(|never| match never {}).boxed());
        }
        let (mut parts, body) = response.into_parts();
        let from_plugins = plugin_run.as_ref().map_or(0, |(_, ctx)| ctx.response_headers.len());
        parts.headers.reserve(RESPONSE_HEADERS_ADDED + from_plugins);
        let proxy_ms = (started.elapsed().as_millis() as u64).saturating_sub(upstream_ms);
        answer_headers(&mut parts.headers, request_id, upstream_ms, proxy_ms);
        let mut plugin_run = plugin_run;
        let mut cache_store = None;
        let mut body: ProxyBody = body.boxed();
        if let Some((ran, ctx)) = &mut plugin_run {
            crate::plugins::header_filter(ran, ctx, parts.status, &mut parts.headers);
            cache_store = ctx.cache_store.take();
            // body_filter: the body read whole, filtered, and sent with its new length.
            if crate::plugins::wants_body(ran, ctx, parts.status, &parts.headers) {
                let request_id = parts.headers.get(REQUEST_ID_NAME).cloned().unwrap_or(HeaderValue::from_static("-"));
                let limited = http_body_util::Limited::new(body, crate::plugins::BODY_FILTER_BYTES_MAX);
                let read = Duration::from_millis(service.read_timeout_ms);
                let mut whole = match tokio::time::timeout(read, limited.collect()).await {
                    Ok(Ok(collected)) => collected.to_bytes(),
                    Ok(Err(failure)) => {
                        tracing::debug!(%failure, "upstream body not read whole for body_filter");
                        return error(
                            StatusCode::BAD_GATEWAY,
                            "the upstream body could not be read whole",
                            &request_id,
                        );
                    }
                    Err(_) => {
                        return error(StatusCode::GATEWAY_TIMEOUT, "The upstream server is timing out", &request_id)
                    }
                };
                crate::plugins::body_filter(ran, ctx, parts.status, &parts.headers, &mut whole);
                parts.headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(whole.len()));
                body = Full::new(whole).map_err(|never| match never {}).boxed();
            }
        }
        trace.from_upstream = true;
        trace.plugins = plugin_run;
        match cache_store {
            Some(store) => {
                let state = self.plugin_state.clone();
                let tee = crate::plugins::cache::CacheTee::new(body, parts.status, &parts.headers, store, state);
                Response::from_parts(parts, tee.boxed())
            }
            None => Response::from_parts(parts, body),
        }
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
    state: Option<Arc<conn::ConnState>>,
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
        ClientConn { proxy, peer, tls, peer_ip, local_port: HeaderValue::from(port), state }
    }

    /// Answers one request on this connection.
    pub async fn serve(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        self.proxy.handle(self, request).await
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_FORWARDED_PATH: HeaderName = HeaderName::from_static("x-forwarded-path");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
const PROXY_HEADER: HeaderName = HeaderName::from_static("proxy");

/// Where a request came from, for the headers the proxy adds upstream.
pub struct Origin<'a> {
    /// The client's `Host` as it came.
    pub client_host: Option<&'a HeaderValue>,
    /// The `Host` the upstream gets (`None`: the client's stays).
    pub upstream_host: Option<&'a HeaderValue>,
    /// The request path as the client sent it (`X-Forwarded-Path`).
    pub path: &'a str,
    /// What `strip_path` took off (`X-Forwarded-Prefix`).
    pub prefix: Option<&'a str>,
}

/// The prefix `strip_path` removes from the normalised `path` (the route's match),
/// unless nothing or only `/` is removed: Kong's `X-Forwarded-Prefix`.
fn stripped_prefix(path: &str, matched_len: usize, strip_path: bool) -> Option<&str> {
    let prefix = path.get(..matched_len)?;
    (strip_path && prefix.len() > 1).then_some(prefix)
}

/// Marks `flag` when the client's body fails, passing the error on.
fn flag_failure(flag: Arc<std::sync::atomic::AtomicBool>) -> impl Fn(BoxError) -> BoxError {
    move |error| {
        flag.store(true, Ordering::Relaxed);
        error
    }
}

/// Whether the client's `TE` lists `trailers`.
fn asks_for_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("trailers"))
}

/// Whether a response's head announces a body: a non-zero `Content-Length`, or a
/// `Transfer-Encoding`.
fn announces_body(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::TRANSFER_ENCODING)
        || headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|length| length.trim() != "0")
}

/// Every `X-Forwarded-For` line, joined in order as one list (RFC 9110 §5.3), so a
/// second line cannot hide hops from `--trusted-ips`; `None` without one, or when one
/// is not text.
fn forwarded_for_chain(headers: &HeaderMap) -> Option<std::borrow::Cow<'_, str>> {
    let mut lines = headers.get_all(X_FORWARDED_FOR).iter();
    let first = lines.next()?.to_str().ok()?;
    let mut chain = std::borrow::Cow::Borrowed(first);
    for line in lines {
        let line = line.to_str().ok()?;
        chain = std::borrow::Cow::Owned(format!("{chain}, {line}"));
    }
    Some(chain)
}

/// The protocol a client asks to switch to: `Connection: upgrade` with `Upgrade: X`,
/// on HTTP/1.1.
fn requested_upgrade(parts: &http::request::Parts) -> Option<HeaderValue> {
    if parts.version != http::Version::HTTP_11 {
        return None;
    }
    let asks = parts
        .headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    parts.headers.get(http::header::UPGRADE).cloned()
}

/// Copies bytes both ways between an upgraded client connection and an upgraded
/// upstream connection until either side closes.
async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, request_id: HeaderValue) {
    let request_id = request_id.to_str().unwrap_or_default().to_string();
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(failure) => {
            tracing::debug!(%failure, request_id, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(failure) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%failure, request_id, "upgraded connection ended");
    }
}

fn empty_upstream_body() -> UpstreamBody {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed()
}

/// The request limits hyper does not apply itself; `None` when the request is fine.
fn check_limits(request: &Request<Incoming>, request_id: &HeaderValue) -> Option<Response<ProxyBody>> {
    let target_len = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > URI_BYTES_MAX {
        return Some(error(StatusCode::URI_TOO_LONG, "request URI too long", request_id));
    }
    let headers = request.headers();
    // Content-Length with Transfer-Encoding: hyper frames the body by Transfer-Encoding
    // and drops Content-Length (RFC 9112 §6.3); the body is re-framed upstream, and the
    // client connection is closed after the answer (see `handle`).
    let declared =
        headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > BODY_BYTES_MAX) {
        return Some(error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large", request_id));
    }
    None
}

/// The host a request names, lower case: `Host`, or the URI's authority (HTTP/2).
fn request_host<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> std::borrow::Cow<'a, str> {
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// One request's access log line, from either path.
struct AccessEntry<'a> {
    request_id: Option<&'a str>,
    client_ip: std::net::IpAddr,
    method: Option<&'a str>,
    path: Option<&'a str>,
    tls: bool,
    status: u16,
    service: Option<&'a str>,
    route: Option<&'a str>,
    upstream: Option<&'a str>,
    latency_ms: f64,
    upstream_latency_ms: Option<f64>,
}

impl AccessEntry<'_> {
    fn line(&self) -> String {
        serde_json::json!({
            "time_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            "request_id": self.request_id,
            "client_ip": self.client_ip.to_string(),
            "method": self.method,
            "path": self.path,
            "tls": self.tls,
            "status": self.status,
            "service": self.service,
            "route": self.route,
            "upstream": self.upstream,
            "latency_ms": (self.latency_ms * 1000.0).round() / 1000.0,
            "upstream_latency_ms": self.upstream_latency_ms.map(|ms| (ms * 1000.0).round() / 1000.0),
        })
        .to_string()
    }
}

/// What the data path learnt about a request, for metrics and the access log.
#[derive(Default)]
struct RequestTrace {
    metrics: Option<Arc<telemetry::RouteMetrics>>,
    /// Gives the upstream connection back when the response body is done.
    pool_return: Option<pool::PoolReturn>,
    /// The plugins whose access phase ran, for the log phase.
    plugins: Option<(Vec<Arc<crate::plugins::Instance>>, crate::plugins::Ctx)>,
    /// The answer came from the upstream (not from the proxy or a plugin).
    from_upstream: bool,
    upstream: Option<String>,
    upstream_ms: Option<f64>,
}

/// RFC 9110 §7.6.1's hop-by-hop fields, as names (a `&str` would be parsed per use).
const HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// RFC 9110 §7.6.1: hop-by-hop fields, and every field `Connection` names.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there are none: one pass over the names (no hashing) says so.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// An upstream's response headers as the client gets them: hop-by-hop fields gone,
/// `Via`, the request id and the two latencies (ms) added.
fn answer_headers(headers: &mut HeaderMap, request_id: HeaderValue, upstream_ms: u64, proxy_ms: u64) {
    remove_hop_by_hop(headers);
    headers.append(http::header::VIA, VIA_VALUE);
    headers.insert(REQUEST_ID_NAME, request_id);
    headers.insert(UPSTREAM_LATENCY_NAME, HeaderValue::from(upstream_ms));
    headers.insert(PROXY_LATENCY_NAME, HeaderValue::from(proxy_ms));
}

fn set_header(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

/// The answer to a client body that failed: 413 when it passed a size limit (the
/// node's, or request-size-limiting's), 400 when it was malformed.
fn body_error(failure: &(dyn std::error::Error + 'static), request_id: &HeaderValue) -> Response<ProxyBody> {
    let mut cause = Some(failure);
    while let Some(current) = cause {
        if current.is::<http_body_util::LengthLimitError>() {
            return error(StatusCode::PAYLOAD_TOO_LARGE, "Request size limit exceeded", request_id);
        }
        cause = current.source();
    }
    error(StatusCode::BAD_REQUEST, "invalid request body", request_id)
}

/// A plugin's own answer, with the request id and `Via` like every answer.
fn exit_response(exit: crate::plugins::Exit, request_id: &HeaderValue) -> Response<ProxyBody> {
    let mut response = Response::new(Full::new(exit.body).map_err(|never| match never {}).boxed());
    *response.status_mut() = exit.status;
    let headers = response.headers_mut();
    for (name, value) in exit.headers {
        headers.insert(name, value);
    }
    headers.insert(REQUEST_ID_NAME, request_id.clone());
    headers.append(http::header::VIA, VIA_VALUE);
    response
}

/// The body of a JSON error answer, Kong's shape: `{"message": ...}`.
fn error_body(message: &str, request_id: &str) -> String {
    serde_json::json!({ "message": message, "request_id": request_id }).to_string()
}

/// A JSON error answer, Kong's shape: `{"message": ...}`.
fn error(status: StatusCode, message: &str, request_id: &HeaderValue) -> Response<ProxyBody> {
    let body = error_body(message, request_id.to_str().unwrap_or_default());
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    headers.insert(REQUEST_ID_NAME, request_id.clone());
    headers.append(http::header::VIA, VIA_VALUE);
    response
}

/// Starts `workers` proxy threads, each with its own single-threaded runtime and
/// upstream connection pool, all accepting on `listener` (nginx's worker model: no
/// work stealing or cross-thread wake-ups on the request path). They stop when
/// `shutdown` turns true.
pub fn spawn_workers(
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
                match TcpListener::from_std(listener) {
                    Ok(listener) => serve(listener, tls, Arc::new(Proxy::new(setup)), shutdown).await,
                    Err(error) => tracing::error!(%error, worker, "cannot use the proxy listener"),
                }
            });
        })?;
        threads.push(thread);
    }
    Ok(threads)
}

/// Longest a TLS handshake may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves proxy traffic until `shutdown` turns true: HTTP/1.1 and h2c, or with `tls`
/// HTTPS (HTTP/1.1 and h2 by ALPN).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    proxy: Arc<Proxy>,
    shutdown: watch::Receiver<bool>,
) {
    let local = listener.local_addr().ok();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let on_connection = move |stream: TcpStream, peer: SocketAddr, shutdown: watch::Receiver<bool>| {
        let proxy = proxy.clone();
        let acceptor = acceptor.clone();
        async move {
            match acceptor {
                None => serve_stream(stream, peer, local, false, false, proxy, shutdown).await,
                Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        serve_stream(stream, peer, local, true, h2, proxy, shutdown).await
                    }
                    Ok(Err(error)) => tracing::debug!(%error, %peer, "tls handshake failed"),
                    Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                },
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
    crate::serve::accept_loop("proxy", listener, limits, on_connection, shutdown).await;
}

async fn serve_stream<S>(
    stream: S,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    tls: bool,
    h2: bool,
    proxy: Arc<Proxy>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut stream = stream;
    let mut prefix = bytes::BytesMut::new();
    if !h2 && proxy.direct {
        // The common request takes the direct path; the first one it leaves hands
        // the connection (and the bytes read of that request) to hyper below.
        let connection = ClientConn::new(proxy.clone(), peer, local, tls, None);
        tokio::select! {
            outcome = direct::serve(&mut stream, &connection) => match outcome {
                direct::Outcome::Closed => return,
                direct::Outcome::HandOff(read) => prefix = read,
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
    let stream = direct::Prefixed::new(prefix, stream);
    let (stream, state) = conn::TimedIo::new(stream, proxy.timeouts, h2);
    let connection = Arc::new(ClientConn::new(proxy, peer, local, tls, Some(state)));
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let connection = connection.clone();
        async move { Ok::<_, std::convert::Infallible>(connection.serve(request).await) }
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
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                tracing::debug!(%error, %peer, "proxy connection ended");
            }
        }
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
}

#[cfg(test)]
mod request_id_tests {
    use super::RequestId;

    #[test]
    fn request_ids_are_node_and_sequence_in_hex() {
        assert_eq!(RequestId::new(1, 0).as_str(), "1-0");
        assert_eq!(RequestId::new(0x2a, 0xbeef).as_str(), "2a-beef");
        assert_eq!(RequestId::new(u64::MAX, u64::MAX).as_str(), "ffffffffffffffff-ffffffffffffffff");
        assert_eq!(RequestId::new(3, 16).as_str(), format!("{:x}-{:x}", 3, 16));
    }
}
