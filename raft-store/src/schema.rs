//! The entity model: Kong 3.x's entities, their fields, defaults and rules, as data.
//!
//! Like Kong, Tollgate describes each entity with a schema and validates every write
//! against it in one place ([`crate::validate::validate`]). Entities are stored as JSON
//! objects that have passed that validation, so a stored entity always has every field
//! of its schema (with defaults filled in), and nothing else. Typed views for the data path are compiled
//! from these objects off the request path.
//!
//! Foreign keys are stored as `{"id": "<uuid>"}`. Input may name the referenced entity
//! by id or by its endpoint key (`{"id": "my-service"}` or `{"name": "my-service"}`);
//! the state machine resolves that when it applies the write.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
pub(crate) fn is_grpc_route(route: &Object) -> bool {
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

/// Splits `host:port`, `[v6]:port`, `host`, `v6` into host and optional port.
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
