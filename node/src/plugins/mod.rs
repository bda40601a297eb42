//! The plugin framework: which plugin instances run for a request, in which order,
//! and the phases they run in.
//!
//! **Phases**, in order (in the spirit of Pingora's `ProxyHttp` and Kong's phases):
//! 1. `access`: after routing, before the upstream is picked. A plugin may change the
//!    request (headers, the query string sent upstream) or answer it itself
//!    ([`Flow::Exit`]): authentication, access control, rate limits, termination.
//! 2. `header_filter`: on the response headers, from the upstream or from an exit,
//!    for every plugin whose `access` ran: rate-limit headers, echoed ids.
//! 3. `log`: once the response headers went out, with status and latencies, for the
//!    same plugins: metrics (prometheus).
//!
//! Each phase has a default that does nothing. Kong's `rewrite` and `body_filter`
//! phases arrive with the plugins that need them (request/response transformers).
//!
//! **Order**: Kong's plugin priorities, highest first ([`priority`]).
//!
//! **Scopes**: a plugin may be configured globally or on any combination of service,
//! route and consumer; one instance per plugin name runs for a request, the most
//! specific one, in Kong's order: consumer+route+service, consumer+route,
//! consumer+service, route+service, consumer, route, service, global. The consumer is
//! the one an authentication plugin identified before this plugin's turn (they run
//! first by priority), so consumer-scoped instances apply to authenticated traffic.
//!
//! Everything is compiled into the snapshot: configs are parsed once, credentials are
//! indexed, nothing is parsed per request.

pub mod access;
pub mod auth;
pub mod basic;
pub mod cache;
pub mod hmac;
pub mod jwt;
pub mod logging;
pub mod observe;
pub mod transform;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use serde_json::Value;
use tollgate_raft_store::state::{entity_id, foreign_id, ConfigState};
use tollgate_raft_store::EntityKind;
use uuid::Uuid;

pub use self::access::RateCounters;

/// Plugin state a node keeps across config changes, shared by its proxy workers.
#[derive(Default)]
pub struct NodeState {
    pub counters: RateCounters,
    pub verified: basic::VerifiedCache,
    pub logs: logging::LogSinks,
    pub cache: cache::ResponseCache,
}

/// Lower-case hex of bytes (hashes, trace ids).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An id as a header value (`X-Consumer-ID`, `X-Credential-Identifier`).
pub fn id_header(id: Uuid) -> HeaderValue {
    HeaderValue::from_str(&id.to_string()).unwrap_or(HeaderValue::from_static(""))
}

/// Wall-clock time since the Unix epoch: windows, expiries and log timestamps.
pub fn unix_now() -> std::time::Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// Plugins that identify consumers: with none configured, consumers and credentials
/// are not indexed.
const AUTHENTICATION_PLUGINS: [&str; 4] = ["key-auth", "basic-auth", "jwt", "hmac-auth"];

/// Kong's priority of a bundled plugin (higher runs first).
pub fn priority(name: &str) -> i32 {
    match name {
        "correlation-id" => 100_001,
        "cors" => 2000,
        "jwt" => 1450,
        "key-auth" => 1250,
        "basic-auth" => 1100,
        "hmac-auth" => 1030,
        "ip-restriction" => 990,
        "request-size-limiting" => 951,
        "acl" => 950,
        "rate-limiting" => 910,
        "request-transformer" => 801,
        "response-transformer" => 800,
        "request-termination" => 2,
        "opentelemetry" => 14,
        "proxy-cache" => 100,
        "prometheus" => 13,
        "http-log" => 12,
        "file-log" => 9,
        _ => 0,
    }
}

/// An identified consumer.
#[derive(Debug)]
pub struct Consumer {
    pub id: Uuid,
    pub username: Option<String>,
    pub custom_id: Option<String>,
    /// Its ACL groups, for the acl plugin.
    pub groups: Vec<String>,
    /// The `X-Consumer-*` values, made once per snapshot.
    pub id_header: HeaderValue,
    pub username_header: Option<HeaderValue>,
    pub custom_id_header: Option<HeaderValue>,
}

