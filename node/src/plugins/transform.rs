//! request-transformer and response-transformer: remove, rename, replace, add and
//! append, in that order (Kong's), on headers, the query string and bodies: the
//! top-level object of an `application/json` body and the fields of an
//! `application/x-www-form-urlencoded` request body, read whole (at most
//! [`super::BODY_FILTER_BYTES_MAX`]). Multipart bodies pass untouched.
//!
//! `remove` drops a name; `rename` moves every value to the new name; `replace` sets
//! a name only if present; `add` sets it only if absent; `append` adds a value
//! whatever is there. Entries are parsed when the snapshot compiles.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::Value;
use tollgate_raft_store::plugins::{RequestTransformerConfig, ResponseParts, ResponseTransformerConfig};

use super::{Ctx, Env, Flow, Phases, Plugin, RequestView};
use crate::text::percent_encode;

/// Operations on the fields of a JSON object or a form body.
pub type JsonOperations = Operations<String, Value>;

impl JsonOperations {
    /// `types`: request-transformer's values are strings; response-transformer's
    /// `json_types` may make them booleans or numbers.
    fn compile_json(parts: [(&[String], &[String]); 5]) -> Result<JsonOperations, String> {
        let typed = |(entries, types): (&[String], &[String])| -> Result<Vec<(String, Value)>, String> {
            entries
                .iter()
                .enumerate()
                .map(|(index, entry)| {
                    let (name, text) = split(entry)?;
                    let value = match types.get(index).map(String::as_str) {
                        Some("boolean") => Value::from(text == "true"),
                        Some("number") => text.parse::<f64>().map(Value::from).map_err(|e| format!("{entry}: {e}"))?,
                        _ => Value::from(text),
                    };
                    Ok((name.to_string(), value))
                })
                .collect()
        };
        let [remove, rename, replace, add, append] = parts;
        Ok(Operations {
            remove: remove.0.to_vec(),
            rename: rename
                .0
                .iter()
                .map(|entry| split(entry).map(|(from, to)| (from.to_string(), to.to_string())))
                .collect::<Result<_, _>>()?,
            replace: typed(replace)?,
            add: typed(add)?,
            append: typed(append)?,
        })
    }

    /// Transforms a JSON body; `None` when it is not a JSON object (left as it is).
    pub fn apply_json(&self, body: &[u8]) -> Option<Vec<u8>> {
        let Value::Object(mut object) = serde_json::from_slice::<Value>(body).ok()? else { return None };
        self.apply_object(&mut object);
        serde_json::to_vec(&Value::Object(object)).ok()
    }

    /// Transforms an `application/x-www-form-urlencoded` body: the same operations on
    /// its fields, a repeated field being a list (`append` repeats a field). `None`
    /// when it is not UTF-8.
    pub fn apply_form(&self, body: &[u8]) -> Option<Vec<u8>> {
        let text = std::str::from_utf8(body).ok()?;
        let mut object = serde_json::Map::new();
        for (name, value) in form_fields(text) {
            match object.get_mut(&name) {
                Some(Value::Array(items)) => items.push(Value::from(value)),
                Some(existing) => *existing = Value::Array(vec![existing.take(), Value::from(value)]),
                None => {
                    object.insert(name, Value::from(value));
                }
            }
        }
        self.apply_object(&mut object);
        let mut out = String::new();
        let mut field = |name: &str, value: &Value| {
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(&percent_encode(name));
            out.push('=');
            match value {
                Value::String(text) => out.push_str(&percent_encode(text)),
                other => out.push_str(&percent_encode(&other.to_string())),
            }
        };
        for (name, value) in &object {
            match value {
                Value::Array(items) => items.iter().for_each(|item| field(name, item)),
                value => field(name, value),
            }
        }
        Some(out.into_bytes())
    }

