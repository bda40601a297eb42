//! Services, routes, upstreams and targets as typed structs: what the data path
//! compiles its snapshot from, read once per config version.
//!
//! Defaults live in one place, the schema ([`crate::schema`]). The Admin API stores
//! every field of an entity, defaults filled in; [`read`] fills any field a stored form
//! lacks (one written before the field existed) from the same schema before it
//! deserializes, so no default is written here or in the node.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::schema::{EntityKind, Object};

/// A stored foreign key: `{"id": "<uuid>"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ForeignKey {
    pub id: Uuid,
}

/// A service (Kong's fields; timeouts in milliseconds).
#[derive(Debug, Clone, Deserialize)]
pub struct Service {
    pub id: Uuid,
    pub name: Option<String>,
    pub retries: u32,
    pub protocol: String,
    pub host: String,
    pub port: u16,
    pub path: Option<String>,
    pub connect_timeout: u64,
    pub write_timeout: u64,
    pub read_timeout: u64,
    pub client_certificate: Option<ForeignKey>,
    pub tls_verify: Option<bool>,
    pub tls_verify_depth: Option<u32>,
    pub ca_certificates: Option<Vec<Uuid>>,
    pub enabled: bool,
}

/// A route.
#[derive(Debug, Clone, Deserialize)]
pub struct Route {
    pub id: Uuid,
    pub name: Option<String>,
    pub service: Option<ForeignKey>,
    pub protocols: Vec<String>,
    pub methods: Option<Vec<String>>,
    pub hosts: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    /// Header name → accepted values.
    pub headers: Option<BTreeMap<String, Vec<String>>>,
    pub snis: Option<Vec<String>>,
    pub regex_priority: i64,
    pub strip_path: bool,
    pub preserve_host: bool,
    pub path_handling: String,
    /// Set by the state machine, not the schema (seconds since the epoch).
    #[serde(default)]
    pub created_at: i64,
}

/// An upstream: a load-balanced set of targets a service's `host` may name.
#[derive(Debug, Clone, Deserialize)]
pub struct Upstream {
    pub id: Uuid,
    pub name: String,
    pub algorithm: String,
    pub hash_on: String,
    pub hash_fallback: String,
    pub hash_on_header: Option<String>,
    pub hash_fallback_header: Option<String>,
    pub hash_on_cookie: Option<String>,
    pub hash_on_query_arg: Option<String>,
    pub hash_fallback_query_arg: Option<String>,
    /// Kong's `healthchecks` object, read by the health checker and the passive checks
    /// (`node/src/health.rs`), which know its nested shape.
    pub healthchecks: Value,
}

/// One target of an upstream.
#[derive(Debug, Clone, Deserialize)]
pub struct Target {
    pub id: Uuid,
    pub upstream: ForeignKey,
    /// `host[:port]`.
    pub target: String,
    pub weight: u32,
}

/// Reads a stored entity of `kind` as `T`, filling fields it lacks from the schema's
/// defaults.
pub fn read<T: DeserializeOwned>(kind: EntityKind, entity: &Object) -> Result<T, String> {
    let schema = kind.schema();
    let mut object = entity.clone();
    for field in schema.fields {
        object.entry(field.name).or_insert_with(|| field.default.to_value());
    }
    serde_json::from_value(Value::Object(object)).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::validate::{validate, Mode};

    fn stored(kind: EntityKind, body: Value) -> Object {
        let mut object = validate(kind, &body, Mode::Create, None).unwrap();
        object.insert("id".into(), Value::from(Uuid::new_v4().to_string()));
        object
    }

    #[test]
    fn the_schemas_defaults_are_what_the_typed_entities_read() {
        let service: Service = read(EntityKind::Service, &stored(EntityKind::Service, json!({"host": "a"}))).unwrap();
        assert_eq!((service.port, service.retries, service.read_timeout), (80, 5, 60_000));
        assert_eq!(service.protocol, "http");
        assert!(service.enabled);
        let route: Route = read(EntityKind::Route, &stored(EntityKind::Route, json!({"paths": ["/a"]}))).unwrap();
        assert!(route.strip_path && !route.preserve_host);
        assert_eq!(route.protocols, ["http", "https"]);
        let upstream: Upstream =
            read(EntityKind::Upstream, &stored(EntityKind::Upstream, json!({"name": "u"}))).unwrap();
        assert_eq!(upstream.algorithm, "round-robin");
        assert!(upstream.healthchecks.get("active").is_some());
    }

    #[test]
    fn a_stored_form_without_a_later_field_reads_with_its_default() {
        let mut object = stored(EntityKind::Service, json!({"host": "a", "read_timeout": 5}));
        object.remove("write_timeout");
        object.remove("enabled");
        let service: Service = read(EntityKind::Service, &object).unwrap();
        assert_eq!((service.read_timeout, service.write_timeout), (5, 60_000));
        assert!(service.enabled);
    }
}
