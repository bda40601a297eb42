//! cors, as Kong's handler (kong/plugins/cors/handler.lua) does it: the access phase
//! answers preflights itself; every other response, the upstream's or an answer the
//! proxy or another plugin made, gets the headers in `header_filter`, set over the
//! upstream's: an `Access-Control-Allow-Origin` the upstream sent goes when the
//! request's origin is not allowed, and `Vary: Origin` is added to the upstream's
//! `Vary`, never in its place.
//!
//! Origins are compared as Kong compares them, quirks included, so that a Kong config
//! allows exactly the origins it allowed there (spec/03-plugins/13-cors/01-access_spec.lua:29-236):
//! - no `origins`, or `*` alone: every origin, `Access-Control-Allow-Origin: *`;
//! - one entry that is no regular expression: sent as configured, whatever the
//!   request's `Origin` (the browser compares);
//! - otherwise each entry in turn: a regular expression (any character outside
//!   `[A-Za-z0-9.:/-]`) against the origin's host when it has no `:`, against its
//!   normalised `scheme://host[:port]` when it has; an origin against the normalised
//!   origin, exactly. A match is answered with the normalised origin, no match with
//!   no `Access-Control-Allow-Origin`. `*` among other entries allows every origin.

use std::borrow::Cow;

use bytes::Bytes;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tollgate_raft_store::plugins::{is_origin_pattern, origin_regex, CorsConfig, CORS_METHODS};

use super::{Ctx, Env, Exit, Flow, Phases, Plugin, RequestView};

const ALLOW_PRIVATE_NETWORK: HeaderName = HeaderName::from_static("access-control-allow-private-network");
const REQUEST_PRIVATE_NETWORK: HeaderName = HeaderName::from_static("access-control-request-private-network");

/// What the access phase leaves for `header_filter` ([`Ctx::cors`]): the request's
/// `Origin`, `None` when it sent none or an empty one. Not left for a preflight (Kong's
/// `skip_response_headers`): answered here with every header already, or delegated
/// to the upstream with `preflight_continue`, whose answer then goes untouched.
pub struct Pending {
    origin: Option<HeaderValue>,
}

/// Which origins a config allows, decided when the config compiles.
enum Origins {
    /// No `origins`, or `*` alone.
    All,
    /// One entry that is no regular expression: sent as it is.
    Fixed(HeaderValue),
    /// Entries the request's `Origin` is matched against; `wildcard`: `*` is among
    /// them, and every origin is allowed once the request sends one.
    Listed { wildcard: bool, entries: Vec<Entry> },
}

/// One listed origin.
enum Entry {
    /// A regular expression (Kong's anchoring), on the origin's host alone (`by_host`:
    /// the entry has no `:`) or on its normalised `scheme://host[:port]`.
    Pattern { regex: regex::Regex, by_host: bool },
    /// An origin, normalised.
    Exact(String),
}

/// Where headers are being set: `Vary` is set on a preflight answer, added to the
/// upstream's on a response (Kong's `set_header` and `add_header`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Preflight,
    Response,
}

/// cors: answers preflight requests and adds the CORS headers to responses.
pub struct Cors {
    origins: Origins,
    credentials: bool,
    preflight_continue: bool,
    private_network: bool,
    allow_origin_absent: bool,
    methods: HeaderValue,
    /// `headers`, when it lists any (otherwise the asked ones are echoed).
    headers: Option<HeaderValue>,
    /// `exposed_headers`, when it lists any.
    exposed: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
}

impl Cors {
    pub fn new(config: CorsConfig) -> Result<Cors, String> {
        let join = |list: &[String]| HeaderValue::from_str(&list.join(",")).map_err(|error| error.to_string());
        let listed = |list: Option<&[String]>| list.filter(|list| !list.is_empty()).map(join).transpose();
        // `methods: null` answers with Kong's default list.
        let methods = match &config.methods {
            Some(methods) => join(methods)?,
            None => join(&CORS_METHODS.map(String::from))?,
        };
        Ok(Cors {
            origins: Origins::compile(config.origins.as_deref().unwrap_or_default())?,
            credentials: config.credentials,
            preflight_continue: config.preflight_continue,
            private_network: config.private_network,
            allow_origin_absent: config.allow_origin_absent,
            methods,
            headers: listed(config.headers.as_deref())?,
            exposed: listed(config.exposed_headers.as_deref())?,
            max_age: config.max_age.map(HeaderValue::from),
        })
    }

