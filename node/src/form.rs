//! Admin API bodies as Kong's docs send them: `application/x-www-form-urlencoded`
//! (`curl -d name=svc -d url=http://…`) and `multipart/form-data` (`curl -F
//! cert=@cert.pem`), decoded into the JSON the API takes (kong/api/arguments.lua).
//!
//! Keys nest as Kong's do: `config.minute=5` is `{"config": {"minute": 5}}`,
//! `paths[]=/a` appends, `paths[1]=/a` sets an index (from 1), and a repeated key
//! makes an array. Every value arrives as text; like Kong, types come from the schema:
//! an entity's fields from its schema ([`coerce_entity`]), a plugin's `config` from
//! what its typed config asks for ([`tollgate_raft_store::plugins::coerce_text`]).

use serde_json::{Map, Value};
use tollgate_raft_store::schema::FieldType;
use tollgate_raft_store::{ApiError, EntityKind};

use crate::text::percent_decode;

/// Most fields one form body may carry.
pub const FORM_FIELDS_MAX: usize = 4096;
/// Deepest nesting of a form key (`a.b.c…`).
pub const FORM_DEPTH_MAX: usize = 16;
/// Largest index of `key[N]`.
pub const FORM_INDEX_MAX: usize = 1024;

/// An `application/x-www-form-urlencoded` body.
pub fn urlencoded(body: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| body_error("the form body is not UTF-8"))?;
    let pairs: Vec<(String, String)> = text
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name, true), percent_decode(value, true))
        })
        .collect();
    tree(pairs)
}

/// A `multipart/form-data` body with the `boundary` of its content type.
pub fn multipart(body: &[u8], content_type: &str) -> Result<Value, ApiError> {
    let boundary = content_type
        .split(';')
        .filter_map(|part| part.trim().strip_prefix("boundary="))
        .next()
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or_else(|| body_error("multipart/form-data without a boundary"))?;
    let text = String::from_utf8_lossy(body);
    let delimiter = format!("--{boundary}");
    let mut pairs = Vec::new();
    for part in text.split(delimiter.as_str()).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let part = part.strip_prefix("\r\n").unwrap_or(part);
        let Some((head, content)) = part.split_once("\r\n\r\n") else {
            return Err(body_error("a multipart part without headers"));
        };
        let name = head
            .lines()
            .filter(|line| line.to_ascii_lowercase().starts_with("content-disposition:"))
            .flat_map(|line| line.split(';'))
            .filter_map(|param| param.trim().strip_prefix("name="))
            .map(|name| name.trim_matches('"').to_string())
            .next()
            .ok_or_else(|| body_error("a multipart part without a name"))?;
        pairs.push((name, content.strip_suffix("\r\n").unwrap_or(content).to_string()));
    }
    tree(pairs)
}

/// Builds the nested object of `pairs`.
fn tree(pairs: Vec<(String, String)>) -> Result<Value, ApiError> {
    if pairs.len() > FORM_FIELDS_MAX {
        return Err(body_error(&format!("more than {FORM_FIELDS_MAX} form fields")));
    }
    let mut root = Value::Object(Map::new());
    for (key, value) in pairs {
        let path = parse_key(&key)?;
        insert(&mut root, &path, Value::String(value), &key)?;
    }
    Ok(root)
}

enum Step {
    Key(String),
    /// `[N]`, from 1 as in Kong.
    Index(usize),
    /// `[]`: append.
    Append,
}

fn parse_key(key: &str) -> Result<Vec<Step>, ApiError> {
    let mut steps = Vec::new();
    for (n, dotted) in key.split('.').enumerate() {
        let (name, mut rest) = match dotted.find('[') {
            Some(at) => (&dotted[..at], &dotted[at..]),
            None => (dotted, ""),
        };
        if name.is_empty() && (n > 0 || rest.is_empty()) {
            return Err(ApiError::field(key, "an empty name in a form key"));
        }
        if !name.is_empty() {
            steps.push(Step::Key(name.to_string()));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let Some(end) = inner.find(']') else { return Err(ApiError::field(key, "an unclosed [ in a form key")) };
            let index = &inner[..end];
            steps.push(match index {
                "" => Step::Append,
                number => match number.parse::<usize>() {
                    Ok(at) if (1..=FORM_INDEX_MAX).contains(&at) => Step::Index(at),
                    _ => Step::Key(number.to_string()),
                },
            });
            rest = &inner[end + 1..];
        }
    }
    if steps.len() > FORM_DEPTH_MAX {
        return Err(ApiError::field(key, format!("nested deeper than {FORM_DEPTH_MAX}")));
    }
    Ok(steps)
}

