//! request-transformer and response-transformer: remove, rename, replace, add and
//! append, in that order (Kong's), on headers, the query string and bodies: the
//! top-level object of an `application/json` body and the fields of an
//! `application/x-www-form-urlencoded` request body, read whole (at most
//! [`super::BODY_FILTER_BYTES_MAX`]). Multipart bodies pass untouched.
//!
//! `remove` drops a name; `rename` moves its values to the new name (replacing what
//! was there); `replace` sets a name only if present; `add` sets it only if absent;
//! `append` adds a value whatever is there. Entries are `name:value`, split as Kong
//! splits them (every colon after the name's is skipped), and parsed when the
//! snapshot compiles.
//!
//! request-transformer runs Kong's steps in Kong's order (`access.lua`): `replace.uri`,
//! `http_method` (to GET, HEAD or TRACE, a form body's fields join the query), the
//! headers, the body (its kind read from `Content-Type` after the header step, so a
//! `Content-Type` the plugin adds decides it), then the query string. Its values may
//! be `$(…)` templates ([`tollgate_raft_store::template`]) over the request as the
//! plugin received it: the headers before its header step, the query after the
//! method step, and the regex path's captures. A part without templates is compiled
//! once; one with templates is rendered per request, before anything changes.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use serde_json::Value;
use tollgate_raft_store::plugins::{split_entry, RequestTransformerConfig, ResponseParts, ResponseTransformerConfig};
use tollgate_raft_store::template::{Key, Lookup, NoValues, Source, Template};

use super::{Ctx, Env, Exit, Flow, Phases, Plugin, RequestView};
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

    /// request-transformer's body operations: every value a string.
    fn build_strings(entries: &Entries, values: &dyn Lookup) -> Result<JsonOperations, String> {
        let strings = |list: &[(String, Text)]| -> Vec<(String, Value)> {
            list.iter().map(|(name, text)| (name.clone(), Value::from(text.render(values).into_owned()))).collect()
        };
        Ok(Operations {
            remove: entries.remove.clone(),
            rename: entries.rename.iter().map(|(from, to)| (from.clone(), to.render(values).into_owned())).collect(),
            replace: strings(&entries.replace),
            add: strings(&entries.add),
            append: strings(&entries.append),
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
            // A template may render the new name empty: nothing to rename to.
            if from == to || to.is_empty() {
                continue;
            }
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Default)]
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
    split_entry(entry).ok_or_else(|| format!("'{entry}' is not name:value"))
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.trim().as_bytes()).map_err(|error| format!("{name}: {error}"))
}

/// A configured value: as written, or a template rendered per request.
enum Text {
    Plain(String),
    Template(Template),
}

impl Text {
    fn parse(value: &str, templates: bool) -> Result<Text, String> {
        if !templates {
            return Ok(Text::Plain(value.to_string()));
        }
        let template = Template::parse(value).map_err(|error| error.to_string())?;
        Ok(if template.is_plain() { Text::Plain(value.to_string()) } else { Text::Template(template) })
    }

    fn render(&self, values: &dyn Lookup) -> Cow<'_, str> {
        match self {
            Text::Plain(text) => Cow::Borrowed(text),
            Text::Template(template) => Cow::Owned(template.render(values)),
        }
    }

    fn reads(&self, source: Source) -> bool {
        matches!(self, Text::Template(template) if template.reads(source))
    }
}

/// One part's entries as configured: names, and values that may be templates. An
/// entry with an empty value does nothing (Kong's `iter` gives it no value).
#[derive(Default)]
struct Entries {
    remove: Vec<String>,
    rename: Vec<(String, Text)>,
    replace: Vec<(String, Text)>,
    add: Vec<(String, Text)>,
    append: Vec<(String, Text)>,
}

impl Entries {
    /// `templates`: values may be `$(…)` templates (request-transformer's).
    fn parse(parts: [&[String]; 5], templates: bool) -> Result<Entries, String> {
        let [remove, rename, replace, add, append] = parts;
        let pairs = |entries: &[String]| -> Result<Vec<(String, Text)>, String> {
            let mut pairs = Vec::with_capacity(entries.len());
            for entry in entries {
                let (name, value) = split(entry)?;
                if !value.is_empty() {
                    pairs.push((name.to_string(), Text::parse(value, templates)?));
                }
            }
            Ok(pairs)
        };
        Ok(Entries {
            remove: remove.to_vec(),
            rename: pairs(rename)?,
            replace: pairs(replace)?,
            add: pairs(add)?,
            append: pairs(append)?,
        })
    }