    /// `Access-Control-Allow-Origin` for a request's `Origin` (Kong's
    /// `configure_origin`); returns whether every origin is allowed. `Vary: Origin`
    /// goes on whenever the answer depends on the origin, even when it is refused (a
    /// cache must not hand one origin's answer to another).
    fn allow_origin(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap, phase: Phase) -> bool {
        let (wildcard, entries) = match &self.origins {
            Origins::All => {
                headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
                return true;
            }
            Origins::Fixed(value) => {
                vary(headers, phase);
                headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, value.clone());
                return false;
            }
            Origins::Listed { wildcard, entries } => (*wildcard, entries),
        };
        vary(headers, phase);
        if let Some(origin) = origin {
            if wildcard {
                headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
                return true;
            }
            if let Some(allowed) = matched(entries, origin) {
                headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
                return false;
            }
        }
        // Not allowed: an upstream's own answer does not stand either.
        headers.remove(ACCESS_CONTROL_ALLOW_ORIGIN);
        false
    }

    /// `Access-Control-Allow-Credentials` (Kong's `configure_credentials`). With
    /// every origin allowed, `*` cannot go with credentials (browsers refuse it), so
    /// the request's own `Origin` is sent back instead; without an `Origin`, `*` stays
    /// and credentials are not offered.
    fn allow_credentials(&self, all: bool, origin: Option<&HeaderValue>, headers: &mut HeaderMap, phase: Phase) {
        if !self.credentials {
            return;
        }
        let allowed = HeaderValue::from_static("true");
        if !all {
            headers.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, allowed);
            return;
        }
        if let Some(origin) = origin {
            vary(headers, phase);
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            headers.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, allowed);
        }
    }

    /// The answer to a preflight: 200, no body, every header here.
    fn preflight(&self, origin: &HeaderValue, request: &HeaderMap) -> Exit {
        let mut headers = HeaderMap::new();
        let all = self.allow_origin(Some(origin), &mut headers, Phase::Preflight);
        self.allow_credentials(all, Some(origin), &mut headers, Phase::Preflight);
        let allowed_headers = self.headers.as_ref().or_else(|| request.get(ACCESS_CONTROL_REQUEST_HEADERS));
        if let Some(allowed) = allowed_headers {
            headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, allowed.clone());
        }
        headers.insert(ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        if let Some(max_age) = &self.max_age {
            headers.insert(ACCESS_CONTROL_MAX_AGE, max_age.clone());
        }
        if self.private_network && request.get(REQUEST_PRIVATE_NETWORK).is_some_and(|value| value == "true") {
            headers.insert(ALLOW_PRIVATE_NETWORK, HeaderValue::from_static("true"));
        }
        let headers = headers.iter().map(|(name, value)| (name.clone(), value.clone())).collect();
        Exit { status: StatusCode::OK, body: Bytes::new(), headers }
    }
}

impl Plugin for Cors {
    fn phases(&self) -> Phases {
        // The headers are set over the upstream's, one removed, `Vary` added to: that
        // needs the response head as a map.
        Phases { header_filter: true, ..Phases::NONE }
    }

    fn access(&self, ctx: &mut Ctx, request: &mut RequestView<'_>, _env: &Env<'_>) -> Flow {
        let origin = request.headers.get(ORIGIN).filter(|origin| !origin.is_empty()).cloned();
        let preflight =
            *request.method == http::Method::OPTIONS && request.headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD);
        match origin {
            Some(_) if preflight && self.preflight_continue => Flow::Continue,
            Some(origin) if preflight => Flow::Exit(self.preflight(&origin, request.headers)),
            origin => {
                ctx.cors = Some(Pending { origin });
                Flow::Continue
            }
        }
    }

    fn header_filter(&self, ctx: &mut Ctx, _status: StatusCode, headers: &mut HeaderMap) {
        let Some(pending) = &ctx.cors else { return };
        let origin = pending.origin.as_ref();
        if origin.is_none() && !self.allow_origin_absent {
            return;
        }
        let all = self.allow_origin(origin, headers, Phase::Response);
        self.allow_credentials(all, origin, headers, Phase::Response);
        if let Some(exposed) = &self.exposed {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, exposed.clone());
        }
    }
}

