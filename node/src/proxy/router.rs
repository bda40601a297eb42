//! The router: Kong's `traditional_compatible` matching, compiled once per config.
//!
//! A route matches when every field it sets matches: `hosts` (exact, `*.suffix` or
//! `prefix.*`, optionally with `:port`), `paths` (prefix, or `~` regex), `methods`,
//! `headers` (any of the listed values, case-insensitive) and `protocols`.
//!
//! Priority, highest first (Kong's order for the traditional router):
//! 1. routes that set more of hosts / headers / methods / paths / snis;
//! 2. among those, by which fields: hosts > headers > paths > methods > snis (Kong's
//!    match-rule bits);
//! 3. a plain host before a wildcard host;
//! 4. more headers;
//! 5. regex paths before prefix paths; regex by `regex_priority`, prefix by length;
//! 6. older routes (`created_at`), then id.
//!
//! Lookup never scans every route: prefix paths sit in a byte trie walked along the
//! request path, so only routes whose prefix the path starts with are checked; regex
//! routes and routes without paths are checked in priority order. Rust's `regex` has
//! no look-around or back-references (Kong's PCRE has); such paths are refused when
//! the config is compiled, and the route never matches.

use regex::Regex;
use tollgate_raft_store::entities::Route;
use uuid::Uuid;

/// One route as the data path needs it.
#[derive(Debug)]
pub struct CompiledRoute {
    pub id: Uuid,
    pub name: Option<String>,
    pub service: Option<Uuid>,
    pub strip_path: bool,
    pub preserve_host: bool,
    hosts: Vec<HostPattern>,
    methods: Vec<String>,
    /// Lower-cased header name and lower-cased accepted values.
    headers: Vec<(String, Vec<String>)>,
    protocols: Vec<String>,
}

#[derive(Debug)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`: the part after `*`.
    Suffix(String),
    /// `example.*`: the part before `*`.
    Prefix(String),
}

impl HostPattern {
    fn parse(pattern: &str) -> HostPattern {
        let pattern = pattern.to_ascii_lowercase();
        if let Some(suffix) = pattern.strip_prefix('*') {
            HostPattern::Suffix(suffix.to_string())
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            HostPattern::Prefix(prefix.to_string())
        } else {
            HostPattern::Exact(pattern)
        }
    }

    /// `host` is lower-case, with the port when the request had one.
    fn matches(&self, host: &str, host_without_port: &str) -> bool {
        match self {
            HostPattern::Exact(exact) => exact == host || exact == host_without_port,
            HostPattern::Suffix(suffix) => {
                host_without_port.ends_with(suffix.as_str()) || host.ends_with(suffix.as_str())
            }
            HostPattern::Prefix(prefix) => host_without_port.starts_with(prefix.as_str()),
        }
    }

    fn is_wildcard(&self) -> bool {
        !matches!(self, HostPattern::Exact(_))
    }
}

/// The parts of a request the router reads.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Lower-case `Host` (with port if given).
    pub host: &'a str,
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    /// `http` or `https`.
    pub protocol: &'a str,
}

/// A successful match.
#[derive(Debug, Clone, Copy)]
pub struct Match<'a> {
    pub route: &'a CompiledRoute,
    /// Length of the request path's matched part (the prefix, or the regex match's end).
    pub matched_len: usize,
    /// The regex path that matched, when one did: its captures (Kong's `uri_captures`)
    /// are only computed when a plugin asks for them.
    pub regex: Option<&'a Regex>,
}

/// One path of one route, with its priority rank (lower is better).
#[derive(Debug)]
struct PathEntry {
    rank: u32,
    route: u32,
}

#[derive(Debug, Default)]
struct TrieNode {
    children: Vec<(u8, u32)>,
    entries: Vec<PathEntry>,
}

#[derive(Debug)]
pub struct Router {
    routes: Vec<CompiledRoute>,
    trie: Vec<TrieNode>,
    /// Regex paths and routes without paths, by rank.
    regexes: Vec<(PathEntry, Regex)>,
    /// All regex paths in one automaton: one scan of the request path says which of
    /// them can match, instead of trying each in turn. `None` if it could not be built
    /// within the regex crate's size limits (each regex is then tried in turn).
    regex_set: Option<regex::RegexSet>,
    pathless: Vec<PathEntry>,
    /// Some route matches on request headers (the direct path then builds a map).
    reads_headers: bool,
    /// Paths refused at compile time (route id, path, reason), for the log.
    pub refused: Vec<(Uuid, String, String)>,
}