/// What one request carries through the plugins.
pub struct Ctx {
    pub client_ip: IpAddr,
    pub route: Option<Uuid>,
    pub service: Option<Uuid>,
    pub consumer: Option<Arc<Consumer>>,
    /// The credential that identified the consumer (its id).
    pub credential: Option<Uuid>,
    /// The consumer is the configured anonymous one.
    pub anonymous: bool,
    /// Replaces the query string sent upstream (key-auth's `hide_credentials`).
    pub upstream_query: Option<String>,
    /// Added to the response in `header_filter`.
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// A request body limit below the node's (request-size-limiting).
    pub body_limit: Option<u64>,
    /// The answer of the last [`Flow::Verify`], for the plugin that asked.
    pub verified: Option<bool>,
    /// Replaces the path sent upstream (request-transformer's `replace.uri`).
    pub upstream_path: Option<String>,
    /// Replaces the method sent upstream (request-transformer's `http_method`).
    pub upstream_method: Option<http::Method>,
    /// The request as the logging plugins record it, taken once in `access`.
    pub log_request: Option<Value>,
    /// The request's trace (opentelemetry).
    pub trace: Option<observe::Trace>,
    /// The request's method, for the log phase.
    pub method: http::Method,
    /// `http`, `https`, `grpc` or `grpcs`: which plugin instances run (their `protocols`).
    pub protocol: &'static str,
    /// proxy-cache: a miss whose response may be stored, then the decision to store.
    pub cache_pending: Option<cache::Pending>,
    pub cache_store: Option<cache::Store>,
    /// JSON body operations for the request sent upstream and for the response.
    pub request_json: Option<Arc<transform::JsonOperations>>,
    pub response_json: Option<Arc<transform::JsonOperations>>,
}

impl Ctx {
    /// A request's context: who sent it (the trusted client address), what matched it,
    /// its method, and its protocol as plugin `protocols` name it.
    pub fn new(
        client_ip: IpAddr,
        route: Option<Uuid>,
        service: Option<Uuid>,
        method: http::Method,
        protocol: &'static str,
    ) -> Ctx {
        Ctx {
            client_ip,
            route,
            service,
            method,
            protocol,
            consumer: None,
            credential: None,
            anonymous: false,
            upstream_query: None,
            response_headers: Vec::new(),
            body_limit: None,
            verified: None,
            upstream_path: None,
            upstream_method: None,
            log_request: None,
            trace: None,
            cache_pending: None,
            cache_store: None,
            request_json: None,
            response_json: None,
        }
    }
}

/// A plugin's own answer to a request.
#[derive(Debug)]
pub struct Exit {
    pub status: StatusCode,
    pub body: Bytes,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Exit {
    /// Kong's JSON shape: `{"message": ...}`.
    pub fn message(status: StatusCode, message: &str) -> Exit {
        let body = serde_json::json!({ "message": message }).to_string();
        Exit {
            status,
            body: Bytes::from(body),
            headers: vec![(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"))],
        }
    }
}

pub enum Flow {
    Continue,
    Exit(Exit),
    /// Slow work off the worker thread (a password hash): the framework awaits it,
    /// puts its answer in [`Ctx::verified`] and runs the plugin's `access` again.
    Verify(std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>),
}

/// The request as plugins see it in `access`.
pub struct RequestView<'a> {
    pub method: &'a http::Method,
    /// The path as the client sent it (before normalisation).
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a mut http::HeaderMap,
}

/// What plugins may consult: the snapshot's consumers and credentials, and the
/// node's counters.
pub struct Env<'a> {
    pub data: &'a PluginData,
    pub counters: &'a RateCounters,
    pub verified: &'a basic::VerifiedCache,
    pub cache: &'a cache::ResponseCache,
}

/// One plugin's behaviour. Every phase defaults to doing nothing.
pub trait Plugin: Send + Sync {
    fn access(&self, _ctx: &mut Ctx, _request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        Flow::Continue
    }