/// `Vary: Origin`: set on a preflight answer, added to the upstream's on a response
/// (an upstream's `Vary: Accept-Encoding` stays, as its own line).
fn vary(headers: &mut HeaderMap, phase: Phase) {
    let origin = HeaderValue::from_static("Origin");
    match phase {
        Phase::Preflight => {
            headers.insert(VARY, origin);
        }
        Phase::Response => {
            headers.append(VARY, origin);
        }
    }
}

impl Origins {
    fn compile(origins: &[String]) -> Result<Origins, String> {
        match origins {
            [] => Ok(Origins::All),
            [only] if only == "*" => Ok(Origins::All),
            [only] if !is_origin_pattern(only) => {
                HeaderValue::from_str(only).map(Origins::Fixed).map_err(|error| error.to_string())
            }
            _ => Ok(Origins::Listed {
                wildcard: origins.iter().any(|origin| origin == "*"),
                entries: origins
                    .iter()
                    .filter(|origin| *origin != "*")
                    .map(String::as_str)
                    .map(Entry::compile)
                    .collect::<Result<_, _>>()?,
            }),
        }
    }
}

impl Entry {
    fn compile(origin: &str) -> Result<Entry, String> {
        if !is_origin_pattern(origin) {
            return Ok(Entry::Exact(Normalised::of(origin).domain.into_owned()));
        }
        let regex = origin_regex(origin).map_err(|error| error.to_string())?;
        Ok(Entry::Pattern { regex, by_host: !origin.contains(':') })
    }

    fn allows(&self, origin: &Normalised<'_>) -> bool {
        match self {
            Entry::Pattern { regex, by_host: true } => regex.is_match(origin.host),
            Entry::Pattern { regex, by_host: false } => regex.is_match(&origin.domain),
            Entry::Exact(domain) => *domain == origin.domain,
        }
    }
}

/// The normalised origin, as `Access-Control-Allow-Origin` carries it, when an entry
/// allows the request's `Origin`.
fn matched(entries: &[Entry], origin: &HeaderValue) -> Option<HeaderValue> {
    let text = String::from_utf8_lossy(origin.as_bytes());
    let normalised = Normalised::of(&text);
    if !entries.iter().any(|entry| entry.allows(&normalised)) {
        return None;
    }
    HeaderValue::from_str(&normalised.domain).ok()
}

/// An origin as Kong compares it (`normalize_origin`): `scheme://host[:port]`
/// without the scheme's default port (`:80` for http, `:443` for https), and its host.
/// A value with no host (`example.test`, no `//`) stays as it is, and is its own host.
struct Normalised<'a> {
    domain: Cow<'a, str>,
    host: &'a str,
}

impl<'a> Normalised<'a> {
    fn of(text: &'a str) -> Normalised<'a> {
        let Url { scheme, host: Some(host), port } = Url::parse(text) else {
            return Normalised { domain: Cow::Borrowed(text), host: text };
        };
        let default_port = matches!((scheme, port), (Some("http"), Some("80")) | (Some("https"), Some("443")));
        let port = port.filter(|_| !default_port);
        let mut domain = String::with_capacity(text.len());
        if let Some(scheme) = scheme {
            domain.push_str(scheme);
            domain.push_str("://");
        }
        domain.push_str(host);
        if let Some(port) = port {
            domain.push(':');
            domain.push_str(port);
        }
        Normalised { domain: Cow::Owned(domain), host }
    }
}

/// What Kong's normalisation reads of a URL, parsed as LuaSocket's `url.parse` does
/// (its rules, not RFC 3986's, decide which origins match): a scheme is letters,
/// digits, `+`, `-` and `.` before the first `:`; an authority follows `//`, up to the
/// next `/`; user information before its first `@` is dropped; the port is what follows
/// its last `:` (none when a `]` follows it); brackets around an IPv6 host are dropped.
struct Url<'a> {
    scheme: Option<&'a str>,
    host: Option<&'a str>,
    port: Option<&'a str>,
}

