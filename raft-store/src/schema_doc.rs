//! The entity and plugin schemas as Kong's Admin API shows them (`GET /schemas/{entity}`,
//! `GET /schemas/plugins/{name}`), and validation without a write (`POST
//! /schemas/{entity}/validate`).
//!
//! Kong's shape (kong/api/api_helpers.lua `schema_to_jsonable`): `{"fields": [...],
//! "entity_checks": [...]}`, each field one single-key object in declaration order,
//! typed `string`, `integer`, `number`, `boolean`, `array`, `set`, `map`, `record` or
//! `foreign`, with `required`, `default`, `one_of`, `between`, `elements`, `fields`
//! where Tollgate's schema knows them. Entity schemas come from [`crate::schema`]'s
//! tables. Plugin configs are typed Rust structs ([`crate::plugins`]); their schema is
//! read off the validator itself: the defaults are what it fills into a minimal
//! config, and each field's type, nullability, allowed values and range are what it
//! says when given a value of another type, `null`, an unknown word or a huge number.
//! So the answer cannot drift from what a write accepts. Config fields come in name
//! order (the validator's output order), not Kong's declaration order.

use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::plugins;
use crate::schema::{self, DefaultValue, EntityKind, Field, FieldType, OnDelete, StrRule};
use crate::validate::{self, Mode};

/// Kong's `{"id": {"type": "string", "uuid": true, "auto": true}}` and the timestamps.
fn meta_fields(kind: EntityKind) -> Vec<Value> {
    let mut fields = vec![
        json!({"id": {"type": "string", "uuid": true, "auto": true}}),
        json!({"created_at": {"type": "integer", "timestamp": true, "auto": true}}),
    ];
    if kind.schema().has_updated_at {
        fields.push(json!({"updated_at": {"type": "integer", "timestamp": true, "auto": true}}));
    }
    fields
}

/// A string rule in Kong's vocabulary.
fn string_rule(rule: StrRule) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("type".into(), Value::from("string"));
    out.insert("len_min".into(), Value::from(1));
    match rule {
        StrRule::Text(max) => {
            out.insert("len_max".into(), Value::from(max));
        }
        StrRule::Utf8Name => {
            out.insert("len_max".into(), Value::from(128));
            out.insert("utf8".into(), Value::Bool(true));
        }
        StrRule::Path => {
            out.insert("len_max".into(), Value::from(schema::STRING_LEN_MAX));
            out.insert("starts_with".into(), Value::from("/"));
        }
        StrRule::RoutePath => {
            out.insert("len_max".into(), Value::from(schema::STRING_LEN_MAX));
            out.insert("match_any".into(), json!({"patterns": ["^/", "^~"]}));
        }
        StrRule::OneOf(values) => {
            out.insert("one_of".into(), Value::from(values.to_vec()));
        }
        StrRule::Pem => {
            out.insert("len_max".into(), Value::from(schema::PEM_LEN_MAX));
        }
        StrRule::Host | StrRule::HostPattern | StrRule::HostPort | StrRule::Ip => {}
    }
    out
}

/// One field of an entity schema, without its name.
fn field_type(ty: FieldType) -> Map<String, Value> {
    let value = match ty {
        FieldType::Str(rule) => return string_rule(rule),
        FieldType::Int { min, max } => json!({"type": "integer", "between": [min, max]}),
        FieldType::Bool => json!({"type": "boolean"}),
        FieldType::Strings { rule, max_items, unique } => json!({
            "type": if unique { "set" } else { "array" },
            "len_max": max_items,
            "elements": Value::Object(string_rule(rule)),
        }),
        FieldType::Foreign { kind, on_delete } => json!({
            "type": "foreign",
            "reference": kind.table(),
            "on_delete": match on_delete { OnDelete::Cascade => "cascade", OnDelete::Restrict => "restrict" },
        }),
        FieldType::ForeignIds(kind) => json!({
            "type": "array",
            "len_max": schema::ARRAY_ITEMS_MAX,
            "elements": {"type": "string", "uuid": true, "reference": kind.table()},
        }),
        FieldType::HeaderMap => json!({
            "type": "map",
            "keys": {"type": "string"},
            "values": {"type": "array", "len_min": 1, "elements": {"type": "string"}},
        }),
        FieldType::Endpoints => json!({
            "type": "set",
            "len_max": schema::ARRAY_ITEMS_MAX,
            "elements": {
                "type": "record",
                "fields": [
                    {"ip": {"type": "string"}},
                    {"port": {"type": "integer", "between": [0, 65535]}},
                ],
                "entity_checks": [{"at_least_one_of": ["ip", "port"]}],
            },
        }),
        // A plugin's `config` depends on its name (GET /schemas/plugins/{name});
        // Kong marks it `abstract` in the plugins schema too.
        FieldType::Object => json!({"type": "record", "abstract": true}),
    };
    match value {
        Value::Object(map) => map,
        _ => unreachable!("field types are objects"),
    }
}

