//! request-transformer and response-transformer: remove, rename, replace, add and
//! append, in that order (Kong's), on headers and the query string.
//!
//! `remove` drops a name; `rename` moves every value to the new name; `replace` sets
//! a name only if present; `add` sets it only if absent; `append` adds a value
//! whatever is there. Entries are parsed when the snapshot compiles.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use tollgate_raft_store::plugins::{RequestTransformerConfig, ResponseParts, ResponseTransformerConfig};

use super::{Ctx, Env, Flow, Plugin, RequestView};

/// The five operations on one kind of part, compiled.
#[derive(Default)]
struct Operations<N, V> {
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
    entries.iter().map(|entry| split(entry).map(|(name, value)| (name.to_string(), encode(value)))).collect()
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
fn encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
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
        Ok(RequestTransformer { method, uri: config.replace.uri, headers, query })
    }
}

impl Plugin for RequestTransformer {
    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
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
        Ok(ResponseTransformer { headers })
    }
}

impl Plugin for ResponseTransformer {
    fn header_filter(&self, _ctx: &mut Ctx, _status: http::StatusCode, headers: &mut HeaderMap) {
        if !self.headers.is_empty() {
            self.headers.apply(headers);
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
}