    fn values(&self) -> impl Iterator<Item = &Text> {
        [&self.rename, &self.replace, &self.add, &self.append].into_iter().flatten().map(|(_, text)| text)
    }

    fn is_fixed(&self) -> bool {
        self.values().all(|text| matches!(text, Text::Plain(_)))
    }

    fn reads(&self, source: Source) -> bool {
        self.values().any(|text| text.reads(source))
    }
}

/// One part's operations: compiled once when no value is a template, otherwise
/// built per request from the rendered values.
enum Part<T> {
    Fixed(T),
    Templated(Entries),
}

type Build<T> = fn(&Entries, &dyn Lookup) -> Result<T, String>;

impl<T: Clone> Part<T> {
    fn new(entries: Entries, build: Build<T>) -> Result<Part<T>, String> {
        // Built once either way, so that what cannot be built is refused when the
        // snapshot compiles.
        let fixed = build(&entries, &NoValues)?;
        Ok(if entries.is_fixed() { Part::Fixed(fixed) } else { Part::Templated(entries) })
    }

    fn resolve(&self, values: &dyn Lookup, build: Build<T>) -> Result<Cow<'_, T>, String> {
        match self {
            Part::Fixed(operations) => Ok(Cow::Borrowed(operations)),
            Part::Templated(entries) => build(entries, values).map(Cow::Owned),
        }
    }

    fn reads(&self, source: Source) -> bool {
        matches!(self, Part::Templated(entries) if entries.reads(source))
    }
}

impl HeaderOperations {
    fn compile(
        remove: &[String],
        rename: &[String],
        replace: &[String],
        add: &[String],
        append: &[String],
    ) -> Result<HeaderOperations, String> {
        HeaderOperations::build(&Entries::parse([remove, rename, replace, add, append], false)?, &NoValues)
    }

    /// A rendered value that is empty is nginx's empty header: `replace` removes the
    /// header, `add` and `append` add nothing (ngx_http_lua's `set_header` with "").
    fn build(entries: &Entries, values: &dyn Lookup) -> Result<HeaderOperations, String> {
        let pairs = |list: &[(String, Text)]| -> Result<Vec<(HeaderName, HeaderValue)>, String> {
            list.iter()
                .map(|(name, text)| {
                    let value = text.render(values);
                    let value = HeaderValue::from_bytes(value.as_bytes())
                        .map_err(|_| format!("{name}: '{}' is not a valid header value", value.escape_debug()))?;
                    Ok((header_name(name)?, value))
                })
                .collect()
        };
        Ok(Operations {
            remove: entries.remove.iter().map(|name| header_name(name)).collect::<Result<_, _>>()?,
            rename: entries
                .rename
                .iter()
                .map(|(from, to)| Ok((header_name(from)?, header_name(&to.render(values))?)))
                .collect::<Result<_, String>>()?,
            replace: pairs(&entries.replace)?,
            add: pairs(&entries.add)?,
            append: pairs(&entries.append)?,
        })
    }

    /// Whether an operation names `name`.
    fn touches(&self, name: &HeaderName) -> bool {
        self.remove.contains(name)
            || self.rename.iter().any(|(from, to)| from == name || to == name)
            || [&self.replace, &self.add, &self.append].into_iter().flatten().any(|(n, _)| n == name)
    }

    fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (from, to) in &self.rename {
            if from == to {
                continue;
            }
            if let http::header::Entry::Occupied(entry) = headers.entry(from) {
                let (_, values) = entry.remove_entry_mult();
                let values: Vec<HeaderValue> = values.collect();
                // Kong's: the new name takes the old one's values, and only them.
                headers.remove(to);
                for value in values {
                    headers.append(to, value);
                }
            }
        }
        for (name, value) in &self.replace {
            if headers.contains_key(name) {
                if value.is_empty() {
                    headers.remove(name);
                } else {
                    headers.insert(name, value.clone());
                }
            }
        }
        for (name, value) in &self.add {
            if !value.is_empty() && !headers.contains_key(name) {
                headers.insert(name, value.clone());
            }
        }
        for (name, value) in &self.append {
            if !value.is_empty() {
                headers.append(name, value.clone());
            }
        }
    }
}