    fn apply_object(&self, object: &mut serde_json::Map<String, Value>) {
        for name in &self.remove {
            object.remove(name);
        }
        for (from, to) in &self.rename {
            if let Some(value) = object.remove(from) {
                object.insert(to.clone(), value);
            }
        }
        for (name, value) in &self.replace {
            if let Some(slot) = object.get_mut(name) {
                *slot = value.clone();
            }
        }
        for (name, value) in &self.add {
            object.entry(name.clone()).or_insert_with(|| value.clone());
        }
        for (name, value) in &self.append {
            match object.get_mut(name) {
                Some(Value::Array(items)) => items.push(value.clone()),
                Some(existing) => *existing = Value::Array(vec![existing.take(), value.clone()]),
                None => {
                    object.insert(name.clone(), Value::Array(vec![value.clone()]));
                }
            }
        }
    }
}

/// The fields of a form body, percent- and `+`-decoded.
pub fn form_fields(text: &str) -> impl Iterator<Item = (String, String)> + '_ {
    text.split('&').filter(|pair| !pair.is_empty()).map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (crate::text::percent_decode(name, true), crate::text::percent_decode(value, true))
    })
}

/// The body kinds transformers edit.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Form,
}

/// What kind of body a `Content-Type` announces, when it is one transformers edit.
pub fn body_kind(headers: &HeaderMap) -> Option<BodyKind> {
    let media = headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    let media = media.split(';').next().unwrap_or_default().trim();
    if media.eq_ignore_ascii_case("application/json") {
        Some(BodyKind::Json)
    } else if media.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Some(BodyKind::Form)
    } else {
        None
    }
}

/// The five operations on one kind of part, compiled.
#[derive(Default)]
pub struct Operations<N, V> {
    remove: Vec<N>,
    rename: Vec<(N, N)>,
    replace: Vec<(N, V)>,
    add: Vec<(N, V)>,
    append: Vec<(N, V)>,
}

impl<N, V> Operations<N, V> {
    fn is_empty(&self) -> bool {
        self.remove.is_empty()
            && self.rename.is_empty()
            && self.replace.is_empty()
            && self.add.is_empty()
            && self.append.is_empty()
    }
}

type HeaderOperations = Operations<HeaderName, HeaderValue>;
type QueryOperations = Operations<String, String>;

fn split(entry: &str) -> Result<(&str, &str), String> {
    entry.split_once(':').ok_or_else(|| format!("'{entry}' is not name:value"))
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.trim().as_bytes()).map_err(|error| format!("{name}: {error}"))
}

fn header_pairs(entries: &[String]) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    entries
        .iter()
        .map(|entry| {
            let (name, value) = split(entry)?;
            Ok((header_name(name)?, HeaderValue::from_str(value).map_err(|error| error.to_string())?))
        })
        .collect()
}

fn header_renames(entries: &[String]) -> Result<Vec<(HeaderName, HeaderName)>, String> {
    entries.iter().map(|entry| split(entry).and_then(|(from, to)| Ok((header_name(from)?, header_name(to)?)))).collect()
}

impl HeaderOperations {
    fn compile(
        remove: &[String],
        rename: &[String],
        replace: &[String],
        add: &[String],
        append: &[String],
    ) -> Result<HeaderOperations, String> {
        Ok(Operations {
            remove: remove.iter().map(|name| header_name(name)).collect::<Result<_, _>>()?,
            rename: header_renames(rename)?,
            replace: header_pairs(replace)?,
            add: header_pairs(add)?,
            append: header_pairs(append)?,
        })
    }

    fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (from, to) in &self.rename {
            if let http::header::Entry::Occupied(entry) = headers.entry(from) {
                let (_, values) = entry.remove_entry_mult();
                let values: Vec<HeaderValue> = values.collect();
                for value in values {
                    headers.append(to, value);
                }
            }
        }
        for (name, value) in &self.replace {
            if headers.contains_key(name) {
                headers.insert(name, value.clone());
            }
        }
        for (name, value) in &self.add {
            if !headers.contains_key(name) {
                headers.insert(name, value.clone());
            }
        }
        for (name, value) in &self.append {
            headers.append(name, value.clone());
        }
    }
}