fn describe_field(kind: EntityKind, field: &Field) -> Value {
    let mut out = field_type(field.ty);
    if field.required {
        out.insert("required".into(), Value::Bool(true));
    }
    if !matches!(field.default, DefaultValue::Null) {
        out.insert("default".into(), field.default.to_value());
    }
    if kind.schema().unique.iter().any(|fields| fields.len() == 1 && fields[0] == field.name) {
        out.insert("unique".into(), Value::Bool(true));
    }
    json!({ field.name: Value::Object(out) })
}

/// The rules each entity's `check` applies across fields, in Kong's vocabulary
/// (kong/db/schema/init.lua's entity checkers).
fn entity_checks(kind: EntityKind) -> Value {
    match kind {
        EntityKind::Route => json!([
            {"conditional_at_least_one_of": {
                "if_field": "protocols",
                "if_match": {"elements": {"type": "string", "one_of": ["http", "https", "grpc", "grpcs", "ws", "wss"]}},
                "then_at_least_one_of": ["methods", "hosts", "headers", "paths", "snis"],
                "then_err": "must set one of %s when 'protocols' is 'http' or 'https'",
            }},
            {"conditional": {
                "if_field": "protocols",
                "if_match": {"elements": {"type": "string", "not_one_of": ["https", "grpcs", "tls"]}},
                "then_field": "snis",
                "then_match": {"len_eq": 0},
                "then_err": "'snis' can only be set when 'protocols' is or includes 'https', 'tls' or 'grpcs'",
            }},
        ]),
        EntityKind::Consumer => json!([{"at_least_one_of": ["custom_id", "username"]}]),
        EntityKind::Service => json!([
            {"conditional": {
                "if_field": "protocol",
                "if_match": {"not_one_of": ["http", "https"]},
                "then_field": "path",
                "then_match": {"eq": null},
            }},
        ]),
        EntityKind::Jwt => json!([
            {"conditional": {
                "if_field": "algorithm",
                "if_match": {"match_any": {"patterns": ["^RS", "^ES", "^PS"]}},
                "then_field": "rsa_public_key",
                "then_match": {"required": true},
            }},
        ]),
        EntityKind::Certificate => json!([{"mutually_required": ["cert_alt", "key_alt"]}]),
        _ => json!([]),
    }
}

/// `GET /schemas/{entity}`: the entity named by Kong's table name (`services`,
/// `keyauth_credentials`), or `None`.
pub fn entity_schema(table: &str) -> Option<Value> {
    let kind = EntityKind::from_table(table)?;
    let mut fields = meta_fields(kind);
    fields.extend(kind.schema().fields.iter().map(|field| describe_field(kind, field)));
    Some(json!({ "fields": fields, "entity_checks": entity_checks(kind) }))
}

/// `POST /schemas/{entity}/validate`: the checks a create makes before it touches the
/// state (the `url` shorthand, a given `id` and timestamps, every field), without
/// resolving references. `Ok` means a create with this body fails only on references
/// or uniqueness.
pub fn validate_input(kind: EntityKind, body: &Value) -> Result<(), ApiError> {
    let Some(object) = body.as_object() else {
        return Err(ApiError::field("@entity", "expected a JSON object"));
    };
    let mut object = object.clone();
    if kind == EntityKind::Service {
        schema::expand_service_url(&mut object)?;
    }
    if let Some(id) = object.get("id") {
        if id.as_str().and_then(|s| uuid::Uuid::parse_str(s).ok()).is_none() {
            return Err(ApiError::field("id", "expected a valid uuid"));
        }
    }
    for stamp in ["created_at", "updated_at"] {
        match object.get(stamp) {
            None | Some(Value::Null) => {}
            Some(value) if value.as_i64().is_some_and(|s| s >= 0) => {}
            Some(_) => return Err(ApiError::field(stamp, "expected a non-negative integer (seconds since the epoch)")),
        }
    }
    validate::validate(kind, &Value::Object(object), Mode::Create, None).map(|_| ())
}

