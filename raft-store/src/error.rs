//! The error shape of the Admin API, shared by the state machine (which decides most of
//! them), the node (which renders them) and the client (which parses them).
//!
//! The codes and names are Kong's (`kong/db/errors.lua`), so that tooling written against
//! Kong's Admin API recognises them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Kong's error codes. Only the ones Tollgate produces are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    SchemaViolation,
    PrimaryKeyViolation,
    ForeignKeyViolation,
    UniqueViolation,
    NotFound,
    InvalidOffset,
    InvalidSize,
    DeclarativeConfig,
    /// Tollgate's own: the cluster could not take the write (no leader, no quorum).
    Unavailable,
    /// Tollgate's own: the request itself is malformed (not JSON, too large).
    BadRequest,
    /// Tollgate's own: missing or wrong admin token.
    Unauthorized,
    /// Tollgate's own: an internal failure (storage, encoding).
    Internal,
    /// Tollgate's own: the path exists but not with this method.
    MethodNotAllowed,
    /// A list option that is not valid (`?tags=`). Last: variants are numbered in
    /// encoded Raft entries.
    InvalidOptions,
    /// Kong's `{"message": "Cannot parse JSON body"}` (400): the body is the message alone.
    CannotParseBody,
    /// Kong's 415 for a body that is not JSON, a form or YAML: the message alone.
    UnsupportedMediaType,
}

impl ErrorCode {
    /// Kong's numeric code, or Tollgate's own above 100.
    pub fn number(self) -> u32 {
        match self {
            ErrorCode::SchemaViolation => 2,
            ErrorCode::PrimaryKeyViolation => 3,
            ErrorCode::ForeignKeyViolation => 4,
            ErrorCode::UniqueViolation => 5,
            ErrorCode::NotFound => 6,
            ErrorCode::InvalidOffset => 7,
            ErrorCode::InvalidSize => 9,
            ErrorCode::DeclarativeConfig => 14,
            ErrorCode::BadRequest => 101,
            ErrorCode::Unavailable => 102,
            ErrorCode::Unauthorized => 103,
            ErrorCode::Internal => 104,
            ErrorCode::MethodNotAllowed => 105,
            ErrorCode::InvalidOptions => 11,
            ErrorCode::CannotParseBody => 106,
            ErrorCode::UnsupportedMediaType => 107,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::SchemaViolation => "schema violation",
            ErrorCode::PrimaryKeyViolation => "primary key violation",
            ErrorCode::ForeignKeyViolation => "foreign key violation",
            ErrorCode::UniqueViolation => "unique constraint violation",
            ErrorCode::NotFound => "not found",
            ErrorCode::InvalidOffset => "invalid offset",
            ErrorCode::InvalidSize => "invalid size",
            ErrorCode::DeclarativeConfig => "invalid declarative configuration",
            ErrorCode::BadRequest => "bad request",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Internal => "internal error",
            ErrorCode::MethodNotAllowed => "method not allowed",
            ErrorCode::InvalidOptions => "invalid options",
            ErrorCode::CannotParseBody => "cannot parse body",
            ErrorCode::UnsupportedMediaType => "unsupported media type",
        }
    }

    /// The HTTP status the Admin API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NotFound => 404,
            ErrorCode::PrimaryKeyViolation | ErrorCode::UniqueViolation => 409,
            ErrorCode::Unavailable => 503,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Internal => 500,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::UnsupportedMediaType => 415,
            _ => 400,
        }
    }
}

