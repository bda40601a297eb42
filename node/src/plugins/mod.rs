//! The plugin framework: which plugin instances run for a request, in which order,
//! and the phases they run in.
//!
//! **Phases**, in order (in the spirit of Pingora's `ProxyHttp` and Kong's phases):
//! 1. `rewrite`: before routing, for global instances only (Kong's rule: neither the
//!    route nor the consumer is known yet). A plugin may change the headers the router
//!    sees, or answer the request itself. No bundled plugin needs it, as in Kong,
//!    where the bundled plugins do their work in `access`.
//! 2. `access`: after routing, before the upstream is picked. A plugin may change the
//!    request (headers, the query string sent upstream, the body), ask for the whole
//!    request body ([`Flow::ReadBody`]), hand slow work off the worker
//!    ([`Flow::Verify`]) or answer the request itself ([`Flow::Exit`]):
//!    authentication, access control, rate limits, termination, request transforms.
//! 3. `header_filter`: on the response headers, from the upstream, from an exit or
//!    of a proxy error (a 502), once per request, for every plugin whose `access`
//!    ran: rate-limit headers, echoed ids, cors's headers.
//! 4. `body_filter`: on the whole response body, for the plugins whose `wants_body`
//!    said so after `header_filter` (the body is then read whole, at most
//!    [`BODY_FILTER_BYTES_MAX`], and sent with its new length): response-transformer.
//!    Kong's body filters see chunks and most buffer them; handing them the whole
//!    body keeps every plugin simple. Other responses stream untouched.
//! 5. `log`: once the response headers went out, with status and latencies, for the
//!    same plugins: metrics (prometheus), log sinks, traces.
//!
//! Each phase has a default that does nothing.
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
pub mod cors;
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

/// Largest body a plugin reads whole, request ([`Flow::ReadBody`]) or response
/// (`body_filter`). A larger request body is answered 413 when a plugin needs it; a
/// larger response body 502.
pub const BODY_FILTER_BYTES_MAX: usize = 8 * 1024 * 1024;

/// How long a client may take to send a body a plugin reads whole: 408 after it.
pub const REQUEST_BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Plugin state a node keeps across config changes, shared by its proxy workers.
#[derive(Default)]
pub struct NodeState {
    pub counters: RateCounters,
    pub verified: basic::VerifiedCache,
    pub logs: logging::LogSinks,
    pub cache: cache::ResponseCache,
    /// Leases of cluster rate-limit tokens (`policy: cluster`).
    pub quota: Arc<crate::quota::Leases>,
}

/// How many response headers plugins usually add to one response.
const RESPONSE_HEADERS_USUAL: usize = 8;

/// A map keyed by config ids (plugin instances, metric handles): nothing a client
/// sends chooses its keys, so a fast hash serves.
pub type IdMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Header values of numbers below this are made once and shared (rate-limit headers).
const SHARED_NUMBER_VALUES: u64 = 4096;

/// A number as a header value; small ones come from a table made once, so the common
/// rate-limit headers cost no allocation.
pub fn number_value(n: u64) -> HeaderValue {
    static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    if n >= SHARED_NUMBER_VALUES {
        return HeaderValue::from(n);
    }
    let table = TABLE.get_or_init(|| {
        // One small leaked string per number, made once per process (about 20 KiB), so
        // each value is static and clones for free.
        (0..SHARED_NUMBER_VALUES).map(|n| HeaderValue::from_static(Box::leak(n.to_string().into_boxed_str()))).collect()
    });
    table[n as usize].clone()
}

/// An id as a header value (`X-Consumer-ID`, `X-Credential-Identifier`).
pub fn id_header(id: Uuid) -> HeaderValue {
    HeaderValue::from_str(&id.to_string()).unwrap_or(HeaderValue::from_static(""))
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
    /// The request body, once a plugin asked for it ([`Flow::ReadBody`]); what is
    /// here is sent upstream, so plugins edit it in place.
    pub request_body: Option<Bytes>,
    /// cors: what its `header_filter` needs of the request (none after a preflight).
    pub cors: Option<cors::Pending>,
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
            // Room for the usual few (rate-limit headers, an echoed id) in one allocation.
            response_headers: Vec::with_capacity(RESPONSE_HEADERS_USUAL),
            body_limit: None,
            verified: None,
            upstream_path: None,
            upstream_method: None,
            log_request: None,
            trace: None,
            cache_pending: None,
            cache_store: None,
            request_body: None,
            cors: None,
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
    /// The plugin needs the whole request body: the framework reads it (at most
    /// [`BODY_FILTER_BYTES_MAX`]), puts it in [`Ctx::request_body`] and runs the
    /// plugin's `access` again. Asked when the body is already there, it continues.
    ReadBody,
}