// ---- plugin configs --------------------------------------------------------------

/// What a plugin's config needs beyond `{}` to pass its checks, which of those fields
/// are required, and the config-wide rules (Kong's names for them).
fn plugin_base(name: &str) -> (Value, &'static [&'static str], Value) {
    match name {
        "acl" => (
            json!({"allow": ["group"]}),
            &[],
            json!([{"only_one_of": ["config.allow", "config.deny"]}, {"at_least_one_of": ["config.allow", "config.deny"]}]),
        ),
        "ip-restriction" => {
            (json!({"allow": ["127.0.0.1"]}), &[], json!([{"at_least_one_of": ["config.allow", "config.deny"]}]))
        }
        "rate-limiting" => (
            json!({"minute": 1}),
            &[],
            json!([{"at_least_one_of": [
                "config.second", "config.minute", "config.hour", "config.day", "config.month", "config.year"
            ]}]),
        ),
        "file-log" => (json!({"path": "/tmp/tollgate-schema.log"}), &["path"], json!([])),
        "http-log" => (json!({"http_endpoint": "http://example.test/"}), &["http_endpoint"], json!([])),
        "opentelemetry" => (json!({"endpoint": "http://example.test/v1/traces"}), &["endpoint"], json!([])),
        _ => (json!({}), &[], json!([])),
    }
}

/// Probes one plugin's validator.
struct Probe<'a> {
    name: &'a str,
    base: &'a Value,
}

impl Probe<'_> {
    /// What the validator says about `path` when it holds `value` (the rest of the
    /// config as in the base): `None` when it says nothing about that field.
    fn says(&self, path: &[String], value: Value, at: &str) -> Option<String> {
        let mut config = self.base.clone();
        set_at(&mut config, path, value);
        let errors = plugins::normalize(self.name, &config).err()?;
        errors.get(&format!("config.{at}")).cloned()
    }

    /// The type the validator expects at `path`, from its answer to a value of the
    /// wrong type (`true`; accepted means a boolean).
    fn kind_at(&self, path: &[String], at: &str, wrong: Value) -> String {
        match self.says(path, wrong, at) {
            Some(message) if message.starts_with("invalid type") => {
                let expected = message.rsplit("expected ").next().unwrap_or_default();
                match expected {
                    "a string" => "string",
                    "a sequence" => "array",
                    "a map" => "map",
                    "f32" | "f64" => "number",
                    _ if expected.starts_with("struct ") => "record",
                    _ if expected.starts_with('u') || expected.starts_with('i') => "integer",
                    _ => "string",
                }
                .to_string()
            }
            _ => "boolean".to_string(),
        }
    }

    /// Kong's description of the value at `path` (a config field, `[]` for the config).
    fn describe(&self, path: &[String], default: &Value, required: bool) -> Value {
        let at = path.join(".");
        let kind = self.kind_at(path, &at, Value::Bool(true));
        let mut out = Map::new();
        out.insert("type".into(), Value::from(kind.as_str()));
        let nullable = self.says(path, Value::Null, &at).is_none_or(|m| !m.starts_with("invalid type"));
        if required || !nullable {
            out.insert("required".into(), Value::Bool(true));
        }
        if !default.is_null() && !required {
            out.insert("default".into(), default.clone());
        }
        match kind.as_str() {
            "string" | "integer" | "number" => self.scalar_rules(&kind, path, &at, &mut out),
            "array" => {
                let element_path = format!("{at}[0]");
                let element = self.kind_at(path, &element_path, json!([true]));
                let mut elements = Map::new();
                elements.insert("type".into(), Value::from(element.as_str()));
                self.element_rules(&element, path, &element_path, &mut elements);
                out.insert("elements".into(), Value::Object(elements));
            }
            "map" => {
                let key = "tollgate-probe";
                let values = self.kind_at(path, &format!("{at}.{key}"), json!({ key: true }));
                out.insert("keys".into(), json!({"type": "string"}));
                out.insert("values".into(), json!({ "type": values }));
            }
            "record" => {
                out.remove("default");
                let mut fields = Vec::new();
                for (name, value) in default.as_object().into_iter().flatten() {
                    let mut inner = path.to_vec();
                    inner.push(name.clone());
                    fields.push(json!({ name: self.describe(&inner, value, false) }));
                }
                out.insert("fields".into(), Value::Array(fields));
            }
            _ => {}
        }
        Value::Object(out)
    }

    /// `one_of` of a string, `between` of a number, as the checks state them.
    fn scalar_rules(&self, kind: &str, path: &[String], at: &str, out: &mut Map<String, Value>) {
        let probe = if kind == "string" { Value::from("\u{1}") } else { huge(self, path, at) };
        if let Some(message) = self.says(path, probe, at) {
            rules_from_message(&message, out);
        }
    }

    fn element_rules(&self, kind: &str, path: &[String], at: &str, out: &mut Map<String, Value>) {
        let probe = match kind {
            "string" => Value::from("\u{1}"),
            "integer" => Value::from(u16::MAX),
            _ => return,
        };
        if let Some(message) = self.says(path, Value::Array(vec![probe]), at) {
            rules_from_message(&message, out);
        }
    }
}

