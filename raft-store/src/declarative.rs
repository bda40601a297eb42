//! Declarative configuration: Kong's `_format_version: "3.0"` documents.
//!
//! Accepted shapes, as in Kong's decK and `kong config`:
//! - nested: `services[].routes[]`, `services[].plugins[]`, `routes[].plugins[]`,
//!   `consumers[].{keyauth_credentials,basicauth_credentials,jwt_secrets,hmacauth_credentials,acls,plugins}[]`,
//!   `upstreams[].targets[]`, `certificates[].snis[]` (names or objects);
//! - flat: every table at the top level, references by id or name, either as
//!   `{"id": ...}` or a plain string (`service: my-service`).
//!
//! `GET /config` dumps the flat shape with ids, which loads back unchanged.
//!
//! Loading builds a fresh [`ConfigState`] by creating every entity through the same
//! validation as the Admin API; the first error fails the whole document with the
//! entity's path in the error (`services[0].routes[1]`).

use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::command::{Command, Op, Outcome};
use crate::error::{ApiError, ErrorCode};
use crate::schema::{EntityKind, FieldType};
use crate::state::ConfigState;

impl ConfigState {
    /// `Op::ReplaceAll`: the whole config becomes the document's, or stays as it was
    /// when the document fails.
    pub(crate) fn replace(
        &mut self,
        document: &crate::json::JsonText,
        id_seed: u128,
        now: i64,
        hash: Option<String>,
    ) -> Result<Outcome, ApiError> {
        let document = document.parse().map_err(|error| {
            ApiError::new(ErrorCode::BadRequest, format!("the declarative document is not JSON: {error}"))
        })?;
        let mut replacement = load(&document, id_seed, now)?;
        let entities = replacement.entity_count() as u64;
        replacement.config_hash = hash;
        *self = replacement;
        Ok(Outcome::Replaced { entities })
    }
}

/// Most entities one document may hold.
pub const DOCUMENT_ENTITIES_MAX: usize = 200_000;

/// Kong 3.x loads 1.1 and 2.1 files too, converting their route paths
/// ([`migrate_path`]); what they hold is otherwise read as 3.0.
const FORMAT_VERSIONS: &[&str] = &["3.0", "2.1", "1.1"];

struct Pending {
    kind: EntityKind,
    id: Uuid,
    body: Map<String, Value>,
    path: String,
}

/// Children a nested entity may carry, and the kind they become.
fn nested_tables(kind: EntityKind) -> &'static [(&'static str, EntityKind)] {
    match kind {
        EntityKind::Service => &[("routes", EntityKind::Route), ("plugins", EntityKind::Plugin)],
        EntityKind::Route => &[("plugins", EntityKind::Plugin)],
        EntityKind::Consumer => &[
            ("keyauth_credentials", EntityKind::KeyAuth),
            ("basicauth_credentials", EntityKind::BasicAuth),
            ("jwt_secrets", EntityKind::Jwt),
            ("hmacauth_credentials", EntityKind::HmacAuth),
            ("acls", EntityKind::Acl),
            ("plugins", EntityKind::Plugin),
        ],
        EntityKind::Upstream => &[("targets", EntityKind::Target)],
        EntityKind::Certificate => &[("snis", EntityKind::Sni)],
        _ => &[],
    }
}

fn declarative_error(path: &str, error: ApiError) -> ApiError {
    let mut wrapped = ApiError::new(
        ErrorCode::DeclarativeConfig,
        format!("declarative config is invalid: {path}: {}", error.message),
    );
    if error.fields.is_empty() {
        wrapped.fields.insert(path.to_string(), error.message);
    }
    for (field, why) in error.fields {
        wrapped.fields.insert(format!("{path}.{field}"), why);
    }
    wrapped
}

/// Derives the id of the `position`-th generated entity from the command's seed.
fn generated_id(seed: u128, position: usize) -> Uuid {
    // splitmix-style mixing keeps ids well spread; the version bits make it a v4 uuid.
    let mut x = seed ^ (position as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
    x ^= x >> 67;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9_94D0_49BB_1331_11EB);
    x ^= x >> 61;
    uuid::Builder::from_random_bytes(x.to_be_bytes()).into_uuid()
}

