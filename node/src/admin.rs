//! The Admin API: Kong's shape on every node.
//!
//! Writes become [`Op`]s sent through the leader ([`Cluster::write`]); the answer
//! carries `Tollgate-Config-Version`. Reads are linearizable (ReadIndex through the
//! leader) unless `?consistency=local`.
//!
//! Routes:
//! - `/{collection}` and `/{collection}/{id or key}` for services, routes, consumers,
//!   upstreams, plugins, certificates, snis;
//! - nested: `/services/{s}/routes|plugins`, `/routes/{r}/plugins`,
//!   `/consumers/{c}/plugins|key-auth|basic-auth|jwt|hmac-auth|acls`,
//!   `/upstreams/{u}/targets`, `/certificates/{c}/snis`, and `/{nested}/{id}` below each;
//! - `/status`, `/cluster`, `/cluster/members[/{id}]`, `/config`, `/metrics`;
//! - `meta`: `/endpoints`, `/schemas/...`, links (`/routes/{r}/service`) and
//!   `/upstreams/{u}/targets/all`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tollgate_raft_store::planted::{planted, Bug};

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::watch;
use tollgate_raft_store::command::{Op, Outcome, Parent};
use tollgate_raft_store::state::page_size;
use tollgate_raft_store::store::Applied;
use tollgate_raft_store::tags::TagFilter;
use tollgate_raft_store::{ApiError, EntityKind, ErrorCode};
use uuid::Uuid;

use crate::node::Node;
use crate::text::percent_decode;

mod meta;

pub const CONFIG_VERSION_HEADER: &str = "tollgate-config-version";

/// Bytes of an over-long Admin API body read and dropped before its 413 goes out, and
/// how long that may take (nginx's lingering close does the same for its errors).
pub const ADMIN_DISCARD_BYTES_MAX: usize = 64 * 1024 * 1024;
pub const ADMIN_DISCARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Top-level collections. Credentials and targets are reached through their parent.
const TOP_LEVEL: [EntityKind; 8] = [
    EntityKind::Service,
    EntityKind::Route,
    EntityKind::Consumer,
    EntityKind::Upstream,
    EntityKind::Plugin,
    EntityKind::Certificate,
    EntityKind::CaCertificate,
    EntityKind::Sni,
];

fn nested_allowed(parent: EntityKind, child: EntityKind) -> bool {
    matches!(
        (parent, child),
        (EntityKind::Service, EntityKind::Route | EntityKind::Plugin)
            | (EntityKind::Route, EntityKind::Plugin)
            | (
                EntityKind::Consumer,
                EntityKind::Plugin
                    | EntityKind::KeyAuth
                    | EntityKind::BasicAuth
                    | EntityKind::Jwt
                    | EntityKind::HmacAuth
                    | EntityKind::Acl
            )
            | (EntityKind::Upstream, EntityKind::Target)
            | (EntityKind::Certificate, EntityKind::Sni)
    )
}