/// The largest value of the integer type at `path` (its `invalid type` answer names
/// it), or a huge float: past any range a check sets.
fn huge(probe: &Probe<'_>, path: &[String], at: &str) -> Value {
    let message = probe.says(path, Value::Bool(true), at).unwrap_or_default();
    match message.rsplit("expected ").next().unwrap_or_default() {
        "u8" => Value::from(u8::MAX),
        "u16" => Value::from(u16::MAX),
        "u32" => Value::from(u32::MAX),
        "i32" => Value::from(i32::MAX),
        "u64" | "i64" | "usize" => Value::from(9_007_199_254_740_991_u64),
        _ => json!(1e300),
    }
}

/// Kong's `one_of` and `between` from the checks' own words ("expected one of: a, b",
/// "value should be between 1 and 600").
fn rules_from_message(message: &str, out: &mut Map<String, Value>) {
    if let Some(list) = message.strip_prefix("expected one of: ") {
        out.insert("one_of".into(), Value::from(list.split(", ").collect::<Vec<_>>()));
    } else if let Some(range) = message.strip_prefix("value should be between ") {
        let bounds: Vec<Value> = range.split(" and ").map(number).collect();
        if bounds.len() == 2 && bounds.iter().all(|b| !b.is_null()) {
            out.insert("between".into(), Value::Array(bounds));
        }
    }
}

fn number(text: &str) -> Value {
    match text.parse::<i64>() {
        Ok(integer) => Value::from(integer),
        Err(_) => text.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map_or(Value::Null, Value::Number),
    }
}

fn set_at(config: &mut Value, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        *config = value;
        return;
    };
    let mut at = config;
    for name in parents {
        if !at.get(name).is_some_and(Value::is_object) {
            at[name.as_str()] = json!({});
        }
        at = &mut at[name.as_str()];
    }
    at[last.as_str()] = value;
}

