//! The entity model: Kong 3.x's entities, their fields, defaults and rules, as data.
//!
//! Like Kong, Tollgate describes each entity with a schema and validates every write
//! against it in one place ([`validate`]). Entities are stored as JSON objects that have
//! passed that validation, so a stored entity always has every field of its schema (with
//! defaults filled in), and nothing else. Typed views for the data path are compiled
//! from these objects off the request path.
//!
//! Foreign keys are stored as `{"id": "<uuid>"}`. Input may name the referenced entity
//! by id or by its endpoint key (`{"id": "my-service"}` or `{"name": "my-service"}`);
//! the state machine resolves that when it applies the write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::ApiError;

/// A JSON object: what an entity is stored as.
pub type Object = Map<String, Value>;

/// Longest string accepted in any field unless the field says otherwise.
pub const STRING_LEN_MAX: usize = 1024;
/// Longest PEM blob (certificates and keys).
pub const PEM_LEN_MAX: usize = 64 * 1024;
/// Most items in any array field.
pub const ARRAY_ITEMS_MAX: usize = 256;
/// Most tags on one entity, as in Kong.
pub const TAGS_MAX: usize = 32;
/// Largest serialised `config` object of a plugin, or `healthchecks` of an upstream.
pub const OBJECT_BYTES_MAX: usize = 64 * 1024;

/// Every entity kind, in dependency order: an entity only references kinds before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EntityKind {
    Certificate,
    CaCertificate,
    Sni,
    Service,
    Route,
    Consumer,
    KeyAuth,
    BasicAuth,
    Jwt,
    HmacAuth,
    Acl,
    Upstream,
    Target,
    Plugin,
}

impl EntityKind {
    pub const ALL: [EntityKind; 14] = [
        EntityKind::Certificate,
        EntityKind::CaCertificate,
        EntityKind::Sni,
        EntityKind::Service,
        EntityKind::Route,
        EntityKind::Consumer,
        EntityKind::KeyAuth,
        EntityKind::BasicAuth,
        EntityKind::Jwt,
        EntityKind::HmacAuth,
        EntityKind::Acl,
        EntityKind::Upstream,
        EntityKind::Target,
        EntityKind::Plugin,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The Admin API path segment (`/services`, `/consumers/{c}/key-auth`).
    pub fn path(self) -> &'static str {
        match self {
            EntityKind::Certificate => "certificates",
            EntityKind::CaCertificate => "ca_certificates",
            EntityKind::Sni => "snis",
            EntityKind::Service => "services",
            EntityKind::Route => "routes",
            EntityKind::Consumer => "consumers",
            EntityKind::KeyAuth => "key-auth",
            EntityKind::BasicAuth => "basic-auth",
            EntityKind::Jwt => "jwt",
            EntityKind::HmacAuth => "hmac-auth",
            EntityKind::Acl => "acls",
            EntityKind::Upstream => "upstreams",
            EntityKind::Target => "targets",
            EntityKind::Plugin => "plugins",
        }
    }

    /// Kong's table name, used as the key in declarative documents.
    pub fn table(self) -> &'static str {
        match self {
            EntityKind::KeyAuth => "keyauth_credentials",
            EntityKind::BasicAuth => "basicauth_credentials",
            EntityKind::Jwt => "jwt_secrets",
            EntityKind::HmacAuth => "hmacauth_credentials",
            other => other.path(),
        }
    }

    pub fn from_path(segment: &str) -> Option<EntityKind> {
        EntityKind::ALL.into_iter().find(|kind| kind.path() == segment)
    }

    pub fn from_table(name: &str) -> Option<EntityKind> {
        EntityKind::ALL.into_iter().find(|kind| kind.table() == name)
    }

    pub fn schema(self) -> &'static EntitySchema {
        &SCHEMAS[self.index()]
    }

    /// Credentials live under a consumer and are only reachable through it.
    pub fn is_credential(self) -> bool {
        matches!(
            self,
            EntityKind::KeyAuth | EntityKind::BasicAuth | EntityKind::Jwt | EntityKind::HmacAuth | EntityKind::Acl
        )
    }
}

/// What happens to referencing entities when the referenced one is deleted (Kong's
/// `on_delete`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDelete {
    /// The delete fails with a foreign key violation while references exist.
    Restrict,
    /// Referencing entities are deleted too.
    Cascade,
}

#[derive(Debug, Clone, Copy)]
pub enum StrRule {
    /// Any string up to the given length.
    Text(usize),
    /// Kong's `utf8_name` (services, routes, a plugin's `instance_name`): letters,
    /// digits, `.`, `-`, `_`, `~`, and any non-ASCII character (`円`).
    Utf8Name,
    /// A hostname or IP address (no port).
    Host,
    /// A host pattern for route matching: a hostname with at most one `*` at either end.
    HostPattern,
    /// A route path: starts with `/`, or `~` followed by a regex.
    RoutePath,
    /// A service path: starts with `/`.
    Path,
    /// One of a fixed set.
    OneOf(&'static [&'static str]),
    /// A PEM block.
    Pem,
    /// `host:port`, `host`, `[ipv6]:port`.
    HostPort,
    /// A CIDR or IP address with optional port, for route sources/destinations.
    Ip,
}

#[derive(Debug, Clone, Copy)]
pub enum FieldType {
    Str(StrRule),
    Int {
        min: i64,
        max: i64,
    },
    Bool,
    /// An array of strings; `unique` rejects duplicates.
    Strings {
        rule: StrRule,
        max_items: usize,
        unique: bool,
    },
    /// A reference to another entity.
    Foreign {
        kind: EntityKind,
        on_delete: OnDelete,
    },
    /// An array of uuids of entities of this kind (`ca_certificates`).
    ForeignIds(EntityKind),
    /// Route `headers`: a map from header name to a non-empty array of values.
    HeaderMap,
    /// Route `sources`/`destinations`: array of `{ip, port}`.
    Endpoints,
    /// A JSON object validated elsewhere (plugin `config`, upstream `healthchecks`).
    Object,
}