impl QueryOperations {
    /// Names and values as configured (decoded); encoded when the query is written.
    fn build(entries: &Entries, values: &dyn Lookup) -> Result<QueryOperations, String> {
        let pairs = |list: &[(String, Text)]| -> Vec<(String, String)> {
            list.iter().map(|(name, text)| (name.clone(), text.render(values).into_owned())).collect()
        };
        Ok(Operations {
            remove: entries.remove.clone(),
            rename: entries.rename.iter().map(|(from, to)| (from.clone(), to.render(values).into_owned())).collect(),
            replace: pairs(&entries.replace),
            add: pairs(&entries.add),
            append: pairs(&entries.append),
        })
    }

    /// The query string after the operations (`None` when nothing is left). Arguments
    /// are matched by their decoded names; those the operations leave alone keep their
    /// spelling, new ones are percent-encoded. As in Kong (one value per name in a
    /// Lua table), `rename` replaces what the new name had and `replace` leaves one
    /// value.
    fn apply(&self, query: Option<&str>) -> Option<String> {
        fn encoded(name: &str, value: &str) -> String {
            format!("{}={}", percent_encode(name), percent_encode(value))
        }
        // (decoded name, the argument as it is written)
        let mut pairs: Vec<(String, String)> = query
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let name = pair.split_once('=').map_or(pair, |(name, _)| name);
                (crate::text::percent_decode(name, true), pair.to_string())
            })
            .collect();
        pairs.retain(|(name, _)| !self.remove.contains(name));
        for (from, to) in &self.rename {
            if from == to || to.is_empty() || !pairs.iter().any(|(name, _)| name == from) {
                continue;
            }
            pairs.retain(|(name, _)| name != to);
            for pair in pairs.iter_mut().filter(|(name, _)| name == from) {
                let value = pair.1.split_once('=').map(|(_, value)| value);
                pair.0 = to.clone();
                pair.1 = match value {
                    Some(value) => format!("{}={value}", percent_encode(to)),
                    None => percent_encode(to),
                };
            }
        }
        for (name, value) in &self.replace {
            let Some(first) = pairs.iter().position(|(existing, _)| existing == name) else { continue };
            pairs[first].1 = encoded(name, value);
            let mut position = 0;
            pairs.retain(|(existing, _)| {
                position += 1;
                position - 1 <= first || existing != name
            });
        }
        for (name, value) in &self.add {
            if !pairs.iter().any(|(existing, _)| existing == name) {
                pairs.push((name.clone(), encoded(name, value)));
            }
        }
        for (name, value) in &self.append {
            pairs.push((name.clone(), encoded(name, value)));
        }
        let joined: Vec<&str> = pairs.iter().map(|(_, pair)| pair.as_str()).collect();
        (!joined.is_empty()).then(|| joined.join("&"))
    }
}

/// Kong's `transform_method`: to GET, HEAD or TRACE, the fields of a form body join
/// the query (after the arguments already there).
fn merge_form_into_query(query: Option<&str>, body: &[u8]) -> Option<String> {
    let mut merged = query.unwrap_or_default().to_string();
    for (name, value) in form_fields(&String::from_utf8_lossy(body)) {
        if !merged.is_empty() {
            merged.push('&');
        }
        merged.push_str(&percent_encode(&name));
        merged.push('=');
        merged.push_str(&percent_encode(&value));
    }
    (!merged.is_empty()).then_some(merged)
}

/// Kong's `set_path` escaping (kong/tools/uri.lua's `escape`): bytes outside the
/// reserved and unreserved sets, and `%`, are percent-encoded. `#` is encoded too:
/// sent raw it would end the request target.
fn escape_path(path: &str) -> Cow<'_, str> {
    let keep = |byte: u8| byte.is_ascii_alphanumeric() || b"!$&'()*+,/:;=?@[]-_.~%".contains(&byte);
    if path.bytes().all(keep) {
        return Cow::Borrowed(path);
    }
    let mut escaped = String::with_capacity(path.len() + 8);
    for byte in path.bytes() {
        if keep(byte) {
            escaped.push(byte as char);
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    Cow::Owned(escaped)
}

/// Kong's path normalisation decodes every escape but those of reserved characters;
/// Tollgate's keeps all but the unreserved ones encoded. A capture is decoded to
/// Kong's spelling before a template uses it.
fn kong_decoded(text: &str) -> Cow<'_, str> {
    if !text.contains('%') {
        return Cow::Borrowed(text);
    }
    const RESERVED: &[u8] = b"!*'();:@&=+$,/?%#[]";
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut position = 0;
    while position < bytes.len() {
        let byte = bytes[position];
        if byte == b'%' {
            let hex = text.get(position + 1..position + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok());
            if let Some(value) = hex.filter(|value| !RESERVED.contains(value)) {
                decoded.push(value);
                position += 3;
                continue;
            }
        }
        decoded.push(byte);
        position += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&decoded).into_owned())
}