    fn header_filter(&self, _ctx: &mut Ctx, _status: StatusCode, _headers: &mut http::HeaderMap) {}

    /// After the response headers went out, with what is known of the exchange. Runs
    /// on the worker: it must only count or queue, never wait.
    fn log(&self, _ctx: &Ctx, _summary: &LogSummary<'_>, _state: &NodeState) {}
}

/// What the log phase knows of an exchange.
pub struct LogSummary<'a> {
    pub status: u16,
    pub latency_ms: f64,
    pub upstream_ms: Option<f64>,
    pub service: &'a str,
    pub route: &'a str,
    /// The upstream answered (not the proxy or a plugin).
    pub from_upstream: bool,
    /// The response's `Content-Length`, when it had one.
    pub response_bytes: Option<u64>,
}

/// Runs `log` of the instances whose `access` ran.
pub fn log(ran: &[Arc<Instance>], ctx: &Ctx, summary: &LogSummary<'_>, state: &NodeState) {
    for instance in ran {
        instance.plugin.log(ctx, summary, state);
    }
}

/// One configured plugin instance.
pub struct Instance {
    pub id: Uuid,
    pub plugin: Box<dyn Plugin>,
    /// The request protocols it runs for (`http`, `https`, `grpc`, `grpcs`).
    pub protocols: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Scope {
    consumer: Option<Uuid>,
    route: Option<Uuid>,
    service: Option<Uuid>,
}

/// Consumers and credentials, indexed for the authentication plugins.
#[derive(Default)]
pub struct PluginData {
    pub consumers: HashMap<Uuid, Arc<Consumer>>,
    pub consumers_by_username: HashMap<String, Uuid>,
    /// key-auth keys → the credential.
    pub keys: HashMap<String, auth::Identity>,
    /// basic-auth usernames → the credential.
    pub basic: HashMap<String, basic::Credential>,
    /// jwt keys → the credential, its HMAC secrets taken as given, and as base64 (a
    /// plugin's `secret_is_base64` picks the map).
    pub jwt: HashMap<String, jwt::JwtCredential>,
    pub jwt_base64: HashMap<String, jwt::JwtCredential>,
    /// hmac-auth usernames → the credential.
    pub hmac: HashMap<String, hmac::HmacCredential>,
}

impl PluginData {
    /// A consumer by id or username (key-auth's `anonymous` takes either).
    pub fn consumer(&self, id_or_username: &str) -> Option<&Arc<Consumer>> {
        let id =
            Uuid::parse_str(id_or_username).ok().or_else(|| self.consumers_by_username.get(id_or_username).copied())?;
        self.consumers.get(&id)
    }