/// The request as plugins see it in `access`.
pub struct RequestView<'a> {
    pub method: &'a http::Method,
    /// The path as the client sent it (before normalisation).
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a mut http::HeaderMap,
    /// The regex path that routed it, for Kong's `uri_captures`.
    pub uri: UriMatch<'a>,
}

/// The regex path that routed a request and the normalised path it matched: Kong's
/// `uri_captures`, computed only when a plugin asks (request-transformer's templates),
/// so routing keeps no captures.
#[derive(Clone, Copy, Default)]
pub struct UriMatch<'a> {
    regex: Option<&'a regex::Regex>,
    path: &'a str,
}

impl<'a> UriMatch<'a> {
    pub fn new(regex: Option<&'a regex::Regex>, path: &'a str) -> UriMatch<'a> {
        UriMatch { regex, path }
    }

    /// The groups of the match (`0`, the whole match, then numbered and named), or
    /// `None` when no regex routed the request or none of its groups took part: Kong's
    /// router then leaves `uri_captures` empty (kong/router/atc.lua, `has_capture`).
    pub fn captures(&self) -> Option<regex::Captures<'a>> {
        let captures = self.regex?.captures(self.path)?;
        captures.iter().skip(1).any(|group| group.is_some()).then_some(captures)
    }
}

/// What plugins may consult: the snapshot's consumers and credentials, and the
/// node's counters.
pub struct Env<'a> {
    pub data: &'a PluginData,
    pub counters: &'a RateCounters,
    pub verified: &'a basic::VerifiedCache,
    pub cache: &'a cache::ResponseCache,
    pub quota: &'a Arc<crate::quota::Leases>,
}

/// The request as global plugins see it in `rewrite`, before routing.
pub struct RewriteView<'a> {
    pub method: &'a http::Method,
    pub path: &'a str,
    pub headers: &'a mut http::HeaderMap,
}

/// The phases a plugin instance has besides `access` and `log`. The proxy plans each
/// route from them when the config is compiled (which codec may carry its requests,
/// whether the response head is read into a header map). There is no default: every
/// plugin states its own, so a plugin that gains a phase cannot lose it silently on a
/// path that plans without it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases {
    /// [`Plugin::rewrite`], before routing (global instances only).
    pub rewrite: bool,
    /// [`Plugin::header_filter`] (headers left in [`Ctx::response_headers`] need none).
    pub header_filter: bool,
    /// The response body: [`Plugin::body_filter`], or a copy of it (proxy-cache).
    pub response_body: bool,
}

impl Phases {
    /// Only `access` and `log`.
    pub const NONE: Phases = Phases { rewrite: false, header_filter: false, response_body: false };

    fn union(self, other: Phases) -> Phases {
        Phases {
            rewrite: self.rewrite || other.rewrite,
            header_filter: self.header_filter || other.header_filter,
            response_body: self.response_body || other.response_body,
        }
    }
}

/// What the plugins of a snapshot ask of one route's requests, decided when the
/// config is compiled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// Some instance may run (global, or on the route or its service): the request's
    /// headers are needed as a map.
    pub may_run: bool,
    /// The phases, over every instance that may run.
    pub phases: Phases,
}

/// One plugin's behaviour. Every phase but [`Plugin::phases`] defaults to doing nothing.
pub trait Plugin: Send + Sync {
    /// Which phases this plugin has besides `access` and `log`.
    fn phases(&self) -> Phases;

    /// Before routing; runs only for global instances.
    fn rewrite(&self, _request: &mut RewriteView<'_>) -> Option<Exit> {
        None
    }

    fn access(&self, _ctx: &mut Ctx, _request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        Flow::Continue
    }

    fn header_filter(&self, _ctx: &mut Ctx, _status: StatusCode, _headers: &mut http::HeaderMap) {}

    /// Whether `body_filter` is to see this response's body; asked after every
    /// `header_filter` ran.
    fn wants_body(&self, _ctx: &Ctx, _status: StatusCode, _headers: &http::HeaderMap) -> bool {
        false
    }