fn insert(at: &mut Value, path: &[Step], value: Value, key: &str) -> Result<(), ApiError> {
    let Some((step, rest)) = path.split_first() else {
        // A repeated key makes an array (`paths=/a&paths=/b`).
        match at {
            Value::Null => *at = value,
            Value::Array(items) => items.push(value),
            other => *other = Value::Array(vec![other.take(), value]),
        }
        return Ok(());
    };
    match step {
        Step::Key(name) => {
            if at.is_null() {
                *at = Value::Object(Map::new());
            }
            let Value::Object(object) = at else { return Err(ApiError::field(key, "mixes a value and fields")) };
            insert(object.entry(name.clone()).or_insert(Value::Null), rest, value, key)
        }
        Step::Index(_) | Step::Append => {
            if at.is_null() {
                *at = Value::Array(Vec::new());
            }
            let Value::Array(items) = at else { return Err(ApiError::field(key, "mixes a value and a list")) };
            let index = match step {
                Step::Index(n) => n - 1,
                _ => items.len(),
            };
            if items.len() <= index {
                items.resize(index + 1, Value::Null);
            }
            insert(&mut items[index], rest, value, key)
        }
    }
}

/// Gives an entity's text fields the types its schema says (Kong's form arguments
/// are typed by the schema the same way): integers, booleans, a lone value of a list
/// field as a list, a foreign key's bare id as `{"id": …}`; a plugin's `config`
/// through the plugin's own config.
pub fn coerce_entity(kind: EntityKind, body: &mut Value) {
    let Value::Object(object) = body else { return };
    for field in kind.schema().fields {
        let Some(value) = object.get_mut(field.name) else { continue };
        match (field.ty, &*value) {
            (FieldType::Int { .. }, Value::String(text)) => {
                if let Ok(number) = text.parse::<i64>() {
                    *value = Value::from(number);
                }
            }
            (FieldType::Bool, Value::String(text)) => match text.as_str() {
                "true" => *value = Value::Bool(true),
                "false" => *value = Value::Bool(false),
                _ => {}
            },
            (FieldType::Strings { .. } | FieldType::ForeignIds(_), Value::String(_)) => {
                *value = Value::Array(vec![value.take()]);
            }
            (FieldType::Foreign { .. }, Value::String(_)) => {
                *value = serde_json::json!({ "id": value.take() });
            }
            _ => {}
        }
    }
    if kind == EntityKind::Plugin {
        let name = object.get("name").and_then(Value::as_str).map(str::to_string);
        if let (Some(name), Some(config)) = (name, object.get_mut("config")) {
            tollgate_raft_store::plugins::coerce_text(&name, config);
        }
    }
}

fn body_error(message: &str) -> ApiError {
    ApiError::new(tollgate_raft_store::ErrorCode::BadRequest, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_nest_as_kongs_do() {
        let body =
            b"name=svc&paths%5B%5D=%2Fa&paths%5B%5D=%2Fb&config.minute=5&hosts=a.com&hosts=b.com&m%5B2%5D=y&m%5B1%5D=x";
        assert_eq!(
            urlencoded(body).unwrap(),
            json!({"name": "svc", "paths": ["/a", "/b"], "config": {"minute": "5"}, "hosts": ["a.com", "b.com"], "m": ["x", "y"]})
        );
        assert!(urlencoded(b"a.=1").is_err());
        assert!(urlencoded(b"a[1=1").is_err());
    }

    #[test]
    fn multipart_parts_are_fields() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nsvc\r\n--XyZ\r\nContent-Disposition: form-data; name=\"cert\"; filename=\"c.pem\"\r\nContent-Type: text/plain\r\n\r\n-----BEGIN X-----\nabc\n-----END X-----\n\r\n--XyZ--\r\n";
        let value = multipart(body, "multipart/form-data; boundary=XyZ").unwrap();
        assert_eq!(value, json!({"name": "svc", "cert": "-----BEGIN X-----\nabc\n-----END X-----\n"}));
        assert!(multipart(body, "multipart/form-data").is_err());
    }

    #[test]
    fn schema_types_the_text() {
        let mut route = json!({"paths": "/a", "strip_path": "false", "regex_priority": "3", "service": "1c2a7a3e-0000-4000-8000-000000000000"});
        coerce_entity(EntityKind::Route, &mut route);
        assert_eq!(
            route,
            json!({"paths": ["/a"], "strip_path": false, "regex_priority": 3, "service": {"id": "1c2a7a3e-0000-4000-8000-000000000000"}})
        );
        let mut plugin = json!({"name": "key-auth", "config": {"key_names": "apikey", "hide_credentials": "true"}});
        coerce_entity(EntityKind::Plugin, &mut plugin);
        assert_eq!(plugin["config"], json!({"key_names": ["apikey"], "hide_credentials": true}));
        let mut plugin = json!({"name": "rate-limiting", "config": {"minute": "5", "policy": "local"}});
        coerce_entity(EntityKind::Plugin, &mut plugin);
        assert_eq!(plugin["config"], json!({"minute": 5, "policy": "local"}));
    }
}