/// A router with no routes: it matches nothing. The trie always has its root, so
/// lookups never index an empty table.
impl Default for Router {
    fn default() -> Router {
        Router {
            routes: Vec::new(),
            trie: vec![TrieNode::default()],
            regexes: Vec::new(),
            regex_set: None,
            pathless: Vec::new(),
            reads_headers: false,
            refused: Vec::new(),
        }
    }
}

/// Most routes' paths indexed; each path adds at most its length in trie nodes.
pub const ROUTER_TRIE_NODES_MAX: usize = 16 * 1024 * 1024;

/// The sort key of one (route, path): smaller sorts first.
type RankKey = (i64, i64, u8, i64, u8, i64, i64, i64, Uuid);

/// Kong's match-rule bits: with equal counts, the route whose fields weigh more wins.
const RULE_HOST: i64 = 0x40;
const RULE_HEADER: i64 = 0x20;
const RULE_URI: i64 = 0x10;
const RULE_METHOD: i64 = 0x08;
const RULE_SNI: i64 = 0x04;

impl Router {
    /// Compiles routes into a router.
    pub fn compile<'a>(routes: impl Iterator<Item = &'a Route>) -> Router {
        let mut router = Router::default();
        // (key, route index, path) for every path of every route; `None` for pathless.
        let mut keyed: Vec<(RankKey, u32, Option<String>)> = Vec::new();
        let list = |values: &Option<Vec<String>>| values.clone().unwrap_or_default();
        for route in routes {
            let id = route.id;
            let hosts: Vec<HostPattern> = list(&route.hosts).iter().map(|h| HostPattern::parse(h)).collect();
            let mut headers: Vec<(String, Vec<String>)> = route
                .headers
                .iter()
                .flatten()
                .map(|(name, values)| {
                    (name.to_ascii_lowercase(), values.iter().map(|value| value.to_ascii_lowercase()).collect())
                })
                .collect();
            headers.sort();
            router.reads_headers |= !headers.is_empty();
            let methods = list(&route.methods);
            let paths = list(&route.paths);
            let snis = list(&route.snis);
            let rules = [
                (!hosts.is_empty(), RULE_HOST),
                (!headers.is_empty(), RULE_HEADER),
                (!paths.is_empty(), RULE_URI),
                (!methods.is_empty(), RULE_METHOD),
                (!snis.is_empty(), RULE_SNI),
            ];
            let categories = rules.iter().filter(|(set, _)| *set).count() as i64;
            let rule_bits: i64 = rules.iter().filter(|(set, _)| *set).map(|(_, bit)| bit).sum();
            let plain_host = u8::from(!hosts.is_empty() && hosts.iter().any(|h| !h.is_wildcard()));
            let regex_priority = route.regex_priority;
            let created_at = route.created_at;
            let index = router.routes.len() as u32;
            router.routes.push(CompiledRoute {
                id,
                name: route.name.clone(),
                service: route.service.map(|service| service.id),
                strip_path: route.strip_path,
                preserve_host: route.preserve_host,
                hosts,
                methods,
                headers,
                // Kong's router treats grpc and grpcs as http and https: a gRPC call
                // is an HTTP request (kong/router/compat.lua's PROTOCOLS_OVERRIDE).
                protocols: route
                    .protocols
                    .iter()
                    .map(|protocol| match protocol.as_str() {
                        "grpc" => "http".to_string(),
                        "grpcs" => "https".to_string(),
                        _ => protocol.clone(),
                    })
                    .collect(),
            });
            let base = |is_regex: bool, length: usize| -> RankKey {
                (
                    -categories,
                    -rule_bits,
                    1 - plain_host,
                    -(router.routes[index as usize].headers.len() as i64),
                    u8::from(!is_regex),
                    if is_regex { -regex_priority } else { 0 },
                    -(length as i64),
                    created_at,
                    id,
                )
            };
            if paths.is_empty() {
                keyed.push((base(false, 0), index, None));
            }
            for path in paths {
                let is_regex = path.starts_with('~');
                keyed.push((base(is_regex, if is_regex { 0 } else { path.len() }), index, Some(path)));
            }
        }
        keyed.sort_by_key(|entry| entry.0);
        for (rank, (_, route, path)) in keyed.into_iter().enumerate() {
            let entry = PathEntry { rank: rank as u32, route };
            match path {
                None => router.pathless.push(entry),
                Some(path) => match path.strip_prefix('~') {
                    Some(pattern) => match Regex::new(&format!("^(?:{pattern})")) {
                        Ok(regex) => router.regexes.push((entry, regex)),
                        Err(error) => {
                            let id = router.routes[route as usize].id;
                            tracing::warn!(route = %id, path, %error, "regex path not supported; the route will not match it");
                            router.refused.push((id, path, error.to_string()));
                        }
                    },
                    None => router.insert_prefix(&path, entry),
                },
            }
        }
        if !router.regexes.is_empty() {
            let patterns: Vec<&str> = router.regexes.iter().map(|(_, regex)| regex.as_str()).collect();
            router.regex_set = match regex::RegexSet::new(&patterns) {
                Ok(set) => Some(set),
                Err(error) => {
                    tracing::warn!(%error, regexes = patterns.len(), "regex paths are tried one by one");
                    None
                }
            };
        }
        router
    }

    fn insert_prefix(&mut self, path: &str, entry: PathEntry) {
        let mut node = 0usize;
        for byte in path.bytes() {
            let next = self.trie[node].children.iter().find(|(b, _)| *b == byte).map(|(_, n)| *n as usize);
            node = match next {
                Some(next) => next,
                None => {
                    if self.trie.len() >= ROUTER_TRIE_NODES_MAX {
                        tracing::warn!(path, "router trie full; path not indexed");
                        return;
                    }
                    self.trie.push(TrieNode::default());
                    let created = self.trie.len() - 1;
                    self.trie[node].children.push((byte, created as u32));
                    created
                }
            };
        }
        self.trie[node].entries.push(entry);
    }

    /// Whether some route matches on request headers.
    pub fn reads_headers(&self) -> bool {
        self.reads_headers
    }

    /// The best route for a request, if any.
    pub fn find<'a>(&'a self, request: &RequestView<'_>) -> Option<Match<'a>> {
        let host_without_port = strip_port(request.host);
        let mut best: Option<(u32, Match<'a>)> = None;
        let consider =
            |entry: &PathEntry, matched_len: usize, regex: Option<&'a Regex>, best: &mut Option<(u32, Match<'a>)>| {
                if best.as_ref().is_some_and(|(rank, _)| *rank <= entry.rank) {
                    return;
                }
                let route = &self.routes[entry.route as usize];
                if self.route_matches(route, request, host_without_port) {
                    *best = Some((entry.rank, Match { route, matched_len, regex }));
                }
            };
        // Prefix paths: walk the trie along the request path.
        let mut node = 0usize;
        for entry in &self.trie[0].entries {
            consider(entry, 0, None, &mut best);
        }
        for (position, byte) in request.path.bytes().enumerate() {
            let Some(next) = self.trie[node].children.iter().find(|(b, _)| *b == byte).map(|(_, n)| *n as usize) else {
                break;
            };
            node = next;
            for entry in &self.trie[node].entries {
                consider(entry, position + 1, None, &mut best);
            }
        }
        let regex_matches = self.regex_set.as_ref().map(|set| set.matches(request.path));
        for (position, (entry, regex)) in self.regexes.iter().enumerate() {
            if best.as_ref().is_some_and(|(rank, _)| *rank <= entry.rank) {
                break;
            }
            if regex_matches.as_ref().is_some_and(|matches| !matches.matched(position)) {
                continue;
            }
            if let Some(found) = regex.find(request.path) {
                consider(entry, found.end(), Some(regex), &mut best);
            }
        }
        for entry in &self.pathless {
            if best.as_ref().is_some_and(|(rank, _)| *rank <= entry.rank) {
                break;
            }
            // A route without paths matches as if its path were `/` (Kong's routers,
            // kong/router/atc.lua): what follows the first slash is the postfix, so
            // service `/service` with `strip_path` takes `GET /` to `/service`
            // (spec/fixtures/router_path_handling_tests.lua:105).
            consider(entry, usize::from(request.path.starts_with('/')), None, &mut best);
        }
        best.map(|(_, found)| found)
    }

    fn route_matches(&self, route: &CompiledRoute, request: &RequestView<'_>, host_without_port: &str) -> bool {
        if !route.protocols.is_empty() && !route.protocols.iter().any(|p| p == request.protocol) {
            return false;
        }
        if !route.methods.is_empty() && !route.methods.iter().any(|m| m == request.method) {
            return false;
        }
        if !route.hosts.is_empty() && !route.hosts.iter().any(|h| h.matches(request.host, host_without_port)) {
            return false;
        }
        route.headers.iter().all(|(name, values)| {
            request.headers.get_all(name.as_str()).iter().any(|value| {
                value.to_str().is_ok_and(|value| values.iter().any(|accepted| accepted.eq_ignore_ascii_case(value)))
            })
        })
    }
}

