//! request-transformer's and response-transformer's configurations: `name` and
//! `name:value` entries, and request-transformer's `$(…)` templates, checked when the
//! plugin is written.

use serde::{Deserialize, Serialize};

use super::{check_list, fail, Check};

/// One request-transformer operation's lists (`name` or `name:value` entries).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestParts {
    pub body: Vec<String>,
    pub headers: Vec<String>,
    pub querystring: Vec<String>,
}

/// request-transformer's `replace` also takes `uri`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestReplace {
    pub body: Vec<String>,
    pub headers: Vec<String>,
    pub querystring: Vec<String>,
    pub uri: Option<String>,
}

/// request-transformer (priority 801): `replace.uri` and `http_method`, then remove,
/// rename, replace, add, append, in that order, on headers, the body and the query
/// string. Values may hold `$(…)` templates ([`crate::template`]), checked here.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestTransformerConfig {
    pub http_method: Option<String>,
    pub remove: RequestParts,
    pub rename: RequestParts,
    pub replace: RequestReplace,
    pub add: RequestParts,
    pub append: RequestParts,
}

/// Checks `name` / `name:value` entries; `header` when the names are header names.
fn check_pairs(field: &str, items: &[String], with_value: bool, header: bool) -> Result<(), (String, String)> {
    check_list(field, items)?;
    for (position, item) in items.iter().enumerate() {
        let name = if with_value {
            match item.split_once(':') {
                Some((name, _)) => name,
                // Kong's message (its `match = "^[^:]+:.*$"`): spec/03-plugins/
                // 36-request-transformer/03-api_spec.lua:55.
                None => return fail(&format!("{field}[{position}]"), format!("invalid value: {item}")),
            }
        } else {
            item.as_str()
        };
        if name.is_empty() || (header && http::HeaderName::from_bytes(name.as_bytes()).is_err()) {
            return fail(&format!("{field}[{position}]"), format!("invalid name '{name}'"));
        }
    }
    Ok(())
}

/// Kong's split of a `name:value` entry (`^([^:]+):*(.-)$`): the name runs to the
/// first colon, and every colon right after it is skipped. `None` without a colon or
/// a name.
pub fn split_entry(entry: &str) -> Option<(&str, &str)> {
    let (name, value) = entry.split_once(':')?;
    (!name.is_empty()).then_some((name, value.trim_start_matches(':')))
}

/// What the values of one list of `name:value` entries must be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Values {
    /// Body and query values: not empty (Kong's `check_for_value`), templates allowed.
    Text,
    /// Header values: templates allowed, plain ones valid header values.
    Header,
    /// `rename.headers`: the new name, a header name.
    HeaderName,
}

/// Checks the values of `name:value` entries (their names are [`check_pairs`]'s).
fn check_values(field: &str, items: &[String], values: Values) -> Result<(), (String, String)> {
    for (position, item) in items.iter().enumerate() {
        let Some((name, value)) = split_entry(item) else { continue };
        let at = || format!("{field}[{position}]");
        if values == Values::HeaderName {
            if http::HeaderName::from_bytes(value.as_bytes()).is_err() {
                return fail(&at(), format!("'{value}' is not a valid header"));
            }
            continue;
        }
        if values == Values::Text && value.is_empty() {
            return fail(&at(), format!("key '{name}' has no value"));
        }
        let template = crate::template::Template::parse(value).map_err(|error| (at(), error.to_string()))?;
        if values == Values::Header && template.is_plain() && http::HeaderValue::from_str(value).is_err() {
            return fail(&at(), format!("'{value}' is not a valid header value"));
        }
    }
    Ok(())
}

impl Check for RequestTransformerConfig {
    fn check(&self) -> Result<(), (String, String)> {
        if let Some(method) = &self.http_method {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return fail("http_method", "expected an upper-case HTTP method");
            }
        }
        let lists = [
            ("remove", &self.remove.body, &self.remove.headers, &self.remove.querystring, false),
            ("rename", &self.rename.body, &self.rename.headers, &self.rename.querystring, true),
            ("replace", &self.replace.body, &self.replace.headers, &self.replace.querystring, true),
            ("add", &self.add.body, &self.add.headers, &self.add.querystring, true),
            ("append", &self.append.body, &self.append.headers, &self.append.querystring, true),
        ];
        for (operation, body, headers, querystring, with_value) in lists {
            check_pairs(&format!("{operation}.body"), body, with_value, false)?;
            check_pairs(&format!("{operation}.headers"), headers, with_value, true)?;
            check_pairs(&format!("{operation}.querystring"), querystring, with_value, false)?;
            if with_value {
                let header_values = if operation == "rename" { Values::HeaderName } else { Values::Header };
                check_values(&format!("{operation}.body"), body, Values::Text)?;
                check_values(&format!("{operation}.headers"), headers, header_values)?;
                check_values(&format!("{operation}.querystring"), querystring, Values::Text)?;
            }
        }
        if let Some(uri) = &self.replace.uri {
            let template = crate::template::Template::parse(uri)
                .map_err(|error| ("replace.uri".to_string(), error.to_string()))?;
            // Kong's `set_path` refuses a path that does not start with `/` (a request
            // whose rendered path does not is answered 500).
            if !template.leading_text().starts_with('/') && !template.starts_with_expression() {
                return fail("replace.uri", "must start with '/'");
            }
        }
        Ok(())
    }
}

/// One response-transformer operation's lists.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResponseParts {
    pub headers: Vec<String>,
    pub json: Vec<String>,
    pub json_types: Vec<String>,
}

/// response-transformer (priority 800): remove, rename, replace, add, append on the
/// response headers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResponseTransformerConfig {
    pub remove: ResponseParts,
    pub rename: ResponseParts,
    pub replace: ResponseParts,
    pub add: ResponseParts,
    pub append: ResponseParts,
}

impl Check for ResponseTransformerConfig {
    fn check(&self) -> Result<(), (String, String)> {
        let lists = [
            ("remove", &self.remove, false),
            ("rename", &self.rename, true),
            ("replace", &self.replace, true),
            ("add", &self.add, true),
            ("append", &self.append, true),
        ];
        for (operation, parts, with_value) in lists {
            check_pairs(&format!("{operation}.json"), &parts.json, with_value, false)?;
            if let Some(position) =
                parts.json_types.iter().position(|t| !["string", "boolean", "number"].contains(&t.as_str()))
            {
                return fail(
                    &format!("{operation}.json_types[{position}]"),
                    "expected one of: string, boolean, number",
                );
            }
            if !parts.json_types.is_empty() && parts.json_types.len() != parts.json.len() {
                return fail(&format!("{operation}.json_types"), "one type per json entry");
            }
            check_pairs(&format!("{operation}.headers"), &parts.headers, with_value, true)?;
        }
        Ok(())
    }
}