#[derive(Debug, Clone, Copy)]
pub enum DefaultValue {
    Null,
    Bool(bool),
    Int(i64),
    Str(&'static str),
    Strs(&'static [&'static str]),
    EmptyObject,
    /// Upstream healthchecks: Kong's full default tree.
    Healthchecks,
}

impl DefaultValue {
    pub fn to_value(self) -> Value {
        match self {
            DefaultValue::Null => Value::Null,
            DefaultValue::Bool(b) => Value::Bool(b),
            DefaultValue::Int(i) => Value::from(i),
            DefaultValue::Str(s) => Value::from(s),
            DefaultValue::Strs(list) => Value::from(list.to_vec()),
            DefaultValue::EmptyObject => Value::Object(Map::new()),
            DefaultValue::Healthchecks => default_healthchecks(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub name: &'static str,
    pub ty: FieldType,
    pub required: bool,
    pub default: DefaultValue,
}

const fn field(name: &'static str, ty: FieldType, default: DefaultValue) -> Field {
    Field { name, ty, required: false, default }
}

const fn required(name: &'static str, ty: FieldType) -> Field {
    Field { name, ty, required: true, default: DefaultValue::Null }
}

pub struct EntitySchema {
    pub kind: EntityKind,
    pub fields: &'static [Field],
    /// Fields (other than `id`) by which the entity can be addressed in a URL, in order.
    pub endpoint_keys: &'static [&'static str],
    /// Unique constraints; each is a list of fields whose values together are unique.
    /// A constraint whose fields are all null does not apply.
    pub unique: &'static [&'static [&'static str]],
    /// Whether the entity has `updated_at` (credentials do not, as in Kong).
    pub has_updated_at: bool,
    /// Checks across fields, run after the field checks pass.
    pub check: fn(&Object, &mut BTreeMap<String, String>),
}

impl EntitySchema {
    pub fn field(&self, name: &str) -> Option<&'static Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Foreign key fields of this schema, with what they reference.
    pub fn foreign_keys(&self) -> impl Iterator<Item = (&'static str, EntityKind, OnDelete)> + '_ {
        self.fields.iter().filter_map(|f| match f.ty {
            FieldType::Foreign { kind, on_delete } => Some((f.name, kind, on_delete)),
            _ => None,
        })
    }

    /// Arrays of references (`ca_certificates`): always restrict deletes, as in Kong.
    pub fn foreign_id_lists(&self) -> impl Iterator<Item = (&'static str, EntityKind)> + '_ {
        self.fields.iter().filter_map(|f| match f.ty {
            FieldType::ForeignIds(kind) => Some((f.name, kind)),
            _ => None,
        })
    }
}

const TAGS: Field = field(
    "tags",
    FieldType::Strings { rule: StrRule::Text(128), max_items: TAGS_MAX, unique: true },
    DefaultValue::Null,
);

const PROTOCOLS: &[&str] = &["http", "https", "grpc", "grpcs", "tcp", "tls", "udp", "tls_passthrough", "ws", "wss"];
const METHOD_CHARS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const TIMEOUT_MS_MAX: i64 = 2_147_483_646;

fn no_check(_: &Object, _: &mut BTreeMap<String, String>) {}

fn is_set(object: &Object, name: &str) -> bool {
    !matches!(object.get(name), None | Some(Value::Null))
}

fn check_route(route: &Object, errors: &mut BTreeMap<String, String>) {
    let protocols: Vec<&str> = route
        .get("protocols")
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // Kong picks a route's subschema by its first protocol (`get_subschema` in
    // kong/db/schema/init.lua; routes_subschemas.lua): gRPC routes keep their paths
    // (`strip_path` false, and not settable) and match no methods.
    if is_grpc_route(route) {
        if route.get("strip_path") == Some(&Value::Bool(true)) {
            errors.insert("strip_path".into(), "cannot set 'strip_path' when 'protocols' is 'grpc' or 'grpcs'".into());
        }
        if is_set(route, "methods") {
            errors.insert("methods".into(), "cannot set 'methods' when 'protocols' is 'grpc' or 'grpcs'".into());
        }
    }
    let has = |protocol: &str| protocols.contains(&protocol);
    let missing = |names: &[&str]| !names.iter().any(|name| is_set(route, name));
    let needed = if has("https") || has("wss") {
        Some(("'methods', 'hosts', 'headers', 'paths', 'snis'", "https"))
    } else if has("http") || has("ws") {
        Some(("'methods', 'hosts', 'headers', 'paths'", "http"))
    } else if has("grpcs") {
        Some(("'hosts', 'headers', 'paths', 'snis'", "grpcs"))
    } else if has("grpc") {
        Some(("'hosts', 'headers', 'paths'", "grpc"))
    } else {
        None
    };
    if let Some((fields, protocol)) = needed {
        let names: Vec<&str> = fields.split(", ").map(|quoted| quoted.trim_matches('\'')).collect();
        if missing(&names) {
            errors.insert("@entity".into(), format!("must set one of {fields} when 'protocols' is '{protocol}'"));
        }
    }
    if let Some(methods) = route.get("methods").and_then(Value::as_array) {
        for method in methods.iter().filter_map(Value::as_str) {
            if method.is_empty() || !method.chars().all(|c| METHOD_CHARS.contains(c)) {
                errors.insert("methods".into(), format!("invalid method '{method}': must be upper case letters"));
            }
        }
    }
    let https_only = !protocols.is_empty() && protocols.iter().all(|p| matches!(*p, "https" | "grpcs" | "tls" | "wss"));
    if is_set(route, "snis") && !https_only && !protocols.iter().any(|p| matches!(*p, "https" | "grpcs" | "tls")) {
        errors.insert(
            "snis".into(),
            "'snis' can only be set when 'protocols' is or includes 'https', 'tls' or 'grpcs'".into(),
        );
    }
}

/// A route whose first protocol is `grpc` or `grpcs` (Kong's gRPC subschema).
fn is_grpc_route(route: &Object) -> bool {
    let first = route.get("protocols").and_then(Value::as_array).and_then(|list| list.first());
    matches!(first.and_then(Value::as_str), Some("grpc" | "grpcs"))
}

fn check_upstream(upstream: &Object, errors: &mut BTreeMap<String, String>) {
    // kong/db/schema/entities/upstreams.lua: `distinct` on the two header names,
    // compared exactly (spec/02-integration/04-admin_api/07-upstreams_routes_spec.lua:318).
    let header = |name: &str| upstream.get(name).and_then(Value::as_str);
    if upstream.get("hash_on").and_then(Value::as_str) == Some("header")
        && upstream.get("hash_fallback").and_then(Value::as_str) == Some("header")
        && header("hash_on_header").is_some()
        && header("hash_on_header") == header("hash_fallback_header")
    {
        errors.insert(
            "@entity".into(),
            "values of these fields must be distinct: 'hash_on_header', 'hash_fallback_header'".into(),
        );
    }
}

fn check_consumer(consumer: &Object, errors: &mut BTreeMap<String, String>) {
    if !is_set(consumer, "username") && !is_set(consumer, "custom_id") {
        errors
            .insert("@entity".into(), "at least one of these fields must be non-empty: 'custom_id', 'username'".into());
    }
}

fn check_service(service: &Object, errors: &mut BTreeMap<String, String>) {
    let protocol = service.get("protocol").and_then(Value::as_str).unwrap_or("http");
    if is_set(service, "path") && !matches!(protocol, "http" | "https") {
        errors.insert("path".into(), format!("value must be null when 'protocol' is '{protocol}'"));
    }
}

fn check_plugin(plugin: &Object, errors: &mut BTreeMap<String, String>) {
    if let Some(name) = plugin.get("name").and_then(Value::as_str) {
        if crate::plugins::plugin(name).is_none() {
            errors.insert("name".into(), crate::plugins::unknown_plugin(name));
        }
    }
}

fn check_jwt(jwt: &Object, errors: &mut BTreeMap<String, String>) {
    let algorithm = jwt.get("algorithm").and_then(Value::as_str).unwrap_or("HS256");
    if (algorithm.starts_with("RS") || algorithm.starts_with("ES") || algorithm.starts_with("PS"))
        && !is_set(jwt, "rsa_public_key")
    {
        errors.insert("rsa_public_key".into(), format!("required field missing for algorithm '{algorithm}'"));
    }
}

fn check_certificate(certificate: &Object, errors: &mut BTreeMap<String, String>) {
    if is_set(certificate, "cert_alt") != is_set(certificate, "key_alt") {
        errors.insert("@entity".into(), "all or none of these fields must be set: 'cert_alt', 'key_alt'".into());
    }
}

static SCHEMAS: [EntitySchema; 14] = [
    EntitySchema {
        kind: EntityKind::Certificate,
        fields: &[
            required("cert", FieldType::Str(StrRule::Pem)),
            required("key", FieldType::Str(StrRule::Pem)),
            field("cert_alt", FieldType::Str(StrRule::Pem), DefaultValue::Null),
            field("key_alt", FieldType::Str(StrRule::Pem), DefaultValue::Null),
            TAGS,
        ],
        endpoint_keys: &[],
        unique: &[],
        has_updated_at: true,
        check: check_certificate,
    },
    // Kong's `ca_certificates`: trust anchors a service's `tls_verify` checks upstream
    // certificates against. The PEM must parse; unlike Kong, the CA flag and expiry are
    // not checked here (a non-CA certificate simply verifies nothing).
    EntitySchema {
        kind: EntityKind::CaCertificate,
        fields: &[
            required("cert", FieldType::Str(StrRule::Pem)),
            field("cert_digest", FieldType::Str(StrRule::Text(128)), DefaultValue::Null),
            TAGS,
        ],
        endpoint_keys: &[],
        unique: &[&["cert_digest"]],
        has_updated_at: true,
        check: no_check,
    },
    EntitySchema {
        kind: EntityKind::Sni,
        fields: &[
            required("name", FieldType::Str(StrRule::HostPattern)),
            Field {
                name: "certificate",
                ty: FieldType::Foreign { kind: EntityKind::Certificate, on_delete: OnDelete::Cascade },
                required: true,
                default: DefaultValue::Null,
            },
            TAGS,
        ],
        endpoint_keys: &["name"],
        unique: &[&["name"]],
        has_updated_at: true,
        check: no_check,
    },
    EntitySchema {
        kind: EntityKind::Service,
        fields: &[
            field("name", FieldType::Str(StrRule::Utf8Name), DefaultValue::Null),
            field("retries", FieldType::Int { min: 0, max: 32767 }, DefaultValue::Int(5)),
            field("protocol", FieldType::Str(StrRule::OneOf(PROTOCOLS)), DefaultValue::Str("http")),
            required("host", FieldType::Str(StrRule::Host)),
            field("port", FieldType::Int { min: 0, max: 65535 }, DefaultValue::Int(80)),
            field("path", FieldType::Str(StrRule::Path), DefaultValue::Null),
            field("connect_timeout", FieldType::Int { min: 1, max: TIMEOUT_MS_MAX }, DefaultValue::Int(60000)),
            field("write_timeout", FieldType::Int { min: 1, max: TIMEOUT_MS_MAX }, DefaultValue::Int(60000)),
            field("read_timeout", FieldType::Int { min: 1, max: TIMEOUT_MS_MAX }, DefaultValue::Int(60000)),
            field(
                "client_certificate",
                FieldType::Foreign { kind: EntityKind::Certificate, on_delete: OnDelete::Restrict },
                DefaultValue::Null,
            ),
            field("tls_verify", FieldType::Bool, DefaultValue::Null),
            field("tls_verify_depth", FieldType::Int { min: 0, max: 64 }, DefaultValue::Null),
            field("ca_certificates", FieldType::ForeignIds(EntityKind::CaCertificate), DefaultValue::Null),
            field("enabled", FieldType::Bool, DefaultValue::Bool(true)),
            TAGS,
        ],
        endpoint_keys: &["name"],
        unique: &[&["name"]],
        has_updated_at: true,
        check: check_service,
    },
    EntitySchema {
        kind: EntityKind::Route,
        fields: &[
            field("name", FieldType::Str(StrRule::Utf8Name), DefaultValue::Null),
            field(
                "protocols",
                FieldType::Strings { rule: StrRule::OneOf(PROTOCOLS), max_items: 10, unique: true },
                DefaultValue::Strs(&["http", "https"]),
            ),
            field(
                "methods",
                FieldType::Strings { rule: StrRule::Text(32), max_items: 32, unique: true },
                DefaultValue::Null,
            ),
            field(
                "hosts",
                FieldType::Strings { rule: StrRule::HostPattern, max_items: ARRAY_ITEMS_MAX, unique: true },
                DefaultValue::Null,
            ),
            field(
                "paths",
                FieldType::Strings { rule: StrRule::RoutePath, max_items: ARRAY_ITEMS_MAX, unique: true },
                DefaultValue::Null,
            ),
            field("headers", FieldType::HeaderMap, DefaultValue::Null),
            field("https_redirect_status_code", FieldType::Int { min: 301, max: 426 }, DefaultValue::Int(426)),
            field("regex_priority", FieldType::Int { min: -2_147_483_648, max: 2_147_483_647 }, DefaultValue::Int(0)),
            field("strip_path", FieldType::Bool, DefaultValue::Bool(true)),
            field("path_handling", FieldType::Str(StrRule::OneOf(&["v0", "v1"])), DefaultValue::Str("v0")),
            field("preserve_host", FieldType::Bool, DefaultValue::Bool(false)),
            field("request_buffering", FieldType::Bool, DefaultValue::Bool(true)),
            field("response_buffering", FieldType::Bool, DefaultValue::Bool(true)),
            field(
                "snis",
                FieldType::Strings { rule: StrRule::HostPattern, max_items: ARRAY_ITEMS_MAX, unique: true },
                DefaultValue::Null,
            ),
            field("sources", FieldType::Endpoints, DefaultValue::Null),
            field("destinations", FieldType::Endpoints, DefaultValue::Null),
            field(
                "service",
                FieldType::Foreign { kind: EntityKind::Service, on_delete: OnDelete::Restrict },
                DefaultValue::Null,
            ),
            TAGS,
        ],
        endpoint_keys: &["name"],
        unique: &[&["name"]],
        has_updated_at: true,
        check: check_route,
    },
    EntitySchema {
        kind: EntityKind::Consumer,
        fields: &[
            field("username", FieldType::Str(StrRule::Text(STRING_LEN_MAX)), DefaultValue::Null),
            field("custom_id", FieldType::Str(StrRule::Text(STRING_LEN_MAX)), DefaultValue::Null),
            TAGS,
        ],
        endpoint_keys: &["username", "custom_id"],
        unique: &[&["username"], &["custom_id"]],
        has_updated_at: true,
        check: check_consumer,
    },
    EntitySchema {
        kind: EntityKind::KeyAuth,
        fields: &[
            CONSUMER_REF,
            // The API layer generates a key when none is given (Kong does the same).
            required("key", FieldType::Str(StrRule::Text(STRING_LEN_MAX))),
            field("ttl", FieldType::Int { min: 0, max: 100_000_000 }, DefaultValue::Null),
            TAGS,
        ],
        endpoint_keys: &["key"],
        unique: &[&["key"]],
        has_updated_at: false,
        check: no_check,
    },
    EntitySchema {
        kind: EntityKind::BasicAuth,
        fields: &[
            CONSUMER_REF,
            required("username", FieldType::Str(StrRule::Text(STRING_LEN_MAX))),
            required("password", FieldType::Str(StrRule::Text(STRING_LEN_MAX))),
            TAGS,
        ],
        endpoint_keys: &["username"],
        unique: &[&["username"]],
        has_updated_at: false,
        check: no_check,
    },
    EntitySchema {
        kind: EntityKind::Jwt,
        fields: &[
            CONSUMER_REF,
            required("key", FieldType::Str(StrRule::Text(STRING_LEN_MAX))),
            required("secret", FieldType::Str(StrRule::Text(STRING_LEN_MAX))),
            field("rsa_public_key", FieldType::Str(StrRule::Pem), DefaultValue::Null),
            field(
                "algorithm",
                FieldType::Str(StrRule::OneOf(&[
                    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512",
                    "EdDSA",
                ])),
                DefaultValue::Str("HS256"),
            ),
            TAGS,
        ],
        endpoint_keys: &["key"],
        unique: &[&["key"]],
        has_updated_at: false,
        check: check_jwt,
    },
    EntitySchema {
        kind: EntityKind::HmacAuth,
        fields: &[
            CONSUMER_REF,
            required("username", FieldType::Str(StrRule::Text(STRING_LEN_MAX))),
            required("secret", FieldType::Str(StrRule::Text(STRING_LEN_MAX))),
            TAGS,
        ],
        endpoint_keys: &["username"],
        unique: &[&["username"]],
        has_updated_at: false,
        check: no_check,
    },
    EntitySchema {
        kind: EntityKind::Acl,
        fields: &[CONSUMER_REF, required("group", FieldType::Str(StrRule::Text(STRING_LEN_MAX))), TAGS],
        endpoint_keys: &[],
        unique: &[&["consumer", "group"]],
        has_updated_at: false,
        check: no_check,
    },
    EntitySchema {
        kind: EntityKind::Upstream,
        fields: &[
            required("name", FieldType::Str(StrRule::Host)),
            field(
                "algorithm",
                FieldType::Str(StrRule::OneOf(&["round-robin", "consistent-hashing", "least-connections", "latency"])),
                DefaultValue::Str("round-robin"),
            ),
            field("hash_on", FieldType::Str(StrRule::OneOf(HASH_ON)), DefaultValue::Str("none")),
            field("hash_fallback", FieldType::Str(StrRule::OneOf(HASH_ON)), DefaultValue::Str("none")),
            field("hash_on_header", FieldType::Str(StrRule::Text(256)), DefaultValue::Null),
            field("hash_fallback_header", FieldType::Str(StrRule::Text(256)), DefaultValue::Null),
            field("hash_on_cookie", FieldType::Str(StrRule::Text(256)), DefaultValue::Null),
            field("hash_on_cookie_path", FieldType::Str(StrRule::Path), DefaultValue::Str("/")),
            field("hash_on_query_arg", FieldType::Str(StrRule::Text(256)), DefaultValue::Null),
            field("hash_fallback_query_arg", FieldType::Str(StrRule::Text(256)), DefaultValue::Null),
            field("hash_on_uri_capture", FieldType::Str(StrRule::Text(256)), DefaultValue::Null),
            field("hash_fallback_uri_capture", FieldType::Str(StrRule::Text(256)), DefaultValue::Null),
            field("slots", FieldType::Int { min: 10, max: 65536 }, DefaultValue::Int(10000)),
            field("healthchecks", FieldType::Object, DefaultValue::Healthchecks),
            field("host_header", FieldType::Str(StrRule::Host), DefaultValue::Null),
            field(
                "client_certificate",
                FieldType::Foreign { kind: EntityKind::Certificate, on_delete: OnDelete::Restrict },
                DefaultValue::Null,
            ),
            field("use_srv_name", FieldType::Bool, DefaultValue::Bool(false)),
            TAGS,
        ],
        endpoint_keys: &["name"],
        unique: &[&["name"]],
        has_updated_at: true,
        check: check_upstream,
    },
    EntitySchema {
        kind: EntityKind::Target,
        fields: &[
            Field {
                name: "upstream",
                ty: FieldType::Foreign { kind: EntityKind::Upstream, on_delete: OnDelete::Cascade },
                required: true,
                default: DefaultValue::Null,
            },
            required("target", FieldType::Str(StrRule::HostPort)),
            field("weight", FieldType::Int { min: 0, max: 65535 }, DefaultValue::Int(100)),
            TAGS,
        ],
        endpoint_keys: &["target"],
        unique: &[&["upstream", "target"]],
        has_updated_at: true,
        check: no_check,
    },
    EntitySchema {
        kind: EntityKind::Plugin,
        fields: &[
            required("name", FieldType::Str(StrRule::Text(128))),
            field("instance_name", FieldType::Str(StrRule::Utf8Name), DefaultValue::Null),
            field("config", FieldType::Object, DefaultValue::EmptyObject),
            field(
                "protocols",
                FieldType::Strings { rule: StrRule::OneOf(PROTOCOLS), max_items: 10, unique: true },
                DefaultValue::Strs(&["grpc", "grpcs", "http", "https"]),
            ),
            field("enabled", FieldType::Bool, DefaultValue::Bool(true)),
            field(
                "service",
                FieldType::Foreign { kind: EntityKind::Service, on_delete: OnDelete::Cascade },
                DefaultValue::Null,
            ),
            field(
                "route",
                FieldType::Foreign { kind: EntityKind::Route, on_delete: OnDelete::Cascade },
                DefaultValue::Null,
            ),
            field(
                "consumer",
                FieldType::Foreign { kind: EntityKind::Consumer, on_delete: OnDelete::Cascade },
                DefaultValue::Null,
            ),
            TAGS,
        ],
        endpoint_keys: &["instance_name"],
        unique: &[&["instance_name"], &["name", "service", "route", "consumer"]],
        has_updated_at: true,
        check: check_plugin,
    },
];

const CONSUMER_REF: Field = Field {
    name: "consumer",
    ty: FieldType::Foreign { kind: EntityKind::Consumer, on_delete: OnDelete::Cascade },
    required: true,
    default: DefaultValue::Null,
};

const HASH_ON: &[&str] = &["none", "consumer", "ip", "header", "cookie", "path", "query_arg", "uri_capture"];

/// Kong's default `healthchecks` tree for upstreams (checks off: every interval and
/// threshold that would enable them is 0).
pub fn default_healthchecks() -> Value {
    serde_json::json!({
        "active": {
            "type": "http",
            "timeout": 1,
            "concurrency": 10,
            "http_path": "/",
            "https_verify_certificate": true,
            "headers": null,
            "healthy": { "interval": 0, "successes": 0, "http_statuses": [200, 302] },
            "unhealthy": {
                "interval": 0, "tcp_failures": 0, "timeouts": 0, "http_failures": 0,
                "http_statuses": [429, 404, 500, 501, 502, 503, 504, 505]
            }
        },
        "passive": {
            "type": "http",
            "healthy": {
                "successes": 0,
                "http_statuses": [200, 201, 202, 203, 204, 205, 206, 207, 208, 226,
                                  300, 301, 302, 303, 304, 305, 306, 307, 308]
            },
            "unhealthy": {
                "tcp_failures": 0, "timeouts": 0, "http_failures": 0,
                "http_statuses": [429, 500, 503]
            }
        },
        "threshold": 0
    })
}

/// Which write a body is validated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A new entity: missing fields take their defaults.
    Create,
    /// A partial update merged onto an existing entity.
    Patch,
}

/// Validates `input` for `kind` and returns the complete entity (without `id`,
/// `created_at`, `updated_at`, which the state machine owns).
///
/// With [`Mode::Patch`], `existing` is the stored entity and `input` is merged onto it
/// field by field before the whole result is validated again.
///
/// Foreign keys come back as `{"id": "<uuid or endpoint key>"}`, not yet resolved.
pub fn validate(kind: EntityKind, input: &Value, mode: Mode, existing: Option<&Object>) -> Result<Object, ApiError> {
    let schema = kind.schema();
    let Some(input) = input.as_object() else {
        return Err(ApiError::field("@entity", "expected a JSON object"));
    };
    let mut errors = BTreeMap::new();
    let mut output = Object::new();

    for (name, _) in input.iter() {
        let is_meta = matches!(name.as_str(), "id" | "created_at" | "updated_at");
        if !is_meta && schema.field(name).is_none() {
            errors.insert(name.clone(), "unknown field".to_string());
        }
    }

    for field in schema.fields {
        let given = input.get(field.name);
        let value = match (given, mode, existing) {
            (Some(value), _, _) => value.clone(),
            (None, Mode::Patch, Some(existing)) => existing.get(field.name).cloned().unwrap_or(Value::Null),
            (None, _, _) if kind == EntityKind::Route && field.name == "strip_path" && is_grpc_route(input) => {
                Value::Bool(false)
            }
            (None, _, _) => field.default.to_value(),
        };
        if value.is_null() {
            if field.required {
                errors.insert(field.name.to_string(), "required field missing".to_string());
            }
            output.insert(field.name.to_string(), Value::Null);
            continue;
        }
        match check_value(field.ty, &value) {
            Ok(normalised) => {
                output.insert(field.name.to_string(), normalised);
            }
            Err(why) => {
                let (key, why) = element_error(field.name, why);
                errors.insert(key, why);
            }
        }
    }

    if errors.is_empty() {
        (schema.check)(&output, &mut errors);
    }
    if errors.is_empty() && kind == EntityKind::Target {
        if let Some(Value::String(target)) = output.get("target") {
            let normalized = target_with_port(target);
            output.insert("target".into(), Value::String(normalized));
        }
    }
    if errors.is_empty() && kind == EntityKind::Plugin {
        // A PATCH's config is merged into the stored one, key by key, as in Kong.
        let mut config = match (mode, existing.and_then(|e| e.get("config")).and_then(Value::as_object)) {
            (Mode::Patch, Some(stored)) => stored.clone(),
            _ => Object::new(),
        };
        if let Some(given) = output.get("config").and_then(Value::as_object) {
            for (key, value) in given {
                config.insert(key.clone(), value.clone());
            }
        }
        let name = output.get("name").and_then(Value::as_str).unwrap_or_default();
        match crate::plugins::normalize(name, &Value::Object(config)) {
            Ok(normalized) => {
                output.insert("config".into(), normalized);
            }
            Err(field_errors) => errors.extend(field_errors),
        }
    }
    if errors.is_empty() {
        Ok(output)
    } else {
        Err(ApiError::schema(errors))
    }
}

/// An array element's error (`[2] expected a string`, positions 1-based as Kong's
/// messages count) under the element's own path (`paths[1]`), so that the answer's
/// `fields` lists it where Kong does (`{"paths": [null, "expected a string"]}`).
fn element_error(name: &str, why: String) -> (String, String) {
    let element = why.strip_prefix('[').and_then(|rest| rest.split_once("] "));
    match element.and_then(|(position, rest)| Some((position.parse::<usize>().ok()?.checked_sub(1)?, rest))) {
        Some((index, rest)) => (format!("{name}[{index}]"), rest.to_string()),
        None => (name.to_string(), why),
    }
}

/// Checks a non-null value against a field type; returns the stored form.
fn check_value(ty: FieldType, value: &Value) -> Result<Value, String> {
    match ty {
        FieldType::Str(rule) => {
            let Some(text) = value.as_str() else {
                return Err("expected a string".into());
            };
            check_str(rule, text)?;
            Ok(value.clone())
        }
        FieldType::Int { min, max } => {
            let Some(number) = value.as_i64() else {
                return Err("expected an integer".into());
            };
            if number < min || number > max {
                return Err(format!("value should be between {min} and {max}"));
            }
            Ok(value.clone())
        }
        FieldType::Bool => match value {
            Value::Bool(_) => Ok(value.clone()),
            _ => Err("expected a boolean".into()),
        },
        FieldType::Strings { rule, max_items, unique } => {
            let Some(items) = value.as_array() else {
                return Err("expected an array".into());
            };
            if items.len() > max_items {
                return Err(format!("length must be at most {max_items}"));
            }
            for (position, item) in items.iter().enumerate() {
                let Some(text) = item.as_str() else {
                    return Err(format!("[{}] expected a string", position + 1));
                };
                check_str(rule, text).map_err(|why| format!("[{}] {why}", position + 1))?;
                if unique && items[..position].contains(item) {
                    return Err(format!("[{}] duplicate value '{text}'", position + 1));
                }
            }
            Ok(value.clone())
        }
        FieldType::Foreign { .. } => {
            let Some(reference) = value.as_object() else {
                return Err("expected a record".into());
            };
            let key = match (reference.get("id"), reference.get("name"), reference.len()) {
                (Some(Value::String(key)), None, 1) | (None, Some(Value::String(key)), 1) => key,
                _ => return Err("expected a record with exactly one string 'id' (or 'name')".into()),
            };
            if key.is_empty() || key.len() > STRING_LEN_MAX {
                return Err("reference must be a non-empty id or name".into());
            }
            Ok(serde_json::json!({ "id": key }))
        }
        FieldType::ForeignIds(_) => {
            let Some(items) = value.as_array() else {
                return Err("expected an array".into());
            };
            if items.len() > ARRAY_ITEMS_MAX {
                return Err(format!("length must be at most {ARRAY_ITEMS_MAX}"));
            }
            for (position, item) in items.iter().enumerate() {
                if item.as_str().and_then(|s| Uuid::parse_str(s).ok()).is_none() {
                    return Err(format!("[{}] expected a uuid", position + 1));
                }
            }
            Ok(value.clone())
        }
        FieldType::HeaderMap => {
            let Some(headers) = value.as_object() else {
                return Err("expected a map".into());
            };
            if headers.len() > ARRAY_ITEMS_MAX {
                return Err(format!("at most {ARRAY_ITEMS_MAX} headers"));
            }
            for (name, values) in headers {
                if name.eq_ignore_ascii_case("host") {
                    return Err("cannot contain 'host' header, which must be specified in the 'hosts' attribute".into());
                }
                if name.is_empty() || !name.bytes().all(is_token_byte) {
                    return Err(format!("invalid header name '{name}'"));
                }
                let Some(values) = values.as_array() else {
                    return Err(format!("'{name}': expected an array"));
                };
                if values.is_empty() || values.len() > ARRAY_ITEMS_MAX {
                    return Err(format!("'{name}': expected 1 to {ARRAY_ITEMS_MAX} values"));
                }
                if values.iter().any(|v| v.as_str().is_none_or(|s| s.len() > STRING_LEN_MAX)) {
                    return Err(format!("'{name}': values must be strings"));
                }
            }
            Ok(value.clone())
        }
        FieldType::Endpoints => {
            let Some(items) = value.as_array() else {
                return Err("expected an array".into());
            };
            if items.len() > ARRAY_ITEMS_MAX {
                return Err(format!("length must be at most {ARRAY_ITEMS_MAX}"));
            }
            for (position, item) in items.iter().enumerate() {
                let Some(endpoint) = item.as_object() else {
                    return Err(format!("[{}] expected a record", position + 1));
                };
                if endpoint.keys().any(|k| k != "ip" && k != "port") {
                    return Err(format!("[{}] only 'ip' and 'port' are allowed", position + 1));
                }
                if let Some(ip) = endpoint.get("ip") {
                    let Some(ip) = ip.as_str() else {
                        return Err(format!("[{}] ip: expected a string", position + 1));
                    };
                    check_str(StrRule::Ip, ip).map_err(|why| format!("[{}] ip: {why}", position + 1))?;
                }
                if let Some(port) = endpoint.get("port") {
                    if port.as_u64().is_none_or(|p| p > 65535) {
                        return Err(format!("[{}] port: expected an integer 0-65535", position + 1));
                    }
                }
                if endpoint.is_empty() {
                    return Err(format!("[{}] at least one of 'ip', 'port' is required", position + 1));
                }
            }
            Ok(value.clone())
        }
        FieldType::Object => {
            if !value.is_object() {
                return Err("expected a record".into());
            }
            if value.to_string().len() > OBJECT_BYTES_MAX {
                return Err(format!("larger than {OBJECT_BYTES_MAX} bytes"));
            }
            Ok(value.clone())
        }
    }
}

fn is_token_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

fn is_hostname(text: &str) -> bool {
    if text.is_empty() || text.len() > 253 {
        return false;
    }
    text.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    })
}

fn is_ip(text: &str) -> bool {
    text.parse::<std::net::IpAddr>().is_ok()
}

fn check_str(rule: StrRule, text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("length must be at least 1".into());
    }
    match rule {
        StrRule::Text(max) => {
            if text.len() > max {
                return Err(format!("length must be at most {max}"));
            }
        }
        StrRule::Utf8Name => {
            if text.len() > 128 {
                return Err("length must be at most 128".into());
            }
            if !text.chars().all(|c| !c.is_ascii() || c.is_ascii_alphanumeric() || ".-_~".contains(c)) {
                return Err(format!(
                    "invalid value '{text}': the only accepted ascii characters are alphanumerics or ., -, _, and ~"
                ));
            }
        }
        StrRule::Host => {
            let unbracketed = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text);
            if !is_hostname(text) && !is_ip(unbracketed) {
                return Err(format!("invalid hostname: {text}"));
            }
        }
        StrRule::HostPattern => {
            let stars = text.matches('*').count();
            let body = text.strip_prefix("*.").or_else(|| text.strip_suffix(".*")).unwrap_or(text);
            let host_only = body.rsplit_once(':').map_or(
                body,
                |(host, port)| {
                    if port.parse::<u16>().is_ok() {
                        host
                    } else {
                        body
                    }
                },
            );
            if stars > 1 || (stars == 1 && body == text) || (!is_hostname(host_only) && !is_ip(host_only)) {
                return Err(format!("invalid wildcard: '{text}'; a hostname with at most one '*' at the start or end"));
            }
        }
        StrRule::RoutePath => {
            if text.len() > STRING_LEN_MAX {
                return Err(format!("length must be at most {STRING_LEN_MAX}"));
            }
            if let Some(regex) = text.strip_prefix('~') {
                if regex.is_empty() {
                    return Err("empty regex".into());
                }
            } else if !text.starts_with('/') {
                return Err("should start with: / (fixed path) or ~/ (regex path)".into());
            } else if text.contains("//") {
                return Err("must not have empty segments".into());
            }
        }
        StrRule::Path => {
            if text.len() > STRING_LEN_MAX {
                return Err(format!("length must be at most {STRING_LEN_MAX}"));
            }
            if !text.starts_with('/') {
                return Err("should start with: /".into());
            }
            if text.contains("//") {
                return Err("must not have empty segments".into());
            }
        }
        StrRule::OneOf(allowed) => {
            if !allowed.contains(&text) {
                return Err(format!("expected one of: {}", allowed.join(", ")));
            }
        }
        StrRule::Pem => {
            if text.len() > PEM_LEN_MAX {
                return Err(format!("length must be at most {PEM_LEN_MAX}"));
            }
            if !text.trim_start().starts_with("-----BEGIN ") || !text.contains("-----END ") {
                return Err("invalid PEM: expected a '-----BEGIN ...' block".into());
            }
        }
        StrRule::HostPort => {
            let (host, port) = split_host_port(text);
            let unbracketed = host.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(host);
            if !is_hostname(host) && !is_ip(unbracketed) {
                return Err(format!("invalid target '{text}': expected host or host:port"));
            }
            if let Some(port) = port {
                if port.parse::<u16>().is_err() {
                    return Err(format!("invalid port in target '{text}'"));
                }
            }
        }
        StrRule::Ip => {
            let (address, prefix) = text.split_once('/').map_or((text, None), |(a, p)| (a, Some(p)));
            if !is_ip(address) {
                return Err(format!("invalid ip or cidr range: '{text}'"));
            }
            if let Some(prefix) = prefix {
                let max = if address.contains(':') { 128 } else { 32 };
                if prefix.parse::<u8>().map_or(true, |p| p > max) {
                    return Err(format!("invalid cidr range: '{text}'"));
                }
            }
        }
    }
    Ok(())
}