    /// On the whole response body, when `wants_body` said so; may replace it.
    fn body_filter(&self, _ctx: &mut Ctx, _headers: &http::HeaderMap, _body: &mut Bytes) {}

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
    pub consumers: IdMap<Uuid, Arc<Consumer>>,
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
    /// Header, query argument and cookie names (lower case) any key-auth or jwt
    /// instance reads a credential from: the logging plugins redact them.
    pub credential_names: std::collections::HashSet<String>,
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
                (auth::Identity::of(credential, None), credential.get("key").and_then(Value::as_str))
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
                        let Some(identity) = auth::Identity::of(credential, Some("key")) else { break };
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
                (auth::Identity::of(credential, Some("username")), text("username"), text("secret"))
            {
                let secret = secret.to_string();
                data.hmac.insert(username.to_string(), hmac::HmacCredential { identity, secret });
            }
        }
        for credential in state.table(EntityKind::BasicAuth).values() {
            let text = |field: &str| credential.get(field).and_then(Value::as_str);
            if let (Some(identity), Some(username), Some(hash)) =
                (auth::Identity::of(credential, Some("username")), text("username"), text("password"))
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
    instances: IdMap<(usize, Scope), Arc<Instance>>,
    /// Per plugin name, which of the 8 scope shapes have an instance, so a request
    /// looks up only those.
    shapes: Vec<u8>,
    /// Plugin names with at least one instance, by Kong priority (highest first).
    names: Vec<String>,
    /// The global instances, by priority: they alone run `rewrite`.
    global: Vec<Arc<Instance>>,
    pub data: PluginData,
    /// Each route's plan; a route not here (none when compiled from a config) gets
    /// `unrouted`.
    plans: IdMap<Uuid, RoutePlan>,
    /// The plan of global instances alone.
    unrouted: RoutePlan,
}

/// The names (lower case) key-auth and jwt instances read credentials from.
fn credential_names(state: &ConfigState) -> std::collections::HashSet<String> {
    let mut names = std::collections::HashSet::new();
    for plugin in state.table(EntityKind::Plugin).values() {
        let fields: &[&str] = match plugin.get("name").and_then(Value::as_str) {
            Some("key-auth") => &["key_names"],
            Some("jwt") => &["uri_param_names", "cookie_names", "header_names"],
            _ => continue,
        };
        let config = plugin.get("config");
        for field in fields {
            let listed = config.and_then(|config| config.get(*field)).and_then(Value::as_array);
            names.extend(listed.into_iter().flatten().filter_map(Value::as_str).map(str::to_ascii_lowercase));
        }
    }
    names
}