/// Builds the state a declarative document describes.
pub fn load(document: &Value, id_seed: u128, now_s: i64) -> Result<ConfigState, ApiError> {
    let Some(document) = document.as_object() else {
        return Err(declarative_error("@document", ApiError::new(ErrorCode::DeclarativeConfig, "expected an object")));
    };
    let migrated;
    let document = match document.get("_format_version").and_then(Value::as_str) {
        Some("3.0") => document,
        Some(version) if FORMAT_VERSIONS.contains(&version) => {
            migrated = migrate_route_paths(document);
            &migrated
        }
        _ => {
            let mut error =
                ApiError::new(ErrorCode::DeclarativeConfig, "declarative config is invalid: _format_version");
            error.fields.insert("_format_version".into(), format!("expected one of: {}", FORMAT_VERSIONS.join(", ")));
            return Err(error);
        }
    };

    let mut pending: Vec<Pending> = Vec::new();
    let mut generated = 0usize;
    for (table, items) in document {
        if table.starts_with('_') {
            continue;
        }
        let Some(kind) = EntityKind::from_table(table) else {
            let mut error = ApiError::new(
                ErrorCode::DeclarativeConfig,
                format!("declarative config is invalid: unknown table '{table}'"),
            );
            error.fields.insert(table.clone(), "unknown field".into());
            return Err(error);
        };
        flatten(kind, items, table, None, id_seed, &mut generated, &mut pending)?;
    }
    if pending.len() > DOCUMENT_ENTITIES_MAX {
        return Err(ApiError::new(
            ErrorCode::DeclarativeConfig,
            format!("a document holds at most {DOCUMENT_ENTITIES_MAX} entities"),
        ));
    }
    // Parents before children: the kinds are declared in dependency order.
    pending.sort_by_key(|p| p.kind);

    let mut state = ConfigState::new();
    for item in pending {
        let command = Command {
            now_s,
            write_id: None,
            op: Op::Create { kind: item.kind, id: item.id, parent: None, body: Value::Object(item.body).into() },
        };
        state.apply(&command).map_err(|error| declarative_error(&item.path, error))?;
    }
    Ok(state)
}

/// A 1.1 or 2.1 document with its route paths as 3.0 reads them (Kong's
/// kong/db/declarative/migrations/route_path.lua: top-level routes and those nested in
/// services).
fn migrate_route_paths(document: &Map<String, Value>) -> Map<String, Value> {
    let mut document = document.clone();
    let migrate_routes = |routes: Option<&mut Value>| {
        for route in routes.and_then(Value::as_array_mut).into_iter().flatten() {
            for path in route.get_mut("paths").and_then(Value::as_array_mut).into_iter().flatten() {
                if let Some(text) = path.as_str() {
                    *path = Value::String(migrate_path(text));
                }
            }
        }
    };
    migrate_routes(document.get_mut("routes"));
    for service in document.get_mut("services").and_then(Value::as_array_mut).into_iter().flatten() {
        migrate_routes(service.get_mut("routes"));
    }
    document.insert("_format_version".into(), Value::from("3.0"));
    document
}

/// Reserved characters (RFC 3986) stay percent-encoded, their hex upper-cased.
const RESERVED: &[u8] = b"!#$%&'()*+,/:;=?@[]";

/// Kong 3.0's conversion of a pre-3.0 route path (kong/db/migrations/
/// migrate_path_280_300.lua): before 3.0 a path was a regex whenever it held a
/// character outside `[a-zA-Z0-9.-_~/%]`; from 3.0 a regex starts with `~`. A plain
/// path is normalized (unreserved escapes decoded, dot segments removed, slashes
/// merged); a regex gets `~`, and its escapes of non-reserved characters are decoded,
/// escaped again where they mean something in a regex.
pub fn migrate_path(path: &str) -> String {
    let plain = path.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_~/%".contains(&b));
    if plain {
        return normalize_path(&decode_escapes(path, |byte| vec![byte]));
    }
    let regex = decode_escapes(path, |byte| match byte {
        b'.' | b'^' | b'-' | b'{' | b'}' | b'\\' | b'|' => vec![b'\\', byte],
        other => vec![other],
    });
    format!("~{regex}")
}