/// `host` without its `:port` (IPv6 literals keep their brackets).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(address, _)| &host[..address.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};
    use tollgate_raft_store::EntityKind;

    use super::*;

    fn route(body: Value) -> Route {
        let mut object = body.as_object().unwrap().clone();
        object.entry("id").or_insert_with(|| Value::from(Uuid::new_v4().to_string()));
        tollgate_raft_store::entities::read(EntityKind::Route, &object).unwrap()
    }

    fn find<'a>(router: &'a Router, method: &str, host: &str, path: &str) -> Option<&'a str> {
        let headers = http::HeaderMap::new();
        let view = RequestView { method, host, path, headers: &headers, protocol: "http" };
        router.find(&view).and_then(|m| m.route.name.as_deref())
    }

    #[test]
    fn a_router_with_no_routes_matches_nothing() {
        assert_eq!(find(&Router::default(), "GET", "example.com", "/anything"), None);
        assert_eq!(find(&Router::compile(std::iter::empty()), "GET", "example.com", "/"), None);
    }

    #[test]
    fn longest_prefix_wins_and_hosts_narrow() {
        let routes = [
            route(json!({"name": "root", "paths": ["/"]})),
            route(json!({"name": "api", "paths": ["/api"]})),
            route(json!({"name": "api-v1", "paths": ["/api/v1"]})),
            route(json!({"name": "host-api", "paths": ["/api"], "hosts": ["example.com"]})),
            route(json!({"name": "wild", "hosts": ["*.example.org"]})),
            route(json!({"name": "post-only", "paths": ["/form"], "methods": ["POST"]})),
        ];
        let router = Router::compile(routes.iter());
        assert_eq!(find(&router, "GET", "other.com", "/api/v1/users"), Some("api-v1"));
        assert_eq!(find(&router, "GET", "other.com", "/api/v2"), Some("api"));
        assert_eq!(find(&router, "GET", "example.com", "/api/v1"), Some("host-api"), "more categories first");
        assert_eq!(find(&router, "GET", "example.com:8000", "/api"), Some("host-api"));
        assert_eq!(find(&router, "GET", "a.example.org", "/anything"), Some("wild"));
        assert_eq!(find(&router, "GET", "other.com", "/form"), Some("root"));
        assert_eq!(find(&router, "POST", "other.com", "/form"), Some("post-only"));
        assert_eq!(find(&router, "GET", "other.com", "/x"), Some("root"));
    }

    #[test]
    fn regex_paths_by_priority_before_prefixes() {
        let routes = [
            route(json!({"name": "prefix", "paths": ["/users"]})),
            route(json!({"name": "low", "paths": [r"~/users/\d+$"], "regex_priority": 1})),
            route(json!({"name": "high", "paths": [r"~/users/\d+"], "regex_priority": 5})),
            route(json!({"name": "unsupported", "paths": [r"~/(?=x)"]})),
        ];
        let router = Router::compile(routes.iter());
        assert_eq!(find(&router, "GET", "h", "/users/42"), Some("high"));
        assert_eq!(find(&router, "GET", "h", "/users/abc"), Some("prefix"));
        assert_eq!(router.refused.len(), 1);
    }

    #[test]
    fn a_regex_match_keeps_its_regex_for_the_captures() {
        let routes = [
            route(json!({"name": "re", "paths": [r"~/users/(?<id>\d+)"]})),
            route(json!({"name": "prefix", "paths": ["/p"]})),
        ];
        let router = Router::compile(routes.iter());
        let headers = http::HeaderMap::new();
        let view = RequestView { method: "GET", host: "h", path: "/users/42/x", headers: &headers, protocol: "http" };
        let found = router.find(&view).expect("a match");
        let captures = found.regex.and_then(|regex| regex.captures(view.path)).expect("captures");
        assert_eq!(&captures["id"], "42");
        assert_eq!(&captures[0], "/users/42");
        let view = RequestView { path: "/p/x", ..view };
        assert!(router.find(&view).expect("a match").regex.is_none());
    }

    #[test]
    fn no_match() {
        let routes = [route(json!({"name": "api", "paths": ["/api"]}))];
        let router = Router::compile(routes.iter());
        assert_eq!(find(&router, "GET", "h", "/other"), None);
        assert_eq!(find(&router, "GET", "h", "/ap"), None);
    }
}