/// An Admin API error: `{code, name, message, fields}`.
///
/// `fields` maps a field name to what is wrong with it; nested objects (a plugin's
/// `config`, a declarative document's path) nest the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub fields: BTreeMap<String, String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into(), fields: BTreeMap::new() }
    }

    /// A schema violation naming the fields; the message lists them as Kong does
    /// (`kong/db/errors.lua`): entity-level checks first, then each field by its path
    /// with Lua's 1-based positions (`paths.2: …`).
    pub fn schema(fields: BTreeMap<String, String>) -> ApiError {
        debug_assert!(!fields.is_empty(), "a schema violation names at least one field");
        let entity = fields.iter().filter(|(name, _)| is_entity_key(name)).map(|(_, why)| why.clone());
        let named = fields
            .iter()
            .filter(|(name, _)| !is_entity_key(name))
            .map(|(name, why)| format!("{}: {why}", message_path(name)));
        let listed: Vec<String> = entity.chain(named).collect();
        let message = if listed.len() == 1 {
            format!("schema violation ({})", listed[0])
        } else {
            format!("{} schema violations ({})", listed.len(), listed.join("; "))
        };
        ApiError { code: ErrorCode::SchemaViolation, message, fields }
    }

    pub fn field(name: impl Into<String>, why: impl Into<String>) -> ApiError {
        let mut fields = BTreeMap::new();
        fields.insert(name.into(), why.into());
        ApiError::schema(fields)
    }

    /// Kong's `invalid option (field: why)`.
    pub fn invalid_option(name: &str, why: &str) -> ApiError {
        let mut error = ApiError::new(ErrorCode::InvalidOptions, format!("invalid option ({name}: {why})"));
        error.fields.insert(name.to_string(), why.to_string());
        error
    }

    pub fn not_found() -> ApiError {
        ApiError::new(ErrorCode::NotFound, "Not found")
    }

    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }

    /// The JSON body the Admin API sends.
    pub fn to_json(&self) -> serde_json::Value {
        if matches!(
            self.code,
            ErrorCode::CannotParseBody | ErrorCode::UnsupportedMediaType | ErrorCode::MethodNotAllowed
        ) {
            return serde_json::json!({ "message": self.message });
        }
        let mut body = serde_json::json!({
            "code": self.code.number(),
            "name": self.code.name(),
            "message": self.message,
        });
        if !self.fields.is_empty() {
            body["fields"] = nest_fields(&self.fields);
        }
        body
    }

    /// Parses an Admin API error body (the inverse of [`ApiError::to_json`]).
    pub fn from_json(body: &serde_json::Value) -> Option<ApiError> {
        let number = body.get("code")?.as_u64()?;
        let code = ALL_CODES.iter().copied().find(|c| u64::from(c.number()) == number)?;
        let message = body.get("message").and_then(|m| m.as_str()).unwrap_or_default().to_string();
        let mut fields = BTreeMap::new();
        if let Some(nested) = body.get("fields") {
            flatten_fields(nested, String::new(), &mut fields);
        }
        Some(ApiError { code, message, fields })
    }
}

/// `@entity` names the entity as a whole (Kong's entity checks); `@entity[1]` a second
/// such error.
fn is_entity_key(name: &str) -> bool {
    name == "@entity" || name.starts_with("@entity[")
}