/// What request-transformer's templates read, for one request: the headers as the
/// plugin received them, the query after the method step, the regex path's groups.
/// A name given more than once renders as its values joined with `, ` (Kong renders
/// a Lua table there: `table: 0x…`).
struct Sources<'r> {
    headers: &'r HeaderMap,
    /// Decoded names and values; `None` for an argument without `=` (Lua's `true`).
    query: Vec<(String, Option<String>)>,
    captures: Option<regex::Captures<'r>>,
}

impl Lookup for Sources<'_> {
    fn lookup(&self, source: Source, key: &Key, out: &mut String) -> bool {
        let mut found = false;
        let mut put = |text: &str, out: &mut String| {
            if found {
                out.push_str(", ");
            }
            out.push_str(text);
            found = true;
        };
        match (source, key) {
            (Source::Headers, Key::Name(name)) => {
                for value in self.headers.get_all(name.as_str()) {
                    put(&String::from_utf8_lossy(value.as_bytes()), out);
                }
            }
            (Source::QueryParams, Key::Name(name)) => {
                for (_, value) in self.query.iter().filter(|(n, _)| n == name) {
                    put(value.as_deref().unwrap_or("true"), out);
                }
            }
            (Source::UriCaptures, key) => {
                let group = self.captures.as_ref().and_then(|captures| match key {
                    Key::Name(name) => captures.name(name),
                    Key::Index(index) => captures.get(*index),
                });
                if let Some(group) = group {
                    put(&kong_decoded(group.as_str()), out);
                }
            }
            _ => {}
        }
        found
    }
}

pub struct RequestTransformer {
    method: Option<Method>,
    /// The new method is GET, HEAD or TRACE: a form body's fields join the query.
    method_takes_form: bool,
    uri: Option<Text>,
    headers: Part<HeaderOperations>,
    query: Part<QueryOperations>,
    body: Part<JsonOperations>,
    /// Some template reads the query arguments, or the regex path's groups.
    reads_query: bool,
    reads_captures: bool,
}

impl RequestTransformer {
    pub fn new(config: RequestTransformerConfig) -> Result<RequestTransformer, String> {
        let method = config
            .http_method
            .as_deref()
            .map(|m| Method::from_bytes(m.as_bytes()))
            .transpose()
            .map_err(|e| e.to_string())?;
        let method_takes_form = method.as_ref().is_some_and(|m| [Method::GET, Method::HEAD, Method::TRACE].contains(m));
        let headers = Entries::parse(
            [
                config.remove.headers.as_slice(),
                &config.rename.headers,
                &config.replace.headers,
                &config.add.headers,
                &config.append.headers,
            ],
            true,
        )?;
        let query = Entries::parse(
            [
                config.remove.querystring.as_slice(),
                &config.rename.querystring,
                &config.replace.querystring,
                &config.add.querystring,
                &config.append.querystring,
            ],
            true,
        )?;
        let body = Entries::parse(
            [
                config.remove.body.as_slice(),
                &config.rename.body,
                &config.replace.body,
                &config.add.body,
                &config.append.body,
            ],
            true,
        )?;
        let uri = config.replace.uri.as_deref().map(|uri| Text::parse(uri, true)).transpose()?;
        let headers = Part::new(headers, HeaderOperations::build)?;
        let query = Part::new(query, QueryOperations::build)?;
        let body = Part::new(body, JsonOperations::build_strings)?;
        let reads = |source| {
            headers.reads(source)
                || query.reads(source)
                || body.reads(source)
                || uri.as_ref().is_some_and(|u| u.reads(source))
        };
        let (reads_query, reads_captures) = (reads(Source::QueryParams), reads(Source::UriCaptures));
        Ok(RequestTransformer { method, method_takes_form, uri, headers, query, body, reads_query, reads_captures })
    }