    /// Indexes consumers, their groups and key-auth keys. Only built when a plugin
    /// that identifies consumers is configured: it costs time per config change in
    /// proportion to the number of consumers.
    fn compile(state: &ConfigState) -> PluginData {
        let mut data = PluginData::default();
        let mut groups: HashMap<Uuid, Vec<String>> = HashMap::new();
        for acl in state.table(EntityKind::Acl).values() {
            if let (Some(consumer), Some(group)) =
                (foreign_id(acl, "consumer"), acl.get("group").and_then(Value::as_str))
            {
                groups.entry(consumer).or_default().push(group.to_string());
            }
        }
        for consumer in state.table(EntityKind::Consumer).values() {
            let id = entity_id(consumer);
            let text = |field: &str| consumer.get(field).and_then(Value::as_str).map(str::to_string);
            let username = text("username");
            if let Some(username) = &username {
                data.consumers_by_username.insert(username.clone(), id);
            }
            let groups = groups.remove(&id).unwrap_or_default();
            let custom_id = text("custom_id");
            let header = |value: &Option<String>| value.as_deref().and_then(|v| HeaderValue::from_str(v).ok());
            let consumer = Consumer {
                id,
                id_header: id_header(id),
                username_header: header(&username),
                custom_id_header: header(&custom_id),
                username,
                custom_id,
                groups,
            };
            data.consumers.insert(id, Arc::new(consumer));
        }
        for credential in state.table(EntityKind::KeyAuth).values() {
            if let (Some(identity), Some(key)) =
                (auth::Identity::of(credential), credential.get("key").and_then(Value::as_str))
            {
                data.keys.insert(key.to_string(), identity);
            }
        }
        for credential in state.table(EntityKind::Jwt).values() {
            let text = |field: &str| credential.get(field).and_then(Value::as_str);
            let Some(key) = text("key") else { continue };
            let algorithm = text("algorithm").unwrap_or("HS256");
            let id = entity_id(credential);
            for (base64, map) in [(false, &mut data.jwt), (true, &mut data.jwt_base64)] {
                match jwt::JwtCredential::verifier(
                    algorithm,
                    text("secret").unwrap_or_default(),
                    text("rsa_public_key"),
                    base64,
                ) {
                    Ok(verifier) => {
                        let Some(identity) = auth::Identity::of(credential) else { break };
                        let algorithm = algorithm.to_string();
                        map.insert(key.to_string(), jwt::JwtCredential { identity, algorithm, verifier });
                    }
                    Err(error) if !base64 => tracing::warn!(credential = %id, %error, "jwt credential not usable"),
                    Err(_) => {}
                }
            }
        }
        for credential in state.table(EntityKind::HmacAuth).values() {
            let text = |field: &str| credential.get(field).and_then(Value::as_str);
            if let (Some(identity), Some(username), Some(secret)) =
                (auth::Identity::of(credential), text("username"), text("secret"))
            {
                let secret = secret.to_string();
                data.hmac.insert(username.to_string(), hmac::HmacCredential { identity, secret });
            }
        }
        for credential in state.table(EntityKind::BasicAuth).values() {
            let text = |field: &str| credential.get(field).and_then(Value::as_str);
            if let (Some(identity), Some(username), Some(hash)) =
                (auth::Identity::of(credential), text("username"), text("password"))
            {
                let hash = hash.to_string();
                data.basic.insert(username.to_string(), basic::Credential { identity, hash });
            }
        }
        data
    }
}

/// Every enabled plugin instance of a snapshot, by name and scope.
#[derive(Default)]
pub struct Plugins {
    instances: HashMap<(usize, Scope), Arc<Instance>>,
    /// Per plugin name, which of the 8 scope shapes have an instance, so a request
    /// looks up only those.
    shapes: Vec<u8>,
    /// Plugin names with at least one instance, by Kong priority (highest first).
    names: Vec<String>,
    pub data: PluginData,
}

impl Plugins {
    pub fn compile(state: &ConfigState) -> Plugins {
        let mut names: Vec<String> = Vec::new();
        let mut instances = HashMap::new();
        for plugin in state.table(EntityKind::Plugin).values() {
            if plugin.get("enabled").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            let Some(name) = plugin.get("name").and_then(Value::as_str) else { continue };
            let config = plugin.get("config").cloned().unwrap_or(Value::Null);
            let id = entity_id(plugin);
            let built = match build(name, id, config) {
                Ok(built) => built,
                Err(error) => {
                    tracing::warn!(plugin = %id, name, %error, "plugin config not usable; the plugin does not run");
                    continue;
                }
            };
            let index = match names.iter().position(|known| known == name) {
                Some(index) => index,
                None => {
                    names.push(name.to_string());
                    names.len() - 1
                }
            };
            let scope = Scope {
                consumer: foreign_id(plugin, "consumer"),
                route: foreign_id(plugin, "route"),
                service: foreign_id(plugin, "service"),
            };
            let protocols = plugin
                .get("protocols")
                .and_then(Value::as_array)
                .map(|list| list.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_else(|| ["grpc", "grpcs", "http", "https"].map(String::from).to_vec());
            let instance = Instance { id, plugin: built, protocols };
            instances.insert((index, scope), Arc::new(instance));
        }
        // Indexes were handed out in discovery order; re-key by priority order.
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by_key(|&index| (-priority(&names[index]), names[index].clone()));
        let position: HashMap<usize, usize> = order.iter().enumerate().map(|(new, &old)| (old, new)).collect();
        let instances: HashMap<(usize, Scope), Arc<Instance>> =
            instances.into_iter().map(|((index, scope), instance)| ((position[&index], scope), instance)).collect();
        let names: Vec<String> = order.iter().map(|&index| names[index].clone()).collect();
        let mut shapes = vec![0u8; names.len()];
        for (index, scope) in instances.keys() {
            shapes[*index] |= 1 << shape(scope.consumer.is_some(), scope.route.is_some(), scope.service.is_some());
        }
        let identifies_consumers = names.iter().any(|name| AUTHENTICATION_PLUGINS.contains(&name.as_str()));
        let data = if identifies_consumers { PluginData::compile(state) } else { PluginData::default() };
        Plugins { instances, shapes, names, data }
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The most specific instance of plugin `index` for this request so far.
    fn resolve(&self, index: usize, ctx: &Ctx) -> Option<&Arc<Instance>> {
        let (c, r, s) = (ctx.consumer.as_ref().map(|c| c.id), ctx.route, ctx.service);
        let shapes = self.shapes[index];
        // Kong's precedence: consumer+route+service first, global last.
        for (consumer, route, service) in [
            (true, true, true),
            (true, true, false),
            (true, false, true),
            (false, true, true),
            (true, false, false),
            (false, true, false),
            (false, false, true),
            (false, false, false),
        ] {
            if shapes & (1 << shape(consumer, route, service)) == 0 {
                continue;
            }
            let pick = |wanted: bool, value: Option<Uuid>| if wanted { value.map(Some) } else { Some(None) };
            let (Some(consumer), Some(route), Some(service)) = (pick(consumer, c), pick(route, r), pick(service, s))
            else {
                continue;
            };
            if let Some(instance) = self.instances.get(&(index, Scope { consumer, route, service })) {
                return Some(instance);
            }
        }
        None
    }

    /// Runs the access phase; returns the instances that ran (for `header_filter`) and
    /// an exit when one answered the request.
    pub async fn access(
        &self,
        ctx: &mut Ctx,
        request: &mut RequestView<'_>,
        state: &NodeState,
    ) -> (Vec<Arc<Instance>>, Option<Exit>) {
        let mut ran = Vec::with_capacity(self.names.len());
        let mut from = 0;
        // Only slow work (a password hash) leaves the synchronous loop, through a boxed
        // future, so the common path keeps a small future.
        loop {
            match self.access_from(from, ctx, request, state, &mut ran) {
                Step::Done(exit) => return (ran, exit),
                Step::Verify(index, work) => {
                    ctx.verified = Some(work.await);
                    from = index;
                }
            }
        }
    }

    /// Runs plugins from `from` on until one exits or asks for slow work.
    fn access_from(
        &self,
        from: usize,
        ctx: &mut Ctx,
        request: &mut RequestView<'_>,
        state: &NodeState,
        ran: &mut Vec<Arc<Instance>>,
    ) -> Step {
        let env = Env { data: &self.data, counters: &state.counters, verified: &state.verified, cache: &state.cache };
        for index in from..self.names.len() {
            let Some(instance) = self.resolve(index, ctx) else { continue };
            if !instance.protocols.iter().any(|protocol| protocol == ctx.protocol) {
                continue;
            }
            let resumed = ctx.verified.is_some();
            let flow = instance.plugin.access(ctx, request, &env);
            ctx.verified = None;
            match flow {
                Flow::Verify(work) if !resumed => return Step::Verify(index, work),
                Flow::Verify(_) => {
                    ran.push(instance.clone());
                    return Step::Done(Some(Exit::message(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "plugin verification loop",
                    )));
                }
                Flow::Continue => ran.push(instance.clone()),
                Flow::Exit(exit) => {
                    ran.push(instance.clone());
                    return Step::Done(Some(exit));
                }
            }
        }
        Step::Done(None)
    }
}

/// Where the synchronous part of the access phase stopped.
enum Step {
    Done(Option<Exit>),
    /// Plugin `index` asked for slow work; run it again with the answer.
    Verify(usize, std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>),
}

/// A scope shape's bit: which of consumer, route and service a scope names.
fn shape(consumer: bool, route: bool, service: bool) -> u8 {
    (u8::from(consumer) << 2) | (u8::from(route) << 1) | u8::from(service)
}

/// Runs `header_filter` of the instances whose `access` ran, in the same order.
pub fn header_filter(ran: &[Arc<Instance>], ctx: &mut Ctx, status: StatusCode, headers: &mut http::HeaderMap) {
    for (name, value) in ctx.response_headers.drain(..) {
        headers.insert(name, value);
    }
    for instance in ran {
        instance.plugin.header_filter(ctx, status, headers);
    }
}

/// Builds a plugin from its stored (normalised) config.
fn build(name: &str, id: Uuid, config: Value) -> Result<Box<dyn Plugin>, String> {
    fn parse<T: serde::de::DeserializeOwned>(config: Value) -> Result<T, String> {
        serde_json::from_value(config).map_err(|error| error.to_string())
    }
    use tollgate_raft_store::plugins as configs;
    Ok(match name {
        "key-auth" => Box::new(auth::KeyAuth::new(parse::<configs::KeyAuthConfig>(config)?)?),
        "acl" => Box::new(access::Acl::new(parse::<configs::AclConfig>(config)?)),
        "ip-restriction" => Box::new(access::IpRestriction::new(parse::<configs::IpRestrictionConfig>(config)?)?),
        "request-termination" => {
            Box::new(access::RequestTermination::new(parse::<configs::RequestTerminationConfig>(config)?)?)
        }
        "rate-limiting" => Box::new(access::RateLimiting::new(id, parse::<configs::RateLimitingConfig>(config)?)),
        "correlation-id" => Box::new(access::CorrelationId::new(parse::<configs::CorrelationIdConfig>(config)?)?),
        "basic-auth" => Box::new(basic::BasicAuth::new(parse::<configs::BasicAuthConfig>(config)?)?),
        "jwt" => Box::new(jwt::Jwt::new(parse::<configs::JwtConfig>(config)?)?),
        "hmac-auth" => Box::new(hmac::HmacAuth::new(parse::<configs::HmacAuthConfig>(config)?)?),
        "request-transformer" => {
            Box::new(transform::RequestTransformer::new(parse::<configs::RequestTransformerConfig>(config)?)?)
        }
        "response-transformer" => {
            Box::new(transform::ResponseTransformer::new(parse::<configs::ResponseTransformerConfig>(config)?)?)
        }
        "file-log" => Box::new(logging::FileLog::new(parse::<configs::FileLogConfig>(config)?)),
        "proxy-cache" => Box::new(cache::ProxyCache::new(parse::<configs::ProxyCacheConfig>(config)?)?),
        "opentelemetry" => Box::new(observe::OpenTelemetry::new(parse::<configs::OpenTelemetryConfig>(config)?)),
        "http-log" => Box::new(logging::HttpLog::new(parse::<configs::HttpLogConfig>(config)?)),
        "prometheus" => Box::new(observe::Prometheus::new(parse::<configs::PrometheusConfig>(config)?)),
        "cors" => Box::new(access::Cors::new(parse::<configs::CorsConfig>(config)?)?),
        "request-size-limiting" => {
            Box::new(access::RequestSizeLimiting::new(parse::<configs::RequestSizeLimitingConfig>(config)?))
        }
        other => return Err(format!("plugin '{other}' is not available in this build")),
    })
}