fn query_pairs(entries: &[String]) -> Result<Vec<(String, String)>, String> {
    entries.iter().map(|entry| split(entry).map(|(name, value)| (name.to_string(), percent_encode(value)))).collect()
}

impl QueryOperations {
    fn compile(parts: [&[String]; 5]) -> Result<QueryOperations, String> {
        let [remove, rename, replace, add, append] = parts;
        Ok(Operations {
            remove: remove.to_vec(),
            rename: rename
                .iter()
                .map(|entry| split(entry).map(|(from, to)| (from.to_string(), to.to_string())))
                .collect::<Result<_, _>>()?,
            replace: query_pairs(replace)?,
            add: query_pairs(add)?,
            append: query_pairs(append)?,
        })
    }

    /// The query string after the operations (`None` when nothing is left).
    fn apply(&self, query: Option<&str>) -> Option<String> {
        let mut pairs: Vec<(String, String)> = query
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (name.to_string(), value.to_string())
            })
            .collect();
        pairs.retain(|(name, _)| !self.remove.contains(name));
        for (from, to) in &self.rename {
            for pair in pairs.iter_mut().filter(|(name, _)| name == from) {
                pair.0 = to.clone();
            }
        }
        for (name, value) in &self.replace {
            for pair in pairs.iter_mut().filter(|(existing, _)| existing == name) {
                pair.1 = value.clone();
            }
        }
        for (name, value) in &self.add {
            if !pairs.iter().any(|(existing, _)| existing == name) {
                pairs.push((name.clone(), value.clone()));
            }
        }
        for (name, value) in &self.append {
            pairs.push((name.clone(), value.clone()));
        }
        let joined: Vec<String> = pairs
            .iter()
            .map(|(name, value)| if value.is_empty() { name.clone() } else { format!("{name}={value}") })
            .collect();
        (!joined.is_empty()).then(|| joined.join("&"))
    }
}

pub struct RequestTransformer {
    method: Option<Method>,
    uri: Option<String>,
    headers: HeaderOperations,
    query: QueryOperations,
    body: JsonOperations,
}

impl RequestTransformer {
    pub fn new(config: RequestTransformerConfig) -> Result<RequestTransformer, String> {
        let method = config
            .http_method
            .as_deref()
            .map(|m| Method::from_bytes(m.as_bytes()))
            .transpose()
            .map_err(|e| e.to_string())?;
        let headers = HeaderOperations::compile(
            &config.remove.headers,
            &config.rename.headers,
            &config.replace.headers,
            &config.add.headers,
            &config.append.headers,
        )?;
        let query = QueryOperations::compile([
            &config.remove.querystring,
            &config.rename.querystring,
            &config.replace.querystring,
            &config.add.querystring,
            &config.append.querystring,
        ])?;
        let no_types: &[String] = &[];
        let body = JsonOperations::compile_json([
            (&config.remove.body, no_types),
            (&config.rename.body, no_types),
            (&config.replace.body, no_types),
            (&config.add.body, no_types),
            (&config.append.body, no_types),
        ])?;
        Ok(RequestTransformer { method, uri: config.replace.uri, headers, query, body })
    }
}

impl Plugin for RequestTransformer {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        // Body operations need the body whole: ask for it first, then edit it before
        // the headers change (they may rename Content-Type).
        if let Some(kind) = body_kind(request.headers).filter(|_| !self.body.is_empty()) {
            let Some(body) = &ctx.request_body else { return Flow::ReadBody };
            let edited = match kind {
                BodyKind::Json => self.body.apply_json(body),
                BodyKind::Form => self.body.apply_form(body),
            };
            if let Some(edited) = edited {
                ctx.request_body = Some(bytes::Bytes::from(edited));
            }
        }
        self.headers.apply(request.headers);
        if !self.query.is_empty() {
            let current = ctx.upstream_query.clone();
            ctx.upstream_query = Some(self.query.apply(current.as_deref().or(request.query)).unwrap_or_default());
        }
        if let Some(method) = &self.method {
            ctx.upstream_method = Some(method.clone());
        }
        if let Some(uri) = &self.uri {
            ctx.upstream_path = Some(uri.clone());
        }
        Flow::Continue
    }
}