/// Splits `host:port`, `[v6]:port`, `host`, `v6` into host and optional port.
/// The port a target without one gets, as Kong's (`kong/db/dao/targets.lua`).
pub const TARGET_PORT_DEFAULT: u16 = 8000;

/// A target as Kong stores it: with a port (8000 when none is given), an IPv6
/// address in brackets (`konghq.test` → `konghq.test:8000`, `::1` → `[::1]:8000`).
pub fn target_with_port(target: &str) -> String {
    if target.parse::<std::net::Ipv6Addr>().is_ok() {
        return format!("[{target}]:{TARGET_PORT_DEFAULT}");
    }
    match split_host_port(target) {
        (_, Some(_)) => target.to_string(),
        (host, None) => format!("{host}:{TARGET_PORT_DEFAULT}"),
    }
}

pub fn split_host_port(text: &str) -> (&str, Option<&str>) {
    if text.starts_with('[') {
        return match text.rsplit_once("]:") {
            Some((host, port)) => (&text[..host.len() + 1], Some(port)),
            None => (text, None),
        };
    }
    if text.matches(':').count() == 1 {
        let (host, port) = text.split_once(':').expect("one colon");
        return (host, Some(port));
    }
    (text, None)
}

/// Kong's `url` shorthand for services: `protocol://host:port/path` expands into the
/// four fields. Returns the field errors under `url`.
pub fn expand_service_url(body: &mut Object) -> Result<(), ApiError> {
    let Some(url) = body.remove("url") else {
        return Ok(());
    };
    let Some(url) = url.as_str() else {
        return Err(ApiError::field("url", "expected a string"));
    };
    let Some((protocol, rest)) = url.split_once("://") else {
        return Err(ApiError::field("url", "missing scheme: expected protocol://host[:port][/path]"));
    };
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], Some(&rest[slash..])),
        None => (rest, None),
    };
    let (host, port) = split_host_port(authority);
    let port: i64 = match port {
        Some(port) => port.parse().map_err(|_| ApiError::field("url", format!("invalid port in '{url}'")))?,
        None if protocol == "https" || protocol == "grpcs" => 443,
        None => 80,
    };
    body.insert("protocol".into(), Value::from(protocol));
    body.insert("host".into(), Value::from(host));
    body.insert("port".into(), Value::from(port));
    body.insert("path".into(), path.map_or(Value::Null, Value::from));
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn service_defaults_are_kongs() {
        let service = validate(EntityKind::Service, &json!({"host": "example.com"}), Mode::Create, None).unwrap();
        assert_eq!(service["port"], 80);
        assert_eq!(service["protocol"], "http");
        assert_eq!(service["retries"], 5);
        assert_eq!(service["connect_timeout"], 60000);
        assert_eq!(service["path"], Value::Null);
        assert_eq!(service["enabled"], true);
    }

    #[test]
    fn errors_name_the_field() {
        let error =
            validate(EntityKind::Service, &json!({"host": 5, "colour": "red"}), Mode::Create, None).unwrap_err();
        assert_eq!(error.fields["host"], "expected a string");
        assert_eq!(error.fields["colour"], "unknown field");
        let error = validate(EntityKind::Route, &json!({"protocols": ["http"]}), Mode::Create, None).unwrap_err();
        assert!(error.fields["@entity"].contains("must set one of"));
        let error = validate(EntityKind::Route, &json!({"paths": ["nope"]}), Mode::Create, None).unwrap_err();
        assert!(error.fields["paths[0]"].contains("should start with"));
        let error = validate(EntityKind::Plugin, &json!({"name": "no-such"}), Mode::Create, None).unwrap_err();
        assert!(error.fields["name"].contains("not enabled"));
    }

    #[test]
    fn patch_merges_onto_existing() {
        let existing =
            validate(EntityKind::Service, &json!({"host": "a.com", "port": 81}), Mode::Create, None).unwrap();
        let patched = validate(EntityKind::Service, &json!({"port": 82}), Mode::Patch, Some(&existing)).unwrap();
        assert_eq!(patched["host"], "a.com");
        assert_eq!(patched["port"], 82);
    }

    #[test]
    fn url_shorthand_expands() {
        let mut body = json!({"url": "https://api.example.com/v1"}).as_object().unwrap().clone();
        expand_service_url(&mut body).unwrap();
        assert_eq!(body["port"], 443);
        assert_eq!(body["path"], "/v1");
        assert_eq!(body["host"], "api.example.com");
    }

    #[test]
    fn host_patterns() {
        assert!(check_str(StrRule::HostPattern, "*.example.com").is_ok());
        assert!(check_str(StrRule::HostPattern, "example.*").is_ok());
        assert!(check_str(StrRule::HostPattern, "example.com:8000").is_ok());
        assert!(check_str(StrRule::HostPattern, "a.*.com").is_err());
        assert!(check_str(StrRule::HostPattern, "*.*.com").is_err());
    }
}