/// Decodes `%XX` triplets but those of reserved characters (upper-cased instead);
/// `decoded` gives the bytes a decoded one becomes.
fn decode_escapes(path: &str, decoded: impl Fn(u8) -> Vec<u8>) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = bytes.get(at + 1..at + 3).and_then(|hex| std::str::from_utf8(hex).ok());
        match (bytes[at], hex.and_then(|hex| u8::from_str_radix(hex, 16).ok())) {
            (b'%', Some(byte)) if RESERVED.contains(&byte) => {
                out.push(b'%');
                out.extend(bytes[at + 1..at + 3].to_ascii_uppercase());
                at += 3;
            }
            (b'%', Some(byte)) => {
                out.extend(decoded(byte));
                at += 3;
            }
            (other, _) => {
                out.push(other);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Dot segments removed and slashes merged, as Kong's `normalize(path, true)`.
fn normalize_path(path: &str) -> String {
    if path.is_empty() || path == "/" {
        return path.to_string();
    }
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut normalized = String::with_capacity(path.len());
    if path.starts_with('/') {
        normalized.push('/');
    }
    normalized.push_str(&segments.join("/"));
    if trailing && !segments.is_empty() {
        normalized.push('/');
    }
    normalized
}

fn flatten(
    kind: EntityKind,
    items: &Value,
    path: &str,
    parent: Option<(&'static str, Uuid)>,
    id_seed: u128,
    generated: &mut usize,
    pending: &mut Vec<Pending>,
) -> Result<(), ApiError> {
    let Some(items) = items.as_array() else {
        return Err(declarative_error(path, ApiError::new(ErrorCode::DeclarativeConfig, "expected an array")));
    };
    for (position, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{position}]");
        if *generated > DOCUMENT_ENTITIES_MAX {
            return Err(ApiError::new(
                ErrorCode::DeclarativeConfig,
                format!("a document holds at most {DOCUMENT_ENTITIES_MAX} entities"),
            ));
        }
        let mut body = match item {
            Value::Object(body) => body.clone(),
            // `snis: [example.com]` on a certificate.
            Value::String(name) if kind == EntityKind::Sni => {
                let mut body = Map::new();
                body.insert("name".into(), Value::from(name.clone()));
                body
            }
            _ => {
                return Err(declarative_error(
                    &item_path,
                    ApiError::new(ErrorCode::DeclarativeConfig, "expected an object"),
                ))
            }
        };
        let id = match body.get("id") {
            Some(given) => given
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or_else(|| declarative_error(&item_path, ApiError::field("id", "expected a valid uuid")))?,
            None => {
                *generated += 1;
                let id = generated_id(id_seed, *generated);
                body.insert("id".into(), Value::from(id.to_string()));
                id
            }
        };
        if let Some((field, parent_id)) = parent {
            body.insert(field.into(), json!({ "id": parent_id.to_string() }));
        }
        // `service: my-service` is shorthand for `service: {name: my-service}`.
        for field in kind.schema().fields {
            if let FieldType::Foreign { .. } = field.ty {
                if let Some(Value::String(reference)) = body.get(field.name) {
                    let reference = reference.clone();
                    body.insert(field.name.into(), json!({ "id": reference }));
                }
            }
        }
        for (child_table, child_kind) in nested_tables(kind) {
            let Some(children) = body.remove(*child_table) else {
                continue;
            };
            let field = child_kind
                .schema()
                .foreign_keys()
                .find(|(_, target, _)| *target == kind)
                .map(|(field, _, _)| field)
                .expect("nested tables reference their parent");
            let child_path = format!("{item_path}.{child_table}");
            flatten(*child_kind, &children, &child_path, Some((field, id)), id_seed, generated, pending)?;
        }
        pending.push(Pending { kind, id, body, path: item_path });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_document_loads_and_dump_round_trips() {
        let document = json!({
            "_format_version": "3.0",
            "services": [{
                "name": "echo", "url": "http://127.0.0.1:9000",
                "routes": [{"name": "r1", "paths": ["/echo"], "plugins": [{"name": "correlation-id"}]}]
            }],
            "consumers": [{"username": "alice", "keyauth_credentials": [{"key": "secret"}], "acls": [{"group": "admins"}]}],
            "upstreams": [{"name": "backend", "targets": [{"target": "127.0.0.1:9001"}]}],
            "plugins": [{"name": "request-termination", "config": {"status_code": 418}}]
        });
        let state = load(&document, 42, 1).unwrap();
        assert_eq!(state.entity_count(), 9);
        let again = load(&state.dump(), 7, 2).unwrap();
        assert_eq!(again.dump(), state.dump());
        // The same seed gives the same ids: loading is deterministic.
        assert_eq!(load(&document, 42, 1).unwrap().dump(), state.dump());
    }

    /// Kong's kong/db/migrations/migrate_path_280_300.lua, on the paths a 1.1 file
    /// holds (Kong's own /config specs post 1.1 files: spec/02-integration/04-admin_api/
    /// 15-off_spec.lua:225).
    #[test]
    fn pre_3_0_route_paths_are_migrated() {
        assert_eq!(migrate_path("/users/\\d+"), "~/users/\\d+");
        assert_eq!(migrate_path("/a//b/./c/../d"), "/a/b/d");
        assert_eq!(migrate_path("/%7ea%2f"), "/~a%2F");
        assert_eq!(migrate_path("/x%2e(y)"), "~/x\\.(y)");
        assert_eq!(migrate_path("/"), "/");
        let document = json!({
            "_format_version": "1.1",
            "services": [{"name": "s", "host": "a.com", "routes": [{"name": "r", "paths": ["/users/\\d+", "/plain//x"]}]}],
            "routes": [{"name": "top", "service": "s", "paths": ["/top$"]}]
        });
        let state = load(&document, 3, 1).unwrap();
        let dumped = state.dump();
        assert_eq!(dumped["_format_version"], "3.0");
        let paths: Vec<Value> =
            dumped["routes"].as_array().unwrap().iter().map(|route| route["paths"].clone()).collect();
        assert!(paths.contains(&json!(["~/users/\\d+", "/plain/x"])), "{paths:?}");
        assert!(paths.contains(&json!(["~/top$"])), "{paths:?}");
        assert!(load(&json!({"_format_version": "1.0"}), 1, 1).is_err());
    }

    #[test]
    fn errors_carry_the_path() {
        let document = json!({
            "_format_version": "3.0",
            "services": [{"name": "ok", "host": "a.com"}, {"name": "bad", "host": "b.com", "routes": [{"paths": ["nope"]}]}]
        });
        let error = load(&document, 1, 1).unwrap_err();
        assert_eq!(error.code, ErrorCode::DeclarativeConfig);
        assert!(error.fields.contains_key("services[1].routes[0].paths[0]"), "{error:?}");
        let error = load(&json!({"services": []}), 1, 1).unwrap_err();
        assert!(error.fields.contains_key("_format_version"));
    }
}
