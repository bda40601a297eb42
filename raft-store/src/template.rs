//! request-transformer's templates, without Lua.
//!
//! Kong renders `$(expr)` in request-transformer values with Penlight's `pl.template`:
//! `expr` is any Lua expression over `headers`, `query_params`, `uri_captures` and
//! `shared`, and renders as `tostring((expr) or '')`. Tollgate runs no Lua, so it takes
//! the expressions Kong's own spec uses (spec/03-plugins/36-request-transformer/
//! 02-access_spec.lua), parsed when the config is written; anything else is refused
//! there, naming its field, instead of failing each request at run time (Kong answers
//! such a request 500):
//!
//! ```text
//! template := ( text | "$(" expr ")" )*      `$(` without its balanced `)` is text
//! expr     := term ( "or" term )*            the first term that has a value
//! term     := string | lookup | "(" expr ")"
//! string   := '…' | "…"                      escapes \\ \' \" \n \t \r
//! lookup   := source ( "." name | "[" string "]" | "[" digits "]" )
//! source   := headers | query_params | uri_captures
//! ```
//!
//! - `headers.x_name` and `headers["X-Name"]` look the header up as Kong's header
//!   table does: lower case, `_` read as `-`.
//! - `query_params.name` and `query_params["name"]`: the decoded argument.
//! - `uri_captures.name`, `uri_captures["name"]`, `uri_captures[0]` …: the groups of
//!   the regex path that routed the request, `[0]` the whole match.
//! - `$('$(x)')` renders `$(x)` as written (the spec's escape).
//!
//! Nothing in the grammar fails at run time: a lookup without a value renders empty,
//! as Lua's `nil or ''` does. `shared` (`kong.ctx.shared`) is refused: nothing in
//! Tollgate writes it (Kong's is written by Lua plugins such as pre-function).

use std::fmt;

/// Deepest nesting of parentheses in one expression.
pub const TEMPLATE_NESTING_MAX: usize = 16;

/// A value that may hold `$(…)` expressions, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    /// `a or b or …`: the first that has a value.
    Expr(Vec<Term>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Literal(String),
    Lookup(Source, Key),
}

/// What an expression reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The request's headers.
    Headers,
    /// The request's query arguments, decoded.
    QueryParams,
    /// The groups of the regex path that routed the request.
    UriCaptures,
}

/// The key of a lookup.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// For headers, already lower case with `_` as `-`.
    Name(String),
    /// `uri_captures[n]`.
    Index(usize),
}

/// Where a template's values come from, per request.
pub trait Lookup {
    /// Appends the value of `key` in `source` to `out`; `false` when there is none.
    fn lookup(&self, source: Source, key: &Key, out: &mut String) -> bool;
}

/// No values at all: what a template without expressions renders with.
pub struct NoValues;

impl Lookup for NoValues {
    fn lookup(&self, _source: Source, _key: &Key, _out: &mut String) -> bool {
        false
    }
}