/// The plan of a route (`None`: of a request no route matched): every instance scoped
/// to it, its service, or neither may run. Instances scoped to a consumer count for
/// the phases but not for `may_run`: they run only once an authentication plugin, which
/// is not consumer-scoped, identified the consumer.
fn plan(instances: &IdMap<(usize, Scope), Arc<Instance>>, route: Option<Uuid>, service: Option<Uuid>) -> RoutePlan {
    let mut plan = RoutePlan::default();
    for ((_, scope), instance) in instances {
        let applies =
            scope.route.is_none_or(|id| Some(id) == route) && scope.service.is_none_or(|id| Some(id) == service);
        if !applies {
            continue;
        }
        plan.may_run |= scope.consumer.is_none();
        plan.phases = plan.phases.union(instance.plugin.phases());
    }
    plan
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
        let priority = |name: &str| tollgate_raft_store::plugins::plugin(name).map_or(0, |spec| spec.priority);
        order.sort_by_key(|&index| (-priority(&names[index]), names[index].clone()));
        let position: HashMap<usize, usize> = order.iter().enumerate().map(|(new, &old)| (old, new)).collect();
        let instances: IdMap<(usize, Scope), Arc<Instance>> =
            instances.into_iter().map(|((index, scope), instance)| ((position[&index], scope), instance)).collect();
        let names: Vec<String> = order.iter().map(|&index| names[index].clone()).collect();
        let mut shapes = vec![0u8; names.len()];
        for (index, scope) in instances.keys() {
            shapes[*index] |= 1 << shape(scope.consumer.is_some(), scope.route.is_some(), scope.service.is_some());
        }
        let mut global: Vec<(usize, Arc<Instance>)> = instances
            .iter()
            .filter(|((_, scope), _)| scope.consumer.is_none() && scope.route.is_none() && scope.service.is_none())
            .map(|((index, _), instance)| (*index, instance.clone()))
            .collect();
        global.sort_by_key(|(index, _)| *index);
        let global: Vec<Arc<Instance>> = global.into_iter().map(|(_, instance)| instance).collect();
        let identifies_consumers =
            names.iter().any(|name| tollgate_raft_store::plugins::plugin(name).is_some_and(|spec| spec.authenticates));
        let mut data = if identifies_consumers { PluginData::compile(state) } else { PluginData::default() };
        data.credential_names = credential_names(state);
        let unrouted = plan(&instances, None, None);
        let plans = state
            .table(EntityKind::Route)
            .values()
            .map(|route| {
                let id = entity_id(route);
                (id, plan(&instances, Some(id), foreign_id(route, "service")))
            })
            .collect();
        Plugins { instances, shapes, names, global, data, plans, unrouted }
    }

    /// Runs the `rewrite` phase of the global instances for `protocol`; an exit
    /// answers the request before routing.
    pub fn rewrite(&self, protocol: &str, request: &mut RewriteView<'_>) -> Option<Exit> {
        self.global
            .iter()
            .filter(|instance| instance.plugin.phases().rewrite && instance.protocols.iter().any(|p| p == protocol))
            .find_map(|instance| instance.plugin.rewrite(request))
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether a global instance has a rewrite phase: it runs before routing, for
    /// every request.
    pub fn rewrites(&self) -> bool {
        self.unrouted.phases.rewrite
    }

    /// What the plugins ask of requests on `route`.
    pub fn plan(&self, route: Uuid) -> RoutePlan {
        self.plans.get(&route).copied().unwrap_or(self.unrouted)
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
    /// an exit when one answered the request. `body` is the request body, taken and
    /// read whole only when a plugin asks for it ([`Flow::ReadBody`]).
    pub async fn access<B>(
        &self,
        ctx: &mut Ctx,
        request: &mut RequestView<'_>,
        body: &mut Option<B>,
        state: &NodeState,
    ) -> (Vec<Arc<Instance>>, Option<Exit>)
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut ran = Vec::with_capacity(self.names.len());
        let mut from = 0;
        // Only slow work (a password hash, reading a body) leaves the synchronous loop,
        // so the common path keeps a small future.
        loop {
            match self.access_from(from, ctx, request, state, &mut ran) {
                Step::Done(exit) => return (ran, exit),
                Step::Verify(index, work) => {
                    ctx.verified = Some(work.await);
                    from = index;
                }
                Step::ReadBody(index) => {
                    match body.take() {
                        Some(stream) => match read_whole(stream).await {
                            Ok(bytes) => ctx.request_body = Some(bytes),
                            Err(exit) => return (ran, Some(exit)),
                        },
                        None => ctx.request_body = Some(ctx.request_body.take().unwrap_or_default()),
                    }
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
        let env = Env {
            data: &self.data,
            counters: &state.counters,
            verified: &state.verified,
            cache: &state.cache,
            quota: &state.quota,
        };
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
                Flow::ReadBody if ctx.request_body.is_none() => return Step::ReadBody(index),
                Flow::ReadBody => ran.push(instance.clone()),
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
    /// Plugin `index` asked for the request body; run it again once it is read.
    ReadBody(usize),
}

/// Reads a request body whole for a plugin: 413 above [`BODY_FILTER_BYTES_MAX`], 400
/// when it is malformed, 408 when the client is too slow.
async fn read_whole<B>(body: B) -> Result<Bytes, Exit>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, BODY_FILTER_BYTES_MAX);
    match tokio::time::timeout(REQUEST_BODY_READ_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(failure)) if failure.is::<http_body_util::LengthLimitError>() => {
            Err(Exit::message(StatusCode::PAYLOAD_TOO_LARGE, "Request size limit exceeded"))
        }
        Ok(Err(failure)) => {
            tracing::debug!(%failure, "client request body failed");
            Err(Exit::message(StatusCode::BAD_REQUEST, "invalid request body"))
        }
        Err(_) => Err(Exit::message(StatusCode::REQUEST_TIMEOUT, "request body timed out")),
    }
}

/// Whether any instance that ran wants the response body (`body_filter`).
pub fn wants_body(ran: &[Arc<Instance>], ctx: &Ctx, status: StatusCode, headers: &http::HeaderMap) -> bool {
    ran.iter().any(|instance| instance.plugin.wants_body(ctx, status, headers))
}

/// Runs `body_filter` of the instances that want this body, in order.
pub fn body_filter(
    ran: &[Arc<Instance>],
    ctx: &mut Ctx,
    status: StatusCode,
    headers: &http::HeaderMap,
    body: &mut Bytes,
) {
    for instance in ran {
        if instance.plugin.wants_body(ctx, status, headers) {
            instance.plugin.body_filter(ctx, headers, body);
        }
    }
}

/// A scope shape's bit: which of consumer, route and service a scope names.
fn shape(consumer: bool, route: bool, service: bool) -> u8 {
    (u8::from(consumer) << 2) | (u8::from(route) << 1) | u8::from(service)
}

/// Runs `header_filter` of the instances whose `access` ran, in the same order.
pub fn header_filter(ran: &[Arc<Instance>], ctx: &mut Ctx, status: StatusCode, headers: &mut http::HeaderMap) {
    // Grow the map once, not once per doubling.
    headers.reserve(ctx.response_headers.len());
    for (name, value) in ctx.response_headers.drain(..) {
        headers.insert(name, value);
    }
    for instance in ran {
        instance.plugin.header_filter(ctx, status, headers);
    }
}

/// Makes a plugin from its stored (normalised) config and its instance id.
type Builder = fn(Uuid, Value) -> Result<Box<dyn Plugin>, String>;

fn parse<T: serde::de::DeserializeOwned>(config: Value) -> Result<T, String> {
    serde_json::from_value(config).map_err(|error| error.to_string())
}

/// The node's half of the plugin registry
/// ([`tollgate_raft_store::plugins::PLUGINS`] is the other): a builder per name.
static BUILDERS: [(&str, Builder); 18] = [
    ("correlation-id", |_, config| Ok(Box::new(access::CorrelationId::new(parse(config)?)?))),
    ("cors", |_, config| Ok(Box::new(cors::Cors::new(parse(config)?)?))),
    ("jwt", |_, config| Ok(Box::new(jwt::Jwt::new(parse(config)?)?))),
    ("key-auth", |_, config| Ok(Box::new(auth::KeyAuth::new(parse(config)?)?))),
    ("basic-auth", |_, config| Ok(Box::new(basic::BasicAuth::new(parse(config)?)?))),
    ("hmac-auth", |_, config| Ok(Box::new(hmac::HmacAuth::new(parse(config)?)?))),
    ("ip-restriction", |_, config| Ok(Box::new(access::IpRestriction::new(parse(config)?)?))),
    ("request-size-limiting", |_, config| Ok(Box::new(access::RequestSizeLimiting::new(parse(config)?)))),
    ("acl", |_, config| Ok(Box::new(access::Acl::new(parse(config)?)))),
    ("rate-limiting", |id, config| Ok(Box::new(access::RateLimiting::new(id, parse(config)?)))),
    ("request-transformer", |_, config| Ok(Box::new(transform::RequestTransformer::new(parse(config)?)?))),
    ("response-transformer", |_, config| Ok(Box::new(transform::ResponseTransformer::new(parse(config)?)?))),
    ("proxy-cache", |_, config| Ok(Box::new(cache::ProxyCache::new(parse(config)?)?))),
    ("opentelemetry", |_, config| Ok(Box::new(observe::OpenTelemetry::new(parse(config)?)))),
    ("prometheus", |_, config| Ok(Box::new(observe::Prometheus::new(parse(config)?)))),
    ("http-log", |_, config| Ok(Box::new(logging::HttpLog::new(parse(config)?)))),
    ("file-log", |_, config| Ok(Box::new(logging::FileLog::new(parse(config)?)))),
    ("request-termination", |_, config| Ok(Box::new(access::RequestTermination::new(parse(config)?)?))),
];

/// Builds a plugin from its stored (normalised) config.
fn build(name: &str, id: Uuid, config: Value) -> Result<Box<dyn Plugin>, String> {
    match BUILDERS.iter().find(|(known, _)| *known == name) {
        Some((_, builder)) => builder(id, config),
        None => Err(tollgate_raft_store::plugins::unknown_plugin(name)),
    }
}

#[cfg(test)]
mod tests;