/// `GET /schemas/plugins/{name}`: the plugin's `protocols` and `config` (every field,
/// Kong's defaults filled in) and its config-wide rules; `None` for a plugin this
/// build does not run.
pub fn plugin_schema(name: &str) -> Option<Value> {
    plugins::plugin(name)?;
    let (base, required, checks) = plugin_base(name);
    // A base that no longer passes (a plugin that grew a required field) shows no
    // config fields rather than no plugin; a unit test keeps every base passing.
    let defaults = plugins::normalize(name, &base).unwrap_or_else(|_| json!({}));
    let probe = Probe { name, base: &base };
    let mut fields = Vec::new();
    for (field, value) in defaults.as_object().into_iter().flatten() {
        let is_required = required.contains(&field.as_str());
        // The base's own values are samples, not defaults.
        let default = if base.get(field).is_some() { Value::Null } else { value.clone() };
        fields.push(json!({ field.as_str(): probe.describe(std::slice::from_ref(field), &default, is_required) }));
    }
    let protocols = EntityKind::Plugin.schema().field("protocols").map(|f| describe_field(EntityKind::Plugin, f));
    let config = json!({"config": {"type": "record", "required": true, "fields": fields}});
    Some(json!({
        "fields": protocols.into_iter().chain([config]).collect::<Vec<_>>(),
        "entity_checks": checks,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_field<'v>(schema: &'v Value, name: &str) -> &'v Value {
        let config = schema["fields"].as_array().unwrap().iter().find_map(|f| f.get("config")).unwrap();
        config["fields"].as_array().unwrap().iter().find_map(|f| f.get(name)).unwrap_or(&Value::Null)
    }

    #[test]
    fn every_entity_has_a_kong_shaped_schema() {
        for kind in EntityKind::ALL {
            let schema = entity_schema(kind.table()).expect("known");
            let fields = schema["fields"].as_array().unwrap();
            assert_eq!(fields[0], json!({"id": {"type": "string", "uuid": true, "auto": true}}));
            assert!(fields
                .iter()
                .all(|f| f.as_object().is_some_and(|o| o.len() == 1 && o.values().all(|v| v["type"].is_string()))));
            assert!(schema["entity_checks"].is_array());
        }
        assert!(entity_schema("not-present").is_none());
        let services = entity_schema("services").unwrap();
        let port = services["fields"].as_array().unwrap().iter().find_map(|f| f.get("port")).unwrap();
        assert_eq!(port, &json!({"type": "integer", "between": [0, 65535], "default": 80}));
        let routes = entity_schema("routes").unwrap();
        let service = routes["fields"].as_array().unwrap().iter().find_map(|f| f.get("service")).unwrap();
        assert_eq!(service["type"], "foreign");
        assert_eq!(service["reference"], "services");
    }

    #[test]
    fn every_plugin_schema_is_read_off_its_validator() {
        for spec in plugins::PLUGINS.iter() {
            let (base, _, _) = plugin_base(spec.name);
            assert!(plugins::normalize(spec.name, &base).is_ok(), "{}: the base config passes", spec.name);
            let schema = plugin_schema(spec.name).expect("known");
            let config = schema["fields"][1]["config"]["fields"].as_array().unwrap();
            assert!(!config.is_empty(), "{}", spec.name);
        }
        let key_auth = plugin_schema("key-auth").unwrap();
        assert_eq!(
            config_field(&key_auth, "key_names"),
            &json!({"type": "array", "required": true, "default": ["apikey"], "elements": {"type": "string"}})
        );
        assert_eq!(config_field(&key_auth, "anonymous"), &json!({"type": "string"}));
        assert_eq!(
            config_field(&key_auth, "hide_credentials"),
            &json!({"type": "boolean", "required": true, "default": false})
        );
        let limits = plugin_schema("rate-limiting").unwrap();
        assert_eq!(config_field(&limits, "minute"), &json!({"type": "number"}));
        assert_eq!(config_field(&limits, "policy")["one_of"], json!(["local", "cluster"]));
        assert_eq!(config_field(&limits, "error_code")["between"], json!([400, 599]));
        let http_log = plugin_schema("http-log").unwrap();
        assert_eq!(config_field(&http_log, "http_endpoint"), &json!({"type": "string", "required": true}));
        assert_eq!(config_field(&http_log, "queue")["type"], "record");
        assert_eq!(config_field(&http_log, "headers")["values"], json!({"type": "string"}));
        let cache = plugin_schema("proxy-cache").unwrap();
        assert_eq!(config_field(&cache, "response_code")["elements"]["between"], json!([100, 900]));
        assert!(plugin_schema("not-present").is_none());
    }

    #[test]
    fn validation_is_a_create_without_the_write() {
        assert!(validate_input(EntityKind::Service, &json!({"host": "example.com"})).is_ok());
        assert!(validate_input(EntityKind::Service, &json!({"url": "http://example.com/x"})).is_ok());
        let error = validate_input(EntityKind::Service, &json!({})).unwrap_err();
        assert_eq!(error.fields["host"], "required field missing");
        let error = validate_input(EntityKind::Plugin, &json!({"name": "key-auth", "config": {"keys": "foo"}}));
        assert_eq!(error.unwrap_err().code, crate::ErrorCode::SchemaViolation);
    }
}