pub struct ResponseTransformer {
    headers: HeaderOperations,
    json: JsonOperations,
}

impl ResponseTransformer {
    pub fn new(config: ResponseTransformerConfig) -> Result<ResponseTransformer, String> {
        let parts = |parts: &ResponseParts| parts.headers.clone();
        let headers = HeaderOperations::compile(
            &parts(&config.remove),
            &parts(&config.rename),
            &parts(&config.replace),
            &parts(&config.add),
            &parts(&config.append),
        )?;
        fn json(parts: &ResponseParts) -> (&[String], &[String]) {
            (parts.json.as_slice(), parts.json_types.as_slice())
        }
        let json = JsonOperations::compile_json([
            json(&config.remove),
            json(&config.rename),
            json(&config.replace),
            json(&config.add),
            json(&config.append),
        ])?;
        Ok(ResponseTransformer { headers, json })
    }
}

impl Plugin for ResponseTransformer {
    fn phases(&self) -> Phases {
        Phases { rewrite: false, header_filter: !self.headers.is_empty(), response_body: !self.json.is_empty() }
    }

    fn header_filter(&self, _ctx: &mut Ctx, _status: http::StatusCode, headers: &mut HeaderMap) {
        if !self.headers.is_empty() {
            self.headers.apply(headers);
        }
    }

    /// Kong's rule: the JSON operations apply to responses whose `Content-Type`
    /// (after the header operations) is JSON.
    fn wants_body(&self, _ctx: &Ctx, _status: http::StatusCode, headers: &HeaderMap) -> bool {
        !self.json.is_empty() && body_kind(headers) == Some(BodyKind::Json)
    }

    fn body_filter(&self, _ctx: &mut Ctx, _headers: &HeaderMap, body: &mut bytes::Bytes) {
        if let Some(edited) = self.json.apply_json(body) {
            *body = bytes::Bytes::from(edited);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_operations_run_in_kongs_order() {
        let strings = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let operations = QueryOperations::compile([
            &strings(&["drop"]),
            &strings(&["old:new"]),
            &strings(&["keep:changed", "absent:never"]),
            &strings(&["keep:not-added", "extra:a b"]),
            &strings(&["list:2"]),
        ])
        .unwrap();
        let query = operations.apply(Some("drop=1&old=x&keep=y&list=1")).unwrap();
        assert_eq!(query, "new=x&keep=changed&list=1&extra=a%20b&list=2");
        assert_eq!(Operations::<String, String>::default().apply(None), None);
    }

    #[test]
    fn json_operations_run_in_kongs_order_with_types() {
        let strings = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (remove, rename, replace, add, append) = (
            strings(&["secret"]),
            strings(&["old:new"]),
            strings(&["n:7"]),
            strings(&["flag:true", "n:1"]),
            strings(&["list:c"]),
        );
        let types = strings(&["number"]);
        let add_types = strings(&["boolean", "number"]);
        let none: Vec<String> = Vec::new();
        let operations = JsonOperations::compile_json([
            (&remove, &none),
            (&rename, &none),
            (&replace, &types),
            (&add, &add_types),
            (&append, &none),
        ])
        .unwrap();
        let body = br#"{"secret":"x","old":1,"n":"2","list":["a","b"]}"#;
        let out: Value = serde_json::from_slice(&operations.apply_json(body).unwrap()).unwrap();
        assert_eq!(out, serde_json::json!({"new": 1, "n": 7.0, "flag": true, "list": ["a", "b", "c"]}));
        assert_eq!(operations.apply_json(b"[1,2]"), None, "only objects are transformed");
    }
}