impl<'a> Url<'a> {
    fn parse(text: &'a str) -> Url<'a> {
        let (scheme, rest) = match text.split_once(':') {
            Some((scheme, rest)) if is_scheme(scheme) => (Some(scheme), rest),
            _ => (None, text),
        };
        let Some(after) = rest.strip_prefix("//") else { return Url { scheme, host: None, port: None } };
        let authority = after.split('/').next().unwrap_or_default();
        let authority = authority.split_once('@').map_or(authority, |(_, host)| host);
        let (authority, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (host, Some(port)),
            _ => (authority, None),
        };
        let host = authority.strip_prefix('[').and_then(|host| host.strip_suffix(']')).filter(|host| !host.is_empty());
        let host = Some(host.unwrap_or(authority)).filter(|host| !host.is_empty());
        Url { scheme, host, port }
    }
}

/// LuaSocket's scheme: `[%w][%w%+%-%.]*`.
fn is_scheme(text: &str) -> bool {
    let mut bytes = text.bytes();
    bytes.next().is_some_and(|first| first.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str]) -> Cors {
        let origins = Some(origins.iter().map(|origin| origin.to_string()).collect());
        Cors::new(CorsConfig { origins, ..CorsConfig::default() }).unwrap()
    }

    /// The `Access-Control-Allow-Origin` a response gets for `origin`.
    fn answer(cors: &Cors, origin: &str) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("from-upstream"));
        let origin = HeaderValue::from_str(origin).unwrap();
        cors.allow_origin(Some(&origin), &mut headers, Phase::Response);
        headers.get(ACCESS_CONTROL_ALLOW_ORIGIN).map(|value| value.to_str().unwrap().to_string())
    }

    #[test]
    fn urls_parse_as_luasocket_parses_them() {
        let parts = |text| {
            let url = Url::parse(text);
            (url.scheme, url.host, url.port)
        };
        assert_eq!(parts("http://foo.test:80"), (Some("http"), Some("foo.test"), Some("80")));
        assert_eq!(parts("https://u:p@bar.test:1234/x"), (Some("https"), Some("bar.test"), Some("1234")));
        assert_eq!(parts("example.test"), (None, None, None));
        // `foo.test` is taken for a scheme: no host, the value stays as it is.
        assert_eq!(parts("foo.test:8000"), (Some("foo.test"), None, None));
        assert_eq!(parts("http://[::1]:8080"), (Some("http"), Some("::1"), Some("8080")));
        assert_eq!(parts("http://[::1]"), (Some("http"), Some("::1"), None));
        assert_eq!(Normalised::of("http://foo.test:80").domain, "http://foo.test");
        assert_eq!(Normalised::of("https://foo.test:443").domain, "https://foo.test");
        assert_eq!(Normalised::of("http://foo.test:443").domain, "http://foo.test:443");
        assert_eq!(Normalised::of("example.test").host, "example.test");
    }

    /// spec/03-plugins/13-cors/01-access_spec.lua:29-236, a row of each table.
    #[test]
    fn origins_match_as_kongs_table_says() {
        let fixed = cors(&["foo.test"]);
        assert_eq!(answer(&fixed, "http://evil.test").as_deref(), Some("foo.test"));
        let host_only = cors(&["(.*[./])?foo\\.test"]);
        assert_eq!(answer(&host_only, "http://something.foo.test:90").as_deref(), Some("http://something.foo.test:90"));
        assert_eq!(answer(&host_only, "http://foo.test:80").as_deref(), Some("http://foo.test"));
        assert_eq!(answer(&host_only, "http://evilfoo.test"), None);
        let with_port = cors(&["(.*[./])?foo\\.test:8000"]);
        assert_eq!(answer(&with_port, "https://foo.test:8000").as_deref(), Some("https://foo.test:8000"));
        assert_eq!(answer(&with_port, "http://foo.test:90"), None);
        let anchored = cors(&["^http://(.*[.])?foo\\.test(:(80|90))?$"]);
        assert_eq!(answer(&anchored, "http://foo.test:90").as_deref(), Some("http://foo.test:90"));
        assert_eq!(answer(&anchored, "https://foo.test:8000"), None);
        let bare_hosts = cors(&["foo.test", "bar.test"]);
        assert_eq!(answer(&bare_hosts, "http://foo.test"), None);
        assert_eq!(answer(&bare_hosts, "foo.test").as_deref(), Some("foo.test"));
        let full = cors(&["http://foo.test", "https://bar.test:1234"]);
        assert_eq!(answer(&full, "http://foo.test:80").as_deref(), Some("http://foo.test"));
        assert_eq!(answer(&full, "https://bar.test:1234").as_deref(), Some("https://bar.test:1234"));
        assert_eq!(answer(&full, "http://foo.test:8000"), None);
        let wildcard = cors(&["foo.bar", "*"]);
        assert_eq!(answer(&wildcard, "http://www.example.net").as_deref(), Some("*"));
    }
}