/// Most Admin API connections open at once.
pub const ADMIN_CONNECTIONS_MAX: usize = 1024;
/// Most Admin API connections of one client address open at once.
pub const ADMIN_CONNECTIONS_PER_PEER_MAX: usize = 256;
/// Admin API connections that have not sent a request yet; past this the oldest
/// such one is closed.
pub const ADMIN_PENDING_MAX: usize = 256;
/// How long an Admin API write may make no progress (a client that stopped reading).
pub const ADMIN_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The Admin API's TLS configuration from a certificate chain and key (PEM files).
pub fn tls_source(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<crate::serve::TlsSource> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("--admin-tls-cert {}: cannot read", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("--admin-tls-cert {}: not PEM certificates", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("--admin-tls-key {}: not a PEM private key", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("--admin-tls-key: does not match --admin-tls-cert")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);
    Ok(Arc::new(move || config.clone()))
}

/// Serves the Admin API until `shutdown` turns true.
pub async fn serve(
    listener: crate::env::Listener,
    node: Arc<Node>,
    tls: Option<crate::serve::TlsSource>,
    shutdown: watch::Receiver<bool>,
) {
    let server = crate::serve::Http1Server {
        name: "admin",
        limits: crate::serve::Limits {
            connections_max: ADMIN_CONNECTIONS_MAX,
            per_peer_max: ADMIN_CONNECTIONS_PER_PEER_MAX,
            pending_max: ADMIN_PENDING_MAX,
        },
        timeouts: crate::conn::Timeouts {
            header: std::time::Duration::from_millis(node.config.admin_header_timeout_ms),
            keepalive: std::time::Duration::from_millis(node.config.admin_keepalive_timeout_ms),
            send: ADMIN_SEND_TIMEOUT,
        },
        tls,
    };
    let handler = move |caller: crate::serve::Caller, request| {
        let node = node.clone();
        async move { handle(&node, caller.address, request).await }
    };
    crate::serve::serve_http1(listener, server, handler, shutdown).await;
}

/// A parsed request: what the handlers need.
struct AdminRequest {
    method: Method,
    segments: Vec<String>,
    query: BTreeMap<String, String>,
    /// Lower case, for matching.
    content_type: String,
    /// As sent: a multipart boundary is case-sensitive.
    content_type_header: String,
    body: Bytes,
}

impl AdminRequest {
    fn local(&self) -> bool {
        self.query.get("consistency").is_some_and(|c| c == "local")
    }
}

async fn handle(node: &Node, peer: SocketAddr, request: Request<Incoming>) -> Response<Full<Bytes>> {
    // Readiness answers without the admin token, as Kong's status listener does: load
    // balancers and Kubernetes probes hold no token, and it tells only ready or why not.
    if request.method() == Method::GET && request.uri().path() == "/status/ready" {
        return match node.readiness() {
            Ok(()) => json_response(StatusCode::OK, &json!({ "message": "ready" })),
            Err(reason) => error_response(&ApiError::new(ErrorCode::Unavailable, reason)),
        };
    }
    // OPTIONS answers as Kong's does, without the token (a browser's CORS preflight
    // carries none): the path's methods, 204.
    if request.method() == Method::OPTIONS {
        let segments: Vec<String> =
            request.uri().path().split('/').filter(|s| !s.is_empty()).map(|s| percent_decode(s, false)).collect();
        return match allowed_methods(&segments) {
            Some(methods) => options_response(methods),
            None => error_response(&ApiError::not_found()),
        };
    }
    if let Some(token) = node.config.admin_token.as_deref() {
        if !authorized(request.headers().get(AUTHORIZATION), token) {
            let mut response =
                error_response(&ApiError::new(ErrorCode::Unauthorized, "missing or invalid admin token"));
            response.headers_mut().insert("www-authenticate", HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    // HEAD is GET without the body (hyper leaves the body out and keeps the headers).
    let method = match request.method() {
        &Method::HEAD => Method::GET,
        other => other.clone(),
    };
    let path = request.uri().path().to_string();
    let query = parse_query(request.uri().query().unwrap_or(""));
    let content_type_header =
        request.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let content_type = content_type_header.to_ascii_lowercase();
    let limit = node.config.admin_body_bytes_max;
    let mut body = request.into_body();
    let body = match Limited::new(&mut body, limit).collect().await {
        Ok(read) => read.to_bytes(),
        Err(_) => {
            let mut error = ApiError::new(ErrorCode::BadRequest, format!("request body larger than {limit} bytes"));
            error.fields.insert("@body".into(), format!("at most {limit} bytes (admin_body_bytes_max)"));
            // Read and drop what is left (bounded) before answering: a connection
            // closed with unread bytes is reset, and the client, still sending, sees
            // the reset instead of this answer. It closes after the answer anyway.
            let rest = Limited::new(&mut body, ADMIN_DISCARD_BYTES_MAX).collect();
            let _ = tokio::time::timeout(ADMIN_DISCARD_TIMEOUT, rest).await;
            let mut response = with_status(error_response(&error), StatusCode::PAYLOAD_TOO_LARGE);
            response.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    if !supported_body(&method, &content_type, body.is_empty(), &path) {
        return error_response(&ApiError::new(ErrorCode::UnsupportedMediaType, "Unsupported media type"));
    }
    let segments: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(|s| percent_decode(s, false)).collect();
    let request = AdminRequest { method, segments, query, content_type, content_type_header, body };
    let started = tokio::time::Instant::now();
    let response = route(node, &request).await.unwrap_or_else(|error| error_response(&error));
    tracing::debug!(
        %peer, method = %request.method, path, status = response.status().as_u16(),
        elapsed_us = started.elapsed().as_micros() as u64, "admin request"
    );
    response
}

fn authorized(header: Option<&HeaderValue>, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    let Some(given) = header.and_then(|h| h.to_str().ok()).and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    // Constant time in the token's content; only its length can leak.
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

async fn route(node: &Node, request: &AdminRequest) -> Result<Response<Full<Bytes>>, ApiError> {
    // A path of the API with a method it does not take: Kong's 405.
    if let Some(methods) = allowed_methods(&request.segments) {
        if !methods.split(", ").any(|method| method == request.method.as_str()) {
            return Err(method_not_allowed());
        }
    }
    let segments: Vec<&str> = request.segments.iter().map(String::as_str).collect();
    match (&request.method, segments.as_slice()) {
        (&Method::GET, []) => Ok(json_response(StatusCode::OK, &node.info())),
        (&Method::GET, ["status"]) => Ok(json_response(StatusCode::OK, &node.status())),
        (&Method::GET, ["metrics"]) => Ok(text_response(node.metrics_text(), "text/plain; version=0.0.4")),
        (&Method::GET, ["cluster"]) => {
            // Members as of a linearizable read, like every admin read: a member
            // removed through any node is gone from every node's answer after.
            if !request.local() {
                node.cluster.metrics_barrier().await?;
            }
            Ok(json_response(StatusCode::OK, &node.cluster_view_with_gossip().await))
        }
        (&Method::POST, ["cluster", "members"]) => add_member(node, request).await,
        (&Method::DELETE, ["cluster", "members", id]) => {
            let node_id: u64 = id.parse().map_err(|_| ApiError::field("id", "expected a node id (u64)"))?;
            let version = node.cluster.remove_member(node_id).await?;
            Ok(versioned(empty_response(StatusCode::NO_CONTENT), version))
        }
        // proxy-cache's memory strategy is per node: these act on this node's cache.
        (&Method::DELETE, ["proxy-cache"]) => {
            node.plugin_state.cache.clear();
            Ok(empty_response(StatusCode::NO_CONTENT))
        }
        (&Method::DELETE, ["proxy-cache", key]) => match node.plugin_state.cache.remove(key) {
            true => Ok(empty_response(StatusCode::NO_CONTENT)),
            false => Err(ApiError::new(ErrorCode::NotFound, "Not found")),
        },
        (&Method::GET, ["proxy-cache", key]) => match node.plugin_state.cache.describe(key) {
            Some(entry) => Ok(json_response(StatusCode::OK, &entry)),
            None => Err(ApiError::new(ErrorCode::NotFound, "Not found")),
        },
        // Kong's list of the plugins this node runs: the registry's names.
        (&Method::GET, ["plugins", "enabled"]) => {
            let names: Vec<&str> = tollgate_raft_store::plugins::PLUGINS.iter().map(|spec| spec.name).collect();
            Ok(json_response(StatusCode::OK, &serde_json::json!({ "enabled_plugins": names })))
        }
        (&Method::GET, ["rate-limits", plugin]) => rate_limits(node, request, plugin).await,
        (&Method::GET, ["upstreams", upstream, "health"]) => upstream_health(node, upstream),
        (&Method::GET, ["config"]) => get_config(node, request).await,
        (&Method::GET, ["tags"]) => tags_route(node, request, None).await,
        (&Method::GET, ["tags", tag]) => tags_route(node, request, Some(tag)).await,
        (&Method::POST, ["config"]) => post_config(node, request).await,
        (&Method::GET, ["endpoints"]) => Ok(meta::endpoints_response()),
        (&Method::GET, ["schemas", table]) => Ok(meta::entity_schema(table)),
        (&Method::POST, ["schemas", table, "validate"]) => meta::validate(request, table),
        (&Method::GET, ["schemas", "plugins", name]) => Ok(meta::plugin_schema(name)),
        (&Method::GET, ["upstreams", upstream, "targets", "all"]) => meta::all_targets(node, request, upstream).await,
        (_, [collection, key, field]) if meta::foreign_link(collection, field).is_some() => {
            let (kind, target) = meta::foreign_link(collection, field).ok_or_else(ApiError::not_found)?;
            meta::foreign_entity_route(node, request, kind, key, field, target).await
        }
        (_, [collection]) => {
            let kind = top_level(collection)?;
            collection_route(node, request, kind, None).await
        }
        (_, [collection, key]) => {
            let kind = top_level(collection)?;
            entity_route(node, request, kind, key, None).await
        }
        (_, [parent_collection, parent_key, collection]) => {
            let (parent, kind) = nested(parent_collection, parent_key, collection)?;
            collection_route(node, request, kind, Some(parent)).await
        }
        (_, [parent_collection, parent_key, collection, key]) => {
            let (parent, kind) = nested(parent_collection, parent_key, collection)?;
            entity_route(node, request, kind, key, Some(parent)).await
        }
        _ => Err(ApiError::not_found()),
    }
}

fn top_level(collection: &str) -> Result<EntityKind, ApiError> {
    EntityKind::from_path(collection).filter(|kind| TOP_LEVEL.contains(kind)).ok_or_else(ApiError::not_found)
}

fn nested(parent_collection: &str, parent_key: &str, collection: &str) -> Result<(Parent, EntityKind), ApiError> {
    let parent_kind = top_level(parent_collection)?;
    let kind = EntityKind::from_path(collection).ok_or_else(ApiError::not_found)?;
    if !nested_allowed(parent_kind, kind) {
        return Err(ApiError::not_found());
    }
    Ok((Parent { kind: parent_kind, key: parent_key.to_string() }, kind))
}

async fn read_state(node: &Node, request: &AdminRequest) -> Result<Applied, ApiError> {
    if request.local() || planted(Bug::StaleReads) {
        Ok(node.cluster.state())
    } else {
        node.cluster.read_barrier().await
    }
}

async fn collection_route(
    node: &Node,
    request: &AdminRequest,
    kind: EntityKind,
    parent: Option<Parent>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    match request.method {
        Method::GET => {
            let size = page_size(request.query.get("size").map(String::as_str))?;
            let offset = list_offset(request)?;
            let filter = ListFilter::from_query(request, kind, parent.is_some())?;
            let applied = read_state(node, request).await?;
            let keep = |entity: &tollgate_raft_store::schema::Object| filter.keeps(entity);
            let (page, next) = applied.state.list(kind, parent.as_ref(), offset, size, &keep)?;
            let base = request.segments.join("/");
            let next_path = next.map(|after| format!("/{base}?offset={after}&size={size}{}", filter.next_args()));
            let data: Vec<Value> = page.iter().map(|entity| Value::Object((**entity).clone())).collect();
            // Kong's page: `offset` only when there is a next page.
            let mut body = json!({ "data": data, "next": next_path });
            if let Some(after) = next {
                body["offset"] = Value::from(after.to_string());
            }
            Ok(versioned(json_response(StatusCode::OK, &body), applied.version()))
        }
        Method::POST => {
            let mut body = parse_body(request, Some(kind))?;
            fill_generated_fields(kind, &mut body);
            hash_passwords(kind, &mut body).await?;
            check_certificate(kind, &body)?;
            let op = Op::Create { kind, id: crate::env::uuid(), parent, body: body.into() };
            write(node, op).await
        }
        _ => Err(method_not_allowed()),
    }
}

/// A list's `?offset=`: the id a previous page ended at.
fn list_offset(request: &AdminRequest) -> Result<Option<Uuid>, ApiError> {
    let Some(offset) = request.query.get("offset") else { return Ok(None) };
    // Kong's code and message start (kong/db/dao/init.lua), no `fields`.
    let offset = Uuid::parse_str(offset).map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidOffset,
            format!("'{offset}' is not a valid offset: expected one returned by a previous page"),
        )
    })?;
    Ok(Some(offset))
}

/// What a list keeps besides its page bounds: Kong's `?tags=` on a top-level list
/// (ignored on a nested one, as Kong does: its #6779) and `?custom_id=` on
/// `/consumers`. Both used to be ignored, and a list "by tag" returned everything.
struct ListFilter {
    tags: Option<(String, TagFilter)>,
    custom_id: Option<String>,
}

impl ListFilter {
    fn from_query(request: &AdminRequest, kind: EntityKind, nested: bool) -> Result<ListFilter, ApiError> {
        let tags = match request.query.get("tags") {
            Some(text) if !nested => Some((text.clone(), TagFilter::parse(text)?)),
            _ => None,
        };
        let custom_id = match request.query.get("custom_id") {
            Some(id) if kind == EntityKind::Consumer && !nested => {
                if id.is_empty() {
                    let mut error = ApiError::new(ErrorCode::BadRequest, "custom_id must be an unempty string");
                    error.fields.insert("custom_id".into(), "must be an unempty string".into());
                    return Err(error);
                }
                Some(id.clone())
            }
            _ => None,
        };
        Ok(ListFilter { tags, custom_id })
    }

    fn keeps(&self, entity: &tollgate_raft_store::schema::Object) -> bool {
        self.tags.as_ref().is_none_or(|(_, filter)| filter.matches(entity))
            && self.custom_id.as_ref().is_none_or(|id| entity.get("custom_id").and_then(Value::as_str) == Some(id))
    }

    /// The filter's arguments for the `next` link.
    fn next_args(&self) -> String {
        let mut args = String::new();
        if let Some((text, _)) = &self.tags {
            args.push_str("&tags=");
            args.push_str(&crate::text::percent_encode(text));
        }
        if let Some(id) = &self.custom_id {
            args.push_str("&custom_id=");
            args.push_str(&crate::text::percent_encode(id));
        }
        args
    }
}

/// `GET /tags` and `GET /tags/{tag}`: every tag of every entity, as Kong lists them
/// (`entity_name` is the entity's table, `entity_id` its id). One page: the config's
/// size bounds it (`DOCUMENT_ENTITIES_MAX` entities, `TAGS_MAX` tags each).
async fn tags_route(
    node: &Node,
    request: &AdminRequest,
    only: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if only.is_some_and(|tag| tag.contains('\u{FFFD}')) {
        return Err(ApiError::new(ErrorCode::BadRequest, "invalid utf-8 in the tag"));
    }
    let applied = read_state(node, request).await?;
    let mut data = Vec::new();
    for kind in EntityKind::ALL {
        for (id, entity) in applied.state.table(kind).iter() {
            let Some(tags) = entity.get("tags").and_then(Value::as_array) else { continue };
            for tag in tags.iter().filter_map(Value::as_str) {
                if only.is_none_or(|only| only == tag) {
                    data.push(json!({ "entity_name": kind.table(), "entity_id": id.to_string(), "tag": tag }));
                }
            }
        }
    }
    let body = json!({ "data": data, "next": Value::Null });
    Ok(versioned(json_response(StatusCode::OK, &body), applied.version()))
}

async fn entity_route(
    node: &Node,
    request: &AdminRequest,
    kind: EntityKind,
    key: &str,
    parent: Option<Parent>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let key = key.to_string();
    match request.method {
        Method::GET => {
            let applied = read_state(node, request).await?;
            let entity = applied.state.find(kind, &key, parent.as_ref())?;
            Ok(versioned(json_response(StatusCode::OK, &Value::Object((*entity).clone())), applied.version()))
        }
        Method::PUT => {
            let mut body = parse_body(request, Some(kind))?;
            fill_generated_fields(kind, &mut body);
            hash_passwords(kind, &mut body).await?;
            check_certificate(kind, &body)?;
            write(node, Op::Upsert { kind, key, id: crate::env::uuid(), parent, body: body.into() }).await
        }
        Method::PATCH => {
            let mut body = parse_body(request, Some(kind))?;
            hash_passwords(kind, &mut body).await?;
            write(node, Op::Patch { kind, key, parent, body: body.into() }).await
        }
        Method::DELETE => write(node, Op::Delete { kind, key, parent }).await,
        _ => Err(method_not_allowed()),
    }
}

/// A certificate must be usable by the TLS listener: the chain parses, the key parses
/// and matches it. Checked before the write is proposed (the state machine has no TLS
/// library; PATCHes that change only one half are checked when compiled and logged).
fn check_certificate(kind: EntityKind, body: &Value) -> Result<(), ApiError> {
    if kind == EntityKind::Jwt {
        // The key must fit the algorithm (an RSA or EC public key for RS/PS/ES/EdDSA).
        let text = |field: &str| body.get(field).and_then(Value::as_str);
        let algorithm = text("algorithm").unwrap_or("HS256");
        if !algorithm.starts_with("HS") {
            crate::plugins::jwt::JwtCredential::verifier(algorithm, "", text("rsa_public_key"), false)
                .map_err(|error| ApiError::field("rsa_public_key", error))?;
        }
        return Ok(());
    }
    if kind == EntityKind::CaCertificate {
        if let Some(cert) = body.get("cert").and_then(Value::as_str) {
            crate::proxy::upstream::trust_anchors(cert).map_err(|error| ApiError::field("cert", error))?;
        }
        return Ok(());
    }
    if kind != EntityKind::Certificate {
        return Ok(());
    }
    for (cert_field, key_field) in [("cert", "key"), ("cert_alt", "key_alt")] {
        let (Some(cert), Some(key)) =
            (body.get(cert_field).and_then(Value::as_str), body.get(key_field).and_then(Value::as_str))
        else {
            continue;
        };
        match crate::proxy::tls::certified_key(cert, key) {
            Ok(_) => {}
            Err(crate::proxy::tls::PairError::Cert(why)) => return Err(ApiError::field(cert_field, why)),
            Err(crate::proxy::tls::PairError::Key(why)) => return Err(ApiError::field(key_field, why)),
        }
    }
    Ok(())
}

/// Replaces a basic-auth `password` with its salted slow hash (on the blocking pool:
/// the hash takes tens of milliseconds). A value that is already a hash is kept, so a
/// dump loads back unchanged.
async fn hash_passwords(kind: EntityKind, body: &mut Value) -> Result<(), ApiError> {
    if kind != EntityKind::BasicAuth {
        return Ok(());
    }
    let Some(password) = body.get("password").and_then(Value::as_str) else { return Ok(()) };
    if crate::plugins::basic::is_hashed(password) {
        return Ok(());
    }
    let password = password.to_string();
    let hashed = crate::env::blocking(move || crate::plugins::basic::hash_password(&password))
        .await
        .map_err(|error| ApiError::new(ErrorCode::Internal, error.to_string()))?
        .map_err(|error| ApiError::new(ErrorCode::Internal, error))?;
    body["password"] = Value::from(hashed);
    Ok(())
}

/// Hashes the basic-auth passwords of a declarative document: top-level
/// `basicauth_credentials` and those nested under consumers.
async fn hash_declarative_passwords(document: &mut Value) -> Result<(), ApiError> {
    let mut credentials: Vec<&mut Value> = Vec::new();
    if let Some(object) = document.as_object_mut() {
        for (key, value) in object.iter_mut() {
            match (key.as_str(), value) {
                ("basicauth_credentials", Value::Array(items)) => credentials.extend(items.iter_mut()),
                ("consumers", Value::Array(consumers)) => {
                    for consumer in consumers {
                        if let Some(Value::Array(items)) = consumer.get_mut("basicauth_credentials") {
                            credentials.extend(items.iter_mut());
                        }
                    }
                }
                _ => {}
            }
        }
    }
    for credential in credentials {
        hash_passwords(EntityKind::BasicAuth, credential).await?;
    }
    Ok(())
}

/// Kong generates a key-auth key when none is given; so does Tollgate, before the
/// write is proposed (the state machine never draws randomness).
fn fill_generated_fields(kind: EntityKind, body: &mut Value) {
    let Some(object) = body.as_object_mut() else { return };
    if kind == EntityKind::KeyAuth && object.get("key").is_none_or(Value::is_null) {
        object.insert("key".into(), Value::from(crate::env::uuid().simple().to_string()));
    }
    if kind == EntityKind::Jwt {
        if object.get("key").is_none_or(Value::is_null) {
            object.insert("key".into(), Value::from(crate::env::uuid().simple().to_string()));
        }
        if object.get("secret").is_none_or(Value::is_null) {
            object.insert("secret".into(), Value::from(crate::env::uuid().simple().to_string()));
        }
    }
    if kind == EntityKind::HmacAuth && object.get("secret").is_none_or(Value::is_null) {
        object.insert("secret".into(), Value::from(crate::env::uuid().simple().to_string()));
    }
}

async fn write(node: &Node, op: Op) -> Result<Response<Full<Bytes>>, ApiError> {
    let (outcome, version) = node.cluster.write(op).await?;
    let response = match outcome {
        Outcome::Created(entity) => json_response(StatusCode::CREATED, &entity.0),
        Outcome::Updated(entity) => json_response(StatusCode::OK, &entity.0),
        Outcome::Deleted => empty_response(StatusCode::NO_CONTENT),
        Outcome::Replaced { entities } => json_response(StatusCode::CREATED, &json!({ "entities": entities })),
        // The Admin API never proposes grants; they have no HTTP shape.
        Outcome::Internal | Outcome::Granted(_) => empty_response(StatusCode::NO_CONTENT),
    };
    Ok(versioned(response, version))
}

async fn add_member(node: &Node, request: &AdminRequest) -> Result<Response<Full<Bytes>>, ApiError> {
    let body = parse_body(request, None)?;
    let node_id = body
        .get("node_id")
        .and_then(Value::as_u64)
        .ok_or_else(|| ApiError::field("node_id", "required: the new node's id (u64)"))?;
    let address = body
        .get("address")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::field("address", "required: the new node's cluster address host:port"))?;
    crate::config::check_host_port("address", address).map_err(|e| ApiError::field("address", e.to_string()))?;
    let version = node.cluster.add_member(node_id, address.to_string()).await?;
    Ok(versioned(json_response(StatusCode::CREATED, &node.cluster_view()), version))
}

/// `GET /upstreams/{u}/health`: Kong's shape (`data: [{target, weight, health}]`), the
/// cluster-wide view as this node merged it from gossip, with who decided each state
/// and when. `HEALTHCHECKS_OFF` when the upstream has no active checks.
fn upstream_health(node: &Node, upstream: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let compiled = node.published.load();
    let entity = compiled.state.find(EntityKind::Upstream, upstream, None)?;
    let id = tollgate_raft_store::state::entity_id(&entity);
    let healthchecks = entity.get("healthchecks");
    let checks_on = healthchecks.and_then(crate::health::ActiveChecks::from_healthchecks).is_some()
        || crate::proxy::balancer::passive_checks_on(healthchecks);
    let mut data = Vec::new();
    for target in compiled.state.table(EntityKind::Target).values() {
        if tollgate_raft_store::state::foreign_id(target, "upstream") != Some(id) {
            continue;
        }
        let address = target.get("target").and_then(Value::as_str).unwrap_or_default();
        let observed = node.health_states.get(id, &crate::proxy::balancer::target_address(address));
        let health = match (&observed, checks_on) {
            (_, false) => "HEALTHCHECKS_OFF",
            (Some(observed), true) if observed.dns_error => "DNS_ERROR",
            (Some(observed), true) if !observed.healthy => "UNHEALTHY",
            _ => "HEALTHY",
        };
        data.push(json!({
            "id": target.get("id"),
            "target": address,
            "weight": target.get("weight"),
            "upstream": {"id": id.to_string()},
            "health": health,
            "observed_by": observed.as_ref().map(|o| o.by.clone()),
            "observed_at_ms": observed.as_ref().map(|o| o.at_ms),
        }));
    }
    let body = json!({"data": data, "node_id": node.config.node_id, "total": data.len(), "next": null});
    Ok(json_response(StatusCode::OK, &body))
}

/// `GET /rate-limits/{plugin}`: a `policy: cluster` rate-limiting instance's ledger
/// as applied on this node (per key and window: limit, tokens granted and requests
/// used per node), with this node's own leases beside it. `size` keys at most
/// (100, up to 1000), in key order; `total` counts them all.
async fn rate_limits(node: &Node, request: &AdminRequest, plugin: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let plugin = node.published.load().state.find(EntityKind::Plugin, plugin, None)?;
    let id = tollgate_raft_store::state::entity_id(&plugin);
    let size = page_size(request.query.get("size").map(String::as_str))?;
    let leases: BTreeMap<_, _> =
        node.plugin_state.quota.of_plugin(id).into_iter().map(|lease| (lease.key.clone(), lease)).collect();
    let ledger = node.ledger.read().await;
    let mut total = 0;
    let mut data = Vec::new();
    for (key, account) in ledger.accounts_of(id) {
        total += 1;
        if data.len() == size {
            continue;
        }
        let this_node = leases
            .get(key)
            .map(|lease| json!({"available": lease.available(), "used": lease.used(), "granted": lease.granted()}));
        data.push(json!({
            "subject": key.subject,
            "window_s": key.window_s,
            "start_s": key.start_s,
            "end_s": key.end_s(),
            "limit": account.limit,
            "granted": account.total,
            "granted_by_node": account.granted.iter().map(|(node, n)| (node.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "used_by_node": account.used.iter().map(|(node, n)| (node.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "this_node": this_node,
        }));
    }
    let body = json!({
        "plugin": id.to_string(),
        "policy": plugin.get("config").and_then(|c| c.get("policy")).cloned().unwrap_or(Value::Null),
        "node_id": node.config.node_id,
        "ledger_keys": ledger.len(),
        "total": total,
        "data": data,
    });
    Ok(json_response(StatusCode::OK, &body))
}

async fn get_config(node: &Node, request: &AdminRequest) -> Result<Response<Full<Bytes>>, ApiError> {
    let applied = read_state(node, request).await?;
    let document = applied.state.dump();
    let response = if request.query.get("format").is_some_and(|f| f == "yaml") {
        let yaml = serde_saphyr::to_string(&document)
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("yaml encoding failed: {e}")))?;
        text_response(yaml, "application/yaml")
    } else {
        json_response(StatusCode::OK, &document)
    };
    Ok(versioned(response, applied.version()))
}

async fn post_config(node: &Node, request: &AdminRequest) -> Result<Response<Full<Bytes>>, ApiError> {
    let is_yaml = request.content_type.contains("yaml");
    // Kong's `check_hash` (kong/api/routes/config.lua): the text as sent is hashed (the
    // `config` string of the other shape, else the body); with `?check_hash=1` a text
    // equal to the one the config was last loaded from answers 304 and changes nothing.
    let text_of_config = |document: &Value| match document.get("config").and_then(Value::as_str) {
        Some(text) if document.as_object().is_some_and(|o| o.len() == 1) => Some(text.to_string()),
        _ => None,
    };
    let document: Value = if is_yaml {
        let text = std::str::from_utf8(&request.body).map_err(|_| body_error("the YAML body is not UTF-8"))?;
        serde_saphyr::from_str(text).map_err(|e| body_error(&format!("cannot parse YAML body: {e}")))?
    } else {
        parse_body(request, None)?
    };
    // Kong's other shape: `{"config": "<the document as YAML or JSON text>"}` (its own
    // specs post it: spec/02-integration/04-admin_api/15-off_spec.lua:960).
    let config_text = text_of_config(&document);
    let hash = config_hash(config_text.as_deref().map_or(&request.body[..], str::as_bytes));
    if request.query.get("check_hash").is_some_and(|value| value == "1") {
        let applied = read_state(node, request).await?;
        if applied.state.config_hash() == Some(hash.as_str()) {
            return Ok(empty_response(StatusCode::NOT_MODIFIED));
        }
    }
    let document = match config_text {
        Some(text) => serde_saphyr::from_str(&text)
            .map_err(|e| ApiError::field("config", format!("cannot parse the declarative config: {e}")))?,
        None => document,
    };
    // Validate here first so a bad document costs no Raft entry; the state machine
    // validates again when it applies (it is the authority).
    let mut document = document;
    hash_declarative_passwords(&mut document).await?;
    let id_seed = crate::env::random();
    tollgate_raft_store::declarative::load(&document, id_seed, 0)?;
    write(node, Op::ReplaceHashed { document: document.into(), id_seed, hash }).await
}

/// The `configuration_hash` of a declarative text: 128 bits of its SHA-256, as 32 hex
/// digits (the length of Kong's md5 hash; only ever compared with itself).
fn config_hash(text: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text);
    digest.as_ref()[..16].iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A request body as JSON: JSON, or a form (urlencoded or multipart) typed by `kind`'s
/// schema. Kong's answer to JSON it cannot parse, an empty JSON body included, is
/// exactly `{"message": "Cannot parse JSON body"}`; a body with no content type counts
/// only when empty (the gate in `handle` answers 415 otherwise).
fn parse_body(request: &AdminRequest, kind: Option<EntityKind>) -> Result<Value, ApiError> {
    let content_type = request.content_type.as_str();
    let form = if content_type.starts_with("application/x-www-form-urlencoded") {
        Some(crate::form::urlencoded(&request.body)?)
    } else if content_type.starts_with("multipart/form-data") {
        Some(crate::form::multipart(&request.body, &request.content_type_header)?)
    } else {
        None
    };
    if let Some(mut body) = form {
        if let Some(kind) = kind {
            crate::form::coerce_entity(kind, &mut body);
        }
        return Ok(body);
    }
    if request.body.is_empty() && !content_type.starts_with("application/json") {
        return Ok(json!({}));
    }
    serde_json::from_slice(&request.body)
        .map_err(|_| ApiError::new(ErrorCode::CannotParseBody, "Cannot parse JSON body"))
}

/// Kong's gate on bodies (kong/api/api_helpers.lua `before_filter`): a PUT, POST or
/// PATCH body must be JSON, a form, or (for `/config`) YAML; one without a content type
/// must be empty. 415 otherwise.
fn supported_body(method: &Method, content_type: &str, body_empty: bool, path: &str) -> bool {
    if !matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        return true;
    }
    if content_type.is_empty() {
        return body_empty;
    }
    let accepted = ["application/json", "multipart/form-data", "application/x-www-form-urlencoded"];
    let yaml = path.trim_end_matches('/') == "/config"
        && (content_type.starts_with("application/yaml") || content_type.starts_with("text/yaml"));
    yaml || accepted.iter().any(|accepted| content_type.starts_with(accepted))
}

fn body_error(message: &str) -> ApiError {
    let mut error = ApiError::new(ErrorCode::BadRequest, message);
    error.fields.insert("@body".into(), message.to_string());
    error
}

/// The methods of an Admin API path, as Kong's `Allow` lists them; `None` when the
/// path is none of the API's.
fn allowed_methods(segments: &[String]) -> Option<&'static str> {
    const READ: &str = "GET, HEAD, OPTIONS";
    const COLLECTION: &str = "GET, HEAD, OPTIONS, POST";
    const ENTITY: &str = "DELETE, GET, HEAD, OPTIONS, PATCH, PUT";
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    Some(match segments.as_slice() {
        [] | ["status"] | ["status", "ready"] | ["metrics"] | ["cluster"] | ["tags"] | ["tags", _] => READ,
        ["plugins", "enabled"] | ["rate-limits", _] | ["upstreams", _, "health"] => READ,
        ["endpoints"] | ["schemas", _] | ["upstreams", _, "targets", "all"] => READ,
        ["schemas", _, "validate"] => "OPTIONS, POST",
        ["schemas", "plugins", _] => READ,
        [collection, _, field] if meta::foreign_link(collection, field).is_some() => ENTITY,
        ["config"] => COLLECTION,
        ["cluster", "members"] => "OPTIONS, POST",
        ["cluster", "members", _] => "DELETE, OPTIONS",
        ["proxy-cache"] => "DELETE, OPTIONS",
        ["proxy-cache", _] => "DELETE, GET, HEAD, OPTIONS",
        [collection] => top_level(collection).map(|_| COLLECTION).ok()?,
        [collection, _] => top_level(collection).map(|_| ENTITY).ok()?,
        [parent, key, collection] => nested(parent, key, collection).map(|_| COLLECTION).ok()?,
        [parent, key, collection, _] => nested(parent, key, collection).map(|_| ENTITY).ok()?,
        _ => return None,
    })
}

/// Kong's answer to OPTIONS (spec/02-integration/04-admin_api/02-kong_routes_spec.lua:59).
fn options_response(methods: &'static str) -> Response<Full<Bytes>> {
    let mut response = empty_response(StatusCode::NO_CONTENT);
    let headers = response.headers_mut();
    headers.insert(http::header::ALLOW, HeaderValue::from_static(methods));
    headers.insert(http::header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(methods));
    headers.insert(http::header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("Content-Type"));
    headers.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    response
}

fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "Method not allowed")
}

fn versioned(mut response: Response<Full<Bytes>>, version: u64) -> Response<Full<Bytes>> {
    response.headers_mut().insert(CONFIG_VERSION_HEADER, HeaderValue::from(version));
    response
}

fn with_status(mut response: Response<Full<Bytes>>, status: StatusCode) -> Response<Full<Bytes>> {
    *response.status_mut() = status;
    response
}

pub fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    response
}

fn text_response(body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn empty_response(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn error_response(error: &ApiError) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &error.to_json())
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name, true), percent_decode(value, true))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token() {
        assert!(authorized(Some(&HeaderValue::from_static("Bearer s3cret")), "s3cret"));
        assert!(!authorized(Some(&HeaderValue::from_static("Bearer s3cre")), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }
}