impl Template {
    /// Parses a config value; `Err` says what is not supported.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        // pl.template's `()$(%b())()`: each `$(` with a balanced `)` is an expression;
        // one without stays text.
        while let Some(start) = rest.find("$(") {
            match balanced(&rest[start + 1..]) {
                Some(length) => {
                    literal.push_str(&rest[..start]);
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    let inner = &rest[start + 2..start + length];
                    let expression = &rest[start..start + 1 + length];
                    let terms = Parser { text: inner, position: 0 }
                        .expression_whole()
                        .map_err(|reason| TemplateError { expression: expression.to_string(), reason })?;
                    parts.push(Part::Expr(terms));
                    rest = &rest[start + 1 + length..];
                }
                None => {
                    literal.push_str(&rest[..start + 1]);
                    rest = &rest[start + 1..];
                }
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts })
    }

    /// Whether it has no expression (it renders as written).
    pub fn is_plain(&self) -> bool {
        self.parts.iter().all(|part| matches!(part, Part::Text(_)))
    }

    /// Whether an expression reads `source`.
    pub fn reads(&self, source: Source) -> bool {
        self.parts.iter().any(|part| match part {
            Part::Expr(terms) => terms.iter().any(|term| matches!(term, Term::Lookup(s, _) if *s == source)),
            Part::Text(_) => false,
        })
    }

    /// The text before the first expression.
    pub fn leading_text(&self) -> &str {
        match self.parts.first() {
            Some(Part::Text(text)) => text,
            _ => "",
        }
    }

    /// Whether it starts with an expression.
    pub fn starts_with_expression(&self) -> bool {
        matches!(self.parts.first(), Some(Part::Expr(_)))
    }

    /// The rendered text.
    pub fn render(&self, values: &dyn Lookup) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Expr(terms) => {
                    for term in terms {
                        let found = match term {
                            Term::Literal(text) => {
                                out.push_str(text);
                                true
                            }
                            Term::Lookup(source, key) => values.lookup(*source, key, &mut out),
                        };
                        if found {
                            break;
                        }
                    }
                }
            }
        }
        out
    }
}

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// The `$(…)` refused.
    pub expression: String,
    pub reason: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "template '{}' is not supported ({}): Tollgate renders templates without Lua, and \
             an expression may only read headers.<name>, query_params.<name> or uri_captures.<name> \
             (or [\"name\"], uri_captures[n]), or be a quoted string, joined with 'or'",
            self.expression, self.reason
        )
    }
}