/// A flat field path (`services[1].routes[0].paths`) as Kong's message writes it: dots
/// and Lua's 1-based positions (`services.2.routes.1.paths`).
fn message_path(name: &str) -> String {
    path_segments(name)
        .iter()
        .map(|segment| match segment {
            Segment::Key(key) => (*key).to_string(),
            Segment::Index(index) => (index + 1).to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// Splits `config.add.headers[0]` into `config`, `add`, `headers`, 0.
fn path_segments(name: &str) -> Vec<Segment<'_>> {
    let mut segments = Vec::new();
    for part in name.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(key, rest)| (key, rest));
        if !key.is_empty() {
            segments.push(Segment::Key(key));
        }
        while let Some((index, after)) = rest.split_once(']') {
            match index.parse::<usize>() {
                Ok(index) => segments.push(Segment::Index(index)),
                Err(_) => segments.push(Segment::Key(index)),
            }
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    segments
}

/// Largest position an error path may name in an array: a path from the network never
/// makes the answer large (positions come from the entity's own arrays, bounded too).
const NESTED_INDEX_MAX: usize = 10_000;

/// Kong's `fields` shape: flat paths nested as objects and arrays (`{"config": {"add":
/// {"headers": ["…"]}}}`, `{"paths": [null, "…"]}`), entity checks as an `@entity`
/// array.
fn nest_fields(fields: &BTreeMap<String, String>) -> serde_json::Value {
    use serde_json::Value;
    let mut root = Value::Object(serde_json::Map::new());
    for (name, why) in fields {
        if is_entity_key(name) {
            let list = root.as_object_mut().map(|o| o.entry("@entity").or_insert_with(|| Value::Array(Vec::new())));
            if let Some(Value::Array(list)) = list {
                list.push(Value::from(why.clone()));
            }
            continue;
        }
        let mut node = &mut root;
        let segments = path_segments(name);
        for (position, segment) in segments.iter().enumerate() {
            let last = position + 1 == segments.len();
            let child = match (segment, &mut *node) {
                (Segment::Key(key), Value::Object(object)) => object.entry(key.to_string()).or_insert(Value::Null),
                (Segment::Index(index), Value::Array(array)) if *index < NESTED_INDEX_MAX => {
                    if array.len() <= *index {
                        array.resize(index + 1, Value::Null);
                    }
                    &mut array[*index]
                }
                // A path that clashes with one already written (a message where a
                // record was expected): the first one stays.
                _ => break,
            };
            if last {
                if child.is_null() {
                    *child = Value::from(why.clone());
                }
            } else if child.is_null() {
                *child = match segments[position + 1] {
                    Segment::Key(_) => Value::Object(serde_json::Map::new()),
                    Segment::Index(_) => Value::Array(Vec::new()),
                };
            }
            node = child;
        }
    }
    root
}

/// The inverse of [`nest_fields`]: every message under its flat path.
fn flatten_fields(value: &serde_json::Value, path: String, out: &mut BTreeMap<String, String>) {
    use serde_json::Value;
    match value {
        Value::Object(object) => {
            for (key, child) in object {
                let child_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                if key == "@entity" && path.is_empty() {
                    if let Value::Array(messages) = child {
                        for (index, message) in messages.iter().enumerate() {
                            let name = if index == 0 { "@entity".to_string() } else { format!("@entity[{index}]") };
                            out.insert(
                                name,
                                message.as_str().map(str::to_string).unwrap_or_else(|| message.to_string()),
                            );
                        }
                        continue;
                    }
                }
                flatten_fields(child, child_path, out);
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                if !item.is_null() {
                    flatten_fields(item, format!("{path}[{index}]"), out);
                }
            }
        }
        Value::Null => {}
        Value::String(text) => {
            out.insert(path, text.clone());
        }
        other => {
            out.insert(path, other.to_string());
        }
    }
}

const ALL_CODES: [ErrorCode; 16] = [
    ErrorCode::SchemaViolation,
    ErrorCode::PrimaryKeyViolation,
    ErrorCode::ForeignKeyViolation,
    ErrorCode::UniqueViolation,
    ErrorCode::NotFound,
    ErrorCode::InvalidOffset,
    ErrorCode::InvalidSize,
    ErrorCode::DeclarativeConfig,
    ErrorCode::BadRequest,
    ErrorCode::Unavailable,
    ErrorCode::Unauthorized,
    ErrorCode::Internal,
    ErrorCode::MethodNotAllowed,
    ErrorCode::InvalidOptions,
    ErrorCode::CannotParseBody,
    ErrorCode::UnsupportedMediaType,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_round_trips() {
        let error = ApiError::field("host", "required field missing");
        let parsed = ApiError::from_json(&error.to_json()).expect("parses");
        assert_eq!(parsed, error);
        assert_eq!(error.to_json()["message"], "schema violation (host: required field missing)");
        assert_eq!(error.http_status(), 400);
    }

    /// Kong's shapes: spec/02-integration/04-admin_api/09-routes_routes_spec.lua:354
    /// (an array element), spec/03-plugins/36-request-transformer/03-api_spec.lua:55 (a
    /// nested plugin config), 03-consumers_routes_spec.lua:573 (`@entity` a list).
    #[test]
    fn fields_nest_as_kong_writes_them() {
        let mut fields = BTreeMap::new();
        fields.insert("protocols[0]".to_string(), "expected one of: http, https".to_string());
        fields.insert("paths[1]".to_string(), "should start with: /".to_string());
        fields.insert("config.add.headers[0]".to_string(), "invalid value: just_a_key".to_string());
        fields.insert("@entity".to_string(), "at least one of these fields must be non-empty".to_string());
        let error = ApiError::schema(fields);
        let body = error.to_json();
        assert_eq!(body["fields"]["protocols"], serde_json::json!(["expected one of: http, https"]));
        assert_eq!(body["fields"]["paths"], serde_json::json!([null, "should start with: /"]));
        assert_eq!(body["fields"]["config"]["add"]["headers"], serde_json::json!(["invalid value: just_a_key"]));
        assert_eq!(body["fields"]["@entity"], serde_json::json!(["at least one of these fields must be non-empty"]));
        assert_eq!(
            body["message"],
            "4 schema violations (at least one of these fields must be non-empty; config.add.headers.1: invalid \
             value: just_a_key; paths.2: should start with: /; protocols.1: expected one of: http, https)"
        );
        assert_eq!(ApiError::from_json(&body).expect("parses"), error);
    }

    #[test]
    fn huge_positions_are_not_materialised() {
        let error = ApiError::field("paths[99999999999]", "bad");
        assert!(error.to_json()["fields"].to_string().len() < 20, "{}", error.to_json());
    }
}
