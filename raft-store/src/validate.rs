//! Validating a write against its entity's schema ([`crate::schema`]): every field
//! checked by its type and rules, defaults filled in, errors named by field. The one
//! place every Admin API and declarative write goes through.

use std::collections::BTreeMap;

use serde_json::Value;
use uuid::Uuid;

use crate::error::ApiError;
use crate::schema::{
    is_grpc_route, split_host_port, target_with_port, EntityKind, FieldType, Object, StrRule, ARRAY_ITEMS_MAX,
    OBJECT_BYTES_MAX, PEM_LEN_MAX, STRING_LEN_MAX,
};

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

/// `value` as an array of at most `max_items` items.
fn bounded_array(value: &Value, max_items: usize) -> Result<&Vec<Value>, String> {
    let items = value.as_array().ok_or("expected an array")?;
    if items.len() > max_items {
        return Err(format!("length must be at most {max_items}"));
    }
    Ok(items)
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
            let items = bounded_array(value, max_items)?;
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
            let items = bounded_array(value, ARRAY_ITEMS_MAX)?;
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
            let items = bounded_array(value, ARRAY_ITEMS_MAX)?;
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::schema::expand_service_url;

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