/// Length of the `(…)` at the start of `text`, parentheses counted as Lua's `%b()`
/// counts them (quotes are not special); `None` when it never closes.
fn balanced(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (position, byte) in text.bytes().enumerate() {
        match byte {
            b'(' => depth += 1,
            b')' => {
                // A `)` before any `(`: not a balanced group (callers start at `(`).
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(position + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// Lua's reserved words: none is a name after `.`.
const LUA_KEYWORDS: [&str; 22] = [
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in", "local", "nil",
    "not", "or", "repeat", "return", "then", "true", "until", "while",
];

struct Parser<'t> {
    text: &'t str,
    position: usize,
}

impl<'t> Parser<'t> {
    fn expression_whole(mut self) -> Result<Vec<Term>, String> {
        let terms = self.expression(0)?;
        self.skip_space();
        match self.peek() {
            None => Ok(terms),
            Some(_) => Err(format!("unexpected '{}'", self.rest_snippet())),
        }
    }

    fn expression(&mut self, depth: usize) -> Result<Vec<Term>, String> {
        if depth > TEMPLATE_NESTING_MAX {
            return Err(format!("more than {TEMPLATE_NESTING_MAX} nested parentheses"));
        }
        let mut terms = self.term(depth)?;
        loop {
            self.skip_space();
            let save = self.position;
            match self.name() {
                Some("or") => terms.extend(self.term(depth)?),
                Some(_) => {
                    self.position = save;
                    return Err(format!("unexpected '{}'", self.rest_snippet()));
                }
                None => return Ok(terms),
            }
        }
    }

    fn term(&mut self, depth: usize) -> Result<Vec<Term>, String> {
        self.skip_space();
        match self.peek() {
            None => Err("an expression is missing".to_string()),
            Some(b'(') => {
                self.position += 1;
                let terms = self.expression(depth + 1)?;
                self.skip_space();
                if self.peek() != Some(b')') {
                    return Err("')' is missing".to_string());
                }
                self.position += 1;
                Ok(terms)
            }
            Some(b'\'' | b'"') => Ok(vec![Term::Literal(self.string()?)]),
            Some(_) => {
                let start = self.position;
                let Some(name) = self.name() else {
                    return Err(format!("unexpected '{}'", self.rest_snippet()));
                };
                let source = match name {
                    "headers" => Source::Headers,
                    "query_params" => Source::QueryParams,
                    "uri_captures" => Source::UriCaptures,
                    "shared" => {
                        return Err("'shared' (kong.ctx.shared) is not available: no Tollgate plugin writes it".into())
                    }
                    other => {
                        self.position = start;
                        return Err(format!("'{other}' is not one of headers, query_params, uri_captures"));
                    }
                };
                let key = self.key(source)?;
                self.skip_space();
                if matches!(self.peek(), Some(b'.' | b'[' | b'(' | b':')) {
                    return Err(format!("only one lookup is supported, found '{}'", self.rest_snippet()));
                }
                Ok(vec![Term::Lookup(source, key)])
            }
        }
    }

    /// `.name`, `["name"]` or `[n]` after a source.
    fn key(&mut self, source: Source) -> Result<Key, String> {
        self.skip_space();
        let name = match self.peek() {
            Some(b'.') => {
                self.position += 1;
                self.skip_space();
                match self.name() {
                    Some(name) if !LUA_KEYWORDS.contains(&name) => name.to_string(),
                    _ => return Err("a name must follow '.'".to_string()),
                }
            }
            Some(b'[') => {
                self.position += 1;
                self.skip_space();
                let key = match self.peek() {
                    Some(b'\'' | b'"') => self.string()?,
                    Some(b'0'..=b'9') => {
                        let start = self.position;
                        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
                            self.position += 1;
                        }
                        let digits = &self.text[start..self.position];
                        if source != Source::UriCaptures {
                            return Err(format!("a number index ([{digits}]) is only meaningful for uri_captures"));
                        }
                        let index = digits.parse::<usize>().map_err(|_| format!("index {digits} is too large"))?;
                        self.skip_space();
                        if self.peek() != Some(b']') {
                            return Err(format!("']' is missing after [{digits}"));
                        }
                        self.position += 1;
                        return Ok(Key::Index(index));
                    }
                    _ => {
                        return Err(format!("an index must be a quoted string or a number: '{}'", self.rest_snippet()))
                    }
                };
                self.skip_space();
                if self.peek() != Some(b']') {
                    return Err("']' is missing".to_string());
                }
                self.position += 1;
                key
            }
            _ => {
                let what = match source {
                    Source::Headers => "headers",
                    Source::QueryParams => "query_params",
                    Source::UriCaptures => "uri_captures",
                };
                return Err(format!("'{what}' needs a field (.name or [\"name\"])"));
            }
        };
        Ok(Key::Name(match source {
            // Kong's header table: any case, `_` for `-`.
            Source::Headers => name.to_ascii_lowercase().replace('_', "-"),
            _ => name,
        }))
    }

    /// A quoted string with Lua's simple escapes.
    fn string(&mut self) -> Result<String, String> {
        let quote = self.peek().unwrap_or(b'\'');
        self.position += 1;
        let mut out = String::new();
        let mut chars = self.text[self.position..].char_indices();
        while let Some((offset, c)) = chars.next() {
            match c {
                c if c as u32 == quote as u32 => {
                    self.position += offset + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, '\'')) => out.push('\''),
                    Some((_, '"')) => out.push('"'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, 'r')) => out.push('\r'),
                    Some((_, other)) => return Err(format!("the escape '\\{other}' is not supported")),
                    None => break,
                },
                '\n' => return Err("a string may not span lines".to_string()),
                c => out.push(c),
            }
        }
        Err("a string is not closed".to_string())
    }

    /// A Lua name, if one starts here.
    fn name(&mut self) -> Option<&'t str> {
        let bytes = self.text.as_bytes();
        let start = self.position;
        if !bytes.get(start).is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_') {
            return None;
        }
        let mut end = start + 1;
        while bytes.get(end).is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_') {
            end += 1;
        }
        self.position = end;
        let text: &'t str = self.text;
        Some(&text[start..end])
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.position).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.position += 1;
        }
    }

    fn rest_snippet(&self) -> String {
        self.text[self.position..].chars().take(24).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct Values(HashMap<(Source, Key), &'static str>);

    impl Lookup for Values {
        fn lookup(&self, source: Source, key: &Key, out: &mut String) -> bool {
            match self.0.get(&(source, key.clone())) {
                Some(value) => {
                    out.push_str(value);
                    true
                }
                None => false,
            }
        }
    }

    fn values() -> Values {
        let name = |n: &str| Key::Name(n.to_string());
        Values(HashMap::from([
            ((Source::UriCaptures, name("user1")), "foo"),
            ((Source::UriCaptures, name("user2")), "bar"),
            ((Source::UriCaptures, Key::Index(0)), "/user1/foo/user2/bar"),
            ((Source::Headers, name("x-remove-header")), "its a test"),
            ((Source::Headers, name("host")), "test15.test"),
            ((Source::QueryParams, name("q1")), "20"),
        ]))
    }

    fn render(text: &str) -> String {
        Template::parse(text).unwrap_or_else(|e| panic!("{text}: {e}")).render(&values())
    }

    #[test]
    fn kongs_spec_templates_render() {
        // spec/03-plugins/36-request-transformer/02-access_spec.lua, routes 10-18 and 29.
        assert_eq!(render("$(uri_captures.user1)"), "foo");
        assert_eq!(
            render("/requests/user2/$(uri_captures.user2)/user1/$(uri_captures.user1)"),
            "/requests/user2/bar/user1/foo"
        );
        assert_eq!(render("$(uri_captures.nope or 'default1')"), "default1");
        assert_eq!(render("/requests$(uri_captures[0])"), "/requests/user1/foo/user2/bar");
        assert_eq!(render("$(headers.host)"), "test15.test");
        assert_eq!(render("$(query_params.q1)"), "20");
        assert_eq!(render("$(headers['x-remove-header'])"), "its a test");
        assert_eq!(render("$(headers[\"X-Remove-Header\"])"), "its a test");
        assert_eq!(render("$(headers.x_remove_header)"), "its a test");
        assert_eq!(render("$('$(uri_captures.user1)')"), "$(uri_captures.user1)");
        assert_eq!(render("/api/v2/$(uri_captures[\"user2\"])"), "/api/v2/bar");
    }

    #[test]
    fn nothing_renders_empty_and_or_takes_the_first_value() {
        assert_eq!(render("a$(headers.none)b"), "ab");
        assert_eq!(render("$(headers.none or query_params.none or \"d\")"), "d");
        assert_eq!(render("$((headers.none or query_params.q1) or 'x')"), "20");
        assert_eq!(render("$('' or 'x')"), "", "an empty string is a value, as in Lua");
        assert_eq!(render("price $5 $( unbalanced"), "price $5 $( unbalanced");
        assert_eq!(render("no template"), "no template");
        assert!(Template::parse("no template").unwrap().is_plain());
        assert!(Template::parse("$(headers.a)").unwrap().reads(Source::Headers));
        assert!(!Template::parse("$(headers.a)").unwrap().reads(Source::UriCaptures));
    }

    #[test]
    fn lua_beyond_the_grammar_is_refused() {
        for text in [
            "/requests/user2/$(10 * uri_captures.user1)",
            "$(ERROR())",
            "$(shared.my_version)",
            "$(shared.written = true)",
            "$(type(headers[\"X-Foo\"]) == \"table\" and headers[\"X-Foo\"][1] or headers[\"X-Foo\"])",
            "$(foo(headers[\"User-Agent\"]))",
            "$(headers)",
            "$(headers.a.b)",
            "$(headers[1])",
            "$()",
            "$('open)",
            "$(headers.or)",
            "$(uri_captures[0] .. 'x')",
            "$((((((((((((((((((headers.a))))))))))))))))))",
        ] {
            let refused = Template::parse(text).expect_err(text);
            assert!(refused.to_string().contains("is not supported"), "{text}: {refused}");
        }
    }
}