    fn query_changes(&self) -> bool {
        match &self.query {
            Part::Fixed(operations) => !operations.is_empty(),
            Part::Templated(_) => true,
        }
    }
}

/// Kong answers a template that fails at run time with a 500 (and logs it; here at
/// debug level, since what a client sends can cause it).
fn render_failed(error: &str) -> Flow {
    tracing::debug!(%error, "[request-transformer] failed to render a template");
    Flow::Exit(Exit::message(StatusCode::INTERNAL_SERVER_ERROR, "An unexpected error occurred"))
}

impl Plugin for RequestTransformer {
    fn phases(&self) -> Phases {
        Phases::NONE
    }

    /// Runs again from the start once a body it asked for is read: nothing changes
    /// before it has what it needs.
    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        // The method step reads a form body (Content-Type as the client sent it).
        let merge_form = self.method_takes_form && body_kind(request.headers) == Some(BodyKind::Form);
        if merge_form && ctx.request_body.is_none() {
            return Flow::ReadBody;
        }
        let query_changes = merge_form || self.query_changes();
        let query: Option<String> = match (merge_form, query_changes || self.reads_query) {
            (true, _) => merge_form_into_query(
                ctx.upstream_query.as_deref().or(request.query),
                ctx.request_body.as_deref().unwrap_or_default(),
            ),
            (false, true) => ctx.upstream_query.clone().or_else(|| request.query.map(str::to_string)),
            (false, false) => None,
        };

        // Every template rendered first, over the request as received.
        let sources = Sources {
            headers: &*request.headers,
            query: match (&query, self.reads_query) {
                (Some(query), true) => query
                    .split('&')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| match pair.split_once('=') {
                        Some((name, value)) => {
                            (crate::text::percent_decode(name, true), Some(crate::text::percent_decode(value, true)))
                        }
                        None => (crate::text::percent_decode(pair, true), None),
                    })
                    .collect(),
                _ => Vec::new(),
            },
            captures: if self.reads_captures { request.uri.captures() } else { None },
        };
        let uri = self.uri.as_ref().map(|uri| escape_path(&uri.render(&sources)).into_owned());
        let headers = match self.headers.resolve(&sources, HeaderOperations::build) {
            Ok(headers) => headers,
            Err(error) => return render_failed(&error),
        };
        let query_operations = match self.query.resolve(&sources, QueryOperations::build) {
            Ok(operations) => operations,
            Err(error) => return render_failed(&error),
        };
        let body = match self.body.resolve(&sources, JsonOperations::build_strings) {
            Ok(operations) => operations,
            Err(error) => return render_failed(&error),
        };
        drop(sources);
        if let Some(uri) = &uri {
            if !uri.starts_with('/') {
                return render_failed(&format!("path must start with /: '{uri}'"));
            }
        }

        // The body step reads Content-Type after the header step.
        let kind = if body.is_empty() {
            None
        } else if headers.touches(&http::header::CONTENT_TYPE) {
            let mut after = request.headers.clone();
            headers.apply(&mut after);
            body_kind(&after)
        } else {
            body_kind(request.headers)
        };
        if kind.is_some() && ctx.request_body.is_none() {
            return Flow::ReadBody;
        }

        // Kong's order: uri, method, headers, body, query.
        if let Some(uri) = uri {
            ctx.upstream_path = Some(uri);
        }
        if let Some(method) = &self.method {
            ctx.upstream_method = Some(method.clone());
        }
        headers.apply(request.headers);
        if let (Some(kind), Some(sent)) = (kind, &ctx.request_body) {
            let edited = match kind {
                // No body is an empty object (Kong's `{}`); one that is not JSON
                // is left as it is.
                BodyKind::Json if sent.is_empty() => body.apply_json(b"{}"),
                BodyKind::Json => body.apply_json(sent),
                BodyKind::Form => body.apply_form(sent),
            };
            if let Some(edited) = edited {
                ctx.request_body = Some(bytes::Bytes::from(edited));
            }
        }
        if query_changes {
            ctx.upstream_query = Some(query_operations.apply(query.as_deref()).unwrap_or_default());
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
mod tests;
